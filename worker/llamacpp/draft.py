"""The draft model of speculative decoding: a second Model and a small Context of its own (one KV stream per target
slot), its greedy token at a batch position, and the check that its vocabulary is the target's.

What it proposes and when is the engine's business (worker.engine.speculative.DraftProposer).
"""

from __future__ import annotations

from collections.abc import Sequence

import llama_cpp as lc

from worker.llamacpp.context import Context
from worker.llamacpp.model import Model, ModelLoadError

# llama-server's rules (common/speculative.cpp): vocabularies whose sizes differ by more than this are not the same
# one grown by a few added tokens; the first few ids (specials that families place differently) are not compared.
VOCAB_MAX_SIZE_DIFFERENCE = 128
VOCAB_CHECK_START_TOKEN_ID = 5


class DraftMismatch(Exception):
    """The draft model cannot propose tokens for the target (a configuration error: the worker exits 2)."""


def check_draft_compatible(target: Model, draft: Model) -> None:
    """Raises DraftMismatch unless the draft's tokens mean the target's: the same vocabulary type, the same
    BOS/EOS/EOT ids and BOS/EOS use, sizes within VOCAB_MAX_SIZE_DIFFERENCE, and the same text for every token id
    both have (as llama-server checks)."""
    tv, dv = target.vocab, draft.vocab
    names = f"the draft model {draft.info.ref} and the model {target.info.ref}"
    if lc.llama_vocab_type(tv) != lc.llama_vocab_type(dv):
        raise DraftMismatch(f"{names} have different vocabulary types ({_vocab_type(tv)} and {_vocab_type(dv)})")
    for what, get in (("BOS", lc.llama_vocab_bos), ("EOS", lc.llama_vocab_eos), ("EOT", lc.llama_vocab_eot)):
        if get(tv) != get(dv):
            raise DraftMismatch(f"{names} have different {what} token ids ({get(dv)} and {get(tv)})")
    if (target.add_bos, target.add_eos) != (draft.add_bos, draft.add_eos):
        raise DraftMismatch(f"{names} differ in whether BOS/EOS are added to a text")
    if abs(target.n_vocab - draft.n_vocab) > VOCAB_MAX_SIZE_DIFFERENCE:
        raise DraftMismatch(f"{names} have vocabularies of {draft.n_vocab} and {target.n_vocab} tokens (at most "
                            f"{VOCAB_MAX_SIZE_DIFFERENCE} apart)")
    for token in range(VOCAB_CHECK_START_TOKEN_ID, min(target.n_vocab, draft.n_vocab)):
        if lc.llama_vocab_get_text(tv, token) != lc.llama_vocab_get_text(dv, token):
            raise DraftMismatch(f"{names} give token {token} different texts "
                                f"({lc.llama_vocab_get_text(dv, token)!r} and {lc.llama_vocab_get_text(tv, token)!r})")
    if draft.recurrent:  # its memory cannot be cut back to drop the proposals the target rejected
        raise DraftMismatch(f"the draft model {draft.info.ref} is recurrent or hybrid: its state cannot drop "
                            "rejected proposals")


def _vocab_type(vocab: object) -> str:
    kind = int(lc.llama_vocab_type(vocab))
    names = {lc.LLAMA_VOCAB_TYPE_SPM: "SentencePiece", lc.LLAMA_VOCAB_TYPE_BPE: "BPE",
             lc.LLAMA_VOCAB_TYPE_WPM: "WordPiece", lc.LLAMA_VOCAB_TYPE_UGM: "Unigram", lc.LLAMA_VOCAB_TYPE_RWKV: "RWKV"}
    return names.get(kind, f"type {kind}")


class DraftModel:
    """The draft's model and context: n_seq sequences (the target's slots) of n_ctx_seq cells each, in their own
    KV streams as the target's are. Owns the model: close() frees both."""

    def __init__(self, model: Model, *, n_ctx_seq: int, n_seq: int, n_batch: int, threads: int,
                 threads_batch: int | None = None, flash_attn: str = "auto") -> None:
        self.model = model
        self.n_ctx_seq = n_ctx_seq
        self.n_batch = max(n_batch, n_seq)  # one token of every sequence fits one decode
        # one logits row per sequence: the last position of each part (a catch-up, or the latest proposal)
        self.ctx = Context(model, n_ctx=n_ctx_seq * n_seq, n_seq=n_seq, n_batch=self.n_batch, threads=threads,
                           threads_batch=threads_batch, flash_attn=flash_attn, n_outputs=n_seq)
        if (status := self.ctx.warm_up()) != 0:
            self.ctx.close()
            raise ModelLoadError(f"the draft model {model.info.ref} failed its warm-up decode (status {status})")

    def decode(self, parts: Sequence[tuple[int, list[int], int, bool, bool, int]]) -> int:
        return self.ctx.decode(parts)

    def greedy(self, index: int) -> int:
        """The draft's most likely token after batch position `index` (the first of equal maxima, as llama.cpp's
        greedy sampler takes)."""
        return int(self.ctx.logits(index).argmax())

    def keep_prefix(self, seq_id: int, n: int) -> None:
        self.ctx.keep_prefix(seq_id, n)

    def forget(self, seq_id: int) -> None:
        self.ctx.forget(seq_id)

    def can_cut(self, seq_id: int, n: int) -> bool:
        """Whether the sequence's cells can be cut back to n positions. A sliding-window cache has dropped cells
        beyond its window: it can lose its last tokens (rejected proposals, always inside the window), not go back
        to an older prefix."""
        if self.model.n_swa <= 0:
            return True
        pos_max = int(lc.llama_memory_seq_pos_max(lc.llama_get_memory(self.ctx.ptr), seq_id))
        return pos_max - n < self.model.n_swa

    def is_eog(self, token: int) -> bool:
        return self.model.is_eog(token)

    def close(self) -> None:
        self.ctx.close()
        self.model.close()
