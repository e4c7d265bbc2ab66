"""A run's report: its summary, as rich tables, JSON (summary and every request), CSV (one row a request)
and an HTML page; and two runs side by side (`llmctl bench compare`)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.table import Table

from llmctl.bench import metrics
from llmctl.bench.metrics import PERCENTILES
from llmctl.bench.record import Record

LATENCIES = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms"))
STATS = ("mean", *(f"p{p}" for p in PERCENTILES))
# name, key, unit, higher is better
HEADLINE = (("requests/s", "request_throughput", "", True), ("output tokens/s", "output_throughput", "", True),
            ("total tokens/s", "total_throughput", "", True), ("goodput requests/s", "goodput", "", True),
            ("error rate", "error_rate", "%", False))


@dataclass
class Report:
    config: dict  # what was run: server, endpoint, model, workload, profile
    summary: dict  # metrics.summarize's
    steps: list[dict]  # a sweep's steps, else empty
    records: list[Record]

    def tables(self) -> list[Table]:
        return [latency_table(self.summary), totals_table(self.summary), *([sweep_table(self.steps)] if self.steps else [])]

    def write(self, out: Path) -> list[Path]:
        """report.json, requests.csv and report.html in out."""
        from llmctl.bench.html_report import write_html

        paths = [out / "report.json", out / "requests.csv", out / "report.html"]
        write_json(paths[0], self.config, self.summary, self.steps, self.records)
        write_csv(paths[1], self.records)
        write_html(paths[2], self.config, self.summary, self.steps, self.records)
        return paths


def build(plan, workload: dict, records: list[Record], slos: dict) -> Report:
    """A locust run's report (plan: runner.Plan); ValueError when no measured request finished."""
    if not [r for r in records if not r.warmup]:
        raise ValueError(f"no request finished; see {Path(plan.out_dir) / 'locust.log'}")
    summary = metrics.summarize(records, slos)
    steps = metrics.sweep_steps(records, plan.profile.step_duration) if plan.profile.kind == "sweep" else []
    config = {"url": plan.url, "endpoint": plan.path, "model": plan.model, "workers": plan.workers,
              **workload, "profile": None if plan.web else plan.profile.to_dict()}
    return Report(config, summary, steps, records)


def fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value * 100:.1f}%" if unit == "%" else f"{value:,.2f}"


def latency_table(summary: dict, title: str = "latency (ms)") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for stat in STATS:
        table.add_column(stat.upper() if stat != "mean" else "mean", justify="right")
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
                      "raise --concurrency for a true open loop")
    return table


def sweep_table(steps: list[dict]) -> Table:
    table = Table(title="sweep: throughput against offered load", title_justify="left")
    for col in ("offered req/s", "achieved req/s", "output tok/s", "TTFT P50 ms", "TTFT P99 ms", "errors"):
        table.add_column(col, justify="right")
    for s in steps:
        table.add_row(fmt(s["offered_rate"]), fmt(s["request_throughput"]), fmt(s["output_throughput"]),
                      fmt(s["ttft_p50_ms"]), fmt(s["ttft_p99_ms"]), fmt(s["error_rate"], "%"))
    return table


def write_json(path: Path, config: dict, summary: dict, steps: list[dict], records: list[Record]) -> None:
    path.write_text(json.dumps({"llmctl_bench": 1, "config": config, "summary": summary, "sweep": steps,
                                "records": [asdict(r) for r in records]}, indent=1))


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
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or "summary" not in data:
        raise ValueError(f"{path} is not an llmctl bench report")
    return data


def compare_table(a: dict, b: dict, name_a: str, name_b: str) -> Table:
    """Each figure of two runs, with B's change from A coloured green where B is better."""
    table = Table(title=f"A = {name_a}   B = {name_b}", title_justify="left")
    for col, justify in (("metric", "left"), ("A", "right"), ("B", "right"), ("B vs A", "right")):
        table.add_column(col, justify=justify)
    rows = [(f"{name} {s.upper() if s != 'mean' else 'mean'} ms", (a["summary"].get(key) or {}).get(s),
             (b["summary"].get(key) or {}).get(s), "", False) for name, key in LATENCIES for s in STATS]
    rows += [(name, a["summary"].get(key), b["summary"].get(key), unit, up) for name, key, unit, up in HEADLINE]
    for name, va, vb, unit, up in rows:
        change = "-"
        if va is not None and vb is not None and va != 0:
            delta = (vb - va) / abs(va)
            better = delta > 0 if up else delta < 0
            change = f"[{'green' if better else 'red'}]{delta * 100:+.1f}%[/]" if abs(delta) >= 0.005 else "="
        table.add_row(name, fmt(va, unit), fmt(vb, unit), change)
    return table
