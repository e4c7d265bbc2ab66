"""What the load sends: prompts and output lengths, made in the CLI process before any load starts.

Prompts are random (fixed, uniform or normal lengths), or read from a JSONL file; a shared prefix can lead
every prompt (a system prompt, to exercise prefix caching). Random prompts are common words. Where a tokenizer
is at hand (the model's files or the server's /tokenize: tokens.py) each is made exactly as long as asked, as
the server counts it (special tokens and chat template included), and every prompt's length is kept; without
one a word stands for a token and the counts come from the server's `usage`. The result is a list of ready
request bodies that the locust processes only cycle through.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# Common short English words: most tokenizers keep each one a single token.
_WORDS = ("the of and to in is that for it as with was on be by at this from or have an are not but had "
         "his they you which one were all her she there would their we him been has when who will more no "
         "if out so said what up its about into than them can only other new some could time these two may "
         "then do first any my now such like our over man me even most made after also did many before must "
         "through back years where much your way well down should because each just those people how too "
         "little state good very make world still own see men work long get here between both life being "
         "under never day same another know while last might us great old year off come since against go")
WORDS = _WORDS.split()
SHORT_WORDS = [w for w in WORDS if len(w) <= 3]  # fillers, those of them that are one token
FIT_TRIES = 8  # counts spent on one prompt's exact length before the closest stands


@dataclass
class Lengths:
    """`N`, `uniform:LO,HI` or `normal:MEAN,STD` (clipped to at least 1)."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str, what: str = "length") -> Lengths:
        kind, _, args = text.partition(":") if ":" in text else ("fixed", "", text)
        try:
            values = [float(x) for x in args.split(",")]
        except ValueError:
            raise ValueError(f"bad {what} {text!r}: use N, uniform:LO,HI or normal:MEAN,STD") from None
        wanted = {"fixed": 1, "uniform": 2, "normal": 2}.get(kind)
        if wanted != len(values):
            raise ValueError(f"bad {what} {text!r}: use N, uniform:LO,HI or normal:MEAN,STD")
        lengths = cls(kind, *values)
        if values[0] < 1 or (kind == "uniform" and lengths.b < lengths.a) or (kind == "normal" and lengths.b < 0):
            raise ValueError(f"impossible {what} {text!r}")
        return lengths

    def sample(self, rng: random.Random) -> int:
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        if self.kind == "normal":
            return max(1, round(rng.gauss(self.a, self.b)))
        return int(self.a)


@dataclass
class WorkloadSpec:
    input_len: Lengths
    output_len: Lengths
    chat: bool = False
    prompts_file: Path | None = None
    shared_prefix: int = 0  # tokens (words without a tokenizer) that lead every prompt
    num_prompts: int = 1000
    seed: int = 0
    items: list[dict] | None = None  # ready prompt items, as a prompts file's (a dataset's)
    sizes: list[tuple[int, int]] | None = None  # each random prompt's (input, output) tokens (a trace's)


def read_prompts(path: Path, chat: bool) -> list[dict]:
    """One JSON object a line: {"prompt": str} or {"messages": [...]}, optionally "max_tokens": int."""
    if not path.is_file():
        raise ValueError(f"prompts file {path} does not exist")
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{n}: not a JSON object") from None
        if not isinstance(item, dict) or not (isinstance(item.get("prompt"), str) or _messages_ok(item)):
            raise ValueError(f"{path}:{n}: needs a string \"prompt\" or a \"messages\" list of {{role, content}}")
        if "messages" in item and not chat:
            raise ValueError(f"{path}:{n}: has chat messages; bench --endpoint /v1/chat/completions")
        if "max_tokens" in item and not (isinstance(item["max_tokens"], int) and item["max_tokens"] > 0):
            raise ValueError(f"{path}:{n}: max_tokens must be a positive integer")
        items.append(item)
    if not items:
        raise ValueError(f"prompts file {path} has no prompts")
    return items


def _messages_ok(item: dict) -> bool:
    messages = item.get("messages")
    return isinstance(messages, list) and bool(messages) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)


def build_requests(spec: WorkloadSpec, model: str, tokens=None, extra: dict | None = None) -> list[dict]:
    """Request bodies (streaming, usage asked for), each with its prompt's token count where `tokens` (a
    tokens.FileTokens or ServerTokens) gives one. A random prompt also keeps the length asked of it; with
    `tokens` it is that long exactly, unless no prompt of common words can be (a chat template that long)."""
    rng = random.Random(spec.seed)
    given = spec.items if spec.items is not None else \
        read_prompts(spec.prompts_file, spec.chat) if spec.prompts_file is not None else None
    words = Words.measure(tokens if spec.shared_prefix or given is None else None)
    prefix = ""
    if spec.shared_prefix:
        prefix = _fit(rng, spec.shared_prefix, 0, str, tokens.text_tokens if tokens else None, words)[0] + " "
    count = tokens.prompt_tokens if tokens else None
    if given is not None:
        items = [_lead(item, prefix, spec.chat) for item in given]
        made = list(zip(items, _map(count, items, tokens) if count else [None] * len(items)))
        asked = [None] * len(items)
    else:
        def render(text: str) -> dict:
            return _lead({"prompt": text}, prefix, spec.chat)

        base = count(render("")) if count else None  # the prompt's tokens before its own words
        base = spec.shared_prefix if base is None else base
        inputs = [n for n, _ in spec.sizes] if spec.sizes else [spec.input_len.sample(rng)
                                                                 for _ in range(spec.num_prompts)]
        asked = [spec.shared_prefix + n for n in inputs]
        seeds = [rng.getrandbits(64) for _ in asked]
        made = _map(lambda job: _fit(random.Random(job[1]), job[0], base, render, count, words),
                    list(zip(asked, seeds)), tokens)
    outputs = [n for _, n in spec.sizes] if spec.sizes and given is None else [None] * len(made)
    out = []
    for (item, counted), n, output in zip(made, asked, outputs):
        max_tokens = item.get("max_tokens") or output or spec.output_len.sample(rng)
        body = {"model": model, **item, "max_tokens": max_tokens,
                "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
        out.append({"body": body, "prompt_tokens": counted, **({"asked_tokens": n} if n is not None else {})})
    return out


def _lead(item: dict, prefix: str, chat: bool) -> dict:
    """An item as it is sent: the shared prefix first; on the chat endpoint a prompt is the user's message."""
    if "prompt" in item:
        item = {**item, "prompt": prefix + item["prompt"]}
    elif prefix:
        item = {**item, "messages": [{"role": "system", "content": prefix.strip()}, *item["messages"]]}
    if chat and "prompt" in item:
        item = {"messages": [{"role": "user", "content": item.pop("prompt")}], **item}
    return item


@dataclass
class Words:
    """The common words and the tokens each adds to a prompt under one tokenizer (one each without one)."""

    costs: dict[str, int]  # tokens a word adds, where more than one
    fillers: list[str]  # short words of one token: what tops a prompt up to its length

    @classmethod
    def measure(cls, tokens) -> Words:
        """Each word counted after another, as it stands in a prompt: one count a word, once per run."""
        if tokens is None:
            return cls({}, SHORT_WORDS)
        vocabulary = list(dict.fromkeys(WORDS))
        one = tokens.text_tokens("the")
        counts = _map(lambda word: tokens.text_tokens(f"the {word}"), vocabulary, tokens)
        added = {w: n - one for w, n in zip(vocabulary, counts) if one is not None and n is not None}
        return cls({w: n for w, n in added.items() if n > 1},
                   [w for w in SHORT_WORDS if added.get(w) == 1] or SHORT_WORDS)

    def cost(self, word: str) -> int:
        return self.costs.get(word, 1)

    def draw(self, rng: random.Random, n: int) -> list[str]:
        """Random words that should add up to n tokens, the last ones fillers; one word at the least."""
        words, total = [], 0
        while total < n or not words:
            word = rng.choice(WORDS)
            if total + self.cost(word) > n:
                word = rng.choice(self.fillers)
            words.append(word)
            total += self.cost(word)
        return words


def _fit(rng: random.Random, n: int, base: int, render, count, words: Words) -> tuple:
    """Common words that `render` makes into a prompt and `count` counts n tokens: (prompt, its count).

    Words that should come to n - base tokens (base: what the prompt holds without them), counted; where the
    count is off (a word cut differently in context), drop words from the end and top up with fillers by the
    difference, and count again. If FIT_TRIES counts do not get there, or one word is already too many, the
    last prompt counted stands."""
    chosen = words.draw(rng, n - base)
    prompt = render(" ".join(chosen))
    got = count(prompt) if count else None
    for _ in range(FIT_TRIES - 1):
        if got is None or got == n or (got > n and len(chosen) == 1):
            break
        short = n - got
        while short < 0 and len(chosen) > 1:
            short += words.cost(chosen.pop())
        chosen += [rng.choice(words.fillers) for _ in range(max(0, short))]
        prompt = render(" ".join(chosen))
        got = count(prompt)
    return prompt, got


def count_texts(texts: list[str], tokens) -> list[int | None]:
    """Each text's tokens, no special tokens (a word a token without `tokens`), several at once over HTTP."""
    if tokens is None:
        return [len(text.split()) for text in texts]
    return _map(tokens.text_tokens, texts, tokens)


def _map(fn, jobs: list, tokens) -> list:
    """fn over jobs, several at once where `tokens` counts by a round trip to the server."""
    threads = getattr(tokens, "threads", 1)
    if threads == 1:
        return [fn(job) for job in jobs]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, jobs))
