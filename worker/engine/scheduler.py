"""One scheduler thread owns the llama.cpp context and decodes every running sequence together.

Requests wait in a bounded queue; between steps they join free slots (prompt prefill, chunked to the batch
size) and leave them (their KV cells are freed, whatever the reason). Each step is one llama_decode for all
running sequences, then one sample per sequence that produced logits. Events go back to the asyncio loop once
per step, in one call_soon_threadsafe.

On a GPU, llama_decode only queues the step, so a token's text work (detokenizing, stop strings, metrics, events)
is done while the GPU computes the next step: only the token id is needed to queue it.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import llama_cpp as lc
import numpy as np
from loguru import logger

from worker.engine.llama import Model, create_context, route_ggml_log
from worker.engine.sampling import SamplingParams, build_chain, free_chain
from worker.engine.text import TextStream
from worker.metrics import Metrics
from worker.narration import narrate

Event = dict[str, Any]

# A chain attached in the decode graph is sampled every step, whether its slot is busy or not; one idle this long
# is detached (the next job there attaches its own, at the cost of one graph re-reservation).
CHAIN_IDLE_S = 1.0


class SubmitError(Exception):
    code = "unavailable"
    status = 503


class Overloaded(SubmitError):
    code = "overloaded"


class Draining(SubmitError):
    code = "draining"


class DuplicateJob(SubmitError):
    code = "duplicate_job_id"
    status = 409


@dataclass(eq=False)
class Job:
    job_id: str
    prompt_tokens: list[int]
    params: SamplingParams
    max_tokens: int
    deliver: Callable[[list[Event]], None]  # runs on the event loop with this step's events, in order
    stop: tuple[str, ...] = ()
    narration: bool = False
    ignore_eos: bool = False  # benchmarks: generate exactly max_tokens
    correlation_id: str | None = None
    timeout: float | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    cancel_reason: str | None = None  # set from the loop; read by the scheduler between steps
    done: bool = False

    @property
    def deadline(self) -> float | None:
        return None if self.timeout is None else self.submitted_at + self.timeout


@dataclass(eq=False)
class Slot:
    seq_id: int
    job: Job | None = None
    chain: Any = None  # kept between jobs: attaching a new one costs llama.cpp a graph re-reservation
    chain_params: SamplingParams | None = None
    text: TextStream | None = None
    prompt_pos: int = 0  # prompt tokens already decoded
    n_past: int = 0
    last_token: int = -1
    pending: int | None = None  # sampled, its text not yet done (see _emit_pending)
    pending_at: float = 0.0
    tokens_out: int = 0
    admitted_at: float = 0.0
    idle_since: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0


class Batch:
    """A llama_batch over numpy arrays, so a prompt chunk is filled by slicing, not per-token ctypes calls."""

    def __init__(self, capacity: int) -> None:
        self.tokens = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        base = self.seq.ctypes.data
        self._seq_ptrs = (ctypes.POINTER(lc.llama_seq_id) * capacity)(
            *(ctypes.cast(base + 4 * i, ctypes.POINTER(lc.llama_seq_id)) for i in range(capacity))
        )
        self.struct = lc.llama_batch()
        self.struct.token = self.tokens.ctypes.data_as(ctypes.POINTER(lc.llama_token))
        self.struct.embd = None
        self.struct.pos = self.pos.ctypes.data_as(ctypes.POINTER(lc.llama_pos))
        self.struct.n_seq_id = self.n_seq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self.struct.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(ctypes.POINTER(lc.llama_seq_id)))
        self.struct.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.n = 0

    def add(self, tokens: list[int], start_pos: int, seq_id: int, last_logits: bool) -> int:
        """Append tokens of one sequence; return the batch index of the last one."""
        k, n = len(tokens), self.n
        self.tokens[n : n + k] = tokens
        self.pos[n : n + k] = np.arange(start_pos, start_pos + k, dtype=np.int32)
        self.seq[n : n + k] = seq_id
        self.logits[n : n + k] = 0
        self.logits[n + k - 1] = 1 if last_logits else 0
        self.n = n + k
        return n + k - 1

    def decode(self, ctx: Any) -> int:
        self.struct.n_tokens = self.n
        rc = lc.llama_decode(ctx, self.struct)
        self.n = 0
        return rc


class Engine:
    def __init__(
        self,
        model: Model,
        *,
        ctx_size: int,
        parallel: int,
        max_queue: int,
        batch_size: int,
        threads: int,
        threads_batch: int | None = None,
        flash_attn: str = "auto",
        backend_sampling: bool = False,
        overlap: bool | None = None,
        metrics: Metrics | None = None,
        profile_path: str | None = None,
    ) -> None:
        self.model = model
        self.metrics = metrics or Metrics()
        self.ctx_size = ctx_size
        self.n_slots = parallel
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.backend_sampling = backend_sampling
        # Text work overlaps the next step where llama_decode is asynchronous (the GPU). On the CPU it would
        # only delay each token by one step.
        self.overlap = model.offloaded if overlap is None else overlap
        self.ctx = create_context(
            model, n_ctx=ctx_size * parallel, n_seq=parallel, n_batch=batch_size, threads=threads,
            threads_batch=threads_batch, flash_attn=flash_attn, n_outputs=parallel,
        )
        self.mem = lc.llama_get_memory(self.ctx)
        self.slots = [Slot(seq_id=i) for i in range(parallel)]
        self._batch = Batch(batch_size)
        self._waiting: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}
        self._cond = threading.Condition()
        self._busy = 0
        self._stopping = False
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._out: dict[Job, list[Event]] = {}
        self._last_rc = 0
        self._next_idle_check = 0.0
        self._chains_changed = False  # a chain attached or detached since the last step: llama.cpp re-reserves
        self._ggml_quiet = False
        # Where a step's time goes: queueing it (llama_decode), waiting for its tokens, and the Python around them.
        self.stats = {"steps": 0, "step_s": 0.0, "queue_s": 0.0, "wait_s": 0.0}
        self.profile_path = profile_path

    # ---- loop side -------------------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._warm_up()
        self._thread = threading.Thread(target=self._run, name="llama-scheduler", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._draining or self._stopping:
                raise Draining("the worker is shutting down")
            if job.job_id in self._jobs:
                raise DuplicateJob(f"job {job.job_id!r} is already running or waiting")
            free = self.n_slots - self._busy
            if len(self._waiting) - free >= self.max_queue:
                raise Overloaded(f"{len(self._waiting)} requests are waiting; the queue holds {self.max_queue}")
            self._jobs[job.job_id] = job
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job_id: str, reason: str = "cancelled") -> bool:
        """Ask a running or waiting job to end; its stream ends with stop_reason `reason`."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.done:
                return False
            if job.cancel_reason is None:
                job.cancel_reason = reason
            self._cond.notify()
            return True

    def cancel_all(self, reason: str = "cancelled") -> None:
        with self._cond:
            for job in self._jobs.values():
                job.cancel_reason = job.cancel_reason or reason
            self._cond.notify()

    def drain(self) -> None:
        with self._cond:
            self._draining = True

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        return not self._jobs

    def kv_usage(self) -> float:
        """Share of the KV cache cells that running sequences hold."""
        used = sum(slot.n_past for slot in self.slots if slot.job is not None)
        return used / (self.ctx_size * self.n_slots)

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        for slot in self.slots:
            if slot.chain is not None:
                lc.llama_set_sampler(self.ctx, slot.seq_id, None)
                free_chain(slot.chain)
                slot.chain = slot.chain_params = None
        if self.ctx:
            lc.llama_free(self.ctx)
            self.ctx = None

    def _dispatch(self, out: dict[Job, list[Event]]) -> None:
        for job, events in out.items():
            job.deliver(events)
            if job.done:
                with self._cond:
                    if self._jobs.get(job.job_id) is job:
                        del self._jobs[job.job_id]

    # ---- scheduler thread ------------------------------------------------------------------------------------

    def _warm_up(self) -> None:
        # One decode at load pays the one-time costs (graph allocation, kernels, weights paging in).
        bos = lc.llama_vocab_bos(self.model.vocab)
        self._batch.n = 0
        self._batch.add([max(bos, 0)], 0, 0, True)
        rc = self._batch.decode(self.ctx)
        lc.llama_memory_clear(self.mem, True)
        if rc != 0:
            logger.warning(f"warm-up decode returned {rc}")

    def _run(self) -> None:
        if self.profile_path is None:
            return self._loop_steps()
        import cProfile  # performance work only: --profile-dir

        prof = cProfile.Profile()
        try:
            prof.enable()
        except ValueError:  # Python 3.12+: one profiler per process, already on in the main thread, sees all
            return self._loop_steps()
        try:
            self._loop_steps()
        finally:
            prof.disable()
            prof.dump_stats(self.profile_path)

    def _loop_steps(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and self._busy == 0:
                    self._cond.wait()
                if self._stopping:
                    break
                self._expire_waiting()
                self._admit()
            if self.backend_sampling:
                self._detach_idle_chains()
            started = time.perf_counter()
            try:
                self._step()
            except Exception as exc:  # a bug must end the affected streams, never hang them
                logger.exception("scheduler step failed")
                for slot in self.slots:
                    if slot.job is not None:
                        self._fail(slot, "internal_error", f"{type(exc).__name__}: {exc}")
            self._flush()
            self.stats["steps"] += 1
            self.stats["step_s"] += time.perf_counter() - started
        self._flush()

    def _expire_waiting(self) -> None:
        now = time.perf_counter()
        for job in [j for j in self._waiting if j.cancel_reason or (j.deadline and now >= j.deadline)]:
            self._waiting.remove(job)
            reason = job.cancel_reason or "timeout"
            self._end_unstarted(job, reason)

    def _detach_idle_chains(self) -> None:
        now = time.perf_counter()
        if now < self._next_idle_check:
            return
        self._next_idle_check = now + CHAIN_IDLE_S / 4
        for slot in self.slots:
            if slot.job is None and slot.chain is not None and now - slot.idle_since > CHAIN_IDLE_S:
                lc.llama_set_sampler(self.ctx, slot.seq_id, None)
                free_chain(slot.chain)
                slot.chain = slot.chain_params = None
                self._chains_changed = True

    def _admit(self) -> None:
        if not self._waiting:
            return
        free = [slot for slot in self.slots if slot.job is None]
        while self._waiting and free:
            job = self._waiting.popleft()
            # A free slot whose chain has this job's parameters needs no new chain; else one whose stale chain
            # can be swapped, so that no more chains are attached than needed.
            slot = min(free, key=lambda s: (s.chain_params != job.params, s.chain is None))
            free.remove(slot)
            try:
                self._start(slot, job)
            except Exception as exc:  # e.g. a sampler chain llama.cpp refused: end this job, keep serving
                logger.exception(f"could not start job {job.job_id}")
                if slot.job is job:
                    self._fail(slot, "internal_error", f"{type(exc).__name__}: {exc}")
                else:
                    self._end_unstarted(job, "cancelled")

    def _start(self, slot: Slot, job: Job) -> None:
        self._busy += 1
        slot.job = job
        if slot.chain is not None and slot.chain_params == job.params:
            # Same parameters as this slot's last job: a reset makes the chain new (penalty history cleared,
            # the seed drawn again) and, attached in the decode graph, it needs no re-reservation (~30 ms on a GPU).
            lc.llama_sampler_reset(slot.chain)
        else:
            if slot.chain is not None:
                if self.backend_sampling:
                    lc.llama_set_sampler(self.ctx, slot.seq_id, None)
                free_chain(slot.chain)
            slot.chain, slot.chain_params = build_chain(job.params, self.model.n_vocab), job.params
            if self.backend_sampling:
                lc.llama_set_sampler(self.ctx, slot.seq_id, slot.chain)
                self._chains_changed = True
        slot.text = TextStream(job.stop)
        slot.prompt_pos = slot.n_past = slot.tokens_out = 0
        slot.admitted_at = time.perf_counter()
        slot.first_token_at = 0.0
        self.metrics.queue_wait.observe(slot.admitted_at - job.submitted_at)
        self.metrics.prompt_tokens.inc(len(job.prompt_tokens))
        self._emit(job, {
            "type": "started",
            "job_id": job.job_id,
            "model": self.model.info.ref,
            "prompt_tokens": len(job.prompt_tokens),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        })
        self._narrate(job, "inference_start", f"Started job {job.job_id}: {len(job.prompt_tokens)} prompt tokens.",
                      prompt_tokens=len(job.prompt_tokens), slot=slot.seq_id,
                      queue_wait_ms=round((slot.admitted_at - job.submitted_at) * 1000, 2))

    def _step(self) -> None:
        now = time.perf_counter()
        for slot in self.slots:
            job = slot.job
            if job is not None and (job.cancel_reason or (job.deadline and now >= job.deadline)):
                self._finish(slot, job.cancel_reason or "timeout")

        # A steady step (a token a sequence, no chain attached or detached since the last) is quick to queue, and
        # on a GPU the text of last step's tokens is done while it runs. Before any other step, llama_decode itself
        # is long (a prompt, or llama.cpp re-reserving after a chain change): that text goes out first.
        steady = not self._chains_changed and all(s.job is None or s.prompt_pos == len(s.job.prompt_tokens)
                                                  for s in self.slots)
        if not (self.overlap and steady):
            self._emit_all_pending()

        # This step's work: (slot, tokens, first position, wants logits) — one token per decoding sequence,
        # then prompt chunks as far as the batch allows.
        parts: list[tuple[Slot, list[int], int, bool]] = []
        budget = self.batch_size
        for slot in self.slots:
            if slot.job is not None and slot.prompt_pos == len(slot.job.prompt_tokens):
                parts.append((slot, [slot.last_token], slot.n_past, True))
                slot.n_past += 1
                budget -= 1
        for slot in self.slots:
            job = slot.job
            if job is None or slot.prompt_pos == len(job.prompt_tokens) or budget <= 0:
                continue
            chunk = job.prompt_tokens[slot.prompt_pos : slot.prompt_pos + budget]
            slot.prompt_pos += len(chunk)
            parts.append((slot, chunk, slot.n_past, slot.prompt_pos == len(job.prompt_tokens)))
            slot.n_past += len(chunk)
            budget -= len(chunk)
        if not parts:
            return
        if not self._decode(parts, steady):
            # Find the culprit: a failed llama_decode leaves the KV cache as it was, so each sequence is
            # decoded on its own and only those that still fail end with an error.
            for part in parts:
                if part[0].job is None:  # ended by a stop sequence while the failed step was queued
                    continue
                if not self._decode([part]):
                    self._fail(part[0], "decode_failed", f"llama_decode failed with status {self._last_rc}")

    def _decode(self, parts: list[tuple[Slot, list[int], int, bool]], steady: bool = False) -> bool:
        """One llama_decode for these parts, then one sample per part that asked for logits."""
        batch = self._batch
        batch.n = 0
        outputs = []  # (slot, batch index) for each part that wants a token
        for slot, tokens, pos, logits in parts:
            idx = batch.add(tokens, pos, slot.seq_id, logits)
            if logits:
                outputs.append((slot, idx))
        # ggml's log: dropped in steady GPU steps, which allocate nothing; kept for the others, where its errors
        # say why a step failed. See route_ggml_log.
        quiet = steady and self.model.offloaded
        if quiet != self._ggml_quiet:
            route_ggml_log(to_python=not quiet)
            self._ggml_quiet = quiet
        self._chains_changed = False
        t0 = time.perf_counter()
        self._last_rc = batch.decode(self.ctx)
        t1 = time.perf_counter()
        self._emit_all_pending()  # while the GPU computes, in a steady step (else done before it)
        if self._last_rc != 0:
            return False
        t2 = time.perf_counter()
        # The first read of a sampled token waits for the step. A job that ended meanwhile (a stop sequence
        # in the text just done) has its token dropped.
        tokens = [(slot, lc.llama_sampler_sample(slot.chain, self.ctx, idx)) for slot, idx in outputs
                  if slot.job is not None]
        now = time.perf_counter()
        self.stats["queue_s"] += t1 - t0
        self.stats["wait_s"] += now - t2
        for slot, token in tokens:
            self._on_token(slot, token, now)
        return True

    def _on_token(self, slot: Slot, token: int, now: float) -> None:
        """What the next step depends on: whether the sequence goes on, and with which token."""
        job = slot.job
        assert job is not None
        if slot.tokens_out == 0 and not slot.first_token_at:
            slot.first_token_at = now
        if self.model.is_eog(token) and not job.ignore_eos:
            self._finish(slot, "eos")
            return
        slot.tokens_out += 1
        slot.last_token = token
        slot.pending, slot.pending_at = token, now
        if slot.tokens_out >= job.max_tokens:
            self._finish(slot, "max_tokens")

    def _emit_all_pending(self) -> None:
        for slot in self.slots:
            if slot.pending is not None:
                self._emit_pending(slot)
        self._flush()

    def _emit_pending(self, slot: Slot) -> None:
        """The sampled token's text, metrics and event; a completed stop sequence ends the job."""
        job, token, at = slot.job, slot.pending, slot.pending_at
        assert job is not None and token is not None and slot.text is not None
        slot.pending = None
        if slot.tokens_out == 1:
            self.metrics.ttft.observe(at - job.submitted_at)
        else:
            self.metrics.itl.observe(at - slot.last_token_at)
        slot.last_token_at = at
        self.metrics.generated_tokens.inc()
        text = slot.text.feed(self.model.piece(token))
        if text:
            self._emit(job, {"type": "token", "t": text, "i": slot.tokens_out - 1})
        if slot.text.matched is not None:
            self._finish(slot, "stop_sequence")

    def _finish(self, slot: Slot, reason: str) -> None:
        if slot.pending is not None:
            self._emit_pending(slot)  # its text comes before the end, and it may complete a stop sequence
            if slot.job is None:
                return
        job = slot.job
        assert job is not None and slot.text is not None
        tail = slot.text.finish()
        if tail:
            self._emit(job, {"type": "token", "t": tail, "i": max(slot.tokens_out - 1, 0)})
        end_at = time.perf_counter()
        first = slot.first_token_at or end_at
        decode_s = end_at - first
        end: Event = {
            "type": "end",
            "job_id": job.job_id,
            "tokens_out": slot.tokens_out,
            "prompt_tokens": len(job.prompt_tokens),
            "ttft_ms": round((first - job.submitted_at) * 1000, 3) if slot.first_token_at else None,
            "decode_time_ms": round(decode_s * 1000, 3),
            "tokens_per_sec": round((slot.tokens_out - 1) / decode_s, 2) if slot.tokens_out > 1 else 0.0,
            "stop_reason": reason,
        }
        if slot.text.matched is not None:
            end["stop_sequence_matched"] = slot.text.matched
        if reason == "cancelled":
            self._narrate(job, "inference_cancelled", f"Cancelled job {job.job_id} after {slot.tokens_out} tokens.",
                          tokens_out=slot.tokens_out, level="warning")
        else:
            self._narrate(job, "inference_complete",
                          f"Finished job {job.job_id}: {slot.tokens_out} tokens, stopped by {reason}.",
                          tokens_out=slot.tokens_out, stop_reason=reason,
                          duration_ms=round((end_at - job.submitted_at) * 1000, 2),
                          tokens_per_sec=end["tokens_per_sec"])
        self._emit(job, end)
        self.metrics.finished.labels(stop_reason=reason).inc()
        self._release(slot)

    def _fail(self, slot: Slot, code: str, message: str) -> None:
        if slot.pending is not None:
            self._emit_pending(slot)
            if slot.job is None:
                return
        job = slot.job
        assert job is not None
        self._narrate(job, "inference_failed", f"Job {job.job_id} failed: {message}", level="error", code=code)
        self._emit(job, {"type": "error", "code": code, "message": message})
        self.metrics.errors.labels(code=code).inc()
        self._release(slot)

    def _release(self, slot: Slot) -> None:
        job = slot.job
        assert job is not None
        job.done = True
        lc.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        slot.job = slot.text = slot.pending = None
        slot.idle_since = time.perf_counter()
        with self._cond:
            self._busy -= 1

    def _end_unstarted(self, job: Job, reason: str) -> None:
        job.done = True
        self._emit(job, {
            "type": "end", "job_id": job.job_id, "tokens_out": 0, "prompt_tokens": len(job.prompt_tokens),
            "ttft_ms": None, "decode_time_ms": 0.0, "tokens_per_sec": 0.0, "stop_reason": reason,
        })
        self.metrics.finished.labels(stop_reason=reason).inc()
        self._narrate(job, "inference_cancelled", f"Job {job.job_id} ended ({reason}) before it got a slot.",
                      level="warning", stop_reason=reason)

    def _narrate(self, job: Job, action: str, human: str, **fields: Any) -> None:
        event = narrate(action, human, actor="engine", target=job.job_id, job_id=job.job_id,
                        correlation_id=job.correlation_id, **fields)
        if job.narration:
            self._emit(job, {**event, "type": "narration"})

    def _emit(self, job: Job, event: Event) -> None:
        self._out.setdefault(job, []).append(event)

    def _flush(self) -> None:
        if self._out and self._loop is not None:
            out, self._out = self._out, {}
            try:
                self._loop.call_soon_threadsafe(self._dispatch, out)
            except RuntimeError:  # the loop is closed: nobody is left to read these events
                pass
