"""Interop with the peer libraries: llmctl's checkpoints load in GPTQModel and AutoAWQ, theirs load in llmctl.

"Same weights" is checked through the peer's own kernel: feeding its quantized linear the identity
matrix returns the weight it really computes with. GPTQModel's CPU kernels compute in bfloat16 and
AutoAWQ's in float16, so weights are compared to that precision; a wrong bit layout or zero point is
off by a whole quantization step (about 2% of the largest weight here), far outside it. These tests
skip where the peer is not installed: `pip install 'llmctl[quantize-peers]'`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from llmctl.quantize.backends import run_backend
from llmctl.quantize.calibration import BUILTIN, calibration_ids
from llmctl.quantize.dense import dense_model
from llmctl.quantize.methods import MethodConfig

PROMPT = torch.arange(5, 37)[None]
CHECKED = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


def need(module: str):
    if importlib.util.find_spec(module) is None:
        package = {"awq": "autoawq"}.get(module, module)
        pytest.skip(f"{package} is not installed (pip install 'llmctl[quantize-peers]')")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # see backends.check_backend
    return importlib.import_module(module)


def gptqmodel_load(path):
    need("gptqmodel").GPTQModel  # noqa: B018
    from gptqmodel import GPTQModel

    return GPTQModel.load(str(path), device="cpu", dtype=torch.float32).model


def autoawq_load(path, monkeypatch):
    """AutoAWQ's own loader, on CPU: it insists on IPEX there, so tell it a GPU is present (it then
    builds its GEMM modules, which run its torch reference `dequantize_gemm` while Triton is off)."""
    need("awq")
    import awq.models.base as awq_base
    from awq import AutoAWQForCausalLM
    from awq.modules.linear import gemm

    monkeypatch.setattr(awq_base, "get_best_device", lambda: "cuda:0")
    monkeypatch.setattr(gemm, "TRITON_AVAILABLE", False)
    return AutoAWQForCausalLM.from_quantized(str(path), fuse_layers=False, device_map={"": "cpu"}).model


def assert_same_model(peer, path, weight_dtype: torch.dtype, logits_tolerance: float) -> None:
    ours = dense_model(path)
    eps = torch.finfo(weight_dtype).eps
    for i, layer in enumerate(ours.model.layers):
        for name in CHECKED:
            reference = layer.get_submodule(name).weight  # [out, in]
            qlinear = peer.model.layers[i].get_submodule(name)
            with torch.no_grad():
                theirs = qlinear(torch.eye(reference.shape[1], dtype=weight_dtype)).float().T
            torch.testing.assert_close(theirs, reference, rtol=0, atol=2 * eps * reference.abs().max().item(),
                                       msg=f"layer {i} {name}")
    with torch.no_grad():
        expected = ours(input_ids=PROMPT).logits
        got = peer(input_ids=PROMPT).logits.float()
    torch.testing.assert_close(got, expected, rtol=0, atol=logits_tolerance * expected.abs().max().item())


def assert_runtime_matches(path) -> None:
    from llmctl.runtime.llm import LLM
    from llmctl.runtime.sampling_params import SamplingParams

    prompt = PROMPT[0].tolist()
    ours = LLM(str(path), enforce_eager=True).generate([prompt], SamplingParams(max_tokens=8, temperature=0))
    reference = dense_model(path).generate(PROMPT, max_new_tokens=8, do_sample=False)
    assert ours[0].outputs[0].token_ids == reference[0, PROMPT.shape[1]:].tolist()


@pytest.fixture(scope="module")
def calib(tiny_llama):
    return calibration_ids(BUILTIN, tiny_llama, samples=8, seq_len=32)


def quantize_with_llmctl(tiny_llama, calib, out: Path, cfg: MethodConfig) -> Path:
    from llmctl.quantize.export import write_checkpoint
    from llmctl.quantize.pipeline import quantize_model

    result = quantize_model(tiny_llama, cfg, calib, batch_size=4)
    write_checkpoint(Path(tiny_llama), out, result.tensors, result.dtype, cfg.quantization_config(), {})
    return out


# -- llmctl writes, the peer loads -----------------------------------------------------------------

# GPTQModel refuses every asymmetric GPTQ v1 checkpoint by policy (v1's zero - 1 can underflow;
# llmctl never writes a zero of 0), so only symmetric ones are checked against it.
@pytest.mark.parametrize("cfg", [MethodConfig("gptq", 4, 32, sym=True), MethodConfig("gptq", 4, 32, sym=True, desc_act=True)],
                         ids=["sym", "sym-desc-act"])
def test_llmctl_gptq_loads_in_gptqmodel(tiny_llama, calib, tmp_path, cfg):
    need("gptqmodel")
    path = quantize_with_llmctl(tiny_llama, calib, tmp_path / "q", cfg)
    assert_same_model(gptqmodel_load(path), path, torch.bfloat16, 0.03)


def test_llmctl_awq_loads_in_autoawq(tiny_llama, calib, tmp_path, monkeypatch):
    need("awq")
    path = quantize_with_llmctl(tiny_llama, calib, tmp_path / "q", MethodConfig("awq", 4, 32, sym=False))
    assert_same_model(autoawq_load(path, monkeypatch), path, torch.float16, 0.01)


def test_llmctl_awq_loads_in_gptqmodel(tiny_llama, calib, tmp_path):
    need("gptqmodel")
    path = quantize_with_llmctl(tiny_llama, calib, tmp_path / "q", MethodConfig("awq", 4, 32, sym=False))
    assert_same_model(gptqmodel_load(path), path, torch.bfloat16, 0.03)


# -- the peer writes, llmctl loads -----------------------------------------------------------------

@pytest.mark.slow
def test_gptqmodel_checkpoint_loads_in_llmctl(tiny_llama, calib, tmp_path):
    need("gptqmodel")
    out = tmp_path / "peer"
    run_backend("gptqmodel", Path(tiny_llama), out, MethodConfig("gptq", 4, 32, sym=True), calib, "cpu")
    assert_same_model(gptqmodel_load(out), out, torch.bfloat16, 0.03)
    assert_runtime_matches(out)


@pytest.mark.slow
def test_autoawq_checkpoint_loads_in_llmctl(tiny_llama, calib, tmp_path, monkeypatch):
    need("awq")
    out = tmp_path / "peer"
    run_backend("autoawq", Path(tiny_llama), out, MethodConfig("awq", 4, 32, sym=False), calib, "cpu")
    assert (out / "tokenizer.json").is_file()  # copied by llmctl: AutoAWQ had no tokenizer to save
    assert_same_model(autoawq_load(out, monkeypatch), out, torch.float16, 0.01)
    assert_runtime_matches(out)


def test_llmcompressor_checkpoint_loads_in_llmctl(tiny_llama, calib, tmp_path):
    need("llmcompressor")
    out = tmp_path / "peer"
    run_backend("llmcompressor", Path(tiny_llama), out, MethodConfig("gptq", 4, 32, sym=True), calib, "cpu")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert_runtime_matches(out)


def test_llmcompressor_awq_on_cpu_is_refused_with_the_reason(tiny_llama, calib, tmp_path):
    need("llmcompressor")
    from llmctl.quantize.backends import BackendError

    with pytest.raises(BackendError, match="AWQ needs a GPU"):
        run_backend("llmcompressor", Path(tiny_llama), tmp_path / "x", MethodConfig("awq", 4, 32, sym=False), calib,
                    "cpu")


def test_autoawq_cpu_scale_search_fix():
    # AutoAWQ 0.2.9 backs weights up with `.cpu()`, which on CPU aliases them: its search corrupts
    # the block it searches. The backend's fix must leave the weights exactly as they were.
    need("awq")
    from awq.quantize.quantizer import AwqQuantizer

    from llmctl.quantize.backends import _autoawq_backup_fix

    quantizer = AwqQuantizer.__new__(AwqQuantizer)  # only the search's own settings, no model
    quantizer.w_bit, quantizer.group_size, quantizer.zero_point, quantizer.duo_scaling = 4, 32, True, True
    quantizer.n_parallel_calib_samples, quantizer.max_chunk_memory = None, 1 << 30
    torch.manual_seed(0)
    fc = torch.nn.Linear(64, 32, bias=False).half().requires_grad_(False)  # AutoAWQ runs under no_grad
    x = torch.randn(1, 16, 64).half()
    original = fc.weight.detach().clone()
    args = (x, torch.rand(64).half(), x.abs().mean(dim=(0, 1)), fc, [fc], fc(x).detach())
    quantizer._compute_best_scale(*args)
    assert not torch.equal(fc.weight, original)  # the bug: the search left its own scaling behind
    fc.weight.data = original.clone()
    with _autoawq_backup_fix():
        quantizer._compute_best_scale(*args)
    assert torch.equal(fc.weight, original)
