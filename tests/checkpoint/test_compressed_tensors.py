"""compressed-tensors: checkpoints llm-compressor writes, read into exactly the weights the library
decompresses and the logits of its own dense model; the older act-order layout (weight_g_idx) against a
transcription of the library's dequantization of the time; llmctl's writer against the library's compressor
and loaded back by the library; every refusal naming its config field."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from llmctl.checkpoint.formats import Neutral, format_for, quantization_config, read_quantized
from llmctl.checkpoint.formats.compressed_tensors import (
    CompressedTensors,
    compressed_tensors_config,
    compressed_tensors_tensors,
)
from llmctl.checkpoint.formats.weights import QuantizedWeight
from llmctl.checkpoint.loader import iter_weights, read_tensors
from llmctl.quantize.dense import dense_model
from llmctl.quantize.grid import rtn

BF16, FP16 = torch.bfloat16, torch.float16
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Case(NamedTuple):
    dtype: torch.dtype
    groups: dict  # config_groups, each targeting "Linear" unless it says otherwise
    runs: str | None = None  # "int4" or "fp8": the runtime kernels that take every linear
    modifier: str = "rtn"  # or "gptq"
    calibrate: bool = False
    fmt: str | None = None  # forced at save; else the one llm-compressor infers
    static_inputs: bool = False


def int_args(bits, sym, strategy, group_size=None, **kw) -> dict:
    return {"weights": dict(num_bits=bits, type="int", symmetric=sym, strategy=strategy,
                            group_size=group_size, **kw)}


def fp8_args(strategy, inputs=None, **kw) -> dict:
    return {"weights": dict(num_bits=8, type="float", strategy=strategy, **kw), "input_activations": inputs}


def fp8_dynamic(strategy, **kw) -> dict:
    return dict(num_bits=8, type="float", strategy=strategy, dynamic=True, **kw)


FP8_STATIC = dict(num_bits=8, type="float", strategy="tensor")
CASES = {
    "w4a16_group_sym": Case(BF16, {"g": int_args(4, True, "group", 32)}, "int4"),
    "w4a16_group_asym": Case(FP16, {"g": int_args(4, False, "group", 64)}, "int4"),
    "w4a16_channel_asym": Case(FP16, {"g": int_args(4, False, "channel")}, "int4"),
    "w8a16_channel_sym": Case(BF16, {"g": int_args(8, True, "channel")}),
    "w8a16_group_asym": Case(BF16, {"g": int_args(8, False, "group", 32)}),
    "w8a16_naive_asym": Case(FP16, {"g": int_args(8, False, "group", 32)}, fmt="naive-quantized"),
    "w4a16_naive_sym": Case(BF16, {"g": int_args(4, True, "channel")}, "int4", fmt="naive-quantized"),
    "gptq_w4a16_group": Case(FP16, {"g": int_args(4, True, "group", 32, actorder="weight")}, "int4",
                             modifier="gptq", calibrate=True),
    "fp8_channel_dynamic": Case(BF16, {"g": fp8_args("channel", fp8_dynamic("token"))}, "fp8"),
    "fp8_tensor_static": Case(FP16, {"g": fp8_args("tensor", FP8_STATIC)}, "fp8", calibrate=True,
                              static_inputs=True),
    "fp8_block": Case(BF16, {"g": fp8_args("block", fp8_dynamic("group", group_size=64),
                                           block_structure=[32, 64])}),
    "fp8_block_128": Case(FP16, {"g": fp8_args("block", fp8_dynamic("group", group_size=128),
                                               block_structure=[128, 128])}, "fp8"),  # k, v: a partial block
    "mixed_int4_attn_fp8_mlp": Case(BF16, {"attn": {"targets": ["re:.*self_attn.*"],
                                                    **int_args(4, True, "group", 32)},
                                           "mlp": {"targets": ["re:.*mlp.*"], **fp8_args("channel")}}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_llm_compressor_checkpoint_reads_as_the_library_decompresses_it(name, base_models, tmp_path,
                                                                        llm_compress, library_model, logits):
    case = CASES[name]
    path = llm_compress(base_models[case.dtype], tmp_path / name, case.modifier, case.groups, case.calibrate,
                        case.fmt)
    fmt = format_for(quantization_config(path))
    assert (fmt.runs_int4, fmt.runs_fp8) == (case.runs == "int4", case.runs == "fp8")
    lib = library_model(path)
    read = inputs = 0
    for name, value in iter_weights(path, case.dtype, torch.device("cpu")):
        ref = lib.get_parameter(name)
        if not isinstance(value, Neutral):
            assert torch.equal(value, ref), name
            continue
        read += 1
        # compressed-tensors computes W in the scale's dtype (the model's): the exact product, rounded once.
        assert torch.equal(value.dequantize().to(case.dtype), ref), name
        if isinstance(value, QuantizedWeight):  # its `rounding` makes the fp32 value the library's already
            assert value.rounding == case.dtype and torch.equal(value.dequantize(), ref.float()), name
        elif value.input_scale is not None:
            inputs += 1
            stored = lib.get_parameter(name.removesuffix("weight") + "input_scale")
            assert torch.equal(value.input_scale, stored.float().reshape(())), name
    assert read == 2 * len(LINEARS) and inputs == (read if case.static_inputs else 0)
    ours = dense_model(path, case.dtype).float()
    torch.testing.assert_close(logits(ours), logits(lib.float()), rtol=0, atol=1e-4)


# -- the older act-order layout: weight_g_idx ---------------------------------------------------------

def old_pack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """compressed-tensors' numpy-era pack_to_int32, transcribed: `packed |= value[:, i::pf] << bits * i`."""
    pf = 32 // bits
    value = codes.long() if dim == 1 else codes.long().T
    packed = torch.zeros(value.shape[0], value.shape[1] // pf, dtype=torch.int64)
    for i in range(pf):
        packed |= value[:, i::pf] << (bits * i)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).int()
    return packed if dim == 1 else packed.T.contiguous()


def old_dequantize(x_q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                   g_idx: torch.Tensor) -> torch.Tensor:
    """The group branch of compressed-tensors' `_process_quantization` when actorder "group" existed: columns
    sorted by group, each group's run dequantized with its scale in the scale's dtype, then put back."""
    group_indices, group_sizes = torch.unique(g_idx, return_counts=True)
    group_sizes = group_sizes[torch.argsort(group_indices)]
    perm = torch.argsort(g_idx)
    x = x_q[:, perm]
    output = torch.zeros(x.shape, dtype=scale.dtype)
    end = 0
    for index, count in enumerate(group_sizes.tolist()):
        start, end = end, end + count
        value = x[:, start:end].to(scale.dtype)
        if zero_point is not None:
            value = value - zero_point[:, index].view(-1, 1).to(scale.dtype)
        output[:, start:end] = value * scale[:, index].view(-1, 1)
    return output[:, torch.argsort(perm)]


def old_config(sym: bool) -> dict:
    """A config as llm-compressor 0.3 saved GPTQ with actorder "group" (status "frozen" then)."""
    weights = {"num_bits": 4, "type": "int", "symmetric": sym, "group_size": 32, "strategy": "group",
               "block_structure": None, "dynamic": False, "actorder": "group", "observer": "minmax",
               "observer_kwargs": {}}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "frozen",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": None, "output_activations": None}},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": 1.2,
            "sparsity_config": {}, "version": "0.8.1"}


def old_act_order_tensors(w: torch.Tensor, sym: bool, seed: int):
    """w: [out, in] quantized by hand with act-order groups of 32: the old checkpoint tensors and the
    reference dense weight."""
    g = torch.Generator().manual_seed(seed)
    out, inp = w.shape
    g_idx = (torch.arange(inp) // 32)[torch.randperm(inp, generator=g)].int()
    groups = inp // 32
    w32, cols = w.float(), [g_idx == k for k in range(groups)]
    lo = torch.stack([w32[:, c].min(1).values for c in cols], 1).clamp(max=0)
    hi = torch.stack([w32[:, c].max(1).values for c in cols], 1).clamp(min=0)
    if sym:
        hi = torch.maximum(hi, -lo)
        scale, zp = (hi / 7.5).to(w.dtype), None
    else:
        scale = ((hi - lo) / 15).to(w.dtype)
        zp = (-8 - torch.round(lo / scale.float())).clamp(-8, 7).to(torch.int8)
    x = w32 / scale.float()[:, g_idx.long()] + (0 if zp is None else zp.float()[:, g_idx.long()])
    x_q = torch.round(x).clamp(-8, 7).to(torch.int8)
    tensors = {"weight_packed": old_pack(x_q.long() + 8, 4, dim=1), "weight_scale": scale,
               "weight_shape": torch.tensor([out, inp]), "weight_g_idx": g_idx}
    if zp is not None:
        tensors["weight_zero_point"] = old_pack(zp.long() + 8, 4, dim=0)
    return tensors, old_dequantize(x_q, scale, zp, g_idx)


@pytest.mark.parametrize("sym", [True, False])
def test_old_act_order_checkpoint_reads_as_the_library_then_dequantized(sym):
    w = (torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) * 0.08).half()
    tensors, ref = old_act_order_tensors(w, sym, seed=4)
    (name, value), = read_quantized(((f"layer.{k}", t) for k, t in tensors.items()), old_config(sym))
    assert name == "layer.weight" and not value.in_order and value.rounding == torch.float16
    assert torch.equal(value.dequantize(), ref.float())


def test_old_act_order_model_logits(base_models, tmp_path, logits):
    base = base_models[FP16]
    tensors, refs = {}, {}
    for i, (name, t) in enumerate(read_tensors(base)):
        module = name.removesuffix(".weight")
        if module.rpartition(".")[2] in LINEARS:
            sym = module.endswith(("q_proj", "o_proj", "gate_proj", "down_proj"))
            parts, refs[name] = old_act_order_tensors(t, sym, seed=i)
            tensors |= {f"{module}.{k}": v for k, v in parts.items()}
        else:
            tensors[name] = t
    path = write_checkpoint(base, tmp_path / "old", tensors, old_config_by_symmetry(tensors))
    model = dense_model(base)
    model.load_state_dict({n: r.float() for n, r in refs.items()}, strict=False)
    torch.testing.assert_close(logits(dense_model(path)), logits(model), rtol=0, atol=1e-4)


def old_config_by_symmetry(tensors: dict) -> dict:
    """Two groups, the symmetric modules and the asymmetric ones, each naming its modules."""
    config = old_config(sym=True)
    sym = config["config_groups"]["group_0"]
    asym = copy.deepcopy(sym)
    asym["weights"]["symmetric"] = False
    modules = [n.removesuffix(".weight_packed") for n in tensors if n.endswith(".weight_packed")]
    sym["targets"] = [m for m in modules if f"{m}.weight_zero_point" not in tensors]
    asym["targets"] = [m for m in modules if f"{m}.weight_zero_point" in tensors]
    config["config_groups"]["group_1"] = asym
    return config


def test_unset_g_idx_means_channel_order():
    w = (torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * 0.1).half()
    tensors, _ = old_act_order_tensors(w, sym=True, seed=0)
    tensors["weight_g_idx"] = torch.full((64,), -1, dtype=torch.int32)  # compressed-tensors' "not set"
    value = CompressedTensors(old_config(True)).read("layer", tensors)
    assert value.in_order


# -- writing ----------------------------------------------------------------------------------------

def write_checkpoint(base: str, out, tensors: dict, quant_config: dict) -> str:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir()
    config = json.loads((Path(base) / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": quant_config}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    return str(out)


def fitted(bits: int, group_size: int, sym: bool, seed: int = 0, shape=(64, 128)) -> QuantizedWeight:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.08
    return rtn(w, bits, group_size, sym)  # fp16 scales, zeros in [0, 2^bits - 1]


GRIDS = [(4, 32, True), (4, 64, False), (8, -1, True), (8, 32, False), (4, -1, False)]


@pytest.mark.parametrize("bits,group_size,sym", GRIDS)
def test_writer_matches_the_library_compressor(bits, group_size, sym):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    w = fitted(bits, group_size, sym, shape=(60, 128))  # 60 rows: zero points padded to whole words
    ours = compressed_tensors_tensors(w, sym, torch.float16)
    scheme = QuantizationScheme.model_validate(group(compressed_tensors_config(bits, group_size, sym)))
    state = {"weight": w.dequantize(), "weight_scale": w.scales.half(),
             "weight_zero_point": (w.zeros - 2 ** (bits - 1)).to(torch.int8)}
    theirs = PackedQuantizationCompressor.compress(state, scheme)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("bits,group_size,sym", GRIDS)
def test_writer_round_trip(bits, group_size, sym):
    w = fitted(bits, group_size, sym)
    tensors = compressed_tensors_tensors(w, sym, torch.float16)
    back = CompressedTensors(compressed_tensors_config(bits, group_size, sym)).read("m", tensors)
    assert torch.equal(back.qweight, w.qweight) and torch.equal(back.zeros, w.zeros)
    assert torch.equal(back.scales, w.scales) and torch.equal(back.g_idx, w.g_idx)
    assert torch.equal(back.dequantize(), dataclasses.replace(w, rounding=torch.float16).dequantize())


@pytest.mark.parametrize("bits,group_size,sym", GRIDS[:3])
def test_written_model_loads_in_the_library_as_llmctl_reads_it(bits, group_size, sym, base_models, tmp_path,
                                                                library_model, logits):
    base = base_models[FP16]
    tensors = {}
    for name, t in read_tensors(base):
        module = name.removesuffix(".weight")
        if module.rpartition(".")[2] in LINEARS:
            w = rtn(t.float(), bits, group_size, sym)
            parts = compressed_tensors_tensors(w, sym, torch.float16)
            tensors |= {f"{module}.{k}": v for k, v in parts.items()}
        else:
            tensors[name] = t
    config = compressed_tensors_config(bits, group_size, sym)
    path = write_checkpoint(base, tmp_path / "ours", tensors, config)
    lib = library_model(path)
    for name, value in iter_weights(path, FP16, torch.device("cpu")):
        if isinstance(value, QuantizedWeight):
            assert torch.equal(value.dequantize(), lib.get_parameter(name).float()), name
    torch.testing.assert_close(logits(dense_model(path)), logits(lib.float()), rtol=0, atol=1e-4)


def test_writer_refusals():
    shuffled = dataclasses.replace(fitted(4, 32, True), g_idx=torch.randperm(128).int() // 32)
    with pytest.raises(ValueError, match="act-order"):
        compressed_tensors_tensors(shuffled, True, torch.float16)
    with pytest.raises(ValueError, match="symmetric"):
        compressed_tensors_tensors(fitted(4, 32, False), True, torch.float16)
    wide = fitted(4, 32, False)
    with pytest.raises(ValueError, match="zero points"):
        compressed_tensors_tensors(dataclasses.replace(wide, zeros=wide.zeros + 16), False, torch.float16)
    with pytest.raises(ValueError, match="bfloat16"):
        compressed_tensors_tensors(fitted(4, 32, True), True, torch.bfloat16)  # fp16 scales bf16 cannot hold
    with pytest.raises(ValueError, match="4- or 8-bit"):
        compressed_tensors_tensors(fitted(2, 32, True), True, torch.float16)
    with pytest.raises(ValueError, match="4- or 8-bit"):
        compressed_tensors_config(3, 128, True)


def test_written_config_is_the_librarys():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig

    config = compressed_tensors_config(4, 128, False)
    dumped = QuantizationConfig.model_validate(config).model_dump(exclude=["quant_method"])
    assert {k: v for k, v in config.items() if k in dumped} == dumped
    assert config["ignore"] == ["lm_head"] and config["quantization_status"] == "compressed"


# -- refusals ---------------------------------------------------------------------------------------

def base_config() -> dict:
    return compressed_tensors_config(4, 32, True)


def group(config: dict) -> dict:
    return config["config_groups"]["group_0"]


def fp8_config() -> dict:
    config = base_config()
    group(config)["weights"] |= {"type": "float", "num_bits": 8, "strategy": "channel", "group_size": None}
    group(config)["format"] = config["format"] = "float-quantized"
    return config


def edited(config: dict, changes: dict) -> dict:
    for path, value in changes.items():
        *keys, last = path.split(".")
        node = config
        for key in keys:
            node = node[key]
        node[last] = value
    return config


G, W = "config_groups.group_0", "config_groups.group_0.weights"
REFUSED = {  # name: (changes to a W4A16 config, or an FP8 one for fp8_*, and the field the error names)
    "status": ({"quantization_status": "initialized"}, "quantization_status"),
    "sparse": ({"sparsity_config": {"format": "sparse-24-bitmask"}}, "sparsity_config.format"),
    "transform": ({"transform_config": {"config_groups": {"u": {"type": "hadamard"}}}}, "transform_config"),
    "kv_cache_int": ({"kv_cache_scheme": {"num_bits": 8, "type": "int", "strategy": "tensor"}},
                     "kv_cache_scheme.type"),
    "kv_cache_heads": ({"kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "attn_head"}},
                       "kv_cache_scheme.strategy"),
    "kv_cache_field": ({"kv_cache_scheme": {"num_bits": 8, "type": "float", "heads": 2}},
                       "kv_cache_scheme has unknown field(s) heads"),
    "nvfp4": ({"format": "nvfp4-pack-quantized", f"{G}.format": None}, "format 'nvfp4-pack-quantized'"),
    "mxfp4": ({f"{G}.format": "mxfp4-pack-quantized"}, f"{G}.format"),
    "dense": ({"format": "dense", f"{G}.format": None}, "format 'dense'"),
    "bits": ({f"{W}.num_bits": 2}, f"{W}.num_bits"),
    "w8a8": ({f"{G}.input_activations": fp8_dynamic("token") | {"type": "int"}}, f"{G}.input_activations"),
    "w4afp8": ({f"{G}.input_activations": fp8_dynamic("token")}, f"{G}.input_activations"),
    "outputs": ({f"{G}.output_activations": fp8_dynamic("token")}, f"{G}.output_activations"),
    "int_block": ({f"{W}.strategy": "block"}, f"{W}.strategy"),
    "dynamic_weights": ({f"{W}.dynamic": True}, f"{W}.dynamic"),
    "unknown_field": ({f"{W}.hadamard": True}, f"{W} has unknown field(s) hadamard"),
    "type": ({f"{W}.type": "mx"}, f"{W}.type"),
    "preset": ({"config_groups": {"W4A16": ["Linear"]}}, "config_groups.W4A16"),
    "no_groups": ({"config_groups": {}}, "config_groups"),
    "actorder_channel": ({f"{W}.actorder": "group", f"{W}.strategy": "channel"}, f"{W}.actorder"),
    "bad_regex": ({"ignore": ["re:(("]}, "ignore"),
    "float_packed": ({f"{W}.type": "float", f"{W}.num_bits": 8}, "format 'pack-quantized'"),
    "fp8_fp4": ({f"{W}.num_bits": 4}, f"{W}.num_bits"),
    "fp8_asym": ({f"{W}.symmetric": False}, f"{W}.symmetric"),
    "fp8_group": ({f"{W}.strategy": "group", f"{W}.group_size": 32}, f"{W}.strategy"),
    "fp8_int_inputs": ({f"{G}.input_activations": fp8_dynamic("token") | {"type": "int"}},
                       f"{G}.input_activations"),
    "fp8_static_token": ({f"{G}.input_activations": dict(num_bits=8, type="float", strategy="token")},
                         f"{G}.input_activations.strategy"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_name_the_config_field(case):
    changes, field = REFUSED[case]
    config = fp8_config() if case.startswith("fp8_") else base_config()
    with pytest.raises(ValueError, match=re.escape(field)):
        CompressedTensors(edited(config, changes))


def packed_parts(sym: bool = True) -> dict:
    return compressed_tensors_tensors(fitted(4, 32, sym), sym, torch.float16)


def test_read_refusals_name_the_module_and_tensor():
    fmt = CompressedTensors(base_config())
    with pytest.raises(ValueError, match="lm_head.*`ignore`"):
        fmt.read("lm_head", packed_parts())
    with pytest.raises(ValueError, match="weight_zero_point"):
        fmt.read("m", packed_parts(sym=False))
    with pytest.raises(ValueError, match="incomplete"):
        fmt.read("m", {k: v for k, v in packed_parts().items() if k != "weight_shape"})
    with pytest.raises(ValueError, match=r"m\.weight_scale has shape"):
        fmt.read("m", packed_parts() | {"weight_scale": torch.ones(64, 3, dtype=torch.float16)})
    fp8 = {"weight": torch.zeros(8, 8, dtype=torch.float8_e4m3fn), "weight_scale": torch.ones(8, 1)}
    assert fmt.ready(fp8)  # an FP8 weight in an int-only checkpoint is read at once, and refused
    with pytest.raises(ValueError, match="stores weight, which its config group"):
        fmt.read("m", fp8)


def test_claims_look_at_the_dtype_of_weight():
    fmt = CompressedTensors(fp8_config())
    assert not fmt.claims("weight", torch.zeros(2, 2, dtype=torch.bfloat16))
    assert fmt.claims("weight", torch.zeros(2, 2, dtype=torch.float8_e4m3fn))
    assert fmt.claims("weight", torch.zeros(2, 2, dtype=torch.int8))
    assert fmt.claims("weight_scale", torch.zeros(2, 1)) and not fmt.claims("bias", torch.zeros(2))


def test_targets_pick_the_most_specific_scheme():
    config = base_config()
    config["config_groups"]["late"] = copy.deepcopy(group(config)) | {"targets": ["re:.*mlp.*"]}
    config["config_groups"]["exact"] = copy.deepcopy(group(config))
    config["config_groups"]["exact"]["targets"] = ["model.layers.0.mlp.up_proj"]
    config["ignore"] = ["lm_head", "re:.*layers\\.1\\.mlp\\.down_proj"]
    fmt = CompressedTensors(config)
    assert fmt.scheme_for("model.layers.0.mlp.up_proj").group == "exact"
    assert fmt.scheme_for("model.layers.0.mlp.down_proj").group == "late"
    assert fmt.scheme_for("model.layers.0.self_attn.q_proj").group == "group_0"
    assert fmt.scheme_for("model.layers.1.mlp.down_proj") is None and fmt.scheme_for("lm_head") is None
