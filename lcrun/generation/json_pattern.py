"""A JSON schema's `pattern`, rewritten for llama-cpp-python's converter so that the grammar it makes holds the
string to the pattern *as JSON text*: the converter copies a pattern's pieces into GBNF, where `\\d`, `\\.` or
`\\w` do not parse, `.` admits a quote, a backslash or a control character (which must be escaped inside a JSON
string, so the reply would not be JSON), and `^`/`$` in the middle become literal characters.

The rewrite: `\\d \\w \\s` (and their negations), `.`, escaped punctuation and `\\xHH`/`\\uHHHH` become character
classes; every class is intersected with the characters a JSON string holds raw (no `"`, no `\\`, nothing below
U+0020 nor U+007F), negated classes by adding those to what they exclude; `(?:` becomes `(`; a lazy quantifier's `?`
goes (the strings matched are the same). Refused, naming them: what no grammar can express (lookarounds,
backreferences, word boundaries), anchors anywhere but at the two ends (the converter needs both there), characters
that raw JSON text cannot hold, repetitions above MAX_REPEAT, and patterns longer than MAX_PATTERN."""
from __future__ import annotations

MAX_PATTERN = 2048
MAX_REPEAT = 1000
_FORBIDDEN = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x7F, 0x7F)]   # what a JSON string cannot hold raw
# ECMA-262's (JSON Schema's regex dialect): \d and \w are ASCII, \s is Unicode's white space
_SHORTHAND = {"d": [(0x30, 0x39)], "w": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
              "s": [(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
                    (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF)]}
_STRUCTURAL = set("()[]{}|*+?")       # characters the converter reads as regex syntax outside a literal
_UNSUPPORTED = {"b": "word boundaries (\\b)", "B": "\\B", "A": "\\A", "Z": "\\Z", "z": "\\z", "G": "\\G",
                "p": "Unicode properties (\\p)", "P": "\\P", "k": "named backreferences", "c": "control escapes"}
_CONTROL_ESCAPES = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B, "0": 0x00}


def rewrite_pattern(pattern: object) -> str:
    if not isinstance(pattern, str):
        raise ValueError("a pattern is a string")
    if len(pattern) > MAX_PATTERN:
        raise ValueError(f"{len(pattern):,} characters; at most {MAX_PATTERN:,}")
    if not (pattern.startswith("^") and pattern.endswith("$")) or pattern.endswith("\\$") or len(pattern) < 2:
        raise ValueError(f"{pattern[:60]!r} must be anchored at both ends (^…$): the grammar matches whole strings")
    return "^" + _Rewrite(pattern[1:-1]).run() + "$"


def _class(ranges: list[tuple[int, int]], negated: bool = False) -> str:
    """A GBNF character class of `ranges` less what raw JSON text cannot hold (or, negated, not those either)."""
    if negated:
        ranges = _merge(ranges + _FORBIDDEN)
        return "[^" + "".join(_span(a, b) for a, b in ranges) + "]"
    kept = _subtract(_merge(ranges), _FORBIDDEN)
    if not kept:
        raise ValueError("a character class admits nothing a JSON string holds without escaping")
    return "[" + "".join(_span(a, b) for a, b in kept) + "]"


def _span(a: int, b: int) -> str:
    esc = (lambda c: f"\\u{c:04X}") if b <= 0xFFFF else (lambda c: f"\\U{c:08X}")
    return esc(a) if a == b else f"{esc(a)}-{esc(b)}"


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _subtract(ranges: list[tuple[int, int]], cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for a, b in ranges:
        pieces = [(a, b)]
        for c, d in cut:
            pieces = [p for x, y in pieces for p in ((x, min(y, c - 1)), (max(x, d + 1), y)) if p[0] <= p[1]]
        out += pieces
    return out


class _Rewrite:
    def __init__(self, body: str) -> None:
        self.s, self.i = body, 0
        self.out: list[str] = []
        self.depth = 0   # groups open

    def run(self) -> str:
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            self.i += 1
            if c == "\\":
                self.out.append(self.escape(in_class=False))
            elif c == "[":
                self.out.append(self.klass())
            elif c == ".":
                self.out.append(_class([(0, 0x10FFFF)]))
            elif c == "(":
                if s.startswith("?:", self.i):
                    self.i += 2
                elif s.startswith("?", self.i):
                    raise ValueError("lookarounds and named groups (?…) are not supported")
                self.out.append("(")
                self.depth += 1
            elif c in "*+?":
                self.quantified(c)
                self.out.append(c)
                self.lazy()
            elif c == "{":
                self.quantified(c)
                self.repeat()
            elif c == ")":
                if not self.depth:
                    raise ValueError("a ')' with no '(' before it")
                self.depth -= 1
                self.out.append(c)
            elif c == "|":
                self.out.append(c)
            elif c in "^$":
                raise ValueError(f"{c!r} inside the pattern: anchors are supported only at its two ends")
            elif c == "]" or c == "}":
                self.out.append(_class([(ord(c), ord(c))]))
            else:
                self.out.append(_class([(ord(c), ord(c))]) if _forbidden(ord(c)) or c in _STRUCTURAL else c)
        if self.depth:
            raise ValueError("a '(' that is never closed")
        return "".join(self.out)

    def quantified(self, c: str) -> None:
        """A quantifier needs something before it to repeat (the converter fails on `^*$`, `(+)`, `a|{2}`)."""
        if not self.out or self.out[-1] in ("(", "|"):
            raise ValueError(f"{c!r} with nothing before it to repeat")

    def lazy(self) -> None:
        if self.s.startswith("?", self.i):
            self.i += 1  # lazy matching picks among the same strings
        elif self.s.startswith("+", self.i):
            raise ValueError("possessive quantifiers are not supported")

    def repeat(self) -> None:
        end = self.s.find("}", self.i)
        body = self.s[self.i:end] if end >= 0 else ""
        parts = body.split(",")
        if end < 0 or len(parts) > 2 or not parts[0].strip().isdigit() or \
                (len(parts) == 2 and parts[1].strip() and not parts[1].strip().isdigit()):
            raise ValueError("a quantifier {…} needs {n}, {n,} or {n,m}")
        if any(p.strip() and int(p) > MAX_REPEAT for p in parts):
            raise ValueError(f"{{{body}}}: repetitions above {MAX_REPEAT} are not supported")
        self.out.append("{" + body.replace(" ", "") + "}")
        self.i = end + 1
        self.lazy()

    def escape(self, *, in_class: bool) -> str | list[tuple[int, int]]:
        """The escape after a backslash: a class (outside a class) or its ranges (inside one)."""
        s = self.s
        if self.i >= len(s):
            raise ValueError("the pattern ends with a backslash")
        c = s[self.i]
        self.i += 1
        if c.lower() in _SHORTHAND:
            ranges = _SHORTHAND[c.lower()]
            if c.isupper():
                if in_class:
                    raise ValueError(f"\\{c} inside a character class is not supported")
                return _class(ranges, negated=True)
            return ranges if in_class else _class(ranges)
        if c in _UNSUPPORTED or c.isdigit() and c != "0":
            raise ValueError(f"{_UNSUPPORTED.get(c, 'backreferences')} are not supported")
        if c in "xu":
            width = 2 if c == "x" else 4
            digits = s[self.i:self.i + width]
            if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise ValueError(f"\\{c} needs {width} hexadecimal digits")
            self.i += width
            code = int(digits, 16)
        elif c in _CONTROL_ESCAPES:
            code = _CONTROL_ESCAPES[c]
        elif c.isalnum():
            raise ValueError(f"the escape \\{c} is not supported")
        else:
            code = ord(c)
        if _forbidden(code):
            raise ValueError(f"U+{code:04X} would have to be escaped in JSON text: not supported in a pattern")
        return [(code, code)] if in_class else _class([(code, code)])

    def klass(self) -> str:
        s = self.s
        negated = s.startswith("^", self.i)
        if negated:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            if self.i >= len(s):
                raise ValueError("a character class is not closed")
            c = s[self.i]
            self.i += 1
            if c == "]" and not first:
                break
            first = False
            if c == "\\":
                got = self.escape(in_class=True)
                assert isinstance(got, list)
                if len(got) > 1 or got[0][0] != got[0][1]:
                    ranges += got
                    continue
                low = got[0][0]
            elif c == "[":
                raise ValueError("nested classes and [:posix:] classes are not supported")
            else:
                low = ord(c)
            if s.startswith("-", self.i) and self.i + 1 < len(s) and s[self.i + 1] != "]":
                self.i += 1
                c2 = s[self.i]
                self.i += 1
                if c2 == "\\":
                    got = self.escape(in_class=True)
                    assert isinstance(got, list)
                    if got[0][0] != got[0][1]:
                        raise ValueError("a range cannot end in a shorthand class")
                    high = got[0][0]
                else:
                    high = ord(c2)
                if high < low:
                    raise ValueError(f"the range {chr(low)}-{chr(high)} runs backwards")
                ranges.append((low, high))
            else:
                ranges.append((low, low))
        if negated:
            return _class(ranges, negated=True)
        if not ranges:
            raise ValueError("an empty character class")
        return _class(ranges)


def _forbidden(code: int) -> bool:
    return any(a <= code <= b for a, b in _FORBIDDEN)
