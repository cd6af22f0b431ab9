"""The chat layer between the HTTP routes and the engine: prompts from the model's own template, tool calls and
reasoning. No HTTP and no llama.cpp here; wire formats stay in worker/http.

The route calls `prepare` once per request and then runs one parser per answer (choice):

    plan = chat.prepare(info.chat_template, messages, tools=req.tools, tool_choice=req.tool_choice,
                        parallel_tool_calls=req.parallel_tool_calls, reasoning="split",
                        bos_token=info.bos, eos_token=info.eos,
                        special_tokens=worker.llamacpp.specials.model_special_tokens(model))
    tokens = model.prompt_tokens(plan.prompt)
    if plan.constraint: the engine's check (off the loop) → ConstraintError: HTTP 400 with param "tools"
    job = Job(..., constraint=plan.constraint, special_text=plan.special_text)   # constraint: None or lazy or not
    parser = plan.parser()                      # one per choice
    for each TokenText: delta = parser.feed(text)    # ChatDelta(content, reasoning, tool_calls)
    at the end:         delta = parser.finish()      # what was held back
                        finish_reason = "tool_calls" if parser.called else the engine's reason

- `messages` are OpenAI's (role, content as text or text parts, name, tool_calls with `arguments` as JSON text,
  tool_call_id); `tools` OpenAI's [{"type": "function", "function": {"name", "description", "parameters"}}].
- A ChatDelta's tool_calls are OpenAI's stream deltas: a call's first has `index`, `id` and `name`, then fragments
  of `arguments` (JSON text); `parsers.call_arguments` assembles them for the non-streamed message.
- `special_tokens`: the vocabulary's tokens that llguidance treats as special (control tokens, and user-defined
  tokens written `<...>`), text → id. Markers that are such tokens are written as tokens in the grammars (a model
  cannot spell them in text under llguidance); with none given, markers are text.
- Errors: `ChatRequestError` (a bad `tools` / `tool_choice`: HTTP 400 naming `param`); the template's own
  `template.TemplateCompileError` (the model's fault: 500) and `template.TemplateRenderError` (400).

Decisions:
- `tool_choice: "none"` renders no tools (as llama.cpp does): a model shown tools writes calls, and those would reach
  the client as text. History with tool calls and tool results is still rendered. No constraint, no call parsing.
- `auto`: a lazy constraint armed on the family's opening marker (`<tool_call>`, `[TOOL_CALLS]`, `{"name"` for Llama);
  before it the text is free. The generic form is constrained from the first token (there is no marker).
- `required` / a named function: the whole answer is constrained to calls (only the named one), after an optional
  reasoning block for templates that think. `parallel_tool_calls: false`: the grammar allows one call.
- Reasoning (`<think>…</think>` at the start, templates that mention `<think>`): "split" gives it as reasoning
  deltas, "inline" leaves it in the content as written (with the `<think>` the prompt opened, if it did).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from worker.chat import families, template
from worker.chat.families import Family, Tool
from worker.chat.parsers import (
    ChatDelta,
    ChatParser,
    GenericJson,
    IdFactory,
    LeadingJsonCalls,
    MarkedCalls,
    NamedArgsCalls,
    ReasoningSplitter,
    ToolCallDelta,
    ToolParser,
    call_arguments,
    mistral_call_id,
    openai_call_id,
)
from worker.chat.template import TemplateCompileError, TemplateRenderError
from worker.engine.outputs import Constraint

__all__ = ["ChatDelta", "ChatParser", "ChatPlan", "ChatRequestError", "TemplateCompileError", "TemplateRenderError",
           "ToolCallDelta", "call_arguments", "prepare", "template"]

Reasoning = Literal["split", "inline"]
# OpenAI's rule for function names, and dots (MCP clients name tools server.tool): names go into grammars and markup.
TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class ChatRequestError(ValueError):
    """A request the chat layer cannot serve as given; `param` names the field (HTTP 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ChatPlan:
    prompt: str
    constraint: Constraint | None
    special_text: bool  # the job must give special tokens' text (markers that are control tokens)
    family: str  # hermes, llama3, mistral, mistral_args, generic: for logs
    tools_active: bool
    _family: Family = field(repr=False)
    _reasoning_args: tuple[bool, bool] | None = field(repr=False, default=None)  # forced_open, inline

    def parser(self, new_id: IdFactory | None = None) -> ChatParser:
        """A fresh parser for one answer. new_id: the call-id factory (tests pass a deterministic one)."""
        tools: ToolParser
        name = self._family.name
        if not self.tools_active:
            tools = ToolParser()
        elif name == "hermes":
            tools = MarkedCalls("<tool_call>", "</tool_call>", new_id or openai_call_id)
        elif name == "mistral":
            tools = MarkedCalls("[TOOL_CALLS]", None, new_id or mistral_call_id)
        elif name == "mistral_args":
            tools = NamedArgsCalls(new_id or mistral_call_id)
        elif name == "llama3":
            tools = LeadingJsonCalls(new_id or openai_call_id)
        else:
            tools = GenericJson(new_id or openai_call_id)
        reasoning = None
        if self._reasoning_args is not None:
            forced_open, inline = self._reasoning_args
            reasoning = ReasoningSplitter(forced_open=forced_open, inline=inline)
        return ChatParser(tools, reasoning)


def prepare(chat_template: str, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
            tool_choice: str | dict[str, Any] | None = None, parallel_tool_calls: bool = True,
            reasoning: Reasoning = "split", bos_token: str | None = None, eos_token: str | None = None,
            special_tokens: Mapping[str, int] | None = None,
            template_kwargs: dict[str, Any] | None = None) -> ChatPlan:
    """The prompt, the constraint and the parser for one chat request (see the module's docstring)."""
    tool_list = parse_tools(tools)
    choice, named = parse_tool_choice(tool_choice, tool_list)
    family = families.detect(chat_template, special_tokens or {})
    active = bool(tool_list) and choice != "none"
    if named is not None:
        tool_list = [t for t in tool_list if t.name == named]
    rendered_tools = [{"type": "function", "function": t.for_prompt()} for t in tool_list] if active else None
    ready = template.template_messages(messages)
    if family.name == "generic":
        ready = _generic_messages(ready, tool_list if active else [], required=choice != "auto")
        rendered_tools = None  # the template knows nothing of tools: they are in the system message
    kwargs = dict(template_kwargs or {})
    if reserved := sorted(set(kwargs) & template.SET_BY_THE_WORKER):
        raise ChatRequestError(f"chat_template_kwargs cannot set {', '.join(reserved)}: the request's own fields do",
                               "chat_template_kwargs")
    add_generation_prompt = kwargs.pop("add_generation_prompt", True)  # vLLM's: false continues the last message
    if not isinstance(add_generation_prompt, bool):
        raise ChatRequestError("chat_template_kwargs.add_generation_prompt must be a boolean", "chat_template_kwargs")
    prompt = template.render(chat_template, ready, bos_token=bos_token, eos_token=eos_token,
                             add_generation_prompt=add_generation_prompt, tools=rendered_tools, extra=kwargs)
    thinks = "<think>" in chat_template
    forced_open = thinks and prompt.rstrip().endswith("<think>")
    # The prompt closed the block itself (Qwen 3's enable_thinking=False): a constrained answer starts after it.
    may_think = thinks and not prompt.rstrip().endswith("</think>")
    parallel = parallel_tool_calls and named is None
    constraint = None
    if active:
        if family.name == "generic":
            constraint = Constraint("lark", families.generic_grammar(
                family, tool_list, required=choice != "auto", parallel=parallel, thinking=may_think,
                forced_open=forced_open))
        elif choice == "auto":
            constraint = Constraint("lark", families.tool_grammar(family, tool_list, lazy=True, parallel=parallel),
                                    trigger=family.trigger)
        else:
            constraint = Constraint("lark", families.tool_grammar(family, tool_list, lazy=False, parallel=parallel,
                                                                  thinking=may_think, forced_open=forced_open))
    return ChatPlan(prompt=prompt, constraint=constraint, special_text=active and family.needs_special_text,
                    family=family.name, tools_active=active, _family=family,
                    _reasoning_args=(forced_open, reasoning == "inline") if thinks else None)


def parse_tools(tools: list[dict[str, Any]] | None) -> list[Tool]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ChatRequestError("tools must be a list of {'type': 'function', 'function': {...}}", "tools")
    out: list[Tool] = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ChatRequestError(f"tools[{i}] is not {{'type': 'function', 'function': {{...}}}}", "tools")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise ChatRequestError(f"tools[{i}].function.name must be 1 to 64 letters, digits, '_', '-' or '.'",
                                   "tools")
        if any(t.name == name for t in out):
            raise ChatRequestError(f"two tools are named {name!r}", "tools")
        parameters = function.get("parameters", families.NO_PARAMETERS)
        if not isinstance(parameters, dict):
            raise ChatRequestError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        description = function.get("description")
        out.append(Tool(name, description if isinstance(description, str) else None, parameters))
    return out


def parse_tool_choice(tool_choice: str | dict[str, Any] | None, tools: list[Tool]) -> tuple[str, str | None]:
    """("none" | "auto" | "required" | "named", the named function)."""
    if tool_choice is None:
        return ("auto" if tools else "none"), None
    if tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not tools:
            raise ChatRequestError("tool_choice 'required' needs tools", "tool_choice")
        return str(tool_choice), None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if not any(t.name == name for t in tools):
            raise ChatRequestError(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        return "named", name
    raise ChatRequestError("tool_choice must be 'none', 'auto', 'required' or "
                           "{'type': 'function', 'function': {'name': ...}}", "tool_choice")


def _generic_messages(messages: list[dict[str, Any]], tools: list[Tool], required: bool) -> list[dict[str, Any]]:
    """For a template that knows nothing of tools (llama.cpp's generic form): the tools and the answer's JSON form in
    the system message, earlier calls as that JSON, and tool results as user turns."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{"name": c["function"].get("name"), "arguments": c["function"].get("arguments")}
                     for c in m["tool_calls"]]
            m = {"role": "assistant", "content": json.dumps({"tool_calls": calls}, ensure_ascii=False)}
        elif m.get("role") == "tool":
            result = json.dumps({"tool_response": {"tool": m.get("name"), "content": m.get("content")}},
                                ensure_ascii=False)
            if out and out[-1].get("tool_results"):  # results of parallel calls: one turn (roles must alternate)
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + result}
                continue
            m = {"role": "user", "content": result, "tool_results": True}
        out.append(m)
    out = [{k: v for k, v in m.items() if k != "tool_results"} for m in out]
    if tools:
        instructions = families.generic_system_prompt(tools, required=required)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{instructions}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out
