"""No request goes unrecorded: those in flight when the duration ends finish and count, and timeouts are
errors in the report, not gaps in it."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="needs locust (llmctl[bench])")


def test_requests_in_flight_at_the_end_finish_and_count(stub, run_bench, tmp_path):
    # Two users, 1 s a request, 1.5 s of load: each sends at 0 s and 1 s, and the second pair ends at 2 s.
    result = run_bench("serve", "--url", stub("1000"), "--model", "stub", "--concurrency", 2, "--duration", 1.5,
                       "--output-len", 2, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "report.json").read_text())["summary"]
    assert summary["requests"] == summary["ok"] == 4


def test_timeouts_are_counted_as_errors(stub, run_bench, tmp_path):
    result = run_bench("serve", "--url", stub("2000"), "--model", "stub", "--concurrency", 2, "--requests", 2,
                       "--timeout", 0.3, "--output-len", 2, "--out", tmp_path)
    assert result.exit_code == 3, result.output  # every request failed; the report is written all the same
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["summary"]["errors"] == {"timeout": 2} and report["summary"]["error_rate"] == 1.0
    assert all(r["e2e"] == pytest.approx(0.3, abs=0.1) for r in report["records"])
    assert "timeout: 2" in result.output and "100.0%" in result.output


def test_quiet_prints_only_the_files_it_wrote(stub, tmp_path):
    from typer.testing import CliRunner

    from llmctl.cli.console import NORMAL, set_verbosity
    from llmctl.cli.main import app

    try:
        result = CliRunner().invoke(app, ["--quiet", "bench", "serve", "--url", stub(), "--model", "stub",
                                          "--requests", 2, "--output-len", 2, "--out", str(tmp_path)])
    finally:
        set_verbosity(NORMAL)
    assert result.exit_code == 0, result.output
    names = ", ".join(str(tmp_path / n) for n in ("report.json", "requests.csv", "report.html"))
    assert result.stdout == f"wrote {names}\n"
    assert (tmp_path / "report.html").is_file()
