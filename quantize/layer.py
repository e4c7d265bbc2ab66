"""One transformers decoder layer (Llama, Mistral, Qwen2) on the device, run on calibration activations.

The methods see a layer only through this: its seven linears by name, the attention and MLP blocks
as functions of their (normed) input, a whole-layer forward, and hooks on the linears' inputs.
Activations go through in chunks of samples, so a layer's scratch memory does not grow with the
calibration set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import torch
from torch import nn

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Linears that read the same tensor as another one: hooks and statistics are kept once, on the first.
SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}


def check_layer(layer: nn.Module) -> None:
    missing = [name for name in (*LINEARS, "input_layernorm", "post_attention_layernorm") if not _has(layer, name)]
    if missing:
        raise ValueError(f"unsupported decoder layer {type(layer).__name__}: no {', '.join(missing)} "
                         "(llmctl quantizes Llama-family layers)")


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


class LayerRunner:
    def __init__(self, layer: nn.Module, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                 batch_size: int) -> None:
        self.layer = layer
        self.position_embeddings = position_embeddings  # (cos, sin): [1, seq, head_dim] each
        self.batch_size = batch_size
        self.linears: dict[str, nn.Linear] = {name: layer.get_submodule(name) for name in LINEARS}

    def _chunked(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(chunk) for chunk in x.split(self.batch_size)])

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [samples, seq, hidden] -> the layer's output, same shape (causal attention, no padding)."""
        def run(chunk):
            out = self.layer(chunk, attention_mask=None, position_embeddings=self.position_embeddings)
            return out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple
        return self._chunked(run, x)

    @torch.no_grad()
    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention block on its normed input: [samples, seq, hidden] -> [samples, seq, hidden]."""
        return self._chunked(lambda c: self.layer.self_attn(
            hidden_states=c, attention_mask=None, position_embeddings=self.position_embeddings)[0], x)

    @torch.no_grad()
    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self._chunked(self.layer.mlp, x)

    @contextmanager
    def input_hooks(self, names, fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
        """Call fn(name, input) with each named linear's input during forwards inside the block."""
        handles = [self.linears[n].register_forward_pre_hook(lambda m, args, n=n: fn(n, args[0]))
                   for n in names]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def feed(self, x: torch.Tensor, names, fn: Callable[[str, torch.Tensor], None]) -> None:
        """fn(name, input) for each named linear, chunk by chunk; a chunk's forward stops once all have
        fired, since what comes after them is not needed (the MLP, when only o_proj is asked for)."""
        waiting: set[str] = set()

        def hook(name: str, inp: torch.Tensor) -> None:
            fn(name, inp)
            waiting.discard(name)
            if not waiting:
                raise _Done

        with self.input_hooks(names, hook):
            for chunk in x.split(self.batch_size):
                waiting.update(names)
                with suppress(_Done):
                    self.layer(chunk, attention_mask=None, position_embeddings=self.position_embeddings)


class _Done(Exception):
    """Raised from a hook to end a forward early."""
