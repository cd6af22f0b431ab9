"""Llama, Mistral, Mixtral, SmolLM3, Granite: llama.cpp's `llama` graph and its kin, with normal (interleaved) RoPE."""

from __future__ import annotations

import math
from dataclasses import replace

import gguf
import numpy as np

from worker.models.convert.errors import ConvertError
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


# Mixtral: Mistral's attention, experts stacked by the generic converter; llama.cpp's `llama` graph routes
# softmax → top-k → renormalised weights, which is Mixtral's own routing.
MIXTRAL = replace(LLAMA, hf_architectures=("MixtralForCausalLM",))


def _smollm3_no_rope_layers(hp: Hparams, writer: gguf.GGUFWriter) -> None:
    """llama.cpp's smollm3 skips RoPE on every 4th layer, always: config.json must say the same."""
    interval = hp.get("no_rope_layer_interval", 4)
    wanted = [int((i + 1) % 4 != 0) for i in range(hp.n_layer)]  # 1: RoPE, 0: none (HF's encoding)
    layers = hp.get("no_rope_layers", [int((i + 1) % interval != 0) for i in range(hp.n_layer)])
    if list(layers) != wanted:
        raise ConvertError(f"config.json: no_rope_layers {layers} differs from every 4th layer without RoPE, the "
                           f"only pattern llama.cpp's smollm3 implements")


SMOLLM3 = replace(LLAMA, arch=gguf.MODEL_ARCH.SMOLLM3, hf_architectures=("SmolLM3ForCausalLM",), rope_types=(),
                  extra_tensors=None, extra_kv=_smollm3_no_rope_layers)

# Granite: Llama with four multipliers, written always: llama.cpp requires the logit scale and would take a
# missing attention scale as 1/sqrt(head_dim), where transformers' default is 1.
GRANITE = replace(
    LLAMA,
    arch=gguf.MODEL_ARCH.GRANITE,
    hf_architectures=("GraniteForCausalLM",),
    rope_types=(),
    extra_tensors=None,
    config_keys={
        "attention_multiplier": "add_attention_scale",
        "embedding_multiplier": "add_embedding_scale",
        "residual_multiplier": "add_residual_scale",
        "logits_scaling": "add_logit_scale",
    },
    defaults={"attention_multiplier": 1.0, "embedding_multiplier": 1.0, "residual_multiplier": 1.0,
              "logits_scaling": 1.0},
)
