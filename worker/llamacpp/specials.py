"""The tokens a constraint engine keeps out of text, by their text: what the chat layer's grammars write as tokens."""

from __future__ import annotations

import ctypes
import threading
import weakref
from typing import Any

import llama_cpp as lc

from worker.llamacpp.model import Model

_by_model: weakref.WeakKeyDictionary[Model, dict[str, int]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def model_special_tokens(model: Model) -> dict[str, int]:
    """special_tokens of the model's vocabulary, read once per model (a few tenths of a second for 150k tokens)."""
    with _lock:
        found = _by_model.get(model)
        if found is None:
            found = _by_model[model] = special_tokens(model.vocab)
        return found


def special_tokens(vocab: Any) -> dict[str, int]:
    """Control tokens, and user-defined tokens written `<...>` (Qwen's `<tool_call>`, `<think>`): the rule
    llguidance's `lltokenizer_from_vocab` uses to mark a token special, so a grammar must name them as tokens."""
    out: dict[str, int] = {}
    buf = ctypes.create_string_buffer(256)
    for token in range(lc.llama_vocab_n_tokens(vocab)):
        attr = lc.llama_vocab_get_attr(vocab, token)
        if not attr & (lc.LLAMA_TOKEN_ATTR_CONTROL | lc.LLAMA_TOKEN_ATTR_USER_DEFINED):
            continue
        n = lc.llama_token_to_piece(vocab, token, buf, 256, 0, True)
        if n <= 0:
            continue
        text = buf.raw[:n].decode("utf-8", errors="replace")
        if attr & lc.LLAMA_TOKEN_ATTR_CONTROL or (text.startswith("<") and text.endswith(">")):
            out.setdefault(text, token)
    return out
