"""Each architecture: a tiny random checkpoint converts, loads in llama.cpp, and computes what HF would.

The reference is tests/convert_reference.forward: HF's semantics over the HF weights, in float64. llama.cpp
runs the converted F16 weights with F16 activations in its matmuls and an F16 KV cache, so logits of
magnitude ~4 differ by a few thousandths; a wrong transform (permute, norm +1, rope scaling, soft-caps,
sliding window, local rope base, q/k norms, fused tensors) moves them by 0.3 or more.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.convert_reference import (
    ARCHS,
    NEW_ARCHS,
    forward,
    inv_freqs,
    llama_greedy,
    llama_logits,
    make_tiny_checkpoint,
    rope,
    save_safetensors,
    tiny_config,
)
from worker.llamacpp import Model
from worker.models.convert import ensure_gguf
from worker.models.convert.family import permute_rotary

LOGIT_TOLERANCE = 0.02  # max |llama.cpp - reference| over every position and vocabulary entry
SOURCE_DTYPE = {"llama": "BF16", "mistral": "F16", "gemma": "BF16", "gemma3": "F16"}  # the others: F32


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_the_reference_forward_pass(arch: str, tmp_path: Path):
    cfg, weights = make_tiny_checkpoint(tmp_path / arch, arch, dtype=SOURCE_DTYPE.get(arch, "F32"),
                                        shards=2 if arch == "qwen2" else 1)
    path = ensure_gguf(tmp_path / arch, tmp_path / "cache")
    tokens = [int(t) for t in np.random.default_rng(1).integers(3, cfg["vocab_size"], 12)]  # > sliding window 4
    diff = np.abs(llama_logits(path, tokens) - forward(weights, cfg, tokens)).max()
    print(f"{arch}: max |Δlogit| = {diff:.4f}")
    assert diff < LOGIT_TOLERANCE


def test_phi3_longrope(tmp_path: Path):
    longrope = {"type": "longrope", "short_factor": [1.0, 1.5, 2.5, 6.0], "long_factor": [2.0, 4.0, 8.0, 16.0]}
    cfg, weights = make_tiny_checkpoint(tmp_path / "m", "phi3", rope_scaling=longrope, max_position_embeddings=4096)
    tokens = list(range(3, 15))
    diff = np.abs(llama_logits(ensure_gguf(tmp_path / "m", tmp_path / "c"), tokens) - forward(weights, cfg, tokens))
    assert diff.max() < LOGIT_TOLERANCE


def test_quantized_conversion_loads_and_stays_close(tmp_path: Path):
    cfg, weights = make_tiny_checkpoint(tmp_path / "m", "qwen3")
    path = ensure_gguf(tmp_path / "m", tmp_path / "cache", quantize="q8_0")
    assert path.name.endswith(".q8_0.gguf")
    tokens = list(range(3, 15))
    ref = forward(weights, cfg, tokens)
    diff = np.abs(llama_logits(path, tokens) - ref).max()
    assert 0 < diff < 0.1 * np.abs(ref).max()  # 8-bit weights: close, but not F16-close


TEXTS = ["Hello world", "The quick brown fox", "  two spaces\tand a tab\n\nnew lines ", "digits 1234567 3.14",
         "accents: café naïve", "CJK: 你好世界", "かなとカナ, 한국어 2024년", "emoji 🦙🚀",
         "It's what they'll say, isn't it?",
         "def f(x):\n    if x:\n        return   x  # runs of 1 to 11 spaces           end"]
SPECIAL_TEXTS = ["<|im_start|>user\nhi<|im_end|>\n", "a<|endoftext|>b"]


# Llama 3, Qwen2, DeepSeek-LLM (V2), DeepSeek-V3 byte-level; SentencePiece with and without the prefix space
@pytest.mark.parametrize("arch", ["llama", "qwen2", "deepseek_v2", "deepseek_v3", "mistral", "gemma"])
def test_tokenization_matches_the_tokenizer_json(arch: str, tmp_path: Path):
    from tokenizers import Tokenizer

    make_tiny_checkpoint(tmp_path / arch, arch)
    reference = Tokenizer.from_file(str(tmp_path / arch / "tokenizer.json"))
    model = Model.load(ensure_gguf(tmp_path / arch, tmp_path / "cache"), ref=arch, fmt="gguf", gpu_layers=0)
    try:
        for text in TEXTS + (SPECIAL_TEXTS if arch in ("llama", "qwen2", "deepseek_v2", "deepseek_v3") else []):
            assert model.tokenize(text, add_special=True, parse_special=True) == reference.encode(text).ids, text
    finally:
        model.close()


def test_gemma_whitespace_tokens_are_spaces(tmp_path: Path):
    """Gemma's user-defined runs of ▁ detokenize as spaces, like the tokenizer.json's own decode."""
    from tokenizers import Tokenizer

    make_tiny_checkpoint(tmp_path / "g", "gemma")
    reference = Tokenizer.from_file(str(tmp_path / "g" / "tokenizer.json"))
    added = json.loads((tmp_path / "g" / "tokenizer.json").read_text())["added_tokens"]
    runs = {t["id"]: t["content"] for t in added if set(t["content"]) == {"▁"}}
    assert len(runs) == 4
    model = Model.load(ensure_gguf(tmp_path / "g", tmp_path / "cache"), ref="g", fmt="gguf", gpu_layers=0)
    try:
        for i, text in runs.items():
            assert model.piece(i).decode() == " " * len(text) == reference.decode([i])
        code = "def f(x):\n    if x:\n        return x"
        ids = model.tokenize(code, add_special=False, parse_special=False)
        assert set(runs) & set(ids)  # the indents are the whitespace tokens
        assert model.detokenize(ids) == code == reference.decode(ids)
    finally:
        model.close()


def test_the_permute_turns_rotate_half_into_interleaved_pairs():
    """Reference check: normal RoPE over permuted Q equals HF's rotate-half RoPE over the original."""
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(5, 64)), rng.normal(size=(4 * 16, 64))
    pos, inv = np.arange(5.0), inv_freqs(tiny_config("mistral", 300) | {"head_dim": 16}, sliding=False)
    hf = rope((x @ w.T).reshape(5, 4, 16), pos, inv, "neox")
    cpp = rope((x @ permute_rotary(w, 4).T).reshape(5, 4, 16), pos, inv, "normal")
    # the permute moves row j of each head's halves to 2j / 2j+1: undo that to compare
    assert np.allclose(hf, cpp.reshape(5, 4, 8, 2).swapaxes(-1, -2).reshape(5, 4, 16))


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("change", [{"beta_fast": 4.0}, {"beta_slow": 0.25}, {"attention_factor": 1.3},
                                    {"extrapolation_factor": 0.5}])
def test_yarn_parameters_reach_llama_cpp(change: dict, tmp_path: Path):
    """Each YaRN parameter moves llama.cpp's logits as it moves the reference's (llama.cpp's defaults would not)."""
    tokens = [int(t) for t in np.random.default_rng(2).integers(3, 300, 24)]
    logits = {}
    for name, rope_scaling in (("default", YARN), ("changed", YARN | change)):
        cfg, weights = make_tiny_checkpoint(tmp_path / name, "qwen3", rope_scaling=rope_scaling)
        logits[name] = llama_logits(ensure_gguf(tmp_path / name, tmp_path / "cache"), tokens), forward(weights, cfg,
                                                                                                       tokens)
    for cpp, ref in logits.values():
        assert np.abs(cpp - ref).max() < LOGIT_TOLERANCE
    assert np.abs(logits["changed"][1] - logits["default"][1]).max() > 10 * LOGIT_TOLERANCE  # the change matters


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_new_families_match_the_reference_and_generate_greedily(arch: str, tmp_path: Path):
    """MoE (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE), Phi-2, SmolLM3 (no RoPE on layer 4), Granite:
    every position's logits match, and each token llama.cpp generates one decode at a time (its KV cache, and
    MoE routing of single tokens) is the reference's best choice, up to the logit tolerance."""
    cfg, weights = make_tiny_checkpoint(tmp_path / arch, arch, dtype="BF16" if arch == "mixtral" else "F32")
    path = ensure_gguf(tmp_path / arch, tmp_path / "cache")
    prompt = [int(t) for t in np.random.default_rng(1).integers(3, cfg["vocab_size"], 12)]
    diff = np.abs(llama_logits(path, prompt) - forward(weights, cfg, prompt)).max()
    print(f"{arch}: max |Δlogit| = {diff:.4f}")
    assert diff < LOGIT_TOLERANCE
    generated = llama_greedy(path, prompt, 8)
    ref = forward(weights, cfg, prompt + generated)[len(prompt) - 1:-1]
    chosen = ref[np.arange(len(generated)), generated]
    assert np.all(chosen >= ref.max(-1) - 2 * LOGIT_TOLERANCE), (generated, ref.argmax(-1))


def test_deepseek_yarn(tmp_path: Path):
    """DeepSeek-V3's YaRN (mscale = mscale_all_dim): llama.cpp's MLA graph rescales the scores itself, from the
    yarn_log_multiplier the converter writes."""
    yarn = YARN | {"mscale": 0.8, "mscale_all_dim": 0.8, "beta_fast": 16.0}
    cfg, weights = make_tiny_checkpoint(tmp_path / "m", "deepseek_v3", rope_scaling=yarn)
    tokens = [int(t) for t in np.random.default_rng(2).integers(3, 300, 24)]
    ref = forward(weights, cfg, tokens)
    assert np.abs(ref - forward(weights, cfg | {"rope_scaling": None}, tokens)).max() > 10 * LOGIT_TOLERANCE
    assert np.abs(llama_logits(ensure_gguf(tmp_path / "m", tmp_path / "cache"), tokens) - ref).max() < LOGIT_TOLERANCE


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_experts_fused_as_transformers_5_saves_them(arch: str, tmp_path: Path):
    """gate_up_proj [experts, 2 x ff, hidden] and down_proj [experts, hidden, ff] per layer: split and stacked as
    llama.cpp wants, the model computes what the per-expert checkpoint does."""
    cfg, weights = make_tiny_checkpoint(tmp_path / "m", arch)
    fused = dict(weights)
    n_experts = cfg.get("num_experts") or cfg["n_routed_experts"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp.experts."
        if p + "0.gate_proj.weight" not in weights:
            continue  # a dense layer
        experts = [{n: fused.pop(f"{p}{e}.{n}_proj.weight") for n in ("gate", "up", "down")} for e in range(n_experts)]
        fused[p + "gate_up_proj"] = np.stack([np.concatenate([x["gate"], x["up"]]) for x in experts])
        fused[p + "down_proj"] = np.stack([x["down"] for x in experts])
    save_safetensors(tmp_path / "m" / "model.safetensors", fused)
    tokens = [int(t) for t in np.random.default_rng(1).integers(3, cfg["vocab_size"], 12)]
    diff = np.abs(llama_logits(ensure_gguf(tmp_path / "m", tmp_path / "cache"), tokens) - forward(weights, cfg, tokens))
    assert diff.max() < LOGIT_TOLERANCE
