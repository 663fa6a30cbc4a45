"""Which JSON schemas a reply can be held to, and the grammar that holds it there.

The grammar comes from llama-cpp-python's maintained converter (`lcrun.engine.grammar.schema_gbnf`), which honours
part of JSON Schema and silently drops the rest: `minimum`, `multipleOf`, most `format`s, `uniqueItems`, `not`,
`patternProperties`, `minProperties`, a `type` beside `anyOf`, `required` names that are not properties, a
`maxLength` beside a `pattern` … (and quotes, backslashes and control characters in property names or enum values
break its literals). A reply generated under such a grammar can violate the schema it was asked for. So every schema
is first walked keyword by keyword as the converter's own dispatch reads it, and whatever it would not honour is
refused by name (`SchemaError`, a 400 at the server). Keywords that only annotate (`title`, `description`,
`examples`, …) pass; what passes is rewritten into the keywords the converter reads: annotations dropped, `$ref`s
resolved (local ones only) and renamed so no rule can shadow another, a one-subschema `allOf` unwrapped, an empty
schema made "any JSON value" (the converter would make it an object), and `pattern`s rewritten over the characters a
JSON string holds raw (`\\d`, `\\w`, `\\s`, `.`, escapes and classes as classes; what a regex may match but raw JSON
text may not hold — quotes, backslashes, control characters — refused).

Bounds: the schema's size, depth and nodes, repetition counts, and (records.check) the grammar's text."""
from __future__ import annotations

import json
from typing import Any

from lcrun.engine.grammar import schema_gbnf
from lcrun.engine.protocol import Grammar

from .json_pattern import rewrite_pattern
from .records import RequestError

MAX_SCHEMA_BYTES = 128 << 10
MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_NODES = 4096
MAX_REPEAT = 1000               # minItems, maxItems, minLength, maxLength, {n,m}: the grammar spells each repetition

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "example", "$schema", "$id", "$comment",
                         "deprecated", "readOnly", "writeOnly", "contentMediaType", "contentEncoding",
                         "discriminator", "nullable", "$anchor"})
PRIMITIVES = ("string", "number", "integer", "boolean", "null", "object", "array")
FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"})
ANY_VALUE: dict[str, Any] = {"type": list(PRIMITIVES[:5]) + ["array", "object"]}
_REF_PREFIX = "lcrunref"


class SchemaError(RequestError):
    """A JSON schema the grammar cannot hold a reply to; `problem` says where in it and what."""

    def __init__(self, param: str, where: str, problem: str) -> None:
        super().__init__(param, f"{where or '#'}: {problem}")


def schema_grammar(schema: Any, *, param: str = "json_schema") -> Grammar:
    """The grammar of replies valid under `schema`; SchemaError naming what cannot be honoured."""
    return Grammar(converted(normalise(schema, param=param), param=param))


def converted(schema: dict[str, Any], *, param: str) -> str:
    """The converter's GBNF for a normalised schema. Whatever the walk let through that the converter still fails on
    (its asserts and index errors on a malformed piece) is the client's schema, not a server error: a SchemaError."""
    try:
        return schema_gbnf(schema)
    except Exception as exc:  # noqa: BLE001 - llama-cpp-python's converter raises whatever its parsing hits
        raise SchemaError(param, "#", f"llama-cpp-python's converter cannot make a grammar of it "
                                      f"({type(exc).__name__}: {str(exc)[:200]})") from None


def normalise(schema: Any, *, param: str = "json_schema", ref_prefix: str = _REF_PREFIX) -> dict[str, Any]:
    """`schema` in the keywords the converter honours (its `$defs` named `ref_prefix` + letters: schemas combined
    into one grammar take a prefix each); SchemaError naming what it would not honour."""
    size = len(json.dumps(schema, ensure_ascii=False).encode("utf-8"))
    if size > MAX_SCHEMA_BYTES:
        raise SchemaError(param, "#", f"{size:,} bytes; at most {MAX_SCHEMA_BYTES:,}")
    return _Walk(schema, param, ref_prefix).run()


def letters(n: int) -> str:
    """0 → "a", 25 → "z", 26 → "ba": names without digits, which the converter's numbered duplicates never make."""
    out = ""
    while True:
        out = "abcdefghijklmnopqrstuvwxyz"[n % 26] + out
        n //= 26
        if n == 0:
            return out


class _Walk:
    def __init__(self, root: Any, param: str, ref_prefix: str = _REF_PREFIX) -> None:
        self.root, self.param, self.ref_prefix = root, param, ref_prefix
        self.nodes = 0
        self.defs: dict[str, Any] = {}           # new name → normalised target
        self.names: dict[str, str] = {}          # original $ref → new name

    def fail(self, where: str, problem: str) -> SchemaError:
        return SchemaError(self.param, where, problem)

    def run(self) -> dict[str, Any]:
        out = self.visit(self.root, "#", 0)
        if "$ref" in out:  # the converter does not look beside a $ref, so a root $ref would hide the $defs
            out = dict(self.defs[out["$ref"].rpartition("/")[2]])
        if self.defs:
            if "$defs" in out:
                raise self.fail("#", "a schema named $defs")
            out = {**out, "$defs": self.defs}
        for name in (out.get("properties") or {}):
            if str(name).replace("_", "-").startswith(_REF_PREFIX):
                raise self.fail(f"#/properties/{name}", f"property names starting {_REF_PREFIX!r} are reserved")
        return out

    # -- one node ---------------------------------------------------------------------------------------------------
    def visit(self, node: Any, where: str, depth: int) -> Any:
        self.nodes += 1
        if self.nodes > MAX_SCHEMA_NODES:
            raise self.fail(where, f"more than {MAX_SCHEMA_NODES:,} schemas in all")
        if depth > MAX_SCHEMA_DEPTH:
            raise self.fail(where, f"nested more than {MAX_SCHEMA_DEPTH} deep")
        if node is True:
            return dict(ANY_VALUE)
        if node is False:
            raise self.fail(where, "the schema `false` admits no value")
        if not isinstance(node, dict):
            raise self.fail(where, f"a schema is an object or a boolean, not {type(node).__name__}")
        keys = set(node) - ANNOTATIONS - {"$defs", "definitions"}
        if "allOf" in keys:
            parts = node["allOf"]
            if not isinstance(parts, list) or len(parts) != 1 or keys != {"allOf"}:
                raise self.fail(where, "allOf is supported with one subschema and nothing beside it")
            return self.visit(parts[0], f"{where}/allOf/0", depth + 1)
        if not keys:
            return dict(ANY_VALUE)
        if "$ref" in keys:
            self.only(node, keys, {"$ref"}, where, "$ref")
            return {"$ref": "#/$defs/" + self.ref(node["$ref"], where, depth)}
        for union in ("anyOf", "oneOf"):
            if union in keys:
                # oneOf as anyOf: a reply valid under one branch; exclusivity is not enforced (as llama-server)
                self.only(node, keys, {union}, where, union)
                branches = node[union]
                if not isinstance(branches, list) or not branches:
                    raise self.fail(where, f"{union} needs a non-empty list of schemas")
                return {"anyOf": [self.visit(b, f"{where}/{union}/{i}", depth + 1) for i, b in enumerate(branches)]}
        kind = node.get("type")
        if isinstance(kind, list):
            self.only(node, keys, {"type"}, where, "a list of types")
            if not kind or any(k not in PRIMITIVES for k in kind):
                raise self.fail(where, f"type: {kind!r} (each one of {', '.join(PRIMITIVES)})")
            return {"type": list(dict.fromkeys(kind))}
        if kind is not None and kind not in PRIMITIVES:
            raise self.fail(where, f"type: {kind!r} is not a JSON Schema type")
        if "const" in keys or "enum" in keys:
            return self.constant(node, keys, where)
        if kind in (None, "object") and keys & {"properties", "additionalProperties", "required"}:
            return self.object(node, keys, where, depth)
        if kind in (None, "array") and keys & {"items", "prefixItems", "minItems", "maxItems"}:
            return self.array(node, keys, where, depth)
        if kind in (None, "string") and "pattern" in keys:
            self.only(node, keys, {"type", "pattern"}, where, "pattern")
            try:
                pattern = rewrite_pattern(node["pattern"])
            except ValueError as exc:
                raise self.fail(f"{where}/pattern", str(exc)) from None
            return {"type": "string", "pattern": pattern}
        if kind in (None, "string") and "format" in keys:
            self.only(node, keys, {"type", "format"}, where, "format")
            if node["format"] not in FORMATS:
                raise self.fail(where, f"format {node['format']!r} is not supported (supported: "
                                       f"{', '.join(sorted(FORMATS - {'uuid1', 'uuid2', 'uuid3', 'uuid5'}))})")
            return {"type": "string", "format": node["format"]}
        if kind == "string" and keys & {"minLength", "maxLength"}:
            self.only(node, keys, {"type", "minLength", "maxLength"}, where, "a string's length")
            low, high = self.bounds(node, "minLength", "maxLength", where)
            return {"type": "string", "minLength": low, **({"maxLength": high} if high is not None else {})}
        if kind is None:
            raise self.fail(where, f"{sorted(keys)[0]!r} without a type it applies to is not supported")
        self.only(node, keys, {"type"}, where, f"type {kind!r}")
        return {"type": kind}

    def only(self, node: dict[str, Any], keys: set[str], allowed: set[str], where: str, what: str) -> None:
        extra = sorted(keys - allowed)
        if extra:
            raise self.fail(where, f"{', '.join(repr(k) for k in extra)} beside {what} is not supported "
                                   "(the grammar would not hold the reply to it)")

    def bounds(self, node: dict[str, Any], low_key: str, high_key: str, where: str) -> tuple[int, int | None]:
        low, high = node.get(low_key, 0), node.get(high_key)
        for key, value in ((low_key, low), (high_key, high)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not
                                      0 <= value <= MAX_REPEAT):
                raise self.fail(where, f"{key}: {value!r} (a whole number, 0 to {MAX_REPEAT})")
        if high is not None and high < low:
            raise self.fail(where, f"{high_key} {high} is below {low_key} {low}")
        return low, high

    # -- kinds ------------------------------------------------------------------------------------------------------
    def constant(self, node: dict[str, Any], keys: set[str], where: str) -> dict[str, Any]:
        self.only(node, keys, {"type", "const", "enum"}, where, "const/enum")
        if "const" in keys and "enum" in keys:
            raise self.fail(where, "const beside enum is not supported")
        values = [node["const"]] if "const" in keys else node["enum"]
        if not isinstance(values, list) or not values:
            raise self.fail(where, "enum needs a non-empty list")
        kind = node.get("type")
        for value in values:
            self.literal(value, where)
            if kind is not None and not _is_type(value, kind):
                raise self.fail(where, f"{value!r} is not of type {kind!r}")
        return {"const": values[0]} if "const" in keys else {"enum": list(values)}

    def literal(self, value: Any, where: str) -> None:
        """A value the converter spells as a literal: its strings must survive that (json.dumps, then GBNF)."""
        if isinstance(value, str):
            bad = next((c for c in value if c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F or ord(c) > 0xFFFF), None)
            if bad is not None:
                raise self.fail(where, f"{value[:40]!r}: quotes, backslashes, control characters and characters "
                                       "beyond U+FFFF in property names and constants are not supported")
        elif isinstance(value, list):
            for item in value:
                self.literal(item, where)
        elif isinstance(value, dict):
            for key, item in value.items():
                self.literal(key, where)
                self.literal(item, where)

    def object(self, node: dict[str, Any], keys: set[str], where: str, depth: int) -> dict[str, Any]:
        self.only(node, keys, {"type", "properties", "required", "additionalProperties"}, where, "an object")
        properties = node.get("properties", {})
        if not isinstance(properties, dict):
            raise self.fail(where, "properties must be an object")
        required = node.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise self.fail(where, "required must be a list of names")
        missing = [r for r in required if r not in properties]
        if missing:
            raise self.fail(where, f"required {missing[0]!r} is not among the properties (only listed properties "
                                   "can be required)")
        out: dict[str, Any] = {"type": "object", "properties": {}}
        for name, sub in properties.items():
            self.literal(name, f"{where}/properties")
            out["properties"][name] = self.visit(sub, f"{where}/properties/{name}", depth + 1)
        if required:
            out["required"] = list(dict.fromkeys(required))
        # unsaid, extra properties are allowed; where properties are listed the converter writes none (valid too)
        extra = node.get("additionalProperties", False if "properties" in node else True)
        if extra is True:
            extra = {}
        if isinstance(extra, dict):
            extra = self.visit(extra, f"{where}/additionalProperties", depth + 1)
        elif extra is not False:
            raise self.fail(where, "additionalProperties must be a boolean or a schema")
        if extra is False and not properties:
            out = {"type": "object", "additionalProperties": False}
        elif extra is not False:
            out["additionalProperties"] = extra
        return out

    def array(self, node: dict[str, Any], keys: set[str], where: str, depth: int) -> dict[str, Any]:
        self.only(node, keys, {"type", "items", "prefixItems", "minItems", "maxItems"}, where, "an array")
        low, high = self.bounds(node, "minItems", "maxItems", where)
        items, prefix = node.get("items", True), node.get("prefixItems")
        if isinstance(items, list):  # the older tuple form
            prefix, items = items, False
        if prefix is not None:
            if not isinstance(prefix, list):
                raise self.fail(where, "prefixItems must be a list of schemas")
            if items is not False:
                raise self.fail(where, "items beside prefixItems is supported only as false (a fixed tuple)")
            if low > len(prefix) or (high is not None and high < len(prefix)):
                raise self.fail(where, f"minItems/maxItems exclude the tuple's own {len(prefix)} items")
            return {"type": "array", "prefixItems": [self.visit(s, f"{where}/prefixItems/{i}", depth + 1)
                                                     for i, s in enumerate(prefix)]}
        if items is False:
            raise self.fail(where, "items: false (only an empty array) is not supported")
        out: dict[str, Any] = {"type": "array", "items": self.visit(items, f"{where}/items", depth + 1),
                               "minItems": low}
        if high is not None:
            out["maxItems"] = high
        return out

    # -- references -------------------------------------------------------------------------------------------------
    def ref(self, ref: Any, where: str, depth: int) -> str:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise self.fail(where, f"$ref {ref!r}: only references inside the schema (#/…) are supported")
        name = self.names.get(ref)
        if name is None:
            target: Any = self.root
            for part in ref[2:].split("/") if ref != "#" else []:
                part = part.replace("~1", "/").replace("~0", "~")
                if isinstance(target, dict) and part in target:
                    target = target[part]
                elif isinstance(target, list) and part.isascii() and part.isdigit() and int(part) < len(target):
                    target = target[int(part)]
                else:
                    raise self.fail(where, f"$ref {ref!r} does not resolve")
            name = self.names[ref] = self.ref_prefix + letters(len(self.names))
            self.defs[name] = {}  # taken before visiting: a recursive reference finds it
            self.defs[name] = self.visit(target, ref, depth + 1)
        return name


def _is_type(value: Any, kind: str) -> bool:
    return {"string": isinstance(value, str), "boolean": isinstance(value, bool), "null": value is None,
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, (int, float)) and not isinstance(value, bool),
            "object": isinstance(value, dict), "array": isinstance(value, list)}[kind]
