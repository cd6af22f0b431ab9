"""Filler tokens that even a step out over per-slot KV streams (worker/llamacpp/ubatches.py), on the real model:
the step's logits are those of the step without filler, and every sequence's cells are as if it never ran."""

from __future__ import annotations

import numpy as np
import pytest

from worker.llamacpp import Context, Model
from worker.models.resolve import embedded_model_path


@pytest.fixture(scope="module")
def model():
    m = Model.load(embedded_model_path(), ref="embedded", fmt="gguf", gpu_layers=0)
    yield m
    m.close()


def run_steps(model: Model, filler: bool) -> tuple[list[np.ndarray], list[list[int]], list[int]]:
    """Four sequences' prompts, then steps with an idle sequence between busy ones and prompt chunks of unequal
    lengths beside decoders; each step's logits, each sequence's last position after each step, and how many tokens
    each step put in the batch."""
    import llama_cpp as lc

    ctx = Context(model, n_ctx=4 * 256, n_seq=4, n_batch=256, threads=2, flash_attn="off", filler=filler)
    try:
        assert ctx.filler is filler
        texts = ["The capital of France is", "Water boils at a temperature of", "One, two, three, four,",
                 "The quick brown fox jumps over"]
        prompts = [model.tokenize(t) for t in texts]
        more = model.tokenize(" and then the story went on for a long while, with many turns of phrase and more",
                              add_special=False)
        pos = [0, 0, 0, 0]
        logits: list[np.ndarray] = []
        positions: list[list[int]] = []
        sizes: list[int] = []

        def step(parts: list[tuple[int, list[int]]]) -> None:
            batch = [(seq, tokens, pos[seq], True, False, 0) for seq, tokens in parts]
            assert ctx.decode(batch) == 0
            index = -1
            for seq, tokens in parts:
                index += len(tokens)
                logits.append(ctx.logits(index).copy())
                pos[seq] += len(tokens)
            sizes.append(ctx._batch.n)
            mem = lc.llama_get_memory(ctx.ptr)
            positions.append([int(lc.llama_memory_seq_pos_max(mem, seq)) for seq in range(4)])

        for seq in range(4):
            step([(seq, prompts[seq])])
        step([(0, more[:1]), (2, more[:1])])  # sequence 1 idle between two decoders
        step([(1, more[:1])])
        step([(0, more[1:2]), (1, more[1:6]), (2, more[1:2]), (3, more[:12])])  # unequal chunks beside decoders
        step([(0, more[2:3]), (1, more[6:7]), (2, more[2:3]), (3, more[12:13])])
        return logits, positions, sizes
    finally:
        ctx.close()


def test_filler_leaves_the_logits_and_every_sequences_cells_as_without_it(model):
    plain_logits, plain_positions, plain_sizes = run_steps(model, filler=False)
    logits, positions, sizes = run_steps(model, filler=True)
    # the steps with a hole and with unequal chunks were padded; the others not
    assert sizes[4] == 3 and plain_sizes[4] == 2
    assert sizes[6] > plain_sizes[6] == 19
    assert [a for a, b in zip(sizes, plain_sizes, strict=True) if a != b] == [sizes[4], sizes[6]]
    assert positions == plain_positions  # filler's cells are gone, the idle sequence's own untouched
    for got, want in zip(logits, plain_logits, strict=True):
        assert int(np.argmax(got)) == int(np.argmax(want))
        np.testing.assert_allclose(got, want, atol=1e-3)


async def test_the_engine_gives_the_same_text_with_filler_as_without(model, monkeypatch):
    """Jobs of unequal prompts and lengths on four slots, sampled in the graph (as on a GPU): slots fall idle
    between busy ones and prompt chunks meet decoders; each job's text is the one it gets without filler."""
    import asyncio

    from worker.engine.core import EngineCore
    from worker.engine.outputs import Finished, Job, TokenText
    from worker.engine.sampling import SamplingParams
    from worker.llamacpp import context

    padded: list[dict[int, int]] = []
    plan = context.plan_filler
    monkeypatch.setattr(context, "plan_filler", lambda *a, **kw: padded.append(plan(*a, **kw)) or padded[-1])
    prompts = ["Once upon a time", "The capital of France is Paris, and the capital of Italy is",
               "1, 2, 3, 4, 5,", "A recipe for bread: take flour, water and salt, then"]
    budgets = [3, 14, 6, 10]

    async def texts(filler: bool) -> list[str]:
        ctx = Context(model, n_ctx=4 * 256, n_seq=4, n_batch=64, threads=2, in_graph_sampling=True, filler=filler)
        engine = EngineCore(ctx, model, ctx_size=256, parallel=4, max_queue=8, batch_size=64, in_graph_sampling=True,
                            prefix_cache=False)
        engine.start(asyncio.get_running_loop())

        async def job(i: int, delay: float) -> str:
            await asyncio.sleep(delay)
            queue: asyncio.Queue = asyncio.Queue()
            engine.submit(Job(job_id=f"j{i}-{delay}", prompt_tokens=model.tokenize(prompts[i]), max_tokens=budgets[i],
                              params=SamplingParams(temperature=0), ignore_eos=True, deliver=queue.put_nowait))
            out = []
            while not out or not isinstance(out[-1], Finished):
                out.extend(await asyncio.wait_for(queue.get(), 30))
            return "".join(o.text for o in out if isinstance(o, TokenText))

        try:
            return await asyncio.gather(*(job(i, 0.0) for i in range(4)), job(0, 0.3), job(2, 0.35))
        finally:
            engine.close()

    plain = await texts(False)
    assert not padded
    assert await texts(True) == plain
    assert any(padded)  # some step was evened out
