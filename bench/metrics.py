"""From per-request records to the numbers a report shows: latency percentiles, throughput, goodput, errors.

Warm-up requests are left out. The measured window runs from the first measured request's start to the last
one's end, so throughput is what the server sustained while the load was on. Latencies come from successful
requests only; every failed request counts in the error rate, none is dropped.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from llmctl.bench.record import Record

PERCENTILES = (50, 90, 95, 99)
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


def distribution(seconds: list[float]) -> dict[str, float] | None:
    """Mean and percentiles, in milliseconds."""
    if not seconds:
        return None
    ms = np.asarray(seconds) * 1000
    return {"mean": float(ms.mean()), **{f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES}, "n": len(ms)}


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
    return {
        "requests": len(measured), "ok": len(ok), "warmup": len(records) - len(measured),
        "errors": dict(Counter(r.status for r in measured if not r.ok)),
        "error_rate": 1 - len(ok) / len(measured),
        "duration_s": seconds,
        "prompt_tokens": prompt if prompts_known else None,
        "output_tokens": output,
        "tokens_from": dict(Counter(r.tokens_from for r in ok)),
        "request_throughput": len(ok) / seconds,
        "output_throughput": output / seconds,
        "total_throughput": (prompt + output) / seconds if prompts_known else None,
        "ttft_ms": distribution([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": distribution([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": distribution([gap for r in ok for gap in r.itl]),
        "e2e_ms": distribution([r.e2e for r in ok]),
        "slo_s": slo or None,
        "goodput": None if good is None else len(good) / seconds,
        "good_share": None if good is None or not ok else len(good) / len(measured),
        "lag_ms": distribution([r.lag for r in measured if r.offered_rate is not None]),
    }


def sweep_steps(records: list[Record], step_duration: float) -> list[dict]:
    """Per sweep step: the offered rate, the completions per second inside the step's time window (what the
    server sustained), and the latency of the requests sent during the step. The run stops a moment into the
    step after the saturated one; that stub of a step is left out."""
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
