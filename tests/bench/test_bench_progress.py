"""The live progress line: read from the records the locust processes append, updated in place on a terminal,
an occasional plain line elsewhere, and nothing with --quiet."""

from __future__ import annotations

import importlib.util
import io

import pytest

from llmctl.bench import progress as progress_module
from llmctl.bench.profiles import Profile
from llmctl.bench.progress import Progress, Ticker
from llmctl.bench.record import Record

needs_locust = pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="needs locust (llmctl[bench])")


def ended(i: int, at: float, status: str = "ok", tokens: int = 10) -> str:
    return Record(id=i, start=at - 0.5, e2e=0.5, status=status, output_tokens=tokens).to_json() + "\n"


def test_progress_counts_what_the_processes_appended(tmp_path):
    (tmp_path / "started").write_text("100.0")
    progress = Progress(tmp_path, Profile(requests=8, warmup=2, duration=30))
    progress.poll()
    assert progress.line(now=100.5) == "0/10 requests · 0 errors · 0s / 30s"
    with open(tmp_path / "records-1.jsonl", "w") as one, open(tmp_path / "records-2.jsonl", "w") as two:
        one.write(ended(0, 101.0) + ended(2, 102.0))
        two.write(ended(1, 103.0) + ended(3, 103.5, "http_400", 0) + ended(5, 104.0) + ended(7, 104.0)[:20])
        one.flush(), two.flush()
        progress.poll()
        # Four answered in the last 4 s (the run's age, under the 5 s window), 40 tokens; a half-written
        # line waits for its end.
        assert progress.line(now=104.0) == "5/10 requests · 1 error · 4s / 30s · 1.0 req/s, 10 tok/s"
        two.write(ended(7, 104.0)[20:])
        two.flush()
        progress.poll()
        assert progress.line(now=108.0) == "6/10 requests · 1 error · 8s / 30s · 0.4 req/s, 4 tok/s"


class Still:
    """A Progress stand-in that counts the looks it gets."""

    def __init__(self) -> None:
        self.polls = 0

    def poll(self) -> None:
        self.polls += 1

    def line(self, now=None) -> str:
        return f"look {self.polls}"


def test_a_terminal_gets_one_line_updated_in_place():
    stream = io.StringIO()
    ticker = Ticker(Still(), stream, tty=True)
    ticker.tick(), ticker.tick(), ticker.close()
    assert stream.getvalue() == "\rlook 1\x1b[K\rlook 2\x1b[K\rlook 3\x1b[K\n"


def test_elsewhere_a_plain_line_now_and_then():
    stream, now = io.StringIO(), [0.0]
    ticker = Ticker(Still(), stream, tty=False, every=10.0, clock=lambda: now[0])
    for now[0] in (1.0, 5.0, 10.5, 15.0, 21.0):
        ticker.tick()
    ticker.close()
    assert stream.getvalue() == "look 3\nlook 5\nlook 6\n"


@needs_locust
def test_a_run_shows_progress_on_stderr_unless_quiet(stub, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from llmctl.cli.console import NORMAL, set_verbosity
    from llmctl.cli.main import app

    monkeypatch.setattr(progress_module, "PLAIN_EVERY", 0.3)
    url = stub("100")
    args = ["bench", "serve", "--url", url, "--model", "stub", "--requests", 12, "--concurrency", 2,
            "--output-len", 1]
    shown = CliRunner().invoke(app, [*map(str, args), "--out", str(tmp_path / "shown")])
    assert shown.exit_code == 0, shown.output
    lines = [line for line in shown.stderr.splitlines() if " requests · " in line]
    assert len(lines) >= 2 and lines[-1].startswith("12/12 requests · 0 errors · "), shown.stderr
    assert "\r" not in shown.stderr and " requests · " not in shown.stdout
    try:
        quiet = CliRunner().invoke(app, ["--quiet", *map(str, args), "--out", str(tmp_path / "quiet")])
    finally:
        set_verbosity(NORMAL)
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == ""
