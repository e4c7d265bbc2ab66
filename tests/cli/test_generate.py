"""`llmctl generate` and the root command, through typer's runner and a real subprocess."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from llmctl.cli.main import app

runner = CliRunner()


def test_help_imports_no_heavy_library():
    code = "import sys, llmctl.cli.main; print(sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("llmctl ")


def test_generate_streams_the_same_text_as_the_offline_api():
    from llmctl.runtime import LLM, SamplingParams

    prompt = "def read_config(path):"
    expected = LLM(dtype="float32").generate(prompt, SamplingParams(temperature=0.0, max_tokens=24))[0]
    result = runner.invoke(app, ["generate", "--prompt", prompt, "--max-tokens", "24", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert result.stdout == prompt + expected.outputs[0].text + "\n"


def test_two_prompts_print_in_order_with_headers():
    result = runner.invoke(app, ["generate", "-p", "import os", "-p", "class Foo:", "--max-tokens", "8"])
    assert result.exit_code == 0, result.output
    first, second = result.stdout.index("--- prompt 0"), result.stdout.index("--- prompt 1")
    assert first < result.stdout.index("import os") < second < result.stdout.index("class Foo:")


def test_bad_input_is_one_line_and_a_non_zero_exit(tmp_path):
    for args, message in [
        (["generate", str(tmp_path / "missing"), "-p", "x"], "model directory not found"),
        (["generate", "-p", "x", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["generate", "-p", "x", "--max-model-len", "100000"], "max_model_len must be in"),
        (["generate", "-p", "x", "--kv-cache-dtype", "int8"], "kv_cache_dtype must be one of auto, fp8"),
        (["generate", "-p", "x", "--speculative", "eagle"], "speculative method must be one of ngram, draft"),
        (["generate", "-p", "x", "--draft-model", str(tmp_path)], "--draft-model needs --speculative draft"),
        (["generate", "-p", "x", "--speculative", "draft", "--draft-model", str(tmp_path)],
         "draft model directory not found or without config.json"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, args
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.output


def test_fp8_kv_cache_and_speculation_flags_reach_the_engine():
    """Greedy text is the same with either speculation (exact); an fp8 cache runs."""
    base = ["generate", "-p", "def read_config(path):", "--max-tokens", "24", "--dtype", "float32"]
    plain = runner.invoke(app, base)
    spec = runner.invoke(app, [*base, "--speculative", "ngram", "--num-speculative-tokens", "3"])
    from llmctl.reference import default_model_path

    draft = runner.invoke(app, [*base, "--speculative", "draft", "--draft-model", str(default_model_path())])
    fp8 = runner.invoke(app, [*base, "--kv-cache-dtype", "fp8"])
    assert plain.exit_code == spec.exit_code == draft.exit_code == fp8.exit_code == 0, (spec.output, fp8.output)
    assert spec.stdout == draft.stdout == plain.stdout
    assert fp8.stdout.startswith("def read_config(path):")
