"""Whether a run passes, for people and for CI: why its requests failed, and its --fail-on thresholds.

A run whose every measured request failed measured nothing but the failure: it fails, whatever the thresholds
say. What users need then is the cause, which is in the requests' error messages; those differ by little but
numbers ("the prompt has 1100 tokens", "... 1050 tokens"), so causes are grouped with the numbers left out.

A threshold is a ceiling on the error rate or a latency statistic, or a floor (min_*) on a throughput. One
whose metric was not measured (no TPOT when every answer is one token) counts as crossed: it cannot be shown
to hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmctl.bench.metrics import PERCENTILES
from llmctl.bench.record import Record

CAUSES_SHOWN = 3  # causes named in the one line about errors
MESSAGE_CHARS = 200  # of each cause's message in that line
STATS = ("mean", *(f"p{p}" for p in PERCENTILES))
LATENCIES = ("ttft", "tpot", "itl", "e2e")
FLOORS = {"min_request_throughput": "request_throughput", "min_output_throughput": "output_throughput",
          "min_goodput": "goodput"}
NAMES = ("error_rate", *(f"{s}_{m}_ms" for m in LATENCIES for s in STATS), *FLOORS)
NAMES_HELP = (f"error_rate (a fraction), {{{'|'.join(STATS)}}}_{{{'|'.join(LATENCIES)}}}_ms (ceilings), "
              f"{', '.join(FLOORS)} (floors, per second)")


def error_causes(records: list[Record]) -> list[tuple[int, str, str]]:
    """(requests, status, the first one's message) per cause of the measured requests' failures, most first."""
    from llmctl.bench.metrics import error_kinds

    return [(k["count"], k["status"], k["example"]) for k in error_kinds([r for r in records if not r.warmup])]


def every_request_failed(records: list[Record]) -> bool:
    measured = [r for r in records if not r.warmup]
    return bool(measured) and not any(r.ok for r in measured)


def errors_line(records: list[Record]) -> str | None:
    """How many measured requests failed and their most common causes, in one line; None if none failed."""
    causes = error_causes(records)
    if not causes:
        return None
    measured, failed = sum(not r.warmup for r in records), sum(n for n, _, _ in causes)
    lead = f"every one of the {measured} requests failed" if failed == measured else \
        f"{failed} of {measured} requests failed"
    shown = "; ".join(f"{n} × {status}" + (f' "{_clip(message)}"' if message else "")
                      for n, status, message in causes[:CAUSES_SHOWN])
    more = f"; {len(causes) - CAUSES_SHOWN} other causes" if len(causes) > CAUSES_SHOWN else ""
    return f"{lead}: {shown}{more}"


def _clip(message: str) -> str:
    return message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS - 3] + "..."


@dataclass(frozen=True)
class Threshold:
    """`--fail-on NAME=LIMIT`: latencies in ms, the error rate a fraction, throughputs per second."""

    name: str
    limit: float

    @classmethod
    def parse(cls, spec: str, slo: dict | None = None) -> Threshold:
        """From `NAME=LIMIT`; ValueError naming the spec. A goodput floor needs the SLOs that define goodput."""
        name, eq, value = (part.strip() for part in spec.partition("="))

        def bad(why: str) -> ValueError:
            return ValueError(f"bad --fail-on {spec!r}: {why}")

        if not eq:
            raise bad("use NAME=LIMIT, e.g. p99_ttft_ms=500")
        if name not in NAMES:
            raise bad(f"unknown metric {name!r}; use {NAMES_HELP}")
        try:
            limit = float(value)
        except ValueError:
            raise bad(f"{value!r} is not a number") from None
        if not math.isfinite(limit) or limit < 0:
            raise bad("the limit cannot be negative (or infinite)")
        if name == "error_rate" and limit > 1:
            raise bad("error_rate is a fraction from 0 to 1")
        if name == "min_goodput" and not slo:
            raise bad("min_goodput needs --goodput (it counts the requests that meet those SLOs)")
        return cls(name, limit)

    @property
    def floor(self) -> bool:
        return self.name in FLOORS

    @property
    def metric(self) -> str:
        return FLOORS.get(self.name, self.name)

    def measured(self, summary: dict) -> float | None:
        if self.floor or self.name == "error_rate":
            return summary.get(self.metric)
        stat, latency, _ = self.name.split("_")
        return (summary.get(f"{latency}_ms") or {}).get(stat)

    def crossed(self, summary: dict) -> bool:
        value = self.measured(summary)
        return value is None or (value < self.limit if self.floor else value > self.limit)

    def describe(self, summary: dict) -> str:
        value = self.measured(summary)
        if value is None:
            return f"{self.metric} was not measured"
        side = ("below" if self.floor else "above") if self.crossed(summary) else \
            ("at least" if self.floor else "at most")
        return f"{self.metric} is {_number(value)}, {side} {_number(self.limit)}"


def thresholds_line(thresholds: list[Threshold], summary: dict) -> tuple[bool, str]:
    """Whether every threshold held, and one line that says which did not (or that all did) and the values."""
    return _line([(t, summary, "") for t in thresholds])


def sweep_thresholds_line(thresholds: list[Threshold], summaries: list[dict], names: list[str]) -> tuple[bool, str]:
    """thresholds_line for a sweep's benchmarks (their summaries and names), each threshold judged on one
    benchmark. error_rate on the worst: a failed request fails at any load. Every other threshold on the best
    (a latency ceiling: usually the synchronous benchmark's; a throughput or goodput floor: usually the
    throughput benchmark's or the best load's): a sweep ranges from idle to overload, so a figure can only be
    asked of the load that shows the server at its best."""
    def judged_on(t: Threshold) -> int:
        values = [(v, i) for i, v in enumerate(t.measured(s) for s in summaries) if v is not None]
        if not values:
            return 0
        return (max if t.floor or t.name == "error_rate" else min)(values)[1]

    return _line([(t, summaries[i], f" ({names[i]})") for t, i in ((t, judged_on(t)) for t in thresholds)])


def _line(checks: list[tuple[Threshold, dict, str]]) -> tuple[bool, str]:
    """From (threshold, the summary it is judged on, a note naming that summary's run)."""
    crossed = [(t, s, note) for t, s, note in checks if t.crossed(s)]
    if crossed:
        return False, (f"{len(crossed)} of {len(checks)} --fail-on thresholds crossed: "
                       + "; ".join(t.describe(s) + note for t, s, note in crossed))
    held = f"all {len(checks)} thresholds" if len(checks) > 1 else "the threshold"
    return True, f"--fail-on: {held} held: " + "; ".join(t.describe(s) + note for t, s, note in checks)


def _number(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
