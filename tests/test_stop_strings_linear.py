"""Stop strings on the thread every slot shares (issue 20: 6): the longest list a request may give (16 strings of 256
bytes, each a near-miss of the reply) over a long reply costs a constant number of steps per character, not a rescan
of the held text per token. Counted in steps, not timed: the Python lines `StopMatcher.feed` executes (a tracer),
and the held text that each feed joins in C (never more than the longest stop string). A naive matcher that rescans
the held text each token, counted the same way, is the negative control: the counter sees its cost grow."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import CodeType

from lcrun.generation.records import MAX_STOP_BYTES, MAX_STOP_STRINGS, GenerationParams
from lcrun.generation.stops import StopMatcher

# every stop string is the reply's character 255 times, then one it never writes: each is a candidate at every step
STOPS = tuple("a" * (MAX_STOP_BYTES - 1) + chr(ord("b") + i) for i in range(MAX_STOP_STRINGS))


@contextmanager
def lines_run_in(code: CodeType) -> Iterator[list[int]]:
    """Count the lines executed in frames of `code` while the block runs."""
    count = [0]

    def local(frame, event, arg):  # type: ignore[no-untyped-def]
        if event == "line":
            count[0] += 1
        return local

    def calls(frame, event, arg):  # type: ignore[no-untyped-def]
        return local if frame.f_code is code else None

    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        yield count
    finally:
        sys.settrace(previous)


def pieces(n_chars: int) -> list[str]:
    """A reply of `n_chars` "a"s cut as tokens are: 1, 2 or 3 characters each."""
    out, i = [], 0
    while sum(map(len, out)) < n_chars:
        out.append("a" * (1 + i % 3))
        i += 1
    return out


class NaiveMatcher:
    """The control: keeps the whole unsent tail and searches it for every stop string on each token."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops, self.held = stops, ""

    def feed(self, text: str) -> tuple[str, str | None]:
        self.held += text
        for stop in self.stops:                       # a character-by-character search, as Python code does it
            for start in range(len(self.held)):
                if self.held[start:start + len(stop)] == stop:
                    return self.held[:start], stop
        keep = max(len(s) for s in self.stops) - 1
        sent, self.held = self.held[:-keep], self.held[-keep:]
        return sent, None


def cost(make: Callable[[tuple[str, ...]], object], feed_code: CodeType, n_chars: int) -> tuple[int, int]:
    """(lines executed in feed, characters of held text joined) for a reply of `n_chars`."""
    matcher = make(STOPS)
    joined = 0
    with lines_run_in(feed_code) as count:
        for piece in pieces(n_chars):
            joined += len(matcher.held)               # type: ignore[attr-defined]
            text, stop = matcher.feed(piece)          # type: ignore[attr-defined]
            assert stop is None
    return count[0], joined


def test_the_longest_stop_list_over_a_long_reply_costs_steps_linear_in_the_reply() -> None:
    GenerationParams(stop=STOPS).check()              # the most a request may give
    small = cost(StopMatcher, StopMatcher.feed.__code__, 2_000)
    large = cost(StopMatcher, StopMatcher.feed.__code__, 4_000)
    assert 1.9 < large[0] / small[0] < 2.1            # twice the reply, twice the steps
    assert large[0] / 4_000 < 12                      # a few lines a character, whatever the 16 × 256 bytes of stops
    assert large[1] <= len(pieces(4_000)) * (MAX_STOP_BYTES - 1)   # each feed joins at most one stop's length
    # negative control: the rescanning matcher, counted the same way, costs hundreds of steps a character
    naive_small = cost(NaiveMatcher, NaiveMatcher.feed.__code__, 150)
    naive_large = cost(NaiveMatcher, NaiveMatcher.feed.__code__, 300)
    assert naive_large[0] / 300 > 50 * (large[0] / 4_000)
    assert naive_large[0] > 1.9 * naive_small[0]
