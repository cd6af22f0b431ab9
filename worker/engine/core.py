"""The engine core: one thread owns the llama.cpp context and runs the scheduler's steps.

Requests wait in a bounded queue; between steps they join free slots (prompt prefill, chunked to the batch size)
and leave them (their KV cells are freed, whatever the reason). Each step is one llama_decode for all running
sequences, then one sample per sequence that produced logits. Outputs go back to the asyncio loop once per step,
in one call_soon_threadsafe.

On a GPU, llama_decode only queues the step, so a token's text work (detokenizing, stop strings, metrics, outputs)
is done while the GPU computes the next step: only the token id is needed to queue it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from loguru import logger

from worker.engine.constraints import Grammars, Guide
from worker.engine.cpu_sampling import CpuSampler
from worker.engine.host_cache import HostCache
from worker.engine.logprobs import LogprobOf, Ranked
from worker.engine.outputs import (
    Constraint,
    ConstraintError,
    Draining,
    DuplicateJob,
    Job,
    Output,
    Overloaded,
    StopReason,
    SubmitError,
    is_choice_of,
)
from worker.engine.scheduler import (
    Part,
    Sampled,
    Scheduler,
    SchedulerMetrics,
    Slot,
    SlotResources,
    StepPlan,
    Vocab,
)
from worker.engine.speculative import Proposer, SpecConfig


class EngineContext(SlotResources, Protocol):
    """The llama.cpp context as the core uses it (worker.llamacpp.Context; a fake in unit tests)."""

    def decode(self, parts: Sequence[Part]) -> int: ...
    def sample(self, seq_id: int, index: int) -> int: ...
    def logits(self, index: int) -> np.ndarray: ...
    def logits_rows(self, index: int, count: int) -> np.ndarray: ...
    def sample_candidates(self, seq_id: int, ids: np.ndarray, values: np.ndarray) -> int: ...
    def synchronize(self) -> None: ...  # until the queued step is done

    @property
    def n_outputs(self) -> int: ...  # logits rows one batch may ask for
    def quiet_log(self, quiet: bool) -> None: ...
    def close(self) -> None: ...


# The share of a job's draws its guide refused (a moving average) above which its draw again is prepared while each
# step computes (Scheduler.reads_row). Where the guide refuses most draws (SmolLM2 at temperature 2 in a JSON schema:
# 76%), listing the allowed tokens after the step would hold it up longer than a prepared draw; where it rarely
# does, preparing is wasted.
REDRAW_PREPARED = 0.2


@dataclass
class StepStats:
    """Where a step's time goes: queueing it (llama_decode), the engine's own work while it computes (the CPU
    draws' noise and masks, the text), waiting for it to be done, reading its results and sampling on the CPU, and
    the Python around them."""

    steps: int = 0
    step_s: float = 0.0
    queue_s: float = 0.0
    overlap_s: float = 0.0
    wait_s: float = 0.0
    sample_s: float = 0.0


class EngineCore:
    def __init__(
        self,
        ctx: EngineContext,
        vocab: Vocab,
        *,
        ctx_size: int,
        parallel: int,
        max_queue: int,
        batch_size: int,
        in_graph_sampling: bool = False,
        offloaded: bool = False,
        overlap: bool | None = None,
        chain_idle_s: float = 1.0,
        prefix_cache: bool = True,
        metrics: SchedulerMetrics | None = None,
        profile_path: str | None = None,
        grammars: Grammars | None = None,
        speculation: SpecConfig | None = None,
        proposer: Proposer | None = None,
        host_cache: HostCache | None = None,
        split_prompt_steps: bool = False,
    ) -> None:
        self.ctx = ctx
        self.vocab = vocab
        self.grammars = grammars
        self.ctx_size = ctx_size
        self.n_slots = parallel
        self.max_queue = max_queue
        self.offloaded = offloaded
        # Text work overlaps the next step where llama_decode is asynchronous (the GPU). On the CPU it would
        # only delay each token by one step.
        self.overlap = offloaded if overlap is None else overlap
        self.kv_cells_total = ctx_size * parallel  # every slot's own ctx_size cells
        self.scheduler = Scheduler(n_slots=parallel, batch_size=batch_size, resources=ctx, vocab=vocab,
                                   in_graph_sampling=in_graph_sampling, chain_idle_s=chain_idle_s,
                                   prefix_cache=prefix_cache, exact_prefixes=not offloaded, metrics=metrics,
                                   guides=grammars.guide if grammars is not None else None,
                                   prompt_logits_per_step=ctx.n_outputs - parallel, speculation=speculation,
                                   proposer=proposer, host_cache=host_cache,
                                   split_prompt_steps=split_prompt_steps)
        self.stats = StepStats()
        self.profile_path = profile_path
        self._inbox: list[Job] = []
        self._last_shape: tuple[int, ...] = ()  # the tokens of each part of the last decode step
        self._jobs: dict[str, Job] = {}  # submitted and not yet delivered their end
        self._cond = threading.Condition()
        self._stopping = False
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- loop side -------------------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="llama-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._draining or self._stopping:
                raise Draining("the worker is shutting down")
            if job.job_id in self._jobs:
                raise DuplicateJob(f"job {job.job_id!r} is already running or waiting")
            if job.prompt_logprobs is not None and self.scheduler.prompt_logits_per_step < 1:
                raise SubmitError("this engine's context keeps no logits rows for a prompt's logprobs")
            if job.constraint is not None and self.grammars is None:
                raise ConstraintError("this engine does not constrain output")
            waiting = self.queued()
            if waiting >= self.max_queue:
                raise Overloaded(f"{waiting} requests are waiting; the queue holds {self.max_queue}")
            self._jobs[job.job_id] = job
            self._inbox.append(job)
            self._idle.clear()
            self._cond.notify()

    def cancel(self, job_id: str, reason: StopReason = StopReason.CANCELLED) -> bool:
        """Ask a running or waiting job to end, or every job of a request of several choices given the request's id
        (choice_job_id); their streams end with stop_reason `reason`. False: none was running or waiting."""
        with self._cond:
            job = self._jobs.get(job_id)
            jobs = [job] if job is not None else [j for i, j in self._jobs.items() if is_choice_of(i, job_id)]
            jobs = [j for j in jobs if not j.done]
            for job in jobs:
                if job.cancel_reason is None:
                    job.cancel_reason = reason
            if jobs:
                self._cond.notify()
            return bool(jobs)

    def cancel_all(self, reason: StopReason = StopReason.CANCELLED) -> None:
        with self._cond:
            for job in self._jobs.values():
                job.cancel_reason = job.cancel_reason or reason
            self._cond.notify()

    def check_constraint(self, constraint: Constraint) -> None:
        """Raises ConstraintError unless the constraint can be enforced (compiling it may take a while: call it off
        the event loop, before submitting the job)."""
        if self.grammars is None:
            raise ConstraintError("this engine does not constrain output")
        self.grammars.check(constraint)

    def drain(self) -> None:
        """New jobs are refused from now on; running and waiting ones go on."""
        with self._cond:
            self._draining = True

    async def wait_idle(self) -> None:
        """Until every job submitted has delivered its end."""
        await self._idle.wait()

    def queued(self) -> int:
        """Jobs beyond the slots: submitted and not yet ended as the event loop has seen them. Counted on the loop's
        thread alone, so the queue's bound is exact whatever the engine thread is doing."""
        return len(self._jobs) - self.n_slots

    @property
    def busy(self) -> int:
        return self.scheduler.n_running

    @property
    def waiting(self) -> int:
        return len(self._inbox) + len(self.scheduler.waiting)

    @property
    def idle(self) -> bool:
        return not self._jobs

    def kv_usage(self) -> float:
        """Share of the KV cells that running sequences hold (cells idle slots keep for reuse not counted)."""
        return self.scheduler.kv_cells_running() / self.kv_cells_total

    def kv_cells(self) -> tuple[int, int]:
        """(cells some slot holds, of which idle slots keep for reuse). Read from any thread: lengths only."""
        return self.scheduler.kv_cells_used(), self.scheduler.cells_cached()

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        self.ctx.close()

    def _dispatch(self, out: dict[Job, list[Output]]) -> None:
        for job, outputs in out.items():
            job.deliver(outputs)
            if job.done:
                with self._cond:
                    if self._jobs.get(job.job_id) is job:
                        del self._jobs[job.job_id]
                    if not self._jobs:
                        self._idle.set()

    # ---- engine thread ---------------------------------------------------------------------------------------

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
                while not self._stopping and not self._inbox and not self.scheduler.waiting and self.busy == 0:
                    self._cond.wait()
                if self._stopping:
                    break
            started = time.perf_counter()
            try:
                self.step()
            except Exception as exc:  # a bug must end the affected streams, never hang them
                logger.exception("engine step failed")
                self.scheduler.fail_running("internal_error", f"{type(exc).__name__}: {exc}")
            self._publish()
            self.stats.steps += 1
            self.stats.step_s += time.perf_counter() - started
        self._publish()

    def step(self) -> None:
        """Plan, decode, the previous step's text while the GPU runs, sample, update."""
        with self._cond:  # admissions and the queue's size change together, as submit sees them
            for job in self._inbox:
                self.scheduler.add(job)
            self._inbox.clear()
        # Planning runs without the lock: submit() on the event loop must never wait for it.
        began = time.perf_counter()
        plan = self.scheduler.schedule(began, overlap=self.overlap)
        self._publish()  # ends, starts, and the text done before a long llama_decode
        if not plan.parts:
            return
        # ggml's log: dropped in steady GPU steps, which allocate nothing; kept for the others, where its errors
        # say why a step failed (see route_ggml_log).
        self.ctx.quiet_log(plan.steady and self.offloaded)
        t0 = time.perf_counter()
        status = self.ctx.decode(plan.parts)
        t1 = time.perf_counter()
        if status != 0:
            self._flush_text()
            return self._isolate_failure(plan, status)
        self.scheduler.decoded(zip(plan.slots, plan.parts, strict=True))  # its cells are taken now
        for slot, part in zip(plan.slots, plan.parts, strict=True):  # what the step's CPU draws need, meanwhile:
            if not part.logits or part.n_draft:
                continue
            sampler, guide = slot.sampler, slot.guide
            if slot.reads_row and not slot.chain_on_cpu:  # drawn in the graph: the mask, to check the token with
                if sampler is not None and guide is not None and slot.refused > REDRAW_PREPARED:
                    sampler.prepare(self.vocab.n_vocab, guide.mask_bits())  # and the draw again, prepared
                elif guide is not None:
                    guide.prepare()
                continue
            # the draw's noise, the mask folded in: for a job that reads its logits every step (0.3-0.5 ms of noise
            # a draw on an H200's host; a burst of new jobs drawing their first tokens here would outlast the step)
            if sampler is not None and sampler.preparable and slot.job is not None and slot.job.reads_logits:
                sampler.prepare(self.vocab.n_vocab, guide.mask_bits() if guide is not None else None)
            elif guide is not None:  # the mask; its ids listed where the draw is among them alone
                guide.prepare(listed=sampler is None or not sampler.params.greedy)
        self._flush_text()  # in a steady GPU step, while it computes
        t2 = time.perf_counter()
        self.ctx.synchronize()
        t3 = time.perf_counter()
        self._read_prompt_logprobs(plan)
        # A job sampled on the CPU holds the step up by its logprobs, mask and chain (0.3-2 ms on a 128k
        # vocabulary, measured on an H200). Letting it sit out every other step and sampling it while the next one
        # computes was tried and measured worse for it and no better for its neighbours: the engine thread's own
        # work already fills the time a step computes (docs/BENCHMARKS.md).
        sampled: list[Sampled] = []
        for slot, part, index in plan.sample_at():
            if slot.job is None:  # failed by its constraint earlier in this loop
                continue
            if part.n_draft:
                sampled += self._verify(slot, part, index)
            else:
                sampled.append(self._sample(slot, index))
        now = time.perf_counter()  # the first read of a sampled token waited for the step
        self.stats.queue_s += t1 - t0
        self.stats.overlap_s += t2 - t1
        self.stats.wait_s += t3 - t2
        self.stats.sample_s += now - t3
        self.scheduler.update(sampled, now)
        if self.scheduler.flush_first_text():
            self._publish()
        if self.scheduler.speculation is not None and plan.prefill:
            self._last_shape = ()  # the decode step after it is built afresh, whatever its shape
        elif self.scheduler.speculation is not None:  # decode steps: what speculation changes
            fixed_length = self.scheduler.speculation.fixed_length
            # Stretches (fixed length, a GPU) are judged by the step's whole time, planning and proposing included:
            # what a client sees. (Summing parts missed some: a self-draft judged to pay ran at 0.51x, H200.) The
            # CPU's gate weighs the decode and the proposing apart (StepCosts.worth).
            seconds = time.perf_counter() - (began if fixed_length else t0)
            shape = tuple(len(p.tokens) for p in plan.parts)
            # A step of a new shape is built afresh and runs without CUDA graphs: its time says nothing of the next
            # (on the CPU a new shape costs little against a step, and proposals change length: every step counts)
            if shape == self._last_shape or not fixed_length:
                self.scheduler.step_costs.record(seconds, sum(p.n_draft for p in plan.parts))
            self._last_shape = shape
            if fixed_length:
                self.scheduler.speculated(plan, seconds)

    def _isolate_failure(self, plan: StepPlan, status: int) -> None:
        """Each sequence of a failed step is decoded on its own, and only those that still fail end with an error.
        llama.cpp takes back only the ubatch that failed: cells the step's earlier ubatches wrote are cut first."""
        self.ctx.quiet_log(False)
        for slot, part in zip(plan.slots, plan.parts, strict=True):
            self.ctx.keep_prefix(part.seq_id, part.pos)
            if slot.job is None:  # ended by a stop sequence while the failed step was queued
                continue
            status = self.ctx.decode([part])
            if status != 0:
                self.scheduler.fail(slot, "decode_failed", f"llama_decode failed with status {status}")
                continue
            self.scheduler.decoded([(slot, part)])
            self._read_prompt_logprobs(StepPlan([part], [slot]))
            if part.logits and slot.job is not None:
                index = len(part.tokens) - 1
                got = self._verify(slot, part, index) if part.n_draft else [self._sample(slot, index)]
                self.scheduler.update(got, time.perf_counter())

    def _verify(self, slot: Slot, part: Part, index: int) -> list[Sampled]:
        """The target's own token at each proposed position, up to the first that differs from the proposal (or
        ends the text); the proposals before it are accepted, the cells of the rest freed."""
        first = index - part.n_draft  # the batch index of the part's first token
        draft = part.tokens[1:]
        sampler = slot.sampler
        greedy = None
        if sampler is not None and sampler.params.greedy:  # every position's choice in one pass over the rows
            greedy = self.ctx.logits_rows(first, part.n_draft + 1).argmax(axis=1)
        tokens: list[int] = []
        for i in range(part.n_draft + 1):
            token = int(greedy[i]) if greedy is not None else self._pick(slot, first + i)
            tokens.append(token)
            if i == part.n_draft or token != draft[i] or self.vocab.is_eog(token):
                break
        self.scheduler.accept_draft(slot, part, len(tokens) - 1)
        return [(slot, token, None) for token in tokens]

    def _pick(self, slot: Slot, index: int) -> int:
        """A speculating job's token at one position: from the logits by numpy where its sampling allows (greedy is
        their first maximum, as llama.cpp's greedy sampler takes), else by its llama.cpp chain."""
        if slot.sampler is not None:
            return slot.sampler.sample(self.ctx.logits(index))
        return self.ctx.sample(slot.seq_id, index)

    def _sample(self, slot: Slot, index: int) -> Sampled:
        job = slot.job
        assert job is not None
        if slot.reads_row and not slot.chain_on_cpu:
            return self._drawn_in_graph(slot, index)
        if not job.reads_logits:  # numpy's where it samples the job (speculation, a chain not yet attached)
            return slot, self._pick(slot, index), None
        # A job that reads its logits: logprobs taken from the model's own values, then the tokens the constraint
        # allows, then the job's sampler draws from those. The logits are read, never written: llama.cpp's buffer
        # is left as the model made it.
        logits = self.ctx.logits(index)
        guide = slot.guide
        token = -1
        if slot.sampler is not None and (guide is None or slot.sampler.params.greedy or slot.sampler.prepared):
            # Greedy, the maximum first, kept where the grammar allows it (llama.cpp's rule, common_sampler_sample):
            # one pass over the logits, where listing the allowed ids (120k inside a JSON string) and taking the
            # maximum among them is three. A prepared draw has the mask in its noise: a token it refuses means the
            # mask allows none. An unprepared draw at a temperature is made among the allowed ids: drawn from all
            # first, measured with SmolLM2 here, it took a token the grammar refused a third of the time.
            token = slot.sampler.sample(logits)
            if guide is None or guide.allows(token):
                guide = None  # nothing more to choose
        if guide is not None:
            allowed = guide.allowed()
            if allowed is not None and not len(allowed):
                self.scheduler.fail(slot, "constraint_failed", f"the constraint allows no token here: {guide.error}")
                return slot, -1, None
            if slot.sampler is not None:
                token = slot.sampler.sample(logits, allowed)
            elif allowed is not None:  # a penalized chain, over the allowed tokens alone (a narrow mask sorts few)
                token = self.ctx.sample_candidates(slot.seq_id, allowed, logits[allowed])
        if token < 0:
            token = self.ctx.sample(slot.seq_id, index)
        if slot.guide is not None:
            slot.guide.consume(token)
        if job.logprobs is None:
            return slot, token, None
        return slot, token, LogprobOf(logits, job.logprobs, token, self.vocab.piece)

    def _drawn_in_graph(self, slot: Slot, index: int) -> Sampled:
        """The token the job's chain drew in the graph, where its guide allows it; else one drawn again among the
        allowed tokens, from the chain's logits row; its logprob from that row (Scheduler.reads_row)."""
        job, guide, sampler = slot.job, slot.guide, slot.sampler
        assert job is not None and sampler is not None
        token = self.ctx.sample(slot.seq_id, index)
        if guide is not None:
            token = self._checked(slot, guide, sampler, token, index)
            if token < 0:
                return slot, -1, None
        if job.logprobs is None:
            return slot, token, None
        # the row is the logits at the job's temperature: the model's, scaled back
        return slot, token, LogprobOf(self.ctx.logits(index), job.logprobs, token, self.vocab.piece,
                                      scale=job.params.temperature)

    def _checked(self, slot: Slot, guide: Guide, sampler: CpuSampler, token: int, index: int) -> int:
        """The token drawn in the graph where the guide allows it, else one drawn again (-1: the guide allows
        none, and the job has failed)."""
        refused = not guide.allows(token)
        slot.refused = 0.8 * slot.refused + 0.2 * refused
        if not refused:
            sampler.discard()  # a draw prepared for this step and not needed (its mask is this step's)
        else:
            if sampler.prepared:  # the mask in its noise: a token it refuses means the mask allows none
                token = sampler.sample(self.ctx.logits(index))
                refused = not guide.allows(token)
            if refused:
                allowed = guide.allowed()
                if allowed is not None and not len(allowed):
                    self.scheduler.fail(slot, "constraint_failed",
                                        f"the constraint allows no token here: {guide.error}")
                    return -1
                token = sampler.sample(self.ctx.logits(index), allowed)
        guide.consume(token)
        return token

    def _read_prompt_logprobs(self, plan: StepPlan) -> None:
        """For parts that read every position's logits: the logprob of each prompt token that position predicts."""
        index = 0
        for slot, part in zip(plan.slots, plan.parts, strict=True):
            job = slot.job
            if part.all_logits and job is not None and job.prompt_logprobs is not None:
                out = []
                for offset in range(len(part.tokens)):
                    at = part.pos + offset + 1  # the prompt token this position's logits predict
                    if at >= len(job.prompt_tokens):
                        break  # the last position's logits give the first generated token
                    logits = self.ctx.logits(index + offset)
                    out.append(Ranked(logits, job.prompt_logprobs).of(logits, job.prompt_tokens[at], self.vocab.piece))
                self.scheduler.prompt_logprobs(slot, out)
            index += len(part.tokens)

    def _flush_text(self) -> None:
        self.scheduler.flush_text()
        self._publish()

    def _publish(self) -> None:
        out = self.scheduler.take_outputs()
        if not out:
            return
        if self._loop is None:  # stepped by hand (tests): deliver at once
            self._dispatch(out)
            return
        try:
            self._loop.call_soon_threadsafe(self._dispatch, out)
        except RuntimeError:  # the loop is closed: nobody is left to read these outputs
            pass
