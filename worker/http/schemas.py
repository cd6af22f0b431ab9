"""Reading request bodies: JSON decoded once (deep nesting and lone surrogates refused), then validated by a
route's model; any problem is a 400 that names the field."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, TypeVar

import numpy as np
from aiohttp import web
from pydantic import BaseModel, ValidationError

from worker.http.errors import ApiError

M = TypeVar("M", bound=BaseModel)

# No request of this API nests deeper than a handful of levels; a body that does is refused before it is parsed.
MAX_JSON_DEPTH = 32
# Bodies up to this size are parsed on the event loop (well under a millisecond); bigger ones (a long prompt, a
# long token list) in a thread, so the loop keeps answering everyone else meanwhile.
INLINE_PARSE_BYTES = 64 * 1024

_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')


def json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in a JSON text: a few passes at C speed, no parsing, no recursion.

    Escapes go first (escaped backslashes, then escaped quotes), then everything but brackets and quotes, then what
    was between quotes; the deepest running count of open brackets is the depth. On text that is not JSON the
    number is meaningless, and json.loads refuses that text anyway.
    """
    s = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    s = b"".join(s.split(b'"')[::2])
    if not s:
        return 0
    brackets = np.frombuffer(s, dtype=np.uint8)
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1).astype(np.int32)
    return int(np.cumsum(steps).max())


def _decode(raw: bytes) -> Any:
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise ApiError(400, "invalid_request", f"body nests arrays or objects deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, UnicodeDecodeError and CPython's limit on an integer literal's digits
        # (4,300): all are the body's fault.
        raise ApiError(400, "invalid_request", f"body is not valid JSON: {exc}") from None
    # A \uD800-\uDFFF escape: JSON lets a lone one through, UTF-8 (llama.cpp's tokenizer, our answers) cannot.
    if b"\\ud" in raw or b"\\uD" in raw or json.detect_encoding(raw) != "utf-8":
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "invalid_request", "body has a string with a lone UTF-16 surrogate "
                           "(a \\uD800-\\uDFFF escape that is not half of a pair)") from None
    return body


async def read_json(request: web.Request) -> Any:
    """The body as JSON (bodies over --max-body-bytes get 413 from request.read); any problem is a 400."""
    raw = await request.read()
    if len(raw) > INLINE_PARSE_BYTES:
        return await asyncio.to_thread(_decode, raw)
    return _decode(raw)


# pydantic's names for the branch of a union it tried (`str`, `literal['none','auto']`, `function-after[...]`):
# steps of its search, not fields a client sent
_BRANCH = re.compile(r"(str|int|float|bool|list|dict|none|[\w-]+\[.*\])")


def field_path(loc: tuple[Any, ...]) -> str:
    """A validation error's location as the client's dotted field path: union branches left out, and a tagged
    union's tag where it repeats its field's name (`response_format.json_schema.json_schema`) said once."""
    parts: list[Any] = []
    for step in loc:
        if isinstance(step, str) and (_BRANCH.fullmatch(step) or (parts and parts[-1] == step)):
            continue
        parts.append(step)
    return ".".join(str(p) for p in parts)


def parse(model: type[M], body: Any) -> M:
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = err.get("loc", ())
        field = str(loc[0]) if loc else None
        if err.get("type") == "extra_forbidden":
            message = f"unknown field {field!r}"
        else:
            message = f"{field_path(loc)}: {err['msg'].removeprefix('Value error, ')}"
        raise ApiError(400, "invalid_request", message, field=field) from None
