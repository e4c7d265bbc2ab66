"""The masks' hand-off between the fill's worker and the device (token_masks.py), on CPU: a stand-in for the
HostGate that blocks like the stream would lets the engine run the device-wait protocol end to end."""

from __future__ import annotations

import threading

import pytest

from llmctl.runtime.llm import LLM
from llmctl.runtime.sampling_params import SamplingParams
from llmctl.runtime.structured import StructuredOutput

pytest.importorskip("llguidance")
SPEC = StructuredOutput.json_schema({"type": "object", "properties": {"n": {"type": "integer"}, "s": {
    "type": "string", "maxLength": 8}}, "required": ["n", "s"], "additionalProperties": False})


class BlockingGate:
    """wait(n) blocks until open(n), as the stream would; it records the order of calls."""

    def __init__(self) -> None:
        self.value, self.reserved, self.calls = 0, 0, []
        self.cond = threading.Condition()

    def reserve(self) -> int:
        self.reserved += 1
        self.calls.append(("reserve", self.reserved))
        return self.reserved

    def wait(self, n, device) -> None:
        self.calls.append(("wait", n))
        with self.cond:
            assert self.cond.wait_for(lambda: self.value >= n, timeout=30), f"gate {n} never opened"

    def open(self, n) -> None:
        with self.cond:
            self.calls.append(("open", n))
            self.value = max(self.value, n)
            self.cond.notify_all()


@pytest.fixture
def llm():
    return LLM(dtype="float32", max_num_seqs=8)


def use_gate(llm, gate):
    masks = llm.engine.model_runner.masks
    masks.device_waits, masks._gate_tried, masks._gate = gate is not None, True, gate
    return masks


def test_device_wait_gives_the_host_wait_outputs_and_opens_every_gate(llm):
    prompts = [f"item {i} as JSON: " for i in range(6)]
    params = [SamplingParams(temperature=0.0, max_tokens=24, structured=SPEC)] * 6
    use_gate(llm, None)
    expected = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    gate = BlockingGate()
    use_gate(llm, gate)
    try:
        got = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    finally:
        use_gate(llm, None)
    assert got == expected
    reserved = [n for kind, n in gate.calls if kind == "reserve"]
    assert reserved and sorted(n for kind, n in gate.calls if kind == "open") == reserved
    assert sorted(n for kind, n in gate.calls if kind == "wait") == reserved  # each step's masks waited for


def test_a_failed_fill_still_opens_its_gate_and_its_error_reaches_the_caller(llm):
    gate = BlockingGate()
    masks = use_gate(llm, gate)

    def broken(matchers, bitmask):
        raise RuntimeError("mask fill broke")

    masks.grammars.fill = broken
    try:
        with pytest.raises(RuntimeError, match="mask fill broke"):
            llm.generate("x = ", SamplingParams(max_tokens=8, structured=SPEC))
    finally:
        del masks.grammars.fill
        use_gate(llm, None)
    assert ("open", 1) in gate.calls  # the stream would otherwise wait for ever (the engine's step failing is fatal)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_the_real_gate_on_cuda_gives_the_host_wait_outputs():
    """The HostGate itself (cuStreamWaitValue32 on pinned memory): the driver takes it, and greedy constrained
    outputs with the device waiting are those of the host waiting, under CUDA graphs and the step overlap."""
    llm = LLM(dtype="float16", max_num_seqs=16)
    masks = llm.engine.model_runner.masks
    prompts = [f"item {i} as JSON: " for i in range(16)]
    params = [SamplingParams(temperature=0.0, max_tokens=48, structured=SPEC)] * 16
    masks.device_waits = False
    expected = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    masks.device_waits = True
    got = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    assert masks._gate is not None, "the driver refused the stream wait"
    assert got == expected
