"""Measuring a client's peak memory the same way for every method, and keeping a process's peak low.

On CUDA the allocator's own peak counter is exact. On CPU there is no such
counter, so torch's profiler records every tensor allocation and free during the
call and the peak of their running sum is taken. Both count what the call
allocates *on top of* what already exists (the weights), which is
where methods differ: activations, gradients, optimizer state, temporaries.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
BACKWARD_THRESHOLD = 128 << 10  # glibc's own starting value
FORWARD_THRESHOLD = 16 << 20  # a layer's activations reuse the heap; a model's logits in float32 are mapped

T = TypeVar("T")


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _mmap_threshold(nbytes: int) -> None:
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, nbytes)
    release_freed_memory()


def set_forward_threshold() -> None:
    """Blocks up to 16 MiB come from the heap and are reused; larger ones are mapped and given back when freed.

    fedseed's entry points call it first. glibc's own rule raises the threshold
    to the largest block freed so far (up to 32 MiB), so what a process keeps
    would depend on its history; fixed, a forward's per-layer activations reuse
    the heap (no page faults) and a model's float32 logits, the largest blocks of
    a forward, leave the process when freed. Against glibc's rule, a 1.1B
    bfloat16 forward with its loss took 4-11% longer (two runs), and a FedKSeed
    client held 17 MB less at 1.1B. Elsewhere this does nothing.
    """
    _mmap_threshold(FORWARD_THRESHOLD)


def release_freed_memory() -> None:
    """Give the blocks the heap holds free back to the system (glibc's ``malloc_trim``).

    Forwards keep activation-sized blocks in the heap for the next forward;
    between phases (an evaluation, a client's local training) those blocks are
    resident set that the next phase may not reuse. Elsewhere this does nothing.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextmanager
def backward_memory() -> Iterator[None]:
    """Inside, the C allocator gives every freed block above 128 KiB back to the system at once.

    glibc raises its mmap threshold each time a large block is freed (up to 32
    MiB), after which blocks of that size come from the heap and stay resident
    when freed. A backward pass frees and reallocates activation-sized blocks per
    layer, so a process's peak resident set grew with the number of layers
    though it never held more than one layer's activations: measured on FedKRSO
    in bfloat16, 0.69 bytes per weight byte above inference, 0.06 with the
    threshold fixed at 128 KiB. Forwards want the opposite: each activation a
    fresh mapping means page faults that zero it, and a 1.1B bfloat16 forward
    took 1.98 s instead of 1.52. So the low threshold holds only around local
    training that runs a backward (FedAvg, FedIT, FedKRSO, Ferret); elsewhere
    :func:`set_forward_threshold` holds.
    glibc's documented ``mallopt(M_MMAP_THRESHOLD)``; elsewhere this does nothing.
    """
    _mmap_threshold(BACKWARD_THRESHOLD)
    try:
        yield
    finally:
        _mmap_threshold(FORWARD_THRESHOLD)


def resident_bytes(module: "torch.nn.Module") -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def peak_extra_bytes(fn: Callable[[], T], device: str = "cpu") -> tuple[T, int]:
    """Run ``fn`` and return its result and the peak bytes it allocated beyond what was live before."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return result, peak
