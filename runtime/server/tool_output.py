"""One chat choice's output as OpenAI's assistant message with tool calls, whole or streamed.

tool_choice "auto": the model's own format is parsed (tool_calls.py). A named function: the output is
that function's arguments (the grammar made it so), streamed as they come. "required": the output is a
JSON array of `{"name", "parameters"}` calls, streamed call by call as they come (cut short by max_tokens,
the last call's arguments end early, as OpenAI's do). A choice that called a tool ends with
finish_reason "tool_calls", except a named tool_choice, which ends with "stop" as OpenAI's does.
"""

from __future__ import annotations

import json
import random
import re

from llmctl.runtime.server.constraints import Tools
from llmctl.runtime.server.tool_calls import ALPHANUMERIC, PARSERS, JsonScan


def new_call_id() -> str:
    return "call_" + "".join(random.choices(ALPHANUMERIC, k=24))


class ToolOutput:
    def __init__(self, tools: Tools, parser: str | None) -> None:
        self.tools = tools
        self.parser = PARSERS[parser](set(tools.functions)) if tools.choice == "auto" and parser else None
        self.stream = _CallStream() if tools.choice == "required" and not tools.named else None
        self.call_id: str | None = None  # named: the one call's id, once its first piece is out
        self.called = False

    def message(self, text: str) -> dict:
        """The whole message: content (None when only calls) and tool_calls."""
        if self.parser is not None:
            content, calls = self.parser.parse(text)
            self.called = bool(calls)
            return {"content": content, **({"tool_calls": [_call(c.id, c.name, c.arguments) for c in calls]}
                                          if calls else {})}
        if self.tools.named:
            self.called = True
            return {"content": None, "tool_calls": [_call(new_call_id(), self.tools.choice, text)]}
        stream = _CallStream()
        stream.feed(text)
        self.called = bool(stream.calls)
        if not stream.calls:  # cut short before a call's name was out: the text itself
            return {"content": text}
        return {"content": None, "tool_calls": [_call(c["id"], c["name"], c["arguments"]) for c in stream.calls]}

    def feed(self, delta: str) -> list[dict]:
        """The delta pieces a streamed chunk carries for this new text."""
        if self.parser is not None:
            return self.parser.feed(delta)
        if self.tools.named:
            if self.call_id is None:
                self.call_id, self.called = new_call_id(), True
                return [{"tool_calls": [{"index": 0, "id": self.call_id, "type": "function",
                                         "function": {"name": self.tools.choice, "arguments": delta}}]}]
            return [{"tool_calls": [{"index": 0, "function": {"arguments": delta}}]}] if delta else []
        pieces = self.stream.feed(delta)
        self.called = self.called or bool(self.stream.calls)
        return pieces

    def finish(self) -> list[dict]:
        if self.parser is not None:
            pieces = self.parser.finish()
            self.called = self.parser.called
            return pieces
        if self.tools.named:
            return self.feed("") if self.call_id is None else []
        return [] if self.stream.calls or not self.stream.text else [{"content": self.stream.text}]

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.called and reason == "stop" and not self.tools.named else reason


def _call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


class _CallStream:
    """A "required" output, `[{"name": ..., "parameters": ...}, ...]` as its grammar writes it (keys in that
    order, at most one space between tokens), turned into tool-call deltas as it grows: a call's id and name
    once its name is complete, then its parameters' text as arguments, piece by piece."""

    NAME = re.compile(r' ?[\[,] ?\{ ?"name" ?: ?"((?:[^"\\]|\\.)*)" ?, ?"parameters" ?: ?')
    END = re.compile(r" ?\}")  # the call's object closing after its parameters

    def __init__(self) -> None:
        self.text = ""
        self.calls: list[dict] = []  # {"id", "name", "arguments"} so far
        self._pos = 0  # where scanning resumes
        self._part = "name"  # what comes next: a call's name, its parameters' value, or the call's "}"
        self._value: tuple[int, JsonScan] | None = None  # the parameters' start and how far they are read

    def feed(self, delta: str) -> list[dict]:
        self.text += delta
        pieces = []
        while True:
            if self._part == "name":
                match = self.NAME.match(self.text, self._pos)
                if match is None or match.end() == len(self.text):  # not yet (or more spaces may follow)
                    return pieces
                call = {"id": new_call_id(), "name": json.loads(f'"{match.group(1)}"'), "arguments": ""}
                self.calls.append(call)
                pieces.append({"tool_calls": [{"index": len(self.calls) - 1, "id": call["id"], "type": "function",
                                               "function": {"name": call["name"], "arguments": ""}}]})
                self._pos, self._part, self._value = match.end(), "value", (match.end(), JsonScan())
            if self._part == "value":
                start, scan = self._value
                end = scan.value_end(self.text, start)
                stop = len(self.text) if end is None else end
                if stop > self._pos:
                    piece = self.text[self._pos:stop]
                    self.calls[-1]["arguments"] += piece
                    pieces.append({"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": piece}}]})
                    self._pos = stop
                if end is None:
                    return pieces
                self._part = "end"
            match = self.END.match(self.text, self._pos)
            if match is None:  # the call's "}" has not come yet
                return pieces
            self._pos, self._part = match.end(), "name"
