"""Where a chat turn's time goes: 8 conversations (bench/multiturn.py) against the worker under bench/step_trace.py,
the client stamping each request, then for turns 2-4 the median time from the client's send to each stage: the
handler, tokenizing, the job, its prompt step, its first text, the client. Performance work only (a GPU machine).

    python -m bench.chat_timeline --model m1b.gguf --trace /tmp/tl.json [--pause 0.3] [-- extra worker flags]
    python -m bench.chat_timeline --model m1b.gguf --llama-server [--llama-args "--no-cache-idle-slots"]

Experiments go through bench/step_trace.py's environment variables (SPLIT, PROMPT_BUDGET, EVAL_TOKENS, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from typing import Any

from bench import multiturn
from bench.gpu import chat_servers, free_port

STAGES = ("arrived", "tokenizing", "tokenized", "job", "prompt_step", "prompt_step_end", "first_text", "client")


def timeline(trace: dict[str, Any], sent: list[tuple[float, float]]) -> list[dict[str, float]]:
    """Each request's stages in ms after its client sent it, matched to the trace in the order they came."""
    arrivals = sorted((r for r in trace["requests"] if "completions" in r[1]), key=lambda r: r[0])
    tokenized = sorted(trace["tokenize"])
    jobs = sorted(trace["jobs"], key=lambda j: j["created"])
    prompt_steps = [s for s in trace["steps"] if any(p[1] > 1 for p in s["parts"])]
    rows: list[dict[str, float]] = []
    taken: set[int] = set()  # ids of the arrivals, tokenizings and jobs matched already

    def take(items: list[Any], when: Any, after: float) -> Any:
        """The first item not matched yet whose time (when(item)) is not before `after`."""
        item = next(x for x in items if id(x) not in taken and when(x) >= after)
        taken.add(id(item))
        return item

    for start, first in sorted(sent):
        arrived = take(arrivals, lambda a: a[0], start - 0.0005)[0]
        tok = take(tokenized, lambda t: t[0], arrived)
        job = take(jobs, lambda j: j["created"], arrived)
        size = job["prompt"] - (job.get("cached") or 0)  # its chunk, the first prompt step with a part that long
        step = next((s for s in prompt_steps if s["begin"] >= job["submit"] and any(p[1] == size for p in s["parts"])),
                    None)
        at = {"arrived": arrived, "tokenizing": tok[0], "tokenized": tok[1], "job": job["created"],
              "prompt_step": step["begin"] if step else float("nan"),
              "prompt_step_end": step["end"] if step else float("nan"),
              "first_text": job.get("first", float("nan")), "client": first}
        rows.append({k: (v - start) * 1e3 for k, v in at.items()})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--trace", default="/tmp/chat_timeline.json")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--system-tokens", type=int, default=5000)
    ap.add_argument("--pause", type=float, default=0.0, help="users read each reply for a random 0-PAUSE seconds")
    ap.add_argument("--llama-server", action="store_true", help="llama-server instead (figures only, no timeline)")
    ap.add_argument("--llama-args", default="", help="extra llama-server flags")
    ap.add_argument("worker_args", nargs="*", help="extra worker flags, after --")
    args = ap.parse_args()
    sent: list[tuple[float, float]] = []
    complete = multiturn._complete

    async def stamped(http: Any, url: str, prompt: str, max_tokens: int) -> tuple[float, str, int]:
        start = time.perf_counter()
        first, text, cached = await complete(http, url, prompt, max_tokens)
        sent.append((start, start + first))
        return first, text, cached

    multiturn._complete = stamped  # type: ignore[assignment]
    os.environ["STEP_TRACE"] = args.trace  # the worker under bench.step_trace (bench.gpu.worker_module)
    servers = chat_servers(args.model, " ".join(args.worker_args), args.llama_args)
    server = servers["llama-server" if args.llama_server else "worker"](free_port())
    try:
        result = asyncio.run(multiturn.run_conversations(
            server.url, conversations=args.conversations, turns=4, system_tokens=args.system_tokens,
            pause_s=args.pause))
    finally:
        server.stop()  # the trace is written as the worker exits
    print(json.dumps(result))
    if args.llama_server:
        return
    with open(args.trace) as f:
        rows = timeline(json.load(f), sent)[args.conversations:]  # turns 2-4
    print("turns 2-4, median ms after the client sent: " + ", ".join(
        f"{k} {statistics.median(r[k] for r in rows):.1f}" for k in STAGES))
    for r in rows:
        print(" ".join(f"{k} {r[k]:6.1f}" for k in STAGES))


if __name__ == "__main__":
    main()
