"""An agent framework end to end against the real worker: pydantic-ai's OpenAI chat model, one tool, a structured
result. pydantic-ai asks for a call on every turn (tool_choice required: its result is a tool too), so the embedded
SmolLM2, whose template knows nothing of tools, answers in the generic constrained form; the tool must run and the
result validate. A 135M model would call the weather tool forever, so the tool hides itself once it has run (a
`prepare` hook, as agents limit their tools): the next turn can only be the result."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field
from pydantic_ai import Agent, RunContext
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.tools import ToolDefinition
from pydantic_ai.usage import UsageLimits


class Forecast(BaseModel):
    city: str = Field(max_length=30)
    summary: str = Field(max_length=80)


@pytest.fixture
def agent(worker) -> tuple[Agent, list[str]]:
    model = OpenAIChatModel("any", provider=OpenAIProvider(base_url=f"{worker.url}/v1", api_key="unused"))
    calls: list[str] = []
    agent = Agent(model, output_type=Forecast, instructions="Use get_weather, then give the forecast.",
                  model_settings={"temperature": 0.0, "max_tokens": 120})

    async def once(ctx: RunContext, tool: ToolDefinition) -> ToolDefinition | None:
        return None if calls else tool

    @agent.tool_plain(prepare=once)
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"Sunny and 21 degrees in {city}."

    return agent, calls


def test_an_agent_with_one_tool_runs_to_a_validated_result(agent):
    agent_, calls = agent
    result = agent_.run_sync("What is the weather like in Paris?", usage_limits=UsageLimits(request_limit=8))
    assert isinstance(result.output, Forecast)
    tool_names = [part.tool_name for message in result.all_messages() for part in message.parts
                  if getattr(part, "part_kind", "") == "tool-call"]
    assert tool_names == ["get_weather", "final_result"], tool_names  # a call, its result sent back, the answer
    assert len(calls) == 1
    print(f"tool calls: {tool_names}, get_weather ran for {calls}, output {result.output}")
