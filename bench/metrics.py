"""From per-request records to the numbers a report shows: latency statistics, throughput, goodput, errors,
and the run's shape over time (output tokens per second, requests in flight).

Warm-up requests are left out. The measured window runs from the first measured request's start to the last
one's end, so throughput is what the server sustained while the load was on. Latencies come from successful
requests only; every failed request counts in the error rate, none is dropped.

Each latency statistic carries a 95% confidence interval, for `bench compare` to tell a change from noise:
the mean's from the normal approximation, a percentile's distribution-free from the order statistics around
it (the ranks a binomial count of samples below the true percentile would reach). Both treat the samples as
independent, which under load they are not quite (neighbouring requests share a batch), so the interval is a
floor on the noise, not a bound.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

from llmctl.bench.record import Record

PERCENTILES = (50, 90, 95, 99)  # the statistics thresholds (--fail-on) may name
TAIL_PERCENTILES = (99.9,)  # shown and compared, never a threshold
WINDOW_S = 1.0  # output tokens/s is counted in windows this long; its peak is the busiest one
Z95 = 1.959964  # the normal quantile of a two-sided 95% interval
SLO_KEYS = ("ttft", "tpot", "e2e")


def parse_slo(text: str | None) -> dict[str, float]:
    """`ttft=200ms,tpot=50ms,e2e=2s` to seconds; a bare number is milliseconds."""
    slo: dict[str, float] = {}
    for part in filter(None, (text or "").split(",")):
        key, _, value = part.partition("=")
        match = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s)?\s*", value)
        if key.strip() not in SLO_KEYS or not match:
            raise ValueError(f"bad SLO {part!r}: use {'|'.join(SLO_KEYS)}=NUMBER[ms|s], comma-separated")
        slo[key.strip()] = float(match[1]) / (1 if match[2] == "s" else 1000)
    return slo


def stat_name(p: float) -> str:
    return f"p{p:g}"


def distribution(seconds: list[float]) -> dict | None:
    """Mean, standard deviation (of the samples, ddof 0), min, percentiles and max in milliseconds, the sample
    count, and `ci95`: each of mean and percentiles' 95% confidence interval, [low, high]."""
    if not seconds:
        return None
    ms = np.sort(np.asarray(seconds, dtype=float) * 1000)
    pcts = (*PERCENTILES, *TAIL_PERCENTILES)
    stats = {"mean": float(ms.mean()), "std": float(ms.std()), "min": float(ms[0]),
             **{stat_name(p): float(np.percentile(ms, p)) for p in pcts}, "max": float(ms[-1])}
    half = Z95 * float(ms.std(ddof=1)) / math.sqrt(len(ms)) if len(ms) > 1 else 0.0
    ci = {"mean": [stats["mean"] - half, stats["mean"] + half],
          **{stat_name(p): _percentile_ci(ms, p / 100) for p in pcts}}
    return {**stats, "n": len(ms), "ci95": ci}


def _percentile_ci(ordered: np.ndarray, q: float) -> list[float]:
    n = len(ordered)
    spread = Z95 * math.sqrt(n * q * (1 - q))
    lo, hi = max(math.floor(n * q - spread) - 1, 0), min(math.ceil(n * q + spread) - 1, n - 1)
    return [float(min(ordered[lo], np.percentile(ordered, q * 100))),
            float(max(ordered[hi], np.percentile(ordered, q * 100)))]


def meets(r: Record, slo: dict[str, float]) -> bool:
    if not r.ok:
        return False
    values = {"ttft": r.ttft, "tpot": r.tpot, "e2e": r.e2e}
    # A one-token answer has no TPOT, so it cannot miss that SLO; a missing TTFT or E2E misses.
    return all(values[k] <= limit if values[k] is not None else k == "tpot" for k, limit in slo.items())


def summarize(records: list[Record], slo: dict[str, float] | None = None) -> dict:
    measured = [r for r in records if not r.warmup]
    ok = [r for r in measured if r.ok]
    if not measured:
        return {"requests": 0, "ok": 0, "errors": {}, "error_rate": None}
    begin = min(r.start for r in measured)
    end = max(r.start + (r.e2e or 0.0) for r in measured)
    seconds = max(end - begin, 1e-9)
    output = sum(r.output_tokens or 0 for r in ok)
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    good = [r for r in ok if meets(r, slo)] if slo else None
    prompts_known = all(r.prompt_tokens is not None for r in ok)  # without a tokenizer or usage: unknown
    per_window = output_per_window(ok, begin, end)
    times, in_flight = concurrency(measured)
    return {
        "requests": len(measured), "ok": len(ok), "warmup": len(records) - len(measured),
        "errors": dict(Counter(r.status for r in measured if not r.ok)),
        "error_causes": error_kinds(measured),
        "error_rate": 1 - len(ok) / len(measured),
        "duration_s": seconds,
        "prompt_tokens": prompt if prompts_known else None,
        "output_tokens": output,
        "tokens_from": dict(Counter(r.tokens_from for r in ok)),
        "request_throughput": len(ok) / seconds,
        "output_throughput": output / seconds,
        "peak_output_throughput": max(per_window, default=output / seconds),
        "total_throughput": (prompt + output) / seconds if prompts_known else None,
        "ttft_ms": distribution([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": distribution([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": distribution([gap for r in ok for gap in r.itl]),
        "e2e_ms": distribution([r.e2e for r in ok]),
        "slo_s": slo or None,
        "goodput": None if good is None else len(good) / seconds,
        "good_share": None if good is None or not ok else len(good) / len(measured),
        "lag_ms": distribution([r.lag for r in measured if r.offered_rate is not None]),
        "peak_concurrency": max(in_flight, default=0),
        "mean_concurrency": _time_mean(times, in_flight, end),
        "start": begin,  # wall-clock seconds; the series below count from here
        "series": {"window_s": WINDOW_S, "output_tokens_per_s": per_window,
                   "concurrency": {"t": [t - begin for t in times], "in_flight": in_flight}},
    }


def token_times(r: Record) -> tuple[list[float], float]:
    """When a request's token events arrived (wall clock), and how many output tokens each stands for: a server
    that packs tokens into fewer events has its usage count spread evenly over them."""
    if r.ttft is None:
        return ([r.start + r.e2e] if r.output_tokens and r.e2e is not None else []), float(r.output_tokens or 0)
    times = [r.start + r.ttft]
    for gap in r.itl:
        times.append(times[-1] + gap)
    return times, (r.output_tokens or len(times)) / len(times)


def output_per_window(ok: list[Record], begin: float, end: float) -> list[float]:
    """Output tokens per second in each whole WINDOW_S window from `begin`; a last, partial window is left out
    (a few tokens in a sliver of a second would read as a burst)."""
    counts = [0.0] * int((end - begin) / WINDOW_S + 1e-9)
    for r in ok:
        times, weight = token_times(r)
        for t in times:
            k = int((t - begin) / WINDOW_S)
            if 0 <= k < len(counts):
                counts[k] += weight
    return [c / WINDOW_S for c in counts]


def concurrency(records: list[Record]) -> tuple[list[float], list[int]]:
    """Requests in flight over time as a step function: each time the count changed (wall clock) and the count
    from then on. A request is in flight from its start to its end (start + E2E; a failure without an E2E
    ends where it started)."""
    changes = Counter()
    for r in records:
        changes[r.start] += 1
        changes[r.start + (r.e2e or 0.0)] -= 1
    times, counts, now = [], [], 0
    for t in sorted(changes):
        if changes[t]:
            now += changes[t]
            times.append(t)
            counts.append(now)
    return times, counts


def _time_mean(times: list[float], counts: list[int], end: float) -> float:
    if not times or end <= times[0]:
        return 0.0
    edges = [*times[1:], end]
    return sum(c * (b - a) for a, b, c in zip(times, edges, counts)) / (end - times[0])


def error_kinds(records: list[Record]) -> list[dict]:
    """The failed requests grouped by cause: status and message with every number as `#` (messages differ by
    little but numbers, "the prompt has 1100 tokens"), with a count and the first one's message; most first."""
    kinds: dict[tuple[str, str], dict] = {}
    for r in records:
        if not r.ok:
            key = (r.status, re.sub(r"\d+", "#", r.error))
            kind = kinds.setdefault(key, {"status": key[0], "message": key[1], "example": r.error, "count": 0})
            kind["count"] += 1
    return sorted(kinds.values(), key=lambda k: -k["count"])


def rate_steps(records: list[Record], step_duration: float) -> list[dict]:
    """Per step of a stepped profile: the offered rate, the completions per second inside the step's time window
    (what the server sustained), and the latency of the requests sent during the step. The run stops a moment
    into the step after the saturated one; that stub of a step is left out."""
    if not records:
        return []
    t0 = min(r.start for r in records)
    measured = [r for r in records if not r.warmup]
    last_end = max(r.start + (r.e2e or 0) for r in records)
    steps = []
    for step in sorted({r.step for r in measured}):
        sent = [r for r in measured if r.step == step]
        lo = t0 + step * step_duration
        span = min(step_duration, last_end - lo)
        if span < step_duration / 2:
            continue
        done = [r for r in measured if r.ok and lo <= r.start + r.e2e < lo + span]
        ttft = distribution([r.ttft for r in sent if r.ok and r.ttft is not None]) or {}
        steps.append({"step": step, "offered_rate": sent[0].offered_rate, "requests": len(sent),
                      "request_throughput": len(done) / span,
                      "output_throughput": sum(r.output_tokens or 0 for r in done) / span,
                      "ttft_p50_ms": ttft.get("p50"), "ttft_p99_ms": ttft.get("p99"),
                      "error_rate": 1 - sum(r.ok for r in sent) / len(sent)})
    return steps
