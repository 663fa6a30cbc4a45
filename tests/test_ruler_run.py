"""The RULER-style suite's runner, summary and heatmap with readers behind its Protocols (tests/fixtures/
ruler_answerers.py): a reader that remembers only the last N tokens of its prompt measures an effective context of
N and draws the planner's warning, a perfect reader neither; documents are prefilled once for five tasks; a killed
run resumes with the cells it lacks and ends where an uninterrupted run does."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from lcrun.kv_types import KvType
from lcrun.niah import NiahError
from lcrun.niah.haystack import read_haystack
from lcrun.niah.results import ResultsLog, read_log
from lcrun.niah.ruler.run import (CellDone, CellStarted, KvLoading, Suite, SuiteParams, SuitePlanned, prepare_suite,
                                  run_identity, run_suite)
from lcrun.niah.ruler.summary import effective_context, summarize
from lcrun.niah.ruler.tasks import ESSAY_TASKS, TASKS
from lcrun.recall_advice import advise
from lcrun.recall_store import load_recall, save_recall
from lcrun.ui.ruler_view import SuiteProgress, render_summary
from tests.fixtures.ruler_answerers import BpeTokenizer, ReaderModel, llama3_renderer

F16, Q4 = KvType.parse("f16"), KvType.parse("q4_0")
LENGTHS = (2048, 2560, 3584)
WINDOW = 2560


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> BpeTokenizer:
    return BpeTokenizer(tmp_path_factory.mktemp("bpe"))


def suite_of(tokenizer: BpeTokenizer, **params: object) -> Suite:
    return prepare_suite(tokenizer, llama3_renderer(), read_haystack(),
                         SuiteParams(**{"lengths": LENGTHS, "kv_types": (F16, Q4), "samples": 2, **params}))


def run(model: ReaderModel, suite: Suite, path: Path, *, resume: bool = False, events: list | None = None) -> dict:
    with ResultsLog(path, {"suite": "ruler", "seed": suite.params.seed}, resume=resume, force=False) as log:
        try:
            run_suite(model, suite, log, on_event=(events.append if events is not None else lambda e: None))
        finally:
            summary = summarize(suite, log.done, model="reader.gguf", results=str(path), settings={})
    return summary


def test_a_reader_that_remembers_n_tokens_has_an_effective_context_of_n(tokenizer: BpeTokenizer,
                                                                        tmp_path: Path) -> None:
    suite = suite_of(tokenizer)
    summary = run(ReaderModel(tokenizer, {"q4_0": WINDOW}), suite, tmp_path / "r.jsonl")
    f16, q4 = summary["kv_types"]
    assert f16["length_scores"] == [100.0, 100.0, 100.0]                 # perfect memory: every task, every length
    assert (f16["effective_context"], f16["first_failing"]) == (3584, None)
    assert q4["length_scores"][:2] == [100.0, 100.0] and q4["length_scores"][2] < 85.6
    assert (q4["effective_context"], q4["first_failing"]) == (WINDOW, 3584)
    # beyond its memory the reader loses needles, not the aggregate: common words stay found in what it sees
    assert q4["scores"]["cwe"][2] == 100.0 and min(q4["scores"][t][2] for t in ESSAY_TASKS) < 85.6
    assert summary["line"] == ("effective context: ≥3,584 with f16 KV (no measured length failed), 2,560 with "
                               "q4_0 (threshold 85.6)")
    assert summary["complete"] and summary["cells_done"] == 2 * 3 * 2 * 6
    # --json: one summary; per KV type the score of each task at each length, and the effective context in tokens
    shape = json.loads(json.dumps(summary))
    assert shape["lengths"] == list(LENGTHS) and shape["tasks"] == list(TASKS)
    assert all(len(shape["kv_types"][0]["scores"][t]) == len(LENGTHS) for t in TASKS)
    assert shape["kv_types"][1]["effective_context"] == WINDOW

    # stored under the file's fingerprint, then read back by the planner side: the warning and its fix
    save_recall("f" * 32, "reader.gguf", summary)
    recall = load_recall("f" * 32)
    assert recall is not None and recall.get(Q4).effective_context == WINDOW
    warned = advise(recall, 3584, Q4)
    assert warned.warning == ("planned 3,584 with q4_0 KV; measured recall falls below 85.6 beyond 2,560 with "
                              "q4_0, good up to 3,584 with f16 — try -ctk f16 -ctv f16 -c 3584")
    fitting = advise(recall, 3584, Q4, fits=lambda ctx, kv: kv == Q4 or ctx <= 3072)
    assert fitting.warning.endswith("— try -ctk f16 -ctv f16 -c 3k") and fitting.suggestion == (3072, F16)
    # negative controls: the perfect reader's KV type, and a plan within what was measured good, draw no warning
    assert advise(recall, 3584, F16).warning is None
    assert advise(recall, WINDOW, Q4).warning is None
    assert advise(recall, 2048, Q4).note == "measured effective context 2,560 with q4_0 KV (suite score ≥ 85.6)"


def test_documents_are_prefilled_once_for_the_five_essay_tasks(tokenizer: BpeTokenizer, tmp_path: Path) -> None:
    events: list = []
    suite = suite_of(tokenizer, kv_types=(F16,), samples=1)
    model = ReaderModel(tokenizer)
    summary = run(model, suite, tmp_path / "r.jsonl", events=events)
    records = [e.record for e in events if isinstance(e, CellDone)]
    starts = {(e.cell.ctx, e.cell.task): e for e in events if isinstance(e, CellStarted)}
    for r in records:
        started = starts[(r["ctx"], r["task"])]
        if r["task"] in ESSAY_TASKS[1:]:
            # the document came from the cache: only the question, the format's close and the answer's start
            assert r["prefilled_tokens"] == r["prompt_tokens"] - started.cached_tokens < 200
            assert started.cached_tokens >= r["doc_tokens"]
        else:
            assert r["prefilled_tokens"] > 0.9 * r["doc_tokens"]
    prefill = summary["prefill"]
    assert prefill["prompt_tokens"] == sum(r["prompt_tokens"] for r in records)
    assert prefill["prefilled_tokens"] == sum(r["prefilled_tokens"] for r in records)
    assert prefill["saved"] > 2.6      # 6 prompts, 2 documents: below 3 by the questions' tails
    planned = events[0]
    assert isinstance(planned, SuitePlanned) and planned.prompt_tokens / planned.prefill_tokens > 2.6
    assert [type(e) for e in events[:2]] == [SuitePlanned, KvLoading] and model.loads == [("f16", 3584)]


def test_a_killed_run_resumes_with_the_cells_it_lacks(tokenizer: BpeTokenizer, tmp_path: Path) -> None:
    suite = suite_of(tokenizer)
    whole = run(ReaderModel(tokenizer, {"q4_0": WINDOW}), suite, tmp_path / "whole.jsonl")

    answered = []

    def kill_at_the_40th() -> None:
        if len(answered) == 39:
            raise KeyboardInterrupt
        answered.append(1)

    path = tmp_path / "killed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run(ReaderModel(tokenizer, {"q4_0": WINDOW}, on_answer=kill_at_the_40th), suite, path)
    _header, cells, _end = read_log(path)
    assert len(cells) == 39
    with path.open("ab") as f:
        f.write(b'{"kv": "q4_0", "ctx": 35')       # and a torn line, as a kill mid-write leaves
    events: list = []
    model = ReaderModel(tokenizer, {"q4_0": WINDOW})
    resumed = run(model, suite, path, resume=True, events=events)
    assert events[0].done == 39 and len(events[0].todo) == 72 - 39
    assert model.loads == [("q4_0", 3584)]               # f16 was finished before the kill: not loaded again
    assert sum(isinstance(e, CellDone) for e in events) == 72 - 39
    assert [e["length_scores"] for e in resumed["kv_types"]] == [e["length_scores"] for e in whole["kv_types"]]
    assert resumed["line"] == whole["line"] and resumed["complete"]
    _header, cells, _end = read_log(path)
    assert len(cells) == 72


def test_resuming_with_another_seed_is_refused(tokenizer: BpeTokenizer, tmp_path: Path) -> None:
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"GGUF")
    haystack = read_haystack()
    first = run_identity(model_file, "f" * 32, haystack, SuiteParams(lengths=LENGTHS, seed=1), {"flash_attn": True})
    path = tmp_path / "r.jsonl"
    with ResultsLog(path, first, resume=False, force=False) as log:
        log.append({"kv": "f16", "ctx": 2048, "task": "single", "sample": 0, "score": 1.0})
    other = run_identity(model_file, "f" * 32, haystack, SuiteParams(lengths=LENGTHS, seed=2), {"flash_attn": True})
    with pytest.raises(NiahError, match="seed 1 there, 2 now"):
        ResultsLog(path, other, resume=True, force=False)


def test_effective_context_needs_every_shorter_length_to_pass() -> None:
    lengths = [4096, 8192, 16384, 32768]
    assert effective_context(lengths, [95.5, 93.8, 91.6, 87.4]) == (32768, None)
    assert effective_context(lengths, [95.5, 84.0, 91.6, 87.4]) == (4096, 8192)    # a later pass does not count
    assert effective_context(lengths, [85.6, 85.59, None, None]) == (4096, 8192)   # at least the threshold
    assert effective_context(lengths, [80.0, 90.0, 90.0, 90.0]) == (0, 4096)
    assert effective_context(lengths, [None, 90.0, 90.0, 90.0]) == (None, None)
    assert effective_context(lengths, [90.0, None, 20.0, 90.0]) == (4096, None)    # not measured yet: stop there


def test_heatmap_and_progress_render_from_the_results(tokenizer: BpeTokenizer, tmp_path: Path) -> None:
    suite = suite_of(tokenizer, lengths=(2048, 2560), kv_types=(Q4,), samples=1)
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False, no_color=True, highlight=False)
    model = ReaderModel(tokenizer, {"q4_0": 1900})
    with SuiteProgress(console) as progress, \
            ResultsLog(tmp_path / "r.jsonl", {"seed": 0}, resume=False, force=False) as log:
        run_suite(model, suite, log, on_event=progress.update)
    summary = summarize(suite, log.done, model="reader.gguf", results="r.jsonl", settings={})
    render_summary(summary, console)
    text = out.getvalue()
    assert text.startswith("12 of 12 cells to run · about ")
    assert "cell 12/12: KV q4_0 ctx 2,560 cwe sample 0: 100%" in text
    assert "RULER-style suite · reader.gguf · KV q4_0 · effective context 2K" in text
    for label in ("single needle", "multi-key", "multi-value", "multi-query", "variable tracking", "common words"):
        assert label in text
    assert "suite" in text and "  100.0 " in text
    assert text.rstrip().endswith(summary["line"]) and summary["line"].startswith("effective context: 2K with q4_0")
