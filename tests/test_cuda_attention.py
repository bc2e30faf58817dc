"""The CUDA block-sparse attention forward against the NumPy reference (GPU only).

Inputs are random everywhere; key/value pad slots hold NaN to prove they never leak.
Outputs are poisoned (NaN) before every launch, so an unwritten element fails the test.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import vsa_nd
from vsa_nd import reference
from vsa_nd._xp import BFLOAT16

from attention_problems import cleaned_lists, lse_error, problems, random_inputs, spoil_lists, worst_row_error

pytestmark = pytest.mark.gpu

TOLERANCE = {np.dtype(np.float16): 3e-3, BFLOAT16: 1e-2}  # norm-relative, the whole output
ROW_TOLERANCE = {np.dtype(np.float16): 5e-3, BFLOAT16: 3e-2}  # the worst row (attention_problems.worst_row_error)
LSE_TOLERANCE = 1e-5  # attention_problems.lse_error


def _check_out(out, ref, dtype):
    """out against the reference: the whole array, and its worst row."""
    err, row = _rel_err(out, ref), worst_row_error(out, ref)
    assert err <= TOLERANCE[dtype], f"out: relative error {err:.2e}"
    assert row <= ROW_TOLERANCE[dtype], f"out: worst row's relative error {row:.2e}"


@pytest.fixture(params=["auto", "mma"])
def poisoned(request, monkeypatch):
    """Every array the CUDA backend allocates (the attention launcher's outputs and the VSA
    forward's results and workspace) starts as 0xFF bytes (NaN in every float type, -1 in
    int32); runs each test with the default kernel (wgmma on Hopper) and with the portable
    mma.sync kernel."""
    import cupy

    from vsa_nd.backends import cuda, cuda_attention

    def alloc(shape, dtype):
        out = cupy.empty(shape, dtype)
        out.view(cupy.uint8).fill(0xFF)
        return out

    monkeypatch.setattr(cuda, "_alloc", alloc)
    monkeypatch.setattr(cuda_attention, "_alloc", alloc)
    monkeypatch.setattr(cuda_attention, "FORWARD_KERNEL", request.param)


def _rel_err(x, ref):
    """Norm-relative error (absolute where the reference is all zeros: rows that select nothing)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1.0)


def _against_reference(q, k, v, kv_sizes, q2k_idx, q2k_num, scale=None):
    """block_sparse_attn on the GPU (tile volume 64) and the float64 reference on the same NumPy
    inputs: (out as float64, lse, reference out, reference lse), all NumPy."""
    import cupy

    out, lse = vsa_nd.block_sparse_attn(*(cupy.asarray(x) for x in (q, k, v, kv_sizes, q2k_idx, q2k_num)),
                                        scale=scale, return_lse=True)
    block_map = reference.block_map_from_indices(q2k_idx, q2k_num, len(kv_sizes))
    with np.errstate(invalid="ignore", over="ignore"):  # rows of -inf or NaN scores: 0 / 0
        ref_out, ref_lse = reference.block_sparse_attn(q, k, v, block_map, kv_sizes, 64, scale=scale)
    return np.asarray(cupy.asnumpy(out), np.float64), cupy.asnumpy(lse), ref_out, ref_lse


@given(problems(max_tokens=1200, groups=(1, 3)), st.data())
def test_block_sparse_attn_matches_reference(poisoned, p, data):
    import cupy

    rng = np.random.default_rng(p["seed"])
    q, k, v = random_inputs(p, rng)
    n_q, n_kv = p["q_plan"].num_blocks, p["kv_plan"].num_blocks
    b, h = q.shape[:2]
    length = data.draw(st.integers(1, n_kv))
    # Random distinct tiles per row, random counts 0..length (a count of 0 selects nothing).
    q2k_idx = np.argsort(rng.random((b, h, n_q, n_kv)), axis=-1)[..., :length].astype(np.int32)
    q2k_num = rng.integers(0, length + 1, size=(b, h, n_q)).astype(np.int32)
    kv_sizes = p["kv_plan"].variable_block_sizes
    # Half the time with query block sizes, and NaN in q's pad slots: those rows must come out 0, lse -inf.
    q_sizes = p["q_plan"].variable_block_sizes if data.draw(st.booleans(), label="q_block_sizes") else None
    real = reference.valid_slots(p["q_plan"].variable_block_sizes, p["volume"])
    if q_sizes is not None:
        q[:, :, ~real] = np.nan

    out, lse = vsa_nd.block_sparse_attn(
        cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), cupy.asarray(kv_sizes),
        cupy.asarray(q2k_idx), cupy.asarray(q2k_num), return_lse=True,
        q_block_sizes=None if q_sizes is None else cupy.asarray(q_sizes),
    )
    block_map = reference.block_map_from_indices(q2k_idx, q2k_num, n_kv)
    ref_out, ref_lse = reference.block_sparse_attn(q, k, v, block_map, kv_sizes, p["volume"], q_block_sizes=q_sizes)
    out, lse = cupy.asnumpy(out), cupy.asnumpy(lse)

    assert np.isfinite(np.asarray(out, np.float32)).all()
    _check_out(out, ref_out, p["dtype"])
    empty = np.repeat(q2k_num == 0, p["volume"], axis=-1)
    if q_sizes is not None:
        assert (np.asarray(out[:, :, ~real], np.float32) == 0).all()
        empty |= ~real
    assert np.all(lse[empty] == -np.inf)
    assert lse_error(lse[~empty], ref_lse[~empty]) <= LSE_TOLERANCE


@given(problems(max_tokens=1200, groups=(1, 3)), st.data())
def test_video_sparse_attn_matches_reference(poisoned, p, data):
    import cupy

    rng = np.random.default_rng(p["seed"])
    q, k, v = random_inputs(p, rng)
    gate = rng.standard_normal(q.shape).astype(p["dtype"]) if p["gated"] else None
    topk = p["topk"]
    q_sizes, kv_sizes = p["q_plan"].variable_block_sizes, p["kv_plan"].variable_block_sizes
    scale = data.draw(st.sampled_from([None, 0.05]))
    real = reference.valid_slots(q_sizes, p["volume"])
    if data.draw(st.booleans(), label="NaN in q's and gate's pad slots"):  # tile() leaves 0 there
        for x in (q, gate):
            if x is not None:
                x[:, :, ~real] = np.nan

    gpu = lambda x: None if x is None else cupy.asarray(x)  # noqa: E731
    out, context = vsa_nd.video_sparse_attn(
        gpu(q), gpu(k), gpu(v), topk, gpu(q_sizes), gpu(kv_sizes), gate=gpu(gate), scale=scale, return_context=True
    )
    ref = reference.video_sparse_attn(q, k, v, q_sizes, kv_sizes, topk, p["volume"], scale=scale, gate=gate)
    out, lse = cupy.asnumpy(out), cupy.asnumpy(context.lse)
    # Pad rows are not part of the output: exactly 0 (the poison was NaN), lse -inf.
    assert (np.asarray(out[:, :, ~real], np.float32) == 0).all() and (lse[:, :, ~real] == -np.inf).all()
    assert np.isfinite(np.asarray(out, np.float32)).all()
    _check_out(out[:, :, real], ref.out[:, :, real], p["dtype"])
    assert lse_error(lse[:, :, real], ref.lse[:, :, real]) <= LSE_TOLERANCE


def test_forward_is_deterministic_and_stream_ordered():
    """Same inputs twice -> bit-identical outputs, also when launched on a non-default stream."""
    import cupy

    plan = vsa_nd.tile_plan((8, 12, 20))
    rng = np.random.default_rng(7)
    shape = (1, 4, plan.padded_len, 128)
    q, k, v = (cupy.asarray(rng.standard_normal(shape).astype(BFLOAT16)) for _ in range(3))
    sizes = cupy.asarray(plan.variable_block_sizes)
    first = vsa_nd.video_sparse_attn(q, k, v, 5, sizes)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        second = vsa_nd.video_sparse_attn(q, k, v, 5, sizes)
    stream.synchronize()
    assert cupy.array_equal(first.view(cupy.uint16), second.view(cupy.uint16))


def test_kernel_limits_are_reported_before_launch():
    import cupy

    plan = vsa_nd.tile_plan((4, 4, 4))
    sizes = cupy.asarray(plan.variable_block_sizes)
    x = cupy.ones((1, 1, plan.padded_len, 32), np.float16)
    with pytest.raises(ValueError, match=r"head dim 64 or 128, got 32; zero-pad q, k, v \(and gate\) to 64 along the "
                                         r"last axis and pass the scale explicitly \(32\*\*-0.5 by default"):
        vsa_nd.block_sparse_attn(x, x, x, sizes, cupy.zeros((1, 1, 1, 1), np.int32))
    y = cupy.ones((1, 1, plan.padded_len, 192), np.float16)
    with pytest.raises(ValueError, match=r"head dim 64 or 128, got 192; run such heads on the CPU"):
        vsa_nd.video_sparse_attn(y, y, y, 1, sizes)
    x = cupy.ones((1, 1, plan.padded_len, 64), np.float32)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        vsa_nd.block_sparse_attn(x, x, x, sizes, cupy.zeros((1, 1, 1, 1), np.int32))
    small = vsa_nd.tile_plan((4, 4, 4), (2, 4, 4))  # tiles of 32 slots
    x = cupy.ones((1, 1, small.padded_len, 64), np.float16)
    for call in (lambda: vsa_nd.video_sparse_attn(x, x, x, 1, cupy.asarray(small.variable_block_sizes)),
                 lambda: vsa_nd.block_sparse_attn(x, x, x, cupy.asarray(small.variable_block_sizes),
                                                  cupy.zeros((1, 1, 2, 1), np.int32))):
        with pytest.raises(ValueError, match="q: the CUDA attention kernels take tile volumes that are multiples of "
                                             "64, got 32"):
            call()


def _keys_at_levels(log2_scores, head_dim: int, dtype, rng) -> tuple:
    """k and v of 2 heads and len(log2_scores) key tiles of 64, whose tile j scores about
    log2_scores[j] (log2 units, at the default scale) against a q row of ones; v random."""
    scale = head_dim ** -0.5
    level = np.repeat(np.asarray(log2_scores) / (np.log2(np.e) * scale * head_dim), 64)  # per key
    n = 64 * len(log2_scores)
    k = (level[None, None, :, None] + 0.02 * rng.standard_normal((1, 2, n, head_dim))).astype(dtype)
    return k, rng.standard_normal((1, 2, n, head_dim)).astype(dtype)


def _check_all_rows(q, k, v, lists, dtype) -> np.ndarray:
    """q's two query tiles of 64 rows (2 heads) against every key tile of k, in the orders of
    ``lists`` [2, N_kv] (one per query tile): out finite and close to the reference, lse too.
    Returns the reference's lse."""
    n_kv = lists.shape[-1]
    q2k_idx = np.ascontiguousarray(np.broadcast_to(lists.astype(np.int32), (1, 2, 2, n_kv)))
    q2k_num = np.full((1, 2, 2), n_kv, np.int32)
    out, lse, ref_out, ref_lse = _against_reference(q, k, v, np.full(n_kv, 64, np.int32), q2k_idx, q2k_num)
    assert np.isfinite(out).all()
    _check_out(out, ref_out, np.dtype(dtype))
    assert lse_error(lse, ref_lse) <= LSE_TOLERANCE
    return ref_lse


# Each key tile's score (log2 units, the same for every query row up to noise) in list order:
# the running max jumps by more than the kernels' RESCALE_SLACK (8) at entries 1, 4 and 6, rises
# by less (the max stays put, P up to 2^1) at 2 and 8, and falls elsewhere; the last four tiles
# weigh about alike, so an error in any rescale or in a stale max shows in out and lse.
RISING_LOG2_SCORES = (0.0, 9.0, 9.5, 3.0, 18.0, 17.0, 25.0, 24.5, 26.0, 25.5)


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("mixed", [False, True], ids=["rows_alike", "rows_mixed"])
def test_scores_that_rise_in_jumps_match_reference(poisoned, dtype, head_dim, mixed):
    """The online softmax moves its running max only past a slack (attention_common.cuh): scores
    whose max rises by more and by less than it, in list order, and in the reverse order (the
    largest first), against the reference.  `mixed`: in every 16 query rows (a warp's), the last
    8 have q negated, so their scores fall where the others rise: within a warp (and a thread,
    which holds rows r and r + 8) some rows move their max while the others keep theirs."""
    rng = np.random.default_rng(head_dim)
    sign = np.where(np.arange(128) % 16 < 8, 1.0, -1.0 if mixed else 1.0)  # per query row
    q = (sign[:, None] * (1.0 + 0.02 * rng.standard_normal((1, 2, 128, head_dim)))).astype(dtype)
    k, v = _keys_at_levels(RISING_LOG2_SCORES, head_dim, dtype, rng)
    order = np.arange(len(RISING_LOG2_SCORES), dtype=np.int32)
    ref_lse = _check_all_rows(q, k, v, np.stack([order, order[np.argsort(RISING_LOG2_SCORES)[::-1]]]), dtype)
    rising = ref_lse[..., sign > 0]
    assert rising.min() > 25.0 * np.log(2)  # the scores reached the levels meant (lse in natural log)


# Key tiles' scores (log2 units) for the rows that rise: each tile 70 above the last, far past
# what one row's probabilities relative to another row's max could keep (2^-70 underflows fp16,
# 2^-140 is a float32 subnormal, which the kernels' exp2 flushes to 0, and 2^-210 is 0).
FAR_LOG2_SCORES = (0.0, 70.0, 140.0, 210.0)


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("flat", ["first_8", "last_8"])
def test_a_row_keeps_its_own_max_while_the_other_row_of_its_thread_rises_far(poisoned, dtype, head_dim, flat):
    """A thread of the attention kernels holds query rows r and r + 8 of its warp's 16, with one
    running max each.  Here, in every 16 rows, 8 (the first or the last) have q = 0, so every key
    scores 0 and weighs alike, while the other 8 rise by 70 log2 units from key tile to key tile.
    A flat row that took the rising row's max would scale its tiles by 2^-70 and far less, and
    lose them: every row must match the reference, lse included."""
    rng = np.random.default_rng(head_dim + (flat == "last_8"))
    n_kv = len(FAR_LOG2_SCORES)
    rises = (np.arange(128) % 16 < 8) == (flat == "last_8")  # per query row
    noise = 0.02 * rng.standard_normal((1, 2, 128, head_dim))
    q = np.where(rises[:, None], 1.0 + noise, 0.0).astype(dtype)
    k, v = _keys_at_levels(FAR_LOG2_SCORES, head_dim, dtype, rng)
    ref_lse = _check_all_rows(q, k, v, np.stack([np.arange(n_kv)] * 2), dtype)
    assert ref_lse[..., rises].min() > 200.0 * np.log(2)  # the scores reached the levels meant
    assert np.allclose(ref_lse[..., ~rises], np.log(64 * n_kv))  # flat rows: every key alike


@pytest.mark.parametrize("head_dim", [64, 128])
def test_rows_past_the_float32_range_are_never_silently_wrong(poisoned, head_dim):
    """q scaled so that rows' |lse| spans ~1e8 to ~1e11: from ~1.5e9 the float32 running max
    (log2 units) reaches 2^31 and the softmax fails.  A failed row must come out non-finite (it
    once came out 0 with an lse of -inf); every row whose output is finite matches the reference,
    its lse too."""
    rng = np.random.default_rng(head_dim)
    n_kv, topk = 6, 3
    q = rng.standard_normal((1, 2, 256, head_dim)).astype(np.float32)
    q[0, 0] *= np.logspace(8, 11, 256)[:, None] / 2.5  # head 0: lse ~ the factor's 2.5
    q, k, v = (x.astype(BFLOAT16) for x in (q, *rng.standard_normal((2, 1, 2, 64 * n_kv, head_dim))))
    q2k_idx = np.stack([rng.permutation(n_kv)[:topk] for _ in range(8)]).astype(np.int32).reshape(1, 2, 4, topk)
    q2k_num = np.full((1, 2, 4), topk, np.int32)
    kv_sizes = np.full(n_kv, 64, np.int32)

    out, lse, ref_out, ref_lse = _against_reference(q, k, v, kv_sizes, q2k_idx, q2k_num)
    finite = np.isfinite(out).all(axis=-1)
    assert not finite[0, 0].all()  # the set-up reaches the failure
    assert finite[0, 0, :32].all() and finite[0, 1].all()  # |lse| below ~3e8, and head 1's unit scores
    error = np.abs(out - ref_out).max(axis=-1) / np.abs(ref_out).max(axis=-1)
    assert (error[finite] <= TOLERANCE[BFLOAT16]).all(), error[finite].max()
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_rows_without_keys_give_0_and_rows_of_minus_inf_or_nan_scores_give_nan(poisoned, head_dim):
    """As in the reference: a row that selects no key gets out 0 and lse -inf; a row whose
    every score is -inf (an input holding -inf) or NaN gets out and lse NaN (0 / 0); no other
    row changes."""
    rng = np.random.default_rng(head_dim)
    n_kv, topk = 4, 2
    q, k, v = (rng.standard_normal((1, 1, 64 * n_kv, head_dim)).astype(np.float32) for _ in range(3))
    k[..., 0] = np.abs(k[..., 0]) + 0.1
    q[0, 0, 5] = 0
    q[0, 0, 5, 0] = -np.inf  # q . k = -inf for every key
    q[0, 0, 70, 3] = np.nan
    q, k, v = (x.astype(BFLOAT16) for x in (q, k, v))
    q2k_idx = np.stack([rng.permutation(n_kv)[:topk] for _ in range(n_kv)]).astype(np.int32).reshape(1, 1, n_kv, topk)
    q2k_num = np.array([[[topk, topk, 0, 1]]], np.int32)  # query tile 2 selects nothing
    kv_sizes = np.full(n_kv, 64, np.int32)

    out, lse, ref_out, ref_lse = (x[0, 0] for x in _against_reference(q, k, v, kv_sizes, q2k_idx, q2k_num))
    for row in (5, 70):
        assert np.isnan(out[row]).all() and np.isnan(lse[row]), row
        assert np.isnan(ref_out[row]).all() and np.isnan(ref_lse[row]), row
    no_key = slice(128, 192)
    assert (out[no_key] == 0).all() and (lse[no_key] == -np.inf).all()
    assert (ref_out[no_key] == 0).all() and (ref_lse[no_key] == -np.inf).all()
    rest = np.ones(64 * n_kv, bool)
    rest[[5, 70]], rest[no_key] = False, False
    assert np.isfinite(out[rest]).all()
    assert _rel_err(out[rest], ref_out[rest]) <= TOLERANCE[BFLOAT16]
    np.testing.assert_allclose(lse[rest], ref_lse[rest], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rows_whose_first_keys_score_minus_inf_get_the_later_keys_softmax(poisoned, head_dim, dtype):
    """A key tile whose keys score -inf for every query (k holds -inf): query tiles that select it
    first, or it and another such tile first, still get the softmax of their later keys, as in the
    reference (the kernels once gave such rows NaN); a tile that selects only -inf tiles gets NaN."""
    rng = np.random.default_rng(head_dim + 7)
    n_kv = 6
    q, k, v = (rng.standard_normal((1, 2, 64 * n_kv, head_dim)).astype(np.float32) for _ in range(3))
    q[..., 0] = np.abs(q[..., 0]) + 0.1
    k[..., 64:192, 0] = -np.inf  # key tiles 1 and 2: q . k = -inf for every query
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    lists = [[1, 0, 3, 4], [2, 1, 5, 0], [3, 1, 0, 2], [1, 2, 4, 5], [0, 1, 2, 3], [4, 5, 1, 0]]
    q2k_idx = np.array([lists, lists[1:] + lists[:1]], np.int32)[None]
    q2k_num = np.array([[[4, 4, 4, 2, 4, 4], [4, 4, 2, 4, 4, 4]]], np.int32)  # [1, 2]: only the -inf tiles
    kv_sizes = np.full(n_kv, 64, np.int32)

    out, lse, ref_out, ref_lse = (x[0] for x in _against_reference(q, k, v, kv_sizes, q2k_idx, q2k_num))
    only_inf = np.zeros((2, 64 * n_kv), bool)
    only_inf[0, 192:256], only_inf[1, 128:192] = True, True  # the query tiles whose lists are [1, 2]
    assert np.isnan(out[only_inf]).all() and np.isnan(lse[only_inf]).all()
    assert np.isnan(ref_out[only_inf]).all() and np.isnan(ref_lse[only_inf]).all()
    rest = ~only_inf
    assert np.isfinite(out[rest]).all() and np.isfinite(lse[rest]).all()
    assert _rel_err(out[rest], ref_out[rest]) <= TOLERANCE[np.dtype(dtype)]
    np.testing.assert_allclose(lse[rest], ref_lse[rest], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_softmax_marker_of_rows_without_a_finite_score(poisoned, head_dim):
    """Edge cases of the running max that marks rows without a finite score (-0), bf16:
    - a row whose first max rounds to -0 from below (scores of -2^-120 at a scale of 1e-10) is a
      row with a finite max, not a marked one: the later keys' larger scores rescale its sums;
    - warps of both kinds of rows (keys whose products overflow float32 to -inf for even query rows
      only) and rows whose first keys hold NaN (NaN, as in the reference)."""

    def run(q, k, v, lists, num, scale=None):
        q, k, v = (x.astype(BFLOAT16) for x in (q, k, v))
        q2k_idx, q2k_num = np.array(lists, np.int32)[None, None], np.array(num, np.int32)[None, None]
        kv_sizes = np.full(k.shape[2] // 64, 64, np.int32)
        return (x[0, 0] for x in _against_reference(q, k, v, kv_sizes, q2k_idx, q2k_num, scale))

    # A first max of -0 after rounding: the answer is v of tile 1's key 0 (-1), not a blend with tile 0's 1.
    q, k, v = (np.zeros((1, 1, 128, head_dim), np.float32) for _ in range(3))
    q[..., 0], q[..., 1] = 2.0**-60, 1.0
    k[..., :64, 0] = -(2.0**-60)  # q . k = -2^-120, times 1e-10 * log2(e): below float32's smallest subnormal
    k[..., 64, 1] = 2.0**40
    v[..., :64, :] = 1.0
    v[..., 64, :] = -1.0
    out, lse, ref_out, ref_lse = run(q, k, v, [[0, 1], [1, 0]], [2, 2], scale=1e-10)
    assert np.abs(out - ref_out).max() <= 2e-2 and np.abs(ref_out + 1).max() <= 1e-6
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5)

    # Both kinds of rows in a warp, and NaN first.
    rng = np.random.default_rng(head_dim + 11)
    q, k, v = (rng.standard_normal((1, 1, 256, head_dim)).astype(np.float32) for _ in range(3))
    q[..., 0:64:2, 0], q[..., 1:64:2, 0] = 8.0, 0.0
    k[..., 64:128, 0] = -(2.0**126)  # even rows of query tile 0 (the only one to select tile 1): -inf in float32
    k[..., 192:256, 0] = np.nan
    out, lse, ref_out, ref_lse = run(q, k, v, [[1, 0, 2], [3, 0, 2], [0, 2, 3], [2, 0, 3]], [3, 3, 2, 2])
    nan_rows = np.zeros(256, bool)
    nan_rows[64:128] = True  # query tile 1 selects the NaN keys first
    assert np.isnan(out[nan_rows]).all() and np.isnan(lse[nan_rows]).all() and np.isnan(ref_out[nan_rows]).all()
    assert np.isfinite(out[~nan_rows]).all() and np.isfinite(lse[~nan_rows]).all()
    assert _rel_err(out[~nan_rows], ref_out[~nan_rows]) <= TOLERANCE[BFLOAT16]
    np.testing.assert_allclose(lse[~nan_rows], ref_lse[~nan_rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["auto", "mma"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_smoke_attention(kernel, head_dim, monkeypatch):
    """A small fixed problem with many features at once (partial tiles, GQA, gate, cross
    attention, tile volume 128): the case compute-sanitizer runs."""
    import cupy

    from vsa_nd.backends import cuda_attention

    monkeypatch.setattr(cuda_attention, "FORWARD_KERNEL", kernel)
    rng = np.random.default_rng(head_dim)
    q_plan, kv_plan = vsa_nd.tile_plan((5, 6, 7), (4, 4, 8)), vsa_nd.tile_plan((3, 9, 6), (4, 4, 8))
    p = dict(q_plan=q_plan, kv_plan=kv_plan, volume=128, batch=2, heads=4, kv_heads=2, head_dim=head_dim,
             dtype=BFLOAT16)
    q, k, v = random_inputs(p, rng)
    gate = rng.standard_normal(q.shape).astype(BFLOAT16)
    out = vsa_nd.video_sparse_attn(*(cupy.asarray(x) for x in (q, k, v)), 2, cupy.asarray(q_plan.variable_block_sizes),
                                   cupy.asarray(kv_plan.variable_block_sizes), gate=cupy.asarray(gate))
    ref = reference.video_sparse_attn(q, k, v, q_plan.variable_block_sizes, kv_plan.variable_block_sizes, 2, 128,
                                      gate=gate)
    real = reference.valid_slots(q_plan.variable_block_sizes, 128)
    assert _rel_err(cupy.asnumpy(out)[:, :, real], ref.out[:, :, real]) <= TOLERANCE[BFLOAT16]


def test_smoke_unchecked_lists_never_reach_outside_k_and_v(poisoned):
    """check_indices=False on CuPy: entries outside [0, N_kv) are dropped and counts clamped to
    [0, L] on the device (no host check), so the kernels index only inside k and v, and the
    result is the attention over the entries kept (a case compute-sanitizer runs)."""
    import cupy

    from vsa_nd.backends.cuda_attention import clean_lists

    rng = np.random.default_rng(7)
    plan = vsa_nd.tile_plan((5, 6, 7), (4, 4, 4))
    p = dict(q_plan=plan, kv_plan=plan, volume=64, batch=2, heads=4, kv_heads=2, head_dim=64, dtype=BFLOAT16)
    q, k, v = random_inputs(p, rng)
    n = plan.num_blocks
    q2k_idx = np.argsort(rng.random((2, 4, n, n)), axis=-1)[..., :5].astype(np.int32)
    q2k_num = rng.integers(0, 6, size=(2, 4, n)).astype(np.int32)
    bad_idx, bad_num = spoil_lists(q2k_idx, q2k_num, n, rng)
    clean_idx, clean_num = cleaned_lists(bad_idx, bad_num, n)
    got_idx, got_num = clean_lists(cupy.asarray(bad_idx), cupy.asarray(bad_num), n)
    np.testing.assert_array_equal(cupy.asnumpy(got_idx), clean_idx)
    np.testing.assert_array_equal(cupy.asnumpy(got_num), clean_num)
    valid_idx, valid_num = clean_lists(cupy.asarray(q2k_idx), cupy.asarray(q2k_num), n)
    np.testing.assert_array_equal(cupy.asnumpy(valid_num), q2k_num)  # valid lists come out as they went in
    assert all((cupy.asnumpy(valid_idx)[r][:c] == q2k_idx[r][:c]).all() for r, c in np.ndenumerate(q2k_num))

    sizes = plan.variable_block_sizes
    out, lse = vsa_nd.block_sparse_attn(*(cupy.asarray(x) for x in (q, k, v, sizes, bad_idx, bad_num)),
                                        return_lse=True, check_indices=False)
    ref_out, ref_lse = reference.block_sparse_attn(q, k, v, reference.block_map_from_indices(clean_idx, clean_num, n),
                                                   sizes, 64)
    real = reference.valid_slots(sizes, 64)
    _check_out(cupy.asnumpy(out)[:, :, real], ref_out[:, :, real], BFLOAT16)
    lse = cupy.asnumpy(lse)
    empty = np.repeat(clean_num == 0, 64, axis=-1)
    assert np.all(lse[empty] == -np.inf)
    assert lse_error(lse[~empty & real], ref_lse[~empty & real]) <= LSE_TOLERANCE


@pytest.mark.parametrize("offset", [1, 4, 8])
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_misaligned_views_are_refused_before_launch(name, offset):
    """A contiguous view that starts 2 or 8 bytes into an allocation cannot feed 16-byte loads,
    whichever input it is; one that starts 16 bytes in can."""
    import cupy

    plan = vsa_nd.tile_plan((4, 4, 4))
    sizes = cupy.asarray(plan.variable_block_sizes)
    shape = (1, 1, plan.padded_len, 64)
    rng = np.random.default_rng(offset)
    arrays = {n: cupy.asarray(rng.standard_normal(shape).astype(np.float16)) for n in ("q", "k", "v")}
    moved = cupy.empty(int(np.prod(shape)) + offset, np.float16)[offset:].reshape(shape)
    moved[...] = arrays[name]
    given = [moved if n == name else arrays[n] for n in ("q", "k", "v")]
    if offset * 2 % 16:
        with pytest.raises(ValueError, match=f"{name}: the CUDA attention kernels need arrays starting on a 16-byte "
                                             r"boundary, got address 0x[0-9a-f]+; pass a copy \(cupy.array\(x\)\)"):
            vsa_nd.video_sparse_attn(*given, 1, sizes)
    else:
        want = vsa_nd.video_sparse_attn(arrays["q"], arrays["k"], arrays["v"], 1, sizes)
        assert cupy.array_equal(vsa_nd.video_sparse_attn(*given, 1, sizes), want)
