"""Gemma, Gemma 2, Gemma 3 (text): RMSNorm weights stored as w - 1, tied embeddings, NeoX RoPE.

llama.cpp scales the embeddings by sqrt(hidden) and applies the soft-caps itself; the converter writes the
caps, the sliding window and which layers slide, so llama.cpp follows config.json rather than its defaults.
"""

from __future__ import annotations

import gguf

from worker.models.convert.errors import ConvertError
from worker.models.convert.family import Family, Hparams

# llama.cpp's Gemma 2/3 scale queries by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads) for the 27B models only.
_27B_LAYERS = {gguf.MODEL_ARCH.GEMMA2: 46, gguf.MODEL_ARCH.GEMMA3: 62}


def _sliding_layers(hp: Hparams, default_pattern: int) -> list[bool]:
    if layer_types := hp.get("layer_types"):
        return [t == "sliding_attention" for t in layer_types]
    pattern = hp.get("sliding_window_pattern", default_pattern)
    return [bool((i + 1) % pattern) for i in range(hp.n_layer)]  # every pattern-th layer is global


def _attention_kv(arch: gguf.MODEL_ARCH, default_pattern: int):
    def write(hp: Hparams, writer: gguf.GGUFWriter) -> None:
        scalar = hp.get("query_pre_attn_scalar", hp.head_dim)
        expected = hp.n_embd // hp.n_head if hp.n_layer == _27B_LAYERS[arch] else hp.head_dim
        if scalar != expected:
            raise ConvertError(f"config.json: query_pre_attn_scalar {scalar} differs from the {expected} that "
                               f"llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} uses for {hp.n_layer} layers")
        if hp.get("sliding_window"):
            writer.add_sliding_window_pattern(_sliding_layers(hp, default_pattern))

    return write


GEMMA = Family(
    arch=gguf.MODEL_ARCH.GEMMA,
    hf_architectures=("GemmaForCausalLM",),
    norm_shift=1.0,
    always_tied=True,
)

GEMMA2 = Family(
    arch=gguf.MODEL_ARCH.GEMMA2,
    hf_architectures=("Gemma2ForCausalLM",),
    config_keys={
        "attn_logit_softcapping": "add_attn_logit_softcapping",
        "final_logit_softcapping": "add_final_logit_softcapping",
        "sliding_window": "add_sliding_window",
    },
    defaults={"head_dim": 256, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
              "final_logit_softcapping": 30.0, "sliding_window": 4096},
    norm_shift=1.0,
    always_tied=True,
    extra_kv=_attention_kv(gguf.MODEL_ARCH.GEMMA2, default_pattern=2),
)

GEMMA3 = Family(
    arch=gguf.MODEL_ARCH.GEMMA3,
    hf_architectures=("Gemma3ForCausalLM",),
    config_keys={
        "final_logit_softcapping": "add_final_logit_softcapping",
        "sliding_window": "add_sliding_window",
        "rope_local_base_freq": "add_rope_freq_base_swa",  # the sliding layers' RoPE base
    },
    defaults={"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096, "rope_theta": 1_000_000.0,
              "rope_local_base_freq": 10_000.0, "max_position_embeddings": 131_072},
    norm_shift=1.0,  # q_norm and k_norm too
    extra_kv=_attention_kv(gguf.MODEL_ARCH.GEMMA3, default_pattern=6),
)
