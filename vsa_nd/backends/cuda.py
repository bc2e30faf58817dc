"""CUDA backend: the interface of :mod:`vsa_nd.backends` for CuPy arrays.

Every kernel is launched on the array's device (``with x.device``) and on CuPy's current stream
of that device (``cupy.cuda.get_current_stream()``, the stream CuPy's own kernels and
``RawKernel`` launches use), with no host synchronisation and no host-device copy, so every
function here can be captured in a CUDA graph.  Kernels come from :func:`vsa_nd.kernels.get_function`
(NVRTC, compiled once per device and cached on disk).

Element types: float32, float16 and bfloat16 (``ml_dtypes.bfloat16``), computed in float32;
:func:`tile` and :func:`untile` move bytes and take any dtype whose rows are a whole number of
2-byte units.  Index arithmetic inside the kernels is int32 per batch element (element offsets
are 64-bit); a problem too large for that is refused with a ``ValueError`` before any launch.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
from typing import NamedTuple

import numpy as np

from .._xp import BFLOAT16
from ..kernels import GEMM_TILES, get_function

# Kernel element type of each supported dtype, and the widest vector (elements in 16 bytes).
_ELEMENT = {np.dtype(np.float32): "float", np.dtype(np.float16): "__half", BFLOAT16: "__nv_bfloat16"}
_VECTOR_BYTES = 16
_COPY_UNITS = ((16, "uint4"), (8, "uint2"), (4, "unsigned int"), (2, "unsigned short"))

# Threads per CTA; each must equal THREADS in its .cu file (the kernels are built for exactly that).
_TILE_THREADS, _TILE_UNITS = 256, 4  # tile.cu: THREADS, UNITS
_REDUCE_THREADS = 128  # block_mean.cu and coarse_grad.cu: one thread per (tile, column vector)
_TOPK_THREADS = 128  # topk.cu
_SOFTMAX_THREADS = 256  # softmax.cu
_SOFTMAX_GRAD_WARPS = 8  # GRAD_WARPS there
_GEMM_THREADS = 256  # gemm_f32.cu

_INT32_HEADROOM = 2**31 - 2**16  # int32 unit / tile indices, with room for a grid's last partial CTA
_MAX_GRID_Y = 65535
_NULL = np.uintp(0)  # a null pointer argument (CuPy passes None as no value at all)


class Launch(NamedTuple):
    """One kernel launch, fixed but for its leading pointer arguments: ``launch(pointers, stream)``.

    ``pointers`` (CuPy arrays, or addresses as Python ints, which CuPy passes as 64-bit values)
    are the kernel's first parameters and ``tail`` (NumPy scalars) the rest, fixed when the
    launch is made; ``stream`` is a CuPy stream, or None for CuPy's current stream.  Made by
    :func:`make_launch` with the device it is for current (kernel handles are per device), and
    launched with that device current."""

    function: object  # cupy.cuda.function.Function
    grid: tuple
    block: tuple
    tail: tuple
    shared_mem: int
    name: str  # the kernel's name, template arguments included
    packed: tuple  # the tail as CuPy takes it without converting: pointers to the C values below
    c_values: tuple  # (held for packed)

    def __call__(self, pointers: tuple, stream=None):
        self.function(self.grid, self.block, pointers + self.packed, self.shared_mem, stream)


# C types of the NumPy scalars a launch's tail holds.
_C_SCALARS = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.int64): ctypes.c_int64,
              np.dtype(np.float32): ctypes.c_float, np.dtype(np.uintp): ctypes.c_uint64}


def make_launch(source: str, name: str, grid: tuple, block: tuple, tail: tuple = (), shared_mem: int = 0) -> Launch:
    """The :class:`Launch` of kernel ``name`` of ``source`` on CuPy's current device.

    The tail is packed once into C values that CuPy passes by address (``CPointer``, as it does
    for any such argument), rather than converting each NumPy scalar at every launch: on an
    H100 host a launch of four pointers and six scalars took 8.3 µs of host time so, against
    11.4-15.1 µs with NumPy scalars (``BENCHMARKS.md``)."""
    from cupy.cuda.function import CPointer

    kernel = get_function(source, name)
    if shared_mem:
        kernel.max_dynamic_shared_size_bytes = shared_mem
    c_values = tuple(_C_SCALARS[x.dtype](x) for x in tail)
    packed = tuple(CPointer(ctypes.addressof(value)) for value in c_values)
    return Launch(kernel.kernel, grid, block, tuple(tail), shared_mem, name, packed, c_values)


_WORKSPACE_ALIGN = 256  # bytes: where each piece of a shared workspace starts (CuPy's and torch's allocators align as much)


def workspace_layout(sizes) -> tuple:
    """(offsets, total bytes) of pieces of ``sizes`` bytes laid one after another in one workspace,
    each starting on a 256-byte boundary."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += -(-size // _WORKSPACE_ALIGN) * _WORKSPACE_ALIGN
    return tuple(offsets), end


def _alloc(shape, dtype):
    """Every output buffer this module allocates (the tests swap in a poisoned one)."""
    import cupy

    return cupy.empty(shape, dtype)


def _element(name: str, x) -> str:
    try:
        return _ELEMENT[np.dtype(x.dtype)]
    except KeyError:
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16 on CUDA, got {x.dtype}") from None


def _check_index_range(name: str, count: int, what: str):
    if count > _INT32_HEADROOM:
        raise ValueError(f"{name}: expected at most {_INT32_HEADROOM} {what} (int32 indexing), got {count}")


def _vector_width(element_size: int, head_dim: int, arrays) -> int:
    """Elements per load: 16 bytes where rows and every pointer are 16-byte aligned, else 1."""
    aligned = (head_dim * element_size) % _VECTOR_BYTES == 0 and all(a.data.ptr % _VECTOR_BYTES == 0 for a in arrays)
    return _VECTOR_BYTES // element_size if aligned else 1


def _reduce_grid(name: str, tiles: int, columns: int) -> tuple:
    """Grid of block_mean.cu / coarse_grad.cu: one thread per (tile, column vector)."""
    _check_index_range(name, tiles, "tiles")
    ctas = -(-tiles * columns // _REDUCE_THREADS)
    _check_index_range(name, ctas, "thread blocks")
    return (ctas,)


def _copy_unit(name: str, row_bytes: int, addresses) -> tuple:
    """(bytes, C type) of the widest copy unit dividing the row bytes and every address."""
    for size, unit in _COPY_UNITS:
        if row_bytes % size == 0 and all(a % size == 0 for a in addresses):
            return size, unit
    raise TypeError(f"{name}: expected rows (D * itemsize) of an even number of bytes on CUDA, got {row_bytes} bytes")


def reorder(kind: str, src: int, index: int, out: int, src_shape: tuple, itemsize: int, other_len: int, stream=None):
    """tile.cu on addresses, on CuPy's current device: ``kind`` "tile" (src x [B, S, H, D], index
    the plan's slot_token_index, out [B, H, S_pad, D], ``other_len`` S_pad) or "untile" (src y
    [B, H, S_pad, D], index the plan's untile_index, out [B, S, H, D], ``other_len`` S), in the
    widest copy unit that divides the rows and both addresses; ``stream`` None for CuPy's current."""
    size, unit = _copy_unit("x" if kind == "tile" else "y", src_shape[3] * itemsize, (src, out))
    launch = _reorder_launch(kind, tuple(src_shape), itemsize, other_len, size, unit, current_device())
    if launch is not None:
        launch((src, index, out), stream)


@functools.lru_cache(maxsize=256)
def _reorder_launch(kind: str, src_shape: tuple, itemsize: int, other_len: int, unit_bytes: int, unit: str,
                    device_id: int):
    """The :class:`Launch` of :func:`reorder` (pointers src, index, out), or None when there is nothing to copy."""
    if kind == "tile":
        batch, seq_len, num_heads, head_dim = src_shape
        padded_len, units_per_batch = other_len, num_heads * other_len
    else:
        batch, num_heads, padded_len, head_dim = src_shape
        seq_len, units_per_batch = other_len, other_len * num_heads
    row_units = head_dim * itemsize // unit_bytes
    units = units_per_batch * row_units
    _check_index_range("out", units, "copy units per batch element")
    if units == 0 or batch == 0:
        return None
    grid = (-(-units // (_TILE_THREADS * _TILE_UNITS)), min(batch, _MAX_GRID_Y))
    tail = (np.int32(seq_len), np.int32(num_heads), np.int32(padded_len), np.int32(row_units), np.int32(batch))
    return make_launch("tile.cu", f"{kind}_rows<{unit}>", grid, (_TILE_THREADS,), tail)


def tile(x, slot_token_index, out):
    """x [B, S, H, D] -> out [B, H, S_pad, D]; ``out[b, h, s] = x[b, slot_token_index[s], h]``, 0 where < 0."""
    with x.device:
        reorder("tile", x.data.ptr, slot_token_index.data.ptr, out.data.ptr, x.shape, x.itemsize, out.shape[2])
    return out


def untile(y, untile_index, out):
    """y [B, H, S_pad, D] -> out [B, S, H, D]; ``out[b, t, h] = y[b, h, untile_index[t]]``."""
    with y.device:
        reorder("untile", y.data.ptr, untile_index.data.ptr, out.data.ptr, y.shape, y.itemsize, out.shape[1])
    return out


def block_means(tensors, block_sizes_list) -> list:
    """Tile means of up to three tensors in one launch (the forward's q, k and v).

    ``tensors[j]`` [B, H_j, N_j * V, D] and ``block_sizes_list[j]`` [N_j] int32 on the same
    device; every tensor has the same dtype (float32, float16 or bfloat16), D and V.  Returns
    a list of float32 [B, H_j, N_j, D], the mean of the first ``block_sizes[i]`` slots of tile i.
    """
    tensors, block_sizes_list = list(tensors), list(block_sizes_list)
    if not 1 <= len(tensors) <= 3 or len(block_sizes_list) != len(tensors):
        raise ValueError(
            f"tensors, block_sizes_list: expected 1 to 3 tensors and as many block-size arrays, "
            f"got {len(tensors)} and {len(block_sizes_list)}"
        )
    first = tensors[0]
    element = _element("tensors[0]", first)
    head_dim, volume = first.shape[3], first.shape[2] // max(len(block_sizes_list[0]), 1)
    for j, (x, sizes) in enumerate(zip(tensors, block_sizes_list)):
        if x.dtype != first.dtype or x.shape[3] != head_dim or x.shape[2] != len(sizes) * volume:
            raise ValueError(
                f"tensors[{j}]: expected dtype {first.dtype}, head dim {head_dim} and {len(sizes)} tiles of "
                f"{volume} slots, got dtype {x.dtype} and shape {list(x.shape)}"
            )

    with first.device:
        means = [_alloc((x.shape[0], x.shape[1], len(s), head_dim), np.float32) for x, s in zip(tensors, block_sizes_list)]
        launch = block_mean_launch(element, _vector_width(first.itemsize, head_dim, tensors), head_dim, volume,
                                   [m.shape[0] * m.shape[1] * m.shape[2] for m in means], [len(s) for s in block_sizes_list])
        if launch is not None:
            padded = lambda items: tuple(items) + (_NULL,) * (3 - len(items))  # noqa: E731
            launch(padded(tensors) + padded(means) + padded(block_sizes_list))
    return means


def block_mean_launch(element: str, width: int, head_dim: int, volume: int, tiles: list, blocks: list):
    """The :class:`Launch` of block_mean.cu for up to three tensors (``tiles[j]`` = B * H_j * N_j
    tiles of N_j = ``blocks[j]``), whose pointers are (x0, x1, x2, mean0, mean1, mean2, sizes0,
    sizes1, sizes2), null past the last tensor; None when there is nothing to compute."""
    total = sum(tiles)
    if total == 0 or head_dim == 0:
        return None
    grid = _reduce_grid("tensors", total, head_dim // width)
    padded = lambda items, fill: list(items) + [fill] * (3 - len(items))  # noqa: E731
    ends = itertools.accumulate(padded(tiles, 0))
    tail = (*(np.int32(e) for e in ends), *(np.int32(n) for n in padded(blocks, 1)), np.int32(volume), np.int32(head_dim))
    return make_launch("block_mean.cu", f"block_mean<{element}, {width}>", grid, (_REDUCE_THREADS,), tail)


def block_mean(x, block_sizes):
    """x [B, H, N*V, D] -> float32 [B, H, N, D]: mean of the first ``block_sizes[i]`` slots of tile i."""
    return block_means([x], [block_sizes])[0]


def select_topk(scores, topk: int, softmax: bool = False):
    """scores float32 [B, H, N_q, N_kv] -> (q2k_idx int32 [B, H, N_q, topk], q2k_num int32 [B, H, N_q]).

    The ``topk`` largest per row, ties to the lower index, each row in increasing tile order;
    NaN counts as the smallest score.  With ``softmax`` the same launch then turns each row of
    ``scores`` into its softmax in place (as :func:`softmax_rows_`).
    """
    if scores.dtype != np.float32:
        raise TypeError(f"scores: expected dtype float32 on CUDA, got {scores.dtype}")
    *lead, num_kv = scores.shape
    rows = math.prod(lead)
    with scores.device:
        q2k_idx = _alloc((*lead, topk), np.int32)
        q2k_num = _alloc(tuple(lead), np.int32)
        if rows:
            topk_launch(rows, num_kv, topk, softmax)((scores, q2k_idx, q2k_num))
    return q2k_idx, q2k_num


def topk_launch(rows: int, num_kv: int, topk: int, softmax: bool) -> Launch:
    """The :class:`Launch` of topk.cu over ``rows`` rows of ``num_kv`` scores; pointers (scores,
    q2k_idx, q2k_num)."""
    _check_index_range("scores", rows, "rows")
    return make_launch("topk.cu", f"select_topk<{'true' if softmax else 'false'}>", (rows,), (_TOPK_THREADS,),
                       (np.int32(num_kv), np.int32(topk)))


def select_topk_softmax_(scores, topk: int):
    """(q2k_idx, q2k_num, probs): :func:`select_topk` of ``scores``, then ``scores`` turned into its
    row softmax in place (``probs`` is ``scores``); one launch."""
    q2k_idx, q2k_num = select_topk(scores, topk, softmax=True)
    return q2k_idx, q2k_num, scores


def softmax_rows_(x):
    """Row softmax of float32 x [..., n] in place (one launch); returns x."""
    rows = x.size // x.shape[-1] if x.size else 0
    with x.device:
        if rows:
            _check_index_range("x", rows, "rows")
            get_function("softmax.cu", "softmax_rows")((rows,), (_SOFTMAX_THREADS,), (x, np.int32(x.shape[-1])))
    return x


def softmax_grad_rows_(d_probs, probs, d_out, out):
    """Softmax backward in place (one launch): float32 d_probs [..., n] (the gradient of probs)
    becomes ``probs * (d_probs - rowsum(d_out * out))``, where out = probs @ v [..., d] and d_out
    its gradient (so that rowsum(d_out * out) = rowsum(d_probs * probs)); returns d_probs.
    All four C-contiguous float32 with the same leading axes."""
    rows = d_probs.size // d_probs.shape[-1] if d_probs.size else 0
    with d_probs.device:
        if rows:
            softmax_grad_launch(rows, d_probs.shape[-1], d_out.shape[-1])((d_probs, probs, d_out, out))
    return d_probs


def softmax_grad_launch(rows: int, n: int, d: int) -> Launch:
    """The :class:`Launch` of :func:`softmax_grad_rows_` over ``rows`` rows (at least one) of ``n``
    probabilities and ``d`` output columns; pointers (d_probs, probs, d_out, out)."""
    return make_launch("softmax.cu", "softmax_grad_rows", (-(-rows // _SOFTMAX_GRAD_WARPS),), (_SOFTMAX_GRAD_WARPS * 32,),
                       (np.int64(rows), np.int32(n), np.int32(d)))


@functools.cache
def _sm_count(device_id: int) -> int:
    """Multiprocessors of a device."""
    import cupy

    return cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"]


# Relative FMA throughput of an SM running gemm_f32.cu with each output tile, at the occupancy its
# register cap allows (fitted on H100 to the coarse products of 40 heads x 1440 tiles, where every
# tile keeps all SMs busy; with them the model below picks the fastest tile at 12 x 768 too).
_GEMM_TILE_RATE = {(128, 128): 1.0, (128, 64): 0.84, (64, 64): 0.73}


def _gemm_tile(m: int, n: int, batches: int, sm_count: int) -> tuple:
    """(BM, BN) of gemm_f32.cu that finishes first by a simple model: the busiest SM's share of
    the CTAs times the tile's area, over the tile's throughput (large tiles compute faster,
    small ones spread a small product over more SMs)."""
    def busiest_sm_time(tile):
        bm, bn = tile
        ctas = -(-m // bm) * -(-n // bn) * batches
        return -(-ctas // sm_count) * bm * bn / _GEMM_TILE_RATE[tile]

    return min(GEMM_TILES, key=busiest_sm_time)


def _launch_gemm(a, b, out, transpose_a: bool, transpose_b: bool, alpha: float, tile: tuple, row_divisor=None):
    """gemm_f32.cu with output tiles ``tile`` = (BM, BN) into ``out`` [batch..., m, n] on the current
    device (see :func:`matmul`, which checks the operands)."""
    *lead, m, n = out.shape
    k = a.shape[-2] if transpose_a else a.shape[-1]
    period = 1 if row_divisor is None else row_divisor.shape[0]
    gemm_launch(m, n, k, math.prod(lead), transpose_a, transpose_b, alpha, tile, period)(
        (a, b, out, _NULL if row_divisor is None else row_divisor))
    return out


def _check_gemm_range(m: int, n: int, k: int, batches: int):
    """ValueError for products gemm_f32.cu cannot index: it indexes inside one batch element with
    int32, tiles rounded up included."""
    _check_index_range("a", (m + 128) * (k + 16), "elements per batch element, padded to whole tiles (m x k)")
    _check_index_range("b", (n + 128) * (k + 16), "elements per batch element, padded to whole tiles (k x n)")
    _check_index_range("a, b", batches, "batches")


def gemm_launch(m: int, n: int, k: int, batches: int, transpose_a: bool, transpose_b: bool, alpha: float,
                tile: tuple, divisor_period: int = 1) -> Launch:
    """The :class:`Launch` of gemm_f32.cu with output tiles ``tile`` = (BM, BN) for ``batches``
    products [m, k] x [k, n]; pointers (a, b, out, row_divisor), the last null for none, else
    ``divisor_period`` int32 entries (see :func:`matmul`)."""
    _check_gemm_range(m, n, k, batches)
    bm, bn = tile
    grid = (-(-n // bn), -(-m // bm), min(batches, _MAX_GRID_Y))
    if grid[1] > _MAX_GRID_Y:
        raise ValueError(f"a: expected at most {_MAX_GRID_Y * bm} rows (m), got {m}")
    flag = lambda t: "true" if t else "false"  # noqa: E731
    tail = (np.int32(m), np.int32(n), np.int32(k), np.int32(batches), np.float32(alpha), np.int32(divisor_period))
    return make_launch("gemm_f32.cu", f"gemm_f32<{flag(transpose_a)}, {flag(transpose_b)}, {bm}, {bn}>", grid,
                       (_GEMM_THREADS,), tail)


def matmul(a, b, transpose_a=False, transpose_b=False, alpha=1.0, row_divisor=None):
    """``alpha * op(a) @ op(b)`` per batch: float32 [batch..., m, n], one launch of gemm_f32.cu.

    ``row_divisor`` (int32 [p] on a's device, p dividing m): row r of every batch's result is
    divided by ``row_divisor[r % p]`` (after the alpha scaling, as a separate rounding).

    a [batch..., m, k] (stored [batch..., k, m] with ``transpose_a``), b [batch..., k, n]
    (stored [batch..., n, k] with ``transpose_b``): C-contiguous float32 with the same batch
    axes.  Exact fp32 products in increasing k order (no TF32); no cuBLAS, so it can be
    captured in a CUDA graph.
    """
    for name, x in (("a", a), ("b", b)):
        if x.dtype != np.float32:
            raise TypeError(f"{name}: expected dtype float32 on CUDA, got {x.dtype}")
        if x.ndim < 2 or not x.flags.c_contiguous:
            raise ValueError(f"{name}: expected a C-contiguous array of 2 or more dimensions, got shape {x.shape}")
    m, k = a.shape[-2:][::-1] if transpose_a else a.shape[-2:]
    k_b, n = b.shape[-2:][::-1] if transpose_b else b.shape[-2:]
    if a.shape[:-2] != b.shape[:-2] or k != k_b:
        raise ValueError(
            f"b: expected batch axes {list(a.shape[:-2])} and k = {k} to match a "
            f"(transpose_a={transpose_a}, transpose_b={transpose_b}), got shape {list(b.shape)}"
        )
    batches = math.prod(a.shape[:-2])
    _check_gemm_range(m, n, k, batches)  # before allocating (gemm_launch checks again)
    with a.device:
        out = _alloc((*a.shape[:-2], m, n), np.float32)
        if out.size:
            _launch_gemm(a, b, out, transpose_a, transpose_b, alpha, _gemm_tile(m, n, batches, _sm_count(a.device.id)),
                         row_divisor)
    return out


class RowTerms(NamedTuple):
    """Per query row, what the fine backward's passes read: float32 [B, H, Sq_pad] each."""

    delta: object     # rowsum(dout * fine) on real rows, 0 on pad rows
    lse_log2: object  # lse * log2(e), every row (NaN past common.cuh's LSE_LIMIT: NaN gradients)


def coarse_grad_inputs(dout, gate, coarse, q_block_sizes, dgate=None, out=None, lse=None):
    """(d_coarse float32 [B, H, N_q, D], dgate in gate's dtype or None, row terms or None), in one
    pass over dout (and gate).

    ``d_coarse[b, h, i]`` sums ``gate * dout`` (``dout`` without a gate) over the real rows of
    query tile i; ``dgate = dout * broadcast(coarse)`` on real rows and 0 on pad rows.  Given the
    forward's ``out`` and ``lse`` (q-shaped and [B, H, Sq_pad] float32), the same pass also
    computes the fine backward's :class:`RowTerms` where it can (fp16/bf16, 16-byte aligned, D
    eight times a power of two up to 256), which :func:`block_sparse_bwd` then does not
    recompute: the same values, bit for bit, as its own ``bwd_delta``.
    """
    import cupy

    element = _element("dout", dout)
    batch, num_heads, padded_len, head_dim = dout.shape
    num_blocks = len(q_block_sizes)
    volume = padded_len // num_blocks
    with dout.device:
        coarse = cupy.ascontiguousarray(coarse, dtype=np.float32)
        d_coarse = _alloc((batch, num_heads, num_blocks, head_dim), np.float32)
        if dgate is None and gate is not None:
            dgate = _alloc(gate.shape, gate.dtype)
        tiles = batch * num_heads * num_blocks
        if tiles == 0 or head_dim == 0:
            return d_coarse, dgate, None
        gated = gate is not None
        arrays = (dout,) + ((gate, dgate) if gated else ())
        width = _vector_width(dout.itemsize, head_dim, arrays)
        rows = (out is not None and lse is not None and _vector_width(out.itemsize, head_dim, (out,)) == width
                and row_terms_fit(element, width, head_dim))
        terms = RowTerms(_alloc(lse.shape, np.float32), _alloc(lse.shape, np.float32)) if rows else None
        launch = coarse_grad_launch(element, width, gated, rows, tiles, num_blocks, volume, head_dim)
        launch((dout, gate if gated else _NULL, coarse, q_block_sizes, d_coarse, dgate if gated else _NULL,
                *((out, lse, terms.delta, terms.lse_log2) if rows else (_NULL,) * 4)))
    return d_coarse, dgate, terms


def row_terms_fit(element: str, width: int, head_dim: int) -> bool:
    """Whether coarse_grad.cu can compute the row terms: 16-byte vectors of fp16/bf16, a tile's lanes 2**n <= 32."""
    cols = head_dim // width
    return element != "float" and width * 2 == _VECTOR_BYTES and cols <= 32 and cols & (cols - 1) == 0


def coarse_grad_launch(element: str, width: int, gated: bool, rows: bool, tiles: int, num_blocks: int, volume: int,
                       head_dim: int) -> Launch:
    """The :class:`Launch` of coarse_grad.cu (see :func:`coarse_grad_inputs`) over ``tiles`` (at
    least one) query tiles; pointers (dout, gate, coarse, q_block_sizes, d_coarse, dgate, out, lse,
    delta, lse_log2), null where not ``gated`` or not computing the ``rows`` terms."""
    flag = lambda b: "true" if b else "false"  # noqa: E731
    return make_launch("coarse_grad.cu", f"coarse_grad<{element}, {width}, {flag(gated)}, {flag(rows)}>",
                       _reduce_grid("dout", tiles, head_dim // width), (_REDUCE_THREADS,),
                       (np.int32(tiles), np.int32(num_blocks), np.int32(volume), np.int32(head_dim)))


def vsa_forward(q, k, v, gate, q_block_sizes, kv_block_sizes, topk: int, scale: float, out=None, keep: bool = True):
    """The whole VSA forward in five prepared launches: see :mod:`vsa_nd.backends.cuda_vsa`."""
    from .cuda_vsa import vsa_forward as launch

    return launch(q, k, v, gate, q_block_sizes, kv_block_sizes, topk, scale, out, keep)


def vsa_backward(dout, context, dq=None, dk=None, dv=None, dgate=None, clean: bool = True) -> tuple:
    """The whole VSA backward in prepared launches: see :mod:`vsa_nd.backends.cuda_vsa`."""
    from .cuda_vsa import vsa_backward as launch

    return launch(dout, context, dq, dk, dv, dgate, clean)


def current_device() -> int:
    """CuPy's (the CUDA runtime's) current device."""
    import cupy

    return cupy.cuda.runtime.getDevice()


def block_sparse_fwd(q, k, v, q2k_idx, q2k_num, kv_block_sizes, scale, coarse, gate, out=None, q_block_sizes=None):
    """Fine attention plus the coarse combine: see the interface in :mod:`vsa_nd.backends`."""
    from .cuda_attention import block_sparse_fwd as launch

    return launch(q, k, v, q2k_idx, q2k_num, kv_block_sizes, scale, coarse, gate, out, q_block_sizes)


def block_sparse_bwd(dout, q, k, v, out, lse, q2k_idx, q2k_num, q_block_sizes, kv_block_sizes,
                     scale, coarse, gate, dq_tile, dk_tile, dv_tile, dq=None, dk=None, dv=None, row_terms=None):
    """Gradients of the fine stage plus the coarse share: see the interface in :mod:`vsa_nd.backends`."""
    from .cuda_attention import block_sparse_bwd as launch

    return launch(dout, q, k, v, out, lse, q2k_idx, q2k_num, q_block_sizes, kv_block_sizes,
                  scale, coarse, gate, dq_tile, dk_tile, dv_tile, dq, dk, dv, row_terms)
