"""Launchers of the block-sparse attention kernels (``cuda_kernels/attention_*.cu``).

Inputs are validated by :mod:`vsa_nd.ops`; the checks here are the kernels' own limits
(dtype, head dim, tile volume) and run before any launch.  Every launch is ordered on CuPy's
current stream on the inputs' device, with no host synchronisation: it goes to that stream,
except the chunks of the backward's dS hand-over, which go to streams of this module forked
from it by an event and joined back to it before the launcher returns.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from typing import NamedTuple

import numpy as np

from .._xp import BFLOAT16
from ..kernels import get_function
from .cuda import _MAX_GRID_Y, Launch, _check_index_range, make_launch

_CUDA_TYPES = {np.dtype(np.float16): "__half", BFLOAT16: "__nv_bfloat16"}
_HEAD_DIMS = (64, 128)
_BLOCK_M = 64  # query rows per CTA (FWD_BLOCK_M in attention_fwd.cu)
_CHUNK = 64  # keys per pipeline chunk; tile volumes must be multiples of it
_DQ_STAGES = 1  # K and V stages of bwd_dq_sm90 (DQ_STAGES in attention_bwd_sm90.cu)
_DKDV_STAGES = 2  # Q, dO, lse and delta stages of bwd_dkdv_sm90 (DKDV_STAGES in attention_bwd_sm90.cu)
_LIST_CAP = 1024  # entries of both sm90 backward passes' staged index list (LIST_CAP in attention_bwd_sm90.cu)
_LIST_BYTES = _LIST_CAP * 8  # one int2 per entry (LIST_BYTES there)
# Longest list those passes stage in shared memory (the kernels also cap it at LIST_CAP); longer
# ones are read from global memory.  Tests lower it to run both paths.
_LIST_STAGE_LIMIT = _LIST_CAP
_LOG2E = 1.4426950408889634
_DQDS_STAGES = 3  # K and dS stages of bwd_dq_ds_sm90 (one of kernels.DQDS_STAGES)
_DS_BLOCK_BYTES = 64 * 64 * 2  # one dS block (DS_BLOCK_BYTES in attention_bwd_sm90.cu)
_DQDS_MIN_LIST = 128  # DQDS_MIN_LIST there


def _workspace_default() -> int:
    """DS_WORKSPACE_BYTES from $VSA_ND_DS_WORKSPACE_GIB (a number of GiB; 0 turns it off); 2 GiB without it."""
    text = os.environ.get("VSA_ND_DS_WORKSPACE_GIB", "").strip()
    if not text:
        return 2 << 30
    try:
        gib = float(text)
    except ValueError:
        raise ValueError(f"VSA_ND_DS_WORKSPACE_GIB must be a number of GiB (0 turns the workspace off), got {text!r}")
    if gib < 0:
        raise ValueError(f"VSA_ND_DS_WORKSPACE_GIB must not be negative, got {text!r}")
    return int(gib * (1 << 30))


# Most bytes of dS blocks one backward call may hold at a time (the Hopper backward whose dK/dV
# pass hands dS to the dQ pass, see block_sparse_bwd).  The blocks take 8 KB per selected (query
# tile, key tile) pair: 484 MB per head at 12 heads x 49152 tokens with 77 of 768 tiles (5.8 GB
# in all, 38x the size of q), 399 MB at Wan2.1 480p.  So a call works through its (batch, kv
# head) pairs in chunks (ds_schedule), each chunk's two passes on a stream of its own, up to
# _DS_STREAMS chunks at a time, each with its own blocks.  2 GiB by default: three heads at a
# time at both shapes (1.45 and 1.2 GB), where that made the backward 7-11% faster on an H100.
DS_WORKSPACE_BYTES = _workspace_default()
# Head dims that use it: at D = 64 recomputing dS in the dQ pass is cheaper than handing it over
# (H100, Wan2.1 480p with 24 heads of 64: 9.4 against 9.8 ms).
_DS_HEAD_DIMS = (128,)
_DS_STREAMS = 3  # most chunks in flight (each on a stream of its own)
_DS_MIN_CTAS = 512  # a chunk takes (batch, kv head) pairs until its dK/dV launch has this many CTAs
_DS_CHUNK_PAIRS = None  # at most this many (batch, kv head) pairs per chunk (tests set 1); None: no cap
# Smallest problem (bytes of dS blocks in all) that hands dS over.  On an H100 problems with
# 8K-25K selected tile pairs ran 10-26% slower with it (one call or back to back) and ones with
# 98K pairs and more 3-18% faster; the benchmark shapes have 710K (main) and 610K (480p).
_DS_MIN_BYTES = 512 << 20


def ds_schedule(pairs: int, pair_bytes: int, pair_ctas: int, budget: int) -> tuple:
    """(pairs per chunk, chunks in flight) of the dS hand-over of ``pairs`` (batch, kv head) pairs
    that need ``pair_bytes`` of dS blocks and ``pair_ctas`` dK/dV CTAs each, within ``budget``
    bytes; (0, 0) where the dQ pass should recompute dS instead: on small problems
    (``_DS_MIN_BYTES``), when one pair does not fit, or when the chunks would have to run one
    after another (on an H100 that was slower than recomputing: 8.63 against 7.56 ms per call at
    Wan2.1 480p, one head per chunk)."""
    if pairs * pair_bytes < _DS_MIN_BYTES:
        return 0, 0
    fit = budget // pair_bytes if pair_bytes else 0
    chunk = min(pairs, fit, max(1, -(-_DS_MIN_CTAS // max(1, pair_ctas))), _DS_CHUNK_PAIRS or pairs)
    if 0 < chunk < pairs:  # several chunks: at least two of them in flight
        chunk = min(chunk, fit // 2) if _DS_STREAMS > 1 else 0
    if chunk < 1:
        return 0, 0
    return chunk, min(_DS_STREAMS, -(-pairs // chunk), fit // chunk)


# (thread ident, device id) -> (streams, fork event, join events).  Per thread, because a fork or
# join event recorded by one thread must not be re-recorded by another before its waits are
# queued, and a thread's capture must not take in another thread's work.  Keyed by the OS
# thread's ident rather than kept in a threading.local: a thread that Python did not start (XLA's,
# which runs the JAX adapter's calls) gets a fresh Python thread state, so fresh thread-local
# data, on every call, but keeps its ident.
_PIPES: dict = {}
_PIPES_LOCK = threading.Lock()


def _pipes(device_id: int, count: int) -> tuple:
    """``count`` (at most _DS_STREAMS) CuPy streams of ``device_id`` for the chunks of a dS
    hand-over, an event to fork them from the caller's stream and one per stream to join it
    again; made once per thread and device (warm-up calls make them outside a graph capture)."""
    import cupy

    key = (threading.get_ident(), device_id)
    entry = _PIPES.get(key)
    if entry is None or len(entry[0]) < count:
        with cupy.cuda.Device(device_id):
            n = max(count, _DS_STREAMS)
            event = lambda: cupy.cuda.Event(disable_timing=True)  # noqa: E731
            entry = ([cupy.cuda.Stream(non_blocking=True) for _ in range(n)], event(), [event() for _ in range(n)])
        with _PIPES_LOCK:  # (only this thread writes its key; the lock keeps the dict whole)
            _PIPES[key] = entry
    return entry[0][:count], entry[1], entry[2][:count]


# device id -> [bytes of dS blocks that could not be allocated, calls left before trying again].
# An allocator that runs out of memory first frees its cache (a device synchronisation) and may
# report the failure; a job near its memory limit should not pay for that on every backward.
_DS_REFUSED: dict = {}
_DS_RETRY_CALLS = 100


def _ds_refused(device_id: int, nbytes: int) -> bool:
    """Whether ``nbytes`` of dS blocks failed to allocate on ``device_id`` recently (at this size or
    less): then this call recomputes dS, and every _DS_RETRY_CALLS-th such call tries again."""
    entry = _DS_REFUSED.get(device_id)
    if entry is None or nbytes < entry[0]:
        return False
    entry[1] -= 1
    if entry[1] <= 0:
        _DS_REFUSED.pop(device_id, None)
    return True


def _ds_refuse(device_id: int, nbytes: int) -> None:
    """Records that ``nbytes`` of dS blocks failed to allocate on ``device_id`` (see _ds_refused)."""
    refused = _DS_REFUSED.get(device_id, [nbytes])[0]
    _DS_REFUSED[device_id] = [min(refused, nbytes), _DS_RETRY_CALLS]


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure: CuPy's pool, or an allocator behind it (torch's)."""
    import cupy

    return isinstance(error, (cupy.cuda.memory.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def _alloc(shape, dtype):
    """Output allocation (tests replace it to poison outputs before the kernel writes them)."""
    import cupy

    return cupy.empty(shape, dtype)


def check_backward_lists(lists_shape: tuple):
    """ValueError if the backward's KV->Q lists (int32 offsets: :func:`kv_to_q_lists`) cannot hold
    every selection entry of lists shaped ``lists_shape`` [B, H, N_q, L]; checked before any launch."""
    _check_index_range("q2k_idx", math.prod(lists_shape), "selection entries for the CUDA backward")


def check_kernel_support(q, tile_volume: int, **others) -> str:
    """The kernels' CUDA element type for q; TypeError/ValueError for what they cannot run.

    ``others`` (name=array or None) are the other tensors of the call: like q, they must start
    on a 16-byte boundary (the kernels move 16-byte pieces); arrays CuPy allocates always do,
    only views that start at an offset may not.
    """
    for name, x in (("q", q), *others.items()):
        if x is not None and x.data.ptr % 16:
            raise ValueError(
                f"{name}: the CUDA attention kernels need arrays starting on a 16-byte boundary, got address "
                f"{x.data.ptr:#x}; pass a copy (cupy.array(x))"
            )
    dtype = np.dtype(q.dtype)
    if dtype not in _CUDA_TYPES:
        raise TypeError(f"q: the CUDA attention kernels take float16 or bfloat16, got {dtype}")
    if q.shape[0] * q.shape[1] > _MAX_GRID_Y:  # the (batch, head) pairs are the launches' grid y
        raise ValueError(f"q: the CUDA attention kernels take at most {_MAX_GRID_Y} (batch, head) pairs, got "
                         f"{q.shape[0]} x {q.shape[1]}; split the batch")
    if q.shape[-1] not in _HEAD_DIMS:
        raise ValueError(f"q: the CUDA attention kernels take head dim 64 or 128, got {q.shape[-1]}")
    if tile_volume % _CHUNK:
        raise ValueError(f"q: the CUDA attention kernels take tile volumes that are multiples of {_CHUNK}, got {tile_volume}")
    return _CUDA_TYPES[dtype]


# Whether the dK/dV pass takes its lists long ones first (dkdv_order) rather than in list order.
DKDV_ORDER = True

# "auto": the wgmma kernels on Hopper (sm_90a), the mma.sync kernels elsewhere; "mma" forces
# the portable kernels (tests run both on a Hopper card).
FORWARD_KERNEL = "auto"
BACKWARD_KERNEL = "auto"


def _use_wgmma(choice: str) -> bool:
    import cupy

    from ..kernels import device_arch

    return choice == "auto" and device_arch(cupy.cuda.runtime.getDevice()) == "sm_90a"


def _null_or(x):
    return np.uintp(0) if x is None else x


def _float32(x):
    """x (None allowed) as float32, itself when it already is (astype(copy=False) still costs a call)."""
    return x if x is None or x.dtype == np.float32 else x.astype(np.float32)


# cuTensorMapEncodeTiled arguments (cuda.h enums).
_TMA_DTYPE = {np.dtype(np.float16): 6, BFLOAT16: 9}  # CU_TENSOR_MAP_DATA_TYPE_FLOAT16 / _BFLOAT16
_TMA_SWIZZLE_128B, _TMA_L2_PROMOTION_128B = 3, 2


def _TensorMap(x, rows: int):
    """The :class:`_EncodedTensorMap` of ``x`` viewed as [rows, D], from a small cache keyed by
    what the map encodes (address, rows, D, dtype, device): a training loop's tensors come back
    at the same addresses from the caching allocators, and encoding costs ~10 µs of host time
    per map on a call's critical path.  Equal keys encode equal maps, so a hit is exact."""
    return _encoded_map(x.data.ptr, rows, x.shape[-1], np.dtype(x.dtype), x.data.device_id)


@functools.lru_cache(maxsize=64)
def _encoded_map(address: int, rows: int, head_dim: int, dtype, device_id: int):
    return _EncodedTensorMap(address, rows, head_dim, dtype)


class _EncodedTensorMap:
    """A CUtensorMap (128 bytes, 64-byte aligned) for 64 x 64 boxes of a [rows, D] 16-bit tensor at
    ``address``, with the 128-byte swizzle of the kernels' shared-memory tiles; ``arg`` passes it
    by value."""

    def __init__(self, address: int, rows: int, head_dim: int, dtype):
        import ctypes

        from cupy.cuda.function import CPointer

        lib = _libcuda()
        self._buffer = ctypes.create_string_buffer(128 + 64)
        aligned = (ctypes.addressof(self._buffer) + 63) // 64 * 64
        status = lib.cuTensorMapEncodeTiled(
            ctypes.c_void_p(aligned), _TMA_DTYPE[dtype], 2, ctypes.c_void_p(address),
            (ctypes.c_uint64 * 2)(head_dim, rows), (ctypes.c_uint64 * 1)(head_dim * dtype.itemsize),
            (ctypes.c_uint32 * 2)(64, 64), (ctypes.c_uint32 * 2)(1, 1), 0, _TMA_SWIZZLE_128B, _TMA_L2_PROMOTION_128B, 0,
        )
        if status != 0:
            raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {status}")
        self.arg = CPointer(aligned)


_LIBCUDA = None


def _libcuda():
    global _LIBCUDA
    if _LIBCUDA is None:
        import ctypes

        _LIBCUDA = ctypes.CDLL("libcuda.so.1")
        _LIBCUDA.cuTensorMapEncodeTiled.restype = ctypes.c_int
    return _LIBCUDA


def _tma_ready(*arrays) -> bool:
    """TMA coordinates are int32: the rows of each tensor must fit them."""
    return all(a.size // a.shape[-1] < 2**31 for a in arrays)


def block_sparse_fwd(q, k, v, q2k_idx, q2k_num, kv_block_sizes, scale, coarse, gate, out=None, q_block_sizes=None):
    """See :mod:`vsa_nd.backends`: (out [B, H, Sq_pad, D] q.dtype, lse [B, H, Sq_pad] float32)."""
    b, h, q_len, d = q.shape
    tile_volume = q_len // q2k_idx.shape[2]
    check_kernel_support(q, tile_volume, k=k, v=v, gate=gate)
    with q.device:
        out = _alloc(q.shape, q.dtype) if out is None else out
        lse = _alloc((b, h, q_len), np.float32)
        launch = forward_launch(q.shape, k.shape, q.dtype, q2k_idx.shape[3], tile_volume, scale, FORWARD_KERNEL)
        launch((q, k, v, q2k_idx, q2k_num, kv_block_sizes, _null_or(q_block_sizes), _null_or(_float32(coarse)),
                _null_or(gate), out, lse), k.data.ptr, v.data.ptr)
    return out, lse


class ForwardLaunch(NamedTuple):
    """The fine stage's :class:`~vsa_nd.backends.cuda.Launch` (attention_fwd*.cu), made by
    :func:`forward_launch`.  Called with the pointers (q, k, v, q2k_idx, q2k_num, kv_block_sizes,
    q_block_sizes or null, coarse or null, gate or null, out, lse) and the addresses of k and v,
    whose TMA maps the Hopper kernel takes first (``tma_rows`` > 0: the rows of those maps)."""

    launch: Launch
    tma_rows: int
    head_dim: int
    dtype: np.dtype
    device_id: int

    def __call__(self, pointers: tuple, k_address: int, v_address: int, stream=None):
        if self.tma_rows:  # (the maps are held until the launch has copied them: another thread may evict them from the cache)
            maps = tuple(_encoded_map(a, self.tma_rows, self.head_dim, self.dtype, self.device_id)
                         for a in (k_address, v_address))
            pointers = (maps[0].arg, maps[1].arg, *pointers)
        self.launch(pointers, stream)


def forward_launch(q_shape: tuple, kv_shape: tuple, dtype, list_len: int, tile_volume: int, scale: float,
                   kernel_choice: str) -> ForwardLaunch:
    """The :class:`ForwardLaunch` of the fine stage on CuPy's current device for q [B, H, Sq_pad, D],
    k and v ``kv_shape`` [B, H_kv, Skv_pad, D] of ``dtype``, index lists of ``list_len`` entries:
    the wgmma kernel with K and V by TMA on Hopper (``kernel_choice`` "auto"), else the portable one."""
    import cupy

    b, h, q_len, d = q_shape
    h_kv, kv_len = kv_shape[1], kv_shape[2]
    dtype = np.dtype(dtype)
    tail = (np.int32(h), np.int32(h_kv), np.int32(q_len), np.int32(kv_len), np.int32(list_len), np.int32(tile_volume),
            np.float32(scale * _LOG2E))
    grid, tile_bytes, ctype = (q_len // _BLOCK_M, b * h), _BLOCK_M * d * dtype.itemsize, _CUDA_TYPES[dtype]
    tma_rows = b * h_kv * kv_len
    if _use_wgmma(kernel_choice) and tma_rows < 2**31:  # TMA coordinates are int32; else the portable kernel
        # K and V by TMA: Q, K and V tiles plus two 8-byte barriers.
        launch = make_launch("attention_fwd_sm90.cu", f"block_sparse_fwd_sm90<{ctype}, {d}>", grid, (128,), tail,
                             3 * tile_bytes + 16)
    else:  # Q and two stages of K and V
        launch, tma_rows = make_launch("attention_fwd.cu", f"block_sparse_fwd<{ctype}, {d}>", grid, (128,), tail,
                                       5 * tile_bytes), 0
    return ForwardLaunch(launch, tma_rows, d, dtype, cupy.cuda.runtime.getDevice())


_MARK_THREADS = 256  # MARK_THREADS in kv_lists.cu (kv_lists_clean, _mark and _rank)


def clean_lists(q2k_idx, q2k_num, num_kv_blocks: int):
    """Index lists the kernels may index with unguarded, from lists not checked on the host.

    Returns new (q2k_idx, q2k_num) where each row keeps, in order, its used entries inside
    ``[0, N_kv)`` (counts clamped to ``[0, L]`` first), 0 after them; valid lists come out
    unchanged.  One launch of ``kv_lists.cu``'s ``kv_lists_clean`` on the current stream, no host
    synchronisation.  (Duplicates stay: they cannot read out of bounds.)
    """
    import cupy

    rows, length = q2k_num.size, q2k_idx.shape[-1]
    with q2k_idx.device:
        q2k_idx, q2k_num = cupy.ascontiguousarray(q2k_idx), cupy.ascontiguousarray(q2k_num)
        clean_idx, clean_num = _alloc(q2k_idx.shape, np.int32), _alloc(q2k_num.shape, np.int32)
        if rows:
            get_function("kv_lists.cu", "kv_lists_clean")(
                (-(-rows // _MARK_THREADS),), (_MARK_THREADS,),
                (q2k_idx, q2k_num, clean_idx, clean_num, np.int32(rows), np.int32(length), np.int32(num_kv_blocks)),
            )
    return clean_idx, clean_num


def kv_to_q_lists(q2k_idx, q2k_num, num_kv_heads: int, num_kv_blocks: int, positions: bool = False):
    """Invert the selection on the GPU, without a host synchronisation.

    Returns (codes, offsets): for the key tile j of (batch b, kv head g) — list number
    ``(b * H_kv + g) * N_kv + j`` — the query tiles that selected it are
    ``codes[offsets[list]:offsets[list + 1]]``, each coded ``head_in_group * N_q + i`` and in
    increasing order, so the backward sums them in a fixed order (deterministic).

    ``offsets`` int32 has ``B * H_kv * N_kv + 1`` entries; ``codes`` int32 has ``B * H * N_q * L``
    (an upper bound of the used entries), its tail past ``offsets[-1]`` unwritten.  One memset
    and three launches of ``cuda_kernels/kv_lists.cu`` (bitmap per list, scan of the counts,
    codes in bit order) on the current stream.

    With ``positions``, returns (codes, offsets, pos) with ``pos`` int32 shaped like ``q2k_idx``:
    where its code sits in ``codes`` for each used entry (-1 for the unused ones); one launch more.
    """
    import cupy

    mark_threads, scan_threads, write_threads = _MARK_THREADS, 1024, 256  # MARK_, SCAN_, WRITE_THREADS in kv_lists.cu
    num_kv_heads, num_kv_blocks = int(num_kv_heads), int(num_kv_blocks)
    b, h, n_q, length = q2k_idx.shape
    group = h // num_kv_heads
    span = group * n_q  # codes per kv head
    lists = b * num_kv_heads * num_kv_blocks
    entries = b * h * n_q * length
    words = -(-span // 32)  # bitmap words per list
    _check_index_range("q2k_idx", entries, "selection entries")  # offsets and codes are int32
    with q2k_idx.device:
        q2k_idx, q2k_num = cupy.ascontiguousarray(q2k_idx), cupy.ascontiguousarray(q2k_num)
        # One zeroed buffer: offsets [lists + 1] (the counts first), then the bitmap [lists, words].
        work = cupy.zeros(lists + 1 + lists * words, np.int32)
        offsets, bits = work[: lists + 1], work[lists + 1:]
        codes = cupy.empty(entries, np.int32)
        if entries and lists:
            get_function("kv_lists.cu", "kv_lists_mark")(
                (-(-entries // mark_threads),), (mark_threads,),
                (q2k_idx, q2k_num, bits, offsets, np.int32(entries), np.int32(length), np.int32(n_q), np.int32(h),
                 np.int32(group), np.int32(num_kv_heads), np.int32(num_kv_blocks), np.int32(words)),
            )
            get_function("kv_lists.cu", "kv_lists_scan")((1,), (scan_threads,), (offsets, np.int64(lists)))
            lanes_log2 = min(5, (words - 1).bit_length())  # lanes per list: a power of two >= words, at most 32
            threads = lists << lanes_log2
            get_function("kv_lists.cu", "kv_lists_write")(
                (-(-threads // write_threads),), (write_threads,),
                (bits, offsets, codes, np.int64(lists), np.int32(words), np.int32(lanes_log2)),
            )
        if not positions:
            return codes, offsets
        pos = cupy.empty(q2k_idx.shape, np.int32)
        if entries and lists:
            get_function("kv_lists.cu", "kv_lists_rank")(
                (-(-entries // mark_threads),), (mark_threads,),
                (q2k_idx, q2k_num, bits, offsets, pos, np.int32(entries), np.int32(length), np.int32(n_q), np.int32(h),
                 np.int32(group), np.int32(num_kv_heads), np.int32(num_kv_blocks), np.int32(words)),
            )
        else:
            pos.fill(-1)
    return codes, offsets, pos


def dkdv_order(offsets, lists_per_launch: int):
    """The dK/dV pass's schedule (``cuda_kernels/kv_lists.cu``'s kv_lists_order): for each
    launch's ``lists_per_launch`` consecutive lists of ``offsets`` (kv_to_q_lists'), its lists with
    the long ones first (at least 16 entries and twice the mean length), longest first, then the
    others in order: int32 [lists], from one launch (a CTA per segment), with no host
    synchronisation."""
    lists = offsets.shape[0] - 1
    order = _alloc((lists,), np.int32)
    if lists:
        get_function("kv_lists.cu", "kv_lists_order")(
            (-(-lists // lists_per_launch),), (1024,), (offsets, order, np.int64(lists), np.int64(lists_per_launch)))
    return order


def _dq_ds_layout(tile_bytes: int, stages: int) -> tuple:
    """(shared-memory bytes, staged-list room in entries) of bwd_dq_ds_sm90 with ``stages``
    stages: as many CTAs per SM as DqDsSmem::CTAS (attention_bwd_sm90.cu) counts with the
    smallest list room, then all the room those CTAs leave (up to _LIST_CAP entries)."""
    fixed = stages * (tile_bytes + _DS_BLOCK_BYTES + 8)  # stages and their barriers
    ctas = min(4, 228 * 1024 // (fixed + _DQDS_MIN_LIST * 12 + 1024))
    room = min(_LIST_CAP, (228 * 1024 // ctas - 1024 - fixed) // 12)
    return fixed + room * 12, room


def _bwd_delta_kernel(dtype, head_dim: int):
    return get_function("attention_bwd.cu", f"bwd_delta<{_CUDA_TYPES[np.dtype(dtype)]}, {head_dim}>")


def bwd_delta(dout, out, coarse, gate, q_block_sizes, lse, delta, lse_log2=None) -> None:
    """The backward's row terms by ``attention_bwd.cu``'s ``bwd_delta``, into ``delta`` and ``lse_log2``.

    dout, out [B, H, Sq_pad, D] (D 64 or 128, C-contiguous, one half-precision dtype); coarse
    [B, H, N_q, D] float32, 16-byte aligned, or None; gate q-shaped or None; q_block_sizes
    int32 [N_q]; lse float32 [B, H, Sq_pad].  Writes delta = rowsum(dout * (out - gate *
    coarse)) over real rows (0 in pad rows) and, where ``lse_log2`` is given, lse * log2(e),
    both float32 [B, H, Sq_pad].  Arguments are not checked: the caller has.
    """
    b, h, q_len, d = dout.shape
    rows = b * h * q_len
    per_cta = 128 // (d // 8)  # rows per CTA (BWD_DELTA_ROWS in attention_bwd.cu)
    _bwd_delta_kernel(dout.dtype, d)(
        (-(-rows // per_cta),), (128,),
        (dout, out, _null_or(coarse), _null_or(gate), q_block_sizes, lse, delta, _null_or(lse_log2),
         np.int64(rows), np.int32(q_len), np.int32(q_len // q_block_sizes.shape[0])),
    )


def block_sparse_bwd(dout, q, k, v, out, lse, q2k_idx, q2k_num, q_block_sizes, kv_block_sizes,
                     scale, coarse, gate, dq_tile, dk_tile, dv_tile, dq=None, dk=None, dv=None, row_terms=None):
    """See :mod:`vsa_nd.backends`: (dq, dk, dv) in the input dtype; deterministic.

    ``row_terms``: the :class:`vsa_nd.backends.cuda.RowTerms` of this backward from
    ``coarse_grad_inputs`` (then ``bwd_delta`` does not run), or None.

    On Hopper at head dim 128, within the dS workspace budget (``DS_WORKSPACE_BYTES``, 2 GiB
    unless ``$VSA_ND_DS_WORKSPACE_GIB`` says otherwise), the dK/dV pass runs first and stores every
    step's dS (64 x 64 in the input dtype: 8 KB per pair at tile volume 64), and the dQ pass sums
    dS K from it: five matrix products per selected (query tile, key tile) pair.  The (batch, kv
    head) pairs go in chunks (:func:`ds_schedule`): one chunk on the current stream, or several,
    up to ``_DS_STREAMS`` at a time on streams of their own, forked from the current stream and
    joined back to it (so the call stays capturable in a CUDA graph); without ``row_terms``, each
    chunk's rows get their ``bwd_delta`` on its stream, just before its dK/dV pass.  Elsewhere,
    where the schedule declines (small problems, too little budget), or when the blocks cannot be
    allocated (then calls of that size recompute for a while: ``_ds_refused``), the dQ pass
    recomputes S, P, dP and dS itself: seven products per pair, no workspace.  The side streams
    and their events are made on a thread's first call with several chunks: warm up before a
    capture, as for the kernels.  The dK/dV pass takes its lists long ones first
    (:func:`dkdv_order`; ``DKDV_ORDER``), so that key tiles chosen by many query tiles do not
    leave a few SMs finishing them after the rest.
    """
    b, h, q_len, d = q.shape
    h_kv, kv_len = k.shape[1], k.shape[2]
    n_q = q_block_sizes.shape[0]
    tile_volume = q_len // n_q
    with q.device:
        dq_tile, dk_tile, dv_tile, coarse = (_float32(x) for x in (dq_tile, dk_tile, dv_tile, coarse))
        # coarse too: bwd_delta reads it 16 bytes at a time.
        ctype = check_kernel_support(q, tile_volume, k=k, v=v, dout=dout, out=out, gate=gate, coarse=coarse)
        wgmma = _use_wgmma(BACKWARD_KERNEL)
        dkdv_wgmma = wgmma and _tma_ready(q, dout)  # else the portable dK/dV kernel
        dq_wgmma = wgmma and _tma_ready(k, v)  # else the portable dQ kernel
        rows = b * h * q_len
        delta_rows = None  # bwd_delta over the (batch, head)s [h0, h1) of B * H, where it must run
        if row_terms is not None:
            delta, lse_log2 = row_terms
        else:
            delta = _alloc((b, h, q_len), np.float32)
            lse_log2 = _alloc((b, h, q_len), np.float32) if dkdv_wgmma else None  # lse * log2(e), for that pass

            # bwd_delta's arrays as [1, B * H, ...], sliced by (batch, head) per launch.
            flat = [None if x is None else x.reshape((1, b * h) + x.shape[2:])
                    for x in (dout, out, coarse, gate, lse, delta, lse_log2)]

            def delta_rows(h0, h1):
                dout_, out_, coarse_, gate_, lse_, delta_, log2_ = (None if x is None else x[:, h0:h1] for x in flat)
                bwd_delta(dout_, out_, coarse_, gate_, q_block_sizes, lse_, delta_, log2_)
        group, length, slices = h // h_kv, q2k_idx.shape[3], tile_volume // _CHUNK
        common = (np.int32(h), np.int32(h_kv), np.int32(q_len), np.int32(kv_len))
        tile_bytes = _BLOCK_M * d * q.dtype.itemsize
        smem = 6 * tile_bytes  # the cp.async passes: two resident tiles and two stages of two streamed ones
        dq = _alloc(q.shape, q.dtype) if dq is None else dq
        dk = _alloc(k.shape, k.dtype) if dk is None else dk
        dv = _alloc(v.shape, v.dtype) if dv is None else dv

        stats = 2 * _BLOCK_M * 4  # lse and delta of one stage
        if dkdv_wgmma:
            # Q and dO by TMA: K, V and _DKDV_STAGES stages of Q, dO, lse and delta, one 8-byte barrier per
            # stage, and the staged list.
            dkdv_maps = (_TensorMap(q, rows), _TensorMap(dout, rows))
            dkdv_kernel = get_function("attention_bwd_sm90.cu", f"bwd_dkdv_sm90<{ctype}, {d}>")
            smem_kv = (2 + 2 * _DKDV_STAGES) * tile_bytes + _DKDV_STAGES * (stats + 8) + _LIST_BYTES
        else:
            dkdv_kernel = get_function("attention_bwd.cu", f"bwd_dkdv<{ctype}, {d}>")
            smem_kv = smem + 2 * stats  # K, V and two cp.async stages of Q, dO, lse and delta
        dkdv_kernel.max_dynamic_shared_size_bytes = smem_kv

        def dkdv_pass(codes, offsets, order, ds_blocks=None, bh_kv0=0, count=b * h_kv):
            args = (q, k, v, dout, lse_log2 if dkdv_wgmma else lse, delta, codes, offsets, q_block_sizes,
                    kv_block_sizes, _null_or(dk_tile), _null_or(dv_tile), dk, dv, *common, np.int32(tile_volume),
                    np.float32(scale))
            if dkdv_wgmma:
                args = (dkdv_maps[0].arg, dkdv_maps[1].arg) + args + (
                    np.int32(_LIST_STAGE_LIMIT), _null_or(ds_blocks), np.int32(bh_kv0), _null_or(order))
            else:
                args += (_null_or(order),)
            dkdv_kernel((kv_len // _BLOCK_M, count), (128,), args, shared_mem=smem_kv)

        list_args = (q2k_idx, q2k_num, q_block_sizes, kv_block_sizes, _null_or(dq_tile), dq, *common,
                     np.int32(length), np.int32(tile_volume), np.float32(scale))
        # dS bytes per (batch, kv head), every selection entry counted (the used ones are known on the device only).
        ds_bytes = group * n_q * length * slices * slices * _DS_BLOCK_BYTES
        chunk = streams = 0
        if dkdv_wgmma and dq_wgmma and d in _DS_HEAD_DIMS:
            chunk, streams = ds_schedule(b * h_kv, ds_bytes, kv_len // _BLOCK_M, int(DS_WORKSPACE_BYTES))
            held = chunk * streams * ds_bytes  # bytes of blocks in flight
            if chunk and _ds_refused(q.data.device_id, held):
                chunk = 0
        if chunk:
            # Without the memory for the blocks (or for the lists after them), the passes below
            # recompute dS.
            try:
                blocks = [_alloc((chunk * ds_bytes // q.dtype.itemsize,), q.dtype) for _ in range(streams)]
                codes, offsets, pos = kv_to_q_lists(q2k_idx, q2k_num, h_kv, kv_len // tile_volume, positions=True)
                order = dkdv_order(offsets, chunk * (kv_len // tile_volume)) if DKDV_ORDER else None
            except Exception as error:  # noqa: BLE001 - allocators raise their own out-of-memory errors
                if not _out_of_memory(error):
                    raise
                blocks = None  # freed before the recomputing passes allocate
                _ds_refuse(q.data.device_id, held)
                chunk = 0
        if chunk:
            # Per chunk of `chunk` (batch, kv head) pairs: the dK/dV pass, storing dS; then the dQ pass
            # summing dS K.  With several chunks, chunk c's two passes run on stream c % streams with
            # blocks of its own, so that one chunk's dQ pass (bound by memory) overlaps another's
            # dK/dV pass (bound by its tensor-core products), and no launch's tail leaves SMs idle.
            # Slower on an H100 (BENCHMARKS.md): one dK/dV pass at a time, and the two passes on
            # disjoint sets of SMs (green contexts); both passes lean on L2 either way.
            dq_kernel = get_function("attention_bwd_sm90.cu", f"bwd_dq_ds_sm90<{ctype}, {d}, {_DQDS_STAGES}>")
            smem_dq, list_room = _dq_ds_layout(tile_bytes, _DQDS_STAGES)
            dq_kernel.max_dynamic_shared_size_bytes = smem_dq
            map_k = _TensorMap(k, b * h_kv * kv_len)

            def chunk_passes(ds_blocks, bh_kv0):
                count = min(chunk, b * h_kv - bh_kv0)
                if delta_rows is not None:
                    delta_rows(bh_kv0 * group, (bh_kv0 + count) * group)
                dkdv_pass(codes, offsets, order, ds_blocks, bh_kv0, count)
                dq_kernel((q_len // _BLOCK_M, count * group), (128,),
                          (map_k.arg, k, ds_blocks, pos, *list_args, np.int32(_LIST_STAGE_LIMIT), offsets,
                           np.int32(bh_kv0 * group), np.int32(list_room)),
                          shared_mem=smem_dq)

            starts = range(0, b * h_kv, chunk)
            if len(starts) == 1:
                chunk_passes(blocks[0], 0)
                return dq, dk, dv
            import cupy

            # Everything that may fail on the host is done (the kernels are loaded): fork, launch,
            # and join even if a launch raises (else the caller's stream would free buffers that
            # queued work still uses, and a capture would end with unjoined streams).  Each
            # chunk's row terms (bwd_delta, bound by memory) run on its stream just before its
            # dK/dV pass: the first chunk's pass starts after its heads' rows rather than all of
            # them, and the others' run beside the passes already going.
            if delta_rows is not None:
                _bwd_delta_kernel(q.dtype, d)
            caller = cupy.cuda.get_current_stream()
            pipes, fork, joins = _pipes(q.data.device_id, len(blocks))
            fork.record(caller)
            for pipe in pipes:
                pipe.wait_event(fork)
            try:
                for c, bh_kv0 in enumerate(starts):
                    with pipes[c % len(pipes)]:
                        chunk_passes(blocks[c % len(pipes)], bh_kv0)
            finally:
                for pipe, join in zip(pipes, joins):
                    join.record(pipe)
                    caller.wait_event(join)
            return dq, dk, dv

        if delta_rows is not None:
            delta_rows(0, b * h)
        args = (q, k, v, dout, lse, delta, *list_args)
        if dq_wgmma:
            # K and V by TMA: Q, dO and _DQ_STAGES stages of K and V, one 8-byte barrier per stage of each,
            # and the staged list.
            maps = (_TensorMap(k, b * h_kv * kv_len), _TensorMap(v, b * h_kv * kv_len))
            kernel = get_function("attention_bwd_sm90.cu", f"bwd_dq_sm90<{ctype}, {d}>")
            smem_dq = (2 + 2 * _DQ_STAGES) * tile_bytes + 16 * _DQ_STAGES + _LIST_BYTES
            args = (maps[0].arg, maps[1].arg) + args + (np.int32(_LIST_STAGE_LIMIT),)
        else:
            kernel = get_function("attention_bwd.cu", f"bwd_dq<{ctype}, {d}>")
            smem_dq = smem  # Q, dO and two cp.async stages of K and V
        kernel.max_dynamic_shared_size_bytes = smem_dq
        kernel((q_len // _BLOCK_M, b * h), (128,), args, shared_mem=smem_dq)
        codes, offsets = kv_to_q_lists(q2k_idx, q2k_num, h_kv, kv_len // tile_volume)
        dkdv_pass(codes, offsets, dkdv_order(offsets, offsets.shape[0] - 1) if DKDV_ORDER else None)
    return dq, dk, dv
