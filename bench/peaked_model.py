"""A copy of a random-weight GGUF (the gpu-kit's synth_gguf.py) whose logits are peaked: its final norm's weight
multiplied. With random weights the logits are nearly flat, and near-ties are broken differently by a step of
several tokens and a step of one, so a model drafting for itself agreed with itself on only 60-69% of tokens
(H200, 1B shape). Peaked, a self-draft shows the draft path's ceiling; the speed is the same (a norm's scale).

    python -m bench.peaked_model /tmp/m1b.gguf /tmp/m1b-peaked.gguf --scale 8
    llama-quantize /tmp/m1b-peaked.gguf /tmp/m1b-peaked-Q4_K_M.gguf Q4_K_M
"""

from __future__ import annotations

import argparse
import shutil

import numpy as np
from gguf import GGUFReader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="an unquantized GGUF (its output_norm.weight in F32)")
    p.add_argument("dst")
    p.add_argument("--scale", type=float, default=8.0)
    args = p.parse_args()
    shutil.copyfile(args.src, args.dst)
    reader = GGUFReader(args.dst, "r+")
    norm = next(t for t in reader.tensors if t.name == "output_norm.weight")
    assert norm.data.dtype == np.float32, norm.data.dtype
    norm.data[...] *= np.float32(args.scale)
    reader.data.flush()
    print(f"{args.dst}: output_norm.weight x {args.scale}")


if __name__ == "__main__":
    main()
