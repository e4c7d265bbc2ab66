"""An fp8 KV cache in the engine: twice fp16's tokens (four times fp32's) in the same memory, batching,
chunked prefill, preemption and the prefix cache unchanged by it, and the reference model's perplexity."""

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from llmctl.runtime.config import EngineConfig  # noqa: E402
from llmctl.runtime.llm import LLM  # noqa: E402
from llmctl.runtime.sampling_params import SamplingParams  # noqa: E402

GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.mark.parametrize("dtype,ratio", [("float32", 4), ("float16", 2)])
def test_the_same_memory_holds_more_tokens(tiny_models, dtype, ratio):
    budget = 1 << 20
    plain = LLM(tiny_models["llama"], dtype=dtype, kv_cache_memory=budget, max_model_len=256)
    fp8 = LLM(tiny_models["llama"], dtype=dtype, kv_cache_memory=budget, max_model_len=256, kv_cache_dtype="fp8")
    assert fp8.engine.model_runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
    # (the block count is capped at what max_num_seqs sequences could use: the default 256 do not reach it)
    assert fp8.engine.model_runner.num_blocks == ratio * plain.engine.model_runner.num_blocks


def test_unknown_cache_dtypes_are_refused(tiny_models):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3, got 'int8'"):
        EngineConfig(model=tiny_models["llama"], kv_cache_dtype="int8")


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_batching_chunking_and_preemption_change_nothing(tiny_models, family):
    """Mixed prompts, a small token budget, a cache too small for all of them, shared prefixes: each output
    equals that prompt's alone, with the fp8 cache in both runs; the blocks all come back."""
    model = tiny_models[family]
    rng = random.Random(3)
    shared = [rng.randrange(512) for _ in range(40)]
    prompts = [(shared if i % 4 == 0 else []) + [rng.randrange(512) for _ in range(rng.randrange(1, 120))]
               for i in range(24)]
    params = [SamplingParams(max_tokens=rng.randrange(1, 30), **GREEDY) for _ in prompts]
    options = {"dtype": "float32", "kv_cache_dtype": "fp8", "max_model_len": 256, "block_size": 16}
    block_bytes = 2 * 2 * 16 * 2 * 32  # layers x (k, v) x block x kv heads x head_dim, one byte each
    llm = LLM(model, max_num_seqs=12, max_num_batched_tokens=64, kv_cache_memory=24 * block_bytes, **options)
    results = llm.generate(prompts, params)
    engine = llm.engine
    assert engine.scheduler.num_preemptions > 0, "the cache was meant to be too small: preemption untested"
    assert engine.block_manager.prefix_hits > 0
    alone = LLM(model, **options)
    for prompt, p, result in zip(prompts, params, results):
        assert result.outputs[0].token_ids == alone.generate([prompt], p)[0].outputs[0].token_ids
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_triton_path_equals_the_torch_path(tiny_models):
    """The kernels (under the interpreter on CPU) and their twins, end to end over an fp8 cache."""
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6] * 3, [7] * 40]
    params = SamplingParams(max_tokens=10, **GREEDY)
    outputs = []
    for backend in ("triton", "torch"):
        llm = LLM(tiny_models["qwen2"], dtype="float32", kernel_backend=backend, kv_cache_dtype="fp8",
                  max_model_len=256, max_num_batched_tokens=32)
        outputs.append([r.outputs[0].token_ids for r in llm.generate(prompts, params)])
    assert outputs[0] == outputs[1]


def test_reference_model_perplexity_within_one_percent():
    from llmctl.bench.perplexity import engine_perplexity

    plain = engine_perplexity(max_windows=8)
    fp8 = engine_perplexity(max_windows=8, kv_cache_dtype="fp8")
    assert plain["tokens"] == fp8["tokens"] > 8000
    assert abs(fp8["perplexity"] / plain["perplexity"] - 1) < 0.01, (plain, fp8)


def with_kv_scales(src, dst, scales: dict[int, tuple[float, float]]) -> str:
    """A copy of model src whose checkpoint also stores layers' self_attn.k_scale / v_scale."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(f"{dst}/model.safetensors")
    for layer, (k, v) in scales.items():
        tensors[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor([k])
        tensors[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor([v])
    save_file(tensors, f"{dst}/model.safetensors", metadata={"format": "pt"})
    return str(dst)


def test_a_checkpoints_kv_scales_are_used_by_an_fp8_cache_only(tiny_models, tmp_path):
    from llmctl.runtime.layers.attention import Attention

    model = with_kv_scales(tiny_models["llama"], tmp_path / "scaled", {0: (0.5, 0.25), 1: (2.0, 0.125)})
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6] * 3]
    params = SamplingParams(max_tokens=12, **GREEDY)

    def run(path, **options):
        llm = LLM(path, dtype="float32", max_model_len=128, **options)
        scales = [(m.k_scale, m.v_scale) for m in llm.engine.model_runner.model.modules() if isinstance(m, Attention)]
        return scales, llm.generate(prompts, params)[0].outputs[0].token_ids

    scales, plain = run(model)
    assert scales == [(1.0, 1.0)] * 2, "a cache in the model's dtype has no scales"
    assert plain == run(tiny_models["llama"])[1]
    scales, _ = run(model, kv_cache_dtype="fp8")
    assert scales == [(0.5, 0.25), (2.0, 0.125)]
    # Scales far too large turn every code to zero: the output must change, so the scales are applied.
    huge = with_kv_scales(tiny_models["llama"], tmp_path / "huge", {0: (1e4, 1e4), 1: (1e4, 1e4)})
    assert run(huge, kv_cache_dtype="fp8")[1] != run(model, kv_cache_dtype="fp8")[1]


def test_bad_kv_scales_are_refused(tiny_models, tmp_path):
    model = with_kv_scales(tiny_models["llama"], tmp_path / "bad", {1: (-1.0, 1.0)})
    with pytest.raises(ValueError, match="'layers.1.self_attn.k_scale' must be positive and finite, got -1.0"):
        LLM(model, dtype="float32", kv_cache_dtype="fp8")


def test_llm_compressors_kv_cache_scheme_is_read(tiny_models, tmp_path):
    """A checkpoint whose only quantization is llm-compressor's calibrated FP8 KV cache (config_groups
    empty, kv_cache_scheme set, per-layer scales): an fp8 cache takes its scales, the dtype cache ignores
    them and answers as the unquantized model."""
    import json

    from llmctl.runtime.layers.attention import Attention

    model = with_kv_scales(tiny_models["llama"], tmp_path / "kv", {0: (0.05, 0.02), 1: (0.04, 0.03)})
    config = json.loads((tmp_path / "kv" / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "dense", "quantization_status": "compressed",
        "config_groups": {}, "ignore": [], "sparsity_config": {}, "transform_config": {},
        "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True,
                            "dynamic": False, "group_size": None, "observer": "minmax"}}
    (tmp_path / "kv" / "config.json").write_text(json.dumps(config))
    prompts, params = [[3, 1, 4, 1, 5, 9, 2, 6] * 3], SamplingParams(max_tokens=12, **GREEDY)
    fp8 = LLM(model, dtype="float32", kv_cache_dtype="fp8", max_model_len=128)
    scales = [s for m in fp8.engine.model_runner.model.modules() if isinstance(m, Attention) for s in (m.k_scale, m.v_scale)]
    assert scales == pytest.approx([0.05, 0.02, 0.04, 0.03])
    plain = LLM(model, dtype="float32", max_model_len=128).generate(prompts, params)
    original = LLM(tiny_models["llama"], dtype="float32", max_model_len=128).generate(prompts, params)
    assert plain[0].outputs[0].token_ids == original[0].outputs[0].token_ids
