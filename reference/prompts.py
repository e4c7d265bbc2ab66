"""Prompts made from the reference corpus's held-out split, for measuring speculative decoding on real text.

- code edits: a function from the split, then a comment asking for the same function renamed and the
  renamed signature, so that a good continuation repeats the body (what prompt lookup is for);
- continuations: the opening of a held-out file, to be continued (ordinary generation).

Both are deterministic: the same prompts on every machine.
"""

from __future__ import annotations

import re
import textwrap

from llmctl.reference.data import read_heldout

_DEF = re.compile(r"^( *)def (\w+)\(.*\):\s*$")


def functions(min_lines: int = 4, max_lines: int = 20, max_chars: int = 800) -> list[tuple[str, str]]:
    """(name, dedented source) of the held-out split's functions of a moderate size, in file order."""
    found = []
    for doc in read_heldout():
        lines = doc.text.splitlines()
        for i, line in enumerate(lines):
            match = _DEF.match(line)
            if match is None:
                continue
            indent = len(match[1])
            end = i + 1
            while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
                end += 1
            body = "\n".join(lines[i:end]).rstrip()
            if min_lines <= body.count("\n") + 1 <= max_lines and len(body) <= max_chars:
                found.append((match[2], textwrap.dedent(body)))
    return found


def code_edit_prompts(count: int) -> list[str]:
    """`count` prompts, each a function followed by the start of the same function under a new name."""
    pool = functions()
    if count > len(pool):
        raise ValueError(f"the held-out split has {len(pool)} suitable functions, {count} were asked for")
    step = len(pool) // count
    prompts = []
    for name, source in pool[::step][:count]:
        first, _, _ = source.partition("\n")
        renamed = first.replace(f"def {name}(", f"def {name}_v2(", 1)
        prompts.append(f"{source}\n\n\n# the same function, renamed to {name}_v2:\n{renamed}\n")
    return prompts


def continuation_prompts(count: int, chars: int = 1200) -> list[str]:
    """The first `chars` characters (cut at a line end) of `count` held-out files, evenly spread."""
    docs = [d for d in read_heldout() if len(d.text) > 2 * chars]
    if count > len(docs):
        raise ValueError(f"the held-out split has {len(docs)} files long enough, {count} were asked for")
    step = len(docs) // count
    return [d.text[: d.text.rfind("\n", 0, chars) + 1] for d in docs[::step][:count]]
