"""Speculative decoding (prompt lookup) in-process on the real model: the model's own text, faster when it quotes."""

from __future__ import annotations

import asyncio

import pytest

from bench.speculative import COPY, build
from worker.engine.core import EngineCore
from worker.engine.outputs import Finished, Job, Output, TokenText
from worker.engine.sampling import SamplingParams
from worker.engine.speculative import SpecConfig
from worker.llamacpp import Model
from worker.metrics import Metrics
from worker.models.resolve import embedded_model_path

QUOTES = [
    COPY,
    "<|im_start|>user\nFix the typo in this code and return the whole function:\n\ndef total(items):\n    result = 0\n"
    "    for item in items:\n        result += item.price * item.quantity\n    retrun result\n<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|im_start|>user\nQuote the first sentence: The quick brown fox jumps over the lazy dog while the cat sleeps "
    "on the warm windowsill in the afternoon sun.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def model():
    m = Model.load(embedded_model_path(), ref="embedded", fmt="gguf", gpu_layers=0)
    yield m
    m.close()


async def generate(engine: EngineCore, model: Model, prompt: str, job_id: str, **kw) -> list[Output]:
    queue: asyncio.Queue = asyncio.Queue()
    engine.submit(Job(job_id=job_id, prompt_tokens=model.prompt_tokens(prompt), params=SamplingParams(temperature=0),
                      max_tokens=kw.pop("max_tokens", 96), deliver=queue.put_nowait, **kw))
    out: list[Output] = []
    while not out or not isinstance(out[-1], Finished):
        out.extend(await asyncio.wait_for(queue.get(), 120))
    return out


def text(out: list[Output]) -> str:
    return "".join(o.text for o in out if isinstance(o, TokenText))


TIE_WINDOW = 8  # tokens before the texts part in which a near tie may have been taken the other way


def divergence_gap(reference: list[Output], other: str) -> float | None:
    """None where `other` is the reference's text; else the reference's narrowest top-2 logprob gap over the
    TIE_WINDOW tokens up to the one where the texts part. Not at that one alone: a near tie taken the other way can
    spell the same text in other tokens ("sea" as "s" + "ea") for a few tokens, and the texts part where the model
    was sure of its token."""
    ref = text(reference)
    if ref == other:
        return None
    at = next((i for i, (x, y) in enumerate(zip(ref, other, strict=False)) if x != y), min(len(ref), len(other)))
    seen, gaps = b"", []
    for lp in (lp for o in reference if isinstance(o, TokenText) for lp in o.logprobs):
        seen += lp.piece
        gaps.append(lp.top[0].logprob - lp.top[1].logprob)
        if len(seen.decode("utf-8", errors="ignore")) > at:
            return min(gaps[-TIE_WINDOW:])
    return 0.0


async def test_a_quoting_answer_is_the_same_text_and_at_least_1_3x_faster(model):
    plain, spec = build(model, 1, None), build(model, 1, SpecConfig())
    metrics = Metrics()
    spec.scheduler.metrics = metrics
    for e in (plain, spec):
        e.start(asyncio.get_running_loop())
    try:
        for i, prompt in enumerate(QUOTES):
            a = await generate(plain, model, prompt, f"p{i}", logprobs=2)
            b = await generate(spec, model, prompt, f"s{i}")
            near_tie = divergence_gap(a, text(b))
            # The same text, or a difference that starts where the model's two best tokens were a rounding apart:
            # verified positions are computed in a batch, and llama.cpp's kernels round a batch otherwise than a
            # lone token (up to ~0.1 in a logit, measured in test_constrained); llama-server's speculation shares it.
            assert near_tie is None or near_tie < 0.15, (i, near_tie, text(a), text(b))
            end = b[-1]
            assert isinstance(end, Finished)
            if prompt == COPY:  # copied word for word: proposals found and mostly accepted
                assert end.acceptance_rate is not None and end.acceptance_rate >= 0.6, end
        speed = {"plain": 0.0, "spec": 0.0}
        for r in range(3):  # alternated; the best of each, as a busy neighbour slows one run, not the method
            for name, engine in (("plain", plain), ("spec", spec)):
                end = (await generate(engine, model, COPY, f"{name}-speed-{r}"))[-1]
                assert isinstance(end, Finished)
                speed[name] = max(speed[name], end.tokens_per_sec)
        print(f"copy workload, greedy: {speed['spec']:.1f} vs {speed['plain']:.1f} tokens/s "
              f"({speed['spec'] / speed['plain']:.2f}x)")
        assert speed["spec"] >= 1.3 * speed["plain"]
        draft = metrics.registry.get_sample_value("llm_worker_spec_draft_tokens_total")
        accepted = metrics.registry.get_sample_value("llm_worker_spec_accepted_tokens_total")
        assert draft and accepted and 0 < accepted <= draft
    finally:
        plain.close()
        spec.close()


async def test_a_request_that_opts_out_decodes_plainly(model):
    spec = build(model, 1, SpecConfig())
    spec.start(asyncio.get_running_loop())
    try:
        out = await generate(spec, model, COPY, "no-spec", speculate=False, max_tokens=16)
        assert out[-1].draft_tokens == 0 and out[-1].acceptance_rate is None  # type: ignore[union-attr]
    finally:
        spec.close()
