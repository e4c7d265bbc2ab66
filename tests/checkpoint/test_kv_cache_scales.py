"""`llmctl quantize --kv-cache-dtype fp8` beside llm-compressor's kv_cache_scheme: the same config and
tensors, scales from the same rule on the same calibration windows, and transformers (through
compressed-tensors) loads the scales onto each attention as llmctl wrote them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmctl.checkpoint.loader import read_tensors
from llmctl.quantize.dense import dense_model
from llmctl.quantize.methods import MethodConfig

BF16, FP16 = torch.bfloat16, torch.float16
KV = ("self_attn.k_scale", "self_attn.v_scale")


def calib_ids(samples: int = 8, tokens: int = 32, vocab: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(2, vocab, (samples, tokens), generator=g)


def quantize_with_llmctl(base: str, out: Path, cfg: MethodConfig, ids: torch.Tensor) -> Path:
    from llmctl.quantize.export import write_checkpoint
    from llmctl.quantize.pipeline import quantize_model

    result = quantize_model(base, cfg, ids)
    write_checkpoint(Path(base), out, result.tensors, result.dtype, cfg.quantization_config(tuple(result.ignore)), {})
    return out


def peer_order(ids: torch.Tensor) -> torch.Tensor:
    """The windows in the order llm-compressor calibrates on them: its sampler sorts by length with
    torch.argsort, which leaves ties (equal windows) in no set order; from some tens of windows on, not theirs.
    The moving average weighs late windows most, so the comparisons give llmctl that same order."""
    return ids[torch.argsort(torch.tensor([ids.shape[1]] * len(ids)), descending=True)]


def kv_scales(path: Path) -> dict[str, torch.Tensor]:
    return {name: t for name, t in read_tensors(path) if name.endswith(KV)}


def assert_scales_match(ours: dict, theirs: dict, dtype: torch.dtype) -> None:
    """Layer 0 sees the same input in both, and the same float weights: the same scale to one step of dtype
    (llmctl computes the layer in fp32 on a CPU, llm-compressor in dtype). Later layers read the output of
    quantized layers in llmctl, of float ones in llm-compressor's FP8 calibration: within 3%."""
    assert ours.keys() == theirs.keys()
    for name, scale in ours.items():
        assert scale.dtype == theirs[name].dtype == dtype and scale.shape == theirs[name].shape == (1,), name
        step = torch.finfo(dtype).eps * theirs[name].abs().item()
        tolerance = step if name.startswith("model.layers.0.") else 0.03 * theirs[name].item()
        assert abs(scale.item() - theirs[name].item()) <= tolerance, (name, scale.item(), theirs[name].item())


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_fp8_with_kv_scales_is_llm_compressors_checkpoint(dtype, base_models, tmp_path):
    pytest.importorskip("llmcompressor")
    from llmctl.quantize.backends import run_backend

    cfg, ids = MethodConfig("fp8", kv_cache_dtype="fp8"), calib_ids()
    ours = quantize_with_llmctl(base_models[dtype], tmp_path / "ours", cfg, peer_order(ids))
    theirs = tmp_path / "theirs"
    run_backend("llmcompressor", Path(base_models[dtype]), theirs, cfg, ids, "cpu")
    config = json.loads((ours / "config.json").read_text())["quantization_config"]
    assert config == json.loads((theirs / "config.json").read_text())["quantization_config"]
    mine, peer = dict(read_tensors(ours)), dict(read_tensors(theirs))
    assert mine.keys() == peer.keys()
    for name, tensor in mine.items():
        if not name.endswith(KV):
            assert torch.equal(tensor.view(torch.uint8), peer[name].view(torch.uint8)), name  # bit for bit
    assert_scales_match(kv_scales(ours), kv_scales(theirs), dtype)


def test_reference_model_kv_scales_match_llm_compressors(tmp_path):
    pytest.importorskip("llmcompressor")
    from llmctl.quantize.backends import run_backend
    from llmctl.quantize.calibration import BUILTIN, calibration_ids
    from llmctl.reference import default_model_path

    model = default_model_path()
    cfg, ids = MethodConfig("fp8", kv_cache_dtype="fp8"), calibration_ids(BUILTIN, model, 20, 64)
    ours = quantize_with_llmctl(str(model), tmp_path / "ours", cfg, peer_order(ids))
    run_backend("llmcompressor", model, tmp_path / "theirs", cfg, ids, "cpu")
    assert_scales_match(kv_scales(ours), kv_scales(tmp_path / "theirs"), FP16)


@pytest.mark.parametrize("method", ["fp8", "rtn"])
def test_transformers_loads_the_scales_onto_each_attention(method, base_models, tmp_path, library_model, logits):
    cfg = MethodConfig(method, kv_cache_dtype="fp8", **({"format": "compressed-tensors"} if method == "rtn" else {}))
    path = quantize_with_llmctl(base_models[BF16], tmp_path / "ours", cfg, calib_ids())
    lib = library_model(path)
    for name, scale in kv_scales(path).items():
        assert torch.equal(lib.get_parameter(name), scale), name
    torch.testing.assert_close(logits(dense_model(path)), logits(lib.float()), rtol=0, atol=1e-4)
