"""llama.cpp's built-in chat formats (llama-chat.cpp: chatml, llama3, gemma, mistral-v3, phi3, … about 50), through
llama_cpp's low-level bindings: their names (`llama_chat_builtin_templates`) and a conversation rendered in one of
them (`llama_chat_apply_template`). These are the formats llama-server uses without --jinja; lcrun renders them with
llama.cpp's own code rather than copies of it. None of them writes BOS: the caller adds it where the vocabulary asks."""
from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from functools import cache

from lcrun.errors import LcrunError


class ChatFormatError(LcrunError):
    """llama.cpp refused to render a conversation in a named format."""


@cache
def builtin_formats() -> tuple[str, ...]:
    """The names llama.cpp knows, in its own (alphabetical) order."""
    import llama_cpp

    count = llama_cpp.llama_chat_builtin_templates(None, 0)
    names = (ctypes.c_char_p * count)()
    llama_cpp.llama_chat_builtin_templates(names, count)
    return tuple(name.decode("utf-8") for name in names if name)


def apply_builtin_format(name: str, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool) -> str:
    """`messages` ({"role", "content"}) as llama.cpp formats them in the built-in format `name`."""
    import llama_cpp

    # C strings end at NUL: a NUL inside a message would cut it short without a word
    encoded = [(m["role"].encode("utf-8"), m["content"].replace("\0", "").encode("utf-8")) for m in messages]
    chat = (llama_cpp.llama_chat_message * len(encoded))(*(llama_cpp.llama_chat_message(r, c) for r, c in encoded))
    size = 2 * sum(len(r) + len(c) for r, c in encoded) + 256  # llama.cpp's advice: twice the characters
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(name.encode("utf-8"), chat, len(encoded), add_generation_prompt,
                                                buf, size)
        if n < 0:
            raise ChatFormatError(name, "llama.cpp does not know this chat format (see --chat-template list)")
        if n < size:  # llama.cpp copies with strncpy: the text is whole only when there was room for its NUL too
            return buf.raw[:n].decode("utf-8", errors="replace")
        size = n + 1
