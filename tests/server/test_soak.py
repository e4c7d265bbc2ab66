"""A bounded soak on loopback: many concurrent clients, some of which hang up mid-stream.

Afterwards: no 5xx, every request accounted for, every KV block back in the pool, no request state left
anywhere, and the process's memory no larger than after the warm-up.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import time
from collections import Counter

import pytest

httpx = pytest.importorskip("httpx")

CONCURRENCY = 64
DISCONNECT_SHARE = 0.10
MEMORY_GROWTH_LIMIT = 64 << 20  # bytes; a leak of even 1 KiB a request would show as 2 MiB over 2,000


def rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def one_request(client: httpx.AsyncClient, rng: random.Random, leave: bool) -> str:
    """One client's request; returns how it ended: the status, 'done' for a full stream, or 'left'."""
    chat = rng.random() < 0.5
    body = {"max_tokens": rng.randint(4, 16), "temperature": rng.choice([0.0, 0.8]), "ignore_eos": True}
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": f"item {rng.random()}"}]
    else:
        path, body["prompt"] = "/v1/completions", f"def f{rng.randint(0, 10**6)}(x):"
    if not leave and rng.random() < 0.25:
        response = await client.post(path, json=body)
        return str(response.status_code)
    async with client.stream("POST", path, json={**body, "stream": True}) as response:
        if response.status_code != 200:
            return str(response.status_code)
        events = 0
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events += 1
                if leave and events == 2:
                    return "left"  # leaving the block closes the connection mid-stream
                if line == "data: [DONE]":
                    return "done"
    return "truncated"


async def soak(url: str, total: int, on_progress) -> Counter:
    rng = random.Random(0)
    leavers = set(rng.sample(range(total), int(total * DISCONNECT_SHARE)))
    outcomes: Counter = Counter()
    next_index = 0
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def worker():
            nonlocal next_index
            while next_index < total:
                i, next_index = next_index, next_index + 1
                outcomes[await one_request(client, random.Random(i), i in leavers)] += 1
                on_progress(sum(outcomes.values()))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return outcomes


def run_soak(engine_factory, serve, idle, chat_model, total: int) -> None:
    eng = engine_factory(chat_model, max_num_seqs=CONCURRENCY)
    try:
        with serve(eng) as server:
            marks = {}

            def on_progress(done: int) -> None:
                if done == total // 4 and "warm" not in marks:
                    marks["warm"] = rss()

            start = time.monotonic()
            outcomes = asyncio.run(soak(server.url, total, on_progress))
            elapsed = time.monotonic() - start
            assert idle(eng, timeout=5)
            end_rss = rss()
            print(f"\nsoak: {total} requests in {elapsed:.1f} s, {dict(outcomes)}, "
                  f"RSS {marks['warm'] >> 20} -> {end_rss >> 20} MiB")
            assert outcomes == {"done": outcomes["done"], "200": outcomes["200"],
                                "left": int(total * DISCONNECT_SHARE)}
            assert sum(outcomes.values()) == total
            assert server.app.state.server.admission.in_flight == 0
            assert not eng._streams and not eng.engine.seqs and not eng.engine.output_processor.detokenizers
            assert end_rss - marks["warm"] < MEMORY_GROWTH_LIMIT
    finally:
        eng.shutdown(timeout=5)


def test_soak_small(engine_factory, serve, idle, chat_model):
    run_soak(engine_factory, serve, idle, chat_model, total=200)


@pytest.mark.slow
def test_soak_2000_requests(engine_factory, serve, idle, chat_model):
    run_soak(engine_factory, serve, idle, chat_model, total=2000)
