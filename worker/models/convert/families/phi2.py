"""Phi-1, Phi-1.5, Phi-2: attention and MLP side by side off one LayerNorm, partial NeoX RoPE, biases everywhere."""

from __future__ import annotations

import gguf

from worker.models.convert.family import Family

PHI2 = Family(
    arch=gguf.MODEL_ARCH.PHI2,
    hf_architectures=("PhiForCausalLM",),
    config_keys={"layer_norm_eps": "add_layer_norm_eps"},  # LayerNorm, not RMSNorm: llama.cpp requires this key
    defaults={"partial_rotary_factor": 0.5, "layer_norm_eps": 1e-5},  # transformers' defaults
    requires={"qk_layernorm": False, "hidden_act": "gelu_new"},  # llama.cpp's phi2 graph has neither alternative
)
