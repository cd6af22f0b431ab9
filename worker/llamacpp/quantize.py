"""llama.cpp's own llama_model_quantize (the llama-quantize tool's code path)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import llama_cpp as lc

from worker.llamacpp.backend import init_backend

# --quantize names → llama_ftype. "none" keeps the converter's F16. (The IQ types need an importance matrix.)
QUANT_TYPES: dict[str, int] = {
    "q8_0": lc.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q6_k": lc.LLAMA_FTYPE_MOSTLY_Q6_K,
    "q5_k_m": lc.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "q5_k_s": lc.LLAMA_FTYPE_MOSTLY_Q5_K_S,
    "q5_1": lc.LLAMA_FTYPE_MOSTLY_Q5_1,
    "q5_0": lc.LLAMA_FTYPE_MOSTLY_Q5_0,
    "q4_k_m": lc.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "q4_k_s": lc.LLAMA_FTYPE_MOSTLY_Q4_K_S,
    "q4_1": lc.LLAMA_FTYPE_MOSTLY_Q4_1,
    "q4_0": lc.LLAMA_FTYPE_MOSTLY_Q4_0,
    "q3_k_l": lc.LLAMA_FTYPE_MOSTLY_Q3_K_L,
    "q3_k_m": lc.LLAMA_FTYPE_MOSTLY_Q3_K_M,
    "q3_k_s": lc.LLAMA_FTYPE_MOSTLY_Q3_K_S,
    "q2_k": lc.LLAMA_FTYPE_MOSTLY_Q2_K,
}


def quantize_model(src: Path, dst: Path, kind: str) -> int:
    """Write `src` quantized to `kind` (a QUANT_TYPES name) at `dst`; llama_model_quantize's status (0 = done)."""
    init_backend()  # llama.cpp's log goes through ours
    params = lc.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[kind]
    params.nthread = len(os.sched_getaffinity(0))
    return int(lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)))
