"""Counting tokens as the server will: with the model's tokenizer files, or by asking its POST /tokenize.

Both answer the same two questions: how many tokens a request's prompt is once the server has it (special
tokens and, for chat messages, the chat template included: what `usage.prompt_tokens` reports), and how many
a piece of generated text is (no special tokens). /tokenize is vLLM's: {"prompt": text} or {"messages": [...]}
in, {"count": N, "tokens": [...]} out; `llmctl serve` answers it too. A count is None where the server would
not count that prompt.
"""

from __future__ import annotations

import json

from llmctl.bench.runner import call


class FileTokens:
    """The model's tokenizer files, through transformers."""

    threads = 1  # a fast tokenizer refuses calls from two threads at once ("Already borrowed")

    def __init__(self, tokenizer, source: str) -> None:
        self.tokenizer, self.source = tokenizer, source

    @classmethod
    def load(cls, name: str) -> FileTokens:
        """From a local directory; ValueError in one line otherwise."""
        import transformers

        try:
            return cls(transformers.AutoTokenizer.from_pretrained(name), name)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load a tokenizer from {name!r}: {str(exc).splitlines()[0]}") from None

    def prompt_tokens(self, item: dict) -> int | None:
        tok = self.tokenizer
        if "messages" in item and getattr(tok, "chat_template", None):
            return len(tok.apply_chat_template(item["messages"], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"])
        text = item["prompt"] if "prompt" in item else "\n".join(m["content"] for m in item["messages"])
        return len(tok(text)["input_ids"])

    def text_tokens(self, text: str) -> int | None:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


class ServerTokens:
    """The server's POST /tokenize."""

    threads = 8  # counts in flight at once: each is a round trip, which a remote server makes long

    def __init__(self, url: str, model: str, api_key: str | None) -> None:
        self.url, self.model, self.api_key = url, model, api_key
        self.source = f"{url}/tokenize"

    @classmethod
    def find(cls, url: str, model: str, api_key: str | None, chat: bool) -> ServerTokens | None:
        """The server's /tokenize if it counts a prompt of the load's kind, else None."""
        tokens = cls(url, model, api_key)
        probe = {"messages": [{"role": "user", "content": "the"}]} if chat else {"prompt": "the"}
        return tokens if tokens.prompt_tokens(probe) is not None else None

    def prompt_tokens(self, item: dict) -> int | None:
        return self._count({k: item[k] for k in ("prompt", "messages") if k in item})

    def text_tokens(self, text: str) -> int | None:
        return self._count({"prompt": text, "add_special_tokens": False})

    def _count(self, body: dict) -> int | None:
        status, answer = call(self.source, self.api_key, {"model": self.model, **body})
        if status != 200:
            return None
        try:
            data = json.loads(answer)
            return int(data["count"]) if "count" in data else len(data["tokens"])
        except (ValueError, TypeError, KeyError):
            return None
