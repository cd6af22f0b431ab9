"""A real checkpoint: SmolLM2-135M rebuilt as HF SafeTensors from the embedded GGUF, converted back.

The rebuild dequantizes every tensor (Q4_1, Q8_0, F32) with gguf.quants, undoes llama.cpp's Q/K permute,
and writes a tokenizer.json from the GGUF's vocabulary and merges. Converting it back must give a GGUF that
tokenizes like that tokenizer.json (the `tokenizers` package is the reference), and that generates what the
original does.

Why F16 is not token-for-token the original: Q4_1 matmuls quantize the activations to 8 bits (Q8_1), F16
matmuls round them to F16, so logits differ by ~0.2 and greedy decoding parts ways at a near-tie after some
tokens. Two things are exactly right instead, and are tested: F16 picks the original's top token at every
position of a fixed text (teacher forcing), and quantizing the F16 back to Q4_1 with llama.cpp reproduces
the original's tensors byte for byte, hence its greedy output token for token.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import llama_cpp as lc
import numpy as np
import pytest

from tests.convert_reference import save_safetensors
from worker.llamacpp import Context, Model
from worker.models.convert import ensure_gguf
from worker.models.resolve import embedded_model_path

TEXTS = [
    "Hello world", "  two spaces\tand a tab\n\nnew lines ", "digits 1234567 and 3.14159, 2024-01-31",
    "accents: café naïve Ångström façade", "CJK: 你好世界，日本語のテキスト",
    "emoji 🦙🚀 👩‍👩‍👧 ✅",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n", "I've they'll we'RE don't",
    "code:\n    def f(x):\n        return x**2  # square", "¡Hola! ¿Qué tal? Grüße, Привет",
]
CHAT = "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"
_HF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def rebuild_checkpoint(reader: gguf.GGUFReader, folder: Path) -> None:
    def meta(key: str):
        return reader.fields[key].contents()

    n_head, n_kv = meta("llama.attention.head_count"), meta("llama.attention.head_count_kv")
    weights = {}
    for t in reader.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        block, kind = (t.name.split(".")[1:3] if t.name.startswith("blk.") else (None, t.name.split(".")[0]))
        if kind in ("attn_q", "attn_k"):  # undo llama.cpp's permute: back to HF's rotate-half rows
            n = n_head if kind == "attn_q" else n_kv
            x = x.reshape(n, x.shape[0] // n // 2, 2, x.shape[1]).swapaxes(1, 2).reshape(x.shape)
        prefix = f"model.layers.{block}." if block is not None else ""
        weights[f"{prefix}{_HF_NAMES[kind]}.weight"] = x
    folder.mkdir(parents=True)
    save_safetensors(folder / "model.safetensors", weights, "F16")

    tokens, types = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}
                         for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty == gguf.TokenType.CONTROL],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                byte_level]},
        "post_processor": {**byte_level, "trim_offsets": False}, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ") for m in meta("tokenizer.ggml.merges")]},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tokens[meta("tokenizer.ggml.bos_token_id")],
        "eos_token": tokens[meta("tokenizer.ggml.eos_token_id")],
        "unk_token": tokens[meta("tokenizer.ggml.unknown_token_id")],
        "pad_token": tokens[meta("tokenizer.ggml.padding_token_id")],
        "add_bos_token": False, "clean_up_tokenization_spaces": False, "chat_template": meta("tokenizer.chat_template"),
    }))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": meta("llama.embedding_length"),
        "num_hidden_layers": meta("llama.block_count"), "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "intermediate_size": meta("llama.feed_forward_length"), "vocab_size": len(tokens),
        "max_position_embeddings": meta("llama.context_length"), "rope_theta": meta("llama.rope.freq_base"),
        "rms_norm_eps": float(np.float32(meta("llama.attention.layer_norm_rms_epsilon"))),
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    }))


@pytest.fixture(scope="module")
def original_reader() -> gguf.GGUFReader:
    return gguf.GGUFReader(embedded_model_path())


@pytest.fixture(scope="module")
def smollm(tmp_path_factory, original_reader) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("smollm2")
    rebuild_checkpoint(original_reader, root / "SmolLM2-135M-Instruct")
    return {"folder": root / "SmolLM2-135M-Instruct", "cache": root / "cache"}


@pytest.fixture(scope="module")
def models(smollm):
    f16 = ensure_gguf(smollm["folder"], smollm["cache"])
    loaded = {"original": Model.load(embedded_model_path(), ref="original", fmt="gguf", gpu_layers=0),
              "f16": Model.load(f16, ref="f16", fmt="gguf", gpu_layers=0)}
    yield loaded
    for m in loaded.values():
        m.close()


def test_tokenization_equals_the_tokenizer_json(smollm, models):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(smollm["folder"] / "tokenizer.json"))
    for text in TEXTS:
        expected = reference.encode(text).ids
        assert models["f16"].tokenize(text, add_special=True, parse_special=True) == expected, text
        assert models["original"].tokenize(text, add_special=True, parse_special=True) == expected, text
        assert models["f16"].detokenize(expected) == reference.decode(expected, skip_special_tokens=True), text


def test_metadata_carries_the_tokenizer(models, original_reader):
    reader, original = gguf.GGUFReader(models["f16"].info.path), original_reader
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template", "llama.rope.dimension_count"):
        assert reader.fields[key].contents() == original.fields[key].contents(), key
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert models["f16"].info.chat_template == models["original"].info.chat_template


def _decode(model: Model, tokens: list[int], all_logits: bool = False, n_new: int = 0) -> np.ndarray | list[int]:
    """Every position's logits for `tokens` (all_logits), or the `n_new` greedy tokens that follow them."""
    context = Context(model, n_ctx=256, n_seq=1, n_batch=256, threads=2, flash_attn="off", n_outputs=0)
    ctx = context.ptr
    batch = lc.llama_batch_init(len(tokens), 0, 1)

    def step(chunk: list[int], start: int) -> None:
        for i, t in enumerate(chunk):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, start + i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, all_logits or i == len(chunk) - 1
        batch.n_tokens = len(chunk)
        assert lc.llama_decode(ctx, batch) == 0

    def logits(i: int) -> np.ndarray:
        return np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(model.n_vocab,)).copy()

    try:
        step(tokens, 0)
        if all_logits:
            return np.array([logits(i) for i in range(len(tokens))])
        out = [int(logits(len(tokens) - 1).argmax())]
        while len(out) < n_new:
            step(out[-1:], len(tokens) + len(out) - 1)
            out.append(int(logits(0).argmax()))
        return out
    finally:
        lc.llama_batch_free(batch)
        context.close()


def test_f16_picks_the_originals_top_token(models):
    text = CHAT + "The sea is a mirror that reflects the soul. The capital of France is Paris.\n" \
                  "def fibonacci(n):\n    if n < 2:\n        return n\n"
    tokens = models["original"].tokenize(text, add_special=True, parse_special=True)
    original = _decode(models["original"], tokens, all_logits=True)
    f16 = _decode(models["f16"], tokens, all_logits=True)
    agree = (original.argmax(-1) == f16.argmax(-1)).mean()
    print(f"top-1 agreement {agree:.3f} over {len(tokens)} positions; mean |Δlogit| "
          f"{np.abs(original - f16).mean():.3f}, max {np.abs(original - f16).max():.3f}")
    assert agree >= 0.9
    # where they differ it is a near-tie: the original's choice is still among F16's top three
    top3 = np.argsort(-f16, axis=-1)[:, :3]
    assert all(original[i].argmax() in top3[i] for i in range(len(tokens)))
    assert np.abs(original - f16).mean() < 0.5


def test_quantized_back_to_q4_1_is_the_original(smollm, models, original_reader):
    q4_1 = ensure_gguf(smollm["folder"], smollm["cache"], quantize="q4_1")
    ours, original = gguf.GGUFReader(q4_1), original_reader
    theirs = {t.name: t for t in original.tensors}
    assert len(ours.tensors) == len(theirs)
    for t in ours.tensors:
        assert t.tensor_type == theirs[t.name].tensor_type, t.name
        assert np.array_equal(np.asarray(t.data), np.asarray(theirs[t.name].data)), t.name
    model = Model.load(q4_1, ref="q4_1", fmt="gguf", gpu_layers=0)
    try:
        prompt = models["original"].tokenize(CHAT, add_special=True, parse_special=True)
        assert _decode(model, prompt, n_new=16) == _decode(models["original"], prompt, n_new=16)
    finally:
        model.close()
