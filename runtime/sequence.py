"""A request's state while the engine works on it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np

from llmctl.runtime.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"
    ERROR = "error"  # work for this request alone raised; the others go on


@dataclass(eq=False)
class Sequence:
    """Prompt and output tokens, the KV blocks that hold them, and the timestamps that metrics need.

    There is no prefill or decode phase: `num_computed_tokens` says how many of `token_ids` have their
    KV in the cache, and each step brings a sequence closer to having computed all of them.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    cache_salt: str | None = None  # prefix-cache namespace: only requests with the same salt share blocks
    priority: int = 0  # under the priority scheduling policy: lower is more urgent, as in vLLM
    token_ids: list[int] = field(init=False)  # prompt + output
    output_token_ids: list[int] = field(default_factory=list)  # kept apart so that steps never slice
    block_table: list[int] = field(default_factory=list)
    num_released_blocks: int = 0  # leading block-table entries handed back (outside a sliding window)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks, in order
    num_computed_tokens: int = 0
    # Tokens sampled on the device whose values the host does not have yet (the engine keeps one step in
    # flight); they count in num_tokens, so the next step can compute them, but are not in token_ids.
    num_pending: int = 0
    draft_token_ids: list[int] = field(default_factory=list)  # speculative guesses the next step checks
    spec_skip: int = 0  # steps left in which it does not speculate (speculative.Speculator's back-off)
    spec_misses: int = 0  # consecutive speculating steps whose drafts were all rejected
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    num_preemptions: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    generator: object | None = None  # the request's torch.Generator when it has a seed
    grammar: object | None = None  # structured.Matcher of a request with a structured output
    max_output_tokens: int | None = None  # max_tokens, capped by the context; the engine sets it
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[tuple[float, list]] = field(default_factory=list)  # of prompt tokens 1, 2, ..., if asked
    _array: np.ndarray | None = field(default=None, init=False, repr=False)  # token_array()'s buffer
    _array_len: int = field(default=0, init=False, repr=False)  # how much of token_ids it holds

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")
        self.token_ids = list(self.prompt_token_ids)
        params = self.sampling_params
        # Token ids that end the sequence, checked once per new token: stop tokens, and eos unless ignored.
        self.stop_token_set = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_token(self, token: int) -> None:
        self.token_ids.append(token)
        self.output_token_ids.append(token)

    def token_array(self) -> np.ndarray:
        """token_ids as an int64 array, kept in step with the list by copying only what was appended since
        the last call: the sampler's penalties read every token of every row each step, and converting
        whole Python lists costs tens of milliseconds a step at 256 rows of 1,200 tokens."""
        n, have, buf = len(self.token_ids), self._array_len, self._array
        if have < n:
            if buf is None or len(buf) < n:
                grown = np.empty(max(2 * n, 64), dtype=np.int64)
                if have:
                    grown[:have] = buf[:have]
                buf = self._array = grown
            buf[have:n] = self.token_ids[have:n]
            self._array_len = n
        return self._array[:n]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def ends_with_pending(self) -> bool:
        """Whether a pending token is certain to be this sequence's last (max_tokens): no step need compute it."""
        return (self.num_pending > 0 and self.max_output_tokens is not None
                and self.num_output_tokens + self.num_pending >= self.max_output_tokens)
