"""How 16-bit tensors keep the small updates of zeroth-order training.

A FedKSeed step moves a weight by ``lr * g * z``, about 1e-7 to 1e-5, while a
bfloat16 weight of magnitude 0.02 has a spacing of 1.2e-4: rounded to nearest,
almost every update rounds away, and perturbing by ``+eps`` then ``-eps`` does
not come back to the same weight. Three storage modes, chosen per
:class:`~fedseed.directions.DirectionSpace`:

* ``"nearest"``: round every result to nearest even (what a plain ``w.add_`` does).
  Updates below half a spacing are lost; see :func:`lost_fraction`.
* ``"stochastic"``: round up with probability equal to the dropped fraction. The
  expected weight is right, but each rounding adds noise of the order of the
  spacing, which after hundreds of perturb/restore passes outweighs the updates.
  Its random bits come from the seeds and coefficients of the call, so replays
  are deterministic.
* ``"master"``: keep a float32 master copy of every 16-bit tensor; results are
  computed from and stored to the master, and the 16-bit tensor is its rounding.
  The master follows a float32 run bit for bit (same float32 operations); it costs
  4 bytes per 16-bit parameter. Float32 tensors never get a master.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from fedseed.directions.generator import GOLDEN, _mix64_array

Precision = Literal["nearest", "stochastic", "master"]
PRECISIONS: tuple[str, ...] = ("nearest", "stochastic", "master")
LOW_PRECISION = (torch.bfloat16, torch.float16)
ROUNDING_SALT = np.uint64(0x5D0C4A57E1A0B3C9)


def rounding_keys(seeds: np.ndarray, coeffs: np.ndarray, tmix: np.ndarray) -> np.ndarray:
    """One stochastic-rounding key per tensor, a pure function of the call's arguments.

    Hashing the seeds, the coefficients' bits and their positions makes two calls
    with different arguments use unrelated rounding bits, and a replay of the same
    call use the same ones. Shape (T,), uint64.
    """
    position = np.arange(seeds.size, dtype=np.uint64) * np.uint64(GOLDEN)
    cbits = np.asarray(coeffs, dtype=np.float32).view(np.uint32).astype(np.uint64) << np.uint64(32)
    call = np.bitwise_xor.reduce(_mix64_array(seeds ^ cbits ^ position), initial=np.uint64(seeds.size))
    return _mix64_array(tmix ^ _mix64_array(np.asarray([call ^ ROUNDING_SALT], dtype=np.uint64)))


def lost_fraction(weights: torch.Tensor, update: torch.Tensor, dtype: torch.dtype) -> float:
    """Fraction of non-zero ``update`` elements that leave ``weights`` unchanged when stored as ``dtype``.

    ``weights`` are taken as already stored in ``dtype``; the sum is computed in
    float32 and rounded to nearest even, as a plain ``w.add_(update)`` on a
    ``dtype`` tensor does.
    """
    w = weights.to(dtype)
    moved = (w.float() + update.float()).to(dtype)
    nonzero = update != 0
    return float(((moved == w) & nonzero).sum()) / max(int(nonzero.sum()), 1)
