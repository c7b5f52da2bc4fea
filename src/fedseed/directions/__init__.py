"""Seeded random directions over a model's trainable tensors.

This package is the only place in fedseed that produces random directions. The
interface is deliberately narrow, so that faster kernels can replace the ones
behind it without any algorithm noticing:

* :class:`DirectionSpace` binds an ordered list of named tensors;
* :meth:`DirectionSpace.add_` does ``w = base + sum_k c_k * D(seed_k)`` in place;
* :meth:`DirectionSpace.materialize` returns a direction (tests, small tools).

It knows nothing of algorithms, rounds or messages.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedseed.directions import cpu
from fedseed.directions.generator import (
    DISTRIBUTIONS,
    Distribution,
    TENSOR_SALT,
    derive_seed,
    direction,
    mix64,
    tensor_id,
    _mix64_array,
)

__all__ = ["DISTRIBUTIONS", "Distribution", "DirectionSpace", "derive_seed", "random_matrix", "tensor_id"]


def random_matrix(seed: int, name: str, shape: tuple[int, ...], distribution: Distribution = "gaussian") -> torch.Tensor:
    """A seeded float32 matrix (e.g. FedKRSO's projection ``P``), a pure function of (seed, name, shape)."""
    numel = int(np.prod(shape))
    return torch.from_numpy(direction(seed, tensor_id(f"{name}|{shape}"), numel, distribution)).view(shape)


def _keys(seeds: np.ndarray, tid: int) -> np.ndarray:
    """Vectorised ``tensor_key`` for many seeds and one tensor."""
    return _mix64_array(seeds ^ np.uint64(mix64(tid ^ TENSOR_SALT)))


def _flat_f32(t: torch.Tensor) -> np.ndarray | None:
    """A writable float32 numpy view of ``t``, or None when no view is possible."""
    if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
        return None
    return t.detach().view(-1).numpy()


class DirectionSpace:
    """The tensors a direction spans, each with an id derived from its name.

    Parameters
    ----------
    named_tensors:
        ``(name, tensor)`` pairs; the tensors are updated in place by :meth:`add_`.
    distribution:
        ``"rademacher"`` (bitwise portable across devices) or ``"gaussian"``.
    """

    def __init__(self, named_tensors: Sequence[tuple[str, torch.Tensor]], distribution: Distribution = "rademacher"):
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"`distribution` must be one of {DISTRIBUTIONS}, got {distribution!r}")
        self.names = [n for n, _ in named_tensors]
        self.tensors = [t for _, t in named_tensors]
        self.ids = [tensor_id(n) for n in self.names]
        self.distribution = distribution
        self.numel = sum(t.numel() for t in self.tensors)

    def add_(
        self,
        seeds: Sequence[int] | np.ndarray,
        coeffs: Sequence[float] | np.ndarray,
        base: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """Set every tensor to ``base + sum_k coeffs[k] * D(seeds[k])`` (base defaults to itself).

        The sum is accumulated in float32 in the given seed order, then added once:
        callers that need identical results must pass seeds in the same order.
        """
        seeds_u64 = np.asarray(seeds, dtype=np.uint64).reshape(-1)
        c32 = np.asarray(coeffs, dtype=np.float32).reshape(-1)
        if seeds_u64.size != c32.size:
            raise ValueError(f"{seeds_u64.size} seeds but {c32.size} coefficients")
        if seeds_u64.size == 0 and base is None:
            return
        gaussian = self.distribution == "gaussian"
        for j, (t, tid) in enumerate(zip(self.tensors, self.ids)):
            keys = _keys(seeds_u64, tid)
            src = t if base is None else base[j]
            out = _flat_f32(t)
            src_np = _flat_f32(src) if src is not t else out
            if out is not None and src_np is not None:
                cpu.add_directions(out, src_np, keys, c32, gaussian)
                continue
            # Other devices and dtypes: compute in float32 on the CPU, then store.
            work = src.detach().to("cpu", torch.float32).contiguous().view(-1).numpy().copy()
            cpu.add_directions(work, work, keys, c32, gaussian)
            with torch.no_grad():
                t.copy_(torch.from_numpy(work).view_as(t))

    def project(self, seeds: Sequence[int] | np.ndarray) -> np.ndarray:
        """``<D(seed_k), w>`` for every seed, summed over the bound tensors (float64, shape (K,)).

        Ferret's ``V^T Delta``: bind the update's tensors, project onto the bases.
        """
        seeds_u64 = np.asarray(seeds, dtype=np.uint64).reshape(-1)
        total = np.zeros(seeds_u64.size, dtype=np.float64)
        out = np.empty_like(total)
        for t, tid in zip(self.tensors, self.ids):
            flat = _flat_f32(t)
            if flat is None:
                flat = t.detach().to("cpu", torch.float32).contiguous().view(-1).numpy()
            cpu.project(flat, _keys(seeds_u64, tid), self.distribution == "gaussian", out)
            total += out
        return total

    def materialize(self, seed: int) -> list[torch.Tensor]:
        """The direction of ``seed`` as float32 tensors shaped like the bound ones."""
        return [
            torch.from_numpy(direction(seed, tid, t.numel(), self.distribution)).view(t.shape)
            for t, tid in zip(self.tensors, self.ids)
        ]
