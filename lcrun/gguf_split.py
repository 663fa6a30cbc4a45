"""A GGUF model split over several files, as gguf-split and GGUFWriter(split_max_*) write them and llama.cpp opens
them: the one pattern of split file names (`<prefix>-00001-of-00003.gguf`), and every header of a local split set."""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import GGUFFileError, LcrunError
from .gguf_reader import GGUFHeader, TensorInfo, read_gguf_header

SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
SPLIT_COUNT_KEY = "split.count"
MAX_SPLITS = 65535     # llama.cpp reads split.count as a 16-bit number


def split_file_name(prefix: str, number: int, count: int) -> str:
    return f"{prefix}-{number:05d}-of-{count:05d}.gguf"


def split_set_names(filename: str) -> list[str]:
    """Every file of the split set `filename` (a name or a path in a repo) belongs to, or just `filename`. A split
    name that cannot be one (`-00001-of-00000`, `-00003-of-00002`) is an LcrunError naming it."""
    match = SPLIT_NAME.match(filename)
    if match is None:
        return [filename]
    number, count = int(match["no"]), int(match["count"])
    if not 1 <= number <= count:
        raise LcrunError(filename, f"not a valid split file name: part {number} of {count} (parts count from 1 to "
                                   "the number of splits)")
    return [split_file_name(match["prefix"], i, count) for i in range(1, count + 1)]


def is_first_split(filename: str) -> bool:
    """Whether `filename` is a whole model or the first file of a split set (the one llama.cpp is given)."""
    match = SPLIT_NAME.match(filename)
    return match is None or int(match["no"]) == 1


@dataclass
class GGUFSet:
    """A GGUF model as llama.cpp opens it: the file named, and the other files of its split set."""
    path: Path                                   # the file the user named
    headers: list[tuple[Path, GGUFHeader]]       # every split found, in order
    split_count: int
    missing: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    first_found: bool = True                     # whether the split holding the model's metadata is here

    @property
    def meta(self) -> GGUFHeader:
        """The header with the model's metadata: llama.cpp reads it from the first split."""
        return self.headers[0][1] if self.first_found else self.given

    @property
    def given(self) -> GGUFHeader:
        return next(h for p, h in self.headers if p == self.path)

    @property
    def paths(self) -> list[Path]:
        return [p for p, _ in self.headers]

    @property
    def file_size(self) -> int:
        return sum(h.file_size or 0 for _, h in self.headers)

    def tensors(self) -> Iterator[tuple[Path, GGUFHeader, TensorInfo]]:
        for path, header in self.headers:
            for tensor in header.tensors:
                yield path, header, tensor


def split_set_paths(path: Path, header: GGUFHeader) -> tuple[list[Path], int, list[str]]:
    """(paths of the declared split set, declared count, warnings) for the file the user named."""
    count = header.get(SPLIT_COUNT_KEY)
    if not isinstance(count, int) or isinstance(count, bool) or count <= 1:
        return [path], 1, []
    if count > MAX_SPLITS:  # a list of 2**31 paths would be the end of this process
        raise GGUFFileError(path, f"corrupt header: {SPLIT_COUNT_KEY} is {count:,}; llama.cpp reads at most "
                                  f"{MAX_SPLITS:,} splits")
    match = SPLIT_NAME.match(path.name)
    if match is None:
        return [path], count, [f"split set incomplete: this file is one of {count} splits, but its name does not "
                               "follow <name>-00001-of-000NN.gguf, so the others cannot be found"]
    return [path.with_name(split_file_name(match["prefix"], i, count)) for i in range(1, count + 1)], count, []


def read_gguf_set(path: Path) -> GGUFSet:
    """The named file's header and those of the rest of its split set (each file read once)."""
    path = Path(path)
    given = read_gguf_header(path)
    expected, count, warnings = split_set_paths(path, given)
    headers: list[tuple[Path, GGUFHeader]] = []
    missing: list[Path] = []
    for p in expected:
        if p == path:
            headers.append((p, given))
        elif p.exists():
            headers.append((p, read_gguf_header(p)))
        else:
            missing.append(p)
    if missing:
        names = ", ".join(p.name for p in missing[:4]) + (f" and {len(missing) - 4:,} more" if len(missing) > 4 else "")
        warnings.append(f"split set incomplete: found {len(headers)} of {count} files, missing {names}")
    return GGUFSet(path, headers, count, missing, warnings, first_found=headers[0][0] == expected[0])
