"""Tensor parallelism's slices: the part of each checkpoint tensor one rank reads (parallel.py: the rest).

q/k/v and gate/up are cut by output rows, o_proj and down_proj by input columns, the embedding and the LM
head by vocabulary rows (see parallel.py). A
weight is a plain tensor, or a quantized one as the checkpoint formats read it: `QuantizedWeight`
(GPTQ, AWQ, compressed-tensors int4 / int8: codes [out, in], scales and zeros [out, groups], g_idx [in])
or `Fp8Weight` (weight [out, in], a scale per tensor, per row or per 128 x 128 block). Their scales are
cut with their codes: rows with their rows; for input columns, the groups (or blocks) those columns are
in, which must be whole. An act-order weight's groups are spread over all its columns, so a rank's
columns hold parts of every group: those are refused by name. Every expert of a mixture is cut as a dense
MLP is (its gate and up by rows, its down by columns); the router is whole on every rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import torch

from llmctl.checkpoint.formats.weights import Fp8Weight, QuantizedWeight
from llmctl.runtime.layers.vocab_parallel import pad_rows, vocab_range

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "qkv_proj", "gate_up_proj")
ROW = ("o_proj", "down_proj")
Weight = torch.Tensor | QuantizedWeight | Fp8Weight


def shard_weights(weights: Iterable[tuple[str, Weight]], args, tp) -> Iterator[tuple[str, Weight]]:
    """The checkpoint's weights (full args) cut to rank tp.rank's slices."""
    head_dim, hq, hkv = args.head_dim, args.num_heads, args.num_kv_heads
    q_rows = (tp.rank * hq // tp.size * head_dim, hq // tp.size * head_dim)
    first_kv, kv_count = tp.kv_heads(hkv)
    kv_rows = (first_kv * head_dim, kv_count * head_dim)
    inter = args.intermediate_size // tp.size
    i_rows = (tp.rank * inter, inter)
    e_inter = args.moe_intermediate_size // tp.size
    e_rows = (tp.rank * e_inter, e_inter)
    for name, value in weights:
        module, _, part = name.rpartition(".")
        kind = module.rpartition(".")[2]
        if ".experts." in name and part == "weight":  # each expert split as a dense MLP is
            index = args.family.moe_names.index(kind) if kind in args.family.moe_names else None
            if index is None:
                raise ValueError(f"tensor parallelism cannot split the expert weight {name}")
            value = rows(value, [e_rows], name) if index < 2 else columns(value, e_rows, name)
        elif kind == "q_proj":
            value = rows(value, [q_rows], name)
        elif kind in ("k_proj", "v_proj"):
            value = rows(value, [kv_rows], name)
        elif kind in ("gate_proj", "up_proj"):
            value = rows(value, [i_rows], name)
        elif kind == "qkv_proj":  # Phi-3: q | k | v fused
            q_len, kv_len = hq * head_dim, hkv * head_dim
            value = rows(value, [q_rows, (q_len + kv_rows[0], kv_rows[1]), (q_len + kv_len + kv_rows[0], kv_rows[1])],
                         name)
        elif kind == "gate_up_proj":  # Phi-3: gate | up fused
            full = args.intermediate_size
            value = rows(value, [i_rows, (full + i_rows[0], i_rows[1])], name)
        elif kind in ROW and part == "weight":
            value = columns(value, q_rows if kind == "o_proj" else i_rows, name)
        elif kind in ("embed_tokens", "lm_head") and part == "weight":  # split by vocabulary
            first, count, held = vocab_range(args.vocab_size, tp)
            value = rows(value, [(first, count)], name)
            if count < held:  # the last rank's rows past the vocabulary: zeros
                value = pad_rows(value if isinstance(value, torch.Tensor) else value.dequantize(), held)
        elif kind in ROW and part == "bias" and tp.rank:
            value = torch.zeros_like(value)  # added once, by rank 0, before the all-reduce sums the ranks
        yield name, _contiguous(value)


def rows(value: Weight, ranges: list[tuple[int, int]], name: str) -> Weight:
    """Output rows [start, start + length) of each range, concatenated."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value.narrow(0, *r) for r in ranges])
    if isinstance(value, QuantizedWeight):
        return dataclasses.replace(value, **{f: torch.cat([getattr(value, f).narrow(0, *r) for r in ranges])
                                             for f in ("qweight", "scales", "zeros")})
    scale = value.scale
    if value.block is not None:
        br = value.block[0]
        for start, length in ranges:
            if start % br or (length % br and start + length != value.weight.shape[0]):
                raise ValueError(f"{name}: FP8 blocks of {br} rows do not fit this rank's rows "
                                 f"[{start}, {start + length}); choose a tensor_parallel_size that keeps them whole")
        scale = torch.cat([scale.narrow(0, start // br, -(-length // br)) for start, length in ranges])
    elif scale.shape[0] > 1:
        scale = torch.cat([scale.narrow(0, *r) for r in ranges])
    return dataclasses.replace(value, weight=torch.cat([value.weight.narrow(0, *r) for r in ranges]), scale=scale)


def columns(value: Weight, cols: tuple[int, int], name: str) -> Weight:
    """Input columns [start, start + length) with the scales they use."""
    start, length = cols
    if isinstance(value, torch.Tensor):
        return value.narrow(1, start, length)
    if isinstance(value, QuantizedWeight):
        return _quantized_columns(value, start, length, name)
    scale = value.scale
    if value.block is not None:
        bc = value.block[1]
        if start % bc or (length % bc and start + length != value.weight.shape[1]):
            raise ValueError(f"{name}: FP8 blocks of {bc} columns do not fit this rank's columns "
                             f"[{start}, {start + length}); choose a tensor_parallel_size that keeps them whole")
        scale = scale.narrow(1, start // bc, -(-length // bc))
    return dataclasses.replace(value, weight=value.weight.narrow(1, start, length), scale=scale)


def _quantized_columns(w: QuantizedWeight, start: int, length: int, name: str) -> QuantizedWeight:
    qweight = w.qweight.narrow(1, start, length)
    if w.scales.shape[1] == 1:  # one group a row: every column shares it
        return dataclasses.replace(w, qweight=qweight, g_idx=torch.zeros_like(w.g_idx[:length]), group_size=length)
    if not w.in_order:
        raise ValueError(f"{name}: an act-order (desc_act) weight's groups are spread over all its input "
                         "columns, so they cannot be split over ranks; use tensor_parallel_size 1 or a "
                         "checkpoint without act-order")
    gs = w.group_size
    if start % gs or length % gs:
        raise ValueError(f"{name}: groups of {gs} input columns do not fit this rank's columns "
                         f"[{start}, {start + length}); choose a tensor_parallel_size that keeps them whole")
    groups = (start // gs, length // gs)
    return dataclasses.replace(w, qweight=qweight, scales=w.scales.narrow(1, *groups),
                               zeros=w.zeros.narrow(1, *groups), g_idx=w.g_idx[start: start + length] - start // gs)


def _contiguous(value: Weight) -> Weight:
    if isinstance(value, torch.Tensor):
        return value.contiguous()
    tensors = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return dataclasses.replace(value, **{k: v.contiguous() for k, v in tensors.items() if isinstance(v, torch.Tensor)})
