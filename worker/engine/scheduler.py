"""The scheduling policy, plain Python: which jobs hold slots, what each running sequence decodes this step, and
what a sampled token means for its job (text, stop strings, ends). It never calls llama.cpp itself: it asks a
`SlotResources` (the llama.cpp context, or a fake in tests) to give a sequence a sampler chain or forget its KV cells.

One step, as the engine core drives it:
    plan = scheduler.schedule(now)      cancels, timeouts, admissions, chain changes; then the batch's parts
    ... llama_decode(plan.parts) ...
    scheduler.flush_text()              the last step's tokens become text (on a GPU, while the step computes;
                                        else schedule() did it before planning)
    scheduler.update(sampled, now)      eos / max_tokens; each token's text waits for the next flush_text
Outputs (typed, per job, in order) are collected with take_outputs().
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple, Protocol

import numpy as np

from worker.engine.outputs import Failed, Finished, Job, Narrated, Output, Started, StopReason, TokenText
from worker.engine.prefix_cache import Match, PrefixCache
from worker.engine.sampling import SamplingParams
from worker.engine.text import TextStream
from worker.narration import narrate


class SlotResources(Protocol):
    """What the scheduler asks of the llama.cpp context, per sequence."""

    def use_chain(self, seq_id: int, params: SamplingParams, *, reuse: bool) -> None: ...
    def drop_chain(self, seq_id: int) -> None: ...
    def forget(self, seq_id: int) -> None: ...
    def copy_prefix(self, src: int, dst: int, n: int) -> None: ...
    def move(self, src: int, dst: int) -> None: ...
    def reusable(self, src: int, n: int) -> bool: ...


class Vocab(Protocol):
    def piece(self, token: int) -> bytes: ...
    def is_eog(self, token: int) -> bool: ...


class SchedulerMetrics(Protocol):
    def job_admitted(self, queue_wait_s: float, prompt_tokens: int, cached_tokens: int) -> None: ...
    def token_generated(self, ttft_s: float | None, itl_s: float | None) -> None: ...
    def job_finished(self, stop_reason: str) -> None: ...
    def job_failed(self, code: str) -> None: ...
    def prefix_evicted(self, cells: int) -> None: ...


class NoMetrics:
    def job_admitted(self, queue_wait_s: float, prompt_tokens: int, cached_tokens: int) -> None: ...
    def token_generated(self, ttft_s: float | None, itl_s: float | None) -> None: ...
    def job_finished(self, stop_reason: str) -> None: ...
    def job_failed(self, code: str) -> None: ...
    def prefix_evicted(self, cells: int) -> None: ...


@dataclass(eq=False)
class Slot:
    seq_id: int
    job: Job | None = None
    chain_params: SamplingParams | None = None  # the chain this sequence has (kept between jobs), if any
    text: TextStream | None = None
    prompt_pos: int = 0  # prompt tokens already decoded
    n_past: int = 0  # KV cells this sequence holds
    last_token: int = -1
    cached: int = 0  # prompt tokens whose cells came from the prefix cache
    reserved: int = 0  # cells the job may still take from the pool (the rest of its prompt, its output)
    pending: int | None = None  # sampled, its text not yet done (see flush_text)
    pending_at: float = 0.0
    tokens_out: int = 0
    admitted_at: float = 0.0
    idle_since: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0

    @property
    def decoding(self) -> bool:
        """Running and past its prompt: one token a step."""
        return self.job is not None and self.prompt_pos == len(self.job.prompt_tokens)


class Part(NamedTuple):
    """A sequence's share of one batch (the llama.cpp context's BatchPart)."""

    seq_id: int
    tokens: list[int]
    pos: int
    logits: bool  # a token is sampled after its last position


@dataclass
class StepPlan:
    parts: list[Part] = field(default_factory=list)
    slots: list[Slot] = field(default_factory=list)  # the slot of each part
    # A steady step (a token a sequence, no chain attached or detached since the last) is quick to queue; any other
    # makes llama_decode itself long (a prompt, or llama.cpp re-reserving its graph after a chain change).
    steady: bool = True

    def sample_at(self) -> list[tuple[Slot, int]]:
        """(slot, batch index) of each part that wants a token and whose job still runs."""
        out, index = [], -1
        for slot, part in zip(self.slots, self.parts, strict=True):
            index += len(part.tokens)
            if part.logits and slot.job is not None:
                out.append((slot, index))
        return out


class Scheduler:
    def __init__(
        self,
        *,
        n_slots: int,
        batch_size: int,
        resources: SlotResources,
        vocab: Vocab,
        in_graph_sampling: bool = False,
        chain_idle_s: float = 1.0,
        pool_cells: int | None = None,
        cache_seqs: int = 0,
        metrics: SchedulerMetrics | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.slots = [Slot(seq_id=i) for i in range(n_slots)]
        # The one KV pool: cells held by running sequences and by cached prefixes (the tree), and cells running jobs
        # may still need. A job is admitted only when its worst case fits, so none fails mid-generation for KV.
        self.pool_cells = pool_cells
        self.cache = PrefixCache()
        # Sequence ids that hold cached prefixes once their job ended (none: nothing is kept), least recent first.
        self._idle_holders = list(range(n_slots, n_slots + cache_seqs))
        self._entries: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.batch_size = batch_size
        self.resources = resources
        self.vocab = vocab
        self.in_graph_sampling = in_graph_sampling
        # A chain attached in the decode graph is sampled every step, whether its slot is busy or not; one idle this
        # long is detached (the next job there attaches its own, at the cost of one graph re-reservation).
        self.chain_idle_s = chain_idle_s
        self.metrics = metrics or NoMetrics()
        self.clock = clock
        self.waiting: collections.deque[Job] = collections.deque()
        self.n_running = 0
        self._chains_changed = False  # since the last plan: llama.cpp re-reserves at the next decode
        self._next_idle_check = 0.0
        self._out: dict[Job, list[Output]] = {}

    # ---- planning --------------------------------------------------------------------------------------------

    def add(self, job: Job) -> None:
        self.waiting.append(job)

    def schedule(self, now: float, *, overlap: bool = False) -> StepPlan:
        """This step's plan. With `overlap`, the text of the last step's tokens waits to be done while a steady
        step runs (flush_text after the decode is queued); otherwise it is done here, before the parts are planned,
        so that a job its text ends takes no part in the step."""
        self._expire_waiting(now)
        self._admit()
        if self.in_graph_sampling:
            self._detach_idle_chains(now)
        for slot in self.slots:
            job = slot.job
            if job is not None and (job.cancel_reason or (job.deadline and now >= job.deadline)):
                self.finish(slot, job.cancel_reason or StopReason.TIMEOUT)
        plan = StepPlan(steady=not self._chains_changed and all(s.job is None or s.decoding for s in self.slots))
        if not (overlap and plan.steady):
            self.flush_text()
        budget = self.batch_size
        for slot in self.slots:  # one token per decoding sequence first, then prompt chunks as far as the batch allows
            if slot.decoding:
                plan.parts.append(Part(slot.seq_id, [slot.last_token], slot.n_past, True))
                plan.slots.append(slot)
                slot.n_past += 1
                budget -= 1
        for slot in self.slots:
            job = slot.job
            if job is None or slot.decoding or budget <= 0:
                continue
            chunk = job.prompt_tokens[slot.prompt_pos : slot.prompt_pos + budget]
            slot.prompt_pos += len(chunk)
            plan.parts.append(Part(slot.seq_id, chunk, slot.n_past, slot.prompt_pos == len(job.prompt_tokens)))
            plan.slots.append(slot)
            slot.n_past += len(chunk)
            budget -= len(chunk)
        if plan.parts:
            self._chains_changed = False
        return plan

    def _expire_waiting(self, now: float) -> None:
        for job in [j for j in self.waiting if j.cancel_reason or (j.deadline and now >= j.deadline)]:
            self.waiting.remove(job)
            self._end_unstarted(job, job.cancel_reason or StopReason.TIMEOUT)

    def _detach_idle_chains(self, now: float) -> None:
        if now < self._next_idle_check:
            return
        self._next_idle_check = now + self.chain_idle_s / 4
        for slot in self.slots:
            if slot.job is None and slot.chain_params is not None and now - slot.idle_since > self.chain_idle_s:
                self.resources.drop_chain(slot.seq_id)
                slot.chain_params = None
                self._chains_changed = True

    def _admit(self) -> None:
        free = [slot for slot in self.slots if slot.job is None]
        deferred: list[Job] = []
        while self.waiting and free:
            job = self.waiting.popleft()
            if self._prefix_in_flight(job):
                deferred.append(job)  # another job is prefilling this one's prefix: share it once it is there
                continue
            # A free slot whose chain has this job's parameters needs no new chain; else one whose stale chain
            # can be swapped, so that no more chains are attached than needed.
            slot = min(free, key=lambda s: (s.chain_params != job.params, s.chain_params is None))
            cached = self._take_prefix(slot, job)
            if cached < 0:
                self.waiting.appendleft(job)  # the pool is full of running work: wait, in order
                break
            free.remove(slot)
            try:
                self._start(slot, job, cached)
            except Exception as exc:  # e.g. a sampler chain llama.cpp refused: end this job, keep serving
                if slot.job is job:
                    self.fail(slot, "internal_error", f"could not start the job: {type(exc).__name__}: {exc}")
                else:
                    self._drop_sequence(slot.seq_id)
                    self._end_unstarted(job, StopReason.CANCELLED)
        self.waiting.extendleft(reversed(deferred))

    # ---- the KV pool and the prefix cache ----------------------------------------------------------------------

    def cells_free(self) -> int | None:
        """Pool cells neither held (running sequences, cached prefixes) nor promised to running jobs."""
        if self.pool_cells is None:
            return None
        return self.pool_cells - self.cache.cells_used - sum(s.reserved for s in self.slots if s.job is not None)

    def cells_cached(self) -> int:
        """Cells that only cached prefixes hold (what eviction can free)."""
        return self.cache.cells_held_only_by(set(self._entries))

    def _take_prefix(self, slot: Slot, job: Job) -> int:
        """The longest cached prefix of the job's prompt into the slot's sequence, and room in the pool for the rest
        (evicting cached prefixes, least recently used first). The prefix length, or -1 when it does not fit."""
        match = Match(self.cache.root, 0)
        if self._idle_holders or self._entries:  # prefix caching is on
            # at least the prompt's last token is decoded: its logits give the first token
            match = self.cache.match(job.prompt_tokens[:-1])
            src = match.source()
            if src is None or not self.resources.reusable(src, match.length):
                match = Match(self.cache.root, 0)
            if match.length:
                assert src is not None
                self.resources.copy_prefix(src, slot.seq_id, match.length)
            self.cache.attach(slot.seq_id, match)
            if src is not None and match.length and src in self._entries:
                if self.cache.length[src] - match.length <= RETIRE_SLACK:
                    # the conversation goes on in this job, which holds all of the entry but maybe a few tokens
                    # that the client's text tokenizes differently: one entry per conversation, not one per turn
                    self._retire(src)
                else:
                    self._entries.move_to_end(src)
        need = len(job.prompt_tokens) - match.length + job.max_tokens
        free = self.cells_free()
        while free is not None and free < need and self._entries:
            self._evict(next(iter(self._entries)))
            free = self.cells_free()
        if free is not None and free < need:
            self._drop_sequence(slot.seq_id)
            return -1
        slot.reserved = need
        return match.length

    def _prefix_in_flight(self, job: Job) -> bool:
        """Whether a running job is still prefilling a longer prefix of this job's prompt than the cache holds."""
        if not (self._idle_holders or self._entries):
            return False
        have = self.cache.match(job.prompt_tokens[:-1]).length
        for slot in self.slots:
            other = slot.job
            if other is None or slot.decoding:
                continue
            done = self.cache.length.get(slot.seq_id, 0)
            shared = _common_prefix(job.prompt_tokens, other.prompt_tokens, limit=len(job.prompt_tokens) - 1)
            if shared > max(done, have) and shared >= MIN_SHARED_PREFILL:
                return True  # waiting costs at most that prefill's remaining steps
        return False

    def decoded(self, parts: Iterable[tuple[Slot, Part]]) -> None:
        """These parts are in the KV cache now (llama_decode took them): the tree and the pool know it."""
        for slot, part in parts:
            self.cache.extend(part.seq_id, part.tokens)
            slot.reserved = max(0, slot.reserved - len(part.tokens))

    def _retire(self, holder: int) -> None:
        """Drop an entry that a running job continues: it frees an id, and at most RETIRE_SLACK cells."""
        del self._entries[holder]
        self.cache.release(holder)
        self.resources.forget(holder)
        self._idle_holders.append(holder)

    def _evict(self, holder: int) -> None:
        del self._entries[holder]
        freed = self.cache.release(holder)
        self.resources.forget(holder)
        self._idle_holders.append(holder)
        self.metrics.prefix_evicted(freed)
        narrate("prefix_evicted", f"Evicted a cached prefix: {freed} KV cells freed.", actor="engine",
                target=f"seq:{holder}", cells=freed, level="debug")

    def _drop_sequence(self, seq_id: int) -> None:
        self.cache.release(seq_id)
        self.resources.forget(seq_id)

    def _keep_sequence(self, seq_id: int) -> None:
        """A finished job's cells become a cache entry (under a holder id), or are freed when nothing is kept."""
        if not self._idle_holders and self._entries:
            self._evict(next(iter(self._entries)))
        if not self._idle_holders or self.cache.length.get(seq_id, 0) == 0:
            self._drop_sequence(seq_id)
            return
        holder = self._idle_holders.pop()
        self.resources.move(seq_id, holder)
        self.cache.move(seq_id, holder)
        self._entries[holder] = None

    def _start(self, slot: Slot, job: Job, cached: int = 0) -> None:
        self.n_running += 1
        slot.job = job
        slot.text = TextStream(job.stop)
        slot.cached = cached
        reuse = slot.chain_params == job.params
        slot.chain_params = None  # until the context has the chain
        if not reuse and self.in_graph_sampling:
            self._chains_changed = True
        self.resources.use_chain(slot.seq_id, job.params, reuse=reuse)
        slot.chain_params = job.params
        slot.prompt_pos = slot.n_past = cached
        slot.tokens_out = 0
        slot.admitted_at = self.clock()
        slot.first_token_at = 0.0
        queue_wait = slot.admitted_at - job.submitted_at
        self.metrics.job_admitted(queue_wait, len(job.prompt_tokens), cached)
        self._emit(job, Started(job.job_id, len(job.prompt_tokens), datetime.now(timezone.utc), cached))
        self._narrate(job, "inference_start", f"Started job {job.job_id}: {len(job.prompt_tokens)} prompt tokens"
                      f"{f', {cached} of them cached' if cached else ''}.", prompt_tokens=len(job.prompt_tokens),
                      cached_tokens=cached, slot=slot.seq_id, queue_wait_ms=round(queue_wait * 1000, 2))

    # ---- results ---------------------------------------------------------------------------------------------

    def update(self, sampled: Iterable[tuple[Slot, int]], now: float) -> None:
        """Sampled tokens: what the next step depends on (whether each sequence goes on, and with which token).
        Their text is done by the next flush_text."""
        for slot, token in sampled:
            job = slot.job
            if job is None:  # ended meanwhile (a stop sequence in the text just done)
                continue
            if slot.tokens_out == 0 and not slot.first_token_at:
                slot.first_token_at = now
            if self.vocab.is_eog(token) and not job.ignore_eos:
                self.finish(slot, StopReason.EOS)
                continue
            slot.tokens_out += 1
            slot.last_token = token
            slot.pending, slot.pending_at = token, now
            if slot.tokens_out >= job.max_tokens:
                self.finish(slot, StopReason.MAX_TOKENS)

    def flush_text(self) -> None:
        for slot in self.slots:
            if slot.pending is not None:
                self._text_of_pending(slot)

    def _text_of_pending(self, slot: Slot) -> None:
        """The sampled token's text, metrics and output; a completed stop sequence ends the job."""
        job, token, at = slot.job, slot.pending, slot.pending_at
        assert job is not None and token is not None and slot.text is not None
        slot.pending = None
        if slot.tokens_out == 1:
            self.metrics.token_generated(at - job.submitted_at, None)
        else:
            self.metrics.token_generated(None, at - slot.last_token_at)
        slot.last_token_at = at
        text = slot.text.feed(self.vocab.piece(token))
        if text:
            self._emit(job, TokenText(text, slot.tokens_out - 1))
        if slot.text.matched is not None:
            self.finish(slot, StopReason.STOP_SEQUENCE)

    def finish(self, slot: Slot, reason: StopReason) -> None:
        if slot.pending is not None:
            self._text_of_pending(slot)  # its text comes before the end, and it may complete a stop sequence
            if slot.job is None:
                return
        job, text = slot.job, slot.text
        assert job is not None and text is not None
        tail = text.finish()
        if tail:
            self._emit(job, TokenText(tail, max(slot.tokens_out - 1, 0)))
        end_at = self.clock()
        first = slot.first_token_at or end_at
        end = Finished(
            job_id=job.job_id, stop_reason=reason, tokens_out=slot.tokens_out, prompt_tokens=len(job.prompt_tokens),
            ttft_s=first - job.submitted_at if slot.first_token_at else None, decode_s=end_at - first,
            stop_sequence=text.matched, cached_tokens=slot.cached,
        )
        if reason is StopReason.CANCELLED:
            self._narrate(job, "inference_cancelled", f"Cancelled job {job.job_id} after {slot.tokens_out} tokens.",
                          tokens_out=slot.tokens_out, level="warning")
        else:
            self._narrate(job, "inference_complete",
                          f"Finished job {job.job_id}: {slot.tokens_out} tokens, stopped by {reason.value}.",
                          tokens_out=slot.tokens_out, stop_reason=reason.value,
                          duration_ms=round((end_at - job.submitted_at) * 1000, 2),
                          tokens_per_sec=round(end.tokens_per_sec, 2))
        self._emit(job, end)
        self.metrics.job_finished(reason.value)
        self._release(slot, keep=True)

    def fail(self, slot: Slot, code: str, message: str) -> None:
        if slot.pending is not None:
            self._text_of_pending(slot)
            if slot.job is None:
                return
        job = slot.job
        assert job is not None
        self._narrate(job, "inference_failed", f"Job {job.job_id} failed: {message}", level="error", code=code)
        self._emit(job, Failed(code, message))
        self.metrics.job_failed(code)
        self._release(slot)

    def fail_running(self, code: str, message: str) -> None:
        for slot in self.slots:
            if slot.job is not None:
                self.fail(slot, code, message)

    def _release(self, slot: Slot, keep: bool = False) -> None:
        """The slot is free. A job that ended well leaves its cells cached; a failed one's are freed."""
        assert slot.job is not None
        slot.job.done = True
        if keep:
            self._keep_sequence(slot.seq_id)
        else:
            self._drop_sequence(slot.seq_id)
        slot.job = slot.text = slot.pending = None
        slot.reserved = slot.cached = 0
        slot.idle_since = self.clock()
        self.n_running -= 1

    def _end_unstarted(self, job: Job, reason: StopReason) -> None:
        job.done = True
        self._narrate(job, "inference_cancelled", f"Job {job.job_id} ended ({reason.value}) before it got a slot.",
                      level="warning", stop_reason=reason.value)
        self._emit(job, Finished(job_id=job.job_id, stop_reason=reason, tokens_out=0,
                                 prompt_tokens=len(job.prompt_tokens), ttft_s=None, decode_s=0.0))
        self.metrics.job_finished(reason.value)

    # ---- outputs ---------------------------------------------------------------------------------------------

    def _narrate(self, job: Job, action: str, human: str, **fields: Any) -> None:
        event = narrate(action, human, actor="engine", target=job.job_id, job_id=job.job_id,
                        correlation_id=job.correlation_id, **fields)
        if job.narration:
            self._emit(job, Narrated(event))

    def _emit(self, job: Job, output: Output) -> None:
        self._out.setdefault(job, []).append(output)

    def take_outputs(self) -> dict[Job, list[Output]]:
        out, self._out = self._out, {}
        return out

    def kv_cells_used(self) -> int:
        """Cells in the pool that some sequence holds (running or cached)."""
        return self.cache.cells_used


MIN_SHARED_PREFILL = 64  # a shorter common prefix is not worth waiting for another job's prefill
RETIRE_SLACK = 16  # tokens at an entry's end that a follow-up may tokenize otherwise (the reply's last word)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    if n <= 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    differ = np.flatnonzero(x != y)
    return int(differ[0]) if differ.size else n
