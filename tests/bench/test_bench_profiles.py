"""Load profiles: users and rates over time, their limits, and the arrival process's statistics."""

from __future__ import annotations

import random
import statistics

import pytest

from llmctl.bench.profiles import Profile


def test_ramp_spike_and_stepped_over_time():
    ramp = Profile("ramp", concurrency=21, ramp_from=1, duration=10)
    assert [ramp.users(t) for t in (0, 5, 10, 20)] == [1, 11, 21, 21]
    spike = Profile("spike", concurrency=2, spike_users=10, spike_at=3, spike_for=2, duration=10)
    assert [spike.users(t) for t in (0, 2.9, 3, 4.9, 5)] == [2, 2, 10, 10, 2]
    stepped = Profile("stepped", rate=2, rate_step=3, step_duration=5, max_rate=8)
    assert [(stepped.step(t), stepped.rate_at(t)) for t in (0, 4.9, 5, 10)] == [(0, 2), (0, 2), (1, 5), (2, 8)]
    assert not stepped.over(14.9) and stepped.over(15)  # the next step would offer 11 > 8
    assert Profile("constant", duration=3).over(3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="surge", duration=1), "unknown profile 'surge'"),
    (dict(kind="ramp", requests=5), "a ramp runs over the duration"),
    (dict(kind="spike", concurrency=4, spike_users=2, spike_for=1, duration=5), "more users (2) than its base (4)"),
    (dict(kind="spike", spike_users=20, spike_at=4, spike_for=3, duration=5), "must end within the duration"),
    (dict(kind="rate", rate=0, duration=1), "rate and burstiness must be positive"),
    (dict(kind="stepped", rate=5, max_rate=2), "max rate 2 is below the first rate 5"),
    (dict(kind="constant", concurrency=0, duration=1), "concurrency must be at least 1"),
    (dict(kind="constant", duration=-1), "duration must be positive"),
])
def test_impossible_profiles_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Profile(**kwargs)


def test_a_run_without_a_limit_is_refused_unless_stepped_rates_have_a_max():
    with pytest.raises(ValueError, match="needs a limit"):
        Profile("constant").check_bounded()
    with pytest.raises(ValueError, match="needs a limit"):
        Profile("stepped").check_bounded()
    Profile("stepped", max_rate=10).check_bounded()
    Profile("constant", requests=5).check_bounded()


@pytest.mark.parametrize("burstiness, cv", [(1.0, 1.0), (0.25, 2.0), (4.0, 0.5)])
def test_arrival_gaps_have_the_asked_rate_and_burstiness(burstiness, cv):
    """Gamma gaps with shape b: mean 1/rate, coefficient of variation 1/sqrt(b); two workers at half the rate
    each make the same mean rate together."""
    profile = Profile("rate", rate=50, burstiness=burstiness, duration=1)
    rng = random.Random(0)
    gaps = [profile.gap(0.0, 0.5, rng) for _ in range(20000)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 25, rel=0.03)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(cv, rel=0.05)


def test_a_step_is_saturated_by_a_clear_shortfall_not_by_chance():
    stepped = Profile("stepped", rate=10, step_duration=2)  # offers 20, 40, 60, ... requests a step
    assert not stepped.saturated(0, 8, 2.0)  # 20 offered: 8 is within chance (3 sd = 13.4)
    assert stepped.saturated(0, 6, 2.0)
    assert not stepped.saturated(1, 60, 3.0)  # looked late, after 3 s: 60 offered at 20/s
    long = Profile("stepped", rate=100, step_duration=10)  # 1000 offered: the 90% rule decides
    assert not long.saturated(0, 901, 10.0) and long.saturated(0, 899, 10.0)


def test_profile_round_trips_through_the_plan_file():
    p = Profile("stepped", rate=1, step_duration=2, requests=7)
    assert Profile.from_dict(p.to_dict()) == p
