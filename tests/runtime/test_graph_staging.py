"""The CUDA graphs' staging, run eagerly on CPU (LLMCTL_EMULATE_CUDA_GRAPHS=1): decode steps read their inputs
from the graphs' static buffers (pending tokens filled in on the device), verification steps from theirs,
and under tensor parallelism rank 0 broadcasts what it staged and every rank replays the same graph size.
Greedy outputs must equal the eager path's; on a GPU the same code replays captured graphs."""

from __future__ import annotations

import random

import pytest
import torch

from llmctl.runtime.llm import LLM
from llmctl.runtime.model_runner import EMULATE_GRAPHS_ENV
from llmctl.runtime.sampling_params import SamplingParams


def prompts_and_params(count: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(512) for _ in range(rng.randrange(1, 40))] * rng.randrange(1, 3) for _ in range(count)]
    return prompts, [SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 30), ignore_eos=True) for _ in prompts]


def generate(model: str, prompts, params, **options) -> list[list[int]]:
    llm = LLM(model, dtype="float32", max_num_seqs=8, max_num_batched_tokens=64, **options)
    try:
        return [r.outputs[0].token_ids for r in llm.generate(prompts, params)], llm
    finally:
        llm.close()


def replays(monkeypatch) -> list[tuple[str, int]]:
    """Record every graph replay of this process: (decode | verify, size)."""
    from llmctl.runtime.cuda_graphs import DecodeGraphs
    from llmctl.runtime.verify_graphs import VerifyGraphs

    seen: list[tuple[str, int]] = []
    for cls, name in ((DecodeGraphs, "decode"), (VerifyGraphs, "verify")):
        real = cls.replay
        monkeypatch.setattr(cls, "replay", lambda self, n, size, real=real, name=name:
                            seen.append((name, size)) or real(self, n, size))
    return seen


@pytest.mark.parametrize("options", [{}, {"speculative": {"method": "ngram", "num_tokens": 3}}],
                         ids=["decode", "speculative"])
def test_graph_staging_gives_the_eager_outputs(tiny_models, monkeypatch, options):
    prompts, params = prompts_and_params(12, seed=3)
    want, _ = generate(tiny_models["llama"], prompts, params, **options)
    monkeypatch.setenv(EMULATE_GRAPHS_ENV, "1")
    seen = replays(monkeypatch)
    got, llm = generate(tiny_models["llama"], prompts, params, **options)
    assert got == want
    kinds = {name for name, _ in seen}
    assert kinds == ({"decode", "verify"} if options else {"decode"}), kinds
    assert len({size for _, size in seen}) >= 3


@pytest.mark.parametrize("options", [{}, {"speculative": {"method": "ngram", "num_tokens": 3}}],
                         ids=["decode", "speculative"])
def test_tensor_parallel_ranks_replay_what_rank_0_staged(tiny_models, monkeypatch, options):
    """Two ranks on gloo: each graph step's inputs are staged by rank 0 alone and broadcast (pending tokens
    included, filled in before), then both ranks run the same size; outputs equal one eager process's."""
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("two ranks on a CUDA machine need 2 GPUs (on a CPU they run on gloo)")
    prompts, params = prompts_and_params(12, seed=4)
    want, _ = generate(tiny_models["qwen2"], prompts, params, **options)
    monkeypatch.setenv(EMULATE_GRAPHS_ENV, "1")
    seen = replays(monkeypatch)
    got, _ = generate(tiny_models["qwen2"], prompts, params, tensor_parallel_size=2, **options)
    assert got == want
    assert {name for name, _ in seen} == ({"decode", "verify"} if options else {"decode"})


def test_verification_graphs_hold_more_rows_than_the_model_has_positions(tiny_model, tmp_path, monkeypatch):
    """max_batch x (1 + K) rows may exceed the rotary table (here 8 x 17 rows, 64 positions): the padding rows
    sit at position 0, so a replay stays inside it (they ran to position 110 and failed there)."""
    from llmctl.runtime import speculative
    from llmctl.runtime.verify_graphs import VerifyGraphs

    monkeypatch.setattr(speculative, "MAX_SKIP_LOG2", 0)
    model = tiny_model(tmp_path / "pos64", "llama", max_position_embeddings=64)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    seeds = [[11, 12, 13], [21, 22, 23], [31, 32, 33], [41, 42, 43], [51, 52, 53]]
    first, _ = generate(model, seeds, params)
    prompts = [s + o + s for s, o in zip(seeds, first)]  # the continuation repeats: drafts are found
    want, _ = generate(model, prompts, params)
    monkeypatch.setenv(EMULATE_GRAPHS_ENV, "1")
    positions = []
    real = VerifyGraphs.replay
    monkeypatch.setattr(VerifyGraphs, "replay", lambda self, rows, size: positions.append(
        int(self.ints[1, : size * self.per_seq].max())) or real(self, rows, size))
    got, _ = generate(model, prompts, params, speculative={"method": "ngram", "num_tokens": 16, "max_batch": 8})
    assert got == want
    assert positions and max(positions) < 64
