"""What a step that prefills several conversations' new turns costs, by how it is shaped. Each KV stream of a
non-unified cache holds a 5k-token history; the step adds each conversation's next message (lengths as a chat
bench's turns give them). llama.cpp splits a step over per-sequence streams into ubatches of consecutive sequence
ids with equal tokens each, so unequal chunks become several graph evaluations.

    python -m bench.prefill_shapes_probe --model m1b.gguf --gpu-layers 999
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from worker.llamacpp import Context, Model

LENGTHS = [88, 122, 67, 125, 80, 95, 110, 73]


def timed(ctx: Context, parts: list, history: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        assert ctx.decode(parts) == 0
        ctx.logits(sum(len(p[1]) for p in parts) - 1)  # waits for the step
        times.append(time.perf_counter() - t)
        for p in parts:
            ctx.keep_prefix(p[0], history)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--gpu-layers", type=int, default=999)
    ap.add_argument("--history", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    model = Model.load(Path(args.model), ref="probe", fmt="gguf", gpu_layers=args.gpu_layers)
    n_seq, hist = 8, args.history
    for unified in (False, True):
        ctx = Context(model, n_ctx=n_seq * (hist + 1024), n_seq=n_seq, n_batch=512, threads=4,
                      flash_attn="on" if model.offloaded else "off", kv_unified=unified)
        ctx.warm_up()
        tokens = [(i * 7919) % 20000 + 100 for i in range(hist)]
        for start in range(0, hist, 512):
            assert ctx.decode([(0, tokens[start:start + 512], start, start + 512 >= hist, False, 0)]) == 0
        for seq in range(1, n_seq):
            ctx.copy_prefix(0, seq, hist)
        turn = lambda seq, n: (seq, [(seq * 31 + k) % 20000 + 100 for k in range(n)], hist, True, False, 0)
        budget, parts = 512, []
        for seq, n in enumerate(LENGTHS):  # slot order, as the scheduler fills a step
            if budget <= 0:
                break
            parts.append(turn(seq, min(n, budget)))
            budget -= min(n, budget)
        cut = [p[1].__len__() for p in parts]
        timed(ctx, parts, hist, 2)  # new shapes: kernels and graphs once
        out = {"unified": unified, "chunks": cut,
               "one_step_ms": round(timed(ctx, parts, hist, args.repeat), 2),
               "one_seq_a_step_ms": [round(timed(ctx, [p], hist, args.repeat), 2) for p in parts]}
        equal = [turn(seq, 64) for seq in range(len(parts))]
        timed(ctx, equal, hist, 2)
        out["equal_64_each_ms"] = round(timed(ctx, equal, hist, args.repeat), 2)
        decode = [turn(seq, 1) for seq in range(n_seq)]
        timed(ctx, decode, hist, 2)
        out["decode_8_ms"] = round(timed(ctx, decode, hist, args.repeat), 2)
        holes = [turn(seq, 1) for seq in (0, 2, 4, 6)]
        timed(ctx, holes, hist, 2)
        out["decode_4_with_holes_ms"] = round(timed(ctx, holes, hist, args.repeat), 2)
        packed = [turn(seq, 1) for seq in (0, 1, 2, 3)]
        timed(ctx, packed, hist, 2)
        out["decode_4_packed_ms"] = round(timed(ctx, packed, hist, args.repeat), 2)
        print(json.dumps(out), flush=True)
        ctx.close()
    model.close()


if __name__ == "__main__":
    main()
