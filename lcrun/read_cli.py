"""`lcrun read`: documents as they will enter a model's context — the text itself, or (--json) what each is: kind,
pages or files, characters and, given --model, tokens counted by that model's own tokenizer."""
from __future__ import annotations

import json
import sys

import click

_EPILOG = """\b
Examples:
  lcrun read paper.pdf | less                      # the text the model will see, page markers included
  lcrun read ./src --include '*.py' --json         # a source tree: files read, skipped, characters
  lcrun read notes.md https://example.com/post --json --model Llama-3.1-8B-Instruct-Q4_K_M.gguf
  curl -s https://example.com/a.pdf | lcrun read -
"""


@click.command(epilog=_EPILOG)
@click.argument("sources", nargs=-1, required=True, metavar="FILE|DIR|URL|-...")
@click.option("--json", "as_json", is_flag=True,
              help="Print what each document is (kind, pages or files, characters, skipped, warnings; tokens with "
                   "--model) as JSON instead of its text.")
@click.option("-m", "--model", metavar="MODEL",
              help="Count tokens with this model's tokenizer: a GGUF file (or a checkpoint folder, a profile, a Hub "
                   "repo id: its tokenizer alone is read).")
@click.option("--include", multiple=True, metavar="GLOB",
              help="In folders, read only files matching GLOB (gitignore syntax, repeatable), e.g. '*.py' or 'docs/**'.")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="In folders, leave out files matching GLOB (gitignore syntax, repeatable), e.g. 'tests/**'.")
@click.option("--max-files", type=click.IntRange(1), metavar="N",
              help="Read at most N files from one folder (default 20,000).")
def read(sources: tuple[str, ...], as_json: bool, model: str | None, include: tuple[str, ...],
         exclude: tuple[str, ...], max_files: int | None) -> None:
    """Read FILE|DIR|URL|- (text, Markdown, source, PDF, HTML, DOCX, EPUB, a folder or git checkout, an http(s) URL,
    standard input) and print the text exactly as it will enter the context."""
    from dataclasses import replace

    from .documents import ReadLimits, read_documents

    limits = ReadLimits() if max_files is None else replace(ReadLimits(), max_files=max_files)
    documents = read_documents(list(sources), limits, include=include, exclude=exclude)
    tokens: list[int | None] = [None] * len(documents)
    if model is not None:
        from .documents.tokens import document_tokens
        from .model_vocab import open_vocabulary

        with open_vocabulary(model) as vocabulary:
            tokens = list(document_tokens(documents, vocabulary))
    if as_json:
        out = {"documents": [d.to_dict(n) for d, n in zip(documents, tokens)],
               "characters": sum(d.characters for d in documents)}
        if model is not None:
            out["model"] = model
            out["tokens"] = sum(n or 0 for n in tokens)
        click.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return
    for i, document in enumerate(documents):
        if i:
            sys.stdout.write("\n\n")
        sys.stdout.write(document.context_text())
    sys.stdout.write("\n")
    for document, n in zip(documents, tokens):
        click.echo(_summary(document, n), err=True)
        for warning in document.warnings:
            click.echo(f"warning: {document.name}: {warning}", err=True)


def _summary(document: object, tokens: int | None) -> str:
    from .documents import Document

    assert isinstance(document, Document)
    parts = [document.about(), f"{document.characters:,} characters"]
    if tokens is not None:
        parts.append(f"{tokens:,} tokens")
    skipped = ", ".join(f"{n:,} {why}" for why, n in document.skipped.items())
    return f"read {document.name}: {', '.join(parts)}" + (f" (skipped: {skipped})" if skipped else "")
