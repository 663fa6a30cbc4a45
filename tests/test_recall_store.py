"""Measured recall, stored per model file and used by the plan views: the fingerprint (cheap on a file of any size,
blind to name and path, changed by the header or a sampled block), the store's round trip and merge, its damaged
files, the planner's warning in the issue's own example, `--ctx effective`, and the published RULER figures of the
built-in profiles."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from lcrun.kv_types import KvType, least_lossy_first
from lcrun.models import find_profile, load_profiles, published_recall
from lcrun.recall_advice import KvRecall, StoredRecall, advise, best_measured, ctx_flag, ctx_label
from lcrun.recall_store import (RecallStoreError, fingerprint, load_recall, measured_for, save_recall, store_dir,
                                store_path)
from lcrun.ui.ruler_view import render_recall_advice

K = 1024
Q8, Q4, F16, Q8Q4 = (KvType.parse(t) for t in ("q8_0", "q4_0", "f16", "q8_0/q4_0"))


def gguf_like(path: Path, size: int, seed: int = 0) -> Path:
    """A sparse file of `size` bytes with a header and a few marked places (no real GGUF needed: only bytes)."""
    with open(path, "wb") as f:
        f.write(b"GGUF" + bytes([seed]) * 4096)
        f.truncate(size)
    return path


def test_fingerprint_ignores_name_and_path_but_not_content(tmp_path: Path) -> None:
    size = 3 << 30   # sparse: 3 GiB that take no disk, read 1.6 MiB of them
    a = gguf_like(tmp_path / "a.gguf", size)
    (tmp_path / "moved").mkdir()
    b = gguf_like(tmp_path / "moved" / "renamed.gguf", size)
    assert fingerprint(a) == fingerprint(b) and len(fingerprint(a)) == 32
    assert fingerprint(gguf_like(tmp_path / "h.gguf", size, seed=1)) != fingerprint(a)      # the header
    assert fingerprint(gguf_like(tmp_path / "s.gguf", size + 1)) != fingerprint(a)          # the size
    c = gguf_like(tmp_path / "c.gguf", size)
    with open(c, "r+b") as f:                   # one byte inside the fourth sampled block
        f.seek((1 << 20) + (size - (1 << 20) - (64 << 10)) * 4 // 9 + 100)
        f.write(b"x")
    assert fingerprint(c) != fingerprint(a)
    small = tmp_path / "small.gguf"
    small.write_bytes(b"GGUF tiny")
    assert fingerprint(small) != fingerprint(a)


def test_fingerprint_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(Exception) as err:
        fingerprint(tmp_path / "none.gguf")
    assert str(err.value).endswith("none.gguf: cannot be read (No such file or directory)")


def summary_for(kv: KvType, lengths: list[int], scores: list[float | None], effective: int | None,
                failing: int | None) -> dict:
    measured = [c for c, s in zip(lengths, scores) if s is not None]
    return {"threshold": 85.6, "lengths": lengths, "samples": 4, "seed": 0, "prompt_format": 1,
            "settings": {"flash_attn": True},
            "kv_types": [{"kv": kv.label, "type_k": kv.type_k, "type_v": kv.type_v, "length_scores": scores,
                          "scores": {"single": scores}, "effective_context": effective, "first_failing": failing,
                          "longest_measured": max(measured) if measured else None}]}


def test_store_round_trip_merges_kv_types_by_fingerprint(tmp_path: Path) -> None:
    lengths = [8 * K, 16 * K, 32 * K]
    path = save_recall("a" * 32, "model.gguf", summary_for(Q4, lengths, [95.0, 90.0, 70.0], 16 * K, 32 * K))
    assert path == store_path("a" * 32) and path.parent == store_dir()
    assert str(store_dir()).startswith(os.environ["XDG_DATA_HOME"])      # the user data directory (platformdirs)
    save_recall("a" * 32, "model.gguf", summary_for(Q8, lengths, [96.0, 94.0, 90.0], 32 * K, None))
    save_recall("a" * 32, "model.gguf", summary_for(F16, lengths, [None, None, None], None, None))  # nothing whole
    recall = load_recall("a" * 32)
    assert recall is not None and set(recall.by_kv) == {"q4_0", "q8_0"}
    assert recall.get(Q4) == KvRecall(Q4, 16 * K, 32 * K, 32 * K, 85.6, {8 * K: 95.0, 16 * K: 90.0, 32 * K: 70.0})
    assert recall.get(Q8).first_failing is None and recall.get(F16) is None
    # a new measurement of a KV type replaces the old one
    save_recall("a" * 32, "model.gguf", summary_for(Q4, lengths, [95.0, 80.0, 70.0], 8 * K, 16 * K))
    assert load_recall("a" * 32).get(Q4).effective_context == 8 * K
    assert load_recall("b" * 32) is None                 # another file: never measured


def test_measured_for_reads_the_store_of_the_file_and_costs_nothing_when_empty(tmp_path: Path) -> None:
    assert measured_for(tmp_path / "never-read.gguf") is None   # empty store: the file is not even opened
    model = gguf_like(tmp_path / "m.gguf", 5 << 20)
    save_recall(fingerprint(model), "m.gguf", summary_for(Q8, [4 * K], [90.0], 4 * K, None))
    assert measured_for(model).get(Q8).effective_context == 4 * K
    assert measured_for(gguf_like(tmp_path / "other.gguf", 6 << 20)) is None


@pytest.mark.parametrize("content, problem", [
    (b"{not json", "is not JSON: delete it, and measure again"),
    (b'{"kind": "something else", "kv": {}}', "is not a lcrun-recall file"),
    (b'{"kind": "lcrun-recall", "version": 99, "kv": {}}', "version 99 (this lcrun reads 1)"),
    (b'{"kind": "lcrun-recall", "version": 1, "kv": {"q4_0": {"type_k": "q4_0"}}}', "entry 'q4_0' lacks 'type_v': measure again"),
    (b"[" * 100_000, "is not JSON"),
])
def test_a_damaged_store_is_one_line_and_measuring_replaces_it(content: bytes, problem: str) -> None:
    path = store_path("c" * 32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    with pytest.raises(RecallStoreError) as err:
        load_recall("c" * 32)
    assert problem in str(err.value) and str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    save_recall("c" * 32, "m.gguf", summary_for(Q8, [4 * K], [90.0], 4 * K, None))
    assert load_recall("c" * 32).get(Q8) is not None


def issue_example() -> StoredRecall:
    """The issue's example: q4_0 good to 24K, q8_0 to 48K (each failing at the next length), f16 never measured."""
    def kv(t: KvType, good: int, failing: int) -> KvRecall:
        return KvRecall(t, good, failing, 128 * K, 85.6, {})
    return StoredRecall("f" * 32, "model.gguf", {"q4_0": kv(Q4, 24 * K, 32 * K), "q8_0": kv(Q8, 48 * K, 64 * K)})


def test_the_planner_warning_names_the_limit_and_the_fix() -> None:
    advice = advise(issue_example(), 128 * K, Q4)
    assert advice.warning == ("planned 128K with q4_0 KV; measured recall falls below 85.6 beyond 24K with q4_0 and "
                              "beyond 48K with q8_0 — try -ctk q8_0 -ctv q8_0 -c 48k")
    # what fits decides the fix: q8_0 only fits to 40K here
    fits = advise(issue_example(), 128 * K, Q4, fits=lambda ctx, kv: kv == Q4 or ctx <= 40 * K)
    assert fits.warning.endswith("— try -ctk q8_0 -ctv q8_0 -c 40k") and fits.suggestion == (40 * K, Q8)
    # when q8_0 fits no further than q4_0 is good, shrinking the context is the fix
    shrink = advise(issue_example(), 128 * K, Q4, fits=lambda ctx, kv: kv == Q4 or ctx <= 16 * K)
    assert shrink.warning.endswith("beyond 24K with q4_0 — try -c 24k")
    # no warning within what was measured good, nor for a KV type never measured
    assert advise(issue_example(), 24 * K, Q4).warning is None
    assert advise(issue_example(), 128 * K, F16).warning is None
    assert advise(issue_example(), 128 * K, F16).note.startswith("recall not measured with f16 KV")
    assert advise(None, 128 * K, Q4).warning is None
    out = io.StringIO()
    render_recall_advice(advice, Console(file=out, width=300, no_color=True))
    assert out.getvalue() == f"warning: {advice.warning}\n"


def test_a_kv_type_failing_at_the_shortest_length_and_one_never_failing() -> None:
    recall = StoredRecall("f" * 32, "m", {"q4_0": KvRecall(Q4, 0, 4 * K, 8 * K, 85.6, {}),
                                          "q8_0": KvRecall(Q8, 8 * K, None, 8 * K, 85.6, {})})
    assert advise(recall, 16 * K, Q4).warning == (
        "planned 16K with q4_0 KV; measured recall falls below 85.6 already at 4K with q4_0, good up to 8K with "
        "q8_0 — try -ctk q8_0 -ctv q8_0 -c 8k")
    assert advise(recall, 16 * K, Q8).warning == (
        "planned 16K with q8_0 KV; recall measured good only up to 8K with q8_0 (the longest length measured) — "
        "try -c 8k")


def test_ctx_effective_plans_the_longest_context_measured_good_that_fits() -> None:
    recall = issue_example()
    assert best_measured(recall) == (48 * K, Q8)
    assert best_measured(recall, fits=lambda ctx, kv: ctx <= 30 * K) == (30 * K, Q8)
    assert best_measured(recall, fits=lambda ctx, kv: ctx <= 20 * K) == (20 * K, Q8)   # equal: the less lossy
    assert best_measured(recall, fits=lambda ctx, kv: ctx <= 30_000) == (29_952, Q8)  # a multiple of 256
    assert best_measured(recall, kv_types=[Q4]) == (24 * K, Q4)
    assert best_measured(recall, fits=lambda ctx, kv: False) is None
    assert best_measured(None) is None


def test_kv_types_parse_and_order_by_loss() -> None:
    assert Q8Q4.label == "q8_0/q4_0" and Q8.label == "q8_0" and Q8Q4.flags == "-ctk q8_0 -ctv q4_0"
    assert least_lossy_first([Q4, Q8Q4, KvType.parse("q4_0/q8_0"), F16, Q8]) == [
        F16, Q8, Q8Q4, KvType.parse("q4_0/q8_0"), Q4]
    with pytest.raises(ValueError, match="unknown KV cache type 'q3_k' in 'q3_k'"):
        KvType.parse("q3_k")
    assert [ctx_label(n) for n in (24 * K, 1 << 20, 100_000)] == ["24K", "1M", "100,000"]
    assert [ctx_flag(n) for n in (48 * K, 1 << 20, 100_000)] == ["48k", "1M", "100000"]


def test_published_ruler_figures_of_the_built_in_profiles() -> None:
    """MODEL_FACTS: Llama 3.1 8B 32K, 70B 64K, Gradient 8B and 70B 1048K 16K — and each effective context is
    what RULER's definition gives on the published scores."""
    from lcrun.niah.ruler.summary import effective_context

    expected = {"llama-3.1-8b": 32 * K, "llama-3.1-70b": 64 * K, "gradient-8b-1048k": 16 * K,
                "gradient-70b-1048k": 16 * K}
    for profile in load_profiles():
        if profile.name in expected:
            figures = profile.ruler
            assert figures is not None and figures.effective_context == expected[profile.name]
            lengths = sorted(figures.scores)
            assert lengths == [4 * K << i for i in range(6)]
            assert effective_context(lengths, [figures.scores[c] for c in lengths])[0] == figures.effective_context
            assert "arXiv 2404.06654" in figures.source
        else:
            assert profile.ruler is None
    assert published_recall("meta-llama/Meta-Llama-3.1-8B-Instruct")[1] == 128 * K
    assert published_recall("gradientai/Llama-3-8B-Instruct-262k") is None
    assert find_profile("llama-3.1-8b").ruler.scores[128 * K] == 77.0


def test_models_and_estimate_show_the_published_effective_context(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.fixtures.cli import invoke

    monkeypatch.setenv("COLUMNS", "200")
    table = invoke("models")
    assert table.exit_code == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if "llama-3.1-70b" in line)
    assert "131,072" in row and "64K" in row
    estimate = invoke("estimate", "gradient-8b-1048k", "--ctx", "32k", "--ram", "64G")
    assert estimate.exit_code == 0, estimate.stderr
    assert "published effective context: 16K of the 1M advertised" in estimate.stdout
    plain = invoke("estimate", "gradient-8b-262k", "--ctx", "32k", "--ram", "64G")
    assert "published effective context" not in plain.stdout
    listed = json.loads(invoke("models", "--json").stdout)
    assert {p["name"] for p in listed} == {p.name for p in load_profiles()}
