"""The array-level API: validate once, then run on the backend of the input's array module.

NumPy arrays run on the Numba CPU backend, CuPy arrays on the CUDA backend.  All
attention tensors are in tiled, head-major layout (see :func:`tile`):

    q, gate, out, dout   [B, H, Sq_pad, D]      Sq_pad = N_q * V
    k, v                 [B, H_kv, Skv_pad, D]  Skv_pad = N_kv * V,  H % H_kv == 0
    q_block_sizes        [N_q]  int, real tokens per query tile (1..V)
    kv_block_sizes       [N_kv] int, real tokens per key tile (1..V)
    q2k_idx              [B, H, N_q, L] int32, selected key tiles per query tile
    q2k_num              [B, H, N_q] int32, how many entries of each row are used
    lse                  [B, H, Sq_pad] float32 (float64 for float64 inputs); -inf on pad query rows

The tile volume V is implied by the shapes (``Sq_pad // N_q``).  Attention tensors share
one floating dtype: float32/float64/float16/bfloat16 on NumPy (computed in float32, or
float64 for float64), float16/bfloat16 on CuPy.  Every axis but the batch must be non-empty;
an empty batch (B = 0) gives empty results, of the shapes and dtypes a batch of any size gets,
once the other checks have passed (nothing runs on the backend).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import numbers
import sys
import threading
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import validation as check
from ._xp import BFLOAT16, array_module, compute_dtype, device_key, is_cupy_array, on_device_of
from .tiling import TilePlan, float_of_real, trusted_tile_volume


def _backend(x):
    if is_cupy_array(x):
        return _backend_module(True)
    backend = _backend_module(False)
    backend.check_not_forked_after_omp()  # (a flag test: a clear error where OpenMP would end the process)
    return backend


@functools.cache
def _backend_module(on_gpu: bool):
    """The backend module, imported on first use (so CuPy and Numba load only when needed), then
    cached: an import statement costs a microsecond on every call, and a call asks several times."""
    if on_gpu:
        from .backends import cuda

        return cuda
    from .backends import numba_cpu

    return numba_cpu


def _on_input_device(fn):
    """Run ``fn`` with its first argument's GPU current, so allocations and launches land there;
    on the host, one such call at a time where Numba's threading layer needs it (:func:`_host_calls`)."""

    first = next(iter(inspect.signature(fn).parameters))

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        x = args[0] if args else kwargs.get(first)
        with on_device_of(x) if is_cupy_array(x) else _host_calls():
            return fn(*args, **kwargs)

    return wrapper


# Numba's "workqueue" threading layer (the one without OpenMP or TBB; also what vsa_nd suggests for
# forked workers) ends the process when two threads run parallel kernels at once: several Python
# threads calling vsa_nd on NumPy arrays, or several XLA CPU devices (shard_map, pmap) calling it
# from their own threads.  So host calls take a process-wide lock until Numba has chosen a layer
# that takes concurrent calls (OpenMP or TBB), and for good under workqueue.  (Re-entrant: the
# public functions call one another.)
_HOST_LOCK = threading.RLock()
_HOST_CONCURRENT: list = []  # [True] once the layer is known to take concurrent calls


def _host_calls():
    """The lock host calls take, or a no-op context once Numba's threading layer takes concurrent calls."""
    if _HOST_CONCURRENT:
        return _NO_LOCK
    # (Not imported, or still being imported by another thread: no parallel kernel has run yet.)
    concurrent = getattr(sys.modules.get("vsa_nd.backends.numba_cpu"), "takes_concurrent_calls", None)
    if concurrent is not None and concurrent():
        _HOST_CONCURRENT.append(True)
        return _NO_LOCK
    return _HOST_LOCK


_NO_LOCK = contextlib.nullcontext()


def _check_plan(plan, like) -> TilePlan:
    if not isinstance(plan, TilePlan):
        raise TypeError(f"plan: expected a vsa_nd.TilePlan, got {type(plan).__name__}")
    return plan.to(device_key(like))


def _check_out(out, like, shape: tuple, dtype, name: str = "out", others: tuple = ()):
    """A result buffer: ``shape`` and ``dtype`` on ``like``'s device, C-contiguous, sharing no
    memory with the arrays in ``others`` ((name, array or None) pairs: the call's inputs, and
    the other result buffers)."""
    check.check_array(name, out, len(shape), (np.dtype(dtype),), like)
    check.check_shape(name, out, shape)
    check.check_contiguous(name, out, "pass a C-contiguous buffer (a copy would leave yours unfilled)")
    if not getattr(out.flags, "writeable", True):  # (CuPy arrays are always writeable)
        raise ValueError(f"{name}: expected a writeable buffer, got a read-only array")
    for other_name, other in others:
        if other is not None and _may_overlap(out, other):
            raise ValueError(f"{name}: expected a buffer of its own, got one that shares memory with {other_name}")
    return out


def _may_overlap(a, b) -> bool:
    """Whether the memory spans of arrays ``a`` and ``b`` (of one kind) intersect.  NumPy's
    ``may_share_memory`` compares spans; CuPy's compares allocations first, and so misses views
    of one buffer that reached CuPy as separate allocations (DLPack, ``UnownedMemory``: the
    torch adapter's views), so on CuPy the spans are compared here."""
    if not is_cupy_array(a):
        return np.may_share_memory(a, b)
    if a.size == 0 or b.size == 0:
        return False
    (low_a, high_a), (low_b, high_b) = _span(a), _span(b)
    return low_a < high_b and low_b < high_a


def _span(x) -> tuple:
    """[first, last + 1) byte addresses of a non-empty CuPy array."""
    low = high = x.data.ptr
    for n, stride in zip(x.shape, x.strides):
        if stride > 0:
            high += (n - 1) * stride
        else:
            low += (n - 1) * stride
    return low, high + x.itemsize


def _check_movable(name: str, x):
    """tile/untile move elements of 2, 4 or 8 bytes (float16/bfloat16/float32/float64, or
    integers of those sizes)."""
    dtype = np.dtype(x.dtype)
    if not (dtype.kind in "fiu" or dtype == BFLOAT16) or dtype.itemsize not in (2, 4, 8):
        raise TypeError(f"{name}: expected a dtype of 2, 4 or 8 bytes such as float16, bfloat16 or float32, got {dtype}")


def tile(x, plan: TilePlan, out=None):
    """Reorder tokens into tiles: x [B, S, H, D] -> [B, H, S_pad, D], pad slots zero.

    ``out`` (optional, [B, H, S_pad, D], x's dtype and device) is filled and returned, so one
    buffer can serve many layers; the result aliases it.
    """
    if out is None and is_cupy_array(x):  # a call like one checked before: the cheap checks only
        result = _prepared_reorder("tile", x, plan)
        if result is not None:
            return result
    return _tile(x, plan, out)


def untile(y, plan: TilePlan, out=None):
    """Undo :func:`tile`: y [B, H, S_pad, D] -> [B, S, H, D], pad slots dropped."""
    if out is None and is_cupy_array(y):
        result = _prepared_reorder("untile", y, plan)
        if result is not None:
            return result
    return _untile(y, plan, out)


@_on_input_device
def _tile(x, plan, out):
    """:func:`tile` with every check."""
    check.check_array("x", x, 4)
    _check_movable("x", x)
    given_plan, plan = plan, _check_plan(plan, x)
    check_reorder_shape("tile", x, plan)
    b, s, h, d = x.shape
    check.check_contiguous("x", x)
    shape = (b, h, plan.padded_len, d)
    return _checked_reorder("tile", "x", x, given_plan, plan.slot_token_index, shape, out)


@_on_input_device
def _untile(y, plan, out):
    """:func:`untile` with every check."""
    check.check_array("y", y, 4)
    _check_movable("y", y)
    given_plan, plan = plan, _check_plan(plan, y)
    check_reorder_shape("untile", y, plan)
    b, h, s_pad, d = y.shape
    check.check_contiguous("y", y)
    shape = (b, plan.seq_len, h, d)
    return _checked_reorder("untile", "y", y, given_plan, plan.untile_index, shape, out)


def check_reorder_shape(kind: str, x, plan):
    """The token axis of :func:`tile`'s x (``kind`` "tile": S on axis 1) or :func:`untile`'s y
    ("untile": S_pad on axis 2; both 4-D, as the caller checked) against ``plan`` (anything with
    seq_shape, seq_len and padded_len: the adapters check traced arrays' shapes with it too)."""
    if kind == "tile":
        name, axis, want, what = "x", 1, plan.seq_len, f"tokens (seq_shape {plan.seq_shape})"
    else:
        name, axis, want, what = "y", 2, plan.padded_len, f"slots (padded length of {plan.seq_shape})"
    if x.shape[axis] != want:
        raise ValueError(f"{name}: expected {want} {what} on axis {axis}, got shape {list(x.shape)}")


def _checked_reorder(kind: str, name: str, x, given_plan, index, shape: tuple, out):
    """The launch of a checked :func:`tile` or :func:`untile` call (``name`` its array's) into
    ``out`` (checked here) or a new array; the call is remembered for the fast path."""
    launch = getattr(_backend(x), kind)
    if out is not None:
        return launch(x, index, _check_out(out, x, shape, x.dtype, others=((name, x),)))
    result = launch(x, index, array_module(x).empty(shape, x.dtype))
    if is_cupy_array(x):
        _remember_reorder(kind, x, given_plan, index, shape)
    return result


# The fast path of tile and untile on CuPy arrays, as video_sparse_attn's (see _CHECKED_FORWARDS):
# a call whose kind, array type, shape, dtype, device and plan (the same object) equal those of
# a checked call only checks its array's contiguity and the current device.
class _CheckedReorder(NamedTuple):
    plan: TilePlan  # the caller's plan, kept so that its id stays its own
    index: object  # the device plan's slot_token_index (tile) or untile_index (untile)
    shape: tuple  # the result's
    device_id: int


_CHECKED_REORDERS: dict = {}  # (kind, type, shape, dtype, device, id(plan)) -> _CheckedReorder
_CHECKED_REORDERS_MAX = 256  # cleared when full


def _remember_reorder(kind: str, x, plan, index, shape: tuple):
    """After a checked :func:`tile` or :func:`untile` call on a CuPy array."""
    if len(_CHECKED_REORDERS) >= _CHECKED_REORDERS_MAX:
        _CHECKED_REORDERS.clear()
    device = x.data.device_id
    _CHECKED_REORDERS[(kind, type(x), x.shape, x.dtype, device, id(plan))] = _CheckedReorder(plan, index, shape, device)


def _prepared_reorder(kind: str, x, plan):
    """The result of a :func:`tile` or :func:`untile` call like one checked before, else None."""
    device = x.data.device_id
    checked = _CHECKED_REORDERS.get((kind, type(x), x.shape, x.dtype, device, id(plan)))
    if checked is None:
        return None
    cuda = _backend_module(True)
    if not x.flags.c_contiguous or cuda.current_device() != device:
        return None
    out = cuda._alloc(checked.shape, x.dtype)
    cuda.reorder(kind, x.data.ptr, checked.index.data.ptr, out.data.ptr, x.shape, x.itemsize, out.shape[2 if kind == "tile" else 1])
    return out


def _num_blocks(name: str, block_sizes) -> int:
    """N, the length of a block-size array or list."""
    if not isinstance(block_sizes, (str, bytes, bytearray, dict, set, frozenset)):  # sized, but not a list of ints
        try:
            return len(block_sizes)
        except TypeError:
            pass
    check.refuse_plan(name, block_sizes)
    raise TypeError(f"{name}: expected a 1-D array or list of ints, got {check.describe(block_sizes)}")


def _tile_volume(name: str, padded_len: int, num_blocks: int, blocks_name: str) -> int:
    """V = padded_len / N, where N comes from the argument ``blocks_name``."""
    if num_blocks < 1 or padded_len % num_blocks:
        raise ValueError(
            f"{blocks_name}: expected a tile count that divides the {padded_len} slots on axis 2 of {name}, "
            f"got {num_blocks} tiles (is {name} tiled? expected [B, H, S_pad, D], as tile(x, plan) makes from "
            f"[B, S, H, D])"
        )
    return padded_len // num_blocks


@_on_input_device
def block_mean(x, block_sizes):
    """Mean of the real tokens of each tile: x [B, H, N*V, D] -> [B, H, N, D] (compute dtype)."""
    check.check_float("x", x, 4)
    check.check_contiguous("x", x)
    n = _num_blocks("block_sizes", block_sizes)
    volume = _tile_volume("x", x.shape[2], n, "block_sizes")
    block_sizes = check.check_block_sizes("block_sizes", block_sizes, x, n, volume)
    if _empty_batch(x):
        return _empty_result(x, (n, x.shape[3]), compute_dtype(x.dtype))
    return _backend(x).block_mean(x, block_sizes)


def _empty_batch(x) -> bool:
    """Whether ``x`` (checked, [B, ...]) has an empty batch: the ops return empty results for it
    after their checks, without launching anything."""
    return x.shape[0] == 0


def _empty_result(x, trailing: tuple, dtype, heads=None):
    """A new result for an empty batch: [0, heads (default x's), *trailing] on x's device."""
    return array_module(x).empty((0, x.shape[1] if heads is None else heads, *trailing), dtype)


def _grouped(x, num_kv_heads: int):
    """[B, H, N, X] -> [B, H_kv, G*N, X] (a view): the query heads of a kv group side by side."""
    b, h, n, last = x.shape
    return x.reshape(b, num_kv_heads, (h // num_kv_heads) * n, last)


def _coarse_scores(q_c, k_c, scale: float):
    """C = scale * q_c k_c^T [B, H, N_q, N_kv]; kv heads shared by a group are not copied.

    q_c [B, H, N_q, D] and k_c [B, H_kv, N_kv, D], C-contiguous in the compute dtype.
    """
    scores = _backend(q_c).matmul(_grouped(q_c, k_c.shape[1]), k_c, transpose_b=True, alpha=scale)
    return scores.reshape(*q_c.shape[:3], -1)


def _coarse_output(probs, v_c):
    """o_c = probs v_c [B, H, N_q, D] from probs [B, H, N_q, N_kv] and v_c [B, H_kv, N_kv, D] (C-contiguous)."""
    b, h, n_q, _ = probs.shape
    return _backend(probs).matmul(_grouped(probs, v_c.shape[1]), v_c).reshape(b, h, n_q, -1)


@_on_input_device
def coarse_attn(q_c, k_c, v_c, scale=None):
    """Dense attention between tile means.

    q_c [B, H, N_q, D], k_c and v_c [B, H_kv, N_kv, D] (compute dtype, e.g. from
    :func:`block_mean`).  Returns (scores C [B, H, N_q, N_kv], o_c [B, H, N_q, D]).
    """
    check.check_float("q_c", q_c, 4)
    b, h, _, d = q_c.shape
    check.check_float("k_c", k_c, 4, like=q_c)
    check.check_float("v_c", v_c, 4, like=q_c)
    for name, x in (("k_c", k_c), ("v_c", v_c)):
        check.check_same_dtype(name, x, q_c, "q_c")
    check.check_shape("k_c", k_c, (b, None, None, d))
    check.check_shape("v_c", v_c, k_c.shape)
    _check_heads(h, k_c.shape[1], "k_c")
    dtype = compute_dtype(q_c.dtype)
    scale = _scale(scale, d, dtype=dtype)
    if _empty_batch(q_c):
        return _empty_result(q_c, (q_c.shape[2], k_c.shape[2]), dtype), _empty_result(q_c, q_c.shape[2:], dtype)
    xp = array_module(q_c)
    q_c, k_c, v_c = (xp.ascontiguousarray(a.astype(dtype, copy=False)) for a in (q_c, k_c, v_c))
    scores = _coarse_scores(q_c, k_c, scale)
    return scores, _coarse_output(_backend(scores).softmax_rows_(scores.copy()), v_c)


@_on_input_device
def select_topk_blocks(scores, topk: int):
    """The ``topk`` highest-scoring key tiles of each query tile, ties to the lower index.

    scores [B, H, N_q, N_kv] float.  Returns (q2k_idx [B, H, N_q, topk] int32, listed in
    increasing tile order; q2k_num [B, H, N_q] int32, all equal to ``topk``).
    """
    check.check_float("scores", scores, 4)
    topk = check.check_int_range("topk", topk, 1, scores.shape[-1])
    if _empty_batch(scores):
        n_q = scores.shape[2]
        return _empty_result(scores, (n_q, topk), np.int32), _empty_result(scores, (n_q,), np.int32)
    scores = scores.astype(compute_dtype(scores.dtype), copy=False)
    return _backend(scores).select_topk(check.check_contiguous("scores", scores), topk)


# The scales that, and whose scale * log2(e), are normal float32s, as kernels that compute in float32
# need them (all but the CPU's float64 ones): below, their factors would round to subnormals or 0
# (scores flattened silently), above, to inf (the last factor keeps the float32 product below its max).
_SCALE_MIN = float(np.finfo(np.float32).tiny)
_SCALE_MAX = float(np.finfo(np.float32).max) / np.log2(np.e) * 0.9999999


def _scale(scale, head_dim: int, name: str = "scale", *, dtype) -> float:
    """The softmax scale as a float (default 1/sqrt(head_dim)), checked for computing in ``dtype``."""
    if scale is None:
        return float(head_dim) ** -0.5
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name}: expected a positive finite float, got {type(scale).__name__} {scale!r}")
    value = float_of_real(scale)  # the float the kernels take
    if not math.isfinite(value) or value <= 0:  # the kernels fold the scale into the softmax's max, which needs it positive
        raise ValueError(f"{name}: expected a positive finite float, got {scale!r}")
    scale = value
    if compute_dtype(np.dtype(dtype)) != np.float64 and not _SCALE_MIN <= scale <= _SCALE_MAX:
        raise ValueError(f"{name}: expected a positive finite float in [{_SCALE_MIN:.3g}, {_SCALE_MAX:.3g}] for "
                         f"{np.dtype(dtype).name} inputs (their kernels take it in float32), got {scale!r}")
    return float(scale)


def _check_heads(h: int, h_kv: int, name: str):
    if h_kv < 1 or h % h_kv:
        raise ValueError(f"{name}: expected a head count dividing the {h} query heads, got {h_kv}")


class _Problem(NamedTuple):
    kv_block_sizes: object
    num_q_blocks: int
    num_kv_blocks: int
    tile_volume: int
    scale: float


def _check_qkv(q, k, v, gate, prefix: str = ""):
    """Shapes, dtypes, devices and contiguity of q, k, v (and gate, unless None); ``prefix`` goes
    before their names in messages (e.g. "context.")."""
    nq, nk, nv, ng = (prefix + name for name in ("q", "k", "v", "gate"))
    check.check_float(nq, q, 4)
    check.check_float(nk, k, 4, like=q)
    check.check_float(nv, v, 4, like=q)
    if gate is not None:
        check.check_float(ng, gate, 4, like=q)
    check_qkv_layout(q, k, v, gate, prefix)
    for name, x in ((nq, q), (nk, k), (nv, v), (ng, gate)):
        if x is not None:
            check.check_contiguous(name, x)


def check_qkv_layout(q, k, v, gate, prefix: str = ""):
    """What the shapes and dtypes of 4-D q, k, v (and gate, unless None) must agree on: k's batch
    and head dim, v shaped as k, query heads grouped over k's, gate shaped as q, one dtype.  Any
    objects with ``shape`` and ``dtype`` (the JAX adapter checks traced arrays at trace time)."""
    nq, nk, nv, ng = (prefix + name for name in ("q", "k", "v", "gate"))
    b, h, s_q, d = q.shape
    for name, x in ((nk, k), (nv, v)):
        check.check_same_dtype(name, x, q, nq)
    check.check_shape(nk, k, (b, None, None, d))
    check.check_shape(nv, v, k.shape)
    _check_heads(h, k.shape[1], nk)
    if gate is not None:
        check.check_same_dtype(ng, gate, q, nq)
        check.check_shape(ng, gate, q.shape)


def check_tiles(q, k, num_q_blocks: int, num_kv_blocks: int, q_blocks_name: str = "q_block_sizes",
                kv_blocks_name: str = "kv_block_sizes") -> int:
    """The tile volume V: the ``num_q_blocks`` tiles (counted by the argument ``q_blocks_name``)
    divide q's axis 2 into V slots each, and k's axis 2 holds ``num_kv_blocks`` of them (counted by
    ``kv_blocks_name``).  Any objects with ``shape``, as :func:`check_qkv_layout`."""
    s_q = q.shape[2]
    volume = _tile_volume("q", s_q, num_q_blocks, q_blocks_name)
    if k.shape[2] != num_kv_blocks * volume:
        raise ValueError(
            f"k: expected {num_kv_blocks} tiles of {volume} slots ({num_kv_blocks * volume}) on axis 2 to match "
            f"{kv_blocks_name} and the tile volume of q ({s_q} slots in the {num_q_blocks} tiles of {q_blocks_name}), "
            f"got shape {list(k.shape)}"
        )
    return volume


def _check_attention(q, k, v, kv_block_sizes, num_q_blocks: int, scale, gate=None, q_blocks_name="q_block_sizes",
                     kv_blocks_name="kv_block_sizes") -> _Problem:
    """Shapes, dtypes, devices and contiguity of q, k, v (and gate); kv block sizes.

    ``num_q_blocks`` is N_q as given by the argument ``q_blocks_name``; ``kv_blocks_name`` is the
    argument that gave ``kv_block_sizes`` (q_block_sizes, when they default to those).
    """
    _check_qkv(q, k, v, gate)
    num_kv_blocks = _num_blocks(kv_blocks_name, kv_block_sizes)
    volume = check_tiles(q, k, num_q_blocks, num_kv_blocks, q_blocks_name, kv_blocks_name)
    if is_cupy_array(q):  # the kernels' own limits, checked before any launch
        from .backends.cuda_attention import check_kernel_support

        check_kernel_support(q, volume, k=k, v=v, gate=gate)
    kv_block_sizes = check.check_block_sizes(kv_blocks_name, kv_block_sizes, q, num_kv_blocks, volume)
    return _Problem(kv_block_sizes, num_q_blocks, num_kv_blocks, volume, _scale(scale, q.shape[3], dtype=q.dtype))


def _index_lists_from_block_map(block_map):
    """[B, H, N_q, N_kv] bool -> lists of length N_kv (selected tiles first, then the others,
    each in increasing order) and the counts of selected ones.

    Each tile's place in its list comes from a running count and is scattered there: no sort,
    which on CuPy before 14 (Thrust) would synchronise with the host."""
    xp = array_module(block_map)
    n_kv = block_map.shape[-1]
    if block_map.size == 0:  # (no key tiles, say: the checks that follow name what is wrong)
        return xp.zeros(block_map.shape, np.int32), xp.zeros(block_map.shape[:-1], np.int32)
    selected_before = xp.cumsum(block_map, axis=-1, dtype=np.int32)  # up to and including each tile
    count = selected_before[..., -1:]
    tiles = xp.arange(n_kv, dtype=np.int32)
    place = xp.where(block_map, selected_before - 1, count + tiles - selected_before)  # a permutation of each row
    flat = np.int32 if block_map.size < 2**31 else np.int64
    rows = xp.arange(block_map.size // n_kv, dtype=flat).reshape(block_map.shape[:-1] + (1,)) * flat(n_kv)
    lists = xp.empty(block_map.shape, np.int32)
    lists.reshape(-1)[(rows + place).reshape(-1)] = xp.broadcast_to(tiles, block_map.shape).reshape(-1)
    return lists, count[..., 0].copy()


@_on_input_device
def block_sparse_attn(
    q, k, v, kv_block_sizes, q2k_idx=None, q2k_num=None, *, block_map=None, scale=None, return_lse=False, check_indices=True,
    q_block_sizes=None,
):
    """Fine stage only: each query tile attends to the real keys of the key tiles it selects.

    Selection by index lists ``q2k_idx`` [B, H, N_q, L] with counts ``q2k_num`` [B, H, N_q]
    (default: all L entries), or by a boolean ``block_map`` [B, H, N_q, N_kv].  Returns
    out [B, H, Sq_pad, D] in q's dtype (and lse [B, H, Sq_pad] with ``return_lse``); a row
    that selects nothing gets 0 and lse -inf, one whose every score is -inf or NaN (inputs
    holding them, or products past the float range) NaN in both.  ``q_block_sizes`` [N_q]
    (optional) gives the real rows per query tile: the others are pad rows, 0 with lse -inf
    whatever q holds in them, as in :func:`video_sparse_attn`; without it every row is
    computed from q.  Block
    sizes are checked as that function checks them.  Index values are checked; on CuPy the
    check costs one host synchronisation, which ``check_indices=False`` skips for lists known to be
    valid (e.g. from :func:`select_topk_blocks`); unchecked lists still never make a kernel read
    outside k and v: entries outside ``[0, N_kv)`` are dropped and counts clamped to ``[0, L]``
    (duplicates are not found).  NumPy lists are always checked: it costs little there.
    """
    check.check_float("q", q, 4)
    b, h = q.shape[:2]
    if (q2k_idx is None) == (block_map is None):
        raise ValueError("q2k_idx, block_map: expected exactly one of them, got "
                         + ("both" if block_map is not None else "neither"))
    if block_map is not None:
        if q2k_num is not None:
            raise ValueError(f"q2k_num: expected None with block_map (the map gives the counts), got {check.describe(q2k_num)}")
        check.check_array("block_map", block_map, 4, (np.dtype(bool),), q)
        check.check_shape("block_map", block_map, (b, h, None, _num_blocks("kv_block_sizes", kv_block_sizes)))
        q2k_idx, q2k_num = _index_lists_from_block_map(block_map)
    # Lists from a map are valid by construction; the CPU kernels index with unchecked lists unguarded.
    check_values = block_map is None and (check_indices or not is_cupy_array(q))
    q2k_idx = check.as_index_array("q2k_idx", q2k_idx, q, ndim=4)
    check.check_shape("q2k_idx", q2k_idx, (b, h, None, None))
    xp = array_module(q)
    if q2k_num is None:
        q2k_num = xp.full(q2k_idx.shape[:3], q2k_idx.shape[3], dtype=np.int32)
    q2k_num = check.as_index_array("q2k_num", q2k_num, q, ndim=3)
    check.check_shape("q2k_num", q2k_num, q2k_idx.shape[:3])
    problem = _check_attention(q, k, v, kv_block_sizes, q2k_idx.shape[2], scale, q_blocks_name="q2k_idx (axis 2)")
    if q_block_sizes is not None:  # N_q entries in [1, V]
        q_block_sizes = check.check_block_sizes("q_block_sizes", q_block_sizes, q, problem.num_q_blocks,
                                                problem.tile_volume)
    check.check_index_lists(q2k_idx, q2k_num, problem.num_kv_blocks, check_values)
    if _empty_batch(q):
        out, lse = _empty_result(q, q.shape[2:], q.dtype), _empty_result(q, q.shape[2:3], compute_dtype(q.dtype))
        return (out, lse) if return_lse else out
    if not check_values and block_map is None:  # CuPy lists taken unchecked: keep the kernels inside k and v
        from .backends.cuda_attention import clean_lists

        q2k_idx, q2k_num = clean_lists(q2k_idx, q2k_num, problem.num_kv_blocks)
    out, lse = _backend(q).block_sparse_fwd(
        q, k, v, q2k_idx, q2k_num, problem.kv_block_sizes, problem.scale, None, None, q_block_sizes=q_block_sizes
    )
    return (out, lse) if return_lse else out


@dataclass
class VSAContext:
    """What :func:`video_sparse_attn_backward` needs from a forward pass.

    Holds references to the forward's inputs and output (not copies) plus the small
    per-tile tensors: lse [B, H, Sq_pad]; the selection q2k_idx [B, H, N_q, topk] and
    q2k_num [B, H, N_q]; the tile means q_mean [B, H, N_q, D], k_mean and v_mean
    [B, H_kv, N_kv, D]; the coarse softmax probabilities coarse_probs [B, H, N_q, N_kv];
    the coarse output coarse [B, H, N_q, D] (the small ones in the compute dtype).
    """

    q: object
    k: object
    v: object
    gate: object
    out: object
    lse: object
    q2k_idx: object
    q2k_num: object
    q_block_sizes: object
    kv_block_sizes: object
    scale: float
    q_mean: object
    k_mean: object
    v_mean: object
    coarse_probs: object
    coarse: object


def video_sparse_attn(q, k, v, topk: int, q_block_sizes, kv_block_sizes=None, *, gate=None, scale=None,
                      return_context=False, out=None):
    """Video Sparse Attention: coarse tile attention, top-k tile selection, fine attention.

    q [B, H, Sq_pad, D]; k, v [B, H_kv, Skv_pad, D] (tiled with :func:`tile`); ``topk`` key
    tiles per query tile (1..N_kv); ``q_block_sizes`` [N_q] and ``kv_block_sizes`` [N_kv]
    (default: ``q_block_sizes``) real tokens per tile, e.g. ``plan.variable_block_sizes``;
    ``gate`` optional, q-shaped.  Returns out [B, H, Sq_pad, D] in q's dtype,
    ``fine + gate * coarse`` (``fine + coarse`` without a gate), and with
    ``return_context=True`` also a :class:`VSAContext` for the backward pass.

    ``out`` (optional; q's shape, dtype and device, C-contiguous, no memory shared with the
    inputs) is filled and returned instead of a new array.  The context refers to it: keep it
    unchanged until the backward has run.

    Pad slots of q, k, v and gate never reach a real token's result.  Rows of ``out`` in pad
    slots are 0 (and the context's lse -inf there), whatever q and gate hold in them, NaN
    included; :func:`untile` drops them.

    On CuPy, a call like one already checked (the same array types, shapes and dtypes, topk,
    scale, return_context, and a plan's own block-size arrays) only has its arrays' memory
    checked (device, contiguity, alignment; and ``out``'s type, shape, dtype and overlap with the
    inputs, when given) before its five prepared launches
    (:mod:`vsa_nd.backends.cuda_vsa`); other calls are checked in full.
    """
    signature = None
    if is_cupy_array(q):  # a call like one checked before: the cheap checks only
        signature = _forward_signature(q, k, v, gate, topk, q_block_sizes, kv_block_sizes, scale, return_context)
        checked = _checked_before(signature, q, k, v, gate, out)
        if checked is not None:
            results = _backend_module(True).vsa_forward(q, k, v, gate, q_block_sizes, checked.kv_block_sizes, topk,
                                                        checked.scale, out=out, keep=return_context)
            return _vsa_results(q, k, v, gate, q_block_sizes, checked.kv_block_sizes, checked.scale, results,
                                return_context)
    return _video_sparse_attn(q, k, v, topk, q_block_sizes, kv_block_sizes, gate=gate, scale=scale,
                              return_context=return_context, out=out, signature=signature)


@_on_input_device
def _video_sparse_attn(q, k, v, topk, q_block_sizes, kv_block_sizes, *, gate, scale, return_context, out, signature):
    """:func:`video_sparse_attn` with every check; ``signature`` the call's :func:`_forward_signature`
    (None: not to be remembered), taken before the checks replace the caller's block sizes."""
    check.check_float("q", q, 4)
    given_q_sizes, given_kv_sizes = q_block_sizes, kv_block_sizes
    num_q_blocks = _num_blocks("q_block_sizes", q_block_sizes)
    if kv_block_sizes is None:  # checked once, under the name the caller used
        problem = _check_attention(q, k, v, q_block_sizes, num_q_blocks, scale, gate, kv_blocks_name="q_block_sizes")
        q_block_sizes = problem.kv_block_sizes
    else:
        problem = _check_attention(q, k, v, kv_block_sizes, num_q_blocks, scale, gate)
        q_block_sizes = check.check_block_sizes("q_block_sizes", q_block_sizes, q, num_q_blocks, problem.tile_volume)
    topk = check.check_int_range("topk", topk, 1, problem.num_kv_blocks)
    if out is not None:
        out = _check_out(out, q, q.shape, q.dtype, others=(("q", q), ("k", k), ("v", v), ("gate", gate)))
        if is_cupy_array(q):  # the fine kernel writes it in 4-byte pairs (and the checks ask 16 bytes, as of inputs)
            from .backends.cuda_attention import check_aligned

            check_aligned(("out",), out=out)
    kv_sizes = problem.kv_block_sizes
    if _empty_batch(q):
        results = _empty_forward_results(q, k, num_q_blocks, problem.num_kv_blocks, topk, out)
        return _vsa_results(q, k, v, gate, q_block_sizes, kv_sizes, problem.scale, results, return_context)
    if not is_cupy_array(q):
        results = _staged_forward(_backend(q), q, k, v, gate, q_block_sizes, kv_sizes, topk, problem.scale, out)
        return _vsa_results(q, k, v, gate, q_block_sizes, kv_sizes, problem.scale, results, return_context)
    if return_context:  # refused now rather than by the backward, after this forward's work
        from .backends.cuda_attention import check_backward_lists

        check_backward_lists((*q.shape[:2], num_q_blocks, topk))
    results = _backend(q).vsa_forward(q, k, v, gate, q_block_sizes, kv_sizes, topk, problem.scale, out=out,
                                      keep=return_context)
    # The fast path uses the caller's arrays as they are: only when the checks returned them unchanged.
    if (signature is not None and q_block_sizes is given_q_sizes
            and kv_sizes is (q_block_sizes if given_kv_sizes is None else given_kv_sizes)):
        _remember_checked(signature, q_block_sizes, kv_sizes, problem)
    return _vsa_results(q, k, v, gate, q_block_sizes, kv_sizes, problem.scale, results, return_context)


def _staged_forward(backend, q, k, v, gate, q_block_sizes, kv_block_sizes, topk: int, scale: float, out) -> tuple:
    """The forward stage by stage through ``backend``'s functions (the CPU's way): the results
    of :data:`vsa_nd.backends.FORWARD_RESULTS`, in that order."""
    q_mean, k_mean, v_mean = backend.block_means((q, k, v), (q_block_sizes, kv_block_sizes, kv_block_sizes))
    scores = _coarse_scores(q_mean, k_mean, scale)
    # The scores are not needed after the selection: they become the coarse probabilities in place.
    q2k_idx, q2k_num, probs = backend.select_topk_softmax_(scores, topk)
    coarse = _coarse_output(probs, v_mean)
    out, lse = backend.block_sparse_fwd(q, k, v, q2k_idx, q2k_num, kv_block_sizes, scale, coarse, gate, out=out,
                                        q_block_sizes=q_block_sizes)
    return out, lse, q2k_idx, q2k_num, q_mean, k_mean, v_mean, probs, coarse


def _empty_forward_results(q, k, num_q_blocks: int, num_kv_blocks: int, topk: int, out) -> tuple:
    """The forward's results (:data:`vsa_nd.backends.FORWARD_RESULTS`) for an empty batch: ``out``
    (or a new array) and the context's arrays, all empty, with the shapes and dtypes they have
    for a batch of any size."""
    b, h, s_q, d = q.shape
    h_kv, small, i32 = k.shape[1], compute_dtype(q.dtype), np.dtype(np.int32)
    return (
        _empty_result(q, (s_q, d), q.dtype) if out is None else out,
        _empty_result(q, (s_q,), small),  # lse
        _empty_result(q, (num_q_blocks, topk), i32), _empty_result(q, (num_q_blocks,), i32),  # q2k_idx, q2k_num
        _empty_result(q, (num_q_blocks, d), small),  # q_mean
        _empty_result(q, (num_kv_blocks, d), small, h_kv), _empty_result(q, (num_kv_blocks, d), small, h_kv),
        _empty_result(q, (num_q_blocks, num_kv_blocks), small),  # coarse_probs
        _empty_result(q, (num_q_blocks, d), small),  # coarse
    )


def _vsa_results(q, k, v, gate, q_block_sizes, kv_block_sizes, scale: float, results: tuple, return_context: bool):
    """What :func:`video_sparse_attn` returns, from the forward's ``results`` (``out`` first)."""
    if not return_context:
        return results[0]
    out, lse, q2k_idx, q2k_num, q_mean, k_mean, v_mean, probs, coarse = results
    context = VSAContext(q, k, v, gate, out, lse, q2k_idx, q2k_num, q_block_sizes, kv_block_sizes, scale, q_mean, k_mean,
                         v_mean, probs, coarse)
    return out, context


# The fast path of video_sparse_attn on CuPy arrays.  A call whose signature (below) equals one
# that passed every check, with block sizes that are a cached plan's own arrays (trusted by
# identity, as check_block_sizes trusts them, and alive as long as the process), differs from
# it only in its arrays' memory: the fast path checks that (device, 16-byte alignment,
# contiguity, the current device) and runs the prepared launches, skipping the rest.  Any
# other call, or one whose memory checks fail, takes the full checks (and their messages).
class _CheckedForward(NamedTuple):
    q_block_sizes: object  # the caller's block-size arrays, kept so that their ids stay theirs
    kv_block_sizes: object  # (q_block_sizes when the caller gave none)
    scale: float
    device_id: int


_CHECKED_FORWARDS: dict = {}  # signature -> _CheckedForward
_CHECKED_FORWARDS_MAX = 256  # a model has a handful of attention shapes; cleared when full


def _forward_signature(q, k, v, gate, topk, q_block_sizes, kv_block_sizes, scale, return_context):
    """What determines every check of :func:`video_sparse_attn` but the arrays' memory, as a
    hashable tuple; None for a call the fast path does not take (mixed array types, or a topk,
    scale or return_context of another type than int, float or None, and bool)."""
    kind = type(q)
    if (type(k) is not kind or type(v) is not kind or (gate is not None and type(gate) is not kind)
            or type(topk) is not int or type(return_context) is not bool or not (scale is None or type(scale) is float)):
        return None
    return (kind, q.shape, q.dtype, k.shape, k.dtype, v.shape, v.dtype, None if gate is None else (gate.shape, gate.dtype),
            topk, scale, return_context, id(q_block_sizes), id(kv_block_sizes))


def _remember_checked(signature: tuple, q_block_sizes, kv_block_sizes, problem: _Problem):
    """Let later calls of ``signature`` take the fast path, if both block-size arrays are trusted plan arrays."""
    volume = problem.tile_volume
    if trusted_tile_volume(q_block_sizes) == volume and trusted_tile_volume(kv_block_sizes) == volume:
        if len(_CHECKED_FORWARDS) >= _CHECKED_FORWARDS_MAX:
            _CHECKED_FORWARDS.clear()
        _CHECKED_FORWARDS[signature] = _CheckedForward(q_block_sizes, kv_block_sizes, problem.scale,
                                                       q_block_sizes.data.device_id)


def _checked_before(signature, q, k, v, gate, out=None):
    """The :class:`_CheckedForward` of a CuPy call of ``signature`` (:func:`_forward_signature`)
    like one checked before, whose arrays' memory passes the checks that depend on it; else None.
    ``out`` (None allowed): a result buffer, which must also be of q's type, shape and dtype and
    share no memory with the inputs."""
    checked = None if signature is None else _CHECKED_FORWARDS.get(signature)
    if checked is None:
        return None
    if out is not None and (type(out) is not type(q) or out.shape != q.shape or out.dtype != q.dtype
                            or any(x is not None and _may_overlap(out, x) for x in (q, k, v, gate))):
        return None
    device = checked.device_id
    for x in (q, k, v, gate, out):
        if x is None:
            continue
        memory = x.data
        if memory.device_id != device or memory.ptr % 16 or not x.flags.c_contiguous:
            return None
    return checked if _backend_module(True).current_device() == device else None


class Gradients(NamedTuple):
    """What :func:`video_sparse_attn_backward` returns: dq [B, H, Sq_pad, D] in q's dtype,
    dk and dv [B, H_kv, Skv_pad, D] in k's dtype, dgate q-shaped (None without a gate);
    zero in pad slots."""

    dq: object
    dk: object
    dv: object
    dgate: object


@_on_input_device
def video_sparse_attn_backward(dout, context: VSAContext, *, out=None) -> Gradients:
    """Gradients of ``sum(dout * out)`` over the real query rows, selection held fixed.

    ``dout`` [B, H, Sq_pad, D] in q's dtype; rows in pad slots are ignored.  Pad slots of
    the returned dq, dk, dv (and dgate) are zero.  ``out`` (optional): a :class:`Gradients`
    (or 4-tuple) of buffers to fill instead of new arrays, each None or of its gradient's
    shape, dtype and device, C-contiguous, sharing no memory with ``dout``, the context's
    arrays or each other (dgate None without a gate).

    A real query row whose float32 ``lse`` exceeds 2**20 in magnitude gets NaN gradients (its dq
    row, and dk and dv of every key tile it selected): the lse's rounding would leave them off by
    more than ~6% there, and by orders of magnitude further out (README, "Accuracy at very large
    scores").  A float64 lse (Numba backend) has no such limit.  So does a row whose forward came
    out NaN (lse NaN: every score -inf or NaN), as in the reference.
    """
    return _backward(dout, _check_context(context), out, unchanged_context=False)


@_on_input_device
def backward_into_new_buffers(dout, context: VSAContext, *, out) -> Gradients:
    """:func:`video_sparse_attn_backward` for callers whose ``out`` buffers (or None) they have
    just allocated (the torch adapter's custom op): the context is checked in full, the buffers'
    memory only against dout, q, k, v, gate and out, which a caller could hand back by mistake."""
    return _backward(dout, _check_context(context), out, unchanged_context=False, new_buffers=True)


@_on_input_device
def backward_of_unchanged_context(dout, context: VSAContext, *, out=None) -> Gradients:
    """:func:`video_sparse_attn_backward` for callers that guarantee ``context`` holds the arrays
    their forward returned, unchanged: the adapters (torch checks its saved tensors' version
    counters; JAX arrays are immutable).  The context's own checks (metadata, and on CuPy a
    launch that cleans its lists) are skipped, ``dout`` and ``out`` are checked as there."""
    if not isinstance(context, VSAContext):
        raise TypeError(f"context: expected the VSAContext of video_sparse_attn, got {type(context).__name__}")
    return _backward(dout, context, out, unchanged_context=True)


def _backward(dout, c: VSAContext, out, unchanged_context: bool, new_buffers: bool = False) -> Gradients:
    check.check_float("dout", dout, 4, like=c.q)
    check.check_same_dtype("dout", dout, c.q, "q")
    check.check_shape("dout", dout, c.q.shape)
    check.check_contiguous("dout", dout)
    buffers = _check_gradient_buffers(out, dout, c, every_array=not (unchanged_context or new_buffers))
    if is_cupy_array(dout):  # the kernels' own limits, checked before any launch
        from .backends.cuda_attention import check_backward_lists, check_kernel_support

        # Every array the fine backward's kernels read or write, so that none is refused after the
        # coarse stages have run (a dgate buffer that is not aligned takes narrow loads, below).
        fine_arrays = {"dout": dout, "context.k": c.k, "context.v": c.v, "context.gate": c.gate, "context.out": c.out,
                       "context.lse": c.lse, "context.coarse": c.coarse, "out.dq": buffers.dq, "out.dk": buffers.dk,
                       "out.dv": buffers.dv}
        check_kernel_support(c.q, c.q.shape[2] // len(c.q_block_sizes), ("out.dq", "out.dk", "out.dv"), "context.q",
                             **fine_arrays)
        check_backward_lists(c.q2k_idx.shape)
    if _empty_batch(dout):  # every check passed: empty gradients (or the buffers given), nothing launched
        return Gradients(*(
            None if like is None else buffer if buffer is not None else array_module(like).empty_like(like)
            for buffer, like in zip(buffers, (c.q, c.k, c.v, c.gate))))
    backend = _backend(dout)
    # On CuPy the prepared launches, which load 16 bytes at a time from the rest too (the above are
    # aligned); else the stages one by one: there the coarse pass takes narrow loads where its
    # arrays (dgate, the tile means, the coarse probabilities) are not aligned.
    if is_cupy_array(dout) and _aligned(c.q2k_idx, c.q2k_num, c.q_mean, c.k_mean, c.v_mean, c.coarse_probs,
                                        buffers.dgate):
        return Gradients(*backend.vsa_backward(dout, c, *buffers, clean=not unchanged_context))

    # Also the fine backward's per-row terms, where the backend can take them in the same pass.
    d_coarse, dgate, row_terms = backend.coarse_grad_inputs(dout, c.gate, c.coarse, c.q_block_sizes,
                                                            dgate=buffers.dgate, out=c.out, lse=c.lse)
    # Backward of o_c = softmax(scale * q_c k_c^T) v_c in the grouped layout of _coarse_scores,
    # with one [N_q, N_kv] temporary: dC = P * (dP - rowsum(dP * P)), and
    # rowsum(dP * P) = rowsum(d_coarse * o_c) since dP = d_coarse v_c^T and o_c = P v_c.
    b, h, n_q, d = c.q_mean.shape
    h_kv = c.k_mean.shape[1]
    probs, d_coarse_g = _grouped(c.coarse_probs, h_kv), _grouped(d_coarse, h_kv)
    d_scores = backend.softmax_grad_rows_(backend.matmul(d_coarse_g, c.v_mean, transpose_b=True), probs, d_coarse_g,
                                          _grouped(c.coarse, h_kv))
    # Each tile's gradient is shared by its real tokens: the products divide their rows by the
    # block sizes (rows of a grouped product run over the group's heads, N_q rows per head).
    dq_token = backend.matmul(d_scores, c.k_mean, alpha=c.scale, row_divisor=c.q_block_sizes).reshape(b, h, n_q, d)
    dk_token = backend.matmul(d_scores, _grouped(c.q_mean, h_kv), transpose_a=True, alpha=c.scale,
                              row_divisor=c.kv_block_sizes)
    dv_token = backend.matmul(probs, d_coarse_g, transpose_a=True, row_divisor=c.kv_block_sizes)
    q2k_idx, q2k_num = c.q2k_idx, c.q2k_num
    if is_cupy_array(dout) and not unchanged_context:  # lists changed since the forward go unseen on CuPy
        from .backends.cuda_attention import clean_lists

        q2k_idx, q2k_num = clean_lists(q2k_idx, q2k_num, len(c.kv_block_sizes))
    dq, dk, dv = backend.block_sparse_bwd(
        dout, c.q, c.k, c.v, c.out, c.lse, q2k_idx, q2k_num, c.q_block_sizes, c.kv_block_sizes,
        c.scale, c.coarse, c.gate, dq_token, dk_token, dv_token, dq=buffers.dq, dk=buffers.dk, dv=buffers.dv,
        row_terms=row_terms,
    )
    return Gradients(dq, dk, dv, dgate)


def _aligned(*arrays) -> bool:
    """Whether every CuPy array of ``arrays`` (None allowed) starts on a 16-byte boundary."""
    return all(x is None or x.data.ptr % 16 == 0 for x in arrays)


def _check_context(c) -> VSAContext:
    """The context's arrays are what :func:`video_sparse_attn` returned for one problem: shapes,
    dtypes, devices and contiguity always; on NumPy also the values that the CPU kernels index
    with (block sizes, index lists).  On CuPy checking them would synchronise with the host:
    there the backward cleans the lists instead (see :func:`block_sparse_attn`), and the kernels
    clamp block sizes to the tile."""
    if not isinstance(c, VSAContext):
        raise TypeError(f"context: expected the VSAContext of video_sparse_attn, got {type(c).__name__}")
    q, k = c.q, c.k
    _check_qkv(q, k, c.v, c.gate, "context.")
    b, h, s_q, d = q.shape
    h_kv = k.shape[1]
    on_cpu = isinstance(q, np.ndarray)
    i32, small = np.dtype(np.int32), compute_dtype(q.dtype)

    def array(name: str, x, shape: tuple, dtype):
        check.check_array(f"context.{name}", x, len(shape), (dtype,), q)
        check.check_shape(f"context.{name}", x, shape)
        return check.check_contiguous(f"context.{name}", x)

    n_q = _num_blocks("context.q_block_sizes", c.q_block_sizes)
    volume = _tile_volume("context.q", s_q, n_q, "context.q_block_sizes")
    n_kv = k.shape[2] // volume
    if k.shape[2] != n_kv * volume:
        raise ValueError(f"context.k: expected a multiple of the tile volume {volume} (context.q's {s_q} slots over "
                         f"{n_q} q_block_sizes) on axis 2, got shape {list(k.shape)}")
    array("out", c.out, q.shape, q.dtype)
    for name, n in (("q_block_sizes", n_q), ("kv_block_sizes", n_kv)):
        sizes = array(name, getattr(c, name), (n,), i32)
        if on_cpu:
            check.check_block_sizes(f"context.{name}", sizes, q, n, volume)
    array("lse", c.lse, (b, h, s_q), small)
    idx = array("q2k_idx", c.q2k_idx, (b, h, n_q, None), i32)
    array("q2k_num", c.q2k_num, (b, h, n_q), i32)
    if on_cpu:
        check.check_index_lists(idx, c.q2k_num, n_kv, True, prefix="context.")
    for name, shape in (("q_mean", (b, h, n_q, d)), ("k_mean", (b, h_kv, n_kv, d)), ("v_mean", (b, h_kv, n_kv, d)),
                        ("coarse_probs", (b, h, n_q, n_kv)), ("coarse", (b, h, n_q, d))):
        array(name, getattr(c, name), shape, small)
    if c.scale is None:  # the forward's scale as it used it, never the default's None
        raise TypeError("context.scale: expected a positive finite float, got None")
    _scale(c.scale, d, "context.scale", dtype=c.q.dtype)
    return c


def _check_gradient_buffers(out, dout, c: VSAContext, every_array: bool) -> Gradients:
    """``out`` of :func:`video_sparse_attn_backward` as checked :class:`Gradients` (None: all None)."""
    if out is None:
        return Gradients(None, None, None, None)
    if not isinstance(out, tuple) or len(out) != 4:
        raise TypeError(f"out: expected a Gradients or a tuple (dq, dk, dv, dgate) of arrays or None, got {check.describe(out)}")
    out = Gradients(*out)
    if out.dgate is not None and c.gate is None:
        raise ValueError("out: expected dgate None (the forward had no gate), got an array")
    # A buffer over an array the backward reads would be written while it is read: checked against
    # all of the context's arrays (``every_array``), or, for buffers an adapter has just allocated,
    # against q, k, v, gate and out, which a caller might pass back by mistake.
    fields = tuple(f.name for f in dataclasses.fields(c) if f.name != "scale") if every_array else (
        "q", "k", "v", "gate", "out")
    inputs = (("dout", dout), *((f"context.{name}", getattr(c, name)) for name in fields))
    likes = {"dq": c.q, "dk": c.k, "dv": c.v, "dgate": c.gate}
    for name, buffer in out._asdict().items():
        if buffer is not None:
            others = inputs + tuple((f"out.{n}", b) for n, b in out._asdict().items() if n != name)
            _check_out(buffer, c.q, likes[name].shape, likes[name].dtype, f"out.{name}", others)
    return out
