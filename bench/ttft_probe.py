"""Where a lone request's time to first token goes: the engine in-process, as the runtime builds it (chains in the
decode graph on a GPU, the prefix cache on), a warm-up request, then requests one after another; every
llama_decode of the measured ones timed with its shape.

    python -m bench.ttft_probe --model m.gguf --gpu-layers 999
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
    model = Model.load(Path(args.model) if args.model else embedded_model_path(), ref="probe", fmt="gguf",
                       gpu_layers=args.gpu_layers)
    ctx = Context(model, n_ctx=512 * args.slots, n_seq=args.slots, n_batch=512, threads=4,
                  flash_attn="on" if model.offloaded else "off", in_graph_sampling=model.offloaded)
    assert ctx.warm_up() == 0
    engine = EngineCore(ctx, model, ctx_size=512, parallel=args.slots, max_queue=64, batch_size=512,
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
    if args.attach_all:  # every slot's chain attached once at load, then detached: does a later attach cost less?
        for seq in range(args.slots):
            ctx.use_chain(seq, PARAMS, reuse=False)
        assert ctx.decode([(seq, [max(model.bos_token, 0)], 0, True, False, 0) for seq in range(args.slots)]) == 0
        ctx.clear()
        for seq in range(args.slots):
            ctx.drop_chain(seq)
    engine.start(asyncio.get_running_loop())
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a GGUF file (default: the embedded model)")
    p.add_argument("--gpu-layers", type=int, default=0)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--requests", type=int, default=3, help="rounds after the warm-up request")
    p.add_argument("--concurrent", type=int, default=1, help="requests a round, submitted together")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--attach-all", action="store_true", help="attach and detach every slot's chain at load")
    p.add_argument("--gap", type=float, default=0.0, help="seconds between requests (idle chains detach after 1 s)")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
