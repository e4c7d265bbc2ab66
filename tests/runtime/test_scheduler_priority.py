"""The priority scheduling policy on CPU: admission by (priority, arrival), preemption of the least urgent,
urgent arrivals making room, equals never preempting one another; and a randomized run in the engine's
overlapped pattern that checks the scheduler's invariants every step, with fcfs compared to the
scheduler as it was before policies existed."""

from __future__ import annotations

import random
import subprocess
import sys
import types
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_scheduler import step  # one engine step without a model or overlap

from llmctl.runtime.block_manager import BlockManager
from llmctl.runtime.sampling_params import SamplingParams
from llmctl.runtime.scheduler import Scheduler
from llmctl.runtime.sequence import FinishReason, Sequence, SequenceStatus

# The last commit whose scheduler had no policy: fcfs must schedule exactly as it does.
FCFS_REFERENCE = "7b5621c30230b4bfff757c4f8e3322f496b26ef2"
# The randomized runs' engine: 12 blocks of 4 tokens hold 48, and one request can reach 32.
TINY = dict(num_blocks=12, block_size=4, max_num_seqs=6, budget=16)


def make(num_blocks=16, block_size=4, max_num_seqs=4, budget=16, policy="priority", window=None):
    bm = BlockManager(num_blocks, block_size)
    return bm, Scheduler(bm, max_num_seqs, budget, window, policy=policy)


def seq(name, n, start=0, priority=0):
    return Sequence(name, list(range(start, start + n)), SamplingParams(max_tokens=100), priority=priority)


def finish_after(sched: Scheduler, num_output_tokens: int) -> list[str]:
    ended = [s for s in sched.running if s.num_output_tokens >= num_output_tokens]
    for s in ended:
        sched.finish(s, FinishReason.LENGTH)
    return [s.request_id for s in ended]


def test_admission_goes_by_priority_then_first_come_first_served():
    bm, sched = make(max_num_seqs=1, budget=64)
    for name, priority in [("a", 1), ("b", 0), ("c", 2), ("d", 1), ("e", 0)]:
        sched.add(seq(name, 3, 10 * len(sched.waiting), priority))
    admitted = []
    while sched.has_unfinished():
        admitted += [name for name, n in step(sched) if n > 1]
        finish_after(sched, 2)
    assert admitted == ["b", "e", "a", "d", "c"]
    assert sched.num_preemptions == 0
    assert bm.num_free_blocks == bm.num_blocks


def test_equal_priorities_are_exactly_fcfs():
    plans = {}
    for policy in ("fcfs", "priority"):
        _, sched = make(num_blocks=8, max_num_seqs=3, budget=10, policy=policy)
        for i in range(6):
            sched.add(seq(f"s{i}", 4 + 3 * i, 100 * i, priority=3))
        plans[policy] = []
        while sched.has_unfinished():
            plans[policy].append(step(sched))
            finish_after(sched, 4)
        assert sched.num_preemptions > 0, "the cache was meant to be too small: preemption untested"
    assert plans["priority"] == plans["fcfs"]


def test_an_urgent_arrival_preempts_the_least_urgent_running_one_which_resumes_and_finishes():
    # 9 blocks of 4 tokens: three 9-token prompts take 3 blocks each and fill the cache.
    bm, sched = make(num_blocks=9, block_size=4, max_num_seqs=4, budget=64)
    a, b, c = seq("a", 9, 0, priority=1), seq("b", 9, 100, priority=2), seq("c", 9, 200, priority=1)
    for s in (a, b, c):
        sched.add(s)
    assert step(sched) == [("a", 9), ("c", 9), ("b", 9)]  # running in (priority, arrival) order
    assert bm.num_free_blocks == 0
    urgent, later = seq("urgent", 5, 300, priority=0), seq("later", 5, 400, priority=2)
    sched.add(urgent)
    sched.add(later)
    # b is the least urgent, though c is the newest; urgent needs 2 blocks and b's 3 make room
    assert step(sched) == [("a", 1), ("c", 1), ("urgent", 5)]
    assert b.status is SequenceStatus.WAITING and b.num_preemptions == 1 and b.block_table == []
    assert a.num_preemptions == c.num_preemptions == 0
    finished = []
    while sched.has_unfinished():
        step(sched)
        finished += finish_after(sched, 3)
    assert finished.index("urgent") < finished.index("b")
    assert finished.index("b") < finished.index("later")  # preempted, b kept its place ahead of later
    assert all(s.num_output_tokens == 3 for s in (a, b, c, urgent, later))
    assert bm.num_free_blocks == bm.num_blocks and all(blk.ref_count == 0 for blk in bm.blocks)


def test_an_urgent_arrival_takes_a_slot_from_a_less_urgent_one():
    bm, sched = make(num_blocks=32, max_num_seqs=2, budget=64)
    sched.add(seq("low", 3, 0, priority=5))
    sched.add(seq("mid", 3, 10, priority=4))
    step(sched)
    sched.add(seq("high", 3, 20, priority=0))
    assert step(sched) == [("mid", 1), ("high", 3)]
    assert [s.request_id for s in sched.running] == ["high", "mid"]
    assert sched.waiting.peek().request_id == "low" and sched.num_preemptions == 1


def test_under_kv_pressure_the_least_urgent_running_one_is_preempted_not_the_newest():
    """Two sequences grow until one of them must give its blocks back: under fcfs the newest, under
    priority the least urgent, though it is the older one."""
    victims = {}
    for policy in ("fcfs", "priority"):
        bm, sched = make(num_blocks=6, block_size=4, budget=64, policy=policy)
        old, new = seq("old", 9, 0, priority=1), seq("new", 9, 100, priority=0)
        sched.add(old)
        step(sched)
        sched.add(new)
        while sched.num_preemptions == 0:
            step(sched)
        victims[policy] = [s.request_id for s in (old, new) if s.status is SequenceStatus.WAITING]
        while sched.has_unfinished():
            step(sched)
            finish_after(sched, 6)
        assert bm.num_free_blocks == bm.num_blocks
    assert victims == {"fcfs": ["new"], "priority": ["old"]}


def test_equal_or_less_urgent_arrivals_never_preempt_for_admission():
    bm, sched = make(num_blocks=6, block_size=4, max_num_seqs=2, budget=64)
    running = [seq("r0", 9, 0, priority=1), seq("r1", 9, 100, priority=1)]
    for s in running:
        sched.add(s)
    step(sched)
    assert bm.num_free_blocks == 0
    sched.add(seq("same", 2, 200, priority=1))
    sched.add(seq("less", 2, 300, priority=7))
    for _ in range(3):  # the cache and both slots are full: they wait
        assert [name for name, _ in step(sched)] == ["r0", "r1"]
    assert sched.num_preemptions == 0
    assert [s.request_id for s in sched.running] == ["r0", "r1"]
    finish_after(sched, 1)
    assert step(sched) == [("same", 2), ("less", 2)]


def test_an_unknown_policy_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"fcfs, priority.*'lifo'"):
        make(policy="lifo")


# -- randomized: the engine's use, step by step --------------------------------------------------------


@dataclass
class Spec:
    """A request of the random workload, drawn before any scheduling so that two schedulers see the same."""

    name: str
    prompt: list[int]
    priority: int
    max_tokens: int
    stop_at: int | None  # the output index whose token is a stop token, if any


def workload(seed: int, num_steps: int = 300):
    """{step: requests arriving}, {step: names aborted}."""
    rng = random.Random(seed)
    shared = [rng.randrange(1000) for _ in range(12)]  # a common prefix, so the prefix cache is in play
    arrivals: dict[int, list[Spec]] = {}
    aborts: dict[int, list[str]] = {}
    count = 0
    for t in range(num_steps):
        for _ in range(rng.choice((0, 0, 0, 1, 1, 2))):
            length = rng.randint(1, 20)
            head = shared[: rng.randint(0, length)] if rng.random() < 0.5 else []
            prompt = head + [rng.randrange(1000) for _ in range(length - len(head))]
            max_tokens = rng.randint(1, 12)
            stop_at = rng.randrange(max_tokens) if rng.random() < 0.3 else None
            arrivals.setdefault(t, []).append(Spec(f"r{count}", prompt, rng.randint(0, 3), max_tokens, stop_at))
            if rng.random() < 0.05:
                aborts.setdefault(t + rng.randint(0, 15), []).append(f"r{count}")
            count += 1
    return arrivals, aborts


def simulate(sched, bm, arrivals, aborts, check=True, max_steps=5000):
    """Drive sched as Engine.step() does: schedule step n + 1, mark its sampled tokens pending, then apply
    step n's tokens. Returns every step's plan."""
    seqs: dict[str, Sequence] = {}
    stop_at = {spec.name: spec.stop_at for specs in arrivals.values() for spec in specs}
    in_flight: deque[list[Sequence]] = deque()
    plans = []
    for t in range(max_steps):
        for spec in arrivals.get(t, []):
            s = Sequence(spec.name, list(spec.prompt), SamplingParams(max_tokens=spec.max_tokens),
                         priority=spec.priority)
            s.max_output_tokens = spec.max_tokens
            seqs[spec.name] = s
            sched.add(s)
        for name in aborts.get(t, []):
            sched.finish(seqs[name], FinishReason.ABORT)
        if t > max(arrivals) and not sched.has_unfinished() and not in_flight:
            break
        prev = in_flight.popleft() if in_flight else None
        before = {s: (s.status, s.num_pending) for s in seqs.values() if not s.is_finished}
        batch = sched.schedule()
        if check:
            check_step(sched, bm, batch, before)
        plans.append([(s.request_id, n, tuple(s.block_table)) for s, n in zip(batch.seqs, batch.num_new_tokens)])
        if batch:
            sampled = sched.postprocess(batch)
            for s in sampled:
                s.num_pending += 1
            in_flight.append(sampled)
        for s in prev or ():
            if s.is_finished:  # aborted, or its previous token ended it: this row is dropped
                continue
            s.num_pending -= 1
            s.append_token((len(s.token_ids) * 31 + len(s.request_id)) % 1000)
            if s.num_output_tokens >= s.max_output_tokens:
                sched.finish(s, FinishReason.LENGTH)
            elif s.num_output_tokens - 1 == stop_at[s.request_id]:
                sched.finish(s, FinishReason.STOP)
        if check:
            check_blocks(sched, bm, seqs.values())
    else:
        pytest.fail(f"not done after {max_steps} steps")
    assert all(s.is_finished for s in seqs.values())
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    return plans


def check_step(sched: Scheduler, bm: BlockManager, batch, before) -> None:
    assert batch.num_tokens <= sched.max_num_batched_tokens
    assert all(n >= 1 for n in batch.num_new_tokens)
    assert batch.num_new_tokens[: batch.num_decodes] == [1] * batch.num_decodes
    assert all(n > 1 for n in batch.num_new_tokens[batch.num_decodes :])
    assert len(set(batch.seqs)) == len(batch) <= sched.max_num_seqs
    # A sequence whose last token is in flight holds no slot and computes nothing.
    assert len(sched.running) - sum(s.ends_with_pending() for s in sched.running) <= sched.max_num_seqs
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        assert s.status is SequenceStatus.RUNNING and not s.ends_with_pending()
        assert s.num_computed_tokens + n <= len(s.block_table) * bm.block_size
        status, pending = before[s]
        if status is SequenceStatus.WAITING:
            assert pending == 0, "admitted before its pending token arrived"
    if sched.policy != "priority":
        return

    def key(s):  # requests are named r0, r1, ... in the order they arrive
        return s.priority, int(s.request_id[1:])

    assert sched.running == sorted(sched.running, key=key)
    waiting = [s for s in before if s.status is SequenceStatus.WAITING]
    admitted = [s for s in before if before[s][0] is SequenceStatus.WAITING and s.status is SequenceStatus.RUNNING]
    if admitted and waiting:
        assert max(map(key, admitted)) < min(map(key, waiting)), "admitted out of (priority, arrival) order"
    for victim in (s for s in waiting if before[s][0] is SequenceStatus.RUNNING):
        assert all(key(s) < key(victim) for s in sched.running), "preempted ahead of a less urgent one"


def check_blocks(sched: Scheduler, bm: BlockManager, seqs) -> None:
    """Each block's reference count is the number of sequences holding it; free blocks are those of none."""
    holders = [0] * bm.num_blocks
    for s in seqs:
        if s.status is not SequenceStatus.RUNNING:
            assert s.block_table == [] and s.num_computed_tokens == 0
            continue
        live = s.block_table[s.num_released_blocks :]
        assert len(set(live)) == len(live)
        for b in live:
            holders[b] += 1
    assert [b.ref_count for b in bm.blocks] == holders
    assert set(bm.free_queue) == {i for i, n in enumerate(holders) if n == 0}


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("seed, window", [(0, None), (1, None), (2, 8)])
def test_random_workload_keeps_every_invariant_and_finishes(policy, seed, window):
    bm, sched = make(**TINY, policy=policy, window=window)
    arrivals, aborts = workload(seed)
    plans = simulate(sched, bm, arrivals, aborts)
    assert len(plans) > 300
    assert sched.num_preemptions > 0, "the cache was meant to be too small: preemption untested"


def load_reference_scheduler(monkeypatch) -> types.ModuleType:
    root = Path(__file__).resolve().parents[2]
    try:
        source = subprocess.run(["git", "show", f"{FCFS_REFERENCE}:runtime/scheduler.py"], cwd=root,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"the reference scheduler needs git and commit {FCFS_REFERENCE[:10]}")
    module = types.ModuleType("reference_scheduler")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
    exec(compile(source, f"{FCFS_REFERENCE[:10]}:runtime/scheduler.py", "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("seed, window", [(0, None), (3, None), (4, 8)])
def test_fcfs_schedules_exactly_as_the_scheduler_before_policies(monkeypatch, seed, window):
    reference = load_reference_scheduler(monkeypatch)
    arrivals, aborts = workload(seed)
    bm = BlockManager(TINY["num_blocks"], TINY["block_size"])
    old = reference.Scheduler(bm, TINY["max_num_seqs"], TINY["budget"], window)
    expected = simulate(old, bm, arrivals, aborts, check=False)
    bm, sched = make(**TINY, policy="fcfs", window=window)
    assert simulate(sched, bm, arrivals, aborts, check=False) == expected
    assert sched.num_preemptions > 0
