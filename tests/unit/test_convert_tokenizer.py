"""Tokenizer extraction: the pre-tokenizer name from its definition, SentencePiece-style vocabularies, errors."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from tests.convert_reference import (
    DIGITS,
    GEMMA_USER_DEFINED,
    LLAMA3_REGEX,
    QWEN2_REGEX,
    byte_level_tokenizer,
    sentencepiece_tokenizer,
    vocab_size_of,
)
from worker.models.convert.errors import ConvertError
from worker.models.convert.tokenizer import DEEPSEEK_LLM_SPLITS, DEEPSEEK_V3_SPLITS, read_tokenizer

T = gguf.TokenType


def _write(folder: Path, tokenizer: dict, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps(config or {}))
    return folder


def _byte_level(pre_tokenizer: dict | None, **model) -> dict:
    return {"added_tokens": [{"id": 3, "content": "<|end|>", "special": True}, {"id": 4, "content": "<x>"}],
            "normalizer": None, "pre_tokenizer": pre_tokenizer,
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"], **model}}


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}


@pytest.mark.parametrize("pre_tokenizer,model,config,expected", [
    ({**BYTE_LEVEL, "use_regex": True}, {}, {}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {**BYTE_LEVEL, "use_regex": True}]}, {}, {}, "smollm"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {**BYTE_LEVEL, "use_regex": True}]},
     {}, {"clean_up_tokenization_spaces": True}, "starcoder"),
    ({"type": "Sequence", "pretokenizers": [_split(LLAMA3_REGEX), BYTE_LEVEL]}, {"ignore_merges": True}, {},
     "llama-bpe"),
    ({"type": "Sequence", "pretokenizers": [_split(QWEN2_REGEX), BYTE_LEVEL]}, {}, {}, "qwen2"),
])
def test_pre_tokenizer_name_comes_from_its_definition(tmp_path, pre_tokenizer, model, config, expected):
    vocab = read_tokenizer(_write(tmp_path, _byte_level(pre_tokenizer, **model), config), n_vocab=8)
    assert (vocab.model, vocab.pre) == ("gpt2", expected)
    assert vocab.types[:5] == [T.NORMAL, T.NORMAL, T.NORMAL, T.CONTROL, T.USER_DEFINED]
    assert vocab.tokens[5:] == ["[PAD5]", "[PAD6]", "[PAD7]"] and vocab.types[5:] == [T.UNUSED] * 3


@pytest.mark.parametrize("pre_tokenizer", [
    {"type": "Sequence", "pretokenizers": [_split(r"\p{L}+|\s+"), BYTE_LEVEL]},  # a regex llama.cpp lacks
    {"type": "Whitespace"},
    {**BYTE_LEVEL, "use_regex": True, "add_prefix_space": True},
    None,
])
def test_unknown_pre_tokenizer_is_an_error(tmp_path, pre_tokenizer):
    with pytest.raises(ConvertError, match="unknown pre-tokenizer"):
        read_tokenizer(_write(tmp_path, _byte_level(pre_tokenizer)), n_vocab=8)


def test_trained_tokenizers_are_recognised(tmp_path):
    """tokenizers' own serialisation of the Llama 3 / Qwen2 / SmolLM pre-tokenizers, not hand-written JSON."""
    for regex, expected in ((LLAMA3_REGEX, "llama-bpe"), (QWEN2_REGEX, "qwen2"), (None, "smollm"),
                            (DEEPSEEK_V3_SPLITS, "deepseek-v3"), ((*DEEPSEEK_LLM_SPLITS, DIGITS), "deepseek-llm")):
        tok = byte_level_tokenizer(regex, 280, ["<|endoftext|>"])
        assert read_tokenizer(_write(tmp_path / str(expected), tok), vocab_size_of(tok)).pre == expected


def test_unsupported_tokenizers_are_errors(tmp_path):
    wordpiece = {"model": {"type": "WordPiece", "vocab": {"a": 0}}, "added_tokens": []}
    with pytest.raises(ConvertError, match="WordPiece"):
        read_tokenizer(_write(tmp_path / "w", wordpiece), 4)
    lowercase = {**_byte_level({**BYTE_LEVEL, "use_regex": True}), "normalizer": {"type": "Lowercase"}}
    with pytest.raises(ConvertError, match="Lowercase"):
        read_tokenizer(_write(tmp_path / "l", lowercase), 8)
    with pytest.raises(ConvertError, match="beyond config.json's vocab_size 3"):
        read_tokenizer(_write(tmp_path / "b", _byte_level({**BYTE_LEVEL, "use_regex": True})), 3)
    with pytest.raises(ConvertError, match="no tokenizer.json"):
        read_tokenizer(tmp_path / "nowhere", 3)


@pytest.mark.parametrize("prefix_space", [True, False])
def test_sentencepiece_style_vocabulary(tmp_path, prefix_space):
    tok = sentencepiece_tokenizer(300, prefix_space=prefix_space)
    vocab = read_tokenizer(_write(tmp_path, tok), vocab_size_of(tok))
    assert (vocab.model, vocab.pre, vocab.add_space_prefix) == ("llama", "default", prefix_space)
    assert vocab.types[:4] == [T.UNKNOWN, T.CONTROL, T.CONTROL, T.BYTE] and vocab.tokens[3] == "<0x00>"
    assert vocab.types[3:259] == [T.BYTE] * 256
    # llama.cpp merges the pair whose result scores highest: earlier merges must score higher
    ids = tok["model"]["vocab"]
    made = [ids["".join(m)] for m in tok["model"]["merges"][:20]]
    scores = [vocab.scores[i] for i in made]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)


def test_user_defined_sentencepiece_tokens_are_written_with_spaces(tmp_path):
    """Gemma's runs of ▁ are user-defined tokens llama.cpp matches in raw text: they are written as spaces."""
    tok = sentencepiece_tokenizer(320, prefix_space=False, user_defined=GEMMA_USER_DEFINED)
    vocab = read_tokenizer(_write(tmp_path, tok), vocab_size_of(tok))
    assert vocab.tokens[259:263] == ["  ", "   ", "    ", " " * 8]
    assert vocab.types[259:263] == [T.USER_DEFINED] * 4
    assert (vocab.tokens[263], vocab.types[263]) == ("<unused0>", T.CONTROL)  # as llama.cpp's converter types it
    # normal ones keep ▁
    assert any("▁" in t for t, ty in zip(vocab.tokens, vocab.types, strict=True) if ty == T.NORMAL)
