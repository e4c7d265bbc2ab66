"""The model families the runtime serves: each a row of what sets its decoder apart from Llama's.

One decoder (`decoder.py`) serves them all; a family adds flags, never a copy. `family_for` picks the row
from a config.json's `architectures`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    qkv_bias: bool = False  # Qwen2: q, k and v projections carry a bias
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and of k, before the rotation
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + weight)
    sandwich_norms: bool = False  # Gemma 2 / 3: a norm after attention and one before and after the MLP
    activation: str = "silu"  # the MLP's act(gate) * up: silu, or gelu_tanh (Gemma)
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    fused_weights: bool = False  # Phi-3: the checkpoint stores qkv_proj and gate_up_proj already fused
    # Mixture of experts: the module holding the router (`gate`) and the experts, and each expert's
    # (gate, up, down) names; MoE fields of the config are read in decoder.ModelArgs.
    moe_module: str | None = None
    moe_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    moe_scores_in_fp32: bool = False  # Mixtral weighs expert outputs with fp32 router scores
    # The top-k router weights renormalized to sum to one: always (True, Mixtral), or as the config's
    # norm_topk_prob says, which defaults to false (None, Qwen3-MoE).
    moe_normalize: bool | None = True
    # A config's `sliding_window` only means sliding-window attention when this field of it is true (Qwen2's
    # `use_sliding_window`); None: whenever the window is set (Mistral).
    window_switch: str | None = None


FAMILIES = {
    "LlamaForCausalLM": Family("llama"),
    "MistralForCausalLM": Family("mistral"),
    "Qwen2ForCausalLM": Family("qwen2", qkv_bias=True, window_switch="use_sliding_window"),
    "Qwen3ForCausalLM": Family("qwen3", qk_norm=True, window_switch="use_sliding_window"),
    "Phi3ForCausalLM": Family("phi3", fused_weights=True),
    "MixtralForCausalLM": Family("mixtral", moe_module="block_sparse_moe", moe_names=("w1", "w3", "w2"),
                                 moe_scores_in_fp32=True),
    "Qwen3MoeForCausalLM": Family("qwen3_moe", qk_norm=True, window_switch="use_sliding_window", moe_module="mlp",
                                  moe_normalize=None),
    "Gemma2ForCausalLM": Family("gemma2", norm_plus_one=True, sandwich_norms=True, activation="gelu_tanh",
                                embed_scale=True),
    "Gemma3ForCausalLM": Family("gemma3", qk_norm=True, norm_plus_one=True, sandwich_norms=True,
                                activation="gelu_tanh", embed_scale=True),
}
ACTIVATIONS = {"silu": ("silu",), "gelu_tanh": ("gelu_pytorch_tanh", "gelu_tanh")}  # config.json's names


def family_for(hf_config: dict) -> Family | None:
    """The row for the first architecture of config.json's list that the runtime serves; None if none."""
    for arch in hf_config.get("architectures") or []:
        if arch in FAMILIES:
            return FAMILIES[arch]
    return None
