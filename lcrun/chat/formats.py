"""Which chat format a model is prompted in, and why — decided the way a llama.cpp user expects of a downloaded file:

1. what the user asked for: `--chat-template NAME` (one of llama.cpp's built-in formats), `--chat-template FILE`
   (a Jinja template), or `--raw` (no format: the prompt is continued as plain text, for base models);
2. the GGUF's own `tokenizer.chat_template`, rendered by the sandboxed Jinja renderer (template.py);
3. a file without one: the built-in format its vocabulary's special tokens belong to (Llama 3 headers, ChatML
   `<|im_start|>`, Gemma `<start_of_turn>`, Mistral `[INST]`, Phi-3 `<|user|>`, …);
4. otherwise ChatML, llama.cpp's default.

Built-in formats are rendered by llama.cpp's own `llama_chat_apply_template` (lcrun.engine.chat_format). The choice
needs only lookups in the vocabulary, so it is made from the GGUF header before the model loads (the plan panel and
--dry-run say it) and the same way from a loaded engine."""
from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .template import ChatRenderer, ChatTemplate, TemplateError, compile_template, with_bos


@dataclass(frozen=True)
class FormatChoice:
    kind: str                  # "jinja" | "builtin" | "raw"
    name: str                  # the built-in format's name, the template's name ("file template", a file), "none"
    why: str
    source: str | None = None  # the Jinja source (kind "jinja")

    @property
    def key(self) -> str:
        """What identifies the prompts this format makes (niah results compare only under the same key): a template
        of the user's by its content, the file's own by the name (the model file identifies it)."""
        if self.kind == "raw":
            return self.kind
        if self.kind == "jinja" and self.name != FILE_TEMPLATE and self.source is not None:
            return f"jinja:{self.name}@{hashlib.sha256(self.source.encode('utf-8')).hexdigest()[:12]}"
        return f"{self.kind}:{self.name}"

    @property
    def what(self) -> str:
        return {"jinja": f"{self.name} (Jinja, sandboxed)", "builtin": f"{self.name} (llama.cpp built-in)",
                "raw": "none"}[self.kind]

    def describe(self) -> str:
        return f"{self.what} · {self.why}"


FILE_TEMPLATE = "file template"
RAW = FormatChoice("raw", "none", "--raw: the prompt is continued as plain text")


@dataclass(frozen=True)
class FormatRule:
    """A vocabulary whose special tokens include all of `tokens` is prompted in the built-in format `name`."""
    name: str
    tokens: tuple[str, ...]
    family: str


# Most specific first: Phi-4 also has <|im_start|>, Mistral v7 also has [INST].
FORMAT_RULES = (
    FormatRule("llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "Llama 3"),
    FormatRule("llama4", ("<|header_start|>", "<|header_end|>", "<|eot|>"), "Llama 4"),
    FormatRule("phi4", ("<|im_start|>", "<|im_sep|>", "<|im_end|>"), "Phi-4"),
    FormatRule("chatml", ("<|im_start|>", "<|im_end|>"), "ChatML"),
    FormatRule("gemma", ("<start_of_turn>", "<end_of_turn>"), "Gemma"),
    FormatRule("mistral-v7", ("[INST]", "[/INST]", "[SYSTEM_PROMPT]"), "Mistral v7"),
    FormatRule("mistral-v3", ("[INST]", "[/INST]"), "Mistral"),
    FormatRule("phi3", ("<|user|>", "<|assistant|>", "<|end|>"), "Phi-3"),
    FormatRule("command-r", ("<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>"), "Command R"),
    FormatRule("deepseek3", ("<｜User｜>", "<｜Assistant｜>"), "DeepSeek V3"),
    FormatRule("granite", ("<|start_of_role|>", "<|end_of_role|>"), "Granite"),
)
TEKKEN_VARIANTS = {"mistral-v3", "mistral-v7"}   # with a BPE (Tekken) vocabulary: the "-tekken" built-in


@dataclass(frozen=True)
class Vocabulary:
    """What the choice reads: the file's template, whether a text is one of the vocabulary's special tokens
    (control or user-defined), and the tokenizer model ("gpt2" for BPE, "llama" for SentencePiece)."""
    chat_template: str | None
    is_special: Callable[[str], bool]
    tokenizer_model: str | None = None


def header_vocabulary(meta: Any) -> Vocabulary:
    """From a GGUF header (lcrun.gguf_reader.GGUFHeader): lookups in the token list, nothing decoded whole."""
    from gguf import TokenType

    types = meta.get("tokenizer.ggml.token_type")
    special_types = {int(TokenType.CONTROL), int(TokenType.USER_DEFINED)}

    def is_special(text: str) -> bool:
        token = meta.token_id(text)
        if token is None:
            return False
        return types is None or not 0 <= token < len(types) or int(types[token]) in special_types

    model = meta.get("tokenizer.ggml.model")
    return Vocabulary(meta.chat_template, is_special, model if isinstance(model, str) else None)


def engine_vocabulary(engine: Any) -> Vocabulary:
    """From a loaded engine: a special token is a text its tokenizer turns into that one token."""

    def is_special(text: str) -> bool:
        tokens = engine.tokenize(text)
        return len(tokens) == 1 and engine.token_text(tokens[0]) == text

    return Vocabulary(engine.chat_template or None, is_special, engine.metadata.get("tokenizer.ggml.model"))


def choose_format(vocab: Vocabulary, requested: FormatChoice | None = None) -> FormatChoice:
    if requested is not None:
        return requested
    if vocab.chat_template:
        try:
            compile_template(vocab.chat_template)
        except TemplateError as exc:
            raise TemplateError("chat template", f"the model file's template is {exc.problem}; choose a format with "
                                                 "--chat-template NAME (--chat-template list shows them)") from None
        return FormatChoice("jinja", FILE_TEMPLATE, "the GGUF's tokenizer.chat_template", vocab.chat_template)
    for rule in FORMAT_RULES:
        if all(vocab.is_special(token) for token in rule.tokens):
            name = rule.name
            if name in TEKKEN_VARIANTS and vocab.tokenizer_model == "gpt2":
                name += "-tekken"
            return FormatChoice("builtin", name, f"the file has no chat template; its vocabulary has {rule.family}'s "
                                                 + " ".join(rule.tokens))
    return FormatChoice("builtin", "chatml", "the file has no chat template and its vocabulary no chat tokens: "
                                             "llama.cpp's default (for a base model, --raw continues plain text)")


def requested_format(value: str, *, file_only: bool = False) -> FormatChoice:
    """What `--chat-template VALUE` asks for: a built-in name, a Jinja file, or a Jinja template inline
    (`file_only`: a file, as --chat-template-file)."""
    from lcrun.engine.chat_format import builtin_formats

    names = builtin_formats()
    flag = "--chat-template-file" if file_only else "--chat-template"
    if value in names and not file_only:
        return FormatChoice("builtin", value, f"{flag} {value}")
    path = Path(value).expanduser()
    if path.is_dir():
        raise TemplateError(value, "a folder, not a chat template file")
    if path.is_file():
        try:
            source = path.read_bytes().decode("utf-8")
        except OSError as exc:
            raise TemplateError(value, f"cannot be read ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise TemplateError(value, "not a Jinja chat template (not UTF-8 text)") from None
        if not source.strip():
            raise TemplateError(value, "empty: no chat template in it")
        _check_jinja(value, source)
        return FormatChoice("jinja", path.name, f"{flag} {value}", source)
    if file_only:
        raise TemplateError(value, "no such file")
    if "{{" in value or "{%" in value:
        _check_jinja("--chat-template", value)
        return FormatChoice("jinja", "inline template", "--chat-template (a Jinja template given inline)", value)
    close = difflib.get_close_matches(value, names, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise TemplateError(value, f"neither one of llama.cpp's built-in chat formats nor a template file ({hint}"
                               "--chat-template list shows the formats)")


def _check_jinja(subject: str, source: str) -> None:
    try:
        compile_template(source)
    except TemplateError as exc:
        raise TemplateError(subject, exc.problem) from None


@dataclass(frozen=True)
class BuiltinFormat:
    """A llama.cpp built-in format, rendered by llama.cpp."""
    name: str
    bos_token: str = ""
    add_bos: bool = False

    @property
    def source(self) -> str:
        return self.name

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None) -> str:
        from lcrun.engine.chat_format import ChatFormatError, apply_builtin_format

        try:
            text = apply_builtin_format(self.name, messages, add_generation_prompt=add_generation_prompt)
        except ChatFormatError as exc:
            raise TemplateError("chat template", str(exc)) from None
        return with_bos(text, self.bos_token, self.add_bos)


@dataclass(frozen=True)
class RawFormat:
    """No chat format: the messages' text, blank lines between them, as a plain-text prompt to continue."""
    bos_token: str = ""
    add_bos: bool = False
    source: str = ""

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None) -> str:
        return with_bos("\n\n".join(m["content"] for m in messages), self.bos_token, self.add_bos)


def renderer_for(choice: FormatChoice, *, bos_token: str = "", eos_token: str = "",
                 add_bos: bool = False) -> ChatRenderer:
    if choice.kind == "jinja":
        assert choice.source is not None
        return ChatTemplate(choice.source, bos_token, eos_token, add_bos)
    if choice.kind == "builtin":
        return BuiltinFormat(choice.name, bos_token, add_bos)
    return RawFormat(bos_token, add_bos)


def engine_renderer(engine: Any, choice: FormatChoice | None = None) -> ChatRenderer:
    """The renderer for a loaded engine: `choice` (default: chosen from the engine's vocabulary), with the BOS token
    its vocabulary adds."""
    choice = choice or choose_format(engine_vocabulary(engine))
    special = engine.special_tokens()
    bos = engine.token_text(special["bos"]) if "bos" in special else ""
    eos = engine.token_text(special["eos"]) if "eos" in special else ""
    return renderer_for(choice, bos_token=bos, eos_token=eos, add_bos=bool(engine.add_bos))
