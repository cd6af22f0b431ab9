"""OLMo 2: RMSNorm after attention and after the MLP (none before), and q/k RMSNorm over all heads at once."""

from __future__ import annotations

import gguf

from worker.models.convert.family import Family, Hparams


def _whole_width_qk_norms(hp: Hparams) -> dict[str, tuple[int, ...]]:
    return {"attn_q_norm": (hp.n_head * hp.head_dim,), "attn_k_norm": (hp.n_head_kv * hp.head_dim,)}


OLMO2 = Family(
    arch=gguf.MODEL_ARCH.OLMO2,
    hf_architectures=("Olmo2ForCausalLM",),
    shapes=_whole_width_qk_norms,
)
