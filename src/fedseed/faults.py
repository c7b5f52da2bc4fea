"""Fault injection: what a hostile or broken client sends, for tests and robustness studies.

A client's reply leaves it through its :class:`Uplink`. With ``[faults]
adversaries = n`` the in-process runner gives clients ``0 .. n-1`` an
:class:`Adversary`'s uplink (a test may install its own): the client trains
honestly, so its lies are built from a real reply, and the uplink then does one of:

    huge              every reported value times ``faults.scale`` (kept finite in float32)
    sign-flip         every reported value negated
    nan               a NaN where the first reported value (or the loss) is
    out-of-pool       names seed id 2^32 - 1, outside any pool (a reply without seed ids:
                      one value more than the model or its bases have)
    stale-round       answers for the previous round
    wrong-client      answers as another client
    inflate-examples  claims 2^32 - 1 training examples, to take over the weighted mean
    truncated         sends the first half of its frame
    random-bytes      sends as many random bytes as its frame had
    duplicate         sends its (honest) reply twice
    drift             its copy of the global model silently changed (a different GPU, a
                      bit flip): the weights move but the copy still claims its position

Everything but ``huge``, ``sign-flip`` and ``drift`` must be rejected by decoding and
checking; ``huge`` and ``sign-flip`` are well-formed and are what robust aggregation
is for; ``drift`` is caught by the model fingerprint and answered with a resync.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseed import wire
from fedseed.settings import setting

if TYPE_CHECKING:
    from fedseed.models import LocalModel

ATTACKS = ("huge", "sign-flip", "nan", "out-of-pool", "stale-round", "wrong-client", "inflate-examples",
           "truncated", "random-bytes", "duplicate", "drift")


@dataclass
class FaultsSection:
    """``[faults]`` (in-process runs): clients 0 .. adversaries - 1 misbehave in every round they are sampled."""

    adversaries: int = setting(0, "how many clients misbehave (the lowest client ids)")
    attack: str = setting("huge", "what they do (fedseed.faults describes each)", ATTACKS)
    scale: float = setting(1e30, "huge: the factor on every reported value")


FAULT_TAG = 0xFA17
OUT_OF_POOL = 2**32 - 1  # a seed id no pool reaches
F32_MAX = float(np.finfo(np.float32).max)


class Uplink:
    """How a client's reply leaves it: encoded, once, as an honest client sends it."""

    def before_train(self, model: LocalModel) -> None:
        """What happens to the client's copy of the model before it trains (nothing, for an honest one)."""

    def frames(self, reply: Any) -> list[bytes]:
        """The frames sent for ``reply``."""
        return [wire.encode(reply)]


HONEST = Uplink()


class Adversary(Uplink):
    """A hostile client's uplink: ``faults.attack`` applied to every honest reply (and, for drift, to its copy)."""

    def __init__(self, faults: FaultsSection, seed: int):
        self.attack, self.scale, self.seed = faults.attack, faults.scale, seed

    def before_train(self, model: LocalModel) -> None:
        if self.attack == "drift":
            drift_(model)

    def frames(self, reply: Any) -> list[bytes]:
        frame = wire.encode(reply)
        if self.attack == "drift":
            return [frame]
        if self.attack == "truncated":
            return [frame[: len(frame) // 2]]
        if self.attack == "random-bytes":
            return [np.random.default_rng([self.seed, reply.round, reply.client, FAULT_TAG]).bytes(len(frame))]
        if self.attack == "duplicate":
            return [frame, frame]
        if self.attack == "nan":
            return [_with_nan(reply, frame)]
        return [wire.encode(_lie(self.attack, reply, self.scale))]


def uplinks(faults: FaultsSection, seed: int) -> Callable[[int], Uplink]:
    """Each client's uplink under ``[faults]``: the ``adversaries`` lowest client ids attack, the rest are honest."""
    adversary = Adversary(faults, seed)
    return lambda client: adversary if client < faults.adversaries else HONEST


def _payload(reply: Any) -> list[str]:
    """The float-array fields of a reply: what it reports."""
    return [name for name, kind in wire.fields(type(reply)) if kind == "f32[]"]


def _lie(attack: str, reply: Any, scale: float) -> Any:
    change: dict[str, Any] = {}
    if attack in ("huge", "sign-flip"):
        factor = scale if attack == "huge" else -1.0
        change = {n: np.clip(getattr(reply, n).astype(np.float64) * factor, -F32_MAX, F32_MAX) for n in _payload(reply)}
    elif attack == "out-of-pool":
        change = _out_of_pool(reply)
    elif attack == "stale-round":
        change = {"round": reply.round - 1}
    elif attack == "wrong-client":
        change = {"client": reply.client + 1}
    elif attack == "inflate-examples":
        change = {"num_examples": 2**32 - 1}
    else:
        raise ValueError(f"`faults.attack` {attack!r} does not change a reply")
    return dataclasses.replace(reply, **change)


def _out_of_pool(reply: Any) -> dict[str, Any]:
    ids = getattr(reply, "seed_ids", None)
    if ids is not None and ids.size:  # the last id moved past any pool, keeping the ids ascending
        return {"seed_ids": np.concatenate([ids[:-1], [OUT_OF_POOL]])}
    [name, *_] = _payload(reply)  # one value more than the model (or the bases) have
    return {name: np.append(getattr(reply, name), np.float32(0.5))}


def _with_nan(reply: Any, frame: bytes) -> bytes:
    """``frame`` with a NaN written over the first reported value (or the loss): the encoder refuses to write one."""
    spans = wire.layout(reply)
    filled = [n for n in _payload(reply) if getattr(reply, n).size]
    at = spans[filled[0] if filled else "loss"][1]  # the first value
    return frame[:at] + struct.pack("<f", float("nan")) + frame[at + 4 :]


def drift_(model: LocalModel) -> None:
    """Scale every trainable weight by ``1 + 2^-10``, keeping ``model.position``: a copy that is no longer what it claims."""
    for _, p in model.trainable:
        p.detach().mul_(1 + 2**-10)
