"""Tokenizing off the event loop, on threads of its own, smallest text first (a short text on the loop itself).

A thread inside llama.cpp cannot be interrupted, and tokenizing a body of several MB takes seconds even in linear
time (llama.cpp builds its pre-tokenizer's regexes for every fragment of plain text). On the loop's default executor
(shared with loading, closing and JSON parsing) a few such bodies made every other request wait for them. Here:
- tokenizing runs on --tokenizer-threads threads of its own; one of them takes small texts only, so a short prompt
  never waits behind long ones;
- waiting work is taken smallest first, and work whose request is gone (client left, handler cancelled) is dropped,
  before it starts or between two pieces of a long text;
- a generation prompt is tokenized only until it is known to exceed the context (`limit`).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from worker.http.state import STATE

T = TypeVar("T")

# A text up to this many characters may take the small-text thread (a few ms of tokenizing at most).
SMALL_TEXT_CHARS = 16 * 1024
# A text up to this many characters is tokenized on the loop itself: the hop to a tokenizer thread and back took
# ~0.5 ms, against 0.14 ms for tokenizing an 86-character prompt (this project's 2-core CPU).
INLINE_TEXT_CHARS = 512


@dataclass(order=True)
class _Work:
    size: int
    seq: int
    run: Callable[[Callable[[], bool]], Any] = field(compare=False)
    future: asyncio.Future[Any] = field(compare=False)
    loop: asyncio.AbstractEventLoop = field(compare=False)


class TokenizerPool:
    def __init__(self, threads: int) -> None:
        self._heap: list[_Work] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self._threads = [threading.Thread(target=self._serve, args=(i == 0 and threads > 1,),
                                          name=f"tokenizer-{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    async def run(self, size: int, fn: Callable[[Callable[[], bool]], T]) -> T:
        """fn(gone) on a tokenizer thread; gone() says whether the caller stopped waiting (fn may return early)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the tokenizer pool is closed")
            heapq.heappush(self._heap, _Work(size, next(self._seq), fn, future, loop))
            self._cond.notify_all()
        return await future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for work in self._heap:
                work.loop.call_soon_threadsafe(_cancel, work.future)
            self._heap.clear()
            self._cond.notify_all()

    def _next(self, small_only: bool) -> _Work | None:
        with self._cond:
            while True:
                if self._closed:
                    return None
                if self._heap and (not small_only or self._heap[0].size <= SMALL_TEXT_CHARS):
                    return heapq.heappop(self._heap)
                self._cond.wait()

    def _serve(self, small_only: bool) -> None:
        while (work := self._next(small_only)) is not None:
            if work.future.cancelled():  # its request is gone: nobody wants the tokens
                continue
            future = work.future
            try:
                result = work.run(future.cancelled)
            except BaseException as exc:  # handed to the waiting handler, which answers for it
                work.loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                work.loop.call_soon_threadsafe(_set_result, future, result)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _cancel(future: asyncio.Future[Any]) -> None:
    future.cancel()


TOKENIZERS = web.AppKey("tokenizers", TokenizerPool)


async def tokenize(request: web.Request, text: str, *, add_special: bool = True, parse_special: bool = False,
                   limit: int | None = None) -> list[int]:
    """model.tokenize on the tokenizer pool (see Model.tokenize for `limit`)."""
    model = request.app[STATE].require_ready().model
    if len(text) <= INLINE_TEXT_CHARS:
        return model.tokenize(text, add_special=add_special, parse_special=parse_special, limit=limit)
    return await request.app[TOKENIZERS].run(len(text), lambda gone: model.tokenize(
        text, add_special=add_special, parse_special=parse_special, limit=limit, gone=gone))


async def prompt_tokens(request: web.Request, text: str, limit: int | None = None) -> list[int]:
    """model.prompt_tokens on the tokenizer pool: what a completion or chat prompt of this text gets."""
    model = request.app[STATE].require_ready().model
    if len(text) <= INLINE_TEXT_CHARS:
        return model.prompt_tokens(text, limit=limit)
    return await request.app[TOKENIZERS].run(len(text), lambda gone: model.prompt_tokens(
        text, limit=limit, gone=gone))


# Token ids written per piece of a /v1/tokenize answer: ~0.2 MB of JSON, a few ms of the loop's time each.
TOKENS_PER_PIECE = 32 * 1024


async def tokens_response(request: web.Request, tokens: list[int]) -> web.StreamResponse:
    """`{"tokens": [...]}` written a piece at a time: a long answer (MBs for a 4 MB text) neither holds the loop
    while it is encoded nor sits whole in memory; each piece waits until the client has taken the last ones."""
    if len(tokens) <= TOKENS_PER_PIECE:
        return web.json_response({"tokens": tokens})
    response = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
    await response.prepare(request)
    for start in range(0, len(tokens), TOKENS_PER_PIECE):
        piece = ",".join(map(str, tokens[start:start + TOKENS_PER_PIECE]))
        await response.write(f'{{"tokens":[{piece}'.encode() if start == 0 else f",{piece}".encode())
        await asyncio.sleep(0)  # the loop's other work between pieces, even when nothing had to wait
    await response.write(b"]}")
    await response.write_eof()
    return response


async def detokenize(request: web.Request, tokens: list[int]) -> str:
    model = request.app[STATE].require_ready().model
    return await request.app[TOKENIZERS].run(len(tokens), lambda _gone: model.detokenize(tokens))
