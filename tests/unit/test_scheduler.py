"""The engine's policy against a fake llama.cpp context: no model, no thread, milliseconds.

The fake "model" continues every sequence with the token after the last one it saw (t → t + 1); token 0 is
end-of-generation and each token's text is one letter, so outputs are predictable. Token ids over 1000 make the
fake decode fail, as a token outside the vocabulary makes llama_decode fail.
"""

from __future__ import annotations

import numpy as np
import pytest

from worker.engine import scheduler as scheduler_module
from worker.engine.core import EngineCore
from worker.engine.outputs import (
    Constraint,
    Draining,
    DuplicateJob,
    Failed,
    Finished,
    Job,
    Narrated,
    Output,
    Overloaded,
    Started,
    StopReason,
    TokenText,
)
from worker.engine.sampling import SamplingParams
from worker.engine.scheduler import Part, Scheduler
from worker.engine.speculative import NgramProposer, SlotSpeculation, SpecConfig, Stretch

EOG = 0
BAD = 1000
PROMPT_OUTPUTS = 64  # output rows the fake context keeps beyond one per sequence
VOCAB = 26


class FakeVocab:
    n_vocab = VOCAB

    def piece(self, token: int, special: bool = False) -> bytes:
        return bytes([ord("a") + token % 26])

    def is_eog(self, token: int) -> bool:
        return token == EOG


class FakeContext:
    """llama.cpp's unified KV cache as cells tagged with sequence ids, and a decode that checks every position."""

    def __init__(self, pool: int = 256, n_outputs: int = 2 + PROMPT_OUTPUTS) -> None:
        self.pool = pool  # cells per sequence (llama.cpp: n_ctx / n_seq)
        self.n_outputs = n_outputs
        self.batches: list[list[Part]] = []
        self.chains: dict[int, SamplingParams] = {}
        self.chain_ops: list[tuple[str, int]] = []
        self.free_when_idle = False  # an attached chain costs steps while idle (llama.cpp's samplers), or not (groups)
        self.retunes = False  # a chain in the graph takes other parameters of its shape (a group's draw), or not
        self.cells: list[tuple[int, int, set[int]]] = []  # (position, token, sequences)
        self.copies: list[tuple[int, int, int]] = []
        self._last: dict[int, int] = {}  # batch index → token there
        self._logits: dict[int, np.ndarray] = {}
        self.cpu_sampled: list[int] = []
        self.rows_read: list[int] = []  # sequences whose in-graph chain's row was read
        self.chain_in_graph: dict[int, bool] = {}  # seq → its chain samples in the decode graph
        self.logits_row: dict[int, bool] = {}  # seq → a sampler in the graph hands its logits over as they are
        self.hands_row: dict[int, bool] = {}  # seq → its chain in the graph hands over its row, not the token alone
        self.graph_changed = False  # the graph's samplers, since the last decode (llama.cpp re-reserves)
        self.in_graph_sampling = False  # chains not on the CPU sample in the decode graph (a GPU)
        self._seq_at: dict[int, int] = {}  # batch index → its sequence

    @property
    def kv(self) -> dict[int, set[int]]:
        """sequence → the positions it holds"""
        out: dict[int, set[int]] = {}
        for pos, _, seqs in self.cells:
            for seq in seqs:
                out.setdefault(seq, set()).add(pos)
        return out

    def tokens(self, seq: int) -> list[int]:
        return [tok for _, tok, seqs in sorted(self.cells, key=lambda c: c[0]) if seq in seqs]

    def use_chain(self, seq_id: int, params: SamplingParams, *, reuse: bool, on_cpu: bool = False,
                  logits_row: bool = False, hands_row: bool = False) -> None:
        assert not reuse or self.chains.get(seq_id) == params or self.retunable(seq_id, params)
        assert not reuse or self.hands_row.get(seq_id, False) == hands_row, "a chain reused for a job of another kind"
        assert not logits_row or on_cpu, "a logits row is for a chain on the CPU"
        self.chain_ops.append(("reuse" if reuse else "build", seq_id))
        self.chains[seq_id] = params
        self.hands_row[seq_id] = hands_row
        before = self._graph_sampler(seq_id)
        if not reuse:
            self.chain_in_graph[seq_id] = not on_cpu
        self.logits_row[seq_id] = logits_row
        self.graph_changed |= before != self._graph_sampler(seq_id) or (not reuse and not on_cpu)

    def _graph_sampler(self, seq_id: int) -> str | None:
        if seq_id not in self.chains:
            return None
        return "chain" if self.chain_in_graph.get(seq_id) else "row" if self.logits_row.get(seq_id) else None

    def idle_cost(self, seq_id: int) -> bool:
        return not self.free_when_idle

    def retunable(self, seq_id: int, params: SamplingParams) -> bool:
        held = self.chains.get(seq_id)
        return self.retunes and held is not None and held.top_k == params.top_k and self.chain_in_graph.get(seq_id)

    def drop_chain(self, seq_id: int) -> None:
        self.chain_ops.append(("drop", seq_id))
        self.graph_changed |= self._graph_sampler(seq_id) is not None
        del self.chains[seq_id]
        self.logits_row.pop(seq_id, None)

    def forget(self, seq_id: int) -> None:
        for _, _, seqs in self.cells:
            seqs.discard(seq_id)
        self.cells = [c for c in self.cells if c[2]]

    def keep_prefix(self, seq_id: int, n: int) -> None:
        for pos, _, seqs in self.cells:
            if pos >= n:
                seqs.discard(seq_id)
        self.cells = [c for c in self.cells if c[2]]

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        self.forget(dst)
        self.copies.append((src, dst, n))
        self.cells += [(pos, tok, {dst}) for pos, tok, seqs in list(self.cells) if src in seqs and pos < n]
        assert self.kv.get(dst, set()) == set(range(n)), "a prefix copied with holes"

    def reusable(self, src: int, n: int) -> bool:
        return True

    def decode(self, parts: list[Part]) -> int:
        if any(t >= BAD for part in parts for t in part.tokens):
            # llama.cpp takes back only the ubatch that failed: the parts before it (a ubatch each, here) stay
            for part in parts:
                if any(t >= BAD for t in part.tokens):
                    break
                self.cells.extend((part.pos + offset, token, {part.seq_id}) for offset, token in enumerate(part.tokens))
            return 1
        self.batches.append(list(parts))
        self.graph_changed = False
        self._last.clear()
        self._logits.clear()
        self._seq_at.clear()
        held = self.kv
        index = -1
        for part in parts:
            assert held.get(part.seq_id, set()) == set(range(part.pos)), "a sequence's positions must be 0..pos-1"
            for offset, token in enumerate(part.tokens):
                index += 1
                self.cells.append((part.pos + offset, token, {part.seq_id}))
                self._last[index] = token
                self._seq_at[index] = part.seq_id
        outputs = sum(len(p.tokens) if p.all_logits else p.logits for p in parts)
        assert outputs <= self.n_outputs, "llama.cpp aborts a batch with more outputs than its context keeps"
        for part in parts:  # llama.cpp's default (n_outputs_max_per_seq = 1): else decode returns -1
            in_graph = self.in_graph_sampling and self._graph_sampler(part.seq_id) == "chain"
            assert not in_graph or not part.all_logits or len(part.tokens) == 1, \
                "more than one output of a sequence whose chain samples in the graph"
        for seq, held in self.kv.items():
            assert len(held) <= self.pool, f"sequence {seq} overflowed its {self.pool} cells"
        return 0

    def sample(self, seq_id: int, index: int) -> int:
        assert seq_id in self.chains, "sampled without a chain"
        if index in self._logits and not (self.in_graph_sampling and self._graph_sampler(seq_id) == "chain"):
            return int(np.argmax(self._logits[index]))  # read (and maybe masked) on the CPU: the best token left
        return (self._last[index] + 1) % 26

    def sample_candidates(self, seq_id: int, ids: np.ndarray, values: np.ndarray) -> int:
        assert seq_id in self.chains, "sampled without a chain"
        self.cpu_sampled.append(seq_id)
        return int(ids[np.argmax(values)])

    def logits(self, index: int) -> np.ndarray:
        """The model's next token 4 logits above the rest (log-probability ~ -0.43 over 26 tokens). For a chain that
        draws in the graph: its own row, the logits at its temperature (llama.cpp copies what its last sampler
        leaves, unless it hands over the token alone)."""
        seq = self._seq_at[index]
        in_graph = self.in_graph_sampling and self._graph_sampler(seq) == "chain"
        assert not in_graph or self.hands_row[seq], "logits read of a chain in the graph that hands over a token alone"
        if index not in self._logits:
            self._logits[index] = np.zeros(VOCAB, dtype=np.float32)
            self._logits[index][(self._last[index] + 1) % 26] = 4.0
            if in_graph:
                self._logits[index] /= self.chains[seq].temperature
                self.rows_read.append(seq)
        return self._logits[index]

    def logits_rows(self, index: int, count: int) -> np.ndarray:
        return np.stack([self.logits(i) for i in range(index, index + count)])

    def synchronize(self) -> None:
        pass

    def quiet_log(self, quiet: bool) -> None:
        assert not (quiet and self.graph_changed), "a step after the graph's samplers changed is not steady"

    def close(self) -> None:
        pass


def engine(parallel: int = 2, max_queue: int = 4, batch_size: int = 64, prefix_cache: bool = False,
           **kw) -> tuple[EngineCore, FakeContext]:
    ctx = FakeContext(256)
    ctx.in_graph_sampling = kw.get("in_graph_sampling", False)
    return EngineCore(ctx, FakeVocab(), ctx_size=256, parallel=parallel, max_queue=max_queue, batch_size=batch_size,
                      prefix_cache=prefix_cache, **kw), ctx


def submit(core: EngineCore, job_id: str, prompt: list[int], **kw) -> list[Output]:
    got: list[Output] = []
    kw.setdefault("max_tokens", 4)
    kw.setdefault("params", SamplingParams(temperature=0))
    core.submit(Job(job_id=job_id, prompt_tokens=prompt, deliver=got.extend, **kw))
    return got


def run(core: EngineCore, steps: int = 400) -> None:
    for _ in range(steps):
        if core.idle:
            return
        core.step()
        core._publish()
        check_accounting(core)
    raise AssertionError("the engine did not finish its jobs")


def check_accounting(core: EngineCore) -> None:
    """The scheduler's view of the KV cache is llama.cpp's: the same tokens in each sequence, position by position."""
    sched, ctx = core.scheduler, core.ctx
    assert isinstance(ctx, FakeContext)
    for slot in sched.slots:
        assert slot.kv_tokens == ctx.tokens(slot.seq_id), slot.seq_id
    assert sched.kv_cells_used() == len(ctx.cells)


def text(outputs: list[Output]) -> str:
    return "".join(o.text for o in outputs if isinstance(o, TokenText))


def end(outputs: list[Output]) -> Finished:
    assert isinstance(outputs[-1], Finished), outputs[-1]
    return outputs[-1]


def test_tokens_become_text_and_max_tokens_ends_the_job():
    core, ctx = engine()
    got = submit(core, "a", [1, 2, 3], max_tokens=4)
    run(core)
    assert isinstance(got[0], Started) and got[0].prompt_tokens == 3
    assert text(got) == "efgh"  # 3 → 4 ("e"), 5, 6, 7
    assert end(got).stop_reason is StopReason.MAX_TOKENS and end(got).tokens_out == 4
    assert ctx.kv == {} and core.busy == 0


def test_end_of_generation_ends_the_job_without_its_token():
    core, _ = engine()
    got = submit(core, "a", [23], max_tokens=10)  # 24, 25, then 0 (EOG)
    run(core)
    assert text(got) == "yz" and end(got).stop_reason is StopReason.EOS and end(got).tokens_out == 2


def test_ignore_eos_generates_through_end_of_generation():
    core, _ = engine()
    got = submit(core, "a", [23], max_tokens=5, ignore_eos=True)
    run(core)
    assert end(got).tokens_out == 5 and end(got).stop_reason is StopReason.MAX_TOKENS


def test_a_stop_sequence_ends_the_job_and_never_reaches_the_text():
    core, ctx = engine()
    got = submit(core, "a", [1], max_tokens=10, stop=("de",))
    run(core)
    assert text(got) == "c" and end(got).stop_reason is StopReason.STOP_SEQUENCE and end(got).stop_sequence == "de"
    assert ctx.kv == {}


def test_the_text_is_the_same_when_it_is_done_while_the_next_step_runs():
    def outputs(overlap: bool) -> list[list[Output]]:
        core, ctx = engine(overlap=overlap)
        jobs = [submit(core, "a", [1], max_tokens=10, stop=("fg",)), submit(core, "b", [5], max_tokens=6),
                submit(core, "c", [2], max_tokens=1)]
        run(core)
        assert ctx.kv == {}
        return [[o for o in job if not isinstance(o, (Started, Finished))] + [end(job).stop_reason] for job in jobs]

    assert outputs(True) == outputs(False)


def test_jobs_wait_for_a_slot_and_take_it_in_order():
    core, _ = engine(parallel=1)
    a, b = submit(core, "a", [1], max_tokens=2), submit(core, "b", [1], max_tokens=2)
    core.step()
    core._publish()
    assert isinstance(a[0], Started) and b == [] and core.busy == 1 and core.waiting == 1
    run(core)
    assert text(a) == text(b) == "cd"


def test_the_queue_is_bounded_and_job_ids_are_unique_and_a_draining_engine_takes_nothing():
    core, _ = engine(parallel=1, max_queue=1)
    submit(core, "a", [1])
    submit(core, "b", [1])  # a is not admitted yet: with b, one waits beyond the free slot
    with pytest.raises(Overloaded):
        submit(core, "c", [1])
    with pytest.raises(DuplicateJob):
        submit(core, "a", [1])
    run(core)
    core.drain()
    with pytest.raises(Draining):
        submit(core, "d", [1])


def test_prompts_are_chunked_to_the_batch_and_decoding_sequences_go_first():
    core, ctx = engine(batch_size=4)
    first = submit(core, "a", [1], max_tokens=3)
    core.step()  # a's prompt
    second = submit(core, "b", list(range(1, 11)), max_tokens=1)
    core.step()
    core.step()
    assert [(p.seq_id, len(p.tokens), p.logits) for p in ctx.batches[1]] == [(0, 1, True), (1, 3, False)]
    assert [(p.seq_id, len(p.tokens), p.logits) for p in ctx.batches[2]] == [(0, 1, True), (1, 3, False)]
    run(core)
    assert [(p.seq_id, len(p.tokens), p.logits) for p in ctx.batches[3]] == [(1, 4, True)]
    assert [p.pos for p in ctx.batches[3]] == [6]
    assert text(first) == "cde" and text(second) == "l"


def test_a_steps_parts_are_in_sequence_order():
    """Over per-slot KV streams llama.cpp cuts a batch into ubatches of consecutive sequence ids, in the order each
    first appears: a prompt on slot 0 after a decoder on slot 1 would be evaluated apart from it."""
    core, ctx = engine(parallel=3, batch_size=64)
    submit(core, "a", [1, 2], max_tokens=1)
    submit(core, "b", [3, 4], max_tokens=8)
    core.step()  # a on slot 0, b on slot 1
    core.step()
    core._publish()  # a ended: slot 0 is free, b decodes on slot 1
    submit(core, "c", [5, 6, 7], max_tokens=2)
    submit(core, "d", [8, 9], max_tokens=2)
    core.step()
    assert [(p.seq_id, len(p.tokens)) for p in ctx.batches[-1]] == [(0, 3), (1, 1), (2, 2)]
    run(core)


def test_prompts_over_long_histories_take_a_step_each_in_the_order_they_came(monkeypatch):
    """A step's time grows with its prompts' tokens x their sequences' cells: a burst of chat turns in one step held
    each of them back for all. Short prompts still share a step; a prompt alone is never held back."""
    monkeypatch.setattr(scheduler_module, "PROMPT_ATTENTION_BUDGET", 40 * 40)
    core, ctx = engine(parallel=4, batch_size=128)
    late = submit(core, "late", list(range(1, 41)), max_tokens=2)
    early = submit(core, "early", list(range(41, 81)), max_tokens=2)
    core._inbox[0].submitted_at, core._inbox[1].submitted_at = 2.0, 1.0  # "early" came first, "late" has the lower slot
    small = [submit(core, f"s{i}", [1, 2, 3], max_tokens=2) for i in range(2)]
    core.step()
    prompts = lambda batch: sorted(len(p.tokens) for p in batch if not p.n_draft and len(p.tokens) > 1)
    assert prompts(ctx.batches[0]) == [40]  # "early" alone: 40 x 40 fills the budget
    assert [t for p in ctx.batches[0] for t in p.tokens] == list(range(41, 81))
    core.step()
    assert prompts(ctx.batches[1]) == [40]  # then "late", which the short ones came after
    core.step()
    assert prompts(ctx.batches[2]) == [3, 3]  # 9 + 9 cells: both
    run(core)
    assert all(end(o).tokens_out == 2 for o in (late, early, *small))
    huge = submit(core, "huge", list(range(1, 101)), max_tokens=1)  # over the budget alone: all of it at once
    run(core)
    assert len(ctx.batches[-1][0].tokens) == 100 and end(huge).tokens_out == 1


def test_split_steps_give_prompts_and_decoders_turns_and_the_text_stays_the_same():
    """Over per-slot streams on a GPU a step of prompts and decoders is two graph evaluations: prompts go alone
    right after a step with decoders, then the decoders; neither kind of step waits more than one step."""
    def jobs(core: EngineCore) -> list[list[Output]]:
        first = submit(core, "a", [1, 2], max_tokens=6)
        core.step()  # a's prompt
        core.step()  # a decodes
        return [first, submit(core, "b", list(range(3, 13)), max_tokens=3),
                submit(core, "c", list(range(13, 19)), max_tokens=2)]

    plain, plain_ctx = engine(parallel=3, batch_size=4)
    expected = jobs(plain)
    run(plain)
    core, ctx = engine(parallel=3, batch_size=4, split_prompt_steps=True)
    got = jobs(core)
    run(core)
    assert [text(o) for o in got] == [text(o) for o in expected]
    assert all(end(o).tokens_out == n for o, n in zip(got, (6, 3, 2), strict=True))
    # every prompt chunk here is longer than a token: a step is p (prompts), d (decoders) or m (both)
    kind = lambda batch: "".join(sorted({"p" if len(p.tokens) > 1 else "d" for p in batch})).replace("dp", "m")
    assert "m" in "".join(kind(b) for b in plain_ctx.batches)
    # b's 10 tokens and c's 6 in chunks of at most 4 (b's 2 and c's 2 share one), a decoding between them
    assert "".join(kind(b) for b in ctx.batches) == "pdpdpdpdpd" + "d" * (len(ctx.batches) - 10)
    # at an idle engine: the first step's prompts end a's; a's decoder has not waited yet, so b's next chunk goes
    # first (requests that start together get their first tokens without a decode step between their prompts), then
    # a decodes, having waited one step, and they take turns
    core, ctx = engine(parallel=3, batch_size=4, split_prompt_steps=True)
    a = submit(core, "a", [1, 2], max_tokens=4)
    b = submit(core, "b", list(range(3, 13)), max_tokens=2)
    run(core)
    assert "".join(kind(b) for b in ctx.batches)[:5] == "ppdpd"
    assert end(a).tokens_out == 4 and end(b).tokens_out == 2


def test_cancel_while_waiting_ends_without_a_start_and_while_running_frees_the_slot():
    core, ctx = engine(parallel=1)
    running = submit(core, "a", [1], max_tokens=50, narration=True)
    waiting = submit(core, "b", [1], max_tokens=50, narration=True)
    core.step()
    core.step()
    assert core.cancel("b") and core.cancel("a")
    assert not core.cancel("nobody")
    run(core)
    assert not any(isinstance(o, Started) for o in waiting)
    assert end(waiting).stop_reason is StopReason.CANCELLED and end(waiting).ttft_s is None
    assert [o.event["action"] for o in waiting if isinstance(o, Narrated)] == ["inference_cancelled"]
    assert end(running).stop_reason is StopReason.CANCELLED and 0 < end(running).tokens_out < 50
    assert ctx.kv == {} and core.busy == 0 and core.idle


def test_timeout_while_waiting_and_while_running():
    core, _ = engine(parallel=1)
    running = submit(core, "a", [1], max_tokens=50, timeout=60.0)
    waiting = submit(core, "b", [1], max_tokens=50, timeout=0.0)
    core.step()
    core.step()
    running_job = core._jobs["a"]
    running_job.timeout = 0.0  # its deadline has passed
    run(core)
    assert end(waiting).stop_reason is StopReason.TIMEOUT and not any(isinstance(o, Started) for o in waiting)
    assert end(running).stop_reason is StopReason.TIMEOUT and end(running).tokens_out >= 1


def test_a_failed_decode_ends_only_the_sequence_that_fails():
    core, ctx = engine()
    solo = submit(core, "solo", [1], max_tokens=6)
    run(core)
    good, bad = submit(core, "good", [1], max_tokens=6), submit(core, "bad", [1, BAD], max_tokens=6)
    run(core)
    assert isinstance(bad[-1], Failed) and bad[-1].code == "decode_failed"
    assert text(good) == text(solo) and end(good).tokens_out == 6
    assert ctx.kv == {} and core.busy == 0


def test_an_exception_in_a_step_fails_the_running_jobs_and_the_engine_goes_on():
    core, ctx = engine()
    got = submit(core, "a", [1], max_tokens=6)
    core.step()

    def broken(seq_id: int, index: int) -> int:
        raise RuntimeError("boom")

    sample, ctx.sample = ctx.sample, broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        core.step()
    core.scheduler.fail_running("internal_error", "RuntimeError: boom")  # what the engine thread does
    core._publish()
    assert isinstance(got[-1], Failed) and got[-1].code == "internal_error"
    ctx.sample = sample  # type: ignore[method-assign]
    after = submit(core, "b", [1], max_tokens=2)
    run(core)
    assert text(after) == "cd"


def test_a_slot_keeps_its_chain_for_a_job_with_the_same_parameters():
    core, ctx = engine(parallel=2)
    warm = SamplingParams(temperature=0.8, seed=1)
    submit(core, "a", [1], params=warm)
    submit(core, "b", [1], params=SamplingParams(temperature=0))
    run(core)
    submit(core, "c", [1], params=warm)
    run(core)
    assert ctx.chain_ops == [("build", 0), ("build", 1), ("reuse", 0)]


def test_idle_in_graph_chains_are_detached_and_that_makes_the_next_step_unsteady():
    ctx = FakeContext()
    sched = Scheduler(n_slots=2, batch_size=16, resources=ctx, vocab=FakeVocab(), in_graph_sampling=True,
                      chain_idle_s=1.0, clock=lambda: 0.0)
    sched.add(Job("a", [1], SamplingParams(), 1, deliver=lambda outs: None))
    assert not sched.schedule(0.0).steady  # a new chain in the graph: llama.cpp re-reserves
    sched.update([(sched.slots[0], 5, None)], 0.0)  # max_tokens 1: the job ends, its chain stays
    assert sched.schedule(0.5).parts == [] and ctx.chains
    sched.schedule(2.0)
    assert ctx.chains == {} and ctx.chain_ops[-1] == ("drop", 0)
    sched.add(Job("b", [1], SamplingParams(), 1, deliver=lambda outs: None))
    assert not sched.schedule(2.1).steady


def test_an_idle_chain_that_costs_nothing_stays_for_the_next_job():
    ctx = FakeContext()
    ctx.free_when_idle = True  # a group's draw: an idle sequence is left out of the graph
    sched = Scheduler(n_slots=2, batch_size=16, resources=ctx, vocab=FakeVocab(), in_graph_sampling=True,
                      chain_idle_s=1.0, clock=lambda: 0.0)
    seeded = SamplingParams(seed=1)  # attached at once (a new unseeded one samples its first tokens on the CPU)
    sched.add(Job("a", [1], seeded, 1, deliver=lambda outs: None))
    sched.schedule(0.0)
    sched.update([(sched.slots[0], 5, None)], 0.0)
    sched.schedule(60.0)
    assert ctx.chains and ("drop", 0) not in ctx.chain_ops
    sched.add(Job("b", [1], seeded, 1, deliver=lambda outs: None))
    assert sched.schedule(60.1).parts and ctx.chain_ops[-1] == ("reuse", 0)


def test_a_chain_that_takes_other_parameters_of_its_shape_is_reused_for_them():
    ctx = FakeContext()
    ctx.retunes = True  # a group's draw: temperature, p and seed are its inputs
    sched = Scheduler(n_slots=2, batch_size=16, resources=ctx, vocab=FakeVocab(), in_graph_sampling=True,
                      clock=lambda: 0.0)
    sched.add(Job("a", [1], SamplingParams(temperature=0.7, top_k=40, seed=1), 1, deliver=lambda outs: None))
    sched.schedule(0.0)
    sched.update([(sched.slots[0], 5, None)], 0.0)
    sched.add(Job("b", [1], SamplingParams(temperature=1.2, top_k=40, top_p=0.9), 1, deliver=lambda outs: None))
    assert sched.schedule(0.1).parts and ctx.chain_ops == [("build", 0), ("reuse", 0)]
    assert sched.slots[0].chain_params == SamplingParams(temperature=1.2, top_k=40, top_p=0.9)
    sched.update([(sched.slots[0], 5, None)], 0.1)
    sched.add(Job("c", [1], SamplingParams(temperature=1.2, top_k=5), 1, deliver=lambda outs: None))
    sched.schedule(0.2)  # another shape: a chain of its own
    assert ctx.chain_ops[-1][0] == "build"


def test_new_in_graph_chains_wait_for_the_first_tokens_of_jobs_that_arrive_together():
    core, ctx = engine(parallel=3, in_graph_sampling=True, overlap=True)
    a = submit(core, "a", [1, 2, 3], max_tokens=6, params=SamplingParams(temperature=0))
    b = submit(core, "b", [4, 5], max_tokens=6, params=SamplingParams(temperature=0.7, top_k=5))
    core.step()  # both prompts; their first tokens sampled by numpy from the logits read on the CPU
    assert ctx.chain_in_graph == {0: False, 1: False}
    c = submit(core, "c", [7], max_tokens=6, params=SamplingParams(temperature=0))
    core.step()  # another arrival: the chains wait for it too
    assert ctx.chain_in_graph == {0: False, 1: False, 2: False}
    core.step()  # nobody new: all three join the graph in one step (one re-reservation)
    assert ctx.chain_in_graph == {0: True, 1: True, 2: True}
    run(core)
    assert text(a) == "efghij" and text(c) == "ijklmn" and end(b).tokens_out == 6


def test_new_chains_wait_for_the_prompts_that_take_a_step_each(monkeypatch):
    # prompts over long histories take a step each (PROMPT_ATTENTION_BUDGET); attaching each one's chain as its
    # first token came re-reserved llama.cpp's graph every step (~45 ms each on an H200, 5k-token histories)
    monkeypatch.setattr(scheduler_module, "PROMPT_ATTENTION_BUDGET", 30 * 30)
    core, ctx = engine(parallel=3, in_graph_sampling=True, overlap=True)
    outs = [submit(core, f"j{i}", list(range(1 + 30 * i, 31 + 30 * i)), max_tokens=8,
                   params=SamplingParams(temperature=0)) for i in range(3)]
    joined = []  # the steps in which chains joined the graph
    for step in range(6):
        before = sum(ctx.chain_in_graph.values())
        core.step()
        if sum(ctx.chain_in_graph.values()) > before:
            joined.append(step)
    assert joined == [3] and all(ctx.chain_in_graph.values())  # after the third prompt's first token, together
    run(core)
    assert all(end(o).tokens_out == 8 for o in outs)


def test_a_job_that_reads_its_logits_beside_chains_in_the_graph_gets_its_own_logits_row():
    """Without a sampler in the graph, llama.cpp copies every output row's logits for the one job that reads its own;
    a logits row keeps that copy to the job's row. The next such job (any parameters) takes that slot, and the
    graph's samplers stay as they were: no re-reservation."""
    ctx = FakeContext()
    sched = Scheduler(n_slots=2, batch_size=16, resources=ctx, vocab=FakeVocab(), in_graph_sampling=True,
                      clock=lambda: 0.0)
    # greedy: a chain in the graph would hand over its maximum alone, not the row logprobs need (Scheduler.reads_row)
    sched.add(Job("a", [1], SamplingParams(temperature=0, top_k=5), 1, deliver=lambda outs: None, logprobs=1))
    sched.schedule(0.0)
    assert ctx.graph_changed and ctx.logits_row == {0: True} and ctx.chain_in_graph == {0: False}
    ctx.decode([])
    sched.update([(sched.slots[0], 5, None)], 0.0)  # max_tokens 1: ended; the row stays with the slot
    sched.add(Job("b", [1], SamplingParams(temperature=0), 1, deliver=lambda outs: None, logprobs=0))
    plan = sched.schedule(0.1)
    assert plan.slots == [sched.slots[0]] and not ctx.graph_changed and ctx.logits_row == {0: True}
    sched.update([(sched.slots[0], 5, None)], 0.1)
    sched.add(Job("c", [1], SamplingParams(temperature=0), 1, deliver=lambda outs: None))
    sched.schedule(0.2)  # a plain job there samples on the CPU, its row kept, until its chain is attached
    assert not ctx.graph_changed and ctx.logits_row == {0: True} and sched.slots[0].attach_pending


def test_a_seeded_job_samples_in_the_graph_from_its_first_token():
    core, ctx = engine(in_graph_sampling=True)
    got = submit(core, "a", [1, 2, 3], max_tokens=3, params=SamplingParams(temperature=0.7, seed=3))
    core.step()
    assert ctx.chain_in_graph == {0: True}  # its tokens must not depend on when its chain joined
    run(core)
    assert end(got).tokens_out == 3


def test_outputs_come_in_order_and_the_metrics_see_every_token():
    class Recorder:
        def __init__(self) -> None:
            self.events: list[tuple] = []

        def job_admitted(self, queue_wait_s: float, prompt_tokens: int, cached_tokens: int) -> None:
            self.events.append(("admitted", prompt_tokens))

        def prefix_evicted(self, cells: int) -> None:
            self.events.append(("evicted", cells))

        def token_generated(self, ttft_s: float | None, itl_s: float | None) -> None:
            self.events.append(("token", ttft_s is not None, itl_s is not None))

        def job_finished(self, stop_reason: str) -> None:
            self.events.append(("finished", stop_reason))

        def job_failed(self, code: str) -> None:
            self.events.append(("failed", code))

    metrics = Recorder()
    core, _ = engine(metrics=metrics)
    got = submit(core, "a", [1, 2], max_tokens=3, narration=True)
    run(core)
    kinds = [type(o).__name__ if not isinstance(o, Narrated) else o.event["action"] for o in got]
    assert kinds == ["Started", "inference_start", "TokenText", "TokenText", "TokenText", "inference_complete",
                     "Finished"]
    assert metrics.events == [("admitted", 2), ("token", True, False), ("token", False, True),
                              ("token", False, True), ("finished", "max_tokens")]


# ---- the prefix cache ------------------------------------------------------------------------------------------


def test_a_cached_prefix_is_taken_and_only_the_rest_is_prefilled():
    core, ctx = engine(parallel=1, prefix_cache=True)
    system = list(range(1, 21))
    first = submit(core, "a", system + [3, 4], max_tokens=3)
    run(core)
    second = submit(core, "b", system + [5, 6, 7], max_tokens=3)
    run(core)
    assert isinstance(second[0], Started) and second[0].cached_tokens == 20
    assert end(second).cached_tokens == 20 and end(first).cached_tokens == 0
    assert [len(b[0].tokens) for b in ctx.batches if b[0].pos == 20] == [3]  # b decoded only its own 3 tokens
    assert text(second) == "ijk"


def test_the_next_turn_reuses_the_prompt_and_recomputes_the_reply():
    """Cells of generated tokens were computed one at a time: reusing them would change greedy text (see
    Scheduler._reusable_cells), so a follow-up takes the earlier prompt's cells and computes the reply again."""
    core, _ = engine(parallel=1, prefix_cache=True)
    turn1 = [1, 2, 3, 4]
    got = submit(core, "a", turn1, max_tokens=3)  # 5, 6, 7: cells hold 1 2 3 4 5 6 (7 was never decoded)
    run(core)
    turn2 = turn1 + [5, 6, 7] + [9, 9]
    again = submit(core, "b", turn2, max_tokens=2)
    run(core)
    assert text(got) == "fgh" and again[0].cached_tokens == 4
    third = submit(core, "c", turn2 + [11, 12], max_tokens=2)  # turn 2's prompt was computed as a prompt
    run(core)
    assert third[0].cached_tokens == len(turn2)


def test_on_a_gpu_the_next_turn_reuses_the_reply_too_and_computes_one_token():
    """Without exact prefixes (a GPU) every cell is reused, as llama-server does, and one prompt token is computed:
    the step of a cache hit has a decode step's shape."""
    core, ctx = engine(parallel=1, prefix_cache=True, offloaded=True)
    turn1 = [1, 2, 3, 4]
    got = submit(core, "a", turn1, max_tokens=3)  # cells hold 1 2 3 4 5 6 (7 was never decoded)
    run(core)
    turn2 = turn1 + [5, 6, 7] + [9, 9]
    again = submit(core, "b", turn2, max_tokens=2)
    run(core)
    assert text(got) == "fgh" and again[0].cached_tokens == 6  # the reply's cells too: 7 and the message computed
    same = submit(core, "c", turn2, max_tokens=2)
    run(core)
    assert same[0].cached_tokens == len(turn2) - 1
    assert [len(b[0].tokens) for b in ctx.batches][-2:] == [1, 1]  # its prompt step is one token, as decoding


def test_a_job_goes_to_the_slot_that_holds_its_conversation():
    core, _ = engine(parallel=3, prefix_cache=True)
    conversations = [[c] * 30 for c in (1, 2, 3)]
    for i, prompt in enumerate(conversations):
        submit(core, f"t1-{i}", prompt, max_tokens=2)
    run(core)
    second = [submit(core, f"t2-{i}", prompt + [prompt[0] + 1, 9], max_tokens=2)
              for i, prompt in enumerate(conversations)]
    run(core)
    assert [o[0].cached_tokens for o in second] == [30, 30, 30]


def test_a_long_prefix_held_by_another_slot_is_copied_rather_than_computed():
    core, ctx = engine(parallel=2, prefix_cache=True)
    system = [7] * 100
    submit(core, "a", system + [1], max_tokens=40)
    for _ in range(3):  # a's prompt is in, and it is decoding: its slot is busy
        core.step()
    b = submit(core, "b", system + [2, 3], max_tokens=2)
    run(core)
    assert b[0].cached_tokens == 100 and ctx.copies == [(0, 1, 100)]


def test_concurrent_jobs_with_one_long_prefix_prefill_it_once():
    core, ctx = engine(parallel=4, batch_size=32, prefix_cache=True)
    system = [7] * 200
    jobs = [submit(core, f"j{i}", system + [i + 1], max_tokens=2) for i in range(4)]
    run(core)
    prefilled = sum(max(0, min(len(p.tokens), 200 - p.pos)) for batch in ctx.batches for p in batch)
    assert prefilled == 200 + 3  # once, not four times (the others compute their last two tokens)
    assert sorted(j[0].cached_tokens for j in jobs) == [0, 199, 199, 199]


def test_a_failed_job_leaves_nothing_cached_and_others_reuse_what_is_good():
    core, ctx = engine(parallel=2, prefix_cache=True)
    bad = submit(core, "bad", [1, 2, BAD], max_tokens=2)
    run(core)
    assert isinstance(bad[-1], Failed) and ctx.cells == []
    good = submit(core, "good", [1, 2, 3], max_tokens=2)
    run(core)
    assert good[0].cached_tokens == 0 and end(good).tokens_out == 2


@pytest.mark.parametrize("where", ["cpu", "gpu"])
def test_hundreds_of_random_jobs_and_cancels_keep_the_accounting_exact(where):
    import random

    rng = random.Random(3)
    gpu = dict(in_graph_sampling=True, overlap=True, offloaded=True, split_prompt_steps=True,
               speculation=SpecConfig(n_max=3, fixed_length=True, settle_steps=1)) if where == "gpu" else {}
    core, ctx = engine(parallel=3, batch_size=16, max_queue=1000, prefix_cache=True, **gpu)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=5),
              SamplingParams(temperature=0.7, seed=1)]
    prompts = [[rng.randrange(1, 20) for _ in range(rng.randrange(1, 120))] for _ in range(12)]
    live: list[str] = []
    for i in range(300):
        base = rng.choice(prompts)
        prompt = base[: rng.randrange(1, len(base) + 1)] + [rng.randrange(1, 20) for _ in range(rng.randrange(3))]
        submit(core, f"j{i}", prompt, max_tokens=rng.randrange(1, 30), stop=("xyz",) if rng.random() < 0.2 else (),
               timeout=0.0 if rng.random() < 0.05 else None, params=rng.choice(params),
               logprobs=2 if rng.random() < 0.15 else None,  # read on the CPU: a logits row in the graph
               prompt_logprobs=1 if rng.random() < 0.05 else None)
        live.append(f"j{i}")
        for _ in range(rng.randrange(4)):
            core.step()
            core._publish()
            check_accounting(core)
        if rng.random() < 0.3:
            core.cancel(rng.choice(live))
    run(core, steps=20_000)
    sched = core.scheduler
    assert core.busy == 0 and not sched.waiting
    assert sched.cells_cached() == sched.kv_cells_used() == len(ctx.cells) > 0
    for slot in sched.slots:  # each slot's chain is where the scheduler thinks it is
        if slot.chain_params is not None:
            assert ctx.chains[slot.seq_id] == slot.chain_params
            if where == "gpu":
                assert ctx.chain_in_graph[slot.seq_id] == (not slot.chain_on_cpu)
                assert ctx.logits_row[slot.seq_id] == slot.logits_row


# ---- logits read on the CPU: logprobs, the prompt's logprobs, constraints ------------------------------------


def test_logprobs_are_the_models_and_come_with_their_tokens_text():
    core, _ = engine()
    got = submit(core, "a", [1, 2, 3], max_tokens=3, logprobs=2)
    run(core)
    pieces = [o for o in got if isinstance(o, TokenText)]
    logprobs = [lp for o in pieces for lp in o.logprobs]
    assert [lp.token for lp in logprobs] == [4, 5, 6] and text(got) == "efg"
    expected = 4.0 - np.log(np.exp(4.0) + 25)  # the fake model: its next token 4 logits above 25 others
    for lp in logprobs:
        assert lp.logprob == pytest.approx(expected, rel=1e-6)
        assert len(lp.top) == 2 and lp.top[0].token == lp.token and lp.top[0].logprob == pytest.approx(expected)
        assert lp.top[1].logprob == pytest.approx(-np.log(np.exp(4.0) + 25), rel=1e-6)
        assert lp.piece == FakeVocab().piece(lp.token)


def test_jobs_without_logprobs_never_read_logits():
    core, ctx = engine()
    read = []
    ctx.logits = lambda index: read.append(index)  # type: ignore[method-assign]
    got = submit(core, "a", [1, 2, 3], max_tokens=3)
    run(core)
    assert text(got) == "efg" and not read
    assert all(o.logprobs == () for o in got if isinstance(o, TokenText))


def test_prompt_logprobs_come_first_and_say_how_likely_each_prompt_token_was():
    core, ctx = engine(prefix_cache=True, batch_size=512)
    prompt = [1, 2, 3, 9] + list(range(4, 25)) * 5  # 109 tokens: more than one step's worth of prompt logits
    first = submit(core, "warm", prompt, max_tokens=1)
    run(core)
    got = submit(core, "a", prompt, max_tokens=2, prompt_logprobs=1)
    run(core)
    assert end(first).cached_tokens == 0 and end(got).cached_tokens == 0  # computed afresh, not taken from cache
    kinds = [type(o).__name__ for o in got]
    assert kinds[:2] == ["Started", "PromptLogprobs"] and kinds[-1] == "Finished"
    lps = got[1].tokens  # type: ignore[union-attr]
    assert len(lps) == len(prompt) and lps[0] is None
    likely, unlikely = 4.0 - np.log(np.exp(4.0) + 25), -np.log(np.exp(4.0) + 25)
    assert lps[1].token == 2 and lps[1].logprob == pytest.approx(likely, rel=1e-6)  # the model predicts t+1
    assert lps[3].token == 9 and lps[3].logprob == pytest.approx(unlikely, rel=1e-6)  # 9 after 3: not predicted
    assert lps[3].top[0].token == 4
    prompt_parts = [p for batch in ctx.batches[-3:] for p in batch if p.all_logits]
    assert prompt_parts and max(len(p.tokens) for p in prompt_parts) <= PROMPT_OUTPUTS


class EvenTokens:
    """A constraint that allows even tokens only and is complete after three tokens."""

    def __init__(self, allow_none: bool = False, breaks_after: int | None = None) -> None:
        self.consumed: list[int] = []
        self.allow_none = allow_none
        self.breaks_after = breaks_after  # the grammar cannot go on after this many tokens (llguidance's error)
        self.prepared = 0  # masks computed ahead, while the step computes

    @property
    def error(self) -> str | None:
        if self.allow_none:
            return "nothing allowed"
        return "too many items" if self.breaks_after is not None and len(self.consumed) >= self.breaks_after else None

    @property
    def stopped(self) -> bool:  # as llguidance's matcher, also on an error
        return len(self.consumed) == 3 or self.error is not None

    def prepare(self, *, listed: bool = False) -> None:
        self.prepared += 1

    def allowed(self) -> np.ndarray:
        if self.allow_none:
            return np.arange(0)
        return np.array([t for t in range(0, VOCAB, 2) if t != EOG])  # no end before the grammar is complete

    def allows(self, token: int) -> bool:
        return token in self.allowed()

    def mask_bits(self) -> np.ndarray:
        bits = np.zeros(VOCAB, dtype=np.uint8)
        bits[self.allowed()] = 1
        return bits

    def consume(self, token: int) -> None:
        self.consumed.append(token)


class FakeGrammars:
    def __init__(self, **kw) -> None:
        self.kw = kw
        self.guides: list[EvenTokens] = []

    def guide(self, constraint: Constraint) -> EvenTokens:
        self.guides.append(EvenTokens(**self.kw))
        return self.guides[-1]


# greedy: the maximum kept where allowed; at a temperature: a draw prepared with the mask in its noise
CONSTRAINED_SAMPLING = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=1)]


@pytest.mark.parametrize("params", CONSTRAINED_SAMPLING, ids=["greedy", "drawn"])
def test_a_constrained_job_samples_only_what_its_grammar_allows_and_ends_when_it_is_complete(params):
    grammars = FakeGrammars()
    core, _ = engine(grammars=grammars)
    got = submit(core, "a", [1, 2, 3], max_tokens=10, constraint=Constraint("json_object"), params=params)
    free = submit(core, "b", [1, 2, 3], max_tokens=3)
    run(core)
    assert all(t % 2 == 0 for t in grammars.guides[0].consumed) and len(grammars.guides[0].consumed) == 3
    assert end(got).stop_reason is StopReason.EOS and end(got).tokens_out == 3
    assert text(free) == "efg"  # its neighbour in the batch is not constrained


@pytest.mark.parametrize("params", CONSTRAINED_SAMPLING, ids=["greedy", "drawn"])
def test_a_constraint_that_allows_nothing_fails_its_job_alone(params):
    core, _ = engine(grammars=FakeGrammars(allow_none=True))
    got = submit(core, "a", [1, 2, 3], max_tokens=10, constraint=Constraint("json_object"), params=params)
    free = submit(core, "b", [1, 2, 3], max_tokens=3)
    run(core)
    assert isinstance(got[-1], Failed) and got[-1].code == "constraint_failed"
    assert text(free) == "efg" and end(free).stop_reason is StopReason.MAX_TOKENS


@pytest.mark.parametrize("params", CONSTRAINED_SAMPLING, ids=["greedy", "drawn"])
def test_a_constraint_that_breaks_after_a_token_fails_its_job_with_that_token_sent(params):
    """llguidance's matcher stops on an error too (a grammar with no end, found as the tokens come): the job fails,
    and never ends as if its grammar were complete."""
    core, _ = engine(grammars=FakeGrammars(breaks_after=2))
    got = submit(core, "a", [1, 2, 3], max_tokens=10, constraint=Constraint("json_object"), params=params)
    run(core)
    assert isinstance(got[-1], Failed) and got[-1].code == "constraint_failed" and "too many items" in got[-1].message
    assert len(text(got)) == 2 and not any(isinstance(o, Finished) for o in got)


def test_on_the_gpu_a_job_sampled_on_the_cpu_runs_every_step_with_its_in_graph_neighbours():
    grammars = FakeGrammars()
    core, ctx = engine(in_graph_sampling=True, overlap=True, grammars=grammars)
    got = submit(core, "a", [1, 2, 3], max_tokens=3, constraint=Constraint("json_object"), logprobs=0)
    free = submit(core, "b", [1, 2, 3], max_tokens=3)
    run(core)
    assert end(got).tokens_out == 3 and text(free) == "efg"
    assert [len(batch) for batch in ctx.batches] == [2, 2, 2]
    # masked logits, sampled by numpy on the CPU; each mask computed after its step was queued
    assert ctx.cpu_sampled == [] and grammars.guides[0].prepared == 3


def test_on_the_gpu_a_sampled_constrained_job_draws_in_the_graph_and_again_only_where_its_guide_refuses():
    grammars = FakeGrammars()
    core, ctx = engine(in_graph_sampling=True, overlap=True, grammars=grammars)
    params = SamplingParams(temperature=0.7, seed=3)  # seeded: its chain joins the graph at once
    got = submit(core, "a", [1, 2, 3], max_tokens=10, constraint=Constraint("json_object"), params=params)
    free = submit(core, "b", [1, 2, 3], max_tokens=3)
    run(core)
    consumed = grammars.guides[0].consumed
    assert len(consumed) == 3 and all(t % 2 == 0 for t in consumed) and end(got).stop_reason is StopReason.EOS
    assert ctx.chain_in_graph[0] and text(free) == "efg"
    # the graph draws the fake model's next token (t + 1): after the prompt's 3 a 4, allowed; after an even token
    # an odd one, refused and drawn again from the chain's row
    drawn = [(last + 1) % 26 for last in [3, *consumed[:-1]]]
    assert drawn[0] == consumed[0] == 4 and all(t % 2 for t in drawn[1:])
    assert ctx.rows_read == [0, 0]
    assert ctx.cpu_sampled == [] and grammars.guides[0].prepared == 3  # the masks, while each step computed


def test_a_constrained_job_whose_chain_joins_the_graph_later_is_checked_from_then_on():
    grammars = FakeGrammars()
    core, ctx = engine(in_graph_sampling=True, overlap=True, grammars=grammars)
    got = submit(core, "a", [1, 2, 3], max_tokens=10, constraint=Constraint("json_object"),
                 params=SamplingParams(temperature=0.7))  # no seed: drawn on the CPU until its chain is attached
    core.step()
    assert not ctx.chain_in_graph[0] and ctx.rows_read == []
    run(core)
    assert ctx.chain_in_graph[0] and ctx.rows_read  # then drawn in the graph, and again where refused
    assert all(t % 2 == 0 for t in grammars.guides[0].consumed) and end(got).stop_reason is StopReason.EOS


def test_a_chain_in_the_graph_hands_over_its_row_only_to_a_job_that_reads_it():
    """A plain job's chain hands over its token alone (token_only_sampler); a constrained job with the same
    parameters on the same slot gets a chain that hands over its row, and a plain one after it the token again."""
    grammars = FakeGrammars()
    core, ctx = engine(parallel=1, in_graph_sampling=True, overlap=True, grammars=grammars)
    params = SamplingParams(temperature=0.7, seed=3)
    first = submit(core, "a", [1, 2, 3], max_tokens=3, params=params)
    run(core)
    assert text(first) == "efg" and ctx.chain_in_graph[0] and not ctx.hands_row[0]
    got = submit(core, "b", [1, 2, 3], max_tokens=10, constraint=Constraint("json_object"), params=params)
    run(core)
    assert ctx.hands_row[0] and ctx.rows_read and end(got).stop_reason is StopReason.EOS
    last = submit(core, "c", [1, 2, 3], max_tokens=3, params=params)
    run(core)
    assert text(last) == "efg" and not ctx.hands_row[0]
    assert [op for op, _ in ctx.chain_ops] == ["build", "build", "build"]


def test_a_penalized_job_read_on_the_cpu_keeps_llama_cpps_chain():
    grammars = FakeGrammars()
    core, ctx = engine(in_graph_sampling=True, overlap=True, grammars=grammars)
    params = SamplingParams(temperature=0, repetition_penalty=1.3)
    got = submit(core, "a", [1, 2, 3], max_tokens=3, constraint=Constraint("json_object"), params=params)
    run(core)
    assert end(got).tokens_out == 3 and ctx.cpu_sampled == [0, 0, 0]  # the chain sees the history it penalizes


# ---- speculative decoding ------------------------------------------------------------------------------------

REPEATING = [5, 6, 7, 8, 9, 10, 5, 6, 7]  # the fake continues t -> t+1; what followed "6 7 8" is proposed


def test_speculation_gives_the_same_text_in_fewer_steps_and_frees_the_rejected_cells():
    plain_core, plain_ctx = engine()
    plain = submit(plain_core, "a", REPEATING, max_tokens=12)
    run(plain_core)
    core, ctx = engine(speculation=SpecConfig(n_max=4))
    got = submit(core, "a", REPEATING, max_tokens=12)
    run(core)  # check_accounting after every step: the scheduler's cells are llama.cpp's, rejected ones freed
    assert text(got) == text(plain) and end(got).tokens_out == end(plain).tokens_out == 12
    assert len(ctx.batches) < len(plain_ctx.batches)
    drafted = [p for batch in ctx.batches for p in batch if p.n_draft]
    assert drafted[0].all_logits and drafted[0].tokens == [8, 9, 10, 5, 6]  # after "6 7 8": "9 10 5 6"
    e = end(got)
    assert e.draft_tokens > 0 and 0 < e.accepted_tokens < e.draft_tokens and e.acceptance_rate is not None


def test_proposals_and_a_prompts_own_logprobs_share_the_steps_output_rows():
    """A step asking for more logits rows than the context keeps aborts llama.cpp (FakeContext asserts it): a
    speculating job's proposals and another job's prompt logprobs come out of the same rows."""
    core, ctx = engine(batch_size=512, speculation=SpecConfig(n_max=8))
    spec = submit(core, "a", REPEATING, max_tokens=12)
    core.step()  # a's prompt; its next step verifies what followed "6 7 8" the first time
    other = submit(core, "b", list(range(1, 21)) * 5, max_tokens=2, prompt_logprobs=1)
    run(core)
    assert end(spec).tokens_out == 12 and end(spec).draft_tokens > 0 and end(other).tokens_out == 2
    assert any(p.n_draft for batch in ctx.batches for p in batch if batch and any(q.all_logits and not q.n_draft
                                                                                 for q in batch))


def test_on_the_gpu_only_a_lone_greedy_job_speculates_and_it_stops_for_good_when_others_come():
    config = SpecConfig(n_max=4, fixed_length=True, settle_steps=1)
    core, ctx = engine(parallel=2, in_graph_sampling=True, overlap=True, speculation=config)
    # seeded: sampled in the graph from its first token (the fake graph continues t -> t + 1), never a random end
    hot = submit(core, "hot", REPEATING, max_tokens=4, params=SamplingParams(temperature=0.8, seed=1))
    core.step()
    assert core.scheduler.slots[0].spec is None  # a sampled job: its chain stays in the graph
    run(core)
    greedy = submit(core, "greedy", REPEATING, max_tokens=30)
    core.step()
    slot = next(s for s in core.scheduler.slots if s.job is not None)
    assert slot.spec is not None and not ctx.chain_in_graph[slot.seq_id]  # alone: sampled on the CPU, speculating
    other = submit(core, "other", [1, 2], max_tokens=30)
    for _ in range(4):
        core.step()
    assert slot.spec.stopped and ctx.chain_in_graph[slot.seq_id]  # company: its chain joined the graph
    drafted = sum(p.n_draft for batch in ctx.batches for p in batch if p.seq_id == slot.seq_id)
    run(core)
    assert sum(p.n_draft for batch in ctx.batches for p in batch if p.seq_id == slot.seq_id) == drafted
    plain_core, _ = engine()
    plain = submit(plain_core, "greedy", REPEATING, max_tokens=30)
    run(plain_core)
    assert text(greedy) == text(plain) and end(other).tokens_out > 0 and end(hot).tokens_out == 4


def test_speculation_ends_exactly_where_plain_decoding_would():
    for kw in ({"max_tokens": 5}, {"max_tokens": 30, "stop": ("ij",)}, {"max_tokens": 40}):
        plain_core, _ = engine()
        plain = submit(plain_core, "a", REPEATING, **kw)
        run(plain_core)
        core, _ = engine(speculation=SpecConfig(n_max=8))
        got = submit(core, "a", REPEATING, **kw)
        run(core)
        assert text(got) == text(plain), kw
        assert (end(got).stop_reason, end(got).tokens_out) == (end(plain).stop_reason, end(plain).tokens_out), kw


def test_nobody_speculates_under_load_or_when_a_job_opts_out():
    core, ctx = engine(parallel=4, speculation=SpecConfig(n_max=4, max_load=2))
    outs = [submit(core, f"j{i}", REPEATING, max_tokens=8) for i in range(3)]
    run(core)
    assert all(text(o) == "ijklmnop" for o in outs)
    assert not any(p.n_draft for batch in ctx.batches for p in batch)
    core, ctx = engine(speculation=SpecConfig(n_max=4))
    got = submit(core, "a", REPEATING, max_tokens=8, speculate=False)
    run(core)
    assert text(got) == "ijklmnop" and not any(p.n_draft for batch in ctx.batches for p in batch)


def test_a_proposal_that_keeps_missing_is_shortened_then_paused():
    spec = SlotSpeculation(n=8)
    spec.record(8, 0, 8)
    assert spec.n == 4
    spec.record(4, 0, 8)
    spec.record(2, 0, 8)
    spec.record(1, 0, 8)
    assert spec.n == 1 and spec.pause == 16
    spec.record(1, 1, 8)
    assert spec.n == 2 and spec.rate == 1 / 16


def test_a_fixed_length_proposal_keeps_the_steps_shape(monkeypatch):
    # every stretch judged to pay: which ones do depends on this machine's step times, not on what is tested here
    monkeypatch.setattr(Stretch, "pays", lambda self, plain_step, running: True)
    core, ctx = engine(speculation=SpecConfig(n_max=6, fixed_length=True, settle_steps=1))
    plain_core, _ = engine()
    plain = submit(plain_core, "a", REPEATING, max_tokens=20)
    run(plain_core)
    got = submit(core, "a", REPEATING, max_tokens=20)
    run(core)
    assert text(got) == text(plain)
    drafted = [p for batch in ctx.batches for p in batch if p.n_draft]
    # all of n_max, but for what max_tokens leaves: a part at position pos decodes the job's (pos - 8)th token
    assert drafted and all(p.n_draft == min(6, 20 - (p.pos - len(REPEATING) + 1) - 1) for p in drafted)
    assert drafted[0].n_draft == 6 and drafted[-1].n_draft < 6


def test_a_stretch_that_pays_is_followed_by_the_next_at_once(monkeypatch):
    # no one-token shadow step between stretches: each change of the step's shape costs steps without CUDA graphs
    monkeypatch.setattr(Stretch, "pays", lambda self, plain_step, running: True)
    core, ctx = engine(speculation=SpecConfig(n_max=3, fixed_length=True, settle_steps=1, trial_steps=2))
    got = submit(core, "a", REPEATING, max_tokens=60)
    run(core)
    decodes = [p for batch in ctx.batches for p in batch if p.logits and p.pos >= len(REPEATING)]
    first = next(i for i, p in enumerate(decodes) if p.n_draft)
    assert [p.n_draft for p in decodes[first:-2]] == [3] * (len(decodes) - first - 2)  # the end: max_tokens
    assert len(decodes) - first > 8 and text(got)  # several stretches


def test_fixed_length_speculation_starts_only_after_its_shadow_guesses_came_true():
    core, ctx = engine(speculation=SpecConfig(n_max=4, fixed_length=True, settle_steps=1))
    # every 3 tokens the model will write were followed by 20 in the prompt: a proposal every step, never right
    prompt = [t for start in range(2, 12) for t in (start, start + 1, start + 2, 20)] + [2, 3]
    got = submit(core, "a", prompt, max_tokens=12)
    run(core)
    assert text(got) == "efghijklmnop" and not any(p.n_draft for batch in ctx.batches for p in batch)


def test_a_stretch_of_speculation_goes_on_while_it_pays_and_pauses_longer_each_time_it_does_not():
    def stretch_of(tokens_per_step: float, step_s: float) -> Stretch:
        stretch = Stretch()
        for _ in range(8):
            stretch.add(round(tokens_per_step), step_s)
        return stretch

    plain_step = 0.0012
    assert stretch_of(5, 0.0034).judge(None, 1) == Stretch.MIN_PAUSE  # nothing to compare with: measure plain
    assert stretch_of(5, 0.0034).judge(plain_step, 1) == 0  # 1470 tokens/s against 833
    slow, verdicts = Stretch(), []
    for _ in range(6):
        for _ in range(8):
            slow.add(1, 0.0027)
        verdicts.append(slow.judge(plain_step, 1))
    assert verdicts == [32, 64, 128, 256, 512, 512]
    slow.add(5, 0.0034)
    assert slow.judge(plain_step, 1) == 0 and slow.pause == Stretch.MIN_PAUSE
    # with others running, its gain must outweigh what the longer step costs them: 5 tokens a step for one of
    # four sequences is 8 tokens in 3.4 ms against 4 in 1.2 ms
    assert stretch_of(5, 0.0034).judge(plain_step, 4) > 0
    # a draft model's stretch that does not pay: the longest pause at once
    assert stretch_of(1, 0.0027).judge(plain_step, 1, costly=True) == Stretch.MAX_PAUSE
    assert stretch_of(5, 0.0034).judge(plain_step, 1, costly=True) == 0


def test_the_ngram_proposer_finds_the_longest_suffix_seen_before():
    proposer = NgramProposer(SpecConfig(ngram_max=3, ngram_min=2))
    history = np.array([1, 2, 3, 4, 9, 2, 3, 5, 1, 2, 3], dtype=np.int32)
    assert proposer.propose(history, 3) == [4, 9, 2]  # "1 2 3" seen at 0, not the later "2 3"
    assert proposer.propose(np.array([7, 8, 9], dtype=np.int32), 3) == []


def test_the_ngram_index_kept_between_steps_proposes_what_a_whole_scan_does():
    import random

    rng = random.Random(5)
    config = SpecConfig(n_max=4, ngram_max=4, ngram_min=2)
    indexed, scan = NgramProposer(config), NgramProposer(config)
    found = 0
    for seq_id in range(3):
        history = [rng.randrange(6) for _ in range(rng.randrange(1, 30))]
        for _ in range(300):
            event = rng.random()
            if event < 0.25:  # proposals rejected: a few tokens cut, others follow
                del history[max(1, len(history) - rng.randrange(1, config.n_max + 2)):]
            elif event < 0.27:  # another job on the sequence: a shared start, or none
                history = history[: rng.randrange(len(history))] + [rng.randrange(6) for _ in range(5)]
            history += [rng.randrange(6) for _ in range(rng.choice((1, 1, 1, 3)))]
            array = np.array(history, dtype=np.int32)
            want = scan.propose(array, 4)
            assert indexed.propose_indexed(seq_id, array, 4) == want
            found += bool(want)
    assert found > 300  # most lookups find something: the index is exercised, not only its misses
