"""Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm): NeoX RoPE, so no permute."""

from __future__ import annotations

import gguf

from worker.models.convert.family import Family

# The biases need nothing but their names (TensorNameMap) and F32, as every 1-D tensor gets.
QWEN2 = Family(arch=gguf.MODEL_ARCH.QWEN2, hf_architectures=("Qwen2ForCausalLM",))
QWEN3 = Family(arch=gguf.MODEL_ARCH.QWEN3, hf_architectures=("Qwen3ForCausalLM",))
