"""The counter-based generator every random direction in fedseed comes from.

A direction element is a pure function of ``(seed, tensor id, element index)``:

    key  = mix64(seed ^ mix64(tensor_id ^ TENSOR_SALT))
    x_q  = mix64(key + (q + 1) * GOLDEN)            # the SplitMix64 stream at position q
    rademacher_i = +1 if bit 8 (i mod 8) + 7 of x_{i // 8} is 0 else -1
    gaussian_i   = sqrt(-2 ln u1) * cos(2 pi u2) of x_i,   u1 = (x >> 40 + 1) / 2^24,
                                                            u2 = ((x >> 16) & 0xFFFFFF) / 2^24

A Rademacher element takes the top bit of one byte of a hash, so eight elements
share one: a hash per element made the kernels compute-bound, and at eight per
hash a zeroth-order step's pass runs at the speed of a copy.

All integer arithmetic is modulo 2^64, so any device that has 64-bit integers
computes the same bits: there is no generator *state*, nothing depends on the
order in which elements, tensors or seeds are visited, and a party can produce
any slice of any direction without producing the rest.

Rademacher directions are bitwise portable across devices and compilers, and so
are the updates built from them: ``c * (+-1)`` is exact, so fused multiply-add and
plain multiply-then-add round identically. Gaussian directions go through ``log``
and ``cos``, which every math library rounds its own way (numpy's and glibc's
``log`` differ in the last float64 bit on 0.3% of the 2^24 inputs). The kernels
therefore never call a math library: they evaluate both with a fixed sequence of
IEEE operations (``gaussian_tables.py``, ``cpu.py``, ``cuda.py``) that is correctly
rounded on nearly every input, which makes their Gaussians bitwise portable and
equal to this reference except where the reference's own library rounds wrongly
and that lands on a float32 rounding boundary (about one element in 10^11).

This module is the numpy reference (clear, materialises whole arrays); the fused
kernels must reproduce it bit for bit.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np

Distribution = Literal["rademacher", "gaussian"]
DISTRIBUTIONS: tuple[str, ...] = ("rademacher", "gaussian")

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
TENSOR_SALT = 0xD1B54A32D192ED03


def mix64(z: int) -> int:
    """SplitMix64's finaliser on a Python int (used for keys, never per element)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def tensor_id(name: str) -> int:
    """A 64-bit id from the parameter's name alone.

    Names, not positions: the id must not change with dict order, device
    placement or which other parameters are trainable.
    """
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def tensor_key(seed: int, tid: int) -> int:
    """The stream key of one (seed, tensor) pair."""
    return mix64((seed & MASK64) ^ mix64(tid ^ TENSOR_SALT))


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from integers (run seed, pool index, round, ...), order-sensitive."""
    z = 0x243F6A8885A308D3
    for p in parts:
        z = mix64(z ^ mix64((p & MASK64) + GOLDEN))
    return z


def _mix64_array(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    return z ^ (z >> np.uint64(31))


def stream(key: int, start: int, count: int) -> np.ndarray:
    """Raw 64-bit outputs ``x_start .. x_{start+count-1}`` of one key."""
    i = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    return _mix64_array(np.uint64(key) + i * np.uint64(GOLDEN))


def gaussian_values(x: np.ndarray) -> np.ndarray:
    """Float32 Gaussians of raw 64-bit outputs, one each."""
    u1 = ((x >> np.uint64(40)) + np.uint64(1)).astype(np.float64) * 2.0**-24
    u2 = ((x >> np.uint64(16)) & np.uint64(0xFFFFFF)).astype(np.float64) * 2.0**-24
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)


def unpack(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Element ``i``'s field of ``bits`` bits: bits ``bits * (i mod m)`` on of word ``i // m``, ``m = 64 // bits``."""
    per_word = 64 // bits
    shifts = np.arange(per_word, dtype=np.uint64) * np.uint64(bits)
    fields = (words[:, None] >> shifts[None, :]) & np.uint64((1 << bits) - 1)
    return fields.reshape(-1)[:count]


def direction(seed: int, tid: int, numel: int, distribution: Distribution) -> np.ndarray:
    """The whole direction of one tensor, float32, flat (reference path)."""
    key = tensor_key(seed, tid)
    if distribution == "rademacher":
        top = unpack(stream(key, 0, (numel + 7) // 8), 8, numel) >> np.uint64(7)
        return np.where(top == 0, np.float32(1.0), np.float32(-1.0))
    if distribution == "gaussian":
        return gaussian_values(stream(key, 0, numel))
    raise ValueError(f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
