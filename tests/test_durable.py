"""Durable writes: a file is the old version or the complete new one, never a partial one."""

from __future__ import annotations

from pathlib import Path

import pytest

from neuroscribe.durable import atomic_file


def test_atomic_file_replaces_the_target(tmp_path: Path) -> None:
    """A finished write replaces the old file and leaves no temporary file, mode 0644."""
    target = tmp_path / "sub" / "index.json"
    with atomic_file(target, "w") as fh:
        fh.write("first\n")
    with atomic_file(target, "w") as fh:
        fh.write("second\n")
    assert target.read_text(encoding="utf-8") == "second\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["index.json"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    """An exception inside the block leaves the previous version and no temporary file."""
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_file(target) as fh:
        fh.write(b"partial new bytes")
        raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]
