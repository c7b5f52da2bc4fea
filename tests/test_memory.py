"""Tests for fedseed.memory: where the C allocator puts activation-sized blocks, inside and outside a backward."""

from __future__ import annotations

import ctypes
import sys

import numpy as np
import pytest

from fedseed.memory import backward_memory, set_forward_threshold


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mapped_bytes() -> int:
    """Bytes glibc holds in blocks of their own mapping (``mallinfo2().hblkhd``)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().hblkhd)


def _mapped_for(nbytes: int) -> int:
    """How much an allocation of ``nbytes`` adds to the mapped blocks while it lives."""
    before = _mapped_bytes()
    block = np.ones(nbytes, dtype=np.uint8)
    grown = _mapped_bytes() - before
    del block
    return grown


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_backward_maps_each_block_and_a_forward_reuses_the_heap():
    try:
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("not glibc 2.33+")
    set_forward_threshold()
    assert _mapped_for(1 << 20) == 0
    with backward_memory():
        assert _mapped_for(1 << 20) >= 1 << 20  # its own mapping: freed, it leaves the process at once
    assert _mapped_for(1 << 20) == 0  # from the heap: the next forward's block of this size reuses it
    assert _mapped_for(32 << 20) >= 32 << 20  # above 16 MiB (a model's float32 logits): mapped, given back
