"""The Triton kernels against the numba kernels: same bits on CPU and CUDA.

Two kinds of tests:

* with Triton installed but no GPU, the Triton kernels run in Triton's interpreter
  (``TRITON_INTERPRET=1``, in a subprocess) on CPU tensors, which checks their
  logic operation by operation against ``cpu.py``;
* with CUDA, the real kernels: directions bitwise equal to the CPU ones for both
  distributions, fused results equal to the CPU results for every storage mode,
  the Gaussian's float64 ``log`` and ``cos`` equal on all 2^24 inputs each, and no
  parameter-sized temporary.

Everything skips cleanly where its requirement is missing.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
import torch

from fedseed.directions import DirectionSpace, cpu

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available() and HAS_TRITON
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and Triton")
DISTS = ("rademacher", "gaussian")
MODES = [(torch.float32, "nearest"), (torch.bfloat16, "nearest"), (torch.bfloat16, "stochastic"),
         (torch.float16, "nearest"), (torch.float16, "stochastic")]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = torch.int32 if a.dtype == torch.float32 else torch.int16
    return a.dtype == b.dtype and torch.equal(a.cpu().view(view), b.cpu().view(view))


@numba.njit
def _doubtful_inputs(count):
    """Raw outputs whose fast-path Gaussian is too close to a float32 boundary (the exact path decides)."""
    found = np.empty(count, dtype=np.uint64)
    i, n = 0, 0
    while n < count:
        x = cpu.mix64(np.uint64(i) * np.uint64(0x9E3779B97F4A7C15))
        if cpu.gaussian_fast(x)[1]:
            found[n] = x
            n += 1
        i += 1
    return found


@numba.njit
def _cpu_gaussians(x):
    out = np.empty(x.size, dtype=np.float32)
    for i in range(x.size):
        out[i] = cpu.gaussian(x[i])
    return out


@numba.njit(parallel=True)
def _cpu_log_cos(m, log_out, cos_out):
    for i in numba.prange(m.size):
        log_out[i] = cpu.log_u1(np.uint64(m[i]) << np.uint64(40))
        cos_out[i] = cpu.cos_u2(np.uint64(m[i]) << np.uint64(16))


if HAS_TRITON:
    import triton
    import triton.language as tl

    from fedseed.directions import cuda

    @triton.jit
    def _log_cos_kernel(m_ptr, log_ptr, cos_ptr, n, tab, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        v = tl.load(m_ptr + offs, mask=mask, other=0).to(tl.uint64)
        tl.store(log_ptr + offs, cuda.log_u1(v << 40, tab), mask=mask)
        tl.store(cos_ptr + offs, cuda.cos_u2(v << 16, tab), mask=mask)


    @triton.jit
    def _gaussian_kernel(x_ptr, out_ptr, n, tab, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.uint64, bitcast=True)
        tl.store(out_ptr + offs, cuda.gaussian(x, tab), mask=mask)


def _triton_gaussians(x: np.ndarray, device: str) -> np.ndarray:
    """The Triton Gaussian (fast path with exact fallback) of raw outputs ``x``."""
    xs = torch.from_numpy(x.view(np.int64)).to(device)
    out = torch.empty(x.size, dtype=torch.float32, device=device)
    _gaussian_kernel[(triton.cdiv(x.size, 256),)](xs, out, x.size, cuda.device_table(xs.device), BLOCK=256,
                                                  enable_fp_fusion=False)
    return out.cpu().numpy()


def _triton_log_cos(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate the Triton ``log_u1``/``cos_u2`` on ``m`` (int64), wherever ``m`` lives."""
    log_out = torch.empty(m.shape, dtype=torch.float64, device=m.device)
    cos_out = torch.empty_like(log_out)
    block = 4096
    _log_cos_kernel[(triton.cdiv(m.numel(), block),)](m, log_out, cos_out, m.numel(), cuda.device_table(m.device),
                                                       BLOCK=block, enable_fp_fusion=False)
    return log_out, cos_out


_INTERPRETER_SCRIPT = textwrap.dedent("""
    import numpy as np, torch
    from fedseed.directions import DirectionSpace, cuda
    import test_directions_gpu as t
    gen = torch.Generator().manual_seed(0)
    shapes = [(), (1,), (0,), (7,), (3, 5), (1500,), (2600,)]
    seeds = np.array([1, 2**63 + 7, 99], dtype=np.uint64)
    coeffs = np.array([0.5, -1e-3, 2.0], dtype=np.float32)
    for dist in t.DISTS:
        for dtype, precision in t.MODES:
            a = [(f"t{i}", torch.randn(s, generator=gen).to(dtype)) for i, s in enumerate(shapes)]
            b = [(n, x.clone()) for n, x in a]
            base = [torch.randn(x.shape, generator=gen) for _, x in a]
            sa, sb = DirectionSpace(a, dist, precision), DirectionSpace(b, dist, precision)
            rows = list(range(len(b)))
            sa.add_(seeds, coeffs)
            cuda.add_directions(sb, rows, seeds, coeffs, seeds.size, None, None)
            sa.add_(seeds[:1], coeffs[:1], base=base)
            cuda.add_directions(sb, rows, seeds[:1], coeffs[:1], 1, base, None)
            assert all(t._same_bits(x, y) for (_, x), (_, y) in zip(a, b)), (dist, dtype, precision)
            out_a = [torch.empty_like(x) for _, x in a]
            out_b = [torch.empty_like(x) for _, x in b]
            sa.perturb_into(out_a, seeds[1:], coeffs[1:], update=(seeds[:1], coeffs[:1]))  # update w, perturb a copy
            cuda.add_directions(sb, rows, seeds, coeffs, 1, None, out_b)
            assert all(t._same_bits(x, y) for (_, x), (_, y) in zip(a, b)), ("update", dist, dtype, precision)
            assert all(t._same_bits(x, y) for x, y in zip(out_a, out_b)), ("perturbed", dist, dtype, precision)
            tiny = (torch.randn(shapes[5], generator=gen) * 2.0**-20).to(dtype)  # float16 subnormals
            a[5][1].copy_(tiny)
            b[5][1].copy_(tiny)
            sa.perturb_into(out_a, seeds[2:], coeffs[2:], update=(seeds[1:2], [-3e-8]))  # a ZO step: the fused loop
            cuda.add_directions(sb, rows, seeds[1:], np.array([-3e-8, coeffs[2]], dtype=np.float32), 1, None, out_b)
            assert all(t._same_bits(x, y) for (_, x), (_, y) in zip(a, b)), ("step", dist, dtype, precision)
            assert all(t._same_bits(x, y) for x, y in zip(out_a, out_b)), ("step", dist, dtype, precision)
        d = [(f"d{i}", torch.randn(s, generator=gen)) for i, s in enumerate(shapes)]
        space = DirectionSpace(d, dist)
        np.testing.assert_allclose(cuda.project(space, list(range(len(d))), seeds), space.project(seeds), rtol=1e-12)
    x = np.concatenate([t._doubtful_inputs(40), np.random.default_rng(0).integers(0, 2**63, 2000).astype(np.uint64)])
    assert np.array_equal(t._triton_gaussians(x, "cpu").view(np.uint32), t._cpu_gaussians(x).view(np.uint32))
    m = torch.arange(0, 1 << 24, 4099, dtype=torch.int64)  # every 4099th input of log and cos
    log_t, cos_t = t._triton_log_cos(m)
    log_c, cos_c = np.empty(m.numel()), np.empty(m.numel())
    t._cpu_log_cos(m.numpy(), log_c, cos_c)
    assert np.array_equal(log_t.numpy(), log_c) and np.array_equal(cos_t.numpy(), cos_c)
    print("ok")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (for its interpreter)")
def test_triton_kernels_match_cpu_kernels_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@needs_cuda
@pytest.mark.parametrize("dist", DISTS)
def test_directions_are_bitwise_identical_on_cpu_and_cuda(dist):
    shapes = [(), (1,), (4097,), (3, 1000), (1 << 25,)]  # the last has element indices past 2^24
    cpu_space = DirectionSpace([(f"p{i}", torch.zeros(s)) for i, s in enumerate(shapes)], dist)
    gpu_space = DirectionSpace([(f"p{i}", torch.zeros(s, device="cuda")) for i, s in enumerate(shapes)], dist)
    for seed in (0, 7, 2**63 + 3):
        cpu_space.add_([seed], [1.0])
        gpu_space.add_([seed], [1.0])
        for a, b in zip(cpu_space.tensors, gpu_space.tensors):
            assert _same_bits(a, b)
            a.zero_()
            b.zero_()


@needs_cuda
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype,precision", MODES)
def test_fused_cuda_results_equal_cpu_results(dist, dtype, precision):
    gen = torch.Generator().manual_seed(1)
    shapes = [(), (5,), (0,), (1000, 33), (70_001,)]
    host = [(f"w{i}", torch.randn(s, generator=gen).to(dtype)) for i, s in enumerate(shapes)]
    dev = [(n, t.cuda()) for n, t in host]
    base = [torch.randn(t.shape, generator=gen) for _, t in host]
    seeds = np.arange(1, 65, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    coeffs = np.linspace(-2e-3, 2e-3, 64).astype(np.float32)
    sh, sd = DirectionSpace(host, dist, precision), DirectionSpace(dev, dist, precision)
    for space, b in ((sh, base), (sd, [x.cuda() for x in base])):
        space.add_(seeds, coeffs, base=b)  # sync from a float32 base
        for s, c in zip(seeds[:5], coeffs[:5]):  # then perturb / restore in place
            space.add_([s], [5e-4])
            space.add_([s], [-1e-3])
            space.add_([s], [5e-4 - c])
    for (_, a), (_, b) in zip(host, dev):
        assert _same_bits(a, b)
    out_h = [torch.empty_like(t) for _, t in host]
    out_d = [torch.empty_like(t) for _, t in dev]
    sh.perturb_into(out_h, seeds[:3], coeffs[:3], update=(seeds[3:5], coeffs[3:5]))
    sd.perturb_into(out_d, seeds[:3], coeffs[:3], update=(seeds[3:5], coeffs[3:5]))
    assert all(_same_bits(a, b) for a, b in zip(out_h, out_d))
    assert all(_same_bits(a, b) for (_, a), (_, b) in zip(host, dev))


@needs_cuda
@pytest.mark.parametrize("dist", DISTS)
def test_cuda_projection_matches_cpu(dist):
    gen = torch.Generator().manual_seed(2)
    host = [(f"d{i}", torch.randn(s, generator=gen)) for i, s in enumerate([(300_001,), (64, 64), ()])]
    seeds = list(range(100))
    want = DirectionSpace(host, dist).project(seeds)
    got = DirectionSpace([(n, t.cuda()) for n, t in host], dist).project(seeds)
    np.testing.assert_allclose(got, want, rtol=1e-11)
    got16 = DirectionSpace([(n, t.cuda().bfloat16()) for n, t in host], dist).project(seeds)
    want16 = DirectionSpace([(n, t.bfloat16()) for n, t in host], dist).project(seeds)
    np.testing.assert_allclose(got16, want16, rtol=1e-11)


@needs_cuda
def test_gaussian_log_and_cos_are_identical_on_all_inputs():
    """All 2^24 inputs of each float64 transcendental: the Gaussian is then bitwise portable."""
    m = torch.arange(1 << 24, dtype=torch.int64)
    log_t, cos_t = _triton_log_cos(m.cuda())
    log_c, cos_c = np.empty(1 << 24), np.empty(1 << 24)
    _cpu_log_cos(m.numpy(), log_c, cos_c)
    assert np.array_equal(log_t.cpu().numpy(), log_c)
    assert np.array_equal(cos_t.cpu().numpy(), cos_c)


@needs_cuda
def test_gaussian_fast_path_and_fallback_are_identical_on_cuda():
    rng = np.random.default_rng(1)
    x = np.concatenate([_doubtful_inputs(500), rng.integers(0, 2**64 - 1, 1 << 22, dtype=np.uint64)])
    assert np.array_equal(_triton_gaussians(x, "cuda").view(np.uint32), _cpu_gaussians(x).view(np.uint32))


@needs_cuda
def test_cuda_add_allocates_no_parameter_sized_temporary():
    w = torch.zeros(64 << 20, device="cuda")  # 256 MiB
    base = torch.ones_like(w)
    space = DirectionSpace([("w", w)], "gaussian")
    space.add_([1], [1.0])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    space.add_(list(range(16)), [0.1] * 16, base=[base])
    space.add_([3], [1e-3])
    space.project(list(range(8)))
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 4 << 20


@needs_cuda
def test_a_space_may_mix_cpu_and_cuda_tensors():
    a, b = torch.zeros(1000), torch.zeros(1000, device="cuda")
    space = DirectionSpace([("a", a), ("b", b)], "gaussian")
    space.add_([5], [1.0])
    ref = DirectionSpace([("a", torch.zeros(1000)), ("b", torch.zeros(1000))], "gaussian").materialize(5)
    assert _same_bits(a, ref[0]) and _same_bits(b, ref[1])
    assert np.allclose(space.project([5]), [float((ref[0] ** 2).sum() + (ref[1] ** 2).sum())])
