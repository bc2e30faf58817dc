"""The benchmark helpers that shape what the GPU figures mean (CPU, NumPy): video-like inputs
(``benchmarks/_common.smooth_inputs``) must give local selections and random ones must not, and
the overlap measure must count what it says."""

import sys
from pathlib import Path

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
