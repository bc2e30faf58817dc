"""Every check of the public API: the right exception type, a message naming the argument, the
expected and the received value, raised before any work is done and without touching the inputs.
"""

import dataclasses
import fractions
import re

import numpy as np
import pytest

import vsa_nd
from vsa_nd import reference as ref

B, H, H_KV, D, VOL = 2, 4, 2, 16, 8
Q_SIZES, KV_SIZES = [8, 8, 5], [8, 3, 8, 8]
N_Q, N_KV = len(Q_SIZES), len(KV_SIZES)


class Inputs:
    """Fresh, valid inputs of every entry point; each case breaks exactly one of them."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
        self.q = normal(B, H, N_Q * VOL, D)
        self.k = normal(B, H_KV, N_KV * VOL, D)
        self.v = normal(B, H_KV, N_KV * VOL, D)
        self.gate = normal(B, H, N_Q * VOL, D)
        self.q_sizes = np.array(Q_SIZES, dtype=np.int32)
        self.kv_sizes = np.array(KV_SIZES, dtype=np.int32)
        self.q2k_idx = np.argsort(rng.random((B, H, N_Q, N_KV)), axis=-1)[..., :2].astype(np.int32)
        self.q2k_num = rng.integers(0, 3, size=(B, H, N_Q)).astype(np.int32)
        self.block_map = rng.random((B, H, N_Q, N_KV)) < 0.5
        self.plan = vsa_nd.tile_plan((3, 5, 6), (2, 2, 4))  # 2*3*2 = 12 tiles of 16 slots, 90 tokens
        self.x = normal(B, 90, H, D)
        self.y = normal(B, H, 12 * 16, D)
        self.q_c, self.k_c, self.v_c = normal(B, H, N_Q, D), normal(B, H_KV, N_KV, D), normal(B, H_KV, N_KV, D)
        self.scores = normal(B, H, N_Q, N_KV)

    def arrays(self):
        return {name: value for name, value in vars(self).items() if isinstance(value, np.ndarray)}


def non_contiguous(x):
    """Same shape and values as x, but not C-contiguous."""
    out = np.asfortranarray(x)
    assert not out.flags.c_contiguous
    return out


def _overlapping_call(fn, x, plan, shape):
    """fn(x', plan, out=buf), x' a copy of x and buf a float32 buffer of ``shape``: overlapping views of one allocation."""
    size = int(np.prod(shape))
    base = np.zeros(x.size + size, np.float32)
    base[: x.size] = x.ravel()
    return fn(base[: x.size].reshape(x.shape), plan, out=base[x.size // 2: x.size // 2 + size].reshape(shape))


def _read_only(shape):
    out = np.empty(shape, np.float32)
    out.flags.writeable = False
    return out


def _plan_sizes_for(num_blocks: int, volume: int):
    """A cached plan's own block sizes: ``num_blocks`` full tiles of ``volume`` tokens."""
    plan = vsa_nd.tile_plan((num_blocks * volume,), (volume,))
    assert plan.num_blocks == num_blocks and plan.tile_volume == volume
    return plan.variable_block_sizes


def as_float64(p, *names):
    """{name: a float64 copy of p.name}."""
    return {name: getattr(p, name).astype(np.float64) for name in names}


def vsa(p, **kw):
    args = dict(q=p.q, k=p.k, v=p.v, topk=2, q_block_sizes=p.q_sizes, kv_block_sizes=p.kv_sizes)
    return vsa_nd.video_sparse_attn(**(args | kw))


def fine(p, **kw):
    args = dict(q=p.q, k=p.k, v=p.v, kv_block_sizes=p.kv_sizes, q2k_idx=p.q2k_idx, q2k_num=p.q2k_num)
    return vsa_nd.block_sparse_attn(**(args | kw))


def with_value(x, index, value):
    x = x.copy()
    x[index] = value
    return x


# (id, call on fresh Inputs, exception type, substrings of the message)
CASES = [
    # --- video_sparse_attn: q, k, v, gate
    ("vsa-q-list", lambda p: vsa(p, q=p.q.tolist()), TypeError, ["q:", "NumPy or CuPy array", "got list"]),
    ("vsa-q-3d", lambda p: vsa(p, q=p.q[0]), ValueError, ["q:", "4 dimensions", "(4, 24, 16)"]),
    ("vsa-q-int", lambda p: vsa(p, q=p.q.astype(np.int32)), TypeError, ["q:", "float32", "got int32"]),
    ("vsa-q-byte-swapped", lambda p: vsa(p, q=p.q.astype(">f4" if np.little_endian else "<f4")), TypeError,
     ["q:", "byte order", "float32, byte-swapped", "q.astype(numpy.float32)"]),
    ("vsa-sizes-str", lambda p: vsa(p, q_block_sizes="abc"), TypeError, ["q_block_sizes:", "1-D array or list of ints", "got str"]),
    ("vsa-sizes-dict", lambda p: vsa(p, kv_block_sizes={0: VOL}), TypeError,
     ["kv_block_sizes:", "1-D array or list of ints", "got dict"]),
    ("vsa-k-dtype", lambda p: vsa(p, k=p.k.astype(np.float64)), TypeError, ["k:", "float32 to match q", "got float64"]),
    ("vsa-v-dtype", lambda p: vsa(p, v=p.v.astype(np.float16)), TypeError, ["v:", "float32 to match q", "got float16"]),
    ("vsa-k-batch", lambda p: vsa(p, k=p.k[:1].copy()), ValueError, ["k:", "[2, *, *, 16]", "[1, 2, 32, 16]"]),
    ("vsa-k-headdim", lambda p: vsa(p, k=p.k[..., :8].copy()), ValueError, ["k:", "[2, *, *, 16]", "[2, 2, 32, 8]"]),
    ("vsa-v-shape", lambda p: vsa(p, v=p.v[:, :1].copy()), ValueError, ["v:", "[2, 2, 32, 16]", "[2, 1, 32, 16]"]),
    (
        "vsa-heads-not-dividing",
        lambda p: vsa(p, k=np.concatenate([p.k, p.k[:, :1]], 1), v=np.concatenate([p.v, p.v[:, :1]], 1)),
        ValueError,
        ["k:", "dividing the 4 query heads", "got 3"],
    ),
    ("vsa-q-noncontiguous", lambda p: vsa(p, q=non_contiguous(p.q)), ValueError,
     ["q:", "C-contiguous", "strides", "xp.ascontiguousarray(q)"]),
    ("vsa-k-noncontiguous", lambda p: vsa(p, k=non_contiguous(p.k)), ValueError, ["k:", "C-contiguous", "strides"]),
    ("vsa-v-noncontiguous", lambda p: vsa(p, v=non_contiguous(p.v)), ValueError, ["v:", "C-contiguous", "strides"]),
    # (an empty batch is taken, with empty results: tests/test_empty_batch.py; a q batch unlike k's is not)
    ("vsa-q-batch-0", lambda p: vsa(p, q=p.q[:0]), ValueError, ["k:", "[0, *, *, 16]", "[2, 2, 32, 16]"]),
    ("vsa-q-headdim-0", lambda p: vsa(p, q=p.q[..., :0]), ValueError,
     ["q:", "every axis after the batch (axis 0) of length at least 1", "[2, 4, 24, 0]"]),
    ("vsa-k-heads-0", lambda p: vsa(p, k=p.k[:, :0], v=p.v[:, :0]), ValueError, ["k:", "at least 1", "[2, 0, 32, 16]"]),
    ("coarse-kc-no-tiles", lambda p: vsa_nd.coarse_attn(p.q_c, p.k_c[:, :, :0], p.v_c[:, :, :0]), ValueError,
     ["k_c:", "at least 1", "[2, 2, 0, 16]"]),
    ("vsa-gate-shape", lambda p: vsa(p, gate=p.gate[:, :2].copy()), ValueError, ["gate:", "[2, 4, 24, 16]", "[2, 2, 24, 16]"]),
    ("vsa-gate-dtype", lambda p: vsa(p, gate=p.gate.astype(np.float64)), TypeError, ["gate:", "float32 to match q", "got float64"]),
    ("vsa-gate-noncontiguous", lambda p: vsa(p, gate=non_contiguous(p.gate)), ValueError, ["gate:", "C-contiguous"]),
    ("vsa-k-token-count", lambda p: vsa(p, k=p.k[:, :, :24].copy(), v=p.v[:, :, :24].copy()), ValueError,
     ["k:", "4 tiles of 8 slots (32)", "kv_block_sizes", "[2, 2, 24, 16]"]),
    # --- video_sparse_attn: block sizes
    ("vsa-q-size-0", lambda p: vsa(p, q_block_sizes=with_value(p.q_sizes, 1, 0)), ValueError,
     ["q_block_sizes:", "[1, 8]", "got values in [0, 8]"]),
    ("vsa-q-size-above-volume", lambda p: vsa(p, q_block_sizes=with_value(p.q_sizes, 2, 9)), ValueError,
     ["q_block_sizes:", "[1, 8]", "got values in [8, 9]"]),
    ("vsa-kv-size-0", lambda p: vsa(p, kv_block_sizes=with_value(p.kv_sizes, 0, 0)), ValueError,
     ["kv_block_sizes:", "[1, 8]", "got values in [0, 8]"]),
    ("vsa-kv-size-negative", lambda p: vsa(p, kv_block_sizes=with_value(p.kv_sizes, 3, -2)), ValueError,
     ["kv_block_sizes:", "[1, 8]", "[-2, 8]"]),
    ("vsa-q-sizes-float", lambda p: vsa(p, q_block_sizes=p.q_sizes.astype(np.float32)), TypeError,
     ["q_block_sizes:", "integer dtype", "got float32"]),
    ("vsa-kv-sizes-float-list", lambda p: vsa(p, kv_block_sizes=[8.0, 3.0, 8.0, 8.0]), TypeError,
     ["kv_block_sizes:", "integer dtype", "got float64"]),
    ("vsa-q-sizes-length", lambda p: vsa(p, q_block_sizes=[8, 8, 8, 8, 5]), ValueError,
     ["q_block_sizes", "24 slots", "5 tiles"]),
    ("vsa-kv-sizes-length", lambda p: vsa(p, kv_block_sizes=p.kv_sizes[:3]), ValueError,
     ["kv_block_sizes", "3 tiles of 8 slots (24)", "[2, 2, 32, 16]"]),
    ("vsa-q-sizes-2d", lambda p: vsa(p, q_block_sizes=p.q_sizes[:, None]), ValueError,
     ["q_block_sizes:", "1 dimensions", "(3, 1)"]),
    ("vsa-q-sizes-scalar", lambda p: vsa(p, q_block_sizes=8), TypeError, ["q_block_sizes:", "1-D", "got int"]),
    ("vsa-q-sizes-ragged", lambda p: vsa(p, q_block_sizes=[8, [8], 5]), ValueError,
     ["q_block_sizes:", "rectangular list of ints", "ragged"]),
    # kv_block_sizes defaulting to q_block_sizes: the errors name what the caller passed
    ("vsa-q-size-0-kv-default", lambda p: vsa(p, k=p.q.copy(), v=p.q.copy(), q_block_sizes=with_value(p.q_sizes, 1, 0),
                                             kv_block_sizes=None), ValueError,
     ["q_block_sizes:", "[1, 8]", "got values in [0, 8]"]),
    ("vsa-q-sizes-float-kv-default", lambda p: vsa(p, k=p.q.copy(), v=p.q.copy(), q_block_sizes=[8.0, 8.0, 5.0],
                                                  kv_block_sizes=None), TypeError,
     ["q_block_sizes:", "integer dtype", "got float64"]),
    ("vsa-k-token-count-kv-default", lambda p: vsa(p, kv_block_sizes=None), ValueError,
     ["k:", "3 tiles of 8 slots (24)", "to match q_block_sizes", "[2, 2, 32, 16]"]),
    # --- video_sparse_attn: topk, scale
    ("vsa-topk-0", lambda p: vsa(p, topk=0), ValueError, ["topk:", "1 <= topk <= 4", "got 0"]),
    ("vsa-topk-above-nkv", lambda p: vsa(p, topk=5), ValueError, ["topk:", "1 <= topk <= 4", "got 5"]),
    ("vsa-topk-bool", lambda p: vsa(p, topk=True), TypeError, ["topk:", "an int", "bool True"]),
    ("vsa-topk-float", lambda p: vsa(p, topk=2.0), TypeError, ["topk:", "an int", "float 2.0"]),
    ("vsa-scale-str", lambda p: vsa(p, scale="0.1"), TypeError, ["scale:", "finite float", "'0.1'"]),
    ("vsa-scale-nan", lambda p: vsa(p, scale=float("nan")), ValueError, ["scale:", "positive finite float", "nan"]),
    ("vsa-scale-negative", lambda p: vsa(p, scale=-0.5), ValueError, ["scale:", "positive finite float", "-0.5"]),
    ("vsa-scale-zero", lambda p: vsa(p, scale=0.0), ValueError, ["scale:", "positive finite float", "0.0"]),
    ("vsa-scale-huge-int", lambda p: vsa(p, scale=10**400), ValueError, ["scale:", "positive finite float", "1000"]),
    ("fine-scale-zero", lambda p: fine(p, scale=0.0), ValueError, ["scale:", "positive finite float", "0.0"]),
    # float64 inputs: no float32 range check behind the positivity one
    ("vsa-scale-zero-float64", lambda p: vsa(p, **as_float64(p, "q", "k", "v"), scale=0.0), ValueError,
     ["scale:", "positive finite float", "0.0"]),
    ("vsa-scale-minus-zero-float64", lambda p: vsa(p, **as_float64(p, "q", "k", "v"), scale=-0.0), ValueError,
     ["scale:", "positive finite float", "-0.0"]),
    ("fine-scale-zero-float64", lambda p: fine(p, **as_float64(p, "q", "k", "v"), scale=0.0), ValueError,
     ["scale:", "positive finite float", "0.0"]),
    ("coarse-scale-zero-float64",
     lambda p: vsa_nd.coarse_attn(*as_float64(p, "q_c", "k_c", "v_c").values(), scale=0.0), ValueError,
     ["scale:", "positive finite float", "0.0"]),
    # --- block_sparse_attn
    ("fine-neither", lambda p: fine(p, q2k_idx=None, q2k_num=None), ValueError, ["q2k_idx, block_map", "exactly one", "neither"]),
    ("fine-both", lambda p: fine(p, block_map=p.block_map), ValueError, ["q2k_idx, block_map", "exactly one", "both"]),
    ("fine-num-with-map", lambda p: fine(p, q2k_idx=None, block_map=p.block_map), ValueError,
     ["q2k_num:", "None with block_map", "got numpy array of shape (2, 4, 3)"]),
    ("fine-idx-out-of-range", lambda p: fine(p, q2k_idx=with_value(p.q2k_idx, (1, 2, 0, 0), 4), q2k_num=np.full((B, H, N_Q), 2)),
     ValueError, ["q2k_idx:", "[0, 4)", "got values in [0, 4]"]),
    ("fine-idx-negative", lambda p: fine(p, q2k_idx=with_value(p.q2k_idx, (0, 0, 1, 1), -1), q2k_num=np.full((B, H, N_Q), 2)),
     ValueError, ["q2k_idx:", "[0, 4)", "got values in [-1, 3]"]),
    ("fine-idx-duplicate-in-row", lambda p: fine(p, q2k_idx=with_value(p.q2k_idx, (1, 3, 2), 2),
                                                 q2k_num=with_value(p.q2k_num, (1, 3, 2), 2)),
     ValueError, ["q2k_idx:", "no tile index twice", "tile 2", "row [1, 3, 2]"]),
    ("fine-num-above-length", lambda p: fine(p, q2k_num=with_value(p.q2k_num, (0, 1, 2), 3)), ValueError,
     ["q2k_num:", "[0, 2] (the list length)", "got values in [0, 3]"]),
    ("fine-num-negative", lambda p: fine(p, q2k_num=with_value(p.q2k_num, (0, 1, 2), -1)), ValueError,
     ["q2k_num:", "[0, 2]", "[-1,"]),
    ("fine-idx-float", lambda p: fine(p, q2k_idx=p.q2k_idx.astype(np.float32)), TypeError,
     ["q2k_idx:", "integer dtype", "got float32"]),
    ("fine-idx-3d", lambda p: fine(p, q2k_idx=p.q2k_idx[0]), ValueError, ["q2k_idx:", "4 dimensions", "(4, 3, 2)"]),
    ("fine-idx-heads", lambda p: fine(p, q2k_idx=p.q2k_idx[:, :2].copy(), q2k_num=p.q2k_num[:, :2].copy()),
     ValueError, ["q2k_idx:", "[2, 4, *, *]", "[2, 2, 3, 2]"]),
    ("fine-num-shape", lambda p: fine(p, q2k_num=p.q2k_num[:, :, :2].copy()), ValueError,
     ["q2k_num:", "[2, 4, 3]", "[2, 4, 2]"]),
    ("fine-idx-tiles-vs-q", lambda p: fine(p, q2k_idx=np.zeros((B, H, 5, 1), np.int32), q2k_num=None),
     ValueError, ["q2k_idx (axis 2):", "divides the 24 slots", "of q", "got 5 tiles"]),
    ("fine-idx-tiles-vs-k", lambda p: fine(p, q2k_idx=np.zeros((B, H, 4, 1), np.int32), q2k_num=None),
     ValueError, ["k:", "4 tiles of 6 slots (24)", "24 slots in the 4 tiles of q2k_idx (axis 2)", "[2, 2, 32, 16]"]),
    ("fine-map-dtype", lambda p: fine(p, q2k_idx=None, q2k_num=None, block_map=p.block_map.astype(np.int8)), TypeError,
     ["block_map:", "bool", "got int8"]),
    ("fine-map-shape", lambda p: fine(p, q2k_idx=None, q2k_num=None, block_map=p.block_map[..., :3].copy()), ValueError,
     ["block_map:", "[2, 4, *, 4]", "[2, 4, 3, 3]"]),
    ("fine-idx-out-of-range-unchecked", lambda p: fine(p, q2k_idx=with_value(p.q2k_idx, (1, 2, 0, 0), 50),
     q2k_num=np.full((B, H, N_Q), 2), check_indices=False), ValueError,  # NumPy lists: always checked
     ["q2k_idx:", "[0, 4) (N_kv)", "got values in [0, 50]"]),
    ("fine-k-dtype", lambda p: fine(p, k=p.k.astype(np.float64)), TypeError, ["k:", "to match q", "got float64"]),
    ("fine-q-noncontiguous", lambda p: fine(p, q=non_contiguous(p.q)), ValueError, ["q:", "C-contiguous"]),
    ("fine-kv-size-above-volume", lambda p: fine(p, kv_block_sizes=with_value(p.kv_sizes, 1, 9)), ValueError,
     ["kv_block_sizes:", "[1, 8]", "[8, 9]"]),
    ("fine-kv-sizes-scalar", lambda p: fine(p, kv_block_sizes=8), TypeError, ["kv_block_sizes:", "1-D", "got int"]),
    # --- block_mean
    ("mean-int", lambda p: vsa_nd.block_mean(p.q.astype(np.int64), p.q_sizes), TypeError, ["x:", "float32", "got int64"]),
    ("mean-3d", lambda p: vsa_nd.block_mean(p.q[0], p.q_sizes), ValueError, ["x:", "4 dimensions", "(4, 24, 16)"]),
    ("mean-noncontiguous", lambda p: vsa_nd.block_mean(non_contiguous(p.q), p.q_sizes), ValueError, ["x:", "C-contiguous"]),
    ("mean-size-0", lambda p: vsa_nd.block_mean(p.q, with_value(p.q_sizes, 0, 0)), ValueError,
     ["block_sizes:", "[1, 8]", "[0, 8]"]),
    ("mean-sizes-length", lambda p: vsa_nd.block_mean(p.q, [8] * 5), ValueError, ["block_sizes", "24 slots", "5 tiles"]),
    ("mean-sizes-empty", lambda p: vsa_nd.block_mean(p.q, []), ValueError, ["block_sizes", "24 slots", "0 tiles"]),
    ("mean-sizes-float", lambda p: vsa_nd.block_mean(p.q, p.q_sizes.astype(np.float64)), TypeError,
     ["block_sizes:", "integer dtype", "float64"]),
    # --- coarse_attn
    ("coarse-qc-3d", lambda p: vsa_nd.coarse_attn(p.q_c[0], p.k_c, p.v_c), ValueError, ["q_c:", "4 dimensions", "(4, 3, 16)"]),
    ("coarse-kc-int", lambda p: vsa_nd.coarse_attn(p.q_c, p.k_c.astype(np.int32), p.v_c), TypeError, ["k_c:", "got int32"]),
    ("coarse-kc-headdim", lambda p: vsa_nd.coarse_attn(p.q_c, p.k_c[..., :4].copy(), p.v_c), ValueError,
     ["k_c:", "[2, *, *, 16]", "[2, 2, 4, 4]"]),
    ("coarse-vc-shape", lambda p: vsa_nd.coarse_attn(p.q_c, p.k_c, p.v_c[:, :, :3].copy()), ValueError,
     ["v_c:", "[2, 2, 4, 16]", "[2, 2, 3, 16]"]),
    ("coarse-heads", lambda p: vsa_nd.coarse_attn(p.q_c[:, :3].copy(), p.k_c, p.v_c), ValueError,
     ["k_c:", "dividing the 3 query heads", "got 2"]),
    ("coarse-scale", lambda p: vsa_nd.coarse_attn(p.q_c, p.k_c, p.v_c, scale=np.inf), ValueError, ["scale:", "inf"]),
    ("coarse-scale-zero", lambda p: vsa_nd.coarse_attn(p.q_c, p.k_c, p.v_c, scale=0), ValueError,
     ["scale:", "positive finite float", "got 0"]),
    # --- select_topk_blocks
    ("topk-scores-3d", lambda p: vsa_nd.select_topk_blocks(p.scores[0], 2), ValueError, ["scores:", "4 dimensions", "(4, 3, 4)"]),
    ("topk-scores-int", lambda p: vsa_nd.select_topk_blocks(p.scores.astype(np.int16), 2), TypeError, ["scores:", "got int16"]),
    ("topk-0", lambda p: vsa_nd.select_topk_blocks(p.scores, 0), ValueError, ["topk:", "1 <= topk <= 4", "got 0"]),
    ("topk-above-nkv", lambda p: vsa_nd.select_topk_blocks(p.scores, 5), ValueError, ["topk:", "1 <= topk <= 4", "got 5"]),
    ("topk-above-nkv-below-nq", lambda p: vsa_nd.select_topk_blocks(np.ones((1, 1, 8, 3), np.float32), 4), ValueError,
     ["topk:", "1 <= topk <= 3", "got 4"]),  # N_kv is the last axis, whatever N_q
    ("topk-bool", lambda p: vsa_nd.select_topk_blocks(p.scores, False), TypeError, ["topk:", "an int", "bool False"]),
    ("topk-noncontiguous", lambda p: vsa_nd.select_topk_blocks(non_contiguous(p.scores), 2), ValueError,
     ["scores:", "C-contiguous"]),
    # --- tile / untile
    ("tile-x-list", lambda p: vsa_nd.tile(p.x.tolist(), p.plan), TypeError, ["x:", "NumPy or CuPy array", "got list"]),
    ("tile-x-3d", lambda p: vsa_nd.tile(p.x[0], p.plan), ValueError, ["x:", "4 dimensions", "(90, 4, 16)"]),
    ("tile-x-tokens", lambda p: vsa_nd.tile(p.x[:, :89].copy(), p.plan), ValueError,
     ["x:", "90 tokens", "(3, 5, 6)", "[2, 89, 4, 16]"]),
    ("tile-x-noncontiguous", lambda p: vsa_nd.tile(non_contiguous(p.x), p.plan), ValueError, ["x:", "C-contiguous"]),
    ("tile-plan-type", lambda p: vsa_nd.tile(p.x, {"seq_shape": (3, 5, 6)}), TypeError, ["plan:", "TilePlan", "got dict"]),
    ("tile-out-shape", lambda p: vsa_nd.tile(p.x, p.plan, out=np.empty((B, H, 190, D), np.float32)), ValueError,
     ["out:", "[2, 4, 192, 16]", "[2, 4, 190, 16]"]),
    ("tile-out-dtype", lambda p: vsa_nd.tile(p.x, p.plan, out=np.empty((B, H, 192, D), np.float64)), TypeError,
     ["out:", "float32", "got float64"]),
    ("tile-out-noncontiguous", lambda p: vsa_nd.tile(p.x, p.plan, out=non_contiguous(np.empty((B, H, 192, D), np.float32))),
     ValueError, ["out:", "C-contiguous", "pass a C-contiguous buffer"]),
    ("tile-out-list", lambda p: vsa_nd.tile(p.x, p.plan, out=[]), TypeError, ["out:", "NumPy or CuPy array", "got list"]),
    ("untile-y-slots", lambda p: vsa_nd.untile(p.y[:, :, :180].copy(), p.plan), ValueError,
     ["y:", "192 slots", "[2, 4, 180, 16]"]),
    ("untile-y-3d", lambda p: vsa_nd.untile(p.y[0], p.plan), ValueError, ["y:", "4 dimensions", "(4, 192, 16)"]),
    ("untile-y-noncontiguous", lambda p: vsa_nd.untile(non_contiguous(p.y), p.plan), ValueError, ["y:", "C-contiguous"]),
    ("untile-plan-type", lambda p: vsa_nd.untile(p.y, "plan"), TypeError, ["plan:", "TilePlan", "got str"]),
    ("untile-out-shape", lambda p: vsa_nd.untile(p.y, p.plan, out=np.empty((B, 90, H, 8), np.float32)), ValueError,
     ["out:", "[2, 90, 4, 16]", "[2, 90, 4, 8]"]),
    ("untile-out-dtype", lambda p: vsa_nd.untile(p.y, p.plan, out=np.empty((B, 90, H, D), np.float16)), TypeError,
     ["out:", "float32", "got float16"]),
    ("tile-out-overlaps-x", lambda p: _overlapping_call(vsa_nd.tile, p.x, p.plan, (B, H, 192, D)), ValueError,
     ["out:", "shares memory with x"]),
    ("untile-out-overlaps-y", lambda p: _overlapping_call(vsa_nd.untile, p.y, p.plan, (B, 90, H, D)), ValueError,
     ["out:", "shares memory with y"]),
    ("tile-out-read-only", lambda p: vsa_nd.tile(p.x, p.plan, out=_read_only((B, H, 192, D))), ValueError,
     ["out:", "writeable", "read-only"]),
    ("vsa-out-read-only", lambda p: vsa(p, out=_read_only(p.q.shape)), ValueError, ["out:", "writeable", "read-only"]),
    ("tile-x-bool", lambda p: vsa_nd.tile(p.x > 0, p.plan), TypeError, ["x:", "2, 4 or 8 bytes", "got bool"]),
    ("tile-x-int8", lambda p: vsa_nd.tile(p.x.astype(np.int8), p.plan), TypeError, ["x:", "2, 4 or 8 bytes", "got int8"]),
    ("untile-y-object", lambda p: vsa_nd.untile(p.y.astype(object), p.plan), TypeError, ["y:", "2, 4 or 8 bytes", "got object"]),
    # --- a plan where its block sizes belong; an untiled q (the layout tile makes is named)
    ("vsa-plan-for-sizes", lambda p: vsa(p, q_block_sizes=p.plan), TypeError,
     ["q_block_sizes:", "expected block sizes, got a tile plan (TilePlan)", "variable_block_sizes"]),
    ("vsa-metadata-for-sizes", lambda p: vsa(p, q_block_sizes=vsa_nd.build_metadata((3, 5, 6), (1, 1, 1), 0.5, (2, 2, 4))),
     TypeError, ["q_block_sizes:", "got VSAMetadata", "plan.variable_block_sizes"]),
    ("fine-plan-for-q-sizes", lambda p: fine(p, q_block_sizes=p.plan), TypeError,
     ["q_block_sizes:", "got a tile plan", "variable_block_sizes"]),
    ("vsa-untiled-q", lambda p: vsa(p, q=p.x, k=p.x, v=p.x, q_block_sizes=p.plan.variable_block_sizes), ValueError,
     ["q_block_sizes:", "divides the 4 slots on axis 2 of q", "is q tiled?", "[B, H, S_pad, D]"]),
    # --- index values beyond int32 are refused, not wrapped (2**32 + 8 is not 8)
    ("vsa-sizes-beyond-int32", lambda p: vsa(p, kv_block_sizes=p.kv_sizes.astype(np.int64) + 2**32), ValueError,
     ["kv_block_sizes:", "fit in int32", "4294967304"]),
    ("fine-idx-beyond-int32", lambda p: fine(p, q2k_idx=p.q2k_idx.astype(np.int64) + 2**32), ValueError,
     ["q2k_idx:", "fit in int32"]),
    ("vsa-sizes-below-int32", lambda p: vsa(p, kv_block_sizes=p.kv_sizes.astype(np.int64) - 2**32), ValueError,
     ["kv_block_sizes:", "fit in int32", "-4294967288"]),
    ("fine-idx-below-int32", lambda p: fine(p, q2k_idx=p.q2k_idx.astype(np.int64) - 2**32), ValueError,
     ["q2k_idx:", "fit in int32"]),
    # int32's largest value fits: the error is the tile range's
    ("fine-idx-int32-max", lambda p: fine(p, q2k_idx=np.full(p.q2k_idx.shape, 2**31 - 1, np.int64)), ValueError,
     ["q2k_idx:", "tile indices in [0, 4)", "2147483647"]),
    ("vsa-sizes-uint64", lambda p: vsa(p, kv_block_sizes=p.kv_sizes.astype(np.uint64) + np.uint64(2**32)), ValueError,
     ["kv_block_sizes:", "fit in int32"]),
    # --- a cached plan's block sizes are trusted only at its own tile volume
    ("vsa-plan-sizes-of-another-volume", lambda p: vsa(p, kv_block_sizes=_plan_sizes_for(N_KV, 4 * VOL)), ValueError,
     ["kv_block_sizes:", f"[1, {VOL}]", f"[{4 * VOL}, {4 * VOL}]"]),
    ("coarse-kc-dtype", lambda p: vsa_nd.coarse_attn(p.q_c, p.k_c.astype(np.float64), p.v_c), TypeError,
     ["k_c:", "float32 to match q_c", "got float64"]),
    # --- tile_plan
    ("plan-0-dims", lambda p: vsa_nd.tile_plan((), ()), ValueError, ["seq_shape:", "1 to 4 dimensions", "got 0"]),
    ("plan-5-dims", lambda p: vsa_nd.tile_plan((2,) * 5, (1,) * 5), ValueError, ["seq_shape:", "1 to 4 dimensions", "got 5"]),
    ("plan-side-0", lambda p: vsa_nd.tile_plan((4, 0, 4), (4, 4, 4)), ValueError, ["seq_shape:", ">= 1", "(4, 0, 4)"]),
    ("plan-tile-side-0", lambda p: vsa_nd.tile_plan((4, 4), (0, 4)), ValueError, ["tile_shape:", ">= 1", "(0, 4)"]),
    ("plan-side-float", lambda p: vsa_nd.tile_plan((4, 4.5), (4, 4)), TypeError, ["seq_shape:", "integers", "4.5"]),
    ("plan-side-str", lambda p: vsa_nd.tile_plan((4, "a"), (4, 4)), TypeError, ["seq_shape:", "ints", "'a'"]),
    ("plan-seq-str", lambda p: vsa_nd.tile_plan("444", (4, 4, 4)), TypeError, ["seq_shape:", "ints", "'444'"]),
    ("plan-seq-int", lambda p: vsa_nd.tile_plan(16), TypeError, ["seq_shape:", "sequence of ints", "got 16"]),
    ("plan-tile-length", lambda p: vsa_nd.tile_plan((8, 8, 8), (4, 4)), ValueError,
     ["tile_shape:", "3 sides", "(8, 8, 8)", "(4, 4)"]),
    ("plan-no-default-tile", lambda p: vsa_nd.tile_plan((2, 2, 2, 2)), ValueError, ["tile_shape:", "no default", "4-D"]),
    ("plan-too-long", lambda p: vsa_nd.tile_plan((2048, 2048, 1024), (4, 4, 4)), ValueError, ["seq_shape:", "2**31", "4294967296"]),
    ("plan-device-name", lambda p: vsa_nd.tile_plan((8,), (4,), device="gpu"), ValueError, ["device:", "'cpu' or 'cuda:<id>'", "'gpu'"]),
    ("plan-device-index", lambda p: vsa_nd.tile_plan((8,), (4,), device="cuda:x"), ValueError,
     ["device:", "'cpu' or 'cuda:<id>'", "'cuda:x'"]),
    ("plan-side-inf", lambda p: vsa_nd.tile_plan((8, float("inf")), (4, 4)), TypeError, ["seq_shape:", "ints", "inf"]),
    ("plan-side-bool", lambda p: vsa_nd.tile_plan((True, 4), (1, 2)), TypeError, ["seq_shape:", "ints", "(True, 4)"]),
    ("plan-device-int", lambda p: vsa_nd.tile_plan((8,), (4,), device=0), TypeError, ["device:", "str", "got 0"]),
    # --- build_metadata / topk_from_sparsity
    ("meta-patch-above-latent", lambda p: vsa_nd.build_metadata((16, 60, 104), (1, 2, 105), 0.9), ValueError,
     ["patch_size:", "no larger than latent_shape (16, 60, 104)", "(1, 2, 105)"]),
    ("meta-patch-length", lambda p: vsa_nd.build_metadata((16, 60, 104), (2, 2), 0.9), ValueError,
     ["patch_size:", "3 sides", "(2, 2)"]),
    ("meta-latent-0-dims", lambda p: vsa_nd.build_metadata((), (), 0.9), ValueError, ["latent_shape:", "1 to 4", "got 0"]),
    ("meta-sparsity-above-1", lambda p: vsa_nd.build_metadata((16, 60, 104), (1, 2, 2), 1.5), ValueError,
     ["sparsity:", "[0, 1]", "1.5"]),
    ("meta-sparsity-negative", lambda p: vsa_nd.build_metadata((16, 60, 104), (1, 2, 2), -0.25), ValueError,
     ["sparsity:", "[0, 1]", "-0.25"]),
    ("sparsity-nan", lambda p: vsa_nd.topk_from_sparsity(float("nan"), 10), ValueError, ["sparsity:", "[0, 1]", "nan"]),
    ("sparsity-str", lambda p: vsa_nd.topk_from_sparsity("0.5", 10), TypeError, ["sparsity:", "float", "'0.5'"]),
    ("sparsity-none", lambda p: vsa_nd.topk_from_sparsity(None, 10), TypeError, ["sparsity:", "float", "None"]),
    ("sparsity-bool", lambda p: vsa_nd.topk_from_sparsity(True, 10), TypeError, ["sparsity:", "float", "True"]),
    ("sparsity-blocks-0", lambda p: vsa_nd.topk_from_sparsity(0.5, 0), ValueError, ["num_kv_blocks:", ">= 1", "got 0"]),
    ("sparsity-huge-int", lambda p: vsa_nd.topk_from_sparsity(10**400, 3), ValueError, ["sparsity:", "[0, 1]", "1000"]),
    ("sparsity-blocks-huge", lambda p: vsa_nd.topk_from_sparsity(0.5, 10**400), ValueError,
     ["num_kv_blocks:", "< 2**53", "1000"]),
    ("sparsity-blocks-float", lambda p: vsa_nd.topk_from_sparsity(0.5, 10.5), TypeError, ["num_kv_blocks:", "int", "10.5"]),
]


@pytest.mark.parametrize("call, exc, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_named_error_and_leaves_inputs_alone(call, exc, words):
    p = Inputs()
    before = {name: x.copy() for name, x in p.arrays().items()}
    with pytest.raises(exc) as info:
        call(p)
    assert type(info.value) is exc
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    for name, x in p.arrays().items():
        np.testing.assert_array_equal(x, before[name], err_msg=f"{name} was modified")


def test_backward_checks_its_context_and_dout():
    p = Inputs()
    out, context = vsa(p, gate=p.gate, return_context=True)
    with pytest.raises(TypeError, match=r"context: expected the VSAContext of video_sparse_attn, got dict"):
        vsa_nd.video_sparse_attn_backward(p.q, dataclasses.asdict(context))
    cases = [
        (p.q.astype(np.float64), TypeError, r"dout: expected dtype float32 to match q, got float64"),
        (p.q[:, :, :16].copy(), ValueError, re.escape("dout: expected shape [2, 4, 24, 16], got [2, 4, 16, 16]")),
        (p.q[0], ValueError, re.escape("dout: expected 4 dimensions, got shape (4, 24, 16)")),
        (p.q.astype(np.int32), TypeError, r"dout: expected dtype in \(.*float32.*\), got int32"),
        (non_contiguous(p.q), ValueError, r"dout: expected a C-contiguous array"),
    ]
    for dout, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            vsa_nd.video_sparse_attn_backward(dout, context)
    # A context changed after the forward: refused before any kernel indexes with it.
    idx = context.q2k_idx
    broken = [
        (dict(q2k_idx=np.full_like(idx, 10**6)), ValueError, re.escape("context.q2k_idx: expected tile indices in [0, 4)")),
        (dict(q2k_num=context.q2k_num + 3), ValueError, re.escape("context.q2k_num: expected counts in [0, 2]")),
        (dict(kv_block_sizes=np.full(N_KV, 10**6, np.int32)), ValueError,
         re.escape("context.kv_block_sizes: expected every block size in [1, 8]")),
        (dict(q_block_sizes=context.q_block_sizes[:2]), ValueError, re.escape("context.k: expected a multiple of the tile volume 12 (context.q's 24 slots over 2 q_block_sizes)")),
        (dict(k=context.k[:, :, :8].copy()), ValueError, re.escape("context.v: expected shape [2, 2, 8, 16], got [2, 2, 32, 16]")),
        (dict(lse=context.lse[..., :-1].copy()), ValueError, re.escape("context.lse: expected shape [2, 4, 24]")),
        (dict(coarse=context.coarse.astype(np.float64)), TypeError, r"context.coarse: expected dtype in \(float32\)"),
        (dict(q2k_idx=idx.astype(np.int64)), TypeError, r"context.q2k_idx: expected dtype in \(int32\)"),
        (dict(gate=None), ValueError, r"out: expected dgate None"),
        (dict(out=p.q[:, :2].copy()), ValueError, re.escape("context.out: expected shape [2, 4, 24, 16]")),
        (dict(scale=-1.0), ValueError, r"context.scale: expected a positive finite float, got -1.0"),
        (dict(scale=None), TypeError, r"context.scale: expected a positive finite float, got None"),
        (dict(q=non_contiguous(context.q)), ValueError, r"context.q: expected a C-contiguous array"),
        (dict(v=context.v.astype(np.float64)), TypeError, r"context.v: expected dtype float32 to match context.q"),
    ]
    buffers = vsa_nd.Gradients(None, None, None, np.empty_like(p.q))
    for change, exc, pattern in broken:
        with pytest.raises(exc, match=pattern):
            vsa_nd.video_sparse_attn_backward(p.q, dataclasses.replace(context, **change), out=buffers)


def test_scale_takes_any_real_number():
    """A NumPy integer or float (or a Fraction) scale gives what the Python float of its value gives."""
    p = Inputs()
    want = fine(p, scale=2.0)
    for scale in (2, np.int64(2), np.int32(2), np.float32(2.0), np.float64(2.0), fractions.Fraction(4, 2)):
        np.testing.assert_array_equal(fine(p, scale=scale), want)
    with pytest.raises(TypeError, match="scale: expected a positive finite float, got bool"):
        fine(p, scale=np.True_)


@pytest.mark.parametrize("scale", [1e-44, 1e-39, 3e38])
def test_scales_the_kernels_cannot_hold_are_refused(scale):
    """Kernels that compute in float32 take scale and scale * log2(e) as float32: a scale that
    would round to a subnormal or 0 (scores flattened, a silently wrong softmax) or to inf is
    refused, by every entry point that takes one; float64 inputs (computed in float64) take it."""
    p = Inputs()
    message = r"scale: expected a positive finite float in \[1.18e-38, 2.36e\+38\] for float32 inputs"
    with pytest.raises(ValueError, match=message):
        fine(p, scale=scale)
    with pytest.raises(ValueError, match=message):
        vsa_nd.video_sparse_attn(p.q, p.k, p.v, 2, p.q_sizes, p.kv_sizes, scale=scale)
    with pytest.raises(ValueError, match=message):
        vsa_nd.coarse_attn(p.q[:, :, :16], p.k[:, :, :16], p.v[:, :, :16], scale=scale)
    for edge in (1.2e-38, 2.3e38, vsa_nd.ops._SCALE_MIN, vsa_nd.ops._SCALE_MAX):  # inside the range or on its ends: taken
        fine(p, scale=edge)
    as64 = {name: getattr(p, name).astype(np.float64) for name in ("q", "k", "v")}
    fine(p, **as64, scale=scale)


def test_a_device_plan_without_cupy_names_the_device(monkeypatch):
    """Where CuPy is missing, a plan on a GPU is refused with the device named, not an ImportError
    from inside."""
    import sys

    vsa_nd.tile_plan((8, 8), (4, 4))  # the CPU plan of that tiling, cached: not what a GPU gets
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy then raises ImportError
    with pytest.raises(ValueError, match=r"device: 'cuda:7' needs CuPy, which could not be imported here \("):
        vsa_nd.tile_plan((8, 8), (4, 4), device="cuda:7")


def test_numpy_integers_are_taken_where_a_python_int_is():
    p = Inputs()
    want = vsa(p, topk=2)
    for topk in (np.int64(2), np.uint8(2), np.int32(2)):
        np.testing.assert_array_equal(vsa(p, topk=topk), want)
    want_idx, want_num = vsa_nd.select_topk_blocks(p.scores, 2)
    idx, num = vsa_nd.select_topk_blocks(p.scores, np.int16(2))
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(num, want_num)


def test_strided_block_sizes_and_lists_give_what_contiguous_ones_give():
    """Block sizes and index lists that are strided views: the same results, forward and
    backward, and a context whose arrays the backward takes (C-contiguous copies)."""
    p = Inputs()
    strided_q, strided_kv = (np.repeat(x, 2)[::2] for x in (p.q_sizes, p.kv_sizes))
    assert not strided_q.flags.c_contiguous and not strided_kv.flags.c_contiguous
    out, context = vsa(p, q_block_sizes=strided_q, kv_block_sizes=strided_kv, return_context=True)
    want_out, want_context = vsa(p, return_context=True)
    np.testing.assert_array_equal(out, want_out)
    for name in ("q_block_sizes", "kv_block_sizes", "q2k_idx", "q2k_num", "lse"):
        assert getattr(context, name).flags.c_contiguous, name
    dout = np.random.default_rng(3).standard_normal(p.q.shape).astype(np.float32)
    for got, want in zip(vsa_nd.video_sparse_attn_backward(dout, context),
                         vsa_nd.video_sparse_attn_backward(dout, want_context)):
        np.testing.assert_array_equal(got, want)
    strided_idx = np.repeat(p.q2k_idx, 2, axis=-1)[..., ::2]
    assert not strided_idx.flags.c_contiguous
    np.testing.assert_array_equal(fine(p, q2k_idx=strided_idx), fine(p))


def test_block_sizes_as_a_list_serve_both_sides_and_the_backward():
    """One list of block sizes (kv_block_sizes left to default to it): what the array gives."""
    p = Inputs()
    k, v = (x[:, :, : N_Q * VOL].copy() for x in (p.k, p.v))  # kv tiled as q is
    dout = np.random.default_rng(4).standard_normal(p.q.shape).astype(np.float32)
    results = []
    for sizes in (list(Q_SIZES), p.q_sizes):
        out, context = vsa_nd.video_sparse_attn(p.q, k, v, 2, sizes, return_context=True)
        results.append((out, *vsa_nd.video_sparse_attn_backward(dout, context)[:3]))
    for got, want in zip(*results):
        np.testing.assert_array_equal(got, want)


def test_backward_buffers_of_the_wrong_count_are_named():
    p = Inputs()
    out, context = vsa(p, return_context=True)
    for buffers in ((np.empty_like(p.q), None, None), (None,) * 5):
        with pytest.raises(TypeError, match=re.escape("out: expected a Gradients or a tuple (dq, dk, dv, dgate)")):
            vsa_nd.video_sparse_attn_backward(out, context, out=buffers)


def test_valid_edge_inputs_are_accepted_and_computed_right():
    """Counts below the list length, garbage past the count, and a block map all pass the checks."""
    p = Inputs()
    idx = p.q2k_idx.copy()
    idx[p.q2k_num == 0, 0] = 99  # unused entries: never read, so never checked
    idx[..., 1][p.q2k_num < 2] = -5
    before = {name: x.copy() for name, x in p.arrays().items()}
    out, lse = fine(p, q2k_idx=idx, return_lse=True)
    expected_map = ref.block_map_from_indices(p.q2k_idx, p.q2k_num, N_KV)
    expect, expect_lse = ref.block_sparse_attn(p.q, p.k, p.v, expected_map, p.kv_sizes, VOL)
    real = ref.valid_slots(Q_SIZES, VOL)
    np.testing.assert_allclose(out[:, :, real], expect[:, :, real], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lse[:, :, real], expect_lse[:, :, real], rtol=1e-5, atol=1e-5)
    from_map = fine(p, q2k_idx=None, q2k_num=None, block_map=expected_map)
    np.testing.assert_allclose(from_map[:, :, real], out[:, :, real], rtol=1e-5, atol=1e-6)
    for name, x in p.arrays().items():
        np.testing.assert_array_equal(x, before[name], err_msg=f"{name} was modified")


@pytest.mark.parametrize("shape, density", [((2, 3, 5, 7), 0.4), ((1, 2, 4, 1), 0.5), ((1, 1, 0, 3), 0.5),
                                            ((1, 2, 3, 6), 0.0), ((1, 2, 3, 6), 1.0), ((2, 2, 9, 40), 0.1)])
def test_block_map_lists_are_the_stable_order_of_the_map(shape, density):
    """A block map's index lists: its selected tiles in increasing order, then the others in
    increasing order (what a stable argsort of the unselected flags gives), and the counts; also
    for a map that is a strided view."""
    from vsa_nd.ops import _index_lists_from_block_map

    rng = np.random.default_rng(sum(shape))
    for block_map in (rng.random(shape) < density, (rng.random(shape[:2] + shape[:1:-1]) < density).swapaxes(2, 3)):
        lists, counts = _index_lists_from_block_map(block_map)
        assert lists.dtype == np.int32 and counts.dtype == np.int32
        np.testing.assert_array_equal(lists, np.argsort(~block_map, axis=-1, kind="stable"))
        np.testing.assert_array_equal(counts, block_map.sum(axis=-1))


def test_a_block_map_without_key_tiles_is_refused_by_name():
    p = Inputs()
    q = p.q
    with pytest.raises(ValueError, match="k: expected 0 tiles"):
        vsa_nd.block_sparse_attn(q, p.k, p.v, np.zeros(0, np.int32), block_map=np.zeros(q.shape[:2] + (N_Q, 0), bool))


@pytest.mark.gpu
def test_arrays_on_different_devices_are_refused():
    import cupy

    p = Inputs()
    q = cupy.asarray(p.q.astype(np.float16))
    k, v = (x.astype(np.float16) for x in (p.k, p.v))
    with pytest.raises(TypeError, match=r"k: expected an array on cuda:0, got one on cpu"):
        vsa_nd.video_sparse_attn(q, k, v, 2, p.q_sizes, p.kv_sizes)


@pytest.mark.parametrize("name", ["q", "k", "v", "gate"])
def test_forward_out_may_not_be_an_input(name):
    """An ``out`` that is one of the inputs would overwrite it (and a context's later backward would
    read the output as q): refused, the input left alone."""
    plan = vsa_nd.tile_plan((5, 6), (4, 4))
    rng = np.random.default_rng(0)
    arrays = {n: rng.standard_normal((1, 2, plan.padded_len, 16)).astype(np.float32) for n in ("q", "k", "v", "gate")}
    before = arrays[name].copy()
    with pytest.raises(ValueError, match=f"out: expected a buffer of its own, got one that shares memory with {name}"):
        vsa_nd.video_sparse_attn(arrays["q"], arrays["k"], arrays["v"], 3, plan.variable_block_sizes,
                                 gate=arrays["gate"], out=arrays[name])
    np.testing.assert_array_equal(arrays[name], before)


@pytest.mark.parametrize("q", [[1.0], None, "q"])
def test_video_sparse_attn_names_q_that_is_no_array(q):
    """q, k and v of one type that is not an array: q is named, whatever else the call holds."""
    with pytest.raises(TypeError, match="q: expected a NumPy or CuPy array"):
        vsa_nd.video_sparse_attn(q, q, q, 1, [1])
