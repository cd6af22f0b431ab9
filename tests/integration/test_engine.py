"""The engine in-process on the real model: failure paths a client cannot provoke through HTTP."""

from __future__ import annotations

import asyncio

import pytest

from worker.engine.core import EngineCore
from worker.engine.outputs import Job
from worker.engine.sampling import SamplingParams
from worker.http.protocol_native import native_event
from worker.llamacpp import Context, Model
from worker.metrics import Metrics
from worker.models.resolve import embedded_model_path
from worker.narration import recording


@pytest.fixture(scope="module")
def model():
    m = Model.load(embedded_model_path(), ref="embedded", fmt="gguf", gpu_layers=0)
    yield m
    m.close()


def make_engine(model: Model, *, ctx_size: int, parallel: int, max_queue: int, batch_size: int, threads: int,
           backend_sampling: bool = False, overlap: bool | None = None, offloaded: bool = False,
           chain_idle_s: float = 1.0) -> EngineCore:
    """The engine as the runtime builds it, on the CPU."""
    ctx = Context(model, n_ctx=ctx_size * parallel, n_seq=parallel, n_batch=batch_size, threads=threads,
                  in_graph_sampling=backend_sampling)
    assert ctx.warm_up() == 0
    return EngineCore(ctx, model, ctx_size=ctx_size, parallel=parallel, max_queue=max_queue, batch_size=batch_size,
                      in_graph_sampling=backend_sampling, offloaded=offloaded, overlap=overlap,
                      chain_idle_s=chain_idle_s, metrics=Metrics(), prefix_cache=False)


async def events_of(job: Job | None, queue: asyncio.Queue) -> list[dict]:
    """The job's outputs as the native stream's events."""
    events: list[dict] = []
    while not events or events[-1]["type"] not in ("end", "error"):
        events.extend(native_event(o, "embedded").model_dump(mode="json")
                      for o in await asyncio.wait_for(queue.get(), 30))
    return events


async def run_job(engine: EngineCore, tokens: list[int], **kw) -> list[dict]:
    queue: asyncio.Queue = asyncio.Queue()
    job = Job(job_id=kw.pop("job_id", "j"), prompt_tokens=tokens, params=SamplingParams(temperature=0),
              max_tokens=kw.pop("max_tokens", 4), deliver=queue.put_nowait, **kw)
    engine.submit(job)
    return await events_of(job, queue)


async def test_a_failed_decode_ends_the_request_with_error_and_the_engine_serves_on(model):
    engine = make_engine(model, ctx_size=256, parallel=2, max_queue=4, batch_size=64, threads=1)
    engine.start(asyncio.get_running_loop())
    try:
        with recording() as narrated:
            # a token id outside the vocabulary makes llama_decode refuse the batch
            bad = await run_job(engine, [1, model.n_vocab + 10], job_id="bad", narration=True)
            good = await run_job(engine, model.tokenize("Hello"), job_id="good")
        assert bad[-1]["type"] == "error" and bad[-1]["code"] == "decode_failed"
        assert [e["action"] for e in bad if e["type"] == "narration"] == ["inference_start", "inference_failed"]
        assert good[-1]["type"] == "end" and good[-1]["tokens_out"] >= 1
        failed = [e for e in narrated if e["action"] == "inference_failed"]
        assert failed[0]["job_id"] == "bad" and failed[0]["level"] == "error"
        assert engine.busy == 0 and engine.kv_usage() == 0
        assert engine.scheduler.metrics.registry.get_sample_value("llm_worker_errors_total",
                                                                  {"code": "decode_failed"}) == 1
    finally:
        engine.close()


async def test_model_load_progress_callback_reaches_one():
    seen: list[float] = []
    m = Model.load(embedded_model_path(), ref="embedded", fmt="gguf", gpu_layers=0, progress=seen.append)
    m.close()
    assert seen and seen == sorted(seen) and seen[-1] == 1.0


async def test_a_bad_sequence_does_not_take_its_batch_mates_down(model):
    engine = make_engine(model, ctx_size=256, parallel=2, max_queue=4, batch_size=64, threads=1)
    engine.start(asyncio.get_running_loop())
    try:
        solo = await run_job(engine, model.tokenize("The sky is"), job_id="solo", max_tokens=12)
        good, bad = await asyncio.gather(
            run_job(engine, model.tokenize("The sky is"), job_id="good", max_tokens=12),
            run_job(engine, [1, 2, model.n_vocab + 99], job_id="bad"),
        )
        assert bad[-1]["type"] == "error"
        assert good[-1]["type"] == "end" and good[-1]["tokens_out"] == solo[-1]["tokens_out"]
        text = lambda evs: "".join(e["t"] for e in evs if e["type"] == "token")
        assert text(good) == text(solo)
    finally:
        engine.close()


def text_of(events: list[dict]) -> str:
    return "".join(e["t"] for e in events if e["type"] == "token")


async def sampled(engine: EngineCore, model: Model, seed: int | None, job_id: str) -> str:
    queue: asyncio.Queue = asyncio.Queue()
    job = Job(job_id=job_id, prompt_tokens=model.tokenize("Once upon a time"), max_tokens=24,
              params=SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=seed), deliver=queue.put_nowait)
    engine.submit(job)
    return text_of(await events_of(job, queue))


@pytest.mark.parametrize("backend_sampling", [False, True], ids=["cpu-chain", "in-graph"])
async def test_a_reused_chain_is_as_good_as_new(model, backend_sampling):
    """Slots keep their sampler chain between jobs with equal parameters; a reset must make it new."""
    engine = make_engine(model, ctx_size=256, parallel=1, max_queue=4, batch_size=64, threads=1,
                    backend_sampling=backend_sampling)
    engine.start(asyncio.get_running_loop())
    try:
        a, b = await sampled(engine, model, 7, "a"), await sampled(engine, model, 7, "b")
        c = await sampled(engine, model, 8, "c")
        r1, r2 = await sampled(engine, model, None, "r1"), await sampled(engine, model, None, "r2")
        greedy = text_of(await run_job(engine, model.tokenize("The sky is"), job_id="g", max_tokens=12))
    finally:
        engine.close()
    assert a == b and a != c
    assert r1 != r2  # no seed: each job draws its own
    assert greedy  # the chain swap back to greedy works


async def test_greedy_in_the_graph_is_greedy_on_the_cpu(model):
    """In the graph a greedy chain is llama.cpp's greedy sampler followed by the token-only one (only the token comes
    back to the host); a new job's first tokens are numpy's argmax until its chain is attached. The text is the CPU
    chain's."""
    texts = []
    for backend_sampling in (False, True):
        engine = make_engine(model, ctx_size=256, parallel=2, max_queue=4, batch_size=64, threads=1,
                             backend_sampling=backend_sampling)
        engine.start(asyncio.get_running_loop())
        try:
            texts.append([text_of(await run_job(engine, model.tokenize(p), job_id=p, max_tokens=24))
                          for p in ("The sky is", "def fibonacci(n):")])
            if backend_sampling:
                assert all(not s.chain_on_cpu for s in engine.scheduler.slots if s.chain_params is not None)
        finally:
            engine.close()
    assert texts[0] == texts[1] and all(texts[0])


def without_timings(events: list[dict]) -> list[dict]:
    drop = {"ttft_ms", "decode_time_ms", "tokens_per_sec", "started_at"}
    return [{k: v for k, v in e.items() if k not in drop} for e in events]


async def test_text_work_overlapped_with_the_next_step_changes_nothing_a_client_sees(model):
    """On a GPU a token's text is done while the next step runs; the streams must be those of the plain order.

    Stop sequences end a job after its next step was queued (that token is dropped, its KV cell freed), so a
    job that follows on the same slot would show any leftover. Two slots run at once, one ending early.
    """
    prompt = model.tokenize("The capital of France is")
    plain_text = text_of(await _solo(model, prompt, max_tokens=16))
    stop = plain_text[len(plain_text) // 3 : len(plain_text) // 3 + 3]  # ends the job mid-stream, inside a token
    cases = [{"max_tokens": 16}, {"max_tokens": 16, "stop": (stop,)}, {"max_tokens": 1},
             {"max_tokens": 24, "ignore_eos": True}, {"max_tokens": 16, "stop": (plain_text[-2:],)}]

    async def all_cases(overlap: bool) -> list[list[dict]]:
        engine = make_engine(model, ctx_size=256, parallel=2, max_queue=8, batch_size=64, threads=1, overlap=overlap)
        engine.start(asyncio.get_running_loop())
        try:
            runs = [await run_job(engine, prompt, job_id=f"s{i}", **kw) for i, kw in enumerate(cases)]
            runs += await asyncio.gather(*(run_job(engine, prompt, job_id=f"p{i}", **kw)
                                           for i, kw in enumerate(cases[:2])))
            runs.append(await run_job(engine, prompt, job_id="after", max_tokens=16))
            assert engine.busy == 0 and engine.kv_usage() == 0
            st = engine.stats  # what engine_stats narrates at shutdown
            assert st.steps >= 16 * 3 and 0 < st.queue_s + st.wait_s < st.step_s
            return [without_timings(r) for r in runs]
        finally:
            engine.close()

    plain, overlapped = await all_cases(False), await all_cases(True)
    assert overlapped == plain
    ends = [r[-1] for r in plain]
    assert [e["stop_reason"] for e in ends[:5]] == ["max_tokens", "stop_sequence", "max_tokens", "max_tokens",
                                                    "stop_sequence"]
    assert ends[1]["tokens_out"] < 16 and ends[3]["tokens_out"] == 24
    assert text_of(overlapped[-1]) == plain_text  # the slot holds nothing of the jobs before


async def _solo(model: Model, prompt: list[int], **kw) -> list[dict]:
    engine = make_engine(model, ctx_size=256, parallel=1, max_queue=4, batch_size=64, threads=1)
    engine.start(asyncio.get_running_loop())
    try:
        return await run_job(engine, prompt, job_id="solo", **kw)
    finally:
        engine.close()


async def test_idle_chains_leave_the_graph_and_a_job_goes_where_its_chain_is(model):
    """Every step samples for every chain of llama.cpp's samplers attached in the graph, busy or not; so such
    chains idle for long are detached, and a job is given the free slot whose chain already has its parameters.
    (Top-p over the whole vocabulary is such a chain; a group's draw costs nothing idle and stays: draws.py.)"""
    engine = make_engine(model, ctx_size=256, parallel=3, max_queue=8, batch_size=64, threads=1, backend_sampling=True,
                    chain_idle_s=1.0)
    engine.start(asyncio.get_running_loop())

    async def job(job_id: str, seed: int) -> tuple[str, int]:
        queue: asyncio.Queue = asyncio.Queue()
        engine.submit(Job(job_id=job_id, prompt_tokens=model.tokenize("Once upon a time"), max_tokens=12,
                          params=SamplingParams(temperature=1.0, top_p=0.9, seed=seed), narration=True,
                          deliver=queue.put_nowait))
        events = await events_of(None, queue)
        slot = next(e["slot"] for e in events if e.get("action") == "inference_start")
        return text_of(events), slot

    attached = lambda: {s.seq_id: s.chain_params.seed for s in engine.scheduler.slots if s.chain_params is not None}
    try:
        burst = await asyncio.gather(job("a", 1), job("b", 2), job("c", 3))
        assert attached() == {0: 1, 1: 2, 2: 3}
        again, slot = await job("b2", 2)  # no sleep: nothing is detached yet, and seed 2's chain is on slot 1
        assert slot == 1 and again == burst[1][0]
        await asyncio.sleep(1.3)
        late, slot = await job("c2", 3)  # the idle chains of slots 0 and 1 are detached before this step
        assert slot == 2 and late == burst[2][0]
        assert attached() == {2: 3}
        fresh, _ = await job("a2", 1)  # a chain attached anew samples as the first did
        assert fresh == burst[0][0]
    finally:
        engine.close()


def test_ggml_log_can_be_dropped_in_c_and_routed_back():
    """In steady GPU steps the engine keeps ggml's per-step log out of Python; llama.cpp's own log stays."""
    import subprocess
    import sys

    probe = """if True:
        from worker.narration import configure
        configure(worker_id=None, level="debug")
        from worker.llamacpp import backend as llama, Model
        from worker.models.resolve import embedded_model_path
        llama.init_backend()
        ggml = llama._ggml()
        ggml.ggml_log_internal(3, b"ggml line one\\n")
        llama.route_ggml_log(to_python=False)
        ggml.ggml_log_internal(3, b"ggml line two\\n")
        llama.route_ggml_log(to_python=True)
        ggml.ggml_log_internal(3, b"ggml line three\\n")
        Model.load(embedded_model_path(), ref="e", fmt="gguf", gpu_layers=0).close()
    """
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    logs = out.stdout + out.stderr
    assert out.returncode == 0, logs[-2000:]
    assert "ggml line one" in logs and "ggml line two" not in logs and "ggml line three" in logs
    assert "[llama.cpp] llama_model_loader" in logs or '"actor": "llama.cpp"' in logs


async def test_ggml_log_is_dropped_only_in_steady_gpu_steps(model, monkeypatch):
    """Prompt steps and steps after a chain was attached or detached may allocate: there ggml's log must reach ours."""
    from worker.llamacpp import context

    routed: list[bool] = []
    monkeypatch.setattr(context, "route_ggml_log", lambda to_python: routed.append(to_python))
    # the engine's GPU behaviour, on the CPU
    engine = make_engine(model, ctx_size=256, parallel=2, max_queue=8, batch_size=64, threads=1, backend_sampling=True,
                    overlap=False, offloaded=True)
    engine.start(asyncio.get_running_loop())
    try:
        await run_job(engine, model.tokenize("The sky is"), job_id="a", max_tokens=6)
        assert routed == [False]  # the prompt step (which also attached the chain) keeps the log; then quiet
        await run_job(engine, model.tokenize("The sky is"), job_id="b", max_tokens=6)
        assert routed == [False, True, False]  # a prompt step again: routed back, then quiet
        queue: asyncio.Queue = asyncio.Queue()  # a one-token prompt: only the new chain makes its step unsteady
        engine.submit(Job(job_id="c", prompt_tokens=model.tokenize("The")[:1], max_tokens=4,
                          params=SamplingParams(temperature=0.7, seed=1), deliver=queue.put_nowait))
        await events_of(None, queue)
        assert routed == [False, True, False, True, False]
    finally:
        engine.close()


async def test_tokens_sampled_in_the_graph_are_read_without_a_log_line_each(model):
    """llama_sampler_sample logs a DEBUG line for every token a chain sampled in the graph; each line calls our log
    callback from inside llama.cpp, which must take the GIL from the event loop's thread. The engine reads those
    tokens itself, and the text is the same."""
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="DEBUG")
    try:
        texts = []
        for backend_sampling in (False, True):
            engine = make_engine(model, ctx_size=256, parallel=2, max_queue=4, batch_size=64, threads=1,
                                 backend_sampling=backend_sampling)
            engine.start(asyncio.get_running_loop())
            try:
                texts.append(text_of(await run_job(engine, model.tokenize("The sky is"), job_id="a", max_tokens=24)))
            finally:
                engine.close()
    finally:
        logger.remove(sink)
    assert texts[0] == texts[1] and texts[0]
    assert lines and not [line for line in lines if "Backend sampler selected token" in line]
