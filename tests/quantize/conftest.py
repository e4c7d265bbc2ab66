"""Tiny Llama models with a real (tiny) tokenizer, so calibration text, GPTQModel and the runtime all work."""

from __future__ import annotations

import pytest

TINY_QUANT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, bos_token_id=0,
                  eos_token_id=1, pad_token_id=None, tie_word_embeddings=False)


def make_tokenizer(path, vocab_size: int = 512) -> None:
    """A byte-level BPE trained on the builtin calibration text, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llmctl.quantize.calibration import BUILTIN, load_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(load_texts(BUILTIN)[:16], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(str(path))


def make_quant_model(path, seed: int = 0, dtype=None, **overrides) -> str:
    """A random Llama in dtype (fp16 by default; hidden 128, intermediate 256: groups of 32, 64 and 128 all
    fit) + tokenizer."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_QUANT, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # wider than the default init: logits separate, quantization error shows
                p.normal_(0.0, 0.08)
    model.to(dtype or torch.float16).save_pretrained(str(path))
    make_tokenizer(path)
    return str(path)


@pytest.fixture(scope="session")
def quant_model():
    """make_quant_model, for tests that need a model of their own (another dtype, say)."""
    return make_quant_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return make_quant_model(tmp_path_factory.mktemp("quant") / "llama")
