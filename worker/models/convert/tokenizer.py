"""The tokenizer, from tokenizer.json and tokenizer_config.json, as llama.cpp's GGUF keys.

Two kinds of BPE vocabulary reach llama.cpp:
- byte-level BPE (GPT-2 style): the `gpt2` model with its merges, and `tokenizer.ggml.pre` naming the
  pre-tokenizer that llama.cpp implements natively. The name is chosen from the pre-tokenizer's definition
  (its steps and split regex); an unknown definition is an error, never a silently different tokenizer.
- SentencePiece-style BPE (▁ for spaces, <0xNN> byte fallback: Llama 2, Mistral, Gemma, Phi-3): the `llama`
  model with scores (from the merge ranks) and token types.
Special tokens, add_bos/add_eos and the chat template come through gguf.vocab.SpecialVocab.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from worker.models.convert.errors import ConvertError, read_json

TokenType = gguf.TokenType

# Split regexes of known byte-level pre-tokenizers, exactly as tokenizer.json writes them.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
               r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# DeepSeek-V3's three splits (digits in threes, CJK runs, then a GPT-4o-like regex), as tokenizer.json has them.
DEEPSEEK_V3_SPLITS = (
    '\\p{N}{1,3}',
    '[一-龥\u3040-ゟ゠-ヿ]+',
    ('[!"#$%&\'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|'
     '[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+'),
)
# DeepSeek-LLM / V2's five splits, then single digits (llama.cpp's deepseek-llm).
DEEPSEEK_LLM_SPLITS = (
    '[\r\n]',
    ('\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ'
     '-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-'
     'ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-'
     'Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-'
     'ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰'
     '-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+'),
    '\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+',
    '\\s+$',
    '[一-龥ࠀ-一가-\ud7ff]+',
)

# A pre-tokenizer's steps (see _steps) → llama.cpp's name for it. "ByteLevel+regex" is GPT-2's own regex.
KNOWN_PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("ByteLevel+regex",): "gpt-2",
    ("Digits", "ByteLevel+regex"): "smollm",  # StarCoder's too; told apart by clean_up_tokenization_spaces
    (f"Split:{LLAMA3_REGEX}", "ByteLevel"): "llama-bpe",
    (f"Split:{QWEN2_REGEX}", "ByteLevel"): "qwen2",
    (f"Split:{TEKKEN_REGEX}", "ByteLevel"): "tekken",
    (f"Split:{GPT4O_REGEX}", "ByteLevel"): "gpt-4o",
    (*(f"Split:{r}" for r in DEEPSEEK_V3_SPLITS), "ByteLevel"): "deepseek-v3",
    (*(f"Split:{r}" for r in DEEPSEEK_LLM_SPLITS), "Digits", "ByteLevel"): "deepseek-llm",
}
_SPACE = "▁"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Vocabulary:
    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    add_space_prefix: bool | None = None


def read_tokenizer(folder: Path, n_vocab: int) -> Vocabulary:
    path = folder / "tokenizer.json"
    tok = read_json(path, "no tokenizer.json (the GGUF must carry the tokenizer)")
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise ConvertError(f"{path}: a {model.get('type')} tokenizer; supported: byte-level or SentencePiece-style BPE")
    config = read_json(folder / "tokenizer_config.json")

    tokens: list[str | None] = [None] * n_vocab
    special_ids: set[int] = set()
    added_ids: set[int] = set()
    for text, i in model.get("vocab", {}).items():
        _place(tokens, i, text, path, n_vocab)
    for added in tok.get("added_tokens", []):
        i = added["id"]
        _place(tokens, i, added["content"], path, n_vocab)
        added_ids.add(i)
        if added.get("special"):
            special_ids.add(i)

    if _is_sentencepiece_style(tok):
        return _sentencepiece_vocab(tok, tokens, special_ids, added_ids)
    return _byte_level_vocab(tok, config, tokens, special_ids, added_ids, path)


def write_tokenizer(writer: gguf.GGUFWriter, vocab: Vocabulary, folder: Path) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    logging.getLogger("gguf").setLevel(logging.ERROR)  # its warnings would land unformatted on stderr
    special = gguf.SpecialVocab(folder, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    if vocab.model == "gpt2" and not special.merges:
        raise ConvertError(f"{folder / 'tokenizer.json'}: a byte-level BPE tokenizer without merges")
    # Say it either way: llama.cpp's defaults differ per tokenizer model.
    special.add_special_token.setdefault("bos", False)
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)


def _place(tokens: list[str | None], i: int, text: str, path: Path, n_vocab: int) -> None:
    if not 0 <= i < n_vocab:
        raise ConvertError(f"{path}: token {text!r} has id {i}, beyond config.json's vocab_size {n_vocab}")
    tokens[i] = text


def _is_sentencepiece_style(tok: dict[str, Any]) -> bool:
    """▁ stands for a space: a normalizer replaces spaces with it, or a Metaspace pre-tokenizer does."""
    if tok["model"].get("byte_fallback"):
        return True
    steps = [*_flatten(tok.get("normalizer")), *_flatten(tok.get("pre_tokenizer"))]
    return any(s["type"] == "Metaspace" or (s["type"] == "Replace" and s.get("content") == _SPACE) for s in steps)


def _flatten(step: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not step:
        return []
    if step["type"] == "Sequence":
        inner = step.get("normalizers") or step.get("pretokenizers") or step.get("decoders") or []
        return [s for sub in inner for s in _flatten(sub)]
    return [step]


def _fill(tokens: list[str | None], types: list[int]) -> list[str]:
    """Ids the tokenizer does not use (the embedding may be padded) become unused placeholders."""
    for i, text in enumerate(tokens):
        if text is None:
            tokens[i] = f"[PAD{i}]"
            types[i] = TokenType.UNUSED
    return tokens  # type: ignore[return-value]


def _looks_special(text: str) -> bool:
    # Markers that some tokenizers forget to mark special (llama.cpp's converter makes them control tokens too).
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")  # DeepSeek-Coder, Gemma
            or (text.startswith("<|") and text.endswith("|>")) or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))  # Gemma


def _added_token(tokens: list[str | None], types: list[int], i: int, special_ids: set[int]) -> None:
    """An added token's type; a user-defined one is written pre-normalized, as llama.cpp matches it in raw text.

    Gemma's runs of ▁ (ids 138-167 in Gemma 3) become runs of spaces: llama.cpp then both finds them in text
    and detokenizes them as spaces (with ▁ left in, generated code would read `▁▁▁ return`).
    """
    text = tokens[i]
    assert text is not None
    if i in special_ids or _looks_special(text):
        types[i] = TokenType.CONTROL
    else:
        types[i] = TokenType.USER_DEFINED
        tokens[i] = text.replace(_SPACE, " ")


def _byte_level_vocab(tok, config, tokens, special_ids, added_ids, path) -> Vocabulary:
    for step in _flatten(tok.get("normalizer")):
        if step["type"] != "NFC":  # NFC is what llama.cpp's own converter lets through
            raise ConvertError(f"{path}: normalizer {step['type']} has no llama.cpp equivalent")
    steps = tuple(_steps(tok.get("pre_tokenizer"), path))
    pre = KNOWN_PRE_TOKENIZERS.get(steps)
    if pre is None:
        raise ConvertError(f"{path}: unknown pre-tokenizer {json.dumps(tok.get('pre_tokenizer'))[:300]}; "
                           f"llama.cpp would split text differently. Known: {', '.join(KNOWN_PRE_TOKENIZERS.values())}")
    if pre == "llama-bpe" and not tok["model"].get("ignore_merges"):
        pre = "smaug-bpe"  # Llama 3's regex, but merges apply to whole words too
    if pre == "smollm" and config.get("clean_up_tokenization_spaces", False):
        pre = "starcoder"  # same splits; llama.cpp cleans up spaces when decoding
    types: list[int] = [TokenType.NORMAL] * len(tokens)
    for i in added_ids:
        _added_token(tokens, types, i, special_ids)
    return Vocabulary(model="gpt2", pre=pre, tokens=_fill(tokens, types), types=types)


def _steps(pre_tokenizer: dict[str, Any] | None, path: Path):
    for step in _flatten(pre_tokenizer):
        kind = step["type"]
        if kind == "ByteLevel":
            if step.get("add_prefix_space"):
                yield "ByteLevel+prefix-space"  # llama.cpp never adds one for byte-level BPE
            yield "ByteLevel+regex" if step.get("use_regex", True) else "ByteLevel"
        elif kind == "Digits":
            yield "Digits" if step.get("individual_digits") else "Digits+grouped"
        elif kind == "Split":
            pattern = step.get("pattern", {})
            ok = step.get("behavior") == "Isolated" and not step.get("invert")
            yield f"Split:{pattern.get('Regex')}" if ok and "Regex" in pattern else f"Split:{json.dumps(step)}"
        else:
            yield kind


def _sentencepiece_vocab(tok, tokens, special_ids, added_ids) -> Vocabulary:
    model = tok["model"]
    # llama.cpp merges the adjacent pair whose result scores highest; HF merges the lowest-ranked pair.
    # A score of -rank for the token each merge makes gives the same order.
    scores = [0.0] * len(tokens)
    scored: set[str] = set()
    ids = {text: i for i, text in enumerate(tokens) if text is not None}
    merges = model.get("merges", [])
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged = left + right
        if merged not in scored and merged in ids:
            scored.add(merged)
            scores[ids[merged]] = -float(rank)
    for text, i in ids.items():
        if text not in scored and len(text) > 1 and i not in added_ids:
            scores[i] = -float(len(merges) + i)  # reachable only through no merge: last

    unk = model.get("unk_token")
    types: list[int] = [TokenType.NORMAL] * len(tokens)
    for i, text in enumerate(tokens):
        if text is None:
            continue
        if i in added_ids:
            _added_token(tokens, types, i, special_ids)
        elif text == unk:
            types[i] = TokenType.UNKNOWN
        elif _BYTE_TOKEN.fullmatch(text):
            types[i] = TokenType.BYTE
    if unk is not None and unk in ids:
        types[ids[unk]] = TokenType.UNKNOWN

    steps = [*_flatten(tok.get("normalizer")), *_flatten(tok.get("pre_tokenizer"))]
    for s in steps:  # llama.cpp's SentencePiece tokenizer does only this: ▁ for spaces, maybe one in front
        if s["type"] not in ("Prepend", "Replace", "Metaspace", "Split"):
            raise ConvertError(f"SentencePiece-style tokenizer with a {s['type']} step, which llama.cpp does not do")
    prefix = any(
        (s["type"] == "Prepend" and s.get("prepend") == _SPACE)
        or (s["type"] == "Metaspace" and s.get("prepend_scheme", "always") != "never"
            and s.get("add_prefix_space", True))
        for s in steps
    )
    return Vocabulary(model="llama", pre="default", tokens=_fill(tokens, types), types=types, scores=scores,
                      add_space_prefix=prefix)
