"""Seeded random directions over a model's trainable tensors.

This package is the only place in fedseed that produces random directions. The
interface is deliberately narrow, so that faster kernels can replace the ones
behind it without any algorithm noticing:

* :class:`DirectionSpace` binds an ordered list of named tensors;
* :meth:`DirectionSpace.add_` does ``w = base + sum_k c_k * D(seed_k)`` in place;
* :meth:`DirectionSpace.perturb_into` writes ``w + sum_k c_k * D(seed_k)`` elsewhere, leaving ``w``;
* :meth:`DirectionSpace.project` does ``<D(seed_k), w>`` for every seed (Ferret's ``V^T Delta``);
* :meth:`DirectionSpace.materialize` returns a direction (tests, small tools);
* :func:`random_matrix` returns one seeded matrix (FedKRSO's projections).

CPU tensors go to the numba kernels of ``cpu.py``, CUDA tensors to the Triton
kernels of ``cuda.py``; both compute the same bits (see ``docs/directions.md``).
It knows nothing of algorithms, rounds or messages.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedseed.directions import cpu
from fedseed.directions.generator import DISTRIBUTIONS, TENSOR_SALT, Distribution, derive_seed, mix64, tensor_id
from fedseed.directions.precision import PRECISIONS, Precision, rounding_keys

__all__ = [
    "DISTRIBUTIONS",
    "PRECISIONS",
    "Distribution",
    "DirectionSpace",
    "Precision",
    "derive_seed",
    "random_matrix",
    "tensor_id",
]

_KINDS = {torch.float32: cpu.F32, torch.bfloat16: cpu.BF16, torch.float16: cpu.F16}
_PROJECT_PARTIAL_BYTES = 1 << 24  # bound on project's table of partial sums per kernel call
_SERIAL_WORK = 1 << 21  # generated elements below which one thread beats waking the others (~0.2 ms)
_GAUSSIAN_COST = 30  # a Gaussian element costs about as much as 30 Rademacher ones


def random_matrix(seed: int, name: str, shape: tuple[int, ...], distribution: Distribution = "gaussian") -> torch.Tensor:
    """A seeded float32 CPU matrix (e.g. FedKRSO's projection ``P``), a pure function of (seed, name, shape)."""
    shape = tuple(int(s) for s in shape)
    out = torch.zeros(shape, dtype=torch.float32)
    DirectionSpace([(f"{name}|{shape}", out)], distribution).add_([seed], [1.0])
    return out


def _cuda():
    """The Triton kernels, imported on first use of a CUDA tensor."""
    try:
        from fedseed.directions import cuda
    except ImportError as e:
        raise RuntimeError(f"CUDA tensors need Triton for the direction kernels ({e}); CUDA builds of torch "
                           "ship it, else `pip install triton`") from None
    return cuda


def _seeds(seeds: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(seeds, dtype=np.uint64).reshape(-1)


def _arguments(seeds: Sequence[int] | np.ndarray, coeffs: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Seeds as uint64 and coefficients as float32, one each."""
    seeds_u64 = _seeds(seeds)
    c32 = np.asarray(coeffs, dtype=np.float32).reshape(-1)
    if seeds_u64.size != c32.size:
        raise ValueError(f"{seeds_u64.size} seeds but {c32.size} coefficients")
    return seeds_u64, c32


def _kernel_ready(t: torch.Tensor) -> bool:
    """Whether the CPU kernels can read and write ``t`` through its address."""
    return t.device.type == "cpu" and t.dtype in _KINDS and t.is_contiguous()


class DirectionSpace:
    """The tensors a direction spans, each with an id derived from its name.

    Parameters
    ----------
    named_tensors:
        ``(name, tensor)`` pairs; the tensors are updated in place by :meth:`add_`.
        Names must be distinct: a direction element is a function of (seed, name, index).
    distribution:
        ``"rademacher"`` or ``"gaussian"``; the CPU and CUDA kernels compute both
        with the same integer and IEEE operations, so they give the same bits.
    precision:
        How results are stored into bfloat16/float16 tensors (see
        :mod:`fedseed.directions.precision`): ``"nearest"`` (default) rounds each
        result to nearest even, ``"stochastic"`` rounds stochastically, from bits
        that are a function of the call's arguments. Float32 tensors are unaffected.
    """

    def __init__(
        self,
        named_tensors: Sequence[tuple[str, torch.Tensor]],
        distribution: Distribution | str = "rademacher",
        precision: Precision | str = "nearest",
    ):
        """A config's words arrive as ``str``: they are checked here."""
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"`distribution` must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"`precision` must be one of {PRECISIONS}, got {precision!r}")
        self.names = [n for n, _ in named_tensors]
        if len(set(self.names)) != len(self.names):
            raise ValueError("tensor names must be distinct: a direction is a function of (seed, name, index)")
        self.tensors = [t for _, t in named_tensors]
        self.ids = [tensor_id(n) for n in self.names]
        self.distribution = distribution
        self.precision = precision
        self.numel = sum(t.numel() for t in self.tensors)
        self._tmix = np.array([mix64(tid ^ TENSOR_SALT) for tid in self.ids], dtype=np.uint64)

    def subset(self, rows: Sequence[int]) -> "DirectionSpace":
        """The space over ``tensors[rows]`` only: the same directions restricted to those tensors."""
        return DirectionSpace([(self.names[j], self.tensors[j]) for j in rows], self.distribution, self.precision)

    # -- public operations -----------------------------------------------------------
    def add_(
        self,
        seeds: Sequence[int] | np.ndarray,
        coeffs: Sequence[float] | np.ndarray,
        base: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """Set every tensor to ``base + sum_k coeffs[k] * D(seeds[k])`` (base defaults to itself).

        The sum is accumulated in float32 in the given seed order, then added once:
        callers that need identical results must pass seeds in the same order.
        ``base`` may be any CPU tensors of the right sizes, memory-mapped files
        included: the kernels read each once.
        """
        seeds_u64, c32 = _arguments(seeds, coeffs)
        if base is not None and len(base) != len(self.tensors):
            raise ValueError(f"`base` has {len(base)} tensors, the space binds {len(self.tensors)}")
        if seeds_u64.size == 0 and base is None:
            return
        cuda_rows: list[int] = []
        cpu_rows: list[int] = []
        for j, t in enumerate(self.tensors):
            if base is not None and base[j].numel() != t.numel():
                raise ValueError(f"`base[{j}]` has {base[j].numel()} elements, {self.names[j]!r} has {t.numel()}")
            (cuda_rows if t.device.type == "cuda" else cpu_rows).append(j)
        if cpu_rows:
            self._add_cpu(cpu_rows, seeds_u64, c32, seeds_u64.size, base, None)
        if cuda_rows:
            _cuda().add_directions(self, cuda_rows, seeds_u64, c32, seeds_u64.size, base, None)

    def perturb_into(
        self,
        out: Sequence[torch.Tensor],
        seeds: Sequence[int] | np.ndarray,
        coeffs: Sequence[float] | np.ndarray,
        update: tuple[Sequence[int] | np.ndarray, Sequence[float] | np.ndarray] | None = None,
    ) -> None:
        """``out = w + sum_k coeffs[k] * D(seeds[k])``, leaving ``w`` as it is, after an optional update of ``w``.

        ``update = (seeds, coeffs)`` first moves the tensors themselves,
        ``w += sum c D`` (rounded by the space's precision), in the same pass that
        writes ``out``; ``out`` is computed from ``w`` as stored, rounded to
        nearest. ``out[j]`` must match ``tensors[j]`` in shape, dtype and device
        and be contiguous. This is how a zeroth-order step perturbs a model
        without ever perturbing its weights in place: a 16-bit weight perturbed
        and restored in place does not come back to itself.
        """
        up_seeds, up_coeffs = update if update is not None else ((), ())
        all_seeds, all_coeffs = _arguments([*np.asarray(up_seeds, dtype=np.uint64).reshape(-1),
                                            *np.asarray(seeds, dtype=np.uint64).reshape(-1)],
                                           [*np.asarray(up_coeffs, dtype=np.float32).reshape(-1),
                                            *np.asarray(coeffs, dtype=np.float32).reshape(-1)])
        split = len(np.asarray(up_seeds).reshape(-1))
        if len(out) != len(self.tensors):
            raise ValueError(f"`out` has {len(out)} tensors, the space binds {len(self.tensors)}")
        for j, (t, o) in enumerate(zip(self.tensors, out)):
            if o.shape != t.shape or o.dtype != t.dtype or o.device != t.device or not o.is_contiguous():
                raise ValueError(f"`out[{j}]` must be a contiguous {tuple(t.shape)} {t.dtype} tensor on {t.device}")
        cuda_rows = [j for j, t in enumerate(self.tensors) if t.device.type == "cuda"]
        cpu_rows = [j for j, t in enumerate(self.tensors) if t.device.type != "cuda"]
        if cpu_rows:
            self._add_cpu(cpu_rows, all_seeds, all_coeffs, split, None, out)
        if cuda_rows:
            _cuda().add_directions(self, cuda_rows, all_seeds, all_coeffs, split, None, out)

    def project(self, seeds: Sequence[int] | np.ndarray) -> np.ndarray:
        """``<D(seed_k), w>`` for every seed, summed over the bound tensors (float64, shape (K,)).

        Ferret's ``V^T Delta``: bind the update's tensors, project onto the bases.
        Accumulated in float64 in a fixed order, so the result does not depend on
        the number of threads.
        """
        seeds_u64 = _seeds(seeds)
        total = np.zeros(seeds_u64.size, dtype=np.float64)
        if seeds_u64.size == 0:
            return total
        cuda_rows = [j for j, t in enumerate(self.tensors) if t.device.type == "cuda"]
        cpu_rows = [j for j, t in enumerate(self.tensors) if t.device.type != "cuda"]
        if cpu_rows:
            total += self._project_cpu(cpu_rows, seeds_u64)
        if cuda_rows:
            total += _cuda().project(self, cuda_rows, seeds_u64)
        return total

    def materialize(self, seed: int) -> list[torch.Tensor]:
        """The direction of ``seed`` as float32 CPU tensors shaped like the bound ones."""
        out = [torch.zeros(t.shape, dtype=torch.float32) for t in self.tensors]
        DirectionSpace(list(zip(self.names, out)), self.distribution).add_([seed], [1.0])
        return out

    # -- CPU ---------------------------------------------------------------------------
    def _add_cpu(self, rows: list[int], seeds: np.ndarray, coeffs: np.ndarray, split: int,
                 base: Sequence[torch.Tensor] | None, out: Sequence[torch.Tensor] | None) -> None:
        ready = [j for j in rows if _kernel_ready(self.tensors[j])]
        unready = sorted(set(rows).difference(ready))
        if unready and out is not None:
            raise ValueError(f"{self.names[unready[0]]!r}: perturb_into needs contiguous float32/bfloat16/float16 "
                             "CPU tensors")
        for j in unready:
            self._add_converted(j, seeds, coeffs, base)
        if not ready:
            return
        keep = []  # converted bases must outlive the kernel call
        entries = []  # one table row per tensor, columns cpu.OUT .. cpu.NUMEL
        for j in ready:
            t = self.tensors[j]
            src = None if base is None or base[j] is t else base[j]
            if src is not None and not _kernel_ready(src):
                src = src.detach().to("cpu", torch.float32).contiguous()
                keep.append(src)
            entries.append((t.data_ptr(), _KINDS[t.dtype], 0 if src is None else src.data_ptr(),
                            cpu.F32 if src is None else _KINDS[src.dtype],
                            0 if out is None else out[j].data_ptr(), t.numel(), 0, 0))
        table = np.array(entries, dtype=np.int64)  # (T, 8)
        tmix = self._tmix[ready]
        table[:, cpu.TMIX] = tmix.view(np.int64)
        stochastic = self.precision == "stochastic"
        if stochastic:
            table[:, cpu.RKEY] = rounding_keys(seeds, coeffs, tmix).view(np.int64)
        gaussian = self.distribution == "gaussian"
        passes = seeds.size + (out is not None)  # generated elements per weight, as the work estimate
        parallel = _parallel(table[:, cpu.NUMEL], passes, gaussian)
        kernel = cpu.add_directions if parallel else cpu.add_directions_serial
        with torch.no_grad():
            _call(parallel, kernel, table, cpu.work_starts(table[:, cpu.NUMEL], cpu.CHUNK), seeds, coeffs, split,
                  gaussian, stochastic)
        del keep

    def _add_converted(self, j: int, seeds: np.ndarray, coeffs: np.ndarray, base: Sequence[torch.Tensor] | None):
        """Tensors the kernels cannot address (other devices, strides, dtypes): compute in a float32 copy."""
        t = self.tensors[j]
        src = t if base is None else base[j]
        work = src.detach().to("cpu", torch.float32).contiguous().reshape(t.shape)
        DirectionSpace([(self.names[j], work)], self.distribution).add_(seeds, coeffs)
        with torch.no_grad():
            t.copy_(work)

    def _project_cpu(self, rows: list[int], seeds: np.ndarray) -> np.ndarray:
        keep = [t if _kernel_ready(t) else t.detach().to("cpu", torch.float32).contiguous()
                for t in (self.tensors[j] for j in rows)]
        table = np.array([(t.data_ptr(), _KINDS[t.dtype], t.numel(), 0) for t in keep], dtype=np.int64)  # (T, 4)
        table[:, cpu.P_TMIX] = self._tmix[rows].view(np.int64)
        starts = cpu.work_starts(table[:, cpu.P_NUMEL], cpu.PROJECT_CHUNK)
        gaussian = self.distribution == "gaussian"
        parallel = _parallel(table[:, cpu.P_NUMEL], seeds.size, gaussian)
        kernel = cpu.project if parallel else cpu.project_serial
        total = np.zeros(seeds.size, dtype=np.float64)
        per_call = max(1, _PROJECT_PARTIAL_BYTES // (8 * seeds.size))
        for first in range(0, int(starts[-1]), per_call):
            partial = np.empty((min(per_call, int(starts[-1]) - first), seeds.size), dtype=np.float64)
            _call(parallel, kernel, table, starts, first, seeds, gaussian, partial)
            total += partial.sum(axis=0)
        return total


def _call(parallel: bool, kernel, *args) -> None:
    """Run a kernel; a parallel one on numba's OpenMP layer leaves torch's thread count as it found it.

    That layer sets the caller's OpenMP thread count to numba's, and torch reads the
    same setting: a process pinned to one torch thread would reduce with two after
    the first call, and its floats would differ from a fresh process's.
    """
    if not parallel:
        kernel(*args)
        return
    threads = torch.get_num_threads()
    try:
        kernel(*args)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _parallel(numel: np.ndarray, num_seeds: int, gaussian: bool) -> bool:
    """Whether a kernel call has enough work to be worth waking the other threads."""
    return int(numel.sum()) * max(num_seeds, 1) * (_GAUSSIAN_COST if gaussian else 1) >= _SERIAL_WORK
