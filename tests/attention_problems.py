"""Random block-sparse attention problems shared by the CUDA attention tests (not a test file)."""

import numpy as np
from hypothesis import strategies as st

import vsa_nd
from vsa_nd import reference
from vsa_nd._xp import BFLOAT16

# Tile shapes per dimension count, all with volumes the CUDA kernels take (64 and 128).
TILES = {1: [(64,), (128,)], 2: [(8, 8), (8, 16)], 3: [(4, 4, 4), (4, 4, 8)], 4: [(2, 2, 4, 4)]}
DTYPES = [np.dtype(np.float16), BFLOAT16]

# Top-k rows whose k-th largest score is negative, as (row, topk, the indices chosen): every
# backend's selection orders negative scores by value, not by magnitude.
NEGATIVE_TOPK_ROWS = [
    ([-1.0, -3.0, -2.0, -0.5], 2, [0, 3]),  # the k-th largest negative: -1 above -2 and -3
    ([-2.0, 1.0, -1.0, -3.0, -1.0, -np.inf], 3, [1, 2, 4]),  # a positive, then ties among negatives
    ([-2.0, 1.0, -1.0, -3.0, -1.0, -np.inf], 2, [1, 2]),  # ... of which the lower index
    ([-np.inf, -3.4e38, -1e-45, -1.0, -1.5], 3, [2, 3, 4]),  # tiny and huge magnitudes, -inf last
]


@st.composite
def problems(draw, max_tokens: int, groups=(1, 2)):
    """q and kv plans (same tile shape, partial tiles, cross attention half the time), batch,
    heads (H_kv in {1, 2}, ``groups`` query heads per kv head), head dim, dtype, topk, gate, seed."""
    dims = draw(st.integers(1, 4))
    tile_shape = draw(st.sampled_from(TILES[dims]))

    def seq():
        shape = [draw(st.integers(1, 2 * t)) for t in tile_shape]
        while np.prod(shape) > max_tokens:
            shape[int(np.argmax(shape))] //= 2
        return tuple(max(s, 1) for s in shape)

    q_seq = seq()
    kv_seq = q_seq if draw(st.booleans()) else seq()
    kv_heads = draw(st.sampled_from([1, 2]))
    kv_plan = vsa_nd.tile_plan(kv_seq, tile_shape)
    return dict(
        q_plan=vsa_nd.tile_plan(q_seq, tile_shape),
        kv_plan=kv_plan,
        volume=int(np.prod(tile_shape)),
        batch=draw(st.integers(1, 2)),
        heads=kv_heads * draw(st.sampled_from(groups)),
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([64, 128])),
        dtype=draw(st.sampled_from(DTYPES)),
        topk=draw(st.integers(1, kv_plan.num_blocks)),
        gated=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def random_inputs(p, rng):
    """Random q, k, v as NumPy arrays in the problem's dtype; key/value pad slots hold NaN, which
    must never reach a result."""
    b, h, hk, d = p["batch"], p["heads"], p["kv_heads"], p["head_dim"]
    q = rng.standard_normal((b, h, p["q_plan"].padded_len, d)).astype(p["dtype"])
    k = rng.standard_normal((b, hk, p["kv_plan"].padded_len, d)).astype(p["dtype"])
    v = rng.standard_normal((b, hk, p["kv_plan"].padded_len, d)).astype(p["dtype"])
    pads = ~reference.valid_slots(p["kv_plan"].variable_block_sizes, p["volume"])
    k[:, :, pads] = np.nan
    v[:, :, pads] = np.nan
    return q, k, v


def force_ds_hand_over(monkeypatch):
    """Make the CUDA backward hand dS over on the tests' small problems, one (batch, kv head)
    pair per chunk at head dims 64 and 128 (within a 1 GiB budget), so that chunks of more than
    one pair run on the backward's own streams."""
    from vsa_nd.backends import cuda_attention

    for name, value in (("DS_WORKSPACE_BYTES", 1 << 30), ("_DS_MIN_BYTES", 0), ("_DS_CHUNK_PAIRS", 1),
                        ("_DS_HEAD_DIMS", (64, 128))):
        monkeypatch.setattr(cuda_attention, name, value)


def spoil_lists(q2k_idx, q2k_num, num_kv_blocks: int, rng):
    """Copies of the lists with some used entries outside [0, N_kv) (above, negative, int32's
    largest) and some counts outside [0, L]: what an unchecked list may hold."""
    idx, num = q2k_idx.copy(), q2k_num.copy()
    length = idx.shape[-1]
    used = np.arange(length) < np.clip(num, 0, length)[..., None]
    spoilt = used & (rng.random(idx.shape) < 0.3)
    idx[spoilt] = rng.choice([num_kv_blocks, num_kv_blocks + 7, -1, -3, 2**31 - 1], size=int(spoilt.sum()))
    rows = rng.random(num.shape)
    num[rows < 0.1] = -2
    num[rows > 0.9] = length + 5
    return idx, num


def cleaned_lists(q2k_idx, q2k_num, num_kv_blocks: int):
    """What the CUDA backend makes of unchecked lists (kv_lists.cu's kv_lists_clean): per row, the
    used entries inside [0, N_kv) in order, then 0; counts clamped to [0, L] first."""
    length = q2k_idx.shape[-1]
    idx, num = np.zeros_like(q2k_idx), np.zeros_like(q2k_num)
    for row in np.ndindex(q2k_num.shape):
        entries = q2k_idx[row][: min(max(int(q2k_num[row]), 0), length)]
        kept = entries[(entries >= 0) & (entries < num_kv_blocks)]
        idx[row][: kept.size], num[row] = kept, kept.size
    return idx, num


# The backward's limit on a row's |lse| (cuda_kernels/common.cuh LSE_LIMIT, numba_cpu._LSE_LIMIT).
LSE_LIMIT = 2.0**20


def huge_lse_problem(dtype, head_dim: int, seed: int, target=None):
    """Inputs of a VSA call (NumPy, tiled: B = 1, two query heads on one kv head, 500 tokens in
    8 tiles of 64, top 3) in which one real query row, head 0 row 133 (query tile 2), has its q
    scaled up so that its |lse| lies far beyond LSE_LIMIT (about 2.5e7).  With ``target``, rows
    133 and 134 instead, at lse ``target`` and about -``target`` (to ~0.5%): every key's first
    component 1, their q (a, 0, ..., 0) and (-a, 0, ..., 0), so that all of a row's scores are
    equal, and the tile's mean keeps no large part (which would leave the coarse branch's
    float32 gradients of every key tile at the mercy of its rounding).  Returns (plan, q, k, v,
    dout)."""
    rng = np.random.default_rng(seed)
    plan = vsa_nd.tile_plan((500,), (64,))
    q, k, v, dout = (vsa_nd.tile(rng.standard_normal((1, 500, heads, head_dim)).astype(np.float32), plan)
                     for heads in (2, 1, 1, 2))
    if target is None:
        q[0, 0, 133] *= 1e7
    else:  # lse = score + log(real keys selected), 180 to 192 of them
        k[..., 0] = 1.0
        q[0, 0, 133:135] = 0.0
        q[0, 0, 133, 0] = (target - np.log(186.0)) * np.sqrt(head_dim)
        q[0, 0, 134, 0] = -q[0, 0, 133, 0]
    return plan, *(x.astype(dtype) for x in (q, k, v, dout))


def check_huge_lse_gradients(plan, q, k, v, dout, out, lse, q2k_idx, q2k_num, grads, tolerance, expect_nan=True,
                             huge_rows=(133,)):
    """The gradients of huge_lse_problem (NumPy; ``huge_rows``: (133, 134) with a target): with
    ``expect_nan`` (those rows' |lse| past LSE_LIMIT), NaN exactly in their dq and in dk, dv of
    the key tiles their query tile (2) selected, else finite there; every other gradient within
    ``tolerance`` (norm-relative) of the float64 reference with the same selection and the
    call's rounded ``out``, and pad slots 0.  (Below the limit the rows' own gradients are
    finite, not accurate: lse's float32 ulp there, up to 1/16, is an error of up to 6% in their
    probabilities.)"""
    volume = plan.tile_volume
    for row in huge_rows:
        assert (abs(lse[0, 0, row]) > LSE_LIMIT) == expect_nan  # the set-up does what it is for
    rows = np.ones(lse.shape, bool)
    rows[0, 0, list(huge_rows)] = False
    rows &= reference.valid_slots(plan.variable_block_sizes, volume)
    assert np.abs(lse[rows]).max() < LSE_LIMIT / 1000
    want = reference.video_sparse_attn_backward(dout, q, k, v, plan.variable_block_sizes, plan.variable_block_sizes,
                                                q2k_idx, q2k_num, volume, out=out)
    real = reference.valid_slots(plan.variable_block_sizes, volume)
    poisoned_q = np.zeros(q.shape[:3], bool)
    poisoned_q[0, 0, list(huge_rows)] = True
    poisoned_kv = np.zeros(k.shape[:3], bool)
    for tile in q2k_idx[0, 0, 2, : q2k_num[0, 0, 2]]:
        poisoned_kv[0, 0, tile * volume : (tile + 1) * volume] = real[tile * volume : (tile + 1) * volume]
    for name, poisoned in (("dq", poisoned_q), ("dk", poisoned_kv), ("dv", poisoned_kv)):
        got, expected = np.asarray(getattr(grads, name), np.float64), getattr(want, name)
        if expect_nan:
            np.testing.assert_array_equal(np.isnan(got).any(axis=-1), poisoned, err_msg=name)
            assert np.isnan(got[poisoned]).all(), name
        else:
            assert np.isfinite(got).all(), name
        kept = ~poisoned & real
        assert (got[..., ~real, :] == 0).all(), name
        error = np.linalg.norm(got[kept] - expected[kept]) / np.linalg.norm(expected[kept])
        assert error <= tolerance, (name, error)


def first_tile_overflow_problem(dtype, head_dim: int, seed: int):
    """Inputs of a VSA call (NumPy, tiled: B = 1, two heads, 4 x 8 x 8 tokens in 4 tiles of 64,
    every tile selected, so each query tile's list starts at key tile 0) in which every even
    query row's scores with key tile 0 overflow float32 to -inf (q = 2^10 against k = -2^120 in
    column 0) while its other scores, and every odd row's, are ordinary: the float64 reference
    gives those rows the softmax of their later keys and finite gradients.  Returns (plan, q, k,
    v, dout, topk)."""
    rng = np.random.default_rng(seed)
    plan = vsa_nd.tile_plan((4, 8, 8))
    q, k, v, dout = (rng.standard_normal((1, 2, plan.padded_len, head_dim)).astype(np.float32) for _ in range(4))
    q[..., 0::2, 0], q[..., 1::2, 0] = 2.0**10, 0.0
    k[..., 0] = 0.0
    k[..., : plan.tile_volume, 0] = -(2.0**120)  # its tile mean too: tile 0's coarse score is -inf
    return plan, *(x.astype(dtype) for x in (q, k, v, dout)), plan.num_blocks


def check_first_tile_overflow(plan, q, k, v, dout, out, lse, q2k_idx, q2k_num, grads, tolerance):
    """The forward (``out``, ``lse``) and gradients of first_tile_overflow_problem (NumPy) finite
    and within ``tolerance`` (norm-relative; lse to 1e-5) of the float64 reference (the backward's
    with the call's rounded ``out``).  Column 0 of q and k holds the huge values, so dq's and dk's
    column 0 (dq's ~1e35, from dS k against k = -2^120) are checked apart from the rest."""
    assert (q2k_idx[..., 0] == 0).all()  # the set-up does what it is for
    sizes, volume = plan.variable_block_sizes, plan.tile_volume
    with np.errstate(over="ignore"):
        forward = reference.video_sparse_attn(q, k, v, sizes, sizes, q2k_idx.shape[-1], volume, q2k_idx=q2k_idx,
                                              q2k_num=q2k_num)
        want = reference.video_sparse_attn_backward(dout, q, k, v, sizes, sizes, q2k_idx, q2k_num, volume, out=out)
    np.testing.assert_allclose(lse, forward.lse, rtol=1e-5, atol=1e-5)
    for name, got, expected in (("out", out, forward.out),
                                ("dq[..., 1:]", grads.dq[..., 1:], want.dq[..., 1:]),
                                ("dq[..., 0]", grads.dq[..., 0], want.dq[..., 0]),
                                ("dk[..., 1:]", grads.dk[..., 1:], want.dk[..., 1:]),
                                ("dk[..., 0]", grads.dk[..., 0], want.dk[..., 0]), ("dv", grads.dv, want.dv)):
        got = np.asarray(got, np.float64)
        assert np.isfinite(got).all(), name
        error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        assert error <= tolerance, (name, error)


def huge_tile_sums(dtype, head_dim: int = 8):
    """x [1, 2, 192, head_dim] (3 tiles of 64, block sizes 64, 50, 64) whose tile sums pass
    float32's range in some columns while their means fit: 3e38 in a whole tile, -3e38 in the 50
    real rows of a partial one (its pad slots hold NaN; a factor of 1/32 instead of 1/64 would
    overflow there), and -2e38 in a column whose last row holds +inf (the plain sum is NaN there).
    Returns (x, block_sizes, which entries of the [1, 2, 3, head_dim] mean are infinite)."""
    rng = np.random.default_rng(head_dim)
    x = rng.standard_normal((1, 2, 192, head_dim)).astype(np.float32)
    x[0, 0, :64, 0] = 3e38
    x[0, 1, 64:114, 1] = -3e38
    x[0, 1, 114:128] = np.nan
    x[0, 1, 128:192, 2] = -2e38
    x[0, 1, 191, 2] = np.inf
    infinite = np.zeros((1, 2, 3, head_dim), bool)
    infinite[0, 1, 2, 2] = True
    return x.astype(dtype), np.array([64, 50, 64], np.int32), infinite


def check_huge_tile_means(mean, x, block_sizes, infinite, rtol):
    """The tile means of huge_tile_sums: within ``rtol`` of the float64 reference (finite where
    it is: 3e38 and -3e38, not inf), +inf where a tile's column holds inf (not NaN)."""
    mean = np.asarray(mean, np.float64)
    want = reference.block_mean(x, block_sizes, 64)
    assert (mean[infinite] == np.inf).all()
    assert np.isfinite(mean[~infinite]).all()
    np.testing.assert_allclose(mean[~infinite], want[~infinite], rtol=rtol, atol=1e-6)
    assert abs(mean[0, 0, 0, 0]) > 1e38 and abs(mean[0, 1, 1, 1]) > 1e38  # the set-up does what it is for


def worst_row_error(x, ref, floor: float = 0.1, absolute: float = 0.01) -> float:
    """The largest norm-relative error of one row (the last axis) of ``x`` against ``ref``, each
    row's norm floored at ``floor`` times the RMS row norm of ``ref``, and at an RMS of
    ``absolute`` per element (rows near 0, or gradients that are exactly 0, compare in absolute
    terms).  A defect confined to a few rows, which a whole-array error averages away (one wrong
    row in 10,000 moves it by 1%), shows here in full.  NaN anywhere gives NaN."""
    x, ref = (np.asarray(a, np.float64).reshape(-1, np.shape(a)[-1]) for a in (x, ref))
    if not x.size:
        return 0.0
    norms = np.linalg.norm(ref, axis=1)
    floor_norm = max(floor * np.sqrt(np.mean(norms**2)), absolute * np.sqrt(x.shape[1]))
    return float(np.max(np.linalg.norm(x - ref, axis=1) / np.maximum(norms, floor_norm)))


def lse_error(lse, ref) -> float:
    """Largest error of a float32 log-sum-exp against the float64 reference, relative above 1 in
    magnitude and absolute below (the finite entries; where the reference is -inf, ``lse`` must be
    too, else inf)."""
    lse, ref = np.asarray(lse, np.float64), np.asarray(ref, np.float64)
    if not lse.size:
        return 0.0
    finite = np.isfinite(ref)
    if not np.array_equal(lse[~finite], ref[~finite]):
        return np.inf
    return float(np.max(np.abs(lse[finite] - ref[finite]) / np.maximum(np.abs(ref[finite]), 1.0), initial=0.0))


def assert_rows_close(got, want, real, tolerances, name: str, floor: float = 0.01):
    """``got`` [B, H, S_pad, D] within ``tolerances`` (whole array, worst row: worst_row_error) of
    ``want`` on the ``real`` rows, the whole array's norm floored at an RMS of ``floor`` per
    element; and exactly 0 in the pad rows."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    got_real, want_real = got[:, :, real], want[:, :, real]
    whole = np.linalg.norm(got_real - want_real) / max(np.linalg.norm(want_real), floor * np.sqrt(want_real.size),
                                                       1e-12)
    row = worst_row_error(got_real, want_real)
    assert whole <= tolerances[0], f"{name}: relative error {whole:.2e}"
    assert row <= tolerances[1], f"{name}: worst row's relative error {row:.2e}"
    assert np.all(got[:, :, ~real] == 0), f"{name}: pad rows not zero"


def rounds_on_threads(count: int, own_stream, step, rounds: int = 5) -> list:
    """``step(i)`` ``rounds`` times on each of ``count`` threads (i = 0 .. count - 1), released at
    once by a barrier, each inside ``own_stream()``: a context manager that makes a stream of the
    thread's own current and synchronises it on leaving.  Returns each thread's list of results;
    an error any thread met fails the caller."""
    import threading

    results, errors = [[] for _ in range(count)], []
    start = threading.Barrier(count)

    def worker(i):
        try:
            with own_stream():
                start.wait()
                for _ in range(rounds):
                    results[i].append(step(i))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(len(r) == rounds for r in results)
    return results
