"""The chat layer's tool-call grammars against llguidance with real vocabularies (the embedded SmolLM2, and tiny
Qwen 3, Llama 3.1 and Mistral models converted by the worker): every grammar compiles, canned valid calls are
accepted to the end, invalid ones are refused, and random walks through the token masks (any allowed token, as a
random-weight model at high temperature would pick) always end in calls that the family's parser reads back with
arguments valid against the tool's schema."""

from __future__ import annotations

import codecs
import ctypes
import json
import random
from pathlib import Path

import jsonschema
import llama_cpp as lc
import llguidance
import numpy as np
import pytest
from llguidance.llamacpp import lltokenizer_from_vocab

from tests.chat_models import template, tool_model_gguf
from tests.convert_reference import sentencepiece_tokenizer, tiny_config, tiny_weights, vocab_size_of, write_checkpoint
from tests.unit.test_chat import SMOLLM2_TEMPLATE
from worker import chat
from worker.chat import families
from worker.chat.parsers import call_arguments
from worker.llamacpp import Model
from worker.llamacpp.specials import special_tokens
from worker.models.convert import ensure_gguf
from worker.models.resolve import embedded_model_path

# llguidance's lltokenizer_from_vocab still calls the deprecated name.
pytestmark = pytest.mark.filterwarnings("ignore:llama_token_get_attr is deprecated:DeprecationWarning")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_time"}}


class Vocab:
    """A model's vocabulary as llguidance sees it, and its special tokens by text."""

    def __init__(self, path: Path) -> None:
        self.model = Model.load(path, ref=path.stem, fmt="gguf", gpu_layers=0)
        self.tokenizer = lltokenizer_from_vocab(self.model.vocab)
        self.specials = special_tokens(self.model.vocab)

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        lark = llguidance.LLMatcher.grammar_from_lark(grammar)
        # no warnings either: the engine refuses a grammar llguidance would only partly enforce
        assert llguidance.LLMatcher.validate_grammar_with_warnings(lark, self.tokenizer) == (False, [])
        matcher = llguidance.LLMatcher(self.tokenizer, lark, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def accepts(self, grammar: str, text: str) -> bool:
        """The whole text is a complete answer of the grammar."""
        matcher = self.matcher(grammar)
        tokens = self.model.tokenize(text, add_special=False, parse_special=True)
        return matcher.consume_tokens(tokens) and matcher.is_accepting()

    def piece(self, token: int) -> bytes:
        """A token's bytes, special tokens' text included (Job.special_text)."""
        buf = ctypes.create_string_buffer(256)
        n = lc.llama_token_to_piece(self.model.vocab, token, buf, 256, 0, True)
        return buf.raw[:n]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Vocab:
    return Vocab(tool_model_gguf("qwen3", tmp_path_factory.mktemp("qwen3")))


@pytest.fixture(scope="module")
def llama31(tmp_path_factory) -> Vocab:
    return Vocab(tool_model_gguf("llama3_1", tmp_path_factory.mktemp("llama31")))


@pytest.fixture(scope="module")
def smollm2() -> Vocab:
    return Vocab(embedded_model_path())


@pytest.fixture(scope="module")
def mistral(tmp_path_factory) -> Vocab:
    """A tiny Mistral with [TOOL_CALLS] and [ARGS] as control tokens, as Mistral's tokenizers have them."""
    folder = tmp_path_factory.mktemp("mistral")
    tokenizer = sentencepiece_tokenizer(320, prefix_space=False, extra_specials=("[TOOL_CALLS]", "[ARGS]"))
    cfg = tiny_config("mistral", vocab_size_of(tokenizer))
    write_checkpoint(folder / "m", cfg, tiny_weights(cfg, np.random.default_rng(0)), tokenizer,
                     tokenizer_config={"bos_token": "<s>", "eos_token": "</s>"})
    return Vocab(ensure_gguf(folder / "m", folder / "cache"))


def qwen3_plan(vocab: Vocab, **kw) -> chat.ChatPlan:
    return chat.prepare(template("qwen3"), ASK, tools=[WEATHER, TIME], special_tokens=vocab.specials, **kw)


def llama31_plan(vocab: Vocab, **kw) -> chat.ChatPlan:
    return chat.prepare(template("llama3_1"), ASK, tools=[WEATHER, TIME], special_tokens=vocab.specials,
                        bos_token="<|begin_of_text|>", **kw)


def smollm2_plan(vocab: Vocab, **kw) -> chat.ChatPlan:
    return chat.prepare(SMOLLM2_TEMPLATE, ASK, tools=[WEATHER, TIME], special_tokens=vocab.specials, **kw)


WEATHER_CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}'
TIME_CALL = '{"name": "get_time", "arguments": {"tz": "CET"}}'


def test_hermes_grammars(qwen3: Vocab):
    block = "<tool_call>\n{}\n</tool_call>"
    auto = qwen3_plan(qwen3).constraint
    assert auto is not None and auto.trigger == "<tool_call>"
    assert qwen3.accepts(auto.source, f"\n{WEATHER_CALL}\n</tool_call>")  # what follows the trigger
    assert qwen3.accepts(auto.source, f"\n{WEATHER_CALL}\n</tool_call>\n" + block.format(TIME_CALL))
    required = qwen3_plan(qwen3, tool_choice="required").constraint.source
    assert qwen3.accepts(required, block.format(WEATHER_CALL))
    assert qwen3.accepts(required, "<think>\nweather: call the tool\n</think>\n\n" + block.format(TIME_CALL))
    assert not qwen3.accepts(required, "The weather is fine.")
    assert not qwen3.accepts(required, block.format(WEATHER_CALL.replace("Paris", "Paris, Île-de-France")))
    assert not qwen3.accepts(required, block.format(WEATHER_CALL.replace("3", "9")))  # maximum 7
    assert not qwen3.accepts(required, block.format('{"name": "get_weather", "arguments": {"days": 3}}'))
    assert not qwen3.accepts(required, block.format('{"name": "rm_rf", "arguments": {}}'))
    single = qwen3_plan(qwen3, tool_choice="required", parallel_tool_calls=False).constraint.source
    assert qwen3.accepts(single, block.format(WEATHER_CALL))
    assert not qwen3.accepts(single, block.format(WEATHER_CALL) + "\n" + block.format(TIME_CALL))
    named = qwen3_plan(qwen3, tool_choice=NAMED).constraint.source
    assert qwen3.accepts(named, block.format(TIME_CALL))
    assert not qwen3.accepts(named, block.format(WEATHER_CALL))


def test_llama31_grammars(llama31: Vocab):
    call = WEATHER_CALL.replace('"arguments"', '"parameters"')
    auto = llama31_plan(llama31).constraint
    assert auto is not None and auto.trigger == '{"name"'
    assert llama31.accepts(auto.source, call.removeprefix('{"name"'))
    required = llama31_plan(llama31, tool_choice="required").constraint.source
    assert llama31.accepts(required, call)
    assert not llama31.accepts(required, WEATHER_CALL)  # Llama's key is "parameters"
    assert not llama31.accepts(required, "Sunny.")
    assert not llama31.accepts(llama31_plan(llama31, tool_choice=NAMED).constraint.source, call)


def test_mistral_grammars(mistral: Vocab):
    family = families.detect("[TOOL_CALLS]", mistral.specials)
    assert family.needs_special_text  # [TOOL_CALLS] is a control token: its text must reach the parser
    tools = chat.parse_tools([WEATHER, TIME])
    lazy = families.tool_grammar(family, tools, lazy=True, parallel=True)
    assert mistral.accepts(lazy, f" [{WEATHER_CALL}, {TIME_CALL}]")
    required = families.tool_grammar(family, tools, lazy=False, parallel=False)
    assert mistral.accepts(required, f"[TOOL_CALLS][{TIME_CALL}]")
    assert not mistral.accepts(required, f"[TOOL_CALLS][{TIME_CALL}, {WEATHER_CALL}]")
    assert not mistral.accepts(required, f"[{TIME_CALL}]")  # the marker is required, as its token


def test_mistral_named_args_grammars(mistral: Vocab):
    family = families.detect("[TOOL_CALLS]{{ name }}[ARGS]", mistral.specials)
    assert family.name == "mistral_args" and family.needs_special_text
    tools = chat.parse_tools([WEATHER, TIME])
    weather, time = '[ARGS]{"city": "Paris", "days": 3}', '[ARGS]{"tz": "UTC"}'
    lazy = families.tool_grammar(family, tools, lazy=True, parallel=True)
    assert mistral.accepts(lazy, f"get_weather{weather}[TOOL_CALLS]get_time{time}")
    required = families.tool_grammar(family, tools, lazy=False, parallel=False)
    assert mistral.accepts(required, f"[TOOL_CALLS]get_time{time}")
    assert not mistral.accepts(required, f"[TOOL_CALLS]get_time{weather}")
    assert not mistral.accepts(required, f"[TOOL_CALLS]get_time{time}[TOOL_CALLS]get_time{time}")
    plan = chat.prepare("{{ '[TOOL_CALLS][ARGS]' }}", ASK, tools=[WEATHER, TIME], tool_choice="required",
                        special_tokens=mistral.specials)
    rng = random.Random(5)
    for _ in range(10):
        tokens = random_walk(mistral, plan.constraint.source, rng)
        parser = plan.parser()
        deltas = [parser.feed(text) for text in stream(mistral, tokens)] + [parser.finish()]
        assert_valid_calls(call_arguments(deltas))


def test_generic_grammars(smollm2: Vocab):
    auto = smollm2_plan(smollm2).constraint
    assert auto is not None and auto.trigger is None
    calls = f'{{"tool_calls": [{WEATHER_CALL}, {TIME_CALL}]}}'
    assert smollm2.accepts(auto.source, calls)
    assert smollm2.accepts(auto.source, '{"response": "It is sunny in Paris."}')
    assert not smollm2.accepts(auto.source, "It is sunny.")
    assert not smollm2.accepts(auto.source, '{"response": "a", "tool_calls": []}')
    required = smollm2_plan(smollm2, tool_choice="required", parallel_tool_calls=False).constraint.source
    assert smollm2.accepts(required, f'{{"tool_calls": [{TIME_CALL}]}}')
    assert not smollm2.accepts(required, '{"response": "a"}')
    assert not smollm2.accepts(required, calls)  # one call only


def random_walk(vocab: Vocab, grammar: str, rng: random.Random, max_tokens: int = 20000) -> list[int]:
    """Tokens picked uniformly among those the grammar allows, until it is complete: a model with no idea of the
    format, sampling hot."""
    matcher = vocab.matcher(grammar)
    tokens: list[int] = []
    for _ in range(max_tokens):
        mask = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.flatnonzero(np.unpackbits(mask, bitorder="little"))
        choices = [int(t) for t in allowed if t < vocab.model.n_vocab and not vocab.model.is_eog(int(t))]
        if matcher.is_accepting() and (not choices or rng.random() < 0.5):
            return tokens
        token = rng.choice(choices)
        assert matcher.consume_token(token), matcher.get_error()
        tokens.append(token)
    raise AssertionError("the grammar never completed")


def stream(vocab: Vocab, tokens: list[int]) -> list[str]:
    """The tokens' text as the engine delivers it: one piece per token (markers included), whole characters."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    return [decoder.decode(vocab.piece(t)) for t in tokens] + [decoder.decode(b"", final=True)]


def assert_valid_calls(made: list[dict[str, str]], only: str | None = None) -> None:
    assert made
    for call in made:
        assert call["name"] in SCHEMAS and (only is None or call["name"] == only)
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


@pytest.mark.parametrize("tool_choice", ["required", NAMED])
def test_random_walks_always_make_valid_calls(qwen3: Vocab, llama31: Vocab, tool_choice):
    rng = random.Random(7)
    for vocab, make in ((qwen3, qwen3_plan), (llama31, llama31_plan)):
        plan = make(vocab, tool_choice=tool_choice)
        for _ in range(15):
            tokens = random_walk(vocab, plan.constraint.source, rng)
            parser = plan.parser()
            deltas = [parser.feed(text) for text in stream(vocab, tokens)] + [parser.finish()]
            assert parser.called
            assert_valid_calls(call_arguments(deltas), only=None if tool_choice == "required" else "get_time")


def test_random_walks_after_the_trigger_make_valid_calls(qwen3: Vocab, llama31: Vocab):
    """auto: free text, then the trigger, then whatever the lazy grammar allows: the parser reads the calls."""
    rng = random.Random(3)
    for vocab, make in ((qwen3, qwen3_plan), (llama31, llama31_plan)):
        plan = make(vocab)
        for _ in range(15):
            tokens = random_walk(vocab, plan.constraint.source, rng)
            parser = plan.parser()
            deltas = [parser.feed("Let me look. " + plan.constraint.trigger)]
            deltas += [parser.feed(text) for text in stream(vocab, tokens)] + [parser.finish()]
            assert "".join(d.content for d in deltas) == "Let me look."
            assert_valid_calls(call_arguments(deltas))


THINKING_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                     "<|im_start|>assistant\n{% if open_thinking %}<think>\n{% endif %}")


def test_generic_grammars_let_a_thinking_model_think_first(smollm2: Vocab):
    """A template that thinks but knows nothing of tools (DeepSeek-R1 distills): the JSON answer follows the
    reasoning block (here `<think>` is text, not a token)."""
    answer = '{"response": "Sunny."}'
    opened = chat.prepare(THINKING_TEMPLATE, ASK, tools=[WEATHER], special_tokens=smollm2.specials,
                          template_kwargs={"open_thinking": True})
    assert smollm2.accepts(opened.constraint.source, f"The user asks.\n</think>\n\n{answer}")
    assert not smollm2.accepts(opened.constraint.source, answer)
    parser = opened.parser()
    delta = parser.feed(f"The user asks.\n</think>\n\n{answer}")
    assert (delta.reasoning, delta.content) == ("The user asks.", "Sunny.")
    optional = chat.prepare(THINKING_TEMPLATE, ASK, tools=[WEATHER], special_tokens=smollm2.specials).constraint
    assert smollm2.accepts(optional.source, answer)
    assert smollm2.accepts(optional.source, f"<think>\nhm\n</think>\n\n{answer}")
