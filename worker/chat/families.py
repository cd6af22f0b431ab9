"""Tool-call families: how a model writes a call, told from its chat template, and the grammar that makes it write one.

- hermes (Hermes 2/3, Qwen 2.5, Qwen 3: templates with `<tool_call>`): each call is
  `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`; auto's trigger is `<tool_call>`.
- llama3 (Llama 3.1+: the `ipython` role): the whole answer is `{"name": …, "parameters": {…}}` (after an optional
  `<|python_tag|>`); auto's trigger is `{"name"`.
- mistral (Mistral v3 / Nemo: `[TOOL_CALLS]`): `[TOOL_CALLS][{"name": …, "arguments": {…}}, …]`; the trigger is the
  marker.
- mistral_args (Mistral Small 3.1+, Magistral, Devstral: `[TOOL_CALLS]` and `[ARGS]`): `[TOOL_CALLS]name[ARGS]{…}`
  per call; the trigger is `[TOOL_CALLS]`.
- generic (anything else: SmolLM2, Gemma): the answer is `{"tool_calls": [{"name": …, "arguments": {…}}]}` or
  `{"response": "…"}`, constrained from the first token (there is no marker to wait for).

The grammars are llguidance Lark: the call's wrapper in the family's own canonical spelling (what its models were
trained to write, so a constrained model stays in distribution), the arguments as `%json` of the tool's parameter
schema with fixed separators (no runaway whitespace at high temperature). A marker that is one token in the vocabulary
is written as that token (`<[id]>`), since llguidance keeps special tokens out of text; otherwise as text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Fixed separators inside %json: the spelling json.dumps and the families' own examples use.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict[str, Any]

    def for_prompt(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["parameters"] = self.parameters
        return out


@dataclass(frozen=True)
class Family:
    name: str
    open_marker: str | None  # what starts the calls (the lazy trigger), None: no marker
    close_marker: str | None  # what ends each call (Hermes), None: nothing
    arguments_key: str
    trigger: str | None  # auto's lazy trigger: where the grammar takes over
    specials: Mapping[str, int] = field(default_factory=dict)  # marker text → token id, where the vocabulary has one

    def marker(self, text: str) -> str:
        """A Lark item for `text`: its token where the vocabulary has it as a special token, else the text."""
        if text in self.specials:
            return f"<[{self.specials[text]}]>"
        return lark_string(text)

    @property
    def needs_special_text(self) -> bool:
        """The markers are special tokens: their text must reach the parser (Job.special_text)."""
        markers = (self.open_marker, self.close_marker, "[ARGS]" if self.name == "mistral_args" else None)
        return any(m in self.specials for m in markers if m)


def detect(template: str, specials: Mapping[str, int]) -> Family:
    """The family of a chat template, as llama.cpp's common/chat.cpp tells them apart (by the markup the template
    writes)."""
    if "<tool_call>" in template:
        return Family("hermes", "<tool_call>", "</tool_call>", "arguments", "<tool_call>", specials)
    if "<|start_header_id|>ipython<|end_header_id|>" in template or "<|python_tag|>" in template:
        return Family("llama3", None, None, "parameters", '{"name"', specials)
    if "[TOOL_CALLS]" in template and "[ARGS]" in template:
        return Family("mistral_args", "[TOOL_CALLS]", None, "arguments", "[TOOL_CALLS]", specials)
    if "[TOOL_CALLS]" in template:
        return Family("mistral", "[TOOL_CALLS]", None, "arguments", "[TOOL_CALLS]", specials)
    return Family("generic", None, None, "arguments", None, specials)


def lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def arguments_schema(tool: Tool) -> dict[str, Any]:
    """The tool's parameters as the call's arguments are constrained: only the parameters it declares unless it says
    otherwise (llama.cpp's reading too: JSON schema's default would let a model invent keys, at high temperature
    without end)."""
    schema = dict(tool.parameters)
    if schema.get("type") == "object" and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    return schema


def _args_rule(tool: Tool) -> str:
    schema = {**arguments_schema(tool), "x-guidance": JSON_OPTIONS}
    return "%json " + json.dumps(schema, ensure_ascii=False)


def call_rules(family: Family, tools: list[Tool]) -> list[str]:
    """Lark rules `call` (one call object, any of the tools) and `args_i`."""
    alternatives, rules = [], []
    for i, tool in enumerate(tools):
        head = '{"name": ' + json.dumps(tool.name, ensure_ascii=False) + f', "{family.arguments_key}": '
        alternatives.append(f"{lark_string(head)} args_{i} \"}}\"")
        rules.append(f"args_{i}: {_args_rule(tool)}")
    return ["call: " + " | ".join(alternatives), *rules]


def reasoning_rules(family: Family, forced_open: bool) -> tuple[str, list[str]]:
    """A reasoning block before the calls (Qwen 3, DeepSeek-R1 distills): ("" or the item to put first, rules)."""
    close = family.marker("</think>")
    body = 'think_text[lazy]: /(?s:.*)<\\/think>/' if "</think>" not in family.specials else "think_text: /(?s:.*)/"
    tail = "" if "</think>" not in family.specials else f" {close}"
    if forced_open:
        return "think ", [f'think: think_text{tail} "\\n\\n"', body]
    return "think? ", [f'think: {family.marker("<think>")} think_text{tail} "\\n\\n"', body]


def tool_grammar(family: Family, tools: list[Tool], *, lazy: bool, parallel: bool, thinking: bool = False,
                 forced_open: bool = False) -> str:
    """The Lark grammar of the calls. lazy: what follows `family.trigger` (auto); otherwise the whole answer
    (required or a named function), optionally after a reasoning block (thinking)."""
    calls = call_rules(family, tools)
    more = "*" if parallel else "{0}"
    if family.name == "hermes":
        assert family.open_marker and family.close_marker
        block = f'{family.marker(family.open_marker)} "\\n" call "\\n" {family.marker(family.close_marker)}'
        rules = [f"block: {block}", *calls]
        first = 'first: "\\n" call "\\n" ' + family.marker(family.close_marker) if lazy else "first: block"
        start = f'first ("\\n" block){more}' if parallel else "first"
        rules.append(first)
    elif family.name == "llama3":
        if lazy:  # the trigger took `{"name"`: the rest of that call
            rules = ["start: rest", *calls, *(_llama_rest(family, tools))]
            return "\n".join(rules) + "\n"
        rules, start = calls, "call"
    elif family.name == "mistral_args":
        assert family.open_marker
        open_marker, args_marker = family.marker(family.open_marker), family.marker("[ARGS]")
        rules = ["named: " + " | ".join(f"{lark_string(t.name)} {args_marker} args_{i}" for i, t in enumerate(tools)),
                 *call_rules(family, tools)[1:]]
        first = "named" if lazy else f"{open_marker} named"
        start = f"{first} ({open_marker} named){more}" if parallel else first
    elif family.name == "mistral":
        assert family.open_marker
        items = f'call (", " call){more}' if parallel else "call"
        rules = [*calls, f'list: " "? "[" {items} "]"']  # v0.3's template writes "[TOOL_CALLS] ["
        start = "list" if lazy else f"{family.marker(family.open_marker)} list"
    else:
        return generic_grammar(family, tools, required=True, parallel=parallel, thinking=thinking,
                               forced_open=forced_open)
    if thinking and not lazy:
        prefix, think = reasoning_rules(family, forced_open)
        start, rules = prefix + start, [*rules, *think]
    return "\n".join([f"start: {start}", *rules]) + "\n"


def _llama_rest(family: Family, tools: list[Tool]) -> list[str]:
    alternatives = []
    for i, tool in enumerate(tools):
        rest = ": " + json.dumps(tool.name, ensure_ascii=False) + f', "{family.arguments_key}": '
        alternatives.append(f"{lark_string(rest)} args_{i} \"}}\"")
    return ["rest: " + " | ".join(alternatives)]


def generic_schema(tools: list[Tool], *, required: bool, parallel: bool) -> dict[str, Any]:
    """The generic form's JSON schema (llama.cpp's generic handler, with `tool_calls` a list in both cases)."""
    calls = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": arguments_schema(t)},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    items = calls[0] if len(calls) == 1 else {"anyOf": calls}
    call_list: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if not parallel:
        call_list["maxItems"] = 1
    with_calls = {"type": "object", "properties": {"tool_calls": call_list}, "required": ["tool_calls"],
                  "additionalProperties": False}
    schema: dict[str, Any] = with_calls if required else {"anyOf": [with_calls, {
        "type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
        "additionalProperties": False}]}
    return {**schema, "x-guidance": JSON_OPTIONS}


def generic_grammar(family: Family, tools: list[Tool], *, required: bool, parallel: bool, thinking: bool = False,
                    forced_open: bool = False) -> str:
    """The generic form's whole answer: one JSON object, after a reasoning block where the template thinks."""
    schema = generic_schema(tools, required=required, parallel=parallel)
    start, rules = "answer", ["answer: %json " + json.dumps(schema, ensure_ascii=False)]
    if thinking:
        prefix, think = reasoning_rules(family, forced_open)
        start, rules = prefix + start, [*rules, *think]
    return "\n".join([f"start: {start}", *rules]) + "\n"


def generic_system_prompt(tools: list[Tool], *, required: bool) -> str:
    """What a model that knows nothing of tools is told: the tools, and the JSON it must answer in."""
    listing = json.dumps([t.for_prompt() for t in tools], indent=2, ensure_ascii=False)
    call_form = '{"tool_calls": [{"name": "<tool name>", "arguments": {<the arguments>}}]}'
    if required:
        answer = f"Answer with a JSON object that calls one of them: {call_form}"
    else:
        answer = (f"Answer with a JSON object: either {call_form} to call tools, or "
                  '{"response": "<your reply>"} to reply to the user directly.')
    return f"You can call these tools:\n{listing}\n\n{answer}"
