"""Greedy generation through the int4 kernels equals the dequantizing path, on the embedded reference
model quantized by `llmctl quantize` (GPTQ with act-order, and AWQ). On CPU the kernels run under
Triton's interpreter, forced on with kernel_backend="triton"; on CUDA the kernels are the default."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import typer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from llmctl.runtime import LLM, SamplingParams  # noqa: E402
from llmctl.runtime.layers.linear import Int4Linear  # noqa: E402
from llmctl.runtime.llm import default_model  # noqa: E402

DTYPE = "float16"
PROMPTS = ["def fibonacci(n):", "The quick brown fox"]


@pytest.fixture(scope="module")
def quantize(tmp_path_factory):
    """`llmctl quantize` of the reference model with one method (a small calibration set: only speed)."""
    from llmctl.cli.quantize import quantize

    app = typer.Typer()
    app.command("quantize")(quantize)
    app.callback()(lambda: None)
    done: dict[str, str] = {}

    def run(method: str) -> str:
        if method not in done:
            extra = ["--desc-act", "--group-size", "64"] if method == "gptq" else ["--group-size", "128"]
            path = tmp_path_factory.mktemp("int4") / method
            result = CliRunner().invoke(app, ["quantize", default_model(), str(path), "--method", method, *extra,
                                              "--samples", "4", "--seq-len", "32", "--eval-windows", "0",
                                              "--device", "cpu"])
            assert result.exit_code == 0, result.output
            done[method] = str(path)
        return done[method]

    return run


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_greedy_generation_through_the_int4_kernels_equals_the_dequantizing_path(quantize, method):
    checkpoint = quantize(method)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = LLM(checkpoint, dtype=DTYPE, device=device, kernel_backend="torch", max_model_len=128,
                    max_num_seqs=8, max_num_batched_tokens=256, enforce_eager=True)  # torch attention syncs
    dense = reference.engine.model_runner.model
    assert not any(isinstance(m, Int4Linear) for m in dense.modules())
    want = [r.outputs[0].token_ids for r in reference.generate(PROMPTS, params)]
    del reference

    llm = LLM(checkpoint, dtype=DTYPE, device=device, kernel_backend="triton", max_model_len=128,
              max_num_seqs=8, max_num_batched_tokens=256, enforce_eager=device == "cpu")
    int4 = [m for m in llm.engine.model_runner.model.modules() if isinstance(m, Int4Linear)]
    assert len(int4) == 4 * 6 and all(m.loaded for m in int4)
    assert all(len(m.packed) == 1 for m in int4)  # q|k|v and gate|up share their groups: one kernel each
    got = [r.outputs[0].token_ids for r in llm.generate(PROMPTS, params)]
    assert got == want
