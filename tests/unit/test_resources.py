"""release_memory inside collect_new_only: it collects what a tune made, and what existed before is
collected once the tune is over, never lost."""

from __future__ import annotations

import gc
import weakref

from autoprec.core.resources import collect_new_only, release_memory


class _Node:
    """An object in a reference cycle: only the cycle collector frees it."""

    def __init__(self) -> None:
        self.me = self


def _cycle() -> weakref.ref:
    return weakref.ref(_Node())


def test_cycles_made_inside_are_collected_inside_and_older_ones_after():
    gc.collect()
    old = _Node()
    old_ref = weakref.ref(old)
    with collect_new_only():
        del old  # garbage now, but frozen: out of the collector's sight inside
        new_ref = _cycle()
        release_memory()
        assert new_ref() is None
        assert old_ref() is not None
    gc.collect()
    assert old_ref() is None
    assert gc.get_freeze_count() == 0


def test_a_freeze_found_is_left_as_found():
    """An unfreeze empties the permanent generation; the count otherwise only drifts down as frozen
    objects die by reference counting, so "still frozen" is a count above 0."""
    with collect_new_only():
        assert gc.get_freeze_count() > 0
        with collect_new_only():
            pass
        assert gc.get_freeze_count() > 0  # the inner block did not unfreeze the outer's
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a caller's own freeze
    try:
        with collect_new_only():
            pass
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
