"""The NumPy oracle (vsa_nd.reference) against hand-checked cases, a loop-by-loop VSA and finite differences.

Pure NumPy: nothing here needs Numba, and importing the reference must not import it.
"""

import subprocess
import sys

import numpy as np
import pytest

from vsa_nd import reference as ref

GARBAGE = 1e3  # pad slots hold large values: any leak of a pad into a real result shows


def make_problem(rng, b, h, h_kv, d, volume, q_sizes, kv_sizes):
    """Random float64 q [B, H, N_q*V, D], k, v [B, H_kv, N_kv*V, D] with garbage in the pad slots."""
    q = rng.standard_normal((b, h, len(q_sizes) * volume, d))
    k = rng.standard_normal((b, h_kv, len(kv_sizes) * volume, d))
    v = rng.standard_normal((b, h_kv, len(kv_sizes) * volume, d))
    for x, sizes in ((q, q_sizes), (k, kv_sizes), (v, kv_sizes)):
        pads = ~ref.valid_slots(sizes, volume)
        x[:, :, pads] = GARBAGE * rng.standard_normal(x[:, :, pads].shape)
    return q, k, v


def loop_vsa(q, k, v, q_sizes, kv_sizes, volume, topk=None, selection=None, gate=None, scale=None):
    """VSA_SPEC.md section 3 written out one query row at a time.

    ``selection[b][h][i]`` lists the key tiles of query tile i; without it, the ``topk`` best
    coarse scores are taken (ties to the lower index).  ``scale`` defaults to 1/sqrt(D).
    Returns (out, lse).
    """
    b_, h_, s_q, d = q.shape
    group = h_ // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    out, lse = np.zeros(q.shape), np.full(q.shape[:3], -np.inf)
    for b in range(b_):
        for h in range(h_):
            kh = h // group
            q_mean = [q[b, h, i * volume : i * volume + n].mean(axis=0) for i, n in enumerate(q_sizes)]
            k_mean = [k[b, kh, j * volume : j * volume + n].mean(axis=0) for j, n in enumerate(kv_sizes)]
            v_mean = [v[b, kh, j * volume : j * volume + n].mean(axis=0) for j, n in enumerate(kv_sizes)]
            for i in range(len(q_sizes)):
                scores = [scale * float(q_mean[i] @ km) for km in k_mean]
                weights = np.exp(np.array(scores) - max(scores))
                coarse = sum(w * vm for w, vm in zip(weights / weights.sum(), v_mean))
                if selection is None:
                    chosen = sorted(range(len(kv_sizes)), key=lambda j: (-scores[j], j))[:topk]
                else:
                    chosen = selection[b][h][i]
                keys = [k[b, kh, j * volume + r] for j in chosen for r in range(kv_sizes[j])]
                values = [v[b, kh, j * volume + r] for j in chosen for r in range(kv_sizes[j])]
                for r in range(q_sizes[i]):  # pad rows are not part of the output: they stay 0, lse -inf
                    row = i * volume + r
                    fine = np.zeros(d)
                    if keys:
                        s = np.array([scale * float(q[b, h, row] @ key) for key in keys])
                        p = np.exp(s - s.max())
                        fine = sum(pj * val for pj, val in zip(p, values)) / p.sum()
                        lse[b, h, row] = s.max() + np.log(p.sum())
                    weight = 1.0 if gate is None else gate[b, h, row]
                    out[b, h, row] = fine + weight * coarse
    return out, lse


def index_lists(selection, length):
    """Nested lists of key tiles -> (q2k_idx padded with -1 to ``length``, q2k_num)."""
    idx = np.array([[[row + [-1] * (length - len(row)) for row in head] for head in batch] for batch in selection])
    num = np.array([[[len(row) for row in head] for head in batch] for batch in selection])
    return idx.astype(np.int32), num.astype(np.int32)


def test_importing_the_reference_does_not_import_numba():
    code = "import sys, vsa_nd.reference; print('numba' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_single_tile_is_dense_attention_plus_mean_of_values():
    # One query tile and one key tile: the coarse softmax has a single entry (weight 1), so
    # o_c is the mean of the real values, and the fine stage is dense attention over the real keys.
    rng = np.random.default_rng(0)
    volume, n_real = 8, 5
    q, k, v = make_problem(rng, 1, 1, 1, 4, volume, [6], [n_real])
    gate = rng.standard_normal(q.shape)
    result = ref.video_sparse_attn(q, k, v, [6], [n_real], topk=1, tile_volume=volume, gate=gate)

    keys, values = k[0, 0, :n_real], v[0, 0, :n_real]
    scores = q[0, 0] @ keys.T / 2.0  # scale = 1/sqrt(4)
    probs = np.exp(scores - scores.max(axis=1, keepdims=True))
    dense = probs @ values / probs.sum(axis=1, keepdims=True)
    mean_v = values.mean(axis=0)
    real = slice(0, 6)  # the query tile's 6 real rows; rows 6 and 7 are pad rows: 0, lse -inf
    np.testing.assert_allclose(result.fine[0, 0, real], dense[real], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(result.coarse[0, 0, 0], mean_v, rtol=1e-12)
    np.testing.assert_allclose(result.out[0, 0, real], (dense + gate[0, 0] * mean_v)[real], rtol=1e-12, atol=1e-12)
    lse = scores.max(axis=1) + np.log(probs.sum(axis=1))
    np.testing.assert_allclose(result.lse[0, 0, real], lse[real], rtol=1e-12)
    assert (result.fine[0, 0, 6:] == 0).all() and (result.out[0, 0, 6:] == 0).all()
    assert (result.lse[0, 0, 6:] == -np.inf).all()
    assert result.q2k_idx.tolist() == [[[[0]]]] and result.q2k_num.tolist() == [[[1]]]


def test_full_topk_with_full_tiles_is_dense_attention():
    rng = np.random.default_rng(1)
    volume, n = 4, 5
    q, k, v = make_problem(rng, 2, 3, 3, 8, volume, [volume] * n, [volume] * n)
    result = ref.video_sparse_attn(q, k, v, [volume] * n, [volume] * n, topk=n, tile_volume=volume)

    scores = q @ np.swapaxes(k, -1, -2) * 8**-0.5
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    dense = probs @ v / probs.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(result.fine, dense, rtol=1e-11, atol=1e-12)

    means = lambda x: x.reshape(2, 3, n, volume, 8).mean(axis=3)  # noqa: E731 - full tiles: plain means
    coarse_scores = means(q) @ np.swapaxes(means(k), -1, -2) * 8**-0.5
    np.testing.assert_allclose(result.scores, coarse_scores, rtol=1e-12)
    weights = np.exp(coarse_scores) / np.exp(coarse_scores).sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(result.out, dense + np.repeat(weights @ means(v), volume, axis=2), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize(
    "b, h, h_kv, d, volume, q_sizes, kv_sizes, topk, with_gate, scale",
    [
        (1, 2, 2, 4, 4, [4, 3, 4], [4, 2, 4, 1], 2, False, None),
        (2, 4, 2, 3, 8, [8, 5], [3, 8, 8], 1, True, None),  # GQA, cross-attention
        (1, 6, 1, 5, 6, [6, 6, 2, 6], [6, 4, 6, 6, 1], 3, True, None),  # one kv head for six query heads
        (1, 2, 1, 4, 4, [4, 3, 4], [4, 2, 4, 1], 2, True, 1.7),  # a scale of its own (the selection changes too)
    ],
)
def test_forward_matches_a_row_by_row_loop(b, h, h_kv, d, volume, q_sizes, kv_sizes, topk, with_gate, scale):
    rng = np.random.default_rng(sum(q_sizes) * 31 + topk)
    q, k, v = make_problem(rng, b, h, h_kv, d, volume, q_sizes, kv_sizes)
    gate = rng.standard_normal(q.shape) if with_gate else None
    inputs = [x.copy() for x in (q, k, v)]
    result = ref.video_sparse_attn(q, k, v, q_sizes, kv_sizes, topk, volume, gate=gate, scale=scale)
    out, lse = loop_vsa(q, k, v, q_sizes, kv_sizes, volume, topk=topk, gate=gate, scale=scale)
    np.testing.assert_allclose(result.out, out, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(result.lse, lse, rtol=1e-12)
    assert np.all(np.isfinite(result.out))  # pad query rows included: any finite value, never NaN/Inf
    for before, after in zip(inputs, (q, k, v)):
        np.testing.assert_array_equal(before, after)


def test_given_selection_with_short_and_empty_rows_matches_the_loop():
    rng = np.random.default_rng(2)
    volume, q_sizes, kv_sizes = 4, [4, 2, 4], [1, 4, 3, 4]
    q, k, v = make_problem(rng, 1, 2, 1, 3, volume, q_sizes, kv_sizes)
    selection = [[[[3, 0], [], [1, 2, 3]], [[2], [0, 1, 2, 3], [1]]]]
    q2k_idx, q2k_num = index_lists(selection, 4)
    result = ref.video_sparse_attn(q, k, v, q_sizes, kv_sizes, 2, volume, q2k_idx=q2k_idx, q2k_num=q2k_num)
    out, lse = loop_vsa(q, k, v, q_sizes, kv_sizes, volume, selection=selection)
    np.testing.assert_allclose(result.out, out, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(result.lse, lse, rtol=1e-12)  # also -inf exactly where lse is -inf
    assert np.all(result.lse[0, 0, volume : 2 * volume] == -np.inf)
    np.testing.assert_array_equal(result.fine[0, 0, volume : 2 * volume], 0.0)


def test_row_that_selects_nothing_gives_zero_and_minus_inf():
    rng = np.random.default_rng(3)
    q, k, v = make_problem(rng, 1, 1, 1, 4, 4, [4, 4], [4, 3])
    block_map = np.array([[[[True, False], [False, False]]]])
    fine, lse = ref.block_sparse_attn(q, k, v, block_map, [4, 3], tile_volume=4)
    np.testing.assert_array_equal(fine[0, 0, 4:], 0.0)
    np.testing.assert_array_equal(lse[0, 0, 4:], -np.inf)
    assert np.all(np.isfinite(lse[0, 0, :4])) and np.abs(fine[0, 0, :4]).max() > 0.1


def test_selected_keys_that_all_score_minus_inf_give_nan():
    # Keys are selected, but q . k = -inf for every one of them: the softmax is 0 / 0, NaN in out
    # and lse (unlike a row that selects no key, above: 0 and -inf).
    rng = np.random.default_rng(5)
    q, k, v = make_problem(rng, 1, 1, 1, 4, 4, [4, 4], [4, 4])
    k = np.abs(k) + 0.1
    q[0, 0, 1] = -np.inf
    with np.errstate(invalid="ignore"):
        fine, lse = ref.block_sparse_attn(q, k, v, np.ones((1, 1, 2, 2), bool), [4, 4], tile_volume=4)
    assert np.isnan(fine[0, 0, 1]).all() and np.isnan(lse[0, 0, 1])
    others = np.arange(8) != 1
    assert np.all(np.isfinite(fine[0, 0, others])) and np.all(np.isfinite(lse[0, 0, others]))


def test_softmax_of_large_scores():
    np.testing.assert_allclose(ref.softmax(np.array([1000.0, 999.0])), [1 / (1 + np.exp(-1)), 1 / (1 + np.e)],
                               rtol=1e-12)


def test_scores_far_from_zero_match_the_loop():
    # Coarse and fine scores in the thousands: every softmax must subtract its row's maximum.
    rng = np.random.default_rng(6)
    q, k, v = make_problem(rng, 1, 2, 1, 4, 4, [4, 4, 3, 4], [4, 2, 4, 4])
    q, k = 40 * q, 40 * k
    result = ref.video_sparse_attn(q, k, v, [4, 4, 3, 4], [4, 2, 4, 4], 2, 4)
    out, lse = loop_vsa(q, k, v, [4, 4, 3, 4], [4, 2, 4, 4], 4, topk=2)
    assert np.abs(lse[np.isfinite(lse)]).max() > 100
    np.testing.assert_allclose(result.out, out, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(result.lse, lse, rtol=1e-12)


def test_ties_go_to_the_lower_tile_index():
    scores = np.array([[[[1.0, 3.0, 3.0, 2.0, 3.0, 0.5]]]])
    assert ref.select_topk(scores, 2)[0].tolist() == [[[[1, 2]]]]
    assert ref.select_topk(scores, 4)[0].tolist() == [[[[1, 2, 3, 4]]]]
    # Every key tile equal: all coarse scores tie, so the first topk tiles are chosen.  (With
    # the scores from a BLAS matmul, which may round equal columns an ulp apart, 125 of 200
    # such problems at D = 16 chose otherwise; the first seed here did not.)
    for seed in range(4, 24):
        rng = np.random.default_rng(seed)
        q, k, v = make_problem(rng, 1, 2, 2, 16, 8, [8, 8, 8], [8] * 5)
        k[:, :, :] = np.tile(k[:, :, :8], (1, 1, 5, 1))
        result = ref.video_sparse_attn(q, k, v, [8, 8, 8], [8] * 5, topk=3, tile_volume=8)
        assert np.all(result.q2k_idx == [0, 1, 2]), seed


def test_pad_slots_do_not_change_real_rows_or_their_gradients():
    rng = np.random.default_rng(5)
    volume, q_sizes, kv_sizes = 4, [4, 1, 3], [2, 4, 3]
    q, k, v = make_problem(rng, 1, 2, 2, 3, volume, q_sizes, kv_sizes)
    gate, dout = rng.standard_normal(q.shape), rng.standard_normal(q.shape)
    # Same real tokens, other pads: different finite garbage in the queries (pad query rows are computed,
    # so they must stay finite), NaN in the keys and values (never read).
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    for x, sizes, value in ((q2, q_sizes, -7 * GARBAGE), (k2, kv_sizes, np.nan), (v2, kv_sizes, np.nan)):
        x[:, :, ~ref.valid_slots(sizes, volume)] = value
    real_q, real_kv = ref.valid_slots(q_sizes, volume), ref.valid_slots(kv_sizes, volume)
    runs = []
    for q_, k_, v_ in ((q, k, v), (q2, k2, v2)):
        fwd = ref.video_sparse_attn(q_, k_, v_, q_sizes, kv_sizes, 2, volume, gate=gate)
        grads = ref.video_sparse_attn_backward(dout, q_, k_, v_, q_sizes, kv_sizes, fwd.q2k_idx, fwd.q2k_num, volume, gate=gate)
        runs.append((fwd.out[:, :, real_q], fwd.q2k_idx, grads.dq[:, :, real_q], grads.dk[:, :, real_kv],
                     grads.dv[:, :, real_kv], grads.dgate[:, :, real_q]))
    for name, first, second in zip(("out", "q2k_idx", "dq", "dk", "dv", "dgate"), *runs):
        assert np.all(np.isfinite(second)), name
        np.testing.assert_allclose(second, first, rtol=1e-13, atol=1e-13, err_msg=name)


def test_grouped_query_attention_equals_repeated_kv_heads():
    rng = np.random.default_rng(6)
    volume, q_sizes, kv_sizes = 4, [4, 3, 4], [4, 4, 2]
    q, k, v = make_problem(rng, 2, 6, 2, 3, volume, q_sizes, kv_sizes)
    k_rep, v_rep = np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1)
    gqa = ref.video_sparse_attn(q, k, v, q_sizes, kv_sizes, 2, volume)
    rep = ref.video_sparse_attn(q, k_rep, v_rep, q_sizes, kv_sizes, 2, volume)
    np.testing.assert_allclose(gqa.out, rep.out, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(gqa.q2k_idx, rep.q2k_idx)

    dout = rng.standard_normal(q.shape)
    g_gqa = ref.video_sparse_attn_backward(dout, q, k, v, q_sizes, kv_sizes, gqa.q2k_idx, gqa.q2k_num, volume)
    g_rep = ref.video_sparse_attn_backward(dout, q, k_rep, v_rep, q_sizes, kv_sizes, rep.q2k_idx, rep.q2k_num, volume)
    np.testing.assert_allclose(g_gqa.dq, g_rep.dq, rtol=1e-12, atol=1e-13)
    # A shared kv head receives the sum of the gradients of its three query heads.
    np.testing.assert_allclose(g_gqa.dk, g_rep.dk.reshape(2, 2, 3, -1, 3).sum(axis=2), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(g_gqa.dv, g_rep.dv.reshape(2, 2, 3, -1, 3).sum(axis=2), rtol=1e-12, atol=1e-13)


GRAD_CASES = {
    "plain": dict(h=2, h_kv=2, q_sizes=[4, 4], kv_sizes=[4, 4, 4], gate=False),
    "gate": dict(h=2, h_kv=2, q_sizes=[4, 4], kv_sizes=[4, 4, 4], gate=True),
    "gqa_partial_tiles": dict(h=4, h_kv=2, q_sizes=[4, 2, 3], kv_sizes=[1, 4, 3], gate=False),
    "gqa_partial_tiles_gate": dict(h=2, h_kv=1, q_sizes=[3, 4, 1], kv_sizes=[4, 2, 4, 3], gate=True),
    "own_scale": dict(h=2, h_kv=1, q_sizes=[3, 4, 1], kv_sizes=[4, 2, 4, 3], gate=True, scale=1.9),
}


@pytest.mark.parametrize("case", GRAD_CASES.values(), ids=GRAD_CASES.keys())
def test_backward_matches_finite_differences(case):
    rng = np.random.default_rng(len(case["kv_sizes"]) * 10 + case["h"] + case["gate"])
    volume, d = 4, 3
    q_sizes, kv_sizes, scale = case["q_sizes"], case["kv_sizes"], case.get("scale")
    q, k, v = make_problem(rng, 1, case["h"], case["h_kv"], d, volume, q_sizes, kv_sizes)
    # Moderate pad values keep the finite differences of the (ignored) pad rows well conditioned.
    q, k, v = (x / np.maximum(1.0, np.abs(x) / 3) for x in (q, k, v))
    gate = rng.standard_normal(q.shape) if case["gate"] else None
    dout = rng.standard_normal(q.shape)
    real_rows = ref.valid_slots(q_sizes, volume)[:, None]

    # A fixed selection (not the top-k of these inputs) with rows of different lengths, one empty.
    n_q, n_kv = len(q_sizes), len(kv_sizes)
    selection = [[[sorted(rng.choice(n_kv, size=(i + hh) % (n_kv + 1), replace=False).tolist()) for i in range(n_q)]
                  for hh in range(case["h"])]]
    q2k_idx, q2k_num = index_lists(selection, n_kv)

    def loss(q, k, v, gate):
        out = ref.video_sparse_attn(q, k, v, q_sizes, kv_sizes, 1, volume, gate=gate, q2k_idx=q2k_idx, q2k_num=q2k_num,
                                    scale=scale).out
        return float(np.sum(np.where(real_rows, dout * out, 0.0)))

    inputs = {"q": q, "k": k, "v": v, "gate": gate}
    grads = ref.video_sparse_attn_backward(dout, q, k, v, q_sizes, kv_sizes, q2k_idx, q2k_num, volume, gate=gate,
                                           scale=scale)
    analytic = {"q": grads.dq, "k": grads.dk, "v": grads.dv, "gate": grads.dgate}
    for name, x in inputs.items():
        if x is None:
            assert analytic[name] is None
            continue
        numeric = numerical_gradient(loss, inputs, name)
        assert np.abs(numeric).max() > 1e-2  # the check is not vacuous
        np.testing.assert_allclose(analytic[name], numeric, rtol=1e-6, atol=1e-8, err_msg=f"d{name}")


def test_fine_stage_backward_matches_finite_differences():
    """block_sparse_attn_backward (the fine stage alone, GQA, partial tiles, rows of different
    lengths and an empty one) against central differences of block_sparse_attn."""
    rng = np.random.default_rng(5)
    volume, d, q_sizes, kv_sizes = 4, 3, [3, 4, 1], [4, 2, 4, 3]
    q, k, v = make_problem(rng, 1, 4, 2, d, volume, q_sizes, kv_sizes)
    dout = rng.standard_normal(q.shape)
    selection = [[[sorted(rng.choice(4, size=(i + hh) % 5, replace=False).tolist()) for i in range(3)]
                  for hh in range(4)]]
    block_map = ref.block_map_from_indices(*index_lists(selection, 4), 4)

    def loss(q, k, v):
        out, _ = ref.block_sparse_attn(q, k, v, block_map, kv_sizes, volume, 0.7, q_block_sizes=q_sizes)
        return float(np.sum(dout * out))

    inputs = {"q": q, "k": k, "v": v}
    analytic = dict(zip(inputs, ref.block_sparse_attn_backward(dout, q, k, v, block_map, kv_sizes, volume, 0.7,
                                                              q_block_sizes=q_sizes)))
    for name in inputs:
        numeric = numerical_gradient(loss, inputs, name)
        assert np.abs(numeric).max() > 1e-2  # the check is not vacuous
        np.testing.assert_allclose(analytic[name], numeric, rtol=1e-6, atol=1e-8, err_msg=f"d{name}")


def numerical_gradient(loss, inputs, name, eps=1e-6):
    """Central differences of loss(**inputs) in each element of inputs[name] (changed in place
    and restored)."""
    x = inputs[name]
    numeric = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        saved = x[index]
        x[index] = saved + eps
        up = loss(**inputs)
        x[index] = saved - eps
        down = loss(**inputs)
        x[index] = saved
        numeric[index] = (up - down) / (2 * eps)
    return numeric


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_results_come_in_the_dtype_asked_for_and_the_selection_in_int32(dtype):
    """The module's contract: arithmetic and results in ``dtype``; index lists int32 as ops'."""
    rng = np.random.default_rng(11)
    volume, q_sizes, kv_sizes = 4, [4, 3], [4, 2, 4]
    q, k, v = make_problem(rng, 1, 2, 1, 4, volume, q_sizes, kv_sizes)
    gate, dout = rng.standard_normal(q.shape), rng.standard_normal(q.shape)
    fwd = ref.video_sparse_attn(q, k, v, q_sizes, kv_sizes, 2, volume, gate=gate, dtype=dtype)
    block_map = ref.block_map_from_indices(fwd.q2k_idx, fwd.q2k_num, 3)
    results = {"block_mean": ref.block_mean(q, q_sizes, volume, dtype),
               **{f"forward.{name}": getattr(fwd, name) for name in ("out", "fine", "coarse", "lse", "scores")},
               **dict(zip(("fine out", "fine lse"), ref.block_sparse_attn(q, k, v, block_map, kv_sizes, volume,
                                                                          dtype=dtype, q_block_sizes=q_sizes))),
               **dict(zip(("fine dq", "fine dk", "fine dv"),
                          ref.block_sparse_attn_backward(dout, q, k, v, block_map, kv_sizes, volume, dtype=dtype))),
               **ref.video_sparse_attn_backward(dout, q, k, v, q_sizes, kv_sizes, fwd.q2k_idx, fwd.q2k_num, volume,
                                                gate=gate, dtype=dtype)._asdict()}
    for name, x in results.items():
        assert x.dtype == dtype, name
    assert fwd.q2k_idx.dtype == fwd.q2k_num.dtype == np.int32


def test_default_scale_is_one_over_root_d_and_scale_zero_attends_uniformly():
    rng = np.random.default_rng(12)
    volume, q_sizes, kv_sizes = 4, [4, 3], [4, 2, 4]
    d = 4
    q, k, v = make_problem(rng, 1, 2, 1, d, volume, q_sizes, kv_sizes)
    gate, dout = rng.standard_normal(q.shape), rng.standard_normal(q.shape)
    block_map = np.ones((1, 2, 2, 3), bool)
    fwd = ref.video_sparse_attn(q, k, v, q_sizes, kv_sizes, 2, volume, gate=gate)
    explicit = ref.video_sparse_attn(q, k, v, q_sizes, kv_sizes, 2, volume, gate=gate, scale=d**-0.5)
    for a, b in zip(fwd, explicit):
        np.testing.assert_array_equal(a, b)
    args = (dout, q, k, v, q_sizes, kv_sizes, fwd.q2k_idx, fwd.q2k_num, volume)
    for a, b in zip(ref.video_sparse_attn_backward(*args, gate=gate),
                    ref.video_sparse_attn_backward(*args, scale=d**-0.5, gate=gate)):
        np.testing.assert_array_equal(a, b)
    fine_args = (dout, q, k, v, block_map, kv_sizes, volume)
    for a, b in zip(ref.block_sparse_attn_backward(*fine_args), ref.block_sparse_attn_backward(*fine_args, d**-0.5)):
        np.testing.assert_array_equal(a, b)
    # scale 0: every allowed key weighs alike (10 real keys), the coarse scores are 0, and q gets no gradient
    _, lse = ref.block_sparse_attn(q, k, v, block_map, kv_sizes, volume, 0.0)
    np.testing.assert_allclose(lse, np.log(10), rtol=1e-15)
    zero = ref.video_sparse_attn(q, k, v, q_sizes, kv_sizes, 2, volume, scale=0.0)
    assert np.all(zero.scores == 0)
    assert np.all(ref.video_sparse_attn_backward(*args, scale=0.0).dq == 0)


def test_the_fine_stage_backward_ignores_what_pad_query_rows_hold():
    """Given q_block_sizes, NaN in the pad rows of q and dout reaches no gradient of the fine stage."""
    rng = np.random.default_rng(13)
    volume, q_sizes, kv_sizes = 4, [4, 3], [4, 2, 4]
    q, k, v = make_problem(rng, 1, 2, 1, 4, volume, q_sizes, kv_sizes)
    dout = rng.standard_normal(q.shape)
    block_map = np.ones((1, 2, 2, 3), bool)
    clean = ref.block_sparse_attn_backward(dout, q, k, v, block_map, kv_sizes, volume, q_block_sizes=q_sizes)
    pads = ~ref.valid_slots(q_sizes, volume)
    nan_q, nan_dout = q.copy(), dout.copy()
    nan_q[:, :, pads] = nan_dout[:, :, pads] = np.nan
    dirty = ref.block_sparse_attn_backward(nan_dout, nan_q, k, v, block_map, kv_sizes, volume, q_block_sizes=q_sizes)
    for name, a, b in zip(("dq", "dk", "dv"), clean, dirty):
        np.testing.assert_array_equal(b, a, err_msg=name)


def test_dout_of_pad_query_rows_does_not_reach_any_gradient():
    rng = np.random.default_rng(7)
    volume, q_sizes, kv_sizes = 4, [4, 2, 3], [4, 1, 4]
    q, k, v = make_problem(rng, 2, 4, 2, 3, volume, q_sizes, kv_sizes)
    gate = rng.standard_normal(q.shape)
    fwd = ref.video_sparse_attn(q, k, v, q_sizes, kv_sizes, 2, volume, gate=gate)
    dout = rng.standard_normal(q.shape)
    noisy = dout.copy()
    pads = ~ref.valid_slots(q_sizes, volume)
    noisy[:, :, pads] = GARBAGE * rng.standard_normal(noisy[:, :, pads].shape)
    clean = ref.video_sparse_attn_backward(dout, q, k, v, q_sizes, kv_sizes, fwd.q2k_idx, fwd.q2k_num, volume, gate=gate)
    dirty = ref.video_sparse_attn_backward(noisy, q, k, v, q_sizes, kv_sizes, fwd.q2k_idx, fwd.q2k_num, volume, gate=gate)
    real_q, real_kv = ~pads, ref.valid_slots(kv_sizes, volume)
    for name, real in (("dq", real_q), ("dk", real_kv), ("dv", real_kv), ("dgate", real_q)):
        a, b = getattr(clean, name)[:, :, real], getattr(dirty, name)[:, :, real]
        assert np.abs(a).max() > 1e-3, name
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14, err_msg=name)


def test_nan_in_pad_query_rows_of_q_gate_out_and_dout_reaches_no_gradient():
    rng = np.random.default_rng(8)
    volume, q_sizes, kv_sizes = 4, [4, 2, 3], [4, 1, 4]
    q, k, v = make_problem(rng, 2, 4, 2, 3, volume, q_sizes, kv_sizes)
    gate, dout = rng.standard_normal(q.shape), rng.standard_normal(q.shape)
    pads = ~ref.valid_slots(q_sizes, volume)
    fwd = ref.video_sparse_attn(q, k, v, q_sizes, kv_sizes, 2, volume, gate=gate)
    clean = ref.video_sparse_attn_backward(dout, q, k, v, q_sizes, kv_sizes, fwd.q2k_idx, fwd.q2k_num, volume,
                                           gate=gate, out=fwd.out)
    nan_q, nan_gate, nan_out, nan_dout = (x.copy() for x in (q, gate, fwd.out, dout))
    for x in (nan_q, nan_gate, nan_out, nan_dout):
        x[:, :, pads] = np.nan
    dirty = ref.video_sparse_attn_backward(nan_dout, nan_q, k, v, q_sizes, kv_sizes, fwd.q2k_idx, fwd.q2k_num, volume,
                                           gate=nan_gate, out=nan_out)
    for name in ("dq", "dk", "dv", "dgate"):
        np.testing.assert_array_equal(getattr(dirty, name), getattr(clean, name), err_msg=name)  # pads 0 in both


def test_backward_from_a_given_out_matches_the_exact_softmax_term():
    """out= (fine recovered from the stored output) gives the exact gradients when out is exact,
    and differs from them only by the rounding when out is rounded."""
    rng = np.random.default_rng(3)
    volume, q_sizes, kv_sizes = 8, np.array([8, 5]), np.array([8, 3, 6])
    q = rng.standard_normal((1, 2, 16, 4))
    k, v = (rng.standard_normal((1, 1, 24, 4)) for _ in range(2))
    gate, dout = (rng.standard_normal(q.shape) for _ in range(2))
    fwd = ref.video_sparse_attn(q, k, v, q_sizes, kv_sizes, 2, volume, gate=gate)
    args = (dout, q, k, v, q_sizes, kv_sizes, fwd.q2k_idx, fwd.q2k_num, volume)
    exact = ref.video_sparse_attn_backward(*args, gate=gate)
    given = ref.video_sparse_attn_backward(*args, gate=gate, out=fwd.out)
    rounded = ref.video_sparse_attn_backward(*args, gate=gate, out=fwd.out.astype(np.float16))
    for a, b in zip(exact, given):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-12)
    for name in ("dq", "dk"):  # only these depend on rowsum(dO * fine)
        assert 0 < np.abs(getattr(rounded, name) - getattr(exact, name)).max() < 1e-2
    for name in ("dv", "dgate"):
        np.testing.assert_array_equal(getattr(rounded, name), getattr(exact, name))
