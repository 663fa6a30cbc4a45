"""Documents in `lcrun chat`, counted and sized before the model loads, on a file with Llama 3's vocabulary shape
(128,256 tokens, 280,147 merges; tiny weights, so llama.cpp really runs it): the counts are exactly the tokens
llama.cpp gives the prompt (the chat template around the documents included), `--dry-run` shows them beside the plan
without loading an engine, the context is sized to them, a prompt too long for -c or for memory gets the one-line
fix and the command it suggests runs; on the real engine, /add and /drop prefill only from where a document goes
or went."""
from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lcrun.chat.documents import DocumentPrefilled
from lcrun.chat.session import ChatSession
from lcrun.context_fit import CTX_ROUND
from lcrun.documents import read_document, read_documents
from lcrun.engine.protocol import GREEDY
from lcrun.engine.runtime import Engine, EngineConfig
from lcrun.generation.records import Finished, GenerationParams
from lcrun.model_spec import spec_from_gguf
from lcrun.devices import run_devices
from lcrun.estimate import estimate_memory
from tests.fixtures.cli import assert_one_line_error, run_lcrun
from tests.fixtures.documents import html_page, pdf_pages, sentence
from tests.fixtures.realistic_gguf import LLAMA3_TEMPLATE, write_realistic_gguf

QUESTION = "Which sentence mentions 7 ships?"


@pytest.fixture(scope="module")
def llama3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_realistic_gguf(tmp_path_factory.mktemp("vocab") / "llama3.gguf", "llama3")


@pytest.fixture(scope="module")
def reference(llama3: Path) -> Iterator[object]:
    """llama-cpp-python's own tokenizer of the file (vocab_only), the counts are held to."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(llama3), vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("docs")
    pdf = pdf_pages(root / "paper.pdf", [[sentence(4 * p + i) for i in range(4)] for p in range(5)])
    (root / "src").mkdir()
    (root / "src" / "a.py").write_text("def ships(n):\n    return n * 7  # counted near Utsira\n")
    (root / "src" / "notes.md").write_text("# Notes\n\n" + " ".join(sentence(100 + i) for i in range(30)))
    (root / "page.html").write_text(html_page("Ledger", [sentence(200 + i) + " Ünïcødé — ✓." for i in range(6)]))
    return [str(pdf), str(root / "src"), str(root / "page.html")]


def reference_counts(llm: object, sources: list[str], question: str | None) -> tuple[list[int], int]:
    """What each document adds to the prompt and the whole prompt, rendered by llama-cpp-python's Jinja chat
    formatter and tokenized by llama.cpp with special tokens parsed (as llama-server tokenizes a prompt)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    messages = [{"role": "user", "content": d.context_text()} for d in read_documents(sources)]

    def tokens(msgs: list[dict[str, str]], generation: bool) -> int:
        render = Jinja2ChatFormatter(LLAMA3_TEMPLATE, "<|eot_id|>", "<|begin_of_text|>", add_generation_prompt=generation)
        prompt = render(messages=msgs).prompt
        return len(llm.tokenize(prompt.encode(), add_bos=False, special=True))  # type: ignore[attr-defined]

    sizes = [tokens(messages[:i], False) for i in range(len(messages) + 1)]
    full = messages + [{"role": "user", "content": question}] if question else messages
    return [b - a for a, b in zip(sizes, sizes[1:])], tokens(full, question is not None)


def table_tokens(text: str, source: str) -> int:
    row = next(line for line in text.splitlines() if line.startswith(source + " "))
    return int(row.split()[-1].replace(",", ""))


def test_dry_run_counts_exactly_what_llama_cpp_prefills_and_loads_no_engine(llama3: Path, reference: object,
                                                                            sources: list[str]) -> None:
    code = ("import sys; from lcrun.cli import main\n"
            "try:\n    main(['chat', *sys.argv[1:], '--dry-run'])\nexcept SystemExit:\n    pass\n"
            "loaded = [m for m in ('lcrun.engine.runtime', 'lcrun.chat.session', 'lcrun.launch.loaded')"
            " if m in sys.modules]\nprint('loaded:', loaded)")
    args = [str(llama3), *(x for s in sources for x in ("-f", s)), "-t", "1"]
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("loaded: []"), run.stderr
    counts, prompt = reference_counts(reference, sources, None)
    assert [table_tokens(run.stdout, s) for s in sources] == counts and min(counts) > 50
    # sized to the documents and room for the conversation, in whole K: not the model's 131,072
    ctx = -(-(prompt + 4096) // CTX_ROUND) * CTX_ROUND
    assert f"context {ctx:,} tokens" in run.stdout and f"prompt {prompt:,} tokens + 4,096 for the conversation" \
        in run.stdout and "--ctx auto" in run.stdout
    assert "prefill" not in run.stdout.split("document", 1)[1].splitlines()[0]   # no column: bench never ran here


@pytest.mark.slow   # llama.cpp in child processes: 5-10 s on a busy 2-vCPU machine
def test_one_shot_prefills_exactly_the_counted_prompt_on_llama_cpp(llama3: Path, reference: object,
                                                                   sources: list[str]) -> None:
    args = [str(llama3), *(x for s in sources for x in ("-f", s)), "-p", QUESTION, "-n", "2", "--temp", "0",
            "-t", "1", "--no-history"]
    run = run_lcrun("chat", *args, timeout=120)
    assert run.returncode == 0, run.stderr
    counts, prompt = reference_counts(reference, sources, QUESTION)
    assert [table_tokens(run.stderr, s) for s in sources] == counts
    assert f"\n{prompt:,} prompt tokens (" in run.stderr   # the question's request: the counted prompt, exactly
    evaluated = sum(int(n.replace(",", "")) for n in re.findall(r"added: [\d,]+ tokens \(([\d,]+) tokens prefilled",
                                                                run.stderr))
    assert evaluated == sum(counts) + 1   # each document once, and the BOS before the first
    took = re.search(r"time to first token ([\d.]+) s \(the documents' ([\d,]+) tokens took ([\d.]+) s of it\)",
                     run.stderr)
    assert took and int(took[2].replace(",", "")) == evaluated and float(took[1]) >= float(took[3]) > 0


@pytest.mark.slow   # llama.cpp in child processes: 5-10 s on a busy 2-vCPU machine
def test_too_long_for_the_context_gets_the_fix_and_the_fix_runs(llama3: Path, reference: object,
                                                               tmp_path: Path) -> None:
    doc = tmp_path / "long.md"
    doc.write_text(" ".join(sentence(i) for i in range(34)))
    _, prompt = reference_counts(reference, [str(doc)], QUESTION)
    needed = -(-(prompt + 4) // CTX_ROUND) * CTX_ROUND   # the prompt and -n 4 for the answer, in whole K
    assert needed > 2048
    spec, cpu = spec_from_gguf(llama3), run_devices(ram=64 << 30)
    f16, q8 = (estimate_memory(spec, "F16", needed, cpu, type_k=kv, type_v=kv).total_bytes for kv in ("f16", "q8_0"))
    assert q8 < f16
    ram = str((f16 + q8) // 2)   # f16 KV at the context the fix names does not fit, q8_0 does
    common = ["chat", str(llama3), "-f", str(doc), "-p", QUESTION, "-n", "4", "-t", "1", "--no-history", "--ram", ram]
    refused = run_lcrun(*common, "-c", "2k", timeout=120)
    line = assert_one_line_error(refused, f"{doc}: does not fit -c 2k: needs -c {needed // 1024}k ({prompt:,} tokens "
                                 "+ 4 for the answer): ", "GiB with f16 KV", "GiB with q8_0 — fits with -c ")
    flags = line.rsplit("— fits with ", 1)[1].split()
    assert flags == ["-c", f"{needed // 1024}k", "-ctk", "q8_0", "-ctv", "q8_0"]
    fixed = run_lcrun(*common, *flags, timeout=120)
    assert fixed.returncode == 0, fixed.stderr
    assert "4 generated" in fixed.stderr and "ended by length" in fixed.stderr
    # without -c the same machine gets that context and KV type by itself
    auto = run_lcrun(*common, "--dry-run", timeout=120)
    assert auto.returncode == 0 and f"context {needed:,} tokens · KV q8_0" in auto.stdout


def test_add_and_drop_prefill_only_from_where_the_document_goes_on_llama_cpp(tiny_gguf: Path,
                                                                             tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text(" ".join(sentence(i) for i in range(12)))
    (tmp_path / "b.txt").write_text(" ".join(sentence(i) for i in range(40, 50)))
    engine = Engine(EngineConfig(model_path=tiny_gguf, n_ctx=2048, n_threads=1, n_batch=2048, n_ubatch=512,
                                 flash_attn=True))   # short batches padded: none may reach into the cache here
    try:
        session = ChatSession(engine, system="Be brief.", params=GenerationParams(GREEDY, max_tokens=4))

        def prefilled(events: Iterator[object]) -> DocumentPrefilled:
            return next(e for e in list(events) if isinstance(e, DocumentPrefilled))

        def prefix(messages: int) -> int:   # prompt tokens before message `messages`
            return len(session._tokens(session.conversation.messages[:messages], add_generation_prompt=False))

        def shared(before: list[int]) -> int:   # what the cache held that the conversation now starts with
            now = session._tokens(add_generation_prompt=False)
            return next((i for i, (x, y) in enumerate(zip(before, now)) if x != y), min(len(before), len(now)))

        check_a = session.check_document(read_document(str(tmp_path / "a.txt")))
        added = prefilled(session.add_document(check_a))
        assert added.evaluated == prefix(0) + check_a.tokens == len(engine.cached_tokens)   # nothing cached before
        list(session.ask("What is in it?"))
        check_b = session.check_document(read_document(str(tmp_path / "b.txt")))
        cached = engine.cached_tokens
        added = prefilled(session.add_document(check_b))
        # documents first: b goes before the turn, so b and the turn after it are evaluated, a is reused
        assert [m.document for m in session.conversation.messages] == ["a.txt", "b.txt", None, None]
        assert check_b.tokens == prefix(2) - prefix(1) > 64
        reused = shared(cached)   # a, and the user header b starts with as the question did
        assert prefix(1) <= reused < prefix(1) + 8 and added.evaluated == prefix(4) - reused
        cached = engine.cached_tokens
        dropped = prefilled(session.drop_document(1))
        assert [m.document for m in session.conversation.messages] == ["b.txt", None, None]
        reused = shared(cached)   # the system prompt, and the user header and '<document name="' b starts with too
        assert prefix(0) <= reused < prefix(0) + 20 and dropped.dropped and dropped.evaluated == prefix(3) - reused
        assert engine.cached_tokens == session._tokens(add_generation_prompt=False)   # the cache is the conversation
    finally:
        engine.close()
