"""vLLM's --request-rate / --burstiness / --max-concurrency and GuideLLM's --rate-type, as profiles."""

from __future__ import annotations

import math

import pytest

from llmctl.bench.load import Load
from llmctl.bench.profiles import Profile


def shape(**kwargs) -> tuple:
    p = Load(num_prompts=kwargs.pop("num_prompts", 100), **kwargs).profile()
    return p.kind, p.concurrency, p.rate, p.burstiness


@pytest.mark.parametrize("kwargs, want", [
    ({}, ("constant", 100, 1.0, 1.0)),  # vLLM's default: every request at once
    ({"max_concurrency": 8}, ("constant", 8, 1.0, 1.0)),
    ({"request_rate": 5.0, "burstiness": 0.5, "max_concurrency": 4}, ("rate", 4, 5.0, 0.5)),
    ({"request_rate": 5.0}, ("rate", 100, 5.0, 1.0)),
    ({"rate_type": "synchronous"}, ("constant", 1, 1.0, 1.0)),
    ({"rate_type": "concurrent", "max_concurrency": 6}, ("constant", 6, 1.0, 1.0)),
    ({"rate_type": "throughput"}, ("constant", 100, 1.0, 1.0)),
    ({"rate_type": "constant", "request_rate": 3.0}, ("rate", 100, 3.0, math.inf)),
    ({"rate_type": "poisson", "request_rate": 3.0}, ("rate", 100, 3.0, 1.0)),
    ({"rate_type": "stepped", "request_rate": 2.0, "max_rate": 10.0}, ("stepped", 100, 2.0, 1.0)),
    ({"rate_type": "sweep"}, ("constant", 1, 1.0, 1.0)),  # its first benchmark: one at a time
    ({"trace": True}, ("trace", 100, 1.0, 1.0)),
])
def test_each_load_kind_makes_its_profile(kwargs, want):
    assert shape(**kwargs) == want


def test_a_constant_rate_has_even_gaps_and_survives_the_plan_file():
    profile = Load(rate_type="constant", request_rate=4.0, num_prompts=10).profile()
    assert {profile.gap(0.0, 1.0, None) for _ in range(3)} == {0.25}
    assert Profile.from_dict(profile.to_dict()) == profile
