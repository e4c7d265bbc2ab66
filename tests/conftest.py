"""Shared fixtures: tiny random-weight models saved the way transformers saves them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run under its interpreter on machines without CUDA; it is read when kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Start-up GEMV timings are not read from, or left in, the user's cache: each test times what it asserts on.
os.environ.setdefault("LLMCTL_GEMV_CACHE", "off")

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, eos_token_id=None,
            bos_token_id=None, pad_token_id=None)


def make_tiny_model(path, family: str = "llama", seed: int = 0, **overrides) -> str:
    """Save a random-weight model of the family to path (fp32 safetensors) and return the path."""
    import torch
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    }[family]
    extra = {"mistral": {"sliding_window": None},
             # Gemma with what makes it Gemma switched on at a tiny size: soft-capping (2), windows shorter
             # than the test prompts on alternating layers (2) or five of six (3), its own attention scale.
             "gemma2": {"head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 24,
                        "attn_logit_softcapping": 20.0, "final_logit_softcapping": 15.0},
             "gemma3": {"head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 24,
                        "num_hidden_layers": 3, "layer_types": ["sliding_attention", "sliding_attention",
                                                                "full_attention"]},
             # Phi-3: LongRoPE (prompts stay inside its original context, where it and transformers agree)
             # and the sliding window its mini models have.
             "phi3": {"sliding_window": 48, "original_max_position_embeddings": 256,
                      "rope_scaling": {"type": "longrope", "short_factor": [1.0 + i / 16 for i in range(16)],
                                       "long_factor": [2.0 + i / 8 for i in range(16)]}},
             # Mixture of experts: 4 experts, top-2; Mixtral renormalizes the two weights, this Qwen3-MoE does
             # not (norm_topk_prob false) and keeps a dense MLP in its second layer (mlp_only_layers).
             "mixtral": {"sliding_window": None, "num_local_experts": 4, "num_experts_per_tok": 2},
             "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 96,
                           "norm_topk_prob": False, "mlp_only_layers": [1], "head_dim": 32},
             }.get(family, {})
    config = config_cls(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    # Wider weights than the default init: logits then separate clearly and greedy is not a coin toss.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {f: make_tiny_model(root / f, f) for f in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3",
                                                      "mixtral", "qwen3_moe")}


@pytest.fixture(scope="session")
def tiny_model():
    """make_tiny_model, for a test's own variant (a sliding window, another family)."""
    return make_tiny_model


@pytest.fixture
def compiled_variants():
    """`compiled_variants` of a kernel; a Triton that keeps no count skips the test."""
    from llmctl.runtime.kernels import compiled_variants as variants

    def count(kernel) -> int:
        n = variants(kernel)
        if n is None:
            pytest.skip("this Triton keeps no compiled-variant cache to count")
        return n

    return count


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def quantized_reference(tmp_path_factory):
    """`llmctl quantize` of the embedded reference model with a tiny calibration set (the results serve speed
    and equality tests, not quality): run(method, *options) -> checkpoint directory, each made once."""
    import typer
    from typer.testing import CliRunner

    from llmctl.cli.quantize import quantize
    from llmctl.reference import default_model_path

    app = typer.Typer()
    app.command("quantize")(quantize)
    app.callback()(lambda: None)
    done: dict[tuple[str, ...], str] = {}

    def run(method: str, *options: str) -> str:
        key = (method, *options)
        if key not in done:
            path = tmp_path_factory.mktemp("quantized") / method
            result = CliRunner().invoke(app, ["quantize", str(default_model_path()), str(path), "--method", method,
                                              *options, "--samples", "4", "--seq-len", "32", "--eval-windows", "0",
                                              "--device", "cpu"])
            assert result.exit_code == 0, result.output
            done[key] = str(path)
        return done[key]

    return run


@pytest.fixture
def sass_loop():
    """The main (largest) loop of the first kernel's sm_90 SASS as {"instructions": n, "ops": {opcode: n}}, compiled here by
    Triton's own ptxas: scripts/sass_report.py with these arguments, in a process of its own (under Triton's
    interpreter nothing is compiled). Asserts that the kernel spills nothing."""

    if torch.cuda.is_available():  # (the tool reads Triton internals of the CPU build's version; a GPU times)
        pytest.skip("a static check for machines without a GPU: on one the kernels are run and timed")

    def main_loop(*args: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        script = Path(__file__).parents[1] / "scripts" / "sass_report.py"
        done = subprocess.run([sys.executable, script, *args, "--json"], capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        report = json.loads(done.stdout)[0]  # the first kernel launched
        assert report["spill_bytes"] == 0, report
        return report["loops"][-1]

    return main_loop
