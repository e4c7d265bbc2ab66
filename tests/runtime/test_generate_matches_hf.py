"""Greedy outputs must be token-identical to transformers' generate, whatever the batching does."""

from __future__ import annotations

import random

import pytest
import torch

from llmctl.runtime import LLM, SamplingParams


def hf_greedy(model_dir: str, prompt: list[int], max_new_tokens: int, **generate_options) -> list[int]:
    import transformers

    model = _hf_models.get(model_dir)
    if model is None:
        config = transformers.AutoConfig.from_pretrained(model_dir)
        # transformers' SDPA path drops Gemma 2's attention soft-capping; its eager path is the reference.
        eager = {"attn_implementation": "eager"} if getattr(config, "attn_logit_softcapping", None) else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **eager).eval()
        _hf_models[model_dir] = model
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             min_new_tokens=max_new_tokens, pad_token_id=0,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **generate_options)
    return out[0, len(prompt):].tolist()


_hf_models: dict = {}


def kv_block_bytes(model_dir: str, block_size: int) -> int:
    """One KV block's bytes in fp32: k and v, every layer, every KV head."""
    import json
    from pathlib import Path

    cfg = json.loads(Path(model_dir, "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * block_size * cfg["num_key_value_heads"] * head_dim * 4


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen3_moe"]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(tiny_models, family):
    llm = LLM(tiny_models[family], dtype="float32")
    rng = random.Random(1)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (1, 7, 33, 90)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    results = llm.generate(prompts, params)
    for prompt, result in zip(prompts, results):
        assert result.outputs[0].token_ids == hf_greedy(tiny_models[family], prompt, 24)
        assert result.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen3_moe"])
def test_triton_kernels_in_the_engine_match_transformers(tiny_models, monkeypatch, family):
    """The CUDA path (paged attention, rotary + K/V store, fused norm and SiLU kernels) end to end; on CPU under TRITON_INTERPRET.
    A 32-token budget chunks the second prompt, so one step decodes the first beside that chunk."""
    from llmctl.runtime.kernels import paged_attention as pa

    decodes_apart = []
    attend = pa.paged_attention

    def spy(*args, num_decodes=0, **kwargs):
        decodes_apart.append(num_decodes)
        return attend(*args, num_decodes=num_decodes, **kwargs)

    monkeypatch.setattr(pa, "paged_attention", spy)
    model = tiny_models[family]
    llm = LLM(model, dtype="float32", kernel_backend="triton", max_model_len=256, max_num_batched_tokens=32)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6] * 3, [7] * 40]
    results = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    for prompt, result in zip(prompts, results):
        assert result.outputs[0].token_ids == hf_greedy(model, prompt, 10)
    assert 1 in decodes_apart, "no step had a decode beside a prefill chunk"


@pytest.mark.parametrize("family,count", [("llama", 64)] + [(f, 32) for f in FAMILIES[1:]])
def test_batching_chunking_and_preemption_change_nothing(tiny_models, family, count):
    """Mixed-length prompts under a small token budget (chunked prefill), a KV cache too small for all of
    them (preemption), shared prefixes (prefix cache): each output equals generate() alone, in every family
    (windows, soft-capping and experts included)."""
    model = tiny_models[family]
    rng = random.Random(7)
    shared = [rng.randrange(512) for _ in range(40)]
    prompts, max_tokens = [], []
    for i in range(count):
        own = [rng.randrange(512) for _ in range(rng.randrange(1, 150))]
        prompts.append(shared + own if i % 4 == 0 else own)
        max_tokens.append(rng.randrange(1, 40))
    llm = LLM(model, dtype="float32", max_num_seqs=24, max_num_batched_tokens=96, block_size=16,
              kv_cache_memory=60 * kv_block_bytes(model, 16), max_model_len=512)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    results = llm.generate(prompts, params)
    engine = llm.engine
    assert engine.scheduler.num_preemptions > 0, "the cache was meant to be too small: preemption untested"
    assert engine.block_manager.prefix_hits > 0, "shared prefixes were meant to hit the prefix cache"
    for prompt, m, result in zip(prompts, max_tokens, results):
        assert result.outputs[0].token_ids == hf_greedy(model, prompt, m)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_repetition_penalty_beside_plain_rows_matches_transformers(tiny_models):
    """A penalized row reads every token of its sequence, so the engine waits for each step's tokens
    before it queues the next; rows without penalties share those steps. Both equal generate()."""
    model = tiny_models["llama"]
    llm = LLM(model, dtype="float32")
    prompts = [[5, 5, 9, 5, 300, 7, 5], [1, 2, 3] * 10, [42] * 12]
    penalties = [1.5, 1.0, 0.7]
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, repetition_penalty=r) for r in penalties]
    results = llm.generate(prompts, params)
    for prompt, r, result in zip(prompts, penalties, results):
        assert result.outputs[0].token_ids == hf_greedy(model, prompt, 20, repetition_penalty=r)


def test_reference_model_greedy_matches_transformers():
    """The embedded model, prompted with held-out text through its own tokenizer."""
    from llmctl.reference import default_model_path
    from llmctl.reference.data import read_heldout

    model = str(default_model_path())
    llm = LLM(model, dtype="float32")
    bodies = [doc.text for doc in read_heldout()[:4]]
    prompts = [llm.tokenizer.encode(body[:400]) for body in bodies]
    results = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))
    for prompt, result in zip(prompts, results):
        assert result.outputs[0].token_ids == hf_greedy(model, prompt, 32)
        assert result.outputs[0].text == llm.tokenizer.decode(result.outputs[0].token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("family,options", [
    ("mistral", {"sliding_window": 16}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 12, "max_window_layers": 1}),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 20, "max_window_layers": 0}),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sliding_windows_shorter_than_the_prompts_match_transformers(tiny_model, tmp_path, family, options, backend):
    """Windows of 12-20 positions on prompts of up to 70 tokens, decoded past them; Qwen2's window on its
    upper layers only (max_window_layers), as its config's layer_types say. A 24-token budget chunks the
    prompts, so chunks attend across the window start too."""
    model = tiny_model(tmp_path / family, family, **options)
    llm = LLM(model, dtype="float32", kernel_backend=backend, max_model_len=256, max_num_batched_tokens=24)
    rng = random.Random(3)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (5, 33, 70)]
    results = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    windows = [layer.attn.window for layer in llm.engine.model_runner.model.layers]
    assert any(w is not None for w in windows)
    for prompt, result in zip(prompts, results):
        assert result.outputs[0].token_ids == hf_greedy(model, prompt, 20)


def test_a_windowed_model_hands_back_blocks_outside_its_window(tiny_model, tmp_path):
    """Mistral with a 16-position window on 16-token blocks: a sequence decoding 120 tokens past a 40-token
    prompt holds a few blocks, not ten, and still equals transformers."""
    model = tiny_model(tmp_path / "mistral", "mistral", sliding_window=16)
    llm = LLM(model, dtype="float32", block_size=16, max_model_len=256)
    engine, held = llm.engine, []
    step = engine.step

    def watched_step():
        outputs = step()
        held.extend(len(s.block_table) - s.num_released_blocks for s in engine.scheduler.running)
        return outputs

    engine.step = watched_step
    prompt = list(range(7, 47))
    result = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True))[0]
    assert result.outputs[0].token_ids == hf_greedy(model, prompt, 120)
    assert max(held) <= 3  # the window's blocks, the one being filled, and the one its successor links to
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("scaling", ["default", "longrope"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_partial_rotary_matches_transformers(tiny_model, tmp_path, scaling, backend):
    """Phi-4-mini turns 3/4 of each head's dims: here half of 32, with LongRoPE's factors (and its cos/sin
    scale, which the dims that pass through must not get) or without, on prompts past the original context."""
    rope = ({"type": "longrope", "short_factor": [1.0 + i / 8 for i in range(8)],
             "long_factor": [2.0 + i / 4 for i in range(8)]} if scaling == "longrope" else None)
    model = tiny_model(tmp_path / "phi3", "phi3", partial_rotary_factor=0.5, rope_scaling=rope,
                       original_max_position_embeddings=64)
    llm = LLM(model, dtype="float32", kernel_backend=backend, max_model_len=256, max_num_batched_tokens=32)
    assert llm.engine.model_runner.args.rotary_dim == 16
    rng = random.Random(5)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (6, 40)]
    results = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    for prompt, result in zip(prompts, results):
        assert result.outputs[0].token_ids == hf_greedy(model, prompt, 12)


def test_qwen3_moe_with_a_sparse_step_matches_transformers(tiny_model, tmp_path):
    """decoder_sparse_step 2 (layer 0 dense, layer 1 experts) and norm_topk_prob left to its default."""
    import json
    from pathlib import Path

    model = tiny_model(tmp_path / "moe", "qwen3_moe", decoder_sparse_step=2, mlp_only_layers=[])
    config = json.loads(Path(model, "config.json").read_text())
    del config["norm_topk_prob"]
    Path(model, "config.json").write_text(json.dumps(config))
    llm = LLM(model, dtype="float32")
    layers = llm.engine.model_runner.model.layers
    assert layers[0].moe is None and layers[1].moe is not None
    prompt = [random.Random(9).randrange(512) for _ in range(30)]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(model, prompt, 12)
