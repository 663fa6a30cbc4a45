"""`lcrun niah MODEL --suite ruler` end to end, and what plan, chat, serve and estimate make of its results.

The suite runs on llama.cpp over a GGUF of real vocabulary shape (tests/fixtures/realistic_gguf.py: Llama 3's 128K
tokens and 280K merges, one tiny random layer — its answers are noise, so the run checks the plumbing: the grid,
the shared documents, a run killed with SIGKILL and resumed, the results stored where `plan` reads them). The plan
views are checked against results a reader with a known memory produced through the suite's own runner
(tests/fixtures/ruler_answerers.py), stored under the file's fingerprint as the command stores them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lcrun.kv_types import KvType
from lcrun.niah.haystack import read_haystack
from lcrun.niah.results import ResultsLog, read_log
from lcrun.niah.ruler.run import SuiteParams, prepare_suite, run_suite
from lcrun.niah.ruler.summary import summarize
from lcrun.recall_store import fingerprint, load_recall, run_log_path, save_recall
from tests.fixtures.cli import assert_one_line_error, invoke
from tests.fixtures.engines import Engines
from tests.fixtures.realistic_gguf import write_realistic_gguf
from tests.fixtures.ruler_answerers import BpeTokenizer, ReaderModel, llama3_renderer

F16, Q4 = KvType.parse("f16"), KvType.parse("q4_0")
GRID = ["--lengths", "2k", "--samples", "1", "--kv-type", "f16", "--kv-type", "q8_0", "--threads", "1"]


@pytest.fixture(scope="module")
def llama3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_realistic_gguf(tmp_path_factory.mktemp("realistic") / "llama3.gguf", "llama3")


@pytest.fixture(scope="module")
def reader_summary(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """What the suite measures of a reader that remembers the last 2,560 tokens with q4_0 KV and everything with
    f16: effective contexts 2,560 and ≥ 3,584."""
    folder = tmp_path_factory.mktemp("reader")
    tokenizer = BpeTokenizer(folder)
    suite = prepare_suite(tokenizer, llama3_renderer(), read_haystack(),
                          SuiteParams(lengths=(2048, 2560, 3584), kv_types=(F16, Q4), samples=1))
    with ResultsLog(folder / "r.jsonl", {"seed": 0}, resume=False, force=False) as log:
        run_suite(ReaderModel(tokenizer, {"q4_0": 2560}), suite, log)
    summary = summarize(suite, log.done, model="reader", results="r.jsonl", settings={})
    assert [e["effective_context"] for e in summary["kv_types"]] == [3584, 2560]
    return summary


def cells_of(path: Path) -> dict[tuple, dict]:
    _header, cells, _end = read_log(path)
    return {(c["kv"], c["ctx"], c["task"], c["sample"]): c for c in cells}


@pytest.mark.slow
def test_a_real_engine_run_completes_resumes_after_sigkill_and_plan_reads_it(llama3: Path, tmp_path: Path) -> None:
    # negative control: before any run, plan has nothing measured to show or warn about for this file
    before = invoke("plan", str(llama3), "--ctx", "4k", "--kv-type", "q8_0", "--ram", "8G")
    assert before.exit_code == 0 and "warning: planned" not in before.stdout and "measured recall" not in before.stdout
    assert json.loads(invoke("plan", str(llama3), "--ctx", "4k", "--ram", "8G", "--json").stdout)["recall"] is None
    whole_log = tmp_path / "whole.jsonl"
    whole = invoke("niah", str(llama3), "--suite", "ruler", *GRID, "-o", str(whole_log), "--json")
    assert whole.exit_code == 0, whole.stderr
    summary = json.loads(whole.stdout)
    assert summary["complete"] and summary["lengths"] == [2048] and summary["cells_done"] == 12
    assert [e["kv"] for e in summary["kv_types"]] == ["f16", "q8_0"]
    assert all(e["effective_context"] == 0 and e["first_failing"] == 2048 for e in summary["kv_types"])  # noise
    assert "about" in whole.stderr and "to go, at the first cell's speed" in whole.stderr
    cells = cells_of(whole_log)
    for kv in ("f16", "q8_0"):   # the questions after the first on a document found it in the engine's cache
        first, later = cells[(kv, 2048, "single", 0)], cells[(kv, 2048, "vt", 0)]
        assert first["prefilled_tokens"] == first["prompt_tokens"] > later["doc_tokens"] > 1000
        assert later["prefilled_tokens"] < 300
    assert cells[("f16", 2048, "vt", 0)]["expected"] == cells[("q8_0", 2048, "vt", 0)]["expected"]  # same needles

    # the default log (keyed by the file's fingerprint), killed after the 5th cell in a child process
    log = run_log_path(fingerprint(llama3))
    proc = subprocess.Popen([sys.executable, "-m", "lcrun.cli", "niah", str(llama3), "--suite", "ruler", *GRID],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and log.read_bytes().count(b"\n") >= 1 + 5:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed = cells_of(log)
    assert 5 <= len(killed) < 12
    again = invoke("niah", str(llama3), "--suite", "ruler", *GRID)
    assert again.exit_code == 1 and "--resume to continue that run" in again.stderr   # never overwritten silently
    resumed = invoke("niah", str(llama3), "--suite", "ruler", *GRID, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert f"({len(killed)} done before)" in resumed.stderr
    done = cells_of(log)
    assert all(done[key] == cell for key, cell in killed.items())      # what was finished is kept as it was
    assert done.keys() == cells.keys()
    for key, cell in cells.items():   # and the resumed run asked the same questions and got the same answers
        assert (done[key]["expected"], done[key]["answer"], done[key]["score"]) == \
               (cell["expected"], cell["answer"], cell["score"]), key

    # stored under the file's fingerprint, where plan reads it
    stored = load_recall(fingerprint(llama3))
    assert stored is not None and sorted(stored.by_kv) == ["f16", "q8_0"]
    plan = invoke("plan", str(llama3), "--ctx", "4k", "--kv-type", "q8_0", "--ram", "8G")
    assert plan.exit_code == 0, plan.stderr
    assert "warning: planned 4K with q8_0 KV; measured recall falls below 85.6 already at 2K with q8_0" in plan.stdout
    as_json = json.loads(invoke("plan", str(llama3), "--ctx", "4k", "--ram", "8G", "--json").stdout)
    assert as_json["recall"]["measured"]["length_scores"] == {"2048": 0.0}


def test_the_plan_views_show_the_measured_context_and_warn_beyond_it(llama3: Path, tiny_gguf: Path,
                                                                    reader_summary: dict, engines: Engines) -> None:
    engines.refuse()
    save_recall(fingerprint(llama3), llama3.name, reader_summary)
    beyond = ["--ctx", "3584", "--kv-type", "q4_0", "--ram", "8G"]
    warning = ("warning: planned 3,584 with q4_0 KV; measured recall falls below 85.6 beyond 2,560 with q4_0, good "
               "up to 3,584 with f16 — try -ctk f16 -ctv f16 -c 3584")
    for command in (["plan"], ["chat", "--dry-run"], ["serve", "--dry-run"]):
        result = invoke(command[0], str(llama3), *command[1:], *beyond)
        assert result.exit_code == 0, result.stderr
        assert warning in " ".join(result.stdout.split()), command
    within = json.loads(invoke("plan", str(llama3), "--ctx", "2k", "--kv-type", "q4_0", "--ram", "8G",
                               "--json").stdout)["recall"]
    assert within["warning"] is None                                            # negative control: within it
    assert within["note"] == "measured effective context 2,560 with q4_0 KV (suite score ≥ 85.6)"
    chat = invoke("chat", str(llama3), "--dry-run", "--ctx", "2k", "--kv-type", "q4_0", "--ram", "8G")
    assert "measured effective context 2,560 with q4_0 KV" in chat.stdout and "warning" not in chat.stdout
    # serve's slots: the advice compares one slot's context (2 × 2,048 in all, 2,048 each: within)
    slots = invoke("serve", str(llama3), "--dry-run", "--ctx", "4k", "-np", "2", "--kv-type", "q4_0", "--ram", "8G")
    assert "measured effective context 2,560 with q4_0 KV" in slots.stdout and "warning" not in slots.stdout

    estimate = json.loads(invoke("estimate", str(llama3), "--kv-type", "f16", "--kv-type", "q4_0", "--ctx", "8k",
                                 "--ram", "8G", "--json").stdout)["recall"]
    assert [m["kv"] for m in estimate["measured"]["kv_types"]] == ["f16", "q4_0"]
    assert [(a["kv"], a["planned_ctx"], a["warning"] is not None) for a in estimate["advice"]] == \
           [("f16", 131072, True), ("q4_0", 131072, True)]                   # the largest context that fits: 128K
    # another file was never measured: no advice, no line
    other = json.loads(invoke("plan", str(tiny_gguf), "--ctx", "1k", "--ram", "8G", "--json").stdout)
    assert other["recall"] is None
    assert "measured" not in invoke("chat", str(tiny_gguf), "--dry-run", "--ctx", "1k", "--ram", "8G").stdout


def test_ctx_effective_plans_the_longest_context_measured_good(llama3: Path, tiny_gguf: Path, reader_summary: dict,
                                                               engines: Engines, tmp_path: Path) -> None:
    engines.refuse()
    unmeasured = invoke("plan", str(llama3), "--ctx", "effective", "--ram", "8G")
    assert_one_line_error(unmeasured, str(llama3), "run lcrun niah FILE --suite ruler first")
    assert_one_line_error(invoke("chat", str(llama3), "--ctx", "effective", "--dry-run", "--ram", "8G"),
                          "run lcrun niah FILE --suite ruler first")
    save_recall(fingerprint(llama3), llama3.name, reader_summary)
    plan = json.loads(invoke("plan", str(llama3), "--ctx", "effective", "--ram", "8G", "--json").stdout)
    assert (plan["ctx"], plan["type_k"], plan["type_v"]) == (3584, "f16", "f16")
    assert plan["why"].startswith("--ctx effective: 3,584 measured good with f16 KV; fits at the requested")
    assert plan["recall"]["warning"] is None
    q4 = json.loads(invoke("plan", str(llama3), "--ctx", "effective", "--kv-type", "q4_0", "--ram", "8G",
                           "--json").stdout)
    assert (q4["ctx"], q4["type_k"], q4["type_v"]) == (2560, "q4_0", "q4_0")
    chat = invoke("chat", str(llama3), "--ctx", "effective", "--dry-run", "--ram", "8G")
    assert "context 3,584 tokens · KV f16" in chat.stdout
    # with documents (--ctx auto's territory) the measured context is a ceiling like -c: never sized beyond it
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    small.write_text("A short note about the harbour.\n")
    big.write_text("The harbour master counted the boats again. " * 200)   # ~9K tokens in this vocabulary
    one_shot = ["chat", str(llama3), "--ctx", "effective", "--dry-run", "--ram", "8G", "-p", "Where?", "-n", "64"]
    fits = invoke(*one_shot, "-f", str(small))
    assert fits.exit_code == 0, fits.stderr
    assert "context 3,584 tokens · KV f16" in fits.stdout
    assert_one_line_error(invoke(*one_shot, "-f", str(big)), "big.txt: does not fit -c 3584")
    serve = invoke("serve", str(llama3), "--ctx", "effective", "-np", "2", "--dry-run", "--ram", "8G")
    assert "context 7,168 tokens" in serve.stdout and "2 slots · 3,584 tokens each" in serve.stdout
    never = invoke("plan", str(llama3), "--ctx", "effective", "--kv-type", "q8_0", "--ram", "8G")
    assert_one_line_error(never, "recall was not measured with q8_0 KV", "measured: f16, q4_0")
    profile = invoke("plan", "llama-3.1-8b", "--ctx", "effective")
    assert_one_line_error(profile, "--ctx effective needs a local GGUF file")


@pytest.mark.parametrize(("args", "needle"), [
    (["--suite", "ruler", "--depth-interval", "0.1"], "--depth-interval is for --suite needle"),
    (["--kv-type", "f16", "--kv-type", "q8_0"], "--suite ruler takes several"),
    (["--lengths", "2k"], "--lengths is for --suite ruler"),
    (["--suite", "ruler", "--tasks", "single,bogus"], "'bogus' is not a task"),
    (["--suite", "ruler", "--lengths", "2k", "--max-ctx", "4k"], "--lengths gives every length"),
    (["--suite", "ruler", "--lengths", "300"], "300 tokens cannot hold"),
    (["--suite", "ruler", "--max-ctx", "1k"], "is below the shortest length 4,096"),
    (["--suite", "ruler", "--kv-type", "q8_0", "-ctk", "q4_0", "--kv-type", "f16"], "not -ctk/-ctv"),
])
def test_bad_suite_options_are_one_line(llama3: Path, engines: Engines, tmp_path: Path, args: list[str],
                                        needle: str) -> None:
    engines.refuse()
    result = invoke("niah", str(llama3), *args, "-o", str(tmp_path / "r.jsonl"))
    assert_one_line_error(result, needle)
    assert not (tmp_path / "r.jsonl").exists()


def test_models_and_estimate_carry_rulers_published_figures() -> None:
    profiles = {p["name"]: p for p in json.loads(invoke("models", "--json").stdout)}
    llama = next(p for name, p in profiles.items() if "3.1" in name and "8" in name)
    assert llama["ruler"]["effective_context"] == 32768 and llama["ruler"]["advertised_context"] == 131072
    assert "2404.06654" in llama["ruler"]["source"]
    assert sum(p["ruler"] is None for p in profiles.values()) >= 1          # only the models RULER published
    estimate = json.loads(invoke("estimate", llama["name"], "--ctx", "32k", "--ram", "64G", "--json").stdout)
    assert estimate["recall"]["published"]["effective_context"] == 32768 and estimate["recall"]["measured"] is None
