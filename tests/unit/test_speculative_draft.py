"""The draft-model proposer's bookkeeping against a fake draft context: what its KV holds per sequence, what it
decodes (a prompt once, then only what was accepted since), how it batches sequences, and where it stops."""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit.test_scheduler import EOG, REPEATING, end, engine, run, submit, text
from worker.engine.speculative import Ask, DraftProposer, SpecConfig, StepCosts

VOCAB = 26


class FakeDraft:
    """A draft "model" that continues every token t with t + 1 (or with `wrong` where told), KV cells per
    sequence, and a decode that checks each part starts where the sequence's cells end."""

    def __init__(self, n_batch: int = 64, n_ctx_seq: int = 256, swa: bool = False) -> None:
        self.n_batch = n_batch
        self.n_ctx_seq = n_ctx_seq
        self.cells: dict[int, list[int]] = {}
        self.batches: list[list[tuple[int, list[int], int]]] = []
        self.cuts: list[tuple[int, int]] = []
        self.fail_next = False
        self.swa = swa
        self.wrong: dict[int, int] = {}  # token → what the draft proposes after it instead of token + 1
        self._last: list[int] = []

    def decode(self, parts) -> int:
        if self.fail_next:
            self.fail_next = False
            return 1
        assert sum(len(p[1]) for p in parts) <= self.n_batch, "a batch larger than the context takes"
        self.batches.append([(seq, list(tokens), pos) for seq, tokens, pos, *_ in parts])
        self._last = []
        for seq, tokens, pos, *_ in parts:
            held = self.cells.setdefault(seq, [])
            assert len(held) == pos, f"sequence {seq}: decoding at {pos}, its cells end at {len(held)}"
            held.extend(tokens)
            assert len(held) <= self.n_ctx_seq, "the draft's context overflowed"
            self._last += tokens
        return 0

    def greedy(self, index: int) -> int:
        token = self._last[index]
        return self.wrong.get(token, (token + 1) % VOCAB)

    def keep_prefix(self, seq_id: int, n: int) -> None:
        self.cuts.append((seq_id, n))
        del self.cells[seq_id][n:]

    def forget(self, seq_id: int) -> None:
        self.cuts.append((seq_id, 0))
        self.cells.pop(seq_id, None)

    def can_cut(self, seq_id: int, n: int) -> bool:
        return not self.swa or len(self.cells[seq_id]) - n <= 4

    def is_eog(self, token: int) -> bool:
        return token == EOG


def ask(seq_id: int, history: list[int], n: int) -> Ask:
    return Ask(seq_id, np.array(history, dtype=np.int32), n)


def test_a_prompt_is_decoded_once_then_one_decode_per_proposed_token():
    draft = FakeDraft()
    proposer = DraftProposer(draft)
    assert proposer.propose_all([ask(0, [3, 4, 5], 3)]) == {0: [6, 7, 8]}
    assert draft.batches == [[(0, [3, 4, 5], 0)], [(0, [6], 3)], [(0, [7], 4)]]
    assert draft.cells[0] == [3, 4, 5, 6, 7]  # the last proposal is never decoded: the target may reject it


def test_only_what_was_accepted_since_is_decoded_and_rejected_proposals_are_cut():
    draft = FakeDraft()
    proposer = DraftProposer(draft)
    proposer.propose_all([ask(0, [3, 4, 5], 3)])  # proposed 6 7 8; the target accepted 6, then chose 9
    draft.batches.clear()
    assert proposer.propose_all([ask(0, [3, 4, 5, 6, 9], 2)]) == {0: [10, 11]}
    assert draft.cuts == [(0, 4)]  # 7's cell went
    assert draft.batches == [[(0, [9], 4)], [(0, [10], 5)]]


def test_all_proposals_accepted_decodes_the_last_one_and_the_targets_token():
    draft = FakeDraft()
    proposer = DraftProposer(draft)
    proposer.propose_all([ask(0, [3, 4, 5], 3)])
    draft.batches.clear()
    proposer.propose_all([ask(0, [3, 4, 5, 6, 7, 8, 9], 1)])
    assert draft.cuts == [] and draft.batches == [[(0, [8, 9], 5)]]


def test_a_new_job_in_the_slot_keeps_the_shared_prefix_only():
    draft = FakeDraft()
    proposer = DraftProposer(draft)
    proposer.propose_all([ask(0, [3, 4, 5, 6], 2)])
    draft.batches.clear()
    proposer.propose_all([ask(0, [3, 4, 20, 21], 2)])
    assert draft.cuts == [(0, 2)] and draft.batches[0] == [(0, [20, 21], 2)]


def test_sequences_asking_together_share_each_decode():
    draft = FakeDraft()
    proposer = DraftProposer(draft)
    got = proposer.propose_all([ask(0, [3, 4], 3), ask(1, [10, 11, 12], 1), ask(2, [20], 2)])
    assert got == {0: [5, 6, 7], 1: [13], 2: [21, 22]}
    assert draft.batches == [[(0, [3, 4], 0), (1, [10, 11, 12], 0), (2, [20], 0)],
                             [(0, [5], 2), (2, [21], 1)],  # 1 has its one token
                             [(0, [6], 3)]]


def test_a_long_prompt_is_decoded_in_chunks_of_the_batch_size():
    draft = FakeDraft(n_batch=8)
    proposer = DraftProposer(draft)
    prompt = [i % 20 + 1 for i in range(19)]
    assert proposer.propose_all([ask(0, prompt, 1), ask(1, [5, 6, 7], 1)]) == {0: [prompt[-1] + 1], 1: [8]}
    assert [sum(len(t) for _, t, _ in b) for b in draft.batches] == [8, 8, 6]
    assert draft.cells[0] == prompt and draft.cells[1] == [5, 6, 7]


def test_a_proposal_ends_before_an_end_of_generation_token():
    draft = FakeDraft()
    proposer = DraftProposer(draft)
    assert proposer.propose_all([ask(0, [23, 24], 5), ask(1, [7, 25], 5)]) == {0: [25], 1: []}  # 25 + 1 wraps to 0
    assert draft.batches[-1] == [(0, [25], 2)]  # the end token's decode showed it: nothing more is decoded


def test_a_draft_context_smaller_than_the_sequence_proposes_less_or_nothing():
    draft = FakeDraft(n_ctx_seq=6)
    proposer = DraftProposer(draft)
    assert proposer.propose_all([ask(0, [1, 2, 3, 4], 8)]) == {0: [5, 6]}
    assert proposer.propose_all([ask(1, [1, 2, 3, 4, 5, 6], 8)]) == {}


def test_a_failed_draft_decode_proposes_nothing_and_starts_over_next_time():
    draft = FakeDraft()
    proposer = DraftProposer(draft)
    proposer.propose_all([ask(0, [3, 4, 5], 2)])
    draft.fail_next = True
    assert proposer.propose_all([ask(0, [3, 4, 5, 6, 7], 2)]) == {}
    assert 0 not in draft.cells
    draft.batches.clear()
    assert proposer.propose_all([ask(0, [3, 4, 5, 6, 7], 2)]) == {0: [8, 9]}
    assert draft.batches[0] == [(0, [3, 4, 5, 6, 7], 0)]


def test_a_sliding_window_draft_starts_over_rather_than_cut_back_far():
    draft = FakeDraft(swa=True)
    proposer = DraftProposer(draft)
    proposer.propose_all([ask(0, list(range(1, 12)), 2)])
    assert proposer.propose_all([ask(0, [1, 2, 3, 9], 1)]) == {0: [10]}
    assert draft.cuts[-1] == (0, 0) and draft.cells[0] == [1, 2, 3, 9]


def test_proposing_time_counts_against_a_proposal_and_a_prompt_catch_up_does_not():
    costs = StepCosts()
    for _ in range(3):
        costs.record(0.030, 0)  # a plain step: 30 ms
        costs.record(0.038, 1)  # one proposed token adds 8 ms
    assert costs.worth(1.0, 1)  # prompt lookup: next to free, a sure proposal pays
    costs.record_proposing(0.030 * 4, 4)  # a draft as costly as the model itself (a self-draft on the CPU)
    assert not costs.worth(1.0, 1)

    class TimedDraft(FakeDraft):
        def decode(self, parts) -> int:
            import time
            time.sleep(0.01 * sum(len(p[1]) for p in parts))  # 10 ms a token
            return super().decode(parts)

    proposer = DraftProposer(TimedDraft())
    proposer.propose_all([ask(0, list(range(1, 21)), 2)])  # a 20-token prompt caught up (0.2 s): not a step's cost
    assert 0.01 <= proposer.spent < 0.1  # the second proposed token's decode
    proposer.propose_all([ask(0, [*range(1, 21), 21, 22], 2)])  # accepted 21, then the target's 22: steady
    assert 0.02 <= proposer.spent < 0.1  # 22 caught up, then the second proposal's decode


# ---- the scheduler with a draft proposer (the fake target continues t -> t + 1, as the fake draft does) ----------


def draft_engine(wrong: dict[int, int] | None = None, fixed_length: bool = False, **kw):
    fake = FakeDraft()
    fake.wrong = wrong or {}
    config = SpecConfig(n_max=4, fixed_length=fixed_length, settle_steps=1)
    core, ctx = engine(speculation=config, proposer=DraftProposer(fake), **kw)
    return core, ctx, fake


def test_the_draft_path_gives_plain_decodings_text_whether_its_proposals_hit_or_miss():
    plain_core, _ = engine()
    plain = submit(plain_core, "a", REPEATING, max_tokens=12)
    run(plain_core)
    for wrong in ({}, {11: 3, 14: 2}):  # proposals right, or wrong after "l" and "o"
        core, ctx, _ = draft_engine(wrong)
        got = submit(core, "a", REPEATING, max_tokens=12)
        run(core)  # check_accounting after each step: rejected cells freed in the target
        assert text(got) == text(plain) and end(got).tokens_out == 12, wrong
        assert end(got).draft_tokens > 0
        if not wrong:
            assert end(got).accepted_tokens == end(got).draft_tokens
        else:
            assert end(got).accepted_tokens < end(got).draft_tokens


def test_on_a_gpu_a_draft_model_goes_straight_to_stretches_judged_after_four_steps():
    core, ctx, fake = draft_engine(fixed_length=True)
    got = submit(core, "a", REPEATING, max_tokens=20)  # proposals always right: the stretch goes on
    run(core)
    assert end(got).draft_tokens > 0
    drafted = [i for i, batch in enumerate(ctx.batches) if batch[0].n_draft]
    plain_decodes = [i for i, batch in enumerate(ctx.batches) if not batch[0].n_draft][1:]  # after the prompt
    assert plain_decodes and drafted and plain_decodes[0] < drafted[0]  # a plain step measured first
    # no shadow guesses: the draft decodes once for each token it proposes (the catch-up gives the first), and only
    # for the steps that verify them
    assert len(fake.batches) == sum(ctx.batches[i][0].n_draft for i in drafted)


@pytest.mark.parametrize("fixed_length", [False, True])  # the CPU's adaptive proposals, the GPU's stretches
def test_the_draft_path_ends_exactly_where_plain_decoding_would(fixed_length):
    for kw in ({"max_tokens": 5}, {"max_tokens": 30, "stop": ("mn",)}, {"max_tokens": 40}):
        plain_core, _ = engine()
        plain = submit(plain_core, "a", REPEATING, **kw)
        run(plain_core)
        core, _, _ = draft_engine(fixed_length=fixed_length)
        got = submit(core, "a", REPEATING, **kw)
        run(core)
        assert text(got) == text(plain), kw
        assert (end(got).stop_reason, end(got).tokens_out) == (end(plain).stop_reason, end(plain).tokens_out), kw
        if kw["max_tokens"] > 5:
            assert end(got).draft_tokens > 0, kw


def test_a_draft_that_did_not_pay_rests_for_the_next_jobs_too():
    """A draft-model stretch that does not pay pauses the job; the jobs that come after wait that pause out too,
    rather than each paying a trial stretch of its own (what made a useless draft cost 4-14% a request)."""
    core, ctx, fake = draft_engine(fixed_length=True)
    fake.wrong = {t: (t + 2) % VOCAB for t in range(VOCAB)}  # every proposal misses
    first = submit(core, "a", REPEATING, max_tokens=30)
    run(core)
    trial = sum(1 for batch in ctx.batches if batch[0].n_draft)
    assert end(first).draft_tokens > 0 and end(first).accepted_tokens == 0 and trial <= 4
    before = len(ctx.batches)
    for i in range(3):  # one at a time: alone, each could speculate
        got = submit(core, f"b{i}", REPEATING, max_tokens=30)
        run(core)
        assert text(got) == text(first) and end(got).draft_tokens == 0
    assert not any(batch[0].n_draft for batch in ctx.batches[before:])


def test_a_first_stretch_waits_for_enough_plain_steps_to_judge_it_against():
    """A GPU's first steps of a sequence run before CUDA graphs are captured: a median of two or three of them made
    a self-draft at 0.48x look as if it paid. The first stretch waits for settle_steps plain steps."""
    fake = FakeDraft()
    core, ctx = engine(speculation=SpecConfig(n_max=4, fixed_length=True, settle_steps=6), proposer=DraftProposer(fake))
    got = submit(core, "a", REPEATING, max_tokens=16)
    run(core)
    decodes = ctx.batches[1:]  # after the prompt
    first = next(i for i, batch in enumerate(decodes) if batch[0].n_draft)
    assert first >= 6 and end(got).draft_tokens > 0  # the first step of a shape is not measured: 7 plain ones
