"""Bad input ends with one clear line and exit 1 before any load is sent (no locust, no output directory)."""

from __future__ import annotations

import importlib.util
import socket

import pytest

# `bench serve` asks for locust first of all; without it every case here would end on that line instead.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="needs locust (llmctl[bench])")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused(result, out, message: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not out.exists()


def test_unreachable_url(run_bench, tmp_path):
    port = free_port()
    out = tmp_path / "out"
    result = run_bench("serve", "--url", f"http://127.0.0.1:{port}/v1/", "--model", "m", "--requests", 1, "--out", out)
    refused(result, out, f"cannot reach http://127.0.0.1:{port}/v1/models")


def test_unknown_model(stub, run_bench, tmp_path):
    out = tmp_path / "out"
    result = run_bench("serve", "--url", stub(model="tiny"), "--model", "huge", "--requests", 1, "--out", out)
    refused(result, out, "does not serve model 'huge'; it serves: tiny")


@pytest.mark.parametrize("args, message", [
    (["--rate-type", "spike", "--max-concurrency", 8, "--spike-users", 9, "--spike-at", 8, "--spike-for", 5, "--duration", 10],
     "must end within the duration"),
    (["--profile", "constant"], "--profile is gone (in vLLM it turns on server profiling)"),
    (["--request-rate", -2, "--duration", 5], "--request-rate and --burstiness must be positive"),
    (["--requests", 3, "--input-len", "uniform:9,3"], "impossible --input-len 'uniform:9,3'"),
    (["--requests", 3, "--goodput", "ttft=fast"], "bad --goodput 'ttft=fast'"),
    (["--requests", 3, "--endpoint", "embeddings"], "--endpoint is the API path"),
    (["--requests", 3, "--url", "localhost:8000"], "must start with http://"),
    (["--requests", 3, "--extra-body", "[1]"], "--extra-body must be a JSON object"),
    (["--requests", 3, "--fail-on", "p99_ttft=500"], "bad --fail-on 'p99_ttft=500': unknown metric 'p99_ttft'"),
    (["--requests", 3, "--fail-on", "error_rate=5%"], "bad --fail-on 'error_rate=5%': '5%' is not a number"),
    (["--requests", 3, "--fail-on", "min_goodput=2"], "bad --fail-on 'min_goodput=2': min_goodput needs --goodput"),
])
def test_impossible_settings(run_bench, tmp_path, args, message):
    out = tmp_path / "out"
    result = run_bench("serve", "--url", f"http://127.0.0.1:{free_port()}", "--model", "m", "--out", out, *args)
    refused(result, out, message)


def test_malformed_prompts_file(stub, run_bench, tmp_path):
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out"
    prompts.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    result = run_bench("serve", "--url", stub(), "--model", "stub", "--requests", 2, "--prompts", prompts,
                       "--out", out)
    refused(result, out, f"{prompts}:2: needs a string \"prompt\"")


def test_a_server_without_a_model_list_gets_a_one_token_probe(run_bench, canned_server, tmp_path):
    """transformers serve answers /v1/models with 500: then the probe's refusal is what the user reads."""
    url = canned_server({"GET": (500, b""),
                         "POST": (400, b'{"detail":"Server is pinned to \'tiny\'; requested \'huge\'."}')})
    out = tmp_path / "out"
    result = run_bench("serve", "--url", url, "--model", "huge", "--requests", 1, "--out", out)
    refused(result, out, "refused a one-token probe (HTTP 400): {\"detail\":\"Server is pinned to 'tiny'")
