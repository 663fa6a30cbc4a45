"""Stop strings, matched as the reply streams: an Aho-Corasick automaton over the stop strings' characters advances
one transition per character of new text, so each piece of text costs its own length whatever was held before (no
rescan), and the text held back is exactly the longest tail that may still begin a stop string (at most the longest
stop string, which `records.check_stops` bounds). The reply ends before the first stop string it completes — where two
complete at the same character, before the longer — whatever the token boundaries."""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self._goto: list[dict[str, int]] = [{}]
        self._depth = [0]
        self._ends: list[str | None] = [None]
        for stop in stops:
            state = 0
            for ch in stop:
                nxt = self._goto[state].get(ch)
                if nxt is None:
                    nxt = self._goto[state][ch] = len(self._goto)
                    self._goto.append({})
                    self._depth.append(self._depth[state] + 1)
                    self._ends.append(None)
                state = nxt
            self._ends[state] = stop
        # failure links, breadth first; a state's match is its own stop or, failing that, its failure state's
        self._fail = [0] * len(self._goto)
        queue = deque(self._goto[0].values())
        while queue:
            state = queue.popleft()
            for ch, nxt in self._goto[state].items():
                queue.append(nxt)
                back = self._fail[state]
                while back and ch not in self._goto[back]:
                    back = self._fail[back]
                target = self._goto[back].get(ch, 0)
                self._fail[nxt] = target if target != nxt else 0
                if self._ends[nxt] is None:
                    self._ends[nxt] = self._ends[self._fail[nxt]]
        self._state = 0
        self.held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Take the next text of the reply; return what can be sent now and the stop string completed, if any (then
        what is returned is everything before it, and the matcher is spent)."""
        goto, fail, ends = self._goto, self._fail, self._ends
        state = self._state
        for i, ch in enumerate(text):
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            stop = ends[state]
            if stop is not None:
                whole = self.held + text[: i + 1]
                self.held, self._state = "", 0
                return whole[: len(whole) - len(stop)], stop
        self._state = state
        whole = self.held + text
        keep = self._depth[state]
        self.held = whole[len(whole) - keep:] if keep else ""
        return whole[: len(whole) - keep], None

    def flush(self) -> str:
        """The text held back, at the end of the reply (it began no stop string after all)."""
        held, self.held, self._state = self.held, "", 0
        return held
