"""A model's tool-call text → OpenAI `tool_calls`, whole and streamed, for the three common formats.

- `hermes` (Hermes 2 Pro, Qwen2.5, Qwen3): each call is `{"name": ..., "arguments": {...}}` between lines
  `<tool_call>` and `</tool_call>`; several may follow one another, and text may come first (Qwen3's
  `<think>...</think>` stays in the content).
- `llama3_json` (Llama 3.1-3.3 with JSON tools): the output *is* the call,
  `{"name": ..., "parameters": {...}}` ("arguments" also accepted), perhaps after `<|python_tag|>`, several
  joined by `;`.
- `mistral`: `[TOOL_CALLS]` then either a JSON array `[{"name": ..., "arguments": {...}}, ...]` (tokenizers
  up to v7), or `name[ARGS]{...}` (v13+) or `name[CALL_ID]abcDEF123[ARGS]{...}` (v11), one `[TOOL_CALLS]`
  per call. Mistral's templates insist on ids of 9 letters and digits. Its markers are control tokens: the
  output must be detokenized with them kept.

There is one algorithm, the streaming one; `parse` feeds the whole text through a fresh parser, so the two
can never disagree. Text is content until a call opens; the few characters that may be the start of a marker
are held back until the next ones decide. A call is held until it is complete (its closing marker, or the
bracket that closes its JSON: brackets are counted as the text comes, strings skipped, so the JSON is parsed
once); then its name and arguments go out at once, arguments as `json.dumps(..., ensure_ascii=False)`. A call
that does not parse, or names a function the request did not offer, is given back as content, markers and
all. Whitespace between content and calls, or after the last call, is dropped. An output with no valid call
comes back exactly as it was.
"""

from __future__ import annotations

import json
import random
import re
import string
from dataclasses import dataclass

ALPHANUMERIC = string.ascii_letters + string.digits
_SPACE = re.compile(r"\s*")


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text, like OpenAI's


class ToolParser:
    start_marker = ""  # what opens a call: what a grammar must force for tool_choice="required"
    id_prefix, id_length = "call_", 24

    def __init__(self, tool_names: set[str]) -> None:
        self.tool_names = set(tool_names)
        self.calls: list[ToolCall] = []
        self._buf = ""  # text not yet decided: a possible partial marker, or the body of an open call
        self._opening: str | None = None  # the text that opened the call in _buf (None: no call is open)
        self._scan = JsonScan()  # how far the open call's body has been read
        self._space = ""  # whitespace after the last content, dropped if a call comes next
        self._after_call = False  # whether the last thing out was a call (content's leading whitespace goes)
        self._out: list[dict] = []

    @property
    def called(self) -> bool:
        return bool(self.calls)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        fresh = type(self)(self.tool_names)
        pieces = fresh.feed(text) + fresh.finish()
        if not fresh.called:
            return text, []
        return "".join(p.get("content", "") for p in pieces) or None, fresh.calls

    def feed(self, delta: str) -> list[dict]:
        self._buf += delta
        self._advance(final=False)
        return self._take_out()

    def finish(self) -> list[dict]:
        self._advance(final=True)
        if self._space and not self.called:
            self._out.append({"content": self._space})
        self._space = ""
        return self._take_out()

    # -- what each format says -------------------------------------------------------------------

    def _find_start(self, buf: str) -> tuple[int, int | None]:
        """(where a call opens, where its body starts); or (what of buf is surely content, None)."""
        at = buf.find(self.start_marker)
        if at >= 0:
            return at, at + len(self.start_marker)
        return len(buf) - _partial_suffix(buf, self.start_marker), None

    def _read_call(self, body: str, final: bool) -> tuple[int, list[ToolCall] | None] | None:
        """(characters of body the call used, its calls or None if invalid); None: wait for more text."""
        raise NotImplementedError

    # -- shared machinery --------------------------------------------------------------------------

    def _advance(self, final: bool) -> None:
        while True:
            if self._opening is None:
                start, body = self._find_start(self._buf)
                if body is None:
                    cut = len(self._buf) if final else start
                    self._content(self._buf[:cut])
                    self._buf = self._buf[cut:]
                    return
                self._content(self._buf[:start])
                self._opening, self._buf, self._scan = self._buf[start:body], self._buf[body:], JsonScan()
            read = self._read_call(self._buf, final)
            if read is None:
                return
            used, calls = read
            if calls is None:
                self._content(self._opening + self._buf[:used])
            else:
                self._space, self._after_call = "", True
                for call in calls:
                    self._emit(call)
            self._opening, self._buf = None, self._buf[used:]

    def _content(self, text: str) -> None:
        kept = text.rstrip()
        if kept:
            piece = (self._space + kept).lstrip() if self._after_call else self._space + kept
            if self._out and "content" in self._out[-1]:
                self._out[-1]["content"] += piece
            else:
                self._out.append({"content": piece})
            self._space, self._after_call = "", False
        self._space += text[len(kept) :]

    def _emit(self, call: ToolCall) -> None:
        index = len(self.calls)
        self.calls.append(call)
        self._out.append({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                          "function": {"name": call.name, "arguments": ""}}]})
        self._out.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]})

    def _take_out(self) -> list[dict]:
        out, self._out = self._out, []
        return out

    def _json_at(self, body: str, at: int, final: bool) -> tuple[object, int] | None:
        """(the JSON object or array opening at body[at], or None if that is not JSON; where it ends);
        None while it is not closed yet."""
        end = self._scan.close(body, at)
        if end is None:
            return (None, len(body)) if final else None
        try:
            return json.loads(body[at:end]), end
        except json.JSONDecodeError:
            return None, end

    def _object_at(self, body: str, at: int, final: bool) -> tuple[object, int] | None:
        """_json_at for a JSON object after any spaces from `at`; (None, where the spaces end) when something
        else starts there, or nothing does and the text is final."""
        at = _SPACE.match(body, at).end()
        if at == len(body):
            return (None, at) if final else None
        if body[at] != "{":
            return None, at
        return self._json_at(body, at, final)

    def _call(self, name, arguments) -> ToolCall | None:
        """A call to an offered function with an object (or a string holding one) for arguments; else None."""
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(name, str) or name not in self.tool_names or not isinstance(arguments, dict):
            return None
        call_id = self.id_prefix + "".join(random.choices(ALPHANUMERIC, k=self.id_length))
        return ToolCall(call_id, name, json.dumps(arguments, ensure_ascii=False))

    def _call_object(self, obj, argument_keys: tuple[str, ...] = ("arguments",)) -> ToolCall | None:
        if not isinstance(obj, dict):
            return None
        arguments = next((obj[k] for k in argument_keys if k in obj), {})
        return self._call(obj.get("name"), arguments)


class HermesParser(ToolParser):
    start_marker = "<tool_call>"
    end_marker = "</tool_call>"

    def _read_call(self, body, final):
        end = body.find(self.end_marker, max(0, self._scan.pos - len(self.end_marker) + 1))
        self._scan.pos = len(body)
        if end < 0 and not final:
            return None
        used = len(body) if end < 0 else end + len(self.end_marker)
        try:
            call = self._call_object(json.loads(body[: len(body) if end < 0 else end]))
        except json.JSONDecodeError:
            call = None
        return used, None if call is None else [call]


class Llama3JsonParser(ToolParser):
    start_marker = ""  # the model answers with the JSON itself; <|python_tag|> before it is optional
    python_tag = "<|python_tag|>"
    _BARE = re.compile(r"\s*(;\s*)?")

    def __init__(self, tool_names: set[str]) -> None:
        super().__init__(tool_names)
        self._bare = True  # a bare `{` may open a call: at the start, and after a call (`;` between)

    def _find_start(self, buf):
        if self._bare:
            at = self._BARE.match(buf).end()
            if at == len(buf):
                return 0, None
            if buf[at] == "{":
                return 0, at
            self._bare = False
        at = buf.find(self.python_tag)
        if at >= 0:
            return at, at + len(self.python_tag)
        return len(buf) - _partial_suffix(buf, self.python_tag), None

    def _read_call(self, body, final):
        at = _SPACE.match(body).end()
        found = self._object_at(body, at, final)
        if found is None:
            return None
        obj, end = found
        if not body.startswith("{", at):
            return end, None  # no object here
        call = self._call_object(obj, ("parameters", "arguments"))
        self._bare = call is not None
        return end, None if call is None else [call]


class MistralParser(ToolParser):
    start_marker = "[TOOL_CALLS]"
    id_prefix, id_length = "", 9
    _HEADER = re.compile(r"([\w.\-]+)(?:\[CALL_ID\][A-Za-z0-9]+)?\[ARGS\]\s*")  # the model's id is not kept

    def _read_call(self, body, final):
        at = _SPACE.match(body).end()
        if at == len(body):
            return (at, None) if final else None
        if body[at] == "[":  # [{"name": ..., "arguments": ...}, ...]
            found = self._json_at(body, at, final)
            if found is None:
                return None
            items, end = found
            calls = [self._call_object(item) for item in items] if isinstance(items, list) else [None]
            return end, None if not calls or None in calls else calls
        header = self._HEADER.match(body, at)
        if header is None:
            return None if not final and _header_may_follow(body[at:]) else (at, None)
        found = self._object_at(body, header.end(), final)
        if found is None:
            return None
        arguments, end = found
        call = self._call(header[1], arguments) if isinstance(arguments, dict) else None
        return end, None if call is None else [call]


@dataclass
class JsonScan:
    """How far a call's body has been read and, for a JSON object or array in it, the brackets still open."""

    pos: int = 0
    depth: int = 0
    quoted: bool = False
    escaped: bool = False

    def close(self, text: str, start: int) -> int | None:
        """Where the object or array opening at text[start] ends, once its closing bracket has come."""
        for i in range(max(self.pos, start), len(text)):
            ch = text[i]
            if self.quoted:
                self._in_string(ch)
            elif ch == '"':
                self.quoted = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.pos = i + 1
                    return i + 1
        self.pos = len(text)
        return None

    def _in_string(self, ch: str) -> bool:
        """Read one character inside a quoted string; whether it was the closing quote."""
        if self.escaped:
            self.escaped = False
        elif ch == "\\":
            self.escaped = True
        elif ch == '"':
            self.quoted = False
            return True
        return False

    def value_end(self, text: str, start: int) -> int | None:
        """Where the JSON value at text[start] ends: an object or array at its closing bracket, a string at its
        closing quote, a number or literal at the "," or "}" after it (spaces before those are its own)."""
        if text[start] in "{[":
            return self.close(text, start)
        for i in range(max(self.pos, start), len(text)):
            ch = text[i]
            if self.quoted:
                if self._in_string(ch):
                    self.pos = i + 1
                    return i + 1
            elif ch == '"' and i == start:
                self.quoted = True
            elif ch in ",}":
                self.pos = i
                return i
        self.pos = len(text)
        return None


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of text that is the start of marker (and may become it)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _header_may_follow(text: str) -> bool:
    """Whether text can still grow into `name[ARGS]` or `name[CALL_ID]id[ARGS]`."""
    rest = text[re.match(r"[\w.\-]*", text).end() :]
    if rest.startswith("[CALL_ID]"):
        rest = rest[re.match(r"[A-Za-z0-9]*", rest[9:]).end() + 9 :]
        return "[ARGS]".startswith(rest)
    return "[ARGS]".startswith(rest) or "[CALL_ID]".startswith(rest)


PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesParser, "llama3_json": Llama3JsonParser,
                                        "mistral": MistralParser}


def detect_parser(chat_template: str | None) -> str | None:
    """The parser for the calls a chat template teaches its model to write; None if it knows no tools."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return "hermes"
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if "<|python_tag|>" in chat_template or '"parameters"' in chat_template:
        return "llama3_json"
    return None


def arguments_as_objects(messages: list[dict]) -> list[dict]:
    """Messages with each tool call's `arguments` decoded from OpenAI's JSON text into the object that chat
    templates render with `tojson` (given as text, they would render as one quoted string). Arguments that are
    not a JSON object stay as they are."""
    out = []
    for message in messages:
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if calls:
            message = {**message, "tool_calls": [_decoded(call) for call in calls]}
        out.append(message)
    return out


def _decoded(call):
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**function, "arguments": arguments}} if isinstance(arguments, dict) else call
