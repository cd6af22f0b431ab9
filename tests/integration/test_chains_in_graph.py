"""Sampler chains in the decode graph on the real model (llama.cpp's in-graph samplers run on the CPU too): a chain
that hands over its token alone draws what the same chain handing over its rows draws, and llama.cpp copies no row
for it."""

from __future__ import annotations

import llama_cpp as lc
import pytest

from worker.engine.sampling import SamplingParams
from worker.llamacpp import Context, Model
from worker.models.resolve import embedded_model_path


@pytest.fixture(scope="module")
def model():
    m = Model.load(embedded_model_path(), ref="embedded", fmt="gguf", gpu_layers=0)
    yield m
    m.close()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, seed=11),  # a request with no sampling options: dist over the whole vocabulary
    SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=5),
    SamplingParams(temperature=0.0),
], ids=["default", "truncated", "greedy"])
def test_a_chain_that_hands_over_its_token_alone_draws_what_it_draws_with_its_rows(model, params):
    ctx = Context(model, n_ctx=2 * 256, n_seq=2, n_batch=256, threads=2, flash_attn="off", in_graph_sampling=True,
                  group_draws=False)  # llama.cpp's own samplers, ended by the token-only one
    try:
        ctx.use_chain(0, params, reuse=False, hands_row=True)
        ctx.use_chain(1, params, reuse=False)  # the token alone
        prompt = model.tokenize("Once upon a time, in a village by the sea,")
        parts = [(seq, prompt, 0, True, False, 0) for seq in (0, 1)]
        drawn: tuple[list[int], list[int]] = ([], [])
        for step in range(16):
            assert ctx.decode(parts) == 0
            index = -1
            for seq, tokens, *_ in parts:
                index += len(tokens)
                drawn[seq].append(ctx.sample(seq, index))
                logits_copied = lc.llama_get_sampled_logits_count_ith(ctx.ptr, index)
                probs_copied = lc.llama_get_sampled_probs_count_ith(ctx.ptr, index)
                if seq == 1:
                    assert logits_copied == probs_copied == 0, "a token-only chain's rows were copied"
                else:
                    assert logits_copied > 0
            pos = len(prompt) + step
            parts = [(seq, [drawn[seq][-1]], pos, True, False, 0) for seq in (0, 1)]
    finally:
        ctx.close()
    assert drawn[0] == drawn[1] and len(set(drawn[0])) > 1
