"""The output side of a step: a sampled token becomes part of its sequence, text, a stop and an output.

For each sequence of a finished step, in row order: append the token (and its logprobs), decide whether
the sequence stops (a stop token or eos, max_tokens or the context, a stop string in the new text),
detokenize incrementally where text is streamed or stop strings need it, and build the RequestOutput
the caller sees (every token when streaming, else only the last). A streamed delta holds back the text a stop
string could still begin in (the last len(longest stop) - 1 characters) until the request ends or the text
moves past it, as vLLM does: text already sent cannot be taken back when a stop string completes later.

All of that is work for one request, and a fault in it (a tokenizer that cannot decode a token, say)
must cost that request alone: `process` ends it with finish reason "error", an output that carries the
message, and its blocks freed, and the step goes on. `fail` is that ending for every per-request fault,
including the ones the model runner meets while setting up a request's sampling.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from llmctl.runtime.outputs import IncrementalDetokenizer, RequestOutput
from llmctl.runtime.sequence import FinishReason, Sequence

log = logging.getLogger("llmctl.engine")


@dataclass(frozen=True)
class Stop:
    """Why a sequence ends after its newest token."""

    reason: FinishReason
    token: int | None = None  # the stop_token_ids entry it sampled (a stop token is not text)
    string: str | None = None  # the stop string its text reached (the text is cut where it begins)

    @property
    def stop_reason(self) -> str | int | None:
        """The API's `stop_reason`: the stop string or stop token that matched; None for eos and length."""
        return self.string if self.string is not None else self.token


def stop_by_token(seq: Sequence) -> Stop | None:
    """Why seq must stop after its newest token, judged on token ids alone; None to go on."""
    token = seq.token_ids[-1]
    if token in seq.stop_token_set and len(seq.output_token_ids) > seq.sampling_params.min_tokens:
        return Stop(FinishReason.STOP, token if token in seq.sampling_params.stop_token_ids else None)
    if len(seq.output_token_ids) >= seq.max_output_tokens:
        return Stop(FinishReason.LENGTH)
    return None


def find_stop_string(text: str, delta: str, stops: list[str]) -> tuple[int, str] | None:
    """Where the earliest stop string that the newest delta completed begins in text."""
    best = None
    for stop in stops:
        start = max(0, len(text) - len(delta) - len(stop) + 1)
        at = text.find(stop, start)
        if at != -1 and (best is None or at < best[0]):
            best = (at, stop)
    return best


class OutputProcessor:
    def __init__(self, tokenizer, stream: bool, finish: Callable[[Sequence, FinishReason], None]) -> None:
        self.tokenizer = tokenizer
        # stream: an output (with text) for every new token, as servers need; else only finished requests
        # produce outputs, and text is decoded once at the end unless stop strings need it earlier.
        self.stream = stream
        self.finish = finish  # the scheduler's: ends a sequence and frees its blocks
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}

    def add(self, seq: Sequence) -> None:
        if self.tokenizer is not None and (self.stream or seq.sampling_params.stop):
            stops = seq.sampling_params.stop
            self.detokenizers[seq.request_id] = IncrementalDetokenizer(
                self.tokenizer, seq.prompt_token_ids, seq.sampling_params.skip_special_tokens,
                max(map(len, stops)) - 1 if stops else 0)  # hold: where a stop string could still begin

    def forget(self, request_id: str) -> None:
        self.detokenizers.pop(request_id, None)

    def process(self, seq: Sequence, token: int, logprob: float | None, top_logprobs, now: float
                ) -> RequestOutput | None:
        """Apply one sampled token to seq; its output, or None when nothing is due (not streaming)."""
        try:
            return self._apply(seq, token, logprob, top_logprobs, now)
        except Exception as exc:
            return self.fail(seq, exc, now)

    def fail(self, seq: Sequence, exc: Exception, now: float) -> RequestOutput:
        """End seq because work for it alone raised exc; its blocks are freed. The output is built without
        the detokenizer, which may be what failed."""
        log.error("request %s failed; the others go on", seq.request_id, exc_info=exc)
        if seq.is_finished:  # it had stopped, but its output could not be made
            seq.finish_reason = FinishReason.ERROR
        else:
            self.finish(seq, FinishReason.ERROR)
        seq.stop_reason, seq.finish_time = None, now
        self.forget(seq.request_id)
        return self._output(seq, [], "", error=f"{type(exc).__name__}: {exc}")

    def _apply(self, seq: Sequence, token: int, logprob: float | None, top_logprobs, now: float
               ) -> RequestOutput | None:
        seq.num_pending -= 1
        seq.append_token(token)
        if seq.grammar is not None and not seq.grammar.accept(token):
            raise ValueError(f"token {token} breaks the request's structured output: {seq.grammar.error}")
        if logprob is not None:
            seq.logprobs.append(logprob)
            seq.top_logprobs.append(top_logprobs or [])
        if seq.first_token_time is None:
            seq.first_token_time = now
        stop = stop_by_token(seq)
        if stop is None and seq.grammar is not None and seq.grammar.done:
            stop = Stop(FinishReason.STOP)  # the structured output is complete: nothing may follow
        delta = ""
        detok = self.detokenizers.get(seq.request_id) if self.detokenizers else None
        if detok is not None:
            # The last token flushes what was held back (a character it cuts off comes out as U+FFFD).
            text = stop is None or token not in seq.stop_token_set  # eos and stop tokens are not text
            new = detok.add([token] if text else [], final=stop is not None)
            early = len(seq.output_token_ids) <= seq.sampling_params.min_tokens  # vLLM's rule for stop strings
            hit = find_stop_string(detok.text, new, seq.sampling_params.stop) if new and not early else None
            if hit is not None:
                detok.text = detok.text[: hit[0]]
                stop = Stop(FinishReason.STOP, string=hit[1])
            delta = detok.release(final=stop is not None)
        if stop is not None:
            self.finish(seq, stop.reason)
            seq.stop_reason, seq.finish_time = stop.stop_reason, now
        if self.stream or seq.is_finished:
            return self._output(seq, [token], delta)
        return None

    def _output(self, seq: Sequence, new_token_ids: list[int], delta: str, error: str | None = None
                ) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids, token_ids=seq.output_token_ids,
            new_token_ids=new_token_ids, text=self._text(seq) if error is None else "", delta=delta,
            finished=seq.is_finished, finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            stop_reason=seq.stop_reason, logprobs=seq.logprobs, top_logprobs=seq.top_logprobs,
            prompt_logprobs=seq.prompt_logprobs if seq.sampling_params.prompt_logprobs is not None else None,
            num_cached_tokens=seq.num_cached_tokens, arrival_time=seq.arrival_time,
            first_scheduled_time=seq.first_scheduled_time, first_token_time=seq.first_token_time,
            finish_time=seq.finish_time, error=error)

    def _text(self, seq: Sequence) -> str:
        """The output text so far: all of it once seq is finished, else what incremental decoding has made."""
        text = ""
        if seq.is_finished:
            detok = self.detokenizers.pop(seq.request_id, None)
            if detok is None and self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids,
                                               seq.sampling_params.skip_special_tokens)
                output_ids = seq.output_token_ids
                if output_ids and seq.finish_reason is FinishReason.STOP and output_ids[-1] in seq.stop_token_set:
                    output_ids = output_ids[:-1]  # eos or a stop token is not text
                detok.add(output_ids, final=True)
            text = detok.text if detok is not None else ""
        elif seq.request_id in self.detokenizers:  # (streaming: what the deltas gave out)
            detok = self.detokenizers[seq.request_id]
            text = detok.text[: detok.sent]
        return text
