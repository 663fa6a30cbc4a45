"""lcrun.hub against the real huggingface_hub client and a local fake Hub (tests/fixtures/hub_server.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lcrun.errors import HubError
from lcrun.hub import download_checkpoint
from lcrun.model_ref import looks_like_repo_id
from tests.fixtures.hub_server import VALID_TOKEN, FakeHub, closed_port_url, safetensors_bytes
from tests.fixtures.one_line_errors import assert_one_line_message

REPO = "meta-llama/Tiny-Llama"
CHECKPOINT = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


def llama_repo(config: dict | None = None) -> dict[str, bytes]:
    shard1 = safetensors_bytes({"model.embed_tokens.weight": ("F16", [64, 16]),
                                "model.layers.0.self_attn.q_proj.weight": ("F16", [16, 16])}, fill=1)
    shard2 = safetensors_bytes({"lm_head.weight": ("F16", [64, 16])}, fill=2)
    index = {"metadata": {"total_size": 4608},
             "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                            "model.layers.0.self_attn.q_proj.weight": "model-00001-of-00002.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    return {
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        "README.md": b"# Tiny Llama\n",
        "config.json": json.dumps(config or {"architectures": ["LlamaForCausalLM"], "hidden_size": 16}).encode(),
        "generation_config.json": b'{"bos_token_id": 1}',
        "tokenizer.json": b'{"model": {"type": "BPE"}}',
        "tokenizer_config.json": b'{"model_max_length": 131072}',
        "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00002.safetensors": shard1,
        "model-00002-of-00002.safetensors": shard2,
        "pytorch_model.bin": b"\x80\x02pickle" * 1000,
        "original/consolidated.00.pth": b"\x80\x02pickle" * 1000,
        "original/params.json": b'{"dim": 16}',
        "original/tokenizer.model": b"tiktoken" * 100,
    }


def test_download_fetches_the_checkpoint_files_and_nothing_else(fake_hub: FakeHub) -> None:
    files = llama_repo()
    commit = fake_hub.add_repo(REPO, files)
    seen: list[tuple[int, int]] = []

    snapshot, sha = download_checkpoint(REPO, progress=lambda done, total: seen.append((done, total)))

    assert sha == commit and snapshot.name == commit
    assert {p.name for p in snapshot.iterdir()} == CHECKPOINT
    for name in CHECKPOINT:
        assert (snapshot / name).read_bytes() == files[name]
    assert fake_hub.files_fetched(REPO) == CHECKPOINT
    assert fake_hub.bytes_served() == sum(len(files[name]) for name in CHECKPOINT)
    for unwanted in ("pytorch_model.bin", "original/consolidated.00.pth", "original/tokenizer.model"):
        assert not any(r.filename == unwanted for r in fake_hub.requests)
    total = sum(len(files[name]) for name in CHECKPOINT)
    assert seen[-1] == (total, total)
    assert all(t == total for _, t in seen) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    # the normal HF cache layout, under HF_HOME as the environment says at call time
    assert snapshot.parent.parent == Path(os.environ["HF_HOME"]) / "hub" / "models--meta-llama--Tiny-Llama"


def test_a_second_download_comes_from_the_cache(fake_hub: FakeHub) -> None:
    fake_hub.add_repo(REPO, llama_repo())
    first, _ = download_checkpoint(REPO)
    fake_hub.clear_log()
    seen: list[tuple[int, int]] = []

    again, _ = download_checkpoint(REPO, progress=lambda done, total: seen.append((done, total)))

    assert again == first and fake_hub.bytes_served() == 0
    assert seen and seen[0][0] == seen[0][1]  # everything was already there


def test_revision_is_honoured(fake_hub: FakeHub) -> None:
    fake_hub.add_repo(REPO, llama_repo({"hidden_size": 16}))
    v2 = fake_hub.add_repo(REPO, llama_repo({"hidden_size": 32}), revision="v2")

    snapshot, sha = download_checkpoint(REPO, "v2")
    assert sha == v2 and json.loads((snapshot / "config.json").read_text()) == {"hidden_size": 32}

    by_sha, sha_again = download_checkpoint(REPO, v2)
    assert (by_sha, sha_again) == (snapshot, v2)


def test_missing_revision(fake_hub: FakeHub) -> None:
    fake_hub.add_repo(REPO, llama_repo())
    with pytest.raises(HubError) as caught:
        download_checkpoint(REPO, "no-such-branch")
    assert "no revision 'no-such-branch'" in assert_one_line_message(caught.value)


def test_gated_repo_without_token_says_to_set_hf_token(fake_hub: FakeHub) -> None:
    fake_hub.add_repo(REPO, llama_repo(), gated=True)
    with pytest.raises(HubError) as caught:
        download_checkpoint(REPO)
    text = assert_one_line_message(caught.value)
    assert "gated" in text and "HF_TOKEN" in text and "huggingface-cli login" in text
    assert fake_hub.bytes_served() == 0


def test_gated_repo_with_a_token_without_access(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub.add_repo(REPO, llama_repo(), gated=True, gated_tokens=set())
    monkeypatch.setenv("HF_TOKEN", VALID_TOKEN)
    with pytest.raises(HubError) as caught:
        download_checkpoint(REPO)
    assert "accept its license" in assert_one_line_message(caught.value)
    assert any(r.status == 403 for r in fake_hub.requests)


def test_gated_repo_with_hf_token(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    commit = fake_hub.add_repo(REPO, llama_repo(), gated=True)
    monkeypatch.setenv("HF_TOKEN", VALID_TOKEN)

    snapshot, sha = download_checkpoint(REPO)

    assert sha == commit and {p.name for p in snapshot.iterdir()} == CHECKPOINT
    resolves = [r for r in fake_hub.requests if "/resolve/" in r.path]
    assert resolves and all(r.authorization == f"Bearer {VALID_TOKEN}" for r in resolves)
    # like the real Hub's CDN, weights come from another host, which never sees the token
    cdn = [r for r in fake_hub.requests if r.path.startswith("/_cdn/")]
    assert cdn and all(r.authorization is None for r in cdn)


def test_missing_repo(fake_hub: FakeHub) -> None:
    with pytest.raises(HubError) as caught:
        download_checkpoint("meta-llama/Llama-9-Typo")
    text = assert_one_line_message(caught.value)
    assert text.startswith("meta-llama/Llama-9-Typo: no such model repo on the Hub (check the spelling")


def test_unreachable_hub(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "2")
    with pytest.raises(HubError) as caught:
        download_checkpoint(REPO)
    text = assert_one_line_message(caught.value)
    assert "cannot be reached" in text and "local checkpoint directory" in text


def test_offline_mode_uses_the_cache_or_says_why_not(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    commit = fake_hub.add_repo(REPO, llama_repo())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError) as caught:
        download_checkpoint(REPO)
    assert "HF_HUB_OFFLINE" in assert_one_line_message(caught.value)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    online, _ = download_checkpoint(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub.clear_log()
    assert download_checkpoint(REPO) == (online, commit)
    assert fake_hub.requests == []


def test_repo_with_only_bin_weights_is_refused_before_downloading(fake_hub: FakeHub) -> None:
    files = {name: data for name, data in llama_repo().items() if not name.startswith("model")}
    fake_hub.add_repo(REPO, files)
    with pytest.raises(HubError) as caught:
        download_checkpoint(REPO)
    assert "only safetensors checkpoints are supported" in assert_one_line_message(caught.value)
    assert fake_hub.bytes_served() == 0


@pytest.mark.parametrize(("text", "expected"), [
    ("meta-llama/Llama-3.1-8B-Instruct", True), ("org/name", True),
    ("gradientai/Llama-3-8B-Instruct-Gradient-1048k", True),
    ("gpt2", False), ("./org/name", False), ("/abs/path", False), ("a/b/c", False), ("org/", False),
    ("org/na me", False), ("org--x/name", False), ("org/name..x", False), ("~/models", False),
])
def test_looks_like_repo_id(text: str, expected: bool) -> None:
    assert looks_like_repo_id(text) is expected


def test_an_existing_local_path_is_not_a_repo_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not looks_like_repo_id("org/name")


def test_fake_hub_serves_safetensors_headers_by_range(fake_hub: FakeHub) -> None:
    """Range requests are served and counted exactly: huggingface_hub asks for the first 100 kB of each file."""
    from huggingface_hub import HfApi

    big = safetensors_bytes({"w": ("F32", [512, 512])})  # 1 MiB of payload
    fake_hub.add_repo("org/one", {"config.json": b"{}", "model.safetensors": big})
    metadata = HfApi(endpoint=fake_hub.url).get_safetensors_metadata("org/one")

    assert metadata.files_metadata["model.safetensors"].tensors["w"].shape == [512, 512]
    ranged = [r for r in fake_hub.requests if r.filename == "model.safetensors" and r.body_bytes]
    assert ranged and all(r.status == 206 for r in ranged)
    assert fake_hub.bytes_served("model.safetensors") == 100_001 < len(big)
