"""The chat path every conversational API shares: OpenAI's chat completions, OpenAI's Responses, Anthropic's
Messages. Each route translates its request into `ChatInputs` (OpenAI chat's shape of messages and tools, since that
is what the chat layer takes), and `submit_chat` does the rest: the model's own template renders the conversation
and its tools (worker.chat), the tool or format constraint is checked, the prompt tokenized and the jobs submitted
through jobs.submit_jobs. The route then reads typed outputs and turns each answer's `ChatDelta`s (from
`plan.parser()`) into its own wire format. One generation path, whatever the dialect.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from aiohttp import web

from worker import chat
from worker.chat import ChatPlan
from worker.engine.outputs import Constraint
from worker.engine.sampling import SamplingParams
from worker.http import tokenizing
from worker.http.errors import ApiError
from worker.http.jobs import JobSpec, JobStream, checked_constraint, submit_jobs
from worker.http.state import SETTINGS, STATE
from worker.llamacpp.specials import model_special_tokens


@dataclass(frozen=True)
class ChatInputs:
    """One chat request, whatever API it came in. `messages` and `tools` are OpenAI chat's (Message.for_template,
    [{"type": "function", "function": {...}}]); `sampling` has one entry per choice."""

    messages: list[dict[str, Any]]
    sampling: Sequence[SamplingParams]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    reasoning: Literal["split", "inline"] | None = None  # None: the worker's --reasoning-format
    template_kwargs: dict[str, Any] | None = None
    response_format: tuple[Constraint, str] | None = None  # a constraint the request asks for, and its field
    max_tokens: int | None = None  # None: to the end of the context
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    speculate: bool = True
    choices_field: str = "n"  # the field to name when a request asks for more sequences than the worker holds
    continue_with: str = ""  # text the answer continues from (Anthropic's prefilled last assistant turn)

    @property
    def choices(self) -> int:
        return len(self.sampling)


async def chat_plan(request: web.Request, inputs: ChatInputs) -> ChatPlan:
    """The conversation in the model's own chat template, with its tools, and how the answer is constrained and
    parsed (worker.chat). Errors name OpenAI chat's fields (`messages`, `tools`, `tool_choice`); a translating route
    renames them where its own differ."""
    state = request.app[STATE]
    runtime = state.require_ready()
    info = runtime.model.info
    if not info.chat_template:
        raise ApiError(400, "no_chat_template",
                       f"the model {state.model_id} has no chat template (tokenizer.chat_template in its GGUF); "
                       "use /v1/completions with a prompt in the model's own format", field="messages")
    reasoning = inputs.reasoning or request.app[SETTINGS].reasoning_format
    specials = await asyncio.to_thread(model_special_tokens, runtime.model) if inputs.tools else {}
    try:
        plan = chat.prepare(info.chat_template, inputs.messages, tools=inputs.tools, tool_choice=inputs.tool_choice,
                            parallel_tool_calls=inputs.parallel_tool_calls, reasoning=reasoning,
                            bos_token=info.bos, eos_token=info.eos, special_tokens=specials,
                            template_kwargs=inputs.template_kwargs)
    except chat.ChatRequestError as exc:
        raise ApiError(400, "invalid_request", str(exc), field=exc.param) from None
    except chat.TemplateCompileError as exc:
        raise ApiError(500, "chat_template_error", str(exc)) from None
    except chat.TemplateRenderError as exc:
        raise ApiError(400, "invalid_request", f"the model's chat template refused these messages: {exc}",
                       field="messages") from None
    # The answer goes on from the prefilled text, after the template's opening of the assistant turn (as
    # llama-server continues a final assistant message).
    return replace(plan, prompt=plan.prompt + inputs.continue_with) if inputs.continue_with else plan


def check_room(request: web.Request, choices: int, field_name: str) -> None:
    """One request may not ask for more sequences than the worker can hold at once (slots + queue)."""
    engine = request.app[STATE].require_ready().engine
    room = engine.n_slots + engine.max_queue
    if choices > room:
        raise ApiError(400, "invalid_request", f"the request asks for {choices} sequences (prompts x n); this "
                       f"worker holds at most {room} at once ({engine.n_slots} slots + a queue of "
                       f"{engine.max_queue})", field=field_name)


async def chat_prompt_tokens(request: web.Request, inputs: ChatInputs) -> tuple[ChatPlan, list[int]]:
    """The plan and all of its prompt's tokens, however long (a token count: the jobs would run on these)."""
    plan = await chat_plan(request, inputs)
    return plan, await tokenizing.prompt_tokens(request, plan.prompt)


async def submit_chat(request: web.Request, inputs: ChatInputs, job_ids: Sequence[str]) -> tuple[ChatPlan, JobStream]:
    """Render, constrain, tokenize and submit one job per choice (ids `job_ids`); the plan gives each answer's
    parser."""
    plan = await chat_plan(request, inputs)
    check_room(request, inputs.choices, inputs.choices_field)
    requested = inputs.response_format
    if plan.constraint is not None and requested is not None:
        raise ApiError(400, "invalid_request", f"'{requested[1]}' and tool calls cannot both constrain one answer; "
                       "use tool_choice 'none', or leave the format out", field=requested[1])
    constraint = await checked_constraint(request, (plan.constraint, "tools") if plan.constraint else requested)
    ctx_size = request.app[STATE].require_ready().engine.ctx_size
    tokens = await tokenizing.prompt_tokens(request, plan.prompt, limit=ctx_size)
    max_tokens = inputs.max_tokens or max(ctx_size - len(tokens), 1)
    specs = [JobSpec(tokens, params, job_id) for params, job_id in zip(inputs.sampling, job_ids, strict=True)]
    jobs = await submit_jobs(request, specs, max_tokens=max_tokens, stop=inputs.stop, ignore_eos=inputs.ignore_eos,
                             constraint=constraint, logprobs=inputs.logprobs, special_text=plan.special_text,
                             speculate=inputs.speculate)
    return plan, jobs
