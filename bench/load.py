"""Load generator: N concurrent streams against a server, timing every token as the client sees it.

Speaks three dialects, so the same load runs against the worker and its peers:
  native     POST /v1/inference (this worker's SSE: event: token / end)
  openai     POST /v1/completions with stream=true (llama-server, llama-cpp-python's server, this worker)
  llama      POST /completion (llama-server's own route)

    python -m bench.load --url http://127.0.0.1:8080 --streams 1,8 --tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

PROMPT = "Write a long story about a lighthouse keeper who finds a map in a bottle. Chapter one:"


@dataclass
class StreamResult:
    start: float
    token_times: list[float] = field(default_factory=list)  # arrival time of each token (or chunk of tokens)
    tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in itertools.pairwise(t)]

    @property
    def decode_rate(self) -> float:
        """Tokens per second after the first one: the stream's own decode speed."""
        span = self.token_times[-1] - self.token_times[0]
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else 0.0


def _request(dialect: str, tokens: int, sampling: dict[str, Any], seed: int | None) -> tuple[str, dict[str, Any]]:
    """The same request in each dialect; seed None = the server draws one, as most clients leave it."""
    if seed is None:
        seed_field: dict[str, Any] = {}
    else:
        seed_field = {"seed": seed}
    if dialect == "native":
        return "/v1/inference", {"prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True, **seed_field,
                                 **sampling}
    if dialect == "openai":
        return "/v1/completions", {"prompt": PROMPT, "max_tokens": tokens, "stream": True, **seed_field,
                                   "ignore_eos": True, "stream_options": {"include_usage": True}, **sampling}
    if dialect == "llama":
        return "/completion", {"prompt": PROMPT, "n_predict": tokens, "stream": True, **seed_field,
                               "ignore_eos": True, **sampling}
    raise ValueError(dialect)


async def one_stream(http: aiohttp.ClientSession, url: str, dialect: str, tokens: int, sampling: dict[str, Any],
                     seed: int | None) -> StreamResult:
    path, body = _request(dialect, tokens, sampling, seed)
    result = StreamResult(start=time.perf_counter())
    try:
        async with http.post(url + path, json=body) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                data = json.loads(line[6:])
                if dialect == "native":
                    if data["type"] == "token":
                        result.token_times.append(now)
                    elif data["type"] == "end":
                        result.tokens = data["tokens_out"]
                    elif data["type"] == "error":
                        result.error = data["message"]
                elif dialect == "openai":
                    if data.get("choices") and data["choices"][0].get("text"):
                        result.token_times.append(now)
                    if data.get("usage"):
                        result.tokens = data["usage"]["completion_tokens"]
                else:
                    if data.get("content"):
                        result.token_times.append(now)
                    if data.get("stop"):
                        result.tokens = data.get("tokens_predicted", len(result.token_times))
        if not result.tokens:
            result.tokens = len(result.token_times)
        if not result.token_times:
            result.error = result.error or "no tokens"
    except Exception as exc:  # a failed stream is a result to report, not a crash of the bench
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


async def run_load(url: str, *, streams: int, tokens: int, dialect: str = "native",
                   sampling: dict[str, Any] | None = None, rounds: int = 1, seeded: bool = False) -> dict[str, Any]:
    """`streams` concurrent requests, `rounds` times; returns the figures as a dict."""
    sampling = sampling if sampling is not None else {"temperature": 0.8, "top_k": 40, "top_p": 0.95}
    timeout = aiohttp.ClientTimeout(total=3600)
    results: list[StreamResult] = []
    wall = 0.0
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        for r in range(rounds):
            t0 = time.perf_counter()
            batch = await asyncio.gather(*(one_stream(http, url, dialect, tokens, sampling,
                                                      seed=1000 * r + i if seeded else None)
                                           for i in range(streams)))
            wall += time.perf_counter() - t0
            results.extend(batch)
    ok = [r for r in results if r.error is None]
    itls = [x for r in ok for x in r.itls]
    total_tokens = sum(r.tokens for r in ok)
    return {
        "streams": streams,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "first_error": next((r.error for r in results if r.error), None),
        "tokens": total_tokens,
        "aggregate_tps": total_tokens / wall if wall else 0.0,
        "per_stream_tps_p50": _pct([r.decode_rate for r in ok], 50),
        "ttft_ms_p50": _pct([r.ttft * 1000 for r in ok], 50),
        "ttft_ms_p95": _pct([r.ttft * 1000 for r in ok], 95),
        "itl_ms_p50": _pct([x * 1000 for x in itls], 50),
        "itl_ms_p95": _pct([x * 1000 for x in itls], 95),
    }


def format_row(name: str, fig: dict[str, Any]) -> str:
    return (f"| {name} | {fig['streams']} | {fig['per_stream_tps_p50']:.1f} | {fig['aggregate_tps']:.1f} | "
            f"{fig['ttft_ms_p50']:.1f} / {fig['ttft_ms_p95']:.1f} | "
            f"{fig['itl_ms_p50']:.2f} / {fig['itl_ms_p95']:.2f} | "
            f"{fig['errors']} |")


TABLE_HEAD = ("| server | streams | tok/s per stream (p50) | tok/s aggregate | TTFT ms p50 / p95 | ITL ms p50 / p95 "
              "| errors |\n|---|---|---|---|---|---|---|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--dialect", choices=["native", "openai", "llama"], default="native")
    ap.add_argument("--streams", default="1", help="comma-separated concurrency levels")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--greedy", action="store_true", help="temperature 0 instead of 0.8 / top-k 40 / top-p 0.95")
    args = ap.parse_args()
    sampling = {"temperature": 0} if args.greedy else None
    print(TABLE_HEAD)
    for n in (int(x) for x in args.streams.split(",")):
        fig = asyncio.run(run_load(args.url, streams=n, tokens=args.tokens, dialect=args.dialect,
                                   sampling=sampling, rounds=args.rounds))
        print(format_row(args.dialect, fig), flush=True)


if __name__ == "__main__":
    main()
