"""Greedy generation through the int4 kernels equals the dequantizing path, on the embedded reference
model quantized by `llmctl quantize`: GPTQ with act-order, AWQ, GPTQ rewritten as GPTQ v2 (zero points
without v1's offset), and compressed-tensors (`--format compressed-tensors`). On CPU the kernels run under
Triton's interpreter, forced on with kernel_backend="triton"; on CUDA the kernels are the default."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from llmctl.runtime import LLM, SamplingParams  # noqa: E402
from llmctl.runtime.layers.linear import Int4Linear  # noqa: E402

DTYPE = "float16"
PROMPTS = ["def fibonacci(n):", "The quick brown fox"]


OPTIONS = {"gptq": ["gptq", "--desc-act", "--group-size", "64"], "awq": ["awq", "--group-size", "128"],
           "compressed-tensors": ["awq", "--format", "compressed-tensors", "--group-size", "64"]}


@pytest.fixture(scope="module")
def quantize(quantized_reference, tmp_path_factory):
    """The reference model quantized with one method (conftest's quantized_reference; gptq_v2 rewritten)."""
    def run(method: str) -> str:
        if method == "gptq_v2":
            return as_gptq_v2(run("gptq"), tmp_path_factory.mktemp("int4") / method)
        return quantized_reference(*OPTIONS[method])

    return run


def as_gptq_v2(src: str, dst) -> str:
    """A GPTQ v1 checkpoint rewritten as v2: every stored zero point one higher, the format named v2."""
    import json
    import shutil

    from safetensors.torch import save_file

    from llmctl.checkpoint.formats.packing import pack_int32, unpack_int32
    from llmctl.checkpoint.loader import read_tensors

    shutil.copytree(src, dst)
    tensors = {n: (pack_int32(unpack_int32(t, 4, dim=1) + 1, 4, dim=1) if n.endswith(".qzeros") else t)
               for n, t in read_tensors(src)}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "quantize_config.json").unlink()
    return str(dst)


@pytest.mark.parametrize("method", ["gptq", "awq", "gptq_v2", "compressed-tensors"])
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
