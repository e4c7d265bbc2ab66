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
