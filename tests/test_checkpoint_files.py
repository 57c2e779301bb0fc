"""Checkpoint files are written whole or not at all: a temporary name, flushed to disk, then a rename (and the
folder flushed), so a crash or a failed write never leaves a reader half a ``best.pt`` or ``model.pt``."""

from __future__ import annotations

import os

import pytest
import torch

from capenext.checkpoint import atomic_copy, atomic_save


def test_atomic_save_and_copy_flush_the_file_and_its_folder(tmp_path, monkeypatch):
    flushed = []
    real = os.fsync

    def spy(fd):
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_save({"w": torch.ones(3)}, tmp_path / "state.pt")
    atomic_copy(tmp_path / "state.pt", tmp_path / "best.pt")
    # the temporary file (renamed after its flush) and the folder, for each write
    assert flushed == [str(tmp_path / ".state.pt.tmp"), str(tmp_path), str(tmp_path / ".best.pt.tmp"), str(tmp_path)]
    assert torch.equal(torch.load(tmp_path / "best.pt", weights_only=True)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "state.pt"]


def test_a_failed_copy_leaves_the_old_file_whole_and_no_temporary(tmp_path):
    atomic_save({"w": torch.zeros(2)}, tmp_path / "best.pt")
    before = (tmp_path / "best.pt").read_bytes()
    with pytest.raises(OSError):
        atomic_copy(tmp_path / "missing.pt", tmp_path / "best.pt")
    with pytest.raises(Exception):
        atomic_save({"w": lambda: 0}, tmp_path / "best.pt")  # not picklable: fails mid-write
    assert (tmp_path / "best.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]
