"""lcrun.gguf_reader: the one GGUF header reader. Equivalence with gguf-py's GGUFReader on files of real vocabulary
shape, the two ways of stepping over string arrays, big-endian files, ≥ 1,000 damaged headers (one-line errors, no
hang, no big allocation), bounded memory on a 262K-token header, and Hub prefixes."""
from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest

from lcrun.errors import GGUFFileError
from lcrun.gguf_reader import parse_gguf_header, read_gguf_header
from lcrun.gguf_split import read_gguf_set
from lcrun.gguf_values import STRING, GGUFArray, HeaderError, NeedMoreBytes, _Cursor, _string_starts_fast
from tests.fixtures.cli import assert_one_line_error, invoke, run_lcrun
from tests.fixtures.gguf_equivalence import assert_same_as_gguf_reader
from tests.fixtures.realistic_gguf import FAMILIES, write_realistic_gguf


@pytest.fixture(scope="module")
def realistic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("realistic")
    return {name: write_realistic_gguf(folder / f"{name}.gguf", name) for name in ("mistral", "base", "gemma")}


def string_array(strings: list[str]) -> bytes:
    return b"".join(struct.pack("<Q", len(s.encode())) + s.encode() for s in strings)


# ---- equivalence with gguf-py -------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("family", ["mistral", "base"])
def test_same_as_gguf_reader_on_real_vocabulary_shapes(realistic: dict[str, Path], family: str) -> None:
    header = read_gguf_header(realistic[family])
    assert len(header.tokens) == FAMILIES[family].n_tokens
    assert_same_as_gguf_reader(realistic[family], header)


def test_big_endian_file(tmp_path: Path) -> None:
    path = tmp_path / "be.gguf"
    w = gguf.GGUFWriter(path, "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_block_count(3)
    w.add_token_list([f"tok{i}" for i in range(5000)])
    w.add_token_scores([float(-i) for i in range(5000)])
    w.add_array("llama.attention.head_count_kv", [8, 8, 4])
    w.add_tensor("token_embd.weight", np.ones((5000, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    header = read_gguf_header(path)
    assert header.byte_order == ">" and header.token_text(4999) == "tok4999" and header.token_id("tok7") == 7
    assert header.fields["tokenizer.ggml.scores"].to_numpy()[-1] == -4999.0
    assert_same_as_gguf_reader(path, header)


# ---- string arrays: the numpy way and the walk agree; the numpy way refuses what it cannot prove -------------------

@pytest.mark.parametrize("strings", [
    [f"w{i}" * (i % 7 + 1) for i in range(5000)],                    # plain tokens: the numpy way
    ["a", "", "b"] + [f"t{i}" for i in range(200)],                 # an empty string
    ["x\x00y"] + [f"t{i}" for i in range(200)],                      # a NUL inside a token
    ["z" * 256] + [f"t{i}" for i in range(200)],                     # a length whose low byte is zero
    ["é" * 40, "日本語"] + [f"t{i}" for i in range(300)],
])
def test_string_offsets_fast_and_walk_agree(strings: list[str]) -> None:
    raw = string_array(strings) + b"\x05\x00\x00\x00\x00\x00\x00\x00after"
    walked = _Cursor(raw, "<", complete=True)._walk_strings(len(strings))
    fast = _string_starts_fast(raw, 0, len(strings), len(raw), "<")
    if fast is not None:
        assert fast[0].tolist() == walked.tolist() and fast[1] == len(raw) - 13
    cursor = _Cursor(raw, "<", complete=True)
    starts = cursor.skip_strings(len(strings))
    assert starts.tolist() == walked.tolist() and cursor.pos == len(raw) - 13
    array = GGUFArray(STRING, len(strings), raw[:cursor.pos], "<", starts)
    assert array.tolist() == strings
    assert array.index_of(strings[-1]) == len(strings) - 1 and array.index_of("not there") is None


def test_fast_way_is_taken_for_real_tokens_and_not_for_ambiguous_ones() -> None:
    plain = string_array([f"tok{i}" for i in range(1000)])
    assert _string_starts_fast(plain, 0, 1000, len(plain), "<") is not None
    # negative control: a zero-low-byte length makes the candidates disagree with the chain, so the answer is refused
    ambiguous = string_array(["z" * 512] + [f"tok{i}" for i in range(1000)])
    assert _string_starts_fast(ambiguous, 0, 1001, len(ambiguous), "<") is None


def test_token_lookup_does_not_match_inside_other_tokens() -> None:
    strings = ["<|im_start|>x", "a<|im_start|>", "y"] * 30 + ["<|im_start|>"]
    raw = string_array(strings)
    cursor = _Cursor(raw, "<", complete=True)
    array = GGUFArray(STRING, len(strings), raw, "<", cursor.skip_strings(len(strings)))
    assert array.index_of("<|im_start|>") == len(strings) - 1


# ---- damaged headers ------------------------------------------------------------------------------------------------

def _fields_and_lengths(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of every count and length field in the header: the places where corruption hurts most."""
    places: list[tuple[int, int]] = [(4, 4), (8, 8), (16, 8)]
    cursor = _Cursor(data, "<", complete=True, pos=24)
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    for _ in range(n_kv):
        places.append((cursor.pos, 8))
        cursor.string("key")
        places.append((cursor.pos, 4))
        kind = cursor.u32("type")
        if kind == 9:
            places += [(cursor.pos, 4), (cursor.pos + 4, 8)]
            item = struct.unpack_from("<I", data, cursor.pos)[0]
            start = cursor.pos + 12
            cursor.array(0)
            if item == STRING:  # a few of the string lengths inside the array
                places += [(start, 8), (start + 8 + struct.unpack_from("<Q", data, start)[0], 8)]
        elif kind == 8:
            places.append((cursor.pos, 8))
            cursor.value(kind)
        else:
            cursor.value(kind)
    for _ in range(n_tensors):
        places.append((cursor.pos, 8))
        cursor.string("name")
        places.append((cursor.pos, 4))
        n_dims = cursor.u32("dims")
        places += [(cursor.pos + 8 * i, 8) for i in range(n_dims)]
        cursor.pos += 8 * n_dims
        places += [(cursor.pos, 4), (cursor.pos + 4, 8)]
        cursor.pos += 12
    return places


@pytest.mark.slow
def test_a_thousand_damaged_headers_give_one_line_errors(realistic: dict[str, Path], tmp_path: Path) -> None:
    data = realistic["mistral"].read_bytes()
    header_end = read_gguf_header(realistic["mistral"]).header_size
    rng = random.Random(7)
    places = _fields_and_lengths(data)
    giants = [1 << 63, (1 << 64) - 1, 1 << 40, 1 << 32, len(data), len(data) + 1, 0xFFFFFFFF, 0]
    changes = [(offset, size, value) for offset, size in places for value in rng.sample(giants, 4)]
    flips = max(900 - len(changes), 0)

    def mutants() -> Iterator[bytes]:  # one at a time: a thousand copies of the file would take gigabytes here
        for offset, size, value in changes:          # every count and length: giant and off-by-one values
            raw = bytearray(data)
            raw[offset:offset + size] = (value % (1 << (8 * size))).to_bytes(size, "little")
            yield bytes(raw)
        for _ in range(flips):                       # random bytes flipped in the header
            raw = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                raw[rng.randrange(header_end)] = rng.randrange(256)
            yield bytes(raw)
        for _ in range(200):                         # truncations anywhere
            yield data[:rng.randrange(1, len(data))]
        for _ in range(20):                          # arrays of arrays, up to far beyond Python's recursion limit
            yield _nested_header(rng.choice([rng.randrange(1, 12), rng.randrange(12, 200_000)]))

    assert len(changes) + flips + 200 + 20 >= 1000
    tenth = None
    outcomes = {"read": 0, "refused": 0}
    tracemalloc.start()
    try:
        for i, mutant in enumerate(mutants()):
            if i == 10:
                tenth = mutant
            started = time.perf_counter()
            try:
                parse_gguf_header(mutant, f"mutant{i}", complete=True, file_size=len(mutant))
                outcomes["read"] += 1
            except HeaderError as err:
                assert "\n" not in err.problem and err.problem, err.problem
                outcomes["refused"] += 1
            if i % 8 == 0:   # as the Hub reads it: a prefix, whose claims can only be bounded by asking for bytes
                try:
                    parse_gguf_header(mutant[:1 << 16], f"mutant{i}", complete=False, file_size=len(mutant))
                except (HeaderError, NeedMoreBytes):
                    pass
            assert time.perf_counter() - started < 5, f"mutant {i} took too long"  # a hang guard, not a speed bar
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"peak {peak >> 20} MiB"
    assert sum(outcomes.values()) >= 1000
    assert outcomes["refused"] > 500, outcomes  # the mutations do damage (else the check would be vacuous)

    # through the file reader and the CLI: one line naming the file, non-zero exit, no traceback
    path = tmp_path / "damaged.gguf"
    assert tenth is not None
    path.write_bytes(tenth)
    with pytest.raises(GGUFFileError) as caught:
        read_gguf_header(path)
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)
    done = run_lcrun("inspect", str(path))  # end to end: the exit status and the one line the shell sees
    assert done.returncode != 0 and done.stdout == "" and done.stderr.startswith(f"error: {path}: ")
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr


def test_giant_claims_are_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_token_list([f"t{i}" for i in range(100)])
    w.add_string("general.name", "x" * 50)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    data = bytearray(path.read_bytes())
    tokens_at = data.find(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 8  # type + item type
    data[tokens_at:tokens_at + 8] = struct.pack("<Q", 1 << 60)
    with pytest.raises(HeaderError, match=rf"an array at byte \d+ claims {1 << 60} entries"):
        parse_gguf_header(bytes(data), "m", complete=True)
    data = bytearray(path.read_bytes())
    name_at = data.find(b"x" * 50) - 8
    data[name_at:name_at + 8] = struct.pack("<Q", 1 << 62)
    with pytest.raises(HeaderError, match="a string of"):
        parse_gguf_header(bytes(data), "m", complete=True)


# ---- memory and the prefix protocol ---------------------------------------------------------------------------------

RSS_PROBE = """
import json, sys, psutil
from lcrun.gguf_split import read_gguf_set
process = psutil.Process()
before = process.memory_info().rss
files = read_gguf_set(sys.argv[1])
header = files.meta
found = [header.token_id(t) for t in ("<start_of_turn>", "<end_of_turn>", "<bos>")]
after_read = process.memory_info().rss
decoded = header.tokens.tolist() if sys.argv[2] == "decode" else None
after_all = process.memory_info().rss
print(json.dumps({"read": after_read - before, "decoded": after_all - before, "found": found,
                  "n": len(header.tokens), "size": files.file_size}))
"""


def _rss_probe(path: Path, mode: str) -> dict[str, int]:
    done = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path), mode], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


@pytest.mark.slow
def test_memory_stays_bounded_on_a_262k_token_header(realistic: dict[str, Path]) -> None:
    lazy = _rss_probe(realistic["gemma"], "lazy")
    assert lazy["n"] == 262144 and lazy["found"] == [105, 106, 2]
    assert lazy["read"] < 24 << 20, lazy   # the header's own bytes (~4 MiB of strings) and offsets, not the file
    # negative control: decoding every token into Python strings costs several times that, and the probe sees it
    decoded = _rss_probe(realistic["gemma"], "decode")
    assert decoded["decoded"] - decoded["read"] > 8 << 20, decoded


def test_prefix_asks_for_more_and_then_parses(realistic: dict[str, Path]) -> None:
    data = realistic["mistral"].read_bytes()
    whole = parse_gguf_header(data, "m", complete=True, file_size=len(data))
    size = 4096
    while True:
        try:
            header = parse_gguf_header(data[:size], "m", complete=False, file_size=len(data))
            break
        except NeedMoreBytes as more:
            assert more.at_least > size
            size = max(more.at_least, size * 2)
    assert header.fields.keys() == whole.fields.keys() and header.tensors == whole.tensors
    assert header.header_size == whole.header_size and size >= whole.header_size


def test_split_set_read_once_per_file(tmp_path: Path) -> None:
    from lcrun.convert.convert import convert_checkpoint
    from lcrun.models import demo_checkpoint

    convert_checkpoint(demo_checkpoint(), tmp_path / "demo.gguf", outtype="f16", split_max_size=100_000)
    first = sorted(tmp_path.glob("demo-*.gguf"))[0]
    files = read_gguf_set(first)
    assert files.split_count == len(files.headers) > 1 and not files.missing and files.first_found
    assert sum(len(h.tensors) for _, h in files.headers) == files.meta.get("split.tensors.count")
    (files.paths[-1]).unlink()
    partial = read_gguf_set(first)
    assert partial.missing == [files.paths[-1]] and "split set incomplete" in partial.warnings[0]


def test_the_one_split_name_pattern_matches_what_the_converter_writes(tmp_path: Path) -> None:
    from lcrun.convert.convert import convert_checkpoint
    from lcrun.gguf_split import is_first_split, split_set_names
    from lcrun.models import demo_checkpoint

    written = convert_checkpoint(demo_checkpoint(), tmp_path / "demo.gguf", outtype="f16", split_max_size=100_000).paths
    names = [p.name for p in written]
    assert len(names) > 1 and all(split_set_names(name) == names for name in names)
    assert [is_first_split(name) for name in names] == [True] + [False] * (len(names) - 1)
    # a Hub path keeps its folder; a whole file is its own set (negative controls: no split suffix, 5 digits only)
    assert split_set_names("q4/M-Q4_K_M-00002-of-00002.gguf") == ["q4/M-Q4_K_M-00001-of-00002.gguf",
                                                                  "q4/M-Q4_K_M-00002-of-00002.gguf"]
    assert split_set_names("M-Q4_K_M.gguf") == ["M-Q4_K_M.gguf"] and is_first_split("M-Q4_K_M.gguf")
    assert split_set_names("M-0001-of-0002.gguf") == ["M-0001-of-0002.gguf"]


# ---- what a header may claim beyond its bytes (issue 20: 12) ----------------------------------------------------------

def _nested_header(depth: int) -> bytes:
    """A GGUF header whose one key holds arrays nested `depth` deep, the innermost an empty u8 array."""
    key = b"deep.arrays"
    body = struct.pack("<4sIQQ", b"GGUF", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<I", 9)
    body += struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQ", 0, 0)
    return body


def test_nested_arrays_have_a_depth_limit_and_never_a_recursion_error(tmp_path: Path) -> None:
    from lcrun.gguf_values import MAX_ARRAY_DEPTH

    deepest = parse_gguf_header(_nested_header(MAX_ARRAY_DEPTH), "ok", complete=True).fields["deep.arrays"]
    for _ in range(MAX_ARRAY_DEPTH - 1):   # negative control: the limit itself reads, to the innermost array
        assert isinstance(deepest, list) and len(deepest) == 1
        deepest = deepest[0]
    assert deepest == []
    for depth in (MAX_ARRAY_DEPTH + 1, 100_000):   # 100,000 deep: a RecursionError with the old reader
        with pytest.raises(HeaderError, match=rf"arrays nested more than {MAX_ARRAY_DEPTH} deep"):
            parse_gguf_header(_nested_header(depth), "deep", complete=True)
        with pytest.raises(HeaderError, match="nested more than"):   # a prefix too, as the Hub reads it
            parse_gguf_header(_nested_header(depth), "deep", complete=False)
    # gguf-py writes arrays of arrays; a shallow one reads as it wrote it
    path = tmp_path / "nested.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_array("test.nested", [[1, 2], [3]])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    assert read_gguf_header(path).fields["test.nested"] == [[1, 2], [3]]
    path.write_bytes(_nested_header(100_000))
    done = invoke("inspect", str(path))
    assert_one_line_error(done, str(path), "nested more than")


# each command in the child under an address-space limit: the old reader built a list of 2**31 paths (hundreds of
# GiB), which here is a MemoryError in a second rather than a machine swapping
SPLIT_COUNT_COMMANDS = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
from tests.fixtures.cli import invoke
path, out = sys.argv[1], sys.argv[2]
results = {}
for args in (["inspect", path], ["chat", path, "--dry-run"], ["serve", path, "--dry-run"],
             ["quantize", path, out, "Q4_0"]):
    try:
        run = invoke(*args)
        results[args[0]] = [run.exit_code, run.stderr]
    except BaseException as exc:  # what escaped the CLI's one-line errors
        results[args[0]] = [-1, f"{type(exc).__name__}: {exc}"]
print(json.dumps(results))
"""


def test_a_giant_split_count_is_one_line_in_inspect_chat_serve_and_quantize(tmp_path: Path) -> None:
    from lcrun.gguf_split import MAX_SPLITS

    path = tmp_path / "model-00001-of-00002.gguf"   # a split name: the set is built from the header's count
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("split.count", 1 << 31)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    done = subprocess.run([sys.executable, "-c", SPLIT_COUNT_COMMANDS, str(path), str(tmp_path / "q.gguf")],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(results) == {"inspect", "chat", "serve", "quantize"}
    for command, (code, stderr) in results.items():
        lines = stderr.strip().splitlines()
        assert code not in (0, -1) and len(lines) == 1, (command, stderr)
        assert lines[0] == f"error: {path}: corrupt header: split.count is {1 << 31:,}; llama.cpp reads at most " \
                           f"{MAX_SPLITS:,} splits", (command, lines)
