"""Phi-3 / Phi-3.5 / Phi-4-mini: fused qkv_proj and gate_up_proj stay fused (llama.cpp splits them itself)."""

from __future__ import annotations

import math

import gguf
import numpy as np

from worker.models.convert.errors import ConvertError
from worker.models.convert.family import Family, Hparams


def longrope_factors(hp: Hparams) -> dict[str, np.ndarray]:
    """Phi-3's 128k models: long and short per-frequency factors (as llama.cpp's converter writes them)."""
    long, short = hp.rope.get("long_factor"), hp.rope.get("short_factor")
    if not long:
        return {}
    if not short or len(long) != len(short) or len(long) != hp.n_rot // 2:
        raise ConvertError(f"config.json: rope_scaling long_factor/short_factor must both have {hp.n_rot // 2} values")
    return {
        gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight": np.asarray(long, dtype=np.float32),
        gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight": np.asarray(short, dtype=np.float32),
    }


def longrope_attn_factor(hp: Hparams, writer: gguf.GGUFWriter) -> None:
    if not hp.rope.get("long_factor"):
        return
    orig = hp.get("original_max_position_embeddings", hp.rope.get("original_max_position_embeddings"))
    scale = hp.get("max_position_embeddings") / orig
    writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)


PHI3 = Family(
    arch=gguf.MODEL_ARCH.PHI3,
    hf_architectures=("Phi3ForCausalLM",),
    config_keys={
        "sliding_window": "add_sliding_window",
        "original_max_position_embeddings": "add_rope_scaling_orig_ctx_len",
    },
    fused_gate_up=True,
    rope_types=("longrope", "su"),
    extra_kv=longrope_attn_factor,
    extra_tensors=longrope_factors,
)
