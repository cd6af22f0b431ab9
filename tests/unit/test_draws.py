"""Which chains a group draws, and the stages of its top-k (worker/llamacpp/draws.py); no model."""

from __future__ import annotations

import numpy as np

from worker.engine.sampling import SamplingParams
from worker.llamacpp.draws import DrawShape, block_size, draw_on_cpu


def test_shapes_by_params():
    assert DrawShape.of(SamplingParams(temperature=0.0, top_k=40), 1000) == DrawShape("greedy")
    assert DrawShape.of(SamplingParams(temperature=1.0), 1000) == DrawShape("full")
    assert DrawShape.of(SamplingParams(temperature=0.8, top_k=40, top_p=0.95), 1000) == DrawShape("top_k", 40, True)
    assert DrawShape.of(SamplingParams(top_k=40, min_p=0.1), 1000) == DrawShape("top_k", 40, False, True)
    # top-p or min-p over the whole vocabulary need llama.cpp's full sort; a k of the vocabulary is no truncation
    assert DrawShape.of(SamplingParams(top_p=0.9), 1000) is None
    assert DrawShape.of(SamplingParams(min_p=0.1), 1000) is None
    assert DrawShape.of(SamplingParams(top_k=1000), 1000) == DrawShape("full")
    assert DrawShape.of(SamplingParams(top_k=500), 1000) is None  # over MAX_TOP_K


def test_top_k_stages_fit_one_sort_and_shrink():
    assert block_size(128256, 40) == 1002  # Llama 3: 128 blocks, then 5120 candidates
    assert block_size(5120, 40) == 1024
    assert block_size(49152, 40) == 1024
    assert block_size(151936, 40) is None  # 2^7 x 1187: no block between 160 and 1024 (one long sort instead)
    for n in (128256, 49152, 262144, 32000):
        size = block_size(n, 40)
        assert size is not None and n % size == 0 and 160 <= size <= 1024


def test_the_numpy_draw_truncates_as_llama_cpp_does():
    logits = np.array([5.0, 4.0, 1.0, 0.5, 3.0], np.float32)
    top2 = DrawShape("top_k", 2)
    picks = {draw_on_cpu(logits, top2, np.array([u, 1.0, 1.0, 0.0], np.float32)) for u in np.linspace(0, 0.999, 50)}
    assert picks == {0, 1}
    # top-p keeps the candidate that crosses p: p = 0.5 keeps the first alone when it holds more than half
    nucleus = DrawShape("top_k", 5, top_p=True)
    assert {draw_on_cpu(logits, nucleus, np.array([u, 1.0, 0.5, 0.0], np.float32))
            for u in np.linspace(0, 0.999, 50)} == {0}
    assert draw_on_cpu(logits, DrawShape("greedy"), np.zeros(4, np.float32)) == 0
