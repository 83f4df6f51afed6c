"""Giving memory back between the trials of a tune.

A trial builds large objects and drops them: a plan's emulated GraphModule (fx modules hold
reference cycles, so CPython frees them only when its cycle collector runs), the plan's ONNX graph
and an ONNX Runtime session holding a copy of every weight. On a model of GPT-2's size (0.5 GB of
fp32 weights) trials that wait for the collector pile up to several GB, and glibc keeps the heap
pages of freed protobuf and numpy buffers unless asked to return them.

A full collection traverses every object the process tracks: after importing torch and the ONNX
exporter, about 450,000, 0.15 s a collection, so eight of them were a quarter of a small model's
tune. :func:`collect_new_only` puts what exists before a tune out of the collector's sight.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
from typing import Iterator


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> "ctypes._CFuncPtr | None":
    """glibc's ``malloc_trim``, None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Collect reference cycles now and hand freed heap pages back to the operating system."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def collect_new_only() -> Iterator[None]:
    """Within it, collections (:func:`release_memory`'s and CPython's own) traverse only the objects
    created inside: those from before are frozen (``gc.freeze``) and handed back to the collector
    on leaving, so a cycle of them that became garbage inside is collected afterwards. Inside
    another such block, or where the caller froze the heap itself, the freeze is left as found."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
