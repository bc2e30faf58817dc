"""The benchmark helpers that shape what the GPU figures mean (CPU, NumPy): video-like inputs
(``benchmarks/_common.smooth_inputs``) must give local selections and random ones must not, and
the overlap measure must count what it says."""

import dataclasses
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import vsa_nd
from vsa_nd import reference

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from _common import (ClockSampler, _errors, agree, check_spot, selection_overlap, smooth_inputs, spot_check,  # noqa: E402
                     time_back_to_back)


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



def _spot_problem(dtype, seed=0, nan_pads=False):
    """A VSA call with GQA, a gate, partial tiles and cross attention (NumPy, Numba backend);
    ``nan_pads``: NaN in every pad slot of q, k, v, gate and dout (which no result may read)."""
    q_plan, kv_plan = vsa_nd.tile_plan((3, 5, 6), (2, 4, 4)), vsa_nd.tile_plan((4, 3, 7), (2, 4, 4))
    rng = np.random.default_rng(seed)
    q, gate, dout = (rng.standard_normal((2, 4, q_plan.padded_len, 16)).astype(dtype) for _ in range(3))
    k, v = (rng.standard_normal((2, 2, kv_plan.padded_len, 16)).astype(dtype) for _ in range(2))
    pad_value = np.nan if nan_pads else 0.0
    q_real = reference.valid_slots(q_plan.variable_block_sizes, 32)[:, None]
    kv_real = reference.valid_slots(kv_plan.variable_block_sizes, 32)[:, None]
    q, gate, dout = (np.where(q_real, x, pad_value).astype(dtype) for x in (q, gate, dout))
    if nan_pads:
        k, v = (np.where(kv_real, x, pad_value).astype(dtype) for x in (k, v))
    _, ctx = vsa_nd.video_sparse_attn(q, k, v, 3, q_plan.variable_block_sizes, kv_plan.variable_block_sizes,
                                      gate=gate, return_context=True)
    return ctx, dout, vsa_nd.video_sparse_attn_backward(dout, ctx)


ALL = dict(q_tiles=100, kv_tiles=100)  # every tile sampled


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spot_check_agrees_with_a_correct_call_and_catches_wrong_gradients(seed):
    """benchmarks/_common.spot_check recomputes a sample of a call's results in float64: on a
    float32 call its errors are at float32's rounding, also with NaN in every pad slot of the
    inputs, and a gradient 1% off, a key tile's dv swapped for another's, or a non-zero pad row
    are reported."""
    for nan_pads in (False, True):
        ctx, dout, grads = _spot_problem(np.float32, seed, nan_pads)
        errors = spot_check(ctx, dout, grads, seed=seed, **ALL)
        assert set(errors) == {"scale", "selection", "pad", "out", "lse", "dq", "dk", "dv", "dgate"}
        assert max(max(np.atleast_1d(e)) for e in errors.values()) < 1e-5 and errors["pad"] == 0, errors
    for name in ("dq", "dk", "dv", "dgate"):
        wrong = grads._replace(**{name: getattr(grads, name) * np.float32(1.01)})
        assert spot_check(ctx, dout, wrong, seed=seed, **ALL)[name][0] > 5e-3
    dv = grads.dv.copy()
    dv[:, :, 32:64] = dv[:, :, 64:96]  # the second key tile's dv replaced by the third's
    assert spot_check(ctx, dout, grads._replace(dv=dv), seed=seed, **ALL)["dv"][1] > 0.1
    for value in (1.0, np.nan):
        dq = grads.dq.copy()
        dq[:, :, -1] = value  # the last slot is a pad slot in both plans
        assert spot_check(ctx, dout, grads._replace(dq=dq), seed=seed, **ALL)["pad"] == (1.0 if value == 1 else np.inf)


def test_spot_check_catches_a_wrong_forward():
    """One wrong row of out (the whole sample's error hides it, the worst row's does not), NaN
    or a non-(-inf) lse in a pad row, a tile the coarse scores rank low chosen in place of one
    they rank high, a repeated tile, and a scale that is not the default."""
    ctx, _, _ = _spot_problem(np.float32)
    out = ctx.out.copy()
    out[:, :, 5] *= 1.05  # one row of the sample 5% off
    whole, worst = spot_check(dataclasses.replace(ctx, out=out), **ALL)["out"]
    assert whole < 1e-2 and worst > 3e-2  # (bf16 bounds: 1e-2, 3e-2)
    for value in (np.nan, 0.0):
        lse = ctx.lse.copy()
        lse[:, :, -1] = value
        assert spot_check(dataclasses.replace(ctx, lse=lse), **ALL)["pad"] == np.inf
    scores = reference.video_sparse_attn(ctx.q, ctx.k, ctx.v, ctx.q_block_sizes, ctx.kv_block_sizes, 3, 32,
                                         gate=ctx.gate).scores
    idx = ctx.q2k_idx.copy()
    idx[..., 2] = np.argmin(scores, axis=-1)  # the lowest-scoring tile in place of the third best
    assert spot_check(dataclasses.replace(ctx, q2k_idx=idx), **ALL)["selection"] > 0.5
    idx = ctx.q2k_idx.copy()
    idx[..., 2] = idx[..., 1]
    assert spot_check(dataclasses.replace(ctx, q2k_idx=idx), **ALL)["selection"] == np.inf
    assert spot_check(dataclasses.replace(ctx, scale=ctx.scale * 1.01), **ALL)["scale"] > 5e-3
    assert spot_check(ctx, scale=ctx.scale, **ALL)["scale"] == 0


def test_check_spot_refuses_results_past_the_bounds_or_missing():
    bf16 = ml_dtypes.bfloat16
    ctx, dout, grads = _spot_problem(bf16)
    line = check_spot(spot_check(ctx, dout, grads), bf16, "bf16 VSA", backward=True, gate=True)
    assert line.startswith("spot check of bf16 VSA: scale ") and " dk " in line
    with pytest.raises(SystemExit, match="dv past its bound"):
        check_spot(spot_check(ctx, dout, grads._replace(dv=grads.dv * 2)), bf16, "bf16 VSA", backward=True)
    forward_only = spot_check(ctx)
    check_spot(forward_only, bf16, "forward")
    with pytest.raises(SystemExit, match="dq, dk, dv, dgate not checked"):
        check_spot(forward_only, bf16, "forward", backward=True, gate=True)
    with pytest.raises(ValueError, match="no bounds for float32"):
        check_spot(forward_only, np.float32, "forward")
    with pytest.raises(ValueError, match="dout and grads together"):
        spot_check(ctx, dout)
    with pytest.raises(ValueError, match="q_tiles, kv_tiles >= 1"):
        spot_check(ctx, q_tiles=0)


def test_spot_check_of_the_fine_stage_alone():
    """``coarse=False`` (bench_attention.py's block-sparse kernels): a correct forward and backward
    of the Numba backend's fine stage, on a selection no coarse score chose, with GQA and partial
    tiles, pass; the same results judged as a VSA call (coarse branch added) do not; a wrong row,
    a wrong dk and NaN in a pad row are caught; and check_spot asks for no selection there."""
    import types

    from vsa_nd.backends import numba_cpu

    q_plan, kv_plan = vsa_nd.tile_plan((3, 5, 6), (2, 4, 4)), vsa_nd.tile_plan((4, 3, 7), (2, 4, 4))
    q_sizes, kv_sizes = q_plan.variable_block_sizes, kv_plan.variable_block_sizes
    rng = np.random.default_rng(7)
    q, dout = (rng.standard_normal((1, 4, q_plan.padded_len, 16)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((1, 2, kv_plan.padded_len, 16)).astype(np.float32) for _ in range(2))
    n_q, n_kv = len(q_sizes), len(kv_sizes)
    q2k_idx = np.sort(np.argsort(rng.random((1, 4, n_q, n_kv)), axis=-1)[..., :3], axis=-1).astype(np.int32)
    q2k_num = rng.integers(1, 4, (1, 4, n_q)).astype(np.int32)  # 1 to 3 of the 3 entries
    scale = 0.3
    out, lse = numba_cpu.block_sparse_fwd(q, k, v, q2k_idx, q2k_num, kv_sizes, scale, None, None,
                                          q_block_sizes=q_sizes)
    no_coarse = [np.zeros((1, heads, n, 16), np.float32) for heads, n in ((4, n_q), (2, n_kv), (2, n_kv))]
    dq, dk, dv = numba_cpu.block_sparse_bwd(dout, q, k, v, out, lse, q2k_idx, q2k_num, q_sizes, kv_sizes, scale,
                                            None, None, *no_coarse)
    ctx = types.SimpleNamespace(q=q, k=k, v=v, out=out, lse=lse, q2k_idx=q2k_idx, q2k_num=q2k_num,
                                q_block_sizes=q_sizes, kv_block_sizes=kv_sizes, scale=scale, gate=None)
    grads = types.SimpleNamespace(dq=dq, dk=dk, dv=dv)
    errors = spot_check(ctx, dout, grads, scale=scale, coarse=False, **ALL)
    assert "selection" not in errors and errors["pad"] == 0 and errors["lse"] < 1e-5
    for name in ("out", "dq", "dk", "dv"):
        assert max(errors[name]) < 1e-4, (name, errors[name])
    bf16 = ml_dtypes.bfloat16
    check_spot(errors, bf16, "fine stage", backward=True, coarse=False)
    with pytest.raises(SystemExit, match="selection not checked"):
        check_spot(errors, bf16, "fine stage", backward=True)
    as_vsa = spot_check(ctx, scale=scale, **ALL)  # judged as a VSA call: counts below topk are wrong there
    assert as_vsa["selection"] == np.inf and "out" not in as_vsa
    full = types.SimpleNamespace(**{**vars(ctx), "q2k_num": np.full_like(q2k_num, 3)})
    full.out, full.lse = numba_cpu.block_sparse_fwd(q, k, v, q2k_idx, full.q2k_num, kv_sizes, scale, None, None,
                                                    q_block_sizes=q_sizes)
    assert max(spot_check(full, scale=scale, coarse=False, **ALL)["out"]) < 1e-4
    as_vsa = spot_check(full, scale=scale, **ALL)
    assert as_vsa["selection"] > 0 and as_vsa["out"][0] > 0.1  # not a top-k, and no coarse branch
    wrong = out.copy()
    wrong[:, :, 3] *= 1.05
    ctx_wrong = types.SimpleNamespace(**{**vars(ctx), "out": wrong})
    assert spot_check(ctx_wrong, scale=scale, coarse=False, **ALL)["out"][1] > 3e-2
    wrong = dk.copy()
    wrong[:, :, 0] += 0.5
    assert spot_check(ctx, dout, types.SimpleNamespace(dq=dq, dk=wrong, dv=dv), scale=scale, coarse=False,
                      **ALL)["dk"][1] > 0.1
    wrong = dv.copy()
    wrong[:, :, -1] = np.nan  # a pad row of the last key tile, which is partial
    assert kv_sizes[-1] < 32
    assert spot_check(ctx, dout, types.SimpleNamespace(dq=dq, dk=dk, dv=wrong), scale=scale, coarse=False,
                      **ALL)["pad"] == np.inf


def test_bench_tile_checks_each_result_it_times():
    """bench_tile.check_results passes the CPU backend's tile, untile, tile means and top-k (ties
    included) and stops on a pad slot left unwritten, a moved token, a tile mean 1e-4 off, and
    a list that is not the top-k."""
    from bench_tile import check_results

    plan = vsa_nd.tile_plan((3, 9, 10))  # partial tiles of 4 x 4 x 4
    rng = np.random.default_rng(3)
    bf16 = ml_dtypes.bfloat16
    x = rng.standard_normal((2, plan.seq_len, 3, 16)).astype(bf16)
    tiled = vsa_nd.tile(x, plan)
    back = vsa_nd.untile(tiled, plan)
    means = vsa_nd.block_mean(tiled, plan.variable_block_sizes)
    assert means.dtype == np.float32
    scores = rng.standard_normal((2, 3, plan.num_blocks, plan.num_blocks)).astype(np.float32)
    scores[..., 5] = scores[..., 2]  # ties: the lower index wins
    idx, num = vsa_nd.select_topk_blocks(scores, 4)
    others = [vsa_nd.tile(rng.standard_normal(x.shape).astype(bf16), plan) for _ in range(2)]
    sources = [tiled, *others]
    launch = [(t, vsa_nd.block_mean(t, plan.variable_block_sizes)) for t in sources]  # three tensors, as timed
    args = dict(x=x, tiled=tiled, back=back, plan=plan, means=launch, scores=scores, idx=idx, num=num, topk=4)
    assert check_results(**args).startswith("checked: tile and untile bit for bit")

    unwritten = tiled.copy()
    pad = np.flatnonzero(~reference.valid_slots(plan.variable_block_sizes, plan.tile_volume))[0]
    unwritten[1, 2, pad] = np.nan
    moved, wrong = back.copy(), idx.copy()
    moved[0, [0, 1]] = moved[0, [1, 0]]
    off = launch[1][1].copy()
    off[0, 1, 2, 3] += 1e-4
    wrong[1, 2, 3, 0] = np.setdiff1d(np.arange(plan.num_blocks), idx[1, 2, 3])[0]
    swapped = [(sources[0], launch[0][1]), (sources[1], launch[2][1]), (sources[2], launch[1][1])]
    nan_mean = launch[2][1].copy()
    nan_mean[0, 0, 0, 0] = np.nan
    for change, message in [(dict(tiled=unwritten), "tile differs"), (dict(back=moved), "untile"),
                            (dict(means=[launch[0], (sources[1], off), launch[2]]), "tile means off"),
                            (dict(means=swapped), "tile means off"),
                            (dict(means=[*launch[:2], (sources[2], nan_mean)]), "tile means off by nan"),
                            (dict(idx=wrong), "top-4 lists"), (dict(num=num - 1), "top-4 lists")]:
        with pytest.raises(SystemExit, match=message):
            check_results(**{**args, **change})


def test_agree_compares_two_ways_of_calling_the_same_kernels():
    """_common.agree: identical results say so, rounding-sized differences pass with their size,
    and a wrong array, NaN, a missing array or another shape stop the benchmark; torch leaves
    (bfloat16 included) compare with NumPy ones."""
    rng = np.random.default_rng(5)
    a = [rng.standard_normal((3, 8)), rng.standard_normal((2, 4)).astype(np.float32)]
    assert agree(a, [x.copy() for x in a], "same").endswith("identical to the array call's")
    line = agree(a, [a[0] * (1 + 1e-4), a[1]], "rounded")
    assert "1.0e-04 from the array call's" in line
    for other, message in [([a[0], a[1] * 1.1], "results 1.0e-01 from"), ([a[0], a[1] * np.nan], "results inf from"),
                           ([a[0]], "count or shape"), ([a[0], a[1][:1]], "count or shape")]:
        with pytest.raises(SystemExit, match=message):
            agree(a, other, "wrong")
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((4, 4)).astype(ml_dtypes.bfloat16)
    t = torch.tensor(x.astype(np.float32)).to(torch.bfloat16).requires_grad_()
    assert agree((x,), (t,), "torch").endswith("identical to the array call's")
    with pytest.raises(SystemExit, match="results"):
        agree((x,), (t * 2,), "torch")


# ---------------------------------------------------------------------------------------
# The figures the benchmarks report, pinned (from a mutation audit of benchmarks/_common.py:
# each test fails a change its name describes).


def test_errors_floor_the_whole_sample_and_each_row_as_documented():
    """_errors: the whole sample's norm floored at an RMS of 0.01 per element, each row's at 0.1
    of the RMS row norm (and at 0.01 per element)."""
    want = np.full((100, 16), 1e-4)
    assert _errors(want + 1e-3, want)[0] == pytest.approx(np.sqrt(100 * 16) * 1e-3 / (0.01 * np.sqrt(100 * 16)))
    rng = np.random.default_rng(0)
    want = rng.standard_normal((50, 16))
    want[3] *= 0.2  # a small row, above the 0.1 floor: its own norm counts
    got = want.copy()
    got[3] *= 1.02
    assert _errors(got, want)[1] == pytest.approx(0.02)
    tiny = np.full((4, 16), 1e-3)
    assert _errors(2 * tiny, tiny)[1] == pytest.approx(1e-3 / 0.01)


def _first_pad_slot(ctx):
    """The first pad slot of the last (partial) query tile."""
    n = len(ctx.q_block_sizes)
    return (n - 1) * (ctx.q.shape[2] // n) + int(ctx.q_block_sizes[-1])


def test_spot_check_reads_every_pad_row_and_any_sign():
    ctx, dout, grads = _spot_problem(np.float32)
    slot = _first_pad_slot(ctx)
    out = ctx.out.copy()
    out[:, :, slot] = 1.0
    assert spot_check(dataclasses.replace(ctx, out=out), **ALL)["pad"] == 1.0
    lse = ctx.lse.copy()
    lse[:, :, slot] = 0.0
    assert spot_check(dataclasses.replace(ctx, lse=lse), **ALL)["pad"] == np.inf
    dk = grads.dk.copy()
    dk[:, :, -1] = np.nan
    assert spot_check(ctx, dout, grads._replace(dk=dk), **ALL)["pad"] == np.inf
    dq = grads.dq.copy()
    dq[:, :, -1] = -1.0
    assert spot_check(ctx, dout, grads._replace(dq=dq), **ALL)["pad"] == 1.0


def test_spot_check_measures_a_skipped_tile_in_units_of_the_score_spread():
    """"selection": how far a skipped key tile outscores a chosen one, over the row's standard
    deviation of scores (not its range)."""
    ctx, _, _ = _spot_problem(np.float32)
    volume = ctx.q.shape[2] // len(ctx.q_block_sizes)
    q_c = reference.block_mean(ctx.q, ctx.q_block_sizes, volume)
    k_c = reference.expand_kv_heads(reference.block_mean(ctx.k, ctx.kv_block_sizes, volume), ctx.q.shape[1])
    scores = reference.coarse_scores(q_c, k_c, ctx.scale)
    order = np.argsort(-scores, axis=-1)
    chosen = order[..., [0, 1, 3]].astype(ctx.q2k_idx.dtype)  # the third best skipped for the fourth
    ranked = np.take_along_axis(scores, order, -1)
    want = ((ranked[..., 2] - ranked[..., 3]) / scores.std(-1)).max()
    got = spot_check(dataclasses.replace(ctx, q2k_idx=chosen), **ALL)["selection"]
    assert 0.3 * want < got <= want * (1 + 1e-6)


def test_spot_check_gives_lse_errors_absolute_below_one():
    ctx, _, _ = _spot_problem(np.float32)
    lse = ctx.lse.copy()
    real = np.isfinite(lse)
    lse[real] += 1e-4
    assert spot_check(dataclasses.replace(ctx, lse=lse), **ALL)["lse"] >= 0.99e-4 / max(1, np.abs(ctx.lse[real]).max())


def test_check_spot_bounds_for_both_16_bit_dtypes():
    exact = dict(scale=0.0, pad=0.0, out=(0, 0), lse=0.0, selection=0.0)
    for dtype in (ml_dtypes.bfloat16, np.float16):
        check_spot(exact, dtype, "x")
    for bad in (dict(selection=0.06), dict(lse=2e-5), dict(scale=2e-6), dict(out=(4e-3, 0))):
        with pytest.raises(SystemExit):
            check_spot({**exact, **bad}, np.float16, "x")
    with pytest.raises(SystemExit, match="lse not checked"):
        check_spot({k: v for k, v in exact.items() if k != "lse"}, np.float16, "x")


def test_smooth_inputs_smooth_every_axis_by_sigma_and_add_the_noise_asked_for():
    """A Gaussian of SIGMA tokens along each axis: neighbours correlate by exp(-1 / (4 sigma^2));
    q and k are that field plus independent noise of the given scale."""
    plan, sigma = vsa_nd.tile_plan((8, 32, 32)), 2
    q, k = smooth_inputs(np.random.default_rng(0), plan, 2, 32, sigma, noise=0.0)
    np.testing.assert_allclose(q, k)  # no noise: one field
    field = vsa_nd.untile(q, plan)[0].reshape(8, 32, 32, 2, 32)
    for axis in range(3):
        along = np.moveaxis(field, axis, 0)
        correlation = (along[:-1] * along[1:]).mean() / field.var()
        assert correlation == pytest.approx(np.exp(-1 / (4 * sigma**2)), abs=0.04), axis
    q, k = smooth_inputs(np.random.default_rng(0), plan, 2, 32, sigma, noise=0.5)
    real = reference.valid_slots(plan.variable_block_sizes, plan.tile_volume)
    assert (q - k)[..., real, :].var() == pytest.approx(2 * 0.5**2, rel=0.05)


def test_clock_sampler_reports_the_median_and_minimum_within_the_window():
    sampler = ClockSampler()
    sampler._samples = [(0.0, 1000.0), (1.0, 1500.0), (2.0, 1200.0), (3.0, 900.0)]
    assert sampler.between(0.5, 2.5) == "1350 / 1200"


def test_time_back_to_back_gives_each_functions_median_time_per_call(monkeypatch):
    """CUDA events stood in for by a clock that each call moves on by its own cost."""
    import torch

    clock = [0.0]

    class Event:
        def __init__(self, enable_timing):
            self.at = None

        def record(self):
            self.at = clock[0]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.at - self.at

    def costing(ms):
        def call():
            clock[0] += ms
        return call

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    assert time_back_to_back([costing(2.0), costing(0.5)], calls=4, runs=3) == [2.0, 0.5]
