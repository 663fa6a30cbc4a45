"""A streamed reply split as it arrives: text goes out as content until a call may be starting — the family's trigger
text (held back while it may still be forming, as stop strings are), a `{` opening a Llama 3.x reply, or from the
first character for the generic family, whose every reply is JSON — and from there on it is kept whole, to be parsed
into calls when the reply ends (formats.parse_reply)."""
from __future__ import annotations

from .formats import Family


class CallSplitter:
    def __init__(self, family: Family) -> None:
        self.family = family
        self.in_call = family.always_json
        self.held = ""                    # leading whitespace of a reply that may be a Llama 3.x call
        self.call_text = ""               # the reply from where a call may start
        self._started = False

    def feed(self, text: str) -> str:
        """The content to send now."""
        if self.in_call:
            self.call_text += text
            return ""
        if self.family.at_start and not self._started:
            body = (self.held + text)
            stripped = body.lstrip()
            if not stripped:
                self.held = body
                return ""
            self._started = True
            self.held = ""
            if stripped.startswith(("{", "<|python_tag|>")) or "<|python_tag|>".startswith(stripped):
                self.in_call = True
                self.call_text = body
                return ""
            return body
        trigger = self.family.trigger
        if trigger is None:
            return text
        body = self.held + text
        at = body.find(trigger)
        if at >= 0:
            self.in_call, self.call_text, self.held = True, body[at:], ""
            return body[:at]
        keep = next((n for n in range(min(len(trigger) - 1, len(body)), 0, -1) if trigger.startswith(body[-n:])), 0)
        self.held = body[len(body) - keep:] if keep else ""
        return body[: len(body) - keep]

    def finish(self) -> str:
        """Content still held when the reply ends without a call having started."""
        if self.in_call:
            return ""
        held, self.held = self.held, ""
        return held
