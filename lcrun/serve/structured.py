"""What a request asks of the reply's form, from whichever API: a JSON object (`response_format: json_object`,
Ollama's `format: "json"`), a JSON schema (`response_format: json_schema`, llama-server's `json_schema`, Ollama's
`format: {schema}`), a GBNF grammar (llama-server's `grammar`), or tool calls (`tools`, `tool_choice`,
`parallel_tool_calls`) — turned into the one grammar the decode loop's sampler follows, the family tool calls are
parsed in, and the special tokens the reply must show (a call's `[TOOL_CALLS]`). Each is a 400 naming its field when
it cannot be honoured: a schema the grammar cannot hold a reply to, a grammar llama.cpp cannot compile, several forms
at once, or a form beside tools that may be called (the grammar can follow one or the other)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lcrun.engine.protocol import EngineProtocol, Grammar
from lcrun.errors import GrammarError
from lcrun.generation.json_schema import SchemaError, schema_grammar
from lcrun.generation.records import RequestError, check_grammar_text
from lcrun.tool_calls.formats import Family, call_grammar, detect_family
from lcrun.tool_calls.specs import ToolChoice, ToolSpec, tool_choice, tool_specs

from .openai_api import APIError, bad_request
from .respond import ToolParsing

JSON_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class OutputPlan:
    grammar: Grammar | None = None
    tools: ToolParsing | None = None            # None: no tool calls are parsed out of the reply
    specs: list[ToolSpec] = field(default_factory=list)
    choice: ToolChoice = ToolChoice("none")
    family: Family | None = None
    preserved: tuple[int, ...] = ()


def output_plan(engine: EngineProtocol, template_source: str | None, *, schema: tuple[str, Any] | None = None,
                grammar: str | None = None, tools: list[dict[str, Any]] | None = None, choice: Any = None,
                parallel: bool | None = None) -> OutputPlan:
    """`schema`: (the field it came in, the JSON schema); the rest as named. Runs on a worker thread: converting a
    schema and compiling the grammar take milliseconds."""
    try:
        specs = tool_specs(tools or [])
        picked = tool_choice(choice, parallel, specs)
    except RequestError as exc:
        raise bad_request(exc.problem, param=exc.param) from None
    if schema is not None and grammar is not None:
        raise bad_request(f"give either {schema[0]} or grammar, not both", param="grammar")
    constrained = schema is not None or grammar is not None
    if constrained and picked.constrains:
        raise bad_request("a response format and tools that may be called cannot both be followed (the grammar "
                          "holds the reply to one); send tool_choice: \"none\" or drop the format",
                          param=schema[0] if schema is not None else "grammar")
    family = detect_family(template_source) if specs else None
    plan = OutputPlan(specs=specs, choice=picked, family=family)
    if grammar is not None:
        made = _checked(engine, Grammar(grammar), "grammar")
        return OutputPlan(made, None, specs, picked, family)
    if schema is not None:
        try:
            made = schema_grammar(schema[1], param=schema[0])
        except SchemaError as exc:
            raise bad_request(f"{exc.param}: the schema cannot be followed: {exc.problem}", param=exc.param,
                              code="unsupported_schema") from None
        return OutputPlan(_checked(engine, made, schema[0]), None, specs, picked, family)
    if not picked.constrains or family is None:
        return plan
    trigger = _single_token(engine, family.trigger)
    try:
        made = call_grammar(family, specs, picked, trigger)
    except SchemaError as exc:
        raise bad_request(f"the tools' schemas cannot be followed: {exc.problem}", param="tools") from None
    return OutputPlan(_checked(engine, made, "tools"), ToolParsing(family, specs), specs, picked, family,
                      (trigger,) if trigger is not None else ())


def _single_token(engine: EngineProtocol, text: str | None) -> int | None:
    if not text:
        return None
    tokens = engine.tokenize(text, special=True)
    return tokens[0] if len(tokens) == 1 else None


def _checked(engine: EngineProtocol, made: Grammar, param: str) -> Grammar:
    try:
        check_grammar_text(made.gbnf)
        engine.check_grammar(made)
    except RequestError as exc:
        raise bad_request(f"{param}: {exc.problem}", param=param) from None
    except GrammarError as exc:
        raise APIError(400, f"{param}: {exc.problem}", param=param, code="invalid_grammar") from None
    return made
