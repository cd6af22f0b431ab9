"""Chat and agent traffic: conversations that resend their growing history every turn, and bursts of requests
that share one long prefix. The same client (OpenAI /v1/completions, streamed) drives any server.

    python -m bench.multiturn --url http://127.0.0.1:8080 --conversations 8 --turns 4 --system-tokens 5000
    python -m bench.multiturn --url http://127.0.0.1:8080 --burst 32 --system-tokens 5000

A conversation's turn t sends: the shared system prompt, every earlier user message and the reply the server
gave to it, then a new user message; the time to its first token is what a chat user waits for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from typing import Any

import aiohttp

# Common English words: about one token each for Llama-3's and SmolLM2's tokenizers, so N words ≈ N tokens.
WORDS = ("the of and to in is was for on that with as by at from it an be this which or are have not but had his "
         "they you were her she there been one all we their has would when if so no what up out more said some can "
         "who them then about could time into only other new like people than first any may very after most also "
         "made over did many before must through back years where much your way well down should because each "
         "just those how too little state good very make world still own see men work long get here between both "
         "life being under never day same another know while last might us great old year off come since against "
         "go came right used take three").split()


def text_of(n_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


async def _complete(http: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> tuple[float, str, int]:
    """(time to first token, the reply's text, cached prompt tokens the server reported or -1)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    cached = -1
    async with http.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    first = first or time.perf_counter()
                    parts.append(choice["text"])
            usage = chunk.get("usage") or {}
            details = usage.get("prompt_tokens_details") or {}
            if "cached_tokens" in details:
                cached = details["cached_tokens"]
    return (first or time.perf_counter()) - start, "".join(parts), cached


def _session() -> aiohttp.ClientSession:
    # a connection per request: llama-server closes idle keep-alive connections under the client's feet
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600),
                                 connector=aiohttp.TCPConnector(force_close=True, limit=0))


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))] if s else float("nan")


async def run_conversations(url: str, *, conversations: int, turns: int, system_tokens: int, user_tokens: int = 60,
                            reply_tokens: int = 64, pause_s: float = 0.0, seed: int = 0) -> dict[str, Any]:
    """With `pause_s`, each user reads the reply for a random 0-pause_s seconds before the next turn: conversations
    that started together drift apart, as people's do (without it, the turns of conversations that a server answered
    at the same pace come back together, a burst of chunks each turn)."""
    rng = random.Random(seed)
    system = "System: " + text_of(system_tokens, rng) + "\n"
    users = [[text_of(user_tokens, rng) for _ in range(turns)] for _ in range(conversations)]
    ttft: list[list[float]] = [[] for _ in range(turns)]
    cached: list[list[int]] = [[] for _ in range(turns)]

    async def conversation(http: aiohttp.ClientSession, c: int) -> None:
        history = system
        pauses = random.Random(seed * 1000 + c + 1)  # its own: the same pauses whatever order the turns end in
        for t in range(turns):
            if t and pause_s:
                await asyncio.sleep(pauses.uniform(0, pause_s))
            history += f"User: {users[c][t]}\nAssistant:"
            first, reply, hit = await _complete(http, url, history, reply_tokens)
            ttft[t].append(first)
            cached[t].append(hit)
            history += reply + "\n"

    start = time.perf_counter()
    async with _session() as http:
        await asyncio.gather(*(conversation(http, c) for c in range(conversations)))
    wall = time.perf_counter() - start
    return {
        "workload": "multiturn", "conversations": conversations, "turns": turns, "system_tokens": system_tokens,
        "pause_s": pause_s,
        "wall_s": round(wall, 3),
        "ttft_ms_p50_by_turn": [round(_pct(v, 50) * 1000, 1) for v in ttft],
        "ttft_ms_p95_by_turn": [round(_pct(v, 95) * 1000, 1) for v in ttft],
        "ttft_ms_p50_later_turns": round(_pct([x for v in ttft[1:] for x in v], 50) * 1000, 1) if turns > 1 else None,
        "cached_tokens_p50_by_turn": [_pct([float(x) for x in v], 50) for v in cached],
    }


async def run_burst(url: str, *, requests: int, system_tokens: int, user_tokens: int = 40, reply_tokens: int = 32,
                    seed: int = 1) -> dict[str, Any]:
    """`requests` requests with one long common prefix, all sent at once."""
    rng = random.Random(seed)
    system = "System: " + text_of(system_tokens, rng) + "\n"
    prompts = [system + f"User: {text_of(user_tokens, rng)}\nAssistant:" for _ in range(requests)]
    start = time.perf_counter()
    async with _session() as http:
        results = await asyncio.gather(*(_complete(http, url, p, reply_tokens) for p in prompts))
    wall = time.perf_counter() - start
    firsts = [r[0] for r in results]
    return {"workload": "burst", "requests": requests, "system_tokens": system_tokens, "wall_s": round(wall, 3),
            "ttft_ms_p50": round(_pct(firsts, 50) * 1000, 1), "ttft_ms_p95": round(_pct(firsts, 95) * 1000, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--reply-tokens", type=int, default=64)
    ap.add_argument("--pause", type=float, default=0.0, help="users read each reply for a random 0-PAUSE seconds")
    ap.add_argument("--burst", type=int, default=0, help="run the shared-prefix burst with this many requests")
    args = ap.parse_args()
    if args.burst:
        out = asyncio.run(run_burst(args.url, requests=args.burst, system_tokens=args.system_tokens))
    else:
        out = asyncio.run(run_conversations(args.url, conversations=args.conversations, turns=args.turns,
                                            system_tokens=args.system_tokens, reply_tokens=args.reply_tokens,
                                            pause_s=args.pause))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
