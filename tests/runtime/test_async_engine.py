"""The streaming API: concurrent streams, abort on disconnect, errors, a dead loop."""

from __future__ import annotations

import asyncio

import pytest

from llmctl.runtime import SamplingParams
from llmctl.runtime.async_engine import AsyncEngine, EngineDeadError
from llmctl.runtime.config import EngineConfig


@pytest.fixture(scope="module")
def engine(tiny_models):
    eng = AsyncEngine(EngineConfig(model=tiny_models["llama"], dtype="float32", max_model_len=256))
    yield eng
    eng.shutdown(timeout=5)


async def collect(engine, prompt, params, request_id):
    return [out async for out in engine.generate(prompt, params, request_id)]


def test_concurrent_streams_match_the_offline_engine(engine, tiny_models):
    from llmctl.runtime import LLM

    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5], [100] * 20]

    async def main():
        return await asyncio.gather(*(collect(engine, p, params, f"c{i}") for i, p in enumerate(prompts)))

    streams = asyncio.run(main())
    offline = LLM(tiny_models["llama"], dtype="float32", max_model_len=256).generate(prompts, params)
    for outs, expected in zip(streams, offline):
        assert [t for o in outs for t in o.new_token_ids] == outs[-1].token_ids == expected.outputs[0].token_ids
        assert len(outs) == 12 and outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert outs[-1].finish_reason == "length"


def test_leaving_the_stream_early_aborts_and_frees_blocks(engine):
    bm = engine.engine.block_manager

    async def main():
        gen = engine.generate([3] * 40, SamplingParams(max_tokens=200, ignore_eos=True), "leaver")
        async for out in gen:
            if len(out.token_ids) == 3:
                break
        await gen.aclose()
        for _ in range(100):
            if bm.num_free_blocks == bm.num_blocks and not engine.engine.has_unfinished():
                return True
            await asyncio.sleep(0.02)
        return False

    assert asyncio.run(main())


def test_bad_request_raises_value_error_in_the_caller(engine):
    async def main():
        await collect(engine, list(range(300)), SamplingParams(max_tokens=10), "too-long")

    with pytest.raises(ValueError, match="maximum context length is 256"):
        asyncio.run(main())
    assert engine.alive


def test_a_failing_step_kills_the_loop_and_fails_requests(tiny_models):
    eng = AsyncEngine(EngineConfig(model=tiny_models["llama"], dtype="float32", max_model_len=64))

    def broken_step():
        raise RuntimeError("device fell off the bus")

    eng.engine.step = broken_step

    async def main():
        await collect(eng, [1, 2], SamplingParams(max_tokens=4), "victim")

    with pytest.raises(EngineDeadError, match="device fell off the bus"):
        asyncio.run(main())
    eng._thread.join(5)
    assert not eng.alive

    async def after():
        await collect(eng, [1, 2], SamplingParams(max_tokens=4), "late")

    with pytest.raises(EngineDeadError):
        asyncio.run(after())


def test_cache_salt_reaches_the_engine(engine):
    prompt = [(11 * i) % 500 + 1 for i in range(40)]
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)

    async def cached(request_id, salt):
        outs = [out async for out in engine.generate(prompt, params, request_id, cache_salt=salt)]
        return outs[-1].num_cached_tokens

    assert asyncio.run(cached("salt-1", "alice")) == 0
    assert asyncio.run(cached("salt-2", "bob")) == 0
    assert asyncio.run(cached("salt-3", "alice")) == 32


def test_an_idle_engine_is_not_stalled(engine):
    import time

    deadline = time.monotonic() + 5
    while engine.engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert engine.stalled_for() == 0.0


def test_stalled_for_counts_from_the_last_step_or_from_when_work_arrived(tiny_models, monkeypatch):
    import time

    eng = AsyncEngine(EngineConfig(model=tiny_models["llama"], dtype="float32", max_model_len=64))
    step = eng.engine.step

    def slow_step():
        time.sleep(1.0)
        return step()

    monkeypatch.setattr(eng.engine, "step", slow_step)
    time.sleep(0.5)  # an idle spell, which must not count once work arrives
    assert eng.stalled_for() == 0.0

    async def main():
        task = asyncio.ensure_future(collect(eng, [1, 2, 3], SamplingParams(max_tokens=1), "slow"))
        await asyncio.sleep(0.1)
        early = eng.stalled_for()  # the first step is still sleeping
        await asyncio.sleep(0.5)
        later = eng.stalled_for()  # still the first step
        await task
        return early, later

    try:
        early, later = asyncio.run(main())
        assert 0.05 <= early < 0.4 and 0.5 <= later < 1.0
        deadline = time.monotonic() + 5
        while eng.stalled_for() != 0.0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.stalled_for() == 0.0 and eng.alive
    finally:
        eng.shutdown(timeout=5)
