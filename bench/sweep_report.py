"""A sweep's combined report: one row a benchmark (rate type, offered and achieved rates, output tokens/s, TTFT,
ITL and E2E P50 and P99, errors, and goodput where --goodput set SLOs), as a terminal table, report.json (every
benchmark's summary; its requests stay in the benchmark's own report.json) and an HTML page that plots latency
against the achieved rate, each SLO a dashed line, and links each benchmark's own page."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

from rich.table import Table

from llmctl.bench.html_report import STYLE, html_table, meta_rows, setup_line, slo_rules
from llmctl.bench.report import fmt, run_meta
from llmctl.bench.svg import Series, chart
from llmctl.bench.sweep import Benchmark, Sweep

PERCENTILES = ("p50", "p99")
LATENCIES = (("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms"))
PLOTTED = (("TTFT", "ttft_ms", "ttft"), ("TPOT", "tpot_ms", "tpot"), ("E2E", "e2e_ms", "e2e"))  # with their SLO


def _slos(benchmarks: list[Benchmark]) -> dict | None:
    return benchmarks[0].report.summary.get("slo_s")  # one command line: every benchmark has the same


def columns(benchmarks: list[Benchmark]) -> list[str]:
    """Rates in requests/s, latencies in ms; short, as the terminal's table is wide."""
    return ["#", "rate type", "offered", "achieved", "output tok/s",
            *[f"{name} {p.upper()}" for name, _ in LATENCIES for p in PERCENTILES], "errors",
            *(["goodput"] if _slos(benchmarks) else [])]


def rows(benchmarks: list[Benchmark]) -> list[list[str]]:
    """The benchmarks as `columns`' text, for the terminal's table and the HTML page's; # is the number that
    leads the benchmark's directory."""
    slos = _slos(benchmarks)
    return [[str(i), b.rate_type, fmt(b.offered_rate), fmt(b.achieved_rate),
             fmt(b.report.summary["output_throughput"]),
             *[fmt((b.report.summary.get(key) or {}).get(p)) for _, key in LATENCIES for p in PERCENTILES],
             fmt(b.report.summary["error_rate"], "%"), *([fmt(b.report.summary["goodput"])] if slos else [])]
            for i, b in enumerate(benchmarks, 1)]


def table(benchmarks: list[Benchmark]) -> Table:
    t = Table(title="sweep: one row a benchmark (rates in requests/s, latencies in ms)", title_justify="left")
    for i, column in enumerate(columns(benchmarks)):
        t.add_column(column, justify="left" if i < 2 else "right")
    for row in rows(benchmarks):
        t.add_row(*row)
    return t


def entry(b: Benchmark) -> dict:
    """A benchmark as report.json and --output json give it."""
    return {"directory": b.out_dir.name, "rate_type": b.rate_type, "offered_rate": b.offered_rate,
            "achieved_rate": b.achieved_rate, "profile": b.profile.to_dict(), "summary": b.report.summary}


def write(out: Path, sweep: Sweep, benchmarks: list[Benchmark]) -> list[Path]:
    """report.json and report.html in out, beside the benchmarks' directories."""
    first = benchmarks[0].report
    config = {**{k: v for k, v in first.config.items() if k != "profile"}, "rate_type": "sweep",
              "benchmarks": sweep.benchmarks}
    meta = run_meta([r for b in benchmarks for r in b.report.records], first.config["model"],
                    first.meta.get("server_version"))
    paths = [out / "report.json", out / "report.html"]
    paths[0].write_text(json.dumps({"llmctl_bench": 1, "meta": meta, "config": config,
                                    "benchmarks": [entry(b) for b in benchmarks]}, indent=1))
    paths[1].write_text(render(config, meta, benchmarks))
    return paths


def render(config: dict, meta: dict, benchmarks: list[Benchmark]) -> str:
    slos = _slos(benchmarks)
    slo_line = ("<p>SLOs: " + ", ".join(f"{k} &lt;= {v * 1000:g} ms" for k, v in slos.items())
                + "; goodput counts the requests that meet them all</p>") if slos else ""
    links = "".join(f"<li><a href='{escape(b.out_dir.name)}/report.html'>{escape(b.describe())}</a></li>"
                    for b in benchmarks)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>llmctl bench sweep</title>"
            f"<style>{STYLE}</style></head><body><h1>llmctl bench: sweep</h1>"
            f"<h2>run</h2>{html_table(['', 'value'], meta_rows(meta), 'meta')}<p>{setup_line(config)}</p>"
            f"<h2>benchmarks (rates in requests/s, latencies in ms)</h2>"
            f"{html_table(columns(benchmarks), rows(benchmarks), 'benchmarks')}{slo_line}"
            f"<h2>plots</h2><div class='plots'>{''.join(_plots(benchmarks))}</div>"
            f"<h2>each benchmark's own report</h2><ul>{links}</ul></body></html>")


def _plots(benchmarks: list[Benchmark]) -> list[str]:
    """Achieved against offered rate (the constant-rate benchmarks), then each latency's P50 and P99 against the
    achieved rate, where every benchmark has one."""
    plots = []
    timed = [b for b in benchmarks if b.offered_rate is not None]
    if timed:
        offered = [b.offered_rate for b in timed]
        plots.append(chart([Series("achieved", offered, [b.achieved_rate for b in timed], line=True),
                            Series("offered", offered, offered, line=True)],
                           "achieved against offered rate", "offered requests/s", "requests/s"))
    ordered = sorted(benchmarks, key=lambda b: b.achieved_rate)
    rates = [b.achieved_rate for b in ordered]
    summary = benchmarks[0].report.summary
    for name, key, slo in PLOTTED:
        series = [Series(f"{name} {p.upper()}", rates, [(b.report.summary.get(key) or {}).get(p) or 0 for b in ordered],
                         line=True) for p in PERCENTILES]
        plots.append(chart(series, f"{name} against achieved rate", "achieved requests/s", "ms",
                           slo_rules(summary, slo)))
    return plots
