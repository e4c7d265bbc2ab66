"""Load profiles as plain data: how many users, or how many requests a second, at each moment of a run.

Locust's `LoadTestShape` (in locustfile.py) and the users read the same `Profile`, so a worker process can
pace its arrivals without asking the master. Two families:

- closed loop (constant, ramp, spike): `users(t)` users each send their next request as soon as the last ends.
- open loop (rate, stepped, trace): requests arrive at `rate(t)` a second whatever the server does, with gamma
  gaps (burstiness 1 is a Poisson process, below 1 burstier, above 1 more even, infinite a fixed interval), or
  (trace) each at the time its request carries; `concurrency` caps the requests
  in flight, and an arrival that finds every user busy is sent late and its lag recorded. A stepped profile
  raises the rate every `step_duration` seconds and stops at the first step the server could not keep up with.

GuideLLM's sweep is no profile: it is a sequence of runs, each with its own (sweep.py).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

KINDS = ("constant", "ramp", "spike", "rate", "stepped", "trace")
OPEN_LOOP = ("rate", "stepped", "trace")
INFINITE = ("burstiness", "max_rate")  # fields that may be math.inf (None in the plan file)
# A step is saturated when it completes fewer than this share of the requests it offered...
SATURATED_BELOW = 0.9
# ...and fewer than this many standard deviations of a Poisson count below them, so that a short step's
# chance shortfall (20 offered, 15 arrived) does not end the run.
SATURATED_SIGMAS = 3.0


@dataclass
class Profile:
    kind: str = "constant"
    concurrency: int = 8  # constant users; ramp's last and spike's base count; open loop's cap in flight
    ramp_from: int = 1
    spike_users: int = 0
    spike_at: float = 0.0
    spike_for: float = 0.0
    rate: float = 1.0  # requests/s; a stepped profile's first step
    burstiness: float = 1.0
    rate_step: float = 0.0  # a stepped profile's increase per step; 0 means `rate`
    step_duration: float = 10.0
    max_rate: float = math.inf
    duration: float | None = None  # seconds; None: until `requests` are done
    requests: int | None = None  # measured requests, warm-up not included
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown profile {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.duration is not None and self.duration <= 0:
            raise ValueError(f"duration must be positive, got {self.duration}")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests must be at least 1, got {self.requests}")
        if self.warmup < 0:
            raise ValueError(f"warm-up must be 0 or more requests, got {self.warmup}")
        getattr(self, f"_check_{self.kind}")()

    def _check_constant(self) -> None:
        pass

    def _check_ramp(self) -> None:
        if self.duration is None:
            raise ValueError("a ramp runs over the duration: give one")
        if self.ramp_from < 0:
            raise ValueError(f"a ramp cannot start at {self.ramp_from} users")

    def _check_spike(self) -> None:
        if self.spike_users <= self.concurrency:
            raise ValueError(f"a spike needs more users ({self.spike_users}) than its base ({self.concurrency})")
        if self.spike_for <= 0 or self.spike_at < 0:
            raise ValueError(f"a spike needs a start >= 0 and a length > 0, "
                             f"got at={self.spike_at} for={self.spike_for}")
        if self.duration is None or self.spike_at + self.spike_for > self.duration:
            raise ValueError(f"the spike ({self.spike_at}s + {self.spike_for}s) must end within the duration "
                             f"({self.duration}s)")

    def _check_rate(self) -> None:
        if self.rate <= 0 or self.burstiness <= 0:
            raise ValueError(f"rate and burstiness must be positive, got rate={self.rate} burstiness={self.burstiness}")

    def _check_stepped(self) -> None:
        self._check_rate()
        if self.rate_step < 0 or self.step_duration <= 0:
            raise ValueError(f"stepped rates need a step >= 0 and a step duration > 0, got {self.rate_step} and "
                             f"{self.step_duration}")
        if self.max_rate < self.rate:
            raise ValueError(f"the max rate {self.max_rate} is below the first rate {self.rate}")

    def _check_trace(self) -> None:
        if self.requests is None or self.warmup:
            raise ValueError("a trace replays its own requests: give no warm-up")

    def check_bounded(self) -> None:
        """A run driven by this profile alone (no one at locust's UI) must end by itself."""
        stops_itself = self.kind == "stepped" and self.max_rate < math.inf
        if self.duration is None and self.requests is None and not stops_itself:
            raise ValueError(f"a {self.kind} profile needs a limit: give a duration, a request count or both"
                             + (" (or a max rate)" if self.kind == "stepped" else ""))

    @property
    def open_loop(self) -> bool:
        return self.kind in OPEN_LOOP

    def users(self, t: float) -> int:
        if self.kind == "ramp":
            return max(1, round(self.ramp_from + (self.concurrency - self.ramp_from) * min(t / self.duration, 1.0)))
        if self.kind == "spike" and self.spike_at <= t < self.spike_at + self.spike_for:
            return self.spike_users
        return self.concurrency

    def step(self, t: float) -> int:
        return int(t // self.step_duration) if self.kind == "stepped" else 0

    def rate_at(self, t: float) -> float:
        """Requests/s offered at t (open loop only)."""
        if self.kind == "stepped":
            return self.rate + self.step(t) * (self.rate_step or self.rate)
        return self.rate

    def over(self, t: float) -> bool:
        if self.duration is not None and t >= self.duration:
            return True
        return self.kind == "stepped" and self.rate_at(t) > self.max_rate

    def saturated(self, step: int, done: int, seconds: float) -> bool:
        """Whether the server failed to keep up with the step: it completed `done` requests in the `seconds`
        watched (about the step's duration; the shape looks once a second, and sometimes late)."""
        offered = self.rate_at(step * self.step_duration) * seconds
        return done < min(SATURATED_BELOW * offered, offered - SATURATED_SIGMAS * math.sqrt(offered))

    def gap(self, t: float, share: float, rng: random.Random) -> float:
        """Seconds to this process's next arrival. Each of W worker processes sends 1/W of the rate; with
        burstiness 1 their merged arrivals are again one Poisson process at the full rate."""
        rate = self.rate_at(t) * share
        if math.isinf(self.burstiness):
            return 1.0 / rate
        return rng.gammavariate(self.burstiness, 1.0 / (rate * self.burstiness))

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        return cls(**{**data, **{k: math.inf for k in INFINITE if k in data and data[k] is None}})
