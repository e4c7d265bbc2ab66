"""The CLI side of `llmctl bench serve`: check the target, write the plan, run locust in its own processes,
read back their records. Nothing here imports locust (it patches the process with gevent on import).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from llmctl.bench.profiles import Profile
from llmctl.bench.progress import STARTED_FILE
from llmctl.bench.record import Record

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
PREFLIGHT_TIMEOUT = 10.0  # seconds for /v1/models or the probe: a live server answers either at once
TICK = 0.5  # seconds between looks at a running locust (the progress line's refresh)


@dataclass
class Plan:
    """Everything a locust process needs, as a JSON file (the API key travels in the environment instead)."""

    url: str  # scheme://host[:port][/prefix], without /v1
    path: str  # /v1/completions or /v1/chat/completions
    model: str
    out_dir: str
    requests_file: str
    profile: Profile
    workers: int = 1
    timeout: float = 300.0
    seed: int = 0
    web: bool = False

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({**asdict(self), "profile": self.profile.to_dict()}, indent=1))

    @classmethod
    def load(cls, path: str) -> Plan:
        data = json.loads(Path(path).read_text())
        return cls(**{**data, "profile": Profile.from_dict(data["profile"])})


def base_url(url: str) -> str:
    """http://host:port from what users paste: with or without a trailing /v1 or slash."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"the URL must start with http:// or https://, got {url!r}")
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def call(url: str, api_key: str | None, body: dict | None = None) -> tuple[int, bytes]:
    """GET (or POST `body` as JSON) to the server: its status and body; ValueError when it cannot be reached."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=PREFLIGHT_TIMEOUT) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ValueError(f"cannot reach {url}: {reason}") from None


def served_models(url: str, api_key: str | None) -> list[str] | None:
    """The model ids the server lists at GET /v1/models; None where it lists none (no such route, an error)."""
    status, body = call(f"{url}/v1/models", api_key)
    try:
        return [m["id"] for m in json.loads(body)["data"]] if status == 200 else None
    except (ValueError, KeyError, TypeError):
        return None


def first_model(url: str, api_key: str | None) -> tuple[str, str]:
    """The model to bench when none is named, as vLLM picks it: the first the server lists. (name, a note)"""
    served = served_models(url, api_key)
    if not served:
        raise ValueError(f"{url}/v1/models lists no model; give --model")
    others = f" (it also serves {', '.join(served[1:])})" if len(served) > 1 else ""
    return served[0], f"no --model: benching {served[0]!r}, the first model {url} lists{others}"


def preflight(plan: Plan, probe: dict, api_key: str | None) -> str:
    """Check that the server answers and serves the model, before any load. Returns what was checked.

    /v1/models settles it when the server lists its models. Some do not (transformers serve answers 500
    there); then one request of one token, shaped like the load's, must succeed."""
    served = served_models(plan.url, api_key)
    if served is not None:
        if plan.model not in served:
            raise ValueError(f"{plan.url} does not serve model {plan.model!r}; "
                             f"it serves: {', '.join(served) or 'none'}")
        return f"{plan.url} serves {plan.model!r}"
    probe = {k: v for k, v in probe.items() if k != "stream_options"}
    status, body = call(f"{plan.url}{plan.path}", api_key, {**probe, "max_tokens": 1, "stream": False})
    if status != 200:
        raise ValueError(f"{plan.url}{plan.path} refused a one-token probe (HTTP {status}): "
                         f"{body[:300].decode('utf-8', 'replace')}")
    return f"{plan.url} has no model list; a one-token probe for {plan.model!r} succeeded"


def require_locust() -> None:
    if importlib.util.find_spec("locust") is None:  # found, not imported: importing it patches this process
        raise ValueError("`llmctl bench serve` needs locust: pip install 'llmctl[bench]'")


def locust_command(plan: Plan, web_port: int) -> list[str]:
    require_locust()
    locustfile = importlib.util.find_spec("llmctl.bench.locustfile").origin
    cmd = [sys.executable, "-m", "locust", "-f", locustfile, "--loglevel", "WARNING", "--exit-code-on-error", "0",
           "--stop-timeout", str(int(plan.timeout) + 1)]
    if plan.web:
        cmd += ["--web-host", "127.0.0.1", "--web-port", str(web_port)]
    else:
        cmd += ["--headless", "--only-summary"]
    if plan.workers > 1:
        cmd += ["--processes", str(plan.workers)]
    return cmd


def run_locust(plan: Plan, api_key: str | None, web_port: int = 8089,
               tick: Callable[[], None] | None = None) -> tuple[int, bool]:
    """Run locust to its end, calling `tick` every TICK seconds meanwhile; its exit code, and whether Ctrl-C
    ended it (a sweep then runs no further benchmark).

    Locust runs in its own session, out of the terminal's reach: a SIGINT there lands in whichever greenlet
    runs at that moment, not in the one that shuts down. Ctrl-C here becomes a SIGTERM, which locust
    handles in its hub: users finish their requests, the last records are written, and it exits."""
    out = Path(plan.out_dir)
    plan_path = out / "plan.json"
    plan.save(plan_path)
    (out / STARTED_FILE).unlink(missing_ok=True)  # a stale one would start the progress line's clock too early
    env = {**os.environ, "LLMCTL_BENCH_PLAN": str(plan_path), "LLMCTL_BENCH_API_KEY": api_key or ""}
    interrupted = False
    with open(out / "locust.log", "w") as log:
        # With --web its UI's address and log belong on the terminal.
        proc = subprocess.Popen(locust_command(plan, web_port), env=env, stdout=None if plan.web else log,
                                stderr=None if plan.web else subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            try:
                if tick is not None:
                    tick()
                proc.wait(TICK)
            except subprocess.TimeoutExpired:
                pass
            except KeyboardInterrupt:
                interrupted = True
                proc.send_signal(signal.SIGTERM)
        return proc.returncode, interrupted


def collect(out_dir: str, tokens=None) -> list[Record]:
    """All processes' records, by request number. Where the server gave no usage, count the streamed text
    with `tokens` (tokens.FileTokens or ServerTokens) when there is one (otherwise token events stand in)."""
    records = []
    for path in sorted(glob.glob(os.path.join(out_dir, "records-*.jsonl"))):
        with open(path) as f:
            records += [Record.from_dict(json.loads(line)) for line in f if line.strip()]
    for r in records:
        counted = tokens.text_tokens(r.text) if r.tokens_from == "events" and tokens and r.text is not None else None
        if counted is not None:
            r.output_tokens, r.tokens_from = counted, "tokenizer"
    return sorted(records, key=lambda r: r.id)
