"""The KV-cache observer: llm-compressor's rule for kv_cache_scheme scales, on the keys the cache holds."""

from __future__ import annotations

import pytest
import torch

from llmctl.checkpoint.formats.compressed_tensors import fp8_kv_cache_scheme, kv_cache_scale_tensors
from llmctl.quantize.kv_cache import KVCacheObserver
from llmctl.quantize.layer import LayerRunner


def states(samples: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[samples, kv_heads, seq, head_dim]; sample 3 has an outlier the moving average must not follow."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(samples, 2, 6, 8, generator=g)
    s[3, 1, 2, 5] = -40.0
    return s.to(dtype)


def test_moving_min_max_over_samples_in_the_models_dtype():
    s = states(dtype=torch.bfloat16)
    observer = KVCacheObserver(torch.bfloat16)
    observer.update(s[:2], s[:2] * 2)  # chunks of samples, as the layer runs them
    observer.update(s[2:], s[2:] * 2)
    low, high = s[0].min().reshape(1), s[0].max().reshape(1)
    for sample in s[1:]:
        low = low * 0.99 + sample.min().reshape(1) * 0.01
        high = high * 0.99 + sample.max().reshape(1) * 0.01
    k_scale, v_scale = observer.scales()
    assert k_scale.dtype == torch.bfloat16 and k_scale.shape == (1,)
    assert torch.equal(k_scale, torch.max(low.abs(), high.abs()) / torch.tensor(448.0, dtype=torch.bfloat16))
    assert k_scale.item() < 40.0 / 448 / 2  # the outlier moved the average by a hundredth, not to itself
    assert v_scale.item() == pytest.approx(2 * k_scale.item(), rel=0.02)
    observer.check_saw(5)
    with pytest.raises(RuntimeError, match="saw 5 keys and 5 values of 4 calibration samples"):
        observer.check_saw(4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scales_are_llm_compressors_observer(dtype):
    pytest.importorskip("llmcompressor")
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.observers import Observer

    s = states(dtype=dtype)
    # Its kv_cache_scheme leaves the observer unnamed; an attention's k and v then get "minmax", fed one
    # calibration batch (oneshot's default: one sample) at a time.
    theirs = Observer.load_from_registry("minmax", base_name="k", args=QuantizationArgs.model_validate(
        fp8_kv_cache_scheme()))
    for sample in s.split(1):
        theirs(sample)
    ours = KVCacheObserver(dtype)
    ours.update(s, s)
    expected = theirs.get_qparams()["scale"]
    assert expected.dtype == dtype and expected.shape == (1,)
    assert torch.equal(ours.scales()[0], expected)


def test_the_runner_hands_the_first_forward_the_post_rotary_keys():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaDecoderLayer,
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         attn_implementation="sdpa")
    layer = LlamaDecoderLayer(config, 0).eval()
    x = torch.randn(3, 10, 64)
    cos, sin = LlamaRotaryEmbedding(config)(x, torch.arange(10)[None])
    seen = []

    class Recorder:
        def update(self, k, v, *args, **kwargs):
            seen.append((k, v))
            return k, v

    runner = LayerRunner(layer, (cos, sin), batch_size=2, kv_cache=Recorder())
    out = runner(x)
    runner(x)  # a later forward (the quantized pass) is not observed
    assert [k.shape for k, _ in seen] == [(2, 2, 10, 16), (1, 2, 10, 16)]  # [chunk, kv_heads, seq, head_dim]
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    k = attn.k_proj(h).view(3, 10, 2, 16).transpose(1, 2)
    v = attn.v_proj(h).view(3, 10, 2, 16).transpose(1, 2)
    _, k_rotated = apply_rotary_pos_emb(k, k, cos, sin)
    torch.testing.assert_close(torch.cat([k for k, _ in seen]), k_rotated)
    torch.testing.assert_close(torch.cat([v for _, v in seen]), v)
    torch.testing.assert_close(out, LayerRunner(layer, (cos, sin), batch_size=2)(x))  # the forward is unchanged


def test_scale_tensor_refusals():
    one = torch.tensor([0.01], dtype=torch.float16)
    assert kv_cache_scale_tensors(one, one, torch.float16).keys() == {"self_attn.k_scale", "self_attn.v_scale"}
    with pytest.raises(ValueError, match="one positive finite value, got"):
        kv_cache_scale_tensors(torch.zeros(1, dtype=torch.float16), one, torch.float16)
    with pytest.raises(ValueError, match=r"model's dtype \(torch.bfloat16\), got torch.float16"):
        kv_cache_scale_tensors(one, one, torch.bfloat16)
    with pytest.raises(ValueError, match="no calibration tokens reached"):
        KVCacheObserver(torch.float16).scales()
