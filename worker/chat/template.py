"""Chat prompts from the model's own template (tokenizer.chat_template in the GGUF), rendered as Hugging Face does.

Same environment as transformers' apply_chat_template: a sandboxed, immutable jinja2 environment with trim_blocks and
lstrip_blocks, the loopcontrols extension, a `tojson` that keeps non-ASCII text, `raise_exception` and `strftime_now`;
the template sees `messages`, `bos_token`, `eos_token`, `add_generation_prompt`, `tools` (None, or transformers' form:
[{"type": "function", "function": {"name", "description", "parameters"}}]), `documents` as None, and any extra
variables a template reads (Qwen 3's `enable_thinking`), as transformers passes `**kwargs` through.

Messages are given as transformers takes them: an assistant's `tool_calls` are
[{"id", "type": "function", "function": {"name", "arguments"}}] with `arguments` a dict (`template_messages` turns
OpenAI's JSON text into one, as vLLM and llama.cpp do: templates write `arguments | tojson`), and tool results are
{"role": "tool", "tool_call_id", "content"} (plus `name` where the template wants it).
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateCompileError(Exception):
    """The model's template is not valid jinja (the model's fault, not the request's)."""


class TemplateRenderError(Exception):
    """The template refused these messages (raise_exception) or failed on them."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise TemplateCompileError(f"the model's chat template does not compile: {exc}") from None


# What render() gives every template; chat_template_kwargs may not override these (add_generation_prompt it may)
SET_BY_THE_WORKER = frozenset({"messages", "bos_token", "eos_token", "tools", "documents"})


def render(source: str, messages: list[dict[str, Any]], *, bos_token: str | None, eos_token: str | None,
           add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None,
           extra: dict[str, Any] | None = None) -> str:
    template = compile_template(source)
    context = {**(extra or {}), "messages": messages, "bos_token": bos_token or "", "eos_token": eos_token or "",
               "add_generation_prompt": add_generation_prompt, "tools": tools or None, "documents": None}
    try:
        return template.render(**context)
    except Exception as exc:
        raise TemplateRenderError(str(exc) or type(exc).__name__) from None


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's chat messages as templates read them: text parts joined, `developer` as `system`, tool-call
    arguments (JSON text on the wire) as dicts, `tool` results named after the call they answer."""
    names = {call.get("id"): call.get("function", {}).get("name")
             for m in messages for call in (m.get("tool_calls") or []) if isinstance(call, dict)}
    out = []
    for m in messages:
        message = dict(m)
        if message.get("role") == "developer":
            message["role"] = "system"
        content = message.get("content")
        if isinstance(content, list):
            message["content"] = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
        elif content is None:
            message["content"] = ""  # templates concatenate content: None would fail where "" reads as no text
        if message.get("tool_calls"):
            message["tool_calls"] = [_call_for_template(call) for call in message["tool_calls"]]
        if message.get("role") == "tool" and "name" not in message and names.get(message.get("tool_call_id")):
            message["name"] = names[message.get("tool_call_id")]
        out.append(message)
    return out


def _call_for_template(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            function["arguments"] = parsed
    return {**call, "type": call.get("type", "function"), "function": function}
