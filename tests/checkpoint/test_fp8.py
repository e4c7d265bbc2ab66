"""`quant_method: fp8`: checkpoints made with transformers' own FP8 quantization op, read into exactly the
weights transformers dequantizes (in the model's dtype and in fp32) and the logits of its dense model;
vLLM's per-tensor names; every refusal naming its config field or tensor."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llmctl.checkpoint.formats import format_for, quantization_config, read_quantized
from llmctl.checkpoint.formats.fp8 import FP8
from llmctl.checkpoint.formats.weights import Fp8Weight
from llmctl.checkpoint.loader import iter_weights, read_tensors
from llmctl.quantize.dense import dense_model

F8 = torch.float8_e4m3fn
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def transformers_fp8(base: str, out, block, static: bool = False, scale_fmt: str = "float") -> str:
    """base's linears quantized by transformers' Fp8Quantize, the op its FP8 quantizer runs on every weight
    (quantizing at load needs an FP8 GPU), saved with its FineGrainedFP8Config; static activations get a
    made-up activation_scale, which transformers' op does not compute."""
    from safetensors.torch import save_file
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    activations = "static" if static else "dynamic"
    config = FineGrainedFP8Config(weight_block_size=block, activation_scheme=activations,
                                  modules_to_not_convert=["lm_head"], scale_fmt=scale_fmt)
    op = Fp8Quantize(SimpleNamespace(quantization_config=config))
    tensors = {}
    for name, t in read_tensors(base):
        module = name.removesuffix(".weight")
        if module.rpartition(".")[2] not in LINEARS:
            tensors[name] = t
            continue
        tensors |= op.convert({name: t})  # a shape the block does not divide stays dense, as the op leaves it
        if static and tensors[name].dtype == F8:
            tensors[f"{module}.activation_scale"] = torch.tensor(0.01 * (1 + len(tensors) % 7))
    out = Path(out)
    out.mkdir()
    hf = json.loads((Path(base) / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**hf, "quantization_config": config.to_dict()}))
    save_file(tensors, str(out / "model.safetensors"))
    return str(out)


CASES = {  # name: (block, static activations, scale_fmt, the runtime's FP8 GEMMs take it)
    "block_32x64": ((32, 64), False, "float", False),
    "block_128": ((128, 128), False, "float", True),  # k_proj / v_proj (64 rows) stay dense
    "block_ue8m0": ((32, 64), False, "ue8m0", False),
    "per_tensor_static": (None, True, "float", True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fp8_checkpoint_reads_as_transformers_dequantizes_it(case, base_models, tmp_path, library_model,
                                                             logits):
    block, static, scale_fmt, runs_fp8 = CASES[case]
    dtype = torch.bfloat16
    path = transformers_fp8(base_models[dtype], tmp_path / case, block, static, scale_fmt)
    assert format_for(quantization_config(path)).runs_fp8 == runs_fp8
    lib, lib32 = library_model(path), library_model(path, dtype=torch.float32)
    fp8 = 0
    for name, value in iter_weights(path, dtype, torch.device("cpu")):
        if not isinstance(value, Fp8Weight):
            assert torch.equal(value, lib.get_parameter(name)), name
            continue
        fp8 += 1
        # transformers multiplies in fp32 and rounds to the parameter's dtype: so does the loader.
        assert torch.equal(value.dequantize().to(dtype), lib.get_parameter(name)), name
        assert torch.equal(value.dequantize(), lib32.get_parameter(name)), name
        assert (value.input_scale is not None) == static
    assert fp8 == (2 * (len(LINEARS) - 2) if case == "block_128" else 2 * len(LINEARS))
    torch.testing.assert_close(logits(dense_model(path)), logits(lib32), rtol=0, atol=1e-4)
    torch.testing.assert_close(logits(dense_model(path, dtype).float()), logits(lib.float()), rtol=0,
                               atol=1e-4)


def test_vllm_per_tensor_names_read_the_same():
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(16, 32, generator=g) * 40).to(F8)
    scale, act = torch.tensor(0.002), torch.tensor(0.03)
    config = {"activation_scheme": "static", "quant_method": "fp8"}  # no weight_block_size: [128, 128]
    hf = [("m.weight", weight), ("m.weight_scale_inv", scale), ("m.activation_scale", act)]
    vllm = [("m.input_scale", act), ("m.weight_scale", scale.reshape(1)), ("m.weight", weight)]
    (_, hf), = read_quantized(hf, config)
    (_, vllm), = read_quantized(vllm, config)
    assert torch.equal(hf.dequantize(), weight.float() * scale)
    assert torch.equal(vllm.dequantize(), hf.dequantize())
    assert hf.input_scale == vllm.input_scale == act


def test_ceil_blocks_cover_ragged_edges():
    # DeepSeek's own dequantization (and vLLM's): the last block row / column is partial.
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 72, generator=g).to(F8)
    scale = torch.rand(2, 3, generator=g)
    fmt = FP8({"quant_method": "fp8", "weight_block_size": [32, 32]})
    value = fmt.read("m", {"weight": weight, "weight_scale_inv": scale})
    expected = weight.float() * scale[torch.arange(40) // 32][:, torch.arange(72) // 32]
    assert torch.equal(value.dequantize(), expected)


def test_claims_look_at_the_dtype_of_weight():
    fmt = FP8({"quant_method": "fp8"})
    assert fmt.claims("weight", torch.zeros(2, 2, dtype=F8))
    assert fmt.claims("weight", torch.zeros(2, 2, dtype=torch.int8))  # packed FP4: claimed, to be refused
    assert not fmt.claims("weight", torch.zeros(2, 2, dtype=torch.bfloat16))
    assert fmt.claims("weight_scale_inv", torch.ones(1)) and not fmt.claims("bias", torch.zeros(2))
    assert not fmt.ready({"weight": torch.zeros(2, 2, dtype=F8)})
    static = FP8({"quant_method": "fp8", "activation_scheme": "static"})
    assert not static.ready({"weight": torch.zeros(2, 2, dtype=F8), "weight_scale_inv": torch.ones(1)})


@pytest.mark.parametrize("config,field", [
    ({"activation_scheme": "per_token"}, "activation_scheme"),
    ({"fmt": "e5m2"}, "fmt"),
    ({"scale_fmt": "mx"}, "scale_fmt"),
    ({"modules_to_convert": ["model.embed_tokens"]}, "modules_to_convert"),
    ({"weight_block_size": [128]}, "weight_block_size"),
])
def test_config_refusals_name_the_field(config, field):
    with pytest.raises(ValueError, match=f"fp8 {field}"):
        FP8({"quant_method": "fp8", **config})


def test_read_refusals_name_the_module_and_tensor():
    weight, block_scale = torch.zeros(64, 64, dtype=F8), torch.ones(1, 1)
    fmt = FP8({"quant_method": "fp8", "ignored_layers": ["model.layers.0.mlp"]})
    with pytest.raises(ValueError, match="modules_to_not_convert lists it"):
        fmt.read("model.layers.0.mlp.down_proj", {"weight": weight, "weight_scale_inv": block_scale})
    with pytest.raises(ValueError, match=r"m\.weight is torch\.int8"):
        fmt.read("m", {"weight": torch.zeros(64, 32, dtype=torch.int8), "weight_scale_inv": block_scale})
    with pytest.raises(ValueError, match=r"m\.weight_scale_inv has shape \[2, 2\]"):
        fmt.read("m", {"weight": weight, "weight_scale_inv": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="also stores input_scale"):
        fmt.read("m", {"weight": weight, "weight_scale_inv": block_scale, "input_scale": torch.ones(1)})
    with pytest.raises(ValueError, match="also stores weight_scale"):
        fmt.read("m", {"weight": weight, "weight_scale_inv": block_scale, "weight_scale": block_scale})
    with pytest.raises(ValueError, match="incomplete"):
        fmt.read("m", {"weight_scale_inv": block_scale})
    with pytest.raises(ValueError, match="uint8"):
        fmt.read("m", {"weight": weight, "weight_scale_inv": torch.ones(1, 1, dtype=torch.uint8)})
