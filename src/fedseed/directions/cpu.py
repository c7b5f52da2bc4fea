"""Fused CPU kernels (numba): one call visits every tensor of a direction space.

* :func:`add_directions` sets ``out = src + sum_k c_k * D(seed_k)`` in one pass over
  memory: each work item (one tensor, up to ``CHUNK`` elements) adds all seeds to a
  ``BLOCK``-element float32 sum that stays in L1, then reads the source once and
  writes the result once, converting 16-bit storage on the fly. No temporary grows
  with the tensor. With a second output (``PERT``) the same pass also writes the
  perturbed copy ``pert = out + sum_k c_k * D(seed_k)`` over the seeds after
  ``split``, from the value just stored: a zeroth-order step's update and its next
  perturbation cost one read of the weights.
* :func:`project` computes ``<D(seed_k), delta>`` for every seed in float64.

Tensors are passed as addresses (``Tensor.data_ptr()``) with their kind and size,
so a model with hundreds of small tensors costs one call, not hundreds, and work is
spread over threads by element count, not by tensor.

Results do not depend on the number of threads: an element's sum is always taken
over the seeds in the caller's order, and ``project``'s partial sums are cut at
fixed element offsets and combined in a fixed order.

The element functions (generator, portable Gaussian, 16-bit conversions) are
separate jitted functions that LLVM inlines into the loops (numba links their IR
into each kernel), written so that it vectorises them: selects instead of
branches, tables small enough to gather from L1. numba's own IR-level inlining
(``inline="always"``) gave the same speed at 3-5x the cold compile time (37 s
against 10 s for the two add kernels on 2 cores), which every fresh install pays
once; only ``_lane_sum``, whose scratch array must not cross a call, and the
sign selectors (``signed``, ``signed_low``, ``signed_high``) keep it. Three things
numba lacks are LLVM intrinsics here: reinterpreting bits, fused multiply-add (rounded once on
every device, which is what makes the Gaussian's double-double arithmetic
identical in numba and Triton) and turning an address into a typed pointer.
``cuda.py`` mirrors the element functions in Triton, operation for operation.

numba's on-disk cache is invalidated only by changes to *this* file, so every
jitted function lives here. The constants of ``gaussian_tables.py`` are frozen into
the compiled kernels; they are part of the definition of a direction and never
change (whoever changes them must delete ``__pycache__``).

Threads: the kernels prefer numba's OpenMP layer. They run between torch's operators,
whose OpenMP threads keep spinning for a while after each one; numba's workqueue
threads then share the cores with them, and a 1.1B step's kernels took 1.6-2.6x as
long there. The OpenMP layer sets the calling thread's OpenMP thread count to numba's
for each parallel call, and torch reads that same setting: the caller
(``DirectionSpace``) puts torch's count back, or a run pinned to one torch thread
would do its next reductions with two and differ from its own replay in a fresh
process. GNU OpenMP's idle threads also spin, so calls with little work run on the
calling thread (the ``*_serial`` kernels): woken, two threads took 8 ms for 0.1 ms of
work. ``NUMBA_THREADING_LAYER`` (or ``NUMBA_THREADING_LAYER_PRIORITY``) still chooses where it is set. The kernels
hold the GIL, so calls never overlap (the workqueue layer forbids it).
"""

from __future__ import annotations

import os
import platform
import sys

import numba
import numpy as np
from llvmlite import binding, ir
from numba.core import types
from numba.extending import intrinsic

from fedseed.directions import gaussian_tables as gt
from fedseed.directions.generator import GOLDEN, MIX1, MIX2

if sys.byteorder != "little":  # the kernels read Rademacher signs and rounding bits through byte views
    raise ImportError("fedseed's CPU kernels need a little-endian machine")
if "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:  # a user's own order stands
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]  # type: ignore[attr-defined]


def wide_vector_features() -> str | None:
    """The host's CPU features with LLVM's preference for 256-bit vectors turned off, on x86 with AVX-512.

    LLVM tunes Intel server cores (Skylake-X to Emerald Rapids) for 256-bit vectors,
    so there the step loops ran at half the width they get on an AMD Zen 4 core. On
    an Emerald Rapids Xeon, 512-bit loops made a 1.1B bfloat16 step's update pass
    0.355 s instead of 0.455 (medians of eight steps in two alternated pairs of
    processes). The bits do not change: numba compiles without fast-math, so the
    vector width reorders no floating-point operation.
    """
    if platform.machine().lower() not in ("x86_64", "amd64") or not numba.config.ENABLE_AVX:  # type: ignore[attr-defined]
        return None
    try:
        features = binding.get_host_cpu_features()
    except RuntimeError:  # LLVM cannot read this host's features: numba's own default
        return None
    return f"{features.flatten()},-prefer-256-bit" if features.get("avx512f") else None


if not {"NUMBA_CPU_FEATURES", "NUMBA_CPU_NAME"} & set(os.environ):  # a user's own target stands (read at first compile)
    numba.config.CPU_FEATURES = wide_vector_features()  # type: ignore[attr-defined]
_GOLDEN = np.uint64(GOLDEN)
_MIX1 = np.uint64(MIX1)
_MIX2 = np.uint64(MIX2)

# Tables become compile-time constants of the kernels (numba freezes global arrays).
_INV, _T_HI, _T_LO = gt.INV, gt.T_HI, gt.T_LO
_COS_HI, _COS_LO, _SIN_HI, _SIN_LO = gt.COS_HI, gt.COS_LO, gt.SIN_HI, gt.SIN_LO
_LN2_HI, _LN2_LO = gt.LN2_HI, gt.LN2_LO
_P1, _P2, _P3, _INV_PIO32, _TWO_PI = gt.P1, gt.P2, gt.P3, gt.INV_PIO32, gt.TWO_PI
_Q9, _Q8, _Q7, _Q6, _Q5, _Q4, _Q3 = gt.LOG_Q
_C10, _C8, _C6, _C4 = gt.COS_C
_S9, _S7, _S5, _S3 = gt.SIN_S
_LN2 = gt.LN2
_FL6, _FL5, _FL4, _FL3, _FL2 = gt.FAST_LOG
_FC8, _FC6, _FC4, _FC2 = gt.FAST_COS
_FS7, _FS5, _FS3 = gt.FAST_SIN
_MARGIN = gt.FAST_MARGIN


# -- LLVM intrinsics ---------------------------------------------------------------
def _bitcast(src: types.Type, dst: types.Type, dst_ir: ir.Type):
    @intrinsic
    def cast(typingctx, x):
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], dst_ir)

        return dst(src), codegen

    return cast


f64_bits = _bitcast(types.float64, types.int64, ir.IntType(64))
bits_f64 = _bitcast(types.int64, types.float64, ir.DoubleType())
f32_bits = _bitcast(types.float32, types.uint32, ir.IntType(32))
bits_f32 = _bitcast(types.uint32, types.float32, ir.FloatType())


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (``llvm.fma.f64``)."""

    def codegen(context, builder, sig, args):
        return builder.fma(*args)

    return types.float64(types.float64, types.float64, types.float64), codegen


def _pointer(dtype: types.Type):
    @intrinsic
    def to_pointer(typingctx, address):
        sig = types.CPointer(dtype)(types.int64)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

        return sig, codegen

    return to_pointer


ptr_f32 = _pointer(types.float32)
ptr_u16 = _pointer(types.uint16)
ptr_u32 = _pointer(types.uint32)


# -- generator -----------------------------------------------------------------------
@numba.njit(cache=True)
def mix64(z):
    """SplitMix64's finaliser on uint64 (wraps modulo 2^64)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True)
def counter(i):
    """``(i + 1) * GOLDEN``: the part of the stream position shared by every key."""
    return (np.uint64(i) + np.uint64(1)) * _GOLDEN


@numba.njit(cache=True)
def hashes(words, key, first, count):
    """``words[:count]`` = the stream of ``key`` at positions ``first .. first+count-1``.

    Rademacher signs take a byte of these each and rounding bits two bytes: the
    element loops then read them through a byte view of ``words`` (little-endian,
    as every machine numba targets), which vectorises where a per-element shift
    of a shared word would not.
    """
    c = counter(first)
    for q in range(count):  # c = counter(first + q), by addition: one multiply less per hash
        words[q] = mix64(key + c)
        c += _GOLDEN


@numba.njit(inline="always")
def signed(b, pos, neg):
    """``neg`` where the top bit of the byte ``b`` is set, else ``pos``: every Rademacher sign is read here."""
    return neg if (np.uint32(b) >> np.uint32(7)) != np.uint32(0) else pos


@numba.njit(inline="always")
def signed_low(s, pos, neg):
    """:func:`signed` of the low byte of the uint16 ``s``: the first weight of a pair."""
    return signed(np.uint32(np.uint32(s) & np.uint32(0xFF)), pos, neg)


@numba.njit(inline="always")
def signed_high(s, pos, neg):
    """:func:`signed` of the high byte of the uint16 ``s``: the second weight of a pair."""
    return signed(np.uint32(np.uint32(s) >> np.uint32(8)), pos, neg)


@numba.njit(cache=True)
def rademacher(b, c):
    """``c * (+1 or -1)`` from the top bit of the byte ``b`` (exact: a sign flip)."""
    return signed(b, c, -c)


# -- portable Gaussian ---------------------------------------------------------------
@numba.njit(cache=True)
def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@numba.njit(cache=True)
def log_u1(x):
    """``log(((x >> 40) + 1) / 2^24)`` in float64, correctly rounded on all but ~0 inputs.

    ``u = 2^k f``; ``r = f * INV[i] - 1`` is exact and ``|r| <= 2^-8``;
    ``log u = k ln2 + T[i] + log1p(r)`` summed as double-double.
    """
    bits = f64_bits(np.float64(np.int64(x >> np.uint64(40)) + 1))
    mant = bits & 0xFFFFFFFFFFFFF
    i = (mant + (1 << 44)) >> 45
    r = fma(bits_f64(mant | (1023 << 52)), _INV[i], -1.0)
    k = np.float64((bits >> 52) - 1047)  # exponent of u = exponent of (x >> 40) + 1 minus 24
    h = -0.5 * r
    p = r * h  # -r^2/2, rounded ...
    pe = fma(r, h, -p)  # ... and its rounding error
    q = fma(r, fma(r, fma(r, fma(r, fma(r, fma(r, _Q9, _Q8), _Q7), _Q6), _Q5), _Q4), _Q3)
    s1, e1 = _two_sum(k * _LN2_HI, _T_HI[i])
    s2, e2 = _two_sum(r, p)
    s3, e3 = _two_sum(s1, s2)
    lo = (fma(k, _LN2_LO, _T_LO[i]) + (e1 + e2)) + (e3 + fma(r * r, r * q, pe))
    return s3 + lo


@numba.njit(cache=True)
def cos_u2(x):
    """``cos(2 pi u2)``, ``u2 = ((x >> 16) & 0xFFFFFF) / 2^24``, the reference's float64 argument.

    ``t = n pi/32 + y`` (Cody-Waite, exact), ``cos t = C[n] cos y - S[n] sin y``.
    """
    t = _TWO_PI * (np.float64(np.int64((x >> np.uint64(16)) & np.uint64(0xFFFFFF))) * 2.0**-24)
    n = np.int64(fma(t, _INV_PIO32, 0.5))
    fn = np.float64(n)
    yh, ye = _two_sum(fma(-fn, _P1, t), -(fn * _P2))
    yl = fma(-fn, _P3, ye)
    z = yh * yh
    c, s = _COS_HI[n], _SIN_HI[n]
    cm = fma(-0.5 * yh, yh + 2.0 * yl, z * z * fma(z, fma(z, fma(z, _C10, _C8), _C6), _C4))  # cos y - 1
    sm = yh * z * fma(z, fma(z, fma(z, _S9, _S7), _S5), _S3)  # sin y - y
    a = s * yh
    ae = fma(s, yh, -a)
    b = c * cm
    be = fma(c, cm, -b)
    r1, r2 = _two_sum(c, -a)
    r3, r4 = _two_sum(r1, b)
    lo = ((_COS_LO[n] - ae) + be) - fma(s, yl + sm, _SIN_LO[n] * yh) + (r2 + r4)
    return r3 + lo


@numba.njit(cache=True)
def gaussian(x):
    """The float32 Gaussian of raw output ``x`` on the exact path (Box-Muller, float64, then rounded)."""
    return np.float32(np.sqrt(-2.0 * log_u1(x)) * cos_u2(x))


@numba.njit(cache=True)
def sqrt_m2log_fast(x):
    """``sqrt(-2 log u1)`` in plain float64 (relative error below 2^-46, see the tests)."""
    bits = f64_bits(np.float64(np.int64(x >> np.uint64(40)) + 1))
    mant = bits & 0xFFFFFFFFFFFFF
    i = (mant + (1 << 44)) >> 45
    r = fma(bits_f64(mant | (1023 << 52)), _INV[i], -1.0)
    k = np.float64((bits >> 52) - 1047)
    p = fma(r * r, fma(r, fma(r, fma(r, fma(r, _FL6, _FL5), _FL4), _FL3), _FL2), r)
    return np.sqrt(-2.0 * (fma(k, _LN2, _T_HI[i]) + p))


@numba.njit(cache=True)
def cos_fast(x):
    """``cos(2 pi u2)`` in plain float64 (relative error below 2^-51, see the tests)."""
    t = _TWO_PI * (np.float64(np.int64((x >> np.uint64(16)) & np.uint64(0xFFFFFF))) * 2.0**-24)
    n = np.int64(fma(t, _INV_PIO32, 0.5))
    fn = np.float64(n)
    y = fma(-fn, _P3, fma(-fn, _P1, t) - fn * _P2)
    z = y * y
    cm = z * fma(z, fma(z, fma(z, _FC8, _FC6), _FC4), _FC2)
    sy = fma(y * z, fma(z, fma(z, _FS7, _FS5), _FS3), y)
    c = _COS_HI[n]
    return fma(c, cm, fma(-_SIN_HI[n], sy, c))


@numba.njit(cache=True)
def gaussian_fast(x):
    """``(value, doubtful)``: the fast path's float32 Gaussian, and whether it may differ from the exact one.

    The exact float64 value lies within ``FAST_MARGIN * |y|`` of the fast one ``y``;
    if no float32 rounding boundary lies that close to ``y``, both round to the
    same float32. Boundaries are half a spacing away (a quarter below a power of two).
    """
    y = sqrt_m2log_fast(x) * cos_fast(x)
    r = np.float32(y)
    b = f32_bits(r)
    e = np.int64((b >> np.uint32(23)) & np.uint32(0xFF))
    below = 0 if (b & np.uint32(0x7FFFFF)) == np.uint32(0) else 1
    half = bits_f64((e - 152 + below + 1023) << 52)  # ulp/2, or ulp/4 at a power of two
    return r, abs(y - np.float64(r)) + _MARGIN * abs(y) >= half


@numba.njit(cache=True)
def gaussians(g, ig, m, key, doubtful):
    """``g[:m] = Gaussian(mix64(key + ig[:m]))``: fast path for all, exact path for the doubtful few."""
    count = 0
    for j in range(m):
        v, d = gaussian_fast(mix64(key + ig[j]))
        g[j] = v
        doubtful[j] = d
        count += d
    if count:
        for j in range(m):
            if doubtful[j]:
                g[j] = gaussian(mix64(key + ig[j]))


# -- 16-bit floats -------------------------------------------------------------------
@numba.njit(cache=True)
def bf16_to_f32(h):
    return bits_f32(np.uint32(h) << np.uint32(16))


@numba.njit(cache=True)
def f16_to_f32(h):
    """IEEE half to float, exact (subnormals through a float multiply by 2^-24)."""
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    m = h & np.uint32(0x3FF)
    normal = sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13))
    special = sign | np.uint32(0x7F800000) | (m << np.uint32(13))
    tiny = sign | f32_bits(np.float32(m) * np.float32(2.0**-24))
    b = special if e == np.uint32(31) else normal
    return bits_f32(tiny if e == np.uint32(0) else b)


_HIGH = np.uint32(0xFFFF0000)
_BF16_NAN = np.uint32(0x7FC00000)


@numba.njit(cache=True)
def _bf16_or_nan(b, rounded):
    """``rounded`` (a bfloat16 in the high half), or the canonical NaN 0x7FC0 where the float32 bits ``b`` are a NaN."""
    return _BF16_NAN if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else rounded


@numba.njit(cache=True)
def bf16_nearest_high(v):
    """``v`` rounded to bfloat16 (nearest even, NaN to 0x7FC0, what torch does), in the high half of float32 bits.

    Kept in the high half, a rounded value is already its own float32, and two of
    them pack into one 32-bit word with a shift and an or: the bfloat16 step loop
    works on pairs of weights in 32-bit lanes instead of widening and narrowing
    16-bit ones, shuffles that LLVM vectorised poorly (on an AVX-512 core, in
    cache, the update-and-perturb loop went from 0.44 to 0.34 ns per weight).
    """
    b = f32_bits(v)
    return _bf16_or_nan(b, np.uint32(np.uint32(b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) & _HIGH))


@numba.njit(cache=True)
def bf16_stochastic_high(v, r):
    """:func:`bf16_nearest_high` rounding up with probability (dropped bits) / 2^16, using the 16 bits ``r``."""
    b = f32_bits(v)
    return _bf16_or_nan(b, np.uint32(np.uint32(b + np.uint32(r)) & _HIGH))


@numba.njit(cache=True)
def pair_low(x):
    """The first bfloat16 of the 32-bit word ``x`` (little-endian: its low half), as float32."""
    return bits_f32(np.uint32(x << np.uint32(16)))


@numba.njit(cache=True)
def pair_high(x):
    """The second bfloat16 of the 32-bit word ``x`` (its high half), as float32."""
    return bits_f32(np.uint32(x & _HIGH))


@numba.njit(cache=True)
def pair(low, high):
    """The 32-bit word of two bfloat16 values held in the high halves of ``low`` and ``high``."""
    return np.uint32(high | np.uint32(low >> np.uint32(16)))


@numba.njit(cache=True)
def f32_to_bf16(v):
    """Round to nearest even, NaN to 0x7FC0 (what torch does)."""
    return np.uint16(bf16_nearest_high(v) >> np.uint32(16))


@numba.njit(cache=True)
def f32_to_bf16_stochastic(v, r):
    """Round up with probability (dropped bits) / 2^16, using the 16 bits ``r``."""
    return np.uint16(bf16_stochastic_high(v, r) >> np.uint32(16))


@numba.njit(cache=True)
def f32_to_f16(v):
    """Round to nearest even with overflow to inf and gradual underflow (what torch does)."""
    b = f32_bits(v)
    sign = (b >> np.uint32(16)) & np.uint32(0x8000)
    a = b & np.uint32(0x7FFFFFFF)
    normal = (a + np.uint32(0xC8000FFF) + ((a >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
    tiny = np.uint32(np.int32(np.rint(bits_f32(a) * np.float32(2.0**24))))
    h = tiny if a < np.uint32(0x38800000) else normal
    h = np.uint32(0x7C00) if a >= np.uint32(0x477FF000) else h
    h = np.uint32(0x7E00) if a > np.uint32(0x7F800000) else h
    return np.uint16(h | sign)


@numba.njit(cache=True)
def f32_to_f16_stochastic(v, r):
    """Round up with probability proportional to the dropped bits, using the 16 bits ``r``.

    A normal result drops 13 bits and takes ``r``'s low 13; a subnormal one adds
    ``u = r / 2^16`` to its value in units of the smallest subnormal.
    """
    b = f32_bits(v)
    sign = (b >> np.uint32(16)) & np.uint32(0x8000)
    a = b & np.uint32(0x7FFFFFFF)
    normal = (a + (np.uint32(r) & np.uint32(0x1FFF)) - np.uint32(0x38000000)) >> np.uint32(13)
    u = np.float64(np.uint32(r)) * 2.0**-16
    tiny = np.uint32(np.int64(np.float64(bits_f32(a)) * 2.0**24 + u))
    h = tiny if a < np.uint32(0x38800000) else min(normal, np.uint32(0x7C00))
    h = np.uint32(0x7E00) if a > np.uint32(0x7F800000) else h
    return np.uint16(h | sign)


# -- kernels ---------------------------------------------------------------------------
F32, BF16, F16 = 0, 1, 2  # storage kinds
# Columns of the per-tensor table of add_directions (int64; tmix and rkey hold uint64 bits).
OUT, OUT_KIND, SRC, SRC_KIND, PERT, NUMEL, TMIX, RKEY = range(8)
# Columns of the per-tensor table of project.
ADDR, KIND, P_NUMEL, P_TMIX = range(4)
CHUNK = 16384  # elements per work item of add_directions
PROJECT_CHUNK = 65536  # elements per work item (one row of partial sums) of project
BLOCK = 1024  # elements whose running sum stays in L1 while every seed is added
LANES = 64  # independent float64 accumulators of a dot product
SEED_GROUP = 8  # seeds per work unit of project


@numba.njit(cache=True)
def _tensor_of(starts, w):
    """The tensor of work item ``w`` (``starts`` is the prefix sum of items per tensor)."""
    return np.searchsorted(starts, w, side="right") - 1


@numba.njit(cache=True)
def _keys(seeds, tmix):
    keys = np.empty(seeds.size, dtype=np.uint64)
    for k in range(seeds.size):
        keys[k] = mix64(seeds[k] ^ tmix)
    return keys


@numba.njit(cache=True)
def _accumulate(acc, lo, m, keys, coeffs, is_gaussian, ig, g, doubtful, words):
    """``acc[:m] += sum_k coeffs[k] * D(keys[k])`` over elements ``lo ..`` in seed order.

    ``ig`` holds the elements' counters (Gaussians); ``words`` is scratch for the
    Rademacher hashes, eight elements each (``lo`` is a multiple of 8).
    """
    if is_gaussian:
        for k in range(keys.size):
            gaussians(g, ig, m, keys[k], doubtful)
            c = coeffs[k]
            for j in range(m):
                acc[j] += c * g[j]
    else:
        signs = words.view(np.uint8)
        for k in range(keys.size):
            hashes(words, keys[k], lo // 8, (m + 7) // 8)
            c = coeffs[k]
            for j in range(m):
                acc[j] += rademacher(signs[j], c)


@numba.njit(cache=True)
def _add_source(acc, m, lo, address, kind):
    """``acc[:m] = src[lo:lo+m] + acc[:m]`` for a float32, bfloat16 or float16 source."""
    if kind == F32:
        src = numba.carray(ptr_f32(address + 4 * lo), m)
        for j in range(m):
            acc[j] = src[j] + acc[j]
    elif kind == BF16:
        src16 = numba.carray(ptr_u16(address + 2 * lo), m)
        for j in range(m):
            acc[j] = bf16_to_f32(src16[j]) + acc[j]
    else:
        src16 = numba.carray(ptr_u16(address + 2 * lo), m)
        for j in range(m):
            acc[j] = f16_to_f32(src16[j]) + acc[j]


@numba.njit(cache=True)
def _store(acc, m, lo, address, kind, stochastic, rkey, words):
    """Write ``acc[:m]`` to ``out[lo:lo+m]``: round to nearest even, or stochastically with ``rkey``.

    Stochastic rounding bits are 16 per element, four elements to a hash of
    ``rkey``'s stream (``lo`` is a multiple of 4); ``words`` is their scratch.
    """
    if kind == F32:
        out = numba.carray(ptr_f32(address + 4 * lo), m)
        for j in range(m):
            out[j] = acc[j]
        return
    out16 = numba.carray(ptr_u16(address + 2 * lo), m)
    bits = words.view(np.uint16)
    if stochastic:
        hashes(words, rkey, lo // 4, (m + 3) // 4)
    if kind == BF16 and stochastic:
        for j in range(m):
            out16[j] = f32_to_bf16_stochastic(acc[j], bits[j])
    elif kind == BF16:
        for j in range(m):
            out16[j] = f32_to_bf16(acc[j])
    elif stochastic:
        for j in range(m):
            out16[j] = f32_to_f16_stochastic(acc[j], bits[j])
    else:
        for j in range(m):
            out16[j] = f32_to_f16(acc[j])


@numba.njit(cache=True)
def _rademacher_step(first, last, out, kind, pert, keys, coeffs, split, stochastic, rkey):
    """A zeroth-order step's pass, ``split`` (0 or 1) update seeds and one perturbation seed: one loop per block.

    The same operations in the same order as the general path, element by
    element in registers instead of through its L1 sums: with eight Rademacher
    elements to a hash the generator is cheap. bfloat16 weights go two to a
    32-bit word, so the tensor's size must be even and both addresses 4-byte
    aligned (the caller sends other tensors to the general path).
    """
    zero = np.float32(0.0)  # ``0 + c z``, as the general path's zeroed sum: it maps -0.0 to +0.0 alike
    cp, cu = coeffs[split], coeffs[0]
    p_pos, p_neg, u_pos, u_neg = zero + cp, zero + (-cp), zero + cu, zero + (-cu)  # 0 + rademacher(b, c), once
    kp, ku = keys[split], keys[0]
    update_words = np.empty(BLOCK // 8, dtype=np.uint64)
    pert_words = np.empty(BLOCK // 8, dtype=np.uint64)
    round_words = np.empty(BLOCK // 4, dtype=np.uint64)
    us, ps, r = update_words.view(np.uint8), pert_words.view(np.uint8), round_words.view(np.uint16)
    us2, ps2, r2 = update_words.view(np.uint16), pert_words.view(np.uint16), round_words.view(np.uint32)  # pairs
    rounds = stochastic and split > 0 and kind != F32
    for lo in range(first, last, BLOCK):
        m = min(BLOCK, last - lo)
        hashes(pert_words, kp, lo // 8, (m + 7) // 8)
        if split:
            hashes(update_words, ku, lo // 8, (m + 7) // 8)
        if rounds:
            hashes(round_words, rkey, lo // 4, (m + 3) // 4)
        if kind == F32:
            w = numba.carray(ptr_f32(out + 4 * lo), m)
            p = numba.carray(ptr_f32(pert + 4 * lo), m)
            if split:
                for j in range(m):
                    v = w[j] + signed(us[j], u_pos, u_neg)
                    w[j] = v
                    p[j] = v + signed(ps[j], p_pos, p_neg)
            else:
                for j in range(m):
                    p[j] = w[j] + signed(ps[j], p_pos, p_neg)
            continue
        if kind == BF16:  # weights in pairs, one to a 32-bit lane (see bf16_nearest_high); m is even
            w32 = numba.carray(ptr_u32(out + 2 * lo), m // 2)
            p32 = numba.carray(ptr_u32(pert + 2 * lo), m // 2)
            if split:
                for i in range(m // 2):
                    a = pair_low(w32[i]) + signed_low(us2[i], u_pos, u_neg)
                    b = pair_high(w32[i]) + signed_high(us2[i], u_pos, u_neg)
                    if rounds:
                        ha = bf16_stochastic_high(a, np.uint32(r2[i] & np.uint32(0xFFFF)))
                        hb = bf16_stochastic_high(b, np.uint32(r2[i] >> np.uint32(16)))
                    else:
                        ha, hb = bf16_nearest_high(a), bf16_nearest_high(b)
                    w32[i] = pair(ha, hb)
                    p32[i] = pair(bf16_nearest_high(bits_f32(ha) + signed_low(ps2[i], p_pos, p_neg)),
                                  bf16_nearest_high(bits_f32(hb) + signed_high(ps2[i], p_pos, p_neg)))
            else:
                for i in range(m // 2):
                    p32[i] = pair(bf16_nearest_high(pair_low(w32[i]) + signed_low(ps2[i], p_pos, p_neg)),
                                  bf16_nearest_high(pair_high(w32[i]) + signed_high(ps2[i], p_pos, p_neg)))
            continue
        w16 = numba.carray(ptr_u16(out + 2 * lo), m)
        p16 = numba.carray(ptr_u16(pert + 2 * lo), m)
        if split:  # float16: one loop per case, a branch inside would keep LLVM from vectorising
            for j in range(m):
                v = f16_to_f32(w16[j]) + signed(us[j], u_pos, u_neg)
                h = f32_to_f16_stochastic(v, r[j]) if rounds else f32_to_f16(v)
                w16[j] = h
                p16[j] = f32_to_f16(f16_to_f32(h) + signed(ps[j], p_pos, p_neg))
        else:
            for j in range(m):
                p16[j] = f32_to_f16(f16_to_f32(w16[j]) + signed(ps[j], p_pos, p_neg))


@numba.njit(cache=True)
def _add_item(w, table, starts, seeds, coeffs, split, is_gaussian, stochastic):
    """Work item ``w`` of :func:`add_directions`: up to ``CHUNK`` elements of one tensor."""
    t = _tensor_of(starts, w)
    first = (w - starts[t]) * CHUNK
    last = min(table[t, NUMEL], first + CHUNK)
    keys = _keys(seeds, np.uint64(table[t, TMIX]))
    rkey = np.uint64(table[t, RKEY])
    out, out_kind, src, pert = table[t, OUT], table[t, OUT_KIND], table[t, SRC], table[t, PERT]
    pairs = out_kind != BF16 or (table[t, NUMEL] % 2 == 0 and (out | pert) % 4 == 0)  # _rademacher_step's bf16 lanes
    if not is_gaussian and pert != 0 and src == 0 and split <= 1 and seeds.size == split + 1 and pairs:
        _rademacher_step(first, last, out, out_kind, pert, keys, coeffs, split, stochastic, rkey)
        return
    write_out = split > 0 or src != 0  # with no update and no source, out keeps its value and is only read
    acc = np.empty(BLOCK, dtype=np.float32)
    more = np.empty(BLOCK, dtype=np.float32)
    ig = np.empty(BLOCK, dtype=np.uint64)
    g = np.empty(BLOCK, dtype=np.float32)
    doubtful = np.empty(BLOCK, dtype=np.bool_)
    words = np.empty(BLOCK // 4, dtype=np.uint64)
    for lo in range(first, last, BLOCK):
        m = min(BLOCK, last - lo)
        for j in range(m):
            acc[j] = 0.0
        if is_gaussian:
            for j in range(m):
                ig[j] = counter(lo + j)
        _accumulate(acc, lo, m, keys[:split], coeffs[:split], is_gaussian, ig, g, doubtful, words)
        if src != 0:
            _add_source(acc, m, lo, src, table[t, SRC_KIND])
        else:
            _add_source(acc, m, lo, out, out_kind)
        if write_out:
            _store(acc, m, lo, out, out_kind, stochastic, rkey, words)
            if out_kind != F32:
                _load(acc, m, lo, out, out_kind)  # the perturbation starts from the value as stored
        if pert != 0:
            for j in range(m):
                more[j] = 0.0
            _accumulate(more, lo, m, keys[split:], coeffs[split:], is_gaussian, ig, g, doubtful, words)
            for j in range(m):
                more[j] = acc[j] + more[j]
            _store(more, m, lo, pert, out_kind, False, rkey, words)


@numba.njit(parallel=True, cache=True)
def add_directions(table, starts, seeds, coeffs, split, is_gaussian, stochastic):  # pragma: no cover - compiled
    """For every tensor ``t``: ``out_t = src_t + sum_{k < split} c_k D(seed_k, t)``, and ``pert_t`` from it.

    ``table`` has one row per tensor (columns ``OUT .. RKEY``). ``src_t`` is the
    ``SRC`` tensor when its address is not 0, else ``out_t`` itself. When ``PERT``
    is not 0, ``pert_t = out_t + sum_{k >= split} c_k D(seed_k, t)`` is written
    too (rounded to nearest, from ``out_t`` as stored); otherwise ``split`` is the
    number of seeds. ``starts`` is the prefix sum of ``ceil(numel / CHUNK)``;
    ``TMIX`` and ``RKEY`` are the per-tensor stream salt and stochastic-rounding key
    (used for ``out_t`` only).
    """
    for w in numba.prange(starts[-1]):
        _add_item(w, table, starts, seeds, coeffs, split, is_gaussian, stochastic)


@numba.njit(cache=True)
def add_directions_serial(table, starts, seeds, coeffs, split, is_gaussian, stochastic):  # pragma: no cover
    """:func:`add_directions` on the calling thread (small work: no thread wake-up)."""
    for w in range(starts[-1]):
        _add_item(w, table, starts, seeds, coeffs, split, is_gaussian, stochastic)


@numba.njit(cache=True)
def _load(buf, m, lo, address, kind):
    """``buf[:m] = float32(src[lo:lo+m])``."""
    if kind == F32:
        src = numba.carray(ptr_f32(address + 4 * lo), m)
        for j in range(m):
            buf[j] = src[j]
    else:
        src16 = numba.carray(ptr_u16(address + 2 * lo), m)
        if kind == BF16:
            for j in range(m):
                buf[j] = bf16_to_f32(src16[j])
        else:
            for j in range(m):
                buf[j] = f16_to_f32(src16[j])


@numba.njit(inline="always")
def _lane_sum(g, padded):
    """``sum(g[:padded])`` over ``LANES`` interleaved float64 accumulators, combined pairwise.

    Many accumulators keep the adds independent (one chain would wait on the
    adder's latency); the order is fixed, so the sum is too.
    """
    lanes = np.zeros(LANES, dtype=np.float64)
    for j0 in range(0, padded, LANES):
        for lane in range(LANES):
            lanes[lane] += g[j0 + lane]
    width = LANES
    while width > 1:
        width //= 2
        for lane in range(width):
            lanes[lane] += lanes[lane + width]
    return lanes[0]


@numba.njit(cache=True)
def _project_unit(unit, table, starts, first_item, seeds, is_gaussian, partial):
    """Unit ``unit`` of :func:`project`: one ``PROJECT_CHUNK`` of one tensor, one group of seeds."""
    groups = (seeds.size + SEED_GROUP - 1) // SEED_GROUP
    row = unit // groups
    k0 = (unit % groups) * SEED_GROUP
    k1 = min(seeds.size, k0 + SEED_GROUP)
    w = first_item + row
    t = _tensor_of(starts, w)
    first = (w - starts[t]) * PROJECT_CHUNK
    last = min(table[t, P_NUMEL], first + PROJECT_CHUNK)
    keys = _keys(seeds[k0:k1], np.uint64(table[t, P_TMIX]))
    d = np.zeros(BLOCK, dtype=np.float32)
    g = np.empty(BLOCK, dtype=np.float64)
    g32 = np.empty(BLOCK, dtype=np.float32)
    doubtful = np.empty(BLOCK, dtype=np.bool_)
    ig = np.empty(BLOCK, dtype=np.uint64)
    words = np.empty(BLOCK // 8, dtype=np.uint64)
    signs = words.view(np.uint8)
    for k in range(k0, k1):
        partial[row, k] = 0.0
    for lo in range(first, last, BLOCK):
        m = min(BLOCK, last - lo)
        padded = (m + LANES - 1) // LANES * LANES
        _load(d, m, lo, table[t, ADDR], table[t, KIND])
        for j in range(m, padded):
            d[j] = 0.0
        if is_gaussian:
            for j in range(padded):
                ig[j] = counter(lo + j)
        for k in range(keys.size):
            key = keys[k]
            if is_gaussian:
                gaussians(g32, ig, padded, key, doubtful)
                for j in range(padded):
                    g[j] = np.float64(g32[j]) * np.float64(d[j])
            else:
                hashes(words, key, lo // 8, padded // 8)
                for j in range(padded):
                    g[j] = rademacher(signs[j], np.float64(d[j]))
            partial[row, k0 + k] += _lane_sum(g, padded)


@numba.njit(parallel=True, cache=True)
def project(table, starts, first_item, seeds, is_gaussian, partial):  # pragma: no cover - compiled
    """``partial[w - first_item, k] = <D(seeds[k]), delta>`` over work item ``w``'s elements, multithreaded.

    ``table`` has one row per tensor (columns ``ADDR .. P_TMIX``). Work items are
    ``PROJECT_CHUNK``-element pieces of the tensors (``starts`` is their prefix
    sum); this call does items ``first_item .. first_item + len(partial)``, each
    split into groups of ``SEED_GROUP`` seeds so that a small tensor with many
    seeds still keeps every thread busy. Products are exact in float64 (24-bit
    times 24-bit significands).
    """
    units = partial.shape[0] * ((seeds.size + SEED_GROUP - 1) // SEED_GROUP)
    for unit in numba.prange(units):
        _project_unit(unit, table, starts, first_item, seeds, is_gaussian, partial)


@numba.njit(cache=True)
def project_serial(table, starts, first_item, seeds, is_gaussian, partial):  # pragma: no cover - compiled
    """:func:`project` on the calling thread."""
    units = partial.shape[0] * ((seeds.size + SEED_GROUP - 1) // SEED_GROUP)
    for unit in range(units):
        _project_unit(unit, table, starts, first_item, seeds, is_gaussian, partial)


def work_starts(numel: np.ndarray, chunk: int) -> np.ndarray:
    """Prefix sum of work items per tensor (``ceil(numel / chunk)`` each), shape (T + 1,)."""
    starts = np.zeros(numel.size + 1, dtype=np.int64)
    np.cumsum((numel + chunk - 1) // chunk, out=starts[1:])
    return starts
