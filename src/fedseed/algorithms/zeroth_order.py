"""Two-point zeroth-order estimates that never perturb the weights in place.

A zeroth-order step estimates ``g = (L(w + eps z) - L(w - eps z)) / 2eps`` and moves
``w -= lr g z``. Done in place (``+eps z``, ``-2eps z``, ``+eps z - lr g z``) it costs
three passes over the weights, and in bfloat16 or float16 it does not even come
back: each perturbation is rounded, so every step leaves a rounding random walk
far larger than the update (MeZO users report fp16 runs collapsing from it).

:class:`Perturbation` instead lets each module see its perturbed weights only
during its own forward. A forward pre-hook writes ``w + eps z`` of the module's
parameters into a scratch buffer and points the parameters at it; a forward hook
points them back. The weights themselves change only by the update, which is
deferred into the next step's first forward, where one kernel pass reads ``w``
once, writes the updated ``w`` and the perturbed copy (``DirectionSpace.perturb_into``).
A step is two forwards and two passes over the weights; nothing is ever restored,
so a 16-bit weight is exactly what the updates made it. Updates of 16-bit weights
are rounded stochastically (bits drawn from the call's seeds and coefficients, so
replays match), which keeps an update far below the weights' spacing right in
expectation; the next sync rebuilds the exact global model from ``w0`` anyway.

Hook points are the largest subtrees of the module tree whose parameters fit
``max(total / 32, 32 MiB, the largest parameter)``: the whole model when it is
small (one kernel call per forward), single layers or matrices when it is large,
so the scratch buffer is a few percent of the weights at most. The largest
parameter needs a scratch its size anyway, and a point as large costs no more:
at 1.1B (a 262 MB embedding in float32) a decoder layer is then one point, not
four to six, and a step makes 50 kernel calls instead of 270, each of which costs
0.3-0.5 ms beside the forward whatever its size. The 32 MiB floor does the same for
models of a few hundred million weights: at 260M (20 decoder layers of 26 MB in
bfloat16) 16 MiB split each layer into six points, two of them norms of 1,024
weights, 246 kernel calls a step where 46 do. A module above the bound that owns
parameters itself gets a point for those alone; such points nest with the points
below them, which is why scratch is laid out as a stack. The one assumption: a
parameter is read only inside the forward of a module that owns it (true of
``transformers``' layers: linear, embedding, norms). A parameter no forward used
gets its update all the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedseed.directions import DirectionSpace
from fedseed.models import LocalModel
from fedseed.privacy import ExampleNoise

MIN_POINT_BYTES = 32 << 20
POINT_FRACTION = 32  # a hook point holds at most 1/32 of the weights (or MIN_POINT_BYTES, or the largest parameter)
ALIGN = 64  # bytes: scratch views start on cache lines


def _nbytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


@dataclass
class Point:
    """A module whose forward sees the perturbed copy of ``rows`` (indices into ``model.trainable``)."""

    module: nn.Module
    rows: list[int]
    offset: int  # bytes into the scratch buffer (a stack: nested points lie above their ancestors)
    space: DirectionSpace | None = None  # the directions over ``rows``
    params: list[nn.Parameter] = field(default_factory=list)
    views: list[torch.Tensor] = field(default_factory=list)  # each parameter's place in the scratch buffer
    saved: list[torch.Tensor] = field(default_factory=list)  # each parameter's own data while it points at scratch


def hook_points(module: nn.Module, index: dict[int, int], budget: int) -> list[Point]:
    """The largest subtrees of at most ``budget`` parameter bytes, and direct-parameter points above them."""
    points: list[Point] = []

    def subtree_bytes(m: nn.Module) -> int:
        return sum(_nbytes(p) for p in m.parameters() if id(p) in index)

    def own_rows(m: nn.Module, recurse: bool) -> list[int]:
        rows = [index[id(p)] for p in m.parameters(recurse=recurse) if id(p) in index]
        return list(dict.fromkeys(rows))  # a parameter twice in one subtree (tied) is perturbed once there

    def size(rows: list[int]) -> int:
        return sum((_nbytes(p) + ALIGN - 1) // ALIGN * ALIGN for p in (trainable[j] for j in rows))

    def visit(m: nn.Module, offset: int) -> None:
        if subtree_bytes(m) <= budget:
            rows = own_rows(m, recurse=True)
            if rows:
                points.append(Point(m, rows, offset))
            return
        rows = own_rows(m, recurse=False)
        if rows:
            points.append(Point(m, rows, offset))
            offset += size(rows)
        for child in m.children():
            visit(child, offset)

    trainable = {j: p for p in module.parameters() if id(p) in index for j in [index[id(p)]]}
    visit(module, 0)
    return points


class Perturbation:
    """Zeroth-order two-point estimates on ``model``, the weights moved only by :meth:`defer`-ed updates.

    Use as a context manager: the hooks exist inside it, and leaving it applies
    the last deferred update.
    """

    def __init__(self, model: LocalModel, distribution: str, precision: str = "stochastic"):
        self.model = model
        self.space = model.directions(distribution, precision)
        index = {id(p): j for j, (_, p) in enumerate(model.trainable)}
        sizes = [_nbytes(p) for _, p in model.trainable]
        self.points = hook_points(model.module, index, max(sum(sizes) // POINT_FRACTION, MIN_POINT_BYTES, max(sizes)))
        self._layout()
        self.pending: tuple[list[int], list[float]] = ([], [])  # the update not yet in the weights
        self.applied: set[int] = set()  # rows the pending update already reached in this forward
        self.perturbation: tuple[list[int], list[float]] | None = None  # what this forward adds
        self._handles: list = []

    def _layout(self) -> None:
        """One scratch buffer per device, each point's views at its stack offset."""
        params = [p for _, p in self.model.trainable]
        ends: dict[torch.device, int] = {}
        for point in self.points:
            offset = point.offset
            for j in point.rows:
                device = params[j].device
                ends[device] = max(ends.get(device, 0), offset + _nbytes(params[j]))
                offset += (_nbytes(params[j]) + ALIGN - 1) // ALIGN * ALIGN
        self.scratch = {device: torch.empty(end, dtype=torch.uint8, device=device) for device, end in ends.items()}
        for point in self.points:
            offset = point.offset
            for j in point.rows:
                p = params[j]
                point.views.append(self.scratch[p.device][offset: offset + _nbytes(p)].view(p.dtype).view(p.shape))
                offset += (_nbytes(p) + ALIGN - 1) // ALIGN * ALIGN
            point.space = self.space.subset(point.rows)
            point.params = [params[j] for j in point.rows]

    @property
    def scratch_bytes(self) -> int:
        return sum(b.numel() for b in self.scratch.values())

    # -- the hooks ---------------------------------------------------------------------
    def _before(self, point: Point) -> None:
        if self.perturbation is None:  # a forward outside two_point (none happens while attached)
            return
        seeds, coeffs = self.perturbation
        todo = [j for j in point.rows if j not in self.applied]
        update = self.pending if todo == point.rows else None
        if todo and update is None:  # a tied parameter updated by an earlier point: update the rest first
            self.space.subset(todo).add_(*self.pending)
        assert point.space is not None
        point.space.perturb_into(point.views, seeds, coeffs, update=update)
        self.applied.update(point.rows)
        point.saved = [p.data for p in point.params]
        for p, view in zip(point.params, point.views):
            p.data = view

    @staticmethod
    def _after(point: Point) -> None:
        for p, data in zip(point.params, point.saved):
            p.data = data
        point.saved = []

    def __enter__(self) -> "Perturbation":
        for point in self.points:
            self._handles.append(point.module.register_forward_pre_hook(lambda m, args, pt=point: self._before(pt)))
            self._handles.append(point.module.register_forward_hook(lambda m, args, out, pt=point: self._after(pt)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for point in self.points:  # a forward that raised may have left parameters pointing at scratch
            if point.saved:
                self._after(point)
        self.flush()

    # -- steps -------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor], seeds: Sequence[int], coeffs: Sequence[float]) -> float:
        """The loss at ``w + sum_k coeffs[k] D(seeds[k])``; the first call after :meth:`defer` also applies it."""
        return float(self._forward(self.model.loss, batch, seeds, coeffs))

    def two_point(self, batch: dict[str, torch.Tensor], seed: int, eps: float) -> tuple[float, float]:
        """``(L(w + eps z), L(w - eps z))`` on one batch, with ``z = D(seed)``."""
        return self.loss(batch, [seed], [eps]), self.loss(batch, [seed], [-eps])

    def example_two_point(self, batch: dict[str, torch.Tensor], seed: int,
                          eps: float) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`two_point` per example: two (B,) arrays."""
        plus, minus = (self._forward(self.model.example_losses, batch, [seed], [e]) for e in (eps, -eps))
        return plus.cpu().numpy().astype(np.float64), minus.cpu().numpy().astype(np.float64)

    @torch.no_grad()
    def _forward(self, loss: Callable[[dict[str, torch.Tensor]], torch.Tensor], batch: dict[str, torch.Tensor],
                 seeds: Sequence[int], coeffs: Sequence[float]) -> torch.Tensor:
        self.perturbation = (list(seeds), list(coeffs))
        self.applied = set()
        try:
            value = loss(batch)
        finally:
            self.perturbation = None
        rest = [j for j in range(len(self.model.trainable)) if j not in self.applied]
        if rest and self.pending[0]:  # parameters no hooked forward read still take the update
            self.space.subset(rest).add_(*self.pending)
        self.pending = ([], [])
        return value

    def defer(self, seeds: Sequence[int], coeffs: Sequence[float]) -> None:
        """``w += sum_k coeffs[k] D(seeds[k])``, applied by the next forward's kernels (or on leaving)."""
        if self.pending[0]:
            self.flush()
        self.pending = (list(seeds), list(coeffs))

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the deferred update now (one pass)."""
        if self.pending[0]:
            self.space.add_(*self.pending)
        self.pending = ([], [])


Batch = dict[str, torch.Tensor]
Estimator = Callable[[Perturbation, Batch, int, float], tuple[float, float, float]]


def estimator(noise: ExampleNoise | None, round: int, client: int, num_examples: int) -> Estimator:
    """A step's ``(g, L(w + eps z), L(w - eps z))`` on one batch, for one client's round.

    Plain: the batch's two-point difference. With example-level privacy: each
    example's own difference, clipped and noised (``fedseed.privacy``).
    """
    if noise is None:
        def plain(zo: Perturbation, batch: Batch, seed: int, eps: float) -> tuple[float, float, float]:
            plus, minus = zo.two_point(batch, seed, eps)
            return (plus - minus) / (2 * eps), plus, minus
        return plain
    sigma = noise.sigma_for(client, num_examples)
    stream = noise.stream(round, client)

    def private(zo: Perturbation, batch: Batch, seed: int, eps: float) -> tuple[float, float, float]:
        plus, minus = zo.example_two_point(batch, seed, eps)
        return noise.scalar((plus - minus) / (2 * eps), sigma, stream), float(plus.mean()), float(minus.mean())
    return private
