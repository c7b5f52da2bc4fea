"""Measuring a client's peak memory the same way for every method, on CPU or GPU.

On CUDA the allocator's own peak counter is exact. On CPU there is no such
counter, so torch's profiler records every tensor allocation and free during the
call and the peak of their running sum is taken. Both count what the call
allocates *on top of* what already exists (weights, the w0 copy), which is
where methods differ: activations, gradients, optimizer state, temporaries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def peak_extra_bytes(fn: Callable[[], T], device: str = "cpu") -> tuple[T, int]:
    """Run ``fn`` and return its result and the peak bytes it allocated beyond what was live before."""
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
