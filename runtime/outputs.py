"""What the engine hands back after a step, and the incremental detokenizer that makes its text."""

from __future__ import annotations

from dataclasses import dataclass, field

PROMPT_CONTEXT_TOKENS = 6  # prompt tokens decoded with the output so that word-start spaces come out right


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # all output tokens so far (while running: the live list, not a copy)
    new_token_ids: list[int]  # the ones this step added
    text: str  # output text so far ("" unless the sequence is detokenized incrementally or finished)
    delta: str
    finished: bool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # Asked for with prompt_logprobs: (logprob, top ids and logprobs) of prompt tokens 1, 2, ... (the first has none)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    num_cached_tokens: int = 0
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    error: str | None = None  # why the request failed (finish_reason "error"); the others were not affected


class IncrementalDetokenizer:
    """Turns tokens into text as they arrive, holding back bytes that do not yet form a character; `release`
    gives the text out, holding back its last `hold` characters too (where a stop string could still begin)."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True, hold: int = 0
                 ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens  # False keeps control tokens (Mistral's [TOOL_CALLS])
        self.ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.hold = hold
        self.sent = 0  # characters of text given out by `release`

    def release(self, final: bool) -> str:
        """The text not yet given out that may go now: all of it at the end (final), else all but the last
        `hold` characters."""
        end = len(self.text) if final else len(self.text) - self.hold
        if end <= self.sent:
            return ""
        start, self.sent = self.sent, end
        return self.text[start:end]

    def add(self, token_ids: list[int], final: bool = False) -> str:
        """The new text these tokens complete. Bytes that do not form a character yet are held back, unless
        this is the sequence's last call (final): then they come out as U+FFFD rather than be lost."""
        self.ids.extend(token_ids)
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=skip)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=skip)
        if (full.endswith("\ufffd") and not final) or len(full) <= len(prefix):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

