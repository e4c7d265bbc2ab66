"""Continuous batching on CPU: budgets, chunked prefill, preemption and resumption, no starvation."""

from __future__ import annotations

from llmctl.runtime.block_manager import BlockManager
from llmctl.runtime.sampling_params import SamplingParams
from llmctl.runtime.scheduler import Scheduler
from llmctl.runtime.sequence import FinishReason, Sequence, SequenceStatus


def make(num_blocks=16, block_size=4, max_num_seqs=4, budget=16, prefix=True):
    bm = BlockManager(num_blocks, block_size, prefix)
    return bm, Scheduler(bm, max_num_seqs, budget)


def seq(name, n, start=0):
    return Sequence(name, list(range(start, start + n)), SamplingParams(max_tokens=100))


def step(sched: Scheduler, token=7):
    """One engine step without a model: every sequence that finished its prompt samples `token`."""
    batch = sched.schedule()
    plan = [(s.request_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens)]
    for s in sched.postprocess(batch):
        s.append_token(token)
    return plan


def test_prompts_then_decodes_share_one_budget():
    bm, sched = make(budget=16)
    a, b = seq("a", 6), seq("b", 5, 100)
    sched.add(a)
    sched.add(b)
    assert step(sched) == [("a", 6), ("b", 5)]
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    assert step(sched) == [("a", 1), ("b", 1)]
    assert a.num_computed_tokens == 7 and a.num_output_tokens == 2


def test_long_prompt_is_chunked_and_decodes_keep_going():
    bm, sched = make(budget=8)
    a = seq("a", 3)
    sched.add(a)
    assert step(sched) == [("a", 3)]
    long = seq("long", 20, 100)
    sched.add(long)
    # the running decode goes first, the prompt takes what is left of the budget, chunk by chunk
    assert step(sched) == [("a", 1), ("long", 7)]
    assert step(sched) == [("a", 1), ("long", 7)]
    assert long.num_output_tokens == 0
    assert step(sched) == [("a", 1), ("long", 6)]
    assert long.num_output_tokens == 1
    assert step(sched) == [("a", 1), ("long", 1)]


def test_max_num_seqs_caps_the_running_set():
    bm, sched = make(max_num_seqs=2, budget=64)
    seqs = [seq(f"s{i}", 2, 10 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    assert [name for name, _ in step(sched)] == ["s0", "s1"]
    assert seqs[2].status is SequenceStatus.WAITING
    sched.finish(seqs[0], FinishReason.STOP)
    assert [name for name, _ in step(sched)] == ["s1", "s2"]


def test_preemption_frees_the_newest_and_it_resumes_from_the_prefix_cache():
    # 6 blocks of 4 tokens; two sequences of 9 tokens take 3 blocks each, and both want a fourth soon.
    bm, sched = make(num_blocks=6, block_size=4, budget=64)
    old, new = seq("old", 9), seq("new", 9, 100)
    sched.add(old)
    sched.add(new)
    step(sched)  # both prefilled (9 computed + 1 sampled), blocks [0,1,2] and [3,4,5]
    for _ in range(3):
        step(sched)  # 10, 11, 12 computed: still 3 blocks each
    assert bm.num_free_blocks == 0
    plan = step(sched)  # old needs a 4th block for its 13th token: the newest, "new", is preempted
    assert plan == [("old", 1)]
    assert sched.num_preemptions == 1
    assert new.status is SequenceStatus.WAITING and new.block_table == [] and sched.waiting[0] is new
    assert old.block_table == [0, 1, 2, 5]  # new's blocks went back tail first: 5, 4, 3
    # once old is done, new resumes: its first full blocks still sit in the cache
    sched.finish(old, FinishReason.STOP)
    tokens_before = new.num_tokens  # 9 prompt + 4 sampled, all to be recomputed but the cached 8
    plan = step(sched)
    assert new.num_cached_tokens == 8
    assert plan == [("new", tokens_before - 8)]
    assert new.num_output_tokens == 5
    assert bm.blocks[new.block_table[0]].ref_count == 1


def test_every_block_returns_once_all_requests_end_aborted_ones_too():
    bm, sched = make(num_blocks=12, block_size=4, max_num_seqs=3, budget=10)
    seqs = [seq(f"s{i}", 5 + i, 20 * i) for i in range(5)]
    for s in seqs:
        sched.add(s)
    for _ in range(3):
        step(sched)
    sched.finish(seqs[4], FinishReason.ABORT)  # still waiting
    sched.finish(seqs[1], FinishReason.ABORT)  # running
    while sched.has_unfinished():
        step(sched)
        for s in list(sched.running):
            if s.num_output_tokens >= 4:
                sched.finish(s, FinishReason.LENGTH)
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert all(s.is_finished for s in seqs)


def test_nobody_starves_under_constant_pressure():
    """A stream of new arrivals never pushes an old request out for good."""
    bm, sched = make(num_blocks=10, block_size=4, max_num_seqs=2, budget=8)
    first = seq("first", 6)
    sched.add(first)
    arrivals = 0
    for _ in range(60):
        if len(sched.waiting) < 3:
            sched.add(seq(f"n{arrivals}", 6, 100 + 10 * arrivals))
            arrivals += 1
        step(sched)
        for s in list(sched.running):
            if s.num_output_tokens >= 5:
                sched.finish(s, FinishReason.LENGTH)
        if first.is_finished:
            break
    assert first.is_finished
    assert first.num_output_tokens == 5


def test_one_token_sequences_lead_the_batch_and_are_counted():
    # A prompt whose prefix is cached but for its last token computes one token, like a decode: it joins
    # the decodes at the front even though it was admitted after a longer prompt.
    bm, sched = make(budget=32)
    x = seq("x", 9)
    sched.add(x)
    assert step(sched) == [("x", 9)]
    sched.add(seq("c", 6, 100))
    sched.add(seq("d", 9))  # the same 9 tokens as x: 8 of them cached
    batch = sched.schedule()
    assert [(s.request_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens)] == [("x", 1), ("d", 1), ("c", 6)]
    assert batch.num_decodes == 2


def test_batch_keeps_decodes_first_whatever_the_order_they_come_in():
    from llmctl.runtime.scheduler import ScheduledBatch

    batch = ScheduledBatch()
    for name, n in [("a", 1), ("b", 5), ("c", 1), ("d", 3), ("e", 1)]:
        batch.add(seq(name, 8), n)
    assert [s.request_id for s in batch.seqs] == ["a", "c", "e", "b", "d"]
    assert batch.num_new_tokens == [1, 1, 1, 5, 3] and batch.num_decodes == 3
