"""A llama.cpp sampler chain per request, built from its sampling parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import llama_cpp as lc

PENALTY_LAST_N = 64  # llama.cpp's default window for repetition/presence/frequency penalties


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def build_chain(params: SamplingParams, n_vocab: int) -> Any:
    """llama.cpp's usual order: penalties → top-k → top-p → min-p → temperature → dist (or greedy).

    Every stage used here has a backend (in-graph) implementation in llama.cpp, so the chain can be attached with
    llama_set_sampler; the same chain also samples on the CPU through llama_sampler_sample.
    """
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    add = lambda smpl: lc.llama_sampler_chain_add(chain, smpl)
    if params.has_penalties:
        add(
            lc.llama_sampler_init_penalties(
                n_vocab,
                PENALTY_LAST_N,
                params.repetition_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            )
        )
    if params.greedy:
        add(lc.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(lc.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        add(lc.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        add(lc.llama_sampler_init_min_p(params.min_p, 1))
    add(lc.llama_sampler_init_temp(params.temperature))
    seed = lc.LLAMA_DEFAULT_SEED if params.seed is None else params.seed % lc.LLAMA_DEFAULT_SEED
    add(lc.llama_sampler_init_dist(seed))
    return chain


def free_chain(chain: Any) -> None:
    lc.llama_sampler_free(chain)
