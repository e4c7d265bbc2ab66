"""A run's report: its summary and what ran it (date, versions, the server's), as rich tables, JSON (summary
and every request), CSV (one row a request) and an HTML page. Two runs side by side: bench/compare.py."""

from __future__ import annotations

import csv
import json
import platform
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rich.table import Table

import llmctl
from llmctl.bench import metrics
from llmctl.bench.metrics import PERCENTILES, TAIL_PERCENTILES, stat_name
from llmctl.bench.record import Record

LATENCIES = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms"))
PERCENTILE_STATS = tuple(stat_name(p) for p in (*PERCENTILES, *TAIL_PERCENTILES))
STATS = ("mean", "std", "min", *PERCENTILE_STATS, "max")
# name, key, unit, higher is better
HEADLINE = (("requests/s", "request_throughput", "", True), ("output tokens/s", "output_throughput", "", True),
            ("peak output tokens/s", "peak_output_throughput", "", True),
            ("total tokens/s", "total_throughput", "", True), ("goodput requests/s", "goodput", "", True),
            ("error rate", "error_rate", "%", False))
VERSION_TIMEOUT = 2.0  # seconds for the server's GET /version: best effort, never holds up a report


def stat_label(stat: str) -> str:
    return stat.upper() if stat.startswith("p") else stat


def server_version(url: str, api_key: str | None = None, timeout: float = VERSION_TIMEOUT) -> dict | str | None:
    """What the server's `GET /version` says (vLLM, SGLang and TGI-style servers answer it): its JSON, or the
    first 200 characters of its text; None when it does not answer 200 in time."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url.rstrip('/')}/version", headers=headers),
                                    timeout=timeout) as r:
            body = r.read(64 * 1024).decode("utf-8", "replace") if r.status == 200 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None
    if body is None:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return body.strip()[:200] or None


def run_meta(records: list[Record], model: str | None, server: dict | str | None = None) -> dict:
    """When the run started (UTC, ISO 8601, from its first request), the report's time, llmctl, Python and
    platform, the model, and the server's own version where it said."""
    def iso(t: float) -> str:
        return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")

    first = min((r.start for r in records), default=None)
    return {"started_at": None if first is None else iso(first),
            "written_at": iso(datetime.now(timezone.utc).timestamp()),
            "llmctl": llmctl.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "model": model, "server_version": server}


@dataclass
class Report:
    config: dict  # what was run: server, endpoint, model, workload, profile
    summary: dict  # metrics.summarize's
    steps: list[dict]  # a stepped profile's steps, else empty
    records: list[Record]
    meta: dict = field(default_factory=dict)  # run_meta's

    def tables(self) -> list[Table]:
        return [latency_table(self.summary), totals_table(self.summary), *([steps_table(self.steps)] if self.steps else [])]

    def write(self, out: Path) -> list[Path]:
        """report.json, requests.csv and report.html in out."""
        from llmctl.bench.html_report import write_html

        paths = [out / "report.json", out / "requests.csv", out / "report.html"]
        write_json(paths[0], self.config, self.summary, self.steps, self.records, self.meta)
        write_csv(paths[1], self.records)
        write_html(paths[2], self.config, self.summary, self.steps, self.records, self.meta)
        return paths


def build(plan, workload: dict, records: list[Record], slos: dict, server: dict | str | None = None) -> Report:
    """A locust run's report (plan: runner.Plan; server: server_version's answer, fetched while the server was
    up); ValueError when no measured request finished."""
    if not [r for r in records if not r.warmup]:
        raise ValueError(f"no request finished; see {Path(plan.out_dir) / 'locust.log'}")
    summary = metrics.summarize(records, slos)
    steps = metrics.rate_steps(records, plan.profile.step_duration) if plan.profile.kind == "stepped" else []
    config = {"url": plan.url, "endpoint": plan.path, "model": plan.model, "workers": plan.workers,
              **workload, "profile": None if plan.web else plan.profile.to_dict()}
    return Report(config, summary, steps, records, run_meta(records, plan.model, server))


def fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value * 100:.1f}%" if unit == "%" else f"{value:,.2f}"


def latency_table(summary: dict, title: str = "latency (ms)") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for stat in STATS:
        table.add_column(stat_label(stat), justify="right")
    table.add_column("samples", justify="right")
    for name, key in LATENCIES:
        dist = summary.get(key)
        table.add_row(name, *(fmt(dist and dist[s]) for s in STATS), str(dist["n"]) if dist else "0")
    return table


def totals_table(summary: dict) -> Table:
    table = Table(title="throughput and errors", title_justify="left", show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    table.add_row("requests", f"{summary['requests']} ({summary['ok']} ok, "
                  f"{summary.get('warmup', 0)} warm-up not counted)")
    if summary["errors"]:
        table.add_row("errors", ", ".join(f"{k}: {v}" for k, v in sorted(summary["errors"].items())))
    if summary.get("peak_concurrency") is not None:
        table.add_row("requests in flight", f"{summary['mean_concurrency']:.2f} mean, {summary['peak_concurrency']} peak")
    table.add_row("measured for", f"{summary['duration_s']:.2f} s")
    table.add_row("tokens in / out", f"{summary['prompt_tokens'] if summary['prompt_tokens'] is not None else '?'} / "
                  f"{summary['output_tokens']} (output counted by {', '.join(summary['tokens_from']) or '-'})")
    for name, key, unit, _ in HEADLINE:
        if key == "goodput" and summary["goodput"] is None:
            continue
        value = fmt(summary[key], unit)
        if key == "goodput":
            slo = ", ".join(f"{k} <= {v * 1000:g} ms" for k, v in summary["slo_s"].items())
            value += f" ({summary['good_share'] * 100:.1f}% of requests meet {slo})"
        table.add_row(name, value)
    if summary.get("lag_ms") and summary["lag_ms"]["p99"] > 10:
        table.add_row("[yellow]arrival lag P99[/]", f"{summary['lag_ms']['p99']:.1f} ms: every user was busy; "
                      "raise --max-concurrency for a true open loop")
    return table


STEP_COLUMNS = ("offered req/s", "achieved req/s", "output tok/s", "TTFT P50 ms", "TTFT P99 ms", "errors")


def step_rows(steps: list[dict]) -> list[list[str]]:
    """A stepped profile's steps as STEP_COLUMNS' text: for the terminal's table and the HTML page's."""
    return [[fmt(s["offered_rate"]), fmt(s["request_throughput"]), fmt(s["output_throughput"]),
             fmt(s["ttft_p50_ms"]), fmt(s["ttft_p99_ms"]), fmt(s["error_rate"], "%")] for s in steps]


def steps_table(steps: list[dict]) -> Table:
    table = Table(title="stepped rates: throughput against offered load", title_justify="left")
    for col in STEP_COLUMNS:
        table.add_column(col, justify="right")
    for row in step_rows(steps):
        table.add_row(*row)
    return table


def write_json(path: Path, config: dict, summary: dict, steps: list[dict], records: list[Record],
               meta: dict | None = None) -> None:
    path.write_text(json.dumps({"llmctl_bench": 1, "meta": meta or {}, "config": config, "summary": summary,
                                "steps": steps, "records": [asdict(r) for r in records]}, indent=1))


def write_csv(path: Path, records: list[Record]) -> None:
    fields = ("id", "start", "status", "error", "ttft_ms", "tpot_ms", "e2e_ms", "itl_mean_ms", "itl_max_ms",
              "prompt_tokens", "output_tokens", "tokens_from", "lag_ms", "step", "offered_rate", "warmup")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for r in records:
            ms = {k: None if v is None else round(v * 1000, 3) for k, v in
                  {"ttft_ms": r.ttft, "tpot_ms": r.tpot, "e2e_ms": r.e2e, "lag_ms": r.lag,
                   "itl_mean_ms": sum(r.itl) / len(r.itl) if r.itl else None,
                   "itl_max_ms": max(r.itl) if r.itl else None}.items()}
            writer.writerow({**{k: getattr(r, k) for k in fields if hasattr(r, k)}, **ms})


def load(path: Path) -> dict:
    """One run's report.json; ValueError for anything else, a sweep's combined report included (its benchmarks
    ran different loads, so two sweeps compare benchmark by benchmark, through their own reports)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if isinstance(data, dict) and "benchmarks" in data:
        example = Path(path).parent / data["benchmarks"][-1]["directory"] / "report.json"
        raise ValueError(f"{path} is a sweep's report of {len(data['benchmarks'])} benchmarks; compare one "
                         f"benchmark's own report.json, e.g. {example}")
    if not isinstance(data, dict) or "summary" not in data:
        raise ValueError(f"{path} is not an llmctl bench report")
    return data
