"""The Numba CPU backend, through the public API, against the NumPy reference.

Relative errors ||x - ref|| / ||ref|| (see rel_err) are taken over real query rows (real key
rows for dk/dv); the reference runs in float64 on the same (rounded) inputs.  Forward:
float32 1e-5, float64 1e-10, float16/bfloat16 2e-2.  Backward: float32 1e-4, float64 1e-9,
float16/bfloat16 3e-2.  Inputs are unit-normal in every slot, pads included.
"""

import contextlib
import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from ml_dtypes import bfloat16

import vsa_nd
from vsa_nd import reference as ref
from vsa_nd.kernels import padded_head_dim

from attention_problems import (NEGATIVE_TOPK_ROWS, check_first_tile_overflow, check_huge_lse_gradients,
                                check_huge_tile_means, first_tile_overflow_problem, huge_lse_problem, huge_tile_sums)

DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), np.dtype(bfloat16)]
FWD_TOL = {"float32": 1e-5, "float64": 1e-10, "float16": 2e-3, "bfloat16": 2e-2}
BWD_TOL = {"float32": 1e-4, "float64": 1e-9, "float16": 5e-3, "bfloat16": 3e-2}
# 16-bit gradients are held to BWD_TOL against the reference given the output as stored (``out=``,
# rounded to the input dtype: the rowsum term below), as the CUDA tests hold theirs, and to
# EXACT_BWD_TOL against the exact reference.  The rounding of out alone took dk 6.7e-3 (float16)
# and 3.2e-2 (bfloat16) off the exact gradient in a soak run (HYPOTHESIS_PROFILE=soak: one tile of
# two tokens, two query heads on one kv head), while the backend's dk was 1.5e-4 (float16) from
# the reference given that out.
EXACT_BWD_TOL = {"float16": 2e-2, "bfloat16": 8e-2}
# The backward's delta = rowsum(dout * fine) reads ``out`` in the input dtype, so 16-bit inputs
# leave an absolute noise of ~1e-3 in dq and dk however small they are (a peaked softmax makes
# them cancel): their relative errors are floored at an RMS of 0.2 instead of 0.01, i.e. an
# absolute error of 6e-3, about one bfloat16 rounding step of an O(1) value.  Where every
# query row sees a single key, dq and dk are exactly 0 and only that noise is left.
BWD_FLOOR = {"float32": 1e-2, "float64": 1e-2, "float16": 2e-1, "bfloat16": 2e-1}
ZERO_GRAD_NOISE = {"float32": 1e-5, "float64": 1e-13, "float16": 1e-2, "bfloat16": 8e-2}


def _examples(n: int) -> int:
    """``n`` examples under the default hypothesis profile (25 per test), scaled with the loaded
    profile's count (HYPOTHESIS_PROFILE: gpu 60, soak 400, sanitize 5) as the other tests are."""
    return max(1, round(n * settings.default.max_examples / 25))


# Sides of a tile per number of dims: volumes up to 32-64 slots, sequences up to ~600 slots.
MAX_SIDE = {1: 24, 2: 6, 3: 4, 4: 2}
MAX_TILES_PER_AXIS = {1: 8, 2: 3, 3: 2, 4: 2}


def rel_err(x, expected, rows=None, floor=1e-2):
    """||x - expected|| / ||expected||, with ||expected|| floored at an RMS of ``floor``: with
    unit-normal data a smaller reference is a cancellation, next to which rounding noise is
    not a relative error."""
    x, expected = np.asarray(x, np.float64), np.asarray(expected, np.float64)
    if rows is not None:
        x, expected = x[..., rows, :], expected[..., rows, :]
    return np.linalg.norm(x - expected) / max(np.linalg.norm(expected), floor * np.sqrt(max(expected.size, 1)))


def rms(x):
    return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64))))) if np.size(x) else 0.0


# A reference gradient whose RMS is this small is 0 in exact arithmetic (rows that see a single
# key have a constant softmax; float64 leaves ~1e-16 of it when given a rounded out): the
# backend's own rounding noise there is held to ZERO_GRAD_NOISE, not to a relative error.
ZERO_REFERENCE_RMS = 1e-12


def assert_gradient_close(got, want, rows, dtype_name: str, tol: float, label: str):
    """``got`` against the reference ``want`` on ``rows`` (a mask of axis -2): relative error at
    most ``tol`` (floored at BWD_FLOOR), or noise within ZERO_GRAD_NOISE where ``want`` is 0."""
    if rms(np.asarray(want, np.float64)[..., rows, :]) <= ZERO_REFERENCE_RMS:
        noise = rms(np.asarray(got, np.float64)[..., rows, :])
        assert noise <= ZERO_GRAD_NOISE[dtype_name], f"{label}: RMS {noise} where the reference is 0"
        return
    error = rel_err(got, want, rows, BWD_FLOOR[dtype_name])
    assert error <= tol, f"{label}: relative error {error}"


def normal(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def snapshot(*arrays):
    return [None if a is None else (a.dtype, a.shape, a.tobytes()) for a in arrays]


@st.composite
def seq_and_tile(draw, tile_shape=None):
    """(seq_shape, tile_shape) with partial edge tiles; a given tile_shape is reused (cross attention)."""
    if tile_shape is None:
        ndim = draw(st.integers(1, 4))
        tile_shape = tuple(draw(st.integers(1, MAX_SIDE[ndim])) for _ in range(ndim))
    ndim = len(tile_shape)
    tiles = [draw(st.integers(1, MAX_TILES_PER_AXIS[ndim])) for _ in range(ndim)]
    seq_shape = tuple((m - 1) * t + draw(st.integers(1, t)) for m, t in zip(tiles, tile_shape))
    return seq_shape, tile_shape


@st.composite
def attention_problems(draw):
    """A VSA problem: q/kv plans (cross attention half the time), heads, dims, dtype, gate, scale, topk."""
    seq_q, tile_shape = draw(seq_and_tile())
    seq_kv = draw(seq_and_tile(tile_shape=tile_shape))[0] if draw(st.booleans()) else seq_q
    plan_q, plan_kv = vsa_nd.tile_plan(seq_q, tile_shape), vsa_nd.tile_plan(seq_kv, tile_shape)
    kv_heads = draw(st.integers(1, 2))
    dim = draw(st.sampled_from([16, 32, 64]))
    # A custom scale within 4x of 1/sqrt(D): beyond, softmaxes are one-hot and gradients cancel.
    scale_factor = draw(st.none() | st.floats(0.25, 2.0))
    return dict(
        plan_q=plan_q,
        plan_kv=plan_kv,
        batch=draw(st.integers(1, 2)),
        heads=kv_heads * draw(st.integers(1, 3)),
        kv_heads=kv_heads,
        dim=dim,
        dtype=draw(st.sampled_from(DTYPES)),
        gate=draw(st.booleans()),
        scale=None if scale_factor is None else scale_factor / math.sqrt(dim),
        topk=draw(st.integers(1, plan_kv.num_blocks)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def make_inputs(p):
    """Tiled q, k, v (and gate): random values in every slot of q and gate, pads included, and NaN
    in the pad slots of k and v: only the first block_sizes slots of a tile may count as tokens,
    and nothing a key pad holds may reach a result."""
    rng = np.random.default_rng(p["seed"])
    b, h, h_kv, d, dtype = p["batch"], p["heads"], p["kv_heads"], p["dim"], p["dtype"]
    q = normal(rng, (b, h, p["plan_q"].padded_len, d), dtype)
    kv_real = ref.valid_slots(p["plan_kv"].variable_block_sizes, p["plan_kv"].tile_volume)[:, None]
    k, v = (np.where(kv_real, normal(rng, (b, h_kv, p["plan_kv"].padded_len, d), dtype), np.nan).astype(dtype)
            for _ in range(2))
    gate = normal(rng, q.shape, dtype) if p["gate"] else None
    return rng, q, k, v, gate


def assert_selection(q2k_idx, expected, scores, topk):
    """Equal to the reference's selection, except on rows whose top-k boundary is a numerical
    tie of the reference's own float64 scores (two tiles within 1e-5 relative)."""
    differs = np.any(q2k_idx != expected, axis=-1)
    if not differs.any():
        return
    ordered = -np.sort(-scores[differs], axis=-1)
    gap = ordered[:, topk - 1] - ordered[:, topk]
    assert np.all(gap <= 1e-5 * np.abs(ordered).max(axis=-1)), f"selection differs on {differs.sum()} rows with clear gaps {gap}"


# ---------------------------------------------------------------------------------------
# Tiling and coarse stage.


@given(shapes=seq_and_tile(), batch=st.integers(1, 2), heads=st.integers(1, 3),
       dim=st.sampled_from([1, 8, 16]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_tile_untile(shapes, batch, heads, dim, dtype, seed):
    plan = vsa_nd.tile_plan(*shapes)
    x = normal(np.random.default_rng(seed), (batch, plan.seq_len, heads, dim), dtype)
    before = snapshot(x)

    tiled = vsa_nd.tile(x, plan)
    expected = np.zeros((batch, heads, plan.padded_len, dim), dtype)
    expected[:, :, plan.non_pad_index] = np.swapaxes(x[:, plan.tile_partition_indices], 1, 2)
    assert tiled.dtype == dtype and tiled.tobytes() == expected.tobytes()

    buffer = np.full_like(x, 7)
    back = vsa_nd.untile(tiled, plan, out=buffer)
    assert back is buffer and back.tobytes() == x.tobytes()
    reused = np.full_like(tiled, 3)
    assert vsa_nd.tile(x, plan, out=reused) is reused and reused.tobytes() == expected.tobytes()
    assert snapshot(x) == before


@given(shapes=seq_and_tile(), heads=st.integers(1, 3), dim=st.sampled_from([16, 64]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_block_mean(shapes, heads, dim, dtype, seed):
    plan = vsa_nd.tile_plan(*shapes)
    x = normal(np.random.default_rng(seed), (2, heads, plan.padded_len, dim), dtype)  # pads hold noise
    before = snapshot(x)
    mean = vsa_nd.block_mean(x, plan.variable_block_sizes)
    expected = ref.block_mean(x, plan.variable_block_sizes, plan.tile_volume)
    assert mean.dtype == (np.float64 if dtype == np.float64 else np.float32)
    assert rel_err(mean, expected) <= (1e-12 if dtype == np.float64 else 1e-6)
    assert snapshot(x) == before


@given(n_q=st.integers(1, 12), n_kv=st.integers(1, 40), dtype=st.sampled_from([np.float32, np.float64]),
       levels=st.sampled_from([3, 10, 0]), specials=st.booleans(), data=st.data())
def test_select_topk_blocks(n_q, n_kv, dtype, levels, specials, data):
    """Exact agreement with the reference, ties included (``levels`` > 0 rounds scores to few
    values); with ``specials``, NaN (below every number), +-inf and -0.0 among the scores."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    scores = rng.standard_normal((2, 3, n_q, n_kv))
    if levels:
        scores = np.round(scores * levels / 3)
    if specials:
        pick = rng.random(scores.shape)
        scores[pick < 0.3] = np.nan
        scores[(pick >= 0.3) & (pick < 0.4)] = -np.inf
        scores[(pick >= 0.4) & (pick < 0.45)] = np.inf
        scores[(pick >= 0.45) & (pick < 0.55)] = -0.0
        scores[0, 0, 0] = np.nan  # a row of NaNs only
    scores = scores.astype(dtype)
    topk = data.draw(st.integers(1, n_kv))
    before = snapshot(scores)
    q2k_idx, q2k_num = vsa_nd.select_topk_blocks(scores, topk)
    expected_idx, expected_num = ref.select_topk(scores, topk)
    assert q2k_idx.dtype == np.int32 and q2k_num.dtype == np.int32
    np.testing.assert_array_equal(q2k_idx, expected_idx)
    np.testing.assert_array_equal(q2k_num, expected_num)
    assert snapshot(scores) == before


@pytest.mark.parametrize("row, topk, want", NEGATIVE_TOPK_ROWS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_select_topk_blocks_among_negative_scores(row, topk, want, dtype):
    """Rows whose k-th largest score is negative (the GPU kernel's test has the same rows)."""
    scores = np.array(row, dtype)[None, None, None, :]
    q2k_idx, q2k_num = vsa_nd.select_topk_blocks(scores, topk)
    assert q2k_idx.tolist() == [[[want]]] and q2k_num.tolist() == [[[topk]]]
    assert ref.select_topk(scores, topk)[0].tolist() == [[[want]]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_coarse_softmax_and_its_backward_kernels(dtype):
    """The CPU backend's coarse-softmax pieces against float64: select_topk_softmax_ (the
    selection of select_topk, then the row softmax in place; a row holding NaN or +inf, or only
    -inf, all NaN) and softmax_grad_rows_ (P * (dP - dot(d_out, out)) in place)."""
    from vsa_nd.backends import numba_cpu

    rng = np.random.default_rng(5)
    scores = (rng.standard_normal((2, 3, 4, 9)) * 3).astype(dtype)
    scores[0, 0, 0, 2], scores[0, 0, 1, 5], scores[0, 0, 2] = np.nan, np.inf, -np.inf
    x = scores.astype(np.float64)
    with np.errstate(invalid="ignore"):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        want = e / e.sum(axis=-1, keepdims=True)
    expected_idx, expected_num = numba_cpu.select_topk(scores, 3)
    with np.errstate(invalid="ignore"):
        q2k_idx, q2k_num, probs = numba_cpu.select_topk_softmax_(scores, 3)
    assert probs is scores
    assert np.array_equal(q2k_idx, expected_idx) and np.array_equal(q2k_num, expected_num)
    finite = np.isfinite(x).all(axis=-1)  # and where the rows are finite, the reference's selection
    assert np.array_equal(q2k_idx[finite], ref.select_topk(x, 3)[0][finite])
    assert np.isnan(probs[0, 0, :3]).all() and not np.isnan(probs[0, 0, 3:]).any()
    tol = 1e-6 if dtype == np.float32 else 1e-14
    assert np.allclose(probs, want, rtol=tol, atol=tol, equal_nan=True)

    p, g = want[1], rng.standard_normal((3, 4, 9))
    d_out, out = rng.standard_normal((3, 4, 16)), rng.standard_normal((3, 4, 16))
    expected = p * (g - (d_out * out).sum(axis=-1, keepdims=True))
    got = numba_cpu.softmax_grad_rows_(*(a.astype(dtype) for a in (g, p, d_out, out)))
    assert np.allclose(got, expected, rtol=tol * 10, atol=tol * 10)


def test_scores_past_the_float_range_are_never_silently_wrong():
    """Finite float32 inputs whose products overflow to -inf for every key of a row: the float64
    reference gives that row a finite softmax, which float32 cannot; the row comes out NaN (it
    once came out 0 with an lse of -inf, as if it selected no key), the other rows as before."""
    rng = np.random.default_rng(11)
    plan = vsa_nd.tile_plan((4, 4, 8))
    q, k, v = (rng.standard_normal((1, 1, plan.padded_len, 32)).astype(np.float32) for _ in range(3))
    idx = np.tile(np.arange(2, dtype=np.int32), (1, 1, plan.num_blocks, 1))
    sizes = plan.variable_block_sizes
    q[0, 0, 9] = 0
    q[0, 0, 9, 0] = -3e38  # finite; times keys of at least 100: past float32's range
    k[0, 0, :, 0] = np.abs(k[0, 0, :, 0]) * 100 + 100
    out, lse = vsa_nd.block_sparse_attn(q, k, v, sizes, idx, return_lse=True)
    block_map = ref.block_map_from_indices(idx, np.full(idx.shape[:3], 2), plan.num_blocks)
    expected, expected_lse = ref.block_sparse_attn(q, k, v, block_map, sizes, plan.tile_volume)
    assert np.isfinite(expected[0, 0, 9]).all() and np.isfinite(expected_lse[0, 0, 9])  # float64 gets it right
    assert np.isnan(out[0, 0, 9]).all() and np.isnan(lse[0, 0, 9])
    others = np.arange(plan.padded_len) != 9
    np.testing.assert_allclose(out[0, 0, others], expected[0, 0, others], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lse[0, 0, others], expected_lse[0, 0, others], rtol=1e-5, atol=1e-5)


def test_nan_and_inf_propagate_as_in_the_reference():
    """A NaN query row gives a NaN output row and LSE, and leaves the other rows unchanged; an
    infinite key gives NaN rows where it is selected (inf - inf); a forward and backward on
    all-NaN queries run to the end (the selection still lists topk distinct tiles)."""
    rng = np.random.default_rng(7)
    plan = vsa_nd.tile_plan((4, 8, 8))
    q, k, v = (rng.standard_normal((1, 2, plan.padded_len, 32)).astype(np.float32) for _ in range(3))
    idx = np.tile(np.arange(3, dtype=np.int32), (1, 2, plan.num_blocks, 1))
    sizes = plan.variable_block_sizes
    clean, clean_lse = vsa_nd.block_sparse_attn(q, k, v, sizes, idx, return_lse=True)
    q[0, 1, 70] = np.nan
    out, lse = vsa_nd.block_sparse_attn(q, k, v, sizes, idx, return_lse=True)
    assert np.isnan(out[0, 1, 70]).all() and np.isnan(lse[0, 1, 70])
    others = np.ones(out.shape[2], bool)
    others[70] = False
    np.testing.assert_array_equal(out[0, 1, others], clean[0, 1, others])
    np.testing.assert_array_equal(lse[0, 1, others], clean_lse[0, 1, others])
    block_map = ref.block_map_from_indices(idx, np.full(idx.shape[:3], 3), plan.num_blocks)
    with np.errstate(invalid="ignore"):
        expected, _ = ref.block_sparse_attn(q, k, v, block_map, sizes, plan.tile_volume)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    k[0, 0, 3] = np.inf  # a real key of tile 0, which every query tile selects
    out, _ = vsa_nd.block_sparse_attn(q, k, v, sizes, idx, return_lse=True)
    with np.errstate(invalid="ignore"):
        expected, _ = ref.block_sparse_attn(q, k, v, block_map, sizes, plan.tile_volume)
    assert np.isnan(out[0, 0, : plan.seq_len]).any()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))

    # A row whose every score is -inf (here an input's -inf) gets NaN, as in the reference: its
    # softmax is 0 / 0, not the 0 of a row that selects no key.
    k[:] = rng.standard_normal(k.shape).astype(np.float32)
    q[0, 0, 10] = 0
    q[0, 0, 10, 0] = -np.inf
    k[0, 0, :, 0] = np.abs(k[0, 0, :, 0]) + 0.1  # q . k = -inf for every key of that row
    out, lse = vsa_nd.block_sparse_attn(q, k, v, sizes, idx, return_lse=True)
    assert np.isnan(out[0, 0, 10]).all() and np.isnan(lse[0, 0, 10])
    with np.errstate(invalid="ignore"):
        expected, expected_lse = ref.block_sparse_attn(q, k, v, block_map, sizes, plan.tile_volume)
    assert np.isnan(expected[0, 0, 10]).all() and np.isnan(expected_lse[0, 0, 10])
    real = np.isfinite(expected_lse)
    assert real.sum() == real.size - 2  # that row, and the NaN query row from above
    np.testing.assert_allclose(lse[real], expected_lse[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # A row that selects no key: out 0 and lse -inf in both.
    none = np.full(idx.shape[:3], 3, np.int32)
    none[0, 1, 2] = 0
    out, lse = vsa_nd.block_sparse_attn(q, k, v, sizes, idx, none, return_lse=True)
    rows = slice(2 * plan.tile_volume, 3 * plan.tile_volume)
    assert np.all(out[0, 1, rows] == 0) and np.all(lse[0, 1, rows] == -np.inf)
    expected, expected_lse = ref.block_sparse_attn(q, k, v, ref.block_map_from_indices(idx, none, plan.num_blocks),
                                                   sizes, plan.tile_volume)
    assert np.all(expected[0, 1, rows] == 0) and np.all(expected_lse[0, 1, rows] == -np.inf)

    q[:] = np.nan
    out, context = vsa_nd.video_sparse_attn(q, k, v, 3, sizes, return_context=True)
    assert np.isnan(out[:, :, : plan.seq_len]).all()
    assert all(len(set(row)) == 3 for row in context.q2k_idx.reshape(-1, 3).tolist())
    grads = vsa_nd.video_sparse_attn_backward(np.ones_like(out), context)
    assert np.isnan(grads.dq[:, :, : plan.seq_len]).any()


@pytest.mark.parametrize("dtype, bound, low", [(np.float32, 5e-7, -126), (np.float64, 1e-15, -1022)])
def test_exp2_of_the_online_softmax(dtype, bound, low):
    """The kernels' own 2**x (x <= 0): relative error within a few units of the last place down
    to the smallest normal exponent (float32 -126, float64 -1022), 0 below it and for -inf, NaN
    for NaN."""
    from numba import njit

    from vsa_nd.backends.numba_cpu import _exp2

    @njit
    def apply(x):
        out = np.empty_like(x)
        for i in range(x.size):
            out[i] = _exp2(x[i])
        return out

    x = np.concatenate([np.linspace(low, 0, 200_001), low * np.random.default_rng(8).random(10_000)]).astype(dtype)
    exact = np.exp2(x.astype(np.float64))
    assert np.max(np.abs(apply(x) - exact) / exact) <= bound
    special = apply(np.array([-np.inf, low - 0.5, -2000.0, np.nan, 0.0], dtype))
    assert special[:3].tolist() == [0.0, 0.0, 0.0] and np.isnan(special[3]) and special[4] == 1.0
    # Above 0 (a probability's exponent that rounding pushed up) it saturates at 1.
    assert apply(np.array([1e-7, 0.5, 127.6, 130.0, 300.0, np.inf], dtype)).tolist() == [1.0] * 6


@settings(max_examples=_examples(40))
@given(real=st.integers(1, 21), keys=st.integers(1, 21), depth=st.integers(1, 40),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**32 - 1))
def test_score_products(real, keys, depth, dtype, seed):
    """The kernels' score product: within rounding of float64's, NaN where an operand row holds
    one, columns past ``cols`` untouched, and S (query rows x keys, as the dQ pass takes it) bit
    for bit the transpose of S^T (keys x query rows, as the dK/dV pass takes it) at any number
    of keys, a last partial block of four columns included."""
    from vsa_nd.backends.numba_cpu import _round_rows, _scores

    rng = np.random.default_rng(seed)
    qs, k = (rng.standard_normal((_round_rows(n) + 3, depth)).astype(dtype) for n in (real, keys))
    if keys % 2:  # a NaN in the last key, in a partial block of four when keys % 4 is 1 or 3
        k[keys - 1, depth // 2] = np.nan
    s = np.full((_round_rows(real), keys + 3), -7.0, dtype)
    st_ = np.full((_round_rows(keys), real + 3), -7.0, dtype)
    _scores(s, qs, k, _round_rows(real), keys)
    _scores(st_, k, qs, _round_rows(keys), real)
    assert np.all(s[:, keys:] == -7.0) and np.all(st_[:, real:] == -7.0)
    assert s[:real, :keys].tobytes() == np.ascontiguousarray(st_[:keys, :real].T).tobytes()
    exact = qs[:real].astype(np.float64) @ k[:keys].astype(np.float64).T
    bound = (1e-5 if dtype == np.float32 else 1e-13) * np.abs(qs[:real]).astype(np.float64) @ np.abs(k[:keys]).T
    np.testing.assert_array_equal(np.isnan(s[:real, :keys]), np.isnan(exact))
    finite = ~np.isnan(exact)
    assert np.all(np.abs(s[:real, :keys] - exact)[finite] <= bound[finite])


def test_lane_padding():
    """_round_lanes: a multiple of 16 where that adds at most a quarter, else the count itself;
    never decreasing (an inner count must not pad past its tile volume's width)."""
    from vsa_nd.backends.numba_cpu import _round_lanes

    padded = [_round_lanes(n) for n in range(400)]
    assert padded[:6] == [0, 1, 2, 3, 4, 5] and padded[16] == 16 and padded[17] == 17
    assert padded[27] == 32 and padded[64] == 64 and padded[65] == 80
    assert all(n <= p <= max(n, 1.25 * n) and (p == n or p % 16 == 0) for n, p in enumerate(padded))
    assert all(a <= b for a, b in zip(padded, padded[1:]))


@settings(max_examples=_examples(40))
@given(rows=st.sampled_from([4, 8, 16]), inner=st.integers(1, 40), width=st.integers(1, 23),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**32 - 1))
def test_transposed_accumulate(rows, inner, width, dtype, seed):
    """The kernels' P @ V product on a transposed V (_transposed's layout): acc += p @ bt^T
    within rounding of float64's, whatever p holds past ``inner`` (NaN here; the product
    writes zeros there), at any head dim (a last partial block of four columns included), rows
    past ``rows`` untouched; bt's columns past the block size are zero even where v holds NaN."""
    from vsa_nd.backends.numba_cpu import _accumulate_t, _round_lanes, _transposed

    rng = np.random.default_rng(seed)
    padded = _round_lanes(inner)
    v = rng.standard_normal((1, 1, 1, padded + 5, width)).astype(dtype)
    v[..., inner:, :] = np.nan  # pad keys
    bt = _transposed(v, [inner])[0, 0, 0]
    assert bt.shape == (width, _round_lanes(padded + 5)) and np.all(bt[:, inner:] == 0)
    p = rng.standard_normal((rows + 4, padded)).astype(dtype)
    p[:, inner:] = np.nan
    acc = rng.standard_normal((rows + 4, width)).astype(dtype)
    start = acc.copy()
    _accumulate_t(acc, p, bt, rows, inner)
    assert acc[rows:].tobytes() == start[rows:].tobytes()
    p64, v64 = p[:rows, :inner].astype(np.float64), v[0, 0, 0, :inner].astype(np.float64)
    exact = start[:rows] + p64 @ v64
    bound = (1e-5 if dtype == np.float32 else 1e-13) * (np.abs(start[:rows]) + np.abs(p64) @ np.abs(v64))
    assert np.all(np.abs(acc[:rows] - exact) <= bound)


def test_float64_keeps_probabilities_below_float32s_range():
    """In float64 a key 90 below the row's best has P = e^-90 (~1e-39, below float32's smallest
    normal): with a v of 1e300 it dominates the output, and the backend must keep it."""
    q = np.ones((1, 1, 4, 1))
    k, v = np.zeros_like(q), np.zeros_like(q)
    k[0, 0, 1, 0], v[0, 0, 1, 0] = -90.0, 1e300
    sizes, idx = np.array([2, 2], np.int32), np.zeros((1, 1, 2, 1), np.int32)
    out, lse = vsa_nd.block_sparse_attn(q, k, v, sizes, idx, scale=1.0, return_lse=True)
    expected, expected_lse = ref.block_sparse_attn(q, k, v, ref.block_map_from_indices(idx, np.ones((1, 1, 2)), 2),
                                                   sizes, 2, scale=1.0)
    assert expected[0, 0, 0, 0] > 1e250
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-12)


# ---------------------------------------------------------------------------------------
# Fine stage with caller-given selections.


def _fine_reference(q, k, v, block_map, plan_kv, volume, scale):
    return ref.block_sparse_attn(q, k, v, block_map, plan_kv.variable_block_sizes, volume, scale)


@settings(max_examples=_examples(30))
@given(p=attention_problems(), data=st.data())
def test_block_sparse_attn_index_lists(p, data):
    """Index lists in any order, with per-row counts below the list length, some of them 0."""
    rng, q, k, v, _ = make_inputs(p)
    b, h, n_q, n_kv = p["batch"], p["heads"], p["plan_q"].num_blocks, p["plan_kv"].num_blocks
    length = data.draw(st.integers(0, n_kv))
    q2k_idx = np.argsort(rng.random((b, h, n_q, n_kv)), axis=-1)[..., :length].astype(np.int32)
    q2k_num = rng.integers(0, length + 1, (b, h, n_q)).astype(np.int32)
    q2k_num.reshape(-1)[0] = 0
    before = snapshot(q, k, v, q2k_idx, q2k_num)

    out, lse = vsa_nd.block_sparse_attn(q, k, v, p["plan_kv"].variable_block_sizes, q2k_idx, q2k_num,
                                        scale=p["scale"], return_lse=True)
    block_map = ref.block_map_from_indices(q2k_idx, q2k_num, n_kv)
    expected, expected_lse = _fine_reference(q, k, v, block_map, p["plan_kv"], p["plan_q"].tile_volume, p["scale"])

    name = p["dtype"].name
    assert out.dtype == p["dtype"] and out.shape == q.shape
    assert np.isfinite(np.asarray(out, np.float64)).all()
    assert rel_err(out, expected) <= FWD_TOL[name]
    empty = np.repeat(q2k_num == 0, p["plan_q"].tile_volume, axis=-1)
    assert np.all(np.asarray(out, np.float64)[empty] == 0)
    assert np.all(lse[empty] == -np.inf) and np.isfinite(lse[~empty]).all()
    lse_tol = 1e-12 if name == "float64" else 1e-5
    np.testing.assert_allclose(lse[~empty], expected_lse[~empty], rtol=lse_tol, atol=lse_tol)
    assert snapshot(q, k, v, q2k_idx, q2k_num) == before


@settings(max_examples=_examples(20))
@given(p=attention_problems(), data=st.data())
def test_block_sparse_attn_with_query_block_sizes_zeroes_pad_rows(p, data):
    """Given q_block_sizes, pad query rows come out 0 with lse -inf whatever q holds there (NaN
    here), and real rows as without it, bit for bit, and as the reference's."""
    rng, q, k, v, _ = make_inputs(p)
    b, h, n_q, n_kv = p["batch"], p["heads"], p["plan_q"].num_blocks, p["plan_kv"].num_blocks
    length = data.draw(st.integers(1, n_kv))
    q2k_idx = np.argsort(rng.random((b, h, n_q, n_kv)), axis=-1)[..., :length].astype(np.int32)
    q_sizes, volume = p["plan_q"].variable_block_sizes, p["plan_q"].tile_volume
    real = ref.valid_slots(q_sizes, volume)
    q_nan = np.where(real[:, None], q, np.nan).astype(q.dtype)
    kv_sizes = p["plan_kv"].variable_block_sizes
    out, lse = vsa_nd.block_sparse_attn(q_nan, k, v, kv_sizes, q2k_idx, scale=p["scale"], return_lse=True,
                                        q_block_sizes=q_sizes)
    plain, plain_lse = vsa_nd.block_sparse_attn(q, k, v, kv_sizes, q2k_idx, scale=p["scale"], return_lse=True)
    assert (np.asarray(out, np.float64)[:, :, ~real] == 0).all() and (lse[:, :, ~real] == -np.inf).all()
    np.testing.assert_array_equal(out[:, :, real], plain[:, :, real])
    np.testing.assert_array_equal(lse[:, :, real], plain_lse[:, :, real])
    block_map = ref.block_map_from_indices(q2k_idx, np.full((b, h, n_q), length, np.int32), n_kv)
    expected, expected_lse = ref.block_sparse_attn(q_nan, k, v, block_map, kv_sizes, volume, p["scale"],
                                                   q_block_sizes=q_sizes)
    assert (expected[:, :, ~real] == 0).all() and (expected_lse[:, :, ~real] == -np.inf).all()
    assert rel_err(out, expected) <= FWD_TOL[p["dtype"].name]
    with pytest.raises(ValueError, match="q_block_sizes: expected"):
        vsa_nd.block_sparse_attn(q, k, v, kv_sizes, q2k_idx, q_block_sizes=np.append(q_sizes, 1))
    with pytest.raises(ValueError, match="q_block_sizes: expected every block size"):
        vsa_nd.block_sparse_attn(q, k, v, kv_sizes, q2k_idx, q_block_sizes=np.full(n_q, volume + 1))


@settings(max_examples=_examples(20))
@given(p=attention_problems(), density=st.floats(0.0, 1.0))
def test_block_sparse_attn_block_map(p, density):
    rng, q, k, v, _ = make_inputs(p)
    shape = (p["batch"], p["heads"], p["plan_q"].num_blocks, p["plan_kv"].num_blocks)
    block_map = rng.random(shape) < density
    out = vsa_nd.block_sparse_attn(q, k, v, p["plan_kv"].variable_block_sizes, block_map=block_map, scale=p["scale"])
    expected, _ = _fine_reference(q, k, v, block_map, p["plan_kv"], p["plan_q"].tile_volume, p["scale"])
    assert np.isfinite(np.asarray(out, np.float64)).all()
    assert rel_err(out, expected) <= FWD_TOL[p["dtype"].name]


# ---------------------------------------------------------------------------------------
# The whole operator, forward and backward.


def check_video_sparse_attn(p):
    rng, q, k, v, gate = make_inputs(p)
    plan_q, plan_kv = p["plan_q"], p["plan_kv"]
    q_sizes, kv_sizes, volume = plan_q.variable_block_sizes, plan_kv.variable_block_sizes, plan_q.tile_volume
    dout = normal(rng, q.shape, p["dtype"])
    dout[:, :, ~ref.valid_slots(q_sizes, volume)] = np.nan  # pad rows are not part of the output: never read
    before = snapshot(q, k, v, gate, dout)

    out, context = vsa_nd.video_sparse_attn(
        q, k, v, p["topk"], q_sizes, kv_sizes, gate=gate, scale=p["scale"], return_context=True
    )
    expected = ref.video_sparse_attn(q, k, v, q_sizes, kv_sizes, p["topk"], volume, p["scale"], gate)
    assert_selection(context.q2k_idx, expected.q2k_idx, expected.scores, p["topk"])
    np.testing.assert_array_equal(context.q2k_num, expected.q2k_num)
    if not np.array_equal(context.q2k_idx, expected.q2k_idx):  # a numerical tie: compare on our selection
        expected = ref.video_sparse_attn(q, k, v, q_sizes, kv_sizes, p["topk"], volume, p["scale"], gate,
                                         q2k_idx=context.q2k_idx, q2k_num=context.q2k_num)

    name = p["dtype"].name
    real_q = ref.valid_slots(q_sizes, volume)
    real_kv = ref.valid_slots(kv_sizes, volume)
    assert out.dtype == p["dtype"] and out.shape == q.shape
    assert np.isfinite(np.asarray(out, np.float64)).all()  # pad rows included
    assert (np.asarray(out, np.float64)[:, :, ~real_q] == 0).all() and (context.lse[:, :, ~real_q] == -np.inf).all()
    assert rel_err(out, expected.out, real_q) <= FWD_TOL[name]

    grads = vsa_nd.video_sparse_attn_backward(dout, context)
    exact = ref.video_sparse_attn_backward(
        dout, q, k, v, q_sizes, kv_sizes, context.q2k_idx, context.q2k_num, volume, p["scale"], gate
    )
    if name in EXACT_BWD_TOL:  # (see BWD_TOL)
        given_out = ref.video_sparse_attn_backward(dout, q, k, v, q_sizes, kv_sizes, context.q2k_idx, context.q2k_num,
                                                   volume, p["scale"], gate, out=out)
        references = [(given_out, BWD_TOL[name], "given out"), (exact, EXACT_BWD_TOL[name], "exact")]
    else:
        references = [(exact, BWD_TOL[name], "exact")]
    for expected_grads, tol, kind in references:
        for got, want, real, label in (
            (grads.dq, expected_grads.dq, real_q, "dq"),
            (grads.dk, expected_grads.dk, real_kv, "dk"),
            (grads.dv, expected_grads.dv, real_kv, "dv"),
            (grads.dgate, expected_grads.dgate, real_q, "dgate"),
        ):
            if want is None:
                assert got is None
                continue
            assert got.dtype == p["dtype"] and got.shape == want.shape, label
            assert np.all(np.asarray(got, np.float64)[..., ~real, :] == 0), f"{label}: pad slots not zero"
            assert_gradient_close(got, want, real, name, tol, f"{label} against the {kind} reference")
    assert snapshot(q, k, v, gate, dout) == before
    return grads


@contextlib.contextmanager
def ds_recomputed():
    """The backward's dQ pass recomputes dS instead of taking the dK/dV pass's blocks (what it does
    past numba_cpu.DS_BUDGET_BYTES)."""
    from vsa_nd.backends import numba_cpu

    budget, numba_cpu.DS_BUDGET_BYTES = numba_cpu.DS_BUDGET_BYTES, 0
    try:
        yield
    finally:
        numba_cpu.DS_BUDGET_BYTES = budget


@settings(max_examples=_examples(60))
@given(p=attention_problems())
def test_video_sparse_attn(p):
    check_video_sparse_attn(p)


@settings(max_examples=_examples(25))
@given(p=attention_problems())
def test_video_sparse_attn_with_ds_recomputed(p):
    """The same with the dQ pass recomputing dS; its dq agrees with the hand-over's to rounding."""
    with ds_recomputed():
        recomputed = check_video_sparse_attn(p)
    handed = check_video_sparse_attn(p)
    tol = {"float64": 1e-12}.get(p["dtype"].name, 2e-5)
    assert rel_err(recomputed.dq, handed.dq, floor=1e-3) <= tol
    for a, b in zip(recomputed[1:3], handed[1:3]):
        assert a.tobytes() == b.tobytes()  # dk, dv: the same pass either way


@pytest.mark.parametrize("hand_over", [True, False], ids=["ds_handed_over", "ds_recomputed"])
def test_fine_backward_reads_each_list_only_up_to_its_count(hand_over):
    """The backend's fine backward given index lists whose counts (some 0) stop short of their
    length: the gradients of the reference with those lists cut at their counts, and the same bit
    for bit whatever the entries past the counts hold.  (vsa_nd's own backward always passes full
    lists, topk entries each; the CUDA spot checks pass shorter ones.)"""
    from vsa_nd.backends import numba_cpu

    rng = np.random.default_rng(11)
    plan = vsa_nd.tile_plan((5, 6, 7), (3, 3, 3))  # tiles of 27 (partial ones at the edges)
    b, h, h_kv, d, n, volume, scale = 1, 4, 2, 16, plan.num_blocks, plan.tile_volume, 0.3
    sizes = plan.variable_block_sizes
    q, dout = (normal(rng, (b, h, plan.padded_len, d), np.float32) for _ in range(2))
    k, v = (normal(rng, (b, h_kv, plan.padded_len, d), np.float32) for _ in range(2))
    idx = np.argsort(rng.random((b, h, n, n)), axis=-1).astype(np.int32)
    num = rng.integers(0, n // 2 + 1, (b, h, n)).astype(np.int32)
    num.reshape(-1)[:2] = (0, n)
    other = idx.copy()  # the same first num entries of each list, the rest shuffled
    for row, count in zip(other.reshape(-1, n), num.reshape(-1)):
        rng.shuffle(row[count:])
    assert not np.array_equal(other, idx)
    out, lse = numba_cpu.block_sparse_fwd(q, k, v, idx, num, sizes, scale, None, None, q_block_sizes=sizes)
    tile_grads = (np.zeros((b, h, n, d), np.float32), np.zeros((b, h_kv, n, d), np.float32),
                  np.zeros((b, h_kv, n, d), np.float32))
    with contextlib.nullcontext() if hand_over else ds_recomputed():
        grads, again = (numba_cpu.block_sparse_bwd(dout, q, k, v, out, lse, lists, num, sizes, sizes, scale,
                                                   None, None, *tile_grads) for lists in (idx, other))
    block_map = ref.block_map_from_indices(idx, num, n)
    expected = ref.block_sparse_attn_backward(dout, q, k, v, block_map, sizes, volume, scale, q_block_sizes=sizes)
    real = ref.valid_slots(sizes, volume)
    for name, got, same, want in zip(("dq", "dk", "dv"), grads, again, expected):
        assert got.tobytes() == same.tobytes(), name
        assert rel_err(got, want, real) <= BWD_TOL["float32"], name
        assert not np.any(got[..., ~real, :]), name  # pad slots zero
    assert not np.any(grads[0][np.repeat(num == 0, volume, axis=-1)])  # rows that selected nothing


def test_a_nan_query_row_makes_only_its_own_dq_nan():
    """Tiles of 27 tokens, whose dS blocks the backward pads to 32 columns: a NaN in one real query
    row gives NaN in that row of dq and in no other, dS handed over or recomputed (a dS block
    read with the tile volume's width would take the next row's NaN into this row)."""
    from vsa_nd.backends import numba_cpu

    rng = np.random.default_rng(3)
    plan = vsa_nd.tile_plan((3, 3, 6), (3, 3, 3))
    assert plan.tile_volume == 27 and numba_cpu._round_lanes(27) == 32
    n, sizes = plan.num_blocks, plan.variable_block_sizes
    q, dout, k, v = (normal(rng, (1, 1, plan.padded_len, 16), np.float32) for _ in range(4))
    q[0, 0, 5] = np.nan  # a real row of query tile 0
    idx = np.tile(np.arange(n, dtype=np.int32), (1, 1, n, 1))
    num = np.full((1, 1, n), n, np.int32)
    out, lse = numba_cpu.block_sparse_fwd(q, k, v, idx, num, sizes, 0.25, None, None, q_block_sizes=sizes)
    tile_grads = [np.zeros((1, 1, n, 16), np.float32) for _ in range(3)]
    for hand_over in (True, False):
        with contextlib.nullcontext() if hand_over else ds_recomputed():
            dq, _, _ = numba_cpu.block_sparse_bwd(dout, q, k, v, out, lse, idx, num, sizes, sizes, 0.25, None, None,
                                                  *tile_grads)
        nan_rows = np.isnan(dq[0, 0]).any(axis=-1)
        assert np.flatnonzero(nan_rows).tolist() == [5], hand_over


def test_ds_budget_counts_bytes_and_includes_its_bound(monkeypatch):
    """The dQ pass takes the dK/dV pass's dS blocks (B * H * N_q * topk blocks of
    _round_rows(V) x _round_lanes(V) elements) when they need at most DS_BUDGET_BYTES bytes, and
    recomputes dS from one byte less."""
    from vsa_nd.backends import numba_cpu

    rng = np.random.default_rng(0)
    plan = vsa_nd.tile_plan((5, 6), (4, 4))
    q, dout = (normal(rng, (1, 2, plan.padded_len, 16), np.float32) for _ in range(2))
    k, v = (normal(rng, (1, 1, plan.padded_len, 16), np.float32) for _ in range(2))
    topk, volume = 2, plan.tile_volume
    _, ctx = vsa_nd.video_sparse_attn(q, k, v, topk, plan.variable_block_sizes, return_context=True)
    need = 2 * plan.num_blocks * topk * numba_cpu._round_rows(volume) * numba_cpu._round_lanes(volume) * 4
    calls = []

    def counted(name):
        kernel = getattr(numba_cpu, name)

        def run(*args):
            calls.append(name)
            return kernel(*args)

        return run

    for name in ("_dq_kernel", "_dq_from_ds_kernel"):
        monkeypatch.setattr(numba_cpu, name, counted(name))
    for budget, expected in ((need, "_dq_from_ds_kernel"), (need - 1, "_dq_kernel"), (0, "_dq_kernel")):
        calls.clear()
        monkeypatch.setattr(numba_cpu, "DS_BUDGET_BYTES", budget)
        vsa_nd.video_sparse_attn_backward(dout, ctx)
        assert calls == [expected], budget


@settings(max_examples=_examples(20))
@given(p=attention_problems())
# Rows that each see one key: dq and dk are 0 in exact arithmetic, float32 noise in the kernels
# (held to ZERO_GRAD_NOISE; as a relative error it once failed, 1.1e-4).
@example(p=dict(plan_q=vsa_nd.tile_plan((1,), (1,)), plan_kv=vsa_nd.tile_plan((1,), (1,)), batch=2, heads=6, kv_heads=2,
                dim=64, dtype=np.dtype(np.float32), gate=False, scale=0.25, topk=1, seed=701800))
def test_what_q_and_gate_hold_in_pad_slots_reaches_no_real_result(p):
    """NaN in q's and gate's pad slots: out (0 on pad rows), lse (-inf there) and every gradient
    as with zeros there (bit for bit), and as the reference's given the NaN-padded out."""
    rng, q, k, v, gate = make_inputs(p)
    q_sizes, kv_sizes = p["plan_q"].variable_block_sizes, p["plan_kv"].variable_block_sizes
    volume = p["plan_q"].tile_volume
    real = ref.valid_slots(q_sizes, volume)
    dout = normal(rng, q.shape, p["dtype"])
    runs = []
    for pad in (0.0, np.nan):
        q_in, gate_in = (None if x is None else np.where(real[:, None], x, pad).astype(x.dtype) for x in (q, gate))
        out, context = vsa_nd.video_sparse_attn(q_in, k, v, p["topk"], q_sizes, kv_sizes, gate=gate_in,
                                                scale=p["scale"], return_context=True)
        runs.append((out, vsa_nd.video_sparse_attn_backward(dout, context), context))
    (zero_out, zero_grads, zero_context), (nan_out, nan_grads, context) = runs
    assert (np.asarray(nan_out, np.float64)[:, :, ~real] == 0).all()
    np.testing.assert_array_equal(nan_out, zero_out)
    assert (context.lse[:, :, ~real] == -np.inf).all()
    np.testing.assert_array_equal(context.lse, zero_context.lse)
    for zero, nan in zip(zero_grads, nan_grads):
        if zero is not None:
            np.testing.assert_array_equal(nan, zero)  # pad slots 0 in both
    want = ref.video_sparse_attn_backward(dout, q_in, k, v, q_sizes, kv_sizes, context.q2k_idx, context.q2k_num,
                                          volume, p["scale"], gate_in, out=nan_out)
    for got, expected, label in zip(nan_grads, want, ("dq", "dk", "dv", "dgate")):
        if expected is not None:
            assert np.isfinite(expected).all()
            assert_gradient_close(got, expected, np.ones(got.shape[2], bool), p["dtype"].name, BWD_TOL[p["dtype"].name],
                                  label)


@settings(max_examples=_examples(15))
@given(p=attention_problems())
def test_float64_gradients_match_finite_differences(p):
    """What torch.autograd.gradcheck will ask of the float64 path: the backward is the
    derivative of the forward, to central-difference accuracy along a random direction."""
    p = dict(p, dtype=np.dtype(np.float64))
    rng, q, k, v, gate = make_inputs(p)
    q_sizes, kv_sizes = p["plan_q"].variable_block_sizes, p["plan_kv"].variable_block_sizes
    real = ref.valid_slots(q_sizes, p["plan_q"].tile_volume)[:, None]
    dout = normal(rng, q.shape, np.float64) * real  # pad rows are not part of the output
    _, context = vsa_nd.video_sparse_attn(q, k, v, p["topk"], q_sizes, kv_sizes, gate=gate, scale=p["scale"],
                                          return_context=True)
    grads = vsa_nd.video_sparse_attn_backward(dout, context)

    def loss(q, k, v, gate):
        out, moved = vsa_nd.video_sparse_attn(q, k, v, p["topk"], q_sizes, kv_sizes, gate=gate, scale=p["scale"],
                                              return_context=True)
        assume(np.array_equal(moved.q2k_idx, context.q2k_idx))  # the selection is held fixed
        return np.sum(dout * out)

    inputs = [q, k, v, gate]
    directions = [None if x is None else normal(rng, x.shape, np.float64) for x in inputs]
    eps = 1e-6
    plus = loss(*[x if u is None else x + eps * u for x, u in zip(inputs, directions)])
    minus = loss(*[x if u is None else x - eps * u for x, u in zip(inputs, directions)])
    numeric = (plus - minus) / (2 * eps)
    analytic = sum(np.sum(g * u) for g, u in zip(grads, directions) if u is not None)
    assert abs(numeric - analytic) <= 1e-6 * max(abs(analytic), 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_video_default_tile(dtype):
    """The video default: 3-D (4, 4, 4) tiles, D = 64, partial tiles on every axis, GQA, gate."""
    plan_q, plan_kv = vsa_nd.tile_plan((5, 6, 7)), vsa_nd.tile_plan((3, 7, 8))
    p = dict(plan_q=plan_q, plan_kv=plan_kv, batch=1, heads=4, kv_heads=2, dim=64, dtype=dtype, gate=True,
             scale=None, topk=3, seed=1234)
    check_video_sparse_attn(p)


@pytest.mark.parametrize("hand_over", [True, False], ids=["ds_handed_over", "ds_recomputed"])
def test_backward_is_deterministic(hand_over):
    """No atomics: two backward passes agree bit for bit."""
    plan = vsa_nd.tile_plan((6, 9), (4, 4))
    p = dict(plan_q=plan, plan_kv=plan, batch=2, heads=4, kv_heads=1, dim=32, dtype=np.dtype(np.float32),
             gate=False, scale=0.3, topk=math.ceil(plan.num_blocks / 2), seed=7)
    with contextlib.nullcontext() if hand_over else ds_recomputed():
        first, second = check_video_sparse_attn(p), check_video_sparse_attn(p)
    for a, b in zip(first[:3], second[:3]):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(bfloat16)], ids=lambda d: d.name)
def test_result_buffers_are_filled_and_checked(dtype):
    """``out=`` of the forward and the backward: the buffers (NaN-poisoned) are filled and
    returned, bit for bit the arrays a call without them returns; bad buffers are refused."""
    rng = np.random.default_rng(11)
    plan = vsa_nd.tile_plan((5, 6), (4, 4))
    q, gate, dout = (normal(rng, (1, 4, plan.padded_len, 16), dtype) for _ in range(3))
    k, v = (normal(rng, (1, 2, plan.padded_len, 16), dtype) for _ in range(2))
    sizes = plan.variable_block_sizes
    expected, ctx = vsa_nd.video_sparse_attn(q, k, v, 3, sizes, gate=gate, return_context=True)
    grads = vsa_nd.video_sparse_attn_backward(dout, ctx)

    out = np.full_like(q, np.nan)
    result, ctx_out = vsa_nd.video_sparse_attn(q, k, v, 3, sizes, gate=gate, return_context=True, out=out)
    assert result is out and ctx_out.out is out and out.tobytes() == expected.tobytes()
    buffers = vsa_nd.Gradients(np.full_like(q, np.nan), None, np.full_like(v, np.nan), np.full_like(gate, np.nan))
    filled = vsa_nd.video_sparse_attn_backward(dout, ctx_out, out=buffers)
    for got, buffer, want in zip(filled, buffers, grads):
        assert buffer is None or got is buffer
        assert got.tobytes() == want.tobytes()

    with pytest.raises(ValueError, match=r"out: expected shape \[1, 4, 64, 16\], got \[1, 2, 64, 16\]"):
        vsa_nd.video_sparse_attn(q, k, v, 3, sizes, gate=gate, out=np.empty_like(k))
    with pytest.raises(ValueError, match="out: expected a buffer of its own, got one that shares memory with gate"):
        vsa_nd.video_sparse_attn(q, k, v, 3, sizes, gate=gate, out=gate)
    with pytest.raises(ValueError, match="out.dk: expected a buffer of its own, got one that shares memory with out.dv"):
        shared = np.empty_like(k)
        vsa_nd.video_sparse_attn_backward(dout, ctx, out=(None, shared, shared, None))
    with pytest.raises(TypeError, match=rf"out.dq: expected dtype in \({dtype.name}\), got float64"):
        vsa_nd.video_sparse_attn_backward(dout, ctx, out=(np.empty(q.shape), None, None, None))
    # A buffer over one of the context's small arrays (here a dgate whose first rows are the
    # coarse output) would overwrite it while the backward reads it: gradients silently off.
    over_coarse = np.full_like(gate, np.nan)
    coarse = over_coarse.reshape(-1).view(ctx.coarse.dtype)[: ctx.coarse.size].reshape(ctx.coarse.shape)
    coarse[...] = ctx.coarse
    with pytest.raises(ValueError, match="out.dgate: expected a buffer of its own, got one that shares memory with "
                                         "context.coarse"):
        vsa_nd.video_sparse_attn_backward(dout, dataclasses.replace(ctx, coarse=coarse),
                                          out=(None, None, None, over_coarse))
    with pytest.raises(TypeError, match="out: expected a Gradients or a tuple"):
        vsa_nd.video_sparse_attn_backward(dout, ctx, out=[None] * 4)
    _, no_gate = vsa_nd.video_sparse_attn(q, k, v, 3, sizes, return_context=True)
    with pytest.raises(ValueError, match="out: expected dgate None"):
        vsa_nd.video_sparse_attn_backward(dout, no_gate, out=(None, None, None, np.empty_like(q)))


@pytest.mark.parametrize("dtype, magnitude", [(np.float64, 1e20), (np.float32, 1e19)])
def test_scores_far_below_zero_still_give_a_softmax(dtype, magnitude):
    """Every score of a row near -2e38 (float32) or -2e40 (float64): finite, so still a softmax
    (a running max that started at a finite floor, -3e38, gave 0 here).  The kernels keep scores
    in log2 units, scale * log2(e) * q.k, so a row whose scores lie below -FLT_MAX / log2(e)
    (-2.36e38 in float32) overflows to -inf there and still gets 0: the compute dtype's range."""
    rng = np.random.default_rng(3)
    q = np.full((1, 1, 8, 1), magnitude, dtype)
    k = (-2.218 * q * rng.uniform(0.99, 1.0, q.shape)).astype(dtype)
    v = rng.standard_normal(q.shape).astype(dtype)
    sizes, idx = np.array([4, 4], np.int32), np.array([0, 1], np.int32).reshape(1, 1, 2, 1)
    out, lse = vsa_nd.block_sparse_attn(q, k, v, sizes, idx, return_lse=True)
    expect, expect_lse = ref.block_sparse_attn(q, k, v, ref.block_map_from_indices(idx, np.full((1, 1, 2), 1), 2), sizes, 4)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, expect_lse, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, bfloat16, np.float64])
def test_backward_gives_nan_for_rows_whose_lse_float32_cannot_resolve(dtype):
    """The backward rebuilds P = 2**(s - lse) from the lse, whose float32 rounding (|lse| * 2**-24)
    becomes P's relative error.  A row with |lse| beyond 2**20 gets NaN gradients (its dq, and dk
    and dv of the key tiles it selected) rather than silently wrong ones; every other gradient is
    as accurate as usual.  A float64 lse resolves it: no NaN there."""
    plan, q, k, v, dout = huge_lse_problem(dtype, 32, seed=5)
    out, ctx = vsa_nd.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes, return_context=True)
    assert np.isfinite(np.asarray(out, np.float64)).all()
    grads = vsa_nd.video_sparse_attn_backward(dout, ctx)
    if dtype is np.float64:
        assert all(np.isfinite(g).all() for g in grads[:3])
        return
    check_huge_lse_gradients(plan, q, k, v, dout, out, ctx.lse, ctx.q2k_idx, ctx.q2k_num, grads,
                             BWD_TOL[np.dtype(dtype).name])


@pytest.mark.parametrize("dtype", [np.float32, bfloat16])
@pytest.mark.parametrize("target", [1.5e6, 9e5])
def test_backward_nan_exactly_where_lse_passes_the_limit(dtype, target):
    """The limit itself (2**20 on |lse|, both signs): rows with lse 1.5e6 and about -1.5e6 get
    NaN gradients, rows with lse 9e5 and about -9e5 finite ones (a limit of 2**24, or of lse
    rather than |lse|, failed none of the other tests)."""
    plan, q, k, v, dout = huge_lse_problem(dtype, 32, seed=7, target=target)
    out, ctx = vsa_nd.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes, return_context=True)
    assert abs(ctx.lse[0, 0, 133] / target - 1) < 5e-3 and abs(ctx.lse[0, 0, 134] / target + 1) < 5e-3
    grads = vsa_nd.video_sparse_attn_backward(dout, ctx)
    check_huge_lse_gradients(plan, q, k, v, dout, out, ctx.lse, ctx.q2k_idx, ctx.q2k_num, grads,
                             BWD_TOL[np.dtype(dtype).name], expect_nan=target > 2**20, huge_rows=(133, 134))


@pytest.mark.parametrize("dtype", [np.float32, bfloat16])
def test_backward_lse_limit_is_strict_at_2_to_the_20(dtype):
    """The limit's edge, as CUDA draws it (|lse| > 2**20): a real row whose float32 lse is
    exactly +-2**20 gets finite gradients, one a float32 step past it NaN (the lse is set by
    hand, so only finiteness is checked, not accuracy)."""
    rng = np.random.default_rng(12)
    plan = vsa_nd.tile_plan((5, 6), (4, 4))
    q, dout = (normal(rng, (1, 2, plan.padded_len, 16), dtype) for _ in range(2))
    k, v = (normal(rng, (1, 2, plan.padded_len, 16), dtype) for _ in range(2))
    _, ctx = vsa_nd.video_sparse_attn(q, k, v, 2, plan.variable_block_sizes, return_context=True)
    assert ctx.lse.dtype == np.float32
    for edge in (2.0**20, -(2.0**20)):
        for value, nan in ((edge, False), (np.nextafter(np.float32(edge), np.float32(2 * edge)), True)):
            lse = ctx.lse.copy()
            lse[0, 1, 5] = value  # a real row of the first tile
            dq = vsa_nd.video_sparse_attn_backward(dout, dataclasses.replace(ctx, lse=lse)).dq
            assert np.isnan(np.asarray(dq[0, 1, 5], np.float64)).all() == nan, (value, nan)
            assert np.isfinite(np.asarray(dq[0, 1, 6], np.float64)).all()


def test_coarse_attn_returns_the_scores_and_the_coarse_output():
    """The public coarse_attn (video_sparse_attn does not call it): raw scaled scores (not their
    softmax) with the default scale 1/sqrt(D), and softmax(scores) v, kv heads shared by GQA groups."""
    rng = np.random.default_rng(1)
    b, h, h_kv, n_q, n_kv, d = 2, 4, 2, 3, 5, 16
    q_c = rng.standard_normal((b, h, n_q, d))
    k_c, v_c = (rng.standard_normal((b, h_kv, n_kv, d)) for _ in range(2))
    scores, o_c = vsa_nd.coarse_attn(q_c, k_c, v_c)
    k_rep, v_rep = (np.repeat(x, h // h_kv, axis=1) for x in (k_c, v_c))
    want = q_c @ k_rep.transpose(0, 1, 3, 2) / np.sqrt(d)
    np.testing.assert_allclose(scores, want, rtol=1e-12, atol=1e-12)
    p = np.exp(want - want.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(o_c, p @ v_rep, rtol=1e-12, atol=1e-12)
    scores_half, _ = vsa_nd.coarse_attn(q_c, k_c, v_c, scale=0.5)
    np.testing.assert_allclose(scores_half, want * np.sqrt(d) * 0.5, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(bfloat16)])
def test_rows_whose_first_keys_score_minus_inf_or_round_to_minus_zero(dtype):
    """The cases the CUDA kernels are tested for, as a check of the CPU backend's own softmax
    (which marks rows without a finite score by -inf, not -0): a row whose first selected tile
    scores -inf everywhere gets the softmax of its later keys, as in the reference; a row that
    selects only such tiles gets NaN; scores of -2^-120 at a scale of 1e-10 (whose scaled max
    rounds to -0) do not keep the later keys' larger scores from rescaling."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 1, 256, 32)).astype(np.float32) for _ in range(3))
    q[..., 0] = np.abs(q[..., 0]) + 0.1
    k[..., 64:128, 0] = -np.inf  # key tile 1
    idx = np.array([[[[1, 0, 2], [1, 2, 3], [0, 1, 3], [1, 3, 0]]]], np.int32)
    num = np.array([[[3, 1, 3, 3]]], np.int32)  # query tile 1 selects tile 1 only
    sizes = np.full(4, 64, np.int32)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    out, lse = vsa_nd.block_sparse_attn(q, k, v, sizes, idx, num, return_lse=True)
    with np.errstate(invalid="ignore"):
        expected, expected_lse = ref.block_sparse_attn(q, k, v, ref.block_map_from_indices(idx, num, 4), sizes, 64)
    only_inf = np.zeros(256, bool)
    only_inf[64:128] = True
    assert np.isnan(np.asarray(out, np.float64)[0, 0, only_inf]).all() and np.isnan(lse[0, 0, only_inf]).all()
    assert np.isnan(expected[0, 0, only_inf]).all()
    assert rel_err(out[0, 0, ~only_inf], expected[0, 0, ~only_inf]) <= FWD_TOL[dtype.name]
    np.testing.assert_allclose(lse[0, 0, ~only_inf], expected_lse[0, 0, ~only_inf], rtol=1e-5, atol=1e-5)

    q, k, v = (np.zeros((1, 1, 128, 32), np.float32) for _ in range(3))
    q[..., 0], q[..., 1] = 2.0**-60, 1.0
    k[..., :64, 0] = -(2.0**-60)
    k[..., 64, 1] = 2.0**40
    v[..., :64, :], v[..., 64, :] = 1.0, -1.0
    idx, sizes = np.array([[[[0, 1], [1, 0]]]], np.int32), np.full(2, 64, np.int32)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    out = vsa_nd.block_sparse_attn(q, k, v, sizes, idx, scale=1e-10)
    np.testing.assert_allclose(np.asarray(out, np.float64), -1.0, atol=1e-2)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_backward_of_rows_whose_first_tile_overflows_to_minus_inf(head_dim):
    """As the CUDA test of the same name: even query rows whose scores with their first key tile
    overflow float32 to -inf get the later keys' softmax and finite gradients, as in the float64
    reference."""
    plan, q, k, v, dout, topk = first_tile_overflow_problem(np.dtype(bfloat16), head_dim, seed=head_dim)
    with np.errstate(over="ignore"):
        out, context = vsa_nd.video_sparse_attn(q, k, v, topk, plan.variable_block_sizes, return_context=True)
        grads = vsa_nd.video_sparse_attn_backward(dout, context)
    check_first_tile_overflow(plan, q, k, v, dout, context.out, context.lse, context.q2k_idx, context.q2k_num, grads,
                              BWD_TOL["bfloat16"])


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(bfloat16)])
def test_block_mean_of_tiles_whose_sums_pass_float32s_range(dtype):
    """Tile means that fit where the tile's sum does not (3e38 in every row of a tile): the
    mean, not inf, as in the float64 reference (an infinite input still gives inf)."""
    x, sizes, infinite = huge_tile_sums(dtype)
    check_huge_tile_means(vsa_nd.block_mean(x, sizes), x, sizes, infinite, 1e-5)  # means in float32 either way


_FORK_SCRIPT = """
import multiprocessing as mp, sys
import numpy as np, vsa_nd
plan = vsa_nd.tile_plan((4, 8, 8), (2, 4, 4))
q = np.random.default_rng(0).standard_normal((1, 2, plan.padded_len, 16)).astype(np.float32)
def work(_):
    return float(vsa_nd.video_sparse_attn(q, q, q, 2, plan.variable_block_sizes).sum())
if __name__ == "__main__":
    if sys.argv[1] == "parent-first":
        print("parent", work(0), flush=True)
    with mp.get_context("fork").Pool(2) as pool:
        try:
            print("children", pool.map(work, range(2)), flush=True)
        except RuntimeError as error:
            print("refused:", error, flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "register_at_fork") or sys.platform != "linux", reason="fork: Linux")
@pytest.mark.parametrize("order", ["parent-first", "children-only"])
def test_a_forked_child_is_refused_by_name_rather_than_left_hanging(order):
    """GNU OpenMP (Numba's omp layer) cannot run in a child forked after its threads started:
    the child used to be terminated and the pool to wait for it for ever.  Now the child's call
    raises vsa_nd's error, which reaches the parent; a fork before any kernel ran still works."""
    layer = _threading_layer_in_a_fresh_process()
    try:
        result = subprocess.run([sys.executable, "-c", _FORK_SCRIPT, order], capture_output=True, text=True,
                                timeout=180)
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(f"the pool hung; output: {timeout.stdout!r}")
    assert result.returncode == 0, result.stderr
    if order == "parent-first" and layer == "omp":  # (GNU OpenMP on Linux; TBB would be fork-safe)
        assert "refused: vsa_nd: this process was forked" in result.stdout and "spawn" in result.stdout
    else:
        assert "children [" in result.stdout, result.stdout


def _threading_layer_in_a_fresh_process() -> str:
    """Numba's threading layer once a parallel kernel has run (a fresh process: the layer is chosen once)."""
    code = ("import numpy as np, numba, vsa_nd; p = vsa_nd.tile_plan((4,), (4,)); q = np.ones((1, 1, 4, 4), np.float32); "
            "vsa_nd.video_sparse_attn(q, q, q, 1, p.variable_block_sizes); print(numba.threading_layer())")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180).stdout.strip()


_THREADS_SCRIPT = """
import threading, numba, numpy as np, vsa_nd
plan = vsa_nd.tile_plan((4, 8, 8), (4, 4, 4))
rng = np.random.default_rng(0)
q, k, v, dout = (rng.standard_normal((2, 2, plan.padded_len, 32)).astype(np.float32) for _ in range(4))
def step():
    out, ctx = vsa_nd.video_sparse_attn(q, k, v, 2, plan.variable_block_sizes, return_context=True)
    return [out, *vsa_nd.video_sparse_attn_backward(dout, ctx)[:3]]
alone, results, start = step(), [None] * 4, threading.Barrier(4)
def worker(i):
    start.wait()
    results[i] = [step() for _ in range(5)]
threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
for t in threads: t.start()
for t in threads: t.join()
assert all(np.array_equal(a, b) for r in results for got in r for a, b in zip(got, alone))
print(numba.threading_layer(), "ok")
"""


@pytest.mark.parametrize("layer", ["workqueue", "default"])
def test_host_calls_from_several_threads_at_once(layer):
    """Four Python threads call the forward and backward at once, five rounds, and get the
    results of the calls run alone.  Numba's workqueue layer (the one without OpenMP or TBB, and
    vsa_nd's advice for forked workers) ends the process on concurrent parallel kernels: vsa_nd
    serialises host calls there (before: "Concurrent access has been detected", SIGABRT)."""
    env = dict(os.environ, NUMBA_THREADING_LAYER=layer)
    result = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
    if layer == "workqueue":
        assert result.stdout.startswith("workqueue"), result.stdout


@pytest.mark.parametrize("head_dim", [40, 96])
def test_zero_padding_the_head_dim_is_exact(head_dim):
    """The remedy the CUDA backend's error names for a head dim it lacks (cuda_attention's
    _head_dim_remedy): VSA of q, k, v and gate zero-padded along D, with the scale of the real D,
    gives in its first D columns the output and the gradients of the unpadded inputs (float64,
    to 1e-12), and zeros in the padded columns."""
    padded = padded_head_dim(head_dim)
    plan = vsa_nd.tile_plan((5, 6, 7), (2, 4, 4))  # partial tiles
    rng = np.random.default_rng(head_dim)
    q, gate, dout = (rng.standard_normal((2, 4, plan.padded_len, head_dim)) for _ in range(3))
    k, v = (rng.standard_normal((2, 2, plan.padded_len, head_dim)) for _ in range(2))
    sizes, scale = plan.variable_block_sizes, head_dim ** -0.5
    out, ctx = vsa_nd.video_sparse_attn(q, k, v, 4, sizes, gate=gate, return_context=True)
    grads = vsa_nd.video_sparse_attn_backward(dout, ctx)
    pad = lambda x: np.pad(x, [(0, 0)] * 3 + [(0, padded - head_dim)])  # noqa: E731
    out_p, ctx_p = vsa_nd.video_sparse_attn(*map(pad, (q, k, v)), 4, sizes, gate=pad(gate), scale=scale,
                                            return_context=True)
    grads_p = vsa_nd.video_sparse_attn_backward(pad(dout), ctx_p)
    for name, got, want in [("out", out_p, out), *((n, getattr(grads_p, n), getattr(grads, n))
                                                   for n in ("dq", "dk", "dv", "dgate"))]:
        np.testing.assert_allclose(got[..., :head_dim], want, rtol=1e-12, atol=1e-12, err_msg=name)
        assert not got[..., head_dim:].any(), name


_CACHE_SCRIPT = """
import sys
import numpy as np, vsa_nd
rng = np.random.default_rng(5)
results = {}
for dtype, volume, dim in ((np.float32, 64, 64), (np.float32, 64, 128), (np.float64, 32, 64)):
    plan = vsa_nd.tile_plan((8, 8, 8), (4, 4, 4) if volume == 64 else (2, 4, 4))
    q, dout, gate = (rng.standard_normal((1, 4, plan.padded_len, dim)).astype(dtype) for _ in range(3))
    k, v = (rng.standard_normal((1, 2, plan.padded_len, dim)).astype(dtype) for _ in range(2))
    out, ctx = vsa_nd.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes, gate=gate, return_context=True)
    grads = vsa_nd.video_sparse_attn_backward(dout, ctx)
    for name, x in zip(("out", "lse", "dq", "dk", "dv", "dgate"), (out, ctx.lse, *grads)):
        results[f"{np.dtype(dtype).name}-{volume}-{dim}-{name}"] = x
np.savez(sys.argv[1], **results)
from numba.core.registry import CPUDispatcher
from vsa_nd.backends import numba_cpu
kernels = [k for k in vars(numba_cpu).values() if isinstance(k, CPUDispatcher)]
print("cache hits", sum(sum(k.stats.cache_hits.values()) for k in kernels),
      "misses", sum(sum(k.stats.cache_misses.values()) for k in kernels))
"""


def test_a_process_that_compiles_the_kernels_rounds_as_one_that_loads_them_from_the_cache(tmp_path):
    """Full VSA forward and backward (GQA, gate; 64-slot tiles in float32 at both head dims, 32 in
    float64: the rows long enough for the kernels' four vector partial sums) in a process that
    compiles the Numba kernels into an empty cache, then in one that loads them from it: bit for
    bit the same results.  With the nsz fast-math flag, LLVM re-balanced the cached copy of a
    kernel's prange body differently from the body the compiling process runs (see _FASTMATH)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    runs, counts = [], []
    for run in ("compiled", "cached"):
        path = tmp_path / f"{run}.npz"
        result = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, str(path)], capture_output=True, text=True,
                                env=env, timeout=900)
        assert result.returncode == 0, result.stderr
        runs.append(np.load(path))
        words = result.stdout.split()
        counts.append((int(words[words.index("hits") + 1]), int(words[words.index("misses") + 1])))
    # The first process compiled every kernel it ran, the second compiled none (it loaded the kernels it
    # called from the cache, and those kernels hold their callees).
    (hits, misses), (hits_again, misses_again) = counts
    assert hits == 0 and misses > 0 and hits_again > 0 and misses_again == 0, counts
    compiled, cached = runs
    assert sorted(compiled.files) == sorted(cached.files) and len(compiled.files) == 18
    for name in compiled.files:
        assert np.isfinite(compiled[name]).all() and np.abs(compiled[name]).max() > 0, name
        assert np.array_equal(compiled[name], cached[name]), name
