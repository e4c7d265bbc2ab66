"""A started engine compiles no Triton kernel mid-run: a compile stalls every running request for a second
or two. After start-up, generates whose batches bring sequence counts and prompt lengths the start-up never
ran (one sequence, sixteen, odd lengths from 3 to 3,000 tokens, batches over the step's 8,192-token budget
so that later chunks run beside decodes) must add no compiled variant to any kernel. CUDA only: on a small
random Llama (head_dim 64, no grouped heads, Llama-2's 4,096 positions) in fp16, and its RTN int4 copy."""

from __future__ import annotations

import importlib
from collections import Counter
from pathlib import Path

import pytest
import torch

from llmctl.runtime import LLM, SamplingParams
from llmctl.runtime.layers.linear import Int4Linear

KERNEL_MODULES = ("paged_attention", "kv_store", "fused", "w4a16.common", "w4a16.gemv", "w4a16.gemv_h2",
                  "w4a16.tiled")
BATCHES = {  # prompt lengths of each generate
    "A": [37, 101, 555, 1000, 777, 333, 29, 1999],
    "A again": [37, 101, 555, 1000, 777, 333, 29, 1999],
    "B": [45, 203, 611, 1234, 93, 17, 444, 3000],
    "C": [5, 1500, 2500, 71],
    "D": [100],
    "E": [33] * 16,
    "F": [250, 700, 91],
    "G": [3],
    "H": [1000],
    "I": [17, 300],
    # more than a step's 8,192 tokens: later chunks run beside the first prompts' decodes (a mixed step)
    "J": [3000, 3000, 3000, 500],
    "K": [1500] * 6 + [20] * 3,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """{"fp16": a random Llama saved by transformers, "int4": its RTN copy (GPTQ format, group 128)}."""
    import transformers

    from llmctl.quantize.export import write_checkpoint
    from llmctl.quantize.methods import MethodConfig
    from llmctl.quantize.pipeline import quantize_model

    root = tmp_path_factory.mktemp("midrun")
    fp16, int4 = root / "fp16", root / "int4"
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
                                      max_position_embeddings=4096, eos_token_id=None, bos_token_id=None,
                                      pad_token_id=None)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.float16).save_pretrained(fp16)
    cfg = MethodConfig("rtn", 4, 128, sym=True)
    result = quantize_model(fp16, cfg, None, device="cuda")
    write_checkpoint(fp16, int4, result.tensors, result.dtype, cfg.quantization_config(), {})
    return {"fp16": str(fp16), "int4": str(int4)}


def compiled(count) -> Counter:
    """Compiled variants of every Triton kernel of the runtime, by "module.kernel"."""
    from triton.runtime.jit import JITFunction

    counts: Counter = Counter()
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"llmctl.runtime.kernels.{name}")
        for attr, obj in vars(module).items():
            if isinstance(obj, JITFunction):
                counts[f"{name}.{attr}"] = count(obj)
    return counts


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_no_kernel_compiles_after_start_up(models, precision, compiled_variants, monkeypatch, tmp_path: Path):
    from llmctl.runtime.kernels.w4a16 import dispatch as w4a16_dispatch

    # Tunings an earlier process left on disk would spare the start-up its tuning runs, which are what
    # compiles the int4 kernels of every prefill bucket: start from none, as a fresh machine does.
    monkeypatch.setenv("LLMCTL_W4A16_CACHE", str(tmp_path / "w4a16.json"))
    monkeypatch.setattr(w4a16_dispatch, "_tuned", {})
    monkeypatch.setattr(w4a16_dispatch, "_disk_loaded", set())
    llm = LLM(models[precision], dtype="float16")
    assert llm.engine.config.max_num_batched_tokens == 8192 and llm.engine.config.max_model_len == 4096
    int4 = [m for m in llm.engine.model_runner.model.modules() if isinstance(m, Int4Linear)]
    assert bool(int4) == (precision == "int4")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    before = compiled(compiled_variants)
    assert before["paged_attention._paged_attention_kernel"] > 0  # the count sees what start-up compiled
    new = {}
    for label, lens in BATCHES.items():
        prompts = [torch.randint(3, llm.engine.vocab_size, (n,), generator=gen).tolist() for n in lens]
        llm.generate(prompts, params)
        now = compiled(compiled_variants)
        if now != before:
            new[label] = {k: now[k] - before[k] for k in now if now[k] != before[k]}
        before = now
    assert new == {}
