"""Continuous batching: which sequences compute how many tokens in the next step.

There is no prefill phase and no decode phase. Each sequence has tokens whose KV is computed and
tokens that still want computing (a new prompt: all of them; a running one: the token it sampled
last). A step spends a budget of `max_num_batched_tokens` over at most `max_num_seqs` sequences:
running sequences first, then waiting ones, in the policy's order. A prompt longer than what is left
of the budget is computed in chunks over several steps. When the KV cache is full, the last running
sequence in that order is preempted: its blocks are freed and it goes back to the waiting queue, to
be recomputed (mostly from the prefix cache) later.

The policy decides the order. "fcfs": arrival order; a preempted sequence goes back to the front of
the queue. Because the oldest work always goes first and preemption takes the newest, nobody starves.
"priority" (as vLLM's): order by (priority, arrival), a lower value being more urgent; a preempted
sequence keeps its key, so it stays ahead of later arrivals of its priority. A waiting sequence with
no room also preempts running ones of a less urgent priority (least urgent, newest first), never of
its own or a more urgent one. Within a priority that is fcfs, so equals never starve one another; a
stream of urgent requests can hold less urgent ones back indefinitely, which is what priorities are for.

The engine schedules a step while the previous one still runs, so a sequence's newest token may be
pending (sampled on the device, value unknown here): it counts as a token to compute, except when it is
certain to be the last (max_tokens), and a waiting sequence is not admitted until its tokens are known.

A running sequence may bring speculative drafts (`Sequence.draft_token_ids`, from speculative.py): they are
computed after its newest token when the budget and the blocks left once every running sequence has its own
tokens allow (`_schedule_drafts`), never at the cost of a preemption, and count as computed only once the
sampler accepts them (`accept_drafts`).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from llmctl.runtime.block_manager import BlockManager
from llmctl.runtime.sequence import FinishReason, Sequence, SequenceStatus

POLICIES = ("fcfs", "priority")


@dataclass
class ScheduledBatch:
    """The one description of a step: which sequences compute how many tokens. Those that compute one
    token (decodes) come first, `num_decodes` of them, whatever order they were added in: the attention
    kernels give them a launch of their own, and the model runner reads the count from here."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # tokens each sequence computes this step
    num_decodes: int = 0
    # per sequence, the speculative drafts among its new tokens (the last ones); empty for most
    drafts: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def add(self, seq: Sequence, num_new: int, drafts: list[int] | None = None) -> None:
        at = self.num_decodes if num_new == 1 else len(self.seqs)
        self.seqs.insert(at, seq)
        self.num_new_tokens.insert(at, num_new)
        self.drafts.insert(at, drafts or [])
        self.num_decodes += num_new == 1

    def add_drafts(self, seq: Sequence, drafts: list[int]) -> None:
        """seq, added as a decode, computes drafts after its newest token too (so it is no decode any more)."""
        i = self.seqs.index(seq)
        del self.seqs[i], self.num_new_tokens[i], self.drafts[i]
        self.num_decodes -= 1
        self.add(seq, 1 + len(drafts), drafts)

    @property
    def speculative(self) -> bool:
        return any(self.drafts)


class _FcfsQueue(deque):
    """Waiting sequences in arrival order; a preempted one goes back to the front."""

    def push(self, seq: Sequence, preempted: bool = False) -> None:
        if preempted:
            self.appendleft(seq)
        else:
            self.append(seq)

    def peek(self) -> Sequence:
        return self[0]

    def pop_next(self) -> Sequence:
        return self.popleft()


class _PriorityQueue:
    """Waiting sequences as a heap on their (priority, arrival) key, which is unique and which a preempted
    sequence keeps."""

    def __init__(self, key: Callable[[Sequence], tuple[int, int]]) -> None:
        self.key = key
        self.heap: list[tuple[tuple[int, int], Sequence]] = []

    def __len__(self) -> int:
        return len(self.heap)

    def push(self, seq: Sequence, preempted: bool = False) -> None:
        heapq.heappush(self.heap, (self.key(seq), seq))

    def peek(self) -> Sequence:
        return self.heap[0][1]

    def pop_next(self) -> Sequence:
        return heapq.heappop(self.heap)[1]

    def remove(self, seq: Sequence) -> None:
        self.heap.remove((self.key(seq), seq))
        heapq.heapify(self.heap)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 window: int | None = None, policy: str = "fcfs") -> None:
        """window: the sliding window of a model whose every layer has one; blocks wholly before every
        future query's window are handed back as sequences advance. policy: "fcfs" or "priority"."""
        if policy not in POLICIES:
            raise ValueError(f"scheduling policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.block_manager = block_manager
        self.window = window
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self._arrival: dict[Sequence, int] = {}  # the order add() saw, for the priority key
        self._arrivals = itertools.count()
        self.waiting = _FcfsQueue() if policy == "fcfs" else _PriorityQueue(self._key)
        self.running: list[Sequence] = []  # in the policy's order
        self.num_preemptions = 0

    def _key(self, seq: Sequence) -> tuple[int, int]:
        return seq.priority, self._arrival[seq]

    def add(self, seq: Sequence) -> None:
        self._arrival[seq] = next(self._arrivals)
        self.waiting.push(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        if self.policy == "priority" and self.waiting:
            self._preempt_for(self.waiting.peek())
        preempted, ending = self._schedule_running(batch, budget)
        if not preempted:
            self._schedule_drafts(batch, budget - batch.num_tokens)
            # A sequence whose last token is on its way no longer holds its slot.
            self._schedule_waiting(batch, budget - batch.num_tokens, self.max_num_seqs + ending)
        return batch

    def _preempt_for(self, seq: Sequence) -> None:
        """Preempt running sequences less urgent than waiting seq, least urgent first, until it has a slot
        and blocks for its first chunk. They are preempted even when that alone does not make room: what
        they would go on taking is kept for seq, which is admitted ahead of them."""
        if seq.num_pending:  # not admitted before its token arrives
            return
        num_new = self._prompt_chunk(seq, self.max_num_batched_tokens)
        while self.running and self.running[-1].priority > seq.priority:
            ending = sum(s.ends_with_pending() for s in self.running)
            if len(self.running) - ending < self.max_num_seqs and self.block_manager.can_allocate(seq, num_new):
                return
            self._preempt(self.running[-1])

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> tuple[bool, int]:
        """Schedule running sequences; whether any was preempted, and how many are ending (skipped)."""
        preempted, ending = False, 0
        block_size = self.block_manager.block_size
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.ends_with_pending():  # finishes when its token arrives: computing it would be wasted
                ending += 1
                i += 1
                continue
            num_new = min(seq.num_uncomputed_tokens(), budget)
            if seq.num_computed_tokens + num_new <= len(seq.block_table) * block_size:
                # Most decode steps: the new token fits in a block the sequence already has.
                batch.add(seq, num_new)
                budget -= num_new
                i += 1
                continue
            while not self.block_manager.can_allocate(seq, num_new):
                preempted = True
                victim = self.running[-1]  # last in the policy's order, so never more urgent than seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.allocate(seq, num_new)
                batch.add(seq, num_new)
                budget -= num_new
                i += 1
        return preempted, ending

    def _schedule_drafts(self, batch: ScheduledBatch, budget: int) -> None:
        """Once every running sequence has its own tokens: each decoding one's drafts, in order, from the budget
        and the blocks left, so that drafts never cost anyone a preemption. Drafts follow the newest token, so a
        sequence whose newest token is pending brings none; short of a new block, only those that fit the
        sequence's last block go."""
        block_size = self.block_manager.block_size
        for seq in [s for s in batch.seqs[: batch.num_decodes] if s.draft_token_ids]:  # (drafts need a decode)
            if budget <= 0:
                return
            if seq.num_pending or seq.num_uncomputed_tokens() != 1:
                continue
            drafts = seq.draft_token_ids[:budget]
            room = len(seq.block_table) * block_size - seq.num_computed_tokens - 1  # slots after its new token
            if len(drafts) > room:
                if self.block_manager.can_allocate(seq, 1 + len(drafts)):
                    self.block_manager.allocate(seq, 1 + len(drafts))
                else:
                    drafts = drafts[:room]
            if drafts:
                batch.add_drafts(seq, drafts)
                budget -= len(drafts)

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int, max_running: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < max_running:
            seq = self.waiting.peek()
            if seq.num_pending:  # preempted while its last token was in flight: not before it arrives
                break
            num_new = self._prompt_chunk(seq, budget)
            if not self.block_manager.can_allocate(seq, num_new):
                break
            self.block_manager.allocate(seq, num_new)
            self.waiting.pop_next()
            seq.status = SequenceStatus.RUNNING
            if self.policy == "fcfs":
                self.running.append(seq)
            else:
                bisect.insort(self.running, seq, key=self._key)
            batch.add(seq, num_new)
            budget -= num_new

    def _prompt_chunk(self, seq: Sequence, budget: int) -> int:
        """How many tokens waiting seq computes if admitted now: those past its cached prefix, within budget."""
        cached = len(self.block_manager.cached_prefix(seq)) * self.block_manager.block_size
        return min(seq.num_tokens - cached, budget)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.block_manager.free(seq)
        self.waiting.push(seq, preempted=True)

    def postprocess(self, batch: ScheduledBatch) -> list[Sequence]:
        """Advance each sequence by what it computed; return those whose last token was computed,
        which are the ones that sampled a new token this step."""
        sampled = []
        for seq, num_new, drafts in zip(batch.seqs, batch.num_new_tokens, batch.drafts):
            if seq.is_finished:  # ended by its pending token, applied while this step ran (structured outputs):
                sampled.append(seq)  # it computed that token, so it sampled; the engine drops the row
                continue
            self._advance(seq, num_new - len(drafts))  # drafts count once accepted (accept_drafts)
            if seq.num_computed_tokens == seq.num_tokens:
                sampled.append(seq)
        return sampled

    def accept_drafts(self, seq: Sequence, accepted: int) -> None:
        """After a speculative step's tokens are applied: its first `accepted` drafts are now tokens of seq's
        whose KV that step computed; the blocks past what seq's tokens need go back to the pool."""
        if seq.is_finished:
            return
        self._advance(seq, accepted)
        self.block_manager.trim(seq, seq.num_tokens)

    def _advance(self, seq: Sequence, num_computed: int) -> None:
        seq.num_computed_tokens += num_computed
        if seq.num_computed_tokens // self.block_manager.block_size > len(seq.block_hashes):
            self.block_manager.cache_full_blocks(seq)
        if self.window is not None:  # the next query is at num_computed_tokens
            self.block_manager.release_before(seq, seq.num_computed_tokens - self.window + 1)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End seq (done or aborted), wherever it is, and return its blocks to the pool."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        del self._arrival[seq]
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.num_pending = 0  # a token still in flight for it will be dropped
        self.block_manager.free(seq)
