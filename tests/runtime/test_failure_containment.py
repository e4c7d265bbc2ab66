"""A fault in work for one request ends that request with an error; the others run on, token for token."""

from __future__ import annotations

import asyncio
import logging

import pytest

from llmctl.runtime import LLM, SamplingParams
from llmctl.runtime.async_engine import AsyncEngine, EngineDeadError, RequestFailedError
from llmctl.runtime.config import EngineConfig
from llmctl.runtime.layers.sampler import SamplingBatch
from llmctl.runtime.model_runner import ModelRunner
from llmctl.runtime.sequence import Sequence

PROMPTS = [[5, 17, 300, 42, 7, 7, 99], [1, 2, 3], [100] * 20, [8, 9, 10, 11, 12]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
MARK = 499  # the last prompt token of the faulty request, and of no other


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(tiny_models["llama"], dtype="float32", max_model_len=128)


@pytest.fixture(scope="module")
def alone(llm):
    """Each request's tokens when it runs by itself."""
    return [llm.generate([p], SEEDED if i == 1 else GREEDY)[0].outputs[0].token_ids for i, p in enumerate(PROMPTS)]


class FakeTokenizer:
    """Text is the ids, spelled out."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(f" {i}" for i in ids)


def run(engine, requests, late=()):
    """Add requests, then the late ones after two steps (so that a step is in flight when they start);
    step until all are done. Every request's finished output, in order; exactly one each."""
    seqs = [engine.add_request(p, params) for p, params in requests]
    finished = []
    for n in range(10_000):
        if n == 2:
            seqs += [engine.add_request(p, params) for p, params in late]
        if n > 2 and not engine.has_unfinished():
            break
        finished += [out for out in engine.step() if out.finished]
    by_id = {out.request_id: out for out in finished}
    assert len(by_id) == len(finished) == len(seqs)
    return [by_id[s.request_id] for s in seqs]


def others():
    """The requests that must run on as if nothing happened: PROMPTS, the second one seeded."""
    return [(p, SEEDED if i == 1 else GREEDY) for i, p in enumerate(PROMPTS)]


def check_contained(llm, alone, outs, faulty: int, message: str) -> None:
    engine = llm.engine
    assert outs[faulty].finish_reason == "error" and outs[faulty].finished
    assert message in outs[faulty].error
    assert [o.token_ids for i, o in enumerate(outs) if i != faulty] == alone
    assert all(o.finish_reason == "length" and o.error is None for i, o in enumerate(outs) if i != faulty)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.seqs and not engine.output_processor.detokenizers and not engine.has_unfinished()
    # and it serves on
    assert [r.outputs[0].token_ids for r in llm.generate(PROMPTS[:1], GREEDY)] == alone[:1]


@pytest.fixture
def tokenizer(llm, monkeypatch):
    """Give the engine a tokenizer whose detokenizer fails, for the request whose prompt ends in MARK, once
    it is handed its `fail_at`-th token (or None: never)."""
    import llmctl.runtime.output_processor as output_processor

    class Detokenizer(output_processor.IncrementalDetokenizer):
        def __init__(self, tokenizer, prompt_token_ids, *options) -> None:
            super().__init__(tokenizer, prompt_token_ids, *options)
            self.faulty, self.seen = prompt_token_ids[-1] == MARK, 0

        def add(self, token_ids, final=False):
            self.seen += len(token_ids)
            if self.faulty and fail_at[0] is not None and self.seen >= fail_at[0]:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a token that is no text")
            return super().add(token_ids, final)

    fail_at = [None]
    monkeypatch.setattr(llm.engine.output_processor, "tokenizer", FakeTokenizer())
    monkeypatch.setattr(output_processor, "IncrementalDetokenizer", Detokenizer)

    def use(at: int | None = None) -> None:
        fail_at[0] = at
    return use


def test_a_detokenizer_fault_mid_stream_ends_only_its_request(llm, alone, tokenizer, caplog):
    tokenizer(at=3)
    faulty = ([3, 4, MARK], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=["never"]))
    with caplog.at_level(logging.ERROR, logger="llmctl.engine"):
        outs = run(llm.engine, others(), late=[faulty])
    check_contained(llm, alone, outs, 4, "UnicodeDecodeError")
    assert len(outs[4].token_ids) == 3  # the third output token was the one that could not be decoded
    failures = [r for r in caplog.records if r.exc_info]
    assert len(failures) == 1 and outs[4].request_id in failures[0].getMessage()


def test_a_detokenizer_fault_at_the_end_ends_its_request_with_an_error(llm, alone, tokenizer):
    tokenizer(at=1)  # no stop strings: the text is decoded once, when the request has finished
    outs = run(llm.engine, [([3, 4, MARK], GREEDY), *others()])
    check_contained(llm, alone, outs, 0, "UnicodeDecodeError")
    assert outs[0].text == "" and outs[0].stop_reason is None


def test_a_stop_string_search_fault_ends_only_its_request(llm, alone, tokenizer, monkeypatch):
    import llmctl.runtime.output_processor as output_processor

    find = output_processor.find_stop_string

    def broken_for_boom(text, delta, stops):
        if "boom" in stops:
            raise RuntimeError("regex engine exploded")
        return find(text, delta, stops)

    tokenizer()
    monkeypatch.setattr(output_processor, "find_stop_string", broken_for_boom)
    stops = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=["boom"])
    outs = run(llm.engine, [*others()[:2], ([3, 4], stops), *others()[2:]])
    check_contained(llm, alone, outs, 2, "regex engine exploded")


def test_a_generator_that_cannot_be_made_ends_only_its_request(llm, alone, monkeypatch):
    import llmctl.runtime.model_runner as model_runner

    make = model_runner.make_generator

    def broken_for_666(seed, device):
        if seed == 666:
            raise RuntimeError("no generator for you")
        return make(seed, device)

    monkeypatch.setattr(model_runner, "make_generator", broken_for_666)
    faulty = ([3, 4], SamplingParams(temperature=1.0, seed=666, max_tokens=12, ignore_eos=True))
    outs = run(llm.engine, others(), late=[faulty])
    check_contained(llm, alone, outs, 4, "no generator for you")
    assert outs[4].token_ids == []


def test_a_penalty_array_fault_mid_decode_ends_only_its_request(llm, alone, monkeypatch):
    token_array = Sequence.token_array

    def broken_after_four(self):
        if self.sampling_params.repetition_penalty == 1.3 and self.num_output_tokens >= 4:
            raise MemoryError("no room for the penalty array")
        return token_array(self)

    monkeypatch.setattr(Sequence, "token_array", broken_after_four)
    faulty = ([3, 4], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, repetition_penalty=1.3))
    outs = run(llm.engine, [*others()[:3], faulty, *others()[3:]])
    check_contained(llm, alone, outs, 3, "MemoryError")
    assert len(outs[3].token_ids) == 4


def test_a_sampling_set_up_fault_with_a_step_in_flight_keeps_the_rows_aligned(llm, alone, monkeypatch):
    """The faulty row fails while the step before it is in flight and the next steps read the others'
    pending tokens by row: a misaligned row would hand one request another's token."""
    row = ModelRunner._sampling_row

    def broken_on_the_fifth_token(self, seq):
        if seq.prompt_token_ids == [3, 4] and seq.num_tokens >= 2 + 5:
            raise ValueError("logit bias names token 10**9")
        return row(self, seq)

    monkeypatch.setattr(ModelRunner, "_sampling_row", broken_on_the_fifth_token)
    outs = run(llm.engine, [others()[0], ([3, 4], GREEDY), *others()[1:]])
    check_contained(llm, alone, outs, 1, "logit bias")
    assert len(outs[1].token_ids) == 4  # the 5th was in flight when it failed, and is dropped


def test_a_batch_fault_no_single_request_reproduces_is_raised(tiny_models, monkeypatch):
    llm = LLM(tiny_models["llama"], dtype="float32", max_model_len=128)
    build = SamplingBatch.build.__func__

    def broken_for_batches(cls, params, *rest):
        if len(params) > 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return build(cls, params, *rest)

    monkeypatch.setattr(SamplingBatch, "build", classmethod(broken_for_batches))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run(llm.engine, others())


def test_a_forward_pass_fault_is_raised(tiny_models, monkeypatch):
    llm = LLM(tiny_models["llama"], dtype="float32", max_model_len=128)

    def broken(*args):
        raise RuntimeError("device fell off the bus")

    monkeypatch.setattr(llm.engine.model_runner.model, "forward", broken)
    with pytest.raises(RuntimeError, match="fell off the bus"):
        llm.generate(PROMPTS, GREEDY)


# -- the streaming API -----------------------------------------------------------------------------------


async def collect(engine, prompt, params, request_id):
    return [out async for out in engine.generate(prompt, params, request_id)]


def test_a_failed_request_raises_in_its_stream_and_the_engine_serves_on(tiny_models, alone, monkeypatch):
    eng = AsyncEngine(EngineConfig(model=tiny_models["llama"], dtype="float32", max_model_len=128))
    row = ModelRunner._sampling_row

    def broken_on_the_third_token(self, seq):
        if seq.request_id == "faulty" and seq.num_output_tokens >= 3:
            raise ValueError("grammar has no state for this token")
        return row(self, seq)

    monkeypatch.setattr(ModelRunner, "_sampling_row", broken_on_the_third_token)

    async def main():
        requests = [collect(eng, p, params, f"ok-{i}") for i, (p, params) in enumerate(others())]
        return await asyncio.gather(collect(eng, [3, 4], GREEDY, "faulty"), *requests, return_exceptions=True)

    try:
        faulty, *fine = asyncio.run(main())
        assert isinstance(faulty, RequestFailedError) and "grammar has no state" in str(faulty)
        assert [outs[-1].token_ids for outs in fine] == alone
        assert eng.alive
        assert asyncio.run(collect(eng, PROMPTS[0], GREEDY, "later"))[-1].token_ids == alone[0]
        core = eng.engine
        assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
    finally:
        eng.shutdown(timeout=5)


def test_a_sampler_kernel_fault_kills_the_loop(tiny_models, monkeypatch):
    eng = AsyncEngine(EngineConfig(model=tiny_models["llama"], dtype="float32", max_model_len=64))

    def broken(logits, batch):
        raise RuntimeError("sampler kernel faulted")

    monkeypatch.setattr(eng.engine.model_runner.sampler, "launch", broken)
    with pytest.raises(EngineDeadError, match="sampler kernel faulted"):
        asyncio.run(collect(eng, [1, 2], GREEDY, "victim"))
    eng._thread.join(5)
    assert not eng.alive
