"""What the load sends: prompts and output lengths, made in the CLI process before any load starts.

Prompts are random (fixed, uniform or normal lengths), or read from a JSONL file; a shared prefix can lead
every prompt (a system prompt, to exercise prefix caching). With a tokenizer, random prompts are decoded
random token ids and every prompt's length is counted with it; without one, prompts are common words
(about a token each) and the token counts come from the server's `usage`. The result is a list of ready
request bodies that the locust processes only cycle through.
"""

from __future__ import annotations

import json
import random
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


def load_tokenizer(name: str):
    """A transformers tokenizer from a local directory; ValueError in one line otherwise."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load a tokenizer from {name!r}: {str(exc).splitlines()[0]}") from None


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
            raise ValueError(f"{path}:{n}: has chat messages; bench the chat endpoint (--endpoint chat)")
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


def _random_text(rng: random.Random, n: int, tokenizer) -> str:
    if tokenizer is None:
        return " ".join(rng.choice(WORDS) for _ in range(n))
    special = set(tokenizer.all_special_ids)
    ids = [i for i in (rng.randrange(len(tokenizer)) for _ in range(n * 2)) if i not in special][:n]
    return tokenizer.decode(ids)


def _count(tokenizer, item: dict) -> int | None:
    if tokenizer is None:
        return None
    if "messages" in item and getattr(tokenizer, "chat_template", None):
        return len(tokenizer.apply_chat_template(item["messages"], add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"])
    text = item["prompt"] if "prompt" in item else "\n".join(m["content"] for m in item["messages"])
    return len(tokenizer(text)["input_ids"])


def build_requests(spec: WorkloadSpec, model: str, tokenizer=None, extra: dict | None = None) -> list[dict]:
    """Request bodies (streaming, usage asked for) with the prompt's token count where a tokenizer gives one."""
    rng = random.Random(spec.seed)
    prefix = _random_text(rng, spec.shared_prefix, tokenizer) + " " if spec.shared_prefix else ""
    if spec.prompts_file is not None:
        items = read_prompts(spec.prompts_file, spec.chat)
    else:
        items = [{"prompt": _random_text(rng, spec.input_len.sample(rng), tokenizer)} for _ in range(spec.num_prompts)]
    out = []
    for item in items:
        if "prompt" in item:
            item = {**item, "prompt": prefix + item["prompt"]}
        elif prefix:
            item = {**item, "messages": [{"role": "system", "content": prefix.strip()}, *item["messages"]]}
        if spec.chat and "prompt" in item:
            item = {"messages": [{"role": "user", "content": item.pop("prompt")}], **item}
        body = {"model": model, **item, "max_tokens": item.get("max_tokens") or spec.output_len.sample(rng),
                "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
        out.append({"body": body, "prompt_tokens": _count(tokenizer, item)})
    return out
