"""DOCX and EPUB are zip files: checked before any part is unpacked, so a zip bomb is one line, not the machine's
memory. Python's zipfile never unpacks a part past the size its directory declares (a lying part fails its CRC), so
checking the declared sizes bounds what is read."""
from __future__ import annotations

import io
import zipfile

from lcrun.errors import DocumentError

from .record import ReadLimits


def open_zip(name: str, limits: ReadLimits, *, data: bytes) -> zipfile.ZipFile:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError) as exc:
        raise DocumentError(name, f"damaged: not a readable zip container ({exc})") from None
    members = archive.infolist()
    if len(members) > limits.max_zip_members:
        raise DocumentError(name, f"{len(members):,} parts in its zip container, more than the "
                                  f"{limits.max_zip_members:,} lcrun opens")
    total = 0
    for member in members:
        if member.flag_bits & 0x1:
            raise DocumentError(name, "encrypted (password-protected); save an unprotected copy first")
        ratio = member.file_size / max(member.compress_size, 1)
        if member.file_size > 1 << 20 and ratio > limits.max_zip_ratio:
            raise DocumentError(name, f"part {member.filename} unpacks {ratio:,.0f}x ({member.file_size:,} bytes): "
                                      "a zip bomb, not a document")
        total += member.file_size
    if total > limits.max_unzipped_bytes:
        raise DocumentError(name, f"unpacks to {total / (1 << 20):,.0f} MiB, more than the "
                                  f"{limits.max_unzipped_bytes >> 20} MiB lcrun unpacks from one document")
    return archive


def read_member(archive: zipfile.ZipFile, member: str, name: str) -> bytes:
    try:
        return archive.read(member)
    except KeyError:
        raise DocumentError(name, f"damaged: its zip container has no {member}") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DocumentError(name, f"damaged: {member} cannot be unpacked ({exc})") from None
