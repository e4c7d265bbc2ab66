"""One decoder for every family of `families.py` (Llama, Mistral, Qwen2, Qwen3, ...): flags, not copies.

The model works on a flat batch: all scheduled tokens of all sequences in one [num_tokens] row,
with positions and the attention metadata saying which sequence each token belongs to. q/k/v and
gate/up are fused into one matmul each when the weights are loaded.

A 4-bit integer checkpoint's projections (GPTQ, AWQ, compressed-tensors) become `Int4Linear`s (W4A16
kernels) when the Triton backend is on, an FP8 checkpoint's become `Fp8Linear`s (FP8 GEMMs) on GPUs that
have them; other quantized weights are dequantized at load into the dense layers. Linears carry a bias
where the config or the checkpoint says (AutoGPTQ stores zero ones).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmctl.checkpoint.formats import Neutral, runs_fp8, runs_int4
from llmctl.checkpoint.formats.weights import QuantizedWeight
from llmctl.runtime.kernels import fused
from llmctl.runtime.layers.attention import Attention, AttentionMetadata
from llmctl.runtime.layers.dense_linear import DenseLinear
from llmctl.runtime.layers.fp8_linear import Fp8Linear
from llmctl.runtime.layers.linear import Int4Linear
from llmctl.runtime.layers.moe import SparseMoe
from llmctl.runtime.layers.norm import RMSNorm
from llmctl.runtime.layers.rotary import RotaryEmbedding, rotary_permutation
from llmctl.runtime.layers.vocab_parallel import VocabParallelEmbedding, VocabParallelHead
from llmctl.runtime.models.families import ACTIVATIONS, FAMILIES, Family


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    family: Family = FAMILIES["LlamaForCausalLM"]
    layer_windows: tuple[int | None, ...] = ()  # each layer's sliding window (None: full attention)
    layer_ropes: tuple[tuple[float, dict | None], ...] = ()  # each layer's (rope theta, scaling)
    rotary_dim: int | None = None  # partial rotary (Phi-4-mini): the dims of a head that turn; None: all
    attn_scale: float | None = None  # the softmax scale when not head_dim ** -0.5 (Gemma's query_pre_attn_scalar)
    attn_softcap: float | None = None  # Gemma 2: attention scores capped at this, through tanh
    final_softcap: float | None = None  # Gemma 2: logits capped at this, through tanh
    num_experts: int = 0  # Mixture of experts (0: a dense MLP in every layer)
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    normalize_topk: bool = True  # renormalize the top-k router weights to sum to one
    sparse_layers: frozenset[int] = frozenset()  # the layers whose MLP is the experts
    biased: frozenset[str] = frozenset()  # our linears ("qkv_proj", "o_proj", ...) that carry a bias
    quant_config: dict | None = None  # the checkpoint's quantization settings, if any

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], family: Family, tensor_names: Iterable[str] = (),
                quant_config: dict | None = None) -> ModelArgs:
        """tensor_names: the checkpoint's, for the biases it stores beyond what the config says (AutoGPTQ
        saves a zero bias for every quantized linear)."""
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
        if act not in ACTIVATIONS[family.activation]:
            raise ValueError(f"unsupported hidden_act {act!r} for {family.name}; it runs {family.activation}")
        heads = cfg["num_attention_heads"]
        windows = _layer_windows(cfg, family)
        ropes = _layer_ropes(cfg, windows)
        theta, rope = ropes[0] if ropes else (10000.0, None)
        scalar = cfg.get("query_pre_attn_scalar")
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        partial = float(cfg.get("partial_rotary_factor") or (rope or {}).get("partial_rotary_factor") or 1.0)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rotary_dim=int(head_dim * partial) if partial != 1.0 else None,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            family=family,
            layer_windows=windows,
            layer_ropes=ropes,
            attn_scale=float(scalar) ** -0.5 if scalar else None,
            attn_softcap=cfg.get("attn_logit_softcapping"),
            final_softcap=cfg.get("final_logit_softcapping"),
            **_moe(cfg, family),
            biased=_biased(cfg, family, tensor_names),
            quant_config=quant_config,
        )


RENAMED = {"self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm"}  # HF module -> ours, one to one
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "o_proj": "o_proj",
         "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj",
         "qkv_proj": "qkv_proj", "gate_up_proj": "gate_up_proj"}  # the last two: Phi-3's fused names


def _layer_windows(cfg: dict[str, Any], family: Family) -> tuple[int | None, ...]:
    """Each layer's sliding window: config.json's `layer_types` where it has them (transformers writes them
    for Qwen2 / Qwen3 / Gemma), else every layer's when the family's switch (if any) turns the window on."""
    window = cfg.get("sliding_window")
    if family.window_switch is not None and not cfg.get(family.window_switch, False):
        window = None
    layers = cfg["num_hidden_layers"]
    if not window:
        return (None,) * layers
    types = cfg.get("layer_types")
    if types is None:
        return (int(window),) * layers
    if len(types) != layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise ValueError(f"layer_types must name sliding_attention or full_attention for each of the {layers} "
                         f"layers, got {types!r}")
    return tuple(int(window) if t == "sliding_attention" else None for t in types)


def _moe(cfg: dict[str, Any], family: Family) -> dict[str, Any]:
    """The MoE fields: Mixtral's (num_local_experts, every layer sparse, weights renormalized) or Qwen3-MoE's
    (num_experts, moe_intermediate_size, norm_topk_prob, decoder_sparse_step, mlp_only_layers)."""
    if family.moe_module is None:
        return {}
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    step, dense = cfg.get("decoder_sparse_step", 1) or 1, set(cfg.get("mlp_only_layers") or [])
    sparse = frozenset(i for i in range(cfg["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0)
    return dict(num_experts=experts, experts_per_token=cfg["num_experts_per_tok"],
                moe_intermediate_size=cfg.get("moe_intermediate_size") or cfg["intermediate_size"],
                normalize_topk=family.moe_normalize or bool(cfg.get("norm_topk_prob", False)),
                sparse_layers=sparse if experts else frozenset())


def _layer_ropes(cfg: dict[str, Any], windows: tuple[int | None, ...]) -> tuple[tuple[float, dict | None], ...]:
    """Each layer's (theta, scaling). transformers 5 keeps `rope_parameters` per layer type where the types
    differ (Gemma 3: a local theta for sliding layers, a global one with scaling for full ones); older
    configs have one dict and, for Gemma 3, `rope_local_base_freq` (its local layers are not scaled)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    typed = "full_attention" in params or "sliding_attention" in params
    local = cfg.get("rope_local_base_freq")

    def rope(kind: str) -> tuple[float, dict | None]:
        p = dict(params.get(kind) or {}) if typed else dict(params)
        theta = p.pop("rope_theta", None)
        if theta is None and kind == "sliding_attention" and local:
            theta, p = local, {}
        if p.get("rope_type", p.get("type", "default")) == "default":
            p = {}
        if p.get("rope_type", p.get("type")) == "longrope":  # Phi-3 keeps this beside the dict
            p.setdefault("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
            p.setdefault("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        return float(theta if theta is not None else cfg.get("rope_theta", 10000.0)), p or None

    full, sliding = rope("full_attention"), rope("sliding_attention")
    return tuple(sliding if w else full for w in windows)


def _biased(cfg: dict[str, Any], family: Family, tensor_names: Iterable[str]) -> frozenset[str]:
    biased = set()
    if family.qkv_bias or cfg.get("attention_bias"):
        biased.add("qkv_proj")
    if cfg.get("attention_bias") and not family.qkv_bias:
        biased.add("o_proj")
    if cfg.get("mlp_bias"):
        biased |= {"gate_up_proj", "down_proj"}
    for name in tensor_names:
        module, _, part = name.rpartition(".")
        if part == "bias" and module.rpartition(".")[2] in FUSED:
            biased.add(FUSED[module.rpartition(".")[2]])
    return frozenset(biased)


def linear_class(args: ModelArgs, use_triton: bool, fp8_ok: bool):
    """The projections' layer: the int4 or FP8 kernels where the checkpoint and device allow, else dense
    (quantized weights dequantized at load)."""
    if use_triton and runs_int4(args.quant_config):
        return Int4Linear
    if fp8_ok and runs_fp8(args.quant_config):
        return Fp8Linear
    return None


def permute_rows(value, index: torch.Tensor, name: str):
    """A tensor's, or a quantized weight's, output rows reordered by index."""
    if isinstance(value, torch.Tensor):
        return value[index.to(value.device)]
    index = index.to(value.scales.device if isinstance(value, QuantizedWeight) else value.weight.device)
    if isinstance(value, QuantizedWeight):
        return dataclasses.replace(value, qweight=value.qweight[index], scales=value.scales[index],
                                   zeros=value.zeros[index])
    if value.scale.numel() == 1 or value.scale.shape[0] == value.weight.shape[0]:  # FP8: per tensor or channel
        return dataclasses.replace(value, weight=value.weight[index],
                                   scale=value.scale if value.scale.numel() == 1 else value.scale[index])
    raise ValueError(f"{name}: FP8 block scales cannot follow partial rotary's row order; this checkpoint "
                     "needs per-tensor or per-channel scales")


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, rotary: RotaryEmbedding, use_triton: bool, fp8_ok: bool = False,
                 window: int | None = None, sparse: bool = False) -> None:
        super().__init__()
        family = args.family
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        self.shape = (args.num_heads, args.num_kv_heads, args.head_dim)
        hidden, inter = args.hidden_size, args.intermediate_size
        biased = args.biased
        quantized = linear_class(args, use_triton, fp8_ok)
        if quantized is not None:  # the parts the checkpoint stores apart (Phi-3 stores them fused)
            qkv = [self.q_size + 2 * self.kv_size] if family.fused_weights else [self.q_size, self.kv_size, self.kv_size]
            self.qkv_proj = quantized(hidden, qkv, bias="qkv_proj" in biased)
            self.o_proj = quantized(self.q_size, [hidden], bias="o_proj" in biased)
            self.gate_up_proj = quantized(hidden, [2 * inter] if family.fused_weights else [inter, inter],
                                          bias="gate_up_proj" in biased)
            self.down_proj = quantized(inter, [hidden], bias="down_proj" in biased)
        else:
            self.qkv_proj = DenseLinear(hidden, self.q_size + 2 * self.kv_size, bias="qkv_proj" in biased)
            self.o_proj = DenseLinear(self.q_size, hidden, bias="o_proj" in biased)
            self.gate_up_proj = DenseLinear(hidden, 2 * inter, bias="gate_up_proj" in biased)
            self.down_proj = DenseLinear(inter, hidden, bias="down_proj" in biased)
        self.moe = None
        if sparse:  # the experts replace the dense MLP
            del self.gate_up_proj, self.down_proj
            self.gate_up_proj = self.down_proj = None
            self.moe = SparseMoe(hidden, args.moe_intermediate_size, args.num_experts, args.experts_per_token,
                                 args.normalize_topk, family.moe_scores_in_fp32, use_triton, quantized is Int4Linear)

        def norm(size: int) -> RMSNorm:
            return RMSNorm(size, args.rms_norm_eps, use_triton, family.norm_plus_one)

        self.input_layernorm, self.post_attention_layernorm = norm(hidden), norm(hidden)
        self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None
        if family.sandwich_norms:
            self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(hidden), norm(hidden)
        self.q_norm = self.k_norm = None
        if family.qk_norm:
            self.q_norm, self.k_norm = norm(args.head_dim), norm(args.head_dim)
        self.attn = Attention(*self.shape, rotary, use_triton=use_triton, window=window,
                              softcap=args.attn_softcap, scale=args.attn_scale)
        act = "gelu_tanh_and_mul" if family.activation == "gelu_tanh" else "silu_and_mul"
        self.act_and_mul = getattr(fused, act if use_triton else f"{act}_ref")
        self.all_reduce = None  # tensor parallelism: sums the ranks' row-parallel partial outputs

    def forward(self, positions, hidden, residual, kv_cache, meta: AttentionMetadata):
        """hidden: [num_tokens, hidden_size] -> (this layer's output, the residual stream before it).
        The residual add happens inside the next norm, as one fused kernel on CUDA."""
        heads, kv_heads, head_dim = self.shape
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:  # per head: [num_tokens * heads, head_dim] rows
            q = self.q_norm(q.reshape(-1, head_dim))
            k = self.k_norm(k.reshape(-1, head_dim))
        attn = self.attn(positions, q.view(-1, heads, head_dim), k.view(-1, kv_heads, head_dim),
                         v.view(-1, kv_heads, head_dim), kv_cache, meta)
        attn = self.o_proj(attn.view(-1, heads * head_dim))
        if self.all_reduce is not None:
            attn = self.all_reduce(attn)
        if self.pre_feedforward_layernorm is None:
            hidden, residual = self.post_attention_layernorm(attn, residual)
            return self.mlp(hidden), residual
        # Gemma's sandwich: attention's output is normed before it joins the residual, the MLP's likewise.
        hidden, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(attn), residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual

    def mlp(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.moe is not None:
            out = self.moe(hidden)
        else:
            out = self.down_proj(self.act_and_mul(self.gate_up_proj(hidden)))
        return out if self.all_reduce is None else self.all_reduce(out)


class CausalLM(nn.Module):
    def __init__(self, args: ModelArgs, use_triton: bool, fp8_ok: bool = False, tp=None) -> None:
        """tp: this model is rank tp.rank's slice (parallel.py), args its shard's; None: the whole model."""
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size) if tp is None else \
            VocabParallelEmbedding(args.vocab_size, args.hidden_size, tp)
        windows = args.layer_windows or (None,) * args.num_layers
        ropes = args.layer_ropes or ((args.rope_theta, args.rope_scaling),) * args.num_layers
        rotaries = {}  # one table per (theta, scaling), shared by the layers that use it
        for theta, scaling in ropes:
            key = (theta, repr(scaling))
            if key not in rotaries:
                rotaries[key] = RotaryEmbedding(args.head_dim, args.max_position_embeddings, theta, scaling,
                                                rotary_dim=args.rotary_dim)
        self.layers = nn.ModuleList(
            DecoderLayer(args, rotaries[(theta, repr(scaling))], use_triton, fp8_ok, window, i in args.sparse_layers)
            for i, (window, (theta, scaling)) in enumerate(zip(windows, ropes)))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, use_triton, args.family.norm_plus_one)
        self.lm_head = DenseLinear(args.hidden_size, args.vocab_size, bias=False) if tp is None else \
            VocabParallelHead(args.vocab_size, args.hidden_size, tp)
        if tp is not None:
            for layer in self.layers:  # each sums the ranks' partial outputs of its o_proj and MLP (or experts)
                layer.all_reduce = tp.all_reduce

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [num_tokens] -> hidden: [num_tokens, hidden_size]
        hidden, residual = self.embed_tokens(input_ids), None
        if self.args.family.embed_scale:  # Gemma: rounded to the activations' dtype first, as transformers does
            hidden = hidden * torch.tensor(self.args.hidden_size**0.5, dtype=hidden.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        return self.norm(hidden, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.args.final_softcap
        if cap is not None:  # Gemma 2: in the activations' dtype, as transformers caps them
            logits = torch.tanh(logits / cap) * cap
        return logits.float()  # [num_sampled, vocab_size]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | Neutral]]) -> None:
        """Copy HF-named tensors in, fusing q/k/v and gate/up; every parameter must be filled. A quantized
        linear arrives as one layout-neutral weight (`llmctl.checkpoint.formats`): packed for the int4
        kernels where the module is an Int4Linear, else dequantized into the dense layer."""
        params = dict(self.named_parameters())
        filled: dict[str, int] = {}
        for name, value in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if self._load_kv_scale(name, value):
                continue
            if self.args.rotary_dim:
                value = self._rotary_rows(name, value)
            if isinstance(value, torch.Tensor):
                self._load_dense(name, value, params, filled)
            else:
                self._load_quantized(name.removesuffix(".weight"), value, params, filled)
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
            filled["lm_head.weight"] = self.lm_head.weight.numel()
        missing = [n for n, p in self.named_parameters(remove_duplicate=False)
                   if filled.get(n, 0) != p.numel() and not n.endswith((".moe.w13", ".moe.w2"))]  # their own check
        missing += [f"{n}.weight" for n, m in self.named_modules() if isinstance(m, Int4Linear | Fp8Linear) and not m.loaded]
        missing += [f"{n} experts ({m.missing_parts} linears)" for n, m in self.named_modules()
                    if isinstance(m, SparseMoe) and not m.loaded]
        if missing:
            raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")

    def _load_kv_scale(self, name: str, value) -> bool:
        """layers.L.self_attn.k_scale / v_scale (compressed-tensors' kv_cache_scheme, one value a layer): what
        layer L's fp8 KV cache codes are multiplied by. Kept on its attention; used only by an fp8 cache."""
        match = re.fullmatch(r"layers\.(\d+)\.self_attn\.([kv])_scale", name)
        if match is None:
            return False
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or int(match[1]) >= len(self.layers):
            raise ValueError(f"{name!r} must be one value of a layer the model has, got "
                             f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
        scale = float(value.float().item())
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"{name!r} must be positive and finite, got {scale}")
        setattr(self.layers[int(match[1])].attn, f"{match[2]}_scale", scale)
        return True

    def _rotary_rows(self, name: str, value):
        """Partial rotary: q and k rows (q_proj, k_proj, Phi-3's qkv_proj, q/k norms) in the order the
        kernels turn them (`rotary_permutation`); anything else as it is."""
        a = self.args
        module = name.removesuffix(".weight").removesuffix(".bias").rpartition(".")[2]
        head = rotary_permutation(a.head_dim, a.rotary_dim)

        def heads(n: int, offset: int) -> torch.Tensor:
            return (head[None, :] + a.head_dim * torch.arange(n)[:, None]).flatten() + offset

        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        index = {"q_proj": lambda: heads(a.num_heads, 0), "k_proj": lambda: heads(a.num_kv_heads, 0),
                 "qkv_proj": lambda: torch.cat([heads(a.num_heads, 0), heads(a.num_kv_heads, q),
                                                torch.arange(q + kv, q + 2 * kv)]),
                 "q_norm": lambda: head, "k_norm": lambda: head}.get(module)
        return value if index is None else permute_rows(value, index(), name)

    @functools.cached_property
    def _fused_targets(self) -> dict[str, tuple[str, int, int | None, int | None]]:
        """HF module -> (our module, its index among the fused parts, row offset, rows)."""
        a = self.args
        q, kv, inter = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.intermediate_size
        if a.family.fused_weights:
            return {"self_attn.qkv_proj": ("qkv_proj", 0, None, None), "mlp.gate_up_proj": ("gate_up_proj", 0, None, None),
                    "self_attn.o_proj": ("o_proj", 0, None, None), "mlp.down_proj": ("down_proj", 0, None, None)}
        return {
            "self_attn.q_proj": ("qkv_proj", 0, 0, q),
            "self_attn.k_proj": ("qkv_proj", 1, q, kv),
            "self_attn.v_proj": ("qkv_proj", 2, q + kv, kv),
            "mlp.gate_proj": ("gate_up_proj", 0, 0, inter),
            "mlp.up_proj": ("gate_up_proj", 1, inter, inter),
            "self_attn.o_proj": ("o_proj", 0, None, None),
            "mlp.down_proj": ("down_proj", 0, None, None),
        }

    def _expert_of(self, name: str) -> tuple[int, int | None, int | None] | None:
        """layers.L.<moe module>.gate.weight -> (L, None, None), the router; layers.L.<moe module>.experts.E.
        <part>.weight -> (L, E, 0 / 1 / 2 for gate / up / down); None for every other name."""
        family = self.args.family
        if family.moe_module is None:
            return None
        match = re.fullmatch(rf"layers\.(\d+)\.{family.moe_module}\.(?:gate|experts\.(\d+)\.(\w+))\.weight", name)
        if match is None or int(match[1]) not in self.args.sparse_layers:
            return None
        if match[2] is None:
            return int(match[1]), None, None
        if match[3] not in family.moe_names:
            raise ValueError(f"unexpected expert weight {name!r} in checkpoint")
        return int(match[1]), int(match[2]), family.moe_names.index(match[3])

    def _load_quantized(self, prefix: str, weight: Neutral, params, filled) -> None:
        expert = self._expert_of(f"{prefix.removeprefix('model.')}.weight")
        if expert is not None and expert[1] is not None:
            self.layers[expert[0]].moe.load_expert(expert[1], expert[2], weight)
            return
        for hf, (ours, index, _, _) in self._fused_targets.items():
            if prefix.endswith(f".{hf}"):
                module = self.get_submodule(prefix.replace(hf, ours))
                if isinstance(module, Int4Linear | Fp8Linear):
                    module.load(index, weight)
                    return
        self._load_dense(f"{prefix}.weight", weight.dequantize().to(self.embed_tokens.weight.dtype), params, filled)

    def _load_dense(self, name: str, tensor: torch.Tensor, params, filled) -> None:
        for hf, ours in RENAMED.items():
            name = name.replace(f".{hf}.", f".{ours}.")
        expert = self._expert_of(name)
        if expert is not None and expert[1] is not None:
            self.layers[expert[0]].moe.load_expert(expert[1], expert[2], tensor)
            return
        if expert is not None:  # the router
            name = f"layers.{expert[0]}.moe.gate.weight"
        target, start, size = name, None, None
        for hf, (ours, _, offset, length) in self._fused_targets.items():
            if f".{hf}." in name:
                target, start, size = name.replace(hf, ours), offset, length
        if target not in params:
            if target == "lm_head.weight" and self.args.tie_word_embeddings:
                return
            raise ValueError(f"unexpected weight {name!r} in checkpoint")
        param = params[target]
        dest = param.data if start is None else param.data.narrow(0, start, size)
        if dest.shape != tensor.shape:
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
        dest.copy_(tensor)
        filled[target] = filled.get(target, 0) + tensor.numel()
