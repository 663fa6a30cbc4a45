"""The niah core with the fake engine (one token per character): the grid and its order, needle placement, scoring
through the summary and the heatmap (a responder that finds or misses the needle on purpose), prefix reuse, the
results log (torn lines, resume, refusals), the haystack's errors and repetition, and the shipped haystack."""
from __future__ import annotations

import importlib.util
import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from lcrun.errors import LcrunError
from lcrun.niah import NiahError
from lcrun.niah.grid import Cell, context_lengths, depths, grid_cells
from lcrun.niah.haystack import build_stream, default_haystack_path, read_haystack
from lcrun.niah.prompt import Needle, needle_for
from lcrun.niah.results import ResultsLog, read_log
from lcrun.niah.run import CellDone, NiahParams, NiahRun, prepare_run, run_cells
from lcrun.niah.summary import summarize
from lcrun.ui.niah_view import render_heatmap
from tests.fixtures.documents import pdf_pages, sentence
from tests.fixtures.fake_engine import FakeEngine
from tests.fixtures.niah_responders import NEEDLE_RE, finds_shallow_needles_in_short_documents, position_in_document

REPO = Path(__file__).resolve().parent.parent
IDENTITY = {"model": "fake.gguf", "seed": 0, "type_k": "f16"}


def run_all(engine: FakeEngine, params: NiahParams, tmp_path: Path, haystack: Path | None = None,
            **log_options: bool) -> tuple[dict, list[dict]]:
    run = prepare_run(engine, params, read_haystack(haystack))
    log = ResultsLog(tmp_path / "r.jsonl", IDENTITY, resume=log_options.get("resume", False),
                     force=log_options.get("force", False))
    with log:
        records = [e.record for e in run_cells(engine, run, log) if isinstance(e, CellDone)]
    return summarize(run, log.done, model="fake.gguf", results=log.path, settings={"type_k": "f16",
                                                                                    "type_v": "f16"}), records


# -- the grid ------------------------------------------------------------------------------------------------------
def test_gradient_defaults_give_gradient_grid() -> None:
    p = NiahParams()
    contexts = context_lengths(p.min_ctx, p.max_ctx, interval=p.ctx_interval)
    assert contexts[:3] == [100, 86_775, 173_450] and contexts[-2:] == [1_126_875, 1_140_200]
    assert len(contexts) == 15
    assert depths(p.depth_interval) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert (p.samples, p.digits) == (1, 8)


def test_context_steps_and_depth_intervals() -> None:
    assert context_lengths(1000, 4000, steps=4) == [1000, 2000, 3000, 4000]
    assert context_lengths(1000, 4000, steps=1) == [4000]
    assert context_lengths(500, 500, interval=100) == [500]
    assert depths(0.3) == [0.0, 0.3, 0.6, 0.9, 1.0]
    assert depths(1.0) == [0.0, 1.0]
    assert depths(0.25) == [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("call, message", [
    (lambda: depths(0.0), "--depth-interval: 0 is out of range"),
    (lambda: depths(1.5), "--depth-interval: 1.5 is out of range"),
    (lambda: depths(-0.2), "--depth-interval: -0.2 is out of range"),
    (lambda: context_lengths(5000, 1000, steps=3), "--min-ctx: 5,000 is above --max-ctx 1,000"),
    (lambda: NiahParams(ctx_interval=10, ctx_steps=3).check(), "--ctx-interval: cannot be combined with --ctx-steps"),
    (lambda: NiahParams(digits=0).check(), "--digits: 0 is out of range"),
    (lambda: NiahParams(samples=0).check(), "--samples: 0 must be at least 1"),
])
def test_bad_grid_parameters_are_one_line(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NiahError) as err:
        call()
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_cells_go_deepest_first_within_a_context_so_prefixes_are_shared() -> None:
    cells = grid_cells([200, 100], [0.0, 0.5, 1.0], 2)
    assert [(c.ctx, c.depth, c.sample) for c in cells[:6]] == [
        (100, 1.0, 0), (100, 1.0, 1), (100, 0.5, 0), (100, 0.5, 1), (100, 0.0, 0), (100, 0.0, 1)]
    assert {c.ctx for c in cells[6:]} == {200}


def test_needles_are_reproducible_and_have_the_digits() -> None:
    cell = Cell(1000, 0.4, 0)
    assert needle_for(cell, 7, 8) == needle_for(Cell(1000, 0.4000000001, 0), 7, 8)
    assert needle_for(cell, 7, 8) != needle_for(cell, 8, 8)
    numbers = {needle_for(Cell(c, 0.0, 0), 0, 5).number for c in range(100, 130)}
    assert all(len(n) == 5 and n.isdigit() and n[0] != "0" for n in numbers) and len(numbers) > 20


# -- prompts -------------------------------------------------------------------------------------------------------
Prepared = tuple[FakeEngine, NiahRun]


@pytest.fixture
def prepared() -> Prepared:
    engine = FakeEngine(n_ctx=8192)
    run = prepare_run(engine, NiahParams(min_ctx=3000, max_ctx=3000, ctx_steps=1), read_haystack())
    return engine, run


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.3, 0.5, 0.77, 0.9, 1.0])
def test_needle_sits_at_a_sentence_boundary_near_the_depth(prepared: Prepared, depth: float) -> None:
    engine, run = prepared
    cell = Cell(3000, depth, 0)
    needle = needle_for(cell, 0, 8)
    prompt = run.builder.build(run.stream, cell, needle)
    document = engine.detokenize(prompt.tokens[prompt.doc_start: prompt.doc_start + prompt.doc_tokens])
    assert abs(len(engine.tokenize(document, special=False)) - 3000) <= 2
    assert document.count(needle.sentence) == 1
    before, after = document.split(needle.sentence)
    if depth == 0.0:
        assert before == "" and document.startswith(needle.sentence)
    elif depth == 1.0:
        assert after == "" and document.endswith(needle.sentence)
    else:
        assert re.search(r"([.!?]\s*|\n)$", before), before[-40:]      # after a sentence's end or a line break
        assert after[:1] == " " and after[1:2].isupper() or after.startswith("\n")  # before the next sentence
        haystack_len = len(document) - len(needle.sentence) - 1
        assert abs(prompt.depth_actual - depth) < 0.03   # moved to the nearest sentence start
        assert abs(len(before.rstrip(" ")) / haystack_len - prompt.depth_actual) < 0.01
    rendered = engine.detokenize(prompt.tokens)
    assert rendered.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
    assert rendered.endswith(f"{needle.question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_shallower_needles_reuse_the_deeper_prompts_prefix(prepared: Prepared) -> None:
    engine, run = prepared
    prompts = [run.builder.build(run.stream, c, needle_for(c, 0, 8)) for c in run.cells]
    for deeper, shallower in zip(prompts, prompts[1:]):
        shared = shallower.doc_start + shallower.needle_at
        assert deeper.tokens[:shared] == shallower.tokens[:shared]


# -- scoring, summary, heatmap -------------------------------------------------------------------------------------
def test_found_and_missed_needles_show_in_summary_and_heatmap(tmp_path: Path) -> None:
    engine = FakeEngine(n_ctx=8192, responder=finds_shallow_needles_in_short_documents)
    params = NiahParams(min_ctx=2000, max_ctx=5000, ctx_steps=4, depth_interval=0.2)
    summary, records = run_all(engine, params, tmp_path)
    assert summary["contexts"] == [2000, 3000, 4000, 5000]
    assert summary["depths"] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    found = [[1.0, 1.0, 0.0, 0.0]] * 3 + [[0.0] * 4] * 3   # shallow (depth < 0.5) in prompts under 4000 chars
    assert summary["scores"] == found
    assert summary["score"] == pytest.approx(6 / 24, abs=1e-4)
    assert summary["depth_scores"] == [0.5, 0.5, 0.5, 0.0, 0.0, 0.0]
    assert summary["context_scores"] == [0.5, 0.5, 0.0, 0.0]
    assert summary["complete"] and summary["cells_done"] == 24
    for r in records:
        assert r["score"] == (r["number"] in r["answer"])
        assert abs(r["doc_tokens"] - r["ctx"]) <= 2 and abs(r["depth_actual"] - r["depth"]) < 0.06

    console = Console(record=True, width=100, no_color=True, file=io.StringIO())
    render_heatmap(summary, console)
    text = console.export_text()
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if re.match(r"\s*\d+%", line)}
    assert rows["0%"] == rows["20%"] == rows["40%"] == ["100", "100", "0", "0", "50"]
    assert rows["60%"] == rows["80%"] == rows["100%"] == ["0", "0", "0", "0", "0"]
    assert "score 25%" in text and "24/24 cells done" in text


def test_a_model_that_never_answers_scores_zero_everywhere(tmp_path: Path) -> None:
    engine = FakeEngine(n_ctx=8192, responder=lambda prompt: "Sorry, no idea.")
    summary, records = run_all(engine, NiahParams(min_ctx=500, max_ctx=1500, ctx_steps=2, depth_interval=0.5),
                               tmp_path)
    assert summary["score"] == 0.0 and summary["scores"] == [[0.0, 0.0]] * 3
    assert len(records) == 6 and all(r["answer"] == "Sorry, no idea." for r in records)


def test_the_number_elsewhere_in_the_prompt_does_not_count(tmp_path: Path) -> None:
    """Scoring reads the answer only: an answer quoting the wrong digits scores 0."""
    def wrong_digits(prompt: str) -> str:
        number, _ = position_in_document(prompt)
        return number[:-1] + str((int(number[-1]) + 1) % 10)
    summary, _ = run_all(FakeEngine(n_ctx=8192, responder=wrong_digits),
                         NiahParams(min_ctx=500, max_ctx=500, ctx_steps=1, depth_interval=1.0), tmp_path)
    assert summary["score"] == 0.0


def test_each_cell_reuses_the_haystack_before_its_needle(tmp_path: Path) -> None:
    engine = FakeEngine(n_ctx=8192, responder=lambda p: "no")
    _, records = run_all(engine, NiahParams(min_ctx=3000, max_ctx=3000, ctx_steps=1, depth_interval=0.25),
                         tmp_path)
    assert [r["depth"] for r in records] == [1.0, 0.75, 0.5, 0.25, 0.0]
    for record in records[1:]:
        assert record["reused_tokens"] >= record["needle_at"]   # the head and the haystack up to the needle
    # 1 + 0.25 + 0.5 + 0.75 + 1 prompts' worth evaluated instead of 5 (give or take: depths move to a sentence)
    assert sum(c.evaluated_tokens for c in engine.calls) < 0.75 * sum(c.prompt_tokens for c in engine.calls)


def test_max_context_is_capped_by_the_engine_and_says_so(tmp_path: Path) -> None:
    engine = FakeEngine(n_ctx=2048)
    run = prepare_run(engine, NiahParams(min_ctx=500, max_ctx=100_000, ctx_steps=3), read_haystack())
    room = run.builder.overhead(NiahParams().answer_tokens)
    assert run.max_ctx == 2048 - room and run.contexts[-1] == run.max_ctx
    assert any("capped at" in note and "2,048" in note for note in run.notes)
    with pytest.raises(NiahError, match="--min-ctx: 2,000 is above the largest context that fits"):
        prepare_run(engine, NiahParams(min_ctx=2000, max_ctx=4000, ctx_steps=2), read_haystack())
    with pytest.raises(NiahError, match="cannot hold the needle"):
        prepare_run(engine, NiahParams(min_ctx=30, max_ctx=1000, ctx_steps=2), read_haystack())


# -- the haystack --------------------------------------------------------------------------------------------------
def test_short_haystack_is_repeated_and_the_summary_says_so(tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Cats sleep a lot. Dogs bark at night! Do birds sing? They do.\n")
    engine = FakeEngine(n_ctx=8192, responder=lambda p: "no")
    summary, records = run_all(engine, NiahParams(min_ctx=300, max_ctx=600, ctx_steps=2), tmp_path, short)
    assert summary["haystack"]["repeated"] and summary["haystack"]["copies"] > 5
    assert any("repeated" in note for note in summary["notes"])
    assert all(abs(r["doc_tokens"] - r["ctx"]) <= 2 for r in records)


def test_default_haystack_is_not_repeated_for_short_contexts(tmp_path: Path) -> None:
    engine = FakeEngine(n_ctx=8192)
    stream = build_stream(engine, read_haystack(), 5000)
    assert stream.copies == 1 and stream.file_tokens is None and len(stream.tokens) >= 5000
    assert len(stream.boundaries) > 30


@pytest.mark.parametrize("content, problem", [   # read by lcrun.documents, as `lcrun read` reads them
    (None, "no such file or folder"),
    (b"\x89PNG\r\n\x1a\n\0\0\0IHDR", "a binary file, not text"),
    ("caf\u00e9".encode("latin-1"), "not UTF-8 text"),
    (b"  \n\n \t", "empty: nothing to add"),
    ("folder", "no text files in this folder"),
])
def test_unusable_haystacks_are_one_line(tmp_path: Path, content: bytes | str | None, problem: str) -> None:
    path = tmp_path / "hay.txt"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(LcrunError) as err:
        read_haystack(path)
    assert str(err.value).startswith(f"{path}: {problem}")


def test_a_pdf_is_a_haystack_through_the_document_readers(tmp_path: Path) -> None:
    pages = [[sentence(3 * p + i) for i in range(3)] for p in range(3)]
    haystack = read_haystack(pdf_pages(tmp_path / "hay.pdf", pages))
    assert haystack.text.startswith("[page 1]") and "[page 3]" in haystack.text
    found = [haystack.text.find(sentence(i)) for i in range(9)]
    assert -1 not in found and found == sorted(found)            # every sentence, in reading order
    assert "<document" not in haystack.text                       # the text alone: the needle goes between sentences
    stream = build_stream(FakeEngine(n_ctx=8192), haystack, 2000)
    assert stream.copies > 1 and len(stream.boundaries) > 9 * stream.copies


def test_shipped_haystack_is_what_the_generator_writes_and_is_licensed() -> None:
    spec = importlib.util.spec_from_file_location("make_haystack", REPO / "benchmarks" / "make_haystack.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = default_haystack_path()
    text = shipped.read_text(encoding="utf-8")
    assert text == module.generate()
    assert 500_000 < len(text.encode()) <= 1_000_000 and text.isascii() and not re.search(r"\d", text)
    assert "CC0" in (shipped.parent / "README.md").read_text()


# -- the results log -----------------------------------------------------------------------------------------------
def test_results_log_writes_identity_then_one_line_per_cell(tmp_path: Path) -> None:
    engine = FakeEngine(n_ctx=8192, responder=lambda p: "no")
    run_all(engine, NiahParams(min_ctx=500, max_ctx=500, ctx_steps=1, depth_interval=0.5), tmp_path)
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"kind": "lcrun-niah-run", **IDENTITY}
    assert [(r["depth"], r["sample"]) for r in map(json.loads, lines[1:])] == [(1.0, 0), (0.5, 0), (0.0, 0)]


def test_existing_results_need_resume_or_force(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"kind": "lcrun-niah-run", **IDENTITY}) + "\n")
    with pytest.raises(NiahError, match=r"r.jsonl: results exist already: --resume to continue that run, --force"):
        ResultsLog(path, IDENTITY, resume=False, force=False)
    with pytest.raises(NiahError) as err:
        ResultsLog(path, {**IDENTITY, "seed": 3, "type_k": "q4_0"}, resume=True, force=False)
    assert str(err.value) == (f"{path}: results of a different run (seed 0 there, 3 now; type_k 'f16' there, "
                              "'q4_0' now): use another --output, or --force to start over")
    with ResultsLog(path, {**IDENTITY, "seed": 3}, resume=False, force=True) as log:
        log.append({"ctx": 1, "depth": 0.0, "sample": 0, "score": 1})
    header, cells, _ = read_log(path)
    assert header is not None and header["seed"] == 3 and len(cells) == 1


def test_resume_skips_finished_cells_and_cuts_a_torn_last_line(tmp_path: Path) -> None:
    params = NiahParams(min_ctx=500, max_ctx=1000, ctx_steps=2, depth_interval=0.5)
    first = FakeEngine(n_ctx=8192, responder=finds_shallow_needles_in_short_documents)
    before, records = run_all(first, params, tmp_path)
    path = tmp_path / "r.jsonl"
    whole = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(whole[:4]) + whole[4][:25])   # identity, 3 cells, a torn 4th
    header, cells, _ = read_log(path)
    assert header is not None and len(cells) == 3

    again = FakeEngine(n_ctx=8192, responder=finds_shallow_needles_in_short_documents)
    summary, redone = run_all(again, params, tmp_path, resume=True)
    assert [(r["ctx"], r["depth"]) for r in redone] == [(r["ctx"], r["depth"]) for r in records[3:]]
    assert len(again.calls) == 3
    lines = [json.loads(line) for line in path.read_text().splitlines()]   # every line whole again
    assert len(lines) == 1 + 6 and summary["complete"]
    assert [r["number"] for r in lines[1:]] == [r["number"] for r in records]
    assert summary["scores"] == before["scores"]


def test_a_log_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text("hello\n")
    with pytest.raises(NiahError, match="r.jsonl: line 1 is not JSON"):
        ResultsLog(path, IDENTITY, resume=True, force=False)
    path.write_text('{"ctx": 1}\n')
    with pytest.raises(NiahError, match="does not start with the run's parameters"):
        ResultsLog(path, IDENTITY, resume=True, force=False)


def test_needle_repr_fields() -> None:
    needle = Needle("12345678", "Oslo")
    assert needle.sentence == "The special magic Oslo number is: 12345678."
    assert needle.question.startswith("What is the special magic Oslo number")


# -- progress ------------------------------------------------------------------------------------------------------
def test_progress_bar_on_a_terminal_and_lines_elsewhere(tmp_path: Path) -> None:
    from lcrun.ui.niah_view import NiahProgress

    params = NiahParams(min_ctx=500, max_ctx=1000, ctx_steps=2, depth_interval=1.0)
    for terminal in (True, False):
        engine = FakeEngine(n_ctx=8192, responder=lambda p: "no")
        run = prepare_run(engine, params, read_haystack())
        console = Console(file=io.StringIO(), force_terminal=terminal, width=100, no_color=True)
        with ResultsLog(tmp_path / f"{terminal}.jsonl", IDENTITY, resume=False, force=False) as log, \
                NiahProgress(console, get_time=lambda: 0.0) as bar:
            for event in run_cells(engine, run, log):
                bar.update(event)
            task = bar.progress.tasks[0]
            assert task.completed == task.total == 500 + 500 + 1000 + 1000   # weighted by context length
        text = console.file.getvalue()  # type: ignore[attr-defined]
        assert ("cell 4/4: ctx 1,000 depth 0% sample 0: score 0" in text) is not terminal
