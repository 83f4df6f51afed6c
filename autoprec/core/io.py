"""File output that never leaves a partial file behind: write a temp file, then rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from autoprec.core.errors import UsageError


def _unwritable(path: Path, exc: OSError) -> UsageError:
    if isinstance(exc, IsADirectoryError):
        return UsageError(f"cannot write {path}: it is a folder; give a file path")
    return UsageError(f"cannot write {path}: {exc.strerror or type(exc).__name__}: choose a folder you can write to")


def writable_dir(path: str | Path) -> Path:
    """Check that folder ``path`` can be made and written in, so that a long run (tune) fails at
    its start rather than after its work. Leaves nothing behind: the folder is made on first write."""
    p = Path(path)
    there = p
    while not there.exists() and there != there.parent:
        there = there.parent
    if not there.is_dir():
        raise UsageError(f"cannot write in {p}: {there} is a file; choose a folder")
    try:
        with tempfile.TemporaryDirectory(dir=there):
            pass
    except OSError as e:
        raise _unwritable(p, e) from None
    return p


def writable_file(path: str | Path) -> Path:
    """Check up front that file ``path`` can be written (:func:`writable_dir` for its folder)."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"cannot write {p}: it is a folder; give a file path")
    writable_dir(p.parent)
    return p


def _umask() -> int:
    """The process's umask (reading it means setting it: put it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (same-folder temp file + os.replace)."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as e:
        raise _unwritable(p, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes it 0600: honour the umask as open() would
            f.write(data)
        os.replace(tmp, p)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):  # disk full, a folder where the file should be, ...
            raise _unwritable(p, e) from None
        raise
    return p


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
