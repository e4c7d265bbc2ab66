"""The sampler against transformers' logits processors, hand computations and empirical distributions."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llmctl.runtime.layers.sampler import (
    Sampler,
    SamplingBatch,
    apply_penalties,
    filtered_probs,
    make_generator,
)
from llmctl.runtime.sampling_params import SamplingParams as SP
from llmctl.runtime.sequence import Sequence

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def build(params, vocab_size, device, prompts=None, outputs=None, generators=None) -> SamplingBatch:
    prompts = prompts if prompts is not None else [[] for _ in params]
    outputs = outputs if outputs is not None else [[] for _ in params]
    if generators is None:
        generators = [None if p.seed is None else make_generator(p.seed, device) for p in params]
    return SamplingBatch.build(params, prompts, outputs, generators, vocab_size, device)


def sample(params, logits, device, **kwargs):
    return Sampler()(logits.to(device), build(params, logits.shape[1], device, **kwargs))


def transformers_warp(logits_row: torch.Tensor, p: SP) -> torch.Tensor:
    """transformers' warpers in its own order: temperature, top-k, top-p, min-p. [1, V] in, [1, V] out."""
    warpers = [TemperatureLogitsWarper(p.temperature)]
    if p.top_k is not None:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        warpers.append(MinPLogitsWarper(p.min_p))
    scores = logits_row.float().clone()
    for w in warpers:
        scores = w(None, scores)
    return scores


def chi_square(tokens: list[int], probs: torch.Tensor) -> float:
    counts = Counter(tokens)
    n = len(tokens)
    assert all(probs[t] > 0 for t in counts), "a token outside the allowed set was drawn"
    return sum((counts.get(t, 0) - n * float(q)) ** 2 / (n * float(q)) for t, q in enumerate(probs) if q > 0)


def test_greedy_equals_argmax_on_fast_path(device):
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = torch.randn(16, 1000).to(dtype)
        logits[0, 3] = logits[0, 7] = logits[0].max() + 1  # ties go to the first index, like torch.argmax
        batch = build([SP(temperature=0.0)] * 16, 1000, device)
        assert (
            batch.all_greedy and not batch.has_penalties and batch.temperature is None and batch.top_p is None
        )
        out = Sampler()(logits.to(device), batch)
        assert out.token_ids == logits.float().argmax(dim=-1).tolist()
        assert out.token_ids[0] == 3
        assert out.logprobs == [None] * 16 and out.top_logprobs == [None] * 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repetition_penalty_matches_transformers(device, dtype):
    torch.manual_seed(1)
    vocab, rows = 200, 12
    logits = (torch.randn(rows, vocab) * 3).to(dtype)
    penalties = [1.3, 0.7, 2.0, 1.1] * 3
    logits[::2, :5] = (
        -abs(logits[::2, :5].float()).to(dtype) - 1
    )  # negative logits are multiplied, not divided
    prompts = [torch.randint(0, vocab, (20,)).tolist() + [int(logits[i].argmax())] for i in range(rows)]
    outputs = [torch.randint(0, vocab, (5,)).tolist() + [0, 1] for i in range(rows)]
    params = [SP(temperature=0.0, repetition_penalty=p) for p in penalties]
    batch = build(params, vocab, device, prompts, outputs)
    penalized = apply_penalties(logits.to(device).float(), batch).cpu()
    changed = 0
    for i, p in enumerate(penalties):
        ids = torch.tensor([prompts[i] + outputs[i]])
        expected = RepetitionPenaltyLogitsProcessor(p)(ids, logits[i : i + 1].float().clone())
        assert torch.equal(penalized[i : i + 1], expected), f"row {i}"
        changed += int(expected.argmax()) != int(logits[i].float().argmax())
    tokens = Sampler()(logits.to(device), batch).token_ids
    assert tokens == penalized.argmax(dim=-1).tolist()
    assert changed >= 3, "the penalty should change some greedy choices, or this test proves nothing"


def test_presence_and_frequency_penalties_by_hand(device):
    torch.manual_seed(2)
    vocab = 50
    logits = torch.randn(3, vocab)
    prompts = [[int(logits[i].argmax())] * 4 for i in range(3)]  # prompt tokens are not penalized
    outputs = [[5, 5, 5, 9], [int(logits[1].argmax())] * 3 + [7], []]
    params = [
        SP(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.25),
        SP(temperature=0.0, frequency_penalty=1.0, presence_penalty=-0.5),
        SP(temperature=0.0),
    ]
    expected = logits.clone()
    for i, p in enumerate(params):
        for token, count in Counter(outputs[i]).items():
            expected[i, token] -= p.frequency_penalty * count + p.presence_penalty
    batch = build(params, vocab, device, prompts, outputs)
    assert batch.seen is None  # no repetition penalty: no prompt mask built
    torch.testing.assert_close(apply_penalties(logits.to(device), batch).cpu(), expected, rtol=0, atol=1e-6)
    assert Sampler()(logits.to(device), batch).token_ids == expected.argmax(dim=-1).tolist()
    assert expected[1].argmax() != logits[1].argmax()



def test_penalties_read_token_arrays_like_lists():
    """The runner hands the sampler Sequence.token_array() slices (no per-step list conversion): same
    tensors as from lists, and the array follows every append, also past its first capacity."""
    gen = torch.Generator().manual_seed(4)
    vocab = 97
    seqs = []
    for i in range(3):
        prompt = torch.randint(0, vocab, (5 + 40 * i,), generator=gen).tolist()
        seqs.append(Sequence(str(i), prompt, SP(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4,
                                                presence_penalty=0.2 * i)))
    for _ in range(70):
        for seq in seqs:
            seq.token_array()  # read between appends, as every step does
            seq.append_token(int(torch.randint(0, vocab, (), generator=gen)))
    arrays = [seq.token_array() for seq in seqs]
    assert all(np.array_equal(a, seq.token_ids) and a.dtype == np.int64 for a, seq in zip(arrays, seqs))
    params = [seq.sampling_params for seq in seqs]
    from_lists = build(params, vocab, "cpu", [q.prompt_token_ids for q in seqs], [q.output_token_ids for q in seqs])
    from_arrays = build(params, vocab, "cpu", [a[: q.num_prompt_tokens] for a, q in zip(arrays, seqs)],
                        [a[q.num_prompt_tokens:] for a, q in zip(arrays, seqs)])
    assert torch.equal(from_lists.seen, from_arrays.seen)
    assert torch.equal(from_lists.output_counts, from_arrays.output_counts)
    assert SP(repetition_penalty=1.1).has_penalties and not SP().has_penalties

FILTERS = {
    "top_k": lambda g: dict(top_k=int(torch.randint(1, 12, (), generator=g))),
    "top_p": lambda g: dict(top_p=float(torch.rand((), generator=g)) * 0.9 + 0.05),
    "min_p": lambda g: dict(min_p=float(torch.rand((), generator=g)) * 0.5),
    "all": lambda g: dict(
        top_k=int(torch.randint(1, 30, (), generator=g)),
        top_p=float(torch.rand((), generator=g)) * 0.9 + 0.05,
        min_p=float(torch.rand((), generator=g)) * 0.3,
    ),
}


@pytest.mark.parametrize("kind", FILTERS)
def test_filters_match_transformers_warpers(device, kind):
    g = torch.Generator().manual_seed(3)
    rows, vocab, repeats = 48, 40, 60
    logits = torch.randn(rows, vocab, generator=g) * 2
    params = [
        SP(temperature=float(torch.rand((), generator=g)) + 0.3, **FILTERS[kind](g)) for _ in range(rows)
    ]
    params[0] = SP(temperature=0.9)  # an unfiltered row shares the batch with filtered ones
    allowed = torch.cat([transformers_warp(logits[i : i + 1], p) for i, p in enumerate(params)]).isfinite()
    assert allowed.sum(dim=-1).min() >= 1 and allowed.sum(dim=-1).max() > 1
    batch = build(params, vocab, device)
    probs = filtered_probs(logits.to(device) / batch.temperature, batch).cpu()
    assert torch.equal(probs > 0, allowed)

    torch.manual_seed(4)
    tokens = torch.tensor(sample(params * repeats, logits.repeat(repeats, 1), device).token_ids).view(
        repeats, rows
    )
    assert allowed.gather(1, tokens.T).all(), "a filtered-out token was drawn"
    drawn = torch.zeros_like(allowed).scatter_(1, tokens.T, True)
    assert drawn[0].sum() > allowed[1:].sum(dim=-1).float().mean(), "the unfiltered row should range widely"


def test_top_p_keeps_the_smallest_set_that_reaches_p(device):
    logits = torch.zeros(1, 4)  # probabilities exactly 0.25 each: the cumulative sum hits 0.5 exactly
    expected = TopPLogitsWarper(0.5)(None, logits.clone()).isfinite().sum()
    batch = build([SP(top_p=0.5)], 4, device)
    assert int((filtered_probs(logits.to(device), batch) > 0).sum()) == int(expected) == 2


@pytest.mark.parametrize("seeded", [False, True])
def test_empirical_distribution_matches_filtered_distribution(device, seeded):
    logits = torch.tensor([[2.0, 1.6, 1.2, 0.8, 0.3, -0.5, -1.0, -3.0]])
    p = SP(temperature=0.8, top_k=6, top_p=0.9, min_p=0.08, seed=0 if seeded else None)
    expected = transformers_warp(logits, p).softmax(dim=-1)[0]
    assert 3 <= int((expected > 0).sum()) < 6  # each filter matters here
    n = 3000 if seeded else 20000
    torch.manual_seed(5)
    generators = [make_generator(s, device) for s in range(n)] if seeded else None
    tokens = sample([p] * n, logits.expand(n, -1), device, generators=generators).token_ids
    # 0.9999 quantile of chi-square with <= 4 degrees of freedom is about 23.5
    assert chi_square(tokens, expected) < 23.5
    unfiltered = (logits[0] / p.temperature).softmax(dim=-1)
    assert (
        sum((Counter(tokens).get(t, 0) - n * q) ** 2 / (n * q) for t, q in enumerate(unfiltered.tolist()))
        > 100
    )


@pytest.mark.parametrize("temperature", [0.4, 2.5])
def test_temperature_scales_the_distribution(device, temperature):
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0]])
    n = 20000
    torch.manual_seed(6)
    tokens = sample([SP(temperature=temperature)] * n, logits.expand(n, -1), device).token_ids
    assert chi_square(tokens, (logits[0] / temperature).softmax(dim=-1)) < 23.5
    assert chi_square(tokens, logits[0].softmax(dim=-1)) > 100


def seeded_run(device, position: int, companions: list[SP], steps: list[torch.Tensor]) -> list[int]:
    """Tokens the seed-1234 request draws over several steps, sitting at `position` among `companions`."""
    target = SP(temperature=1.0, top_p=0.97, seed=1234)
    generator = make_generator(1234, device)
    params = companions[:position] + [target] + companions[position:]
    outputs = [[1, 2, 2, 3]] * len(params)
    tokens = []
    for logits_row in steps:
        companion_logits = torch.randn(len(companions), logits_row.shape[0])
        logits = torch.cat([companion_logits[:position], logits_row[None], companion_logits[position:]])
        generators = [
            generator if i == position else None if p.seed is None else make_generator(p.seed + 1, device)
            for i, p in enumerate(params)
        ]
        out = sample(
            params, logits, device, outputs=outputs, prompts=[[4, 5]] * len(params), generators=generators
        )
        tokens.append(out.token_ids[position])
    return tokens


def test_seeded_rows_reproduce_whatever_the_batch(device):
    torch.manual_seed(7)
    steps = [torch.randn(500) * 0.3 for _ in range(8)]
    alone = seeded_run(device, 0, [], steps)
    others = [
        SP(temperature=0.0, repetition_penalty=1.2),
        SP(top_k=5),
        SP(seed=9, min_p=0.2),
        SP(temperature=0.7, frequency_penalty=0.4, logprobs=3),
        SP(top_p=0.5, presence_penalty=1.0),
    ]
    torch.manual_seed(8)
    assert seeded_run(device, 0, others, steps) == alone
    torch.manual_seed(9)
    assert seeded_run(device, 3, others[::-1], steps) == alone
    assert seeded_run(device, 5, others, steps) == alone
    assert len(set(alone)) > 4, "flat logits: the seed, not the logits, should decide the tokens"


def test_different_seeds_and_unseeded_rows_vary(device):
    flat = torch.zeros(1, 1000)
    first = [sample([SP(seed=s)], flat, device).token_ids[0] for s in range(20)]
    assert len(set(first)) > 10
    assert sample([SP(seed=3)], flat, device).token_ids == sample([SP(seed=3)], flat, device).token_ids
    unseeded = [sample([SP()], flat, device).token_ids[0] for _ in range(20)]
    assert len(set(unseeded)) > 10
    assert len(set(sample([SP()] * 64, flat.expand(64, -1), device).token_ids)) > 40  # rows draw separately


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("every_row_asks", [False, True])
def test_logprobs_are_raw_log_softmax_and_sorted(device, dtype, every_row_asks):
    torch.manual_seed(10)
    logits = (torch.randn(4, 300) * 2).to(dtype)
    params = [
        SP(temperature=0.0, logprobs=5, repetition_penalty=1.5),
        SP(temperature=0.5, logprobs=0),
        SP(temperature=0.0, logprobs=3 if every_row_asks else None),
        SP(temperature=1.3, top_k=20, logprobs=20, frequency_penalty=1.0),
    ]
    out = sample(params, logits, device, prompts=[[1, 2, 3]] * 4, outputs=[[4, 4]] * 4)
    reference = torch.log_softmax(logits.float(), dim=-1)
    for i, p in enumerate(params):
        if p.logprobs is None:
            assert out.logprobs[i] is None and out.top_logprobs[i] is None
            continue
        assert out.logprobs[i] == pytest.approx(float(reference[i, out.token_ids[i]]), abs=1e-5)
        ids = [t for t, _ in out.top_logprobs[i]]
        values = [v for _, v in out.top_logprobs[i]]
        # bf16 logits tie often and tied ids may come in any order, so check values and id-value agreement.
        assert values == pytest.approx(reference[i].topk(p.logprobs).values.tolist(), abs=1e-5)
        assert [float(reference[i, t]) for t in ids] == pytest.approx(values, abs=1e-5)
        assert len(set(ids)) == len(ids) and values == sorted(values, reverse=True)
    assert out.top_logprobs[1] == []


def test_mixed_batch_in_one_call(device):
    torch.manual_seed(11)
    vocab = 128
    logits = torch.randn(6, vocab) * 2
    prompt = [int(logits[1].argmax()), 3, 4]
    params = [
        SP(temperature=0.0),
        SP(temperature=0.0, repetition_penalty=1.8),
        SP(top_k=1, temperature=0.7),
        SP(temperature=0.9, top_p=0.8, seed=42),
        SP(temperature=1.2, min_p=0.1, presence_penalty=2.0, logprobs=2),
        SP(temperature=0.0, logprobs=1, frequency_penalty=0.3),
    ]
    prompts = [[] for _ in params]
    prompts[1] = prompt
    outputs = [[7, 7]] * 6
    out = sample(params, logits, device, prompts=prompts, outputs=outputs)
    assert out.token_ids[0] == int(logits[0].argmax())
    expected = RepetitionPenaltyLogitsProcessor(1.8)(torch.tensor([prompt + [7, 7]]), logits[1:2].clone())
    assert out.token_ids[1] == int(expected.argmax()) != int(logits[1].argmax())
    assert out.token_ids[2] == int(logits[2].argmax())
    solo = sample([params[3]], logits[3:4], device, outputs=[[7, 7]]).token_ids[0]
    assert out.token_ids[3] == solo
    penalized = logits[4:5].clone()
    penalized[0, 7] -= 2.0
    assert transformers_warp(penalized, params[4])[0, out.token_ids[4]].isfinite()
    assert out.token_ids[5] == int(
        (logits[5] - torch.nn.functional.one_hot(torch.tensor(7), vocab) * 0.6).argmax()
    )
    assert [len(t) if t is not None else None for t in out.top_logprobs] == [None, None, None, None, 2, 1]


BAD_INPUTS = {
    "logits rows": (lambda d: sample([SP()] * 2, torch.randn(3, 10), d), "3 rows but the batch has 2"),
    "logits vocab": (lambda d: Sampler()(torch.randn(1, 11).to(d), build([SP()], 10, d)), "vocab 11"),
    "1-D logits": (lambda d: Sampler()(torch.randn(10).to(d), build([SP()], 10, d)), "2-D float"),
    "int logits": (
        lambda d: Sampler()(torch.ones(1, 10, dtype=torch.long).to(d), build([SP()], 10, d)),
        "2-D float",
    ),
    "prompt id": (
        lambda d: build(
            [SP(repetition_penalty=1.2), SP(repetition_penalty=1.1)], 10, d, prompts=[[1, 2], [10, 3]]
        ),
        "row 1 has prompt/output token id 10",
    ),
    "output id": (lambda d: build([SP(frequency_penalty=0.5)], 10, d, outputs=[[-1]]), "row 0 .* -1"),
    "row counts": (lambda d: build([SP(), SP()], 10, d, prompts=[[1]]), "prompt_token_ids has 1 rows"),
    "no generator": (lambda d: build([SP(seed=1)], 10, d, generators=[None]), "seed=1 but no generator"),
    "huge seed": (lambda d: make_generator(2**64, d), "64 bits"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_value_error(device, case):
    call, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        call(device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_never_waits_on_the_gpu():
    device = torch.device("cuda")
    params = [
        SP(temperature=0.0),
        SP(repetition_penalty=1.2, top_p=0.9, seed=1),
        SP(top_k=50, min_p=0.05),
        SP(frequency_penalty=0.5, logprobs=5),
    ] * 64
    logits = torch.randn(len(params), 32000, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = build(
            params, 32000, device, prompts=[[1, 2, 3]] * len(params), outputs=[[4, 5]] * len(params)
        )
        token_ids = Sampler().sample(logits, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert token_ids.shape == (len(params),)


def test_logit_bias_adds_to_the_logits_and_leaves_logprobs_raw(device):
    """+100 makes a token win, -100 makes the winner lose, greedy or sampled; logprobs are the model's own."""
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    best = logits.argmax(dim=-1)
    params = [SP(temperature=0.0, logit_bias={7: 100.0}, logprobs=1),
              SP(temperature=0.0, logit_bias={int(best[1]): -100.0}),
              SP(temperature=1.0, seed=3, logit_bias={11: 100.0}),
              SP(temperature=0.0)]  # no bias: its row is untouched
    out = sample(params, logits, device)
    assert out.token_ids[0] == 7 and out.token_ids[2] == 11 and out.token_ids[3] == int(best[3])
    assert out.token_ids[1] == int(logits[1].clone().index_fill_(0, best[1], float("-inf")).argmax())
    assert out.logprobs[0] == pytest.approx(float(torch.log_softmax(logits[0], -1)[7]), abs=1e-5)
    x = apply_penalties(logits.to(device).clone(), build(params, 50, device))
    assert float(x[0, 7] - logits[0, 7]) == pytest.approx(100.0) and torch.equal(x[3].cpu(), logits[3])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build([SP(logit_bias={50: 1.0})], 50, device)
    with pytest.raises(ValueError, match=r"logit_bias values must be in \[-100, 100\]"):
        SP(logit_bias={1: 200.0})
