"""Constrained output and logprobs against plain sampling, the engine in-process (no HTTP): does constraining one
sequence slow it, and does it slow the others in its batch?

    python -m bench.constrained                                   # CPU, the embedded model
    python -m bench.constrained --model m.gguf --gpu-layers 999   # GPU: chains in the graph for the plain jobs

Each round runs `streams` jobs at once, ignore_eos, `tokens` each, and reports tokens/s per job kind; rounds with
and without the special job alternate, so a busy neighbour slows both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from worker.engine.constraints import Grammars
from worker.engine.core import EngineCore, StepStats
from worker.engine.outputs import Constraint, Finished, Job, Output
from worker.engine.sampling import SamplingParams
from worker.llamacpp import Context, Model
from worker.models.resolve import embedded_model_path

# wide masks every step, never complete before the token budget: the cost of masking, not of a short answer
KINDS = {
    "regex": {"constraint": Constraint("regex", r"[^\n]{4000}")},
    "json": {"constraint": Constraint("json_schema", json.dumps(
        {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}}}}))},
    "logprobs": {"logprobs": 5},
    # greedy: its chain in the graph hands over only its maximum, so the job is read on the CPU (Scheduler.guided)
    "json-greedy": {"constraint": Constraint("json_schema", json.dumps(
        {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}}}})),
        "params": SamplingParams(temperature=0)},
}


async def run_round(engine: EngineCore, prompt: list[int], streams: int, tokens: int, special: dict | None,
                    tag: str) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    done: dict[str, asyncio.Future] = {}
    engine.stats = StepStats()
    for i in range(streams):
        kw = dict(special) if (special is not None and i == 0) else {}
        params = kw.pop("params", SamplingParams(temperature=0.8, seed=i))
        fut = done[f"{tag}-{i}"] = loop.create_future()
        out: list[Output] = []

        def deliver(outputs, out=out, fut=fut):
            out.extend(outputs)
            if isinstance(out[-1], Finished) and not fut.done():
                fut.set_result(out[-1])
            elif type(out[-1]).__name__ == "Failed" and not fut.done():
                fut.set_exception(RuntimeError(str(out[-1])))

        engine.submit(Job(job_id=f"{tag}-{i}", prompt_tokens=prompt, params=params,
                          max_tokens=tokens, ignore_eos=True, deliver=deliver, **kw))
    ends = [await fut for fut in done.values()]
    per_step = {f"{name}_ms": getattr(engine.stats, f"{name}_s") / max(engine.stats.steps, 1) * 1000
                for name in ("step", "queue", "overlap", "wait", "sample")}
    return {"special": ends[0].tokens_per_sec, "others": statistics.mean(e.tokens_per_sec for e in ends[1:])
            if len(ends) > 1 else 0.0} | per_step


async def main_async(args: argparse.Namespace) -> None:
    model = Model.load(Path(args.model) if args.model else embedded_model_path(), ref="bench", fmt="gguf",
                       gpu_layers=args.gpu_layers)
    offloaded = model.offloaded
    ctx = Context(model, n_ctx=1024 * args.max_streams, n_seq=args.max_streams, n_batch=512, threads=args.threads,
                  flash_attn="on" if offloaded else "off", in_graph_sampling=offloaded)
    assert ctx.warm_up() == 0
    grammars = Grammars(model.guidance_tokenizer, lambda t: model.piece(t, special=True), model.n_vocab)
    engine = EngineCore(ctx, model, ctx_size=1024, parallel=args.max_streams, max_queue=64, batch_size=512,
                        in_graph_sampling=offloaded, offloaded=offloaded, prefix_cache=False, grammars=grammars,
                        profile_path=args.profile)
    engine.start(asyncio.get_running_loop())
    prompt = model.prompt_tokens("Write a long story about a dragon who learns to count.")
    for kind in args.kinds.split(","):
        if "constraint" in KINDS[kind]:
            t = time.perf_counter()
            engine.check_constraint(KINDS[kind]["constraint"])
            print(f"# {kind}: compiled and checked in {(time.perf_counter() - t) * 1000:.0f} ms")
    results = []
    try:
        for streams in [int(s) for s in args.streams.split(",")]:
            for kind in args.kinds.split(","):
                plain, special = [], []
                for r in range(args.rounds):
                    plain.append(await run_round(engine, prompt, streams, args.tokens, None, f"p{streams}{kind}{r}"))
                    special.append(await run_round(engine, prompt, streams, args.tokens, KINDS[kind],
                                                   f"s{streams}{kind}{r}"))
                best = lambda rows, key: max(row[key] for row in rows)
                row = {"streams": streams, "kind": kind, "plain_tps": round(best(plain, "special"), 1),
                       "special_tps": round(best(special, "special"), 1),
                       "special_ratio": round(best(special, "special") / best(plain, "special"), 3)}
                if streams > 1:
                    row |= {"others_plain_tps": round(best(plain, "others"), 1),
                            "others_with_special_tps": round(best(special, "others"), 1),
                            "others_ratio": round(best(special, "others") / best(plain, "others"), 3)}
                # a step's time; queueing it; the engine's work while it computes; waiting for it; sampling after
                for name in ("step", "queue", "overlap", "wait", "sample"):
                    row[f"plain_{name}_ms"] = round(min(r[f"{name}_ms"] for r in plain), 3)
                    row[f"special_{name}_ms"] = round(min(r[f"{name}_ms"] for r in special), 3)
                print(json.dumps(row))
                results.append(row)
    finally:
        engine.close()
        model.close()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a GGUF file (default: the embedded model)")
    p.add_argument("--gpu-layers", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", default="1,4")
    p.add_argument("--max-streams", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--kinds", default="regex,json,logprobs")
    p.add_argument("--out")
    p.add_argument("--profile", help="write the engine thread's cProfile stats here (pstats)")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
