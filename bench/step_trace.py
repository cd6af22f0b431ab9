"""The worker, with each request's tokenizing, admission and first output and each engine step timed: where a
workload's time goes, step by step. Performance work only; the trace is written when the worker exits.

    python -m bench.step_trace TRACE.json -- <worker flags>
    python -m bench.step_trace --summary TRACE.json

Experiments, by environment variable: RELEASE_GIL=1 makes the engine's per-token llama.cpp calls let go of the GIL
again (as plain ctypes does); SWITCH_INTERVAL=seconds sets sys.setswitchinterval; NO_FILLER=1 turns the filler off
(worker/llamacpp/ubatches.py); PROMPT_BUDGET=n sets the scheduler's PROMPT_ATTENTION_BUDGET (0: none); SPLIT=1 or 0
makes prompt and decode steps take turns or mix; EVAL_TOKENS=n weighs a graph evaluation as n tokens for the filler
(ubatches.EVAL_TOKENS); NO_LINE_CUTS=1 tokenizes plain text without cutting it at lines; PROFILE=file writes
cProfile's figures for the scheduler's planning there. bench/gpu.py runs the worker through this module where
STEP_TRACE names the trace file.

Times are perf_counter seconds. A step records its parts as [seq_id, tokens, pos] and its phases: plan (schedule),
queue (llama_decode), the text flushed meanwhile, wait (llama_synchronize), and the rest (sampling, update).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from typing import Any

TRACE: dict[str, list[Any]] = {"steps": [], "jobs": [], "tokenize": [], "requests": []}


def install(path: str) -> None:
    from worker.engine import core, scheduler
    from worker.http import tokenizing
    from worker.llamacpp import context

    step, decode, synchronize, submit = (core.EngineCore.step, context.Context.decode, context.Context.synchronize,
                                         core.EngineCore.submit)
    current: dict[str, Any] = {}

    def traced_step(self: Any) -> None:
        current.clear()
        current["begin"] = time.perf_counter()
        step(self)
        if "parts" in current:
            current["end"] = time.perf_counter()
            TRACE["steps"].append(dict(current))

    def traced_decode(self: Any, parts: Any) -> int:
        parts = list(parts)
        current["decode"] = time.perf_counter()
        current["parts"] = [[p[0], len(p[1]), p[2]] for p in parts]
        status = decode(self, parts)
        current["queued"] = time.perf_counter()
        return status

    def traced_synchronize(self: Any) -> None:
        current["sync"] = time.perf_counter()
        synchronize(self)
        current["synced"] = time.perf_counter()

    def traced_submit(self: Any, job: Any) -> None:
        record = {"id": job.job_id, "created": job.submitted_at, "prompt": len(job.prompt_tokens)}
        deliver = job.deliver

        def first_output(outputs: Any) -> None:
            if "first" not in record and any(getattr(o, "text", None) for o in outputs):
                record["first"] = time.perf_counter()
            if "admitted" not in record:
                for o in outputs:
                    if type(o).__name__ == "Started":
                        record["admitted"] = time.perf_counter()
                        record["cached"] = getattr(o, "cached_tokens", None)
            deliver(outputs)

        job.deliver = first_output
        record["submit"] = time.perf_counter()
        TRACE["jobs"].append(record)
        submit(self, job)

    prompt_tokens, tokenize = tokenizing.prompt_tokens, tokenizing.tokenize

    async def traced_tokenize(request: Any, text: str, **kw: Any) -> list[int]:
        began = time.perf_counter()
        tokens = await tokenize(request, text, **kw)
        TRACE["tokenize"].append([began, time.perf_counter(), len(tokens)])
        return tokens

    tokenizing.tokenize = traced_tokenize  # type: ignore[assignment]
    from aiohttp import web

    handle = web.Application._handle

    async def traced_handle(self: Any, request: Any) -> Any:
        TRACE["requests"].append([time.perf_counter(), request.path])
        return await handle(self, request)

    web.Application._handle = traced_handle  # type: ignore[method-assign]

    async def traced_prompt_tokens(request: Any, text: str, limit: int | None = None) -> list[int]:
        began = time.perf_counter()
        tokens = await prompt_tokens(request, text, limit)
        TRACE["tokenize"].append([began, time.perf_counter(), len(tokens)])
        return tokens

    admit, flush = scheduler.Scheduler._admit, scheduler.Scheduler.flush_text

    def traced_admit(self: Any) -> bool:
        began = time.perf_counter()
        admitted = admit(self)
        current["admit"] = current.get("admit", 0.0) + time.perf_counter() - began
        return admitted

    def traced_flush(self: Any) -> None:
        began = time.perf_counter()
        flush(self)
        current["flush"] = current.get("flush", 0.0) + time.perf_counter() - began

    scheduler.Scheduler._admit = traced_admit  # type: ignore[method-assign]
    scheduler.Scheduler.flush_text = traced_flush  # type: ignore[method-assign]
    if os.environ.get("RELEASE_GIL"):  # experiment: every llama.cpp call lets go of the GIL, as ctypes makes it
        import llama_cpp as lc

        from worker.llamacpp import model as model_module

        for name in ("sampled_token_ith", "logits_ith", "sampler_accept", "sampler_reset", "seq_rm"):
            full = {"sampled_token_ith": "llama_get_sampled_token_ith", "logits_ith": "llama_get_logits_ith"}.get(
                name, "llama_" + name.replace("seq_", "memory_seq_"))
            setattr(context, "_" + name, getattr(lc, full))
        model_module.Model.is_eog = lambda self, token: bool(lc.llama_vocab_is_eog(self.vocab, token))
    if os.environ.get("NO_FILLER"):  # experiment: steps as they are, never evened out with filler
        init = context.Context.__init__

        def plain_init(self: Any, *args: Any, **kw: Any) -> None:
            init(self, *args, **{**kw, "filler": False})

        context.Context.__init__ = plain_init  # type: ignore[method-assign]
    if os.environ.get("PROMPT_BUDGET"):  # experiment: the prompt attention budget (0: every prompt that fits)
        scheduler.PROMPT_ATTENTION_BUDGET = int(os.environ["PROMPT_BUDGET"]) or sys.maxsize
    if os.environ.get("SPLIT"):  # experiment: prompt and decode steps taking turns (1) or mixed (0)
        scheduler_init = scheduler.Scheduler.__init__

        def split_init(self: Any, *args: Any, **kw: Any) -> None:
            scheduler_init(self, *args, **{**kw, "split_prompt_steps": os.environ["SPLIT"] == "1"})

        scheduler.Scheduler.__init__ = split_init  # type: ignore[method-assign]
    if os.environ.get("EVAL_TOKENS"):  # experiment: what the filler weighs a graph evaluation as
        from worker.llamacpp import ubatches

        ubatches.EVAL_TOKENS = int(os.environ["EVAL_TOKENS"])
    if os.environ.get("NO_LINE_CUTS"):  # experiment: plain text is not cut at lines (special_split.py)
        from worker.llamacpp import model as model_module

        model_module.LINE_CUT_PRE_TOKENIZERS = frozenset()
    if os.environ.get("PROFILE"):  # experiment: the scheduler's planning under cProfile, stats to that file
        import cProfile
        import pstats

        profile = cProfile.Profile()
        schedule = scheduler.Scheduler.schedule

        def profiled(self: Any, *args: Any, **kw: Any) -> Any:
            return profile.runcall(schedule, self, *args, **kw)

        scheduler.Scheduler.schedule = profiled  # type: ignore[method-assign]

        def dump() -> None:
            with open(os.environ["PROFILE"], "w") as f:
                pstats.Stats(profile, stream=f).sort_stats("cumulative").print_stats(60)

        atexit.register(dump)
    if os.environ.get("SWITCH_INTERVAL"):
        sys.setswitchinterval(float(os.environ["SWITCH_INTERVAL"]))
    core.EngineCore.step = traced_step  # type: ignore[method-assign]
    context.Context.decode = traced_decode  # type: ignore[method-assign]
    context.Context.synchronize = traced_synchronize  # type: ignore[method-assign]
    core.EngineCore.submit = traced_submit  # type: ignore[method-assign]
    tokenizing.prompt_tokens = traced_prompt_tokens  # type: ignore[assignment]
    for module in list(sys.modules.values()):  # routes that imported the name already
        if getattr(module, "__name__", "").startswith("worker.http") and getattr(module, "prompt_tokens", None) is \
                prompt_tokens:
            module.prompt_tokens = traced_prompt_tokens  # type: ignore[attr-defined]

    def write() -> None:
        with open(path, "w") as f:
            json.dump(TRACE, f)

    atexit.register(write)


def summary(path: str, since: float = 0.0) -> None:
    trace = json.load(open(path))
    steps = [s for s in trace["steps"] if s["begin"] >= since]
    for s in steps:
        ntok = sum(p[1] for p in s["parts"])
        seqs = sorted(p[0] for p in s["parts"])
        plan = (s["decode"] - s["begin"]) * 1e3
        queue = (s["queued"] - s["decode"]) * 1e3
        wait = (s.get("synced", s["end"]) - s.get("sync", s["end"])) * 1e3
        total = (s["end"] - s["begin"]) * 1e3
        big = [p for p in s["parts"] if p[1] > 1]
        print(f"{s['begin']:.4f} tot {total:6.2f} plan {plan:5.2f} admit {s.get('admit', 0) * 1e3:5.2f} "
              f"flush {s.get('flush', 0) * 1e3:5.2f} queue {queue:5.2f} wait {wait:5.2f} "
              f"tokens {ntok:5d} seqs {seqs} chunks {big}")
    for j in trace["jobs"]:
        if j["submit"] < since:
            continue
        arrived = [r[0] for r in trace.get("requests", []) if r[0] <= j["created"]]
        tokenized = [t for t in trace["tokenize"] if t[1] <= j["created"]]
        if arrived and tokenized:
            print(f"  request +0, tokenize {(tokenized[-1][0] - arrived[-1]) * 1e3:.2f}-"
                  f"{(tokenized[-1][1] - arrived[-1]) * 1e3:.2f}, job made {(j['created'] - arrived[-1]) * 1e3:.2f}, "
                  f"submitted {(j['submit'] - arrived[-1]) * 1e3:.2f} ms")
        first = j.get("first")
        print(f"job {j['id'][:12]} prompt {j['prompt']} cached {j.get('cached')} submit {j['submit']:.4f} "
              f"admitted +{((j.get('admitted') or 0) - j['submit']) * 1e3:.1f} first "
              f"+{((first or 0) - j['submit']) * 1e3:.1f} ms")


def main() -> None:
    if sys.argv[1] == "--summary":
        return summary(sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
    path, rest = sys.argv[1], sys.argv[2:]
    if rest and rest[0] == "--":
        rest = rest[1:]
    install(path)
    from worker.cli import main as worker_main

    raise SystemExit(worker_main(rest))


if __name__ == "__main__":
    main()
