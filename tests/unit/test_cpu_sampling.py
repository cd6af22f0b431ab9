"""The numpy sampler keeps llama.cpp's rules: checked against the definitions on whole sorted arrays."""

from __future__ import annotations

import numpy as np
import pytest

from worker.engine.cpu_sampling import CpuSampler, _top_p, top_k
from worker.engine.sampling import SamplingParams

VOCAB = 128_256


def logits(seed: int = 0, scale: float = 3.0, n: int = VOCAB) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def draws(params: SamplingParams, values: np.ndarray, n: int) -> np.ndarray:
    sampler = CpuSampler(params)
    return np.array([sampler.sample(values) for _ in range(n)])


def test_greedy_takes_the_first_of_equal_maxima_as_llama_cpp_does():
    values = logits()
    values[[7, 90_000]] = values.max() + 1
    assert draws(SamplingParams(temperature=0), values, 3).tolist() == [7, 7, 7]


@pytest.mark.parametrize("k", [1, 5, 40, 1000])
def test_top_k_is_the_k_largest(k: int):
    values = logits(k)
    assert set(top_k(values, k).tolist()) == set(np.argsort(-values)[:k].tolist())


@pytest.mark.parametrize(("scale", "p"), [(3.0, 0.9), (8.0, 0.95), (1.0, 0.5), (20.0, 0.99)])
def test_top_p_keeps_the_smallest_top_set_that_reaches_p(scale: float, p: float):
    values = logits(1, scale)
    ids, kept = _top_p(None, values, p)
    probs = np.exp(values.astype(np.float64) - values.max())
    probs /= probs.sum()
    order = np.argsort(-values, kind="stable")
    cut = int(np.searchsorted(np.cumsum(probs[order]), p)) + 1  # llama.cpp: up to the first cum_sum >= p
    assert sorted(ids.tolist()) == sorted(order[:cut].tolist())
    assert np.array_equal(kept, values[ids])


def test_the_draw_follows_the_distribution_at_the_temperature():
    values = np.log(np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32))
    got = np.bincount(draws(SamplingParams(temperature=0.5, seed=1), values, 20_000), minlength=4) / 20_000
    want = np.array([0.1, 0.2, 0.3, 0.4]) ** 2
    assert np.allclose(got, want / want.sum(), atol=0.015)


def test_on_a_large_vocabulary_masked_tokens_are_never_drawn_and_the_rest_in_proportion():
    values = np.full(VOCAB, -np.inf, dtype=np.float32)
    allowed = [3, 1024, 1025, 70_000, VOCAB - 1]  # block edges and the short last block
    values[allowed] = np.log([1.0, 2.0, 3.0, 4.0, 10.0])
    got = np.bincount(draws(SamplingParams(temperature=1.0, seed=2), values, 20_000), minlength=VOCAB)
    assert got.sum() == got[allowed].sum() == 20_000
    assert np.allclose(got[allowed] / 20_000, np.array([1, 2, 3, 4, 10]) / 20, atol=0.015)


def test_min_p_drops_tokens_below_its_share_of_the_most_likely():
    values = np.log(np.array([0.5, 0.3, 0.04, 0.16], dtype=np.float32))
    got = set(draws(SamplingParams(temperature=1.0, min_p=0.1, seed=3), values, 3000).tolist())
    assert got == {0, 1, 3}  # 0.04 < 0.1 x 0.5


def test_the_filters_compose_in_llama_cpps_order():
    values = np.log(np.array([0.35, 0.25, 0.2, 0.1, 0.1], dtype=np.float32))
    # top-k 4 drops one 0.1; top-p 0.7 over the four renormalised (0.39, 0.28, 0.22, ...) keeps three
    got = set(draws(SamplingParams(temperature=1.0, top_k=4, top_p=0.7, seed=4), values, 3000).tolist())
    assert got == {0, 1, 2}


def test_a_seed_gives_the_same_tokens():
    values = logits(5)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=42)
    assert draws(params, values, 20).tolist() == draws(params, values, 20).tolist()
    assert len(set(draws(params, values, 20).tolist())) > 1


def test_penalized_sampling_is_left_to_llama_cpps_chain():
    assert CpuSampler.applies(SamplingParams(temperature=0.8))
    assert not CpuSampler.applies(SamplingParams(temperature=0.8, presence_penalty=0.5))


def prepared_draws(params: SamplingParams, values: np.ndarray, n: int, allowed: np.ndarray | None = None) -> np.ndarray:
    sampler = CpuSampler(params)
    out = []
    for _ in range(n):
        sampler.prepare(len(values), allowed)
        assert sampler.prepared
        out.append(sampler.sample(values))
        assert not sampler.prepared  # each draw its own noise
    return np.array(out)


def test_a_prepared_draw_follows_the_distribution_at_the_temperature():
    values = np.log(np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32))
    got = np.bincount(prepared_draws(SamplingParams(temperature=0.5, seed=1), values, 20_000), minlength=4) / 20_000
    want = np.array([0.1, 0.2, 0.3, 0.4]) ** 2
    assert np.allclose(got, want / want.sum(), atol=0.015)


def test_a_prepared_draw_takes_only_what_its_mask_allows_and_the_rest_in_proportion():
    values = logits(6, scale=0.5)
    allowed = [3, 1024, 1025, 70_000, VOCAB - 1]
    values[allowed] = np.log([1.0, 2.0, 3.0, 4.0, 10.0])
    mask = np.zeros(VOCAB, dtype=np.uint8)
    mask[allowed] = 1
    got = np.bincount(prepared_draws(SamplingParams(temperature=1.0, seed=2), values, 5000, mask), minlength=VOCAB)
    assert got.sum() == got[allowed].sum() == 5000
    assert np.allclose(got[allowed] / 5000, np.array([1, 2, 3, 4, 10]) / 20, atol=0.03)


def test_only_a_draw_with_nothing_to_cut_is_prepared_and_a_seed_repeats_it():
    values = logits(7)
    for params in (SamplingParams(temperature=0), SamplingParams(top_k=40), SamplingParams(top_p=0.9),
                   SamplingParams(min_p=0.05)):
        sampler = CpuSampler(params)
        sampler.prepare(VOCAB)
        assert not sampler.prepared
    params = SamplingParams(temperature=0.8, seed=9)
    assert prepared_draws(params, values, 20).tolist() == prepared_draws(params, values, 20).tolist()
