"""Server fixtures: a tiny random model with a real tokenizer and chat template, served on loopback."""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MODEL_NAME = "tiny"


def save_tokenizer(path, template: str = CHATML, markers: tuple[str, ...] = ()) -> None:
    """A byte-level BPE with exactly the tiny model's 512 ids, so every id the model samples has text; markers
    are added tokens kept in decoded text (a template's tool-call tags)."""
    import inspect
    import json.decoder
    import json.encoder

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512 - len(markers), special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([inspect.getsource(json.decoder), inspect.getsource(json.encoder)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    # Added tokens, never split, but text when outputs are decoded, as Qwen2.5's <tool_call> is.
    fast.add_tokens([AddedToken(m, special=False, normalized=False) for m in markers])
    assert len(fast) == 512
    fast.chat_template = template
    fast.save_pretrained(str(path))


@pytest.fixture(scope="session")
def chat_model(tiny_models, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("server") / "tiny-chat"
    shutil.copytree(tiny_models["llama"], path)
    save_tokenizer(path)
    return str(path)


@pytest.fixture(scope="session")
def hermes_model(tiny_models, tmp_path_factory) -> str:
    """The tiny model with a Qwen2.5-style template that renders tools and <tool_call> turns."""
    import json
    from pathlib import Path

    path = tmp_path_factory.mktemp("server") / "tiny-hermes"
    shutil.copytree(tiny_models["llama"], path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))  # tools are long
    template = (Path(__file__).parent / "templates" / "hermes.jinja").read_text()
    # The tags stay plain text (not added tokens): the auto test forces the model's text with a regex, which
    # llguidance cannot do through an added token (structured.py).
    save_tokenizer(path, template)
    return str(path)


def make_engine(model: str, **options):
    from llmctl.runtime.async_engine import AsyncEngine
    from llmctl.runtime.config import EngineConfig

    return AsyncEngine(EngineConfig(model=model, dtype="float32", **{"max_model_len": 128, "max_num_seqs": 16,
                                                                     **options}))


@pytest.fixture(scope="session")
def engine(chat_model):
    eng = make_engine(chat_model)
    yield eng
    eng.shutdown(timeout=5)


@pytest.fixture(scope="session")
def engine_factory():
    return make_engine


@pytest.fixture
def new_engine(chat_model):
    """A factory of engines of their own (other limits, or to break), stopped after the test."""
    made = []

    def make(model: str | None = None, **options):
        made.append(make_engine(model or chat_model, **options))
        return made[-1]

    yield make
    for eng in made:
        eng.shutdown(timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


@dataclass
class Running:
    url: str
    model: str
    server: object  # uvicorn.Server
    engine: object
    result: dict  # "code": serve()'s exit code, once it returned

    @property
    def app(self):
        return self.server.config.app


@contextmanager
def running(engine, load=None, config=None, **settings):
    """The app on uvicorn in a thread, on 127.0.0.1, exactly as `llmctl serve` runs it (minus signals).
    With `load` (and the engine's `config`) instead of an engine, the engine loads behind the open port."""
    from llmctl.runtime.server.launch import serve, uvicorn_server
    from llmctl.runtime.server.settings import ServerSettings

    settings = ServerSettings(**{"served_model_name": MODEL_NAME, "host": "127.0.0.1", "port": free_port(),
                                 **settings})
    server = uvicorn_server(engine, settings, config)
    result: dict = {}

    def run() -> None:
        try:
            result.update(code=asyncio.run(serve(server, engine, load)))
        except BaseException as exc:  # a load failure, for the test to see
            result.update(error=exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the test server did not start: {result}")
        time.sleep(0.02)
    try:
        yield Running(f"http://127.0.0.1:{settings.port}", settings.served_model_name, server, engine, result)
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="session")
def server(engine):
    with running(engine) as r:
        yield r


@pytest.fixture(scope="session")
def serve():
    """`with serve(engine, **settings) as running:` a server of the test's own."""
    return running


@pytest.fixture(scope="session")
def idle():
    return wait_idle


@pytest.fixture
def slow_steps():
    """`slow_steps(engine, seconds)`: every engine step takes at least that long, so that a request is
    reliably still running when a test acts on it. Undone after the test."""
    slowed = []

    def slow(engine, seconds: float) -> None:
        core = engine.engine
        step = core.step

        def slow_step():
            time.sleep(seconds)
            return step()

        core.step = slow_step
        slowed.append(core)

    yield slow
    for core in slowed:
        del core.step  # the class's own step again


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)


@pytest.fixture(scope="session")
def until():
    return wait_until


def wait_idle(engine, timeout: float = 5.0) -> bool:
    """True once the engine has no request left and every KV block is back in the pool."""
    core = engine.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not core.has_unfinished() and core.block_manager.num_free_blocks == core.block_manager.num_blocks:
            return True
        time.sleep(0.01)
    return False


def scrape_metrics(url: str) -> dict[str, float]:
    """/metrics as {'name{label="value",...}': value}, labels sorted, model_name left out."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()) if k != "model_name")
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


@pytest.fixture(scope="session")
def scrape():
    return scrape_metrics
