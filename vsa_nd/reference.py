"""The NumPy reference of VSA: short, obvious and slow.

Every backend is tested against this module.  It builds dense [S_q, S_kv] score matrices
with an explicit mask, so keep problems small (a few thousand tokens).  Arithmetic runs in
``dtype`` (float64 by default); results are returned in that dtype.

Layout: q [B, H, Sq_pad, D], k and v [B, H_kv, Skv_pad, D] in tiled, head-major order,
``Sq_pad = N_q * V`` and ``Skv_pad = N_kv * V``; query head h reads kv head h // (H / H_kv).

Pad query rows (slots at or past ``q_block_sizes[i]`` of tile i) are not part of the
output: the VSA forward gives them out 0, fine 0 and lse -inf, and the backward pass ignores
what ``dout``, ``q``, ``gate`` and a given ``out`` hold there (NaN included), so neither the
output's pad rows nor the gradients of real tokens depend on them.  (:func:`block_sparse_attn`
and :func:`block_sparse_attn_backward`, the fine stage alone, do the same given
``q_block_sizes``, and compute every row without.)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Forward(NamedTuple):
    out: np.ndarray  # [B, H, Sq_pad, D]   o_f + gate * o_c (or o_f + o_c)
    fine: np.ndarray  # [B, H, Sq_pad, D]   o_f
    coarse: np.ndarray  # [B, H, N_q, D]      o_c per query tile
    lse: np.ndarray  # [B, H, Sq_pad]      natural-log sum-exp of the fine scores
    scores: np.ndarray  # [B, H, N_q, N_kv]   coarse scores C
    q2k_idx: np.ndarray  # [B, H, N_q, topk]   selected key tiles, increasing
    q2k_num: np.ndarray  # [B, H, N_q]         selected count per row


class Gradients(NamedTuple):
    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray
    dgate: np.ndarray | None


def valid_slots(block_sizes, tile_volume: int) -> np.ndarray:
    """[N * V] bool: slot s of tile s // V holds a real token."""
    block_sizes = np.asarray(block_sizes)
    slot_in_tile = np.arange(block_sizes.size * tile_volume) % tile_volume
    return slot_in_tile < np.repeat(block_sizes, tile_volume)


def real_keys(x: np.ndarray, block_sizes, tile_volume: int) -> np.ndarray:
    """x with its pad slots zeroed, so that whatever they hold (even NaN) cannot leak."""
    return np.where(valid_slots(block_sizes, tile_volume)[:, None], x, 0)


def expand_kv_heads(x: np.ndarray, num_heads: int) -> np.ndarray:
    """[B, H_kv, ...] -> [B, H, ...]: query head h sees kv head h // (H / H_kv)."""
    return np.repeat(x, num_heads // x.shape[1], axis=1)


def sum_kv_heads(dx: np.ndarray, num_kv_heads: int) -> np.ndarray:
    """Adjoint of :func:`expand_kv_heads`: sum the query heads of each group."""
    b, h = dx.shape[:2]
    return dx.reshape(b, num_kv_heads, h // num_kv_heads, *dx.shape[2:]).sum(axis=2)


def block_mean(x, block_sizes, tile_volume: int, dtype=np.float64) -> np.ndarray:
    """[B, H, N*V, D] -> [B, H, N, D]: mean of the real tokens of each tile."""
    b, h, s, d = x.shape
    valid = valid_slots(block_sizes, tile_volume).reshape(-1, tile_volume, 1)
    tiles = np.asarray(x, dtype=dtype).reshape(b, h, -1, tile_volume, d)
    total = np.where(valid, tiles, 0).sum(axis=3)
    return total / np.asarray(block_sizes, dtype=dtype)[:, None]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def select_topk(scores: np.ndarray, topk: int):
    """Top-``topk`` columns of each row (ties to the lower index), listed in increasing order."""
    order = np.argsort(-scores, axis=-1, kind="stable")[..., :topk]
    q2k_idx = np.sort(order, axis=-1).astype(np.int32)
    return q2k_idx, np.full(scores.shape[:-1], topk, dtype=np.int32)


def block_map_from_indices(q2k_idx, q2k_num, num_kv_blocks: int) -> np.ndarray:
    """[B, H, N_q, topk] index lists with counts -> [B, H, N_q, N_kv] bool block map."""
    q2k_idx, q2k_num = np.asarray(q2k_idx), np.asarray(q2k_num)
    used = np.arange(q2k_idx.shape[-1]) < q2k_num[..., None]
    block_map = np.zeros(q2k_idx.shape[:-1] + (num_kv_blocks,), dtype=bool)
    b, h, i, _ = np.nonzero(used)
    block_map[b, h, i, q2k_idx[used]] = True
    return block_map


def _fine_probabilities(q, k, block_map, kv_block_sizes, tile_volume, scale):
    """Masked softmax of the fine scores: P [B, H, Sq, Skv] and LSE [B, H, Sq]."""
    k = expand_kv_heads(k, q.shape[1])
    scores = scale * (q @ np.swapaxes(k, -1, -2))
    allowed = np.repeat(np.repeat(block_map, tile_volume, axis=2), tile_volume, axis=3)
    allowed &= valid_slots(kv_block_sizes, tile_volume)
    scores = np.where(allowed, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    # A row with no key at all gets p = 0 (shift by 0); one whose every score is -inf (an input
    # holding -inf, or a product past the float range) gets NaN: its softmax is 0 / 0.
    no_key = ~allowed.any(axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, np.where(no_key, 0, np.nan).astype(scores.dtype))
    p = np.where(allowed, np.exp(scores - row_max), 0)
    total = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        lse = (row_max + np.log(total))[..., 0]
    return p / np.where(total > 0, total, 1), lse


def block_sparse_attn(q, k, v, block_map, kv_block_sizes, tile_volume: int, scale=None, dtype=np.float64,
                      q_block_sizes=None):
    """Fine stage only: attention of each query tile to the real keys of its selected tiles.

    ``block_map`` [B, H, N_q, N_kv] bool.  Returns (o_f [B, H, Sq_pad, D], lse [B, H, Sq_pad]);
    a row that selects no key gets o_f = 0 and lse = -inf, and so does a pad row when
    ``q_block_sizes`` is given (without it every row is computed); a row whose every score is
    -inf gets NaN in both (0 / 0).
    """
    q, k, v = (np.asarray(a, dtype=dtype) for a in (q, k, v))
    k, v = real_keys(k, kv_block_sizes, tile_volume), real_keys(v, kv_block_sizes, tile_volume)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p, lse = _fine_probabilities(q, k, np.asarray(block_map, dtype=bool), kv_block_sizes, tile_volume, scale)
    out = p @ expand_kv_heads(v, q.shape[1])
    if q_block_sizes is None:
        return out, lse
    q_real = valid_slots(q_block_sizes, tile_volume)
    return np.where(q_real[:, None], out, 0), np.where(q_real, lse, -np.inf)


def _fine_backward(dout, q, k, v, block_map, kv_block_sizes, tile_volume, scale, fine=None):
    """dq and the per-query-head dk, dv of sum(dout * o_f), on arrays already in the compute
    dtype with pad keys zeroed (and pad query rows of dout and q zeroed where they do not
    count).  ``fine``: o_f as a backend stored it, for rowsum(dout * o_f); without it, exact."""
    p, _ = _fine_probabilities(q, k, block_map, kv_block_sizes, tile_volume, scale)
    k_h, v_h = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
    dp = dout @ np.swapaxes(v_h, -1, -2)
    if fine is None:
        delta = (dp * p).sum(axis=-1, keepdims=True)  # = rowsum(dout * fine), exactly
    else:
        delta = (dout * fine).sum(axis=-1, keepdims=True)
    ds = p * (dp - delta)
    dq = scale * (ds @ k_h)
    dk_h = scale * (np.swapaxes(ds, -1, -2) @ q)
    dv_h = np.swapaxes(p, -1, -2) @ dout
    return dq, dk_h, dv_h


def block_sparse_attn_backward(dout, q, k, v, block_map, kv_block_sizes, tile_volume: int, scale=None,
                               dtype=np.float64, q_block_sizes=None):
    """Fine stage only: (dq, dk, dv) of sum(dout * o_f) for :func:`block_sparse_attn`'s o_f.

    Rows that select no key give no gradient; so do pad query rows when ``q_block_sizes`` is
    given (whatever dout and q hold there), as in :func:`block_sparse_attn`.  dk and dv are
    summed over the query heads of each kv head.
    """
    q, k, v, dout = (np.asarray(a, dtype=dtype) for a in (q, k, v, dout))
    k, v = real_keys(k, kv_block_sizes, tile_volume), real_keys(v, kv_block_sizes, tile_volume)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q_block_sizes is not None:
        q_real = valid_slots(q_block_sizes, tile_volume)[:, None]
        dout, q = np.where(q_real, dout, 0), np.where(q_real, q, 0)
    dq, dk_h, dv_h = _fine_backward(dout, q, k, v, np.asarray(block_map, dtype=bool), kv_block_sizes, tile_volume,
                                    scale)
    return dq, sum_kv_heads(dk_h, k.shape[1]), sum_kv_heads(dv_h, k.shape[1])


def coarse_scores(q_c: np.ndarray, k_c: np.ndarray, scale: float) -> np.ndarray:
    """scale * q_c k_c^T [..., N_q, N_kv], every entry summed in the same order: key tiles with
    equal means score exactly equal, so select_topk's ties go to the lower index as documented
    (a BLAS matmul may round equal columns differently, by an ulp)."""
    return scale * np.einsum("...id,...jd->...ij", q_c, k_c)


def broadcast_tiles(x: np.ndarray, tile_volume: int) -> np.ndarray:
    """[B, H, N, D] -> [B, H, N*V, D]: every slot of tile i gets row i."""
    return np.repeat(x, tile_volume, axis=2)


def video_sparse_attn(
    q,
    k,
    v,
    q_block_sizes,
    kv_block_sizes,
    topk: int,
    tile_volume: int,
    scale=None,
    gate=None,
    q2k_idx=None,
    q2k_num=None,
    dtype=np.float64,
) -> Forward:
    """The whole VSA forward.  Pass ``q2k_idx``/``q2k_num`` to override the top-k selection."""
    q, k, v = (np.asarray(a, dtype=dtype) for a in (q, k, v))
    num_heads, scale = q.shape[1], q.shape[-1] ** -0.5 if scale is None else scale

    q_c = block_mean(q, q_block_sizes, tile_volume, dtype)
    k_c = expand_kv_heads(block_mean(k, kv_block_sizes, tile_volume, dtype), num_heads)
    v_c = expand_kv_heads(block_mean(v, kv_block_sizes, tile_volume, dtype), num_heads)
    scores = coarse_scores(q_c, k_c, scale)
    coarse = softmax(scores) @ v_c

    if q2k_idx is None:
        q2k_idx, q2k_num = select_topk(scores, topk)
    block_map = block_map_from_indices(q2k_idx, q2k_num, scores.shape[-1])
    fine, lse = block_sparse_attn(q, k, v, block_map, kv_block_sizes, tile_volume, scale, dtype, q_block_sizes)

    weight = 1.0 if gate is None else np.asarray(gate, dtype=dtype)
    out = np.where(valid_slots(q_block_sizes, tile_volume)[:, None], fine + weight * broadcast_tiles(coarse, tile_volume), 0)
    return Forward(out, fine, coarse, lse, scores, np.asarray(q2k_idx), np.asarray(q2k_num))


def video_sparse_attn_backward(
    dout,
    q,
    k,
    v,
    q_block_sizes,
    kv_block_sizes,
    q2k_idx,
    q2k_num,
    tile_volume: int,
    scale=None,
    gate=None,
    dtype=np.float64,
    out=None,
) -> Gradients:
    """Gradients of sum(dout * out) over the real query rows, with the selection held fixed.

    With ``out`` (the forward's output as a backend stored it, e.g. rounded to bfloat16), the
    softmax term rowsum(dO * fine) is computed from ``fine = out - (gate *) coarse`` the way
    the backends must compute it, instead of exactly: the result then differs from a backend's
    only by the backend's arithmetic, also where the exact gradient is zero (a query that sees
    a single key) and the backend's is the rounding of ``out``.
    """
    q, k, v, dout = (np.asarray(a, dtype=dtype) for a in (q, k, v, dout))
    k, v = real_keys(k, kv_block_sizes, tile_volume), real_keys(v, kv_block_sizes, tile_volume)
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_real = valid_slots(q_block_sizes, tile_volume)[:, None]
    # Pad query rows are not part of the output: whatever dout, q, gate and out hold there
    # (NaN included) reaches no gradient.
    dout, q = np.where(q_real, dout, 0), np.where(q_real, q, 0)

    # Coarse branch: o_c = softmax(scale q_c k_c^T) v_c, broadcast to the tile's slots.
    q_c = block_mean(q, q_block_sizes, tile_volume, dtype)
    k_c = expand_kv_heads(block_mean(k, kv_block_sizes, tile_volume, dtype), num_heads)
    v_c = expand_kv_heads(block_mean(v, kv_block_sizes, tile_volume, dtype), num_heads)
    a = softmax(coarse_scores(q_c, k_c, scale))
    coarse = broadcast_tiles(a @ v_c, tile_volume)
    weight = 1.0 if gate is None else np.where(q_real, np.asarray(gate, dtype=dtype), 0)
    d_coarse = (dout * weight).reshape(*q_c.shape[:3], tile_volume, -1).sum(axis=3)
    da = d_coarse @ np.swapaxes(v_c, -1, -2)
    dc = a * (da - (da * a).sum(axis=-1, keepdims=True))
    dq_c = scale * (dc @ k_c)
    dk_c = scale * (np.swapaxes(dc, -1, -2) @ q_c)
    dv_c = np.swapaxes(a, -1, -2) @ d_coarse

    # Fine branch: o_f = P V.
    block_map = block_map_from_indices(q2k_idx, q2k_num, k.shape[2] // tile_volume)
    fine = None if out is None else np.where(q_real, np.asarray(out, dtype=dtype) - weight * coarse, 0)
    dq, dk_h, dv_h = _fine_backward(dout, q, k, v, block_map, kv_block_sizes, tile_volume, scale, fine)

    def spread_mean(dx_c, block_sizes):
        # Adjoint of block_mean: each real token of tile i gets dx_c[i] / block_sizes[i].
        per_token = broadcast_tiles(dx_c / np.asarray(block_sizes, dtype=dtype)[:, None], tile_volume)
        return np.where(valid_slots(block_sizes, tile_volume)[:, None], per_token, 0)

    dq = dq + spread_mean(dq_c, q_block_sizes)
    dk = sum_kv_heads(dk_h + spread_mean(dk_c, kv_block_sizes), num_kv_heads)
    dv = sum_kv_heads(dv_h + spread_mean(dv_c, kv_block_sizes), num_kv_heads)
    return Gradients(dq, dk, dv, None if gate is None else dout * coarse)
