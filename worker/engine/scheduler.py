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

from worker.engine.outputs import Failed, Finished, Job, Narrated, Output, Started, StopReason, TokenText
from worker.engine.sampling import SamplingParams
from worker.engine.text import TextStream
from worker.narration import narrate


class SlotResources(Protocol):
    """What the scheduler asks of the llama.cpp context, per sequence."""

    def use_chain(self, seq_id: int, params: SamplingParams, *, reuse: bool) -> None: ...
    def drop_chain(self, seq_id: int) -> None: ...
    def forget(self, seq_id: int) -> None: ...


class Vocab(Protocol):
    def piece(self, token: int) -> bytes: ...
    def is_eog(self, token: int) -> bool: ...


class SchedulerMetrics(Protocol):
    def job_admitted(self, queue_wait_s: float, prompt_tokens: int) -> None: ...
    def token_generated(self, ttft_s: float | None, itl_s: float | None) -> None: ...
    def job_finished(self, stop_reason: str) -> None: ...
    def job_failed(self, code: str) -> None: ...


class NoMetrics:
    def job_admitted(self, queue_wait_s: float, prompt_tokens: int) -> None: ...
    def token_generated(self, ttft_s: float | None, itl_s: float | None) -> None: ...
    def job_finished(self, stop_reason: str) -> None: ...
    def job_failed(self, code: str) -> None: ...


@dataclass(eq=False)
class Slot:
    seq_id: int
    job: Job | None = None
    chain_params: SamplingParams | None = None  # the chain this sequence has (kept between jobs), if any
    text: TextStream | None = None
    prompt_pos: int = 0  # prompt tokens already decoded
    n_past: int = 0  # KV cells this sequence holds
    last_token: int = -1
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
        metrics: SchedulerMetrics | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.slots = [Slot(seq_id=i) for i in range(n_slots)]
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
        while self.waiting and free:
            job = self.waiting.popleft()
            # A free slot whose chain has this job's parameters needs no new chain; else one whose stale chain
            # can be swapped, so that no more chains are attached than needed.
            slot = min(free, key=lambda s: (s.chain_params != job.params, s.chain_params is None))
            free.remove(slot)
            try:
                self._start(slot, job)
            except Exception as exc:  # e.g. a sampler chain llama.cpp refused: end this job, keep serving
                if slot.job is job:
                    self.fail(slot, "internal_error", f"could not start the job: {type(exc).__name__}: {exc}")
                else:
                    self._end_unstarted(job, StopReason.CANCELLED)

    def _start(self, slot: Slot, job: Job) -> None:
        self.n_running += 1
        slot.job = job
        slot.text = TextStream(job.stop)
        reuse = slot.chain_params == job.params
        slot.chain_params = None  # until the context has the chain
        if not reuse and self.in_graph_sampling:
            self._chains_changed = True
        self.resources.use_chain(slot.seq_id, job.params, reuse=reuse)
        slot.chain_params = job.params
        slot.prompt_pos = slot.n_past = slot.tokens_out = 0
        slot.admitted_at = self.clock()
        slot.first_token_at = 0.0
        queue_wait = slot.admitted_at - job.submitted_at
        self.metrics.job_admitted(queue_wait, len(job.prompt_tokens))
        self._emit(job, Started(job.job_id, len(job.prompt_tokens), datetime.now(timezone.utc)))
        self._narrate(job, "inference_start", f"Started job {job.job_id}: {len(job.prompt_tokens)} prompt tokens.",
                      prompt_tokens=len(job.prompt_tokens), slot=slot.seq_id, queue_wait_ms=round(queue_wait * 1000, 2))

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
            stop_sequence=text.matched,
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
        self._release(slot)

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

    def _release(self, slot: Slot) -> None:
        assert slot.job is not None
        slot.job.done = True
        self.resources.forget(slot.seq_id)
        slot.job = slot.text = slot.pending = None
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
        return sum(slot.n_past for slot in self.slots if slot.job is not None)
