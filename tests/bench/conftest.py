"""Bench fixtures: the scripted stub server in its own process, and a runner for `llmctl bench ...`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from llmctl.cli import bench


def _start(ttft_ms: str, itl_ms: str, model: str):
    proc = subprocess.Popen([sys.executable, "-m", "llmctl.bench.stub_server", "--port", "0", "--model", model,
                             "--ttft-ms", ttft_ms, "--itl-ms", itl_ms], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise RuntimeError(f"the stub did not start: {line!r}")
    return proc, line.split()[-1]


@pytest.fixture
def stub():
    """stub(ttft_ms="100,200", itl_ms="30") starts a stub server process on a free loopback port and returns
    its URL; every one started is stopped after the test."""
    procs = []

    def start(ttft_ms: str = "0", itl_ms: str = "0", model: str = "stub") -> str:
        proc, url = _start(ttft_ms, itl_ms, model)
        procs.append(proc)
        return url

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def run_bench():
    """Invoke `llmctl bench ARGS...` in-process; the app is mounted the way cli/main.py mounts it."""
    app = typer.Typer()
    app.add_typer(bench.app, name="bench")
    app.command("noop", hidden=True)(lambda: None)  # a second command keeps `bench` a group, as in main.py
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, ["bench", *map(str, args)])

    return run


def make_tokenizer(path) -> str:
    """A word-level tokenizer over the bench's own word list, with a chat template: tiny and exact."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from llmctl.bench.workload import WORDS

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *dict.fromkeys(WORDS), "user:", "assistant:"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def served_model(tmp_path_factory) -> str:
    """A random tiny Llama with that tokenizer, in the layout transformers and `llmctl serve` load."""
    import torch
    import transformers

    path = tmp_path_factory.mktemp("served")
    make_tokenizer(path)
    # Every id the model can sample is a word of the tokenizer: each token streams as one text event.
    vocab = len(transformers.AutoTokenizer.from_pretrained(path))
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return str(path)
