"""Speculative decoding's policy: who proposes tokens, how many, and when to stop trying. Plain Python.

A speculating sequence decodes its last token and k proposed ones in the same llama_decode as everyone else's
tokens; the target model's own choice at each position is compared with the proposal, and the sequence keeps the
proposals up to the first miss plus the target's token there (llama.cpp's rule: sample the target at each position,
accept while it equals the proposal). Output is therefore the target's; only its speed changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SpecConfig:
    n_max: int = 8  # proposals a step at most
    n_min: int = 1  # a shorter proposal is not worth the verification
    max_load: int = 4  # running + waiting jobs above which nobody speculates (decoding stops being memory-bound)
    ngram_max: int = 4  # the longest suffix looked up in the sequence's own tokens
    ngram_min: int = 3


class NgramProposer:
    """Prompt lookup: the sequence's last few tokens found earlier in its own prompt and output; what followed
    them there is the proposal. Pays where output quotes its input: code edits, summaries, RAG answers."""

    def __init__(self, config: SpecConfig) -> None:
        self.config = config

    def propose(self, history: np.ndarray, n: int) -> list[int]:
        """Up to n tokens that followed the latest earlier occurrence of history's longest suffix (of ngram_max
        down to ngram_min tokens)."""
        size = len(history)
        for g in range(self.config.ngram_max, self.config.ngram_min - 1, -1):
            if size <= g:
                continue
            tail = history[size - g :]
            # candidate starts: where the tail's first token occurs, early enough to leave a token after the match
            starts = np.flatnonzero(history[: size - g] == tail[0])
            for start in starts[::-1]:
                if np.array_equal(history[start : start + g], tail):
                    return [int(t) for t in history[start + g : start + g + n]]
        return []


@dataclass
class SlotSpeculation:
    """One job's speculation: its current proposal length, adapted to how much of it is accepted."""

    n: int  # proposals to ask for at the next step (0: off for now)
    proposed: int = 0
    accepted: int = 0
    pause: int = 0  # steps left without proposing, after a run of misses

    def record(self, proposed: int, accepted: int, n_max: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        if accepted == proposed:
            self.n = min(n_max, self.n * 2)
        elif accepted == 0:
            self.n //= 2
            if self.n == 0:  # misses all the way down: rest a while, then try a short proposal again
                self.n, self.pause = 1, 16
        else:
            self.n = max(1, accepted + 1)

    @property
    def rate(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None
