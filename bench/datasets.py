"""Datasets a run replays (`--dataset-name`, `--dataset-path`), read before any load starts.

- random: prompts of common words at `--input-len` tokens (workload.py makes them).
- sharegpt: conversations as vLLM reads them (`[{"conversations": [{"from": "human", "value": ...},
  {"from": "gpt", "value": ...}, ...]}, ...]`, JSON or JSONL): the first human turn is the prompt, and the
  first gpt turn after it sets max_tokens to its length in tokens. Like vLLM: shuffled by the seed, and a
  conversation is left out when either side is under 4 tokens, the prompt over 1024 or the two over 2048.
- trace: one JSON object a line, `{"timestamp": seconds, "input_length": N, "output_length": M}`; each request
  is sent at its timestamp, counted from the first line's, with a random prompt of N tokens and max_tokens M.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DATASETS = ("random", "sharegpt", "trace")
SHAREGPT_MIN_TOKENS = 4
SHAREGPT_MAX_PROMPT = 1024
SHAREGPT_MAX_TOTAL = 2048
COUNT_BATCH = 256  # conversations counted at once: more than a small run needs, few enough to waste little
HUMAN, GPT = ("human", "user"), ("gpt", "assistant", "chatgpt", "bing", "bard")


def _read(path: Path) -> list:
    """A JSON list, or one JSON value a line."""
    if not path.is_file():
        raise ValueError(f"dataset file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except ValueError:
        pass
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{path}:{n}: not JSON") from None
    return rows


def _turns(entry) -> tuple[str, str] | None:
    """The first human turn and the first gpt turn after it, or None."""
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list):
        return None
    texts = [(t.get("from"), t.get("value")) for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str)]
    asked = next((i for i, (who, _) in enumerate(texts) if who in HUMAN), None)
    if asked is None:
        return None
    answer = next((value for who, value in texts[asked + 1:] if who in GPT), None)
    return None if answer is None else (texts[asked][1], answer)


def sharegpt(path: Path, n: int, seed: int, count: Callable[[list[str]], list[int | None]],
             output_len: int | None = None) -> list[dict]:
    """Up to n prompt items ({"prompt", "max_tokens"}); `count` gives texts' tokens (no special tokens), a batch
    of COUNT_BATCH conversations at a time (a server's /tokenize counts them in parallel). `output_len` sets
    every max_tokens instead of the answers' lengths."""
    entries = _read(path)
    random.Random(seed).shuffle(entries)
    pairs = [pair for pair in map(_turns, entries) if pair is not None]
    items = []
    for lo in range(0, len(pairs), COUNT_BATCH):
        batch = pairs[lo:lo + COUNT_BATCH]
        prompt_lens = count([prompt for prompt, _ in batch])
        answer_lens = [output_len] * len(batch) if output_len else count([answer for _, answer in batch])
        for (prompt, _), prompt_len, answer_len in zip(batch, prompt_lens, answer_lens):
            if _usable(prompt_len, answer_len):
                items.append({"prompt": prompt, "max_tokens": answer_len})
            if len(items) == n:
                return items
    if not items:
        raise ValueError(f"{path} has no usable ShareGPT conversation (a human turn, then a gpt turn, each of "
                         f"{SHAREGPT_MIN_TOKENS} tokens or more)")
    return items


def _usable(prompt_len: int | None, answer_len: int | None) -> bool:
    """vLLM's filter: neither side too short, the prompt and the whole not too long."""
    return prompt_len is not None and answer_len is not None and \
        min(prompt_len, answer_len) >= SHAREGPT_MIN_TOKENS and prompt_len <= SHAREGPT_MAX_PROMPT and \
        prompt_len + answer_len <= SHAREGPT_MAX_TOTAL


@dataclass
class TraceLine:
    at: float  # seconds after the trace's first request
    input_len: int
    output_len: int


def trace(path: Path) -> list[TraceLine]:
    """The trace's lines by time; ValueError naming the first bad line."""
    lines = []
    for n, row in enumerate(_read(path), 1):
        values = [row.get(k) if isinstance(row, dict) else None for k in ("timestamp", "input_length", "output_length")]
        ok = isinstance(values[0], (int, float)) and all(isinstance(v, int) and v >= 1 for v in values[1:])
        if not ok or values[0] < 0:
            raise ValueError(f"{path}:{n}: needs \"timestamp\" (seconds, >= 0), \"input_length\" and "
                             "\"output_length\" (integers >= 1)")
        lines.append(TraceLine(float(values[0]), *values[1:]))
    if not lines:
        raise ValueError(f"trace {path} has no requests")
    lines.sort(key=lambda line: line.at)
    first = lines[0].at
    return [TraceLine(line.at - first, line.input_len, line.output_len) for line in lines]
