"""`llmctl bench throughput` and `latency`: the engine measured offline, without HTTP, on a tiny model."""

from __future__ import annotations

import re


def rows(output: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("│")[1:-1]] for line in output.splitlines() if line.startswith("│")]


def test_throughput_runs_the_workload_and_transformers_beside(served_model, run_bench):
    result = run_bench("throughput", served_model, "--requests", 4, "--min-len", 4, "--max-len", 8,
                       "--hf-batch-size", 2, "--hf-requests", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    llmctl, hf = rows(result.output)
    assert llmctl[0] == "llmctl" and llmctl[1] == "4" and float(llmctl[3].replace(",", "")) > 0
    assert hf[0] == "transformers generate, batch 2" and hf[1] == "2"


def test_latency_shows_each_run(served_model, run_bench):
    result = run_bench("latency", served_model, "--prompt-len", 8, "--output-len", 8, "--runs", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    runs = rows(result.output)
    assert len(runs) == 2 and all(r[0] == "llmctl single-stream decode" for r in runs)
    assert all(float(r[4]) > 0 for r in runs)  # ms per token


def test_offline_bad_input_is_one_line(run_bench, tmp_path):
    result = run_bench("throughput", tmp_path / "missing", "--requests", 2)
    assert result.exit_code == 1 and re.fullmatch(r"error: model directory not found: \S+\n", result.output)
    result = run_bench("latency", tmp_path, "--output-len", 1)
    assert result.exit_code == 1 and "need --prompt-len >= 1, --output-len >= 2" in result.output


def test_concurrency_workload_keeps_every_request_decoding_to_the_end():
    import argparse

    from llmctl.bench import offline

    args = argparse.Namespace(min_len=4, max_len=9, concurrency_output_len=7)
    work = offline.concurrent(5, args, vocab_size=50)
    assert len(work.prompts) == 5 and work.output_lens == [7] * 5
    assert all(4 <= len(p) <= 9 and max(p) < 50 for p in work.prompts)
