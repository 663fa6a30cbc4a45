"""How deep a JSON text nests, counted before it is parsed: Python's json module recurses once per level, so a
client's `[[[[…` would reach the recursion limit (a RecursionError, not a ValueError) — bounded first, wherever
client JSON is parsed (a request body, a tool call's arguments)."""
from __future__ import annotations

import re

MAX_JSON_DEPTH = 64      # OpenAI's requests nest about 6 deep (tools' JSON schemas more): far below Python's limit
_JSON_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def json_depth(raw: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest, counted before parsing (the parser recurses once per
    level): brackets inside strings do not count. Linear, in C but for one step per bracket."""
    brackets = _JSON_STRINGS.sub(b"", raw).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for step in map(_DEPTH_STEP.__getitem__, brackets):
        depth += step
        deepest = max(deepest, depth)
    return deepest
