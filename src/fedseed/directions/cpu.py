"""Fused CPU kernels: ``out = base + sum_k c_k * D(seed_k)`` in one pass over memory.

Compiled with numba, multithreaded over blocks of elements. Within a block the
seeds are visited in the caller's order and the per-element sum is accumulated in
float32 in that order, so the result does not depend on the number of threads and
equals ``generator.py``'s reference bit for bit. No temporary larger than one block
(``BLOCK`` floats per thread) is allocated, whatever the tensor size.
"""

from __future__ import annotations

import numba
import numpy as np

from fedseed.directions.generator import GOLDEN, MIX1, MIX2

BLOCK = 2048

_GOLDEN = np.uint64(GOLDEN)
_MIX1 = np.uint64(MIX1)
_MIX2 = np.uint64(MIX2)
_S16 = np.uint64(16)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)
_S40 = np.uint64(40)
_S63 = np.uint64(63)
_ONE = np.uint64(1)
_M24 = np.uint64(0xFFFFFF)


@numba.njit(inline="always")
def _raw(key: np.uint64, i: np.uint64) -> np.uint64:
    z = key + (i + _ONE) * _GOLDEN
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


@numba.njit(inline="always")
def _gaussian(x: np.uint64) -> np.float32:
    u1 = np.float64((x >> _S40) + _ONE) * 2.0**-24
    u2 = np.float64((x >> _S16) & _M24) * 2.0**-24
    return np.float32(np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2))


@numba.njit(parallel=True, cache=True)
def add_directions(out, base, keys, coeffs, gaussian):  # pragma: no cover - compiled
    """``out[i] = base[i] + sum_k coeffs[k] * D(keys[k])[i]`` (out may alias base)."""
    n = out.size
    nblocks = (n + BLOCK - 1) // BLOCK
    for b in numba.prange(nblocks):
        lo = b * BLOCK
        hi = min(n, lo + BLOCK)
        acc = np.zeros(hi - lo, dtype=np.float32)
        for k in range(keys.size):
            key = keys[k]
            c = coeffs[k]
            neg = -c
            for j in range(hi - lo):
                x = _raw(key, np.uint64(lo + j))
                if gaussian:
                    acc[j] += c * _gaussian(x)
                elif (x >> _S63) == 0:
                    acc[j] += c
                else:
                    acc[j] += neg
        for j in range(hi - lo):
            out[lo + j] = base[lo + j] + acc[j]


@numba.njit(parallel=True, cache=True)
def project(delta, keys, gaussian, out):  # pragma: no cover - compiled
    """``out[k] = <D(keys[k]), delta>`` accumulated in float64 per direction."""
    n = delta.size
    for k in numba.prange(keys.size):
        key = keys[k]
        s = 0.0
        for i in range(n):
            x = _raw(key, np.uint64(i))
            if gaussian:
                s += np.float64(_gaussian(x)) * np.float64(delta[i])
            elif (x >> _S63) == 0:
                s += np.float64(delta[i])
            else:
                s -= np.float64(delta[i])
        out[k] = s
