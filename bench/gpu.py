"""Side by side on one GPU, in one run: llama.cpp's own tools, its server, llama-cpp-python's server, the worker.

Run on the device machine after `source .gpu-kit/setup.sh` (bench/gpu.sh does both):
    python -m bench.gpu --model /tmp/m1b-Q4_K_M.gguf --out $OUT
Writes results.json, results.md and throughput.png to --out and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.load import TABLE_HEAD, format_row, run_load
from bench.multiturn import run_burst, run_conversations

SAMPLINGS = {
    "standard": {"temperature": 0.8, "top_k": 40, "top_p": 0.95},
    # a request with no sampling options to a server with OpenAI's defaults: temperature 1 over the whole vocabulary
    # (llama-server's own defaults truncate, so the request says it)
    "plain": {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TimeoutError(f"{url}: the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:  # not up yet
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def llama_bench(model: str) -> dict[str, float]:
    out = subprocess.run(["llama-bench", "-m", model, "-p", "512", "-n", "128", "-ngl", "99", "-fa", "1",
                          "-o", "json"], capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    tg = next(r for r in rows if r["n_gen"] > 0)
    pp = next(r for r in rows if r["n_prompt"] > 0)
    return {"tg128": tg["avg_ts"], "pp512": pp["avg_ts"]}


def batched_bench(model: str, levels: list[int], tokens: int) -> dict[int, float]:
    """llama-batched-bench: decode aggregate tokens/s (S_TG) at each level."""
    out = subprocess.run(["llama-batched-bench", "-m", model, "-ngl", "99", "-fa", "on", "-c",
                          str((128 + tokens) * max(levels) + 64), "-b", "2048", "-ub", "512", "-npp", "128",
                          "-ntg", str(tokens), "-npl", ",".join(map(str, levels))],
                         capture_output=True, text=True, check=True).stdout
    result = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and cells[0].isdigit():
            # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
            result[int(cells[2])] = float(cells[7])
    return result


class Server:
    def __init__(self, name: str, cmd: list[str], ready_path: str, port: int, env: dict | None = None) -> None:
        self.name, self.cmd, self.port = name, cmd, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(f"/tmp/{name}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        wait_http(self.url + ready_path, proc=self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def load_levels(server: Server, dialect: str, levels: list[int], tokens: int,
                sampling: dict[str, Any]) -> dict[int, dict[str, Any]]:
    asyncio.run(run_load(server.url, streams=1, tokens=8, dialect=dialect, sampling=sampling))  # warm-up
    out = {}
    for n in levels:
        # at least 8 requests a level, so that a TTFT p50 is not one request's (1 stream: 8 in a row)
        out[n] = asyncio.run(run_load(server.url, streams=n, tokens=tokens, dialect=dialect, sampling=sampling,
                                      rounds=max(1, 8 // n)))
        print(format_row(server.name, out[n]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--streams", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--only", default="bench,batched,llama-server,llama-cpp-python,worker")
    ap.add_argument("--worker-args", default="", help="extra flags for the worker")
    ap.add_argument("--lcp-streams", default="1,8",
                    help="levels for llama-cpp-python's server, which serves one request at a time")
    ap.add_argument("--sampling", choices=sorted(SAMPLINGS), default="standard",
                    help="standard: temperature 0.8, top-k 40, top-p 0.95; plain: temperature 1, nothing truncated")
    ap.add_argument("--chat", action="store_true",
                    help="also the chat workloads: multi-turn conversations and a shared-prefix burst, side by side "
                         "with llama-server")
    ap.add_argument("--system-tokens", type=int, default=5000)
    ap.add_argument("--chat-workloads", default="8,8p,32,burst",
                    help="which chat workloads: 8 conversations (8p: users pausing between turns), 32 "
                         "conversations, the shared-prefix burst")
    args = ap.parse_args()
    sampling = SAMPLINGS[args.sampling]
    levels = [int(x) for x in args.streams.split(",")]
    only = set(args.only.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx_per_seq = 128 + args.tokens + 128
    res: dict[str, Any] = {"model": os.path.basename(args.model), "levels": levels, "tokens": args.tokens,
                           "sampling": sampling, "gpu": _gpu_name(), "date": time.strftime("%Y-%m-%d")}

    if "bench" in only:
        res["llama_bench"] = llama_bench(args.model)
        print("llama-bench", res["llama_bench"], flush=True)
    if "batched" in only:
        res["batched_bench"] = batched_bench(args.model, levels, args.tokens)
        print("llama-batched-bench S_TG", res["batched_bench"], flush=True)
    print(TABLE_HEAD, flush=True)
    servers = {
        "llama-server": (lambda port: Server("llama-server", [
            "llama-server", "-m", args.model, "-ngl", "99", "-fa", "on", "-np", str(max(levels)),
            "-c", str(ctx_per_seq * max(levels)), "--port", str(port), "--no-webui"], "/health", port), "llama"),
        "worker": (lambda port: Server("llm-worker-rbee", [
            sys.executable, "-m", *worker_module(), "--model", args.model, "--parallel", str(max(levels)),
            "--ctx-size", str(ctx_per_seq), "--max-queue", "512", "--batch-size", "2048", "--flash-attn", "on",
            "--port", str(port), *args.worker_args.split()], "/v1/ready", port), "native"),
        "llama-cpp-python": (lambda port: Server("llama-cpp-python", [
            sys.executable, "-m", "llama_cpp.server", "--model", args.model, "--n_gpu_layers", "-1",
            "--flash_attn", "true", "--n_ctx", "4096", "--port", str(port)], "/v1/models", port), "openai"),
    }
    for key, (start, dialect) in servers.items():
        if key not in only:
            continue
        try:
            server = start(free_port())
        except TimeoutError:
            log = Path(f"/tmp/{key if key != 'worker' else 'llm-worker-rbee'}.log")
            print(f"{key} did not start; the end of its log:\n" + "\n".join(log.read_text().splitlines()[-15:]))
            continue
        try:
            key_levels = [int(x) for x in args.lcp_streams.split(",")] if key == "llama-cpp-python" else levels
            res[key] = load_levels(server, dialect, key_levels, args.tokens, sampling)
        finally:
            server.stop()
        shutil.copy(f"/tmp/{server.name}.log", out / f"{server.name}.log")

    if args.chat:
        res["system_tokens"] = args.system_tokens
        res["chat"] = chat_workloads(args.model, args.system_tokens, args.worker_args, out, only,
                                     set(args.chat_workloads.split(",")))
    (out / "results.json").write_text(json.dumps(res, indent=1))
    table = render(res)
    (out / "results.md").write_text(table)
    print(table)
    plot(res, out / "throughput.png")


CHAT_SLOTS = 8
CHAT_CTX = 8192  # per slot: the system prompt and four turns


def worker_module() -> list[str]:
    """The worker's module, or the step tracer around it where STEP_TRACE names a trace file (bench/step_trace.py)."""
    trace = os.environ.get("STEP_TRACE")
    return ["bench.step_trace", trace, "--"] if trace else ["worker"]


def chat_servers(model: str, worker_args: str, llama_args: str = "") -> dict[str, Callable[[int], Server]]:
    """The chat workloads' servers on 8 slots, each with its defaults for prompt caching (llama-server: cache_prompt
    on, its --cache-ram default) and the same KV memory (8 x 8192 cells)."""
    cells = CHAT_SLOTS * CHAT_CTX
    return {
        "llama-server": lambda port: Server("llama-server-chat", [
            "llama-server", "-m", model, "-ngl", "99", "-fa", "on", "-np", str(CHAT_SLOTS), "-c", str(cells),
            "--port", str(port), "--no-webui", *llama_args.split()], "/health", port),
        "worker": lambda port: Server("llm-worker-rbee-chat", [
            sys.executable, "-m", *worker_module(), "--model", model, "--parallel", str(CHAT_SLOTS),
            "--ctx-size", str(CHAT_CTX), "--max-queue", "512", "--batch-size", "2048",
            "--flash-attn", "on", "--port", str(port), *worker_args.split()], "/v1/ready", port),
    }


def chat_workloads(model: str, system_tokens: int, worker_args: str, out: Path, only: set[str],
                   chosen: set[str]) -> dict[str, Any]:
    """Chat traffic on 8 slots (chat_servers)."""
    starts = chat_servers(model, worker_args)
    workloads = {
        "8 conversations x 4 turns": lambda url: run_conversations(url, conversations=8, turns=4,
                                                                   system_tokens=system_tokens),
        # the same with users who read each reply for 0-300 ms: the turns come back spread out, not as one burst
        # (another system prompt: the first workload's would be cached already)
        "8 conversations x 4 turns, 0-300 ms pauses": lambda url: run_conversations(
            url, conversations=8, turns=4, system_tokens=system_tokens, pause_s=0.3, seed=2),
        "32 conversations x 4 turns": lambda url: run_conversations(url, conversations=32, turns=4,
                                                                    system_tokens=system_tokens),
        "32-request shared-prefix burst": lambda url: run_burst(url, requests=32, system_tokens=system_tokens),
    }
    keys = {"8": "8 conversations x 4 turns", "8p": "8 conversations x 4 turns, 0-300 ms pauses",
            "32": "32 conversations x 4 turns",
            "burst": "32-request shared-prefix burst"}
    workloads = {name: run for name, run in workloads.items() if name in {keys[k] for k in chosen}}
    res: dict[str, Any] = {}
    for name, start in starts.items():
        if name not in only:
            continue
        server = start(free_port())
        try:
            for workload, run in workloads.items():
                res.setdefault(workload, {})[name] = fig = asyncio.run(run(server.url))
                print(f"{name:13s} {workload}: {json.dumps(fig)}", flush=True)
        except Exception as exc:
            log = Path(f"/tmp/{server.name}.log").read_text().splitlines()
            print(f"{name} failed the chat workloads ({exc!r}); the end of its log:\n" + "\n".join(log[-40:]))
        finally:
            server.stop()
            shutil.copy(f"/tmp/{server.name}.log", out / f"{server.name}.log")
    return res


def _gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True).stdout.strip()
    except FileNotFoundError:
        return "unknown"


def render(res: dict[str, Any]) -> str:
    lines = [f"GPU: {res['gpu']}; model: {res['model']}; {res['tokens']} tokens a stream; sampling "
             f"{', '.join(f'{k} {v}' for k, v in res['sampling'].items())}; {res['date']}", ""]
    if "llama_bench" in res:
        lines.append(f"llama-bench: tg128 {res['llama_bench']['tg128']:.1f} tok/s, pp512 "
                     f"{res['llama_bench']['pp512']:.0f} tok/s")
    if "batched_bench" in res:
        lines.append("llama-batched-bench decode aggregate: " + ", ".join(
            f"B={b}: {v:.0f} tok/s" for b, v in sorted(res["batched_bench"].items())))
    lines += ["", TABLE_HEAD]
    for key in ("llama-server", "llama-cpp-python", "worker"):
        for n in res["levels"]:
            if key in res and n in res[key]:
                lines.append(format_row(key if key != "worker" else "llm-worker-rbee", res[key][n]))
    lines.append("")
    w, ls = res.get("worker"), res.get("llama-server")
    if w and "llama_bench" in res and 1 in w:
        ratio = w[1]["per_stream_tps_p50"] / res["llama_bench"]["tg128"]
        lines.append(f"one stream: worker / llama-bench tg = {ratio:.3f}")
    if w and ls:
        n = max(res["levels"])
        lines.append(f"{n} streams aggregate: worker / llama-server = "
                     f"{w[n]['aggregate_tps'] / ls[n]['aggregate_tps']:.2f}")
        lines.append(f"{n} streams TTFT p50: worker {w[n]['ttft_ms_p50']:.1f} ms, llama-server "
                     f"{ls[n]['ttft_ms_p50']:.1f} ms")
    for workload, by_server in res.get("chat", {}).items():
        lines += ["", f"{workload} (system prompt of {res.get('system_tokens', '~5000')} words, 8 slots):",
                  "| server | wall s | TTFT p50 by turn (ms) | TTFT p50 turns 2+ (ms) | cached tokens p50 by turn |",
                  "|---|---|---|---|---|"]
        for server, fig in by_server.items():
            if fig["workload"] == "burst":
                lines.append(f"| {server} | {fig['wall_s']} | p50 {fig['ttft_ms_p50']} / p95 {fig['ttft_ms_p95']} "
                             "| – | – |")
            else:
                lines.append(f"| {server} | {fig['wall_s']} | {fig['ttft_ms_p50_by_turn']} | "
                             f"{fig['ttft_ms_p50_later_turns']} | {fig['cached_tokens_p50_by_turn']} |")
        if {"worker", "llama-server"} <= by_server.keys():
            w, ls = by_server["worker"], by_server["llama-server"]
            ratios = [f"wall {w['wall_s'] / ls['wall_s']:.2f}"]
            if w["workload"] == "burst":
                ratios.append(f"TTFT p50 {w['ttft_ms_p50'] / ls['ttft_ms_p50']:.2f}")
            else:
                ratios.append(f"turn 1 TTFT p50 {w['ttft_ms_p50_by_turn'][0] / ls['ttft_ms_p50_by_turn'][0]:.2f}")
                ratios.append(f"turns 2+ TTFT p50 {w['ttft_ms_p50_later_turns'] / ls['ttft_ms_p50_later_turns']:.2f}")
            lines.append("worker / llama-server: " + ", ".join(ratios))
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    levels = res["levels"]
    for key, label in (("worker", "llm-worker-rbee"), ("llama-server", "llama-server"),
                       ("llama-cpp-python", "llama-cpp-python server")):
        if key in res:
            xs = sorted(res[key])
            ax.plot(xs, [res[key][n]["aggregate_tps"] for n in xs], marker="o", label=label)
    if "batched_bench" in res:
        bb = res["batched_bench"]
        ax.plot(levels, [bb.get(n) for n in levels], linestyle="--", marker="x", label="llama-batched-bench (ceiling)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(n) for n in levels])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title(f"{res['model']} on {res['gpu']}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
