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
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and of k, before the rotation
    # A config's `sliding_window` only means sliding-window attention when this field of it is true (Qwen2's
    # `use_sliding_window`); None: whenever the window is set (Mistral).
    window_switch: str | None = None


FAMILIES = {
    "LlamaForCausalLM": Family("llama"),
    "MistralForCausalLM": Family("mistral"),
    "Qwen2ForCausalLM": Family("qwen2", qkv_bias=True, window_switch="use_sliding_window"),
    "Qwen3ForCausalLM": Family("qwen3", qk_norm=True, window_switch="use_sliding_window"),
}


def family_for(hf_config: dict) -> Family | None:
    """The row for the first architecture of config.json's list that the runtime serves; None if none."""
    for arch in hf_config.get("architectures") or []:
        if arch in FAMILIES:
            return FAMILIES[arch]
    return None
