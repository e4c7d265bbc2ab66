"""Request priorities end to end: `LLM.generate(priority=...)`, the HTTP `priority` field, and its 400s."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from llmctl.runtime.llm import LLM
from llmctl.runtime.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def test_urgent_requests_finish_first_and_preempted_ones_still_match(chat_model):
    """One sequence at a time: the engine runs the most urgent first, and outputs are those of fcfs."""
    prompts = [f"def f{i}(x): return x + {i}" for i in range(6)]
    fcfs = LLM(chat_model, dtype="float32", max_num_seqs=1)
    ranked = LLM(chat_model, dtype="float32", max_num_seqs=1, scheduling_policy="priority")
    priority = [5, 3, 9, -1, 3, 0]
    finished = []
    for i, (prompt, p) in enumerate(zip(prompts, priority)):
        ranked.engine.add_request(prompt, GREEDY, request_id=str(i), priority=p)
    while ranked.engine.has_unfinished():
        finished += [int(out.request_id) for out in ranked.engine.step() if out.finished]
    assert finished == [3, 5, 1, 4, 0, 2]  # by priority; 1 before 4: equal priorities keep arrival order
    assert [r.outputs[0].token_ids for r in ranked.generate(prompts, GREEDY, priority=priority)] == \
        [r.outputs[0].token_ids for r in fcfs.generate(prompts, GREEDY)]
    with pytest.raises(ValueError, match="6 priorities"):
        ranked.generate(prompts[:2], GREEDY, priority=priority)


def test_an_urgent_arrival_preempts_a_running_request(chat_model):
    llm = LLM(chat_model, dtype="float32", max_num_seqs=1, scheduling_policy="priority")
    eng = llm.engine
    slow = eng.add_request("import json", SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), priority=1)
    for _ in range(3):
        eng.step()
    urgent = eng.add_request("import re", SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), priority=0)
    order = []
    while eng.has_unfinished():
        order += [out.request_id for out in eng.step() if out.finished]
    assert order == [urgent.request_id, slow.request_id] and slow.num_preemptions == 1
    alone = LLM(chat_model, dtype="float32").generate("import json", SamplingParams(temperature=0.0, max_tokens=40,
                                                                                     ignore_eos=True))
    assert slow.output_token_ids == alone[0].outputs[0].token_ids


def test_priority_over_http(new_engine, serve, server, slow_steps):
    body = {"model": "tiny", "prompt": "import os", "max_tokens": 3, "priority": 2}
    refused = httpx.post(f"{server.url}/v1/completions", json=body).json()["error"]
    assert refused["param"] == "priority" and "--scheduling-policy priority" in refused["message"]
    assert httpx.post(f"{server.url}/v1/completions", json={**body, "priority": 0}).status_code == 200
    bad = httpx.post(f"{server.url}/v1/completions", json={**body, "priority": 2**40}).json()["error"]
    assert bad["param"] == "priority" and "32-bit" in bad["message"]
    ranked = new_engine(scheduling_policy="priority", max_num_seqs=1)
    slow_steps(ranked, 0.02)  # the background request runs for over a second
    with serve(ranked) as running:
        async def race():
            async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
                done = []

                async def one(name, priority, max_tokens):
                    r = await client.post("/v1/completions", json={**body, "priority": priority,
                                                                   "max_tokens": max_tokens, "ignore_eos": True})
                    assert r.status_code == 200
                    done.append(name)

                first = asyncio.create_task(one("background", 10, 60))
                await asyncio.sleep(0.3)
                await asyncio.gather(first, one("urgent", -5, 2))
                return done

        assert asyncio.run(race()) == ["urgent", "background"]
