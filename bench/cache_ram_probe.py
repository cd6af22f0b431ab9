"""When the prefix cache's host-memory tier (--cache-ram) pays: for prompts of a few lengths, computing the prompt
(llama_decode, as a cache miss does) against saving its sequence to RAM and restoring it into another sequence (as a
hit from RAM does), and whether the restored cells give the very logits of cells computed in place. In process, one
model, one context of two sequences; the best of --repeat runs of each.

    python -m bench.cache_ram_probe --lengths 1000 4000 [--model m.gguf --gpu-layers 999]"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import llama_cpp as lc
import numpy as np

from worker.config import default_threads
from worker.llamacpp import Context, Model
from worker.models.resolve import embedded_model_path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--gpu-layers", type=int, default=0)
    p.add_argument("--lengths", type=int, nargs="+", default=[1000, 4000])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=default_threads())
    args = p.parse_args()
    model = Model.load(Path(args.model) if args.model else embedded_model_path(), ref="probe", fmt="gguf",
                       gpu_layers=args.gpu_layers)
    n_seq_ctx = max(args.lengths) + 64
    ctx = Context(model, n_ctx=2 * n_seq_ctx, n_seq=2, n_batch=512, threads=args.threads,
                  flash_attn="on" if model.offloaded else "off")
    text = "The lighthouse keeper wrote in the log every evening, noting the wind, the ships and the weather. "
    words = model.tokenize(text * (1 + max(args.lengths) // 15))
    print(f"{model.info.architecture} {model.info.n_params / 1e6:.0f}M, {args.threads} threads")
    print(f"{'tokens':>7} {'compute ms':>11} {'save ms':>8} {'restore ms':>11} {'MiB':>7} {'bytes/token':>12} "
          f"{'speed-up':>9} exact")
    try:
        for n in args.lengths:
            tokens = words[:n]
            compute = save = restore = float("inf")
            state = None
            for _ in range(args.repeat):
                ctx.clear()
                t0 = time.perf_counter()
                for start in range(0, n - 1, 512):  # all but the last token, in batches, as the engine prefills
                    chunk = tokens[start : min(start + 512, n - 1)]
                    assert ctx.decode([(0, chunk, start, False, False, 0)]) == 0
                lc.llama_synchronize(ctx.ptr)
                compute = min(compute, time.perf_counter() - t0)
                t0 = time.perf_counter()
                state = ctx.save_sequence(0)
                save = min(save, time.perf_counter() - t0)
                assert state is not None
                ctx.forget(1)
                t0 = time.perf_counter()
                assert ctx.restore_sequence(1, state)
                restore = min(restore, time.perf_counter() - t0)
            assert state is not None
            exact = np.array_equal(last_logits(ctx, model, 0, tokens), last_logits(ctx, model, 1, tokens))
            print(f"{n:>7} {compute * 1000:>11.1f} {save * 1000:>8.1f} {restore * 1000:>11.1f} "
                  f"{state.nbytes / 2**20:>7.1f} {state.nbytes / (n - 1):>12.0f} {compute / restore:>8.0f}x {exact}")
    finally:
        ctx.close()
        model.close()


def last_logits(ctx: Context, model: Model, seq: int, tokens: list[int]) -> np.ndarray:
    """The logits after the prompt's last token, decoded on the sequence's cells of the rest."""
    assert ctx.decode([(seq, tokens[-1:], len(tokens) - 1, True, False, 0)]) == 0
    out = ctx.logits(0).copy()
    ctx.keep_prefix(seq, len(tokens) - 1)
    return out


if __name__ == "__main__":
    main()
