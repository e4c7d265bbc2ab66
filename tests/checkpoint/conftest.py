"""Tiny Llama checkpoints quantized by the real libraries (llm-compressor, transformers' FP8 code), and the
libraries' own dense view of them: what the format readers are held to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, bos_token_id=0,
            eos_token_id=1, pad_token_id=None, tie_word_embeddings=False)


def make_tokenizer(path) -> None:
    """A word-level tokenizer over the tiny vocabulary ("w0".."w511"): llm-compressor wants a processor
    once it is given calibration data."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(TINY["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w0", eos_token="w1", unk_token="w2"
                            ).save_pretrained(str(path))


def make_llama(path, dtype: torch.dtype, seed: int = 0) -> str:
    """A random Llama saved in dtype, with weights wide enough that quantization error shows in the logits."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.to(dtype).save_pretrained(str(path))
    make_tokenizer(path)
    return str(path)


@pytest.fixture(scope="session")
def base_models(tmp_path_factory) -> dict[torch.dtype, str]:
    root = tmp_path_factory.mktemp("base")
    return {dtype: make_llama(root / str(dtype).removeprefix("torch."), dtype)
            for dtype in (torch.bfloat16, torch.float16)}


def calibration_set(samples: int = 8, tokens: int = 32):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, TINY["vocab_size"], (samples, tokens), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def compress_with_llm_compressor(base: str, out, modifier: str, groups: dict, calibrate: bool = False,
                                 fmt: str | None = None) -> str:
    """base quantized by llm-compressor's `oneshot` (QuantizationModifier: RTN; GPTQModifier) with explicit
    config groups, saved compressed as llm-compressor saves (in the format it infers, or fmt)."""
    import transformers
    from compressed_tensors.quantization import QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    schemes = {name: QuantizationScheme.model_validate({"targets": ["Linear"], **g})
               for name, g in groups.items()}
    cls = {"rtn": QuantizationModifier, "gptq": GPTQModifier}[modifier]
    data = dict(dataset=calibration_set(), processor=transformers.AutoTokenizer.from_pretrained(base),
                num_calibration_samples=8, max_seq_length=32) if calibrate else {}
    oneshot(model=model, recipe=cls(config_groups=schemes, ignore=["lm_head"]), **data)
    model.save_pretrained(str(out), save_compressed=True, quantization_format=fmt)
    return str(out)


def load_with_library(path, **kwargs):
    """The checkpoint as its library loads it dense on the CPU: compressed-tensors decompresses (in the
    scale's dtype), transformers' Fp8Dequantize folds FP8 scales in; activations stay unquantized, as llmctl
    runs them."""
    import transformers

    quant_config = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
    if quant_config["quant_method"] == "compressed-tensors":
        pytest.importorskip("compressed_tensors")
        from compressed_tensors.quantization.lifecycle.helpers import disable_quantization
        from transformers import CompressedTensorsConfig

        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), quantization_config=CompressedTensorsConfig(dequantize=True), **kwargs)
        model.apply(disable_quantization)  # the decompressed model would fake-quantize FP8 activations
    else:  # fp8, dequantized at load (as transformers does anyway without an FP8 GPU)
        from transformers import FineGrainedFP8Config

        dequantize = FineGrainedFP8Config(dequantize=True,
                                          modules_to_not_convert=quant_config.get("modules_to_not_convert"))
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), quantization_config=dequantize,
                                                                  **kwargs)
    return model.eval().requires_grad_(False)


def prompt_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(2, TINY["vocab_size"], (2, 24), generator=g)


def model_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(prompt_ids()).logits.float()


# The helpers as fixtures: test modules share them through pytest, not by importing this file. The
# libraries are the quantize-peers' kind: tests that need one skip where it is not installed.

@pytest.fixture(scope="session")
def llm_compress():
    pytest.importorskip("llmcompressor")
    return compress_with_llm_compressor


@pytest.fixture(scope="session")
def library_model():
    return load_with_library


@pytest.fixture(scope="session")
def logits():
    return model_logits
