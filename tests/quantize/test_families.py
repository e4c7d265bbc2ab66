"""`llmctl quantize` on every dense family the runtime serves: each method's checkpoint reproduces what the
pipeline measured (so its layer-by-layer forward, with Gemma's (1 + w) norms and soft-caps, Gemma 3's
per-layer rotary tables and the sliding windows, is the model's own), and the runtime's greedy tokens
on it equal transformers' on the same checkpoint dequantized."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmctl.quantize.dense import dense_model
from llmctl.quantize.export import write_checkpoint
from llmctl.quantize.methods import MethodConfig
from llmctl.quantize.pipeline import quantize_model

FAMILIES = ["qwen3", "mistral", "gemma2", "gemma3", "phi3", "phi3_partial"]
METHODS = {"gptq": MethodConfig("gptq", 4, 32, sym=False, desc_act=True), "awq": MethodConfig("awq", 4, 32, sym=False)}


def windows(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(2, 512, (n, length), generator=torch.Generator().manual_seed(seed))


def reproduces_and_serves(path: Path, result, evals: torch.Tensor) -> None:
    """The checkpoint, dequantized into transformers, gives the pipeline's perplexity; the runtime's greedy
    tokens on it equal that model's."""
    from llmctl.runtime.llm import LLM
    from llmctl.runtime.sampling_params import SamplingParams

    model = dense_model(path)
    logits = model(input_ids=evals[:, :-1]).logits
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), evals[:, 1:].flatten())
    assert torch.exp(nll).item() == pytest.approx(result.perplexity["after"], rel=1e-3)
    prompt = windows(1, 40, 2)[0].tolist()
    ours = LLM(str(path), dtype="float32", enforce_eager=True).generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    reference = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert ours[0].outputs[0].token_ids == reference[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("family-sources")
    # Mistral with a window shorter than the calibration windows, so the masks are exercised there too;
    # Phi-3 turning half of each head (Phi-4-mini's partial rotary), whose q/k rows the runtime reorders.
    extra = {"mistral": {"sliding_window": 24}, "phi3_partial": {"partial_rotary_factor": 0.5, "rope_scaling": None}}
    return {f: tiny_model(root / f, f.removesuffix("_partial"), seed=3, **extra.get(f, {})) for f in FAMILIES}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_family_checkpoint_reproduces_the_pipeline_and_serves(sources, tmp_path, family, method):
    cfg = METHODS[method]
    evals = windows(2, 65, 1)
    result = quantize_model(sources[family], cfg, windows(8, 64, 0), evals, batch_size=4)
    write_checkpoint(Path(sources[family]), tmp_path / "q", result.tensors, result.dtype, cfg.quantization_config(), {})
    reproduces_and_serves(tmp_path / "q", result, evals)
    if family == "phi3_partial":  # the reordered int4 rows through the W4A16 kernels (the interpreter here)
        from llmctl.runtime.llm import LLM
        from llmctl.runtime.sampling_params import SamplingParams

        prompt, params = windows(1, 40, 2)[0].tolist(), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        outs = [LLM(str(tmp_path / "q"), dtype="float32", kernel_backend=b, enforce_eager=True).generate([prompt], params)
                for b in ("triton", "torch")]
        assert outs[0][0].outputs[0].token_ids == outs[1][0].outputs[0].token_ids


def test_an_unknown_family_is_refused_by_name(tmp_path):
    import transformers

    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=128)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not know 'gpt2' decoder layers"):
        quantize_model(tmp_path, MethodConfig("rtn", 4, 32, sym=True), None)


def test_awq_folds_its_scale_into_a_gemma_norm_without_changing_the_function():
    """Gemma's norm multiplies by (1 + w): folding 1/s must divide (1 + w), not w."""
    import transformers

    from llmctl.quantize import awq

    torch.manual_seed(0)
    norm = transformers.models.gemma2.modeling_gemma2.Gemma2RMSNorm(64)
    with torch.no_grad():
        norm.weight.normal_(0, 0.3)
    linear = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(5, 64)
    before = linear(norm(x))
    awq.apply_scale(norm, [linear], torch.rand(64) + 0.5, plus_one=True)
    torch.testing.assert_close(linear(norm(x)), before, rtol=1e-5, atol=1e-5)


MOE = {"gptq": MethodConfig("gptq", 4, 32, sym=False), "rtn": MethodConfig("rtn", 4, 32, sym=True)}


@pytest.fixture(scope="module")
def moe_sources(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("moe-sources")
    return {f: tiny_model(root / f, f, seed=4) for f in ("mixtral", "qwen3_moe")}


@pytest.mark.parametrize("method", list(MOE))
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_checkpoint_quantizes_every_expert_reproduces_the_pipeline_and_serves(moe_sources, tmp_path, family,
                                                                                   method):
    """Every expert's gate, up and down are quantized and saved under the published per-expert names (the
    router stays dense); the checkpoint reproduces the pipeline's perplexity and serves token-exact."""
    from safetensors import safe_open

    cfg = MOE[method]
    evals = windows(2, 65, 1)
    result = quantize_model(moe_sources[family], cfg, windows(8, 64, 0), evals, batch_size=4)
    write_checkpoint(Path(moe_sources[family]), tmp_path / "q", result.tensors, result.dtype, cfg.quantization_config(), {})
    module, parts = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
                     "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}[family]
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for e in range(4):
        for part in parts:
            assert f"model.layers.0.{module}.experts.{e}.{part}.qweight" in names
    assert f"model.layers.0.{module}.gate.weight" in names and not any("gate_up_proj" in n for n in names)
    assert all(s.unrouted_experts == 0 for s in result.layers)  # 512 calibration tokens reach all four experts
    reproduces_and_serves(tmp_path / "q", result, evals)

    # The Triton path (the interpreter here) keeps the experts int4 and dequantizes inside the kernels.
    from llmctl.runtime.kernels.fused_moe import Int4Experts
    from llmctl.runtime.llm import LLM
    from llmctl.runtime.sampling_params import SamplingParams

    llm = LLM(str(tmp_path / "q"), dtype="float32", kernel_backend="triton", enforce_eager=True)
    assert isinstance(llm.engine.model_runner.model.layers[0].moe.w13, Int4Experts)
    prompt = windows(1, 40, 2)[0].tolist()
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    dequantized = LLM(str(tmp_path / "q"), dtype="float32", enforce_eager=True).generate([prompt], params)
    assert llm.generate([prompt], params)[0].outputs[0].token_ids == dequantized[0].outputs[0].token_ids


def test_moe_gptq_beats_rtn_on_the_experts(moe_sources):
    """GPTQ on each expert's own routed tokens: lower layer error than rounding to nearest."""
    calib = windows(8, 64, 0)
    errors = {m: sum(s.error for s in quantize_model(moe_sources["qwen3_moe"], MethodConfig(m, 4, 32, sym=False), calib,
                                                     batch_size=4).layers) for m in ("rtn", "gptq")}
    assert errors["gptq"] < errors["rtn"]


def test_awq_on_moe_is_refused_by_name(moe_sources):
    with pytest.raises(ValueError, match="AWQ has no scale search for Mixture-of-Experts"):
        quantize_model(moe_sources["mixtral"], MethodConfig("awq", 4, 32, sym=False), windows(2, 64, 0))


def test_an_expert_no_calibration_token_reaches_is_rounded_and_reported(moe_sources, monkeypatch, tmp_path):
    """A router that never picks expert 3 (as a narrow calibration set may): GPTQ has no Hessian for it, so
    it is rounded to nearest, counted per layer and in the report, and the checkpoint is still whole."""
    from llmctl.quantize import experts
    from llmctl.quantize.report import build_report, summary_lines

    route = experts.Experts.route

    def never_three(self, flat):
        logits = self.block.gate(flat)[0].clone()
        logits[:, 3] = float("-inf")
        return logits.topk(self.block.gate.top_k, dim=-1).indices

    monkeypatch.setattr(experts.Experts, "route", never_three)
    cfg = MOE["gptq"]
    evals = windows(2, 65, 1)
    result = quantize_model(moe_sources["qwen3_moe"], cfg, windows(8, 64, 0), evals, batch_size=4)
    monkeypatch.setattr(experts.Experts, "route", route)
    assert [s.unrouted_experts for s in result.layers] == [1, 0]  # the second layer is dense (mlp_only_layers)
    report = build_report(cfg, result, "src", None)
    assert report["unrouted_experts"] == 1 and any("1 experts saw no calibration token" in line
                                                   for line in summary_lines(report))
    assert "model.layers.0.mlp.experts.3.down_proj.qweight" in result.tensors
    write_checkpoint(Path(moe_sources["qwen3_moe"]), tmp_path / "q", result.tensors, result.dtype,
                     cfg.quantization_config(), {})
    reproduces_and_serves(tmp_path / "q", result, evals)


def test_expert_shapes_off_the_grid_are_named(moe_sources):
    with pytest.raises(ValueError, match=r"mlp.experts.\*.down_proj: group size 64 does not divide the 96"):
        quantize_model(moe_sources["qwen3_moe"], MethodConfig("rtn", 4, 64, sym=True), None)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_fp8_checkpoint_stores_every_expert_in_fp8_and_serves(moe_sources, tmp_path, family):
    """fp8 rounds every expert as it rounds a dense linear; the router stays dense and `ignore` names it, as
    llm-compressor's MoE recipes do, so that a loader matching "Linear" leaves it alone."""
    cfg = MethodConfig("fp8")
    evals = windows(2, 65, 1)
    result = quantize_model(moe_sources[family], cfg, windows(8, 64, 0), evals, batch_size=4)
    config = cfg.quantization_config(tuple(result.ignore))
    write_checkpoint(Path(moe_sources[family]), tmp_path / "q", result.tensors, result.dtype, config, {})
    module, parts = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
                     "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}[family]
    for e in range(4):
        for part in parts:
            assert result.tensors[f"model.layers.0.{module}.experts.{e}.{part}.weight"].dtype == torch.float8_e4m3fn
            assert result.tensors[f"model.layers.0.{module}.experts.{e}.{part}.weight_scale"].shape[1] == 1
    router = f"model.layers.0.{module}.gate"
    assert result.tensors[f"{router}.weight"].dtype == result.dtype and router in config["ignore"]
    reproduces_and_serves(tmp_path / "q", result, evals)
