"""What one sequence's prompt step costs by its tokens and the history it attends to: the time inside llama_decode
(on a GPU that only queues the step: graph build, inputs such as the attention mask, kernel launches) and the time
until the step is done. With `vary`, each step's size differs from the last one's, so llama.cpp cannot reuse its
graph (nor CUDA its captured graph): what a chat turn's step pays, whose length is never the last one's.

    python -m bench.prompt_step_probe --model m1b.gguf --gpu-layers 999 [--kv-unified]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from worker.llamacpp import Context, Model
from worker.models.resolve import embedded_model_path

SIZES = (1, 8, 32, 64, 100, 128, 256)


def fill(ctx: Context, seq: int, n: int) -> None:
    tokens = [(i * 7919) % 20000 + 100 for i in range(n)]
    for start in range(0, n, 512):
        assert ctx.decode([(seq, tokens[start:start + 512], start, start + 512 >= n, False, 0)]) == 0
    ctx.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a GGUF file (default: the embedded model)")
    p.add_argument("--gpu-layers", type=int, default=999)
    p.add_argument("--histories", default="0,1000,5000")
    p.add_argument("--slots", type=int, default=8, help="sequences of the context (a KV stream each unless unified)")
    p.add_argument("--kv-unified", action="store_true")
    p.add_argument("--threads", type=int, default=15)
    p.add_argument("--rounds", type=int, default=12)
    args = p.parse_args()
    model = Model.load(Path(args.model) if args.model else embedded_model_path(), ref="probe", fmt="gguf",
                       gpu_layers=args.gpu_layers)
    ctx = Context(model, n_ctx=args.slots * 8192, n_seq=args.slots, n_batch=512, threads=args.threads,
                  flash_attn="on" if model.offloaded else "off", kv_unified=args.kv_unified)
    ctx.warm_up()
    for history in (int(h) for h in args.histories.split(",")):
        ctx.keep_prefix(0, 0)
        if history:
            fill(ctx, 0, history)
        for vary in (False, True):
            result = {}
            for n in SIZES:
                queued, done = [], []
                for r in range(args.rounds):
                    m = n + (r % 3 if vary else 0)
                    tokens = [(history * 31 + k) % 20000 + 100 for k in range(m)]
                    began = time.perf_counter()
                    assert ctx.decode([(0, tokens, history, True, False, 0)]) == 0
                    returned = time.perf_counter()
                    ctx.synchronize()
                    finished = time.perf_counter()
                    ctx.keep_prefix(0, history)
                    if r >= 2:  # the first of a size pays its kernels' and graph's first build
                        queued.append((returned - began) * 1e3)
                        done.append((finished - began) * 1e3)
                result[n] = {"in_decode_ms": round(statistics.median(queued), 2),
                             "done_ms": round(statistics.median(done), 2)}
            print(json.dumps({"kv_unified": args.kv_unified, "history": history, "vary": vary, "by_tokens": result}),
                  flush=True)
    ctx.close()
    model.close()


if __name__ == "__main__":
    main()
