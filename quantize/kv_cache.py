"""Calibrated FP8 KV-cache scales (`--kv-cache-dtype fp8`): one scale per layer for keys and one for values.

How it thinks: an fp8 cache stores round(k / k_scale) in e4m3, whose largest value is 448, so k_scale is
about the keys' largest magnitude over 448, and the same for values. The keys are taken where the cache takes them:
transformers' attention hands its keys, after the rotary embedding (and after Qwen 3's / Gemma 3's key
norm), to `past_key_values.update`; a `KVCacheObserver` stands there in the first pass each method makes
over the calibration windows. That pass runs the layer's float weights on what the quantized layers before
it produce, as llm-compressor's calibration pass does (it quantizes a layer's weights after observing it).
The served model's keys come from the quantized k_proj; they differ by its rounding error, well inside what
the moving average below already lets through.

The rule is llm-compressor's for its kv_cache_scheme, so that a vLLM user gets the scales its recipe would
give: its default observer ("minmax") takes each calibration batch's min and max over all tokens, heads
and channels and folds them into moving averages, m <- m * 0.99 + batch * 0.01 (the first batch starts
them), computed in the model's dtype; the scale is max(|min|, |max|) / 448 in that dtype, stored as [1].
Its batches are single samples (oneshot's default), so the averages here run sample by sample in
calibration order. The last samples weigh most, and a rare outlier is clipped (saturated to ±448 in the
cache) rather than stretching the scale for every token. llm-compressor itself visits equal-length windows
in the order torch.argsort leaves ties in, which is not the given one past a dozen or so windows. Given
that order, llmctl's first-layer scales equal its own; later layers differ by how each propagates the
quantization error of the layers before (its FP8 recipe propagates float outputs).
"""

from __future__ import annotations

import torch

from llmctl.quantize.fp8 import FP8_MAX

AVERAGING = 0.01  # llm-compressor's MinMaxObserver averaging_constant


class KVCacheObserver:
    """Stands in for transformers' cache in one layer's forward: sees the keys and values, stores nothing."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype  # the checkpoint's: the averages and the scales are computed in it
        self.keys = _MovingMinMax(dtype)
        self.values = _MovingMinMax(dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states, value_states: [samples, kv_heads, seq, head_dim], keys after the rotary embedding."""
        self.keys.observe(key_states)
        self.values.observe(value_states)
        return key_states, value_states

    def check_saw(self, samples: int) -> None:
        """One pass over the calibration windows, no more, no less: a second would weigh them twice."""
        if self.keys.samples != samples or self.values.samples != samples:
            raise RuntimeError(f"the KV-cache observer saw {self.keys.samples} keys and {self.values.samples} "
                               f"values of {samples} calibration samples")

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_scale, v_scale), each [1] in the checkpoint's dtype."""
        return self.keys.scale(), self.values.scale()


class _MovingMinMax:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.low: torch.Tensor | None = None  # [1]
        self.high: torch.Tensor | None = None
        self.samples = 0

    def observe(self, states: torch.Tensor) -> None:
        lows = states.amin(dim=(1, 2, 3)).to("cpu", self.dtype)  # [samples]
        highs = states.amax(dim=(1, 2, 3)).to("cpu", self.dtype)
        self.samples += len(lows)
        for low, high in zip(lows.split(1), highs.split(1)):
            if self.low is None:
                self.low, self.high = low, high
            else:  # llm-compressor's lerp, start * (1 - w) + end * w, in the model's dtype
                self.low = self.low * (1.0 - AVERAGING) + low * AVERAGING
                self.high = self.high * (1.0 - AVERAGING) + high * AVERAGING

    def scale(self) -> torch.Tensor:
        if self.low is None:
            raise ValueError("no calibration tokens reached this layer's KV cache")
        zero = torch.zeros_like(self.low)
        absmax = torch.max(torch.min(self.low, zero).abs(), torch.max(self.high, zero))
        scale = absmax / torch.tensor(FP8_MAX, dtype=self.dtype)
        # compressed-tensors replaces a zero scale by its dtype's eps, as for weights.
        return torch.where(scale == 0, torch.tensor(torch.finfo(self.dtype).eps, dtype=self.dtype), scale)
