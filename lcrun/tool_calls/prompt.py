"""The conversation as a chat template takes it when tools are declared. Templates of the mistral, hermes and llama3
families render tools, assistant calls and tool results themselves (OpenAI's shapes, a call's arguments as an
object, as their templates expect); for the generic family — a template that knows nothing of tools, or a built-in
format — the tools and the JSON to answer in go into the system prompt, an assistant's calls become its JSON reply
and a tool's result a user message, as llama-server's generic format and minja's polyfills do.

What the client sends stays data: message contents are marked by lcrun.chat.prompt_tokens.render_marked, and the
strings inside a call's arguments are marked here, so special-token text in them is never a special token; function
names and call ids are held to letters, digits and a few punctuation marks no special token is made of.
lcrun.serve.prompting sends every conversation holding calls or tool results through here, whether or not the request
declares tools."""
from __future__ import annotations

import json
import re
from typing import Any

from lcrun.chat.prompt_tokens import as_content
from lcrun.json_bounds import MAX_JSON_DEPTH, json_depth

from .formats import Family
from .specs import NAME, ToolChoice, ToolError, ToolSpec

CALL_ID = re.compile(r"^[\w.:-]{0,128}$")
GENERIC_INSTRUCTIONS = (
    "You can call tools. These are the tools, each with a JSON schema of its arguments:\n{tools}\n\n"
    "Respond in JSON only: {{\"tool_call\": {{\"name\": <a tool's name>, \"arguments\": {{…}}}}}} to call a tool"
    "{many}, or {{\"response\": \"<your reply>\"}} to reply to the user.")


def template_messages(messages: list[dict[str, Any]], family: Family, specs: list[ToolSpec],
                      choice: ToolChoice) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) for the template: `tools` None where the template is not given any."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        calls = message.get("tool_calls")
        if calls:
            calls = [_call(call, f"messages[{i}].tool_calls[{j}]") for j, call in enumerate(calls)]
        if family.always_json:
            if calls:
                body = ({"tool_call": _plain(calls[0])} if len(calls) == 1 else
                        {"tool_calls": [_plain(c) for c in calls]})
                out.append({"role": "assistant", "content": json.dumps(body, ensure_ascii=False)})
            elif message["role"] == "tool":
                result = {"tool_call_id": message.get("tool_call_id"), "content": message.get("content") or ""}
                out.append({"role": "user", "content": json.dumps({"tool_response": result}, ensure_ascii=False)})
            else:
                out.append({"role": message["role"], "content": message.get("content") or ""})
            continue
        entry = {k: v for k, v in message.items() if v is not None}
        entry["content"] = message.get("content") or ""
        if "name" in entry:
            entry["name"] = _name(entry["name"], f"messages[{i}].name")
        if "tool_call_id" in entry:
            entry["tool_call_id"] = _call_id(entry["tool_call_id"], f"messages[{i}].tool_call_id")
        if calls:
            entry["tool_calls"] = calls
        out.append(entry)
    if not specs:
        return out, None
    if family.always_json:
        if not choice.constrains:
            return out, None
        listed = json.dumps([{"name": s.name, "description": s.description, "parameters": s.parameters}
                             for s in specs], ensure_ascii=False, indent=2)
        many = (", or {\"tool_calls\": [<such calls>]} to call several at once" if choice.parallel else "")
        text = GENERIC_INSTRUCTIONS.format(tools=listed, many=many)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
        return out, None
    return out, [s.as_openai() for s in specs]


def _call(call: Any, where: str) -> dict[str, Any]:
    """An assistant's call in OpenAI's shape, its arguments parsed into an object (templates render them with
    tojson) and their strings marked as data."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ToolError(where, "a call is {\"id\": …, \"type\": \"function\", \"function\": {\"name\": …, "
                               "\"arguments\": …}}")
    arguments = function.get("arguments") or "{}"
    if isinstance(arguments, str):
        if json_depth(arguments.encode("utf-8")) > MAX_JSON_DEPTH:
            raise ToolError(f"{where}.function.arguments", f"nested more than {MAX_JSON_DEPTH} deep")
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise ToolError(f"{where}.function.arguments", "not valid JSON") from None
    if not isinstance(arguments, dict):
        raise ToolError(f"{where}.function.arguments", "not a JSON object")
    return {"id": _call_id(call.get("id") or "", f"{where}.id"), "type": "function",
            "function": {"name": _name(function["name"], f"{where}.function.name"), "arguments": _marked(arguments)}}


def _name(name: Any, where: str) -> str:
    """A function's name as OpenAI allows it (letters, digits, _ and -): never text a template could take for its
    own special tokens."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ToolError(where, "a function name is 1 to 64 letters, digits, '_' or '-'")
    return name


def _call_id(call_id: Any, where: str) -> str:
    """A call's id as clients make them (call_…, uuids, Mistral's nine characters): not marked as content, since
    templates check its length (Mistral's: exactly 9), but held to characters no special token is made of."""
    if not isinstance(call_id, str) or not CALL_ID.fullmatch(call_id):
        raise ToolError(where, "a call id is at most 128 letters, digits, '_', '-', '.' or ':'")
    return call_id


def _marked(value: Any) -> Any:
    if isinstance(value, str):
        return as_content(value)
    if isinstance(value, list):
        return [_marked(v) for v in value]
    if isinstance(value, dict):
        return {k: _marked(v) for k, v in value.items()}
    return value


def _plain(call: dict[str, Any]) -> dict[str, Any]:
    return {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}
