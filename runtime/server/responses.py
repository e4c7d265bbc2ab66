"""Engine outputs → OpenAI's response bodies and stream chunks, for completions and chat.

Choices are numbered prompt-major: choice `p * n + j` is the j-th sample of prompt p, as OpenAI numbers a
batch. A streamed choice's logprobs come from its own count of tokens sent so far, because the engine's
`token_ids` list is live and may already hold tokens that later chunks will carry.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from typing import Any

from llmctl.runtime.outputs import RequestOutput
from llmctl.runtime.server.protocol import GenerationRequest
from llmctl.runtime.server.tool_output import ToolOutput


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


class Responder:
    def __init__(self, request: GenerationRequest, model: str, tokenizer, num_choices: int,
                 tool_parser: str | None = None) -> None:
        self.request = request
        self.chat = request.chat
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())
        self.tokenizer = tokenizer
        self.n = request.params.n
        self.sent_tokens = [0] * num_choices  # per choice: tokens already in chunks
        self.sent_text = [0] * num_choices  # per choice: characters of its logprob tokens (text_offset)
        self.prompt_tokens: dict[int, tuple[int, int]] = {}  # prompt index -> (tokens, cached tokens)
        tools = request.tools
        self.tool_outputs = [ToolOutput(tools, tool_parser) for _ in range(num_choices)] \
            if tools is not None and tools.active else None

    # -- whole responses ------------------------------------------------------------------------

    def response(self, finals: list[RequestOutput]) -> dict:
        choices = []
        for i, out in enumerate(map(self._scored, finals)):
            self._saw(i, out)
            echo = self._echo(i, out)
            logprobs = _joined(echo[1], self._logprobs(i, out, 0, len(out.token_ids)))
            choice = {"index": i, "logprobs": logprobs, "finish_reason": out.finish_reason,
                      "stop_reason": out.stop_reason}
            if self.tool_outputs is not None:
                choice["message"] = {"role": "assistant", **self.tool_outputs[i].message(out.text)}
                choice["finish_reason"] = self.tool_outputs[i].finish_reason(out.finish_reason)
            elif self.chat:
                choice["message"] = {"role": "assistant", "content": out.text}
            else:
                choice["text"] = echo[0] + out.text
            choices.append(choice)
            self.sent_tokens[i] = len(out.token_ids)
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": self.usage()}

    def usage(self) -> dict:
        prompt = sum(t for t, _ in self.prompt_tokens.values())
        cached = sum(c for _, c in self.prompt_tokens.values())
        completion = sum(self.sent_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    # -- stream chunks ----------------------------------------------------------------------------

    def role_chunks(self) -> list[dict]:
        """Chat streams open each choice with the assistant's role, as OpenAI's do."""
        if not self.chat:
            return []
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(len(self.sent_tokens))]

    def chunks(self, i: int, out: RequestOutput) -> list[dict]:
        """The chunks for one output of choice i: none when it carries nothing (part of a character); with
        tools, one per content or tool-call piece, then one with the logprobs or the finish reason."""
        if self.tool_outputs is None:
            chunk = self.chunk(i, out)
            return [chunk] if chunk is not None else []
        self._saw(i, out)
        start = self.sent_tokens[i]
        self.sent_tokens[i] = start + len(out.new_token_ids)
        tool_output = self.tool_outputs[i]
        pieces = tool_output.feed(out.delta) + (tool_output.finish() if out.finished else [])
        chunks = [self._chunk([{"index": i, "delta": piece, "logprobs": None, "finish_reason": None}])
                  for piece in pieces]
        logprobs = self._logprobs(i, out, start, self.sent_tokens[i], out.new_token_ids)
        if out.finished or logprobs is not None:
            last = {"index": i, "delta": {}, "logprobs": logprobs, "finish_reason": None}
            if out.finished:
                last.update(finish_reason=tool_output.finish_reason(out.finish_reason), stop_reason=out.stop_reason)
            chunks.append(self._chunk([last]))
        return chunks

    def chunk(self, i: int, out: RequestOutput) -> dict | None:
        """The chunk for one output of choice i; None when it carries nothing (part of a character)."""
        out = self._scored(out)
        self._saw(i, out)
        start = self.sent_tokens[i]
        self.sent_tokens[i] = start + len(out.new_token_ids)
        echo = self._echo(i, out) if start == 0 else ("", None)  # the prompt comes with the first chunk
        if not out.delta and not echo[0] and not out.finished and self.request.params.logprobs is None:
            return None
        logprobs = _joined(echo[1], self._logprobs(i, out, start, self.sent_tokens[i], out.new_token_ids))
        choice: dict[str, Any] = {"index": i, "logprobs": logprobs, "finish_reason": out.finish_reason}
        if out.finished:
            choice["stop_reason"] = out.stop_reason
        if self.chat:
            choice["delta"] = {"content": out.delta} if out.delta or not out.finished else {}
        else:
            choice["text"] = echo[0] + out.delta
        return self._chunk([choice])

    def usage_chunk(self) -> dict:
        return {**self._head(self._chunk_kind), "choices": [], "usage": self.usage()}

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {**self._head(self._chunk_kind), "choices": choices}
        if self.request.include_usage:
            chunk["usage"] = None  # OpenAI's way: only the last chunk carries usage
        return chunk

    @property
    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _scored(self, out: RequestOutput) -> RequestOutput:
        """With max_tokens 0 (score_only), the output without the one token the engine had to make."""
        if not self.request.score_only:
            return out
        return replace(out, token_ids=[], new_token_ids=[], text="", delta="", logprobs=[], top_logprobs=[],
                       finish_reason="length" if out.finished and out.finish_reason != "error" else out.finish_reason,
                       stop_reason=None)

    def _saw(self, i: int, out: RequestOutput) -> None:
        self.prompt_tokens.setdefault(i // self.n, (len(out.prompt_token_ids), out.num_cached_tokens))

    # -- logprobs ---------------------------------------------------------------------------------

    def _token(self, token_id: int) -> str:
        # A model without a tokenizer serves token-id prompts; name its tokens the way vLLM does.
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"token_id:{token_id}"

    def _echo(self, i: int, out: RequestOutput) -> tuple[str, dict | None]:
        """With echo: choice i's prompt as text (as sent, or decoded from its ids), and its logprobs when
        asked (the first token has none, as in OpenAI's and vLLM's); else nothing."""
        if not self.request.echo:
            return "", None
        prompt = self.request.prompts[i // self.n]
        text = prompt if isinstance(prompt, str) else self._decode(out.prompt_token_ids)
        if out.prompt_logprobs is None:
            return text, None
        tokens = [self._token(t) for t in out.prompt_token_ids]
        chosen = [None] + [lp for lp, _ in out.prompt_logprobs]
        tops = [None] + [{self._token(t): v for t, v in top} for _, top in out.prompt_logprobs]
        return text, {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops,
                      "text_offset": self._offsets(i, tokens)}

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else "".join(map(self._token, ids))

    def _offsets(self, i: int, tokens: list[str]) -> list[int]:
        offsets = []
        for tok in tokens:
            offsets.append(self.sent_text[i])
            self.sent_text[i] += len(tok)
        return offsets

    def _logprobs(self, i: int, out: RequestOutput, start: int, end: int, ids: list[int] | None = None):
        if self.request.params.logprobs is None:
            return None
        ids = ids if ids is not None else out.token_ids[start:end]
        tokens = [self._token(t) for t in ids]
        chosen = out.logprobs[start:end]
        tops = [[(self._token(t), lp) for t, lp in top] for top in out.top_logprobs[start:end]]
        if self.chat:
            return {"content": [{**_entry(tok, lp), "top_logprobs": [_entry(t, v) for t, v in top]}
                                for tok, lp, top in zip(tokens, chosen, tops)]}
        return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": [dict(top) for top in tops],
                "text_offset": self._offsets(i, tokens)}


def _joined(prompt: dict | None, output: dict | None) -> dict | None:
    """Completions logprobs of the echoed prompt, then of the output."""
    if prompt is None or output is None:
        return output
    return {key: prompt[key] + output[key] for key in output}


def _entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", errors="replace"))}
