"""Two runs side by side (`llmctl bench compare`): first whether they ran the same workload, then each figure's
change from A to B, told apart from noise.

A change means something only when both runs asked the server the same thing, so the workloads' settings
(endpoint, model, dataset, lengths, prompt file, shared prefix, load profile and rate, SLOs) are compared first and
every difference is named. A latency statistic's change is then "noise" when the two runs' 95% confidence
intervals of it overlap (metrics.distribution's `ci95`); only a change past both intervals is coloured better
or worse. Throughputs carry no interval: each run has one value, so their changes are shown plain.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table

from llmctl.bench import metrics
from llmctl.bench.record import Record
from llmctl.bench.report import HEADLINE, LATENCIES, PERCENTILE_STATS, fmt, stat_label

# config keys that define the workload; url and workers may differ (comparing servers is the point)
WORKLOAD_KEYS = ("endpoint", "model", "dataset", "dataset_path", "input_len", "output_len", "prompts", "shared_prefix",
                 "ignore_eos")
# profile fields that set how long a run lasts, not what it asks
RUN_LENGTH = ("duration", "requests", "warmup")
SAME = 0.005  # a relative change below this is shown as "="
COMPARED = ("mean", *PERCENTILE_STATS, "max")  # spread and best case say little about a change


@dataclass
class Row:
    metric: str
    a: float | None
    b: float | None
    unit: str = ""
    higher_is_better: bool = False
    ci_a: list[float] | None = None  # 95% interval, where the statistic has one
    ci_b: list[float] | None = None

    @property
    def change(self) -> float | None:
        """B's relative change from A."""
        if self.a is None or self.b is None:
            return None
        if self.a == 0:
            return 0.0 if self.b == 0 else None
        return (self.b - self.a) / abs(self.a)

    @property
    def verdict(self) -> str:
        """better, worse, noise (the intervals overlap), same (below SAME) or unknown."""
        change = self.change
        if change is None:
            return "unknown"
        if abs(change) < SAME:
            return "same"
        if self.ci_a and self.ci_b and self.ci_a[0] <= self.ci_b[1] and self.ci_b[0] <= self.ci_a[1]:
            return "noise"
        return "better" if (change > 0) == self.higher_is_better else "worse"


@dataclass
class Comparison:
    mismatches: list[str]  # "what: A's, B's" for each workload setting that differs
    rows: list[Row]

    def lines(self) -> list[str]:
        """Plain text: the workload warning, if any, then one line a figure."""
        out = [warning(self.mismatches)] if self.mismatches else []
        for r in self.rows:
            change = "-" if r.change is None else f"{r.change * 100:+.1f}%"
            out.append(f"{r.metric}: A {fmt(r.a, r.unit)}{_band(r.ci_a)}, B {fmt(r.b, r.unit)}{_band(r.ci_b)}, "
                       f"B vs A {change} ({r.verdict})")
        return out


def workload_mismatches(a: dict, b: dict) -> list[str]:
    """Each workload setting on which two reports' configs differ (and their SLOs, which define goodput).
    A setting one report does not record (an older llmctl) is not held against it."""
    ca, cb = a.get("config") or {}, b.get("config") or {}
    pairs = [(k, ca[k], cb[k]) for k in WORKLOAD_KEYS if k in ca and k in cb]
    pa, pb = ca.get("profile") or {}, cb.get("profile") or {}
    pairs += [(f"profile.{k}", pa[k], pb[k]) for k in pa if k in pb and k not in RUN_LENGTH]
    pairs.append(("slo", (a.get("summary") or {}).get("slo_s"), (b.get("summary") or {}).get("slo_s")))
    return [f"{name}: A {va!r}, B {vb!r}" for name, va, vb in pairs if va != vb]


def warning(mismatches: list[str]) -> str:
    return ("WARNING: the runs used different workloads, so their figures are not comparable: "
            + "; ".join(mismatches))


def compare(a: dict, b: dict) -> Comparison:
    """Two loaded reports (report.load's) compared: workload differences, and one row a figure."""
    sa, sb = _summary(a), _summary(b)
    rows = []
    for name, key in LATENCIES:
        da, db = sa.get(key) or {}, sb.get(key) or {}
        for stat in COMPARED:
            rows.append(Row(f"{name} {stat_label(stat)} ms", da.get(stat), db.get(stat),
                            ci_a=(da.get("ci95") or {}).get(stat), ci_b=(db.get("ci95") or {}).get(stat)))
    rows += [Row(name, sa.get(key), sb.get(key), unit, up) for name, key, unit, up in HEADLINE]
    return Comparison(workload_mismatches(a, b), rows)


def _summary(report: dict) -> dict:
    """The report's summary; one written before confidence intervals were is summarized again from its records."""
    summary = report["summary"]
    if report.get("records") and not any("ci95" in (summary.get(k) or {}) for _, k in LATENCIES):
        records = [Record.from_dict(r) for r in report["records"]]
        return {**summary, **metrics.summarize(records, summary.get("slo_s"))}
    return summary


def _band(ci: list[float] | None) -> str:
    return f" [{ci[0]:,.2f}, {ci[1]:,.2f}]" if ci else ""


COLOURS = {"better": "green", "worse": "red", "noise": "dim"}


def table(comparison: Comparison, name_a: str, name_b: str) -> Table:
    """A rich table of the comparison: the 95% intervals beside the values, a change inside the noise dimmed
    and marked ~, and the workload warning, in bold red, as its caption."""
    caption = f"[bold red]{warning(comparison.mismatches)}[/]" if comparison.mismatches else None
    t = Table(title=f"A = {name_a}   B = {name_b}", title_justify="left", caption=caption, caption_justify="left")
    for col, justify in (("metric", "left"), ("A", "right"), ("A 95% CI", "right"), ("B", "right"),
                         ("B 95% CI", "right"), ("B vs A", "right")):
        t.add_column(col, justify=justify)
    for r in comparison.rows:
        change = "-" if r.change is None else f"{r.change * 100:+.1f}%"
        if r.verdict == "same":
            change = "="
        elif r.verdict in COLOURS:
            change = f"[{COLOURS[r.verdict]}]{'~' if r.verdict == 'noise' else ''}{change}[/]"
        t.add_row(r.metric, fmt(r.a, r.unit), _band(r.ci_a).strip(), fmt(r.b, r.unit), _band(r.ci_b).strip(), change)
    return t
