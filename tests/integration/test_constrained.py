"""Logits read on the CPU, in-process on the real model: constrained output, logprobs, the prompt's logprobs.

Values are checked against llama.cpp's own logits (a separate context decoding the same tokens); constrained output
is checked with jsonschema at temperatures a model knows nothing of JSON at.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import numpy as np
import pytest

from tests.integration.test_engine import make_engine
from worker.engine.constraints import Grammars
from worker.engine.core import EngineCore
from worker.engine.outputs import (
    Constraint,
    ConstraintError,
    Failed,
    Finished,
    Job,
    Output,
    PromptLogprobs,
    TokenText,
)
from worker.engine.sampling import SamplingParams
from worker.llamacpp import Context, Model
from worker.llamacpp.context import PROMPT_OUTPUTS
from worker.models.resolve import embedded_model_path

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model():
    m = Model.load(embedded_model_path(), ref="embedded", fmt="gguf", gpu_layers=0)
    yield m
    m.close()


@pytest.fixture(scope="module")
def grammars(model: Model) -> Grammars:
    return Grammars(model.guidance_tokenizer, lambda t: model.piece(t, special=True), model.n_vocab)


@pytest.fixture
async def engine(model: Model, grammars: Grammars):
    eng = make_engine(model, ctx_size=512, parallel=4, max_queue=64, batch_size=256, threads=2)
    eng.grammars = grammars
    eng.scheduler.guides = grammars.guide
    eng.start(asyncio.get_running_loop())
    yield eng
    eng.close()


async def generate(engine: EngineCore, model: Model, prompt: str, job_id: str, **kw) -> list[Output]:
    queue: asyncio.Queue = asyncio.Queue()
    params = kw.pop("params", SamplingParams(temperature=0))
    job = Job(job_id=job_id, prompt_tokens=model.prompt_tokens(prompt), params=params,
              max_tokens=kw.pop("max_tokens", 32), deliver=queue.put_nowait, **kw)
    engine.submit(job)
    out: list[Output] = []
    while not out or not isinstance(out[-1], Finished):
        out.extend(await asyncio.wait_for(queue.get(), 120))
        assert all(type(o).__name__ != "Failed" for o in out), out
    return out


def text(outputs: list[Output]) -> str:
    return "".join(o.text for o in outputs if isinstance(o, TokenText))


def chat(model: Model, user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def reference_logprobs(model: Model, tokens: list[int], chunk: int = 512) -> np.ndarray:
    """llama.cpp's log-softmax at every position of the tokens, decoded `chunk` tokens a batch in a fresh context."""
    ctx = Context(model, n_ctx=512, n_seq=1, n_batch=512, threads=2, n_outputs=512)
    rows = []
    try:
        for start in range(0, len(tokens), chunk):
            part = tokens[start : start + chunk]
            assert ctx.decode([(0, part, start, True, True, 0)]) == 0
            rows += [ctx.logits(i).astype(np.float64) for i in range(len(part))]
    finally:
        ctx.close()
    rows = np.stack(rows)
    top = rows.max(axis=1, keepdims=True)
    return rows - (top + np.log(np.exp(rows - top).sum(axis=1, keepdims=True)))


async def test_json_schema_output_validates_even_at_temperature_two(engine, model):
    constraint = Constraint("json_schema", json.dumps(PERSON))
    engine.check_constraint(constraint)
    runs = await asyncio.gather(*(
        generate(engine, model, chat(model, "Tell me a joke."), f"hot-{i}", constraint=constraint,
                 params=SamplingParams(temperature=2.0, seed=i), max_tokens=160)
        for i in range(12)))
    for out in runs:
        end = out[-1]
        assert isinstance(end, Finished) and end.stop_reason.value == "eos", (text(out), end)
        jsonschema.validate(json.loads(text(out)), PERSON)
    assert len({text(out) for out in runs}) > 6  # sampled, not one forced document


async def test_a_constrained_job_drawn_in_the_graph_validates_at_temperature_two(model, grammars):
    """Where chains sample in the decode graph, a sampled constrained job draws there like its neighbours; its guide
    checks each token and only a refused one is drawn again on the CPU, from the chain's own logits row."""
    eng = make_engine(model, ctx_size=512, parallel=4, max_queue=64, batch_size=256, threads=2, backend_sampling=True)
    eng.grammars = grammars
    eng.scheduler.guides = grammars.guide
    reads = []
    logits = eng.ctx.logits
    eng.ctx.logits = lambda index: (reads.append(index), logits(index))[1]  # type: ignore[method-assign]
    eng.start(asyncio.get_running_loop())
    constraint = Constraint("json_schema", json.dumps(PERSON))
    try:
        eng.check_constraint(constraint)
        runs = await asyncio.gather(*(
            generate(eng, model, chat(model, "Tell me a joke."), f"hot-{i}", constraint=constraint,
                     params=SamplingParams(temperature=2.0, seed=i), max_tokens=160)
            for i in range(8)))
        assert all(s.reads_row and not s.chain_on_cpu and s.chain_params is not None for s in eng.scheduler.slots)
    finally:
        eng.close()
    tokens = 0
    for out in runs:
        end = out[-1]
        assert isinstance(end, Finished) and end.stop_reason.value == "eos", (text(out), end)
        jsonschema.validate(json.loads(text(out)), PERSON)
        tokens += end.tokens_out
    assert len({text(out) for out in runs}) > 4  # sampled, not one forced document
    assert 0 < len(reads) < tokens  # drawn again where refused, and only there


async def test_json_object_regex_gbnf_and_lark_all_hold(engine, model):
    cases = [
        (Constraint("json_object"), lambda t: isinstance(json.loads(t), dict)),
        (Constraint("regex", r"[0-9]{3}-[a-z]{2}"), lambda t: len(t) == 6 and t[3] == "-" and t[:3].isdigit()),
        (Constraint("gbnf", 'root ::= "yes" | "no"'), lambda t: t in ("yes", "no")),
        (Constraint("lark", 'start: "colour: " COLOUR\nCOLOUR: "red" | "green"'), lambda t: t in
         ("colour: red", "colour: green")),
    ]
    for i, (constraint, holds) in enumerate(cases):
        engine.check_constraint(constraint)
        # JSON of any shape ends where the model ends it: asked for one key, it did within 300 tokens for 8 seeds of
        # 8, where "Say something." ran on to max_tokens for 3 of 8 (a seeded draw depends on the CPU's rounding)
        ask = "Say something."
        if constraint.kind == "json_object":
            ask = 'Reply with a JSON object with one key, "answer".'
        out = await generate(engine, model, chat(model, ask), f"c-{i}", constraint=constraint,
                             params=SamplingParams(temperature=0.7, seed=i), max_tokens=300)
        assert out[-1].stop_reason.value == "eos" and holds(text(out)), (constraint, text(out))  # type: ignore


@pytest.mark.parametrize("schema, names", [
    ({"type": "object", "dependentSchemas": {"a": {}}}, "dependentSchemas"),
    ({"type": "string", "format": "no-such-format"}, "no-such-format"),
])
def test_a_schema_keyword_that_cannot_be_enforced_is_refused_by_name(grammars, schema, names):
    with pytest.raises(ConstraintError, match=names):
        grammars.check(Constraint("json_schema", json.dumps(schema)))


@pytest.mark.parametrize("constraint", [Constraint("json_schema", "{not json"), Constraint("gbnf", "root ::= ("),
                                        Constraint("lark", "start: (")])
def test_an_unreadable_grammar_is_refused(grammars, constraint):
    with pytest.raises(ConstraintError):
        grammars.check(constraint)


@pytest.mark.parametrize("constraint", [Constraint("json_schema", '{"$ref": "#"}'),
                                        Constraint("gbnf", "root ::= root")])
def test_a_grammar_that_allows_no_first_token_is_refused(grammars, constraint):
    """It compiles: only its first mask shows that nothing can start it."""
    with pytest.raises(ConstraintError, match="allows no first token"):
        grammars.check(constraint)


async def test_a_grammar_with_no_end_fails_its_job_where_it_breaks_and_never_ends_as_complete(engine, model):
    """`root ::= "a" root` allows a first token, then llguidance gives up on it (its parser's item limit) and stops:
    the job fails there, with llguidance's reason in a line, and is not reported as a grammar completed."""
    constraint = Constraint("gbnf", 'root ::= "a" root')
    engine.check_constraint(constraint)
    queue: asyncio.Queue = asyncio.Queue()
    engine.submit(Job(job_id="endless", prompt_tokens=model.prompt_tokens(chat(model, "Go.")),
                      params=SamplingParams(temperature=0), max_tokens=8, deliver=queue.put_nowait,
                      constraint=constraint))
    out: list[Output] = []
    while not out or not isinstance(out[-1], (Finished, Failed)):
        out.extend(await asyncio.wait_for(queue.get(), 120))
    assert isinstance(out[-1], Failed) and out[-1].code == "constraint_failed", out[-1]
    assert "Too many items" in out[-1].message and "\n" not in out[-1].message
    assert text(out) and set(text(out)) == {"a"}


async def test_a_lazy_constraint_holds_only_after_its_trigger(engine, model):
    # forced to start with the trigger by a prompt the model copies; what follows must be three digits
    constraint = Constraint("regex", "[0-9]{3}", trigger="CODE:")
    out = await generate(engine, model, chat(model, "Repeat exactly: CODE: abc"), "lazy", constraint=constraint,
                         max_tokens=40)
    got = text(out)
    if "CODE:" in got:
        after = got.split("CODE:", 1)[1]
        assert after[:3].isdigit() and len(after) == 3, got
    else:  # the model never wrote the trigger: the text is free, and the constraint never armed
        assert out[-1].stop_reason.value in ("eos", "max_tokens")  # type: ignore[union-attr]


async def test_logprobs_are_llama_cpps_own(engine, model):
    prompt = chat(model, "What is the capital of France?")
    out = await generate(engine, model, prompt, "lp", logprobs=5, max_tokens=12)
    logprobs = [lp for o in out if isinstance(o, TokenText) for lp in o.logprobs]
    generated = [lp.token for lp in logprobs]
    assert len(generated) == out[-1].tokens_out  # type: ignore[union-attr]
    tokens = model.prompt_tokens(prompt) + generated
    ref = reference_logprobs(model, tokens)
    n = len(model.prompt_tokens(prompt))
    for i, lp in enumerate(logprobs):
        row = ref[n - 1 + i]
        # generated tokens' positions were computed one at a time, the reference's in one batch: llama.cpp rounds
        # those differently (see Scheduler._reusable_cells), hence a tolerance rather than equality
        assert lp.logprob == pytest.approx(row[lp.token], abs=0.05)
        assert [t.token for t in lp.top][:1] == [int(row.argmax())] == [lp.token]  # greedy: the top token
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
        assert sum(np.exp(t.logprob) for t in lp.top) <= 1.0 + 1e-6
        assert lp.piece == model.piece(lp.token)


async def test_logprobs_of_a_job_drawn_in_the_graph_are_llama_cpps_own(model, grammars):
    """Where chains sample in the decode graph, a sampled job that asks for logprobs (constrained or not) draws
    there, and its logprobs come from its chain's row (the logits at its temperature, scaled back)."""
    eng = make_engine(model, ctx_size=512, parallel=2, max_queue=8, batch_size=256, threads=2, backend_sampling=True)
    eng.grammars = grammars
    eng.scheduler.guides = grammars.guide
    eng.start(asyncio.get_running_loop())
    prompt = chat(model, "What is the capital of France?")
    try:
        outs = await asyncio.gather(
            generate(eng, model, prompt, "free", logprobs=3, max_tokens=12,
                     params=SamplingParams(temperature=0.7, seed=1)),
            generate(eng, model, prompt, "digits", logprobs=3, max_tokens=12,
                     params=SamplingParams(temperature=0.7, seed=2), constraint=Constraint("regex", "[0-9]{5}")))
        assert all(s.reads_row and not s.chain_on_cpu for s in eng.scheduler.slots)
    finally:
        eng.close()
    n = len(model.prompt_tokens(prompt))
    for out in outs:
        logprobs = [lp for o in out if isinstance(o, TokenText) for lp in o.logprobs]
        assert len(logprobs) == out[-1].tokens_out  # type: ignore[union-attr]
        ref = reference_logprobs(model, model.prompt_tokens(prompt) + [lp.token for lp in logprobs])
        for i, lp in enumerate(logprobs):
            row = ref[n - 1 + i]
            assert lp.logprob == pytest.approx(row[lp.token], abs=0.05)  # the model's, not the masked or scaled
            assert [t.logprob for t in lp.top] == pytest.approx(sorted(row, reverse=True)[:3], abs=0.05)
    assert text(outs[1]).isdigit() and len(text(outs[1])) == 5


async def test_prompt_logprobs_equal_llama_cpps_and_the_cache_does_not_skip_them(engine, model):
    prompt = "The quick brown fox jumps over the lazy dog. " * 12  # > one step's worth of prompt logits
    tokens = model.prompt_tokens(prompt)
    await generate(engine, model, prompt, "warm", max_tokens=1)
    out = await generate(engine, model, prompt, "echo", max_tokens=1, prompt_logprobs=2)
    assert [type(o).__name__ for o in out[:2]] == ["Started", "PromptLogprobs"]
    lps = out[1].tokens  # type: ignore[union-attr]
    assert isinstance(out[1], PromptLogprobs) and len(lps) == len(tokens) and lps[0] is None
    # computed as the engine computes a prompt whose logprobs are read: PROMPT_OUTPUTS positions a step (in one
    # batch, other batch sizes round otherwise: up to 0.12 apart here)
    ref = reference_logprobs(model, tokens, chunk=PROMPT_OUTPUTS)
    for i in range(1, len(tokens)):
        assert lps[i].token == tokens[i]
        assert lps[i].logprob == pytest.approx(ref[i - 1][tokens[i]], abs=1e-5)
        assert len(lps[i].top) == 2 and lps[i].top[0].token == int(ref[i - 1].argmax())


async def test_a_constrained_stream_keeps_most_of_the_unconstrained_speed(engine, model):
    """The issue's bar: >= 0.8x the tokens/s of an unconstrained stream (CPU, embedded model), alternated."""
    prompt = chat(model, "Write a long story about a dragon.")
    anything = Constraint("regex", r"[^\n]{400}")  # a wide mask every step, never complete before max_tokens
    free, constrained = [], []
    for i in range(3):
        for bucket, kw in ((free, {}), (constrained, {"constraint": anything})):
            out = await generate(engine, model, prompt, f"speed-{i}-{len(bucket)}-{bool(kw)}", ignore_eos=True,
                                 max_tokens=64, params=SamplingParams(temperature=0.8, seed=i), **kw)
            bucket.append(out[-1].tokens_per_sec)  # type: ignore[union-attr]
    ratio = max(constrained) / max(free)  # the best of each: a busy neighbour slows one run, not the method
    print(f"constrained/unconstrained tokens/s: {ratio:.2f} ({max(constrained):.1f} vs {max(free):.1f})")
    assert ratio >= 0.8


async def test_logits_read_beside_chains_in_the_graph_are_the_models(model: Model, grammars: Grammars):
    """Where chains sample in the decode graph (a GPU), a job that reads its logits gets an in-graph sampler that
    hands them over as they are, so that llama.cpp copies its row alone: the values, masks and tokens must be those
    of the plain CPU path. The prompt's logprobs (echo: many rows of one sequence a step, which llama.cpp's in-graph
    samplers do not take) are read without one."""

    def summary(out: list[Output]) -> tuple:
        prompt = next((o.tokens for o in out if isinstance(o, PromptLogprobs)), ())
        generated = [lp for o in out if isinstance(o, TokenText) for lp in o.logprobs]
        return (text(out), [lp.token for lp in generated],
                np.array([lp.logprob for lp in generated] + [lp.logprob for lp in prompt if lp is not None]),
                [[t.token for t in lp.top] for lp in generated])

    results = []
    for backend_sampling in (False, True):
        eng = make_engine(model, ctx_size=512, parallel=2, max_queue=8, batch_size=256, threads=2,
                          backend_sampling=backend_sampling)
        eng.grammars = grammars
        eng.scheduler.guides = grammars.guide
        eng.start(asyncio.get_running_loop())
        try:
            # a plain job first: its chain is in the graph, and stays there while the next ones run beside it
            await generate(eng, model, "The capital of France is", "plain", max_tokens=24, ignore_eos=True)
            for job_id, echo in (("read", None), ("echo", 2)):
                both = await asyncio.gather(
                    generate(eng, model, "The capital of France is", f"plain-{job_id}", max_tokens=24,
                             ignore_eos=True),
                    generate(eng, model, "My phone number is", job_id, max_tokens=12, logprobs=3, prompt_logprobs=echo,
                             constraint=Constraint("regex", r"[0-9]{3}-[0-9]{4}")))
                results.append((backend_sampling, text(both[0]), summary(both[1])))
                slots = eng.scheduler.slots
                if backend_sampling:
                    assert [s.logits_row for s in slots].count(True) == (echo is None)
                    assert [s.chain_params is not None and not s.chain_on_cpu for s in slots].count(True) == 1
        finally:
            eng.close()
    for (_, plain_cpu, cpu), (_, plain_graph, graph) in zip(results[:2], results[2:], strict=True):
        assert plain_cpu == plain_graph
        assert cpu[0] == graph[0] and cpu[1] == graph[1] and cpu[3] == graph[3]
        assert len(cpu[2]) >= 8 and np.allclose(cpu[2], graph[2], atol=1e-4)
