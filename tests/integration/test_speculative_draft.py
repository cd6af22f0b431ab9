"""Speculative decoding with a draft model, on the real model: SmolLM2 as its own draft (a self-draft: the ceiling,
acceptance ~100 %), in-process and in a real worker; Gemma 3 as a draft of SmolLM2 is refused at startup."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.speculative import COPY, FREE, build
from tests.integration.test_lifecycle import run_worker
from tests.integration.test_openai import gemma_gguf
from tests.integration.test_speculative import QUOTES, divergence_gap, generate, text
from tests.integration.worker_process import WorkerProcess, read_sse
from worker.engine.outputs import Finished, Job, Output, StopReason, TokenText
from worker.engine.sampling import SamplingParams
from worker.engine.speculative import SpecConfig
from worker.llamacpp import Model
from worker.llamacpp.draft import DraftModel
from worker.models.resolve import embedded_model_path

PROMPTS = [*QUOTES, FREE, "<|im_start|>user\nWhat is the capital of France? Answer in one sentence, then tell me "
           "one thing to see there.<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def model():
    m = Model.load(embedded_model_path(), ref="embedded", fmt="gguf", gpu_layers=0)
    yield m
    m.close()


@pytest.fixture
async def engines(model):
    """A plain engine and one whose proposals come from SmolLM2 itself, every step (the gate off: the ceiling, and
    every position of the text verified); both started on the test's loop."""
    draft = DraftModel(Model.load(embedded_model_path(), ref="draft", fmt="gguf", gpu_layers=0), n_ctx_seq=1024,
                       n_seq=1, n_batch=512, threads=1, flash_attn="off")
    plain, spec = build(model, 1, None), build(model, 1, SpecConfig(gate=False), draft)
    for e in (plain, spec):
        e.start(asyncio.get_running_loop())
    yield plain, spec
    plain.close()
    spec.close()
    draft.close()


async def test_greedy_text_is_the_models_and_a_self_draft_is_accepted(model, engines):
    plain, spec = engines
    proposed = accepted = 0
    for i, prompt in enumerate(PROMPTS):
        a = await generate(plain, model, prompt, f"p{i}", logprobs=2)
        b = await generate(spec, model, prompt, f"s{i}")
        # the same text, or a difference where the model's two best tokens were a rounding apart (a verified
        # position is computed in a batch, rounded otherwise than a lone token: see test_speculative)
        near_tie = divergence_gap(a, text(b))
        assert near_tie is None or near_tie < 0.15, (i, near_tie, text(a), text(b))
        end = b[-1]
        assert isinstance(end, Finished) and end.draft_tokens > 0
        proposed, accepted = proposed + end.draft_tokens, accepted + end.accepted_tokens
    # not 1.0: a near tie early in a proposal loses the rest of it, and a proposed end token the model takes too
    # ends the text without its cell being kept (counted as not accepted)
    assert accepted / proposed > 0.9, (accepted, proposed)


async def test_max_tokens_stop_strings_and_eos_end_where_plain_decoding_does(model, engines):
    plain, spec = engines
    reference = await generate(plain, model, COPY, "ref")
    assert reference[-1].stop_reason is StopReason.EOS  # type: ignore[union-attr]
    stop = text(reference)[40:48]
    for kw in ({"max_tokens": 7}, {"max_tokens": 96, "stop": (stop,)}, {"max_tokens": 200}):
        a = await generate(plain, model, COPY, f"p-{kw}", **dict(kw))
        b = await generate(spec, model, COPY, f"s-{kw}", **dict(kw))
        ea, eb = a[-1], b[-1]
        assert isinstance(ea, Finished) and isinstance(eb, Finished)
        assert text(a) == text(b), kw
        assert (ea.stop_reason, ea.tokens_out) == (eb.stop_reason, eb.tokens_out), kw
        assert eb.draft_tokens > 0, kw


async def test_a_cancelled_speculating_job_ends_and_the_next_one_is_unharmed(model, engines):
    plain, spec = engines
    queue: asyncio.Queue = asyncio.Queue()
    spec.submit(Job(job_id="cancel-me", prompt_tokens=model.prompt_tokens(COPY), params=SamplingParams(temperature=0),
                    max_tokens=96, deliver=queue.put_nowait))
    out: list[Output] = []
    while not any(isinstance(o, TokenText) for o in out):
        out.extend(await asyncio.wait_for(queue.get(), 60))
    assert spec.cancel("cancel-me")
    while not isinstance(out[-1], Finished):
        out.extend(await asyncio.wait_for(queue.get(), 60))
    end = out[-1]
    assert end.stop_reason is StopReason.CANCELLED and end.tokens_out < 96
    reference = text(await generate(plain, model, COPY, "after-ref"))
    assert reference.startswith(text(out))
    assert text(await generate(spec, model, COPY, "after")) == reference


def test_draft_settings_that_would_be_ignored_or_are_missing_exit_2():
    model = str(embedded_model_path())
    for args, needle in ((["--spec-type", "draft"], "--spec-draft-model"),
                         (["--spec-draft-model", model], "--spec-draft-model"),
                         (["--spec-type", "ngram", "--spec-draft-model", model], "--spec-type ngram"),
                         (["--spec-draft-ctx-size", "256"], "--spec-draft-ctx-size")):
        result = run_worker(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, result.stderr)


def test_a_draft_of_another_vocabulary_exits_2_naming_the_difference(tmp_path: Path):
    gemma = gemma_gguf(tmp_path)
    result = run_worker("--spec-type", "draft", "--spec-draft-model", str(gemma), "--log-format", "json",
                        "--parallel", "1", "--ctx-size", "256", timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    failed = [line for line in result.stderr.splitlines() if '"model_load_failed"' in line]
    assert failed and "vocabulary types" in failed[0] and "gemma-3-270m" in failed[0], result.stderr[-3000:]


def test_a_draft_model_that_cannot_be_loaded_exits_3_saying_it_is_the_draft(tmp_path: Path):
    result = run_worker("--spec-type", "draft", "--spec-draft-model", str(tmp_path / "nope.gguf"), "--log-format",
                        "json", "--parallel", "1", "--ctx-size", "256", timeout=120)
    assert result.returncode == 3, result.stderr[-3000:]
    failed = [line for line in result.stderr.splitlines() if '"model_load_failed"' in line]
    assert failed and "the draft model (--spec-draft-model)" in failed[0] and "nope.gguf" in failed[0], failed


async def test_a_worker_with_a_draft_model_reports_proposals_in_its_end_event_and_metrics():
    w = WorkerProcess(["--parallel", "2", "--ctx-size", "512", "--spec-type", "draft",
                       "--spec-draft-model", str(embedded_model_path())]).start()
    try:
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            async with http.post(f"{w.url}/v1/inference",
                                 json={"prompt": COPY, "temperature": 0, "max_tokens": 48}) as resp:
                assert resp.status == 200, await resp.text()
                end = (await read_sse(resp))[-1]
            assert end["type"] == "end" and end["draft_tokens"] > 0, end
            assert 0 < end["accepted_tokens"] <= end["draft_tokens"] and end["acceptance_rate"] > 0.5, end
            async with http.get(f"{w.url}/metrics") as resp:
                metrics = await resp.text()
        counters = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                    if line.startswith("llm_worker_spec_")}
        assert counters["llm_worker_spec_draft_tokens_total"] >= end["draft_tokens"]
        assert counters["llm_worker_spec_accepted_tokens_total"] >= end["accepted_tokens"] > 0
        loaded = w.wait_for("draft_model_loaded")
        assert loaded["ctx_size"] == 512 and loaded["architecture"] == "llama"
    finally:
        w.stop()


async def test_two_sequences_speculate_together_through_one_batch_of_draft_decodes(model):
    """Two jobs at once: the draft's catch-ups and proposals for both go through shared decodes (each sequence in
    its own KV stream of the draft), and each text is still the model's."""
    draft = DraftModel(Model.load(embedded_model_path(), ref="draft", fmt="gguf", gpu_layers=0), n_ctx_seq=1024,
                       n_seq=2, n_batch=512, threads=1, flash_attn="off")
    plain, spec = build(model, 1, None), build(model, 2, SpecConfig(gate=False), draft)
    decodes: list[int] = []  # sequences per draft decode
    decode = draft.decode
    draft.decode = lambda parts: (decodes.append(len(parts)), decode(parts))[1]  # type: ignore[method-assign]
    for e in (plain, spec):
        e.start(asyncio.get_running_loop())
    try:
        prompts = [COPY, QUOTES[1]]
        references = [await generate(plain, model, p, f"ref{i}", logprobs=2) for i, p in enumerate(prompts)]
        outs = await asyncio.gather(*(generate(spec, model, p, f"two{i}") for i, p in enumerate(prompts)))
        for reference, out in zip(references, outs, strict=True):
            near_tie = divergence_gap(reference, text(out))
            assert near_tie is None or near_tie < 0.15, (near_tie, text(reference), text(out))
            assert out[-1].draft_tokens > 0 and out[-1].acceptance_rate > 0.8  # type: ignore[union-attr]
        assert max(decodes) == 2  # both sequences in one draft decode
    finally:
        plain.close()
        spec.close()
        draft.close()
