"""FP8 checkpoints end to end: llm-compressor's FP8-dynamic layout (per-channel scales) and DeepSeek's
block-wise `quant_method: fp8`, made by `llmctl.bench.fp8_checkpoint` from a random Llama. On CPU their
weights are dequantized at load and the runtime equals transformers on those weights; on a Hopper GPU the
projections run as FP8 GEMMs, whose logits stay close to the dequantized path's (FP8 activations cost a
little precision, so the check is closeness, not equality)."""

from __future__ import annotations

import pytest
import torch

from llmctl.runtime import LLM, SamplingParams

PROMPTS = [[5, 17, 99, 3, 250], [7, 7, 7, 120, 44, 300, 2]]
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    import transformers

    from llmctl.bench.fp8_checkpoint import convert

    root = tmp_path_factory.mktemp("fp8")
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                      max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)  # logits that separate, so that a wrong weight shows
    model.to(torch.bfloat16).save_pretrained(root / "bf16")
    for scales in ("channel", "block"):
        convert(root / "bf16", root / scales, scales, "cpu")
    return {"bf16": str(root / "bf16"), "channel": str(root / "channel"), "block": str(root / "block")}


def first_logprobs(llm: LLM) -> list[dict[int, float]]:
    out = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=1, logprobs=5))
    return [dict(r.outputs[0].top_logprobs[0]) for r in out]


@pytest.mark.parametrize("scales", ["channel", "block"])
def test_fp8_checkpoints_dequantized_equal_transformers_on_the_same_weights(checkpoints, scales):
    from llmctl.quantize.dense import dense_model

    reference = dense_model(checkpoints[scales])  # llmctl's reader, into transformers' forward (fp32)
    got = first_logprobs(LLM(checkpoints[scales], dtype="float32", device="cpu", enforce_eager=True))
    for prompt, top in zip(PROMPTS, got):
        with torch.no_grad():
            expected = torch.log_softmax(reference(input_ids=torch.tensor([prompt])).logits[0, -1], -1)
        for token, logprob in top.items():
            assert logprob == pytest.approx(expected[token].item(), abs=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="FP8 GEMMs need a Hopper GPU")
@pytest.mark.parametrize("scales", ["channel", "block"])
def test_fp8_gemms_on_the_gpu_stay_close_to_the_dequantized_path(checkpoints, scales):
    from llmctl.runtime.layers.fp8_linear import Fp8Linear

    options = dict(dtype="bfloat16", device="cuda", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=512)
    dense = LLM(checkpoints[scales], kernel_backend="torch", enforce_eager=True, **options)
    want = first_logprobs(dense)
    del dense
    llm = LLM(checkpoints[scales], **options)
    fp8 = [m for m in llm.engine.model_runner.model.modules() if isinstance(m, Fp8Linear)]
    assert len(fp8) == 4 * 2 and all(m.loaded and m.block == (scales == "block") for m in fp8)
    assert all(m.dense is None for m in fp8)  # every projection runs as an FP8 GEMM
    got = first_logprobs(llm)
    for top_want, top_got in zip(want, got):
        best = next(iter(top_got))  # the greedy token: the reference's, or one it (nearly) ties with
        assert top_want.get(best, float("-inf")) >= next(iter(top_want.values())) - 0.05, (best, top_want)
        shared = set(top_want) & set(top_got)
        diffs = [abs(top_want[t] - top_got[t]) for t in shared]
        print(f"{scales}: top-5 shared {len(shared)}, logprob differences {[round(d, 3) for d in diffs]}")
        assert len(shared) >= 3 and max(diffs) < 0.5  # FP8 activations: a few % of each logit
    generated = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    assert all(len(r.outputs[0].token_ids) == 16 for r in generated)
