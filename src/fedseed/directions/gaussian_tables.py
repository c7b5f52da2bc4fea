"""Constants and tables of the portable Gaussian, built exactly with :mod:`decimal`.

A Gaussian direction element is ``float32(sqrt(-2 log u1) * cos(2 pi u2))`` computed
in float64 (``generator.py``). ``log`` and ``cos`` are not IEEE basic operations: every
math library rounds them its own way (numpy's SIMD ``log`` and glibc's disagree on
0.35% of our 2^24 inputs). The kernels therefore evaluate both with the same
sequence of IEEE operations (``+ - *``, ``fma``, ``sqrt``) from these constants on
every device, which makes the Gaussian bitwise portable. That *exact path* uses
double-double arithmetic and is correctly rounded on all but about 0.01% of the
inputs, so it agrees with the numpy reference on far more inputs than numpy
agrees with glibc.

The kernels first take a *fast path*, plain float64 with short polynomials, twice
as fast; whenever its result is within ``FAST_MARGIN`` (relative) of a float32
rounding boundary they recompute that element on the exact path. The fast path's
error bound is measured on every one of its 2^24 + 2^24 inputs by the tests, so
the float32 results are the exact path's, bit for bit.

The tables depend on nothing but integer and decimal arithmetic, so every party
builds the same bits. Nothing here is device code.
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext
from typing import Any

import numpy as np

_PI = Decimal("3.14159265358979323846264338327950288419716939937510582097494459230781640628620899863")


def _nearest(d: Decimal) -> float:
    """``d`` rounded to the nearest float64 (``float(Decimal)`` rounds correctly)."""
    return float(d)


def _split(d: Decimal) -> tuple[float, float]:
    """``d`` as a double-double ``hi + lo``."""
    hi = float(d)
    return hi, float(d - Decimal(hi))


def _short(d: Decimal, bits: int) -> float:
    """``d`` rounded to ``bits`` significant bits, so that small multiples of it are exact."""
    _, exponent = math.frexp(float(d))  # d = m 2^exponent, 0.5 <= |m| < 1
    scale = Decimal(2) ** (bits - exponent)
    return float(Decimal(round(d * scale)) / scale)


def _series(x: Decimal, first: Decimal, start: int) -> Decimal:
    """``sum_k (-1)^k x^(2k) first / ((start+1)(start+2)...)``: the sin/cos Taylor series."""
    total, term, k = Decimal(0), first, start
    while term != 0 and abs(term) > Decimal(10) ** -70:
        total += term
        k += 2
        term = -term * x * x / (k * (k - 1))
    return total


def _build() -> dict[str, Any]:
    with localcontext() as ctx:
        ctx.prec = 80
        ln2 = Decimal(2).ln()
        # log: u = 2^k f, f * INV[i] - 1 is exact (INV has 21 fractional bits), T = -log(INV).
        inv = [Decimal(round(Decimal(2**21) / (1 + Decimal(i) / 128))) / 2**21 for i in range(129)]
        t_hi, t_lo = zip(*[_split(-x.ln()) if x != 1 else (0.0, 0.0) for x in inv])
        # cos: t = n pi/32 + y, |y| <= pi/64; pi/32 in three pieces (Cody-Waite), tables of cos/sin(n pi/32).
        pio32 = _PI / 32
        p1 = _short(pio32, 45)
        p2 = _short(pio32 - Decimal(p1), 45)
        p3 = _nearest(pio32 - Decimal(p1) - Decimal(p2))
        cos_tab = [_split(_series(n * pio32, Decimal(1), 0)) for n in range(65)]
        sin_tab = [_split(_series(n * pio32, n * pio32, 1)) for n in range(65)]
        for n in (16, 48):  # cos(pi/2), cos(3 pi/2) are exactly zero
            cos_tab[n] = (0.0, 0.0)
        ln2_hi = _short(ln2, 45)
        return dict(
            LN2_HI=ln2_hi,
            LN2_LO=_nearest(ln2 - Decimal(ln2_hi)),
            INV=np.array([float(x) for x in inv]),
            T_HI=np.array(t_hi),
            T_LO=np.array(t_lo),
            P1=p1,
            P2=p2,
            P3=p3,
            INV_PIO32=_nearest(32 / _PI),
            COS_HI=np.array([c[0] for c in cos_tab]),
            COS_LO=np.array([c[1] for c in cos_tab]),
            SIN_HI=np.array([s[0] for s in sin_tab]),
            SIN_LO=np.array([s[1] for s in sin_tab]),
        )


_T = _build()
LN2_HI: float = _T["LN2_HI"]  # ln 2 to 45 bits: k * LN2_HI is exact for |k| <= 256
LN2_LO: float = _T["LN2_LO"]
INV: np.ndarray = _T["INV"]  # (129,) 1 / (1 + i/128) with 21 fractional bits
T_HI: np.ndarray = _T["T_HI"]  # (129,) -log(INV[i]) as hi + lo
T_LO: np.ndarray = _T["T_LO"]
P1: float = _T["P1"]  # pi/32 = P1 + P2 + P3; n * P1 and n * P2 exact for n <= 64
P2: float = _T["P2"]
P3: float = _T["P3"]
INV_PIO32: float = _T["INV_PIO32"]
COS_HI: np.ndarray = _T["COS_HI"]  # (65,) cos(n pi/32) as hi + lo
COS_LO: np.ndarray = _T["COS_LO"]
SIN_HI: np.ndarray = _T["SIN_HI"]  # (65,) sin(n pi/32) as hi + lo
SIN_LO: np.ndarray = _T["SIN_LO"]
TWO_PI: float = 2.0 * 3.141592653589793  # the reference's ``2.0 * np.pi``, bit for bit

# The fast path (a float64 approximation accurate to ~2^-46, used whenever its float32 rounding is
# provably the same as the exact path's): Taylor coefficients, highest first.
LN2: float = float(T_HI[128])  # ln 2 rounded (T[128] = -log(1/2)): k ln2 + T[128] cancels exactly
FAST_LOG = (-1.0 / 6, 1.0 / 5, -1.0 / 4, 1.0 / 3, -1.0 / 2)  # log1p(r) = r + r^2 P(r), |r| <= 2^-8
FAST_COS = (1.0 / 40320, -1.0 / 720, 1.0 / 24, -1.0 / 2)  # cos(y) - 1 = y^2 P(y^2), |y| <= pi/64
FAST_SIN = (-1.0 / 5040, 1.0 / 120, -1.0 / 6)  # sin(y) - y = y^3 P(y^2)
# Bound on |fast - exact| / |exact| of the float64 Gaussian before rounding; the exhaustive test
# over all 2^24 inputs of each factor measures 2^-46.2 (log part) and 2^-51.2 (cos part).
FAST_MARGIN = 2.0**-42

# log1p(r) - r + r^2/2 = r^3 * Q(r): Taylor coefficients, highest first (|r| <= 2^-8).
LOG_Q = (1.0 / 9, -1.0 / 8, 1.0 / 7, -1.0 / 6, 1.0 / 5, -1.0 / 4, 1.0 / 3)
# cos(y) - 1 + y^2/2 = y^4 * C(y^2) and sin(y) - y = y^3 * S(y^2), |y| <= pi/64.
COS_C = (-1.0 / 3628800, 1.0 / 40320, -1.0 / 720, 1.0 / 24)
SIN_S = (1.0 / 362880, -1.0 / 5040, 1.0 / 120, -1.0 / 6)
