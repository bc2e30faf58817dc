"""The coarse stage's batched matrix product ``matmul`` of both backends against float64 NumPy.

CUDA (cuda_kernels/gemm_f32.cu): every transpose combination and output tile, on random shapes
(partial tiles, k not a multiple of the k step, rows not a multiple of 4) and at the coarse
stage's sizes.  The kernel multiplies in exact fp32 (one FMA per product, accumulated in
increasing k order), so each output element is within ``(k + 2) * 2**-24 * alpha * (|a| @ |b|)``
of the exact product (the standard bound for k rounded additions and one rounded scaling; TF32
would miss it by three orders of magnitude), and every tile shape gives the same bits.  Outputs
are poisoned (NaN) before each launch.  The Numba backend's ``matmul`` (a Numba kernel, not NumPy's
``@``) sums over k in increasing order too, so the same bound holds for it in float32 and float64.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vsa_nd.backends import numba_cpu

try:
    import cupy
except ImportError:  # CPU-only machine: the GPU tests are skipped
    cupy = None

gpu = pytest.mark.gpu
TRANSPOSES = [(False, False), (False, True), (True, False), (True, True)]
UNIT_ROUNDOFF = 2.0**-24


def _operands(rng, batch: tuple, m: int, n: int, k: int, transpose_a: bool, transpose_b: bool, dtype=np.float32):
    """a, b as stored (transposed where asked), standard normal."""
    a = rng.standard_normal((*batch, *((k, m) if transpose_a else (m, k)))).astype(dtype)
    b = rng.standard_normal((*batch, *((n, k) if transpose_b else (k, n)))).astype(dtype)
    return a, b


def _exact(a, b, transpose_a, transpose_b):
    """(float64 product, float64 product of the absolute values) of op(a) @ op(b)."""
    op = lambda x, t: np.swapaxes(x, -1, -2) if t else x  # noqa: E731
    a64, b64 = op(np.asarray(a, np.float64), transpose_a), op(np.asarray(b, np.float64), transpose_b)
    return a64 @ b64, np.abs(a64) @ np.abs(b64)


def _assert_within_rounding(result, a, b, transpose_a, transpose_b, alpha, unit=UNIT_ROUNDOFF, row_divisor=None):
    """result within the rounding bound of alpha * op(a) @ op(b) (then divided by row_divisor[r % p]),
    for the arithmetic whose unit roundoff is ``unit`` (float32 by default)."""
    exact, magnitude = _exact(a, b, transpose_a, transpose_b)
    k = a.shape[-2] if transpose_a else a.shape[-1]
    roundings = k + 2  # k additions, the scaling, and the ulp the bound leaves for the last
    if row_divisor is not None:
        rows = np.tile(np.asarray(row_divisor, np.float64), exact.shape[-2] // len(row_divisor))[:, None]
        exact, magnitude, roundings = exact / rows, magnitude / rows, roundings + 2  # the division, its reciprocal
    bound = roundings * unit * 1.01 * abs(alpha) * magnitude
    error = np.abs(np.asarray(result, np.float64) - alpha * exact)
    assert result.shape == exact.shape
    assert np.all(error <= bound), f"max error / bound {np.max(error / np.maximum(bound, 1e-300)):.3g}"


def _random_products(max_mn: int, max_k: int) -> dict:
    """Hypothesis strategies of a batched product: transposes, batch axes, m, n, k (0 included),
    alpha and the seed of its operands."""
    return dict(
        transposes=st.sampled_from(TRANSPOSES),
        batch=st.lists(st.integers(1, 3), max_size=2).map(tuple),
        m=st.integers(1, max_mn),
        n=st.integers(1, max_mn),
        k=st.integers(0, max_k),
        alpha=st.sampled_from([1.0, 0.125, -3.0]),
        seed=st.integers(0, 2**16),
    )


# ---------------------------------------------------------------------------------------------
# Numba backend

UNIT = {np.float32: UNIT_ROUNDOFF, np.float64: 2.0**-53}


@given(
    **_random_products(max_mn=40, max_k=40),
    dtype=st.sampled_from([np.float32, np.float64]),
    period=st.sampled_from([None, 1, 2]),
)
def test_numba_matmul_random_shapes(transposes, batch, m, n, k, alpha, dtype, period, seed):
    """Any shape (rows not a multiple of the kernel's row block of 8 too), with and without row divisors."""
    rng = np.random.default_rng(seed)
    a, b = _operands(rng, batch, m, n, k, *transposes, dtype)
    divisor = None
    if period is not None and m % period == 0:
        divisor = rng.integers(1, 65, period).astype(np.int32)
    result = numba_cpu.matmul(a, b, *transposes, alpha=alpha, row_divisor=divisor)
    assert result.dtype == dtype and result.flags.c_contiguous
    _assert_within_rounding(result, a, b, *transposes, alpha, unit=UNIT[dtype], row_divisor=divisor)


@pytest.mark.parametrize("transpose_a, transpose_b", TRANSPOSES)
@pytest.mark.parametrize("m, n, k, period", [(768, 768, 128, None), (768, 128, 768, 64), (130, 68, 1441, 13)])
def test_numba_matmul_coarse_sizes(transpose_a, transpose_b, m, n, k, period):
    """The coarse stage's products at 768 tiles per head, and odd sizes with a long k."""
    rng = np.random.default_rng(1)
    a, b = _operands(rng, (2,), m, n, k, transpose_a, transpose_b)
    divisor = None if period is None else rng.integers(1, 65, period).astype(np.int32)
    result = numba_cpu.matmul(a, b, transpose_a, transpose_b, alpha=0.088, row_divisor=divisor)
    _assert_within_rounding(result, a, b, transpose_a, transpose_b, 0.088, row_divisor=divisor)


def test_numba_matmul_empty_and_mismatched():
    for batch, m, n, k in [((0,), 4, 4, 4), ((2,), 0, 4, 4), ((2,), 4, 0, 4)]:
        a, b = _operands(np.random.default_rng(3), batch, m, n, k, False, False)
        assert numba_cpu.matmul(a, b).shape == (*batch, m, n)
    a, b = _operands(np.random.default_rng(3), (2,), 4, 4, 4, False, False)
    with pytest.raises(ValueError, match="do not multiply"):
        numba_cpu.matmul(a, b[:1])


# ---------------------------------------------------------------------------------------------
# CUDA backend


@pytest.fixture
def cuda(monkeypatch):
    """The CUDA backend with every output it allocates starting as NaN."""
    from vsa_nd.backends import cuda as backend

    monkeypatch.setattr(backend, "_alloc", lambda shape, dtype: cupy.full(shape, np.nan, dtype))
    return backend


def _every_tile(cuda, a, b, transpose_a, transpose_b, alpha):
    """The product with each output tile of gemm_f32.cu, checked to be bit-identical; one of them."""
    from vsa_nd.kernels import GEMM_TILES

    auto = cuda.matmul(a, b, transpose_a, transpose_b, alpha)
    for tile in GEMM_TILES:
        out = cupy.full(auto.shape, np.nan, np.float32)
        if out.size:
            cuda._launch_gemm(a, b, out, transpose_a, transpose_b, alpha, tile)
        assert cupy.array_equal(out.view(np.uint32), auto.view(np.uint32)), f"tile {tile} differs"
    return auto.get()


@gpu
@pytest.mark.parametrize("transpose_a, transpose_b", TRANSPOSES)
def test_cuda_matmul_smoke(cuda, transpose_a, transpose_b):
    """Small, with partial tiles on every side and two batches: run under compute-sanitizer by scripts/gpu-check.sh."""
    a, b = _operands(np.random.default_rng(5), (2,), 70, 67, 37, transpose_a, transpose_b)
    result = _every_tile(cuda, cupy.asarray(a), cupy.asarray(b), transpose_a, transpose_b, 0.5)
    _assert_within_rounding(result, a, b, transpose_a, transpose_b, 0.5)


@gpu
@given(**_random_products(max_mn=150, max_k=70))
def test_cuda_matmul_random_shapes(cuda, transposes, batch, m, n, k, alpha, seed):
    a, b = _operands(np.random.default_rng(seed), batch, m, n, k, *transposes)
    result = _every_tile(cuda, cupy.asarray(a), cupy.asarray(b), *transposes, alpha)
    _assert_within_rounding(result, a, b, *transposes, alpha)


@gpu
@pytest.mark.parametrize("transpose_a, transpose_b", TRANSPOSES)
@pytest.mark.parametrize("m, period", [(70, 70), (70, 35), (130, 13)])
def test_cuda_matmul_row_divisor(cuda, transpose_a, transpose_b, m, period):
    """With row_divisor, every output tile gives (alpha * product) / divisor[row % period] bit for
    bit as the product without it, divided afterwards in fp32 (the two roundings of the old path)."""
    rng = np.random.default_rng(m + period)
    a, b = (cupy.asarray(x) for x in _operands(rng, (2,), m, 67, 37, transpose_a, transpose_b))
    divisor = cupy.asarray(rng.integers(1, 65, period).astype(np.int32))
    expected = cuda.matmul(a, b, transpose_a, transpose_b, 0.25) / cupy.tile(divisor, m // period).astype(np.float32)[:, None]
    from vsa_nd.kernels import GEMM_TILES

    for tile in GEMM_TILES:
        out = cupy.full(expected.shape, np.nan, np.float32)
        cuda._launch_gemm(a, b, out, transpose_a, transpose_b, 0.25, tile, divisor)
        assert cupy.array_equal(out.view(np.uint32), expected.view(np.uint32)), f"tile {tile} differs"
    result = cuda.matmul(a, b, transpose_a, transpose_b, 0.25, row_divisor=divisor)
    assert cupy.array_equal(result.view(np.uint32), expected.view(np.uint32))


@gpu
@pytest.mark.parametrize("transpose_a, transpose_b", TRANSPOSES)
@pytest.mark.parametrize("m, n, k", [(768, 768, 128), (768, 128, 768), (130, 68, 1441)])
def test_cuda_matmul_coarse_sizes(cuda, transpose_a, transpose_b, m, n, k):
    """The coarse stage's products at 768 tiles per head (VSA_SPEC.md section 6), and odd sizes with a long k."""
    a, b = _operands(np.random.default_rng(1), (4,), m, n, k, transpose_a, transpose_b)
    result = _every_tile(cuda, cupy.asarray(a), cupy.asarray(b), transpose_a, transpose_b, 0.088)
    _assert_within_rounding(result, a, b, transpose_a, transpose_b, 0.088)


@gpu
def test_cuda_matmul_more_batches_than_grid_z(cuda):
    """70000 batches: the kernel's grid z (at most 65535) strides over them."""
    a, b = _operands(np.random.default_rng(2), (70000,), 3, 5, 7, False, True)
    result = cuda.matmul(cupy.asarray(a), cupy.asarray(b), transpose_b=True).get()
    _assert_within_rounding(result, a, b, False, True, 1.0)


@gpu
def test_cuda_matmul_empty(cuda):
    for batch, m, n, k in [((0,), 4, 4, 4), ((2,), 0, 4, 4), ((2,), 4, 0, 4)]:
        a, b = _operands(np.random.default_rng(3), batch, m, n, k, False, False)
        assert cuda.matmul(cupy.asarray(a), cupy.asarray(b)).shape == (*batch, m, n)


@gpu
def test_cuda_coarse_selection_matches_float64():
    """Coarse scores through the kernel select the same top-k tiles as float64 scores, on every
    row whose k-th and (k+1)-th float64 scores are further apart than twice the error bound
    (closer ones may swap under any fp32 arithmetic)."""
    from vsa_nd import ops
    from vsa_nd.backends import cuda

    rng = np.random.default_rng(4)
    topk, scale = 24, 128**-0.5
    q_mean = rng.standard_normal((2, 4, 96, 128)).astype(np.float32)
    k_mean = rng.standard_normal((2, 2, 160, 128)).astype(np.float32)
    scores = ops._coarse_scores(cupy.asarray(q_mean), cupy.asarray(k_mean), scale)
    q2k_idx, _ = cuda.select_topk(scores, topk)
    exact, magnitude = _exact(q_mean.reshape(2, 2, 192, 128), k_mean, False, True)
    exact, magnitude = exact.reshape(2, 4, 96, 160) * scale, magnitude.reshape(2, 4, 96, 160) * scale
    expected = np.sort(np.argsort(-exact, axis=-1, kind="stable")[..., :topk], axis=-1)
    ranked = -np.sort(-exact, axis=-1)
    bound = (128 + 2) * UNIT_ROUNDOFF * 1.01 * magnitude.max(axis=-1)
    clear = ranked[..., topk - 1] - ranked[..., topk] > 2 * bound
    assert clear.mean() > 0.95
    assert np.array_equal(q2k_idx.get()[clear], expected[clear])


@gpu
def test_cuda_matmul_errors():
    from vsa_nd.backends import cuda

    a = cupy.zeros((2, 4, 8), np.float32)
    with pytest.raises(TypeError, match="a: expected dtype float32 on CUDA, got float64"):
        cuda.matmul(a.astype(np.float64), a, transpose_b=True)
    with pytest.raises(ValueError, match="b: expected a C-contiguous array"):
        cuda.matmul(a, cupy.zeros((2, 16, 4), np.float32)[:, ::2])
    with pytest.raises(ValueError, match=r"b: expected batch axes \[2\] and k = 8 to match a"):
        cuda.matmul(a, cupy.zeros((2, 4, 8), np.float32))
    with pytest.raises(ValueError, match=r"b: expected batch axes \[2\]"):
        cuda.matmul(a, cupy.zeros((3, 8, 4), np.float32))


def test_gemm_launches_refuse_what_the_kernel_cannot_index():
    """gemm_f32.cu indexes one batch element with int32: larger products are refused before a
    kernel is looked up (so also when the VSA forward's launches are made)."""
    from vsa_nd.backends import cuda  # (imports no CuPy: the range check runs first)

    with pytest.raises(ValueError, match="int32 indexing"):
        cuda.gemm_launch(16 * 12000, 128, 12000, 1, False, False, 1.0, (128, 64))
