"""Zeroth-order steps without in-place perturbation, and base weights read back from disk.

A client holds one copy of the weights: ``w0`` stays in the model's safetensors
files (or a copy fedseed writes once), a rebuild reads it back group by group,
and a zeroth-order step never perturbs the weights in place, so a 16-bit client
with ``lr = 0`` ends its round bitwise where it started.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conftest import STORIES
from fedseed.algorithms import zeroth_order
from fedseed.algorithms.fedkseed import FedKSeed, FedKSeedConfig
from fedseed.algorithms.zeroth_order import MIN_POINT_BYTES, Perturbation, hook_points
from fedseed.base_weights import BaseWeightsError
from fedseed.models import LocalModel, load_model


def _batch(seed: int = 0, length: int = 48) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 512, (1, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _weights(model: LocalModel) -> list[torch.Tensor]:
    return [p.detach().clone() for _, p in model.trainable]


class Stream:
    """The same few batches over and over, as a client's BatchStream would give."""

    num_examples = 4

    def __init__(self) -> None:
        self.k = 0

    def __next__(self) -> dict[str, torch.Tensor]:
        self.k += 1
        return _batch(self.k % 4)


def test_base_weights_are_the_model_files_when_they_hold_the_loaded_bytes(tmp_path):
    module, _ = load_model(str(STORIES))
    model = LocalModel.wrap(module, str(STORIES), cache_dir=tmp_path)
    assert model.base.own_files == [] and not list(tmp_path.iterdir())  # nothing written, nothing copied
    assert {s.file.name for s in model.base.sources} == {"model.safetensors"}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_converted_weights_get_one_copy_written_once(tmp_path, dtype):
    module, _ = load_model(str(STORIES), dtype=dtype)  # the file is float32: its bytes are not the loaded ones
    model = LocalModel.wrap(module, str(STORIES), cache_dir=tmp_path)
    [part] = model.base.own_files
    assert part.parent == tmp_path
    again = LocalModel.wrap(load_model(str(STORIES), dtype=dtype)[0], str(STORIES), cache_dir=tmp_path)
    assert again.base.own_files == [part]  # the same digest: reused, not rewritten
    with model.base.read(range(len(model.trainable))) as w0:
        assert all(torch.equal(p, w) for (_, p), w in zip(model.trainable, w0))


def test_a_vanished_base_file_is_named(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(STORIES, folder)
    model = LocalModel.wrap(load_model(str(folder))[0], str(folder), cache_dir=tmp_path / "cache")
    (folder / "model.safetensors").unlink()
    with pytest.raises(BaseWeightsError, match="model.safetensors"):
        model.reset_()


def test_rebuild_is_w0_plus_the_directions_read_from_disk(tmp_path):
    model = LocalModel.wrap(load_model(str(STORIES))[0], str(STORIES), cache_dir=tmp_path)
    with torch.no_grad():
        for _, p in model.trainable:
            p.mul_(3.0)  # a dirty copy: the rebuild must not start from it
    model.rebuild_("rademacher", [7, 8], [1e-3, -2e-3])
    space = model.directions("rademacher")
    z7, z8 = space.materialize(7), space.materialize(8)
    with model.base.read(range(len(model.trainable))) as w0:
        for (_, p), w, a, b in zip(model.trainable, w0, z7, z8):
            assert torch.equal(p, w + (np.float32(1e-3) * a + np.float32(-2e-3) * b))  # float32 sum, added once


def test_perturbed_forward_equals_the_in_place_perturbed_model(tmp_path):
    """float32: ``w + eps z`` through the hooks is bit for bit the in-place ``w + eps z``."""
    model = LocalModel.wrap(load_model(str(STORIES))[0], str(STORIES), cache_dir=tmp_path)
    batch = _batch()
    with Perturbation(model, "rademacher") as zo:
        plus, minus = zo.two_point(batch, 99, 1e-2)
    space = model.directions("rademacher")
    with torch.no_grad():
        space.add_([99], [1e-2])
        assert float(model.loss(batch)) == plus
        model.reset_()
        space.add_([99], [-1e-2])
        assert float(model.loss(batch)) == minus


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_16bit_client_round_with_lr_zero_leaves_every_weight_bitwise(tmp_path, dtype):
    model = LocalModel.wrap(load_model(str(STORIES), dtype=dtype)[0], str(STORIES), cache_dir=tmp_path)
    algo = FedKSeed(FedKSeedConfig(num_seeds=64, local_steps=25, lr=0.0, eps=1e-3), seed=3)
    start = _weights(model)
    reply = algo.train(model, Stream(), algo.task(1, 0))
    assert reply.steps == 25 and reply.skipped == 0 and np.abs(reply.values).max() > 0  # it measured gradients
    assert all(torch.equal(a, b) for a, b in zip(start, _weights(model)))  # and moved nothing
    # the in-place scheme this replaced: +eps, -2eps, +eps on the same weights does not come back in 16 bits
    space = model.directions("rademacher")
    for k in range(25):
        space.add_([k], [1e-3])
        space.add_([k], [-2e-3])
        space.add_([k], [1e-3])
    assert not all(torch.equal(a, b) for a, b in zip(start, _weights(model)))


def test_a_bf16_update_far_below_the_spacing_survives_in_expectation(tmp_path):
    """Stochastic rounding of the deferred update: lr * g * z of 1e-5 moves bf16 weights of ~0.02 on average."""
    model = LocalModel.wrap(load_model(str(STORIES), dtype="bfloat16")[0], str(STORIES), cache_dir=tmp_path)
    start = _weights(model)
    with Perturbation(model, "rademacher") as zo:
        zo.defer([5], [2e-5])
    moved = torch.cat([(p.detach().float() - s.float()).reshape(-1) for (_, p), s in zip(model.trainable, start)])
    z = torch.cat([t.reshape(-1) for t in model.directions("rademacher").materialize(5)])
    assert (moved != 0).float().mean() > 0.01  # nearest rounding would move (almost) nothing
    assert abs(float((moved * z).mean()) - 2e-5) < 1e-5  # and on average by the update


def test_hook_points_bound_the_scratch_buffer():
    module, _ = load_model(str(STORIES))
    named = [(n, p) for n, p in module.named_parameters()]
    index = {id(p): j for j, (_, p) in enumerate(named)}
    whole = hook_points(module, index, MIN_POINT_BYTES)
    assert len(whole) == 1 and whole[0].module is module  # a small model: one point, one kernel call per forward
    fine = hook_points(module, index, 20_000)  # bytes: forces points below the decoder layers
    covered = sorted({j for pt in fine for j in pt.rows})
    assert covered == list(range(len(named)))  # every parameter is perturbed somewhere
    assert len(fine) > 10


def test_a_point_may_hold_as_much_as_the_largest_parameter(monkeypatch):
    """The largest parameter needs a scratch that size anyway: points as large cost no memory and save kernel calls."""
    monkeypatch.setattr(zeroth_order, "MIN_POINT_BYTES", 1)  # only the largest parameter bounds the points
    monkeypatch.setattr(zeroth_order, "POINT_FRACTION", 1 << 40)
    module, _ = load_model(str(STORIES))
    model = LocalModel.wrap(module)
    largest = max(p.numel() * p.element_size() for _, p in model.trainable)
    index = {id(p): j for j, (_, p) in enumerate(model.trainable)}
    zo = Perturbation(model, "rademacher")
    assert zo.scratch_bytes <= largest + zeroth_order.ALIGN  # no more scratch than the largest parameter's
    assert len(zo.points) == len(hook_points(module, index, largest)) < len(hook_points(module, index, 1))
