"""compressed-tensors: llm-compressor's checkpoints (`quant_method: compressed-tensors`), read bit for bit,
and its pack-quantized integer layout written.

The config's `config_groups` give each group a scheme: `targets` (the class "Linear", exact module names,
"re:" regexes), `weights` (num_bits, type int / float, symmetric, strategy tensor / channel / group / block,
group_size, block_structure, actorder), `input_activations`, `output_activations` and a `format`; the
top-level `format` stands for groups that name none. A linear takes the scheme of its most specific
target (an exact name, then a regex, then the class), unless `ignore` names it. One linear `x` stores:

    pack-quantized      x.weight_packed [out, ceil(in/pf)] int32    signed codes + 2^(bits-1), pf = 32/bits
                                                                     to a word along `in`, the first in the
                                                                     low bits
                        x.weight_shape [2] int64                    [out, in]
                        x.weight_zero_point                         asymmetric group / channel strategies:
                          [ceil(out/pf), groups] int32              signed zero points + 2^(bits-1), packed
                                                                     along `out`
                        x.weight_g_idx [in] int32                   older checkpoints, actorder "group": the
                                                                     group of each input channel
    naive-quantized,    x.weight [out, in] int8                     signed codes
    int-quantized       x.weight_zero_point                         asymmetric: int8, shaped as the scale
    float-quantized     x.weight [out, in] float8_e4m3fn
                        x.input_scale [1]                           static FP8 activations
    every format        x.weight_scale                              the model's dtype: [out, groups] (group),
                                                                     [out, 1] (channel), [1] (tensor),
                                                                     [ceil(out/b0), ceil(in/b1)] (block)

W = scale * (code - zero), computed by compressed-tensors in the scale's dtype: integer weights carry that
dtype as their `rounding`. llmctl serves weight-only integers and FP8; everything else is refused with the
config field that asks for it. llmctl writes pack-quantized integers and FP8-dynamic float-quantized weights,
optionally with llm-compressor's calibrated FP8 KV cache (`kv_cache_scheme`; each attention stores
`self_attn.k_scale` and `self_attn.v_scale`, [1] in the model's dtype).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from llmctl.checkpoint.formats.packing import pack_int32, unpack_int32
from llmctl.checkpoint.formats.weights import PROJECTIONS, Fp8Weight, QuantizedWeight

PACKED = "pack-quantized"
FLOAT_QUANTIZED = "float-quantized"
UNPACKED = ("naive-quantized", "int-quantized", FLOAT_QUANTIZED)  # `weight` kept whole, int8 or float8
STATUSES = ("compressed", "frozen")  # earlier llm-compressor releases saved compressed models as "frozen"
INT_BITS = (4, 8)
FLOAT8 = torch.float8_e4m3fn
FP8_BLOCK = (128, 128)  # the block the runtime's FP8 GEMMs take
# The fields compressed-tensors' QuantizationScheme and QuantizationArgs accept (both forbid others).
SCHEME_FIELDS = frozenset({"targets", "weights", "input_activations", "output_activations", "format"})
ARG_FIELDS = frozenset({"num_bits", "type", "symmetric", "group_size", "strategy", "block_structure",
                        "dynamic", "actorder", "scale_dtype", "zp_dtype", "observer", "observer_kwargs"})
PARTS = frozenset({"weight", "weight_packed", "weight_shape", "weight_scale", "weight_zero_point",
                   "weight_g_idx", "input_scale"})
FORMAT_VERSION = "0.19.0"  # the compressed-tensors release whose layout `compressed_tensors_tensors` writes


@dataclass(frozen=True)
class Scheme:
    """One config group's weights, as far as reading their tensors goes."""

    group: str  # its key in config_groups
    format: str
    type: str  # "int" or "float"
    bits: int
    symmetric: bool
    strategy: str  # tensor, channel, group or block
    group_size: int | None
    block: tuple[int, int] | None
    act_order: bool  # actorder "group": groups follow weight_g_idx
    static_input: bool  # FP8 activations with a stored input_scale

    @property
    def storage(self) -> str:
        return "packed" if self.format == PACKED else self.type

    @property
    def parts(self) -> frozenset[str]:
        """What each linear stores."""
        parts = {"weight_packed", "weight_shape"} if self.format == PACKED else {"weight"}
        parts.add("weight_scale")
        if not self.symmetric:
            parts.add("weight_zero_point")
        if self.static_input:
            parts.add("input_scale")
        return frozenset(parts)

    @property
    def may_store(self) -> frozenset[str]:
        """parts, and a g_idx, which older writers left out where it was unset."""
        return self.parts | ({"weight_g_idx"} if self.act_order else set())


class CompressedTensors:
    def __init__(self, quant_config: dict) -> None:
        check_config(quant_config)
        groups = quant_config.get("config_groups") or {}
        if not groups and not quant_config.get("kv_cache_scheme"):  # (a KV-cache-only checkpoint has none)
            raise ValueError("compressed-tensors config_groups is empty: no scheme says how weights are "
                             "stored")
        top_format = quant_config.get("format")
        self.schemes = [parse_scheme(name, group, top_format) for name, group in groups.items()]
        # A target named by several groups takes the last one's scheme, as compressed-tensors maps them.
        self.by_target = {target: scheme for scheme, group in zip(self.schemes, groups.values())
                          for target in group["targets"]}
        self.ignore = list(quant_config.get("ignore") or [])
        for entry in [*self.by_target, *self.ignore]:
            if entry.startswith("re:"):
                try:
                    re.compile(entry[3:])
                except re.error as e:
                    raise ValueError(f"compressed-tensors targets / ignore entry {entry!r}: {e}") from None
        every = bool(self.schemes) and not any(_name_matches(p, entry) for p in PROJECTIONS for entry in self.ignore)
        self.runs_int4 = every and all(s.type == "int" and s.bits == 4 and s.strategy in ("group", "channel")
                                       for s in self.schemes)
        self.runs_fp8 = every and all(s.type == "float" and s.block in (None, FP8_BLOCK) for s in self.schemes)
        # What a linear waits for before it is read, per storage: a union over the schemes, since a tensor
        # does not say which group its module is in. One still waiting at the end (no g_idx) is read then.
        self.waits_for: dict[str, frozenset[str]] = {}
        for s in self.schemes:
            self.waits_for[s.storage] = self.waits_for.get(s.storage, frozenset()) | s.may_store

    def claims(self, part: str, tensor: torch.Tensor) -> bool:
        # A dense linear's `weight` has the name of an unpacked quantized one: only an int8 / float8 is ours.
        return part in PARTS and (part != "weight" or tensor.element_size() == 1)

    def ready(self, parts: dict) -> bool:
        storage = _storage(parts)
        # A storage no scheme uses is read at once, to be refused with its module's name.
        return storage is not None and self.waits_for.get(storage, frozenset()) <= parts.keys()

    def read(self, module: str, parts: dict) -> QuantizedWeight | Fp8Weight:
        scheme = self.scheme_for(module)
        if scheme is None:
            raise ValueError(f"{module!r} stores quantized tensors, but no compressed-tensors config_groups "
                             "target covers it (or `ignore` lists it)")
        extra = parts.keys() - scheme.may_store
        if extra:
            raise ValueError(f"{module!r} stores {', '.join(sorted(extra))}, which its config group "
                             f"{scheme.group!r} ({scheme.format}, {scheme.type}{scheme.bits} "
                             f"{scheme.strategy}) does not")
        if scheme.parts - parts.keys():
            raise ValueError(f"quantized weight {module!r} is incomplete: found only "
                             f"{', '.join(sorted(parts))}")
        if scheme.type == "float":
            return read_float(module, parts, scheme)
        return read_int(module, parts, scheme)

    def scheme_for(self, module: str) -> Scheme | None:
        """compressed-tensors' choice: none where `ignore` names the module, else the scheme of its most
        specific target: exact names, then regexes (each in sorted order), then the class "Linear", which
        every module with quantized tensors is."""
        if any(_name_matches(module, entry) for entry in self.ignore):
            return None
        named = sorted((t for t in self.by_target if _name_matches(module, t)), key=lambda t: ("re:" in t, t))
        return self.by_target[named[0]] if named else self.by_target.get("Linear")


def _name_matches(module: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module


def _storage(parts: dict) -> str | None:
    if "weight_packed" in parts:
        return "packed"
    if "weight" in parts:
        return "float" if parts["weight"].is_floating_point() else "int"
    return None


# -- the config -------------------------------------------------------------------------------------

def check_config(quant_config: dict) -> None:
    """The model-wide fields: what was saved, and the features llmctl does not apply."""
    status = quant_config.get("quantization_status")
    if status not in STATUSES:
        raise ValueError(f"compressed-tensors quantization_status {status!r}: llmctl reads checkpoints "
                         "saved compressed (status compressed or frozen)")
    sparsity = quant_config.get("sparsity_config") or {}
    if sparsity.get("format", "dense") != "dense":
        raise ValueError(f"compressed-tensors sparsity_config.format {sparsity['format']!r}: llmctl reads "
                         "dense weights only")
    if any((quant_config.get("transform_config") or {}).values()):
        raise ValueError("compressed-tensors transform_config is set: llmctl does not apply its transforms "
                         "(rotations such as QuIP or SpinQuant)")
    _check_kv_cache_scheme(quant_config.get("kv_cache_scheme"))


def _check_kv_cache_scheme(kv: dict | None) -> None:
    """A calibrated FP8 KV cache: one static scale per layer for keys and one for values, stored as
    `self_attn.k_scale` / `v_scale`, which an fp8 cache (`--kv-cache-dtype fp8`) uses. Other schemes are
    refused by field."""
    if not kv:
        return
    where = "compressed-tensors kv_cache_scheme"
    _known_fields(kv, ARG_FIELDS, "kv_cache_scheme")
    wanted = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}
    for name, value in wanted.items():
        if kv.get(name, value) != value:
            raise ValueError(f"{where}.{name} {kv[name]!r}: llmctl reads FP8 KV caches with one static scale "
                             "per layer (num_bits 8, type float, strategy tensor, symmetric, not dynamic)")


def parse_scheme(name: str, group, top_format: str | None) -> Scheme:
    """A config group, checked field by field; ValueError naming the first field llmctl cannot honour."""
    where = f"config_groups.{name}"
    if not isinstance(group, dict):
        raise ValueError(f"compressed-tensors {where} is a preset name with a target list; llmctl reads "
                         "schemes spelled out, as llm-compressor saves them")
    _known_fields(group, SCHEME_FIELDS, where)
    if not group.get("targets"):
        raise ValueError(f"compressed-tensors {where}.targets is empty")
    fmt = group.get("format") or top_format
    if fmt not in (PACKED, *UNPACKED):
        field = f"{where}.format" if group.get("format") else "format"
        raise ValueError(f"compressed-tensors {field} {fmt!r}: llmctl reads {PACKED} and "
                         f"{', '.join(UNPACKED)} (not sparse, nvfp4 or mxfp4 formats)")
    if group.get("output_activations"):
        raise ValueError(f"compressed-tensors {where}.output_activations is set: llmctl does not quantize "
                         "outputs")
    w = group.get("weights")
    if not w:
        raise ValueError(f"compressed-tensors {where}.weights is empty: llmctl reads quantized weights")
    _known_fields(w, ARG_FIELDS, f"{where}.weights")
    kind = str(w.get("type", "int")).lower()
    bits = int(w.get("num_bits", 8))
    group_size = w.get("group_size")
    strategy = str(w.get("strategy") or _implied_strategy(group_size)).lower()
    symmetric = bool(w.get("symmetric", True))
    act_order = w.get("actorder") in (True, "group", "dynamic")  # "weight" only reorders calibration
    if w.get("dynamic"):
        raise ValueError(f"compressed-tensors {where}.weights.dynamic is set: weights must be stored "
                         "quantized")
    block, static_input = None, False
    if kind == "int":
        _check_int(f"{where}.weights", bits, strategy, group_size, act_order)
        if group.get("input_activations"):
            raise ValueError(f"compressed-tensors {where}.input_activations is set on integer weights: "
                             "llmctl serves integer weights weight-only (W4A16 / W8A16), not W8A8 or W4AFP8")
    elif kind == "float":
        block = _check_float(f"{where}.weights", fmt, bits, strategy, symmetric, act_order,
                             w.get("block_structure"))
        static_input = _static_fp8_input(f"{where}.input_activations", group.get("input_activations"))
    else:
        raise ValueError(f"compressed-tensors {where}.weights.type {kind!r}: llmctl reads int and float")
    return Scheme(name, fmt, kind, bits, symmetric, strategy, group_size, block, act_order, static_input)


def _known_fields(d: dict, known: frozenset[str], where: str) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"compressed-tensors {where} has unknown field(s) {', '.join(unknown)}")


def _implied_strategy(group_size: int | None) -> str:
    # QuantizationArgs' own inference when a scheme names no strategy.
    if group_size is None:
        return "tensor"
    return "channel" if group_size == -1 else "group"


def _check_int(where: str, bits: int, strategy: str, group_size, act_order: bool) -> None:
    if bits not in INT_BITS:
        raise ValueError(f"compressed-tensors {where}.num_bits {bits}: llmctl reads 4- and 8-bit integer "
                         "weights")
    if strategy not in ("tensor", "channel", "group"):
        raise ValueError(f"compressed-tensors {where}.strategy {strategy!r}: llmctl reads integer weights "
                         "per tensor, channel or group")
    if strategy == "group" and not (isinstance(group_size, int) and group_size > 0):
        raise ValueError(f"compressed-tensors {where}.group_size {group_size!r} with strategy group")
    if act_order and strategy != "group":
        raise ValueError(f"compressed-tensors {where}.actorder 'group' with strategy {strategy!r}")


def _check_float(where: str, fmt: str, bits: int, strategy: str, symmetric: bool, act_order: bool,
                 block_structure) -> tuple[int, int] | None:
    """FP8 weights; their block, for strategy block."""
    if fmt == PACKED:
        raise ValueError(f"compressed-tensors format {fmt!r} with float {where}: only integers are packed")
    if bits != 8:
        raise ValueError(f"compressed-tensors {where}.num_bits {bits} for float weights: llmctl reads FP8 "
                         "(nvfp4 / mxfp4 are not read)")
    if not symmetric:
        raise ValueError(f"compressed-tensors {where}.symmetric false: FP8 weights have no zero point")
    if act_order:
        raise ValueError(f"compressed-tensors {where}.actorder 'group' with FP8 weights")
    if strategy not in ("tensor", "channel", "block"):
        raise ValueError(f"compressed-tensors {where}.strategy {strategy!r}: llmctl reads FP8 weights per "
                         "tensor, channel or block")
    if strategy != "block":
        return None
    if isinstance(block_structure, str):  # the older "128x128" spelling
        block_structure = block_structure.split("x")
    try:
        rows, cols = (int(v) for v in block_structure)
    except (TypeError, ValueError):
        rows = cols = 0
    if rows < 1 or cols < 1:
        raise ValueError(f"compressed-tensors {where}.block_structure {block_structure!r}: [rows, columns] "
                         "expected")
    return rows, cols


def _static_fp8_input(where: str, args: dict | None) -> bool:
    """Whether FP8 weights come with a stored activation scale. llmctl computes activations in the model's
    dtype or quantizes them itself, so any FP8 activation scheme serves; integer or asymmetric activations
    describe another model."""
    if not args:
        return False
    _known_fields(args, ARG_FIELDS, where)
    kind, bits = str(args.get("type", "int")).lower(), int(args.get("num_bits", 8))
    if kind != "float" or bits != 8:
        raise ValueError(f"compressed-tensors {where}: llmctl reads FP8 weights with FP8 or unquantized "
                         f"activations, not {kind}{bits}")
    if not args.get("symmetric", True):
        raise ValueError(f"compressed-tensors {where}.symmetric false: asymmetric activations are not read")
    if args.get("dynamic"):
        return False
    strategy = str(args.get("strategy") or _implied_strategy(args.get("group_size"))).lower()
    if strategy != "tensor":
        raise ValueError(f"compressed-tensors {where}.strategy {strategy!r}: static activation scales are "
                         "read per tensor")
    return True


# -- reading ----------------------------------------------------------------------------------------

def read_int(module: str, parts: dict, scheme: Scheme) -> QuantizedWeight:
    offset = 2 ** (scheme.bits - 1)  # signed codes and zero points are stored shifted by it, or as int8
    if scheme.format == PACKED:
        out, inp = (int(v) for v in parts["weight_shape"].tolist())
        words = parts["weight_packed"]
        if tuple(words.shape) != (out, math.ceil(inp * scheme.bits / 32)) or words.dtype != torch.int32:
            raise ValueError(f"{module}.weight_packed: {words.dtype} {list(words.shape)} does not hold "
                             f"weight_shape [{out}, {inp}] at {scheme.bits} bits")
        codes = unpack_int32(words, scheme.bits, dim=1)[:, :inp]  # padding codes cut off
    else:
        weight = parts["weight"]
        if weight.dtype != torch.int8:
            raise ValueError(f"{module}.weight is {weight.dtype}; integer codes are stored as int8")
        out, inp = weight.shape
        codes = weight.long() + offset
        if bool(((codes < 0) | (codes >= 2**scheme.bits)).any()):
            raise ValueError(f"{module}.weight holds codes outside the {scheme.bits}-bit range")
    scale, group_size = _int_scale(module, parts["weight_scale"], scheme, out, inp)  # [out, groups]
    if scheme.symmetric:
        zeros = torch.full_like(scale, offset, dtype=torch.int64)
    else:
        zeros = _zero_points(module, parts["weight_zero_point"], scheme, scale.shape, offset)
    g_idx = _g_idx(module, parts.get("weight_g_idx"), inp, group_size, scale.shape[1], codes.device)
    return QuantizedWeight(codes.int(), scale.float(), zeros.int(), g_idx.int(), scheme.bits, group_size,
                           rounding=scale.dtype)


def _int_scale(module: str, scale: torch.Tensor, scheme: Scheme, out: int, inp: int
               ) -> tuple[torch.Tensor, int]:
    """weight_scale as [out, groups] in its stored dtype, and the channels of a group."""
    _check_scale_dtype(module, scale)
    if scheme.strategy == "tensor":
        if scale.numel() != 1:
            raise ValueError(f"{module}.weight_scale has shape {list(scale.shape)}; strategy tensor stores "
                             "one")
        return scale.reshape(1, 1).expand(out, 1), inp
    size = scheme.group_size if scheme.strategy == "group" else inp
    if inp > size and inp % size:
        raise ValueError(f"{module}: group_size {size} does not divide its {inp} input channels")
    expected = (out, math.ceil(inp / size))
    if tuple(scale.shape) != expected:
        raise ValueError(f"{module}.weight_scale has shape {list(scale.shape)}, {list(expected)} expected")
    return scale, size


def _zero_points(module: str, zp: torch.Tensor, scheme: Scheme, shape: torch.Size, offset: int
                 ) -> torch.Tensor:
    """Asymmetric zero points as unsigned [out, groups]: packed along `out` for group and channel
    strategies, int8 as they are otherwise."""
    out, groups = shape
    if scheme.format == PACKED and scheme.strategy != "tensor":
        expected = (math.ceil(out * scheme.bits / 32), groups)
        if tuple(zp.shape) != expected or zp.dtype != torch.int32:
            raise ValueError(f"{module}.weight_zero_point: {zp.dtype} {list(zp.shape)}, int32 "
                             f"{list(expected)} expected")
        return unpack_int32(zp, scheme.bits, dim=0)[:out]
    if zp.dtype != torch.int8 or zp.numel() not in (1, out * groups):
        raise ValueError(f"{module}.weight_zero_point: {zp.dtype} {list(zp.shape)} does not match its scale")
    zp = zp.long().reshape(-1, 1).expand(out, groups) if zp.numel() == 1 else zp.long().reshape(out, groups)
    return zp + offset


def _g_idx(module: str, g_idx: torch.Tensor | None, inp: int, group_size: int, groups: int,
           device: torch.device) -> torch.Tensor:
    """The group of each input channel: weight_g_idx where an older actorder "group" checkpoint stored one,
    channel order otherwise. A -1 anywhere is compressed-tensors' mark for "not set": channel order too."""
    if g_idx is None or bool((g_idx < 0).any()):
        return torch.arange(inp, device=device) // group_size
    if tuple(g_idx.shape) != (inp,) or bool((g_idx >= groups).any()) or g_idx.unique().numel() != groups:
        raise ValueError(f"{module}.weight_g_idx does not assign its {inp} input channels to its {groups} "
                         "groups")
    return g_idx


def read_float(module: str, parts: dict, scheme: Scheme) -> Fp8Weight:
    weight, scale = parts["weight"], parts["weight_scale"]
    if weight.dtype != FLOAT8:
        raise ValueError(f"{module}.weight is {weight.dtype}; FP8 weights are stored as {FLOAT8}")
    _check_scale_dtype(module, scale)
    out, inp = weight.shape
    if scheme.strategy == "tensor":
        if scale.numel() != 1:
            raise ValueError(f"{module}.weight_scale has shape {list(scale.shape)}; strategy tensor stores "
                             "one")
        scale = scale.reshape(1, 1)
    else:
        rows, cols = scheme.block or (1, inp)  # a channel's scale covers one row
        expected = (math.ceil(out / rows), math.ceil(inp / cols))
        if tuple(scale.shape) != expected:
            raise ValueError(f"{module}.weight_scale has shape {list(scale.shape)}, {list(expected)} "
                             "expected")
    input_scale = parts.get("input_scale")
    if input_scale is not None:
        if input_scale.numel() != 1:
            raise ValueError(f"{module}.input_scale has shape {list(input_scale.shape)}; one scale expected")
        input_scale = input_scale.float().reshape(())
    return Fp8Weight(weight, scale.float(), scheme.block, input_scale, rounding=scale.dtype)


def _check_scale_dtype(module: str, scale: torch.Tensor) -> None:
    if scale.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{module}.weight_scale is {scale.dtype}; llmctl reads fp16, bf16 and fp32 scales")


# -- writing ----------------------------------------------------------------------------------------

def compressed_tensors_tensors(w: QuantizedWeight, sym: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One linear's pack-quantized tensors, keyed by suffix, as compressed-tensors' PackedQuantization-
    Compressor writes them; dtype: the model's, which compressed-tensors gives its scales."""
    if w.bits not in INT_BITS:
        raise ValueError(f"compressed-tensors checkpoints from llmctl are 4- or 8-bit, got {w.bits}")
    if not w.in_order:
        raise ValueError("compressed-tensors' current format stores no g_idx, so act-order (desc_act) groups "
                         "cannot be written; quantize without act-order")
    offset, maxq = 2 ** (w.bits - 1), 2**w.bits - 1
    if sym and not bool((w.zeros == offset).all()):
        raise ValueError(f"a symmetric compressed-tensors weight has zero point {offset} everywhere")
    if not sym and not bool(((w.zeros >= 0) & (w.zeros <= maxq)).all()):
        raise ValueError(f"compressed-tensors stores zero points as signed {w.bits}-bit values: they must "
                         f"lie in [0, {maxq}] before the shift by {offset}")
    scales = w.scales.to(dtype)
    if not torch.equal(scales.float(), w.scales.float()):
        raise ValueError(f"the scales are not {dtype} values: compressed-tensors stores them in the model's "
                         "dtype, so fit them in it")
    out, inp = w.qweight.shape
    # Stored codes are the signed ones plus 2^(bits-1): our unsigned codes as they are.
    tensors = {"weight_packed": _pack(w.qweight, w.bits, dim=1),  # [out, ceil(in/pf)]
               "weight_scale": scales.contiguous(),  # [out, groups]
               "weight_shape": torch.tensor([out, inp])}
    if not sym:
        tensors["weight_zero_point"] = _pack(w.zeros, w.bits, dim=0)  # [ceil(out/pf), groups]
    return tensors


def float_quantized_tensors(w: Fp8Weight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One linear's FP8-dynamic tensors, keyed by suffix, as compressed-tensors' FloatQuantizationCompressor
    writes them: the FP8 codes whole and a [out, 1] scale in the model's dtype."""
    out = w.weight.shape[0]
    if w.weight.dtype != FLOAT8:
        raise ValueError(f"float-quantized weights are {FLOAT8}, got {w.weight.dtype}")
    if w.block is not None or tuple(w.scale.shape) != (out, 1):
        raise ValueError(f"FP8-dynamic weights have one scale per output channel ([{out}, 1]), got "
                         f"{list(w.scale.shape)}{f' per {w.block} block' if w.block else ''}")
    if w.input_scale is not None:
        raise ValueError("FP8-dynamic checkpoints store no input_scale: activations are scaled per token at "
                         "run time")
    scale = w.scale.to(dtype)
    if not torch.equal(scale.float(), w.scale.float()):
        raise ValueError(f"the scales are not {dtype} values: compressed-tensors stores them in the model's "
                         "dtype, so fit them in it")
    return {"weight": w.weight.contiguous(), "weight_scale": scale.contiguous()}


def _pack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """pack_int32 after padding `dim` with zeros to whole words, as compressed-tensors pads."""
    missing = -codes.shape[dim] % (32 // bits)
    if missing:
        pad = list(codes.shape)
        pad[dim] = missing
        codes = torch.cat([codes, codes.new_zeros(pad)], dim)
    return pack_int32(codes, bits, dim)


def compressed_tensors_config(bits: int, group_size: int, sym: bool, ignore: tuple[str, ...] = ("lm_head",)
                              ) -> dict:
    """`quantization_config` as llm-compressor writes it for weight-only integer linears saved
    pack-quantized; group_size -1: one scale per output channel."""
    if bits not in INT_BITS:
        raise ValueError(f"compressed-tensors checkpoints from llmctl are 4- or 8-bit, got {bits}")
    channel = group_size == -1
    # No observer: llmctl fits its own integer grids, which no llm-compressor observer made.
    weights = _args(num_bits=bits, type="int", symmetric=sym, strategy="channel" if channel else "group",
                    group_size=None if channel else group_size, zp_dtype=None if sym else "torch.int8")
    return _config(PACKED, weights, None, ignore)


def fp8_dynamic_config(ignore: tuple[str, ...] = ("lm_head",)) -> dict:
    """`quantization_config` as llm-compressor writes its FP8_DYNAMIC scheme: FP8 weights with a scale per
    output channel (from its memoryless min-max observer, the rule llmctl's scales follow too), FP8
    activations quantized per token at run time."""
    weights = _args(num_bits=8, type="float", symmetric=True, strategy="channel", observer="memoryless_minmax")
    inputs = _args(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)
    return _config(FLOAT_QUANTIZED, weights, inputs, ignore)


def fp8_kv_cache_scheme() -> dict:
    """`kv_cache_scheme` as llm-compressor writes it for its FP8 KV-cache recipe: one static scale per layer for
    keys and one for values (its default observer, which it leaves unnamed: null)."""
    return _args(num_bits=8, type="float", symmetric=True, strategy="tensor")


def kv_cache_scale_tensors(k_scale: torch.Tensor, v_scale: torch.Tensor, dtype: torch.dtype
                           ) -> dict[str, torch.Tensor]:
    """One attention's KV-cache scales, keyed by suffix under the layer (`self_attn.k_scale`), as
    llm-compressor saves them: one value each, shape [1], in the model's dtype."""
    out = {}
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale.numel() != 1 or not bool(scale.float().isfinite().all() & (scale.float() > 0).all()):
            raise ValueError(f"a KV-cache {name} is one positive finite value, got {scale.tolist()}")
        if scale.dtype != dtype:
            raise ValueError(f"KV-cache scales are stored in the model's dtype ({dtype}), got {scale.dtype}")
        out[f"self_attn.{name}"] = scale.reshape(1).contiguous()
    return out


def _args(**fields) -> dict:
    """QuantizationArgs as compressed-tensors dumps them: every field in name order, unset ones null."""
    return dict(sorted({"actorder": None, "block_structure": None, "dynamic": False, "group_size": None,
                        "observer": None, "observer_kwargs": {}, "scale_dtype": None, "zp_dtype": None,
                        **fields}.items()))


def _config(fmt: str, weights: dict, inputs: dict | None, ignore: tuple[str, ...]) -> dict:
    group = {"format": fmt, "input_activations": inputs, "output_activations": None, "targets": ["Linear"],
             "weights": weights}
    return {"config_groups": {"group_0": group}, "format": fmt, "global_compression_ratio": None,
            "ignore": list(ignore), "kv_cache_scheme": None, "quant_method": "compressed-tensors",
            "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {},
            "version": FORMAT_VERSION}
