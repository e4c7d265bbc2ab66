"""Real clients (lm-evaluation-harness, LangChain, the openai SDK's structured outputs) against the server of
tests/server: the tiny chat model on loopback. Everything runs offline: no hub, no dataset download."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import httpx
import pytest

# Read by huggingface_hub and datasets when they are imported, so set before any test imports them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _server_fixtures():
    """tests/server/conftest.py as a module of its own: a conftest is not importable by name from a sibling
    folder, and its fixtures (the model, the engine, the server on loopback) are the ones these tests need."""
    name = "tests_server_fixtures"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent.parent / "server" / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)
    return sys.modules[name]


_server = _server_fixtures()
chat_model = _server.chat_model
engine = _server.engine
server = _server.server
serve = _server.serve


class Recorder:
    """The JSON bodies that clients built on httpx sent, read from their transport as the request leaves."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self._clients: list[httpx.Client] = []

    def client(self) -> httpx.Client:
        self._clients.append(httpx.Client(event_hooks={"request": [self._record]}))
        return self._clients[-1]

    def _record(self, request: httpx.Request) -> None:
        self.bodies.append(json.loads(request.content))

    def close(self) -> None:
        for client in self._clients:
            client.close()


@pytest.fixture
def recorder():
    rec = Recorder()
    yield rec
    rec.close()
