"""Chat turns that arrive together, measured without the worker: K sequences over a shared history (a system prompt
and a private tail each) add a turn's chunk of 67-69 tokens. One llama_decode with all K chunks against K steps of
one chunk, each followed by a decode step of 7 other sequences, as the worker takes turns. Then what a decode step
of those 7 costs when its graph is reused and right after a prompt step (rebuilt), with greedy samplers in the
graph (llama.cpp's chains, or the worker's group draws) or none.

    python -m bench.turn_steps_probe --model m1b.gguf [--kv-unified] [--samplers none|chains|groups]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from worker.engine.sampling import SamplingParams
from worker.llamacpp import Context, Model

SLOTS = 16  # 0-7 take turns, 8-14 decode
TURN = 67


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--history", type=int, default=5000)
    p.add_argument("--kv-unified", action="store_true")
    p.add_argument("--gpu-layers", type=int, default=999)
    p.add_argument("--samplers", choices=("none", "chains", "groups"), default="none")
    args = p.parse_args()
    model = Model.load(Path(args.model), ref="probe", fmt="gguf", gpu_layers=args.gpu_layers)
    ctx = Context(model, n_ctx=SLOTS * 8192, n_seq=SLOTS, n_batch=1024, threads=15,
                  flash_attn="on" if model.offloaded else "off", kv_unified=args.kv_unified,
                  in_graph_sampling=args.samplers != "none", group_draws=args.samplers == "groups")
    ctx.warm_up()
    sampled = args.samplers != "none"
    if sampled:
        for seq in range(SLOTS):
            ctx.use_chain(seq, SamplingParams(temperature=0.0), reuse=False)
    h = args.history
    tokens = [(i * 7919) % 20000 + 100 for i in range(h)]
    for start in range(0, h, 512):
        assert ctx.decode([(0, tokens[start:start + 512], start, start + 512 >= h, False, 0)]) == 0
    ctx.synchronize()
    for seq in range(1, SLOTS):
        ctx.copy_prefix(0, seq, h)
    for seq in range(SLOTS):  # a private tail each, as a conversation's earlier turns
        assert ctx.decode([(seq, [(seq * 31 + k) % 20000 + 100 for k in range(200)], h, True, False, 0)]) == 0
        ctx.synchronize()
    base = h + 200
    decoders = range(8, 15)

    def decode_step(pos: int) -> None:
        assert ctx.decode([(seq, [5], pos, True, False, 0) for seq in decoders]) == 0
        ctx.synchronize()
        if sampled:
            for i, seq in enumerate(decoders):
                ctx.sample(seq, i)

    out: dict[str, object] = {"kv_unified": args.kv_unified, "samplers": args.samplers, "history": h}
    for k in (1, 2, 4, 8):
        together, apart = [], []
        for r in range(8):
            parts = [(seq, [(seq * 17 + i + r) % 20000 + 100 for i in range(TURN + (seq + r) % 3)], base, True, False,
                      0) for seq in range(k)]
            t0 = time.perf_counter()
            assert ctx.decode(parts) == 0
            ctx.synchronize()
            t1 = time.perf_counter()
            for seq in range(k):
                ctx.keep_prefix(seq, base)
            t2 = time.perf_counter()
            for i, part in enumerate(parts):
                assert ctx.decode([part]) == 0
                ctx.synchronize()
                decode_step(base + i)
            t3 = time.perf_counter()
            for seq in [*range(k), *decoders]:
                ctx.keep_prefix(seq, base)
            if r >= 2:
                together.append((t1 - t0) * 1e3)
                apart.append((t3 - t2) * 1e3)
        out[f"{k} turns"] = {"one_step_ms": round(statistics.median(together), 2),
                             "steps_with_decode_steps_ms": round(statistics.median(apart), 2)}
    reused, rebuilt = [], []
    for r in range(10):
        t0 = time.perf_counter()
        decode_step(base + r)
        reused.append((time.perf_counter() - t0) * 1e3)
    for r in range(10):
        assert ctx.decode([(0, [7] * (TURN + r % 3), base, True, False, 0)]) == 0
        ctx.synchronize()
        ctx.keep_prefix(0, base)
        t0 = time.perf_counter()
        decode_step(base + 10 + r)
        rebuilt.append((time.perf_counter() - t0) * 1e3)
    out["decode step of 7"] = {"graph_reused_ms": round(statistics.median(reused[2:]), 2),
                               "after_a_prompt_step_ms": round(statistics.median(rebuilt[2:]), 2)}
    print(json.dumps(out), flush=True)
    ctx.close()
    model.close()


if __name__ == "__main__":
    main()
