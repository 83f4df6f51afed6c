"""File output that never leaves a partial file behind: write a temp file, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

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


class OutputFolder:
    """A run's output folder written as a unit: completely or not at all.

    ``with OutputFolder(dest) as staging:`` takes a lock beside ``dest`` (a second run into the same
    folder fails at once, naming the first run's process), builds the new folder in ``staging``
    (``.<name>.staging-<pid>`` beside ``dest``, same file system) and, only when the block ends
    without an error, swaps it in: ``dest`` moves aside, ``staging`` takes its name, the old folder
    is deleted. An error, Ctrl-C or a full disk removes the staging folder and leaves ``dest`` as it
    was; after a ``kill -9`` the next run into ``dest`` removes what the killed run left (and puts
    back a folder caught between the two renames of a swap). Folders honour the umask.
    """

    def __init__(self, dest: str | Path) -> None:
        self.dest = Path(dest)
        self.parent = self.dest.parent
        self.name = self.dest.name
        self.staging: Path | None = None
        self._lock: int | None = None
        self._lock_path: Path | None = None
        self._owns_lock = False

    def _leftovers(self, kind: str) -> list[Path]:
        return sorted(self.parent.glob(f".{self.name}.{kind}-*"))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock for a whole run (``autoprec train`` writes checkpoints into the folder
        itself before its records are swapped in); ``with self`` inside it does not lock again."""
        self._acquire()
        try:
            yield
        finally:
            self._unlock()

    def _acquire(self) -> None:
        import fcntl

        writable_dir(self.dest)  # names the folder asked for, whichever ancestor is the problem
        if self.dest.exists() and not self.dest.is_dir():
            raise UsageError(f"cannot write the output folder {self.dest}: it is a file; choose a folder")
        lock = self.parent / f".{self.name}.lock"
        while True:  # the lock file is removed on release: lock the file that is still there
            try:
                self.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            except OSError as e:
                raise _unwritable(self.dest, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise UsageError(f"another autoprec run (pid {holder}) is writing {self.dest}: wait for it to "
                                 "finish or choose another --out folder") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock, self._lock_path = fd, lock
        # what killed runs left: their staging folders, and an old folder a swap had moved aside
        for old in self._leftovers("old"):
            if not self.dest.exists():
                os.rename(old, self.dest)
            else:
                _remove_tree(old)
        for stale in self._leftovers("staging"):
            _remove_tree(stale)

    def __enter__(self) -> Path:
        self._owns_lock = self._lock is None
        if self._owns_lock:
            self._acquire()
        try:
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.name}.staging-{os.getpid()}-", dir=self.parent))
            os.chmod(self.staging, 0o777 & ~_umask())
        except OSError as e:
            if self._owns_lock:
                self._unlock()
            raise _unwritable(self.dest, e) from None
        return self.staging

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self.staging is not None
        try:
            if exc_type is not None:
                _remove_tree(self.staging)
                return
            aside = self.parent / f".{self.name}.old-{os.getpid()}"
            try:
                if self.dest.exists():
                    os.rename(self.dest, aside)
                os.rename(self.staging, self.dest)
            except OSError as e:
                if aside.exists() and not self.dest.exists():
                    os.rename(aside, self.dest)
                _remove_tree(self.staging)
                raise _unwritable(self.dest, e) from None
            _remove_tree(aside)
        finally:
            if self._owns_lock:
                self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None and self._lock_path is not None:
            self._lock_path.unlink(missing_ok=True)  # before the flock goes: a waiter re-checks the inode
            os.close(self._lock)
            self._lock = None


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
