"""DeepSeek-V2 / V3: multi-head latent attention, MoE with shared experts, group-limited routing.

As llama.cpp's converter lays them out: kv_b_proj is cut into k_b (per head, transposed) and v_b, so that llama.cpp
attends in the compressed space (MQA over the KV latent, one "KV head" of kv_lora_rank + rope dims), and the
routing bias (V3) becomes exp_probs_b. RoPE pairs are adjacent in these checkpoints already: no permute.
"""

from __future__ import annotations

import re
from dataclasses import replace

import gguf
import numpy as np

from worker.models.convert.errors import ConvertError
from worker.models.convert.family import FUSED_EXPERTS, Family, Hparams, Part

_GATING = {"softmax": gguf.ExpertGatingFuncType.SOFTMAX, "sigmoid": gguf.ExpertGatingFuncType.SIGMOID}


def _heads(w: np.ndarray, hp: Hparams) -> np.ndarray:
    """kv_b_proj [H * (nope + v), kv_lora] → [H, nope + v, kv_lora]."""
    return w.reshape(hp.n_head, hp.get("qk_nope_head_dim") + hp.get("v_head_dim"), w.shape[-1])


def _kv_b(hp: Hparams) -> tuple[int, ...]:
    return hp.n_head * (hp.get("qk_nope_head_dim") + hp.get("v_head_dim")), hp.get("kv_lora_rank")


_KV_B = (
    Part("k_b_proj.weight", lambda hp: (hp.n_head, hp.get("kv_lora_rank"), hp.get("qk_nope_head_dim")),
         lambda w, hp: _heads(w, hp)[:, :hp.get("qk_nope_head_dim")].transpose(0, 2, 1), _kv_b),
    Part("v_b_proj.weight", lambda hp: (hp.n_head, hp.get("v_head_dim"), hp.get("kv_lora_rank")),
         lambda w, hp: _heads(w, hp)[:, hp.get("qk_nope_head_dim"):], _kv_b),
)
# TensorNameMap knows the bias as e_score_correction (.bias): the same tensor, renamed
_BIAS = (Part("e_score_correction.bias", lambda hp: (hp.n_expert,), lambda w, hp: w, lambda hp: (hp.n_expert,)),)


def _attention(hp: Hparams) -> dict[str, int]:
    rope, nope, lora = hp.get("qk_rope_head_dim"), hp.get("qk_nope_head_dim"), hp.get("kv_lora_rank")
    return {"add_head_count_kv": 1, "add_key_length": lora + rope, "add_value_length": lora,
            "add_key_length_mla": nope + rope, "add_value_length_mla": hp.get("v_head_dim"),
            "add_rope_dimension_count": rope}


def _shapes(hp: Hparams) -> dict[str, tuple[int, ...]]:
    d, h, rope, lora = hp.n_embd, hp.n_head, hp.get("qk_rope_head_dim"), hp.get("kv_lora_rank")
    q = h * (hp.get("qk_nope_head_dim") + rope)
    shapes = {"attn_q": (q, d), "attn_kv_a_mqa": (lora + rope, d), "attn_kv_a_norm": (lora,),
              "attn_output": (d, h * hp.get("v_head_dim"))}
    if q_lora := hp.get("q_lora_rank"):
        shapes |= {"attn_q_a": (q_lora, d), "attn_q_a_norm": (q_lora,), "attn_q_b": (q, q_lora)}
    return shapes


def _extra_kv(hp: Hparams, writer: gguf.GGUFWriter) -> None:
    for key in ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "kv_lora_rank", "n_routed_experts",
                "num_experts_per_tok", "moe_intermediate_size"):
        if not isinstance(hp.get(key), int) or hp.get(key) <= 0:
            raise ConvertError(f"config.json: {key} is missing or not a positive integer (got {hp.get(key)!r})")
    scoring = hp.get("scoring_func")
    if scoring not in _GATING:
        raise ConvertError(f"config.json: scoring_func {scoring!r}; llama.cpp's deepseek2 implements "
                           f"{', '.join(_GATING)}")
    method = hp.get("topk_method")
    if hp.get("n_group", 1) > 1 and method != "noaux_tc":
        # llama.cpp ranks the groups by the sum of their two best experts (V3's rule); V2's
        # group_limited_greedy ranks them by their best one
        raise ConvertError(f"config.json: topk_method {method!r} with n_group {hp.get('n_group')}: llama.cpp's "
                           f"deepseek2 ranks expert groups only as noaux_tc does")
    if hp.rope_type == "yarn" and hp.rope.get("mscale", 1.0) != hp.rope.get("mscale_all_dim"):
        # llama.cpp scales attention by mscale_all_dim's YaRN magnitude alone, which is transformers' result
        # only when the two are equal (as in DeepSeek's own configs)
        raise ConvertError(f"config.json: rope_scaling mscale {hp.rope.get('mscale', 1.0)} and mscale_all_dim "
                           f"{hp.rope.get('mscale_all_dim')} differ; llama.cpp's deepseek2 implements them equal only")
    writer.add_leading_dense_block_count(hp.get("first_k_dense_replace", 0))
    writer.add_q_lora_rank(hp.get("q_lora_rank") or 0)  # 0: q_proj, no low-rank query (V2-Lite)
    writer.add_kv_lora_rank(hp.get("kv_lora_rank"))
    writer.add_expert_feed_forward_length(hp.get("moe_intermediate_size"))
    writer.add_expert_shared_count(hp.get("n_shared_experts", 0))
    writer.add_expert_weights_scale(float(hp.get("routed_scaling_factor", 1.0)))
    writer.add_expert_weights_norm(bool(hp.get("norm_topk_prob", False)))
    writer.add_expert_gating_func(_GATING[scoring])
    writer.add_expert_group_count(hp.get("n_group", 1))
    writer.add_expert_group_used_count(hp.get("topk_group", 1))
    if (mscale_all_dim := hp.rope.get("mscale_all_dim")) is not None:
        writer.add_rope_scaling_yarn_log_mul(0.1 * mscale_all_dim)  # llama.cpp divides it by 0.1 again


def _multi_token_prediction(hf_name: str, hp: Hparams) -> bool:
    return bool((m := re.match(r"model\.layers\.(\d+)\.", hf_name)) and int(m[1]) >= hp.n_layer)


# transformers' defaults differ between the two configs
DEEPSEEK_V2 = Family(
    arch=gguf.MODEL_ARCH.DEEPSEEK2,
    hf_architectures=("DeepseekV2ForCausalLM",),
    attention=_attention,
    shapes=_shapes,
    splits={"kv_b_proj.weight": _KV_B, "e_score_correction_bias": _BIAS, **FUSED_EXPERTS},
    skip=_multi_token_prediction,
    # On CPUs with AMX, llama.cpp (0.3.36) puts an F16 k_b in the AMX buffer, whose matmul needs a contiguous
    # input, and MLA multiplies it by a permuted one: no backend takes the node and the graph cannot be
    # scheduled. In F32 it stays a plain weight (H x kv_lora x nope: 32 MB a layer for V3).
    f32_kinds=("attn_k_b",),
    extra_kv=_extra_kv,
    defaults={"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False, "n_group": 1,
              "topk_group": 1, "first_k_dense_replace": 0, "routed_scaling_factor": 1.0, "moe_layer_freq": 1},
    requires={"moe_layer_freq": 1},  # llama.cpp: every layer after the leading dense ones is MoE
)
DEEPSEEK_V3 = replace(
    DEEPSEEK_V2,
    hf_architectures=("DeepseekV3ForCausalLM",),
    defaults={"scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True, "n_group": 8,
              "topk_group": 4, "first_k_dense_replace": 3, "routed_scaling_factor": 2.5, "n_shared_experts": 1,
              "moe_layer_freq": 1},
)
