"""Speculative decoding (ngram): greedy outputs token-identical to decoding without it, under batching,
chunked prefill, preemption and the prefix cache; sampled tokens that follow the model's distribution;
its back-off; and every block back in the pool."""

import random

import pytest
import torch

from llmctl.runtime.block_manager import BlockManager
from llmctl.runtime.layers.sampler import Sampler, SamplingBatch
from llmctl.runtime.llm import LLM
from llmctl.runtime.sampling_params import SamplingParams
from llmctl.runtime.sequence import Sequence, SequenceStatus
from llmctl.runtime.speculative import SpeculativeConfig, Speculator, ngram_drafts

NGRAM = {"method": "ngram", "num_tokens": 4}
CODE_EDIT = ("def load(path):\n    with open(path) as f:\n        data = json.load(f)\n    return data\n\n\n"
             "# the same function, renamed to read_config:\ndef read_config(path):\n")


def test_ngram_drafts_follow_the_latest_longest_match():
    import numpy as np

    tokens = np.array([5, 1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 4, 1, 2, 3])
    # the last 3 tokens (1 2 3) occurred at 1 and 6; the latest is followed by 7 8 4
    assert ngram_drafts(tokens, 3, 1, 4) == [7, 8, 4]
    assert ngram_drafts(tokens, 8, 1, 4) == [7, 8, 4, 1, 2, 3]  # up to the end of what is known
    assert ngram_drafts(np.array([4, 3, 2, 1]), 3, 1, 4) == []  # no earlier occurrence of 1
    assert ngram_drafts(np.array([6, 1, 6]), 2, 2, 4) == [], "min_ngram 2 does not accept a 1-gram match"
    assert ngram_drafts(np.array([7]), 3, 1, 4) == []


def test_ngram_drafts_equal_a_brute_force_search():
    """Thousands of short histories over tiny vocabularies (many partial matches): the same drafts as trying
    every n from the longest and every earlier position from the latest."""
    import numpy as np

    def brute(tokens, k, min_n, max_n):
        t = tokens.tolist()
        for n in range(min(max_n, len(t) - 1), min_n - 1, -1):
            for start in range(len(t) - n - 1, -1, -1):
                if t[start : start + n] == t[len(t) - n:]:
                    return t[start + n : start + n + k]
        return []

    rng = np.random.default_rng(0)
    for _ in range(3000):
        tokens = rng.integers(0, int(rng.integers(1, 6)), int(rng.integers(1, 40)))
        k, min_n = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        max_n = int(rng.integers(min_n, 7))
        assert ngram_drafts(tokens, k, min_n, max_n) == brute(tokens, k, min_n, max_n), (tokens, k, min_n, max_n)


def test_config_is_checked():
    with pytest.raises(ValueError, match="speculative method must be one of ngram, draft, got 'eagle'"):
        SpeculativeConfig(method="eagle")
    with pytest.raises(ValueError, match=r"num_speculative_tokens must be in \[1, 16\], got 0"):
        SpeculativeConfig(num_tokens=0)


def mixed_prompts(count: int, seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts that repeat themselves (so drafts are found), some sharing a prefix, of mixed lengths."""
    rng = random.Random(seed)
    shared = [rng.randrange(512) for _ in range(40)]
    prompts, params = [], []
    for i in range(count):
        own = [rng.randrange(512) for _ in range(rng.randrange(1, 50))] * rng.randrange(1, 4)
        prompts.append(shared + own if i % 4 == 0 else own)
        params.append(SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 60), ignore_eos=True))
    return prompts, params


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3_moe"])
def test_greedy_outputs_are_identical(tiny_models, family):
    """64 mixed prompts, a 96-token budget (chunked prefill), a cache too small for them (preemption), shared
    prefixes; every step may speculate (max_batch covers the batch). Gemma 2: sliding windows and
    soft-capping; Qwen3-MoE: experts."""
    from test_generate_matches_hf import kv_block_bytes

    model = tiny_models[family]
    prompts, params = mixed_prompts(64, seed=11)
    options = dict(dtype="float32", max_num_seqs=24, max_num_batched_tokens=96, block_size=16,
                   kv_cache_memory=60 * kv_block_bytes(model, 16), max_model_len=512)
    plain = LLM(model, **options).generate(prompts, params)
    llm = LLM(model, speculative={**NGRAM, "max_batch": 64}, **options)
    results = llm.generate(prompts, params)
    for want, got in zip(plain, results):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.outputs[0].finish_reason == want.outputs[0].finish_reason
    engine, spec = llm.engine, llm.engine.speculator
    assert engine.scheduler.num_preemptions > 0, "the cache was meant to be too small: preemption untested"
    assert engine.block_manager.prefix_hits > 0
    assert spec.num_accepted_tokens > 0 and spec.num_draft_tokens > spec.num_accepted_tokens, \
        "both accepted and rejected drafts were meant to occur"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_reference_model_code_edits_are_identical_and_accept_drafts():
    """The shipped model on code-editing prompts from its held-out split, batched in a cache that makes
    them preempt one another, with stop strings."""
    from llmctl.reference import default_model_path
    from llmctl.reference.prompts import code_edit_prompts

    prompts = [CODE_EDIT, *code_edit_prompts(7)]
    params = SamplingParams(temperature=0.0, max_tokens=64, stop=["\n\n\n"])
    options = dict(dtype="float32", max_model_len=1024, kv_cache_memory=66 * 2 * 6 * 16 * 2 * 64 * 4)
    want = LLM(str(default_model_path()), **options).generate(prompts, params)
    llm = LLM(str(default_model_path()), speculative={**NGRAM, "num_tokens": 5}, **options)
    results = llm.generate(prompts, params)
    for w, g in zip(want, results):
        w, g = w.outputs[0], g.outputs[0]
        assert (g.token_ids, g.text, g.finish_reason, g.stop_reason) == (w.token_ids, w.text, w.finish_reason, w.stop_reason)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.speculator.mean_accepted_length > 1.5


@pytest.fixture
def no_back_off(monkeypatch):
    """Every step of every sequence speculates: a tiny random model's few matches all reach the verifier."""
    from llmctl.runtime import speculative

    monkeypatch.setattr(speculative, "MAX_SKIP_LOG2", 0)


def test_logprobs_and_streamed_outputs_are_unchanged(tiny_models, no_back_off):
    from llmctl.runtime.engine import Engine

    prompts, _ = mixed_prompts(6, seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=2)
    plain = LLM(tiny_models["llama"], dtype="float32").generate(prompts, params)
    llm = LLM(tiny_models["llama"], dtype="float32", speculative=NGRAM)
    results = llm.generate(prompts, params)
    assert llm.engine.speculator.num_accepted_tokens > 0
    for want, got in zip(plain, results):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.outputs[0].logprobs == pytest.approx(want.outputs[0].logprobs, abs=1e-4)
        assert [[t for t, _ in top] for top in got.outputs[0].top_logprobs] == \
            [[t for t, _ in top] for top in want.outputs[0].top_logprobs]
    # streaming: the outputs of a step that emits several tokens carry them all, in order
    engine = Engine(llm.engine.config, stream=True)
    engine.add_request(prompts[0], params, request_id="a")
    streamed = []
    while engine.has_unfinished():
        streamed += [t for out in engine.step() for t in out.new_token_ids]
    assert streamed == plain[0].outputs[0].token_ids


def test_verification_graph_inputs_give_the_same_outputs(tiny_models, no_back_off):
    """VerifyGraphs' layout (each sequence's newest token and drafts packed at the front, the rest one
    padding sequence on the scratch block, sampled rows the first ones), run eagerly on CPU through what
    a captured graph would replay: outputs token-identical."""
    from llmctl.runtime.verify_graphs import VerifyGraphs

    prompts, params = mixed_prompts(24, seed=5)
    options = dict(dtype="float32", max_num_seqs=12, max_num_batched_tokens=96, block_size=16, max_model_len=512)
    plain = LLM(tiny_models["llama"], **options).generate(prompts, params)
    llm = LLM(tiny_models["llama"], speculative={**NGRAM, "max_batch": 12}, **options)
    runner = llm.engine.model_runner
    graphs = VerifyGraphs(runner.model, runner.kv_caches, 12, 4, runner.max_blocks_per_seq, 512, 16,
                          runner.scratch_block, runner.device)
    sizes = []
    real_replay = graphs.replay
    graphs.replay = lambda rows, size: sizes.append(size) or real_replay(rows, size)
    runner.verify_graphs = graphs
    results = llm.generate(prompts, params)
    assert [r.outputs[0].token_ids for r in results] == [r.outputs[0].token_ids for r in plain]
    assert len(set(sizes)) >= 3, f"several graph sizes were meant to be used, got {sorted(set(sizes))}"
    assert llm.engine.speculator.num_accepted_tokens > 0
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_large_batches_do_not_speculate(tiny_models):
    prompts, params = mixed_prompts(12, seed=5)
    llm = LLM(tiny_models["llama"], dtype="float32", speculative={**NGRAM, "max_batch": 4})
    plain = LLM(tiny_models["llama"], dtype="float32").generate(prompts, params)
    results = llm.generate(prompts, params)
    assert [r.outputs[0].token_ids for r in results] == [r.outputs[0].token_ids for r in plain]
    # 12 requests at once: only the last few still running may speculate
    spec = llm.engine.speculator
    assert spec.num_drafts < sum(p.max_tokens for p in params) // 4


def test_a_request_that_misses_backs_off():
    spec = Speculator(SpeculativeConfig())
    seq = Sequence("a", [1, 2, 3], SamplingParams())
    for misses, skip in ((1, 1), (2, 3), (3, 7), (9, 15)):
        while seq.spec_misses < misses:
            spec.settle(seq, [4, 5], 0)
        assert seq.spec_skip == skip
    spec.settle(seq, [4, 5], 1)
    assert (seq.spec_misses, seq.spec_skip) == (0, 0)


def test_no_match_is_a_miss_and_a_step_where_all_skip_keeps_the_overlap():
    """Text that never repeats: the step does not wait for drafts it will not get (`wanted` is False while every
    running sequence skips), and the skipped steps still count down when nothing speculates."""
    spec = Speculator(SpeculativeConfig())
    seq = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=100))  # last token 3 occurs nowhere before it
    seq.max_output_tokens, seq.num_computed_tokens = 100, 2  # one token left to compute: a decode step
    assert spec.wanted([seq])
    spec.propose([seq])
    assert seq.draft_token_ids == [] and (seq.spec_misses, seq.spec_skip) == (1, 1)
    assert not spec.wanted([seq])
    spec.clear([seq])
    assert seq.spec_skip == 0 and spec.wanted([seq])
    seq.num_computed_tokens, seq.num_pending = 3, 1  # overlapped: its newest token is still on the GPU
    seq.spec_skip = 2
    spec.clear([seq])
    assert seq.spec_skip == 1
    prefilling = Sequence("b", [5, 6, 5, 6, 5], SamplingParams(max_tokens=100))  # would find drafts, later
    assert not spec.wanted([prefilling]), "a sequence still prefilling brings no drafts: no reason to wait"


def test_a_token_the_lookup_would_have_guessed_ends_the_back_off():
    """While a sequence skips, each token it is given is checked against the guess of the tokens before it:
    a right guess means its text repeats now, so it speculates at once; a wrong one leaves the back-off."""
    spec = Speculator(SpeculativeConfig())
    seq = Sequence("a", [7, 1, 2, 3, 9, 1, 2], SamplingParams(max_tokens=100))
    for _ in range(3):
        spec.settle(seq, [4, 5], 0)
    assert (seq.spec_misses, seq.spec_skip) == (3, 7)
    seq.append_token(5)  # the lookup on ...1, 2 guessed 3
    spec.observe(seq)
    assert (seq.spec_misses, seq.spec_skip) == (3, 7)
    seq.append_token(1)  # ... 2, 5 -> no earlier 5: no guess
    spec.observe(seq)
    assert seq.spec_skip == 7
    seq.append_token(2)  # ... 5, 1 -> guessed 2 (after the latest earlier 1)
    spec.observe(seq)
    assert (seq.spec_misses, seq.spec_skip) == (0, 0)


def test_requests_with_penalties_or_grammars_do_not_speculate(tiny_models):
    prompts, _ = mixed_prompts(4, seed=9)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, repetition_penalty=1.3)
    llm = LLM(tiny_models["llama"], dtype="float32", speculative=NGRAM)
    results = llm.generate(prompts, params)
    assert llm.engine.speculator.num_drafts == 0
    plain = LLM(tiny_models["llama"], dtype="float32").generate(prompts, params)
    assert [r.outputs[0].token_ids for r in results] == [r.outputs[0].token_ids for r in plain]


def test_trim_returns_the_blocks_past_the_tokens():
    manager = BlockManager(8, 4)
    seq = Sequence("a", list(range(5)), SamplingParams())
    manager.allocate(seq, 5 + 6)  # 5 tokens and 6 drafts: 3 blocks
    assert len(seq.block_table) == 3 and manager.num_free_blocks == 5
    manager.trim(seq, 6)
    assert len(seq.block_table) == 2 and manager.num_free_blocks == 6


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# chi-square's 99.9% quantiles by degrees of freedom: a correct sampler fails one run in a thousand
CHI2_999 = {4: 18.47, 7: 24.32}


@pytest.mark.parametrize("draft", [0, 2, 5])
def test_verified_tokens_follow_the_target_distribution(draft):
    """A likely draft, a middling one and one the filters remove (top_k 5): each row's token is distributed
    as the model's p, whether the draft is accepted or not."""
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -9.0])
    rows = 20000
    params = [SamplingParams(temperature=0.8, top_k=5)] * rows
    batch = SamplingBatch.build(params, [[]] * rows, [[]] * rows, [None] * rows, 6, torch.device("cpu"),
                                drafts=[draft] * rows)
    tokens = Sampler().sample(logits.repeat(rows, 1), batch)
    p = torch.softmax(logits / 0.8, dim=0)
    p[5] = 0.0
    p /= p.sum()
    counts = torch.bincount(tokens, minlength=6).double()
    assert counts[5] == 0
    assert chi_square(counts[:5], p[:5].double()) < CHI2_999[4]


def test_sampled_engine_outputs_follow_the_model(tiny_model, tmp_path):
    """A model with 8 tokens, prompts that repeat (so drafts come), temperature 1: the second and third
    tokens (the first ones drafts can reach) are distributed as transformers' model says."""
    import transformers

    model = tiny_model(tmp_path / "v8", "llama", vocab_size=8)
    prompt = [1, 2, 3, 4, 5, 6, 7, 0] * 3
    n = 4000
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True)  # (seeded ones do not speculate)
    llm = LLM(model, dtype="float32", max_num_seqs=512, speculative={**NGRAM, "num_tokens": 2, "max_batch": 512})
    torch.manual_seed(0)  # the default generator's draws: one fixed sample, not a flaky one
    outs = [r.outputs[0].token_ids for r in llm.generate([prompt] * n, params)]
    spec = llm.engine.speculator
    assert spec.num_accepted_tokens > 500 and spec.num_draft_tokens - spec.num_accepted_tokens > 500
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        p1 = hf(torch.tensor([prompt])).logits[0, -1].softmax(-1).double()
        after1 = torch.tensor([prompt + [t] for t in range(8)])
        p2_given = hf(after1).logits[:, -1].softmax(-1).double()  # [t1, t2]
        after2 = torch.tensor([prompt + [a, b] for a in range(8) for b in range(8)])
        p3_given = hf(after2).logits[:, -1].softmax(-1).double().view(8, 8, 8)  # [t1, t2, t3]
    p2 = p1 @ p2_given
    p3 = torch.einsum("a,ab,abc->c", p1, p2_given, p3_given)
    for position, p in ((1, p2), (2, p3)):
        counts = torch.bincount(torch.tensor([o[position] for o in outs]), minlength=8).double()
        assert chi_square(counts, p) < CHI2_999[7], (position, counts / n, p)


def test_a_seeded_sampled_request_gives_the_same_tokens_whatever_runs_beside_it():
    """It does not speculate: a verified step draws once per row from its generator, and the rows a step gives
    it depend on the batch (max_batch, the budget, the back-off), so alone and beside 7 others its tokens
    differed from token 12 on (found by review)."""
    from llmctl.reference import default_model_path
    from llmctl.reference.prompts import code_edit_prompts

    prompts = [CODE_EDIT, *code_edit_prompts(7)]
    seeded = SamplingParams(temperature=0.7, max_tokens=60, seed=1234)
    other = SamplingParams(temperature=0.7, max_tokens=60)
    llm = LLM(str(default_model_path()), dtype="float32", max_model_len=1024, speculative=NGRAM)
    alone = llm.generate([CODE_EDIT], seeded)[0].outputs[0].token_ids
    crowd = llm.generate(prompts, [seeded] + [other] * 7)[0].outputs[0].token_ids
    assert alone == crowd
    plain = LLM(str(default_model_path()), dtype="float32", max_model_len=1024)
    assert plain.generate([CODE_EDIT], seeded)[0].outputs[0].token_ids == alone


def test_constrained_rows_beside_speculating_ones_keep_their_masks():
    """A structured request (never speculates) shares steps with speculating ones: its mask lands on its own
    logits row, not on a draft's, so its output still matches its pattern; the others are unchanged."""
    import re

    pytest.importorskip("llguidance")
    from llmctl.reference import default_model_path
    from llmctl.runtime.structured import StructuredOutput

    code = CODE_EDIT
    params = [SamplingParams(temperature=0.0, max_tokens=m) for m in (12, 40, 40)]
    structured = SamplingParams(temperature=0.0, max_tokens=20, structured=StructuredOutput("regex", r"[0-9]{3}-[0-9]{4}"))
    model = str(default_model_path())
    plain = LLM(model, dtype="float32").generate([code] * 3, params)
    # Two at a time: the structured request is admitted when the first ends, while the second speculates,
    # so its first token is sampled from a logits row after that one's drafts.
    llm = LLM(model, dtype="float32", speculative=NGRAM, max_num_seqs=2)
    out = llm.generate([code, code, "x = ", code], [params[0], params[1], structured, params[2]])
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", out[2].outputs[0].text)
    assert [out[i].outputs[0].token_ids for i in (0, 1, 3)] == [r.outputs[0].token_ids for r in plain]
    assert llm.engine.speculator.num_accepted_tokens > 0


@pytest.mark.parametrize("draft", ["self", "small"])
def test_a_draft_model_keeps_greedy_outputs_and_returns_every_block(tiny_models, tiny_model, tmp_path, draft):
    """The target as its own draft (every guess right) and a one-layer random draft (mostly wrong), under
    preemption and chunked prefill: outputs equal decoding without speculation; both caches end empty."""
    from test_generate_matches_hf import kv_block_bytes

    model = tiny_models["llama"]
    draft_dir = model if draft == "self" else tiny_model(tmp_path / "draft", "llama", seed=3, num_hidden_layers=1)
    prompts, params = mixed_prompts(32, seed=4)
    options = dict(dtype="float32", max_num_seqs=16, max_num_batched_tokens=96, block_size=16,
                   kv_cache_memory=48 * kv_block_bytes(model, 16), max_model_len=512)
    plain = LLM(model, **options).generate(prompts, params)
    spec = {"method": "draft", "draft_model": draft_dir, "num_tokens": 4, "max_batch": 32}
    llm = LLM(model, speculative=spec, **options)
    results = llm.generate(prompts, params)
    assert [r.outputs[0].token_ids for r in results] == [r.outputs[0].token_ids for r in plain]
    engine, s = llm.engine, llm.engine.speculator
    assert engine.scheduler.num_preemptions > 0
    if draft == "self":
        assert s.mean_accepted_length > 4.5, "a model drafting for itself is right nearly always"
    else:
        assert s.num_draft_tokens > s.num_accepted_tokens
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert s.draft.blocks.num_free_blocks == s.draft.blocks.num_blocks and not s.draft.shadows


def test_a_draft_model_with_another_vocabulary_is_refused(tiny_models, tiny_model, tmp_path):
    other = tiny_model(tmp_path / "v256", "llama", vocab_size=256)
    with pytest.raises(ValueError, match="the draft model's vocabulary has 256 tokens, the target's 512"):
        LLM(tiny_models["llama"], dtype="float32", speculative={"method": "draft", "draft_model": other})
    with pytest.raises(ValueError, match="a draft model is given with method draft, and only then"):
        SpeculativeConfig(method="draft")


def test_drafts_are_never_scheduled_after_a_pending_token():
    """A sequence whose newest token is still on the device (a step that did not speculate, overlapped)
    cannot bring drafts, which would have to follow that token: stale drafts are left out."""
    from llmctl.runtime.scheduler import Scheduler

    scheduler = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=64)
    seq = Sequence("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=10))
    seq.max_output_tokens = 10
    scheduler.add(seq)
    assert scheduler.postprocess(scheduler.schedule()) == [seq]
    seq.num_pending, seq.draft_token_ids = 1, [7, 8]
    batch = scheduler.schedule()
    assert (batch.num_new_tokens, batch.drafts) == ([1], [[]])
    seq.num_pending = 0
    seq.append_token(6)
    batch = scheduler.schedule()
    assert (batch.num_new_tokens, batch.drafts) == ([3], [[7, 8]])


def test_drafts_never_take_the_block_another_sequence_needs():
    """a's newest token fits its last block and its drafts need a new one; b's token needs the last free
    block. Drafts come once every running sequence has its own tokens: b keeps its block, a brings the drafts
    that fit its block (none here). Before, a's drafts took the block and b was preempted (found by review)."""
    from llmctl.runtime.scheduler import Scheduler

    scheduler = Scheduler(BlockManager(5, 4), max_num_seqs=4, max_num_batched_tokens=64)
    a = Sequence("a", [1, 2, 3, 4, 5, 6, 7], SamplingParams(max_tokens=20))  # 7 tokens: room for 1 more
    b = Sequence("b", [9, 8, 7, 6, 5, 4, 3, 2], SamplingParams(max_tokens=20))  # 8 tokens: 2 full blocks
    for seq in (a, b):
        seq.max_output_tokens = 20
        scheduler.add(seq)
    scheduler.postprocess(scheduler.schedule())  # both prefilled: 4 of the 5 blocks used
    a.append_token(1)
    b.append_token(1)
    a.draft_token_ids = [2, 3]
    batch = scheduler.schedule()
    assert (batch.num_new_tokens, batch.drafts, scheduler.num_preemptions) == ([1, 1], [[], []], 0)
    # with no block free, the drafts that fit the last block still go: 2 of 3 here
    scheduler = Scheduler(BlockManager(5, 4), max_num_seqs=4, max_num_batched_tokens=64)
    a = Sequence("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=20))  # 2 blocks: 2 slots after its next token
    b = Sequence("b", list(range(11)), SamplingParams(max_tokens=20))  # 3 blocks: its next token fits
    for seq in (a, b):
        seq.max_output_tokens = 20
        scheduler.add(seq)
    scheduler.postprocess(scheduler.schedule())
    a.append_token(1)
    b.append_token(1)
    a.draft_token_ids = [2, 3, 4]
    batch = scheduler.schedule()
    assert ([s.request_id for s in batch.seqs], batch.num_new_tokens, batch.drafts) == (["b", "a"], [1, 3], [[], [2, 3]])
    assert batch.num_decodes == 1 and scheduler.num_preemptions == 0


def test_a_draft_asked_again_before_its_sequence_moved_proposes_the_same(tiny_models):
    """A speculating sequence the scheduler then leaves out (no room in the step's token budget) is asked for
    drafts again with the same tokens: its shadow has computed all of them, and must still compute its last
    one to guess from (a step with a zero-token row is no decode step: on the GPU it broke graph staging)."""
    from llmctl.runtime.config import EngineConfig
    from llmctl.runtime.draft import DraftModel

    model = tiny_models["llama"]
    draft = DraftModel(EngineConfig(model=model, dtype="float32", max_model_len=256, max_num_seqs=4,
                                    kv_cache_memory=1 << 22, enable_prefix_caching=False), 512)
    rows: list[int] = []  # the tokens each row of each draft step computes
    run = draft.runner.run
    draft.runner.run = lambda batch, *a, **k: (rows.extend(batch.num_new_tokens), run(batch, *a, **k))[1]
    seq = Sequence("a", [5, 17, 99, 3, 42, 8], SamplingParams(max_tokens=16))
    other = Sequence("b", [7, 7, 1, 2], SamplingParams(max_tokens=16))
    seq.status = other.status = SequenceStatus.RUNNING  # (a waiting one's shadow is dropped: preempted)
    first = draft.propose({seq: 3})[seq]
    assert len(first) == 3
    other_first = draft.propose({other: 2, seq: 3})  # seq unchanged, beside a sequence seen for the first time
    assert other_first[seq] == first and len(other_first[other]) == 2
    assert draft.propose({seq: 3})[seq] == first
    assert min(rows) >= 1
