"""The slash commands of the interactive chat: parsing and their one-line descriptions (the REPL dispatches)."""
from __future__ import annotations

COMMANDS: dict[str, tuple[str, str]] = {
    "help": ("", "this list"),
    "clear": ("", "forget the turns and documents (the system prompt stays)"),
    "system": ("TEXT", "set the system prompt (empty: remove it)"),
    "add": ("PATH", "add a document (a file, PDF, Word, HTML, a folder, a URL): its size in tokens and whether it "
                    "fits, then its prefill"),
    "docs": ("", "the documents, numbered, with the tokens each takes"),
    "drop": ("N", "take document N out (what followed it is prefilled again)"),
    "ctx": ("", "where the context window goes: system, documents, turns, free"),
    "stats": ("", "speed and token counts of the last turn and the session"),
    "save": ("PATH", "save the conversation as JSON"),
    "load": ("PATH", "replace the conversation with a saved one"),
    "retry": ("", "answer the last question again"),
    "quit": ("", "leave (Ctrl-D does the same)"),
}
ALIASES = {"exit": "quit", "q": "quit", "h": "help", "?": "help", "reset": "clear", "file": "add"}


class UnknownCommand(ValueError):
    pass


def parse_command(line: str) -> tuple[str, str] | None:
    """("name", "argument") for a /command line, None for an ordinary message. Unknown names raise."""
    stripped = line.strip()
    if not stripped.startswith("/") or stripped.startswith("//"):
        return None
    name, _, arg = stripped[1:].partition(" ")
    name = ALIASES.get(name.lower(), name.lower())
    if name not in COMMANDS:
        raise UnknownCommand(f"/{name}: no such command (/help lists them; start with // to send a literal '/')")
    return name, arg.strip()


def literal_message(line: str) -> str:
    """`//text` sends "/text"."""
    stripped = line.lstrip()
    return stripped[1:] if stripped.startswith("//") else line


def join_continued(lines: list[str]) -> tuple[str, bool]:
    """Multi-line input: a line ending in a backslash continues; a line of \"\"\" opens and closes a block.
    Returns (text so far, complete?)."""
    if lines and lines[0].strip() == '"""':
        if len(lines) > 1 and lines[-1].strip() == '"""':
            return "\n".join(lines[1:-1]), True
        return "\n".join(lines[1:]), False
    if lines and lines[-1].endswith("\\"):
        return "\n".join(line[:-1] if line.endswith("\\") else line for line in lines), False
    return "\n".join(line[:-1] if line.endswith("\\") else line for line in lines), True
