"""`llmctl quantize --method fp8` against llm-compressor's FP8_DYNAMIC: the scales and codes are compressed-
tensors' own arithmetic, the checkpoint equals the one llm-compressor writes tensor by tensor and in its
config, transformers (through compressed-tensors) loads it as llmctl's loader reads it, and the runtime
serves it token for token as transformers runs it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from llmctl.checkpoint.formats import format_for
from llmctl.checkpoint.formats.compressed_tensors import float_quantized_tensors, fp8_dynamic_config
from llmctl.checkpoint.formats.weights import Fp8Weight
from llmctl.checkpoint.loader import iter_weights, read_tensors
from llmctl.quantize.dense import dense_model
from llmctl.quantize.fp8 import fp8_channel
from llmctl.quantize.methods import MethodConfig

BF16, FP16 = torch.bfloat16, torch.float16
F8 = torch.float8_e4m3fn


def awkward_rows(dtype: torch.dtype) -> torch.Tensor:
    """Rows the scale rule has to get right: ordinary, all zero (a scale of 0 is replaced), one outlier,
    magnitudes near the dtype's smallest normals (the scale itself rounds coarsely), a -0.0 (trained
    checkpoints have them; the library's code for it is +0)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 96, generator=g) * 0.05
    w[1] = 0
    w[2, 7] = 30.0
    w[3] *= 1e-3
    w[4, 5] = -0.0
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_scales_and_codes_are_compressed_tensors_arithmetic(dtype):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import FloatQuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    w = awkward_rows(dtype)
    scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    # llm-compressor's memoryless min-max observer: each row's min and max, as they are.
    scale, zero = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), scheme.weights)
    state = {"weight": w, "weight_scale": scale, "weight_zero_point": zero}  # as the module holds them
    theirs = FloatQuantizationCompressor.compress(state, scheme)
    ours = float_quantized_tensors(fp8_channel(w, dtype), dtype)
    assert ours.keys() == theirs.keys() == {"weight", "weight_scale"}
    assert ours["weight_scale"].dtype == dtype and torch.equal(ours["weight_scale"], theirs["weight_scale"])
    assert ours["weight"].dtype == F8 and torch.equal(ours["weight"].view(torch.uint8),
                                                      theirs["weight"].view(torch.uint8))


def test_the_dequantized_weight_is_the_librarys():
    # W = code * scale in the scale's dtype: Fp8Weight's rounding says so, and the loader reads the same.
    w = awkward_rows(BF16)
    fp8 = fp8_channel(w, BF16)
    assert fp8.rounding == BF16 and fp8.scale.shape == (8, 1) and fp8.dequantize()[1].abs().max() == 0
    assert torch.equal(fp8.dequantize(), (fp8.weight.to(BF16) * fp8.scale.to(BF16)).float())
    read = format_for(fp8_dynamic_config()).read("m", float_quantized_tensors(fp8, BF16))
    assert torch.equal(read.dequantize(), fp8.dequantize())
    relative = (fp8.dequantize() - w.float()).norm() / w.float().norm()
    assert relative < 0.05  # e4m3 keeps 3 mantissa bits: a few percent per weight at most


def test_writer_refusals():
    fp8 = fp8_channel(awkward_rows(BF16), BF16)
    with pytest.raises(ValueError, match=r"one scale per output channel \(\[8, 1\]\), got \[1, 1\]"):
        float_quantized_tensors(dataclasses.replace(fp8, scale=torch.ones(1, 1)), BF16)
    with pytest.raises(ValueError, match="per .32, 32. block"):
        float_quantized_tensors(dataclasses.replace(fp8, block=(32, 32)), BF16)
    with pytest.raises(ValueError, match="no input_scale"):
        float_quantized_tensors(dataclasses.replace(fp8, input_scale=torch.tensor(0.1)), BF16)
    with pytest.raises(ValueError, match="float8_e4m3fn, got torch.int8"):
        float_quantized_tensors(dataclasses.replace(fp8, weight=fp8.weight.view(torch.int8)), BF16)
    with pytest.raises(ValueError, match="not torch.float16 values"):
        float_quantized_tensors(fp8, FP16)  # bf16 scales fp16 cannot hold exactly
    with pytest.raises(ValueError, match="float dtype, got torch.int8"):
        fp8_channel(torch.zeros(2, 2), torch.int8)


def test_written_config_is_the_librarys_and_llmctl_serves_it():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig

    config = fp8_dynamic_config()
    dumped = QuantizationConfig.model_validate(config).model_dump(exclude=["quant_method"])
    assert {k: v for k, v in config.items() if k in dumped} == dumped
    assert format_for(config).runs_fp8  # the runtime's FP8 GEMMs take every projection on Hopper


def quantize_with_llmctl(base: str, out: Path) -> Path:
    from llmctl.quantize.export import write_checkpoint
    from llmctl.quantize.pipeline import quantize_model

    cfg = MethodConfig("fp8")
    result = quantize_model(base, cfg, None)  # no calibration data: FP8 needs none
    write_checkpoint(Path(base), out, result.tensors, result.dtype, cfg.quantization_config(tuple(result.ignore)),
                     {})
    return out


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_checkpoint_equals_llm_compressors_fp8_dynamic(dtype, base_models, tmp_path):
    pytest.importorskip("llmcompressor")
    from llmctl.quantize.backends import run_backend

    ours = quantize_with_llmctl(base_models[dtype], tmp_path / "ours")
    theirs = tmp_path / "theirs"
    run_backend("llmcompressor", Path(base_models[dtype]), theirs, MethodConfig("fp8"), None, "cpu")
    mine, peer = dict(read_tensors(ours)), dict(read_tensors(theirs))
    assert mine.keys() == peer.keys() and sum(t.dtype == F8 for t in mine.values()) == 14
    for name, tensor in mine.items():
        assert tensor.dtype == peer[name].dtype and tensor.shape == peer[name].shape, name
        assert torch.equal(tensor.view(torch.uint8), peer[name].view(torch.uint8)), name  # bit for bit
    config = json.loads((ours / "config.json").read_text())["quantization_config"]
    assert config == json.loads((theirs / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_checkpoint_loads_in_transformers_as_llmctl_reads_and_serves_it(dtype, base_models, tmp_path,
                                                                        library_model, logits):
    from llmctl.runtime import LLM, SamplingParams

    path = quantize_with_llmctl(base_models[dtype], tmp_path / "ours")
    lib = library_model(path)  # compressed-tensors decompresses in the scale's dtype, the model's
    read = 0
    for name, value in iter_weights(path, dtype, torch.device("cpu")):
        ref = lib.get_parameter(name)
        if isinstance(value, Fp8Weight):
            read += 1
            assert torch.equal(value.dequantize(), ref.float()), name
        else:
            assert torch.equal(value, ref), name
    assert read == 14
    lib = lib.float()
    torch.testing.assert_close(logits(dense_model(path)), logits(lib), rtol=0, atol=1e-4)
    prompt = list(range(5, 29))
    served = LLM(str(path), dtype="float32", device="cpu", enforce_eager=True).generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    expected = lib.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert served[0].outputs[0].token_ids == expected[0, len(prompt):].tolist()
