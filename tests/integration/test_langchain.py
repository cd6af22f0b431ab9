"""LangChain's ChatOpenAI against the real worker: `with_structured_output` with a pydantic model returns a
validated object at a temperature at which the 135M model knows nothing of JSON, every time, because the worker
constrains the answer to the schema LangChain sends.

ChatOpenAI counts tokens with tiktoken, whose encodings are downloaded on first use; no path taken here counts
tokens, and the test proves it: tiktoken's fetch is replaced by a failure and its cache is an empty folder.
"""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
import tiktoken.load
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.integration.worker_process import WorkerProcess

HOT = 1.5
SAMPLES = 4
PROMPTS = ["Describe a pet in JSON.", "Tell me about a dog called Rex.", "A cat, please."]


class Pet(BaseModel):
    """A pet."""

    name: Annotated[str, Field(min_length=1, max_length=12)]
    kind: Literal["cat", "dog", "fish"]
    age: Annotated[int, Field(ge=0, le=30)]
    friendly: bool


@pytest.fixture(autouse=True)
def no_tiktoken_download(monkeypatch, tmp_path):
    def refuse(blobpath: str) -> bytes:
        raise AssertionError(f"tiktoken tried to fetch {blobpath}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    monkeypatch.setattr(tiktoken.load, "read_file", refuse)
    yield
    assert not (tmp_path / "tiktoken").exists()


def chat_model(worker: WorkerProcess, **kwargs) -> ChatOpenAI:
    return ChatOpenAI(base_url=f"{worker.url}/v1", api_key="unused", model="any", max_retries=0, timeout=180,
                      **kwargs)


@pytest.mark.parametrize("method", [None, "json_schema"], ids=["default", "json_schema"])
def test_with_structured_output_validates_every_time_at_high_temperature(worker, method):
    llm = chat_model(worker, temperature=HOT, max_tokens=120)
    structured = llm.with_structured_output(Pet) if method is None else llm.with_structured_output(Pet, method=method)
    inputs = [PROMPTS[i % len(PROMPTS)] for i in range(SAMPLES)]
    pets = structured.batch(inputs, config={"max_concurrency": 4})  # the worker's 4 slots at once
    assert len(pets) == SAMPLES and all(isinstance(p, Pet) for p in pets)
    assert len({p.model_dump_json() for p in pets}) > 1  # hot sampling, not one answer repeated


def test_structured_output_with_raw_message_and_strict_schema(worker):
    """include_raw: the AIMessage is the worker's answer, and parsing it is what LangChain returned."""
    llm = chat_model(worker, temperature=HOT, max_tokens=120)
    out = llm.with_structured_output(Pet, method="json_schema", strict=True, include_raw=True).invoke(PROMPTS[0])
    assert out["parsing_error"] is None and isinstance(out["parsed"], Pet)
    raw = out["raw"]
    assert Pet.model_validate_json(raw.content) == out["parsed"]
    usage = raw.usage_metadata
    assert usage and usage["input_tokens"] > 0 and 0 < usage["output_tokens"] <= 120
    assert raw.response_metadata["finish_reason"] == "stop"


def test_plain_chat_and_stream_agree_at_temperature_zero(worker):
    llm = chat_model(worker, temperature=0, max_tokens=16)
    whole = llm.invoke("Name a colour.")
    streamed = "".join(chunk.content for chunk in llm.stream("Name a colour."))
    assert whole.content and streamed == whole.content


def test_function_calling_method_returns_a_validated_object_every_time(worker):
    """function_calling: the schema as a tool LangChain forces with tool_choice; the call's arguments are the object."""
    llm = chat_model(worker, temperature=HOT, max_tokens=120)
    pets = llm.with_structured_output(Pet, method="function_calling").batch(PROMPTS[:2], config={"max_concurrency": 4})
    assert all(isinstance(p, Pet) for p in pets)
