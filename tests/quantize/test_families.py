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

FAMILIES = ["qwen3", "mistral", "gemma2", "gemma3", "phi3"]
METHODS = {"gptq": MethodConfig("gptq", 4, 32, sym=False, desc_act=True), "awq": MethodConfig("awq", 4, 32, sym=False)}


def windows(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(2, 512, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("family-sources")
    # Mistral with a window shorter than the calibration windows, so the masks are exercised there too.
    extra = {"mistral": {"sliding_window": 24}}
    return {f: tiny_model(root / f, f, seed=3, **extra.get(f, {})) for f in FAMILIES}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_family_checkpoint_reproduces_the_pipeline_and_serves(sources, tmp_path, family, method):
    from llmctl.runtime.llm import LLM
    from llmctl.runtime.sampling_params import SamplingParams

    cfg = METHODS[method]
    evals = windows(2, 65, 1)
    result = quantize_model(sources[family], cfg, windows(8, 64, 0), evals, batch_size=4)
    write_checkpoint(Path(sources[family]), tmp_path / "q", result.tensors, result.dtype, cfg.quantization_config(), {})
    model = dense_model(tmp_path / "q")
    logits = model(input_ids=evals[:, :-1]).logits
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), evals[:, 1:].flatten())
    assert torch.exp(nll).item() == pytest.approx(result.perplexity["after"], rel=1e-3)

    prompt = windows(1, 40, 2)[0].tolist()
    ours = LLM(str(tmp_path / "q"), dtype="float32", enforce_eager=True).generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    reference = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert ours[0].outputs[0].token_ids == reference[0, len(prompt):].tolist()


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
