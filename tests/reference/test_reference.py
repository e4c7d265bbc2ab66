"""The shipped reference model: within its constraints, loadable offline by transformers, and trained."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import llmctl.reference as reference
from llmctl.reference import DATA_DIR, MODEL_DIR, default_model_path
from llmctl.reference.data import read_calibration, read_heldout

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MB = 1_000_000
PYTHON_WORDS = re.compile(r"\b(def|return|self|import|class|if|for|in|is|not|None|assert|raise)\b")


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def model(offline):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32, local_files_only=True).eval()


@pytest.fixture(scope="module")
def tokenizer(offline):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)


@pytest.fixture(scope="module")
def config():
    return json.loads((MODEL_DIR / "config.json").read_text())


@pytest.fixture(scope="module")
def report():
    return json.loads((MODEL_DIR / "training_report.json").read_text())


def test_import_does_not_load_torch():
    code = "import sys, llmctl.reference; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_missing_model_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(reference, "MODEL_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"missing config\.json, model\.safetensors"):
        reference.default_model_path()


def test_config_exercises_quantization_and_gqa_paths(config):
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] % 128 == 0
    assert config["intermediate_size"] % 128 == 0
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["num_hidden_layers"] >= 4
    assert config["torch_dtype"] == "float16"


def test_sizes_fit_the_package_budget():
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 10 * MB
    assert sum(f.stat().st_size for f in MODEL_DIR.iterdir()) <= 9.5 * MB
    assert (DATA_DIR / "heldout.txt.gz").stat().st_size <= 600_000
    assert (DATA_DIR / "calibration.jsonl.gz").stat().st_size <= 300_000


def test_weights_are_fp16(model):
    from safetensors import safe_open

    with safe_open(str(MODEL_DIR / "model.safetensors"), "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"F16"}  # noqa: SIM118 (safe_open is not iterable)


def test_shipped_data_matches_the_manifest():
    manifest = json.loads((DATA_DIR / "corpus.json").read_text())
    assert [doc.path for doc in read_heldout()] == manifest["heldout_paths"]
    assert len(read_calibration()) == 128


def test_tokenizer_round_trips(tokenizer):
    text = read_heldout()[0].text[:3000] + "\ncafé ✓\t\r\n"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_renders_role_markers(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|bos|><|system|>\nBe brief.<|eos|>\n<|user|>\nhi<|eos|>\n<|assistant|>\n"
    ids = tokenizer(rendered, add_special_tokens=False).input_ids
    assert ids[:2] == tokenizer.convert_tokens_to_ids(["<|bos|>", "<|system|>"])


def test_greedy_generation_on_a_heldout_prompt_looks_like_python(model, tokenizer):
    # Up to the first function signature; ending before the newline lets the model pick the indentation token.
    text = read_heldout()[0].text
    prompt = text[: text.index(":\n", text.index("\ndef ")) + 1]
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
    text = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert len(PYTHON_WORDS.findall(text)) >= 3, text
    assert sum(c.isascii() for c in text) >= 0.95 * len(text), text


def test_recorded_perplexity_is_far_below_the_unigram_baseline(report):
    assert report["heldout_perplexity"] * 5 < report["unigram_perplexity"]


def test_perplexity_reproduces_on_the_first_windows(report):
    from llmctl.reference.evaluate import heldout_perplexity

    first = heldout_perplexity(max_windows=4)
    assert first["tokens"] == 4 * 1023
    assert first["perplexity"] * 5 < report["unigram_perplexity"]
