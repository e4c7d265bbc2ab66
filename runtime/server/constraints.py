"""What a request constrains its output to: `response_format`, vLLM's structured-output fields, and tools.

Structured outputs come from one source per request: chat's `response_format` (json_object, or json_schema
with `strict`), vLLM's `structured_outputs` object (json, regex, choice, grammar, json_object) or its older
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` fields. Tools come as OpenAI's
`tools`, `tool_choice` and `parallel_tool_calls`. A named tool_choice constrains the output to that
function's parameters; "required" to a JSON array of calls (`{"name", "parameters"}`), one at most without
parallel calls; "auto" leaves the model free and its own tool-call format is parsed (tool_calls.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmctl.runtime.server.errors import APIError
from llmctl.runtime.structured import StructuredOutput

if TYPE_CHECKING:
    from llmctl.runtime.server.protocol import Body

STRUCTURED_FIELDS = {"structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar"}
TOOL_FIELDS = {"tools", "tool_choice", "parallel_tool_calls"}
MAX_TOOLS = 128


@dataclass
class Tools:
    """A request's tools, by name; choice is "none", "auto", "required" or the name of the one to call."""

    functions: dict[str, dict]  # name -> OpenAI's function object (name, description, parameters, strict)
    choice: str
    parallel: bool = True
    named: bool = False  # choice names a function

    @property
    def active(self) -> bool:
        return self.choice != "none"

    def constraint(self) -> StructuredOutput | None:
        """What the output must be for this tool_choice (None: free text, parsed for calls)."""
        if self.named:
            function = self.functions[self.choice]
            return StructuredOutput.json_schema(_parameters(function), strict=bool(function.get("strict")))
        if self.choice != "required":
            return None
        calls = [{"type": "object", "properties": {"name": {"const": name}, "parameters": _parameters(f)},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for name, f in self.functions.items()]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}, **({} if self.parallel else {"maxItems": 1})}
        return StructuredOutput.json_schema(schema, strict=all(f.get("strict") for f in self.functions.values()))


def _parameters(function: dict) -> dict:
    """A function's parameters schema, closed to arguments it does not declare (as vLLM's default grammar
    backend does) unless it says otherwise: a function takes the arguments it names."""
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {"additionalProperties": False, **parameters}


def structured_output(body: Body, chat: bool) -> StructuredOutput | None:
    """The request's one structured-output constraint, or None; a 400 for a malformed one or for two."""
    found: list[tuple[str, StructuredOutput]] = []
    data = body.data
    if chat and data.get("response_format") is not None:
        spec = _response_format(data["response_format"])
        if spec is not None:
            found.append(("response_format", spec))
    if data.get("structured_outputs") is not None:
        options = data["structured_outputs"]
        if not isinstance(options, dict):
            raise APIError(400, "'structured_outputs' must be an object", param="structured_outputs")
        known = {"json", "regex", "choice", "grammar", "json_object"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise APIError(400, f"'structured_outputs.{unknown[0][:40]}' is not supported (this server takes "
                                f"{', '.join(sorted(known))})", param="structured_outputs", code="unsupported_parameter")
        for key, value in options.items():
            if value is not None and not (key == "json_object" and value is False):
                found.append((f"structured_outputs.{key}", _guided(f"structured_outputs.{key}", key, value)))
    for key in ("json", "regex", "choice", "grammar"):
        if data.get(f"guided_{key}") is not None:
            found.append((f"guided_{key}", _guided(f"guided_{key}", key, data[f"guided_{key}"])))
    if len(found) > 1:
        raise APIError(400, f"ask for one structured output, not several: {', '.join(name for name, _ in found)}",
                       param=found[1][0].split(".")[0])
    return found[0][1] if found else None


def _response_format(value: Any) -> StructuredOutput | None:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema", {}) if isinstance(spec, dict) else None
        if not isinstance(schema, dict) or not isinstance(spec.get("strict", False), (bool, type(None))):
            raise APIError(400, "'response_format.json_schema' must be an object with a 'schema' object (and "
                                "optionally 'name', 'description', a boolean 'strict')", param="response_format")
        return StructuredOutput.json_schema(schema, strict=bool(spec.get("strict")))
    raise APIError(400, "'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                        "{\"type\": \"json_schema\", \"json_schema\": {...}}", param="response_format")


def _guided(name: str, key: str, value: Any) -> StructuredOutput:
    param = name.split(".")[0]
    if key == "json_object":
        if value is not True:
            raise APIError(400, f"'{name}' must be true", param=param)
        return StructuredOutput("json_object")
    if key == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise APIError(400, f"'{name}' is not valid JSON: {exc}", param=param) from None
        if not isinstance(value, (dict, bool)):
            raise APIError(400, f"'{name}' must be a JSON schema (an object)", param=param)
        return StructuredOutput.json_schema(value)
    if key == "choice":
        if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
            raise APIError(400, f"'{name}' must be a non-empty array of non-empty strings", param=param)
        return StructuredOutput.choice(value)
    if not (isinstance(value, str) and value):
        raise APIError(400, f"'{name}' must be a non-empty string", param=param)
    return StructuredOutput(key, value)


def tools(body: Body) -> Tools | None:
    """The request's tools and tool_choice, checked; None when it offers none."""
    raw = body.get("tools", lambda v: isinstance(v, list), "an array of tools", [])
    choice = body.data.get("tool_choice")
    parallel = body.boolean("parallel_tool_calls", True)
    if not raw:
        if choice not in (None, "none"):
            raise APIError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        return None
    if len(raw) > MAX_TOOLS:
        raise APIError(400, f"'tools' holds {len(raw)} tools; this server takes at most {MAX_TOOLS}", param="tools")
    functions: dict[str, dict] = {}
    for i, tool in enumerate(raw):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not (isinstance(name, str) and name):
            raise APIError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                           param="tools")
        if not isinstance(function.get("parameters", {}), dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        if name in functions:
            raise APIError(400, f"tools[{i}]: two tools are named {name[:64]!r}", param="tools")
        functions[name] = function
    if choice is None or choice in ("none", "auto", "required"):
        return Tools(functions, choice or "auto", parallel)
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
        and isinstance(choice.get("function"), dict) else None
    if not isinstance(named, str):
        raise APIError(400, "'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                            "\"function\": {\"name\": ...}}", param="tool_choice")
    if named not in functions:
        raise APIError(400, f"'tool_choice' names {named[:64]!r}, which is not among 'tools'", param="tool_choice")
    return Tools(functions, named, parallel, named=True)
