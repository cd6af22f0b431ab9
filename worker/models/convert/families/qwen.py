"""Qwen2 (q/k/v biases), Qwen3 (per-head q/k RMSNorm) and their MoE models: NeoX RoPE, so no permute."""

from __future__ import annotations

import gguf

from worker.models.convert.family import FUSED_EXPERTS, Family

# The biases need nothing but their names (TensorNameMap) and F32, as every 1-D tensor gets.
QWEN2 = Family(arch=gguf.MODEL_ARCH.QWEN2, hf_architectures=("Qwen2ForCausalLM",))
QWEN3 = Family(arch=gguf.MODEL_ARCH.QWEN3, hf_architectures=("Qwen3ForCausalLM",))

# Every layer MoE (llama.cpp has no dense layers in these graphs); experts stacked by the generic converter, or
# already fused (transformers 5) and split into gate and up.
_ALL_SPARSE = {"decoder_sparse_step": 1, "mlp_only_layers": []}

# Qwen1.5/Qwen2-MoE: softmax routing weights used as they are (llama.cpp never renormalises the top-k for
# qwen2moe), plus a shared expert behind a sigmoid gate.
QWEN2MOE = Family(
    arch=gguf.MODEL_ARCH.QWEN2MOE,
    hf_architectures=("Qwen2MoeForCausalLM",),
    config_keys={"moe_intermediate_size": "add_expert_feed_forward_length",
                 "shared_expert_intermediate_size": "add_expert_shared_feed_forward_length"},
    defaults={"norm_topk_prob": False},  # transformers' default
    requires={"norm_topk_prob": False, **_ALL_SPARSE},
    splits=FUSED_EXPERTS,
)

# Qwen3-MoE: no shared expert; llama.cpp always renormalises the top-k weights, as Qwen3's configs ask.
QWEN3MOE = Family(
    arch=gguf.MODEL_ARCH.QWEN3MOE,
    hf_architectures=("Qwen3MoeForCausalLM",),
    config_keys={"moe_intermediate_size": "add_expert_feed_forward_length"},
    defaults={"norm_topk_prob": False},  # transformers' default
    requires={"norm_topk_prob": True, **_ALL_SPARSE},
    splits=FUSED_EXPERTS,
)
