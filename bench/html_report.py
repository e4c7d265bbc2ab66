"""The HTML report: one self-contained page (inline CSS and SVG) with the summary, latency over time, TTFT and
ITL histograms, and for sweeps throughput and TTFT against the offered load."""

from __future__ import annotations

from html import escape
from pathlib import Path

from llmctl.bench.record import Record
from llmctl.bench.report import HEADLINE, LATENCIES, STATS, fmt
from llmctl.bench.svg import Series, chart, histogram

STYLE = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1320px}
table{border-collapse:collapse;margin:8px 0 18px}td,th{border:1px solid #ccc;padding:3px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}.plots{display:flex;flex-wrap:wrap;gap:12px}
.plots svg{border:1px solid #ddd;background:#fff}code{background:#f4f4f4;padding:1px 4px}"""


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(config: dict, summary: dict, steps: list[dict], records: list[Record]) -> str:
    measured = [r for r in records if not r.warmup and r.ok]
    timed = [r for r in measured if r.ttft is not None]
    t0 = min((r.start for r in records), default=0.0)
    latency = _table(["ms", *STATS, "samples"], [
        [name, *(fmt(summary.get(key) and summary[key][s]) for s in STATS),
         str(summary[key]["n"] if summary.get(key) else 0)] for name, key in LATENCIES])
    totals = _table(["", "value"], [
        ["requests (ok)", f"{summary['requests']} ({summary['ok']})"],
        ["errors", ", ".join(f"{k}: {v}" for k, v in sorted(summary["errors"].items())) or "none"],
        ["measured for", f"{summary['duration_s']:.2f} s"],
        ["tokens in / out", f"{'?' if summary['prompt_tokens'] is None else summary['prompt_tokens']} / "
                            f"{summary['output_tokens']}"],
        *[[name, fmt(summary[key], unit)] for name, key, unit, _ in HEADLINE if summary.get(key) is not None]])
    plots = [
        chart([Series("TTFT", [r.start - t0 for r in timed], [r.ttft * 1000 for r in timed]),
               Series("E2E", [r.start - t0 for r in measured], [r.e2e * 1000 for r in measured])],
              "latency over time", "seconds since the first request", "ms"),
        histogram([r.ttft * 1000 for r in timed], "TTFT", "ms"),
        histogram([g * 1000 for r in measured for g in r.itl], "inter-token latency", "ms"),
    ]
    if steps:
        rates = [s["offered_rate"] for s in steps]
        plots.append(chart([Series("achieved", rates, [s["request_throughput"] for s in steps], line=True),
                            Series("offered", rates, rates, line=True)],
                           "throughput against offered load", "offered requests/s", "requests/s"))
        plots.append(chart([Series("TTFT P50", rates, [s["ttft_p50_ms"] or 0 for s in steps], line=True),
                            Series("TTFT P99", rates, [s["ttft_p99_ms"] or 0 for s in steps], line=True)],
                           "TTFT against offered load", "offered requests/s", "ms"))
    # The profile's fields that say something: its kind and whatever was set away from nothing.
    flat = {**{k: v for k, v in config.items() if k != "profile"},
            **{f"profile.{k}": v for k, v in (config.get("profile") or {}).items() if v not in (None, 0, 0.0)}}
    setup = " ".join(f"<code>{escape(k)}={escape(str(v))}</code>" for k, v in flat.items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>llmctl bench</title><style>{STYLE}</style>"
            f"</head><body><h1>llmctl bench</h1><p>{setup}</p><h2>latency</h2>{latency}"
            f"<h2>throughput and errors</h2>{totals}<h2>plots</h2><div class='plots'>{''.join(plots)}</div>"
            "</body></html>")


def write_html(path: Path, config: dict, summary: dict, steps: list[dict], records: list[Record]) -> None:
    path.write_text(render(config, summary, steps, records))
