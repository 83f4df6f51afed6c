"""An output folder is written as a unit: completely or not at all, one run at a time, and what a
killed run left is cleaned by the next (core.io.OutputFolder)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from autoprec.core.errors import UsageError
from autoprec.core.io import OutputFolder, atomic_write_text


def _listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


def _old(tmp_path: Path) -> Path:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "plan.json").write_text("old plan")
    (dest / "report.md").write_text("old report")
    return dest


def test_a_complete_run_replaces_the_folder_and_leaves_nothing_else(tmp_path: Path) -> None:
    dest = _old(tmp_path)
    with OutputFolder(dest) as staging:
        assert staging.parent == tmp_path and staging != dest
        atomic_write_text(staging / "plan.json", "new plan")
        assert (dest / "plan.json").read_text() == "old plan"  # the old folder intact until the swap
    assert _listing(tmp_path) == {"out": b"<dir>", "out/plan.json": b"new plan"}


def test_a_failed_run_leaves_the_old_folder_as_it_was(tmp_path: Path) -> None:
    dest = _old(tmp_path)
    before = _listing(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with OutputFolder(dest) as staging:
            atomic_write_text(staging / "plan.json", "half")
            raise KeyboardInterrupt
    assert _listing(tmp_path) == before


def test_a_second_run_into_the_same_folder_fails_clearly(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with OutputFolder(dest) as staging:
        atomic_write_text(staging / "a", "first")
        with pytest.raises(UsageError, match=rf"another autoprec run \(pid {os.getpid()}\) is writing .*out"):
            with OutputFolder(dest):
                pass
    assert _listing(tmp_path) == {"out": b"<dir>", "out/a": b"first"}
    with OutputFolder(dest) as staging:  # released: the next run goes ahead
        atomic_write_text(staging / "b", "second")
    assert _listing(tmp_path) == {"out": b"<dir>", "out/b": b"second"}


def test_what_killed_runs_left_is_cleaned_and_a_half_swapped_folder_put_back(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    (tmp_path / ".out.staging-123-abc").mkdir()
    (tmp_path / ".out.staging-123-abc" / ".plan.json.x.tmp").write_text("junk")
    (tmp_path / ".out.lock").write_text("123")
    aside = tmp_path / ".out.old-123"  # killed between the two renames of a swap: no out/ at all
    aside.mkdir()
    (aside / "plan.json").write_text("old plan")
    with pytest.raises(RuntimeError):
        with OutputFolder(dest):
            # the old folder is back before anything else happens
            assert (dest / "plan.json").read_text() == "old plan"
            raise RuntimeError
    assert _listing(tmp_path) == {"out": b"<dir>", "out/plan.json": b"old plan"}


def test_the_folder_honours_the_umask_and_a_file_in_its_place_is_an_error(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        with OutputFolder(tmp_path / "out") as staging:
            atomic_write_text(staging / "plan.json", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out" / "plan.json").stat().st_mode & 0o777 == 0o640
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="file is a file; choose a folder"):
        with OutputFolder(tmp_path / "file"):
            pass
