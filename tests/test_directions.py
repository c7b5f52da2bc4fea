"""Tests for fedseed.directions: fused CPU kernels against the numpy reference generator.

The reference (``generator.py``) materialises whole directions with numpy; the
kernels must reproduce it bit for bit, for both distributions, every storage
dtype and any thread count; ``perturb_into`` must leave the weights exactly as they were.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numba
import numpy as np
import pytest
import torch

from conftest import STORIES
from fedseed import directions
from fedseed.directions import DirectionSpace, cpu, gaussian_tables, random_matrix, tensor_id
from fedseed.directions.generator import TENSOR_SALT, direction, mix64
from fedseed.directions.precision import lost_fraction, rounding_bits, rounding_keys

MODEL = STORIES
DISTS = ("rademacher", "gaussian")
# Shapes chosen to hit every edge: 0-dim, one element, empty, odd sizes, several work items (CHUNK = 16384).
SHAPES = [(), (1,), (0,), (7,), (3, 5), (33, 1001), (40_003,)]
SEEDS = [0, 1, 2**63 + 5, 2**64 - 1, 12345, 987654321987]


def _reference(base: np.ndarray, name: str, seeds, coeffs, dist: str) -> np.ndarray:
    """``base + sum_k c_k D_k`` exactly as specified: float32 sum in seed order, added once."""
    acc = np.zeros(base.size, dtype=np.float32)
    for s, c in zip(seeds, coeffs):
        acc = acc + np.float32(c) * direction(int(s), tensor_id(name), base.size, dist)
    return (base.reshape(-1).astype(np.float32) + acc).reshape(base.shape)


def _bits(x: torch.Tensor | np.ndarray) -> np.ndarray:
    a = x.detach().numpy() if isinstance(x, torch.Tensor) else x
    return np.ascontiguousarray(a).view(np.uint32 if a.dtype == np.float32 else np.uint16)


def _named(shapes, gen: torch.Generator, dtype=torch.float32):
    return [(f"layer{i}.weight", torch.randn(s, generator=gen).to(dtype)) for i, s in enumerate(shapes)]


@pytest.mark.parametrize("dist", DISTS)
def test_fused_add_in_place_matches_reference_bitwise(dist):
    gen = torch.Generator().manual_seed(0)
    named = _named(SHAPES, gen)
    before = [t.clone() for _, t in named]
    coeffs = [0.5, -1.25, 3e-3, 7.0, -2e-6, 0.1]
    DirectionSpace(named, dist).add_(SEEDS, coeffs)
    for (name, t), b in zip(named, before):
        assert np.array_equal(_bits(t), _bits(_reference(b.numpy(), name, SEEDS, coeffs, dist))), name


@pytest.mark.parametrize("dist", DISTS)
def test_fused_add_with_base_matches_reference_and_leaves_base(dist):
    gen = torch.Generator().manual_seed(1)
    named = _named(SHAPES, gen)
    base = [torch.randn(t.shape, generator=gen) for _, t in named]
    base_copy = [b.clone() for b in base]
    seeds = np.arange(40, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # many seeds, order matters
    coeffs = np.linspace(-1, 1, 40).astype(np.float32)
    DirectionSpace(named, dist).add_(seeds, coeffs, base=base)
    for (name, t), b, b0 in zip(named, base, base_copy):
        assert torch.equal(b, b0)
        assert np.array_equal(_bits(t), _bits(_reference(b.numpy(), name, seeds, coeffs, dist))), name


def test_seed_order_is_the_summation_order():
    w1, w2 = torch.zeros(5000), torch.zeros(5000)
    seeds, coeffs = [5, 6, 7], [1e8, 1.0, -1e8]
    DirectionSpace([("w", w1)], "gaussian").add_(seeds, coeffs)
    DirectionSpace([("w", w2)], "gaussian").add_(seeds[::-1], coeffs[::-1])
    assert np.array_equal(_bits(w1), _bits(_reference(np.zeros(5000, np.float32), "w", seeds, coeffs, "gaussian")))
    assert not torch.equal(w1, w2)  # float32 sums are not associative: callers fix the order


@pytest.mark.parametrize("dist", DISTS)
def test_results_do_not_depend_on_threads(dist, monkeypatch):
    """Serial kernel, parallel kernel on 1 thread, parallel kernel on 2 threads: the same bits."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has a single thread")
    results = []
    for serial_below, threads in ((1 << 62, 1), (0, 1), (0, 2)):
        monkeypatch.setattr(directions, "_SERIAL_WORK", serial_below)
        numba.set_num_threads(threads)
        try:
            named = _named([(70_001,), (129, 257), (3,)], torch.Generator().manual_seed(2))
            space = DirectionSpace(named, dist)
            space.add_([11, 12, 13], [0.3, -0.7, 1.1])
            results.append(([t.clone() for _, t in named], space.project(list(range(19)))))
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for tensors, projection in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(tensors, results[0][0]))
        assert np.array_equal(projection, results[0][1])


LAYER_PROBE = textwrap.dedent("""
    import numba, torch
    from fedseed.directions import DirectionSpace
    torch.set_num_threads(1)
    a, b = torch.randn(257, 4099, generator=torch.Generator().manual_seed(0)), torch.randn(4099, 513)
    before = (a @ b).sum().item()
    DirectionSpace([("w", torch.zeros(1 << 22))]).add_([1, 2], [0.5, -0.5])  # parallel: 8M generated elements
    print(numba.threading_layer(), torch.get_num_threads(), before == (a @ b).sum().item())
""")


@pytest.mark.parametrize("env,layers", [
    ({}, ("omp", "workqueue")),  # the OpenMP layer wherever it loads
    ({"NUMBA_THREADING_LAYER": "omp"}, ("omp",)),
    ({"NUMBA_THREADING_LAYER": "workqueue"}, ("workqueue",)),
    ({"NUMBA_THREADING_LAYER_PRIORITY": "workqueue omp tbb"}, ("workqueue",)),  # a user's order stands
], ids=["default", "omp", "workqueue", "priority"])
def test_a_parallel_kernel_leaves_torch_on_its_thread_count(env, layers):
    """numba's OpenMP layer sets the caller's OpenMP thread count, which torch reads: it must be put back.

    Otherwise a run pinned to one torch thread reduces with two after its first kernel
    call, and its ledger differs from a replay of it in a fresh process.
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING_LAYER")}
    out = subprocess.run([sys.executable, "-c", LAYER_PROBE], capture_output=True, text=True, env={**base, **env},
                         timeout=300)
    if layers == ("omp",) and "No threading layer could be loaded" in out.stderr:
        pytest.skip("numba's OpenMP layer is not available here")
    assert out.returncode == 0, out.stderr
    used, threads, same = out.stdout.split()
    assert used in layers
    assert (threads, same) == ("1", "True")


FEATURES_PROBE = "import numba, fedseed.directions.cpu; print(numba.config.CPU_FEATURES)"


@pytest.mark.parametrize("env", [{}, {"NUMBA_CPU_FEATURES": "+sse2"}, {"NUMBA_CPU_NAME": "generic"}],
                         ids=["default", "user-features", "user-cpu"])
def test_kernels_compile_for_the_hosts_full_vector_width_unless_the_user_says_otherwise(env):
    """On x86 with AVX-512 numba gets the host's features without LLVM's 256-bit preference; a user's target stands."""
    import llvmlite.binding as binding

    base = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_FEATURES", "NUMBA_CPU_NAME")}
    out = subprocess.run([sys.executable, "-c", FEATURES_PROBE], capture_output=True, text=True, env={**base, **env},
                         timeout=120)
    assert out.returncode == 0, out.stderr
    features = out.stdout.strip()
    if env.get("NUMBA_CPU_FEATURES"):
        assert features == "+sse2"
    elif env:
        assert features == ""  # numba's own default for a generic CPU
    elif platform.machine().lower() in ("x86_64", "amd64") and binding.get_host_cpu_features().get("avx512f"):
        assert features == binding.get_host_cpu_features().flatten() + ",-prefer-256-bit"
    else:
        assert features == "None"


@pytest.mark.parametrize("dist", DISTS)
def test_project_equals_dot_with_materialized_directions(dist):
    gen = torch.Generator().manual_seed(3)
    named = _named([(200_001,), (64, 65), (), (1,)], gen)
    space = DirectionSpace(named, dist)
    seeds = [4, 5, 2**63 + 1]
    got = space.project(seeds)
    want = [sum(float((d.double() * t.double()).sum()) for d, t in zip(space.materialize(s), space.tensors)) for s in seeds]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert space.project([]).shape == (0,)


def test_project_reads_16bit_tensors_exactly():
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.bfloat16, torch.float16):
        t16 = torch.randn(30_001, generator=gen).to(dtype)
        got = DirectionSpace([("d", t16)], "gaussian").project([9, 10])
        want = DirectionSpace([("d", t16.float())], "gaussian").project([9, 10])
        assert np.array_equal(got, want)


def test_materialize_and_random_matrix_match_reference():
    space = DirectionSpace([("a", torch.zeros(3, 4)), ("b", torch.zeros(1001))], "gaussian")
    for d, name, n in zip(space.materialize(77), ("a", "b"), (12, 1001)):
        np.testing.assert_array_equal(d.reshape(-1).numpy(), direction(77, tensor_id(name), n, "gaussian"))
    m = random_matrix(5, "P.layer0", (16, 8))
    np.testing.assert_array_equal(m.reshape(-1).numpy(), direction(5, tensor_id("P.layer0|(16, 8)"), 128, "gaussian"))
    assert torch.equal(random_matrix(5, "P.layer0", torch.Size([16, 8])), m)  # shape spelling does not matter


def test_direction_of_a_tensor_depends_on_its_name_only():
    a, b, c = torch.zeros(1000), torch.zeros(300), torch.zeros(1000)
    DirectionSpace([("x.weight", a), ("y.bias", b)], "rademacher").add_([42], [1.0])
    DirectionSpace([("z.other", torch.zeros(10)), ("x.weight", c)], "rademacher").add_([42], [1.0])
    assert torch.equal(a, c)  # not the position, not the neighbours
    assert not torch.equal(a[:300], b)
    with pytest.raises(ValueError, match="distinct"):
        DirectionSpace([("x", a), ("x", b)])


def test_gaussian_moments_and_rademacher_balance():
    n = 2_000_000
    z = DirectionSpace([("big", torch.zeros(n))], "gaussian").materialize(2024)[0].double()
    assert abs(float(z.mean())) < 5 / n**0.5
    assert abs(float(z.var()) - 1) < 0.01
    assert abs(float(((z - z.mean()) ** 4).mean() / z.var() ** 2) - 3) < 0.03  # kurtosis of a normal
    assert abs(float((z.abs() < 1).double().mean()) - 0.6827) < 0.002
    r = DirectionSpace([("big", torch.zeros(n))], "rademacher").materialize(2024)[0]
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(r.double().mean())) < 5 / n**0.5
    # Neighbouring seeds and neighbouring tensors give uncorrelated directions.
    r2 = DirectionSpace([("big", torch.zeros(n))], "rademacher").materialize(2025)[0]
    assert abs(float((r * r2).double().mean())) < 5 / n**0.5


@numba.njit(parallel=True)
def _fast_path_errors(err_s, err_c):
    for m in numba.prange(1 << 24):
        x1, x2 = np.uint64(m) << np.uint64(40), np.uint64(m) << np.uint64(16)
        exact_s = np.sqrt(-2.0 * cpu.log_u1(x1))
        err_s[m] = abs(cpu.sqrt_m2log_fast(x1) - exact_s) / exact_s if exact_s != 0 else abs(cpu.sqrt_m2log_fast(x1))
        exact_c = cpu.cos_u2(x2)
        err_c[m] = abs(cpu.cos_fast(x2) - exact_c) / abs(exact_c)


def test_gaussian_fast_path_error_is_bounded_on_every_input():
    """The fast path may only decide a float32 value when it provably rounds like the exact path.

    Both factors take 2^24 inputs each; the bound over all of them, plus the two
    float64 product roundings, must stay well inside ``FAST_MARGIN``.
    """
    err_s, err_c = np.empty(1 << 24), np.empty(1 << 24)
    _fast_path_errors(err_s, err_c)
    bound = err_s.max() + err_c.max() + err_s.max() * err_c.max() + 2.0**-52
    assert bound * 16 < gaussian_tables.FAST_MARGIN
    x = np.concatenate([_doubtful(30), np.random.default_rng(0).integers(0, 2**64 - 1, 200_000, dtype=np.uint64)])
    fast, exact = _gaussians_both(x)
    assert np.array_equal(fast.view(np.uint32), exact.view(np.uint32))


@numba.njit
def _doubtful(count):
    """Stream positions ``p`` whose raw output ``mix64(p)`` the fast path leaves to the exact path."""
    found, i, n = np.empty(count, dtype=np.uint64), 0, 0
    while n < count:
        p = np.uint64(i) * np.uint64(0x9E3779B97F4A7C15)
        if cpu.gaussian_fast(cpu.mix64(p))[1]:
            found[n] = p
            n += 1
        i += 1
    return found


@numba.njit
def _gaussians_both(p):
    """The kernels' Gaussians of positions ``p`` (key 0), and the exact path's."""
    fast, exact = np.empty(p.size, dtype=np.float32), np.empty(p.size, dtype=np.float32)
    cpu.gaussians(fast, p, p.size, np.uint64(0), np.empty(p.size, dtype=np.bool_))
    for i in range(p.size):
        exact[i] = cpu.gaussian(cpu.mix64(p[i]))
    return fast, exact


def test_exact_gaussian_path_agrees_with_the_math_libraries():
    """log and cos are correctly rounded on nearly every input: numpy's own SIMD log is the outlier."""
    m = np.arange(1 << 24, dtype=np.uint64)
    logs, coss = np.empty(1 << 24), np.empty(1 << 24)
    _exact_parts(m, logs, coss)
    u1 = (m + np.uint64(1)).astype(np.float64) * 2.0**-24
    u2 = m.astype(np.float64) * 2.0**-24
    assert np.mean(logs != np.log(u1)) < 0.006
    assert np.mean(coss != np.cos(2.0 * np.pi * u2)) < 0.003
    assert np.max(np.abs(logs - np.log(u1)) / np.spacing(np.abs(np.log(u1)) + 1e-300)) <= 1.0
    assert np.max(np.abs(coss - np.cos(2.0 * np.pi * u2)) / np.spacing(np.abs(np.cos(2.0 * np.pi * u2)))) <= 1.0


@numba.njit(parallel=True)
def _exact_parts(m, logs, coss):
    for i in numba.prange(m.size):
        logs[i] = cpu.log_u1(m[i] << np.uint64(40))
        coss[i] = cpu.cos_u2(m[i] << np.uint64(16))


# -- 16-bit storage ---------------------------------------------------------------------
@numba.njit
def _convert_all(h, kind):
    out = np.empty(h.size, dtype=np.float32)
    for i in range(h.size):
        out[i] = cpu.bf16_to_f32(h[i]) if kind == 1 else cpu.f16_to_f32(h[i])
    return out


@numba.njit
def _round_all(x, kind):
    out = np.empty(x.size, dtype=np.uint16)
    for i in range(x.size):
        out[i] = cpu.f32_to_bf16(x[i]) if kind == 1 else cpu.f32_to_f16(x[i])
    return out


@pytest.mark.parametrize("dtype,kind", [(torch.bfloat16, cpu.BF16), (torch.float16, cpu.F16)])
def test_16bit_conversions_match_torch(dtype, kind):
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    want = torch.from_numpy(every.view(np.int16)).view(dtype).float().numpy()
    got = _convert_all(every, kind)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(got[~np.isnan(got)].view(np.uint32), want[~np.isnan(want)].view(np.uint32))
    rng = np.random.default_rng(0)
    bits = np.concatenate([rng.integers(0, 1 << 32, 2_000_000, dtype=np.uint64).astype(np.uint32),
                           np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x477FEFFF, 0x477FF000, 0x387FFFFF,
                                     0x38800000, 0x33000000, 0x33000001, 0x7F7FFFFF], dtype=np.uint32)])
    x = bits.view(np.float32)
    want16 = torch.from_numpy(x).to(dtype).view(torch.int16).numpy().view(np.uint16)
    got16 = _round_all(x, kind)
    finite = ~np.isnan(x)
    assert np.array_equal(got16[finite], want16[finite])
    back = torch.from_numpy(got16[~finite].view(np.int16)).view(dtype)
    assert bool(torch.isnan(back).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dist", DISTS)
def test_16bit_tensors_round_once_to_nearest(dtype, dist):
    gen = torch.Generator().manual_seed(5)
    named = _named([(50_001,), (5,), ()], gen, dtype)
    before = [t.float() for _, t in named]
    DirectionSpace(named, dist, precision="nearest").add_([3, 4], [0.01, -0.02])
    for (name, t), b in zip(named, before):
        want = torch.from_numpy(_reference(b.numpy(), name, [3, 4], [0.01, -0.02], dist)).to(dtype)
        assert t.dtype == dtype and torch.equal(t, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dist", DISTS)
def test_perturb_into_writes_the_perturbed_copy_and_leaves_the_weights(dtype, dist):
    gen = torch.Generator().manual_seed(8)
    named = _named([(40_003,), (40_002,), (3, 5), ()], gen, dtype)  # odd and even: bf16's paired loop too
    before = [t.clone() for _, t in named]
    out = [torch.empty_like(t) for _, t in named]
    DirectionSpace(named, dist).perturb_into(out, [11, 12], [5e-3, -2e-3])
    for (name, t), b, o in zip(named, before, out):
        assert torch.equal(t, b)  # the weights never move
        want = torch.from_numpy(_reference(b.float().numpy(), name, [11, 12], [5e-3, -2e-3], dist)).to(dtype)
        assert torch.equal(o, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_perturb_into_with_an_update_is_the_update_then_the_perturbation(dtype):
    """One pass: ``w += u`` (stochastically rounded in 16 bits), then ``out = w_stored + p`` rounded to nearest."""
    gen = torch.Generator().manual_seed(9)
    named = _named([(50_001,), (50_000,), (7,)], gen, dtype)
    before = [t.clone() for _, t in named]
    out = [torch.empty_like(t) for _, t in named]
    DirectionSpace(named, "rademacher", "stochastic").perturb_into(out, [21], [1e-3], update=([20], [-4e-4]))
    spacing = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    for (name, t), b, o in zip(named, before, out):
        exact = torch.from_numpy(_reference(b.float().numpy(), name, [20], [-4e-4], "rademacher"))
        assert bool(((t.float() - exact).abs() <= exact.abs() * spacing + 1e-12).all())  # one of its neighbours
        want = torch.from_numpy(_reference(t.float().numpy(), name, [21], [1e-3], "rademacher")).to(dtype)
        assert torch.equal(o, want)  # the perturbation starts from the updated weights as stored
    if dtype != torch.float32:
        rounded_up = sum(int((t.float() > torch.from_numpy(_reference(b.float().numpy(), n, [20], [-4e-4],
                                                                        "rademacher"))).sum())
                         for (n, t), b in zip(named, before))
        assert 0 < rounded_up < 100_008  # stochastic: some up, some down


def _stochastic_spec(exact: np.ndarray, r: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """16-bit bits of float32 ``exact`` rounded stochastically with the 16-bit fields ``r`` (finite inputs)."""
    b = exact.view(np.uint32).astype(np.uint64)
    if dtype == torch.bfloat16:
        return ((b + r) >> np.uint64(16)).astype(np.uint16)
    sign = (b >> np.uint64(16)) & np.uint64(0x8000)
    a = b & np.uint64(0x7FFFFFFF)
    normal = np.minimum((a + (r & np.uint64(0x1FFF)) - np.uint64(0x38000000)) >> np.uint64(13), np.uint64(0x7C00))
    tiny = (np.abs(exact).astype(np.float64) * 2.0**24 + r.astype(np.float64) * 2.0**-16).astype(np.uint64)
    return (np.where(a < np.uint64(0x38800000), tiny, normal) | sign).astype(np.uint16)


@pytest.mark.parametrize("pert", [[21], [21, 22]])  # one seed: the fused step loop; two: the general path
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_stochastic_16bit_update_rounds_with_the_bits_the_spec_gives(pert, dist, dtype):
    """Element ``i`` rounds with 16 bits of ``rkey``'s stream, four to a hash; ``rkey`` hashes the whole call."""
    gen = torch.Generator().manual_seed(10)
    named = _named([(40_003,), (40_000,), (7,)], gen, dtype)
    named.append(("shifted.weight", torch.randn(40_001, generator=gen).to(dtype)[1:]))  # 2 bytes off a 4-byte word
    for _, t in named[:2]:
        t[:4000] *= 2.0**-20  # float16 subnormals: the rounding's other branch
    before = [t.clone() for _, t in named]
    out = [torch.empty_like(t) for _, t in named]
    coeffs = [5e-3, -1e-3][:len(pert)]
    DirectionSpace(named, dist, "stochastic").perturb_into(out, pert, coeffs, update=([20], [-4e-8]))
    seeds = np.array([20, *pert], dtype=np.uint64)
    tmix = np.array([mix64(tensor_id(n) ^ TENSOR_SALT) for n, _ in named], dtype=np.uint64)
    rkeys = rounding_keys(seeds, np.array([-4e-8, *coeffs], dtype=np.float32), tmix)
    for (name, t), b, o, rkey in zip(named, before, out, rkeys):
        exact = _reference(b.float().numpy(), name, [20], [-4e-8], dist).reshape(-1)
        want = _stochastic_spec(exact, rounding_bits(int(rkey), exact.size), dtype)
        assert np.array_equal(t.view(torch.int16).numpy().view(np.uint16).reshape(-1), want), name
        assert torch.equal(o, torch.from_numpy(_reference(t.float().numpy(), name, pert, coeffs, dist)).to(dtype))
    assert not torch.equal(named[0][1], before[0])  # the update moved some weights


def test_sixteen_bit_zo_steps_restore_exactly_with_perturb_into():
    """In-place +eps, -2eps, +eps walks away from a bf16 weight; the perturbed copy never touches it."""
    gen = torch.Generator().manual_seed(6)
    w = (0.02 * torch.randn(100_000, generator=gen)).to(torch.bfloat16)
    start = w.clone()
    space = DirectionSpace([("w", w)], "rademacher")
    scratch = [torch.empty_like(w)]
    for seed in range(40):
        space.perturb_into(scratch, [seed], [5e-4])
        space.perturb_into(scratch, [seed], [-5e-4])
    assert torch.equal(w, start)
    for seed in range(40):
        space.add_([seed], [5e-4])
        space.add_([seed], [-1e-3])
        space.add_([seed], [5e-4])
    assert not torch.equal(w, start)  # what the in-place scheme leaves behind


def test_naive_bfloat16_storage_loses_most_zo_updates():
    gen = torch.Generator().manual_seed(6)
    w = 0.02 * torch.randn(100_000, generator=gen)
    update = 3e-7 * 50 * torch.randn(100_000, generator=gen).sign()  # lr * g * z with FedKSeed's lr
    assert lost_fraction(w, update, torch.bfloat16) > 0.7
    assert lost_fraction(w, update, torch.float32) == 0.0


def test_stochastic_rounding_is_unbiased_and_deterministic():
    n = 200_000
    w = torch.ones(n, dtype=torch.bfloat16)
    c = 2.0**-7 / 4  # a quarter of the bf16 spacing at 1.0
    DirectionSpace([("w", w)], "rademacher", precision="stochastic").add_([8], [c])
    z = DirectionSpace([("w", torch.zeros(n))], "rademacher").materialize(8)[0]
    moved = w.float() - 1.0
    up = z > 0  # +c rounds to 1 + spacing with probability 1/4, -c to 1 - spacing/2 with probability 1/2
    assert abs(float(moved[up].mean()) - c) < 3e-4 and abs(float(moved[~up].mean()) + c) < 3e-4
    w2 = torch.ones(n, dtype=torch.bfloat16)
    DirectionSpace([("w", w2)], "rademacher", precision="stochastic").add_([8], [c])
    assert torch.equal(w, w2)


def test_other_layouts_and_dtypes_fall_back_correctly():
    gen = torch.Generator().manual_seed(7)
    t = torch.randn(40, 30, generator=gen).t()  # not contiguous
    d = torch.randn(99, generator=gen, dtype=torch.float64)
    want_t = _reference(t.contiguous().numpy(), "t", [1, 2], [0.5, 0.25], "gaussian")
    want_d = _reference(d.float().numpy(), "d", [1, 2], [0.5, 0.25], "gaussian")
    DirectionSpace([("t", t), ("d", d)], "gaussian").add_([1, 2], [0.5, 0.25])
    np.testing.assert_array_equal(t.numpy(), want_t)
    np.testing.assert_array_equal(d.numpy(), want_d.astype(np.float64))


def test_arguments_are_validated():
    w = torch.zeros(4)
    with pytest.raises(ValueError, match="`distribution`"):
        DirectionSpace([("w", w)], "uniform")
    with pytest.raises(ValueError, match="`precision`"):
        DirectionSpace([("w", w)], "rademacher", "fp8")
    space = DirectionSpace([("w", w)])
    with pytest.raises(ValueError, match="2 seeds but 1 coefficients"):
        space.add_([1, 2], [1.0])
    with pytest.raises(ValueError, match="`base` has 2 tensors"):
        space.add_([1], [1.0], base=[w, w])
    with pytest.raises(ValueError, match="`base\\[0\\]` has 5 elements"):
        space.add_([1], [1.0], base=[torch.zeros(5)])
    space.add_([], [])  # nothing to do
    assert torch.equal(w, torch.zeros(4))


def test_real_model_perturb_restore_round_trip():
    """Perturb and restore every parameter of the real stories260K in float32: the FedKSeed inner step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters()]
    before = [p.detach().clone() for _, p in named]
    space = DirectionSpace(named, "rademacher")
    space.add_([99], [5e-4])
    moved = sum(int((p != b).sum()) for (_, p), b in zip(named, before))
    assert moved > 0.99 * space.numel
    space.add_([99], [-5e-4])
    err = max(float((p - b).abs().max()) for (_, p), b in zip(named, before))
    assert err < 1e-6  # float32 rounding only; the 16-bit modes are what need care


def test_add_allocates_no_parameter_sized_temporary():
    """Peak resident memory of a fused add on a 256 MB tensor grows by far less than the tensor."""
    script = textwrap.dedent("""
        import torch
        from fedseed.directions import DirectionSpace
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
        w = torch.zeros(64 * 2**20)  # 256 MiB
        base = torch.ones(64 * 2**20)
        space = DirectionSpace([("w", w)], "gaussian")
        space.add_([1], [1.0])  # load kernels, touch pages
        open("/proc/self/clear_refs", "w").write("5")
        before = hwm()
        space.add_(list(range(4)), [0.1] * 4, base=[base])
        space.add_([7], [0.5])
        space.project([1, 2, 3])
        print(hwm() - before)
    """)
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip().splitlines()[-1]) < 32 * 2**20
