"""How many tokens each KV cache type holds: the device memory per KV cell, from contexts of two sizes (their
difference is cache alone; compute buffers come out), and the tokens a memory budget holds at that rate.

    python -m bench.kv_types --model m8b.gguf --gpu-layers 999 --cells 32768 --budget-gib 40
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from worker.llamacpp import Context, Model, gpu_memory_used

TYPES = [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16"), ("bf16", "bf16")]


def context_bytes(model: Model, cells: int, k: str, v: str) -> int:
    before = sum(gpu_memory_used().values())
    ctx = Context(model, n_ctx=cells, n_seq=1, n_batch=512, threads=4, flash_attn="on", cache_type_k=k,
                  cache_type_v=v)
    used = sum(gpu_memory_used().values()) - before
    ctx.close()
    return used


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--gpu-layers", type=int, default=999)
    p.add_argument("--cells", type=int, default=32768)
    p.add_argument("--budget-gib", type=float, default=40.0, help="report the tokens this much memory holds")
    args = p.parse_args()
    model = Model.load(Path(args.model), ref="kv", fmt="gguf", gpu_layers=args.gpu_layers)
    rows = []
    for k, v in TYPES:
        per_cell = (context_bytes(model, args.cells, k, v) - context_bytes(model, args.cells // 2, k, v)) / (
            args.cells // 2)
        rows.append({"cache_type_k": k, "cache_type_v": v, "bytes_per_token": round(per_cell),
                     f"tokens_in_{args.budget_gib:g}_gib": int(args.budget_gib * 2**30 / per_cell)})
    for row in rows:
        row["tokens_vs_f16"] = round(rows[0]["bytes_per_token"] / row["bytes_per_token"], 2)
    print(json.dumps({"model": args.model, "n_layers": model.info.n_layers, "rows": rows}, indent=1))
    model.close()


if __name__ == "__main__":
    main()
