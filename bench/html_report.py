"""The HTML report: one self-contained page (inline CSS and SVG) with what ran (date, versions, the server's,
the workload), the summary and error causes, a stepped profile's steps, and plots: TTFT, TPOT and E2E over time each on
its own axis (they differ by orders of magnitude), TTFT and ITL histograms, output tokens/s and requests in
flight over time, and for stepped rates throughput and TTFT against the offered load. Where --slo was given, each
threshold is a dashed line on its latency's plots."""

from __future__ import annotations

from html import escape
from pathlib import Path

from llmctl.bench.record import Record
from llmctl.bench.report import HEADLINE, LATENCIES, STATS, STEP_COLUMNS, fmt, stat_label, step_rows
from llmctl.bench.svg import Rule, Series, chart, histogram

STYLE = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1320px}
table{border-collapse:collapse;margin:8px 0 18px}td,th{border:1px solid #ccc;padding:3px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}.plots{display:flex;flex-wrap:wrap;gap:12px}
.plots svg{border:1px solid #ddd;background:#fff}code{background:#f4f4f4;padding:1px 4px}"""
MAX_STEPS = 2000  # points of the requests-in-flight line; a longer one keeps each stretch's highest count


def html_table(header: list[str], rows: list[list[str]], css: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table{f' class={css!r}' if css else ''}><tr>{head}</tr>{body}</table>"


def slo_rules(summary: dict, key: str) -> list[Rule]:
    limit = (summary.get("slo_s") or {}).get(key)
    return [Rule(f"SLO {key.upper()} {limit * 1000:g} ms", limit * 1000)] if limit is not None else []


def _step_line(times: list[float], counts: list[int]) -> Series:
    """The in-flight count as a staircase; thinned to MAX_STEPS stretches, each at its highest count."""
    if len(times) > MAX_STEPS:
        span = (times[-1] - times[0]) / MAX_STEPS or 1.0
        peaks: dict[int, tuple[float, int]] = {}
        for t, c in zip(times, counts):
            k = int((t - times[0]) / span)
            peaks[k] = (peaks[k][0], max(peaks[k][1], c)) if k in peaks else (t, c)
        times, counts = [t for t, _ in peaks.values()], [c for _, c in peaks.values()]
    xs, ys = [], []
    for i, (t, c) in enumerate(zip(times, counts)):
        if i:
            xs.append(t)
            ys.append(counts[i - 1])
        xs.append(t)
        ys.append(c)
    return Series("in flight", xs, ys, line=True, dots=False)


def _plots(summary: dict, steps: list[dict], records: list[Record]) -> list[str]:
    measured = [r for r in records if not r.warmup and r.ok]
    timed = [r for r in measured if r.ttft is not None]
    t0 = summary.get("start", min((r.start for r in records), default=0.0))
    since = "seconds since the first measured request"
    tpot = [r for r in measured if r.tpot is not None]
    plots = [
        chart([Series("TTFT", [r.start - t0 for r in timed], [r.ttft * 1000 for r in timed])],
              "TTFT over time", since, "ms", slo_rules(summary, "ttft")),
        chart([Series("TPOT", [r.start - t0 for r in tpot], [r.tpot * 1000 for r in tpot])],
              "TPOT over time", since, "ms", slo_rules(summary, "tpot")),
        chart([Series("E2E", [r.start - t0 for r in measured], [r.e2e * 1000 for r in measured])],
              "E2E over time", since, "ms", slo_rules(summary, "e2e")),
        histogram([r.ttft * 1000 for r in timed], "TTFT", "ms", rules=slo_rules(summary, "ttft")),
        histogram([g * 1000 for r in measured for g in r.itl], "inter-token latency", "ms"),
    ]
    series = summary.get("series")
    if series:
        per_s = series["output_tokens_per_s"]
        window = series["window_s"]
        plots.append(chart([Series("output tokens/s", [(i + 0.5) * window for i in range(len(per_s))], per_s,
                                   line=True, dots=len(per_s) <= 200)],
                           f"output tokens/s ({window:g} s windows)", since, "tokens/s"))
        flight = series["concurrency"]
        plots.append(chart([_step_line(flight["t"], flight["in_flight"])], "requests in flight", since, "requests"))
    if steps:
        rates = [s["offered_rate"] for s in steps]
        plots.append(chart([Series("achieved", rates, [s["request_throughput"] for s in steps], line=True),
                            Series("offered", rates, rates, line=True)],
                           "throughput against offered load", "offered requests/s", "requests/s"))
        plots.append(chart([Series("TTFT P50", rates, [s["ttft_p50_ms"] or 0 for s in steps], line=True),
                            Series("TTFT P99", rates, [s["ttft_p99_ms"] or 0 for s in steps], line=True)],
                           "TTFT against offered load", "offered requests/s", "ms", slo_rules(summary, "ttft")))
    return plots


def meta_rows(meta: dict) -> list[list[str]]:
    names = (("started (UTC)", "started_at"), ("report written (UTC)", "written_at"), ("llmctl", "llmctl"),
             ("Python", "python"), ("platform", "platform"), ("model", "model"),
             ("server's /version", "server_version"))
    return [[name, "-" if meta.get(key) is None else str(meta[key])] for name, key in names if key in meta]


def _totals(summary: dict) -> list[list[str]]:
    rows = [["requests (ok)", f"{summary['requests']} ({summary['ok']})"],
            ["errors", ", ".join(f"{k}: {v}" for k, v in sorted(summary["errors"].items())) or "none"],
            ["measured for", f"{summary['duration_s']:.2f} s"],
            ["tokens in / out", f"{'?' if summary['prompt_tokens'] is None else summary['prompt_tokens']} / "
                                f"{summary['output_tokens']}"],
            *[[name, fmt(summary[key], unit)] for name, key, unit, _ in HEADLINE if summary.get(key) is not None]]
    if summary.get("peak_concurrency") is not None:
        rows.append(["requests in flight (mean / peak)",
                     f"{summary['mean_concurrency']:.2f} / {summary['peak_concurrency']}"])
    if summary.get("slo_s"):
        rows.append(["SLOs", ", ".join(f"{k} <= {v * 1000:g} ms" for k, v in summary["slo_s"].items())])
    return rows


def setup_line(config: dict) -> str:
    """What ran, as `key=value` codes: the config, and the profile's fields that say something (its kind and
    whatever was set away from nothing)."""
    flat = {**{k: v for k, v in config.items() if k != "profile"},
            **{f"profile.{k}": v for k, v in (config.get("profile") or {}).items() if v not in (None, 0, 0.0)}}
    return " ".join(f"<code>{escape(k)}={escape(str(v))}</code>" for k, v in flat.items())


def render(config: dict, summary: dict, steps: list[dict], records: list[Record], meta: dict | None = None) -> str:
    latency = html_table(["ms", *map(stat_label, STATS), "samples"], [
        [name, *(fmt(summary.get(key) and summary[key][s]) for s in STATS),
         str(summary[key]["n"] if summary.get(key) else 0)] for name, key in LATENCIES])
    causes = summary.get("error_causes") or []
    errors = ("<h2>errors by cause</h2>" + html_table(["requests", "status", "message (numbers as #)"], [
        [str(c["count"]), c["status"], c["message"]] for c in causes], "errors")) if causes else ""
    stepped = f"<h2>rate steps</h2>{html_table(list(STEP_COLUMNS), step_rows(steps), 'steps')}" if steps else ""
    run = f"<h2>run</h2>{html_table(['', 'value'], meta_rows(meta), 'meta')}" if meta else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>llmctl bench</title><style>{STYLE}</style>"
            f"</head><body><h1>llmctl bench</h1>{run}<p>{setup_line(config)}</p><h2>latency</h2>{latency}"
            f"<h2>throughput and errors</h2>{html_table(['', 'value'], _totals(summary))}{errors}{stepped}"
            f"<h2>plots</h2><div class='plots'>{''.join(_plots(summary, steps, records))}</div></body></html>")


def write_html(path: Path, config: dict, summary: dict, steps: list[dict], records: list[Record],
               meta: dict | None = None) -> None:
    path.write_text(render(config, summary, steps, records, meta))
