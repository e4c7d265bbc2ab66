"""`llmctl --quiet / --verbose`: one console for every command, results always, the rest by verbosity."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from llmctl.cli.console import NORMAL, console, set_verbosity
from llmctl.cli.main import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def normal_afterwards():
    yield
    set_verbosity(NORMAL)


def test_quiet_generate_prints_only_the_completions():
    args = ["generate", "-p", "import os", "-p", "class Foo:", "--max-tokens", "6", "--dtype", "float32"]
    loud, quiet = runner.invoke(app, args), runner.invoke(app, ["--quiet", *args])
    assert loud.exit_code == quiet.exit_code == 0, loud.output + quiet.output
    assert "--- prompt 0" in loud.stdout and "--- prompt 1" in loud.stdout
    expected = loud.stdout.replace("--- prompt 0\nimport os", "", 1).replace("--- prompt 1\nclass Foo:", "", 1)
    assert quiet.stdout == expected and "--- prompt" not in quiet.stdout


def test_verbose_errors_show_the_traceback_and_still_end_in_one_line(tmp_path):
    args = ["generate", str(tmp_path / "missing"), "-p", "x"]
    plain, verbose = runner.invoke(app, args), runner.invoke(app, ["--verbose", *args])
    assert plain.exit_code == verbose.exit_code == 1
    assert "Traceback" not in plain.output and len(plain.output.strip().splitlines()) == 1
    assert "Traceback" in verbose.output
    assert verbose.output.strip().splitlines()[-1] == plain.output.strip()


def test_quiet_and_verbose_together_are_refused():
    result = runner.invoke(app, ["-q", "-v", "generate", "-p", "x"])
    assert result.exit_code == 1 and "--quiet and --verbose exclude each other" in result.output


def test_environment_variables_set_the_verbosity(monkeypatch):
    monkeypatch.setenv("LLMCTL_QUIET", "1")
    runner.invoke(app, ["generate", "--help"])
    assert console.verbosity < NORMAL


def test_error_messages_keep_square_brackets():
    import typer

    from llmctl.cli.console import fail

    sub = typer.Typer()

    @sub.command()
    def broken() -> None:
        fail("install it: pip install 'llmctl[serve]'")

    result = runner.invoke(sub, [])
    assert result.exit_code == 1 and "pip install 'llmctl[serve]'" in result.output


@pytest.mark.parametrize("args,message", [
    (["generate", "--chat", "true", "-p", "x"], "--chat is a flag and takes no value: write `--chat` or `--no-chat`, "
                                                "not `--chat true`"),
    (["-q", "serve", "--log-prompts", "False"], "--log-prompts is a flag"),
])
def test_a_flag_given_a_value_is_named_before_anything_runs(args, message):
    """Without the check, `--chat true` made `true` the model directory: "model directory not found: true"."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", "from llmctl.cli.main import main; main()", *args],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and message in " ".join(run.stderr.split()) and "Traceback" not in run.stderr


def test_output_json_is_one_document_with_every_completion():
    import json

    args = ["generate", "-p", "import os", "-p", "class Foo:", "--max-tokens", "4", "--dtype", "float32",
            "--output", "json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # nothing but the document on stdout: no prompt echo, no progress
    assert [c["prompt"] for c in doc["completions"]] == ["import os", "class Foo:"]
    assert all(c["completion_tokens"] == len(c["token_ids"]) == 4 and c["finish_reason"] == "length"
               for c in doc["completions"])
    text = runner.invoke(app, args[:-2])  # the same greedy run as text streams the same completions
    assert all(c["text"] in text.stdout for c in doc["completions"])
    bad = runner.invoke(app, [*args[:-1], "yaml"])
    assert bad.exit_code == 2 and "--output must be one of text, json, got 'yaml'" in bad.output
