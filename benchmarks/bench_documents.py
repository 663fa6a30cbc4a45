"""Reading documents: PDF extraction against poppler's pdftotext, a 20,000-file source tree against
`git ls-files | xargs cat | wc -c`, and the cost of counting tokens with a 128K-token vocabulary.

    .venv/bin/python benchmarks/bench_documents.py [--rounds 5] [--pdf PATH] [--json bench-work/documents.json]

Needs pdftotext and pdfunite (Debian's poppler-utils) and git. Builds into bench-work/documents/ (once):
- a 320-page two-column PDF typeset by reportlab's frame engine (justified Times, TeX's way of flowing columns);
- where a pdfTeX PDF is given (--pdf) or found (Debian's libtasn1 manual), that PDF joined with itself by pdfunite to
  at least 300 pages: a real TeX document (Type 1 fonts, ligatures, hyphenation);
- a source tree of at least 20,000 files: this Python's standard library copied over and over, committed to git.

Then, in interleaved rounds (medians reported, every run kept in the JSON):
- `pdftotext F out.txt` (a process) against lcrun's reader in this process and `lcrun read F` (a process, start-up
  included): pages per second; and the words each finds (multiset overlap with pdftotext's: recall and precision);
  goal (issue 17): >= 0.5x pdftotext's speed with the same words;
- `git ls-files -z | xargs -0 cat | wc -c` against lcrun's folder reader (walk, .gitignore, binary sniffing, UTF-8
  decoding, the text assembled) on the tree; goal: <= 2x git's time;
- loading the 128K vocabulary alone (vocab_only) and tokenizing the PDF's text with it;
- `lcrun chat MODEL -f BIG.pdf -p …` from the command to llama.cpp's first prefill batch, MODEL a GGUF with Llama 3's
  128K vocabulary and a 1M-token trained context (tiny weights: what is timed is lcrun's own path — reading the PDF,
  counting it with the vocabulary alone, sizing the context, loading, tokenizing the prompt — not the model's
  compute), against the same command without the document and `lcrun read BIG.pdf` (processes, interleaved).
  `--chat-only` runs this part alone.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lcrun.documents import ReadLimits, read_document  # noqa: E402
from tests.fixtures.realistic_gguf import write_realistic_gguf  # noqa: E402

WORK = ROOT / "bench-work" / "documents"
TEX_PDFS = [Path("/usr/share/doc/libtasn1-doc/libtasn1.pdf")]
TREE_FILES = 20_000
WORDS = ("the of and to in is that for it as with was on be by this are or from at which an have not but can all "
         "were when there their one been has more will would what so if about into than them these some could "
         "other then its only also after first two over such where most through between under while because").split()


def build_columns_pdf(path: Path, pages: int) -> Path:
    from reportlab.lib.enums import TA_JUSTIFY
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.platypus import BaseDocTemplate, Frame, PageTemplate, Paragraph

    import random

    rng = random.Random(17)
    width, height = A4
    frames = [Frame(50, 60, width / 2 - 60, height - 120), Frame(width / 2 + 10, 60, width / 2 - 60, height - 120)]
    doc = BaseDocTemplate(str(path), pagesize=A4, pageTemplates=[PageTemplate(frames=frames)])
    style = ParagraphStyle("body", fontName="Times-Roman", fontSize=10, leading=12, alignment=TA_JUSTIFY)
    story = []
    # ~ 2 x 55 lines of ~ 9 words per page
    for i in range(pages * 11):
        words = [rng.choice(WORDS) if rng.random() < 0.6 else f"w{rng.randrange(100000)}" for _ in range(90)]
        story.append(Paragraph(f"{i}. " + " ".join(words) + ".", style))
    doc.build(story)
    n = read_document(str(path), replace(ReadLimits(), seconds=600)).pages
    if n is None or n < pages:  # more paragraphs until the page count is reached
        return build_columns_pdf(path, pages + (pages - (n or 0)) + 5)
    return path


def join_pdf(source: Path, path: Path, at_least: int) -> Path:
    pages = read_document(str(source)).pages or 1
    copies = -(-at_least // pages)
    subprocess.run(["pdfunite", *([str(source)] * copies), str(path)], check=True)
    return path


def build_tree(root: Path) -> int:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if (root / ".git").is_dir():
        return int((root / ".count").read_text())
    root.mkdir(parents=True, exist_ok=True)
    count, copy = 0, 0
    while count < TREE_FILES:
        for path in stdlib.rglob("*"):
            rel = path.relative_to(stdlib)
            if not path.is_file() or path.is_symlink() or any(p in ("__pycache__", "site-packages", "dist-packages")
                                                               for p in rel.parts):
                continue
            target = root / f"copy{copy}" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            count += 1
        copy += 1
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_SYSTEM": os.devnull}
    subprocess.run(["git", "init", "-q"], cwd=root, check=True, env=env)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True, env=env)
    (root / ".count").write_text(str(count))
    return count


def words(text: str) -> Counter[str]:
    return Counter(re.findall(r"\w+", text.lower()))


def overlap(ours: str, reference: str) -> dict[str, float]:
    a, b = words(ours), words(reference)
    common = sum((a & b).values())
    return {"recall": common / max(1, sum(b.values())), "precision": common / max(1, sum(a.values()))}


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_pdf(path: Path, rounds: int, out: Path) -> dict:
    limits = replace(ReadLimits(), seconds=600)
    pages = read_document(str(path), limits).pages or 0
    lcrun = [sys.executable, "-m", "lcrun.cli", "read", str(path)]
    runs: dict[str, list[float]] = {"pdftotext": [], "lcrun reader": [], "lcrun read (process)": []}
    for _ in range(rounds):
        runs["pdftotext"].append(timed(lambda: subprocess.run(["pdftotext", str(path), str(out)], check=True)))
        runs["lcrun reader"].append(timed(lambda: read_document(str(path), limits)))
        runs["lcrun read (process)"].append(timed(lambda: subprocess.run(lcrun, check=True, stdout=subprocess.DEVNULL,
                                                                          stderr=subprocess.DEVNULL, cwd=ROOT)))
    ours = read_document(str(path), limits).text
    reference = out.read_text(encoding="utf-8", errors="replace")
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"pdf": str(path), "pages": pages, "runs": runs, "median_s": med,
            "pages_per_s": {k: pages / v for k, v in med.items()},
            "speed_vs_pdftotext": {k: med["pdftotext"] / v for k, v in med.items() if k != "pdftotext"},
            "words": overlap(ours, reference)}


def bench_tree(root: Path, rounds: int) -> dict:
    limits = replace(ReadLimits(), max_files=1_000_000, max_chars=4 << 30, seconds=600)
    git = "git ls-files -z | xargs -0 cat | wc -c"
    runs: dict[str, list[float]] = {"git ls-files | xargs cat | wc -c": [], "lcrun folder reader": []}
    read_document(str(root), limits)  # the page cache warm for both
    for _ in range(rounds):
        runs["git ls-files | xargs cat | wc -c"].append(
            timed(lambda: subprocess.run(git, shell=True, cwd=root, check=True, capture_output=True)))
        runs["lcrun folder reader"].append(timed(lambda: read_document(str(root), limits)))
    doc = read_document(str(root), limits)
    tracked = len(subprocess.run(["git", "ls-files"], cwd=root, check=True, capture_output=True,
                                 text=True).stdout.splitlines())
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"tree": str(root), "git_files": tracked, "files_read": doc.files, "skipped": doc.skipped,
            "bytes": doc.source_bytes, "runs": runs, "median_s": med,
            "time_vs_git": med["lcrun folder reader"] / med["git ls-files | xargs cat | wc -c"]}


def bench_tokens(text: str, rounds: int) -> dict:
    from lcrun.engine.vocab import VocabularyFile

    path = WORK / "llama3-vocab.gguf"
    if not path.exists():
        write_realistic_gguf(path, "llama3")
    loads, counts = [], []
    n = 0
    for _ in range(rounds):
        start = time.perf_counter()
        vocabulary = VocabularyFile(path)
        loads.append(time.perf_counter() - start)
        start = time.perf_counter()
        n = vocabulary.count(text)
        counts.append(time.perf_counter() - start)
        vocabulary.close()
    return {"vocab_load_s": statistics.median(loads), "tokenize_s": statistics.median(counts), "tokens": n,
            "characters": len(text), "tokens_per_s": n / statistics.median(counts), "loads": loads}


# run in a child process: the real `lcrun chat`, its engine made by the launch's one injection point, timed at the
# first llama_decode (the first prefill batch) and ended there
_FIRST_BATCH = """
import os, sys, time
start = float(sys.argv[1])
from lcrun.launch.loaded import set_engine_factory

def engine(config):
    from lcrun.engine.runtime import Engine

    made = time.time()
    made_engine = Engine(config)
    loaded = time.time()
    decode = made_engine.decode   # the engine binds its step API's decode per instance

    def first_batch(feeds):
        begun = time.time()
        decode(feeds)
        print(f"FIRST_BATCH {made - start:.4f} {loaded - start:.4f} {begun - start:.4f} {time.time() - start:.4f} "
              f"{sum(len(f.tokens) for f in feeds)}", file=sys.stderr, flush=True)
        os._exit(0)

    made_engine.decode = first_batch
    return made_engine

set_engine_factory(engine)
from lcrun.cli import main
main(sys.argv[2:])
"""


def chat_to_first_batch(model: Path, pdf: Path | None) -> dict:
    args = ["chat", str(model), "-p", "What is this document about?", "--no-history", "-t", "1"]
    if pdf is not None:
        args[2:2] = ["-f", str(pdf)]
    start = time.time()
    run = subprocess.run([sys.executable, "-c", _FIRST_BATCH, str(start), *args], capture_output=True, text=True,
                         cwd=ROOT, timeout=900)
    line = next((x for x in run.stderr.splitlines() if x.startswith("FIRST_BATCH ")), None)
    if line is None:
        raise SystemExit(f"lcrun chat did not reach a prefill batch: {run.stderr[-2000:]}")
    made, loaded, begun, ended, batch = line.split()[1:]
    tokens = re.search(r"prompt ([\d,]+) tokens", run.stderr)
    return {"engine_made_s": float(made), "engine_loaded_s": float(loaded), "first_batch_start_s": float(begun),
            "first_batch_end_s": float(ended), "batch_tokens": int(batch),
            "prompt_tokens": int(tokens[1].replace(",", "")) if tokens else None}


def bench_chat(pdf: Path, rounds: int) -> dict:
    model = WORK / "llama3-1m.gguf"
    if not model.exists():
        write_realistic_gguf(model, "llama3", n_ctx_train=1 << 20)
    lcrun = [sys.executable, "-m", "lcrun.cli"]
    processes = {"lcrun read BIG.pdf": [*lcrun, "read", str(pdf)],
                 "chat --dry-run -f BIG.pdf": [*lcrun, "chat", str(model), "-f", str(pdf), "--dry-run", "-t", "1"],
                 "chat --dry-run (no document)": [*lcrun, "chat", str(model), "--dry-run", "-t", "1"]}
    runs: dict[str, list] = {"chat -f BIG.pdf": [], "chat (no document)": [], **{k: [] for k in processes}}
    for _ in range(rounds):
        runs["chat -f BIG.pdf"].append(chat_to_first_batch(model, pdf))
        runs["chat (no document)"].append(chat_to_first_batch(model, None))
        for name, command in processes.items():
            runs[name].append(timed(lambda: subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                                                           stderr=subprocess.DEVNULL)))
    def med(key: str, field: str) -> float:
        return statistics.median(r[field] for r in runs[key])
    fields = ("engine_made_s", "engine_loaded_s", "first_batch_start_s", "first_batch_end_s")
    with_doc = {f: med("chat -f BIG.pdf", f) for f in fields}
    bare = {f: med("chat (no document)", f) for f in fields}
    return {"pdf": str(pdf), "pages": read_document(str(pdf), replace(ReadLimits(), seconds=600)).pages,
            "prompt_tokens": runs["chat -f BIG.pdf"][0]["prompt_tokens"], "runs": runs, "median_s": with_doc,
            "median_s_without_document": bare, "lcrun_read_s": statistics.median(runs["lcrun read BIG.pdf"]),
            "dry_run_s": statistics.median(runs["chat --dry-run -f BIG.pdf"]),
            "dry_run_without_document_s": statistics.median(runs["chat --dry-run (no document)"]),
            "document_cost_s": with_doc["first_batch_start_s"] - bare["first_batch_start_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pdf", type=Path, help="A (TeX) PDF to join to >= 300 pages and measure too.")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--chat-only", action="store_true", help="Only `lcrun chat -f BIG.pdf` to the first batch.")
    args = parser.parse_args()
    for tool in ("pdftotext", "pdfunite", "git"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed (apt-get install poppler-utils git)")
    WORK.mkdir(parents=True, exist_ok=True)
    pdfs = []
    columns = WORK / "columns-320.pdf"
    if not columns.exists() and not args.chat_only:
        build_columns_pdf(columns, 320)
    if columns.exists():
        pdfs.append(columns)
    tex = args.pdf or next((p for p in TEX_PDFS if p.exists()), None)
    if tex is not None:
        joined = WORK / f"{tex.stem}-joined.pdf"
        if not joined.exists():
            join_pdf(tex, joined, 300)
        pdfs.append(joined)
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                     "load": os.getloadavg(), "date": time.strftime("%Y-%m-%d"), "pdf": [], "tree": None}
    c = bench_chat(pdfs[-1], args.rounds)
    results["chat"] = c
    print(f"lcrun chat -f {Path(c['pdf']).name} ({c['pages']} pages, {c['prompt_tokens']:,} prompt tokens) to the "
          f"first prefill batch: engine made at {c['median_s']['engine_made_s']:.2f} s, loaded at "
          f"{c['median_s']['engine_loaded_s']:.2f} s, first batch "
          f"{c['median_s']['first_batch_start_s']:.2f}-{c['median_s']['first_batch_end_s']:.2f} s; without the "
          f"document {c['median_s_without_document']['first_batch_start_s']:.2f} s; the document's cost "
          f"{c['document_cost_s']:.2f} s (lcrun read alone {c['lcrun_read_s']:.2f} s); chat --dry-run "
          f"{c['dry_run_s']:.2f} s with it, {c['dry_run_without_document_s']:.2f} s without")
    if args.chat_only:
        pdfs = []
    for pdf in pdfs:
        r = bench_pdf(pdf, args.rounds, WORK / "pdftotext.txt")
        results["pdf"].append(r)
        print(f"{pdf.name}: {r['pages']} pages; pages/s " +
              ", ".join(f"{k} {v:,.0f}" for k, v in r["pages_per_s"].items()) +
              "; speed vs pdftotext " + ", ".join(f"{k} {v:.2f}x" for k, v in r["speed_vs_pdftotext"].items()) +
              f"; words: recall {r['words']['recall']:.3f}, precision {r['words']['precision']:.3f}")
    if args.chat_only:
        results["load_after"] = os.getloadavg()
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))
        return
    tree = WORK / "tree"
    build_tree(tree)
    t = bench_tree(tree, args.rounds)
    results["tree"] = t
    print(f"tree: {t['git_files']:,} files in git, {t['files_read']:,} read ({t['skipped']}), {t['bytes'] / 1e6:,.0f} MB; "
          + ", ".join(f"{k} {v:.2f} s" for k, v in t["median_s"].items()) + f"; lcrun/git {t['time_vs_git']:.2f}x")
    text = read_document(str(pdfs[-1]), replace(ReadLimits(), seconds=600)).context_text()
    k = bench_tokens(text, args.rounds)
    results["tokens"] = k
    print(f"128K vocabulary: load {k['vocab_load_s']:.2f} s; {k['characters']:,} characters -> {k['tokens']:,} tokens "
          f"in {k['tokenize_s']:.2f} s ({k['tokens_per_s']:,.0f} tokens/s)")
    results["load_after"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
