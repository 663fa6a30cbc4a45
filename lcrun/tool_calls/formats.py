"""The tool-call families, told apart by the chat template's text as llama-server's common/chat.cpp does:

| family  | templates                     | a call in the reply                                              | trigger            |
|---------|-------------------------------|------------------------------------------------------------------|--------------------|
| mistral | Mistral Nemo, [TOOL_CALLS]    | `[TOOL_CALLS][{"name": …, "arguments": {…}, "id": "a1B2c3D4e"}]` | the [TOOL_CALLS] token |
| hermes  | Qwen 2.5, Hermes 2 Pro        | `<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>` …   | the <tool_call> token |
| llama3  | Llama 3.1-3.3 (ipython role)  | the whole reply `{"name": …, "parameters": {…}}`                 | `{` opening the reply |
| generic | any other                     | the whole reply `{"tool_call": {"name": …, "arguments": {…}}}` or `{"response": "…"}` | none: always JSON |

A family gives the grammar of its calls — the JSON of a call is one JSON schema over the declared functions (`anyOf`
of `{name: const, arguments: parameters}`), turned into GBNF by the same converter as `response_format`, and wrapped
in the family's own text — lazy for `tool_choice: auto` (it holds from the trigger on; before it, the model writes
content freely), strict for `required` or a named function; and it parses a finished reply into content and calls.
Several calls in one reply only with `parallel_tool_calls` (at most MAX_CALLS), as llama-server; Llama 3.x makes one
call a reply (its template refuses more)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from lcrun.engine.protocol import Grammar
from lcrun.generation.json_schema import converted

from .specs import ToolCall, ToolChoice, ToolSpec, call_id

MAX_CALLS = 16
_WS = "tc-ws ::= [ \\n]? [ \\n]?"
_MISTRAL_ID = {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}
_ID9 = re.compile(r"^[a-zA-Z0-9]{9}$")


@dataclass(frozen=True)
class Family:
    name: str
    name_key: str = "name"
    args_key: str = "arguments"
    trigger: str | None = None         # the text (ideally one token) that starts a call
    at_start: bool = False             # a call is the whole reply, starting with "{"
    always_json: bool = False          # every reply is JSON (a call or {"response": …})

    @property
    def ids9(self) -> bool:
        """Calls carry nine-letter ids the template checks."""
        return self.name == "mistral"


FAMILIES = {f.name: f for f in (
    Family("mistral", trigger="[TOOL_CALLS]"),
    Family("hermes", trigger="<tool_call>"),
    Family("llama3", args_key="parameters", at_start=True),
    Family("generic", always_json=True),
)}


def detect_family(template: str | None) -> Family:
    """The family of a Jinja chat template's source (None: a built-in format or none: generic)."""
    text = template or ""
    if "[TOOL_CALLS]" in text:
        return FAMILIES["mistral"]
    if "<tool_call>" in text:
        return FAMILIES["hermes"]
    if "<|start_header_id|>ipython<|end_header_id|>" in text or ("<|start_header_id|>" in text and "ipython" in text):
        return FAMILIES["llama3"]
    return FAMILIES["generic"]


# -- the grammar -------------------------------------------------------------------------------------------------
def _call_schema(family: Family, spec: ToolSpec) -> dict[str, Any]:
    arguments = {k: v for k, v in spec.checked.items() if k != "$defs"}
    properties: dict[str, Any] = {family.name_key: {"const": spec.name}, family.args_key: arguments}
    if family.ids9:
        properties["id"] = _MISTRAL_ID
    return {"type": "object", "properties": properties, "required": list(properties)}


def _payload_schema(family: Family, specs: list[ToolSpec], choice: ToolChoice) -> dict[str, Any]:
    chosen = [s for s in specs if choice.function in (None, s.name)]
    call: dict[str, Any] = {"anyOf": [_call_schema(family, s) for s in chosen]}
    many = {"type": "array", "items": call, "minItems": 1, "maxItems": MAX_CALLS if choice.parallel else 1}
    if family.ids9:
        payload = many
    elif family.always_json:
        calls = {"type": "object", "properties": {"tool_calls": many}, "required": ["tool_calls"]} if \
            choice.parallel else {"type": "object", "properties": {"tool_call": call}, "required": ["tool_call"]}
        reply = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"]}
        payload = calls if choice.strict else {"anyOf": [calls, reply]}
    else:
        payload = call
    defs = {name: schema for s in chosen for name, schema in s.checked.get("$defs", {}).items()}
    return {**payload, "$defs": defs} if defs else payload


def call_grammar(family: Family, specs: list[ToolSpec], choice: ToolChoice, trigger_token: int | None) -> Grammar:
    """The grammar of the calls `choice` allows. `trigger_token`: the token of the family's trigger text when it is
    one token of the vocabulary (lazy grammars start at it; otherwise only a call opening the reply triggers)."""
    lines = converted(_payload_schema(family, specs, choice), param="tools").split("\n")
    body = ["tc-payload ::= " + line[len("root ::= "):] if line.startswith("root ::= ") else line for line in lines]
    if family.name == "hermes":
        repeat = f" (tc-ws tc-call){{0,{MAX_CALLS - 1}}}" if choice.parallel else ""
        wrapper = [f"root ::= tc-call{repeat}", 'tc-call ::= "<tool_call>" tc-ws tc-payload tc-ws "</tool_call>"']
    elif family.name == "mistral":
        wrapper = ['root ::= "[TOOL_CALLS]" tc-payload']
    else:
        wrapper = ["root ::= tc-ws tc-payload"]
    gbnf = "\n".join(wrapper + [_WS] + body)
    if choice.strict or family.always_json:
        return Grammar(gbnf)
    if family.at_start:
        return Grammar(gbnf, lazy=True, trigger_prefixes=("{",))
    assert family.trigger is not None
    if trigger_token is not None:
        return Grammar(gbnf, lazy=True, trigger_tokens=(trigger_token,))
    return Grammar(gbnf, lazy=True, trigger_prefixes=(family.trigger,))


# -- parsing a reply ---------------------------------------------------------------------------------------------
def parse_reply(family: Family, text: str, specs: list[ToolSpec]) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished reply. A reply that is not a well-formed call of a declared function (one cut
    short by max_tokens, say) is all content."""
    names = {s.name for s in specs}
    try:
        if family.always_json:
            value = _json_at(text, 0)[0]
            if isinstance(value, dict) and isinstance(value.get("response"), str) and len(value) == 1:
                return value["response"], []
            items = value.get("tool_calls") if "tool_calls" in value else [value.get("tool_call")]
            return None, _calls(family, items, names)
        if family.at_start:
            body = text.strip().removeprefix("<|python_tag|>")
            if not body.startswith("{"):
                return text, []
            value, end = _json_at(body, 0)
            if body[end:].strip():
                return text, []
            return None, _calls(family, [value], names)
        assert family.trigger is not None
        start = text.find(family.trigger)
        if start < 0:
            return text, []
        content = text[:start].strip() or None
        if family.name == "mistral":
            value, end = _json_at(text, start + len(family.trigger))
            if not isinstance(value, list) or text[end:].strip():
                return text, []
            return content, _calls(family, value, names)
        items, pos = [], start
        while pos < len(text):
            if not text.startswith(family.trigger, pos):
                if text[pos:].strip():
                    return text, []
                break
            value, pos = _json_at(text, pos + len(family.trigger))
            items.append(value)
            pos = _skip_ws(text, pos)
            if text.startswith("</tool_call>", pos):
                pos = _skip_ws(text, pos + len("</tool_call>"))
        return content, _calls(family, items, names)
    except (ValueError, TypeError, AttributeError, RecursionError):  # RecursionError: JSON nested past Python's limit
        return text, []


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _json_at(text: str, pos: int) -> tuple[Any, int]:
    return json.JSONDecoder().raw_decode(text, _skip_ws(text, pos))


def _calls(family: Family, items: Any, names: set[str]) -> list[ToolCall]:
    if not isinstance(items, list) or not items:
        raise ValueError("no calls")
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get(family.name_key) not in names:
            raise ValueError("not a call of a declared function")
        arguments = item.get(family.args_key, item.get("arguments", item.get("parameters")))
        if not isinstance(arguments, dict):
            raise ValueError("arguments are not an object")
        given = item.get("id")
        ident = given if isinstance(given, str) and (_ID9.match(given) if family.ids9 else given) else \
            call_id(family.ids9)
        calls.append(ToolCall(item[family.name_key], json.dumps(arguments, ensure_ascii=False), ident))
    return calls
