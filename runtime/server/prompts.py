"""A request's prompts as token ids: size bounds first, then tokenizing and chat templates off the event loop.

Tokenizing a huge prompt takes seconds and gigabytes. So: a prompt whose text is longer than any prompt that
fits the context can be (`max_chars`: the context times the longest token's length, times two for
normalizers that merge characters) is refused before it is tokenized; token-id prompts are counted, not
copied; the rest is tokenized in a small thread pool, a few at a time, so the event loop (health checks,
streams) and the engine thread (every running request's steps) never wait for it.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from llmctl.runtime.server.errors import APIError

TOKENIZER_THREADS = 2  # prompts tokenized at once; the others wait their turn on the event loop
NORMALIZER_SLACK = 2  # a normalizer (NFKC) can merge characters: a prompt may hold this many per token char


class Prompts:
    def __init__(self, tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1) if tokenizer is not None else 1
        self.max_chars = max_model_len * max(longest, 1) * NORMALIZER_SLACK
        self._pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="llmctl-tokenize")
        self._turns = asyncio.Semaphore(TOKENIZER_THREADS)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def completion(self, prompts: list[str | list[int]], add_special_tokens: bool = True) -> list[list[int]]:
        """/v1/completions prompts (text or token ids) as token ids."""
        for prompt in prompts:
            self._check_size(len(prompt), "prompt", "tokens" if isinstance(prompt, list) else "characters")
        if all(isinstance(p, list) for p in prompts):
            return prompts
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send prompts as token ids", param="prompt")
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(await self._run(lambda: [self.tokenizer.encode(t, add_special_tokens=add_special_tokens)
                                                for t in texts]))
        return [p if isinstance(p, list) else next(encoded) for p in prompts]

    async def chat(self, messages: list[dict], tools: dict[str, dict] | None = None) -> list[int]:
        """Chat messages (and the tools offered, by name) through the model's chat template, as token ids."""
        tokenizer = self.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions")
        self._check_size(sum(len(m["content"]) for m in messages), "messages", "characters of content")

        def render() -> list[int]:
            try:
                text = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False,
                    tools=[{"type": "function", "function": f} for f in tools.values()] if tools else None)
            except Exception as exc:  # the template is the model's code: what it rejects is these messages
                raise APIError(400, f"the chat template cannot render these messages: {exc}",
                               param="messages") from exc
            self._check_size(len(text), "messages", "characters once rendered")
            # The template writes the special tokens it wants (BOS included); encoding must not add them again.
            return tokenizer.encode(text, add_special_tokens=False)

        return await self._run(render)

    async def decode(self, tokens: list[int]) -> str:
        """Token ids as text (/detokenize), off the event loop."""
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", param="tokens")
        self._check_size(len(tokens), "tokens", "tokens")
        return await self._run(lambda: self.tokenizer.decode(tokens))

    def _check_size(self, size: int, param: str, unit: str) -> None:
        limit = self.max_model_len if unit == "tokens" else self.max_chars
        if size > limit:
            raise APIError(400, f"this model's maximum context length is {self.max_model_len} tokens, and the "
                                f"{param} has {size} {unit} (at most {limit} can fit)", param=param)

    async def _run(self, work):
        async with self._turns:
            return await asyncio.get_running_loop().run_in_executor(self._pool, work)
