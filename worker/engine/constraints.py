"""Constrained decoding with llguidance: grammars checked before a job is submitted, a guide per sequence after.

llguidance was picked over llama.cpp's own grammar sampler (GBNF, in the pinned library) and xgrammar:
- it computes a sequence's token mask in ~40 µs on the embedded model's 49k vocabulary, 0.24 ms a token with the
  mask applied; llama.cpp's grammar sampler took 22 ms a token on the same schema (`python -m bench.grammar_engines`),
  as it checks every candidate token against the grammar's stacks;
- it builds its tokenizer from the GGUF's own vocabulary through llama.cpp (llguidance.llamacpp), where xgrammar
  wants a Hugging Face tokenizer;
- it names the JSON-schema keywords it does not implement ("Unimplemented keys: [...]"), so a schema it cannot
  enforce is refused instead of accepted and ignored.

The allowed tokens are taken from the sequence's logits on the CPU; the other sequences of the batch never
wait for it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
from llguidance import LLMatcher
from llguidance.gbnf_to_lark import GbnfToLarkError, gbnf_to_lark

from worker.engine.cpu_sampling import MASK_BIAS
from worker.engine.outputs import Constraint, ConstraintError

# JSON as people read it ({"a": 1, "b": 2}), and no free whitespace between tokens: with it, a model at a high
# temperature can pad a document with blank lines until max_tokens.
JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = '{"type": "object"}'
CACHED_GRAMMARS = 64


def grammar_of(constraint: Constraint) -> str:
    """The constraint as llguidance's grammar text. A source llguidance cannot read raises ConstraintError."""
    try:
        if constraint.kind == "json_object":
            return LLMatcher.grammar_from_json_schema(ANY_JSON_OBJECT, defaults=JSON_OPTIONS)
        if constraint.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(constraint.source, defaults=JSON_OPTIONS)
        if constraint.kind == "lark":
            return LLMatcher.grammar_from_lark(constraint.source)
        if constraint.kind == "gbnf":
            return LLMatcher.grammar_from_lark(gbnf_to_lark(constraint.source))
        if constraint.kind == "regex":
            return LLMatcher.grammar_from_regex(constraint.source)
    except (ValueError, GbnfToLarkError, AssertionError, KeyError, IndexError) as exc:
        raise ConstraintError(f"the {constraint.kind} grammar cannot be read: {exc}") from None
    raise ConstraintError(f"unknown constraint kind {constraint.kind!r}")


def first_line(message: str) -> str:
    return message.strip().split("\n", 1)[0]


class Grammars:
    """Compiled grammars of one model's vocabulary. check() runs off the engine thread (it may compile for a
    while); guide() then starts a sequence's matcher from the compiled one, a copy away."""

    def __init__(self, tokenizer: Callable[[], Any], piece: Callable[[int], bytes], n_vocab: int) -> None:
        self._tokenizer = tokenizer  # built on first use: a second or so for a large vocabulary
        self._piece = piece  # a token's bytes, control tokens included (for lazy triggers)
        self.n_vocab = n_vocab
        self._compiled: OrderedDict[Constraint, LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, constraint: Constraint) -> None:
        """Raises ConstraintError, saying why, unless llguidance enforces all of the constraint. Warnings count as
        errors: a schema keyword it would skip is a constraint the caller believes holds and would not."""
        self._matcher(constraint)

    def _matcher(self, constraint: Constraint) -> LLMatcher:
        with self._lock:
            if (cached := self._compiled.get(constraint)) is not None:
                self._compiled.move_to_end(constraint)
                return cached
        if constraint.trigger is not None and not constraint.trigger:
            raise ConstraintError("a lazy constraint's trigger cannot be empty")
        grammar = grammar_of(constraint)
        tokenizer = self._tokenizer()
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if failed or messages:
            raise ConstraintError(f"the {constraint.kind} constraint cannot be enforced: {'; '.join(messages)}")
        matcher = LLMatcher(tokenizer, grammar, log_level=0)
        # The first mask too: a grammar that only refers to itself ({"$ref": "#"}, `root ::= root`) compiles, and
        # allows no token at all
        if matcher.is_error():
            reason = first_line(matcher.get_error())
            raise ConstraintError(f"the {constraint.kind} constraint cannot be enforced: {reason}")
        first = Guide(matcher.deep_copy(), tokenizer, None, self._piece, self.n_vocab)
        allowed = first.mask_bits()
        if first.error is not None or allowed is None or not allowed.any():
            reason = "it allows no first token" + (f" ({first.error})" if first.error else "")
            raise ConstraintError(f"the {constraint.kind} constraint cannot be enforced: {reason}")
        with self._lock:
            self._compiled[constraint] = matcher
            while len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return matcher

    def guide(self, constraint: Constraint) -> Guide:
        return Guide(self._matcher(constraint).deep_copy(), self._tokenizer(), constraint.trigger, self._piece,
                     self.n_vocab)


class Guide:
    """One sequence's constraint: a mask before each sample, the sampled token consumed after. A lazy guide lets
    text through until its trigger is in the output, then holds what follows the trigger to the grammar."""

    def __init__(self, matcher: LLMatcher, tokenizer: Any, trigger: str | None, piece: Callable[[int], bytes],
                 n_vocab: int) -> None:
        self.matcher = matcher
        self.tokenizer = tokenizer
        self.trigger = trigger.encode() if trigger else None
        self.armed = trigger is None
        self.piece = piece
        self.n_vocab = n_vocab
        self._seen = b""  # a lazy guide's output so far (what the trigger is looked for in)
        self._bits = np.zeros((n_vocab + 31) // 32, dtype=np.int32)
        self._words = self._bits.view(np.uint32)
        self._ready = False  # _bits hold the mask for the next token
        self._allowed: np.ndarray | None = None  # the mask's ids, once listed

    @property
    def stopped(self) -> bool:
        """The grammar is complete and allows nothing more: the sequence ends here. (llguidance's matcher also
        stops on an error: that is no completion.)"""
        return self.armed and self.matcher.is_stopped() and not self.matcher.is_error()

    @property
    def error(self) -> str | None:
        """Why the grammar cannot go on (a recursion with no end, a pattern too large for its lexer, found as the
        tokens come), in a line: llguidance's message goes on with its parser's state."""
        return first_line(self.matcher.get_error()) if self.matcher.is_error() else None

    def prepare(self, *, listed: bool = False) -> None:
        """The mask for the next token: computed once its previous token is consumed (on a GPU, while the step that
        needs it computes); `listed`: its ids too (allowed(): 0.35 ms on a 128k vocabulary, on an H200's host)."""
        if self.armed and not self._ready:
            self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
            self._ready = True
            self._allowed = None
        if listed and self.armed and self._allowed is None:
            bits = np.unpackbits(self._bits.view(np.uint8), count=self.n_vocab, bitorder="little")
            self._allowed = np.flatnonzero(bits)

    def mask_bits(self) -> np.ndarray | None:
        """The mask as a 0/1 per token (uint8); None before a lazy guide's trigger (all are allowed)."""
        if not self.armed:
            return None
        self.prepare()
        return np.unpackbits(self._bits.view(np.uint8), count=self.n_vocab, bitorder="little")

    def allowed(self) -> np.ndarray | None:
        """The ids of the tokens the grammar allows next, ascending; None before a lazy guide's trigger (all are).
        Empty: it allows none (an error)."""
        if not self.armed:
            return None
        self.prepare(listed=True)
        assert self._allowed is not None
        return self._allowed if not self.matcher.is_error() else self._allowed[:0]

    def allows(self, token: int) -> bool:
        """Whether the grammar allows this token next: one bit of the mask."""
        if not self.armed:
            return True
        self.prepare()
        return bool((int(self._words[token >> 5]) >> (token & 31)) & 1) and not self.matcher.is_error()

    def mask(self, logits: np.ndarray) -> bool:
        """Tokens the grammar does not allow next get -inf logits (in place). False: it allows none (an error)."""
        if not self.armed:
            return True
        self.prepare()
        allowed = np.unpackbits(self._bits.view(np.uint8), count=len(logits), bitorder="little")
        # adding -inf or 0 by table: branch-free, 4x quicker than a boolean-indexed store on a 128k vocabulary
        np.add(logits, MASK_BIAS.take(allowed), out=logits)
        return bool(allowed.any()) and not self.matcher.is_error()

    def consume(self, token: int) -> None:
        self._ready = False
        if self.armed:
            self.matcher.consume_token(token)
            return
        assert self.trigger is not None
        self._seen += self.piece(token)
        at = self._seen.find(self.trigger)
        if at < 0:
            self._seen = self._seen[-len(self.trigger) :]  # enough to find a trigger split across tokens
            return
        self.armed = True
        rest = self._seen[at + len(self.trigger) :]
        self._seen = b""
        if rest:  # the trigger's token went on past it: the grammar starts inside that token
            self.matcher.consume_tokens(self.tokenizer.tokenize_bytes(rest))
