"""How results are stored into 16-bit tensors.

A FedKSeed step moves a weight by ``lr * g * z``, about 1e-7 to 1e-5, while a
bfloat16 weight of magnitude 0.02 has a spacing of 1.2e-4: rounded to nearest,
almost every such update rounds away (see :func:`lost_fraction`). Two storage
modes, chosen per :class:`~fedseed.directions.DirectionSpace`:

* ``"nearest"``: round every result to nearest even (what a plain ``w.add_`` does).
  A rebuild ``w = w0 + sum_k C_k z_k`` sums in float32 and rounds once, so it loses
  nothing that a 16-bit model can hold.
* ``"stochastic"``: round up with probability equal to the dropped fraction, so a
  local update is right in expectation however small. Its random bits come from
  the seeds and coefficients of the call, so replays are deterministic: element
  ``i`` takes 16 bits of the stream of the call's rounding key
  (:func:`rounding_bits`), four elements to a hash.

Neither keeps a float32 copy of the model: a zeroth-order step never perturbs the
weights in place (``DirectionSpace.perturb_into`` writes the perturbed copy of one
module at a time elsewhere), so there is nothing to restore, and the next sync
rebuilds the exact global model from the base weights and the per-seed totals.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from fedseed.directions.generator import GOLDEN, _mix64_array, stream, unpack

Precision = Literal["nearest", "stochastic"]
PRECISIONS: tuple[str, ...] = ("nearest", "stochastic")
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


def rounding_bits(rkey: int, count: int) -> np.ndarray:
    """The 16 stochastic-rounding bits of elements ``0 .. count-1`` of a tensor (the reference).

    bfloat16 adds them below the bits it keeps; float16 adds the low 13 to a normal
    result, and uses all 16 as the fraction ``u = bits / 2^16`` of a subnormal one.
    """
    return unpack(stream(rkey, 0, (count + 3) // 4), 16, count)


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
