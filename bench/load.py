"""The load a run offers, from vLLM's and GuideLLM's vocabulary to a `Profile`.

vLLM (`vllm bench serve`) describes load by `--request-rate` (requests a second, `inf` for all at once),
`--burstiness` (the arrival gaps' gamma shape, 1 a Poisson process) and `--max-concurrency` (the most requests
in flight). GuideLLM names kinds instead (`--rate-type`): synchronous (one at a time), concurrent (N streams),
throughput (all at once), constant (a fixed rate, even gaps), poisson (a Poisson rate) and sweep (synchronous,
throughput, then constant rates between the two: a sequence of runs, sweep.py). Both come down to the two
families of profiles.py: an infinite rate is a closed loop of `max_concurrency` users, each sending as soon as
its last request ends; a finite rate is an open loop whose arrivals wait for no one, `max_concurrency` capping
what is in flight. llmctl's own ramp, spike and stepped (one run whose rate rises until the server saturates)
are rate types too, and a timed trace (`--dataset-name trace`) is an open loop at the times its lines give.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmctl.bench.profiles import Profile

RATE_TYPES = ("synchronous", "concurrent", "throughput", "constant", "poisson", "sweep", "stepped", "ramp", "spike")
# Users that an open loop without --max-concurrency may have in flight, where no request count bounds it.
OPEN_LOOP_CAP = 1000


@dataclass
class Load:
    """What the command line says about the load; `profile()` checks it and makes the Profile."""

    rate_type: str | None = None  # None: vLLM's --request-rate / --burstiness alone decide
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_prompts: int | None = None  # measured requests
    warmup: int = 0
    duration: float | None = None
    trace: bool = False  # the requests carry their own send times
    ramp_from: int = 1
    spike_users: int = 0
    spike_at: float = 0.0
    spike_for: float = 0.0
    rate_step: float = 0.0
    step_duration: float = 10.0
    max_rate: float = math.inf

    def profile(self) -> Profile:
        if self.rate_type is not None and self.rate_type not in RATE_TYPES:
            raise ValueError(f"unknown --rate-type {self.rate_type!r}; choose one of {', '.join(RATE_TYPES)}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be at least 1, got {self.max_concurrency}")
        if not (self.request_rate > 0 and self.burstiness > 0):
            raise ValueError(f"--request-rate and --burstiness must be positive, got {self.request_rate:g} and "
                             f"{self.burstiness:g}")
        if self.trace and self.rate_type is not None:
            raise ValueError("a trace is sent at its own times: leave out --rate-type")
        if self.rate_type is not None and self.burstiness != 1.0 and self.rate_type != "poisson":
            raise ValueError("--burstiness shapes --request-rate's arrivals: give it without --rate-type "
                             "(or with poisson)")
        common = {"duration": self.duration, "requests": self.num_prompts, "warmup": self.warmup}
        if self.trace:
            kind = "trace"
        elif self.rate_type is not None:
            kind = self.rate_type
        else:
            kind = "vllm_open" if math.isfinite(self.request_rate) else "vllm_closed"
        return getattr(self, f"_{kind}")(common)

    def _all_at_once(self) -> int:
        """Users for all at once: every request of the run, or the cap."""
        if self.max_concurrency is not None:
            return self.max_concurrency
        return self.num_prompts + self.warmup if self.num_prompts else OPEN_LOOP_CAP

    def _rate(self, name: str) -> float:
        if not math.isfinite(self.request_rate):
            raise ValueError(f"--rate-type {name} needs a finite --request-rate (requests/s)")
        return self.request_rate

    def _vllm_closed(self, common: dict) -> Profile:
        return Profile("constant", concurrency=self._all_at_once(), **common)

    def _vllm_open(self, common: dict) -> Profile:
        return Profile("rate", concurrency=self._all_at_once(), rate=self.request_rate, burstiness=self.burstiness,
                       **common)

    def _synchronous(self, common: dict) -> Profile:
        if self.max_concurrency not in (None, 1):
            raise ValueError("--rate-type synchronous sends one request at a time: leave out --max-concurrency")
        return Profile("constant", concurrency=1, **common)

    def _concurrent(self, common: dict) -> Profile:
        if self.max_concurrency is None:
            raise ValueError("--rate-type concurrent needs --max-concurrency (the streams kept busy)")
        return Profile("constant", concurrency=self.max_concurrency, **common)

    def _throughput(self, common: dict) -> Profile:
        return Profile("constant", concurrency=self._all_at_once(), **common)

    def _constant(self, common: dict) -> Profile:
        return Profile("rate", concurrency=self._all_at_once(), rate=self._rate("constant"), burstiness=math.inf,
                       **common)

    def _poisson(self, common: dict) -> Profile:
        return Profile("rate", concurrency=self._all_at_once(), rate=self._rate("poisson"),
                       burstiness=self.burstiness, **common)

    def _sweep(self, common: dict) -> Profile:
        """A sweep's first run, one request at a time; sweep.py makes the others (--max-concurrency caps them)."""
        return Profile("constant", concurrency=1, **common)

    def _stepped(self, common: dict) -> Profile:
        return Profile("stepped", concurrency=self._all_at_once(), rate=self._rate("stepped"),
                       burstiness=self.burstiness, rate_step=self.rate_step, step_duration=self.step_duration,
                       max_rate=self.max_rate, **common)

    def _ramp(self, common: dict) -> Profile:
        return Profile("ramp", concurrency=self._needs_users("ramp"), ramp_from=self.ramp_from, **common)

    def _spike(self, common: dict) -> Profile:
        return Profile("spike", concurrency=self._needs_users("spike"), spike_users=self.spike_users,
                       spike_at=self.spike_at, spike_for=self.spike_for, **common)

    def _trace(self, common: dict) -> Profile:
        return Profile("trace", concurrency=self._all_at_once(), **common)

    def _needs_users(self, name: str) -> int:
        if self.max_concurrency is None:
            raise ValueError(f"--rate-type {name} needs --max-concurrency (its users at the "
                             f"{'end' if name == 'ramp' else 'base'})")
        return self.max_concurrency
