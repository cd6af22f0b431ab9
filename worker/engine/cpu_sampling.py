"""Sampling from logits read on the CPU, with numpy: for the jobs whose logits the engine reads anyway (a constraint's
mask, logprobs, proposals to verify).

llama.cpp's CPU chain walks a 12-byte struct per vocabulary entry: 1.5 ms a token at temperature 0.8 on a 128k
vocabulary, 11 ms with top-p, 0.5 ms even greedy (`python -m bench.cpu_sampling_probe`). On a GPU that time holds up
the whole batch, so the same rules are applied here to whole arrays, in llama.cpp's order and with its definitions:
top-k, then top-p and min-p on the distribution at temperature 1, then temperature, then a draw (greedy: the first
maximum). Penalties need the sequence's history: a penalized job keeps llama.cpp's chain.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.random  # numpy loads it on first use: 12 ms of the engine thread's first job (H200 host)

from worker.engine.sampling import SamplingParams

_BLOCK = 1024  # the draw finds its block by block sums, then its token by one block's cumulative sum
_NARROW = 256  # candidates few enough to sort or partition as they are
MASK_BIAS = np.array([-np.inf, 0.0], dtype=np.float32)  # by mask bit: refused, allowed
_TINY = np.float32(np.finfo(np.float32).tiny)


class CpuSampler:
    """One job's sampler. With a seed, the same logits give the same tokens.

    A draw at a temperature with nothing to cut (no top-k, top-p, min-p) can be prepared before the logits exist:
    the Gumbel-max rule picks argmax(logit / T + g) with g = -log(E), E ~ Exp(1) drawn for every token, which is a
    draw from softmax(logit / T); tokens a mask refuses get g = -inf. The same token is argmax(logit + T x g), so
    prepare() draws T x g (on a GPU, while the step computes) and the draw that follows is one pass and an argmax.
    Measured on an H200's host, 128k vocabulary: a masked draw took 0.41 ms after the step (the allowed ids' logits
    gathered, exponentiated, summed)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self._noise: np.ndarray | None = None  # T x g for the next draw, the mask folded in (prepare)
        self._scaled: np.ndarray | None = None  # the draw's work row

    @staticmethod
    def applies(params: SamplingParams) -> bool:
        return not params.penalized

    @property
    def preparable(self) -> bool:
        p = self.params
        return not p.greedy and p.top_k <= 0 and p.top_p >= 1.0 and p.min_p <= 0.0

    @property
    def prepared(self) -> bool:
        return self._noise is not None

    def prepare(self, n_vocab: int, allowed: np.ndarray | None = None) -> None:
        """The next draw's noise, for a vocabulary of n_vocab; `allowed`: a 0/1 per token (uint8) of a mask."""
        if not self.preparable or self._noise is not None:
            return
        noise = self.rng.standard_exponential(n_vocab, dtype=np.float32)
        np.maximum(noise, _TINY, out=noise)  # float32 draws 0 once in ~10^7: -log must stay finite (masks add -inf)
        np.log(noise, out=noise)
        np.multiply(noise, np.float32(-self.params.temperature), out=noise)  # T x g: the temperature folded in
        if allowed is not None:
            noise += MASK_BIAS.take(allowed)
        self._noise = noise

    def discard(self) -> None:
        """Drop a prepared draw that was not needed (its mask is of the position it was prepared for)."""
        self._noise = None

    def sample(self, logits: np.ndarray, allowed: np.ndarray | None = None) -> int:
        """A token from these logits; from the `allowed` ids alone (ascending) where a constraint gives them (or,
        prepared, where the mask prepare() was given holds them)."""
        if self._noise is not None:
            noise, self._noise = self._noise, None
            if self._scaled is None or len(self._scaled) != len(logits):
                self._scaled = np.empty(len(logits), dtype=np.float32)
            np.add(logits, noise, out=self._scaled)
            return int(np.argmax(self._scaled))
        return self._sample(logits, allowed)

    def _sample(self, logits: np.ndarray, allowed: np.ndarray | None) -> int:
        p = self.params
        ids = allowed  # candidates' ids once the set is narrowed; None: the whole vocabulary
        values = logits if allowed is None else logits[allowed]
        if p.greedy:
            at = int(np.argmax(values))  # the first of equal maxima, as llama.cpp's greedy sampler
            return at if ids is None else int(ids[at])
        if 0 < p.top_k < len(values):
            best = top_k(values, p.top_k)
            ids = best if ids is None else ids[best]
            values = values[best]
        if p.top_p < 1.0:
            ids, values = _top_p(ids, values, p.top_p)
        if p.min_p > 0.0:
            keep = np.flatnonzero(values >= values.max() + math.log(p.min_p))  # p >= min_p * p_max
            ids = keep if ids is None else ids[keep]
            values = values[keep]
        weights = np.multiply(values, np.float32(1.0 / p.temperature), dtype=np.float32)
        np.subtract(weights, weights.max(), out=weights)
        np.exp(weights, out=weights)
        at = _draw(weights, self.rng.random())
        if weights[at] == 0.0:  # float rounding at a block's edge landed on a masked token
            at = int(np.argmax(weights))
        return int(at if ids is None else ids[at])


def _near(values: np.ndarray, top: float, enough: Callable[[np.ndarray], bool]) -> np.ndarray:
    """The tokens in a narrow band under the maximum that holds `enough`: a band 4 wide, doubled until it does, then
    bisected towards its edge over the tokens already in it while more than NARROW are: selecting by a band is
    linear, where sorting the whole vocabulary is not. (Flat logits put most of a 128k vocabulary within 4 of the
    maximum: partitioning all of it took 1.4 ms, on this project's CPU.)"""
    band = 4.0
    near = np.flatnonzero(values >= top - band)
    widened = False
    while len(near) < len(values) and not enough(near):
        band *= 2
        widened = True
        near = np.flatnonzero(values >= top - band)
    low, high = (band / 2 if widened else 0.0), band
    held = values if len(near) == len(values) else values[near]  # the values of `near`
    for _ in range(12):
        if len(near) <= _NARROW:
            break
        middle = (low + high) / 2
        inside = held >= top - middle
        candidate = near[inside]
        if enough(candidate):
            near, held, high = candidate, held[inside], middle
        else:
            low = middle
    return near


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest values, in no order."""
    near = _near(values, float(values.max()), lambda near: len(near) >= k)
    return near[np.argpartition(-values[near], k - 1)[:k]] if len(near) > k else near


def _top_p(ids: np.ndarray | None, values: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The most likely tokens whose probabilities (at temperature 1) first reach top_p, as llama.cpp keeps them.
    Only the tokens near the top are sorted: a band under the maximum is widened until it holds enough mass."""
    top = float(values.max())
    weights = np.exp(values - np.float32(top), dtype=np.float32)
    target = top_p * float(weights.sum(dtype=np.float64))
    near = _near(values, top, lambda near: float(weights[near].sum(dtype=np.float64)) >= target)
    near = near[np.argsort(-values[near], kind="stable")]
    cut = int(np.searchsorted(np.cumsum(weights[near], dtype=np.float64), target)) + 1
    near = near[: min(cut, len(near))]
    return (near if ids is None else ids[near]), values[near]


def _draw(weights: np.ndarray, u: float) -> int:
    """The index whose cumulative weight first passes u x the total: block sums first, then one block's running
    sum (a cumulative sum of the whole vocabulary in float64 is the slow part of a draw)."""
    n = len(weights)
    blocks = n // _BLOCK
    if blocks < 4:
        cumulative = np.cumsum(weights, dtype=np.float64)
        return min(int(np.searchsorted(cumulative, u * cumulative[-1], side="right")), n - 1)
    sums = np.empty(blocks + 1)
    sums[:blocks] = weights[: blocks * _BLOCK].reshape(blocks, _BLOCK).sum(axis=1, dtype=np.float64)
    sums[blocks] = weights[blocks * _BLOCK :].sum(dtype=np.float64)
    cumulative = np.cumsum(sums)
    target = u * cumulative[-1]
    block = min(int(np.searchsorted(cumulative, target, side="right")), blocks)
    if block == blocks and blocks * _BLOCK == n:  # rounding at the very end: the last block with weight
        block = blocks - 1
    start = block * _BLOCK
    within = np.cumsum(weights[start : start + _BLOCK], dtype=np.float64)
    within += cumulative[block - 1] if block else 0.0
    return start + min(int(np.searchsorted(within, target, side="right")), len(within) - 1)
