"""Chat prompts from the model's own template (tokenizer.chat_template in the GGUF), rendered as Hugging Face does.

Same environment as transformers' apply_chat_template: a sandboxed, immutable jinja2 environment with trim_blocks and
lstrip_blocks, the loopcontrols extension, a `tojson` that keeps non-ASCII text, `raise_exception` and `strftime_now`;
the template sees `messages`, `bos_token`, `eos_token`, `add_generation_prompt`, and `tools`/`documents` as None.
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


def render(source: str, messages: list[dict[str, Any]], *, bos_token: str | None, eos_token: str | None,
           add_generation_prompt: bool = True) -> str:
    template = compile_template(source)
    try:
        return template.render(messages=messages, bos_token=bos_token or "", eos_token=eos_token or "",
                               add_generation_prompt=add_generation_prompt, tools=None, documents=None)
    except Exception as exc:
        raise TemplateRenderError(str(exc) or type(exc).__name__) from None
