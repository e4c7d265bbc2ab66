"""One chat choice's output as OpenAI's assistant message with tool calls, whole or streamed.

tool_choice "auto": the model's own format is parsed (tool_calls.py). A named function: the output is
that function's arguments (the grammar made it so), streamed as they come. "required": the output is a
JSON array of `{"name", "parameters"}` calls, sent once complete. A choice that called a tool ends with
finish_reason "tool_calls", except a named tool_choice, which ends with "stop" as OpenAI's does.
"""

from __future__ import annotations

import json
import random

from llmctl.runtime.server.constraints import Tools
from llmctl.runtime.server.tool_calls import ALPHANUMERIC, PARSERS


def new_call_id() -> str:
    return "call_" + "".join(random.choices(ALPHANUMERIC, k=24))


class ToolOutput:
    def __init__(self, tools: Tools, parser: str | None) -> None:
        self.tools = tools
        self.parser = PARSERS[parser](set(tools.functions)) if tools.choice == "auto" and parser else None
        self.buffer = ""  # "required": the JSON array so far
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
        calls = self._required(text)
        self.called = calls is not None
        return {"content": None, "tool_calls": calls} if calls is not None else {"content": text}

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
        self.buffer += delta
        return []

    def finish(self) -> list[dict]:
        if self.parser is not None:
            pieces = self.parser.finish()
            self.called = self.parser.called
            return pieces
        if self.tools.named:
            return self.feed("") if self.call_id is None else []
        calls = self._required(self.buffer)
        self.called = calls is not None
        if calls is None:
            return [{"content": self.buffer}] if self.buffer else []
        return [{"tool_calls": [{"index": i, **call}]} for i, call in enumerate(calls)]

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.called and reason == "stop" and not self.tools.named else reason

    def _required(self, text: str) -> list[dict] | None:
        """The calls of a "required" output, or None when it is not a complete array of them (cut short)."""
        try:
            items = json.loads(text)
        except ValueError:
            return None
        if not (isinstance(items, list) and items and all(
                isinstance(c, dict) and c.get("name") in self.tools.functions for c in items)):
            return None
        return [_call(new_call_id(), c["name"], json.dumps(c.get("parameters", {}), ensure_ascii=False))
                for c in items]


def _call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
