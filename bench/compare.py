"""Side by side on this machine: the in-process engine ceiling, then the worker over HTTP/SSE, same model,
same threads, same sampling; prints a markdown table and the worker/ceiling ratios.

    python -m bench.compare --streams 1,4 --tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request

from bench.ceiling import ceiling
from bench.load import TABLE_HEAD, format_row, run_load
from worker.config import default_threads
from worker.narration import configure


def start_worker(model: str | None, threads: int, parallel: int) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, "-m", "worker", "--port", "0", "--log-format", "json", "--threads", str(threads),
            "--threads-batch", str(len(os.sched_getaffinity(0))),
            "--parallel", str(parallel), "--ctx-size", "1024"]
    if model:
        args += ["--model", model]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    port = None
    for line in proc.stderr:  # type: ignore[union-attr]
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        if ev.get("action") == "server_listening":
            port = ev["port"]
        if ev.get("action") == "model_load_complete":
            break
        if ev.get("action") == "model_load_failed":
            raise SystemExit(f"worker failed: {ev['human']}")
    # keep draining stderr so the worker never blocks on a full pipe
    import threading

    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"
    urllib.request.urlopen(url + "/v1/ready", timeout=10).read()
    return proc, url


def main() -> None:
    from worker.models.resolve import embedded_model_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf (default: the embedded model)")
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=default_threads(), help="default: the worker's own default")
    ap.add_argument("--rounds", type=int, default=2, help="repeat each level and keep the best round of the ceiling")
    args = ap.parse_args()
    configure(worker_id=None, level="warning")
    path = args.model or str(embedded_model_path())
    levels = [int(x) for x in args.streams.split(",")]
    all_cores = len(os.sched_getaffinity(0))

    def best_ceiling(n: int, threads: int) -> dict:
        runs = [ceiling(path, streams=n, tokens=args.tokens, threads=threads, threads_batch=all_cores)
                for _ in range(args.rounds)]
        return max(runs, key=lambda r: r["aggregate_tps"])

    ceil = {n: best_ceiling(n, args.threads) for n in levels}
    ceil_all = {n: best_ceiling(n, all_cores) for n in levels} if all_cores != args.threads else {}

    proc, url = start_worker(args.model, args.threads, max(levels))
    try:
        asyncio.run(run_load(url, streams=1, tokens=16))  # a first request, as any client would send
        worker = {n: asyncio.run(run_load(url, streams=n, tokens=args.tokens, rounds=args.rounds)) for n in levels}
    finally:
        proc.terminate()
        proc.wait(30)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores ({args.threads}/{all_cores} threads), "
          f"{time.strftime('%Y-%m-%d')}; model: {os.path.basename(path)}; {args.tokens} tokens a stream, "
          "sampling temperature 0.8, top-k 40, top-p 0.95\n")
    print(TABLE_HEAD)
    for n in levels:
        c = ceil[n]
        print(f"| engine ceiling, in-process, {args.threads}/{all_cores} threads | {n} | {c['per_stream_tps']:.1f} | "
              f"{c['aggregate_tps']:.1f} | {c['ttft_ms']:.1f} | – | 0 |")
        if n in ceil_all:
            a = ceil_all[n]
            print(f"| engine ceiling, in-process, {all_cores}/{all_cores} threads | {n} | {a['per_stream_tps']:.1f} | "
                  f"{a['aggregate_tps']:.1f} | {a['ttft_ms']:.1f} | – | 0 |")
        print(format_row(f"llm-worker-rbee, HTTP/SSE, {args.threads}/{all_cores} threads", worker[n]))
    print()
    for n in levels:
        w, c = worker[n], ceil[n]
        per_stream = w["per_stream_tps_p50"] / c["per_stream_tps"]
        print(f"streams={n}, same threads: worker/ceiling per stream {per_stream:.3f}, "
              f"aggregate {w['aggregate_tps'] / c['aggregate_tps']:.3f}")


if __name__ == "__main__":
    main()
