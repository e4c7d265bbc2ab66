"""Mixture-of-experts layers in the quantizer (Mixtral, Qwen3-MoE): every expert's gate, up and down as a
linear of its own, saved under the names the published checkpoints use.

transformers 5 keeps a layer's experts stacked ([E, 2 * inter, hidden] gate_up_proj, [E, hidden, inter]
down_proj) and routes inside the block, so no hook sees one expert's input. Here the calibration tokens
are routed with the layer's own router instead: each expert's GPTQ Hessian comes from exactly the tokens
that the router sends it (gate and up share one; down's comes from SiLU(gate) * up with gate and up
already quantized, as GPTQ's true-sequential order does for a dense MLP). An expert that no calibration
token reached has no Hessian to go by: it is rounded to nearest, and counted. The router itself stays
in full precision, as in GPTQModel's and llm-compressor's MoE checkpoints.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import suppress

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.checkpoint.formats import Neutral
from llmctl.checkpoint.formats.weights import QuantizedWeight
from llmctl.quantize.gptq import GPTQConfig, Hessian, gptq
from llmctl.quantize.grid import check_grid, rtn

# model type -> (the block's module name in checkpoints, each expert's (gate, up, down) names there)
HUB_NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")), "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


def moe_block(layer: nn.Module) -> nn.Module | None:
    """The layer's sparse MoE block (transformers 5 names it `mlp`), None for a dense MLP."""
    block = getattr(layer, "mlp", None)
    return block if block is not None and hasattr(block, "experts") and hasattr(block, "gate") else None


class Experts:
    def __init__(self, block: nn.Module, model_type: str) -> None:
        if model_type not in HUB_NAMES:
            raise ValueError(f"llmctl quantize knows the experts of {', '.join(HUB_NAMES)}, not {model_type!r}")
        self.block, self.experts = block, block.experts
        self.module, self.parts = HUB_NAMES[model_type]
        self.num, self.inter = self.experts.gate_up_proj.shape[0], self.experts.gate_up_proj.shape[1] // 2

    def check(self, bits: int, group_size: int) -> None:
        """The experts' shapes fit the grid (before any of the layer's time is spent)."""
        hidden = self.experts.gate_up_proj.shape[2]
        for part, cols in ((self.parts[0], hidden), (self.parts[2], self.inter)):
            try:
                check_grid(bits, group_size, cols)
            except ValueError as exc:
                raise ValueError(f"{self.module}.experts.*.{part}: {exc}") from None

    def names(self, e: int) -> list[str]:
        return [f"{self.module}.experts.{e}.{part}" for part in self.parts]  # gate, up, down

    def renamed(self, name: str) -> str:
        """A dense tensor of the block (the router) under its checkpoint name."""
        return f"{self.module}.{name.removeprefix('mlp.')}" if name.startswith("mlp.") else name

    def route(self, flat: torch.Tensor) -> torch.Tensor:
        return self.block.gate(flat)[2]  # (logits, weights, ids): [tokens, top_k] ids

    def feed(self, runner, x: torch.Tensor, fn) -> None:
        """fn(tokens [n, hidden], ids [n, top_k]) for the block's input, chunk by chunk; each chunk's forward
        stops at the block."""
        def hook(module, args):
            flat = args[0].reshape(-1, args[0].shape[-1])
            fn(flat, self.route(flat))
            raise _Done

        handle = self.block.register_forward_pre_hook(hook)
        try:
            for chunk in x.split(runner.batch_size):
                with suppress(_Done):
                    runner.layer(chunk, attention_mask=runner.mask, position_embeddings=runner.position_embeddings)
        finally:
            handle.remove()

    @property
    def router(self) -> str:
        """The router's checkpoint name: a linear that stays dense."""
        return f"{self.module}.gate"

    def round(self, quantize: Callable[[torch.Tensor], Neutral]) -> dict[str, Neutral]:
        """Every expert's gate, up and down through quantize ([out, in] -> its quantized weight, RTN or FP8)."""
        out = {}
        for e in range(self.num):
            gate, up, down = self.names(e)
            gu = self.experts.gate_up_proj[e]
            out[gate], out[up] = quantize(gu[: self.inter]), quantize(gu[self.inter:])
            out[down] = quantize(self.experts.down_proj[e])
        self._swap(out)
        return out

    def gptq(self, runner, x: torch.Tensor, cfg: GPTQConfig) -> tuple[dict[str, QuantizedWeight], int]:
        """Every expert by GPTQ on its own tokens; returns the weights and how many experts got no token."""
        hidden = self.experts.gate_up_proj.shape[2]
        first = [Hessian(hidden, x.device) for _ in range(self.num)]

        def add_inputs(flat, ids):
            for e in ids.unique().tolist():
                first[e].add(flat[(ids == e).any(dim=-1)])

        self.feed(runner, x, add_inputs)
        out: dict[str, QuantizedWeight] = {}
        unrouted = [e for e in range(self.num) if first[e].tokens == 0]
        for e in range(self.num):
            gate, up, _ = self.names(e)
            if first[e].tokens:
                q, _ = gptq(self.experts.gate_up_proj[e], first[e].H, cfg)
                out[gate], out[up] = q.split_rows([self.inter, self.inter])
                self.experts.gate_up_proj.data[e] = q.dequantize().to(self.experts.gate_up_proj.dtype)
        first.clear()  # [hidden, hidden] each: freed before the down Hessians are made
        second = [Hessian(self.inter, x.device) for _ in range(self.num)]
        act = self.experts.act_fn

        def add_hidden(flat, ids):
            for e in ids.unique().tolist():
                g, u = F.linear(flat[(ids == e).any(dim=-1)], self.experts.gate_up_proj[e]).chunk(2, dim=-1)
                second[e].add(act(g) * u)

        self.feed(runner, x, add_hidden)
        for e in range(self.num):
            if second[e].tokens:
                out[self.names(e)[2]], _ = gptq(self.experts.down_proj[e], second[e].H, cfg)
        for e in unrouted:
            gate, up, down = self.names(e)
            gu = self.experts.gate_up_proj[e]
            args = (cfg.bits, cfg.group_size, cfg.sym, cfg.min_zero, cfg.scale_dtype)
            out[gate], out[up], out[down] = rtn(gu[: self.inter], *args), rtn(gu[self.inter:], *args), rtn(
                self.experts.down_proj[e], *args)
        self._swap(out)
        return out, len(unrouted)

    def _swap(self, weights: dict[str, Neutral]) -> None:
        """The dequantized experts into the stacked parameters, for the next layer's input."""
        gu, down = self.experts.gate_up_proj, self.experts.down_proj
        for e in range(self.num):
            gate, up, dn = self.names(e)
            gu.data[e, : self.inter] = weights[gate].dequantize().to(gu.dtype)
            gu.data[e, self.inter:] = weights[up].dequantize().to(gu.dtype)
            down.data[e] = weights[dn].dequantize().to(down.dtype)


class _Done(Exception):
    """Raised from the block's pre-hook to end a forward there."""


def stacked_for_transformers(state: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """Checkpoint names (one tensor per expert) -> transformers 5's module layout (stacked experts, the
    block named `mlp`), for loading a dequantized checkpoint with load_state_dict."""
    if model_type not in HUB_NAMES:
        return state
    module, (gate, up, down) = HUB_NAMES[model_type]
    pattern = re.compile(rf"(model\.layers\.\d+)\.{module}\.experts\.(\d+)\.(\w+)\.weight")
    out, experts = {}, {}
    for name, tensor in state.items():
        match = pattern.fullmatch(name)
        if match is None:
            out[re.sub(rf"(model\.layers\.\d+)\.{module}\.gate\.", r"\1.mlp.gate.", name)] = tensor
        else:
            experts.setdefault(match[1], {})[(int(match[2]), match[3])] = tensor
    for layer, parts in experts.items():
        count = 1 + max(e for e, _ in parts)
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([parts[(e, gate)], parts[(e, up)]]) for e in range(count)])
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([parts[(e, down)] for e in range(count)])
    return out
