"""Which JSON schemas a reply can be held to (lcrun.generation.json_schema): what llama-cpp-python's converter would
silently drop is refused by name — each case is first shown to pass through the converter itself without a word (the
negative control: the check is what stops it) — and what it honours passes, pydantic's schemas among them; patterns
are rewritten into the same language over the characters JSON text holds raw."""
from __future__ import annotations

import json
import random
import re
from datetime import datetime
from enum import Enum
from typing import Any, Literal, Optional

import pytest
from llama_cpp.llama_grammar import json_schema_to_gbnf
from pydantic import BaseModel, Field

from lcrun.generation.json_pattern import rewrite_pattern
from lcrun.generation.json_schema import ANY_VALUE, MAX_SCHEMA_NODES, SchemaError, normalise, schema_grammar

# (schema, what the refusal names): every one of these converts without complaint, the keyword ignored
SILENTLY_DROPPED = [
    ({"type": "integer", "minimum": 0}, "'minimum'"),
    ({"type": "number", "exclusiveMaximum": 1.5}, "'exclusiveMaximum'"),
    ({"type": "integer", "multipleOf": 5}, "'multipleOf'"),
    ({"type": "string", "format": "email"}, "format 'email'"),
    ({"type": "string", "format": "uri"}, "format 'uri'"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "'uniqueItems'"),
    ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 3}}, "'contains'"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "minProperties": 1}, "'minProperties'"),
    ({"type": "object", "patternProperties": {"^x": {"type": "string"}}}, "'patternProperties'"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a", "b"]}, "required 'b'"),
    ({"type": "string", "not": {"const": "x"}}, "'not'"),
    ({"type": "string", "anyOf": [{"type": "string"}, {"type": "integer"}]}, "'type' beside anyOf"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "'maxLength' beside pattern"),
    ({"type": "string", "format": "date", "maxLength": 3}, "'maxLength' beside format"),
    ({"type": ["string", "null"], "maxLength": 3}, "'maxLength' beside a list of types"),
    ({"prefixItems": [{"type": "string"}], "items": {"type": "integer"}, "type": "array"}, "items beside prefixItems"),
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}},
                {"type": "object", "properties": {"b": {"type": "integer"}}}]}, "allOf"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A", "maxLength": 2}},
      "$defs": {"A": {"type": "string"}}}, "'maxLength' beside $ref"),
    ({"type": "object", "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}}, "'if'"),
]


@pytest.mark.parametrize(("schema", "named"), SILENTLY_DROPPED, ids=[n for _, n in SILENTLY_DROPPED])
def test_what_the_converter_drops_silently_is_refused_by_name(schema: dict[str, Any], named: str) -> None:
    assert "root ::=" in json_schema_to_gbnf(json.dumps(schema))   # the converter says nothing
    with pytest.raises(SchemaError) as caught:
        normalise(schema, param="response_format")
    assert named in caught.value.problem and caught.value.param == "response_format"


@pytest.mark.parametrize(("schema", "named"), [
    ({"enum": ['a"b']}, "quotes, backslashes"),            # the converter's literal would end inside the value
    ({"type": "object", "properties": {"a\\b": {"type": "string"}}}, "quotes, backslashes"),
    ({"$ref": "https://example.com/schema.json"}, "only references inside the schema"),
    ({"$ref": "#/$defs/missing"}, "does not resolve"),
    ({"type": "string", "pattern": "abc"}, "anchored"),   # JSON Schema patterns are unanchored; the converter asserts
    ({"type": "string", "pattern": "^(?=a)b$"}, "lookarounds"),
    ({"type": "string", "pattern": "^(a)\\1$"}, "backreferences"),
    ({"type": "string", "pattern": "^a$b$"}, "anchors are supported only"),
    ({"type": "string", "pattern": '^"$'}, "admits nothing"),
    ({"type": "string", "maxLength": 5000}, "maxLength: 5000"),
    ({"type": "integer", "enum": ["one"]}, "not of type 'integer'"),
    (False, "admits no value"),
])
def test_what_the_converter_would_get_wrong_is_refused(schema: Any, named: str) -> None:
    with pytest.raises(SchemaError, match=re.escape(named)):
        normalise(schema)


MALFORMED_PATTERNS = [("^*$", "nothing before it"), ("^+$", "nothing before it"), ("^{2}$", "nothing before it"),
                      ("^(+a)$", "nothing before it"), ("^a|*$", "nothing before it"), ("^a)$", "no '(' before it"),
                      ("^(a$", "never closed")]


@pytest.mark.parametrize(("pattern", "named"), MALFORMED_PATTERNS)
def test_a_malformed_pattern_is_refused_not_handed_to_the_converter(pattern: str, named: str) -> None:
    with pytest.raises(SchemaError, match=re.escape(named)):
        schema_grammar({"type": "string", "pattern": pattern})
    if pattern in ("^*$", "^a)$"):   # the control: llama-cpp-python's converter itself fails on them, not with a 400
        with pytest.raises(Exception) as raised:
            json_schema_to_gbnf(json.dumps({"type": "string", "pattern": pattern}))
        assert not isinstance(raised.value, SchemaError)
    assert schema_grammar({"type": "string", "pattern": "^(a)+|b{2}$"}).gbnf   # well-formed ones still compile


def test_a_ref_index_in_other_digits_does_not_resolve() -> None:
    defs = {"$defs": {"a": [{"type": "string"}]}}
    with pytest.raises(SchemaError, match="does not resolve"):
        schema_grammar({**defs, "$ref": "#/$defs/a/\u00b2"})    # '²'.isdigit() is True, int('²') a ValueError
    assert schema_grammar({**defs, "$ref": "#/$defs/a/0"}).gbnf


def test_whatever_the_converter_still_fails_on_is_a_schema_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import lcrun.generation.json_schema as js

    def broken(schema: dict[str, Any]) -> str:
        raise AssertionError("Unbalanced parentheses")

    monkeypatch.setattr(js, "schema_gbnf", broken)
    with pytest.raises(SchemaError, match="converter cannot make a grammar of it .AssertionError"):
        schema_grammar({"type": "string"})


def test_schemas_are_bounded_in_size_and_count() -> None:
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(MAX_SCHEMA_NODES + 1)}}
    with pytest.raises(SchemaError, match="schemas in all"):
        normalise(wide)
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    with pytest.raises(SchemaError, match="nested more than"):
        normalise(deep)
    with pytest.raises(SchemaError, match="bytes; at most"):
        normalise({"type": "string", "description": "x" * (200 << 10)})


class Color(str, Enum):
    RED = "red"
    GREEN = "green"


class Address(BaseModel):
    street: str
    zip: str = Field(pattern=r"^\d{5}$")


class Person(BaseModel):
    name: str = Field(max_length=20, description="annotations pass")
    age: int
    color: Color
    born: datetime
    address: Address
    nickname: Optional[str] = None
    tags: list[str] = Field(max_length=3)
    scores: dict[str, int]
    kind: Literal["a", "b"]


class Tree(BaseModel):
    value: int
    children: list[Tree]


@pytest.mark.parametrize("model", [Person, Tree])
def test_pydantic_schemas_pass_and_compile(model: type[BaseModel]) -> None:
    schema = model.model_json_schema()
    grammar = schema_grammar(schema)
    assert grammar.gbnf.startswith("root ::=") or "\nroot ::=" in grammar.gbnf
    checked = normalise(schema)
    assert "title" not in json.dumps(checked) and "description" not in json.dumps(checked)  # annotations dropped
    assert all(name.startswith("lcrunref") for name in checked.get("$defs", {}))          # refs renamed


def test_an_empty_schema_is_any_value_not_an_object() -> None:
    assert normalise({}) == ANY_VALUE == normalise(True)
    assert normalise({"description": "anything"}) == ANY_VALUE
    assert normalise({"type": "object", "properties": {"x": {}}})["properties"]["x"] == ANY_VALUE


@pytest.mark.parametrize("pattern", [r"^\d{3}-\d{4}$", r"^[a-z.]+@[a-z]+\.com$", r"^(?:ab|c)+?$", r"^\w+\s\W$",
                                     r"^[^x]{2,4}$", r"^a\$b\.c$", r"^.{1,3}$", r"^[\u00e9-\u00ef]+$"])
def test_a_rewritten_pattern_matches_what_the_pattern_matches_in_json_text(pattern: str) -> None:
    rewritten = rewrite_pattern(pattern)
    assert rewritten != pattern or "\\" not in pattern
    rng = random.Random(pattern)
    alphabet = "abcxyz019-.@$ _éêAZ\t\"\\\n"
    tried = 0
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 9)))
        forbidden = any(c in text for c in "\"\\\t\n")
        # JSON Schema's regexes are ECMA-262's (\w, \d ASCII); raw JSON text holds no quote, tab …
        expected = bool(re.fullmatch(pattern, text, re.ASCII)) and not forbidden
        assert bool(re.fullmatch(rewritten, text)) == expected, (pattern, rewritten, text)
        tried += expected
    for sample in ("555-1234", "ab.c@x.com", "abcab", "ab c!", "yyy", "a$b.c", "a b", "éé"):
        tried += bool(re.fullmatch(pattern, sample, re.ASCII))
        assert bool(re.fullmatch(pattern, sample, re.ASCII)) == bool(re.fullmatch(rewritten, sample))
    assert tried  # some strings matched: the comparison was not all refusals
