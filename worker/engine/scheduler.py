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
import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple, Protocol

import numpy as np

from worker.engine.constraints import Guide
from worker.engine.cpu_sampling import CpuSampler
from worker.engine.host_cache import HostCache, HostEntry, shared_length
from worker.engine.logprobs import LogprobOf, resolved
from worker.engine.outputs import (
    Constraint,
    Failed,
    Finished,
    Job,
    Narrated,
    Output,
    PromptLogprobs,
    Started,
    StopReason,
    TokenLogprob,
    TokenText,
)
from worker.engine.sampling import SamplingParams
from worker.engine.speculative import Ask, NgramProposer, Proposer, SlotSpeculation, SpecConfig, StepCosts
from worker.engine.text import TextStream
from worker.narration import narrate


class SlotResources(Protocol):
    """What the scheduler asks of the llama.cpp context, per sequence."""

    def use_chain(self, seq_id: int, params: SamplingParams, *, reuse: bool, on_cpu: bool = False,
                  logits_row: bool = False, hands_row: bool = False) -> None: ...
    def drop_chain(self, seq_id: int) -> None: ...
    # whether the sequence's sampler in the decode graph costs steps while its slot is idle (llama.cpp builds an
    # attached chain of its own into every graph, on a dummy row; a group's draw leaves an idle sequence out)
    def idle_cost(self, seq_id: int) -> bool: ...
    # whether the sequence's chain in the graph can be reused for these parameters by changing its inputs alone
    def retunable(self, seq_id: int, params: SamplingParams) -> bool: ...
    def forget(self, seq_id: int) -> None: ...
    def keep_prefix(self, seq_id: int, n: int) -> None: ...
    def copy_prefix(self, src: int, dst: int, n: int) -> None: ...
    def reusable(self, src: int, n: int) -> bool: ...
    # the host-memory tier (Scheduler's host_cache): a sequence's state out to RAM (None: nothing saved), and back
    # into an empty sequence (False: llama.cpp refused it, the sequence is left empty)
    def save_sequence(self, seq_id: int) -> np.ndarray | None: ...
    def restore_sequence(self, seq_id: int, state: np.ndarray) -> bool: ...


class Vocab(Protocol):
    n_vocab: int

    def piece(self, token: int, special: bool = False) -> bytes: ...
    def is_eog(self, token: int) -> bool: ...


class SchedulerMetrics(Protocol):
    def job_admitted(self, queue_wait_s: float, prompt_tokens: int, cached_tokens: int) -> None: ...
    def token_generated(self, ttft_s: float | None, itl_s: float | None) -> None: ...
    def job_finished(self, stop_reason: str) -> None: ...
    def job_failed(self, code: str) -> None: ...
    def prefix_evicted(self, cells: int) -> None: ...
    def draft_verified(self, proposed: int, accepted: int) -> None: ...
    def ram_saved(self, tokens: int, size: int) -> None: ...
    def ram_restored(self, tokens: int) -> None: ...
    def ram_evicted(self, size: int) -> None: ...


class NoMetrics:
    def job_admitted(self, queue_wait_s: float, prompt_tokens: int, cached_tokens: int) -> None: ...
    def token_generated(self, ttft_s: float | None, itl_s: float | None) -> None: ...
    def job_finished(self, stop_reason: str) -> None: ...
    def job_failed(self, code: str) -> None: ...
    def prefix_evicted(self, cells: int) -> None: ...
    def draft_verified(self, proposed: int, accepted: int) -> None: ...
    def ram_saved(self, tokens: int, size: int) -> None: ...
    def ram_restored(self, tokens: int) -> None: ...
    def ram_evicted(self, size: int) -> None: ...


@dataclass(eq=False)
class Slot:
    seq_id: int
    job: Job | None = None
    chain_params: SamplingParams | None = None  # the chain this sequence has (kept between jobs), if any
    chain_on_cpu: bool = False  # that chain samples logits read on the CPU, outside the decode graph
    # the job's chain draws in the decode graph and its row is read after the step: for its guide's check (a token
    # refused is drawn again on the CPU, from that row) and its logprobs (Scheduler.reads_row)
    reads_row: bool = False
    chain_row: bool = False  # its chain was built for such a job: in the graph it hands over its row, not a token
    refused: float = 0.0  # such a job's draws its guide refused, recent ones weighing most
    logits_row: bool = False  # with a sampler in the graph that hands the logits over as they are (Context.use_chain)
    attach_pending: bool = False  # the job's chain joins the decode graph once arrivals settle (_attach_pending)
    guide: Guide | None = None  # the job's constraint
    sampler: CpuSampler | None = None  # samples the logits the job reads on the CPU (numpy), unless penalized
    spec: SlotSpeculation | None = None  # the job speculates
    text: TextStream | None = None
    prompt_pos: int = 0  # prompt tokens already decoded
    n_past: int = 0  # KV cells this sequence holds
    last_token: int = -1
    cached: int = 0  # prompt tokens whose cells came from the prefix cache
    # what the sequence's KV cells hold, position by position: the first kv_len entries of an int32 buffer, so the
    # prefix cache compares a prompt with every slot at numpy's speed (as lists: 1.2 ms an admission, measured)
    _kv: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int32), repr=False)
    kv_len: int = 0
    prompt_cells: int = 0  # how many of them were computed in prompt steps (the ones the cache reuses)
    pending: list[tuple[int, float]] = field(default_factory=list)  # sampled, their text not yet done (flush_text)
    logprobs: list[TokenLogprob | LogprobOf] = field(default_factory=list)  # of tokens whose text is not out yet
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    tokens_out: int = 0
    admitted_at: float = 0.0
    idle_since: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0

    @property
    def in_graph(self) -> bool:
        """The sequence has a sampler in the decode graph (its chain, or a logits row)."""
        return self.chain_params is not None and (not self.chain_on_cpu or self.logits_row)

    @property
    def decoding(self) -> bool:
        """Running and past its prompt: one token a step."""
        return self.job is not None and self.prompt_pos == len(self.job.prompt_tokens)

    @property
    def kv_view(self) -> np.ndarray:
        """The tokens the KV cells hold (a view: valid until the row changes)."""
        return self._kv[: self.kv_len]

    @property
    def kv_tokens(self) -> list[int]:
        tokens: list[int] = self.kv_view.tolist()
        return tokens

    @kv_tokens.setter
    def kv_tokens(self, tokens: Sequence[int] | np.ndarray) -> None:
        self.kv_len = 0
        self.kv_extend(tokens)

    def kv_extend(self, tokens: Sequence[int] | np.ndarray) -> None:
        end = self.kv_len + len(tokens)
        if end > len(self._kv):
            grown = np.zeros(max(end, 2 * len(self._kv)), dtype=np.int32)
            grown[: self.kv_len] = self._kv[: self.kv_len]
            self._kv = grown
        self._kv[self.kv_len : end] = tokens
        self.kv_len = end

    def kv_truncate(self, n: int) -> None:
        self.kv_len = min(self.kv_len, n)


class Part(NamedTuple):
    """A sequence's share of one batch (the llama.cpp context's BatchPart)."""

    seq_id: int
    tokens: list[int]
    pos: int
    logits: bool  # a token is sampled after its last position
    all_logits: bool = False  # every position's logits are read (the prompt's own logprobs, proposals to verify)
    n_draft: int = 0  # its last n_draft tokens are proposals: the target's choice at each position verifies them


@dataclass
class StepPlan:
    parts: list[Part] = field(default_factory=list)
    slots: list[Slot] = field(default_factory=list)  # the slot of each part
    # A steady step (a token a sequence, no chain attached or detached since the last) is quick to queue; any other
    # makes llama_decode itself long (a prompt, or llama.cpp re-reserving its graph after a chain change).
    steady: bool = True
    prefill: bool = False  # some part is a prompt chunk

    def sample_at(self) -> list[tuple[Slot, Part, int]]:
        """(slot, part, batch index of its last token) of each part that wants a token and whose job still runs."""
        out, index = [], -1
        for slot, part in zip(self.slots, self.parts, strict=True):
            index += len(part.tokens)
            if part.logits and slot.job is not None:
                out.append((slot, part, index))
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
        prefix_cache: bool = True,
        exact_prefixes: bool = True,
        metrics: SchedulerMetrics | None = None,
        clock: Callable[[], float] = time.perf_counter,
        guides: Callable[[Constraint], Guide] | None = None,
        prompt_logits_per_step: int = 0,
        speculation: SpecConfig | None = None,
        proposer: Proposer | None = None,
        host_cache: HostCache | None = None,
        split_prompt_steps: bool = False,
    ) -> None:
        self.slots = [Slot(seq_id=i) for i in range(n_slots)]
        # A slot keeps its sequence's KV after its job (the prefix cache); a new job takes the slot that holds the
        # longest prefix of its prompt, or has that prefix copied in from another slot.
        self.prefix_cache = prefix_cache
        # The host-memory tier: a long sequence a slot is about to drop is saved to RAM first, and a later prompt it
        # prefixes has it restored into a slot (see _save_to_ram, _restore_from_ram).
        self.host_cache = host_cache if prefix_cache else None
        # Exact prefixes (the CPU): a cache hit gives the text a fresh run gives, bit for bit, so only cells computed
        # in prompt steps are reused and a prompt's last two tokens are always computed (a lone query rounds
        # otherwise than a batch). On a GPU a fresh run's prompt is computed by other kernels than any short suffix,
        # so exactness is not on offer there: every cell is reused (a conversation's last reply too) and one token
        # is computed, as llama-server does, which keeps a cache hit's step the shape of a decode step.
        self.exact_prefixes = exact_prefixes
        self.min_suffix = 2 if exact_prefixes else 1
        self.batch_size = batch_size
        self.resources = resources
        self.vocab = vocab
        self.in_graph_sampling = in_graph_sampling
        # A chain of llama.cpp's samplers attached in the decode graph is built into every step's graph, whether its
        # slot is busy or not; one idle this long is detached (the next job there attaches its own, at the cost of
        # one graph re-reservation). A group's draw (draws.py) costs nothing idle and stays for the next job of its
        # shape.
        self.chain_idle_s = chain_idle_s
        self.metrics = metrics or NoMetrics()
        self.clock = clock
        self.guides = guides
        # prompt positions a step may read logits at (the prompt's own logprobs): the context's output rows beyond
        # one per sequence
        self.prompt_logits_per_step = prompt_logits_per_step
        self.speculation = speculation
        # Over per-slot KV streams on a GPU: steps of prompt chunks and steps of decoders alternate, never mixed
        self.split_prompt_steps = split_prompt_steps
        self._decoders_waited = False  # the last step's decoders sat it out: they go first in the next
        # who proposes: a draft model where one is given, else prompt lookup
        self.proposer = proposer or (NgramProposer(speculation) if speculation is not None else None)
        self.step_costs = StepCosts(settle_steps=speculation.settle_steps if speculation is not None else 1)
        # decode steps left of the pause the last draft-model stretch that did not pay imposed: new jobs do not
        # speculate until it is over, rather than each paying a trial stretch of its own (a draft that does not pay
        # on this traffic would cost every request its trial: 0.86-0.96x over 128 tokens on an H200, measured)
        self._draft_rest = 0
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
        admitted = self._admit()
        if self.in_graph_sampling:
            self._detach_idle_chains(now)
            self._stop_speculating()
            self._attach_pending(settled=not admitted)
        for slot in self.slots:
            job = slot.job
            if job is not None and (job.cancel_reason or (job.deadline and now >= job.deadline)):
                self.finish(slot, job.cancel_reason or StopReason.TIMEOUT)
        plan = StepPlan(steady=not self._chains_changed and all(s.job is None or s.decoding for s in self.slots))
        if not (overlap and plan.steady):
            self.flush_text()
        decoding = [slot for slot in self.slots if slot.decoding]
        prompting = sorted((s for s in self.slots if s.job is not None and not s.decoding),
                           key=lambda s: s.job.submitted_at)  # type: ignore[union-attr]
        if self.split_prompt_steps and decoding and prompting:
            # Prompt steps and decode steps take turns, prompts first unless the decoders sat the last step out:
            # over per-slot streams a step of both is two graph evaluations, each rebuilt (12 ms a chat turn's step,
            # against 7 for the prompt alone: H200, 1B, 5.3k-token histories), and a new prompt waited for the whole
            # of it. Decoders that have not waited yet (jobs whose prompts just ended) let requests that came during
            # that step go first: 8 streams starting together had a decode step between their prompt steps.
            if not self._decoders_waited:
                self._plan_prompts(plan, prompting, self.batch_size, self.prompt_logits_per_step)
            self._decoders_waited = bool(plan.parts)
            if not plan.parts:
                self._plan_decoders(plan, decoding, self.batch_size)
        else:
            budget, logits_budget = self._plan_decoders(plan, decoding, self.batch_size)
            self._plan_prompts(plan, prompting, budget, logits_budget)
            self._decoders_waited = False
        if plan.parts:
            self._chains_changed = False
        if plan.prefill:
            # In sequence order: over per-slot KV streams llama.cpp evaluates a batch in ubatches of consecutive
            # sequence ids, taken in the order each sequence first appears; decoders first and prompts after made
            # runs like 0,1,2 | 3 | 4,5 of sequences side by side.
            order = sorted(range(len(plan.parts)), key=lambda i: plan.parts[i].seq_id)
            plan.parts = [plan.parts[i] for i in order]
            plan.slots = [plan.slots[i] for i in order]
        return plan

    def _plan_decoders(self, plan: StepPlan, decoding: list[Slot], budget: int) -> tuple[int, int]:
        """A token for each decoding sequence (with its proposals, if it speculates); the tokens and the output rows
        beyond one a sequence left for prompts (proposals and a prompt's own logprobs share those rows)."""
        logits_budget = self.prompt_logits_per_step
        drafts = self._drafts(decoding, budget, logits_budget)
        for slot in decoding:
            draft = drafts.get(slot.seq_id, [])
            tokens = [slot.last_token, *draft]
            plan.parts.append(Part(slot.seq_id, tokens, slot.n_past, True, bool(draft), len(draft)))
            plan.slots.append(slot)
            slot.n_past += len(tokens)
            budget -= len(tokens)
            logits_budget -= len(draft)
        return budget, logits_budget

    def _plan_prompts(self, plan: StepPlan, prompting: list[Slot], budget: int, logits_budget: int) -> None:
        """Prompt chunks in the order their jobs came, as many as the token budget and attention budget allow."""
        attention = 0
        for slot in prompting:
            job = slot.job
            assert job is not None
            if budget <= 0:
                break
            n = budget
            if job.prompt_logprobs is not None:  # every position's logits: as many as the context keeps outputs for
                n = min(n, logits_budget)
                if n <= 0:
                    continue
                logits_budget -= n
            chunk = job.prompt_tokens[slot.prompt_pos : slot.prompt_pos + n]
            # A step's time grows with its prompt tokens x the cells they attend to, and over per-slot streams
            # unequal chunks are evaluated one after another (each graph rebuilt), so a burst of chat turns in one
            # step held each of them back for all (H200, 1B, 5.3k-token histories: turns that arrived together
            # shared steps of 16-34 ms; one turn a step, 12-20 ms). Past the first, a prompt waits for a later step
            # where it would overrun the budget.
            cost = len(chunk) * (slot.n_past + len(chunk))
            if attention and attention + cost > PROMPT_ATTENTION_BUDGET:
                break
            attention += cost
            slot.prompt_pos += len(chunk)
            plan.parts.append(Part(slot.seq_id, chunk, slot.n_past, slot.prompt_pos == len(job.prompt_tokens),
                                   job.prompt_logprobs is not None))
            plan.prefill = True
            plan.slots.append(slot)
            slot.n_past += len(chunk)
            budget -= len(chunk)

    def _drafts(self, decoding: list[Slot], budget: int, logits_budget: int) -> dict[int, list[int]]:
        """The proposals the speculating sequences verify this step (seq_id → tokens), asked of the proposer all at
        once; what proposing cost is recorded per proposed token (a draft model's decodes are not free)."""
        if self.proposer is None:
            return {}
        room = min(budget - len(decoding), logits_budget)  # every decoding sequence's own token comes first
        asks: list[tuple[Slot, Ask, bool]] = []
        for slot in decoding:
            n, shadow = self._proposal_size(slot, room) if slot.spec is not None else (0, False)
            if n:
                asks.append((slot, Ask(slot.seq_id, np.append(slot.kv_view, np.int32(slot.last_token)),
                                       n), shadow))
                room -= 0 if shadow else n
        if not asks:
            return {}
        proposals = self.proposer.propose_all([ask for _, ask, _ in asks])
        self.step_costs.record_proposing(self.proposer.spent, sum(len(p) for p in proposals.values()))
        out = {}
        for slot, ask, shadow in asks:
            if draft := self._to_verify(slot, proposals.get(ask.seq_id, [])[: ask.n], ask.n, shadow):
                out[slot.seq_id] = draft
        return out

    def _proposal_size(self, slot: Slot, room: int) -> tuple[int, bool]:
        """How many tokens a speculating sequence asks for this step (none under load, when the last ones missed,
        when it does not pay, or when the job could not use them: max_tokens), and whether only in the shadow:
        between fixed-length stretches, one token, guessed and checked against the token that comes."""
        spec, job, config = slot.spec, slot.job, self.speculation
        assert spec is not None and job is not None and config is not None
        if spec.stopped:
            return 0, False
        if spec.pause > 0:
            spec.pause -= 1
            spec.shadow, spec.hits = -1, 0
            return 0, False
        n = min(spec.n, room, job.max_tokens - slot.tokens_out - 1)
        if n < config.n_min or self.n_running + len(self.waiting) > config.load_limit:
            return 0, False
        if not config.gate:
            return n, False
        if config.fixed_length:
            if spec.stretch.steps or spec.stretch.going:
                return n, False
            if self.proposer is not None and self.proposer.costly:
                # a draft model's shadow guess would cost a decode every step (measured: a self-draft at 0.6x):
                # it goes straight to a stretch, judged after COSTLY_TRIAL_STEPS, and the pauses do the backing off
                return (n, False) if self.step_costs.settled else (0, False)
            came_true = spec.shadow == slot.last_token
            spec.hits = spec.hits + 1 if came_true else 0  # the last shadow guess came true
            if spec.hits < config.shadow_hits or not self.step_costs.settled:
                return 1, True
            spec.hits = 0
            return n, False
        if self.step_costs.step is None and self.proposer is not None and self.proposer.costly:
            return 0, False  # a plain step first: what a costly proposal adds is measured against it
        if spec.probe:  # after a pause the gate imposed: one proposal regardless, so its cost is measured anew
            spec.probe = False
            return n, False
        if not self.step_costs.worth(spec.recent_rate, self.n_running):
            # then try again, later each time it does not pay: the costs and the rate change with the text and load
            spec.pause = spec.backoff = min(2 * spec.backoff, 256)
            spec.probe = True
            return 0, False
        return n, False

    def _to_verify(self, slot: Slot, draft: list[int], n: int, shadow: bool) -> list[int]:
        """What of a proposal the sequence verifies this step."""
        spec, config = slot.spec, self.speculation
        assert spec is not None and config is not None
        if shadow:  # a guess only (SlotSpeculation.shadow)
            spec.shadow = draft[0] if draft else -1
            return []
        if not config.fixed_length:
            return draft if len(draft) >= config.n_min else []
        if not spec.stretch.steps and not spec.stretch.going:  # a stretch starts here, with something found
            spec.shadow = draft[0] if draft else -1
            if not draft:
                return []
        # a stretch goes on even where nothing is found: the step keeps its shape
        return draft + [draft[-1] if draft else slot.last_token] * (n - len(draft))

    def speculated(self, plan: StepPlan, seconds: float) -> None:
        """A decode step's time, for the stretches of fixed-length speculation in it: one judged after its steps
        goes on or gives way to a pause."""
        config = self.speculation
        assert config is not None
        if not config.gate:  # measuring the ceiling: every step speculates
            return
        self._draft_rest = max(0, self._draft_rest - 1)
        for slot, part in zip(plan.slots, plan.parts, strict=True):
            spec = slot.spec
            if spec is None or not part.n_draft or slot.job is None:
                continue
            # the cells kept (its accepted tokens + its own) for the step's whole time (its proposing included)
            spec.stretch.add(slot.n_past - part.pos, seconds)
            costly = self.proposer is not None and self.proposer.costly
            if spec.stretch.steps >= (COSTLY_TRIAL_STEPS if costly else config.trial_steps):
                spec.pause = spec.stretch.judge(self.step_costs.step, self.n_running, costly)
                if costly:
                    self._draft_rest = spec.pause

    def accept_draft(self, slot: Slot, part: Part, accepted: int) -> None:
        """Of the part's proposals, the first `accepted` matched the target: the cells of the rest are freed."""
        assert slot.spec is not None and self.speculation is not None
        keep = part.pos + 1 + accepted
        if accepted < part.n_draft:
            self.resources.keep_prefix(slot.seq_id, keep)
            slot.kv_truncate(keep)
        slot.n_past = keep
        slot.spec.record(part.n_draft, accepted, self.speculation.n_max, self.speculation.fixed_length)
        self.metrics.draft_verified(part.n_draft, accepted)

    def _expire_waiting(self, now: float) -> None:
        for job in [j for j in self.waiting if j.cancel_reason or (j.deadline and now >= j.deadline)]:
            self.waiting.remove(job)
            self._end_unstarted(job, job.cancel_reason or StopReason.TIMEOUT)

    def _detach_idle_chains(self, now: float) -> None:
        if now < self._next_idle_check:
            return
        self._next_idle_check = now + self.chain_idle_s / 4
        for slot in self.slots:
            if (slot.job is None and slot.chain_params is not None and now - slot.idle_since > self.chain_idle_s
                    and self.resources.idle_cost(slot.seq_id)):
                self.resources.drop_chain(slot.seq_id)
                self._chains_changed |= slot.in_graph
                slot.chain_params = None
                slot.chain_on_cpu = slot.logits_row = False

    def _stop_speculating(self) -> None:
        """Where chains sample in the decode graph, speculation ends for good once a job has company (more running
        or waiting than the load limit): its logits, read on the CPU, make llama.cpp copy every output row's
        logits to the host at every step (16 MB at 32 streams of a 128k vocabulary), and its neighbours pay for
        that. Its chain joins the graph with the next attachments."""
        config = self.speculation
        if config is None or self.n_running + len(self.waiting) <= config.load_limit:
            return
        for slot in self.slots:
            spec = slot.spec
            if spec is not None and not spec.stopped and slot.job is not None and not self._reads_logits(slot.job):
                spec.stopped = True
                if slot.chain_on_cpu:
                    slot.attach_pending = True

    def _attach_pending(self, *, settled: bool) -> None:
        """Attach the chains of jobs that sample on the CPU until then (_start: deferred), once they have their first
        token: all in one step (each step whose chains changed, llama.cpp re-reserves its graph: ~30 ms on an H200,
        whatever the number), when a step admitted nobody (requests that arrive together are all in), or when one
        has waited ATTACH_AFTER_TOKENS tokens (arrivals that never settle)."""
        pending = [slot for slot in self.slots if slot.attach_pending and slot.job is not None]
        ready = [slot for slot in pending if slot.tokens_out > 0]
        waited = any(slot.tokens_out >= ATTACH_AFTER_TOKENS for slot in ready)
        # not while some of them are still in their prompts: prompts over long histories take a step each
        if not ready or not (waited or (settled and len(ready) == len(pending))):
            return
        for slot in ready:
            assert slot.job is not None
            self.resources.use_chain(slot.seq_id, slot.job.params, reuse=False, hands_row=slot.reads_row)
            slot.chain_on_cpu = slot.attach_pending = slot.logits_row = False
            slot.chain_row = slot.reads_row
            slot.sampler = self._redraw_sampler(slot.job) if slot.reads_row else None
        self._chains_changed = True

    def _admit(self) -> bool:
        """Whether some job was given a slot."""
        admitted = False
        deferred: list[Job] = []
        while self.waiting and any(slot.job is None for slot in self.slots):
            job = self.waiting.popleft()
            held = self._held_by_slot(job)
            if self._prefix_in_flight(job, held):
                deferred.append(job)  # another job is prefilling this one's prefix: share it once it is there
                continue
            slot, cached = self._place(job, held)
            admitted = True
            try:
                self._start(slot, job, cached)
            except Exception as exc:  # e.g. a sampler chain llama.cpp refused: end this job, keep serving
                if slot.job is job:
                    self.fail(slot, "internal_error", f"could not start the job: {type(exc).__name__}: {exc}")
                else:
                    self._drop_sequence(slot)
                    self._end_unstarted(job, StopReason.CANCELLED)
        self.waiting.extendleft(reversed(deferred))
        return admitted

    # ---- the prefix cache ------------------------------------------------------------------------------------

    def _place(self, job: Job, held: dict[int, int]) -> tuple[Slot, int]:
        """A free slot for the job and how many of its prompt's tokens are already in that slot's KV: the free slot
        that holds the longest prefix of the prompt; or, when another slot (busy or not) holds a much longer one,
        the least useful free slot with that prefix copied in; or, when the host cache does, restored from RAM
        (checked first: it holds a longer one than any slot then). At least the prompt's last `min_suffix` tokens are
        computed (see exact_prefixes)."""
        free = [slot for slot in self.slots if slot.job is None]
        if not self.prefix_cache or job.prompt_logprobs is not None:  # the prompt's logprobs need its logits
            slot = max(free, key=lambda s: (self._chain_fits(s, job), s.chain_params is not None))
            self._keep(slot, 0)
            return slot, 0
        if (restored := self._restore_from_ram(job, held, free)) is not None:
            return restored
        # the longest own prefix; then a slot whose sampler chain fits; then the one idle longest
        slot = max(free, key=lambda s: (held[s.seq_id], self._chain_fits(s, job), -s.idle_since))
        src = max(self.slots, key=lambda s: held[s.seq_id])
        if held[src.seq_id] - held[slot.seq_id] >= MIN_COPY and self.resources.reusable(src.seq_id,
                                                                                        held[src.seq_id]):
            # the slot to overwrite: the one whose cached sequence is worth the least to this job, then the oldest
            slot = min(free, key=lambda s: (held[s.seq_id], s.idle_since))
            n = held[src.seq_id]
            self._discard(slot, 0)
            self.resources.copy_prefix(src.seq_id, slot.seq_id, n)
            slot.kv_tokens = src.kv_view[:n]
            slot.prompt_cells = n
            return slot, n
        n = held[slot.seq_id] if self.resources.reusable(slot.seq_id, held[slot.seq_id]) else 0
        self._keep(slot, n)
        return slot, n

    def _chain_fits(self, slot: Slot, job: Job) -> bool:
        """The slot's chain serves the job without changing the decode graph's samplers (which makes llama.cpp
        re-reserve it): its own chain drawing with the job's parameters for a job sampled in the graph (built
        with them, or a group's draw retuned: _chain_draws; a chain still on the CPU awaiting attachment would be
        built anew); a logits row for a job that reads its logits."""
        if self.in_graph_sampling and self._reads_logits(job):
            return slot.logits_row == (job.prompt_logprobs is None)
        return (self._chain_draws(slot, job.params) and slot.chain_row == self.reads_row(job)
                and slot.chain_on_cpu == (self.in_graph_sampling and self._reads_logits(job)))

    def _chain_draws(self, slot: Slot, params: SamplingParams) -> bool:
        """The slot's chain draws with these parameters: built with them, or a group's draw of their shape in the
        graph, whose temperature, p and seed are inputs (Context.retunable)."""
        return slot.chain_params == params or (slot.chain_params is not None and not slot.chain_on_cpu
                                               and self.resources.retunable(slot.seq_id, params))

    def reads_row(self, job: Job) -> bool:
        """A job with a constraint or logprobs whose chain draws in the decode graph, like its neighbours', and
        whose chain's logits row is read after the step: the guide checks the token, a refused one is drawn again on
        the CPU among the tokens it allows, from that row (rejection: a draw from the whole distribution that the
        mask allows is a draw from the masked one), and the logprobs are taken from it. Drawn on the CPU every step
        instead, a constrained job held up its neighbours' steps by its draw (8 streams on an H200, 1B: its
        neighbours at 0.91-0.96). Where the row is the model's logits at the job's temperature: sampled (a greedy
        chain in the graph hands over only its maximum), neither penalized nor truncated; not with the prompt's
        logprobs (several rows of the sequence in a step, which llama.cpp's in-graph samplers do not take)."""
        p = job.params
        return (self.in_graph_sampling and (job.constraint is not None or job.logprobs is not None)
                and job.prompt_logprobs is None and not p.greedy and not p.penalized and p.top_k <= 0
                and p.top_p >= 1.0 and p.min_p <= 0.0)

    def _reads_logits(self, job: Job) -> bool:
        """The job's logits are read on the CPU every step (Job.reads_logits), unless it reads its chain's row."""
        return job.reads_logits and not self.reads_row(job)

    @staticmethod
    def _redraw_sampler(job: Job) -> CpuSampler:
        """A job's draw among the tokens its guide allows, from its chain's row: at temperature 1, since the row is
        the logits at the job's temperature already."""
        return CpuSampler(dataclasses.replace(job.params, temperature=1.0))

    def _keep(self, slot: Slot, n: int) -> None:
        """Cut the slot's sequence back to its first n positions."""
        self._discard(slot, n)
        if n < slot.kv_len or n == 0:
            self.resources.keep_prefix(slot.seq_id, n)
        slot.kv_truncate(n)
        slot.prompt_cells = n

    def _reusable_cells(self, slot: Slot) -> int:
        """Cells another prompt may take from this slot: with exact prefixes, those computed in prompt steps (a
        generated token's cell was computed alone, and llama.cpp's attention for one query rounds otherwise than for
        a batch: measured on the CPU, logits off by 0.69); else all of them."""
        if not self.exact_prefixes:
            return slot.kv_len
        job = slot.job
        if job is None:
            return slot.prompt_cells
        return min(slot.kv_len, len(job.prompt_tokens))

    def _discard(self, slot: Slot, n: int) -> None:
        """The slot's sequence is about to be cut to its first n positions (or overwritten, n = 0): counted, and
        saved to the host cache first when worth it."""
        dropped = slot.kv_len - n
        if dropped > 0:
            self._save_to_ram(slot, n)
            self.metrics.prefix_evicted(dropped)
            narrate("prefix_evicted", f"Dropped {dropped} cached tokens of slot {slot.seq_id} for a new prompt.",
                    actor="engine", target=f"slot:{slot.seq_id}", cells=dropped, level="debug")

    def _save_to_ram(self, slot: Slot, n: int) -> None:
        """An idle slot's sequence, about to be cut to n positions, goes to the host cache first: its reusable cells
        (cut to those first, the slot is losing the rest anyway), when there are at least RAM_MIN_TOKENS of them, the
        cut loses at least MIN_COPY of them, and no cache entry or other slot holds them all already."""
        cache = self.host_cache
        keep = self._reusable_cells(slot)
        if cache is None or slot.job is not None or keep < RAM_MIN_TOKENS or keep - n < MIN_COPY:
            return
        held = slot.kv_view[:keep]
        tokens = held.tolist()
        if not self.resources.reusable(slot.seq_id, keep) or cache.covering(held) is not None or any(
                other is not slot and shared_length(other.kv_view, held, self._reusable_cells(other)) == keep
                for other in self.slots):
            return
        if keep < slot.kv_len:  # generated cells (the CPU): not reusable, not saved
            self.resources.keep_prefix(slot.seq_id, keep)
            slot.kv_truncate(keep)
        started = self.clock()
        try:
            state = self.resources.save_sequence(slot.seq_id)
        except Exception as exc:  # e.g. no memory for the buffer: the cells are dropped as without the tier
            narrate("prefix_save_failed", f"Could not save slot {slot.seq_id}'s {keep} cached tokens to RAM: "
                    f"{type(exc).__name__}: {exc}", actor="engine", target=f"slot:{slot.seq_id}", level="warning")
            return
        if state is None or not cache.fits(state.nbytes):
            return
        entry = HostEntry(tokens, state, state.nbytes)
        replaced, evicted = cache.put(entry)
        self.metrics.ram_saved(keep, entry.size)
        narrate("prefix_saved_to_ram", f"Saved slot {slot.seq_id}'s {keep} cached tokens to RAM "
                f"({entry.size / 2**20:.1f} MiB) before dropping them.", actor="engine", target=f"slot:{slot.seq_id}",
                tokens=keep, bytes=entry.size, ms=round((self.clock() - started) * 1000, 2),
                ram_bytes=cache.bytes, ram_entries=len(cache), level="debug")
        for old, reason in [*((e, "covered") for e in replaced), *((e, "budget") for e in evicted)]:
            self.metrics.ram_evicted(old.size)
            narrate("prefix_evicted_from_ram", f"Dropped a RAM-cached prefix of {len(old.tokens)} tokens "
                    f"({'a longer entry holds it' if reason == 'covered' else 'over the --cache-ram budget'}).",
                    actor="engine", target="cache_ram", tokens=len(old.tokens), bytes=old.size, reason=reason,
                    level="debug")

    def _restore_from_ram(self, job: Job, held: dict[int, int], free: list[Slot]) -> tuple[Slot, int] | None:
        """When a host cache entry holds a longer prefix of the prompt than any slot (by MIN_COPY at least): the free
        slot worth least to this job, its own sequence saved if worth it, restored from the entry and cut to the
        shared prefix, and the tokens it now holds. None when no entry is worth it, or llama.cpp refused the state
        (the entry is dropped and the slot left empty: the prompt is computed)."""
        cache = self.host_cache
        if cache is None or not len(cache):
            return None
        entry, n = cache.longest_prefix(job.prompt_array[: -self.min_suffix])
        gain = n - max(held.values(), default=0)
        # On a GPU a 1B model's prompt token is computed in ~25 us, and saving one took ~14 us (a 5k-token sequence,
        # 160 MB, in ~70 ms on an H200; restoring was not timed apart): a restore moves the whole entry, so it pays
        # only where it saves computing more than half of what it moves. On the CPU computing costs a thousand times
        # more: any gain worth a copy pays.
        if entry is None or gain < MIN_COPY or (not self.exact_prefixes and gain < n // 2):
            return None
        slot = min(free, key=lambda s: (held[s.seq_id], s.idle_since))
        self._discard(slot, 0)
        self._drop_sequence(slot)
        started = self.clock()
        try:
            restored, why = self.resources.restore_sequence(slot.seq_id, entry.state), "llama.cpp refused it"
        except Exception as exc:
            restored, why = False, f"{type(exc).__name__}: {exc}"
        if not restored:
            cache.discard(entry)
            self.metrics.ram_evicted(entry.size)
            self._drop_sequence(slot)
            held[slot.seq_id] = 0
            self._narrate(job, "prefix_restore_failed", f"Could not restore a RAM-cached prefix of {n} tokens ({why}): "
                          "the entry is dropped and the prompt computed.", slot=slot.seq_id, tokens=n, reason=why,
                          level="warning")
            return None
        if n < len(entry.tokens):
            self.resources.keep_prefix(slot.seq_id, n)
        slot.kv_tokens = entry.tokens[:n]
        slot.prompt_cells = n
        cache.touch(entry)
        ms = (self.clock() - started) * 1000
        self.metrics.ram_restored(n)
        self._narrate(job, "prefix_restored_from_ram", f"Restored {n} prompt tokens of job {job.job_id} from RAM "
                      f"into slot {slot.seq_id} in {ms:.1f} ms.", slot=slot.seq_id, tokens=n, ms=round(ms, 2))
        return slot, n

    def _prefix_in_flight(self, job: Job, held: dict[int, int]) -> bool:
        """Whether a running job is still prefilling a longer prefix of this job's prompt than any slot holds."""
        prefilling = [slot for slot in self.slots if slot.job is not None and not slot.decoding]
        if not (self.prefix_cache and prefilling) or job.prompt_logprobs is not None:
            return False
        prompt = job.prompt_array[: -self.min_suffix]
        shared = max(shared_length(slot.job.prompt_array, prompt) for slot in prefilling if slot.job)
        # waiting costs at most that prefill's remaining steps
        return shared >= MIN_SHARED_PREFILL and all(n < shared for n in held.values())

    def _held_by_slot(self, job: Job) -> dict[int, int]:
        """seq_id → how much of the job's prompt (all but its last min_suffix tokens) the slot's reusable cells
        hold; computed once per admission attempt."""
        if not self.prefix_cache:
            return {}
        prompt = job.prompt_array[: -self.min_suffix]
        if not len(prompt):
            return {slot.seq_id: 0 for slot in self.slots}
        first = int(prompt[0])  # a slot that differs at once is told apart without numpy (32 slots: ~0.2 ms)
        return {slot.seq_id: shared_length(slot.kv_view, prompt, self._reusable_cells(slot))
                if slot.kv_len and int(slot.kv_view[0]) == first else 0 for slot in self.slots}

    def decoded(self, parts: Iterable[tuple[Slot, Part]]) -> None:
        """These parts are in the KV cache now (llama_decode took them)."""
        for slot, part in parts:
            slot.kv_extend(part.tokens)

    def _drop_sequence(self, slot: Slot) -> None:
        slot.kv_len = 0
        slot.prompt_cells = 0
        self.resources.forget(slot.seq_id)

    def _start(self, slot: Slot, job: Job, cached: int = 0) -> None:
        self.n_running += 1
        slot.job = job
        slot.text = TextStream(job.stop)
        slot.cached = cached
        slot.logprobs, slot.prompt_logprobs = [], []
        config = self.speculation
        # Where chains sample in the decode graph (a GPU), a speculating job samples on the CPU from logits read for
        # the whole batch: greedy jobs only, where that is an argmax (a job at temperature 0.8 ran at 0.67x with
        # prompt lookup on an H200, its numpy draw and the logits' copy every token for proposals rarely taken)
        # While a draft model rests (the last stretch of it did not pay), a new job does not speculate at all: a
        # speculating job samples on the CPU from logits copied every step, paused or not (8% of a step, H200).
        resting = self.proposer is not None and self.proposer.costly and self._draft_rest > 0
        slot.spec = SlotSpeculation(n=config.n_max) if (
            config is not None and job.speculate and not job.reads_logits and not resting
            and (job.params.greedy or not self.in_graph_sampling)
            and self.n_running + len(self.waiting) <= config.load_limit) else None
        # A job that reads its logits on the CPU every step (a mask or logprobs it cannot check from an in-graph
        # chain's row, proposals to verify) samples there: decided here, once, when the job starts
        slot.reads_row, slot.refused = self.reads_row(job), 0.0
        on_cpu = self.in_graph_sampling and (self._reads_logits(job) or slot.spec is not None)
        reuse = self._chain_draws(slot, job.params) and slot.chain_on_cpu == on_cpu and slot.chain_row == slot.reads_row
        # A new chain in the decode graph costs a graph re-reservation, and the step that pays it holds up the new
        # job's first token and everyone else's next one. Deferred: the job samples on the CPU until its chain can
        # be attached with those of the others that arrived with it, in one step after their first tokens. Not
        # with a seed (its tokens must not depend on when the chain joined), nor penalized (numpy has no history).
        deferred = (self.in_graph_sampling and not on_cpu and not reuse and job.params.seed is None
                    and CpuSampler.applies(job.params) and (slot.chain_params is None or slot.chain_on_cpu))
        on_cpu = on_cpu or deferred
        # Read on the CPU beside chains in the graph, a job's logits row is its own (else llama.cpp copies every
        # row, and its neighbours wait for that): always for a job that reads its logits; for one that samples
        # there until its chain is attached, where the slot has that row already (attaching one would cost what
        # deferring saves). Not where a step reads several rows of the sequence (llama.cpp's in-graph samplers take
        # one output a sequence): the prompt's logprobs, speculation (alone anyway: no neighbours to slow).
        logits_row = (on_cpu and slot.spec is None and job.prompt_logprobs is None
                      and (self._reads_logits(job) or (deferred and slot.logits_row)))
        graph_before = slot.in_graph, slot.logits_row
        slot.chain_params = None  # until the context has the chain
        self.resources.use_chain(slot.seq_id, job.params, reuse=reuse, on_cpu=on_cpu, logits_row=logits_row,
                                 hands_row=slot.reads_row)
        slot.chain_params, slot.chain_on_cpu, slot.attach_pending = job.params, on_cpu, deferred
        slot.chain_row = slot.reads_row
        slot.logits_row = logits_row
        if self.in_graph_sampling and (graph_before != (slot.in_graph, slot.logits_row)
                                       or (not reuse and not on_cpu)):
            self._chains_changed = True
        reads_logits = self._reads_logits(job) or slot.spec is not None or deferred
        slot.sampler = CpuSampler(job.params) if reads_logits and CpuSampler.applies(job.params) else None
        if slot.reads_row and not deferred:
            slot.sampler = self._redraw_sampler(job)
        if job.constraint is not None:
            if self.guides is None:
                raise RuntimeError("this engine has no grammars for a constrained job")
            slot.guide = self.guides(job.constraint)
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

    def update(self, sampled: Iterable[Sampled], now: float) -> None:
        """Sampled tokens: what the next step depends on (whether each sequence goes on, and with which token).
        Their text is done by the next flush_text."""
        for slot, token, logprob in sampled:
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
            slot.pending.append((token, now))
            if logprob is not None:
                slot.logprobs.append(logprob)
            if slot.guide is not None and (error := slot.guide.error) is not None:
                # the grammar took the token and cannot go on: the output so far does not match it, so no stop
                # reason may say it ended well
                self.fail(slot, "constraint_failed", f"the constraint cannot be followed past this token: {error}")
            elif slot.tokens_out >= job.max_tokens:
                self.finish(slot, StopReason.MAX_TOKENS)
            elif slot.guide is not None and slot.guide.stopped:  # the grammar is complete: nothing may follow
                self.finish(slot, StopReason.EOS)

    def prompt_logprobs(self, slot: Slot, logprobs: list[TokenLogprob]) -> None:
        """Logprobs of the prompt tokens a step's part predicted; all of them go out once the prompt is in."""
        job = slot.job
        if job is None:
            return
        if not slot.prompt_logprobs:
            slot.prompt_logprobs.append(None)  # nothing predicts the first token
        slot.prompt_logprobs.extend(logprobs)
        if slot.prompt_pos == len(job.prompt_tokens):
            self._emit(job, PromptLogprobs(tuple(slot.prompt_logprobs)))
            slot.prompt_logprobs = []

    def flush_text(self) -> None:
        for slot in self.slots:
            if slot.pending:
                self._text_of_pending(slot)

    def flush_first_text(self) -> bool:
        """The text of jobs' first tokens, now rather than while the next step computes (the next step's planning
        and queueing would hold a time to first token up by ~0.5 ms on an H200's host); whether there was any."""
        flushed = False
        for slot in self.slots:
            if slot.pending and slot.tokens_out == len(slot.pending):
                self._text_of_pending(slot)
                flushed = True
        return flushed

    def _text_of_pending(self, slot: Slot) -> None:
        """The sampled tokens' text, metrics and outputs; a completed stop sequence ends the job (and what was
        sampled after it is dropped)."""
        pending, slot.pending = slot.pending, []
        first = slot.tokens_out - len(pending)  # the index of the first of them
        for i, (token, at) in enumerate(pending):
            job = slot.job
            assert job is not None and slot.text is not None
            if first + i == 0:
                self.metrics.token_generated(at - job.submitted_at, None)
            else:
                self.metrics.token_generated(None, at - slot.last_token_at)
            slot.last_token_at = at
            text = slot.text.feed(self.vocab.piece(token, job.special_text))
            if text:
                self._emit(job, TokenText(text, first + i, resolved(slot.logprobs)))
                slot.logprobs = []
            if slot.text.matched is not None:
                slot.tokens_out = first + i + 1
                self.finish(slot, StopReason.STOP_SEQUENCE)
                return

    def finish(self, slot: Slot, reason: StopReason) -> None:
        if slot.pending:
            self._text_of_pending(slot)  # its text comes before the end, and it may complete a stop sequence
            if slot.job is None:
                return
        job, text = slot.job, slot.text
        assert job is not None and text is not None
        tail = text.finish()
        if tail or slot.logprobs:
            self._emit(job, TokenText(tail, max(slot.tokens_out - 1, 0), resolved(slot.logprobs)))
        end_at = self.clock()
        first = slot.first_token_at or end_at
        end = Finished(
            job_id=job.job_id, stop_reason=reason, tokens_out=slot.tokens_out, prompt_tokens=len(job.prompt_tokens),
            ttft_s=first - job.submitted_at if slot.first_token_at else None, decode_s=end_at - first,
            stop_sequence=text.matched, cached_tokens=slot.cached,
            draft_tokens=slot.spec.proposed if slot.spec else 0, accepted_tokens=slot.spec.accepted if slot.spec else 0,
        )
        spec = {"draft_tokens": end.draft_tokens, "accepted_tokens": end.accepted_tokens,
                "acceptance_rate": round(end.acceptance_rate, 3)} if end.acceptance_rate is not None else {}
        if reason is StopReason.CANCELLED:
            self._narrate(job, "inference_cancelled", f"Cancelled job {job.job_id} after {slot.tokens_out} tokens.",
                          tokens_out=slot.tokens_out, level="warning")
        else:
            self._narrate(job, "inference_complete",
                          f"Finished job {job.job_id}: {slot.tokens_out} tokens, stopped by {reason.value}"
                          + (f"; {end.accepted_tokens} of {end.draft_tokens} proposed tokens accepted."
                             if spec else "."), tokens_out=slot.tokens_out, stop_reason=reason.value, **spec,
                          duration_ms=round((end_at - job.submitted_at) * 1000, 2),
                          tokens_per_sec=round(end.tokens_per_sec, 2))
        self._emit(job, end)
        self.metrics.job_finished(reason.value)
        self._release(slot, keep=True)

    def fail(self, slot: Slot, code: str, message: str) -> None:
        if slot.pending:
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
        if keep and self.prefix_cache:
            slot.prompt_cells = min(slot.kv_len, len(slot.job.prompt_tokens))
        else:
            self._drop_sequence(slot)  # a failed job's cells may not be what they should
        slot.job = slot.text = slot.guide = slot.spec = slot.sampler = None
        slot.pending = []
        slot.logprobs, slot.prompt_logprobs = [], []
        slot.cached = 0
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
        """Cells that some slot's sequence holds (running or cached)."""
        return sum(slot.kv_len for slot in self.slots)

    def kv_cells_running(self) -> int:
        return sum(slot.kv_len for slot in self.slots if slot.job is not None)

    def cells_cached(self) -> int:
        """Cells that idle slots keep for the next prompts."""
        return sum(slot.kv_len for slot in self.slots if slot.job is None)


Sampled = tuple[Slot, int, "TokenLogprob | LogprobOf | None"]  # a slot, its sampled token, its logprob if asked for

# a step's prompt tokens x the cells they attend to, past its first prompt: one chat turn over a 5k-token history.
# Chat turns 2-4 TTFT p50, 8 conversations on an H200 (1B): 37-45 ms with it, 53-58 ms with none, 58 ms at 1.2M.
PROMPT_ATTENTION_BUDGET = 512 * 1024
COSTLY_TRIAL_STEPS = 4  # a draft model's stretch is judged sooner: each of its steps costs proposing decodes
MIN_SHARED_PREFILL = 64  # a shorter common prefix is not worth waiting for another job's prefill
ATTACH_AFTER_TOKENS = 16  # a deferred chain waits at most this many tokens for arrivals to settle
MIN_COPY = 64  # a copy moves a slot's whole KV buffer: for fewer tokens, computing them is as quick
# Shorter sequences are not saved to RAM: computing them again is quick, and each entry is compared with every prompt
RAM_MIN_TOKENS = 256
