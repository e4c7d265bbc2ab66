"""The MoE layer beside transformers' block (bf16, where the router scores' dtype shows), its config
defaults, and a checkpoint whose experts are duplicated, out of range or misshapen."""

from __future__ import annotations

import shutil

import pytest
import torch

from llmctl.runtime import LLM
from llmctl.runtime.layers.moe import SparseMoe
from llmctl.runtime.models.decoder import ModelArgs
from llmctl.runtime.models.families import FAMILIES


@pytest.mark.parametrize("family,arch", [("mixtral", "MixtralForCausalLM"), ("qwen3_moe", "Qwen3MoeForCausalLM")])
def test_the_layer_equals_transformers_block_in_bf16(tiny_models, family, arch):
    import transformers

    # transformers' eager expert loop: its default grouped_mm sums in another order
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.bfloat16,
                                                         experts_implementation="eager")
    block = hf.model.layers[0].mlp
    args = ModelArgs.from_hf(hf.config.to_dict(), FAMILIES[arch])
    ours = SparseMoe(args.hidden_size, args.moe_intermediate_size, args.num_experts, args.experts_per_token,
                     args.normalize_topk, FAMILIES[arch].moe_scores_in_fp32, use_triton=False).to(torch.bfloat16)
    with torch.no_grad():
        ours.gate.weight.copy_(block.gate.weight)
        ours.w13.copy_(block.experts.gate_up_proj)
        ours.w2.copy_(block.experts.down_proj)
        x = torch.randn(37, args.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        torch.testing.assert_close(ours(x), block(x[None])[0], rtol=0, atol=0)


def test_router_normalization_defaults_follow_each_family():
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_experts_per_tok=2)
    qwen = ModelArgs.from_hf({**base, "num_experts": 4}, FAMILIES["Qwen3MoeForCausalLM"])
    assert not qwen.normalize_topk  # transformers' Qwen3MoeConfig: norm_topk_prob defaults to false
    qwen = ModelArgs.from_hf({**base, "num_experts": 4, "norm_topk_prob": True}, FAMILIES["Qwen3MoeForCausalLM"])
    assert qwen.normalize_topk
    mixtral = ModelArgs.from_hf({**base, "num_local_experts": 4, "norm_topk_prob": False}, FAMILIES["MixtralForCausalLM"])
    assert mixtral.normalize_topk  # Mixtral's router always renormalizes
    step = ModelArgs.from_hf({**base, "num_hidden_layers": 4, "num_experts": 4, "decoder_sparse_step": 2,
                              "mlp_only_layers": [3]}, FAMILIES["Qwen3MoeForCausalLM"])
    assert step.sparse_layers == {1}


def rewrite(src, dst, rename):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    save_file({rename(k): v for k, v in tensors.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def test_an_expert_out_of_range_is_named(tiny_models, tmp_path):
    model = rewrite(tiny_models["qwen3_moe"], tmp_path / "bad", lambda k: k.replace("experts.3.", "experts.4."))
    with pytest.raises(ValueError, match="expert 4's (down|gate|up) projection: this layer has 4 experts"):
        LLM(model, dtype="float32")


@pytest.mark.parametrize("int4", [False, True])
def test_an_expert_twice_or_misshapen_is_named(int4):
    """(Shards can repeat a name; one safetensors file cannot.)"""
    moe = SparseMoe(64, 32, 4, 2, True, False, use_triton=int4, int4=int4)
    if not int4:
        moe.to_empty(device="cpu")
    moe.load_expert(1, 0, torch.zeros(32, 64))
    with pytest.raises(ValueError, match="expert 1's gate projection appears twice"):
        moe.load_expert(1, 0, torch.zeros(32, 64))
    with pytest.raises(ValueError, match=r"expert 2's down projection has shape \(32, 64\), expected \(64, 32\)"):
        moe.load_expert(2, 2, torch.zeros(32, 64))
    assert not moe.loaded


def test_a_missing_expert_is_named(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "missing"
    shutil.copytree(tiny_models["qwen3_moe"], model)
    tensors = load_file(str(model / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".experts.2.up_proj" not in k}, str(model / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing weights: layers.0.moe experts \(1 linears\)"):
        LLM(str(model), dtype="float32")


def test_fp8_experts_load_dequantized():
    """An FP8 checkpoint's experts (compressed-tensors float-quantized) run from their dequantized values."""
    from llmctl.checkpoint.formats.weights import Fp8Weight

    moe = SparseMoe(64, 32, 1, 1, True, False, use_triton=False)
    moe.to_empty(device="cpu")
    weights = []
    for w in (torch.randn(32, 64), torch.randn(32, 64), torch.randn(64, 32)):
        scale = w.abs().amax(dim=1, keepdim=True) / 448
        weights.append(Fp8Weight((w / scale).to(torch.float8_e4m3fn), scale))
    for part, w in enumerate(weights):
        moe.load_expert(0, part, w)
    assert moe.loaded
    torch.testing.assert_close(moe.w13.data[0], torch.cat([w.dequantize() for w in weights[:2]]))
    torch.testing.assert_close(moe.w2.data[0], weights[2].dequantize())
