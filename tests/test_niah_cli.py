"""`lcrun niah` end to end: through lcrun's real entry point with the fake engine (scores on purpose) and with
llama.cpp on the tiny demo model (plumbing, prefix reuse, resume, output files; its scores are noise), needle
placement measured with the real tokenizer, a run killed with SIGKILL and resumed, and bad input as one line."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lcrun.cli import cli
from lcrun.engine.runtime import Engine, EngineConfig
from lcrun.niah.grid import Cell
from lcrun.niah.haystack import read_haystack
from lcrun.niah.prompt import needle_for
from lcrun.niah.run import NiahParams, prepare_run
from lcrun.niah_cli import niah
from tests.fixtures.cli import invoke
from tests.fixtures.engines import Engines
from tests.fixtures.fake_engine import FakeEngine
from tests.fixtures.niah_responders import finds_shallow_needles_in_short_documents

RUN_NIAH = ("import sys; from lcrun.cli import cli, main; from lcrun.niah_cli import niah; "
            "cli.commands.setdefault('niah', niah); main(sys.argv[1:])")


@pytest.fixture(scope="module")
def model(demo_gguf_file: Path) -> Path:
    return demo_gguf_file


@pytest.fixture(autouse=True)
def _niah_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.commands, "niah", niah)


def run(*args: str | Path):  # type: ignore[no-untyped-def]
    return invoke("niah", *map(str, args))


@pytest.fixture
def fake_engines(engines: Engines) -> Engines:
    # one token per character: four times the planned context holds what the plan's tokens would
    engines.use(lambda config: FakeEngine(n_ctx=4 * config.n_ctx, responder=finds_shallow_needles_in_short_documents))
    return engines


def cells_in(path: Path) -> list[dict]:
    lines = path.read_bytes().split(b"\n")
    whole = [json.loads(line) for line in lines[:-1]]        # a torn last line is not a result
    assert whole[0]["kind"] == "lcrun-niah-run"
    return whole[1:]


# -- the fake engine: what the heatmap and the JSON say -------------------------------------------------------------
def test_json_heatmap_and_pictures_say_what_the_model_found(model: Path, fake_engines: list, tmp_path: Path) -> None:
    out = tmp_path / "run.jsonl"
    result = run(model, "--min-ctx", "2000", "--max-ctx", "5000", "--ctx-steps", "4", "-o", out,
                 "--json", "--svg", tmp_path / "h.svg", "--html", tmp_path / "h.html")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["scores"] == [[1.0, 1.0, 0.0, 0.0]] * 3 + [[0.0] * 4] * 3
    assert summary["score"] == 0.25 and summary["complete"]
    assert summary["engine"]["type_k"] == "f16" and summary["model"] == "demo.gguf"
    assert json.loads((tmp_path / "run.summary.json").read_text()) == summary
    assert len(cells_in(out)) == 24
    heat = {m.group(1): m.group(2).split() for m in re.finditer(r"^\s*(\d+%) (.*)$", result.stderr, re.M)}
    assert heat["0%"] == heat["40%"] == ["100", "100", "0", "0", "50"] and heat["100%"] == ["0"] * 5
    assert "score 25%" in result.stderr and "cell 24/24" in result.stderr
    svg, html = (tmp_path / "h.svg").read_text(), (tmp_path / "h.html").read_text()
    assert svg.startswith("<svg") and "#d73027" in svg.lower() and "#1a9850" in svg.lower()  # red and green cells
    assert "<html" in html and "#1a9850" in html.lower()


def test_without_json_the_heatmap_is_on_stdout(model: Path, fake_engines: list, tmp_path: Path) -> None:
    result = run(model, "--min-ctx", "500", "--max-ctx", "800", "--ctx-steps", "2", "-o", tmp_path / "r.jsonl")
    assert result.exit_code == 0, result.output
    assert "needle in a haystack · demo.gguf · KV f16" in result.stdout and "100%" in result.stdout
    assert "cell 12/12" in result.stderr and "needle in a haystack" not in result.stderr


def test_ctrl_c_keeps_the_finished_cells_and_resume_completes_them(model: Path, engines: Engines,
                                                                   tmp_path: Path) -> None:
    calls = []

    def interrupt_the_third_cell(i: int) -> None:   # a real SIGINT as the third answer starts
        if i == 0:
            calls.append(i)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGINT)

    engines.use(lambda config: FakeEngine(n_ctx=4 * config.n_ctx, responder=lambda p: "42",
                                          on_token=interrupt_the_third_cell))
    out = tmp_path / "r.jsonl"
    grid = ["--min-ctx", "500", "--max-ctx", "800", "--ctx-steps", "2", "-o", out]
    stopped = run(model, *grid)
    assert stopped.exit_code == 130
    assert stopped.stderr.splitlines()[-1] == (f"error: interrupted; 2 finished cells are in {out} "
                                               "(continue with --resume)")
    assert len(cells_in(out)) == 2
    calls.clear()
    resumed = run(model, *grid, "--resume")
    assert resumed.exit_code == 130 and len(cells_in(out)) == 4   # interrupted again, at its third cell
    engines.use(lambda config: FakeEngine(n_ctx=4 * config.n_ctx))
    finished = run(model, *grid, "--resume")
    assert finished.exit_code == 0 and "resuming: 4 of 12 cells already done" in finished.stderr
    assert len({(c["ctx"], c["depth"]) for c in cells_in(out)}) == len(cells_in(out)) == 12


# -- bad input: one line, before the model loads ------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["nope.gguf"], "error: nope.gguf: no such file"),
    (["{model}", "--haystack", "{tmp}/missing.txt"], "error: {tmp}/missing.txt: no such file or folder"),
    (["{model}", "--haystack", "{model}"], "error: {model}: a binary file, not text"),
    (["{model}", "--depth-interval", "1.5"], "error: --depth-interval: 1.5 is out of range (above 0.0, at most 1.0)"),
    (["{model}", "--depth-interval", "0"], "error: --depth-interval: 0 is out of range"),
    (["{model}", "--min-ctx", "4k", "--max-ctx", "1k"], "error: --min-ctx: 4,096 is above --max-ctx 1,024"),
    (["{model}", "--min-ctx", "1500", "--max-ctx", "1900", "--ctx", "256"],
     "error: --min-ctx: 1,500 is above the largest context that fits"),
    (["{model}", "--ctx-steps", "3", "--ctx-interval", "100"],
     "error: --ctx-interval: cannot be combined with --ctx-steps"),
    (["{model}", "--min-ctx", "lots"], "error: Invalid value for '--min-ctx': 'lots' is not a context length"),
])
def test_bad_input_is_one_line(model: Path, fake_engines: list, tmp_path: Path, args: list[str],
                               message: str) -> None:
    fill = {"model": str(model), "tmp": str(tmp_path)}
    result = run(*[a.format(**fill) for a in args], "-o", tmp_path / "r.jsonl")
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines()[-1].startswith(message.format(**fill)), result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "r.jsonl").exists()
    if "largest context" not in message:
        assert fake_engines == []   # refused before loading anything


def test_existing_results_are_refused_unless_resume_or_force(model: Path, fake_engines: list,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    grid = ["--min-ctx", "500", "--max-ctx", "800", "--ctx-steps", "2", "-o", str(out)]
    assert run(model, *grid).exit_code == 0
    again = run(model, *grid)
    assert again.exit_code == 1
    assert again.stderr.splitlines()[-1] == (f"error: {out}: results exist already: --resume to continue that run, "
                                             "--force to start over")
    other = run(model, *grid, "--resume", "--seed", "5")
    assert other.exit_code == 1
    assert other.stderr.splitlines()[-1] == (f"error: {out}: results of a different run (seed 0 there, 5 now): use "
                                             "another --output, or --force to start over")
    rope = run(model, *grid, "--resume", "--rope-theta", "20000", "--digits", "6")
    assert "(digits 8 there, 6 now; rope_theta None there, 20000.0 now)" in rope.stderr
    assert len(fake_engines) == 1
    done = run(model, *grid, "--resume")
    assert done.exit_code == 0 and "resuming: 12 of 12 cells already done" in done.stderr
    assert len(cells_in(out)) == 12
    forced = run(model, *grid, "--force", "--seed", "5")
    assert forced.exit_code == 0 and len(cells_in(out)) == 12
    assert json.loads(out.read_text().split("\n")[0])["seed"] == 5


# -- the real engine ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(model: Path):  # type: ignore[no-untyped-def]
    eng = Engine(EngineConfig(model_path=model, n_ctx=2048, n_threads=1, n_batch=512, n_ubatch=512))
    yield eng
    eng.close()


@pytest.mark.parametrize("ctx", [300, 1700])
def test_needle_placement_measured_with_the_models_tokenizer(engine: Engine, ctx: int) -> None:
    run_ = prepare_run(engine, NiahParams(min_ctx=ctx, max_ctx=ctx, ctx_steps=1), read_haystack())
    for depth in (0.0, 0.2, 0.5, 0.8, 1.0):
        cell = Cell(ctx, depth, 0)
        needle = needle_for(cell, 0, 8)
        prompt = run_.builder.build(run_.stream, cell, needle)
        doc = engine.detokenize(prompt.tokens[prompt.doc_start: prompt.doc_start + prompt.doc_tokens])
        assert abs(len(engine.tokenize(doc, special=False)) - ctx) <= 3
        assert doc.count(needle.sentence) == 1
        before, after = doc.split(needle.sentence)
        if depth == 0.0:
            assert before == ""
        elif depth == 1.0:
            assert after == ""
        else:
            assert re.search(r"([.!?]\s*|\n)$", before) and after[:1].isspace()
            length = ctx - run_.builder.needle_length(needle)      # the haystack's part of the context
            target = depth * length
            assert prompt.needle_at in run_.stream.boundaries
            assert all(abs(prompt.needle_at - target) <= abs(b - target) for b in run_.stream.boundaries
                       if b <= length)                             # no sentence start is nearer the depth
            assert abs(prompt.depth_actual - depth) < (0.12 if ctx < 1000 else 0.03)
        # the prompt is what tokenizing the rendered chat would give, up to a token or two at the needle's edges
        rendered = run_.builder.template.render([{"role": "user", "content": f"{doc}\n\n{needle.question}"}])
        assert rendered.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
        whole = engine.tokenize(rendered, special=True)
        assert abs(len(whole) - len(prompt.tokens)) <= 3
        assert whole[: prompt.doc_start] == prompt.tokens[: prompt.doc_start]
        assert whole[-20:] == prompt.tokens[-20:]


def test_real_engine_runs_a_small_grid_and_resumes(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "real.jsonl"
    grid = [model, "--ctx", "1024", "--kv-type", "f16", "--threads", "1", "--min-ctx", "200", "--max-ctx", "900",
            "--ctx-steps", "2", "--depth-interval", "0.5", "--digits", "6", "-o", out]
    first = run(*grid, "--svg", tmp_path / "h.svg")
    assert first.exit_code == 0, first.output
    cells = cells_in(out)
    assert [(c["ctx"], c["depth"]) for c in cells] == [(200, 1.0), (200, 0.5), (200, 0.0),
                                                       (900, 1.0), (900, 0.5), (900, 0.0)]
    assert all(len(c["number"]) == 6 and c["score"] in (0, 1) for c in cells)
    assert all(abs(c["doc_tokens"] - c["ctx"]) <= 2 for c in cells)
    assert cells[1]["reused_tokens"] >= cells[1]["needle_at"] > 0      # llama.cpp kept the shared prefix
    assert cells[4]["reused_tokens"] >= cells[4]["needle_at"] > 0
    summary = json.loads((tmp_path / "real.summary.json").read_text())
    assert summary["complete"] and summary["engine"]["n_ctx"] == 1024 and summary["contexts"] == [200, 900]
    assert (tmp_path / "h.svg").read_text().startswith("<svg")
    again = run(*grid, "--resume")
    assert again.exit_code == 0 and "resuming: 6 of 6 cells already done" in again.stderr
    assert cells_in(out) == cells


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_redoes_nothing_and_loses_nothing(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed.jsonl"
    args = ["niah", str(model), "--ctx", "512", "--kv-type", "f16", "--threads", "1", "--min-ctx", "100",
            "--max-ctx", "400", "--ctx-steps", "4", "--depth-interval", "0.25", "--digits", "4", "--samples", "3",
            "-o", str(out)]
    total = 4 * 5 * 3
    proc = subprocess.Popen([sys.executable, "-c", RUN_NIAH, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 1 + 3:   # identity + at least 3 cells
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()  # type: ignore[union-attr]
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    before = cells_in(out)
    assert 3 <= len(before) < total

    resumed = subprocess.run([sys.executable, "-c", RUN_NIAH, *args, "--resume"], capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {len(before)} of {total} cells already done" in resumed.stderr
    after = cells_in(out)
    keys = [(c["ctx"], c["depth"], c["sample"]) for c in after]
    assert len(keys) == len(set(keys)) == total                # nothing redone, nothing lost
    assert after[: len(before)] == before                      # the finished cells kept as they were
    assert re.findall(r"cell (\d+)/", resumed.stderr) == [str(n) for n in range(len(before) + 1, total + 1)]
