"""Speculative decoding: guess a running sequence's next tokens cheaply, let one step of the model check them.

A decode step is bound by reading the weights, so a step that computes 1 + K tokens of a sequence costs
little more than one. Before a step, `Speculator.propose` gives each eligible sequence up to K draft tokens
(`Sequence.draft_token_ids`); the scheduler computes them after its newest token; the sampler scores every
position and keeps the drafts up to the first one the model would not have produced (`Sampler`, rejection
sampling: greedy rows compare with the argmax, sampled rows accept a draft d with probability p(d) and
otherwise draw from p without d, so every emitted token follows the model's own distribution); the step
emits those plus the model's token after them; the scheduler's `accept_drafts` counts the accepted ones as
computed and hands back the blocks of the rejected tail; `Speculator.settle` keeps the statistics.

Proposals: `ngram` (prompt lookup), the continuation of the most recent earlier occurrence of the sequence's
last n tokens (n from `max_ngram` down to `min_ngram`), from prompt or output; `draft`, a smaller model's
greedy guesses (draft.py).

Back-off: speculation needs the step before it finished (its drafts start from the newest token), which
costs the overlap of host and device work; it pays only when few sequences run. So a step speculates only
while at most `max_batch` sequences run, and a sequence that missed `misses` times in a row (no n-gram
match, or every draft rejected) skips its next 2^misses - 1 steps (1, 3, 7, ..., at most
2^MAX_SKIP_LOG2 - 1). A step in which no decoding sequence may bring drafts keeps the overlap: it does not
wait (`wanted`), so text that never repeats loses it once every 2^MAX_SKIP_LOG2 steps. While it skips, each
token it is given is checked against the n-gram guess the tokens before it made (`observe`, host only): a
guess that would have been right ends the back-off, so a copy that starts mid-skip is speculated on from its
second token (the reference model's code edits: a quarter of their steps were skips without it). Requests whose
sampling depends on the tokens before each position other than through the model (repetition, presence and
frequency penalties; structured outputs; min_tokens not yet reached; prompt logprobs) never speculate, nor do
seeded requests that sample (temperature > 0): a verified step draws from the request's generator once per row,
and how many rows it has depends on the batch (max_batch, the token budget, the back-off), so its tokens would
depend on what ran beside it, where the sampler promises a seeded row the same tokens whatever shares its step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from llmctl.runtime.layers.sampler import MIN_TEMPERATURE
from llmctl.runtime.sequence import Sequence

if TYPE_CHECKING:
    from llmctl.runtime.draft import DraftModel

METHODS = ("ngram", "draft")
MAX_SKIP_LOG2 = 4


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_tokens: int = 4  # K: drafts a sequence brings to one step
    min_ngram: int = 1
    max_ngram: int = 4
    max_batch: int = 32  # steps with more running sequences do not speculate
    draft_model: str | None = None  # method "draft": its directory
    draft_memory_utilization: float = 0.1  # the share of the GPU the draft's weights and KV cache may take

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if (self.method == "draft") != (self.draft_model is not None):
            raise ValueError("a draft model is given with method draft, and only then: got method "
                             f"{self.method!r} and draft model {self.draft_model!r}")
        if not 0.0 < self.draft_memory_utilization < 1.0:
            raise ValueError(f"draft_memory_utilization must be in (0, 1), got {self.draft_memory_utilization}")
        if not 1 <= self.num_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_tokens}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"the n-gram sizes must satisfy 1 <= min <= max, got {self.min_ngram} and {self.max_ngram}")
        if self.max_batch < 1:
            raise ValueError(f"speculative max batch must be at least 1, got {self.max_batch}")


def ngram_drafts(tokens: np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of tokens' last n tokens, longest n first.

    Every occurrence ends at an earlier copy of the last token, so those few positions are found in one
    vectorized pass and only they are extended backwards, one token at a time, while any still matches: the
    latest survivor of the longest extension wins. Matching every window of the history against each n
    instead cost 0.5 ms at 2,048 tokens and 2.7 ms at 32,768 (no match, 2-core host), a step's host time per
    speculating sequence on the path of every single-stream token."""
    last = len(tokens) - 1
    ends = np.flatnonzero(tokens[:last] == tokens[last]) if last > 0 else np.empty(0, dtype=np.int64)
    if ends.size == 0:
        return []
    best, length = int(ends[-1]), 1
    for j in range(1, max_n):
        ends = ends[ends >= j]
        ends = ends[tokens[ends - j] == tokens[last - j]]
        if ends.size == 0:
            break
        best, length = int(ends[-1]), j + 1
    if length < min_n:
        return []
    return tokens[best + 1 : best + 1 + k].tolist()


def miss(seq: Sequence) -> None:
    """seq brought no draft the model kept: it skips its next 2^misses - 1 steps."""
    seq.spec_misses += 1
    seq.spec_skip = (1 << min(seq.spec_misses, MAX_SKIP_LOG2)) - 1


def eligible(seq: Sequence) -> bool:
    """Whether seq's sampling at a position depends only on the model's logits there, and a seeded sampled
    request's draws would not depend on its neighbours (see the module doc)."""
    p = seq.sampling_params
    seeded = p.seed is not None and p.temperature >= MIN_TEMPERATURE
    return (seq.grammar is None and not p.has_penalties and p.prompt_logprobs is None and not seeded
            and seq.num_output_tokens >= p.min_tokens)


class Speculator:
    def __init__(self, config: SpeculativeConfig, draft: DraftModel | None = None) -> None:
        self.config = config
        self.draft = draft  # method "draft"; ngram needs nothing
        self.num_drafts = 0  # steps of a sequence that brought drafts
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    def wanted(self, running: list[Sequence]) -> bool:
        """Whether the next step should speculate (and so wait for the step in flight first): some decoding
        sequence may bring drafts to it (one still prefilling brings none)."""
        return 0 < len(running) <= self.config.max_batch and any(
            not s.spec_skip and s.num_uncomputed_tokens() == 1 and eligible(s) for s in running)

    def propose(self, running: list[Sequence]) -> None:
        """Set each running sequence's drafts for the next step (none where it does not speculate)."""
        c = self.config
        wanted: dict[Sequence, int] = {}  # how many drafts each speculating sequence may bring
        for seq in running:
            seq.draft_token_ids = []
            if seq.num_pending or seq.num_uncomputed_tokens() != 1 or not eligible(seq):
                continue
            if seq.spec_skip:
                seq.spec_skip -= 1
                continue
            room = seq.max_output_tokens - seq.num_output_tokens - 1  # the step emits drafts + one token
            if room > 0:
                wanted[seq] = min(c.num_tokens, room)
        if self.draft is not None:
            for seq, drafts in self.draft.propose(wanted).items():
                seq.draft_token_ids = drafts
            return
        for seq, k in wanted.items():
            seq.draft_token_ids = ngram_drafts(seq.token_array(), k, c.min_ngram, c.max_ngram)
            if not seq.draft_token_ids:  # nothing earlier to copy: a miss, as if every draft were rejected
                miss(seq)

    def clear(self, running: list[Sequence]) -> None:
        """A step that does not speculate: no sequence keeps drafts proposed for an earlier one, and it counts
        as one of the steps a backing-off sequence skips."""
        for seq in running:
            seq.draft_token_ids = []
            if seq.spec_skip and seq.num_uncomputed_tokens() == 1:  # a decode step of its (pending tokens count)
                seq.spec_skip -= 1

    def settle(self, seq: Sequence, drafts: list[int], accepted: int) -> None:
        """Count a verified step of seq's, with its back-off: all drafts rejected skips 2^misses - 1 steps."""
        self.num_drafts += 1
        self.num_draft_tokens += len(drafts)
        self.num_accepted_tokens += accepted
        if accepted:
            seq.spec_misses = seq.spec_skip = 0
        else:
            miss(seq)

    def observe(self, seq: Sequence) -> None:
        """seq, backing off, was given a token by a step that did not speculate: had the n-gram lookup on the
        tokens before it guessed that token, the text is repeating now, and the back-off ends (ngram only: a
        draft model's guesses would cost a forward pass)."""
        if not seq.spec_skip or self.draft is not None:
            return
        tokens = seq.token_array()
        guess = ngram_drafts(tokens[:-1], 1, self.config.min_ngram, self.config.max_ngram)
        if guess and guess[0] == tokens[-1]:
            seq.spec_misses = seq.spec_skip = 0

    def forget(self, seq: Sequence) -> None:
        """seq has finished: a draft model's copy of it goes."""
        if self.draft is not None:
            self.draft.forget(seq)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a speculating sequence's step emits, on average: accepted drafts plus the model's own."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0
