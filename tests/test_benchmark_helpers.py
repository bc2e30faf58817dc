"""The benchmark helpers that shape what the GPU figures mean (CPU, NumPy): video-like inputs
(``benchmarks/_common.smooth_inputs``) must give local selections and random ones must not, and
the overlap measure must count what it says."""

import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import vsa_nd
from vsa_nd import reference

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from _common import selection_overlap, smooth_inputs  # noqa: E402


def test_overlap_counts_shared_entries_of_neighbouring_tiles():
    lists = np.array([[[[0, 1, 2, 3], [1, 2, 3, 4], [9, 8, 7, 6], [6, 7, 8, 9]]]])  # [B, H, N_q, topk]
    # pairs (0, 1): 3 shared, (1, 2): 0, (2, 3): 4 (order does not matter)
    assert selection_overlap(lists, 4) == pytest.approx(7 / 12)
    assert selection_overlap(np.zeros((2, 3, 5, 1), np.int32), 1) == 1.0


def _top_tiles(q, k, plan, topk):
    """Each query tile's topk key tiles by the scores of the tile means (the coarse stage's choice)."""
    n, volume, d = plan.num_blocks, plan.tile_volume, q.shape[-1]
    means = [x.reshape(x.shape[0], x.shape[1], n, volume, d).mean(3) for x in (q, k)]
    scores = means[0] @ means[1].swapaxes(-1, -2)
    return np.argsort(-scores, axis=-1)[..., :topk]


def test_smooth_inputs_give_local_selections_and_white_ones_random():
    plan = vsa_nd.tile_plan((8, 32, 32))  # 128 tiles of 64 tokens
    overlap = {}
    for sigma in (0, 2, 4):
        q, k = smooth_inputs(np.random.default_rng(sigma), plan, heads=2, head_dim=32, sigma=sigma)
        assert q.shape == k.shape == (1, 2, plan.padded_len, 32) and q.dtype == np.float32
        overlap[sigma] = selection_overlap(_top_tiles(q, k, plan, 8), 8)
    assert overlap[0] < 0.15  # random: ~8 / 128
    assert overlap[0] < overlap[2] < overlap[4] and overlap[4] > 0.3


def test_smooth_inputs_leave_pad_slots_zero():
    plan = vsa_nd.tile_plan((3, 9, 10))  # tiles of 4 x 4 x 4 that the grid does not fill
    q, k = smooth_inputs(np.random.default_rng(0), plan, heads=1, head_dim=8, sigma=2)
    real = reference.valid_slots(plan.variable_block_sizes, plan.tile_volume)
    assert not real.all()
    for x in (q, k):
        assert (x[:, :, ~real] == 0).all() and (x[:, :, real] != 0).any()


def _spot_problem(dtype, seed=0):
    """A VSA call with GQA, a gate, partial tiles and cross attention (NumPy, Numba backend)."""
    q_plan, kv_plan = vsa_nd.tile_plan((3, 5, 6), (2, 4, 4)), vsa_nd.tile_plan((4, 3, 7), (2, 4, 4))
    rng = np.random.default_rng(seed)
    q, gate, dout = (rng.standard_normal((2, 4, q_plan.padded_len, 16)).astype(dtype) for _ in range(3))
    k, v = (rng.standard_normal((2, 2, kv_plan.padded_len, 16)).astype(dtype) for _ in range(2))
    q, gate = (np.where(reference.valid_slots(q_plan.variable_block_sizes, 32)[:, None], x, 0).astype(dtype)
               for x in (q, gate))
    _, ctx = vsa_nd.video_sparse_attn(q, k, v, 3, q_plan.variable_block_sizes, kv_plan.variable_block_sizes,
                                      gate=gate, return_context=True)
    return ctx, dout, vsa_nd.video_sparse_attn_backward(dout, ctx)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spot_check_agrees_with_a_correct_call_and_catches_a_wrong_one(seed):
    """benchmarks/_common.spot_check recomputes a sample of a call's results in float64: on a
    float32 call (every tile sampled) its errors are at float32's rounding, and a gradient 1%
    off, a wrong key tile's dv, or a pad row not 0 are reported."""
    from _common import check_spot, spot_check

    ctx, dout, grads = _spot_problem(np.float32, seed)
    errors = spot_check(ctx, dout, grads, q_tiles=100, kv_tiles=100, seed=seed)
    assert set(errors) == {"out", "lse", "dq", "dk", "dv", "dgate", "pad"}
    assert max(errors.values()) < 1e-5 and errors["pad"] == 0, errors
    for name in ("dq", "dk", "dv", "dgate"):
        wrong = grads._replace(**{name: getattr(grads, name) * np.float32(1.01)})
        assert spot_check(ctx, dout, wrong, q_tiles=100, kv_tiles=100, seed=seed)[name] > 5e-3
    dv = grads.dv.copy()
    dv[:, :, 32:64] = dv[:, :, 64:96]  # the second key tile's dv replaced by the third's
    assert spot_check(ctx, dout, grads._replace(dv=dv), q_tiles=100, kv_tiles=100, seed=seed)["dv"] > 0.1
    dq = grads.dq.copy()
    dq[:, :, -1] = 1.0  # the last slot is a pad slot in both plans
    assert spot_check(ctx, dout, grads._replace(dq=dq), q_tiles=100, seed=seed)["pad"] == 1.0


def test_check_spot_refuses_results_past_the_tests_bounds():
    from _common import check_spot, spot_check

    ctx, dout, grads = _spot_problem(ml_dtypes.bfloat16)
    line = check_spot(spot_check(ctx, dout, grads), ml_dtypes.bfloat16, "bf16 VSA")
    assert line.startswith("spot check of bf16 VSA: out ") and "dk " in line
    with pytest.raises(SystemExit, match="dv past the bounds"):
        check_spot(spot_check(ctx, dout, grads._replace(dv=grads.dv * 2)), ml_dtypes.bfloat16, "bf16 VSA")
