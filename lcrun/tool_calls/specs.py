"""What a request declares and chooses: its tools (each a function with a name, a description and a JSON schema of
its parameters), which of them may or must be called, and the calls a reply makes. Everything here comes from a
client: names are held to OpenAI's pattern, the count and the schemas are bounded (the schemas as any response
schema is, lcrun.generation.json_schema), and what cannot be honoured is a `ToolError` naming the field."""
from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Literal

from lcrun.generation.json_schema import SchemaError, letters, normalise
from lcrun.generation.records import RequestError

MAX_TOOLS = 64
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")     # OpenAI's rule for function names
MAX_DESCRIPTION_CHARS = 8192


class ToolError(RequestError):
    """A tool, tool choice or tool message the server cannot honour; `param` names the request field."""


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]             # as the client gave them (shown to the model)
    checked: dict[str, Any]                # the same, as the grammar honours them (json_schema.normalise)
    ref_prefix: str = ""                   # the prefix of the `$defs` names in `checked`

    def as_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    mode: Literal["auto", "none", "required"] = "auto"
    function: str | None = None            # a named function: required, and only that one
    parallel: bool = False                 # several calls in one reply (off unless asked, as llama-server)

    @property
    def constrains(self) -> bool:
        return self.mode != "none"

    @property
    def strict(self) -> bool:
        """The reply must be a call (the grammar holds from the first token)."""
        return self.mode == "required" or self.function is not None


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str                         # a JSON object, as text (OpenAI's `function.arguments`)
    id: str = field(default_factory=lambda: call_id())

    def arguments_object(self) -> dict[str, Any]:
        value = json.loads(self.arguments)
        return value if isinstance(value, dict) else {}


def call_id(alphanumeric9: bool = False) -> str:
    """A new call's id: OpenAI's `call_…`, or nine letters and digits where the template insists (Mistral)."""
    if alphanumeric9:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return "call_" + secrets.token_hex(12)


def tool_specs(tools: list[dict[str, Any]]) -> list[ToolSpec]:
    """The declared tools in OpenAI's shape ({"type": "function", "function": {name, description, parameters}})."""
    if len(tools) > MAX_TOOLS:
        raise ToolError("tools", f"{len(tools)} tools; at most {MAX_TOOLS}")
    specs: list[ToolSpec] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or \
                not isinstance(tool.get("function"), dict):
            raise ToolError(where, "a tool is {\"type\": \"function\", \"function\": {\"name\": …}}")
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ToolError(f"{where}.function.name", f"{name!r}: 1 to 64 letters, digits, _ or -")
        if any(s.name == name for s in specs):
            raise ToolError(f"{where}.function.name", f"{name!r} is declared twice")
        description = function.get("description") or ""
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
            raise ToolError(f"{where}.function.description", f"a string of at most {MAX_DESCRIPTION_CHARS} characters")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise ToolError(f"{where}.function.parameters", "a JSON schema of type object")
        prefix = f"lcrunref-{letters(i)}-"
        try:
            checked = normalise(parameters, param=f"{where}.function.parameters", ref_prefix=prefix)
        except SchemaError as exc:
            raise ToolError(exc.param, exc.problem) from None
        specs.append(ToolSpec(name, description, parameters, checked, prefix))
    return specs


def tool_choice(choice: Any, parallel: bool | None, specs: list[ToolSpec]) -> ToolChoice:
    """OpenAI's `tool_choice` ("auto", "none", "required", {"type": "function", "function": {"name": …}})."""
    parallel = bool(parallel)
    if choice is None:
        return ToolChoice("auto" if specs else "none", None, parallel)
    if choice in ("auto", "none", "required"):
        if choice == "required" and not specs:
            raise ToolError("tool_choice", "'required' with no tools declared")
        return ToolChoice(choice, None, parallel)
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not any(s.name == name for s in specs):
            raise ToolError("tool_choice", f"{name!r} is not among the declared tools")
        return ToolChoice("required", name, parallel)
    raise ToolError("tool_choice", "one of 'auto', 'none', 'required' or {\"type\": \"function\", \"function\": "
                                   "{\"name\": …}}")
