"""Reading what the memory estimator needs from a Hub repo, without downloading weights: config.json and the
safetensors headers, or a GGUF header, by range requests to the local fake Hub (tests/fixtures/hub_server.py)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from lcrun.errors import HubError
from lcrun.hub import fetch_checkpoint_metadata, fetch_gguf_header
from tests.fixtures.hub_server import VALID_TOKEN, FakeHub
from tests.fixtures.one_line_errors import assert_one_line_message
from tests.fixtures.safetensors_writer import save_safetensors, write_raw_safetensors

REPO = "meta-llama/Tiny-Llama"
GGUF_REPO = "bartowski/Tiny-Llama-GGUF"
GGUF_FILE = "Tiny-Llama-F16.gguf"
CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 1024, "num_hidden_layers": 3,
          "max_position_embeddings": 131072}
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
VOCAB = 70_000
MiB = 1 << 20
FIRST_READ = 100_001   # huggingface_hub reads a safetensors file's first 100 KB in one request (most headers fit)


def file_bytes(tmp_path: Path, name: str, write) -> bytes:
    path = tmp_path / name
    write(path)
    return path.read_bytes()


def three_shard_repo(tmp_path: Path) -> tuple[dict[str, bytes], dict[str, tuple[str, tuple[int, ...]]]]:
    """Three shards of 2-4 MB each, real safetensors files; returns (repo files, expected tensors)."""
    shards = [
        {"model.embed_tokens.weight": np.ones((1024, 1024), np.float16),
         "model.layers.0.input_layernorm.weight": np.ones(1024, np.float32)},
        {f"model.layers.{i}.mlp.up_proj.weight": np.ones((512, 1024), np.float16) for i in range(3)},
        {"model.norm.weight": np.ones(1024, np.float32), "lm_head.weight": np.ones((1024, 1024), np.float16)},
    ]
    files = {"config.json": json.dumps(CONFIG).encode(), "README.md": b"# Tiny\n"}
    weight_map: dict[str, str] = {}
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, tensors in zip(SHARDS, shards):
        files[name] = file_bytes(tmp_path, name, lambda path, t=tensors: save_safetensors(path, t, {"format": "pt"}))
        for tensor, array in tensors.items():
            weight_map[tensor] = name
            expected[tensor] = ("F16" if array.dtype == np.float16 else "F32", array.shape)
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    return files, expected


def header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def served_ranges(hub: FakeHub, filename: str) -> list[tuple[int, int]]:
    """(first, last) byte of every answer that carried part of `filename`."""
    ranges = []
    for request in hub.requests:
        if request.filename == filename and request.body_bytes:
            assert request.status == 206, "a weight file was read without a Range request"
            first, _, last = request.headers["range"].removeprefix("bytes=").partition("-")
            ranges.append((int(first), int(first) + request.body_bytes - 1))
    return ranges


def test_a_sharded_checkpoint_on_main_is_one_request(fake_hub: FakeHub, tmp_path: Path) -> None:
    """huggingface_hub's get_sharded_safetensors_metadata: the Hub parses the shard headers; no shard is read."""
    files, expected = three_shard_repo(tmp_path)
    commit = fake_hub.add_repo(REPO, files)

    checkpoint = fetch_checkpoint_metadata(REPO)

    assert (checkpoint.repo_id, checkpoint.commit, checkpoint.config) == (REPO, commit, CONFIG)
    assert checkpoint.tensors == expected
    assert fake_hub.files_fetched(REPO) == {"config.json"}
    assert [r.path for r in fake_hub.requests if "safetensors-metadata" in r.path] == [
        f"/api/models/{REPO}/safetensors-metadata/model.safetensors.index.json"]


def test_checkpoint_metadata_reads_only_config_and_headers(fake_hub: FakeHub, tmp_path: Path) -> None:
    """At a revision (or where the Hub cannot parse them), huggingface_hub's get_safetensors_metadata: the index, then
    one ranged read from the start of each shard, bounded by its first read — never the weights."""
    files, expected = three_shard_repo(tmp_path)
    commit = fake_hub.add_repo(REPO, files, revision="v1")

    checkpoint = fetch_checkpoint_metadata(REPO, "v1")

    assert (checkpoint.repo_id, checkpoint.commit, checkpoint.config) == (REPO, commit, CONFIG)
    assert checkpoint.tensors == expected
    assert fake_hub.bytes_served() < MiB < sum(len(files[shard]) for shard in SHARDS)
    assert fake_hub.files_fetched(REPO) == {"config.json", "model.safetensors.index.json", *SHARDS}
    for shard in SHARDS:
        # one request from byte 0, holding the whole header, and a small part of the file
        [(first, last)] = served_ranges(fake_hub, shard)
        assert first == 0 and header_end(files[shard]) <= last + 1 <= FIRST_READ
        assert fake_hub.bytes_served(shard) <= FIRST_READ < len(files[shard]) / 10
    # pinned to one commit, so a push between the requests cannot mix two versions of the checkpoint
    resolves = [r.path for r in fake_hub.requests if "/resolve/" in r.path]
    assert all(f"/resolve/{commit}/" in path for path in resolves if not path.endswith("config.json"))


def test_single_file_checkpoint_and_revision(fake_hub: FakeHub, tmp_path: Path) -> None:
    weights = file_bytes(tmp_path, "one", lambda path: save_safetensors(path, {"w": np.ones((256, 256), np.float32)}))
    fake_hub.add_repo(REPO, {"config.json": b'{"hidden_size": 1}', "model.safetensors": b"old"})
    v2 = fake_hub.add_repo(REPO, {"config.json": b'{"hidden_size": 256}', "model.safetensors": weights},
                           revision="v2")

    checkpoint = fetch_checkpoint_metadata(REPO, "v2")

    assert checkpoint.commit == v2 and checkpoint.config == {"hidden_size": 256}
    assert checkpoint.tensors == {"w": ("F32", (256, 256))}
    assert header_end(weights) <= fake_hub.bytes_served("model.safetensors") <= FIRST_READ < len(weights)


def test_a_header_beyond_the_first_read_takes_exactly_one_more_request(fake_hub: FakeHub, tmp_path: Path) -> None:
    tensors = {f"model.layers.{i}.mlp.down_proj.weight_with_a_long_name": np.ones((2, 2), np.float16)
               for i in range(2000)}
    weights = file_bytes(tmp_path, "big", lambda path: save_safetensors(path, tensors))
    assert header_end(weights) > FIRST_READ   # the header alone is larger than the first read
    fake_hub.add_repo(REPO, {"config.json": b'{"hidden_size": 2}', "model.safetensors": weights})
    checkpoint = fetch_checkpoint_metadata(REPO)
    assert len(checkpoint.tensors) == 2000
    assert served_ranges(fake_hub, "model.safetensors") == [(0, FIRST_READ - 1), (8, header_end(weights) - 1)]


def test_gated_repo_needs_hf_token(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files, expected = three_shard_repo(tmp_path)
    fake_hub.add_repo(REPO, files, gated=True)
    with pytest.raises(HubError) as caught:
        fetch_checkpoint_metadata(REPO)
    text = assert_one_line_message(caught.value)
    assert "gated" in text and "HF_TOKEN" in text
    assert fake_hub.bytes_served() == 0

    monkeypatch.setenv("HF_TOKEN", VALID_TOKEN)  # read when called, not at import
    fake_hub.clear_log()
    assert fetch_checkpoint_metadata(REPO).tensors == expected
    hub_side = [r for r in fake_hub.requests if not r.path.startswith("/_cdn/")]
    assert hub_side and all(r.authorization == f"Bearer {VALID_TOKEN}" for r in hub_side)
    fake_hub.clear_log()
    assert fetch_checkpoint_metadata(REPO, fake_hub.repos[REPO].refs["main"]).tensors == expected  # shard by shard
    # the token stays on the Hub: the CDN the weights are redirected to never sees it, as with huggingface_hub
    cdn = [r for r in fake_hub.requests if r.path.startswith("/_cdn/")]
    assert len(cdn) == len(SHARDS) and all(r.authorization is None for r in cdn)


def test_missing_repo(fake_hub: FakeHub) -> None:
    with pytest.raises(HubError) as caught:
        fetch_checkpoint_metadata("meta-llama/Llama-9-Typo")
    assert assert_one_line_message(caught.value).startswith("meta-llama/Llama-9-Typo: no such model repo on the Hub")


def test_repo_without_safetensors(fake_hub: FakeHub) -> None:
    fake_hub.add_repo(REPO, {"config.json": b"{}", "pytorch_model.bin": b"\x80\x02" * 100})
    with pytest.raises(HubError) as caught:
        fetch_checkpoint_metadata(REPO)
    assert "has no safetensors weights" in assert_one_line_message(caught.value)
    assert fake_hub.bytes_served("pytorch_model.bin") == 0


@pytest.mark.parametrize(("header", "data", "cut", "problem"), [
    # the length says more than there is: the header read comes back short (huggingface_hub does not tell that
    # apart from text that is not JSON)
    (b'{"w":{"dtype":"F16","shape":[4],"data_offsets":[0,8]}}', b"", True, "malformed safetensors header (header is "
                                                                             "not json-encoded string)"),
    (b"{not json" + b" " * 7, b"\0" * 8, False, "malformed safetensors header"),
    (b'{"w":{"dtype":"F16","shape":"4"}}      ', b"\0" * 8, False, "malformed safetensors header"),
    (b'{"w":{"dtype":"F16","shape":[-4],"data_offsets":[0,0]}}', b"", False,
     "malformed safetensors header (tensor 'w')"),
])
def test_broken_safetensors_header_names_the_file(fake_hub: FakeHub, tmp_path: Path, header: bytes, data: bytes,
                                                  cut: bool, problem: str) -> None:
    files, _ = three_shard_repo(tmp_path)
    broken = file_bytes(tmp_path, "broken", lambda path: write_raw_safetensors(path, header, data))
    if cut:
        broken = broken[:8 + len(header) // 2]
    files[SHARDS[1]] = broken
    fake_hub.add_repo(REPO, files)
    with pytest.raises(HubError) as caught:
        fetch_checkpoint_metadata(REPO)
    text = assert_one_line_message(caught.value)
    assert text.startswith(f"{REPO}: {SHARDS[1]} ") and problem in text


def test_absurd_safetensors_header_length_is_not_requested(fake_hub: FakeHub, tmp_path: Path) -> None:
    files, _ = three_shard_repo(tmp_path)
    files[SHARDS[0]] = struct.pack("<Q", 1 << 40) + b"{}"
    fake_hub.add_repo(REPO, files)
    with pytest.raises(HubError) as caught:
        fetch_checkpoint_metadata(REPO)
    assert f"{SHARDS[0]} is not a valid safetensors file" in assert_one_line_message(caught.value)
    assert len(served_ranges(fake_hub, SHARDS[0])) == 1   # the length is refused: its bytes are never asked for


def gguf_file(tmp_path: Path) -> bytes:
    """A llama GGUF with ~1.5 MiB of vocabulary in its header (more than the first 1 MiB read) and 4 MiB of data."""
    path = tmp_path / GGUF_FILE
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(131072)
    writer.add_block_count(1)
    writer.add_embedding_length(1024)
    writer.add_head_count(8)
    writer.add_rope_dimension_sections([16, 24, 24, 0])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"token{i}" for i in range(VOCAB)])
    writer.add_token_types([1] * VOCAB)
    writer.add_tensor("token_embd.weight", np.ones((1024, 1024), np.float16))
    writer.add_tensor("blk.0.attn_q.weight", np.ones((1024, 1024), np.float16))
    writer.add_tensor("output_norm.weight", np.ones(1024, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def test_gguf_header_is_read_by_growing_ranges(fake_hub: FakeHub, tmp_path: Path) -> None:
    data = gguf_file(tmp_path)
    fake_hub.add_repo(GGUF_REPO, {GGUF_FILE: data})
    header = fetch_gguf_header(GGUF_REPO, GGUF_FILE)

    # (gguf.GGUFReader would be the reference here, but it takes 20 s over a 70k-token vocabulary)
    tensor_count, kv_count = struct.unpack("<QQ", data[8:24])
    assert len(header.fields) == kv_count and len(header.tensors) == tensor_count
    assert header.fields["llama.context_length"] == 131072
    assert header.fields["general.architecture"] == "llama"
    assert header.fields["llama.rope.dimension_sections"] == [16, 24, 24, 0]
    tokens = header.fields["tokenizer.ggml.tokens"]
    assert tokens.element_type == gguf.GGUFValueType.STRING and len(tokens) == VOCAB
    assert header.token_text(VOCAB - 1) == f"token{VOCAB - 1}" and header.token_id("token12345") == 12345
    assert len(header.fields["tokenizer.ggml.token_type"]) == VOCAB
    assert [(t.name, t.ggml_type, t.ne) for t in header.tensors] == [
        ("token_embd.weight", gguf.GGMLQuantizationType.F16, (1024, 1024)),
        ("blk.0.attn_q.weight", gguf.GGMLQuantizationType.F16, (1024, 1024)),
        ("output_norm.weight", gguf.GGMLQuantizationType.F32, (1024,))]
    # the tensor infos end where the alignment padding starts, and the data (all ones) after it
    assert data[header.header_size:header.data_offset] == bytes(header.data_offset - header.header_size)
    assert data[header.data_offset:header.data_offset + 2] == np.float16(1).tobytes()
    assert header.data_offset % 32 == 0 and header.file_size == len(data)
    assert MiB < header.header_size < 2 * MiB < len(data)
    # two reads, back to back: 1 MiB was not enough, 2 MiB was
    assert served_ranges(fake_hub, GGUF_FILE) == [(0, MiB - 1), (MiB, 2 * MiB - 1)]
    assert fake_hub.bytes_served(GGUF_FILE) < header.header_size + MiB


def test_gguf_header_from_small_first_reads(fake_hub: FakeHub, tmp_path: Path) -> None:
    data = gguf_file(tmp_path)
    fake_hub.add_repo(GGUF_REPO, {GGUF_FILE: data})
    header = fetch_gguf_header(GGUF_REPO, GGUF_FILE, first_read=4096)

    assert len(header.tensors) == 3
    ranges = served_ranges(fake_hub, GGUF_FILE)
    assert all(first == previous_last + 1 for (_, previous_last), (first, _) in zip(ranges, ranges[1:]))
    assert fake_hub.bytes_served(GGUF_FILE) < 2 * header.header_size  # geometric growth: at most double

    with pytest.raises(HubError) as caught:
        fetch_gguf_header(GGUF_REPO, GGUF_FILE, first_read=4096, max_header=MiB)
    assert "GGUF header is larger than 1 MiB" in assert_one_line_message(caught.value)


@pytest.mark.parametrize(("cut", "problem"), [
    (lambda data: data[:MiB + 1000], "is truncated"),
    (lambda data: b"GGML" + data[4:], "is not a GGUF file (starts with b'GGML'"),
])
def test_broken_gguf_header_names_the_file(fake_hub: FakeHub, tmp_path: Path, cut, problem: str) -> None:
    fake_hub.add_repo(GGUF_REPO, {GGUF_FILE: cut(gguf_file(tmp_path))})
    with pytest.raises(HubError) as caught:
        fetch_gguf_header(GGUF_REPO, GGUF_FILE)
    text = assert_one_line_message(caught.value)
    assert text.startswith(f"{GGUF_REPO}: {GGUF_FILE} ") and problem in text


def test_gguf_errors(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub.add_repo(GGUF_REPO, {GGUF_FILE: gguf_file(tmp_path)}, gated=True)
    with pytest.raises(HubError) as caught:
        fetch_gguf_header(GGUF_REPO, GGUF_FILE)
    assert "HF_TOKEN" in assert_one_line_message(caught.value)

    monkeypatch.setenv("HF_TOKEN", VALID_TOKEN)
    assert len(fetch_gguf_header(GGUF_REPO, GGUF_FILE).tensors) == 3
    with pytest.raises(HubError) as caught:
        fetch_gguf_header(GGUF_REPO, "Tiny-Llama-Q4_K_M.gguf")
    assert "no file 'Tiny-Llama-Q4_K_M.gguf'" in assert_one_line_message(caught.value)
    with pytest.raises(HubError) as caught:
        fetch_gguf_header("bartowski/No-Such-GGUF", GGUF_FILE)
    assert "no such model repo" in assert_one_line_message(caught.value)


def test_offline_mode_says_why(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError) as caught:
        fetch_checkpoint_metadata(REPO)
    assert "HF_HUB_OFFLINE" in assert_one_line_message(caught.value)
    assert fake_hub.requests == []


def test_a_remote_string_array_claiming_2_40_entries_asks_for_bytes_never_allocates(
        fake_hub: FakeHub, tmp_path: Path) -> None:
    data = bytearray(gguf_file(tmp_path))
    at = data.find(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 8  # after the value and item types
    assert struct.unpack_from("<Q", data, at)[0] == VOCAB   # the count this test changes (not a vacuous patch)
    data[at:at + 8] = struct.pack("<Q", 1 << 40)
    fake_hub.add_repo(GGUF_REPO, {GGUF_FILE: bytes(data)})
    with pytest.raises(HubError) as caught:   # on the old reader: np.empty(2**40), a MemoryError and a traceback
        fetch_gguf_header(GGUF_REPO, GGUF_FILE, first_read=4096)
    assert "GGUF header is larger than" in assert_one_line_message(caught.value)


@pytest.mark.parametrize("name", ["Tiny-00001-of-00000.gguf", "Tiny-00000-of-00002.gguf", "Tiny-00003-of-00002.gguf"])
def test_a_malformed_split_name_on_the_hub_is_one_line(fake_hub: FakeHub, tmp_path: Path, name: str) -> None:
    from tests.fixtures.cli import assert_one_line_error, invoke

    fake_hub.add_repo(GGUF_REPO, {name: gguf_file(tmp_path)})
    # estimate reads the header by ranges, chat downloads the file: both name it (an IndexError before)
    for command in (("estimate",), ("chat", "--dry-run")):
        run = invoke(*command, GGUF_REPO, "--hf-file", name, "--ctx", "1k")
        assert_one_line_error(run, GGUF_REPO, name, "not a valid split file name")
    if name.startswith("Tiny-00001"):  # the repo's only GGUF, chosen without --hf-file
        assert_one_line_error(invoke("estimate", GGUF_REPO, "--ctx", "1k"), name, "not a valid split file name")
