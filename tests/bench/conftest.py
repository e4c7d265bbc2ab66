"""Bench fixtures: the scripted stub server in its own process, a runner for `llmctl bench ...`, tiny models
with their tokenizers, and one `llmctl serve` shared by the tests that need a real server."""

from __future__ import annotations

import importlib.util
import json
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest
import typer
from typer.testing import CliRunner

from llmctl.cli import bench
from llmctl.cli.console import NORMAL, set_verbosity


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
        set_verbosity(NORMAL)  # as a fresh process has it: an earlier --output json left the console quiet
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
    import transformers

    path = tmp_path_factory.mktemp("served")
    make_tokenizer(path)
    # Every id the model can sample is a word of the tokenizer: each token streams as one text event.
    _tiny_llama(path, len(transformers.AutoTokenizer.from_pretrained(path)))
    return str(path)


def make_split_tokenizer(path) -> str:
    """A word-piece tokenizer that, like real ones, adds a BOS and splits some words: the bench's longer words
    (5 letters and more) are two tokens or more, so a prompt's word count is not its token count."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    from llmctl.bench.workload import WORDS

    pieces = ["<unk>", "<s>", "</s>", "user:", "assistant:", "system:"]
    for word in dict.fromkeys(WORDS):
        pieces += [word] if len(word) <= 4 else [word[:3], "##" + word[3:]]
    pieces += ["##" + c for c in string.ascii_lowercase]  # whatever prefix greedy matching takes, the rest fits
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(dict.fromkeys(pieces))}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(path)
    return str(path)


def _tiny_llama(path, vocab: int) -> None:
    import torch
    import transformers

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)


@pytest.fixture(scope="session")
def split_model(tmp_path_factory) -> str:
    """A random tiny Llama with the word-piece tokenizer."""
    import transformers

    path = tmp_path_factory.mktemp("split")
    make_split_tokenizer(path)
    _tiny_llama(path, len(transformers.AutoTokenizer.from_pretrained(path)))
    return str(path)


SERVE_STARTUP_TIMEOUT = 120.0  # seconds: the model loads on 2 busy cores


@dataclass
class Served:
    url: str
    model: str = "tiny"  # a name, not a directory: the bench finds no tokenizer files and asks /tokenize
    max_model_len: int = 64

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, json.dumps({"model": self.model, **body}).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def count(self, item: dict) -> int:
        """The prompt tokens of {"prompt"} or {"messages"}, by the server's /tokenize."""
        status, answer = self.post("/tokenize", {k: item[k] for k in ("prompt", "messages") if k in item})
        assert status == 200, answer
        return answer["count"]


@pytest.fixture(scope="session")
def llmctl_server(split_model, tmp_path_factory) -> Served:
    """`llmctl serve` of the split-tokenizer model, started once for the session, once it answers /tokenize."""
    if any(importlib.util.find_spec(m) is None for m in ("llmctl.runtime.server.app", "llmctl.cli.serve", "uvicorn")):
        pytest.skip("llmctl serve is not installed (llmctl.runtime.server.app, llmctl.cli.serve, uvicorn)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    served = Served(f"http://127.0.0.1:{port}")
    log = tmp_path_factory.mktemp("llmctl-serve") / "serve.log"  # a file: a pipe nobody reads would fill up
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", "import typer; from llmctl.cli.serve import serve; "
                                 "typer.run(serve)", split_model, "--host", "127.0.0.1", "--port", str(port),
                                 "--served-model-name", served.model, "--max-model-len", str(served.max_model_len),
                                 "--device", "cpu", "--dtype", "float32", "--log-format", "text"],
                                stdout=subprocess.DEVNULL, stderr=f)
    deadline = time.monotonic() + SERVE_STARTUP_TIMEOUT
    while True:
        try:
            if served.post("/tokenize", {"prompt": "the"})[0] == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"llmctl serve did not start: {log.read_text()[-2000:]}")
        time.sleep(0.3)
    yield served
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def canned_server():
    """canned_server({"GET": (status, body bytes), "POST": ...}) serves those answers on a loopback port and
    returns its URL; stopped after the test."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    servers = []

    def start(answers: dict[str, tuple[int, bytes]]) -> str:
        class Canned(BaseHTTPRequestHandler):
            def _answer(self):
                status, body = answers[self.command]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        server = HTTPServer(("127.0.0.1", 0), Canned)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()
