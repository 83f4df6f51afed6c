"""The profiling cache: results a tune computed, kept on disk under a fingerprint of everything they
depend on, so that a tune killed mid-profile and run again skips what was finished.

A :class:`ResultCache` is one folder per fingerprint (the model's graph and weights, its
calibration data, the model file's source, autoprec's own source, and the settings: the caller
hashes them with :func:`fingerprint`). Each result is one JSON file holding its value and the
SHA-256 of that value, written atomically as soon as it is known (one per profiled layer in exact
mode), so a kill loses at most the result in progress; an entry whose checksum does not match (a
disk error, a hand edit) is counted as corrupt and computed again. Values are JSON, floats written
with their exact repr, so a reused result is the computed one bit for bit and a resumed tune writes
the same plan.json.

The cache lives in ``$AUTOPREC_CACHE`` (``off`` disables it), else ``$XDG_CACHE_HOME/autoprec``,
else ``~/.cache/autoprec``; ``--no-cache`` turns it off for one run. Imports no torch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from autoprec.core.io import atomic_write_bytes, atomic_write_text

CACHE_ENV = "AUTOPREC_CACHE"
_OFF = ("off", "0", "no", "false", "")
_ENTRY_VERSION = 1


def cache_root() -> Path | None:
    """Where cached results live; None when ``$AUTOPREC_CACHE`` turns the cache off."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in _OFF else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "autoprec"


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """SHA-256 of autoprec's own source: results computed by other code are never reused."""
    h = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for p in sorted(package.rglob("*.py")):
        h.update(str(p.relative_to(package)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def fingerprint(*parts: bytes | str) -> str:
    """SHA-256 over ``parts`` (each length-prefixed, so no two part lists collide)."""
    h = hashlib.sha256()
    for part in parts:
        b = part.encode() if isinstance(part, str) else part
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


class ResultCache:
    """The cached results of one fingerprint; counts what it reused, computed and found corrupt."""

    def __init__(self, root: Path, key: str) -> None:
        self.folder = root / key[:2] / key
        self.hits = 0
        self.misses = 0
        self.corrupt = 0

    def get(self, name: str) -> Any | None:
        """The value stored under ``name``; None (a miss) when there is none or it is corrupt."""
        path = self.folder / f"{name}.json"
        try:
            entry = json.loads(path.read_text())
            ok = (isinstance(entry, dict) and entry.get("version") == _ENTRY_VERSION
                  and entry.get("sha256") == _digest(entry.get("value")))
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError):
            ok = False
        if not ok:
            self.corrupt += 1
            self.misses += 1
            return None
        self.hits += 1
        return entry["value"]

    def put(self, name: str, value: Any) -> None:
        """Store ``value`` (JSON data) under ``name``; a cache that cannot be written is skipped."""
        entry = {"version": _ENTRY_VERSION, "sha256": _digest(value), "value": value}
        try:
            atomic_write_text(self.folder / f"{name}.json", json.dumps(entry, sort_keys=True))
        except Exception:  # a full or read-only cache never fails the run it serves
            pass

    def get_bytes(self, name: str) -> bytes | None:
        """The bytes stored under ``name`` by :meth:`put_bytes`; None (a miss) when there are none or
        they do not match the digest their entry recorded."""
        entry = self.get(name)
        if entry is None:
            return None
        try:
            data = (self.folder / f"{name}.bin").read_bytes()
        except OSError:
            data = None
        if data is None or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            self.hits -= 1
            self.misses += 1
            self.corrupt += 1
            return None
        return data

    def put_bytes(self, name: str, data: bytes) -> None:
        """Store ``data`` (a file too large or too binary for JSON: a serialized model) under ``name``:
        the bytes first, then the entry with their digest, so a kill between the two leaves a miss."""
        try:
            atomic_write_bytes(self.folder / f"{name}.bin", data)
        except Exception:  # as put(): the cache never fails the run it serves
            return
        self.put(name, {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})

    def line(self) -> str:
        """What the cache did, for the summary."""
        total = self.hits + self.misses
        text = f"profile cache: reused {self.hits} of {total} result(s)"
        if self.corrupt:
            text += f", {self.corrupt} corrupt entr{'y' if self.corrupt == 1 else 'ies'} recomputed"
        return text + f" ({self.folder}; --no-cache to bypass)"
