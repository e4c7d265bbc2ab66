"""How one request wants its tokens chosen and when it wants to stop."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmctl.runtime.structured import StructuredOutput


@dataclass
class SamplingParams:
    """Per-request sampling settings; `__post_init__` rejects bad values with a ValueError.

    temperature == 0 means greedy. `top_k=None`, `top_p=1.0` and `min_p=0.0` switch those filters off.
    `logprobs=None` returns no log-probabilities; `logprobs=k` returns the chosen token's and the top k.
    `prompt_logprobs=k` does the same for every prompt token after the first (what echo and evaluation
    harnesses need); such a request computes its whole prompt, never reading it from the prefix cache.
    `max_tokens=None` generates until a stop condition or the model's context is full.
    `min_tokens`: no eos, stop token or stop string ends the output before it has that many tokens (the
    sampler bans eos and stop tokens until then), as vLLM's field.
    `logit_bias` adds its value (in [-100, 100], as OpenAI's) to a token id's logit before any other
    processing: -100 all but bans a token, +100 all but forces it. Logprobs stay the model's own.
    `structured` constrains the output to a JSON schema, a regex, a choice or a grammar (structured.py);
    logprobs then come from the constrained logits.
    """

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    structured: StructuredOutput | None = None
    skip_special_tokens: bool = True  # False: control tokens stay in the text (a tool-call parser reads them)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        checks = [
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, f"min_tokens must be non-negative, got {self.min_tokens}"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"),
            (self.temperature >= 0.0, f"temperature must be non-negative, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k is None or self.top_k >= 1, f"top_k must be at least 1 (or None for no limit), got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0.0, f"repetition_penalty must be positive, got {self.repetition_penalty}"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.seed is None or self.seed >= -(2**63) and self.seed + self.n - 1 < 2**64,
             f"seed must fit in 64 bits (with n={self.n}, so must seed + n - 1), got {self.seed}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}"),
            (all(t >= 0 for t in self.stop_token_ids), f"stop_token_ids must be non-negative, got {self.stop_token_ids}"),
            (all(isinstance(t, int) and t >= 0 for t in self.logit_bias),
             f"logit_bias keys must be non-negative token ids, got {[t for t in self.logit_bias][:3]}"),
            (all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()),
             f"logit_bias values must be in [-100, 100], got {[b for b in self.logit_bias.values() if not -100 <= b <= 100][:3]}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Whether sampling reads the sequence's earlier tokens (repetition, presence or frequency penalty)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
