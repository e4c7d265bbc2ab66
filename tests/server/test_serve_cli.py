"""`llmctl serve`'s options: each has its LLMCTL_* variable in --help; bad values end in one line."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from llmctl.cli.serve import serve

ENV_VARS = ["LLMCTL_MODEL", "LLMCTL_HOST", "LLMCTL_PORT", "LLMCTL_API_KEY", "LLMCTL_SERVED_MODEL_NAME",
            "LLMCTL_MAX_NUM_SEQS", "LLMCTL_MAX_NUM_BATCHED_TOKENS", "LLMCTL_GPU_MEMORY_UTILIZATION",
            "LLMCTL_MAX_MODEL_LEN", "LLMCTL_MAX_QUEUE_LEN", "LLMCTL_LOG_FORMAT", "LLMCTL_LOG_PROMPTS",
            "LLMCTL_SHUTDOWN_TIMEOUT", "LLMCTL_DTYPE", "LLMCTL_DEVICE", "LLMCTL_SSL_CERTFILE", "LLMCTL_SSL_KEYFILE",
            "LLMCTL_SSL_CA_CERTS", "LLMCTL_CLIENT_CERTS", "LLMCTL_METRICS_PREFIX", "LLMCTL_API_KEY_FILE"]


@pytest.fixture
def cli():
    app = typer.Typer()
    app.command()(serve)
    return lambda *args, env=None: CliRunner().invoke(app, list(args), env=env or {})


def test_help_names_every_environment_variable(cli):
    result = cli("--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert [v for v in ENV_VARS if v not in result.output] == []


def test_bad_settings_fail_in_one_line_before_loading_a_model(cli, tmp_path):
    result = cli(str(tmp_path), env={"LLMCTL_LOG_FORMAT": "xml"})
    assert result.exit_code == 1 and "log_format must be one of json, text, got 'xml'" in result.output
    result = cli("/nonexistent/model", "--log-format", "text")
    assert result.exit_code == 1 and "model directory not found: /nonexistent/model" in result.output
    result = cli(str(tmp_path), env={"LLMCTL_SSL_CERTFILE": "/nonexistent/cert.pem"})
    assert result.exit_code == 1 and "--ssl-certfile: no such file '/nonexistent/cert.pem'" in result.output


def test_importing_the_command_stays_light():
    code = "import sys, llmctl.cli.serve; print(sorted({'torch', 'starlette', 'uvicorn'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_a_port_in_use_is_one_line_before_the_model_loads(cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("--host", "127.0.0.1", "--port", str(port), "--log-format", "text")
    assert result.exit_code == 1, result.output
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in result.output
    assert "loaded" not in result.output and "Traceback" not in result.output


def test_api_keys_from_a_file_as_a_mounted_secret_gives_them(cli, tmp_path):
    from llmctl.cli.serve import _api_keys

    secret = tmp_path / "api-key"
    secret.write_text("tenant-a\ntenant-b, tenant-c\n\n")
    assert _api_keys(None, secret) == ("tenant-a", "tenant-b", "tenant-c")
    assert _api_keys("k1, k2", None) == ("k1", "k2")
    empty = tmp_path / "empty"
    empty.write_text("\n \n")
    for args, env, message in (
            (["--api-key-file", str(empty)], {}, f"--api-key-file {empty} holds no key"),
            (["--api-key-file", str(tmp_path / "missing")], {}, "missing: No such file or directory"),
            (["--api-key-file", str(secret)], {"LLMCTL_API_KEY": "k"}, "with --api-key or --api-key-file"),
    ):
        result = cli(*args, "--port", "0", env=env)
        assert result.exit_code in (1, 2) and message in " ".join(result.output.split()), result.output
