"""A run in `vllm bench serve`'s terms: its --goodput SLOs, its --percentile-metrics at its --metric-percentiles,
and the result JSON that --save-result writes (the same keys as vLLM's, so tools that read those read ours).

vLLM's metric names: ttft (to the first token), tpot (per output token after the first), itl (each gap
between tokens), e2el (end-to-end latency). Statistics are over the successful measured requests, in ms.
"""

from __future__ import annotations

import math
import time

import numpy as np
from rich.table import Table

from llmctl.bench.record import Record

METRICS = ("ttft", "tpot", "itl", "e2el")
DEFAULT_METRICS = "ttft,tpot,itl"
DEFAULT_PERCENTILES = "99"
GOODPUT_KEYS = {"ttft": "ttft", "tpot": "tpot", "e2el": "e2e"}  # vLLM's name: metrics.py's SLO key


def parse_goodput(specs: list[str]) -> dict[str, float]:
    """`ttft:MS tpot:MS e2el:MS` (each its own word) to SLOs in seconds, keyed as metrics.summarize takes them."""
    slo = {}
    for spec in specs:
        name, colon, value = spec.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = math.nan
        if not colon or name not in GOODPUT_KEYS or not (math.isfinite(ms) and ms >= 0):
            raise ValueError(f"bad --goodput {spec!r}: use {'|'.join(GOODPUT_KEYS)}:MILLISECONDS, e.g. ttft:200")
        slo[GOODPUT_KEYS[name]] = ms / 1000
    return slo


def parse_metrics(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in METRICS]
    if bad or not names:
        raise ValueError(f"bad --percentile-metrics {text!r}: a comma list of {', '.join(METRICS)}")
    return names


def parse_percentiles(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 < p <= 100 for p in values):
        raise ValueError(f"bad --metric-percentiles {text!r}: a comma list of numbers in (0, 100], e.g. 50,90,99")
    return values


def _label(p: float) -> str:
    return str(int(p)) if p == int(p) else str(p)


def _samples(ok: list[Record]) -> dict[str, list[float]]:
    return {"ttft": [r.ttft for r in ok if r.ttft is not None], "tpot": [r.tpot for r in ok if r.tpot is not None],
            "itl": [gap for r in ok for gap in r.itl], "e2el": [r.e2e for r in ok if r.e2e is not None]}


def result(records: list[Record], metrics: list[str], percentiles: list[float], slo: dict[str, float],
           config: dict) -> dict:
    """vLLM's result dictionary: the run's setting (config), totals, throughputs and each metric's mean,
    median, standard deviation and percentiles in ms."""
    from llmctl.bench.metrics import meets

    measured = [r for r in records if not r.warmup]
    ok = [r for r in measured if r.ok]
    begin = min((r.start for r in measured), default=0.0)
    duration = max((r.start + (r.e2e or 0.0) - begin for r in measured), default=0.0) or 1e-9
    inputs = sum(r.prompt_tokens or 0 for r in ok)
    outputs = sum(r.output_tokens or 0 for r in ok)
    out = {"date": time.strftime("%Y%m%d-%H%M%S"), **config, "duration": duration, "completed": len(ok),
           "failed": len(measured) - len(ok), "total_input_tokens": inputs, "total_output_tokens": outputs,
           "request_throughput": len(ok) / duration,
           "request_goodput": sum(meets(r, slo) for r in ok) / duration if slo else None,
           "output_throughput": outputs / duration, "total_token_throughput": (inputs + outputs) / duration,
           "input_lens": [r.prompt_tokens for r in ok], "output_lens": [r.output_tokens for r in ok],
           "ttfts": [r.ttft for r in ok], "itls": [r.itl for r in ok],
           "errors": [r.error for r in measured if not r.ok]}
    samples = _samples(ok)
    for name in metrics:
        ms = np.asarray(samples[name] or [0.0]) * 1000
        out[f"mean_{name}_ms"], out[f"median_{name}_ms"] = float(ms.mean()), float(np.median(ms))
        out[f"std_{name}_ms"] = float(ms.std())
        for p in percentiles:
            out[f"p{_label(p)}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def table(data: dict, metrics: list[str], percentiles: list[float]) -> Table:
    """The chosen metrics at the chosen percentiles, as vLLM prints them."""
    table = Table(title="latency (ms), --percentile-metrics at --metric-percentiles", title_justify="left")
    stats = ["mean", "median", *(f"p{_label(p)}" for p in percentiles)]
    table.add_column("metric")
    for stat in stats:
        table.add_column(stat.upper() if stat.startswith("p") else stat, justify="right")
    for name in metrics:
        table.add_row(name.upper(), *(f"{data[f'{stat}_{name}_ms']:,.2f}" for stat in stats))
    return table


def default_filename(config: dict) -> str:
    """vLLM's: openai-{rate}qps[-concurrency{N}]-{model}-{time}.json."""
    concurrency = f"-concurrency{config['max_concurrency']}" if config.get("max_concurrency") else ""
    model = str(config.get("model_id", "model")).rstrip("/").split("/")[-1]
    return f"openai-{config['request_rate']}qps{concurrency}-{model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
