"""Speculative decoding's policy: who proposes tokens, how many, and when to stop trying. Plain Python.

A speculating sequence decodes its last token and k proposed ones in the same llama_decode as everyone else's
tokens; the target model's own choice at each position is compared with the proposal, and the sequence keeps the
proposals up to the first miss plus the target's token there (llama.cpp's rule: sample the target at each position,
accept while it equals the proposal). Output is therefore the target's; only its speed changes.
"""

from __future__ import annotations

import collections
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from worker.engine.host_cache import shared_length


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
    # plain steps measured before a first stretch (the median it is judged against): a new sequence's first steps
    # on a GPU run before CUDA graphs are captured, and a median of two or three of them made a self-draft at
    # 0.48x look as if it paid (H200)
    settle_steps: int = 8

    @property
    def load_limit(self) -> int:
        """Running + waiting jobs above which nobody speculates. With fixed-length proposals (a GPU) only a lone
        sequence does: with several, each one's stretches would change everyone's step shape, and with it lose
        everyone's CUDA graphs (measured: 4 streams of free text at 0.51x). Without the gate (measuring a
        proposer's ceiling), max_load."""
        return 1 if self.fixed_length and self.gate else self.max_load
    shadow_hits: int = 1  # a stretch starts after this many right shadow guesses in a row
    # weigh each proposal's measured cost against its expected gain (StepCosts); off only to measure the ceiling of
    # a proposer (benchmarks, tests that want every step to speculate)
    gate: bool = True


@dataclass(frozen=True)
class Ask:
    """One speculating sequence's request for a proposal: its tokens so far (its KV's and the one it decodes this
    step), and how many to propose at most."""

    seq_id: int
    history: np.ndarray
    n: int


class Proposer(Protocol):
    """What the scheduler asks for proposals: every speculating sequence of a step at once (a draft model decodes
    them in one batch). The answer maps seq_id to its proposal, possibly empty or shorter than asked. `spent`: the
    seconds the last call took that proposing costs at every step (a prompt's one-time catch-up left out); the
    speculation gate weighs it."""

    spent: float
    costly: bool  # its proposals take time of their own (a draft model's decodes): weighed only once measured

    def propose_all(self, asks: Sequence[Ask]) -> dict[int, list[int]]: ...


@dataclass
class _Grams:
    """A sequence's n-grams, each to the start of its latest occurrence that ends before the history's last token."""

    history: np.ndarray  # what was indexed: a prefix of the next history, unless the sequence was cut or changed
    tokens: list[int]  # the same, as a list
    latest: dict[tuple[int, ...], int] = field(default_factory=dict)


class NgramProposer:
    """Prompt lookup: the sequence's last few tokens found earlier in its own prompt and output; what followed
    them there is the proposal. Pays where output quotes its input: code edits, summaries, RAG answers."""

    costly = False  # a lookup in the sequence's own tokens: microseconds

    def __init__(self, config: SpecConfig) -> None:
        self.config = config
        self.spent = 0.0
        self._grams: dict[int, _Grams] = {}  # seq_id → its index

    def propose_indexed(self, seq_id: int, history: np.ndarray, n: int) -> list[int]:
        """What propose() gives, from an index of the sequence's n-grams kept between steps: a step that adds a
        token indexes its new n-grams alone. A lone sequence guesses in the shadow at every step: on the 2-core
        development CPU a lookup took 35 µs this way against 227 µs for the whole scan (2,000 steps of a history
        growing from 200 tokens)."""
        size = len(history)
        grams = self._grams.get(seq_id)
        done = len(grams.tokens) if grams is not None else 0
        if grams is not None and (kept := shared_length(grams.history[:done], history)) < done:
            if done - kept > self.config.n_max + 1:  # more than a step's proposals: another job's tokens
                grams = None
            else:  # rejected proposals: their n-grams' entries may be stale, which the lookup checks
                del grams.tokens[kept:]
                done = kept
        if grams is None:
            grams, done = _Grams(history, []), 0
            self._grams[seq_id] = grams
        tokens = grams.tokens
        tokens += history[done:].tolist()
        grams.history = history
        lo, hi = self.config.ngram_min, self.config.ngram_max
        latest = grams.latest
        for end in range(max(done, 1), size):  # the n-grams ending before the last token, not indexed yet
            for g in range(lo, min(hi, end) + 1):
                latest[tuple(tokens[end - g : end])] = end - g
        for g in range(hi, lo - 1, -1):
            if size <= g or (start := latest.get(suffix := tuple(tokens[size - g :]))) is None:
                continue
            if start + g < size and tuple(tokens[start : start + g]) == suffix:
                return tokens[start + g : start + g + n]
            return self.propose(history, n)  # a stale entry (from cut proposals): the whole scan
        return []

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

    def propose_all(self, asks: Sequence[Ask]) -> dict[int, list[int]]:
        started = time.perf_counter()
        out = {ask.seq_id: self.propose_indexed(ask.seq_id, ask.history, ask.n) for ask in asks}
        self.spent = time.perf_counter() - started
        return out


class DraftContext(Protocol):
    """The draft model's llama.cpp context as the proposer uses it (worker.llamacpp.draft.DraftModel)."""

    n_batch: int  # tokens one decode takes at most
    n_ctx_seq: int  # cells each sequence has

    def decode(self, parts: Sequence[tuple[int, list[int], int, bool, bool, int]]) -> int: ...
    def greedy(self, index: int) -> int: ...
    def keep_prefix(self, seq_id: int, n: int) -> None: ...
    def forget(self, seq_id: int) -> None: ...
    def can_cut(self, seq_id: int, n: int) -> bool: ...
    def is_eog(self, token: int) -> bool: ...


@dataclass
class _DraftSeq:
    held: list[int] = field(default_factory=list)  # what the draft's KV cells of this sequence hold, in order
    proposed: int = 0  # the length of its last proposal: what a steady catch-up decodes at most, plus one


class DraftProposer:
    """A small model of the target's vocabulary proposes greedily. Per sequence it keeps what its own KV holds;
    asked again, it cuts that back to the common prefix with the sequence's history (the proposals the target
    rejected, or a new job's prompt), decodes what is missing (a prompt once, then only the tokens accepted since)
    and proposes up to n tokens, one decode per token, ending before an end-of-generation token. All sequences
    asking in a step share each decode: the catch-up parts in as few batches as they fit, then one token per
    still-proposing sequence per decode."""

    costly = True

    def __init__(self, ctx: DraftContext) -> None:
        self.ctx = ctx
        self._seqs: dict[int, _DraftSeq] = {}
        self.spent = 0.0

    def propose_all(self, asks: Sequence[Ask]) -> dict[int, list[int]]:
        self.spent = 0.0
        # catch up: each sequence's missing tokens, the last with logits (its first proposal)
        pending: list[tuple[Ask, list[int], int]] = []  # ask, tokens to decode, their first position
        for ask in asks:
            history = ask.history.tolist()
            n = min(ask.n, self.ctx.n_ctx_seq - len(history))  # the draft's own context may be the smaller
            if n < 1 or not history:
                continue
            keep = self._cut_to(ask.seq_id, history)
            pending.append((Ask(ask.seq_id, ask.history, n), history[keep:], keep))
        live = self._catch_up(pending)
        # then one token a decode for every sequence still proposing. A proposal ends before an end-of-generation
        # token: the target's own token after the last proposal gives it in the same step, and a proposed one
        # would count as rejected even where the target agrees (its cell is not kept).
        proposals: dict[int, list[int]] = {s: [] if self.ctx.is_eog(t) else [t] for s, t in live.items()}
        wanted = {ask.seq_id: ask.n for ask, _, _ in pending}
        going = [s for s, p in proposals.items() if p and len(p) < wanted[s]]
        while going:
            parts = [(s, [proposals[s][-1]], len(self._seqs[s].held), True, False, 0) for s in going]
            started = time.perf_counter()
            if self.ctx.decode(parts) != 0:  # the draft's cells stay as they were: propose what there is
                break
            still = []
            for index, s in enumerate(going):
                self._seqs[s].held.append(proposals[s][-1])
                token = self.ctx.greedy(index)
                if not self.ctx.is_eog(token):
                    proposals[s].append(token)
                    if len(proposals[s]) < wanted[s]:
                        still.append(s)
            going = still
            self.spent += time.perf_counter() - started
        for seq_id, proposal in proposals.items():
            self._seqs[seq_id].proposed = len(proposal)
        return proposals

    def _cut_to(self, seq_id: int, history: list[int]) -> int:
        """Cut the sequence's draft cells to their common prefix with history (the last token always decoded
        again: its logits give the first proposal); how many are kept."""
        seq = self._seqs.setdefault(seq_id, _DraftSeq())
        keep = shared_length(np.asarray(seq.held, dtype=np.int32), np.asarray(history[:-1], dtype=np.int32))
        if keep < len(seq.held) - seq.proposed:  # more than its last proposal: another job's tokens
            seq.proposed = 0
        if keep < len(seq.held):
            if not self.ctx.can_cut(seq_id, keep):
                keep = 0
            if keep:
                self.ctx.keep_prefix(seq_id, keep)
            else:
                self.ctx.forget(seq_id)
            del seq.held[keep:]
        return keep

    def _catch_up(self, pending: list[tuple[Ask, list[int], int]]) -> dict[int, int]:
        """Decode every sequence's missing tokens, packed into batches of at most n_batch tokens (a long prompt
        over several); seq_id → the first proposed token, for those whose decodes all went through."""
        first: dict[int, int] = {}
        queue = [(ask.seq_id, tokens, pos) for ask, tokens, pos in pending]
        failed: set[int] = set()
        while queue:
            parts, room, rest = [], self.ctx.n_batch, []
            for seq_id, tokens, pos in queue:
                if room <= 0:
                    rest.append((seq_id, tokens, pos))
                    continue
                chunk = tokens[:room]
                parts.append((seq_id, chunk, pos, len(chunk) == len(tokens), False, 0))
                if len(chunk) < len(tokens):
                    rest.append((seq_id, tokens[len(chunk):], pos + len(chunk)))
                room -= len(chunk)
            started = time.perf_counter()
            status = self.ctx.decode(parts)
            if status != 0:  # nothing of this batch went in: these sequences propose nothing
                for seq_id, *_ in parts:
                    failed.add(seq_id)
                    self._forget(seq_id)
                queue = [q for q in rest if q[0] not in failed]
                continue
            index, steady = -1, True
            for seq_id, chunk, pos, last, _, _ in parts:
                index += len(chunk)
                seq = self._seqs[seq_id]
                # the tokens accepted since its last proposal, and the target's own: every step's catch-up
                steady = steady and last and pos > 0 and len(chunk) <= seq.proposed + 1
                seq.held.extend(chunk)
                if last:
                    first[seq_id] = self.ctx.greedy(index)
            if steady:
                self.spent += time.perf_counter() - started
            queue = rest
        return first

    def _forget(self, seq_id: int) -> None:
        self.ctx.forget(seq_id)
        self._seqs.pop(seq_id, None)


@dataclass
class SlotSpeculation:
    """One job's speculation: its current proposal length, adapted to how much of it is accepted."""

    n: int  # proposals to ask for at the next step (0: off for now)
    proposed: int = 0
    accepted: int = 0
    pause: int = 0  # steps left without proposing, after a run of misses or while it does not pay
    backoff: int = 4  # the pause after the cost gate last said no (doubled each time it says no in a row)
    # the next proposal is made whatever the gate says: a gate that only measures the steps it lets through would
    # stay shut for good after one noisy measurement
    probe: bool = False
    recent_rate: float = 0.5  # accepted / proposed, recent steps weighing most
    stretch: Stretch = field(default_factory=lambda: Stretch())  # fixed-length speculation's current stretch
    # Between stretches, proposals are made in the shadow and checked against the token that came: a stretch
    # starts after SHADOW_HITS right guesses in a row (costing nothing, where free text would pay for its misses)
    shadow: int = -1  # the token the last shadow proposal put first
    hits: int = 0
    # over for this job: others came while its chain was out of the decode graph (Scheduler._stop_speculating)
    stopped: bool = False

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
    # the last stretch paid: the next one follows at once, with no shadow guess between them. A one-token step
    # there changed the step's shape twice a stretch, and each change costs two steps without CUDA graphs
    # (SmolLM2 copying its prompt on an H200: 3.8 ms a step against 2.0 for its shape held)
    going: bool = False

    def add(self, tokens: int, seconds: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds

    def pays(self, plain_step: float, running: int) -> bool:
        """Everyone's tokens per second with this sequence speculating (it gave tokens/steps a step, the others one)
        beat plain steps by 10%."""
        spec_step = self.seconds / self.steps
        return (self.tokens / self.steps + running - 1) / spec_step > 1.1 * running / plain_step

    def judge(self, plain_step: float | None, running: int, costly: bool = False) -> int:
        """After a stretch: 0 to go on speculating, else the steps to pause for (without a plain step's time to
        compare with, the shortest pause: its steps measure one). A `costly` proposer's (a draft model's) stretch
        that did not pay gives the longest pause at once: its proposals cost a decode each, so text that changes
        its acceptance rarely changes the verdict, and each new stretch first catches the draft up on the tokens
        it skipped (a self-draft on an H200, 128 tokens: 0.53x with doubling pauses)."""
        if plain_step is None:
            verdict = self.MIN_PAUSE
        else:
            verdict = 0 if self.pays(plain_step, running) else self.MAX_PAUSE if costly else self.pause
            self.pause = self.MIN_PAUSE if verdict == 0 else min(2 * self.pause, self.MAX_PAUSE)
        self.steps, self.tokens, self.seconds = 0, 0, 0.0
        self.going = verdict == 0
        return verdict


class StepCosts:
    """What a decode step costs, what each proposed token adds to it, and what proposing it cost (a draft model's
    decodes, which hold up every running sequence as the step does), as measured over the recent steps (medians:
    a step that reserved a new graph or waited on a busy neighbour is an outlier, not the rate). On a GPU an extra
    token is nearly free for a big model and not for a small one (CUDA graphs cover one-token steps only); on a CPU
    it costs nearly as much as the step (SmolLM2, 2 cores: 32 ms a step, ~8 ms a proposed token). A proposal pays
    where the tokens it is expected to add outweigh what it adds to everyone's step:
    `rate x step > (per_token + proposing) x running sequences`, whatever its length."""

    def __init__(self, window: int = 32, settle_steps: int = 1) -> None:
        self.settle_steps = settle_steps
        self._steps: collections.deque[float] = collections.deque(maxlen=window)
        self._per_token: collections.deque[float] = collections.deque(maxlen=window)
        self._proposing: collections.deque[float] = collections.deque(maxlen=window)

    @property
    def step(self) -> float | None:
        return statistics.median(self._steps) if self._steps else None

    @property
    def settled(self) -> bool:
        """Enough plain steps measured to judge a stretch against (SpecConfig.settle_steps)."""
        return len(self._steps) >= self.settle_steps

    @property
    def per_token(self) -> float | None:
        return statistics.median(self._per_token) if self._per_token else None

    @property
    def proposing(self) -> float:
        """Seconds spent finding one proposed token (a draft model's decode; next to nothing for prompt lookup)."""
        return statistics.median(self._proposing) if self._proposing else 0.0

    def record_proposing(self, seconds: float, proposed: int) -> None:
        """Seconds a step's proposing took (Proposer.spent) for the tokens it proposed."""
        if proposed:
            self._proposing.append(seconds / proposed)

    def record(self, seconds: float, drafted: int) -> None:
        if not drafted:
            self._steps.append(seconds)
        elif (step := self.step) is not None:
            self._per_token.append(max(0.0, seconds - step) / drafted)

    def worth(self, rate: float, running: int) -> bool:
        step, per_token = self.step, self.per_token
        if step is None or per_token is None:
            return True  # not measured yet: try
        return rate * step > 1.1 * (per_token + self.proposing) * running
