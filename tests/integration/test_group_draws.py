"""Draws built once for every sequence of a shape (worker/llamacpp/draws.py), on the real model: llama.cpp's in-graph
samplers run on the CPU too. Each sequence's token is the one numpy draws from the same logits with the same
uniform number, whatever its neighbours, and whether or not it is in the step."""

from __future__ import annotations

import numpy as np
import pytest

from worker.engine.sampling import SamplingParams
from worker.llamacpp import Context, Model
from worker.llamacpp.draws import GroupDraw, draw_on_cpu
from worker.models.resolve import embedded_model_path

MIXED = [
    SamplingParams(temperature=0.8, top_k=40, top_p=0.95),
    SamplingParams(temperature=1.5, top_k=40, top_p=0.9),  # the same shape, other inputs: one group
    SamplingParams(temperature=1.0, top_k=40, top_p=0.95, min_p=0.05),
    SamplingParams(temperature=3.0, top_k=40, min_p=0.2),  # hot: without min-p the tail is drawn often
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.2),  # the whole vocabulary
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=2.0, top_k=40, top_p=0.95, seed=3),
]


@pytest.fixture(scope="module")
def model():
    m = Model.load(embedded_model_path(), ref="embedded", fmt="gguf", gpu_layers=0)
    yield m
    m.close()


def contexts(model, n):
    drawing = Context(model, n_ctx=n * 128, n_seq=n, n_batch=256, threads=2, flash_attn="off",
                      in_graph_sampling=True)
    plain = Context(model, n_ctx=n * 128, n_seq=n, n_batch=256, threads=2, flash_attn="off")
    return drawing, plain


def member_of(ctx, seq) -> GroupDraw:
    from worker.llamacpp.draws import _members
    chain = ctx._chains[seq]
    import llama_cpp as lc
    ptr = lc.llama_sampler_chain_get(chain.ptr, 0)
    return _members[ptr[0].ctx]


def agrees(token: int, logits: np.ndarray, member: GroupDraw) -> bool:
    """The token numpy draws; over the whole vocabulary, where float32 sums may cross a boundary, one whose
    cumulative range holds the draw within rounding."""
    shape = member.group.shape
    if shape.kind != "full":
        return token == draw_on_cpu(logits, shape, member.drawn_with())
    u, inv_t = (float(x) for x in member.drawn_with()[:2])
    weights = np.exp((logits.astype(np.float64) - logits.max()) * inv_t)
    cdf = np.cumsum(weights / weights.sum())
    low = cdf[token - 1] if token > 0 else 0.0
    return low - 1e-4 <= u <= cdf[token] + 1e-4


def run(model, params: list[SamplingParams], steps: int, sitting_out=lambda step: ()):
    n = len(params)
    drawing, plain = contexts(model, n)
    try:
        for seq, p in enumerate(params):
            drawing.use_chain(seq, p, reuse=False)
        prompt = model.tokenize("Once upon a time, in a village by the sea,")
        parts = [(seq, prompt, 0, True, False, 0) for seq in range(n)]
        pos = [len(prompt)] * n
        tokens: list[list[int]] = [[] for _ in range(n)]
        for step in range(steps):
            assert drawing.decode(parts) == 0 and plain.decode(parts) == 0
            index = -1
            for seq, chunk, *_ in parts:
                index += len(chunk)
                token = drawing.sample(seq, index)
                member = member_of(drawing, seq)
                assert agrees(token, plain.logits(index).copy(), member), (step, seq, member.group.shape)
                tokens[seq].append(token)
            out = set(sitting_out(step))
            parts = [(seq, [tokens[seq][-1]], pos[seq], True, False, 0) for seq in range(n) if seq not in out]
            for seq, *_ in parts:
                pos[seq] += 1
        return tokens
    finally:
        drawing.close()
        plain.close()


def test_each_sequence_draws_what_numpy_draws_from_its_logits(model):
    tokens = run(model, MIXED, steps=12)
    assert all(len(set(t)) > 1 for seq, t in enumerate(tokens) if MIXED[seq].temperature > 0)


def test_sequences_that_sit_out_a_step_leave_the_others_their_tokens(model):
    params = [SamplingParams(temperature=0.9, top_k=20, top_p=0.9)] * 4
    run(model, params, steps=10, sitting_out=lambda step: (0, 2) if step % 2 else (3,))


def test_a_seeded_draw_does_not_depend_on_its_neighbours(model):
    seeded = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=42)
    alone = run(model, [seeded], steps=10)[0]
    crowded = run(model, [SamplingParams(temperature=0.7, top_k=40, top_p=0.95), seeded,
                          SamplingParams(temperature=1.3, top_k=40, top_p=0.95)], steps=10)[1]
    assert alone == crowded


def test_a_reset_chain_draws_again_what_it_drew(model):
    seeded = SamplingParams(temperature=1.0, top_k=40, seed=9)
    drawing = Context(model, n_ctx=256, n_seq=1, n_batch=256, threads=2, flash_attn="off", in_graph_sampling=True)
    try:
        prompt = model.tokenize("The capital of France is")
        drawn = []
        for reuse in (False, True):
            drawing.use_chain(0, seeded, reuse=reuse)
            drawing.forget(0)
            parts, out = [(0, prompt, 0, True, False, 0)], []
            for step in range(6):
                assert drawing.decode(parts) == 0
                out.append(drawing.sample(0, len(parts[0][1]) - 1))
                parts = [(0, [out[-1]], len(prompt) + step, True, False, 0)]
            drawn.append(out)
        assert drawn[0] == drawn[1]
    finally:
        drawing.close()


def test_the_highest_draw_stays_among_the_kept_candidates(model, monkeypatch):
    """A uniform number at its top (rounded to 1.0 in float32 it would point past every kept candidate) draws the
    last candidate top-p keeps, as numpy does."""
    from worker.llamacpp import draws

    class Highest:
        def random(self, n, dtype=np.float64):
            return np.ones(n, dtype)

    made = draws.DrawGroup.__init__

    def init(self, shape):
        made(self, shape)
        self.rng = Highest()

    monkeypatch.setattr(draws.DrawGroup, "__init__", init)
    params = [SamplingParams(temperature=1.0, top_k=40, top_p=0.5), SamplingParams(temperature=1.0, top_k=40)]
    tokens = run(model, params, steps=4)
    assert [len(t) for t in tokens] == [4, 4]  # and each agreed with numpy (run)


def test_a_chain_reused_for_other_parameters_of_its_shape_draws_with_them(model):
    """A group's draw takes a new job's temperature, p and seed as inputs, even in a graph llama.cpp reuses from
    the last job's steps (the same layout: nothing is built again)."""
    first = SamplingParams(temperature=0.5, top_k=40, top_p=0.9)
    then = SamplingParams(temperature=1.8, top_k=40, top_p=0.99, seed=4)
    drawing, plain = contexts(model, 1)
    try:
        drawing.use_chain(0, first, reuse=False)
        chain = drawing._chains[0]
        assert drawing.retunable(0, then) and not drawing.retunable(0, SamplingParams(top_k=5))
        prompt = model.tokenize("Once upon a time, in a village by the sea,")
        parts = [(0, prompt, 0, True, False, 0)]
        for step in range(10):
            if step == 4:  # between two steps of one layout
                drawing.use_chain(0, then, reuse=True)
                assert drawing._chains[0] is chain
            assert drawing.decode(parts) == 0 and plain.decode(parts) == 0
            token = drawing.sample(0, len(parts[0][1]) - 1)
            member = member_of(drawing, 0)
            assert abs(float(member.drawn_with()[1]) - 1 / (then if step >= 4 else first).temperature) < 1e-6
            assert agrees(token, plain.logits(len(parts[0][1]) - 1).copy(), member), step
            parts = [(0, [token], len(prompt) + step, True, False, 0)]
    finally:
        drawing.close()
        plain.close()
