"""Chat templates and stop tokens come from each model's own files: the template saved with the tokenizer
(chat_template.jinja, or a processor's chat_template.json), the eos lists of generation_config.json, and
the tokenizer's eos. The templates below are short stand-ins in each family's framing (the real ones
are the models' own files); what is tested is that llmctl reads and honours what a directory holds."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from llmctl.checkpoint.loader import eos_token_ids, load_tokenizer
from llmctl.runtime import LLM, SamplingParams
from llmctl.runtime.server.prompts import Prompts

# family -> (special tokens, chat template, generation_config eos tokens, tokenizer eos, what a user turn renders to)
FAMILIES = {
    "gemma": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
              "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
              "\n{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
              ["<eos>", "<end_of_turn>"], "<eos>",
              ["<bos>", "<start_of_turn>", "user", "hello", "<end_of_turn>", "<start_of_turn>", "model"]),
    "qwen": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
             "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
             ["<|im_end|>", "<|endoftext|>"], "<|im_end|>",
             ["<|im_start|>", "user", "hello", "<|im_end|>", "<|im_start|>", "assistant"]),
    "phi3": (["<s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"],
             "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
             ["<|endoftext|>", "<|assistant|>", "<|end|>"], "<|endoftext|>",
             ["<|user|>", "hello", "<|end|>", "<|assistant|>"]),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
               ["<|end_of_text|>", "<|eot_id|>"], "<|eot_id|>",
               ["<|begin_of_text|>", "<|start_header_id|>", "user", "<|end_header_id|>", "hello", "<|eot_id|>",
                "<|start_header_id|>", "assistant", "<|end_header_id|>"]),
}
WORDS = ["<unk>", "user", "assistant", "model", "system", "hello"]


def write_tokenizer(model_dir, family: str, legacy_template: bool = False) -> dict[str, int]:
    """A word-level tokenizer with the family's special tokens at ids 100+, its template, its eos lists."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special, template, gen_eos, tok_eos, _ = FAMILIES[family]
    vocab = {w: i for i, w in enumerate(WORDS)} | {t: 100 + i for i, t in enumerate(special)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = special[0] if "bos" in special[0] or "begin" in special[0] or special[0] == "<s>" else None
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=tok_eos, bos_token=bos,
                                   additional_special_tokens=special)
    fast.chat_template = template
    fast.save_pretrained(model_dir)
    if legacy_template:  # the template only where a processor keeps it
        (model_dir / "chat_template.jinja").unlink()
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
        (model_dir / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [vocab[t] for t in gen_eos]}))
    return vocab


@pytest.fixture
def model_copy(tiny_models, tmp_path):
    def copy(family: str, legacy: bool = False):
        model_dir = tmp_path / family
        shutil.copytree(tiny_models["llama"], model_dir)
        return model_dir, write_tokenizer(model_dir, family, legacy)
    return copy


@pytest.mark.parametrize("legacy", [False, True], ids=["jinja", "chat_template.json"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_model_s_own_template_and_stop_tokens(model_copy, family, legacy):
    model_dir, vocab = model_copy(family, legacy)
    special, _, gen_eos, tok_eos, rendered = FAMILIES[family]
    tokenizer = load_tokenizer(model_dir)
    prompts = Prompts(tokenizer, max_model_len=128)
    try:
        ids = asyncio.run(prompts.chat([{"role": "user", "content": "hello"}]))
    finally:
        prompts.close()
    assert ids == [vocab[w] for w in rendered]
    assert eos_token_ids(model_dir, {}, tokenizer) == {vocab[t] for t in gen_eos} | {vocab[tok_eos]}


def test_every_listed_eos_ends_a_reply(model_copy, tiny_models):
    """generation_config lists two ids (Gemma's <eos> and <end_of_turn>): sampling either one stops."""
    model_dir, vocab = model_copy("gemma")
    probe = LLM(tiny_models["llama"], dtype="float32", max_model_len=128)
    prompt = [5, 9, 200, 31, 4]
    full = probe.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [vocab["<eos>"], full[3]]}))
    llm = LLM(str(model_dir), dtype="float32", max_model_len=128)
    assert full[3] in llm.engine.eos_token_ids and vocab["<eos>"] in llm.engine.eos_token_ids
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == full[: full.index(full[3]) + 1]


def test_the_tokenizer_s_eos_counts_where_no_generation_config_names_it(model_copy):
    """A chat fine-tune with no generation_config.json: the config's eos and the tokenizer's both stop."""
    model_dir, vocab = model_copy("qwen")
    (model_dir / "generation_config.json").unlink()
    tokenizer = load_tokenizer(model_dir)
    assert eos_token_ids(model_dir, {"eos_token_id": vocab["<|endoftext|>"]}, tokenizer) == {
        vocab["<|endoftext|>"], vocab["<|im_end|>"]}
    assert eos_token_ids(model_dir, {}, None) == frozenset()
