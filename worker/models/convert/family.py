"""What differs per architecture, as data: the per-family modules in `families/` fill one `Family` each.

Everything else (tensor names through gguf's TensorNameMap, hyper-parameters every family shares, dtypes,
shape checks, the tokenizer) is generic and lives in `convert.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np

from worker.models.convert.errors import ConvertError

Transform = Callable[[np.ndarray, "Hparams"], np.ndarray]


@dataclass(frozen=True)
class Part:
    """One GGUF tensor cut out of an HF tensor that llama.cpp wants as several (DeepSeek's kv_b_proj)."""

    hf_name: str  # replaces the HF tensor's name suffix: the name TensorNameMap maps to the GGUF name
    shape: Callable[[Hparams], tuple[int, ...]]
    extract: Transform
    source: Callable[[Hparams], tuple[int, ...]] | None = None  # the HF tensor's shape config.json implies


def _fused_experts(hp: Hparams) -> tuple[int, ...]:
    return hp.n_expert, 2 * hp.n_ff_exp, hp.n_embd


# transformers 5 saves a layer's experts fused: gate_up_proj [experts, 2 x ff, hidden], down_proj [experts, hidden, ff]
FUSED_EXPERTS: dict[str, tuple[Part, ...]] = {
    "mlp.experts.gate_up_proj": (
        Part("mlp.experts.gate_proj.weight", lambda hp: (hp.n_expert, hp.n_ff_exp, hp.n_embd),
             lambda w, hp: w[:, :hp.n_ff_exp], _fused_experts),
        Part("mlp.experts.up_proj.weight", lambda hp: (hp.n_expert, hp.n_ff_exp, hp.n_embd),
             lambda w, hp: w[:, hp.n_ff_exp:], _fused_experts),
    ),
    "mlp.experts.down_proj": (
        Part("mlp.experts.down_proj.weight", lambda hp: (hp.n_expert, hp.n_embd, hp.n_ff_exp), lambda w, hp: w),
    ),
}


@dataclass(frozen=True)
class Hparams:
    """config.json, plus the sizes every family needs, checked once."""

    config: Mapping[str, Any]
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Hparams:
        def need(key: str) -> int:
            value = config.get(key)
            if not isinstance(value, int) or value <= 0:
                raise ConvertError(f"config.json: {key} is missing or not a positive integer (got {value!r})")
            return value

        n_embd, n_head = need("hidden_size"), need("num_attention_heads")
        return cls(
            config=config,
            n_layer=need("num_hidden_layers"),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=config.get("num_key_value_heads") or n_head,
            head_dim=config.get("head_dim") or n_embd // n_head,
            n_ff=need("intermediate_size"),
            n_vocab=need("vocab_size"),
        )

    def get(self, key: str, default: Any = None) -> Any:
        value = self.config.get(key)
        return default if value is None else value

    @property
    def rope(self) -> Mapping[str, Any]:
        """The global layers' rope parameters (rope_scaling in transformers 4, rope_parameters in 5)."""
        rope = self.config.get("rope_parameters") or self.config.get("rope_scaling") or {}
        return rope.get("full_attention", rope)

    @property
    def rope_type(self) -> str:
        return str(self.rope.get("rope_type") or self.rope.get("type") or "default").lower()

    @property
    def rope_theta(self) -> float | None:
        return self.get("rope_theta", self.rope.get("rope_theta"))

    @property
    def n_expert(self) -> int:
        """Routed experts per MoE layer; 0 for a dense model."""
        return int(self.get("num_local_experts") or self.get("num_experts") or self.get("n_routed_experts") or 0)

    @property
    def n_ff_exp(self) -> int:
        return int(self.get("moe_intermediate_size") or self.n_ff)

    @property
    def n_ff_shexp(self) -> int:
        """The shared expert's width: its own key (Qwen2-MoE), or n_shared_experts experts side by side (DeepSeek)."""
        return int(self.get("shared_expert_intermediate_size") or self.n_ff_exp * self.get("n_shared_experts", 0))

    @property
    def n_rot(self) -> int:
        factor = self.get("partial_rotary_factor", self.rope.get("partial_rotary_factor", 1.0))
        return int(self.head_dim * factor)


@dataclass(frozen=True)
class Family:
    """One llama.cpp architecture and the HF `architectures` that convert to it."""

    arch: gguf.MODEL_ARCH
    hf_architectures: tuple[str, ...]
    # HF tensor-name suffix → array transform, applied before the dtype cast
    transforms: Mapping[str, Transform] = field(default_factory=dict)
    # config.json key → GGUFWriter method for the keys only this family has (None values are skipped)
    config_keys: Mapping[str, str] = field(default_factory=dict)
    # transformers' defaults for keys a config.json may leave out (llama.cpp's would differ)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    norm_shift: float = 0.0  # added to every *norm.weight: Gemma's RMSNorm scales by (1 + w)
    always_tied: bool = False  # the output layer is the token embedding, whatever config.json says
    fused_gate_up: bool = False  # ffn_up holds gate and up rows (Phi-3's gate_up_proj)
    rope_types: tuple[str, ...] = ()  # rope scaling types this family converts beyond default/linear/yarn
    # config.json key → the one value llama.cpp's graph implements for this family (a default when the key is absent);
    # any other value is refused rather than silently computed differently
    requires: Mapping[str, Any] = field(default_factory=dict)
    extra_kv: Callable[[Hparams, gguf.GGUFWriter], None] | None = None
    extra_tensors: Callable[[Hparams], dict[str, np.ndarray]] | None = None
    # GGUFWriter method → value, for the attention sizes a family lays out otherwise than heads x head_dim (MLA)
    attention: Callable[[Hparams], Mapping[str, int]] | None = None
    # GGUF tensor kind → HF shape, where the family's differ from the generic ones
    shapes: Callable[[Hparams], Mapping[str, tuple[int, ...]]] | None = None
    # HF tensor-name suffix → the GGUF tensors it becomes (several, or one renamed)
    splits: Mapping[str, tuple[Part, ...]] = field(default_factory=dict)
    # GGUF tensor kinds kept in F32 beyond the generic ones (vectors, norms, biases, routers)
    f32_kinds: tuple[str, ...] = ()
    # HF tensors llama.cpp has no use for (DeepSeek-V3's multi-token-prediction layer)
    skip: Callable[[str, Hparams], bool] | None = None

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


def permute_rotary(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half layout of Q/K rows → the interleaved pairs of llama.cpp's normal RoPE."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))
