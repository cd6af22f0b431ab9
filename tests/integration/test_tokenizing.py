"""Tokenizing is linear, bounded and fair (issue 16, item 1): cutting a long text after its special tokens, and
plain text after a newline before a letter, gives exactly the tokens of the whole (both real vocabularies: SmolLM2's
BPE, Gemma 3's SentencePiece; and the tiny Llama 3 and Qwen 3 tokenizers of tests/chat_models.py, their families'
pre-tokenizer regexes); special-token heavy bodies are tokenized in linear time; a 1-token request stays fast while
the worst bodies are in flight."""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp
import pytest

from tests.chat_models import tool_model_gguf
from tests.integration.test_openai import gemma_gguf
from tests.integration.worker_process import WorkerProcess
from worker.llamacpp import Model
from worker.llamacpp import model as model_module
from worker.models.resolve import embedded_model_path


@pytest.fixture(scope="module", params=["smollm2", "gemma3", "llama3_1", "qwen3"])
def model(request, tmp_path_factory):
    if request.param == "smollm2":
        path = embedded_model_path()
    elif request.param == "gemma3":
        path = gemma_gguf(tmp_path_factory.mktemp("gemma"))
    else:
        path = tool_model_gguf(request.param, tmp_path_factory.mktemp(request.param))
    m = Model.load(path, ref=request.param, fmt="gguf", gpu_layers=0)
    yield m
    m.close()


def random_text(rng: random.Random, specials: list[str], n: int) -> str:
    words = ["hi", " there", "\n", "  ", " ", "\n\n", "héllo", "🦙", "word", "12345", "<", ">", "|", "<|", "_"]
    return "".join(rng.choice(specials) if rng.random() < 0.3 else rng.choice(words) for _ in range(n))


def whole(model: Model, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
    return model._tokenize(text, add_special=add_special, parse_special=parse_special)


@pytest.mark.parametrize("seed", range(6))
def test_cut_tokenizing_equals_the_whole(model, seed):
    rng = random.Random(seed)
    specials = [t for t in ("<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>",
                            "<|endoftext|>", "<pad>", "<mask>", "<unused5>")]
    text = random_text(rng, specials, 3000)
    assert len(text) > 4 * 512
    for add_special in (True, False):
        for parse_special in (True, False):
            assert model.tokenize(text, add_special=add_special, parse_special=parse_special) == whole(
                model, text, add_special=add_special, parse_special=parse_special), (add_special, parse_special)
    assert model.prompt_tokens(text) == whole(model, text, add_special=model.add_bos, parse_special=True)


def test_a_growing_conversation_is_tokenized_from_the_pieces_of_its_last_turn(model, monkeypatch):
    rng = random.Random(7)
    start, end = ("<|im_start|>", "<|im_end|>") if len(model.tokenize("<|im_start|>", add_special=False,
                                                                        parse_special=True)) == 1 \
        else ("<start_of_turn>", "<end_of_turn>")
    conversation = f"{start}system\n{random_text(rng, ['.'], 3000)}{end}\n"
    tokenize = model._tokenize
    tokenized: list[int] = []  # the characters llama.cpp tokenized

    def counted(text: str, **kw) -> list[int]:
        tokenized.append(len(text))
        return tokenize(text, **kw)

    monkeypatch.setattr(model, "_tokenize", counted)
    for turn in range(4):
        conversation += f"{start}user\n{random_text(rng, ['.'], 150)}{end}\n{start}assistant\n"
        tokenized.clear()
        got = model.prompt_tokens(conversation)
        new = sum(tokenized)
        assert got == whole(model, conversation, add_special=model.add_bos, parse_special=True), turn
        if turn:  # the system prompt and the earlier turns: from the cache
            assert new < len(conversation) / 4, (turn, new, len(conversation))
        conversation += random_text(rng, ['.'], 150) + f"{end}\n"


LINE_WORDS = ["\n", "\r\n", " \n", "\n\n", "\n ", "\t\n", "A", "b", "Zeta", "x", "é", "ñ", "Ω", "1", "42", "'s",
              "'T", "'ll", ".", ",", "?!", " ", "  ", "\t", "🦙", "_", "-", "\u00a0", "\u0301", "Ⅷ", "日本",
              # a line cut in each, with random neighbours
              "x\nY", ".\nA", "9\nb", "'\ns", "!\nQ", "_\nT", "e\nll"]


@pytest.mark.parametrize("seed", range(4))
def test_line_cuts_tokenize_as_the_whole(model, monkeypatch, seed):
    """Plain text full of newlines next to letters, digits, marks, spaces and punctuation, cut into pieces of a few
    characters (so that nearly every line cut is taken): the tokens of the whole."""
    monkeypatch.setattr(model_module, "_PIECE_CHARS", 4)
    rng = random.Random(seed)
    text = "".join(rng.choice(LINE_WORDS) for _ in range(4000))
    splitter = model._splitter(True)
    cuts = splitter.cut_points(text, 4)
    assert splitter.line_cuts == (model.info.ref != "gemma3")  # SentencePiece: special tokens' cuts only
    assert len(cuts) > 100 or not splitter.line_cuts
    for add_special in (True, False):
        assert model.tokenize(text, add_special=add_special) == whole(
            model, text, add_special=add_special, parse_special=False), add_special
    assert model.prompt_tokens(text) == whole(model, text, add_special=model.add_bos, parse_special=True)


def test_a_growing_raw_conversation_is_tokenized_from_its_last_turn(model, monkeypatch):
    """The bench's chat traffic (bench/multiturn.py): a system prompt and turns as plain text, no special token,
    resent whole every turn."""
    rng = random.Random(3)
    words = "the of and to in is was for on that with as by at from it an be this".split()
    conversation = "System: " + " ".join(rng.choice(words) for _ in range(3000)) + "\n"
    tokenize = model._tokenize
    tokenized: list[int] = []

    def counted(text: str, **kw) -> list[int]:
        tokenized.append(len(text))
        return tokenize(text, **kw)

    monkeypatch.setattr(model, "_tokenize", counted)
    for turn in range(4):
        conversation += "User: " + " ".join(rng.choice(words) for _ in range(60)) + "\nAssistant:"
        tokenized.clear()
        got = model.prompt_tokens(conversation)
        new = sum(tokenized)
        assert got == whole(model, conversation, add_special=model.add_bos, parse_special=True), turn
        if turn and model.info.ref != "gemma3":  # SentencePiece text is not cut
            assert new < 2000, (turn, new, len(conversation))
        conversation += " " + " ".join(rng.choice(words) for _ in range(64)) + "\n"


def test_limit_stops_early_with_the_right_start(model):
    text = "<|im_start|>user\nhello there<|im_end|>\n" * 2000
    full = model.prompt_tokens(text)
    part = model.prompt_tokens(text, limit=1000)
    assert 1000 < len(part) < len(full) and part == full[:len(part)]


def test_special_heavy_text_is_linear(model):
    def seconds(n: int) -> float:
        text = "<|im_start|>user\nhi<|im_end|>\n" * n
        t0 = time.perf_counter()
        model.prompt_tokens(text)
        return time.perf_counter() - t0

    small, big = min(seconds(2000) for _ in range(3)), seconds(16000)
    # 8x the text: quadratic (llama.cpp on the whole text) is 64x the time; linear 8x, 24x leaves room for the
    # noise of a shared machine.
    assert big < 3 * 8 * small, (small, big)


async def test_one_token_request_stays_fast_while_heavy_bodies_tokenize():
    """Six concurrent 372 KB /v1/tokenize bodies of chat turns (the issue's measure: an unrelated 1-token
    /v1/inference waited 66 s) while 1-token requests come and go."""
    w = WorkerProcess(["--parallel", "2", "--ctx-size", "512"]).start()
    try:
        heavy = "<|im_start|>user\nhi<|im_end|>\n" * 12400  # 372 KB
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
            async def tokenize() -> int:
                async with http.post(f"{w.url}/v1/tokenize", json={"text": heavy, "parse_special": True}) as r:
                    assert r.status == 200
                    return len((await r.json())["tokens"])

            async def one_token() -> float:
                t0 = time.monotonic()
                body = {"prompt": "Hi", "max_tokens": 1, "stream": False}
                async with http.post(f"{w.url}/v1/inference", json=body) as r:
                    assert r.status == 200
                    await r.json()
                return time.monotonic() - t0

            heavy_tasks = [asyncio.create_task(tokenize()) for _ in range(6)]
            await asyncio.sleep(0.3)  # the heavy ones are in
            latencies = []
            while not all(t.done() for t in heavy_tasks) or not latencies:
                latencies.append(await one_token())
            counts = await asyncio.gather(*heavy_tasks)
        assert all(c == counts[0] > 70000 for c in counts)
        print(f"1-token latencies while heavy bodies tokenize: max {max(latencies):.3f} s of {len(latencies)}")
        assert max(latencies) < 2.0, latencies
    finally:
        w.stop()


async def test_prompt_far_past_the_context_is_refused_quickly(http, worker):
    """A 600 KB completion prompt of 60,000 special tokens (llama.cpp alone: ~25 s) against a 1024-token context:
    refused for what its first pieces show."""
    body = {"prompt": "<|im_end|>" * 60_000, "max_tokens": 4}
    t0 = time.monotonic()
    async with http.post(f"{worker.url}/v1/completions", json=body) as resp:
        err = (await resp.json())["error"]
    elapsed = time.monotonic() - t0
    assert resp.status == 400 and err["code"] == "context_length_exceeded"
    assert elapsed < 2.0
