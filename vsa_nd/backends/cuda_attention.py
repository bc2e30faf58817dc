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
from ..kernels import HEAD_DIMS, padded_head_dim
from .cuda import _MAX_GRID_Y, Launch, _check_index_range, make_launch, workspace_layout

_CUDA_TYPES = {np.dtype(np.float16): "__half", BFLOAT16: "__nv_bfloat16"}
_BLOCK_M = 64  # query rows per CTA (FWD_BLOCK_M in attention_fwd.cu)
_CHUNK = 64  # keys per pipeline chunk; tile volumes must be multiples of it
_FWD_STAGES = {64: 2, 128: 1}  # K and V stages of block_sparse_fwd_sm90 per head dim (FWD_STAGES<D> there)
_DQ_STAGES = 1  # K and V stages of bwd_dq_sm90 (DQ_STAGES in attention_bwd_sm90.cu)
_DKDV_STAGES = {64: 3, 128: 2}  # Q, dO, lse and delta stages of bwd_dkdv_sm90 per head dim (DKDV_STAGES<D> there)
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
        raise ValueError(f"VSA_ND_DS_WORKSPACE_GIB must be a number of GiB (0 turns the workspace off), "
                         f"got {text!r}") from None
    if gib < 0:
        raise ValueError(f"VSA_ND_DS_WORKSPACE_GIB must not be negative, got {text!r}")
    return int(gib * (1 << 30))


# Most bytes of dS blocks one backward call may hold at a time (the Hopper backward whose dK/dV
# pass hands dS to the dQ pass, see block_sparse_bwd).  The blocks take 8 KB per selected (query
# tile, key tile) pair: 484 MB per head at 12 heads x 49152 tokens with 77 of 768 tiles (5.8 GB
# in all, 38x the size of q), 399 MB at Wan2.1 480p.  So a call works through its (batch, kv
# head) pairs in chunks (ds_schedule), each chunk's two passes on a stream of its own, up to
# _DS_STREAMS chunks at a time, each with its own blocks.  2 GiB by default: three heads at a
# time at both shapes (1.45 and 1.2 GB), where that made the backward 7-11% faster on an H100;
# at Wan2.1-14B 720p (1.98 GiB a head) two heads at a time, each in two parts (ds_parts): 8.5%
# faster than recomputing there, 3% slower than whole heads in 4.5 GiB.
DS_WORKSPACE_BYTES = _workspace_default()
# Head dims that use it on every device, and those that use it only where the DRAM serves at
# least _DS_FAST_DRAM bytes/s (_dram_bytes_per_s).  At D = 64 a pair's dS block is as large as
# at 128 while the two products it saves cost half, so the trade depends on the DRAM: at Wan2.1
# 480p with 24 heads of 64 the hand-over was 1.5-6% slower than recomputing on H100s (3.35 TB/s;
# 9.7-9.8 against 9.4 ms for one call and 9.45-9.54 against 9.03 ms back to back, and 8.97-9.04
# against 8.84 ms, all with the two-CTA dK/dV pass of then), 5-6% faster on an H200 (4.9 TB/s;
# 8.06-8.09 against 8.53-8.58 ms with the three-CTA pass; 3.2-5.5% in five benchmark runs;
# BENCHMARKS.md).  An H100 with the three-CTA pass is not measured yet.
_DS_HEAD_DIMS = (128,)
_DS_FAST_DRAM_HEAD_DIMS = (64,)
_DS_FAST_DRAM = 4e12
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


_DS_MAX_PARTS = 8  # most parts a (batch, kv head)'s blocks may be cut into (ds_parts)


def ds_parts(pairs: int, pair_entries: int, list_entries: int, entry_bytes: int, budget: int) -> tuple:
    """(streams, entries per part) of a dS hand-over whose (batch, kv head) pairs' blocks do not
    fit the ``budget`` twice (``ds_schedule`` gave (0, 0)) but do in parts; (0, 0) where not.

    A pair has at most ``pair_entries`` KV->Q list entries (every selection entry counted) of
    ``entry_bytes`` of dS blocks each, and a list at most ``list_entries``.  Its passes then run in
    parts, one after another on the pair's stream: part r takes the lists that start (first
    position, counted from the pair's first list) in [r * cap, (r + 1) * cap) (the last part also
    the empty lists that start at its end), so its blocks number fewer than cap + list_entries
    entries' worth, whatever the selection; its dQ pass sums only those lists' key tiles,
    carrying fp32 sums to the next part.  Pairs run on 2 to _DS_STREAMS streams at a time, as
    few parts as the budget allows (then as many streams): at Wan2.1-14B 720p (one head's blocks
    1.98 GiB), two streams of two parts in 2 GiB.  One pair alone, or more than _DS_MAX_PARTS
    parts, recomputes (parts one after another on one stream leave each launch's tail idle, as
    whole heads did)."""
    if pairs < 2 or pairs * pair_entries * entry_bytes < _DS_MIN_BYTES or entry_bytes <= 0:
        return 0, 0
    best = (0, 0, 0)  # (parts, streams, cap)
    for streams in range(min(_DS_STREAMS, pairs), 1, -1):
        most = budget // (streams * entry_bytes) - list_entries  # largest cap whose blocks fit
        if most < max(1, list_entries):
            continue
        parts = -(-pair_entries // most)
        if parts <= _DS_MAX_PARTS and (not best[0] or parts < best[0]):
            best = (parts, streams, -(-pair_entries // parts))  # the parts evened out
    return (best[1], best[2]) if best[0] > 1 else (0, 0)


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


def check_aligned(results: tuple = (), **arrays) -> None:
    """ValueError naming the first of ``arrays`` (name=CuPy array or None) that does not start on
    a 16-byte boundary: the attention kernels move 16-byte pieces.  Arrays CuPy allocates always
    start on one; only views that start at an offset may not.  ``results``: the names of result
    buffers among them (the message's remedy differs)."""
    for name, x in arrays.items():
        if x is not None and x.data.ptr % 16:
            remedy = "pass a buffer that starts on one" if name in results else "pass a copy (cupy.array(x))"
            raise ValueError(
                f"{name}: the CUDA attention kernels need arrays starting on a 16-byte boundary, got address "
                f"{x.data.ptr:#x}; {remedy}"
            )


def _head_dim_remedy(head_dim: int) -> str:
    """What to do with a head dim the kernels lack.  Zero columns of q and k add nothing to any
    score, zero columns of v give zero output columns, and the tile means keep both, so VSA of
    inputs zero-padded along D (with the scale of the real D) is, in its first D columns, VSA of
    the unpadded inputs, and so are its gradients (test_numba_backend checks this)."""
    padded = padded_head_dim(head_dim)
    if padded is None:
        return "; run such heads on the CPU (host arrays or tensors)"
    return (f"; zero-pad q, k, v (and gate) to {padded} along the last axis and pass the scale explicitly "
            f"({head_dim}**-0.5 by default, not the padded {padded}'s): the first {head_dim} columns of the result "
            f"and of the gradients are those of the unpadded inputs")


def check_kernel_support(q, tile_volume: int, results: tuple = (), q_name: str = "q", **others) -> str:
    """The kernels' CUDA element type for q; TypeError/ValueError for what they cannot run.

    ``others`` (name=array or None) are the other tensors of the call, inputs and result buffers
    (``results`` names these): like q, they must start on a 16-byte boundary (:func:`check_aligned`).
    ``q_name``: q's name in messages.
    """
    check_aligned(results, **{q_name: q}, **others)
    dtype = np.dtype(q.dtype)
    if dtype not in _CUDA_TYPES:
        raise TypeError(f"{q_name}: the CUDA attention kernels take float16 or bfloat16, got {dtype}")
    if q.shape[0] * q.shape[1] > _MAX_GRID_Y:  # the (batch, head) pairs are the launches' grid y
        raise ValueError(f"{q_name}: the CUDA attention kernels take at most {_MAX_GRID_Y} (batch, head) pairs, got "
                         f"{q.shape[0]} x {q.shape[1]}; split the batch")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"{q_name}: the CUDA attention kernels take head dim 64 or 128, got {q.shape[-1]}"
                         + _head_dim_remedy(q.shape[-1]))
    if tile_volume % _CHUNK:
        raise ValueError(f"{q_name}: the CUDA attention kernels take tile volumes that are multiples of {_CHUNK}, "
                         f"got {tile_volume}")
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


@functools.lru_cache(maxsize=64)
def _encoded_map(address: int, rows: int, head_dim: int, dtype, device_id: int):
    """The :class:`_EncodedTensorMap` of the tensor at ``address`` viewed as [rows, D], from a small
    cache keyed by what the map encodes: a training loop's tensors come back at the same addresses
    from the caching allocators, and encoding costs ~10 µs of host time per map on a call's
    critical path.  Equal keys encode equal maps, so a hit is exact."""
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


def block_sparse_fwd(q, k, v, q2k_idx, q2k_num, kv_block_sizes, scale, coarse, gate, out=None, q_block_sizes=None):
    """See :mod:`vsa_nd.backends`: (out [B, H, Sq_pad, D] q.dtype, lse [B, H, Sq_pad] float32)."""
    b, h, q_len, d = q.shape
    tile_volume = q_len // q2k_idx.shape[2]
    check_kernel_support(q, tile_volume, ("out",), k=k, v=v, gate=gate, out=out)
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
        # K and V by TMA (see _fwd_shared_bytes)
        launch = make_launch("attention_fwd_sm90.cu", f"block_sparse_fwd_sm90<{ctype}, {d}>", grid, (128,), tail,
                             _fwd_shared_bytes(d, tile_bytes))
    else:  # Q and two stages of K and V
        launch, tma_rows = make_launch("attention_fwd.cu", f"block_sparse_fwd<{ctype}, {d}>", grid, (128,), tail,
                                       5 * tile_bytes), 0
    return ForwardLaunch(launch, tma_rows, d, dtype, cupy.cuda.runtime.getDevice())


_MARK_THREADS = 256  # MARK_THREADS in kv_lists.cu (kv_lists_clean, _mark and _rank)
_SCAN_THREADS, _WRITE_THREADS, _ORDER_THREADS = 1024, 256, 1024  # SCAN_, WRITE_ and ORDER_THREADS there


def _address(x) -> int:
    """A CuPy array's address as a kernel argument (0, null, for None)."""
    return 0 if x is None else x.data.ptr


def _memset(address: int, value: int, nbytes: int, stream=None) -> None:
    """Set ``nbytes`` bytes at ``address`` to ``value`` on ``stream`` (None: CuPy's current stream)."""
    import cupy

    if nbytes:
        stream = cupy.cuda.get_current_stream() if stream is None else stream
        cupy.cuda.runtime.memsetAsync(int(address), value, nbytes, stream.ptr)


def clean_lists_launch(rows: int, length: int, num_kv_blocks: int) -> Launch:
    """The :class:`Launch` of :func:`clean_lists` over ``rows`` (at least one) lists of ``length``
    entries; pointers (q2k_idx, q2k_num, clean_idx, clean_num)."""
    return make_launch("kv_lists.cu", "kv_lists_clean", (-(-rows // _MARK_THREADS),), (_MARK_THREADS,),
                       (np.int32(rows), np.int32(length), np.int32(num_kv_blocks)))


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
            clean_lists_launch(rows, length, num_kv_blocks)((q2k_idx, q2k_num, clean_idx, clean_num))
    return clean_idx, clean_num


class KvListLaunches(NamedTuple):
    """The launches of :func:`kv_to_q_lists` for one shape of the selection.

    ``work_ints`` int32 must be zeroed before ``mark``: the offsets (``lists + 1``, counts first)
    then the bitmap (``lists * words``).  Pointers: ``mark`` (q2k_idx, q2k_num, bits, offsets),
    ``scan`` (offsets,), ``write`` (bits, offsets, codes), ``rank`` (q2k_idx, q2k_num, bits,
    offsets, pos).  ``mark`` is None when there is nothing to invert."""

    mark: object
    scan: object
    write: object
    rank: object
    lists: int
    entries: int  # codes' (and pos') entries: every selection entry
    work_ints: int


def kv_lists_launches(lists_shape: tuple, num_kv_heads: int, num_kv_blocks: int) -> KvListLaunches:
    """The :class:`KvListLaunches` for lists ``lists_shape`` [B, H, N_q, L] of ``num_kv_blocks``
    key tiles per kv head; ValueError for more selection entries than int32 offsets hold."""
    b, h, n_q, length = lists_shape
    group = h // num_kv_heads
    lists = b * num_kv_heads * num_kv_blocks
    entries = b * h * n_q * length
    words = -(-(group * n_q) // 32)  # bitmap words per list (a kv head's codes: group * N_q)
    _check_index_range("q2k_idx", entries, "selection entries")  # offsets and codes are int32
    work_ints = lists + 1 + lists * words
    if not (entries and lists):
        return KvListLaunches(None, None, None, None, lists, entries, work_ints)
    shape_args = (np.int32(entries), np.int32(length), np.int32(n_q), np.int32(h), np.int32(group),
                  np.int32(num_kv_heads), np.int32(num_kv_blocks), np.int32(words))
    entry_grid = (-(-entries // _MARK_THREADS),)
    lanes_log2 = min(5, (words - 1).bit_length())  # lanes per list: a power of two >= words, at most 32
    return KvListLaunches(
        make_launch("kv_lists.cu", "kv_lists_mark", entry_grid, (_MARK_THREADS,), shape_args),
        make_launch("kv_lists.cu", "kv_lists_scan", (1,), (_SCAN_THREADS,), (np.int64(lists),)),
        make_launch("kv_lists.cu", "kv_lists_write", (-(-(lists << lanes_log2) // _WRITE_THREADS),), (_WRITE_THREADS,),
                    (np.int64(lists), np.int32(words), np.int32(lanes_log2))),
        make_launch("kv_lists.cu", "kv_lists_rank", entry_grid, (_MARK_THREADS,), shape_args),
        lists, entries, work_ints)


def _invert(launches: KvListLaunches, q2k_idx, q2k_num, work, codes, pos=None, stream=None) -> None:
    """Run ``launches`` on addresses, ``work`` already zeroed (``pos`` 0: no ranks)."""
    if launches.mark is None:
        if pos:
            _memset(pos, 0xFF, launches.entries * 4, stream)  # -1: no entry is used
        return
    offsets, bits = work, work + 4 * (launches.lists + 1)
    launches.mark((q2k_idx, q2k_num, bits, offsets), stream)
    launches.scan((offsets,), stream)
    launches.write((bits, offsets, codes), stream)
    if pos:
        launches.rank((q2k_idx, q2k_num, bits, offsets, pos), stream)


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

    launches = kv_lists_launches(q2k_idx.shape, int(num_kv_heads), int(num_kv_blocks))
    with q2k_idx.device:
        q2k_idx, q2k_num = cupy.ascontiguousarray(q2k_idx), cupy.ascontiguousarray(q2k_num)
        work = cupy.zeros(launches.work_ints, np.int32)  # offsets [lists + 1] (the counts first), then the bitmap
        codes = cupy.empty(launches.entries, np.int32)
        pos = cupy.empty(q2k_idx.shape, np.int32) if positions else None
        _invert(launches, _address(q2k_idx), _address(q2k_num), _address(work), _address(codes), _address(pos))
    offsets = work[: launches.lists + 1]
    return (codes, offsets, pos) if positions else (codes, offsets)


def order_launch(lists: int, lists_per_launch: int) -> Launch:
    """The :class:`Launch` of :func:`dkdv_order` for ``lists`` (at least one) lists; pointers (offsets, order)."""
    return make_launch("kv_lists.cu", "kv_lists_order", (-(-lists // lists_per_launch),), (_ORDER_THREADS,),
                       (np.int64(lists), np.int64(lists_per_launch)))


def dkdv_order(offsets, lists_per_launch: int):
    """The dK/dV pass's schedule (``cuda_kernels/kv_lists.cu``'s kv_lists_order): for each
    launch's ``lists_per_launch`` consecutive lists of ``offsets`` (kv_to_q_lists'), its lists with
    the long ones first (at least 16 entries and twice the mean length), longest first, then the
    others in order: int32 [lists], from one launch (a CTA per segment), with no host
    synchronisation."""
    lists = offsets.shape[0] - 1
    order = _alloc((lists,), np.int32)
    if lists:
        order_launch(lists, lists_per_launch)((offsets, order))
    return order


def _fwd_shared_bytes(head_dim: int, tile_bytes: int) -> int:
    """Dynamic shared memory of block_sparse_fwd_sm90: Q, _FWD_STAGES[head_dim] stages of K and V
    tiles, and an 8-byte barrier per K and per V stage."""
    stages = _FWD_STAGES[head_dim]
    return (1 + 2 * stages) * tile_bytes + 16 * stages


def _dkdv_shared_bytes(head_dim: int, tile_bytes: int) -> int:
    """Dynamic shared memory of bwd_dkdv_sm90: K, V, _DKDV_STAGES[head_dim] stages of Q, dO, lse
    and delta with a barrier each, and the staged list."""
    stages = _DKDV_STAGES[head_dim]
    return (2 + 2 * stages) * tile_bytes + stages * (2 * _BLOCK_M * 4 + 8) + _LIST_BYTES


def _dq_ds_layout(tile_bytes: int, stages: int) -> tuple:
    """(shared-memory bytes, staged-list room in entries) of bwd_dq_ds_sm90 with ``stages``
    stages: as many CTAs per SM as DqDsSmem::CTAS (attention_bwd_sm90.cu) counts with the
    smallest list room, then all the room those CTAs leave (up to _LIST_CAP entries)."""
    fixed = stages * (tile_bytes + _DS_BLOCK_BYTES + 8)  # stages and their barriers
    ctas = min(4, 228 * 1024 // (fixed + _DQDS_MIN_LIST * 12 + 1024))
    room = min(_LIST_CAP, (228 * 1024 // ctas - 1024 - fixed) // 12)
    return fixed + room * 12, room


def bwd_delta_launch(dtype, head_dim: int, rows: int, q_len: int, tile_volume: int) -> Launch:
    """The :class:`Launch` of :func:`bwd_delta` over ``rows`` (at least one) query rows; pointers
    (dout, out, coarse, gate, q_block_sizes, lse, delta, lse_log2), null for no coarse, gate or
    lse_log2."""
    per_cta = 128 // (head_dim // 8)  # rows per CTA (BWD_DELTA_ROWS in attention_bwd.cu)
    return make_launch("attention_bwd.cu", f"bwd_delta<{_CUDA_TYPES[np.dtype(dtype)]}, {head_dim}>",
                       (-(-rows // per_cta),), (128,), (np.int64(rows), np.int32(q_len), np.int32(tile_volume)))


def bwd_delta(dout, out, coarse, gate, q_block_sizes, lse, delta, lse_log2=None) -> None:
    """The backward's row terms by ``attention_bwd.cu``'s ``bwd_delta``, into ``delta`` and ``lse_log2``.

    dout, out [B, H, Sq_pad, D] (D 64 or 128, C-contiguous, one half-precision dtype); coarse
    [B, H, N_q, D] float32, 16-byte aligned, or None; gate q-shaped or None; q_block_sizes
    int32 [N_q]; lse float32 [B, H, Sq_pad].  Writes delta = rowsum(dout * (out - gate *
    coarse)) over real rows (0 in pad rows) and, where ``lse_log2`` is given, lse * log2(e)
    (NaN where |lse| passes ``common.cuh``'s LSE_LIMIT, -inf excepted), both float32
    [B, H, Sq_pad].  Arguments are not checked: the caller has.
    """
    b, h, q_len, d = dout.shape
    launch = bwd_delta_launch(dout.dtype, d, b * h * q_len, q_len, q_len // q_block_sizes.shape[0])
    launch(tuple(_address(x) for x in (dout, out, coarse, gate, q_block_sizes, lse, delta, lse_log2)))


def backward_knobs() -> tuple:
    """The module's settings that shape a backward's launches, as a cache key (tests change them)."""
    return (BACKWARD_KERNEL, DKDV_ORDER, _LIST_STAGE_LIMIT, DS_WORKSPACE_BYTES, _DS_MIN_BYTES, _DS_CHUNK_PAIRS,
            _DS_HEAD_DIMS, _DS_FAST_DRAM_HEAD_DIMS, _DS_FAST_DRAM, _DS_STREAMS, _DS_MIN_CTAS, _DQDS_STAGES,
            _DS_MAX_PARTS)


def dram_bytes_per_s(memory_clock_khz: int, bus_width_bits: int) -> float:
    """Peak DRAM bandwidth from the driver's memory clock (kHz) and bus width (bits): two
    transfers per clock (double data rate) of bus_width / 8 bytes."""
    return 2.0 * memory_clock_khz * 1e3 * bus_width_bits / 8


@functools.cache
def _dram_bytes_per_s(device_id: int) -> float:
    """:func:`dram_bytes_per_s` of a device; 0 where the driver does not say."""
    import cupy

    runtime = cupy.cuda.runtime
    try:
        khz = runtime.deviceGetAttribute(runtime.cudaDevAttrMemoryClockRate, device_id)
        bits = runtime.deviceGetAttribute(runtime.cudaDevAttrGlobalMemoryBusWidth, device_id)
    except (AttributeError, runtime.CUDARuntimeError):
        return 0.0
    return dram_bytes_per_s(khz, bits)


def ds_head_dims(device_id: int) -> tuple:
    """The head dims whose backward hands dS over on ``device_id`` (within the workspace budget)."""
    fast = _dram_bytes_per_s(device_id) >= _DS_FAST_DRAM
    return _DS_HEAD_DIMS + (_DS_FAST_DRAM_HEAD_DIMS if fast else ())


class FinePointers(NamedTuple):
    """The addresses of one fine backward (:class:`FineBackward`), Python ints, 0 for none
    (coarse, gate, the tile gradients; delta and lse_log2 when the backward computes them)."""

    dout: object
    q: object
    k: object
    v: object
    out: object
    lse: object
    q2k_idx: object
    q2k_num: object
    q_block_sizes: object
    kv_block_sizes: object
    coarse: object
    gate: object
    dq_tile: object
    dk_tile: object
    dv_tile: object
    dq: object
    dk: object
    dv: object
    delta: object
    lse_log2: object


class _TmaLaunch(NamedTuple):
    """A Hopper pass's :class:`Launch` whose TMA maps, passed first, are of the tensors at
    ``sources`` (attribute names of :class:`FinePointers`), each viewed as [rows, D]."""

    launch: Launch
    sources: tuple
    rows: tuple
    head_dim: int
    dtype: np.dtype
    device_id: int

    def __call__(self, p: FinePointers, pointers: tuple, stream=None):
        # (the maps are held until the launch has copied them: another thread may evict them from the cache)
        maps = tuple(_encoded_map(getattr(p, name), rows, self.head_dim, self.dtype, self.device_id)
                     for name, rows in zip(self.sources, self.rows))
        self.launch(tuple(m.arg for m in maps) + pointers, stream)


def _launch_or_mapped(launch: Launch, p: FinePointers, pointers: tuple, stream) -> None:
    if isinstance(launch, _TmaLaunch):
        launch(p, pointers, stream)
    else:
        launch(pointers, stream)


class _Chunk(NamedTuple):
    """One chunk of the dS hand-over: its row terms' launch (None when given) with its first
    (batch, head), and its two passes, one pair of launches per part (ds_parts; one part where
    the chunk's blocks fit whole)."""

    delta: object  # (Launch, first batch * head) or None
    parts: tuple  # ((dK/dV launch, dQ launch), ...), run in order


class FineBackward(NamedTuple):
    """The fine backward's launches for one problem, from :func:`fine_backward` (see
    :func:`block_sparse_bwd` for what they do), run on addresses by ``__call__``."""

    device_id: int
    dtype: np.dtype
    head_dim: int
    q_len: int
    q_blocks: int
    delta_all: object  # bwd_delta over every row, also writing lse * log2(e) (None: the row terms are given)
    dq: object  # the recomputing dQ pass
    dkdv: object  # the dK/dV pass over every (batch, kv head), with no dS blocks
    lists: KvListLaunches
    order_all: object  # dkdv_order over all lists in one segment, or None (DKDV_ORDER off)
    order_chunk: object  # ... in segments of a chunk's lists (hand-over only)
    chunks: tuple  # the hand-over's _Chunk's, () when it does not run
    streams: int
    block_elements: int  # dS blocks per stream, in elements of dtype
    partial_bytes: int  # per stream, the dQ pass's fp32 sums carried between parts (0: no parts)
    workspace: tuple  # byte offsets (delta, lse_log2, work, codes, pos, order) in one workspace
    workspace_bytes: int

    def __call__(self, p: FinePointers, alloc, address, stream=None):
        """Launch on ``stream`` (None: CuPy's current stream) with the device current, temporaries
        from ``alloc(shape, NumPy dtype)`` (``address(buffer)`` its address), kept until the
        launches are queued.  The hand-over's chunks go to streams of this module forked from
        ``stream`` and joined back to it."""
        chunked = bool(self.chunks)
        held = self.streams * (self.block_elements * self.dtype.itemsize + self.partial_bytes)  # bytes in flight
        if chunked and _ds_refused(self.device_id, held):
            chunked = False
        blocks = partials = workspace = None
        if chunked:  # without the memory for the blocks (or the lists after them), the passes below recompute dS
            try:
                blocks = [alloc((self.block_elements,), self.dtype) for _ in range(self.streams)]
                partials = [alloc((self.partial_bytes // 4,), np.dtype(np.float32))
                            for _ in range(self.streams if self.partial_bytes else 0)]
                workspace = alloc((self.workspace_bytes,), np.dtype(np.uint8))
            except Exception as error:  # noqa: BLE001 - allocators raise their own out-of-memory errors
                if not _out_of_memory(error):
                    raise
                blocks = partials = None  # freed before the recomputing passes allocate
                _ds_refuse(self.device_id, held)
                chunked = False
        if workspace is None:
            workspace = alloc((self.workspace_bytes,), np.dtype(np.uint8))
        base = address(workspace)
        delta_at, log2_at, work, codes, pos, order = (base + offset for offset in self.workspace)
        if self.delta_all is not None:
            p = p._replace(delta=delta_at, lse_log2=log2_at)
        _memset(work, 0, 4 * self.lists.work_ints, stream)
        if not chunked:
            if self.delta_all is not None:
                self.delta_all((p.dout, p.out, p.coarse, p.gate, p.q_block_sizes, p.lse, p.delta, p.lse_log2), stream)
            _launch_or_mapped(self.dq, p, (p.q, p.k, p.v, p.dout, p.lse, p.delta, p.q2k_idx, p.q2k_num, p.q_block_sizes,
                                           p.kv_block_sizes, p.dq_tile, p.dq), stream)
            _invert(self.lists, p.q2k_idx, p.q2k_num, work, codes, stream=stream)
            if self.order_all is None:
                order = 0
            else:
                self.order_all((work, order), stream)
            _launch_or_mapped(self.dkdv, p, self._dkdv_pointers(p, codes, work, 0, order), stream)
            return
        _invert(self.lists, p.q2k_idx, p.q2k_num, work, codes, pos, stream)
        if self.order_chunk is None:
            order = 0
        else:
            self.order_chunk((work, order), stream)
        at = [address(b) for b in blocks]  # (the blocks themselves are held until the launches are queued)
        carry = [address(x) for x in partials] or [0] * len(at)
        if len(self.chunks) == 1:
            self._chunk(self.chunks[0], p, at[0], carry[0], codes, work, pos, order, stream)
            return
        import cupy

        # Everything that may fail on the host is done (the kernels are loaded): fork, launch, and
        # join even if a launch raises (else the caller's stream would free buffers that queued
        # work still uses, and a capture would end with unjoined streams).
        caller = cupy.cuda.get_current_stream() if stream is None else stream
        pipes, fork, joins = _pipes(self.device_id, len(at))
        fork.record(caller)
        for pipe in pipes:
            pipe.wait_event(fork)
        try:
            for c, chunk in enumerate(self.chunks):
                self._chunk(chunk, p, at[c % len(pipes)], carry[c % len(pipes)], codes, work, pos, order,
                            pipes[c % len(pipes)])
        finally:
            for pipe, join in zip(pipes, joins):
                join.record(pipe)
                caller.wait_event(join)

    def _dkdv_pointers(self, p: FinePointers, codes, offsets, ds_blocks, order) -> tuple:
        pointers = (p.q, p.k, p.v, p.dout, p.lse_log2, p.delta, codes,
                    offsets, p.q_block_sizes, p.kv_block_sizes, p.dk_tile, p.dv_tile, p.dk, p.dv)
        return pointers + ((ds_blocks, order) if isinstance(self.dkdv, _TmaLaunch) else (order,))

    def _chunk(self, chunk: _Chunk, p: FinePointers, ds_blocks, partial, codes, offsets, pos, order, stream) -> None:
        """One chunk's row terms (where not given), then per part its dK/dV pass storing dS and its
        dQ pass summing dS K."""
        if chunk.delta is not None:  # its (batch, head)s' rows, from the bh-th on
            launch, bh = chunk.delta
            at = lambda x, nbytes: x + bh * nbytes if x else x  # noqa: E731
            row_bytes, stat_bytes = self.q_len * self.head_dim * self.dtype.itemsize, self.q_len * 4
            launch((at(p.dout, row_bytes), at(p.out, row_bytes), at(p.coarse, self.q_blocks * self.head_dim * 4),
                    at(p.gate, row_bytes), p.q_block_sizes, at(p.lse, stat_bytes), at(p.delta, stat_bytes),
                    at(p.lse_log2, stat_bytes)), stream)
        for dkdv, dq_ds in chunk.parts:
            dkdv(p, self._dkdv_pointers(p, codes, offsets, ds_blocks, order), stream)
            dq_ds(p, (p.k, ds_blocks, pos, p.q2k_idx, p.q2k_num, p.q_block_sizes, p.kv_block_sizes, p.dq_tile, p.dq,
                      offsets, partial), stream)


def fine_backward(q_shape: tuple, kv_shape: tuple, dtype, num_q_blocks: int, list_len: int, scale: float,
                  row_terms_given: bool, device_id: int, knobs: tuple) -> FineBackward:
    """The :class:`FineBackward` of a checked problem on ``device_id`` (CuPy's current device): q
    [B, H, Sq_pad, D], k and v ``kv_shape``, ``dtype`` float16 or bfloat16, index lists of
    ``list_len`` entries; ``knobs`` is :func:`backward_knobs` (read by the caller).  Cached."""
    return _fine_backward(tuple(q_shape), tuple(kv_shape), np.dtype(dtype), num_q_blocks, list_len, float(scale),
                          row_terms_given, device_id, knobs)


@functools.lru_cache(maxsize=256)
def _fine_backward(q_shape, kv_shape, dtype, n_q, length, scale, row_terms_given, device_id, knobs) -> FineBackward:
    b, h, q_len, d = q_shape
    h_kv, kv_len = kv_shape[1], kv_shape[2]
    group, volume = h // h_kv, q_len // n_q
    n_kv, slices = kv_len // volume, volume // _CHUNK
    ctype, item = _CUDA_TYPES[dtype], dtype.itemsize
    wgmma = _use_wgmma(BACKWARD_KERNEL)
    q_rows, kv_rows = b * h * q_len, b * h_kv * kv_len
    dkdv_wgmma = wgmma and q_rows < 2**31  # TMA coordinates are int32: else the portable kernels
    dq_wgmma = wgmma and kv_rows < 2**31
    common = (np.int32(h), np.int32(h_kv), np.int32(q_len), np.int32(kv_len))
    tile_bytes = _BLOCK_M * d * item
    smem = 6 * tile_bytes  # the cp.async passes: two resident tiles and two stages of two streamed ones
    stats = 2 * _BLOCK_M * 4  # lse and delta of one stage

    def delta(count: int):  # bwd_delta over the rows of `count` (batch, head)s; the caller offsets the pointers
        return bwd_delta_launch(dtype, d, count * q_len, q_len, volume)

    def dkdv(count: int, bh_kv0: int = 0, part: int = 0, parts: int = 1, cap: int = 0):
        grid, tail = (kv_len // _BLOCK_M, count), (*common, np.int32(volume), np.float32(scale))
        if dkdv_wgmma:  # Q and dO by TMA (see _dkdv_shared_bytes)
            launch = make_launch("attention_bwd_sm90.cu", f"bwd_dkdv_sm90<{ctype}, {d}>", grid, (128,),
                                 tail + (np.int32(_LIST_STAGE_LIMIT), np.int32(bh_kv0), np.int32(part), np.int32(parts),
                                         np.int32(cap)),
                                 _dkdv_shared_bytes(d, tile_bytes))
            return _TmaLaunch(launch, ("q", "dout"), (q_rows, q_rows), d, dtype, device_id)
        return make_launch("attention_bwd.cu", f"bwd_dkdv<{ctype}, {d}>", grid, (128,), tail, smem + 2 * stats)

    list_tail = (*common, np.int32(length), np.int32(volume), np.float32(scale))
    if dq_wgmma:  # K and V by TMA: Q, dO, stages of K and V, a barrier per stage of each, the staged list
        shared = (2 + 2 * _DQ_STAGES) * tile_bytes + 16 * _DQ_STAGES + _LIST_BYTES
        dq = _TmaLaunch(make_launch("attention_bwd_sm90.cu", f"bwd_dq_sm90<{ctype}, {d}>", (q_len // _BLOCK_M, b * h),
                                    (128,), list_tail + (np.int32(_LIST_STAGE_LIMIT),), shared),
                        ("k", "v"), (kv_rows, kv_rows), d, dtype, device_id)
    else:
        dq = make_launch("attention_bwd.cu", f"bwd_dq<{ctype}, {d}>", (q_len // _BLOCK_M, b * h), (128,), list_tail,
                         smem)
    lists = kv_lists_launches((b, h, n_q, length), h_kv, n_kv)
    order_all = order_launch(lists.lists, lists.lists) if DKDV_ORDER and lists.lists else None

    # The hand-over (see block_sparse_bwd): dS bytes per (batch, kv head), every selection entry
    # counted (the used ones are known on the device only).
    chunk = streams = cap = 0
    entry_bytes = slices * slices * _DS_BLOCK_BYTES  # dS blocks of one list entry
    pair_entries = group * n_q * length
    ds_bytes = pair_entries * entry_bytes
    if dkdv_wgmma and dq_wgmma and d in ds_head_dims(device_id):
        chunk, streams = ds_schedule(b * h_kv, ds_bytes, kv_len // _BLOCK_M, int(DS_WORKSPACE_BYTES))
        if not chunk and _DS_CHUNK_PAIRS in (None, 1):  # one pair per chunk, its blocks in parts
            streams, cap = ds_parts(b * h_kv, pair_entries, group * n_q, entry_bytes, int(DS_WORKSPACE_BYTES))
            chunk = 1 if cap else 0
    chunks, order_chunk, block_elements, partial_bytes = (), None, 0, 0
    if chunk:
        shared, list_room = _dq_ds_layout(tile_bytes, _DQDS_STAGES)
        parts = -(-pair_entries // cap) if cap else 1
        built = []
        for bh_kv0 in range(0, b * h_kv, chunk):
            count = min(chunk, b * h_kv - bh_kv0)
            launches = []
            for part in range(parts):
                dq_ds = make_launch("attention_bwd_sm90.cu", f"bwd_dq_ds_sm90<{ctype}, {d}, {_DQDS_STAGES}>",
                                    (q_len // _BLOCK_M, count * group), (128,),
                                    list_tail + (np.int32(_LIST_STAGE_LIMIT), np.int32(bh_kv0 * group),
                                                 np.int32(list_room), np.int32(part), np.int32(parts), np.int32(cap)),
                                    shared)
                launches.append((dkdv(count, bh_kv0, part, parts, cap),
                                 _TmaLaunch(dq_ds, ("k",), (kv_rows,), d, dtype, device_id)))
            built.append(_Chunk(None if row_terms_given else (delta(count * group), bh_kv0 * group), tuple(launches)))
        chunks = tuple(built)
        order_chunk = order_launch(lists.lists, chunk * n_kv) if DKDV_ORDER and lists.lists else None
        # with parts, a part's blocks: fewer than cap + a list's entries (ds_parts)
        block_elements = (min(pair_entries, cap + group * n_q) * entry_bytes if cap else chunk * ds_bytes) // item
        partial_bytes = group * q_len * d * 4 if cap else 0
    # One workspace: delta and lse_log2 (where not given), the lists' work and codes, pos, the order.
    row_bytes = 0 if row_terms_given else 4 * q_rows
    sizes = (row_bytes, row_bytes, 4 * lists.work_ints, 4 * lists.entries, 4 * lists.entries if chunk else 0,
             4 * lists.lists)
    offsets, end = workspace_layout(sizes)
    return FineBackward(device_id, dtype, d, q_len, n_q, None if row_terms_given else delta(b * h), dq,
                        dkdv(b * h_kv), lists, order_all, order_chunk, chunks, streams, block_elements, partial_bytes,
                        offsets, max(end, 256))


def block_sparse_bwd(dout, q, k, v, out, lse, q2k_idx, q2k_num, q_block_sizes, kv_block_sizes,
                     scale, coarse, gate, dq_tile, dk_tile, dv_tile, dq=None, dk=None, dv=None, row_terms=None):
    """See :mod:`vsa_nd.backends`: (dq, dk, dv) in the input dtype; deterministic.

    ``row_terms``: the :class:`vsa_nd.backends.cuda.RowTerms` of this backward from
    ``coarse_grad_inputs`` (then ``bwd_delta`` does not run), or None.

    On Hopper at head dim 128, and at 64 where the DRAM serves at least 4 TB/s (H200;
    :func:`ds_head_dims`), within the dS workspace budget (``DS_WORKSPACE_BYTES``, 2 GiB
    unless ``$VSA_ND_DS_WORKSPACE_GIB`` says otherwise), the dK/dV pass runs first and stores every
    step's dS (64 x 64 in the input dtype: 8 KB per pair at tile volume 64), and the dQ pass sums
    dS K from it: five matrix products per selected (query tile, key tile) pair.  The (batch, kv
    head) pairs go in chunks (:func:`ds_schedule`): one chunk on the current stream, or several,
    up to ``_DS_STREAMS`` at a time on streams of their own, forked from the current stream and
    joined back to it (so the call stays capturable in a CUDA graph); without ``row_terms``, each
    chunk's rows get their ``bwd_delta`` on its stream, just before its dK/dV pass.  Where one
    pair's blocks do not fit the budget twice but parts of them do (:func:`ds_parts`: Wan2.1-14B
    at 720p), each chunk is one pair whose two passes run in parts, one after another on its
    stream, each part over the key tiles whose lists start in it, the dQ pass carrying its fp32
    sums from part to part.  Elsewhere, where neither schedule fits (small problems, too little
    budget, a single pair), or when the blocks cannot be allocated (then calls of that size
    recompute for a while: ``_ds_refused``), the dQ pass recomputes S, P, dP and dS itself: seven
    products per pair, no workspace.  The side streams and their events are made on a thread's
    first call with several chunks: warm up before a capture, as for the kernels.  The dK/dV pass
    takes its lists long ones first (:func:`dkdv_order`; ``DKDV_ORDER``), so that key tiles chosen
    by many query tiles do not leave a few SMs finishing them after the rest.  The launches are
    worked out once per problem (:func:`fine_backward`) and run on addresses.
    """
    q_len = q.shape[2]
    tile_volume = q_len // q_block_sizes.shape[0]
    with q.device:
        dq_tile, dk_tile, dv_tile, coarse = (_float32(x) for x in (dq_tile, dk_tile, dv_tile, coarse))
        # coarse too: bwd_delta reads it 16 bytes at a time.
        check_kernel_support(q, tile_volume, ("dq", "dk", "dv"), k=k, v=v, dout=dout, out=out, gate=gate, coarse=coarse,
                             lse=lse, dq=dq, dk=dk, dv=dv)
        plan = fine_backward(q.shape, k.shape, q.dtype, q_block_sizes.shape[0], q2k_idx.shape[3], scale,
                             row_terms is not None, q.data.device_id, backward_knobs())
        dq = _alloc(q.shape, q.dtype) if dq is None else dq
        dk = _alloc(k.shape, k.dtype) if dk is None else dk
        dv = _alloc(v.shape, v.dtype) if dv is None else dv
        q2k_idx, q2k_num = (x if x.flags.c_contiguous else x.copy() for x in (q2k_idx, q2k_num))
        delta, lse_log2 = (None, None) if row_terms is None else row_terms
        pointers = FinePointers(*(_address(x) for x in (dout, q, k, v, out, lse, q2k_idx, q2k_num, q_block_sizes,
                                                        kv_block_sizes, coarse, gate, dq_tile, dk_tile, dv_tile, dq, dk,
                                                        dv, delta, lse_log2)))
        plan(pointers, lambda shape, dtype: _alloc(shape, dtype), _address)
    return dq, dk, dv
