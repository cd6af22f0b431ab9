"""Where a lone request's time to first token goes: the engine in-process, as the runtime builds it (chains in the
decode graph on a GPU, the prefix cache on), a warm-up request, then requests one after another; every
llama_decode of the measured ones timed with its shape.

    python -m bench.ttft_probe --model m.gguf --gpu-layers 999
    python -m bench.ttft_probe --model m.gguf --gpu-layers 999 --conversations 8 --slots 8   (chat turns)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from worker.engine.core import EngineCore
from worker.engine.outputs import Finished, Job, Output, TokenText
from worker.engine.sampling import SamplingParams
from worker.llamacpp import Context, Model
from worker.models.resolve import embedded_model_path

PARAMS = SamplingParams(temperature=0.8, top_k=40, top_p=0.95)


async def main_async(args: argparse.Namespace) -> None:
    if args.switch_interval is not None:
        import sys

        sys.setswitchinterval(args.switch_interval)
    model = Model.load(Path(args.model) if args.model else embedded_model_path(), ref="probe", fmt="gguf",
                       gpu_layers=args.gpu_layers)
    ctx = Context(model, n_ctx=args.ctx_size * args.slots, n_seq=args.slots, n_batch=512, threads=4,
                  flash_attn="on" if model.offloaded else "off", in_graph_sampling=model.offloaded,
                  kv_unified=args.kv_unified)
    assert ctx.warm_up() == 0
    engine = EngineCore(ctx, model, ctx_size=args.ctx_size, parallel=args.slots, max_queue=64, batch_size=512,
                        in_graph_sampling=model.offloaded, offloaded=model.offloaded, prefix_cache=True)
    decodes: list[tuple[float, float, tuple[int, ...]]] = []
    decode = ctx.decode

    def timed_decode(parts):  # type: ignore[no-untyped-def]
        parts = list(parts)
        t = time.perf_counter()
        status = decode(parts)
        decodes.append((t, time.perf_counter() - t, tuple(len(p[1]) for p in parts)))
        return status

    ctx.decode = timed_decode  # type: ignore[method-assign]
    events: list[tuple[float, float, str]] = []  # (start, seconds, what): the engine thread's phases, submissions

    def timed(name: str, fn):  # type: ignore[no-untyped-def]
        def run(*a, **kw):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                events.append((t, time.perf_counter() - t, name))
        return run

    if args.phases:
        engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)  # type: ignore[method-assign]
        engine._flush_text = timed("flush_text", engine._flush_text)  # type: ignore[method-assign]
        engine._sample = timed("sample", engine._sample)  # type: ignore[method-assign]
        engine.scheduler.update = timed("update", engine.scheduler.update)  # type: ignore[method-assign]
        engine.submit = timed("submit", engine.submit)  # type: ignore[method-assign]
        ctx.decode = timed("decode", ctx.decode)  # type: ignore[method-assign]
    if args.attach_all:  # every slot's chain attached once at load, then detached: does a later attach cost less?
        for seq in range(args.slots):
            ctx.use_chain(seq, PARAMS, reuse=False)
        assert ctx.decode([(seq, [max(model.bos_token, 0)], 0, True, False, 0) for seq in range(args.slots)]) == 0
        ctx.clear()
        for seq in range(args.slots):
            ctx.drop_chain(seq)
    engine.start(asyncio.get_running_loop())
    if args.conversations:
        await conversations(args, engine, model, decodes, events)
        engine.close()
        model.close()
        return
    prompt = model.prompt_tokens("Tell me a story about a dragon who learns to count to one hundred.")
    loop = asyncio.get_running_loop()
    for i in range(args.requests + 1):
        n = 1 if i == 0 else args.concurrent
        firsts: list[asyncio.Future] = [loop.create_future() for _ in range(n)]
        dones: list[asyncio.Future] = [loop.create_future() for _ in range(n)]
        decodes.clear()
        t0 = time.perf_counter()
        for j in range(n):
            def deliver(outputs: list[Output], first=firsts[j], done=dones[j]) -> None:
                for out in outputs:
                    if isinstance(out, TokenText) and not first.done():
                        first.set_result(time.perf_counter())
                    if isinstance(out, Finished) and not done.done():
                        done.set_result(out)

            # each its own prompt (a different last word): no prefix shared beyond the prompt's start
            engine.submit(Job(job_id=f"r{i}-{j}", prompt_tokens=[*prompt, 100 + j], params=PARAMS,
                              max_tokens=args.tokens, ignore_eos=True, deliver=deliver))
        ttfts = sorted([(await f) - t0 for f in firsts])
        await asyncio.gather(*dones)
        steps = [{"at_ms": round((t - t0) * 1000, 2), "ms": round(d * 1000, 2), "shape": s} for t, d, s in decodes[:4]]
        print(json.dumps({"round": i, "requests": n, "warm_up": i == 0,
                          "ttft_ms_p50": round(ttfts[len(ttfts) // 2] * 1000, 2), "first_steps": steps}))
        await asyncio.sleep(args.gap)
    engine.close()
    model.close()


async def conversations(args: argparse.Namespace, engine: EngineCore, model: Model,
                        decodes: list[tuple[float, float, tuple[int, ...]]],
                        events: list[tuple[float, float, str]]) -> None:
    """bench.multiturn's conversations without HTTP: each turn resends the history as text, tokenized here as the
    worker's routes do, greedy, the next turn submitted as soon as the last ends. Time to first token by turn, and
    the decode steps between a turn's first submission and its last first token."""
    import random

    from bench.multiturn import text_of

    rng = random.Random(0)
    system = "System: " + text_of(args.system_tokens, rng) + "\n"
    loop = asyncio.get_running_loop()
    ttfts: list[list[float]] = [[] for _ in range(args.turns)]
    spans: list[tuple[float, float]] = [(float("inf"), 0.0) for _ in range(args.turns)]

    async def conversation(c: int) -> None:
        history = system
        for t in range(args.turns):
            history += f"User: {text_of(60, rng)}\nAssistant:"
            t0 = time.perf_counter()
            tokens = await asyncio.to_thread(model.prompt_tokens, history)
            first, done = loop.create_future(), loop.create_future()
            parts: list[str] = []

            def deliver(outputs: list[Output], first=first, done=done, parts=parts) -> None:
                for out in outputs:
                    if isinstance(out, TokenText):
                        parts.append(out.text)
                        if not first.done():
                            first.set_result(time.perf_counter())
                    if isinstance(out, Finished) and not done.done():
                        done.set_result(out)

            engine.submit(Job(job_id=f"c{c}-t{t}", prompt_tokens=tokens, params=SamplingParams(temperature=0),
                              max_tokens=64, ignore_eos=True, deliver=deliver))
            got = await first
            ttfts[t].append(got - t0)
            spans[t] = (min(spans[t][0], t0), max(spans[t][1], got))
            await done
            history += "".join(parts) + "\n"

    await asyncio.gather(*(conversation(c) for c in range(args.conversations)))
    for t in range(args.turns):
        lo, hi = spans[t]
        steps = [{"at_ms": round((at - lo) * 1000, 2), "ms": round(d * 1000, 2), "shape": s}
                 for at, d, s in decodes if lo <= at <= hi]
        print(json.dumps({"turn": t + 1, "ttft_ms": sorted(round(x * 1000, 1) for x in ttfts[t]),
                          "steps": steps[:24]}))
        if events and t == 1:  # the engine thread's phases in turn 2, merged where one follows another
            phases = []
            for at, d, what in sorted(e for e in events if lo <= e[0] <= hi):
                if d >= 0.0005 or what == "submit":
                    phases.append(f"{(at - lo) * 1000:.1f}+{d * 1000:.1f} {what}")
            print(json.dumps({"turn": 2, "phases": phases[:80]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a GGUF file (default: the embedded model)")
    p.add_argument("--gpu-layers", type=int, default=0)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--requests", type=int, default=3, help="rounds after the warm-up request")
    p.add_argument("--concurrent", type=int, default=1, help="requests a round, submitted together")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--attach-all", action="store_true", help="attach and detach every slot's chain at load")
    p.add_argument("--conversations", type=int, default=0, help="chat turns instead (bench.multiturn's, in-process)")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--ctx-size", type=int, default=512, help="per slot (conversations need ~6000)")
    p.add_argument("--kv-unified", action="store_true")
    p.add_argument("--phases", action="store_true", help="time the engine thread's phases too (conversations)")
    p.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval (the GIL), seconds")
    p.add_argument("--system-tokens", type=int, default=5000)
    p.add_argument("--gap", type=float, default=0.0, help="seconds between requests (idle chains detach after 1 s)")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
