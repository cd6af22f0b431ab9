"""Llama and Mistral: llama.cpp's `llama` architecture, with normal (interleaved) RoPE."""

from __future__ import annotations

import math

import gguf
import numpy as np

from worker.models.convert.family import Family, Hparams, permute_rotary


def llama3_rope_freqs(hp: Hparams) -> dict[str, np.ndarray]:
    """Llama 3.1+ rope scaling: per-frequency factors in a rope_freqs tensor (as llama.cpp's converter writes)."""
    if hp.rope_type != "llama3":
        return {}
    rope = hp.rope
    base = hp.rope_theta or 10000.0
    freqs = 1.0 / base ** (np.arange(0, hp.head_dim, 2, dtype=np.float32) / hp.head_dim)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_ctx / high, 1.0,
                       np.where(wavelen > old_ctx / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": factors.astype(np.float32)}


LLAMA = Family(
    arch=gguf.MODEL_ARCH.LLAMA,
    hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    transforms={
        "q_proj.weight": lambda w, hp: permute_rotary(w, hp.n_head),
        "q_proj.bias": lambda w, hp: permute_rotary(w, hp.n_head),
        "k_proj.weight": lambda w, hp: permute_rotary(w, hp.n_head_kv),
        "k_proj.bias": lambda w, hp: permute_rotary(w, hp.n_head_kv),
    },
    rope_types=("llama3",),
    extra_tensors=llama3_rope_freqs,
)
