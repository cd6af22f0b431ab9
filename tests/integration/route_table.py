"""The worker's route table, read without starting it: which error style each path answers in."""

from __future__ import annotations

import asyncio

from worker.config import Settings
from worker.http.app import create_app
from worker.http.errors import ErrorStyle, style_for


def _app_for_routes():
    async def make():
        return create_app(Settings(_cli_parse_args=[]))

    return asyncio.run(make())


ROUTE_TABLE = _app_for_routes()


def openai_style(path: str) -> bool:
    return style_for(ROUTE_TABLE, path) is ErrorStyle.OPENAI


def anthropic_style(path: str) -> bool:
    return style_for(ROUTE_TABLE, path) is ErrorStyle.ANTHROPIC
