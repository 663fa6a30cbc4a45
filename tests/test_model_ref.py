"""One model syntax: llama.cpp's `org/repo[:QUANT]` for Hub GGUF repos, through the local fake Hub — the quant's file
or split set is picked, a repo with one GGUF needs no quant, a missing quant lists the ones the repo has."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lcrun.convert.convert import convert_checkpoint
from lcrun.errors import HubError
from lcrun.model_ref import choose_gguf, quant_in_file_name, split_model_ref
from lcrun.models import demo_checkpoint
from tests.fixtures.cli import invoke
from tests.fixtures.hub_server import FakeHub

REPO = "someorg/Tiny-Llama-GGUF"


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ref")
    out = {q: convert_checkpoint(demo_checkpoint(), root / f"tiny-{q}.gguf", outtype=q).paths[0]
           for q in ("f16", "q8_0")}
    split = convert_checkpoint(demo_checkpoint(), root / "tiny-Q4_0.gguf", outtype="q8_0", split_max_size=150_000)
    out["split"] = split.paths  # type: ignore[assignment]
    return out


def repo_files(ggufs: dict[str, Path]) -> dict[str, bytes]:
    files = {"Tiny-Llama-F16.gguf": ggufs["f16"].read_bytes(), "Tiny-Llama-Q8_0.gguf": ggufs["q8_0"].read_bytes(),
             "README.md": b"# tiny"}
    parts = ggufs["split"]
    for i, part in enumerate(parts, 1):  # type: ignore[arg-type]
        files[f"Q4_0/Tiny-Llama-Q4_0-{i:05d}-of-{len(parts):05d}.gguf"] = part.read_bytes()  # type: ignore[arg-type]
    return files


def test_split_model_ref() -> None:
    assert split_model_ref("bartowski/Meta-Llama-3.1-8B-Instruct-GGUF:Q4_K_M") == (
        "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF", "Q4_K_M")
    assert split_model_ref("org/repo") == ("org/repo", None)
    assert split_model_ref("model.gguf") == ("model.gguf", None)
    assert split_model_ref("C:stuff") == ("C:stuff", None)  # not a repo id: left whole


@pytest.mark.parametrize(("name", "quant"), [
    ("Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf", "Q4_K_M"), ("Meta-Llama-3.1-8B-Instruct-IQ4_XS.gguf", "IQ4_XS"),
    ("qwen2.5-7b-instruct-q4_k_m.gguf", "Q4_K_M"), ("Q4_K_M/Llama-3.1-70B-Q4_K_M-00001-of-00002.gguf", "Q4_K_M"),
    ("model-bf16-00001-of-00003.gguf", "BF16"), ("Llama-3-8B-Gradient-1048k.Q8_0.gguf", "Q8_0"),
    ("model.gguf", None),
])
def test_quant_in_file_names(name: str, quant: str | None) -> None:
    assert quant_in_file_name(name) == quant


def test_choose_gguf() -> None:
    files = ["a-Q4_K_M.gguf", "a-Q4_K_S.gguf", "Q8_0/a-Q8_0-00001-of-00002.gguf", "Q8_0/a-Q8_0-00002-of-00002.gguf",
             "mmproj-a-F16.gguf"]
    assert choose_gguf("o/r", files, "q4_k_m") == "a-Q4_K_M.gguf"
    assert choose_gguf("o/r", files, "Q8_0") == "Q8_0/a-Q8_0-00001-of-00002.gguf"
    with pytest.raises(HubError, match=r"has no Q5_K_M GGUF; it has Q4_K_M, Q4_K_S, Q8_0$"):
        choose_gguf("o/r", files, "Q5_K_M")
    with pytest.raises(HubError, match=r"holds 3 GGUFs; pick one with o/r:QUANT \(Q4_K_M, Q4_K_S, Q8_0\)"):
        choose_gguf("o/r", files, None)
    assert choose_gguf("o/r", ["only-F16.gguf", "README.md"], None) == "only-F16.gguf"
    with pytest.raises(HubError, match="has no .gguf files"):
        choose_gguf("o/r", ["model.safetensors"], None)


def test_estimate_and_plan_take_org_repo_quant(fake_hub: FakeHub, ggufs: dict[str, Path]) -> None:
    fake_hub.add_repo(REPO, repo_files(ggufs))
    result = invoke("estimate", f"{REPO}:Q8_0", "--ctx", "1k", "--ram", "8G", "--json")
    assert result.exit_code == 0, result.output
    [plan] = json.loads(result.stdout)["plans"]
    assert plan["quant"] == "Q8_0"
    served = {r.filename for r in fake_hub.requests if r.filename}
    assert "Tiny-Llama-Q8_0.gguf" in served and "Tiny-Llama-F16.gguf" not in served

    split = invoke("estimate", f"{REPO}:q4_0", "--ctx", "1k", "--ram", "8G", "--json")
    assert split.exit_code == 0, split.output
    # the split set's tensors add up to the same model as the single q8_0 file: every split's header was read
    assert json.loads(split.stdout)["plans"][0]["weights_bytes"] == plan["weights_bytes"]

    planned = invoke("plan", f"{REPO}:F16", "--ctx", "1k", "--ram", "8G", "--json")
    assert planned.exit_code == 0, planned.output
    assert json.loads(planned.stdout)["quant"] == "F16"

    missing = invoke("estimate", f"{REPO}:Q5_K_M")
    assert missing.exit_code == 1
    assert missing.stderr.strip() == f"error: {REPO}: has no Q5_K_M GGUF; it has F16, Q4_0, Q8_0"
    ambiguous = invoke("plan", REPO)
    assert ambiguous.exit_code == 1 and f"pick one with {REPO}:QUANT (F16, Q4_0, Q8_0)" in ambiguous.stderr


def test_a_repo_with_one_gguf_needs_no_quant(fake_hub: FakeHub, ggufs: dict[str, Path]) -> None:
    fake_hub.add_repo("someorg/One-GGUF", {"One-Q8_0.gguf": ggufs["q8_0"].read_bytes()})
    result = invoke("estimate", "someorg/One-GGUF", "--ctx", "1k", "--ram", "8G", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["plans"][0]["quant"] == "Q8_0"


@pytest.mark.slow
def test_chat_bench_and_niah_take_org_repo_quant(fake_hub: FakeHub, ggufs: dict[str, Path], tmp_path: Path) -> None:
    fake_hub.add_repo(REPO, repo_files(ggufs))
    chat = invoke("chat", f"{REPO}:Q4_0", "-p", "hello", "-n", "4", "--no-history", "--temp", "0", "-t", "1")
    assert chat.exit_code == 0, chat.output
    cached = sorted(p.name for p in (tmp_path / "hf-home" / "hub").rglob("*.gguf"))
    assert cached == ["Tiny-Llama-Q4_0-00001-of-00002.gguf", "Tiny-Llama-Q4_0-00002-of-00002.gguf"]  # the split set

    bench = invoke("bench", f"{REPO}:Q8_0", "--depth", "0", "--pp", "16", "--tg", "2", "-r", "1", "-t", "1", "--json")
    assert bench.exit_code == 0, bench.output
    assert json.loads(bench.stdout)["results"]

    niah = invoke("niah", f"{REPO}:F16", "--min-ctx", "200", "--max-ctx", "300", "--ctx-steps", "1",
                  "--depth-interval", "1.0", "-t", "1", "-o", str(tmp_path / "n.jsonl"), "--json")
    assert niah.exit_code == 0, niah.output
    lines = [json.loads(line) for line in (tmp_path / "n.jsonl").read_text().splitlines()]
    assert lines[0]["kind"] == "lcrun-niah-run" and len(lines) == 3  # the run header, then 1 context x 2 depths

    for command in ("chat", "bench", "niah"):
        missing = invoke(command, f"{REPO}:IQ4_XS", *(["-p", "x"] if command == "chat" else []))
        assert missing.exit_code == 1 and missing.stderr.strip() == (
            f"error: {REPO}: has no IQ4_XS GGUF; it has F16, Q4_0, Q8_0"), (command, missing.stderr)
