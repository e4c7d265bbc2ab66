"""GuideLLM's sweep (`--rate-type sweep`): one request at a time, then everything at once, then the rates between.

The range worth measuring a server over lies between two loads that need no knowledge of it: synchronous (one
request at a time: the lowest rate anyone asks of it) and throughput (every request at once: the highest it
gives). The sweep runs those two, reads the request rate each achieved, and then runs constant-rate benchmarks
(even gaps) at rates evenly spaced above the synchronous rate up to the throughput rate. As GuideLLM's `--rate N`,
`benchmarks` counts them all, so N - 2 constant rates; the last, at the throughput rate, shows whether the server
keeps up with its own maximum when requests arrive on a schedule rather than as it frees up.

Each benchmark is a locust run of its own, bounded as a single run is (--duration, --num-prompts and --warmup
apply to each), writing a full report in a directory of its own; sweep_report.py puts the benchmarks together.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from llmctl.bench import runner
from llmctl.bench.load import Load
from llmctl.bench.profiles import Profile
from llmctl.bench.progress import Ticker
from llmctl.bench.report import Report, fmt

DEFAULT_BENCHMARKS = 10  # GuideLLM's --rate for a sweep
FIRST = ("synchronous", "throughput")  # the two runs whose achieved rates span the sweep


@dataclass
class Benchmark:
    """One run of a sweep: its kind, the profile it ran, its directory and its report."""

    rate_type: str  # synchronous, throughput or constant
    profile: Profile
    out_dir: Path
    report: Report

    @property
    def offered_rate(self) -> float | None:
        return self.profile.rate if self.profile.open_loop else None

    @property
    def achieved_rate(self) -> float:
        """Successful requests a second, from which the constant rates are spaced."""
        return self.report.summary.get("request_throughput") or 0.0

    def describe(self) -> str:
        s = self.report.summary
        offered = f" at {fmt(self.offered_rate)} req/s" if self.offered_rate is not None else ""
        ttft = (s.get("ttft_ms") or {}).get("p50")
        return (f"{self.out_dir.name}: {self.rate_type}{offered}: {fmt(self.achieved_rate)} req/s achieved, "
                f"{fmt(s['output_throughput'])} output tok/s, TTFT P50 {fmt(ttft)} ms, {s['requests'] - s['ok']} "
                f"of {s['requests']} requests failed")


@dataclass
class Sweep:
    load: Load  # what each benchmark shares: its limits and the in-flight cap
    benchmarks: int = DEFAULT_BENCHMARKS

    @classmethod
    def from_load(cls, load: Load) -> Sweep:
        """The sweep the command line asks for; --request-rate (--rate) is its count of benchmarks, as GuideLLM's."""
        count = DEFAULT_BENCHMARKS if math.isinf(load.request_rate) else load.request_rate
        if count != int(count) or count < len(FIRST):
            raise ValueError(f"--rate-type sweep takes --rate N, its benchmarks in all (at least 2: synchronous and "
                             f"throughput), got {load.request_rate:g}")
        if load.rate_step or math.isfinite(load.max_rate):
            raise ValueError("--rate-step and --max-rate belong to --rate-type stepped; a sweep finds its own rates")
        return cls(load, int(count))

    def profile(self, rate_type: str, rate: float = math.inf) -> Profile:
        """A benchmark's profile: --max-concurrency caps every benchmark but the one-at-a-time one."""
        cap = None if rate_type == "synchronous" else self.load.max_concurrency
        return replace(self.load, rate_type=rate_type, request_rate=rate, max_concurrency=cap).profile()

    def rates(self, synchronous: float, throughput: float) -> list[float]:
        """The constant rates: benchmarks - 2 of them, evenly spaced over (synchronous, throughput]."""
        between = self.benchmarks - len(FIRST)
        return [synchronous + (throughput - synchronous) * k / between for k in range(1, between + 1)]

    def next_benchmark(self, done: list[Benchmark]) -> tuple[str, float] | None:
        """The benchmark after `done` as (rate type, rate), or None: the sweep is over, or the first two gave no
        rate to start from (none of their requests succeeded)."""
        if len(done) < len(FIRST):
            return FIRST[len(done)], math.inf
        low, high = done[0].achieved_rate, done[1].achieved_rate
        rates = self.rates(low, high) if low > 0 and high > 0 else []
        k = len(done) - len(FIRST)
        return ("constant", rates[k]) if k < len(rates) else None

    def run(self, plan: runner.Plan, api_key: str | None, build: Callable[[runner.Plan], Report],
            say: Callable[[str], None], watch: Callable[[runner.Plan], Ticker | None]) -> list[Benchmark]:
        """Run the benchmarks in turn, each in a directory of `plan.out_dir`; `build` makes a finished run's
        report, `say` hears a line about each, `watch` gives a run's progress ticker (or None). Ctrl-C ends the
        running benchmark and the sweep; RuntimeError when locust fails."""
        done: list[Benchmark] = []
        while (step := self.next_benchmark(done)) is not None:
            benchmark, interrupted = self._run_one(plan, api_key, build, watch, len(done) + 1, *step)
            done.append(benchmark)
            say(benchmark.describe())
            if interrupted:
                say(f"interrupted: the sweep ends after {len(done)} of its {self.benchmarks} benchmarks")
                return done
        if len(done) < self.benchmarks:
            say(f"the synchronous or throughput benchmark had no successful request, so there are no rates "
                f"between them: the sweep ends after {len(done)} of its {self.benchmarks} benchmarks")
        return done

    def _run_one(self, plan: runner.Plan, api_key: str | None, build: Callable[[runner.Plan], Report],
                 watch: Callable[[runner.Plan], Ticker | None], number: int, rate_type: str,
                 rate: float) -> tuple[Benchmark, bool]:
        out = Path(plan.out_dir, f"{number:02d}-{rate_type}")
        out.mkdir(parents=True, exist_ok=True)
        one = replace(plan, out_dir=str(out), profile=self.profile(rate_type, rate))
        ticker = watch(one)
        code, interrupted = runner.run_locust(one, api_key, tick=ticker and ticker.tick)
        if ticker:
            ticker.close()
        if code != 0:
            raise RuntimeError(f"locust failed (exit {code}) in the {rate_type} benchmark; its log: "
                               f"{out / 'locust.log'}")
        report = build(one)
        report.write(out)
        return Benchmark(rate_type, one.profile, out, report), interrupted
