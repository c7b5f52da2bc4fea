"""Tests for fedseed.memory: where the C allocator puts activation-sized blocks, inside and outside a backward."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# In a fresh process: a long-lived one (pytest's) serves a block from free heap chunks whatever the threshold.
PROBE = textwrap.dedent("""
    import ctypes
    import numpy as np
    from fedseed.memory import backward_memory, set_forward_threshold

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        print("skip")
        raise SystemExit
    libc.mallinfo2.restype = MallInfo2

    def mapped_for(nbytes):  # what a block of nbytes adds to glibc's mapped blocks while it lives
        before = libc.mallinfo2().hblkhd
        block = np.ones(nbytes, dtype=np.uint8)
        grown = libc.mallinfo2().hblkhd - before
        del block
        return grown

    set_forward_threshold()
    out = [mapped_for(1 << 20)]
    with backward_memory():
        out.append(mapped_for(1 << 20))
    out += [mapped_for(1 << 20), mapped_for(32 << 20)]
    print(*out)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_backward_maps_each_block_and_a_forward_reuses_the_heap():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    if out == ["skip"]:
        pytest.skip("not glibc 2.33+")
    forward, backward, after, logits = map(int, out)
    assert forward == 0 and after == 0  # from the heap: the next forward's block of this size reuses it
    assert backward >= 1 << 20  # its own mapping: freed, it leaves the process at once
    assert logits >= 32 << 20  # above 16 MiB (a model's float32 logits): mapped, given back when freed
