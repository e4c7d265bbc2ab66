"""One transformers decoder layer (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3) on the device, run on
calibration activations.

The methods see a layer only through this: its linears by name (`LayerSpec`: which linears a family
has, which read the same input, which norm feeds the MLP), the attention and MLP blocks as functions of
their (normed) input, a whole-layer forward, and hooks on the linears' inputs. Activations go through
in chunks of samples, so a layer's scratch memory does not grow with the calibration set. Each layer
gets its own rotary tables and mask (Gemma 3's local and global layers differ; sliding-window layers
see only their window, as in the served model).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import torch
from torch import nn

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Linears that read the same tensor as another one: hooks and statistics are kept once, on the first.
SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}


@dataclass(frozen=True)
class LayerSpec:
    """What the methods need to know of a family's decoder layer."""

    linears: tuple[str, ...] = LINEARS
    shared_input: dict = field(default_factory=lambda: dict(SHARED_INPUT))
    # GPTQ's true-sequential order: each group is quantized on inputs that already went through the
    # quantized groups before it, so later linears correct for earlier rounding.
    sequential: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
    mlp_norm: str = "post_attention_layernorm"  # the norm whose output the MLP reads (Gemma: its own)
    norm_plus_one: bool = False  # Gemma's norms scale by (1 + weight)

    @property
    def fused(self) -> bool:
        return "self_attn.qkv_proj" in self.linears


GEMMA = LayerSpec(mlp_norm="pre_feedforward_layernorm", norm_plus_one=True)
PHI3 = LayerSpec(linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
                 shared_input={}, sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",),
                                              ("mlp.down_proj",)))
# A Mixture-of-Experts layer's linears here are its attention's; its experts are quantize/experts.py's.
ATTENTION_ONLY = LayerSpec(linears=LINEARS[:4], sequential=LayerSpec().sequential[:2])
SPECS = {"llama": LayerSpec(), "mistral": LayerSpec(), "qwen2": LayerSpec(), "qwen3": LayerSpec(),
         "gemma2": GEMMA, "gemma3_text": GEMMA, "phi3": PHI3, "mixtral": LayerSpec(), "qwen3_moe": LayerSpec()}


def spec_for(config) -> LayerSpec:
    spec = SPECS.get(config.model_type)
    if spec is None:
        raise ValueError(f"llmctl quantize does not know {config.model_type!r} decoder layers; it quantizes "
                         f"{', '.join(sorted(SPECS))}")
    return spec


def check_layer(layer: nn.Module, spec: LayerSpec) -> None:
    missing = [name for name in (*spec.linears, "input_layernorm", spec.mlp_norm) if not _has(layer, name)]
    if missing:
        raise ValueError(f"unsupported decoder layer {type(layer).__name__}: no {', '.join(missing)}")


def attention_implementation(config) -> str:
    """sdpa, except where the model caps attention scores (Gemma 2): transformers' sdpa path drops the cap."""
    return "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"


def layer_window(config, index: int) -> int | None:
    """The layer's sliding window, or None for full attention."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and types[index] != "sliding_attention"):
        return None
    if types is None and config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return int(window)


def attention_mask(config, index: int, seq: int, device, dtype) -> torch.Tensor | None:
    """[1, 1, seq, seq] additive mask (causal, and the window where the layer has one); None where sdpa's
    own causal mask is the same thing."""
    window = layer_window(config, index)
    if attention_implementation(config) == "sdpa" and (window is None or window >= seq):
        return None
    i = torch.arange(seq, device=device)
    allowed = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] < window) if window else True)
    return torch.zeros(seq, seq, device=device, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


class LayerRunner:
    def __init__(self, layer: nn.Module, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                 batch_size: int, spec: LayerSpec | None = None, mask: torch.Tensor | None = None,
                 kv_cache=None) -> None:
        self.layer = layer
        self.position_embeddings = position_embeddings  # (cos, sin): [1, seq, head_dim] each
        self.batch_size = batch_size
        self.spec = spec or LayerSpec(linears=(), shared_input={}, sequential=())  # None: a forward alone
        self.mask = mask  # None: plain causal attention
        # Handed to the attention as its `past_key_values` in the first whole-layer forward only (every
        # method's first pass, on the float weights): its `update` sees the keys, after the rotary
        # embedding, and the values a KV cache would hold.
        self.kv_cache = kv_cache
        self.linears: dict[str, nn.Linear] = {name: layer.get_submodule(name) for name in self.spec.linears}

    def _chunked(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(chunk) for chunk in x.split(self.batch_size)])

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [samples, seq, hidden] -> the layer's output, same shape (causal attention, no padding)."""
        cache = {} if self.kv_cache is None else {_cache_argument(self.layer): self.kv_cache}
        self.kv_cache = None

        def run(chunk):
            out = self.layer(chunk, attention_mask=self.mask, position_embeddings=self.position_embeddings, **cache)
            return out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple
        return self._chunked(run, x)

    @torch.no_grad()
    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention block on its normed input: [samples, seq, hidden] -> [samples, seq, hidden]."""
        return self._chunked(lambda c: self.layer.self_attn(
            hidden_states=c, attention_mask=self.mask, position_embeddings=self.position_embeddings)[0], x)

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
                    self.layer(chunk, attention_mask=self.mask, position_embeddings=self.position_embeddings)


def _cache_argument(layer: nn.Module) -> str:
    """transformers 5 (and late 4.x) call the layer's cache `past_key_values`, earlier releases `past_key_value`."""
    return "past_key_values" if "past_key_values" in inspect.signature(layer.forward).parameters else "past_key_value"


class _Done(Exception):
    """Raised from a hook to end a forward early."""
