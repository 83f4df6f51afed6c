"""Atomic file output: a written file honours the umask like any file a program creates."""

from __future__ import annotations

import os
import stat

import pytest

from autoprec.core.io import atomic_write_text


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_honour_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        path = atomic_write_text(tmp_path / "plan.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temporary file left
