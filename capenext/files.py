"""Small file helpers every format writer and reader shares: content hashes and atomic writes."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place (readers see the old
    file or the new one, never half of one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def unsafe_file_name(file_name: str) -> str | None:
    """Why an image ``file_name`` may not be used (it must stay inside the image folder), or ``None``.

    Absolute paths (``/x``, ``\\x``, ``C:x``) and ``..`` components (either separator) would pull any readable
    file of the machine into the shards.
    """
    if not file_name.strip():
        return "is empty"
    if file_name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", file_name):
        return "is absolute"
    if ".." in re.split(r"[/\\]", file_name):
        return "has a '..' component"
    if "\0" in file_name:
        return "holds a NUL character"
    return None


def not_a_checkpoint(path: str | Path) -> str:
    """What an unreadable file is not, from its first bytes: torch's zip format, a legacy pickle, or neither."""
    import zipfile

    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if zipfile.is_zipfile(path):
        return "not a PyTorch checkpoint (a zip archive without torch's data.pkl)"
    if head == b"PK\x03\x04":
        return "not a whole PyTorch checkpoint (a torn zip archive: truncated, its directory missing)"
    if head[:1] == b"\x80":
        return "not a PyTorch checkpoint torch can read (a pickle, truncated or of another program)"
    if not head:
        return "not a PyTorch checkpoint (an empty file)"
    return "not a PyTorch checkpoint (neither torch's zip format nor a pickle)"
