"""Giving memory back between the trials of a tune.

A trial builds large objects and drops them: a plan's emulated GraphModule (fx modules hold
reference cycles, so CPython frees them only when its cycle collector runs), the plan's ONNX graph
and an ONNX Runtime session holding a copy of every weight. On a model of GPT-2's size (0.5 GB of
fp32 weights) trials that wait for the collector pile up to several GB, and glibc keeps the heap
pages of freed protobuf and numpy buffers unless asked to return them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


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
