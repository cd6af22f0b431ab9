"""How llama.cpp cuts a step over per-slot streams into evaluations (split_equal, sequential), and the filler that
evens a step out (worker/llamacpp/ubatches.py)."""

from worker.llamacpp.ubatches import EVAL_TOKENS, count_ubatches, plan_filler

BIG = 2048


def test_ubatches_take_consecutive_sequences_with_equal_tokens_in_batch_order():
    assert count_ubatches([(0, 1), (1, 1), (2, 1), (3, 1)], BIG) == 1
    assert count_ubatches([(0, 1), (2, 1), (4, 1), (6, 1)], BIG) == 4  # idle slots between busy ones
    assert count_ubatches([(0, 64), (1, 64), (2, 64)], BIG) == 1
    # decoders first, then prompts (the order before sorting): 0,1 | 2,3,4 | 1's rest | 4's rest
    assert count_ubatches([(0, 1), (2, 1), (1, 50), (3, 1), (4, 60)], BIG) == 4
    assert count_ubatches([(0, 1), (1, 50), (2, 1), (3, 1), (4, 60)], BIG) == 3  # sorted: 0-4 | 1 | 4
    assert count_ubatches([(0, 100), (1, 100)], 128) == 2  # 64 a sequence fit in a ubatch of 128


def test_idle_slots_between_busy_ones_get_one_filler_token():
    parts = [(0, 1, 10), (2, 1, 20), (4, 1, 30)]
    assert plan_filler(parts, {1: 5, 3: 7}, room=256, n_ubatch=BIG, capacity=BIG) == {1: 1, 3: 1}


def test_prompt_chunks_of_unequal_lengths_are_evened_out_when_that_saves_evaluations():
    parts = [(0, 1, 500), (1, 1, 500), (2, 74, 500), (3, 77, 500), (4, 124, 500), (5, 122, 500), (6, 67, 500),
             (7, 170, 500)]
    filler = plan_filler(parts, {}, room=8192, n_ubatch=BIG, capacity=BIG)
    assert filler and all(seq >= 2 for seq in filler)  # the decoders stay one token
    padded = [(seq, n + filler.get(seq, 0)) for seq, n, _ in parts]
    before = count_ubatches([(seq, n) for seq, n, _ in parts], BIG)
    after = count_ubatches(padded, BIG)
    assert (before - after) * EVAL_TOKENS > sum(filler.values())


def test_no_filler_where_it_does_not_pay_or_does_not_fit():
    assert plan_filler([(0, 1, 10), (1, 1, 10), (2, 1, 10)], {}, room=256, n_ubatch=BIG, capacity=BIG) == {}
    assert plan_filler([(0, 1, 10)], {}, room=256, n_ubatch=BIG, capacity=BIG) == {}
    # one long chunk beside a decoder: evening the decoder out would cost ~500 tokens for one evaluation
    assert plan_filler([(0, 1, 10), (1, 500, 10)], {}, room=4096, n_ubatch=BIG, capacity=BIG) == {}
    # the idle slot between is full: no room for its filler
    assert plan_filler([(0, 1, 10), (2, 1, 10)], {1: 256}, room=256, n_ubatch=BIG, capacity=BIG) == {}
    # an idle slot whose position is unknown is never filled
    assert plan_filler([(0, 1, 10), (2, 1, 10)], {}, room=256, n_ubatch=BIG, capacity=BIG) == {}
    # the batch could not hold it
    assert plan_filler([(0, 1, 10), (2, 1, 10)], {1: 5}, room=256, n_ubatch=BIG, capacity=2) == {}
    # an idle sequence longer than every busy one would widen the step's attention (a ubatch attends over as many
    # cells as its longest stream holds)
    assert plan_filler([(0, 1, 10), (2, 1, 10)], {1: 200}, room=256, n_ubatch=BIG, capacity=BIG) == {}
    assert plan_filler([(0, 1, 10), (2, 1, 199)], {1: 200}, room=256, n_ubatch=BIG, capacity=BIG) == {1: 1}
