"""Fused CUDA kernels (Triton) and their launchers: the same bits as ``cpu.py``.

The element functions mirror ``cpu.py`` operation for operation: the SplitMix64
stream in uint64 arithmetic (eight Rademacher elements, or four elements'
rounding bits, share a hash there; here each element recomputes its hash, which
costs a GPU little next to its memory traffic), the portable Gaussian in float64 with explicit
``fma`` (and every other multiply-add left unfused: kernels are launched with
``enable_fp_fusion=False``), and 16-bit storage rounded to nearest even. Float64
constants are read from a table in device memory because Triton would round a
Python float literal to float32.

One launch covers every tensor of a group (same storage dtype, same kind of
source): tensors are passed as addresses in a small device table and each program
finds its tensor by binary search over the block offsets, so a model with
hundreds of tensors costs one launch per operation, not hundreds.

This module imports Triton; :mod:`fedseed.directions` imports it only when a
bound tensor lives on a CUDA device. With ``TRITON_INTERPRET=1`` the kernels also
run on CPU tensors (slowly), which is how their logic is tested without a GPU.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import triton
import triton.language as tl

from fedseed.directions import gaussian_tables as gt
from fedseed.directions.precision import rounding_keys

if TYPE_CHECKING:
    from fedseed.directions import DirectionSpace

BLOCK = 1024  # elements the add kernel handles at once (8 per thread) ...
SUBS = 8  # ... and blocks per program, so that finding the tensor is amortised over 8192 elements
PROJECT_TILE = {False: (128, 32), True: (64, 16)}  # elements x seeds per step, by "is Gaussian" (float64 registers)
PROJECT_CHUNK = 131072  # elements per row of project's partial sums
_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_NONE = -1  # no separate source: the output tensor is read

# Offsets of the float64 table (tables, then scalars), shared by every kernel.
_TABLES = [gt.INV, gt.T_HI, gt.T_LO, gt.COS_HI, gt.COS_LO, gt.SIN_HI, gt.SIN_LO]
_SCALARS = [gt.LN2_HI, gt.LN2_LO, gt.P1, gt.P2, gt.P3, gt.INV_PIO32, gt.TWO_PI, *gt.LOG_Q, *gt.COS_C, *gt.SIN_S,
            gt.LN2, *gt.FAST_LOG, *gt.FAST_COS, *gt.FAST_SIN, gt.FAST_MARGIN]
_OFF = np.cumsum([0] + [len(t) for t in _TABLES]).tolist()
INV_, THI_, TLO_, CHI_, CLO_, SHI_, SLO_, SC_ = _OFF
_TABLE_CACHE: dict[torch.device, torch.Tensor] = {}


def device_table(device: torch.device) -> torch.Tensor:
    if device not in _TABLE_CACHE:
        host = np.concatenate([*_TABLES, np.array(_SCALARS, dtype=np.float64)])
        _TABLE_CACHE[device] = torch.from_numpy(host).to(device)
    return _TABLE_CACHE[device]


# -- element functions -----------------------------------------------------------------
@triton.jit
def _mix64(z):
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@triton.jit
def _log_reduce(x, tab):
    """u1 = ((x >> 40) + 1) / 2^24 as 2^k (1 + r) / INV[i], the argument reduction both logarithms share."""
    bits = ((x >> 40).to(tl.int64) + 1).to(tl.float64).to(tl.int64, bitcast=True)
    mant = bits & 0xFFFFFFFFFFFFF
    i = (mant + (1 << 44)) >> 45
    r = tl.fma((mant | (1023 << 52)).to(tl.float64, bitcast=True), tl.load(tab + INV_ + i), -1.0)
    k = ((bits >> 52) - 1047).to(tl.float64)
    return r, k, i


@triton.jit
def log_u1(x, tab):
    """``cpu.log_u1``: log(((x >> 40) + 1) / 2^24) in float64."""
    r, k, i = _log_reduce(x, tab)
    h = -0.5 * r
    p = r * h
    pe = tl.fma(r, h, -p)
    q = tl.fma(r, tl.load(tab + SC_ + 7), tl.load(tab + SC_ + 8))
    q = tl.fma(r, q, tl.load(tab + SC_ + 9))
    q = tl.fma(r, q, tl.load(tab + SC_ + 10))
    q = tl.fma(r, q, tl.load(tab + SC_ + 11))
    q = tl.fma(r, q, tl.load(tab + SC_ + 12))
    q = tl.fma(r, q, tl.load(tab + SC_ + 13))
    s1, e1 = _two_sum(k * tl.load(tab + SC_ + 0), tl.load(tab + THI_ + i))
    s2, e2 = _two_sum(r, p)
    s3, e3 = _two_sum(s1, s2)
    lo = (tl.fma(k, tl.load(tab + SC_ + 1), tl.load(tab + TLO_ + i)) + (e1 + e2)) + (e3 + tl.fma(r * r, r * q, pe))
    return s3 + lo


@triton.jit
def cos_u2(x, tab):
    """``cpu.cos_u2``: cos(2 pi u2) in float64, u2 = ((x >> 16) & 0xFFFFFF) / 2^24."""
    t = tl.load(tab + SC_ + 6) * (((x >> 16) & 0xFFFFFF).to(tl.int64).to(tl.float64) * 5.9604644775390625e-08)
    n = tl.fma(t, tl.load(tab + SC_ + 5), 0.5).to(tl.int64)
    fn = n.to(tl.float64)
    yh, ye = _two_sum(tl.fma(-fn, tl.load(tab + SC_ + 2), t), -(fn * tl.load(tab + SC_ + 3)))
    yl = tl.fma(-fn, tl.load(tab + SC_ + 4), ye)
    z = yh * yh
    c = tl.load(tab + CHI_ + n)
    s = tl.load(tab + SHI_ + n)
    pc = tl.fma(z, tl.load(tab + SC_ + 14), tl.load(tab + SC_ + 15))
    pc = tl.fma(z, pc, tl.load(tab + SC_ + 16))
    pc = tl.fma(z, pc, tl.load(tab + SC_ + 17))
    cm = tl.fma(-0.5 * yh, yh + 2.0 * yl, z * z * pc)
    ps = tl.fma(z, tl.load(tab + SC_ + 18), tl.load(tab + SC_ + 19))
    ps = tl.fma(z, ps, tl.load(tab + SC_ + 20))
    ps = tl.fma(z, ps, tl.load(tab + SC_ + 21))
    sm = yh * z * ps
    a = s * yh
    ae = tl.fma(s, yh, -a)
    b = c * cm
    be = tl.fma(c, cm, -b)
    r1, r2 = _two_sum(c, -a)
    r3, r4 = _two_sum(r1, b)
    lo = ((tl.load(tab + CLO_ + n) - ae) + be) - tl.fma(s, yl + sm, tl.load(tab + SLO_ + n) * yh) + (r2 + r4)
    return r3 + lo


@triton.jit
def sqrt_m2log_fast(x, tab):
    """``cpu.sqrt_m2log_fast``."""
    r, k, i = _log_reduce(x, tab)
    p = tl.fma(r, tl.load(tab + SC_ + 23), tl.load(tab + SC_ + 24))
    p = tl.fma(r, p, tl.load(tab + SC_ + 25))
    p = tl.fma(r, p, tl.load(tab + SC_ + 26))
    p = tl.fma(r, p, tl.load(tab + SC_ + 27))
    p = tl.fma(r * r, p, r)
    return tl.sqrt(-2.0 * (tl.fma(k, tl.load(tab + SC_ + 22), tl.load(tab + THI_ + i)) + p))


@triton.jit
def cos_fast(x, tab):
    """``cpu.cos_fast``."""
    t = tl.load(tab + SC_ + 6) * (((x >> 16) & 0xFFFFFF).to(tl.int64).to(tl.float64) * 5.9604644775390625e-08)
    n = tl.fma(t, tl.load(tab + SC_ + 5), 0.5).to(tl.int64)
    fn = n.to(tl.float64)
    y = tl.fma(-fn, tl.load(tab + SC_ + 4), tl.fma(-fn, tl.load(tab + SC_ + 2), t) - fn * tl.load(tab + SC_ + 3))
    z = y * y
    cm = tl.fma(z, tl.load(tab + SC_ + 28), tl.load(tab + SC_ + 29))
    cm = tl.fma(z, cm, tl.load(tab + SC_ + 30))
    cm = z * tl.fma(z, cm, tl.load(tab + SC_ + 31))
    sy = tl.fma(z, tl.load(tab + SC_ + 32), tl.load(tab + SC_ + 33))
    sy = tl.fma(y * z, tl.fma(z, sy, tl.load(tab + SC_ + 34)), y)
    c = tl.load(tab + CHI_ + n)
    return tl.fma(c, cm, tl.fma(-tl.load(tab + SHI_ + n), sy, c))


@triton.jit
def gaussian(x, tab):
    """``cpu.gaussians``: the fast path, and the exact path where the fast one may round differently."""
    y = sqrt_m2log_fast(x, tab) * cos_fast(x, tab)
    r = y.to(tl.float32)
    b = r.to(tl.uint32, bitcast=True)
    e = ((b >> 23) & 0xFF).to(tl.int64)
    below = tl.where((b & 0x7FFFFF) == 0, 0, 1).to(tl.int64)
    half = ((e - 152 + below + 1023) << 52).to(tl.float64, bitcast=True)
    doubtful = tl.abs(y - r.to(tl.float64)) + tl.load(tab + SC_ + 35) * tl.abs(y) >= half
    if tl.sum(doubtful.to(tl.int32)) > 0:  # about one element in 2^17: the block takes the exact path
        # float64 sqrt has no approximate form on NVIDIA GPUs: it is sqrt.rn.f64, IEEE-rounded.
        exact = (tl.sqrt(-2.0 * log_u1(x, tab)) * cos_u2(x, tab)).to(tl.float32)
        r = tl.where(doubtful, exact, r)
    return r


@triton.jit
def _counters(offs, GAUSSIAN: tl.constexpr):
    """``(q + 1) * GOLDEN`` of each element's stream position ``q``: ``i`` for Gaussians, ``i // 8`` for Rademacher."""
    if GAUSSIAN:
        return (offs.to(tl.uint64) + 1) * 0x9E3779B97F4A7C15
    else:
        return ((offs >> 3).to(tl.uint64) + 1) * 0x9E3779B97F4A7C15


@triton.jit
def _direction(x, offs, c, tab, GAUSSIAN: tl.constexpr):
    """``c * D`` at elements ``offs`` from their raw outputs ``x`` (float32, rounded like the CPU: product, not fused).

    A Rademacher element is the top bit of byte ``i mod 8`` of its hash.
    """
    if GAUSSIAN:
        return c * gaussian(x, tab)
    else:
        return tl.where(((x >> ((offs & 7) * 8 + 7).to(tl.uint64)) & 1) != 0, -c, c)


@triton.jit
def _rounding_bits(rkey, offs):
    """``cpu._store``'s 16 stochastic-rounding bits of elements ``offs``: four elements to a hash."""
    x = _mix64(rkey + ((offs >> 2).to(tl.uint64) + 1) * 0x9E3779B97F4A7C15)
    return (x >> ((offs & 3) * 16).to(tl.uint64)) & 0xFFFF


@triton.jit
def _find_tensor(starts, pid, T, SEARCH: tl.constexpr):
    """The tensor ``t`` with ``starts[t] <= pid < starts[t + 1]`` (binary search)."""
    lo = pid * 0
    hi = lo + T
    for _ in tl.static_range(SEARCH):
        mid = (lo + hi) // 2
        below = tl.load(starts + mid) <= pid
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def _f16_bits_to_f32(h, KIND: tl.constexpr):
    """``cpu.bf16_to_f32`` / ``cpu.f16_to_f32`` on uint32 holding the 16 bits (exact)."""
    if KIND == 1:
        return (h << 16).to(tl.float32, bitcast=True)
    else:
        sign = (h & 0x8000) << 16
        e = (h >> 10) & 0x1F
        m = h & 0x3FF
        normal = sign | ((e + 112) << 23) | (m << 13)
        special = sign | 0x7F800000 | (m << 13)
        tiny = sign | (m.to(tl.float32) * 5.9604644775390625e-08).to(tl.uint32, bitcast=True)
        b = tl.where(e == 31, special, normal)
        return tl.where(e == 0, tiny, b).to(tl.float32, bitcast=True)


@triton.jit
def _load_f32(address, offs, mask, KIND: tl.constexpr):
    """Float32 values of a float32, bfloat16 or float16 tensor (16-bit ones decoded bit by bit)."""
    if KIND == 0:
        return tl.load(address.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    else:
        h = tl.load(address.to(tl.pointer_type(tl.int16)) + offs, mask=mask, other=0)
        return _f16_bits_to_f32(h.to(tl.uint16, bitcast=True).to(tl.uint32), KIND)


@triton.jit
def _round16(v, KIND: tl.constexpr):
    """``cpu.f32_to_bf16`` / ``cpu.f32_to_f16``: nearest even, as int16 bits (NaNs as on the CPU)."""
    b = v.to(tl.uint32, bitcast=True)
    a = b & 0x7FFFFFFF
    if KIND == 1:
        h = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        h = tl.where(a > 0x7F800000, 0x7FC0, h)
    else:
        sign = (b >> 16) & 0x8000
        normal = (a + 0xC8000FFF + ((a >> 13) & 1)) >> 13
        y = a.to(tl.float32, bitcast=True) * 16777216.0  # < 2^10 on this path: + 2^23 - 2^23 rounds to even
        tiny = ((y + 8388608.0) - 8388608.0).to(tl.int32).to(tl.uint32)
        h = tl.where(a < 0x38800000, tiny, normal)
        h = tl.where(a >= 0x477FF000, 0x7C00, h)
        h = tl.where(a > 0x7F800000, 0x7E00, h) | sign
    return h.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _stochastic16(v, r, KIND: tl.constexpr):
    """``cpu.f32_to_bf16_stochastic`` / ``cpu.f32_to_f16_stochastic`` with 16 bits ``r``, as int16 bits."""
    b = v.to(tl.uint32, bitcast=True)
    a = b & 0x7FFFFFFF
    nan = a > 0x7F800000
    if KIND == 1:
        h = (b + (r & 0xFFFF).to(tl.uint32)) >> 16
        h = tl.where(nan, 0x7FC0, h)
    else:
        sign = (b >> 16) & 0x8000
        normal = tl.minimum((a + (r & 0x1FFF).to(tl.uint32) - 0x38000000) >> 13, 0x7C00)
        u = r.to(tl.int64).to(tl.float64) * 1.52587890625e-05
        tiny = (a.to(tl.float32, bitcast=True).to(tl.float64) * 16777216.0 + u).to(tl.int64).to(tl.uint32)
        h = tl.where(a < 0x38800000, tiny, normal)
        h = tl.where(nan, 0x7E00, h) | sign
    return h.to(tl.uint16).to(tl.int16, bitcast=True)


# -- kernels ---------------------------------------------------------------------------
@triton.jit
def _add_kernel(args, T, K, SPLIT, tab,
                OUT: tl.constexpr, SRC: tl.constexpr, PERT: tl.constexpr, GAUSSIAN: tl.constexpr,
                STOCHASTIC: tl.constexpr, SEARCH: tl.constexpr, BLOCK: tl.constexpr, SUBS: tl.constexpr):
    """``cpu.add_directions`` for one group of tensors, ``BLOCK * SUBS`` elements per program.

    ``args`` (int64) holds rows (out, src, pert, numel, tmix, rkey) of T entries,
    then ``starts`` (T + 1), the K seeds and the K coefficients' float32 bits. Seeds
    ``< SPLIT`` update ``out``; with ``PERT``, seeds ``>= SPLIT`` make the perturbed
    copy from ``out`` as stored.
    """
    starts = args + 6 * T
    seeds = starts + T + 1
    coeffs = seeds + K
    pid = tl.program_id(0).to(tl.int64)
    t = _find_tensor(starts, pid, T, SEARCH)
    n = tl.load(args + 3 * T + t)
    tmix = tl.load(args + 4 * T + t).to(tl.uint64, bitcast=True)
    out = tl.load(args + t)
    for sub in range(SUBS):
        lo = ((pid - tl.load(starts + t)) * SUBS + sub) * BLOCK
        if lo < n:  # the last program of a tensor may have fewer blocks
            offs = lo + tl.arange(0, BLOCK).to(tl.int64)
            mask = offs < n
            ig = _counters(offs, GAUSSIAN)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for k in range(SPLIT):
                key = _mix64(tl.load(seeds + k).to(tl.uint64, bitcast=True) ^ tmix)
                c = tl.load(coeffs + k).to(tl.int32).to(tl.float32, bitcast=True)
                acc += _direction(_mix64(key + ig), offs, c, tab, GAUSSIAN)
            if SRC != -1:
                v = _load_f32(tl.load(args + T + t), offs, mask, SRC) + acc
            else:
                v = _load_f32(out, offs, mask, OUT) + acc
            if SPLIT > 0 or SRC != -1:  # else out keeps its value and is only read
                if OUT == 0:
                    tl.store(out.to(tl.pointer_type(tl.float32)) + offs, v, mask=mask)
                else:
                    if STOCHASTIC:
                        r = _rounding_bits(tl.load(args + 5 * T + t).to(tl.uint64, bitcast=True), offs)
                        h = _stochastic16(v, r, OUT)
                    else:
                        h = _round16(v, OUT)
                    tl.store(out.to(tl.pointer_type(tl.int16)) + offs, h, mask=mask)
                    v = _f16_bits_to_f32(h.to(tl.uint16, bitcast=True).to(tl.uint32), OUT)  # as stored
            if PERT:
                more = tl.zeros([BLOCK], dtype=tl.float32)
                for k in range(SPLIT, K):
                    key = _mix64(tl.load(seeds + k).to(tl.uint64, bitcast=True) ^ tmix)
                    c = tl.load(coeffs + k).to(tl.int32).to(tl.float32, bitcast=True)
                    more += _direction(_mix64(key + ig), offs, c, tab, GAUSSIAN)
                p = v + more
                pert = tl.load(args + 2 * T + t)
                if OUT == 0:
                    tl.store(pert.to(tl.pointer_type(tl.float32)) + offs, p, mask=mask)
                else:
                    tl.store(pert.to(tl.pointer_type(tl.int16)) + offs, _round16(p, OUT), mask=mask)


@triton.jit
def _project_kernel(args, T, K, tab, partial,
                    KIND: tl.constexpr, GAUSSIAN: tl.constexpr, SEARCH: tl.constexpr,
                    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
    """``partial[row, k] = <D(seeds[k]), delta>`` over one ``CHUNK`` of one tensor, in float64.

    ``args`` (int64) holds rows (address, numel, tmix) of T entries, then ``starts``
    (T + 1) and the K seeds; the grid is (rows, seed groups of ``BLOCK_K``).
    """
    starts = args + 3 * T
    seeds = starts + T + 1
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    t = _find_tensor(starts, row, T, SEARCH)
    first = (row - tl.load(starts + t)) * CHUNK
    n = tl.load(args + T + t)
    tmix = tl.load(args + 2 * T + t).to(tl.uint64, bitcast=True)
    ks = group * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    keys = _mix64(tl.load(seeds + ks, mask=kmask, other=0).to(tl.uint64, bitcast=True) ^ tmix)
    total = tl.zeros([BLOCK_K], dtype=tl.float64)
    for lo in range(0, tl.minimum(n - first, CHUNK), BLOCK_E):
        offs = first + lo + tl.arange(0, BLOCK_E).to(tl.int64)
        d = _load_f32(tl.load(args + t), offs, offs < n, KIND).to(tl.float64)
        x = _mix64(keys[None, :] + _counters(offs, GAUSSIAN)[:, None])
        g = _direction(x, offs[:, None], tl.full([BLOCK_E, BLOCK_K], 1.0, tl.float32), tab, GAUSSIAN).to(tl.float64)
        total += tl.sum(g * d[:, None], axis=0)
    tl.store(partial + row * K + ks, total, mask=kmask)


# -- launchers -------------------------------------------------------------------------
def _search_steps(T: int) -> int:
    return max(1, math.ceil(math.log2(T + 1)))


def _starts(numel: np.ndarray, chunk: int) -> np.ndarray:
    starts = np.zeros(numel.size + 1, dtype=np.int64)
    np.cumsum((numel + chunk - 1) // chunk, out=starts[1:])
    return starts


def _source(t: torch.Tensor, src: torch.Tensor | None, keep: list[torch.Tensor]) -> torch.Tensor | None:
    if src is None or src is t:
        return None
    if src.device != t.device or src.dtype not in _KIND or not src.is_contiguous():
        src = src.detach().to(t.device, torch.float32).contiguous()
        keep.append(src)
    return src


def _check(space: "DirectionSpace", j: int) -> torch.Tensor:
    t = space.tensors[j]
    if t.dtype not in _KIND or not t.is_contiguous():
        raise ValueError(f"{space.names[j]!r}: CUDA tensors must be contiguous float32, bfloat16 or float16")
    return t


def add_directions(space: "DirectionSpace", rows: list[int], seeds: np.ndarray, coeffs: np.ndarray, split: int,
                   base, out) -> None:
    """``DirectionSpace.add_`` / ``perturb_into`` for the rows whose tensors live on a CUDA device (one launch per group)."""
    keep: list[torch.Tensor] = []
    groups: dict[tuple, list[tuple[int, torch.Tensor | None]]] = {}
    for j in rows:
        t = _check(space, j)
        src = _source(t, None if base is None else base[j], keep)
        key = (t.device, _KIND[t.dtype], _NONE if src is None else _KIND[src.dtype])
        groups.setdefault(key, []).append((j, src))
    stochastic = space.precision == "stochastic"
    cbits = coeffs.view(np.uint32).astype(np.int64)
    for (device, out_kind, src_kind), members in groups.items():
        idx = [j for j, _ in members]
        tmix = space._tmix[idx]
        numel = np.array([space.tensors[j].numel() for j in idx], dtype=np.int64)
        starts = _starts(numel, BLOCK * SUBS)
        if starts[-1] == 0:
            continue
        rkey = rounding_keys(seeds, coeffs, tmix) if stochastic else np.zeros_like(tmix)
        args = np.concatenate([
            [space.tensors[j].data_ptr() for j in idx],
            [0 if s is None else s.data_ptr() for _, s in members],
            [0 if out is None else out[j].data_ptr() for j in idx],
            numel, tmix.view(np.int64), rkey.view(np.int64), starts, seeds.view(np.int64), cbits,
        ]).astype(np.int64)
        _add_kernel[(int(starts[-1]),)](
            torch.from_numpy(args).to(device), len(idx), seeds.size, split, device_table(device),
            OUT=out_kind, SRC=src_kind, PERT=out is not None, GAUSSIAN=space.distribution == "gaussian",
            STOCHASTIC=stochastic and out_kind != 0, SEARCH=_search_steps(len(idx)), BLOCK=BLOCK, SUBS=SUBS,
            num_warps=4, enable_fp_fusion=False,
        )
    del keep


def project(space: "DirectionSpace", rows: list[int], seeds: np.ndarray) -> np.ndarray:
    """``DirectionSpace.project`` for the rows whose tensors live on a CUDA device."""
    total = np.zeros(seeds.size, dtype=np.float64)
    groups: dict[tuple, list[int]] = {}
    for j in rows:
        t = _check(space, j)
        groups.setdefault((t.device, _KIND[t.dtype]), []).append(j)
    gaussian = space.distribution == "gaussian"
    block_e, block_k = PROJECT_TILE[gaussian]
    for (device, kind), idx in groups.items():
        numel = np.array([space.tensors[j].numel() for j in idx], dtype=np.int64)
        starts = _starts(numel, PROJECT_CHUNK)
        if starts[-1] == 0:
            continue
        args = np.concatenate([[space.tensors[j].data_ptr() for j in idx], numel, space._tmix[idx].view(np.int64),
                               starts, seeds.view(np.int64)]).astype(np.int64)
        partial = torch.empty((int(starts[-1]), seeds.size), dtype=torch.float64, device=device)
        _project_kernel[(int(starts[-1]), triton.cdiv(seeds.size, block_k))](
            torch.from_numpy(args).to(device), len(idx), seeds.size, device_table(device), partial,
            KIND=kind, GAUSSIAN=gaussian, SEARCH=_search_steps(len(idx)),
            BLOCK_E=block_e, BLOCK_K=block_k, CHUNK=PROJECT_CHUNK, num_warps=4, enable_fp_fusion=False,
        )
        total += partial.sum(dim=0).cpu().numpy()
    return total
