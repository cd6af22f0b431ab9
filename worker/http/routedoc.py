"""What the OpenAPI document says of a route, kept on the route's handler (`@documented(...)`): the document is
built from the app's own route table and the pydantic models named here, never from a list of its own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class StreamDoc:
    """A text/event-stream answer. `named`: `event: <type>` + `data: <json of that type's model>` (native);
    `openai`: `data: <json of the chunk model>` (or an error object), then `data: [DONE]`."""

    description: str
    dialect: Literal["named", "openai"]
    events: tuple[type[BaseModel], ...]


@dataclass(frozen=True)
class RouteDoc:
    summary: str
    tag: str
    body: type[BaseModel] | None = None  # the JSON request body
    ok: type[BaseModel] | None = None  # the JSON answer
    ok_status: int = 200
    ok_description: str = "the answer"
    ok_content: dict[str, Any] | None = None  # another content type than a model's JSON (Prometheus text, ...)
    stream: StreamDoc | None = None  # a streamed answer (alongside `ok` when `stream` is a request field)
    errors: tuple[int, ...] = ()
    not_ready: type[BaseModel] | None = None  # a 503 answered with this model rather than an error object
    path_parameters: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


def documented(doc: RouteDoc) -> Callable[[F], F]:
    def mark(handler: F) -> F:
        handler.route_doc = doc  # type: ignore[attr-defined]
        return handler

    return mark


def route_doc(handler: Any) -> RouteDoc | None:
    return getattr(handler, "route_doc", None)
