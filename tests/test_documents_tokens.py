"""Token counts of documents for a model — exact: the tokens llama.cpp gives the same text, on a 128K-token
Llama-3-shaped vocabulary — and `lcrun estimate MODEL --file DOC` before download: through the fake Hub, the
tokenizer is fetched alone (a GGUF's header prefix, or a checkpoint's tokenizer.json), never the weights; what it
answers (tokens, context needed, memory per KV type, fits or not, the fix) and that the fix it names works."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lcrun.context_fit import ANSWER_RESERVE, fit_context, needed_context
from lcrun.devices import Device
from lcrun.documents import read_document, read_documents
from lcrun.documents.tokens import document_tokens
from lcrun.engine.vocab import VocabularyFile
from lcrun.gguf_reader import read_gguf_header
from lcrun.model_spec import spec_from_gguf, spec_from_profile
from lcrun.model_vocab import write_vocab_from_header
from tests.fixtures.checkpoint_factory import make_llama_checkpoint
from tests.fixtures.cli import assert_one_line_error, invoke
from tests.fixtures.documents import html_page, pdf_pages, sentence
from tests.fixtures.hub_server import FakeHub

GIB = 1 << 30


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> list:
    root = tmp_path_factory.mktemp("docs")
    (root / "page.html").write_text(html_page("Ledger", [sentence(i) + " Ünïcødé — ✓." for i in range(5)]))
    pdf_pages(root / "paper.pdf", [[sentence(3 * p + i) for i in range(3)] for p in range(4)])
    (root / "src").mkdir()
    (root / "src" / "a.py").write_text("def f(x):\n    return x * 2  # <|eot_id|> stays text\n")
    return read_documents([str(root / "page.html"), str(root / "paper.pdf"), str(root / "src")])


def test_counts_equal_llama_cpp_on_a_128k_vocabulary(llama3_gguf: Path, llama3_vocab: object,
                                                     documents: list) -> None:
    with VocabularyFile(llama3_gguf) as vocabulary:
        assert vocabulary.n_vocab == 128256
        counts = document_tokens(documents, vocabulary)
        for document, count in zip(documents, counts):
            text = document.context_text()
            reference = llama3_vocab.tokenize(text.encode(), add_bos=False, special=False)  # type: ignore[attr-defined]
            assert vocabulary.tokenize(text) == reference
            assert count == len(reference) > 0
        # negative control: parsing control tokens gives another tokenization of the same text
        folder = documents[2].context_text()
        assert len(vocabulary.tokenize(folder, special=True)) < len(vocabulary.tokenize(folder))


def test_read_json_counts_with_the_model(llama3_gguf: Path, llama3_vocab: object, tmp_path: Path) -> None:
    note = tmp_path / "note.md"
    note.write_text("# Note\n\n" + " ".join(sentence(i) for i in range(40)))
    run = invoke("read", str(note), "--json", "--model", str(llama3_gguf))
    assert run.exit_code == 0, run.stderr
    out = json.loads(run.stdout)
    text = read_document(str(note)).context_text()
    expected = len(llama3_vocab.tokenize(text.encode(), add_bos=False, special=False))  # type: ignore[attr-defined]
    assert out["documents"][0]["tokens"] == out["tokens"] == expected
    assert out["documents"][0]["characters"] == len(read_document(str(note)).text)


def test_a_vocabulary_written_from_the_header_tokenizes_as_the_file(llama3_gguf: Path, documents: list,
                                                                    tmp_path: Path) -> None:
    header = read_gguf_header(llama3_gguf)
    vocab_only = write_vocab_from_header(tmp_path / "vocab.gguf", header)
    assert vocab_only.stat().st_size < header.header_size + 4096  # the tokenizer, no weights
    with VocabularyFile(llama3_gguf) as whole, VocabularyFile(vocab_only) as alone:
        for document in documents:
            assert alone.tokenize(document.context_text()) == whole.tokenize(document.context_text())


def test_estimate_file_from_a_hub_gguf_fetches_only_the_header(llama3_gguf: Path, fake_hub: FakeHub,
                                                               tmp_path: Path) -> None:
    data = llama3_gguf.read_bytes()
    fake_hub.add_repo("org/Real-GGUF", {"real-F16.gguf": data})
    doc = tmp_path / "doc.md"
    doc.write_text(" ".join(sentence(i) for i in range(200)))
    run = invoke("estimate", "org/Real-GGUF", "--file", str(doc), "--ram", "8G", "--json")
    assert run.exit_code == 0, run.stderr
    out = json.loads(run.stdout)
    with VocabularyFile(llama3_gguf) as vocabulary:
        assert out["tokens"] == out["documents"][0]["tokens"] == vocabulary.count(read_document(str(doc)).context_text())
    header = read_gguf_header(llama3_gguf)
    served = fake_hub.bytes_served("real-F16.gguf")
    weights = len(data) - header.data_offset
    # the header's growing range reads (at most double the header), never the tensor data as a whole
    assert 0 < served <= 2 * header.header_size and served < header.data_offset + weights // 2
    [fit] = out["fits"]
    assert fit["fits"] and fit["needed_ctx"] == needed_context(out["tokens"], ANSWER_RESERVE, 131072)
    assert fit["fix"].startswith(f"needs -c {fit['needed_ctx'] // 1024}k ({out['tokens']:,} tokens")


def test_estimate_file_from_a_hub_checkpoint_fetches_only_the_tokenizer(fake_hub: FakeHub, tmp_path: Path) -> None:
    import llama_cpp

    ck = make_llama_checkpoint(tmp_path / "ck", hidden=64, layers=1, heads=4, kv_heads=2, ffn=128, shards=2)
    files = {p.name: p.read_bytes() for p in ck.path.iterdir()}
    fake_hub.add_repo("org/Tiny-Llama", files)
    doc = tmp_path / "doc.txt"
    doc.write_text("the quick brown fox " * 50 + "\n" + sentence(3))
    run = invoke("estimate", "org/Tiny-Llama", "--file", str(doc), "--ram", "8G", "--json")
    assert run.exit_code == 0, run.stderr
    out = json.loads(run.stdout)
    # the weights: their headers at most (for the memory estimate) — none where the Hub's sharded-metadata API
    # parsed them itself, as it does for a sharded checkpoint on main
    for name, blob in files.items():
        if name.endswith(".safetensors"):
            assert fake_hub.bytes_served(name) <= 8 + int.from_bytes(blob[:8], "little") < len(blob)
    assert {"tokenizer.json", "config.json"} <= fake_hub.files_fetched("org/Tiny-Llama")
    # the count the converted model gives
    gguf = tmp_path / "tiny.gguf"
    assert invoke("convert", str(ck.path), "-o", str(gguf), "-q").exit_code == 0
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    text = read_document(str(doc)).context_text()
    assert out["tokens"] == len(llm.tokenize(text.encode(), add_bos=False, special=False)) > 100
    llm.close()


def test_the_fix_it_names_is_a_plan_that_fits(llama3_gguf: Path, tmp_path: Path) -> None:
    doc = tmp_path / "long.md"
    doc.write_text("\n".join(sentence(i) for i in range(1500)))
    with VocabularyFile(llama3_gguf) as vocabulary:
        tokens = vocabulary.count(read_document(str(doc)).context_text())
    spec = spec_from_gguf(llama3_gguf)
    free = 64 * GIB  # find the totals, then a machine between f16's and q8_0's
    first = fit_context(spec, "F16", [Device("CPU", free, free, is_gpu=False, detected=False)], tokens)
    f16, q8 = (o.estimate.total_bytes for o in first.options[:2])
    ram = (f16 + q8) // 2
    run = invoke("estimate", str(llama3_gguf), "--file", str(doc), "--ram", str(ram))
    assert run.exit_code == 0, run.stderr
    ctx = f"{needed_context(tokens, ANSWER_RESERVE, spec.n_ctx_train) // 1024}k"
    assert f"fits with -c {ctx} -ctk q8_0 -ctv q8_0" in " ".join(run.stdout.split())
    fits = invoke("plan", str(llama3_gguf), "-c", ctx, "-ctk", "q8_0", "-ctv", "q8_0", "--ram", str(ram), "--json")
    assert fits.exit_code == 0 and json.loads(fits.stdout)["fits"]
    refused = invoke("plan", str(llama3_gguf), "-c", ctx, "--kv-type", "f16", "--ram", str(ram))  # negative control
    assert_one_line_error(refused, "do not fit")


def test_fit_and_fix_lines() -> None:
    spec = spec_from_profile("llama-3.1-8b")
    machine = [Device("CPU", 14 * GIB, 14 * GIB, is_gpu=False, detected=False)]
    fit = fit_context(spec, "Q4_K_M", machine, 100_000)
    assert fit.needed_ctx == 99 * 1024 and not fit.exceeds_model and fit.best is fit.options[1]
    assert fit.fix() == ("needs -c 99k (100,000 tokens + 1,024 for the answer): "
                         f"{fit.options[0].estimate.total_bytes / GIB:.1f} GiB with f16 KV, "
                         f"{fit.options[1].estimate.total_bytes / GIB:.1f} GiB with q8_0 — fits with -c 99k -ctk q8_0 "
                         "-ctv q8_0")
    assert fit_context(spec, "Q4_K_M", machine, 20_000).fix().endswith("fits with -c 21k")
    too_long = fit_context(spec, "Q4_K_M", machine, 131_000)
    assert too_long.exceeds_model and not too_long.fits and "more than the model's maximum context of 128k" in \
        too_long.fix()
    small = [Device("CPU", 6 * GIB, 6 * GIB, is_gpu=False, detected=False)]
    nothing = fit_context(spec, "Q4_K_M", small, 100_000)
    assert nothing.best is None and nothing.largest is not None and nothing.largest[0] > 0
    assert "does not fit the memory here (the largest that fits is -c" in nothing.fix()
    planned = fit_context(spec, "Q4_K_M", small, 1_000, planned_ctx=4096)
    assert planned.fits_as_planned and planned.fits
    assert needed_context(130_000, 1024, 131_072) == 131_072  # rounding never passes the model's maximum


def test_estimate_file_errors_are_one_line(llama3_gguf: Path, tmp_path: Path) -> None:
    assert_one_line_error(invoke("estimate", str(llama3_gguf), "--file", str(tmp_path / "none.pdf")),
                          "none.pdf: no such file or folder")
    doc = tmp_path / "d.txt"
    doc.write_text("hello")
    # a Hub repo while the Hub is offline: one line, before anything else
    assert_one_line_error(invoke("estimate", "org/Unknown", "--file", str(doc)), "org/Unknown", "cannot be reached")
