"""Tiny random-weight HF checkpoints, and a numpy reference forward pass of them (HF semantics, HF weights).

The converter's tests write a checkpoint here, convert it, load the GGUF in llama.cpp and compare its logits
with `forward` over the same weights: every transform (Q/K permute, Gemma's +1, fused tensors, rope
scaling, soft-caps, sliding windows) has to be right for the two to agree.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from worker.models.convert.tokenizer import DEEPSEEK_LLM_SPLITS, DEEPSEEK_V3_SPLITS

# ---------------------------------------------------------------------------------------------- checkpoints


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values a SafeTensors file of `dtype` stores for x."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "F16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "BF16":  # round to nearest even on the top 16 bits
        u = x.view(np.uint32).astype(np.uint64)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        return u.astype(np.uint32).view(np.float32)
    return x


def save_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "F32") -> None:
    header, blobs, offset = {}, [], 0
    for name, x in tensors.items():
        x = np.asarray(x, dtype=np.float32)
        if dtype == "BF16":
            raw = (round_to(x, "BF16").view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            raw = x.astype("<f2" if dtype == "F16" else "<f4").tobytes()
        header[name] = {"dtype": dtype, "shape": list(x.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for raw in blobs:
            f.write(raw)


CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Hello world! How are you today?",
    "Numbers like 12345 and 3.14 appear in text.", "Once upon a time there was a tiny model.",
    "It's what they'll say, isn't it? We've seen it.", "Tabs\tand\nnewlines  and   spaces.",
]

QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


DIGITS = "<digits>"  # in a tuple of split regexes: a Digits(individual_digits) step


def byte_level_tokenizer(regex: str | tuple[str, ...] | None, vocab_size: int, specials: list[str]) -> dict:
    """A byte-level BPE tokenizer.json trained on CORPUS: Split(regex)+ByteLevel, several Splits (and Digits)
    then ByteLevel (DeepSeek's), or SmolLM's Digits+ByteLevel."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=regex == LLAMA3_REGEX))
    if regex is None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        regexes = (regex,) if isinstance(regex, str) else regex
        steps = [pre_tokenizers.Digits(individual_digits=True) if r == DIGITS
                 else pre_tokenizers.Split(Regex(r), "isolated") for r in regexes]
        tok.pre_tokenizer = pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                     use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return json.loads(tok.to_str())


# Gemma's user-defined tokens: runs of ▁ (a space each) and unused markers, added tokens not marked special.
GEMMA_USER_DEFINED = ("▁▁", "▁▁▁", "▁▁▁▁", "▁▁▁▁▁▁▁▁", "<unused0>")


def sentencepiece_tokenizer(vocab_size: int, prefix_space: bool = True, extra_specials: tuple[str, ...] = (),
                            user_defined: tuple[str, ...] = ()) -> dict:
    """A SentencePiece-style BPE tokenizer.json (▁, <0xNN> byte fallback), as Llama 2 / Gemma ship it;
    `user_defined` become added, non-special tokens right after the byte tokens (where Gemma has them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    base = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    base += user_defined
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(base) - len(extra_specials), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    trained = json.loads(tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(base)}
    for t in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(t, len(vocab))
    specials = [(i, t) for i, t in enumerate(base[:3])] + [(len(vocab) + j, t) for j, t in enumerate(extra_specials)]
    added = [(i, t, True) for i, t in specials] + [(259 + j, t, False) for j, t in enumerate(user_defined)]
    # normalized: HF matches them in the normalized text (spaces already ▁), as SentencePiece matches its
    # user-defined pieces, and as llama.cpp matches them in raw text once they are written with spaces
    normalizer = [{"type": "Prepend", "prepend": "▁"}] if prefix_space else []
    normalizer.append({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": not special, "special": special} for i, t, special in sorted(added)],
        "normalizer": {"type": "Sequence", "normalizers": normalizer},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                                    {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prefix_space else [])},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": trained["merges"]},
    }


# Each tiny model: its config.json; tokenizer is "spm" or a byte-level regex name.
HIDDEN, LAYERS, HEADS, KV_HEADS, FF = 64, 2, 4, 2, 96
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_config(arch: str, vocab_size: int) -> dict:
    base = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "intermediate_size": FF, "vocab_size": vocab_size,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    extra = {
        "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_theta": 500000.0,
                  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
        "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "head_dim": 32,
                    "sliding_window": None, "tie_word_embeddings": True},
        "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "tie_word_embeddings": True},
        "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 32},
        "phi3": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "num_key_value_heads": HEADS,
                 "partial_rotary_factor": 0.5, "original_max_position_embeddings": 256, "sliding_window": None},
        "gemma": {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "head_dim": 16,
                  "num_key_value_heads": 1, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True},
        "gemma2": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "head_dim": 32,
                   "query_pre_attn_scalar": 32, "attn_logit_softcapping": 1.5, "final_logit_softcapping": 2.0,
                   "sliding_window": 4, "tie_word_embeddings": True},
        "gemma3": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "head_dim": 16,
                   "query_pre_attn_scalar": 16, "sliding_window": 4, "rope_theta": 1000000.0,
                   "rope_local_base_freq": 100.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
                   "layer_types": ["sliding_attention", "full_attention"], "tie_word_embeddings": True},
        "mixtral": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 4,
                    "num_experts_per_tok": 2, "sliding_window": None},
        "qwen2_moe": {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "num_experts": 4,
                      "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
                      "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": []},
        "qwen3_moe": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "head_dim": 32,
                      "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                      "norm_topk_prob": True, "tie_word_embeddings": True},
        "phi": {"architectures": ["PhiForCausalLM"], "model_type": "phi", "num_key_value_heads": HEADS,
                "partial_rotary_factor": 0.5, "layer_norm_eps": 1e-5, "hidden_act": "gelu_new",
                "qk_layernorm": False},
        "smollm3": {"architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", "num_hidden_layers": 4,
                    "no_rope_layers": [1, 1, 1, 0], "no_rope_layer_interval": 4, "tie_word_embeddings": True},
        "granite": {"architectures": ["GraniteForCausalLM"], "model_type": "granite", "embedding_multiplier": 3.0,
                    "attention_multiplier": 0.5, "residual_multiplier": 0.6, "logits_scaling": 2.5},
        "olmo2": {"architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2"},
        "deepseek_v2": {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", **_DEEPSEEK,
                        "q_lora_rank": None, "scoring_func": "softmax", "topk_method": "greedy", "n_group": 1,
                        "topk_group": 1, "norm_topk_prob": False, "routed_scaling_factor": 1.0, "n_shared_experts": 2},
        "deepseek_v3": {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **_DEEPSEEK,
                        "q_lora_rank": 48, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 4,
                        "topk_group": 2, "norm_topk_prob": True, "routed_scaling_factor": 2.5, "n_shared_experts": 1},
    }[arch]
    return {**base, **extra}


# MLA: 4 heads of 16 + 8 (rope) query/key dims and 16 value dims over a 32-dim KV latent; 8 experts in 4 groups;
# the first of 3 layers dense.
_DEEPSEEK = {"num_hidden_layers": 3, "num_key_value_heads": HEADS, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
             "v_head_dim": 16, "kv_lora_rank": 32, "n_routed_experts": 8, "num_experts_per_tok": 2,
             "moe_intermediate_size": 32, "first_k_dense_replace": 1, "moe_layer_freq": 1}


def tiny_weights(cfg: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random HF weights for `cfg`: projections ~ 1/sqrt(fan_in), so activations stay near unit scale."""
    arch = cfg["model_type"].removesuffix("_text")
    d, ff, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    gemma = arch.startswith("gemma")

    def mat(rows, cols):
        return rng.normal(0, 1 / np.sqrt(cols), (rows, cols)).astype(np.float32)

    def norm(n):  # Gemma stores w - 1
        return rng.normal(0 if gemma else 1, 0.2, n).astype(np.float32)

    def bias(n):
        return rng.normal(0, 0.5, n).astype(np.float32)

    def swiglu(prefix, rows, names=("gate_proj", "up_proj", "down_proj")):
        w[prefix + names[0] + ".weight"] = mat(rows, d)
        w[prefix + names[1] + ".weight"] = mat(rows, d)
        w[prefix + names[2] + ".weight"] = mat(d, rows)

    phi = arch == "phi"
    final_norm = "model.final_layernorm.weight" if phi else "model.norm.weight"
    w = {"model.embed_tokens.weight": mat(v, d), final_norm: norm(d)}
    if not cfg.get("tie_word_embeddings"):
        w["lm_head.weight"] = mat(v, d)
    if phi:
        w["model.final_layernorm.bias"], w["lm_head.bias"] = bias(d), bias(v)
    n_exp = cfg.get("num_local_experts") or cfg.get("num_experts") or 0  # DeepSeek's: deepseek_layer
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if arch == "olmo2":  # norms after attention and MLP only; q/k norms over all heads
            w[p + "self_attn.q_norm.weight"], w[p + "self_attn.k_norm.weight"] = norm(q), norm(kv)
            w[p + "post_feedforward_layernorm.weight"] = norm(d)
        else:
            w[p + "input_layernorm.weight"] = norm(d)
        if phi:  # one LayerNorm (with bias), q/k/v/dense and fc1/fc2 with biases
            w[p + "input_layernorm.bias"] = bias(d)
            for name, rows, cols in (("self_attn.q_proj", q, d), ("self_attn.k_proj", kv, d),
                                     ("self_attn.v_proj", kv, d), ("self_attn.dense", d, q), ("mlp.fc1", ff, d),
                                     ("mlp.fc2", d, ff)):
                w[p + name + ".weight"], w[p + name + ".bias"] = mat(rows, cols), bias(rows)
            continue
        w[p + "post_attention_layernorm.weight"] = norm(d)
        if n_exp:  # routers scaled up: their top-k must not sit on a near-tie that F16 rounding could flip
            moe = "block_sparse_moe." if arch == "mixtral" else "mlp."
            w[p + moe + "gate.weight"] = 4 * mat(n_exp, d)
            for e in range(n_exp):
                if arch == "mixtral":
                    swiglu(p + f"{moe}experts.{e}.", ff, ("w1", "w3", "w2"))
                else:
                    swiglu(p + f"{moe}experts.{e}.", cfg["moe_intermediate_size"])
            if arch == "qwen2_moe":
                swiglu(p + "mlp.shared_expert.", cfg["shared_expert_intermediate_size"])
                w[p + "mlp.shared_expert_gate.weight"] = mat(1, d)
        if arch.startswith("deepseek"):
            deepseek_layer(w, cfg, i, mat, norm)
            continue
        if arch == "phi3":
            w[p + "self_attn.qkv_proj.weight"] = mat(q + 2 * kv, d)
            w[p + "mlp.gate_up_proj.weight"] = mat(2 * ff, d)
        else:
            for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                w[p + f"self_attn.{name}.weight"] = mat(rows, d)
                if arch in ("qwen2", "qwen2_moe"):
                    w[p + f"self_attn.{name}.bias"] = bias(rows)
            if not n_exp:
                w[p + "mlp.gate_proj.weight"] = mat(ff, d)
                w[p + "mlp.up_proj.weight"] = mat(ff, d)
        w[p + "self_attn.o_proj.weight"] = mat(d, q)
        if not n_exp:
            w[p + "mlp.down_proj.weight"] = mat(d, ff)
        if arch in ("qwen3", "qwen3_moe", "gemma3"):
            w[p + "self_attn.q_norm.weight"] = norm(hd)
            w[p + "self_attn.k_norm.weight"] = norm(hd)
        if arch in ("gemma2", "gemma3"):
            w[p + "pre_feedforward_layernorm.weight"] = norm(d)
            w[p + "post_feedforward_layernorm.weight"] = norm(d)
    return w


def write_checkpoint(folder: Path, cfg: dict, weights: dict[str, np.ndarray], tokenizer: dict,
                     dtype: str = "F32", shards: int = 1, tokenizer_config: dict | None = None) -> dict:
    """Write config.json, tokenizer files and (sharded) safetensors; return the weights as stored."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config or {}))
    names = list(weights)
    if shards == 1:
        save_safetensors(folder / "model.safetensors", weights, dtype)
    else:
        weight_map = {}
        for s in range(shards):
            part = {n: weights[n] for n in names[s::shards]}
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_safetensors(folder / file, part, dtype)
            weight_map.update({n: file for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {n: round_to(x, dtype) for n, x in weights.items()}


# ---------------------------------------------------------------------------------------------- forward


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float, plus_one: bool) -> np.ndarray:
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y * ((1.0 + w) if plus_one else w)


def rope(x: np.ndarray, pos: np.ndarray, inv_freq: np.ndarray, style: str = "neox",
         scale: float = 1.0) -> np.ndarray:
    """Rotate the first 2*len(inv_freq) dims of each head. x: [T, H, D]. neox: halves (HF's rotate_half);
    normal: adjacent pairs (what llama.cpp's LLAMA_ROPE_TYPE_NORM does). scale multiplies cos and sin."""
    n_rot = 2 * len(inv_freq)
    ang = pos[:, None] * inv_freq[None, :]  # [T, n_rot/2]
    cos, sin = scale * np.cos(ang)[:, None, :], scale * np.sin(ang)[:, None, :]
    r, rest = x[..., :n_rot], x[..., n_rot:]
    a, b = (r[..., : n_rot // 2], r[..., n_rot // 2:]) if style == "neox" else (r[..., 0::2], r[..., 1::2])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = np.concatenate([ra, rb], -1) if style == "neox" else np.stack([ra, rb], -1).reshape(r.shape)
    return np.concatenate([out, rest], -1)


def inv_freqs(cfg: dict, sliding: bool) -> np.ndarray:
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    n_rot = int(hd * cfg.get("partial_rotary_factor", 1.0))
    base = cfg["rope_local_base_freq"] if sliding and "rope_local_base_freq" in cfg else cfg["rope_theta"]
    inv = 1.0 / base ** (np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    scaling = cfg.get("rope_scaling") or {}
    if sliding and cfg["model_type"] == "gemma3_text":
        return inv  # Gemma 3's local layers are never scaled
    if scaling.get("type") == "longrope":  # short factors: the context stays within the original length
        return inv / np.asarray(scaling["short_factor"])
    if scaling.get("rope_type") == "linear":
        return inv / scaling["factor"]
    if scaling.get("rope_type") == "yarn":  # transformers' _compute_yarn_parameters, plus YaRN's extrapolation_factor
        base, f = cfg["rope_theta"], scaling["factor"]
        orig = scaling.get("original_max_position_embeddings", cfg["max_position_embeddings"])

        def dim(rotations):
            return n_rot * np.log(orig / (rotations * 2 * np.pi)) / (2 * np.log(base))

        low, high = max(np.floor(dim(scaling.get("beta_fast", 32))), 0), min(np.ceil(dim(scaling.get("beta_slow", 1))),
                                                                             n_rot - 1)
        ramp = np.clip((np.arange(n_rot // 2) - low) / max(high - low, 0.001), 0, 1)
        extrapolated = (1 - ramp) * scaling.get("extrapolation_factor", 1.0)
        return inv / f * (1 - extrapolated) + inv * extrapolated
    if scaling.get("rope_type") == "llama3":  # transformers' _compute_llama3_parameters
        f, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = np.where(wavelen > old / lo, inv / f, inv)
        mid = (wavelen >= old / hi) & (wavelen <= old / lo)
        return np.where(mid, (1 - smooth) * inv / f + smooth * inv, scaled)
    return inv


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def deepseek_layer(w: dict[str, np.ndarray], cfg: dict, i: int, mat, norm) -> None:
    """One DeepSeek layer's random weights (its two norms already made)."""
    rng = np.random.default_rng(100 + i)
    p, d, h = f"model.layers.{i}.", cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, v, lora = (cfg[k] for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank"))
    if q_lora := cfg["q_lora_rank"]:
        w[p + "self_attn.q_a_proj.weight"], w[p + "self_attn.q_a_layernorm.weight"] = mat(q_lora, d), norm(q_lora)
        w[p + "self_attn.q_b_proj.weight"] = mat(h * (nope + rope), q_lora)
    else:
        w[p + "self_attn.q_proj.weight"] = mat(h * (nope + rope), d)
    w[p + "self_attn.kv_a_proj_with_mqa.weight"] = mat(lora + rope, d)
    w[p + "self_attn.kv_a_layernorm.weight"] = norm(lora)
    w[p + "self_attn.kv_b_proj.weight"] = mat(h * (nope + v), lora)
    w[p + "self_attn.o_proj.weight"] = mat(d, h * v)

    def swiglu(prefix, rows):
        w[prefix + "gate_proj.weight"], w[prefix + "up_proj.weight"] = mat(rows, d), mat(rows, d)
        w[prefix + "down_proj.weight"] = mat(d, rows)

    if i < cfg["first_k_dense_replace"]:
        swiglu(p + "mlp.", cfg["intermediate_size"])
        return
    n_exp, ff = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    w[p + "mlp.gate.weight"] = 4 * mat(n_exp, d)  # well-separated top-k, as in tiny_weights
    if cfg["topk_method"] == "noaux_tc":  # non-negative, as HF masks groups out with 0 rather than -inf
        w[p + "mlp.gate.e_score_correction_bias"] = rng.uniform(0, 0.3, n_exp).astype(np.float32)
    for e in range(n_exp):
        swiglu(p + f"mlp.experts.{e}.", ff)
    swiglu(p + "mlp.shared_experts.", ff * cfg["n_shared_experts"])


def deepseek_forward(w: dict[str, np.ndarray], cfg: dict, tokens: list[int]) -> np.ndarray:
    """DeepSeek-V2/V3 as transformers computes it: MLA with the KV latent decompressed per head, RoPE on adjacent
    pairs of the rope dims, group-limited top-k routing over sigmoid or softmax scores, shared experts."""
    w = {k: x.astype(np.float64) for k, x in w.items()}
    T, h = len(tokens), cfg["num_attention_heads"]
    nope, r, vd, lora = (cfg[k] for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank"))
    pos = np.arange(T, dtype=np.float64)
    inv = inv_freqs({**cfg, "head_dim": r, "partial_rotary_factor": 1.0}, sliding=False)
    rope_scale, score_scale = 1.0, (nope + r) ** -0.5
    if (scaling := cfg.get("rope_scaling") or {}).get("rope_type") == "yarn":  # DeepSeek's own YaRN magnitudes
        def mscale(m):
            return 0.1 * m * np.log(scaling["factor"]) + 1.0

        rope_scale = mscale(scaling.get("mscale", 1.0)) / mscale(scaling["mscale_all_dim"])
        score_scale *= mscale(scaling["mscale_all_dim"]) ** 2

    def norm(x, name):
        return rms_norm(x, w[name + ".weight"], cfg["rms_norm_eps"], plus_one=False)

    def swiglu(x, prefix):
        return (silu(x @ w[prefix + "gate_proj.weight"].T) * (x @ w[prefix + "up_proj.weight"].T)) \
            @ w[prefix + "down_proj.weight"].T

    x = w["model.embed_tokens.weight"][tokens]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = norm(x, p + "input_layernorm")
        if cfg["q_lora_rank"]:
            q = norm(a @ w[p + "self_attn.q_a_proj.weight"].T, p + "self_attn.q_a_layernorm") \
                @ w[p + "self_attn.q_b_proj.weight"].T
        else:
            q = a @ w[p + "self_attn.q_proj.weight"].T
        q = q.reshape(T, h, nope + r)
        latent = a @ w[p + "self_attn.kv_a_proj_with_mqa.weight"].T
        kv = (norm(latent[:, :lora], p + "self_attn.kv_a_layernorm") @ w[p + "self_attn.kv_b_proj.weight"].T)
        kv = kv.reshape(T, h, nope + vd)
        q_pe = rope(q[..., nope:], pos, inv, "normal", rope_scale)
        k_pe = rope(latent[:, None, lora:], pos, inv, "normal", rope_scale)
        qf = np.concatenate([q[..., :nope], q_pe], -1)
        kf = np.concatenate([kv[..., :nope], np.repeat(k_pe, h, axis=1)], -1)
        scores = np.einsum("thd,shd->hts", qf, kf) * score_scale
        scores = np.where((pos[None, :] <= pos[:, None])[None], scores, -np.inf)
        out = np.einsum("hts,shd->thd", softmax(scores), kv[..., nope:]).reshape(T, h * vd)
        x = x + out @ w[p + "self_attn.o_proj.weight"].T
        a = norm(x, p + "post_attention_layernorm")
        if i < cfg["first_k_dense_replace"]:
            x = x + swiglu(a, p + "mlp.")
            continue
        logits = a @ w[p + "mlp.gate.weight"].T
        scores = 1 / (1 + np.exp(-logits)) if cfg["scoring_func"] == "sigmoid" else softmax(logits)
        choice = scores + w.get(p + "mlp.gate.e_score_correction_bias", 0)
        if (groups := cfg["n_group"]) > 1:  # keep the topk_group groups whose two best experts sum highest
            best2 = np.sort(choice.reshape(T, groups, -1), -1)[..., -2:].sum(-1)
            kept = np.argsort(-best2, -1)[:, :cfg["topk_group"]]
            mask = np.zeros((T, groups), bool)
            np.put_along_axis(mask, kept, True, -1)
            choice = np.where(np.repeat(mask, choice.shape[1] // groups, -1), choice, 0.0)
        top = np.argsort(-choice, -1)[:, :cfg["num_experts_per_tok"]]
        weights = np.take_along_axis(scores, top, -1)
        if cfg["norm_topk_prob"]:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        weights = weights * cfg["routed_scaling_factor"]
        m = swiglu(a, p + "mlp.shared_experts.")
        for t in range(T):
            for e, weight in zip(top[t], weights[t], strict=True):
                m[t] += weight * swiglu(a[t:t + 1], f"{p}mlp.experts.{e}.")[0]
        x = x + m
    x = norm(x, "model.norm")
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T


def moe(h: np.ndarray, w: dict[str, np.ndarray], p: str, cfg: dict) -> np.ndarray:
    """A sparse MoE block: softmax router, top-k experts (weights renormalised if the family does), SwiGLU experts,
    plus Qwen2-MoE's sigmoid-gated shared expert."""
    arch = cfg["model_type"]
    if arch == "mixtral":
        p, names, normalise = p + "block_sparse_moe.", ("w1", "w3", "w2"), True
    else:
        p, names, normalise = p + "mlp.", ("gate_proj", "up_proj", "down_proj"), cfg["norm_topk_prob"]

    def swiglu(x, prefix):
        gate, up, down = (w[f"{prefix}{n}.weight"] for n in names)
        return (silu(x @ gate.T) * (x @ up.T)) @ down.T

    probs = softmax(h @ w[p + "gate.weight"].T)
    top = np.argsort(-probs, -1)[:, :cfg["num_experts_per_tok"]]
    weights = np.take_along_axis(probs, top, -1)
    if normalise:
        weights = weights / weights.sum(-1, keepdims=True)
    out = np.zeros_like(h)
    for t in range(len(h)):
        for e, weight in zip(top[t], weights[t], strict=True):
            out[t] += weight * swiglu(h[t:t + 1], f"{p}experts.{e}.")[0]
    if arch == "qwen2_moe":
        gate = 1 / (1 + np.exp(-(h @ w[p + "shared_expert_gate.weight"].T)))
        out += gate * swiglu(h, p + "shared_expert.")
    return out


def forward(w: dict[str, np.ndarray], cfg: dict, tokens: list[int]) -> np.ndarray:
    """Logits [len(tokens), vocab] of the HF model `cfg` with weights `w`, in float64."""
    arch = cfg["model_type"].removesuffix("_text")
    if arch.startswith("deepseek"):
        return deepseek_forward(w, cfg, tokens)
    gemma, gemma23, phi = arch.startswith("gemma"), arch in ("gemma2", "gemma3"), arch == "phi"
    w = {k: v.astype(np.float64) for k, v in w.items()}
    d, n_head, n_kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // n_head
    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)
    residual = cfg.get("residual_multiplier", 1.0)  # Granite's multipliers; 1 elsewhere

    def norm(x, name):
        if phi:
            return layer_norm(x, w[name + ".weight"], w[name + ".bias"], cfg["layer_norm_eps"])
        return rms_norm(x, w[name + ".weight"], cfg["rms_norm_eps"], plus_one=gemma)

    mscale = 1.0  # Phi-3 LongRoPE and YaRN scale cos and sin by an attention factor
    if (scaling := cfg.get("rope_scaling") or {}).get("rope_type") == "yarn":
        mscale = scaling.get("attention_factor", 0.1 * np.log(scaling["factor"]) + 1)
    if scaling.get("type") == "longrope":
        factor = cfg["max_position_embeddings"] / cfg["original_max_position_embeddings"]
        mscale = np.sqrt(1 + np.log(factor) / np.log(cfg["original_max_position_embeddings"]))
    x = w["model.embed_tokens.weight"][tokens] * cfg.get("embedding_multiplier", 1.0)
    if gemma:
        x = x * np.sqrt(d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sliding = cfg.get("layer_types", ["full_attention"] * 99)[i] == "sliding_attention" or (
            arch == "gemma2" and i % 2 == 0)
        h = x if arch == "olmo2" else norm(x, p + "input_layernorm")
        if arch == "phi3":
            q, k, v = np.split(h @ w[p + "self_attn.qkv_proj.weight"].T, [n_head * hd, (n_head + n_kv) * hd], -1)
        else:
            q, k, v = (h @ w[p + f"self_attn.{n}_proj.weight"].T + w.get(p + f"self_attn.{n}_proj.bias", 0)
                       for n in "qkv")
        if arch == "olmo2":
            q, k = norm(q, p + "self_attn.q_norm"), norm(k, p + "self_attn.k_norm")
        q, k, v = q.reshape(T, n_head, hd), k.reshape(T, n_kv, hd), v.reshape(T, n_kv, hd)
        if arch in ("qwen3", "qwen3_moe", "gemma3"):
            q, k = norm(q, p + "self_attn.q_norm"), norm(k, p + "self_attn.k_norm")
        if cfg.get("no_rope_layers", [1] * 99)[i]:  # SmolLM3 leaves RoPE out of some layers
            inv = inv_freqs(cfg, sliding)
            q, k = rope(q, pos, inv, scale=mscale), rope(k, pos, inv, scale=mscale)
        k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) * cfg.get("attention_multiplier",
                                                           cfg.get("query_pre_attn_scalar", hd) ** -0.5)
        if cap := cfg.get("attn_logit_softcapping"):
            scores = np.tanh(scores / cap) * cap
        allowed = pos[None, :] <= pos[:, None]
        if sliding and gemma23:
            allowed &= pos[:, None] - pos[None, :] < cfg["sliding_window"]
        scores = np.where(allowed[None], scores, -np.inf)
        attended = np.einsum("hts,shd->thd", softmax(scores), v).reshape(T, n_head * hd)
        if phi:  # attention and MLP side by side, both off the one LayerNorm
            out = attended @ w[p + "self_attn.dense.weight"].T + w[p + "self_attn.dense.bias"]
            m = gelu_tanh(h @ w[p + "mlp.fc1.weight"].T + w[p + "mlp.fc1.bias"]) @ w[p + "mlp.fc2.weight"].T
            x = x + out + m + w[p + "mlp.fc2.bias"]
            continue
        out = attended @ w[p + "self_attn.o_proj.weight"].T
        post_norms = gemma23 or arch == "olmo2"
        if post_norms:
            out = norm(out, p + "post_attention_layernorm")
        x = x + out * residual
        if arch == "olmo2":
            h = x
        else:
            h = norm(x, p + ("pre_feedforward_layernorm" if gemma23 else "post_attention_layernorm"))
        if arch in ("mixtral", "qwen2_moe", "qwen3_moe"):
            m = moe(h, w, p, cfg)
        else:
            if arch == "phi3":
                gate, up = np.split(h @ w[p + "mlp.gate_up_proj.weight"].T, 2, -1)
            else:
                gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
            m = ((gelu_tanh(gate) if gemma else silu(gate)) * up) @ w[p + "mlp.down_proj.weight"].T
        if post_norms:
            m = norm(m, p + "post_feedforward_layernorm")
        x = x + m * residual
    x = norm(x, "model.final_layernorm" if phi else "model.norm")
    logits = x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T + w.get("lm_head.bias", 0)
    if cap := cfg.get("final_logit_softcapping"):
        logits = np.tanh(logits / cap) * cap
    return logits / cfg.get("logits_scaling", 1.0)


# ---------------------------------------------------------------------------------------------- fixtures

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3"]
# Added with issue 17: MoE, Phi-1/1.5/2, SmolLM3, Granite, OLMo 2, DeepSeek.
NEW_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "phi", "smollm3", "granite", "olmo2", "deepseek_v2",
             "deepseek_v3"]
# Which tokenizer each tiny model gets: byte-level BPE with a split regex (None: SmolLM's Digits), else
# SentencePiece-style.
TOKENIZER_OF = {"llama": LLAMA3_REGEX, "qwen2": QWEN2_REGEX, "qwen3": QWEN2_REGEX, "qwen2_moe": QWEN2_REGEX,
                "qwen3_moe": QWEN2_REGEX, "phi": None, "smollm3": LLAMA3_REGEX, "granite": None, "olmo2": LLAMA3_REGEX,
                "deepseek_v2": (*DEEPSEEK_LLM_SPLITS, DIGITS), "deepseek_v3": DEEPSEEK_V3_SPLITS}


def tiny_tokenizer(arch: str) -> dict:
    if arch in TOKENIZER_OF:
        return byte_level_tokenizer(TOKENIZER_OF[arch], 300, SPECIALS)
    # Phi-3's own vocabulary has these, and llama.cpp looks them up by name for Phi-3 models.
    gemma = arch.startswith("gemma")
    return sentencepiece_tokenizer(320, prefix_space=not gemma,  # as each family ships it
                                   extra_specials=("<|endoftext|>", "<|end|>") if arch == "phi3" else (),
                                   user_defined=GEMMA_USER_DEFINED if gemma else ())


def vocab_size_of(tokenizer: dict) -> int:
    ids = [*tokenizer["model"]["vocab"].values(), *(t["id"] for t in tokenizer["added_tokens"])]
    return max(ids) + 1


def make_tiny_checkpoint(folder: Path, arch: str, dtype: str = "F32", seed: int = 0, shards: int = 1,
                         **overrides) -> tuple[dict, dict[str, np.ndarray]]:
    """A random-weight checkpoint of `arch` in `folder`: (config, the weights as stored)."""
    tokenizer = tiny_tokenizer(arch)
    cfg = {**tiny_config(arch, vocab_size_of(tokenizer)), **overrides}
    weights = tiny_weights(cfg, np.random.default_rng(seed))
    tok_config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"} if arch not in TOKENIZER_OF else {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}<|im_start|>assistant\n"}
    stored = write_checkpoint(folder, cfg, weights, tokenizer, dtype=dtype, shards=shards,
                              tokenizer_config=tok_config)
    return cfg, stored


def llama_logits(gguf_path: Path, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits [len(tokens), vocab] for one sequence, every position output."""
    import llama_cpp as lc

    from worker.llamacpp import Context, Model

    model = Model.load(gguf_path, ref="test", fmt="gguf", gpu_layers=0)
    context = Context(model, n_ctx=max(64, len(tokens)), n_seq=1, n_batch=max(64, len(tokens)), threads=2,
                      flash_attn="off", n_outputs=0)
    ctx = context.ptr
    batch = lc.llama_batch_init(len(tokens), 0, 1)
    try:
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, True
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(tokens)
        assert lc.llama_decode(ctx, batch) == 0
        return np.array([np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(model.n_vocab,))
                         for i in range(len(tokens))], dtype=np.float64)
    finally:
        lc.llama_batch_free(batch)
        context.close()
        model.close()


def llama_greedy(gguf_path: Path, prompt: list[int], n_new: int) -> list[int]:
    """`n_new` tokens llama.cpp picks greedily after `prompt`: the prompt in one batch, then one token per decode
    (the KV-cache path a served model takes)."""
    import llama_cpp as lc

    from worker.llamacpp import Context, Model

    model = Model.load(gguf_path, ref="test", fmt="gguf", gpu_layers=0)
    context = Context(model, n_ctx=64, n_seq=1, n_batch=64, threads=2, flash_attn="off", n_outputs=0)
    ctx = context.ptr
    batch = lc.llama_batch_init(64, 0, 1)
    out: list[int] = []
    try:
        step, pos = list(prompt), 0
        while len(out) < n_new:
            for i, t in enumerate(step):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, pos + i, 1, i == len(step) - 1
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(step)
            assert lc.llama_decode(ctx, batch) == 0
            pos += len(step)
            logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, len(step) - 1), shape=(model.n_vocab,))
            step = [int(np.argmax(logits))]
            out += step
        return out
    finally:
        lc.llama_batch_free(batch)
        context.close()
        model.close()


def make_hub_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = "c0ffee" * 6 + "c0de") -> Path:
    """A repository in huggingface-hub's own cache layout (refs/main, snapshots/<commit>/ → blobs/<sha256>)."""
    import hashlib
    import os

    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    (root / "blobs").mkdir(exist_ok=True)
    snapshot = root / "snapshots" / commit
    for rel, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot
