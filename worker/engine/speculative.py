"""Speculative decoding's policy: who proposes tokens, how many, and when to stop trying. Plain Python.

A speculating sequence decodes its last token and k proposed ones in the same llama_decode as everyone else's
tokens; the target model's own choice at each position is compared with the proposal, and the sequence keeps the
proposals up to the first miss plus the target's token there (llama.cpp's rule: sample the target at each position,
accept while it equals the proposal). Output is therefore the target's; only its speed changes.
"""

from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


@dataclass(frozen=True)
class SpecConfig:
    n_max: int = 7  # proposals a step at most
    n_min: int = 1  # a shorter proposal is not worth the verification
    max_load: int = 4  # running + waiting jobs above which nobody speculates (decoding stops being memory-bound)
    ngram_max: int = 4  # the longest suffix looked up in the sequence's own tokens
    ngram_min: int = 3
    # Speculation by stretches, every proposal n_max long (a short one padded): on a GPU a step of a new shape is
    # built and launched without CUDA graphs until the shape has held for two steps (~3 ms for SmolLM2 on an H200,
    # against a 1.2 ms step), so what pays is judged by the tokens a stretch of steps gave for its time, shape
    # changes included, against the plain steps' rate (Stretch).
    fixed_length: bool = False
    trial_steps: int = 8  # a stretch is judged after this many steps

    @property
    def load_limit(self) -> int:
        """Running + waiting jobs above which nobody speculates. With fixed-length proposals (a GPU) only a lone
        sequence does: with several, each one's stretches would change everyone's step shape, and with it lose
        everyone's CUDA graphs (measured: 4 streams of free text at 0.51x)."""
        return 1 if self.fixed_length else self.max_load
    shadow_hits: int = 1  # a stretch starts after this many right shadow guesses in a row


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
            # every earlier window of g tokens at once (a view, no copy), compared with the last g tokens
            windows = sliding_window_view(history[: size - 1], g)
            hits = np.flatnonzero((windows == history[size - g :]).all(axis=1))
            hits = hits[hits < size - g]  # not the suffix itself
            if len(hits):
                start = int(hits[-1]) + g
                return [int(t) for t in history[start : start + n]]
        return []


@dataclass
class SlotSpeculation:
    """One job's speculation: its current proposal length, adapted to how much of it is accepted."""

    n: int  # proposals to ask for at the next step (0: off for now)
    proposed: int = 0
    accepted: int = 0
    pause: int = 0  # steps left without proposing, after a run of misses or while it does not pay
    backoff: int = 4  # the pause after the cost gate last said no (doubled each time it says no in a row)
    recent_rate: float = 0.5  # accepted / proposed, recent steps weighing most
    stretch: Stretch = field(default_factory=lambda: Stretch())  # fixed-length speculation's current stretch
    # Between stretches, proposals are made in the shadow and checked against the token that came: a stretch
    # starts after SHADOW_HITS right guesses in a row (costing nothing, where free text would pay for its misses)
    shadow: int = -1  # the token the last shadow proposal put first
    hits: int = 0

    def record(self, proposed: int, accepted: int, n_max: int, fixed_length: bool = False) -> None:
        self.proposed += proposed
        self.accepted += accepted
        self.recent_rate = 0.7 * self.recent_rate + 0.3 * accepted / proposed
        if accepted:
            self.backoff = 4
        if fixed_length:  # the length stays; the stretch is judged by its time (Stretch)
            return
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


@dataclass
class Stretch:
    """Fixed-length speculation is on for stretches of steps: each is judged by what it gave (this sequence's
    tokens per step, everyone's step time) against plain steps, and either goes on or gives way to a pause that
    doubles each time speculation did not pay (up to MAX_PAUSE steps)."""

    MIN_PAUSE = 32
    MAX_PAUSE = 512

    steps: int = 0
    tokens: int = 0  # this sequence's tokens from the stretch's steps (accepted proposals + the step's own token)
    seconds: float = 0.0  # the steps' time, shape changes included
    pause: int = MIN_PAUSE  # the next pause, if this stretch does not pay

    def add(self, tokens: int, seconds: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds

    def pays(self, plain_step: float, running: int) -> bool:
        """Everyone's tokens per second with this sequence speculating (it gave tokens/steps a step, the others one)
        beat plain steps by 10%."""
        spec_step = self.seconds / self.steps
        return (self.tokens / self.steps + running - 1) / spec_step > 1.1 * running / plain_step

    def judge(self, plain_step: float | None, running: int) -> int:
        """After a stretch: 0 to go on speculating, else the steps to pause for (without a plain step's time to
        compare with, the shortest pause: its steps measure one)."""
        if plain_step is None:
            verdict = self.MIN_PAUSE
        else:
            verdict = 0 if self.pays(plain_step, running) else self.pause
            self.pause = self.MIN_PAUSE if verdict == 0 else min(2 * self.pause, self.MAX_PAUSE)
        self.steps, self.tokens, self.seconds = 0, 0, 0.0
        return verdict


class StepCosts:
    """What a decode step costs, and what each proposed token adds to it, as measured over the recent steps (medians:
    a step that reserved a new graph or waited on a busy neighbour is an outlier, not the rate). On a GPU an extra
    token is nearly free for a big model and not for a small one (CUDA graphs cover one-token steps only); on a CPU
    it costs nearly as much as the step (SmolLM2, 2 cores: 32 ms a step, ~8 ms a proposed token). A proposal pays
    where the tokens it is expected to add outweigh what it adds to everyone's step:
    `rate x step > per_token x running sequences`, whatever its length."""

    def __init__(self, window: int = 32) -> None:
        self._steps: collections.deque[float] = collections.deque(maxlen=window)
        self._per_token: collections.deque[float] = collections.deque(maxlen=window)

    @property
    def step(self) -> float | None:
        return statistics.median(self._steps) if self._steps else None

    @property
    def per_token(self) -> float | None:
        return statistics.median(self._per_token) if self._per_token else None

    def record(self, seconds: float, drafted: int) -> None:
        if not drafted:
            self._steps.append(seconds)
        elif (step := self.step) is not None:
            self._per_token.append(max(0.0, seconds - step) / drafted)

    def worth(self, rate: float, running: int) -> bool:
        step, per_token = self.step, self.per_token
        if step is None or per_token is None:
            return True  # not measured yet: try
        return rate * step > 1.1 * per_token * running
