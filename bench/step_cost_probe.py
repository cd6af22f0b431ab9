"""What a decode step of one sequence costs by its number of tokens, with logits read at every position (a
speculative step: its last token and n-1 proposals), against a one-token step. Speculation pays where a step of
k+1 tokens costs less than (accepted tokens + 1) one-token steps.

    python -m bench.step_cost_probe --model m.gguf --gpu-layers 999
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from worker.llamacpp import Context, Model
from worker.models.resolve import embedded_model_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a GGUF file (default: the embedded model)")
    p.add_argument("--gpu-layers", type=int, default=0)
    p.add_argument("--sizes", default="1,2,3,5,9,17")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--vary", action="store_true", help="also: steps whose size changes every time (graph rebuilt)")
    args = p.parse_args()
    model = Model.load(Path(args.model) if args.model else embedded_model_path(), ref="probe", fmt="gguf",
                       gpu_layers=args.gpu_layers)
    ctx = Context(model, n_ctx=4096, n_seq=1, n_batch=512, threads=4 if model.offloaded else 2,
                  flash_attn="on" if model.offloaded else "off", in_graph_sampling=False)
    prompt = model.prompt_tokens("Write a long story about a dragon who learns to count. " * 8)
    assert ctx.decode([(0, prompt, 0, True, False, 0)]) == 0
    pos = len(prompt)
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        times = []
        for i in range(args.n + 5):
            tokens = [prompt[(i + j) % len(prompt)] for j in range(size)]
            t = time.perf_counter()
            assert ctx.decode([(0, tokens, pos, True, size > 1, size - 1)]) == 0
            for j in range(size):
                int(ctx.logits(j).argmax())
            if i >= 5:  # the first steps of a new size reserve its graph
                times.append(time.perf_counter() - t)
            ctx.keep_prefix(0, pos)
        row = {"tokens": size, "ms_median": round(statistics.median(times) * 1000, 3),
               "ms_p10": round(sorted(times)[len(times) // 10] * 1000, 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.vary:  # sizes in turn, as an adaptive proposal length makes them: llama.cpp cannot reuse the graph
        sizes = [int(s) for s in args.sizes.split(",")]
        times = []
        for i in range(args.n):
            size = sizes[i % len(sizes)]
            tokens = [prompt[(i + j) % len(prompt)] for j in range(size)]
            t = time.perf_counter()
            assert ctx.decode([(0, tokens, pos, True, size > 1, size - 1)]) == 0
            for j in range(size):
                int(ctx.logits(j).argmax())
            times.append((time.perf_counter() - t) * 1000)
            ctx.keep_prefix(0, pos)
        fixed = statistics.mean(row["ms_median"] for row in rows)
        print(json.dumps({"varying_sizes_ms_mean": round(statistics.mean(times), 3),
                          "same_sizes_fixed_ms_mean": round(fixed, 3)}))
    one = rows[0]["ms_median"]
    for row in rows:
        print(f"{row['tokens']:>3} tokens: {row['ms_median'] / one:.2f}x a one-token step")
    ctx.close()
    model.close()


if __name__ == "__main__":
    main()
