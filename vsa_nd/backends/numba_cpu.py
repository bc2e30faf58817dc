"""Numba CPU backend: the interface of :mod:`vsa_nd.backends` for NumPy arrays.

Kernels are ``@njit(parallel=True, cache=True)`` with fast-math flags that keep NaN and
infinity (``_FASTMATH``), and run in the compute dtype (float32, or float64 for float64
inputs).  float16/bfloat16 arrays are converted to float32 at the boundary and results
converted back; the caller's arrays are only read.

Fine attention, forward (one work item per (b, h, query tile), ``prange`` over all of them)::

    qs   = q_tile * scale * log2(e)             # [V, D]; scores live in log2 units
    for each selected key tile j (q2k_idx order), keys c < kv_block_sizes[j]:
        S  = qs @ K_j^T                         # [V, nk], a dot product of rows per score
        m' = max(m, rowmax S); P = 2^(S - m')   # online softmax
        l  = l * 2^(m - m') + rowsum P;  acc = acc * 2^(m - m') + P @ V_j
    out = acc / l + (gate *) coarse;  lse = (m + log2 l) * ln 2   (pad query rows, given q_block_sizes: 0, -inf)

Both products are dot products along a contiguous axis (so LLVM vectorises them), 4 x 4
results at a time, whose 16 sums stay in registers while each loaded element feeds four of
them: the scores of 4 query rows and 4 keys over D, and P @ V as 4 rows x 4 columns of the
accumulator over the keys, which takes V transposed (a copy per call, zero in pad keys and
padded to a multiple of 16 keys where that adds at most a quarter, over which the sums run
without a scalar remainder).  Per-thread scratch is allocated once per call, indexed by
``numba.get_thread_id()``; it has the rows of a tile rounded up to a multiple of 8, and the
extra rows (zeros, or finite leftovers of an earlier tile) are computed along and never written
back.  Work items differ in cost (number of selected tiles, reverse-list lengths), so the heavy
kernels are scheduled one item at a time.
``exp2`` is a polynomial plus an exponent built from bits (vectorisable, unlike libm's),
and row maxima use ``llvm.maxnum`` (Numba's ``max`` does not vectorise).

Backward (no atomics, deterministic): a preparation pass computes
``delta = rowsum(dout * fine)`` with ``fine = out - (gate *) coarse``, then a dK/dV pass over
(b, kv head, key tile) walks a reverse list of the (query head, query tile) pairs that
selected the key tile, built by a counting sort of ``q2k_idx``, and recomputes P and dS from
the LSE.  It hands each dS block to the dQ pass over (b, h, query tile), which then does one
product per selected tile instead of three, where the blocks fit ``DS_BUDGET_BYTES``; past
that the dQ pass recomputes P and dS itself.  Memory traffic beyond the inputs: inputs in
float16 or bfloat16 converted to float32; the transposed copies (v for the forward; k, q and
dout for the backward); q * scale * log2(e) and dout with pad rows zeroed for the backward's
score products; and the dS blocks (one per selected pair, [V, V] rounded up to 8 rows, and
columns as the transposed copies).

Determinism: results are bit-identical from call to call, and between a process that compiles
the kernels and those that load them from Numba's cache (a test checks both on this project's
Numba and LLVM).  A process that compiles a parallel kernel runs its prange body as built on its
own; the cache holds the copy linked into the kernel, which LLVM compiles again.  Both copies
must round alike.  With nsz among the flags they did not: LLVM's x86 back end re-balanced one
copy's sums (see _FASTMATH), so the kernels' arithmetic leaves nsz out.
"""

from __future__ import annotations

import math
import mmap
import os

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from .._xp import compute_dtype

_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)
# The backward rebuilds P = 2**(s - lse * log2(e)), and the rounding of a float32 lse, about
# |lse| * 2**-24, becomes P's relative error (0.24 in dv at |lse| ~ 6e6; BENCHMARKS.md, "Accuracy
# of the CPU backward as |lse| grows").  Rows whose float32 lse exceeds this in magnitude get NaN
# gradients instead (their dq, and dk and dv of every key tile they selected), as on CUDA
# (cuda_kernels/common.cuh, LSE_LIMIT).  A float64 lse has no such limit here.
_LSE_LIMIT = 2.0**20
# The backward's dS blocks (one per selected (query tile, key tile) pair), handed from the dK/dV
# pass to the dQ pass, are used up to this many bytes; beyond, the dQ pass recomputes them.
DS_BUDGET_BYTES = 512 << 20
_ROWS = 8  # scratch rows are padded to a multiple of this (the products take 4 rows at a time, the coarse GEMM 8)
# _accumulate_t's sums run over a multiple of this many elements where _round_lanes pads: 16
# float32 fill an AVX-512 register, and a length that LLVM's vector loop covers without a
# scalar remainder.
_LANES = 16
# LLVM's fast-math flags without nnan and ninf: the kernels may reassociate, contract and use
# approximate functions, but NaN and infinity in the inputs propagate as in the reference (within
# the selected tiles: the kernels never read the others, whose infinities the reference's dense
# masked product turns into NaN, 0 * inf).  Without nsz too: reassoc alone lets LLVM vectorise the
# sums, while the passes that re-balance chains of additions (the Reassociate pass, x86's
# MachineCombiner) need reassoc and nsz.  With nsz, the copy of a kernel's prange body that
# Numba caches (linked into the kernel and compiled again there) summed the four vector partial
# sums of a row's probabilities as (a + b) + (c + d) where the compiling process, which runs the
# body's own build, summed ((a + b) + c) + d: results differed by up to ~1e-6 of O(1) values
# between the process that compiled the kernels and those that load them (BENCHMARKS.md,
# "kernels compiled against kernels loaded from the cache").
_FASTMATH = {"contract", "reassoc", "arcp", "afn"}
_KERNEL = dict(parallel=True, fastmath=_FASTMATH, cache=True)

# ---------------------------------------------------------------------------------------
# Fork safety.  Where Numba runs its parallel kernels on GNU OpenMP (its "omp" threading layer,
# the one it picks on Linux without TBB), a process forked after those threads started cannot
# run them: libgomp is not fork-safe, Numba terminates such a child with a line on stderr, and a
# multiprocessing pool waiting for the child's result waits for ever.  So a forked child that
# would run them gets this module's error instead (raised before any kernel runs).

_FORK_STATE = {"omp_started": False, "forked_after_omp": False}


def _gnu_omp_started() -> bool:
    """Whether this process has started Numba's GNU OpenMP threads (cheap: run at each fork)."""
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet: no threads to inherit
        return False
    if layer != "omp":
        return False
    from numba.np.ufunc import omppool

    return getattr(omppool, "openmp_vendor", "GNU") == "GNU"  # (Intel's OpenMP is fork-safe)


def _before_fork():
    try:
        _FORK_STATE["omp_started"] = _gnu_omp_started()
    except Exception:  # noqa: BLE001 - never stop a fork over this
        _FORK_STATE["omp_started"] = False


def _after_fork_in_child():
    _FORK_STATE["forked_after_omp"] = _FORK_STATE["forked_after_omp"] or _FORK_STATE["omp_started"]


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def check_not_forked_after_omp():
    """RuntimeError in a process forked after GNU OpenMP threads ran vsa_nd's (or any Numba)
    parallel kernels in its parent: there they would end the process."""
    if _FORK_STATE["forked_after_omp"]:
        raise RuntimeError(
            "vsa_nd: this process was forked (multiprocessing's default start method on Linux) after its parent "
            "ran Numba's parallel kernels on GNU OpenMP, which cannot run in a forked child. Start the workers with "
            "the 'spawn' or 'forkserver' method (multiprocessing.get_context('spawn'); torch's DataLoader takes "
            "multiprocessing_context='spawn'), or set NUMBA_THREADING_LAYER=workqueue (or install tbb) before "
            "Numba is imported")


def takes_concurrent_calls() -> bool:
    """Whether Numba's threading layer, once chosen (at the first parallel kernel), runs parallel
    kernels of several threads at once: OpenMP and TBB do; "workqueue" ends the process instead
    (vsa_nd.ops serialises host calls until this says True)."""
    try:
        return numba.threading_layer() in ("omp", "tbb")
    except ValueError:  # no parallel kernel has run yet: no layer chosen
        return False


# ---------------------------------------------------------------------------------------
# Scalar building blocks that LLVM can vectorise.


@intrinsic
def _fmax(typingctx, a, b):
    """max(a, b) as ``llvm.maxnum``: unlike Numba's ``max``, a reduction over it vectorises."""
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, sig, args):
        lty = context.get_value_type(a)
        fn = builder.module.declare_intrinsic("llvm.maxnum", [lty], ir.FunctionType(lty, [lty, lty]))
        return builder.call(fn, args, fastmath=("nsz",))

    return a(a, b), codegen


@intrinsic
def _pow2_int(typingctx, n):
    """2**n for a float holding an integer in the normal exponent range, built from its bits."""
    if n == types.float32:
        bits, bias, mantissa = 32, 127, 23
    elif n == types.float64:
        bits, bias, mantissa = 64, 1023, 52
    else:
        return None

    def codegen(context, builder, sig, args):
        ity = ir.IntType(bits)
        exponent = builder.add(builder.fptosi(args[0], ity), ir.Constant(ity, bias))
        return builder.bitcast(builder.shl(exponent, ir.Constant(ity, mantissa)), context.get_value_type(n))

    return n(n), codegen


def _exp2(x):
    """2**x for x <= 0: 0 below the smallest normal exponent (-126 in float32, as on CUDA, where
    exp2 flushes subnormals; -1022 in float64), so exp2(-inf) = 0; NaN for NaN; 1 above 0.

    Every caller's argument is a probability's exponent, at most 0 but for rounding.  In the
    backward that rounding grows with |lse| (lse is fp32, as the spec fixes it; rows past
    _LSE_LIMIT get NaN), so an exponent may come out a little above 0: it saturates rather than
    let the polynomial below leave its range."""
    raise NotImplementedError  # only called from Numba kernels, see the overload below


@overload(_exp2, jit_options={"fastmath": _FASTMATH})
def _exp2_impl(x):
    if not isinstance(x, types.Float):
        return None
    # 2**x = 2**n * exp(f ln 2) with n = round(x), |f| <= 1/2; the Taylor series of exp(f ln 2)
    # to degree 6 is accurate to 1.2e-7 (float32), to degree 13 to 4e-18 (float64).
    ftype = np.float32 if x.bitwidth == 32 else np.float64
    degree = 6 if x.bitwidth == 32 else 13
    c = [ftype(_LN2**n / math.factorial(n)) for n in range(degree + 1)]
    low, half, zero = ftype(-126.0 if x.bitwidth == 32 else -1022.0), ftype(0.5), ftype(0.0)
    if degree == 6:
        c0, c1, c2, c3, c4, c5, c6 = c

        def exp2_f32(x):
            under = x < low  # False for NaN, which stays NaN
            x = low if under else (zero if x > zero else x)
            n = np.floor(x + half)
            n = n if n == n else zero  # NaN: _pow2_int's float-to-int conversion of it is undefined (f keeps the NaN)
            f = x - n
            p = (c0 + f * (c1 + f * (c2 + f * (c3 + f * (c4 + f * (c5 + f * c6)))))) * _pow2_int(n)
            return zero if under else p

        return exp2_f32
    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13 = c

    def exp2_f64(x):
        under = x < low
        x = low if under else (zero if x > zero else x)
        n = np.floor(x + half)
        n = n if n == n else zero  # as in exp2_f32
        f = x - n
        p = c7 + f * (c8 + f * (c9 + f * (c10 + f * (c11 + f * (c12 + f * c13)))))
        p = c0 + f * (c1 + f * (c2 + f * (c3 + f * (c4 + f * (c5 + f * (c6 + f * p))))))
        return zero if under else p * _pow2_int(n)

    return exp2_f64


# ---------------------------------------------------------------------------------------
# Tile products.  ``rows`` is a multiple of _ROWS and at most the scratch's row count.


@njit(fastmath=_FASTMATH, inline="always")
def _dots_4x4(a0, a1, a2, a3, b0, b1, b2, b3, n):
    """The 16 dot products a_i[:n] . b_j[:n], as a tuple in the order (a0 b0, a0 b1, ..., a3 b3):
    one loop along the rows (which LLVM vectorises), its 16 sums in registers, each loaded
    element feeding four of them.  The inner block of _row_dots."""
    zero = a0.dtype.type(0.0)
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = zero
    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = zero
    for d in range(n):
        x0, x1, x2, x3 = a0[d], a1[d], a2[d], a3[d]
        y0, y1, y2, y3 = b0[d], b1[d], b2[d], b3[d]
        s00 += x0 * y0
        s01 += x0 * y1
        s02 += x0 * y2
        s03 += x0 * y3
        s10 += x1 * y0
        s11 += x1 * y1
        s12 += x1 * y2
        s13 += x1 * y3
        s20 += x2 * y0
        s21 += x2 * y1
        s22 += x2 * y2
        s23 += x2 * y3
        s30 += x3 * y0
        s31 += x3 * y1
        s32 += x3 * y2
        s33 += x3 * y3
    return (s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)


@njit(fastmath=_FASTMATH, cache=True)
def _row_dots(out, a, b, rows, cols, n, add):
    """out[r, c] = a[r, :n] . b[c, :n], plus out[r, c] with ``add``, for r < rows, c < cols.

    a [>= rows, >= n], b [>= cols, >= n], out [>= rows, >= cols]: 4 rows x 4 columns of out at a
    time (_dots_4x4).  A last block of fewer than four columns repeats column cols - 1, so every
    result is summed in the same order wherever it lies; its new values are all formed before
    any is stored, so the repeated column gets the same value more than once.  The tile
    products _scores and _accumulate_t."""
    last = cols - 1
    for r in range(0, rows, 4):
        a0, a1, a2, a3 = a[r], a[r + 1], a[r + 2], a[r + 3]
        o0, o1, o2, o3 = out[r], out[r + 1], out[r + 2], out[r + 3]
        for c0 in range(0, cols, 4):
            c1, c2, c3 = min(c0 + 1, last), min(c0 + 2, last), min(c0 + 3, last)
            s = _dots_4x4(a0, a1, a2, a3, b[c0], b[c1], b[c2], b[c3], n)
            if add:
                s = (o0[c0] + s[0], o0[c1] + s[1], o0[c2] + s[2], o0[c3] + s[3],
                     o1[c0] + s[4], o1[c1] + s[5], o1[c2] + s[6], o1[c3] + s[7],
                     o2[c0] + s[8], o2[c1] + s[9], o2[c2] + s[10], o2[c3] + s[11],
                     o3[c0] + s[12], o3[c1] + s[13], o3[c2] + s[14], o3[c3] + s[15])
            o0[c0], o0[c1], o0[c2], o0[c3] = s[0], s[1], s[2], s[3]
            o1[c0], o1[c1], o1[c2], o1[c3] = s[4], s[5], s[6], s[7]
            o2[c0], o2[c1], o2[c2], o2[c3] = s[8], s[9], s[10], s[11]
            o3[c0], o3[c1], o3[c2], o3[c3] = s[12], s[13], s[14], s[15]


@njit(fastmath=_FASTMATH, cache=True)
def _scores(out, a, b, rows, cols):
    """out[r, c] = sum_d a[r, d] * b[c, d] for r < rows, c < cols.

    a [>= rows, D], b [>= cols, D], out [>= rows, >= cols].  Each score is a dot product along
    the contiguous axis, sixteen (4 rows x 4 columns) at a time: their sums stay in registers
    and each loaded element of a and b feeds four of them.  Every score is summed in the same
    order wherever it lies (_row_dots), so the dK/dV pass's S^T and the dQ pass's S agree bit
    for bit.
    """
    _row_dots(out, a, b, rows, cols, a.shape[1], False)


@njit(fastmath=_FASTMATH, cache=True)
def _accumulate(acc, p, b, rows, inner):
    """acc[r, :] += sum_c p[r, c] * b[c, :] for r < rows, c < inner.

    acc [>= rows, D], p [>= rows, >= inner], b [>= inner, D]; eight rows share each b row.
    """
    width = acc.shape[1]
    for r in range(0, rows, 8):
        a0, a1, a2, a3 = acc[r], acc[r + 1], acc[r + 2], acc[r + 3]
        a4, a5, a6, a7 = acc[r + 4], acc[r + 5], acc[r + 6], acc[r + 7]
        for c in range(inner):
            p0, p1, p2, p3 = p[r, c], p[r + 1, c], p[r + 2, c], p[r + 3, c]
            p4, p5, p6, p7 = p[r + 4, c], p[r + 5, c], p[r + 6, c], p[r + 7, c]
            b_row = b[c]
            for d in range(width):
                y = b_row[d]
                a0[d] += p0 * y
                a1[d] += p1 * y
                a2[d] += p2 * y
                a3[d] += p3 * y
                a4[d] += p4 * y
                a5[d] += p5 * y
                a6[d] += p6 * y
                a7[d] += p7 * y


@njit(fastmath=_FASTMATH, cache=True)
def _accumulate_t(acc, p, bt, rows, inner):
    """acc[r, d] += sum_c p[r, c] * bt[d, c] for r < rows, c < inner: _accumulate with b
    transposed.

    acc [>= rows, D], p [>= rows, >= _round_lanes(inner)], bt [D, >= _round_lanes(inner)]
    with zeros in columns inner.. of that (see _transposed).  Dot products along the contiguous
    axis as in _scores, 4 rows x 4 columns of acc at a time, their sums in registers (what
    _accumulate's rows in memory cost, a load and a store per multiply-add, is gone).  The sums
    run to _round_lanes(inner), a whole number of vector lanes where it pads, over zeros that
    this function first writes into p's columns past ``inner``: a partial vector would be
    summed one element at a time.
    """
    padded = _round_lanes(inner)
    for r in range(rows):
        p[r, inner:padded] = 0.0
    _row_dots(acc, p, bt, rows, acc.shape[1], padded, True)


@njit(cache=True)
def _round_rows(n):
    """n rounded up to a whole number of row blocks."""
    return (n + _ROWS - 1) // _ROWS * _ROWS


@njit(cache=True)
def _round_lanes(n):
    """n rounded up to a whole number of vector lanes (_LANES) where that adds at most a quarter
    (27 -> 32, 64 -> 64, 65 -> 80), else n (17 -> 17, 8 -> 8): _accumulate_t's sums then keep a
    scalar remainder rather than the transposed copies and dS blocks growing up to 16-fold
    (1 -> 16).  Never decreasing, so an inner count never pads past its tile volume's width."""
    padded = (n + _LANES - 1) // _LANES * _LANES
    return padded if 4 * padded <= 5 * n else n


# ---------------------------------------------------------------------------------------
# Layout kernels.


@njit(**_KERNEL)
def _tile_kernel(x, slot_token_index, out):
    batch, _, heads, _ = x.shape
    padded = out.shape[2]
    for row in prange(batch * padded):
        b, s = row // padded, row % padded
        token = slot_token_index[s]
        for h in range(heads):
            dst = out[b, h, s]
            if token < 0:
                dst[:] = 0
            else:
                dst[:] = x[b, token, h]


@njit(**_KERNEL)
def _untile_kernel(y, untile_index, out):
    batch, seq, heads, _ = out.shape
    for row in prange(batch * seq):
        b, t = row // seq, row % seq
        slot = untile_index[t]
        for h in range(heads):
            out[b, t, h] = y[b, h, slot]


def _bits(x):
    """A same-size unsigned-integer view: tile/untile only move elements, whatever their dtype."""
    return x.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def tile(x, slot_token_index, out):
    """x [B, S, H, D] -> out [B, H, S_pad, D]; pad slots (index -1) zero.  Returns out."""
    _tile_kernel(_bits(x), slot_token_index, _bits(out))
    return out


def untile(y, untile_index, out):
    """y [B, H, S_pad, D] -> out [B, S, H, D].  Returns out."""
    _untile_kernel(_bits(y), untile_index, _bits(out))
    return out


# ---------------------------------------------------------------------------------------
# Coarse stage helpers.


def _compute(x):
    """x in its compute dtype (no copy for float32/float64)."""
    return x.astype(compute_dtype(x.dtype), copy=False)


def _index(x):
    """A private, writable int32 copy: Numba compiles read-only arrays separately."""
    return np.array(x, dtype=np.int32)


@njit(**_KERNEL)
def _block_mean_kernel(x, block_sizes, out):
    batch, heads, tiles, _, dim = x.shape
    for item in prange(batch * heads * tiles):
        b, h, i = item // (heads * tiles), (item // tiles) % heads, item % tiles
        dst, src = out[b, h, i], x[b, h, i]
        dst[:] = 0.0
        for r in range(block_sizes[i]):
            for d in range(dim):
                dst[d] += src[r, d]
        inv = 1 / x.dtype.type(block_sizes[i])
        for d in range(dim):
            dst[d] *= inv


def block_mean(x, block_sizes):
    """x [B, H, N*V, D] -> [B, H, N, D] in the compute dtype: mean of the real tokens per tile."""
    x = _compute(x)
    b, h, s, d = x.shape
    n = block_sizes.shape[0]
    out = np.empty((b, h, n, d), x.dtype)
    tiles = x.reshape(b, h, n, s // n, d)
    _block_mean_kernel(tiles, _index(block_sizes), out)
    overflow = ~np.isfinite(out)
    if overflow.any():
        _rescue_block_means(tiles, block_sizes, out, overflow)
    return out


def _rescue_block_means(tiles, block_sizes, out, overflow):
    """Means whose sums passed the dtype's range (float32 inputs of ~5e36 and more, whose means
    still fit; or NaN, from such a sum beside an infinite input), summed again with every element
    scaled by 2^-k <= 1 / n first, which cannot overflow (as block_mean.cu does); an infinite or
    NaN input gives inf or NaN again (at the cost of copies of its tiles).  In NumPy, outside the
    kernel: written into the kernel, the branch was lost when Numba (0.68, with these fast-math
    flags) loaded the kernel from its cache, while a fresh build kept it."""
    which = np.nonzero(overflow.any(axis=-1))  # (b, h, i) of the tiles concerned
    sizes = np.asarray(block_sizes, np.int64)[which[2]]
    down = 0.5 ** np.maximum(1, np.ceil(np.log2(np.maximum(sizes, 1))))
    real = np.arange(tiles.shape[3]) < sizes[:, None]
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = tiles[which] * down.astype(tiles.dtype)[:, None, None]
        means = np.where(real[..., None], scaled, 0).sum(axis=1) / (sizes * down).astype(tiles.dtype)[:, None]
    out[which] = np.where(overflow[which], means, out[which])


def block_means(tensors, block_sizes_list) -> list:
    """:func:`block_mean` of several tensors (the CUDA backend does them in one launch)."""
    return [block_mean(x, sizes) for x, sizes in zip(tensors, block_sizes_list)]


def softmax_rows_(x):
    """Row softmax of x [..., n] in place (compute dtype); returns x."""
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def softmax_grad_rows_(d_probs, probs, d_out, out):
    """Softmax backward in place: d_probs [..., n] becomes ``probs * (d_probs - rowsum(d_out *
    out))``, where out = probs @ v [..., d] and d_out its gradient; returns d_probs."""
    d_probs -= (d_out * out).sum(axis=-1, keepdims=True)
    d_probs *= probs
    return d_probs


@njit(**_KERNEL)
def _matmul_kernel(a, b, alpha, row_divisor, out):
    """out[i, r] = alpha * (a[i, r] @ b[i]) / row_divisor[r % p] for a [batch, m8, k] (m8 a
    multiple of _ROWS), b [batch, k, n], out [batch, m8, n]; one work item per block of rows."""
    batch, rows, depth = a.shape
    blocks, period = rows // _ROWS, row_divisor.shape[0]
    for item in prange(batch * blocks):
        i, r0 = item // blocks, item % blocks * _ROWS
        acc = out[i, r0 : r0 + _ROWS]
        acc[:] = 0.0
        _accumulate(acc, a[i, r0 : r0 + _ROWS], b[i], _ROWS, depth)
        for r in range(_ROWS):
            divisor = acc.dtype.type(row_divisor[(r0 + r) % period])
            for c in range(acc.shape[1]):
                acc[r, c] = acc[r, c] * alpha / divisor


def matmul(a, b, transpose_a=False, transpose_b=False, alpha=1.0, row_divisor=None):
    """``alpha * op(a) @ op(b)`` per batch in the inputs' (compute) dtype, by a Numba kernel.

    a [batch..., m, k] (stored [batch..., k, m] with ``transpose_a``), b [batch..., k, n]
    (stored [batch..., n, k] with ``transpose_b``) -> C-contiguous [batch..., m, n]; with
    ``row_divisor`` (integers [p], p dividing m) row r is then divided by ``row_divisor[r % p]``.
    Each element is one sum over k in increasing order, then scaled.  Not NumPy's ``@``: its
    BLAS threads keep spinning after a call and slowed the fine stage that follows (the full
    CPU forward took ~1.6x the fine stage alone; BENCHMARKS.md).
    """
    op_a = np.swapaxes(a, -1, -2) if transpose_a else a
    op_b = np.swapaxes(b, -1, -2) if transpose_b else b
    *batch, m, depth = op_a.shape
    n = op_b.shape[-1]
    if tuple(op_b.shape[:-2]) != tuple(batch) or op_b.shape[-2] != depth:
        raise ValueError(f"matmul: operands {op_a.shape} and {op_b.shape} do not multiply batch by batch")
    count = math.prod(batch)
    rows = _round_rows(m)
    a_rows = np.zeros((count, rows, depth), op_a.dtype)  # rows past m stay zero
    a_rows[:, :m] = op_a.reshape(count, m, depth)
    out = np.empty((count, rows, n), op_a.dtype)
    divisor = np.ones(1, np.int32) if row_divisor is None else _index(row_divisor)
    _matmul_kernel(a_rows, np.ascontiguousarray(op_b, dtype=op_a.dtype).reshape(count, depth, n),
                   op_a.dtype.type(alpha), divisor, out)
    return np.ascontiguousarray(out[:, :m]).reshape(*batch, m, n)


@njit(parallel=True, cache=True)  # no fastmath: NaN tests must hold
def _select_topk_kernel(scores, bits, sign, topk, q2k_idx, q2k_num, scratch):
    """Top-k on order-preserving unsigned keys, as topk.cu: NaN below every number (key 0),
    -0.0 equal to +0.0, ties to the lower index; every row gets exactly ``topk`` entries."""
    rows, n = scores.shape
    for row in prange(rows):
        keys, row_keys = scratch[numba.get_thread_id(), 0], scratch[numba.get_thread_id(), 1]
        src, src_bits = scores[row], bits[row]
        for c in range(n):
            x = src[c]
            if x != x:
                keys[c] = 0
            elif x == 0:
                keys[c] = sign
            elif src_bits[c] & sign:
                keys[c] = ~src_bits[c]
            else:
                keys[c] = src_bits[c] | sign
        row_keys[:] = keys
        keys.sort()
        threshold = keys[n - topk]
        # Everything above the threshold is in; ties at it go to the lowest indices.
        ties = topk
        for c in range(n):
            if row_keys[c] > threshold:
                ties -= 1
        count = 0
        for c in range(n):
            key = row_keys[c]
            if key > threshold or (key == threshold and ties > 0):
                if key == threshold:
                    ties -= 1
                q2k_idx[row, count] = c
                count += 1
        q2k_num[row] = topk


def select_topk(scores, topk):
    """scores [B, H, N_q, N_kv] -> (q2k_idx [B, H, N_q, topk] int32 increasing, q2k_num [B, H, N_q])."""
    b, h, n_q, n_kv = scores.shape
    q2k_idx = np.empty((b, h, n_q, topk), np.int32)
    q2k_num = np.empty((b, h, n_q), np.int32)
    scores = np.ascontiguousarray(scores.reshape(-1, n_kv))
    unsigned = np.uint32 if scores.dtype.itemsize == 4 else np.uint64
    scratch = np.empty((numba.config.NUMBA_NUM_THREADS, 2, n_kv), unsigned)  # keys to sort, keys in order
    sign = unsigned(1 << (8 * scores.dtype.itemsize - 1))
    _select_topk_kernel(scores, scores.view(unsigned), sign, topk, q2k_idx.reshape(-1, topk), q2k_num.reshape(-1),
                        scratch)
    return q2k_idx, q2k_num


def select_topk_softmax_(scores, topk):
    """(q2k_idx, q2k_num, probs): :func:`select_topk` of ``scores``, then ``scores`` turned into its
    row softmax in place (``probs`` is ``scores``)."""
    q2k_idx, q2k_num = select_topk(scores, topk)
    return q2k_idx, q2k_num, softmax_rows_(scores)


@njit(**_KERNEL)
def _coarse_grad_kernel(dout, gate, has_gate, coarse, q_block_sizes, d_coarse, dgate):
    batch, heads, tiles, volume, dim = dout.shape
    for item in prange(batch * heads * tiles):
        b, h, i = item // (heads * tiles), (item // tiles) % heads, item % tiles
        acc, c_row = d_coarse[b, h, i], coarse[b, h, i]
        acc[:] = 0.0
        real = q_block_sizes[i]
        for r in range(real):
            src = dout[b, h, i, r]
            if has_gate:
                g, dg = gate[b, h, i, r], dgate[b, h, i, r]
                for d in range(dim):
                    acc[d] += g[d] * src[d]
                    dg[d] = src[d] * c_row[d]
            else:
                for d in range(dim):
                    acc[d] += src[d]
        if has_gate:
            dgate[b, h, i, real:] = 0.0


def coarse_grad_inputs(dout, gate, coarse, q_block_sizes, dgate=None, out=None, lse=None):
    """(d_coarse [B, H, N_q, D] compute dtype, dgate q-shaped in gate's dtype or None; into ``dgate`` if given,
    None: :func:`block_sparse_bwd` computes its row terms itself; ``out`` and ``lse`` are not used)."""
    result = dgate
    dout_c = _compute(dout)
    b, h, s, d = dout.shape
    n = q_block_sizes.shape[0]
    tiled = (b, h, n, s // n, d)
    d_coarse = np.empty((b, h, n, d), dout_c.dtype)
    has_gate = gate is not None
    gate_c = _compute(gate).reshape(tiled) if has_gate else np.empty((0,) * 5, dout_c.dtype)
    dgate = np.empty(tiled if has_gate else (0,) * 5, dout_c.dtype)
    coarse = np.ascontiguousarray(coarse, dtype=dout_c.dtype)
    _coarse_grad_kernel(dout_c.reshape(tiled), gate_c, has_gate, coarse, _index(q_block_sizes), d_coarse, dgate)
    if not has_gate:
        return d_coarse, None, None
    return d_coarse, _into(result, dgate.reshape(dout.shape).astype(gate.dtype, copy=False)), None


# ---------------------------------------------------------------------------------------
# Fine attention, forward.


def _into(buffer, result):
    """``result``, copied into ``buffer`` when the caller gave one (the kernels compute in the
    compute dtype, so a result in another dtype is a conversion anyway)."""
    if buffer is None:
        return result
    np.copyto(buffer, result)
    return buffer


def _key_rows(x, num_tiles: int):
    """[B, H, N*V, D] -> [B, H, N, V, D] in the compute dtype (a view for float32/float64)."""
    b, h, s, d = x.shape
    return _compute(x).reshape(b, h, num_tiles, s // num_tiles, d)


def _transposed(tiles, block_sizes):
    """[B, H, N, V, D] -> contiguous [B, H, N, D, _round_lanes(V)]: each tile's columns become
    rows, zero past the tile's block size (the operand bt of _accumulate_t: its pad slots may
    hold NaN, and 0 * NaN is NaN)."""
    b, h, n, v, d = tiles.shape
    out = np.zeros((b, h, n, d, _round_lanes(v)), tiles.dtype)
    real = np.arange(v) < np.asarray(block_sizes)[:, None]  # [N, V]
    np.copyto(out[..., :v], tiles.transpose(0, 1, 2, 4, 3), where=real[:, None, :])  # no temporary
    return out


def _touched(shape, dtype):
    """np.empty(shape, dtype) with each of its memory pages written once, on this thread.  The
    dK/dV pass stores dS blocks all over its workspace from every thread at once, and first
    writes to fresh pages from several threads at once are slow on some machines: on a 2-core
    VM, touching 34 MB of pages from two threads took 35 ms against 1.6 ms from one, and the
    pass (2 heads, D = 64, 4096 tokens) 26-45 ms against 23-28 ms with its blocks touched here."""
    out = np.empty(shape, dtype)
    out.reshape(-1)[:: max(1, mmap.PAGESIZE // out.itemsize)] = 0
    return out


def _scratch(*shape_and_dtype):
    """Per-thread scratch: one [shape] array per Numba thread."""
    *shape, dtype = shape_and_dtype
    return np.zeros((numba.config.NUMBA_NUM_THREADS, *shape), dtype)


@njit(**_KERNEL)
def _fwd_kernel(q, k, vt, q2k_idx, q2k_num, kv_block_sizes, q_block_sizes, scale, coarse, gate, has_gate, out, lse,
                qs_buf, s_buf, acc_buf, m_buf, l_buf):
    batch, heads, tiles, volume, dim = q.shape
    group = heads // k.shape[1]
    rows = qs_buf.shape[1]
    dtype = q.dtype.type
    qscale, ln2, zero, nan = dtype(scale * _LOG2E), dtype(_LN2), dtype(0.0), dtype(np.nan)
    for item in prange(batch * heads * tiles):
        b, h, i = item // (heads * tiles), (item // tiles) % heads, item % tiles
        hk = h // group
        tid = numba.get_thread_id()
        qs, s, acc, m, l = qs_buf[tid], s_buf[tid], acc_buf[tid], m_buf[tid], l_buf[tid]
        q_tile = q[b, h, i]
        for r in range(volume):
            for d in range(dim):
                qs[r, d] = q_tile[r, d] * qscale
        acc[:] = 0.0
        m[:] = -np.inf  # running max (log2 domain) before any key
        l[:] = 0.0
        for t in range(q2k_num[b, h, i]):
            j = q2k_idx[b, h, i, t]
            keys = kv_block_sizes[j]
            _scores(s, qs, k[b, hk, j], rows, keys)
            for r in range(rows):
                sr, ar = s[r], acc[r]
                row_max = m[r]
                for c in range(keys):
                    row_max = _fmax(row_max, sr[c])
                # Every score so far -inf (an overflow) or NaN: shift by 0, so that they give 0 or NaN.
                shift = row_max if row_max != -np.inf else zero
                total = zero
                for c in range(keys):
                    p = _exp2(sr[c] - shift)
                    sr[c] = p
                    total += p
                alpha = _exp2(m[r] - shift)  # 0 on the row's first scores
                m[r] = row_max
                l[r] = l[r] * alpha + total
                for d in range(dim):
                    ar[d] *= alpha
            _accumulate_t(acc, s, vt[b, hk, j], rows, keys)
        dst = out[b, h, i]
        c_row = coarse[b, h, i]
        real = q_block_sizes[i]
        for r in range(volume):
            ar, dr = acc[r], dst[r]
            if r >= real:  # a pad row: 0 and -inf, whatever q and gate hold there
                lse[b, h, i, r] = -np.inf
                dr[:] = 0.0
                continue
            if l[r] != 0:  # (NaN too: it propagates to out and lse, as in the reference)
                inv = 1 / l[r]
                lse[b, h, i, r] = (m[r] + np.log2(l[r])) * ln2
            elif q2k_num[b, h, i] == 0:  # no key selected: fine output 0
                inv = zero
                lse[b, h, i, r] = -np.inf
            else:  # every score -inf (an input's -inf, or past float range): 0 / 0, as in the reference
                inv = nan
                lse[b, h, i, r] = nan
            if has_gate:
                g = gate[b, h, i, r]
                for d in range(dim):
                    dr[d] = ar[d] * inv + g[d] * c_row[d]
            else:
                for d in range(dim):
                    dr[d] = ar[d] * inv + c_row[d]


def block_sparse_fwd(q, k, v, q2k_idx, q2k_num, kv_block_sizes, scale, coarse, gate, out=None, q_block_sizes=None):
    """(out [B, H, Sq_pad, D] in q's dtype, lse [B, H, Sq_pad] compute dtype; into ``out`` if
    given); see the package doc."""
    result = out
    b, h, s_q, d = q.shape
    n_q, n_kv = q2k_idx.shape[2], kv_block_sizes.shape[0]
    volume = s_q // n_q
    tiled = (b, h, n_q, volume, d)
    q_c = _compute(q).reshape(tiled)
    dtype = q_c.dtype
    coarse = np.zeros((b, h, n_q, d), dtype) if coarse is None else np.ascontiguousarray(coarse, dtype=dtype)
    has_gate = gate is not None
    gate_c = _compute(gate).reshape(tiled) if has_gate else np.empty((0,) * 5, dtype)
    out = np.empty(tiled, dtype)
    lse = np.empty((b, h, n_q, volume), dtype)
    rows = _round_rows(volume)
    width = _round_lanes(volume)  # columns of the scratch that _accumulate_t reads as p
    # Real rows per query tile: all of them without q_block_sizes (block_sparse_attn knows no pads).
    real_rows = np.full(n_q, volume, np.int32) if q_block_sizes is None else _index(q_block_sizes)
    with numba.parallel_chunksize(1):
        _fwd_kernel(
            q_c, _key_rows(k, n_kv), _transposed(_key_rows(v, n_kv), kv_block_sizes), _index(q2k_idx), _index(q2k_num),
            _index(kv_block_sizes), real_rows, float(scale), coarse, gate_c, has_gate, out, lse,
            _scratch(rows, d, dtype), _scratch(rows, width, dtype), _scratch(rows, d, dtype),
            _scratch(rows, dtype), _scratch(rows, dtype),
        )
    return _into(result, out.reshape(q.shape).astype(q.dtype, copy=False)), lse.reshape(b, h, s_q)


# ---------------------------------------------------------------------------------------
# Fine attention, backward.


@njit(**_KERNEL)
def _bwd_prep_kernel(q, dout, out, lse, lse_limit, coarse, gate, has_gate, q_block_sizes, scale,
                     qs, dout_rows, delta, lse2):
    """Per query tile: q * scale * log2(e), dout with pad rows zeroed, delta = rowsum(dout *
    fine) and lse in log2 units (0 on pad rows; NaN where |lse| exceeds ``lse_limit``, -inf
    excepted: see _LSE_LIMIT)."""
    batch, heads, tiles, volume, dim = q.shape
    dtype = q.dtype.type
    qscale, log2e, zero = dtype(scale * _LOG2E), dtype(_LOG2E), dtype(0.0)
    for item in prange(batch * heads * tiles):
        b, h, i = item // (heads * tiles), (item // tiles) % heads, item % tiles
        real = q_block_sizes[i]
        c_row = coarse[b, h, i]
        dst = dout_rows[b, h, i]
        dst[:] = 0.0
        for r in range(volume):
            q_row, qs_row = q[b, h, i, r], qs[b, h, i, r]
            for d in range(dim):
                qs_row[d] = q_row[d] * qscale
        for r in range(real):
            src, o_row = dout[b, h, i, r], out[b, h, i, r]
            total = zero
            if has_gate:
                g = gate[b, h, i, r]
                for d in range(dim):
                    total += src[d] * (o_row[d] - g[d] * c_row[d])
            else:
                for d in range(dim):
                    total += src[d] * (o_row[d] - c_row[d])
            delta[b, h, i, r] = total
            row_lse = lse[b, h, i, r]
            if abs(row_lse) > lse_limit and row_lse != -np.inf:
                row_lse = np.nan
            lse2[b, h, i, r] = row_lse * log2e
            for d in range(dim):
                dst[r, d] = src[d]
        for r in range(real, volume):
            delta[b, h, i, r] = 0.0
            lse2[b, h, i, r] = 0.0


@njit(**_KERNEL)
def _dq_kernel(q, k, v, kt, q2k_idx, q2k_num, q_block_sizes, kv_block_sizes, scale,
               dout_rows, delta, lse2, dq_tile, dq, qs_buf, s_buf, dp_buf, acc_buf):
    batch, heads, tiles, volume, dim = q.shape
    group = heads // k.shape[1]
    dtype = q.dtype.type
    qscale, kscale = dtype(scale * _LOG2E), dtype(scale)
    for item in prange(batch * heads * tiles):
        b, h, i = item // (heads * tiles), (item // tiles) % heads, item % tiles
        hk = h // group
        tid = numba.get_thread_id()
        qs, s, dp, acc = qs_buf[tid], s_buf[tid], dp_buf[tid], acc_buf[tid]
        real = q_block_sizes[i]
        rows = _round_rows(real)
        q_tile, lse_row, delta_row = q[b, h, i], lse2[b, h, i], delta[b, h, i]
        for r in range(real):
            for d in range(dim):
                qs[r, d] = q_tile[r, d] * qscale
        acc[:] = 0.0
        for t in range(q2k_num[b, h, i]):
            j = q2k_idx[b, h, i, t]
            keys = kv_block_sizes[j]
            _scores(s, qs, k[b, hk, j], rows, keys)
            _scores(dp, dout_rows[b, h, i], v[b, hk, j], rows, keys)
            for r in range(real):  # s becomes dS = P * (dP - delta)
                sr, dpr, lse_r, delta_r = s[r], dp[r], lse_row[r], delta_row[r]
                for c in range(keys):
                    sr[c] = _exp2(sr[c] - lse_r) * (dpr[c] - delta_r)
            s[real:rows, :keys] = 0.0
            _accumulate_t(acc, s, kt[b, hk, j], rows, keys)
        _write_dq(dq[b, h, i], acc, dq_tile[b, h, i], real, kscale)


@njit(**_KERNEL)
def _dq_from_ds_kernel(kt, q2k_idx, q2k_num, q_block_sizes, kv_block_sizes, scale, ds_blocks, dq_tile, dq, acc_buf):
    """dq = scale * sum over the selected tiles of dS K + dq_tile, from the dK/dV pass's dS blocks."""
    batch, heads, tiles = dq.shape[:3]
    group = heads // kt.shape[1]
    kscale = dq.dtype.type(scale)
    for item in prange(batch * heads * tiles):
        b, h, i = item // (heads * tiles), (item // tiles) % heads, item % tiles
        hk = h // group
        acc = acc_buf[numba.get_thread_id()]
        real = q_block_sizes[i]
        acc[:] = 0.0
        for t in range(q2k_num[b, h, i]):
            j = q2k_idx[b, h, i, t]
            _accumulate_t(acc, ds_blocks[b, h, i, t], kt[b, hk, j], _round_rows(real), kv_block_sizes[j])
        _write_dq(dq[b, h, i], acc, dq_tile[b, h, i], real, kscale)


@njit(inline="always", fastmath=_FASTMATH)
def _write_dq(dst, acc, tile_grad, real, kscale):
    """A query tile's dq rows: acc * scale + tile_grad on its real rows, 0 on the others."""
    for r in range(real):
        for d in range(dst.shape[1]):
            dst[r, d] = acc[r, d] * kscale + tile_grad[d]
    dst[real:] = 0.0


@njit(**_KERNEL)
def _dkdv_kernel(q_t, k, v, q_block_sizes, kv_block_sizes, scale, qs, dout_rows, dout_t, delta, lse2,
                 offsets, entries, slots, ds_blocks, dk_tile, dv_tile, dk, dv,
                 k_buf, v_buf, p_buf, ds_buf, dk_buf, dv_buf):
    """dk, dv of every key tile; with ``ds_blocks`` of B*H*N_q*topk blocks (else an empty array),
    also each pair's dS block, at ds_blocks[b, h, i, t] for key tile q2k_idx[b, h, i, t] (t from
    ``slots``), real rows and keys of it, with zeros in the rows up to the next multiple of 8
    (the dQ pass's _accumulate_t writes zeros in its columns past the keys)."""
    batch, kv_heads, tiles, volume, dim = k.shape
    hand_over = ds_blocks.size > 0
    q_tiles = q_t.shape[2]
    kscale = q_t.dtype.type(scale)
    for item in prange(batch * kv_heads * tiles):
        b, hk, j = item // (kv_heads * tiles), (item // tiles) % kv_heads, item % tiles
        tid = numba.get_thread_id()
        kj, vj, p, ds, dk_acc, dv_acc = k_buf[tid], v_buf[tid], p_buf[tid], ds_buf[tid], dk_buf[tid], dv_buf[tid]
        keys = kv_block_sizes[j]
        rows = _round_rows(keys)
        kj[:keys] = k[b, hk, j, :keys]
        vj[:keys] = v[b, hk, j, :keys]
        dk_acc[:] = 0.0
        dv_acc[:] = 0.0
        for e in range(offsets[item], offsets[item + 1]):
            h, i = entries[e] // q_tiles, entries[e] % q_tiles
            real = q_block_sizes[i]
            # Transposed tiles: row c is key c, column r is query row r.
            _scores(p, kj, qs[b, h, i], rows, real)
            _scores(ds, vj, dout_rows[b, h, i], rows, real)
            lse_row, delta_row = lse2[b, h, i], delta[b, h, i]
            for c in range(keys):
                pc, dsc = p[c], ds[c]
                for r in range(real):
                    x = _exp2(pc[r] - lse_row[r])
                    pc[r] = x
                    dsc[r] = x * (dsc[r] - delta_row[r])
            p[keys:rows, :real] = 0.0
            ds[keys:rows, :real] = 0.0
            if hand_over:  # dS (query rows x keys) for the dQ pass
                block = ds_blocks[b, h, i, slots[e]]
                for r in range(real):
                    for c in range(keys):
                        block[r, c] = ds[c, r]
                block[real:_round_rows(real), :keys] = 0.0
            _accumulate_t(dv_acc, p, dout_t[b, h, i], rows, real)
            _accumulate_t(dk_acc, ds, q_t[b, h, i], rows, real)
        dk_dst, dv_dst = dk[b, hk, j], dv[b, hk, j]
        dk_grad, dv_grad = dk_tile[b, hk, j], dv_tile[b, hk, j]
        for c in range(keys):
            for d in range(dim):
                dk_dst[c, d] = dk_acc[c, d] * kscale + dk_grad[d]
                dv_dst[c, d] = dv_acc[c, d] + dv_grad[d]
        dk_dst[keys:] = 0.0
        dv_dst[keys:] = 0.0


@njit(cache=True)
def _reverse_lists(q2k_idx, q2k_num, kv_heads, kv_tiles):
    """Counting sort of the selections by (b, kv head, key tile).

    Returns (offsets [B*H_kv*N_kv + 1] int64, entries int64, slots int32): the entries of
    bucket (b * H_kv + hk) * N_kv + j list h * N_q + i for every (h, i) that selected key tile
    j, in increasing order, so the dK/dV pass visits them in a fixed order; slots gives each
    entry's position t in that (h, i)'s list (q2k_idx[b, h, i, t] = j).
    """
    batch, heads, q_tiles, _ = q2k_idx.shape
    group = heads // kv_heads
    offsets = np.zeros(batch * kv_heads * kv_tiles + 1, np.int64)
    for b in range(batch):
        for h in range(heads):
            for i in range(q_tiles):
                for t in range(q2k_num[b, h, i]):
                    offsets[(b * kv_heads + h // group) * kv_tiles + q2k_idx[b, h, i, t] + 1] += 1
    for n in range(1, offsets.size):
        offsets[n] += offsets[n - 1]
    fill = offsets[:-1].copy()
    entries = np.empty(offsets[-1], np.int64)  # h * q_tiles + i: past int32 once H * N_q reaches 2**31
    slots = np.empty(offsets[-1], np.int32)
    for b in range(batch):
        for h in range(heads):
            for i in range(q_tiles):
                for t in range(q2k_num[b, h, i]):
                    bucket = (b * kv_heads + h // group) * kv_tiles + q2k_idx[b, h, i, t]
                    entries[fill[bucket]] = h * q_tiles + i
                    slots[fill[bucket]] = t
                    fill[bucket] += 1
    return offsets, entries, slots


def block_sparse_bwd(dout, q, k, v, out, lse, q2k_idx, q2k_num, q_block_sizes, kv_block_sizes,
                     scale, coarse, gate, dq_tile, dk_tile, dv_tile, dq=None, dk=None, dv=None, row_terms=None):
    """(dq, dk, dv) in the input dtype, pad slots zero (into ``dq``, ``dk``, ``dv`` where given);
    see the package doc (``row_terms`` is always None here)."""
    results = (dq, dk, dv)
    b, h, s_q, d = q.shape
    h_kv = k.shape[1]
    n_q, n_kv = q_block_sizes.shape[0], kv_block_sizes.shape[0]
    volume = s_q // n_q
    tiled = (b, h, n_q, volume, d)
    q_c = _compute(q).reshape(tiled)
    dtype = q_c.dtype
    k_rows, v_rows = _key_rows(k, n_kv), _key_rows(v, n_kv)
    q_block_sizes, kv_block_sizes = _index(q_block_sizes), _index(kv_block_sizes)
    q2k_idx, q2k_num = _index(q2k_idx), _index(q2k_num)
    coarse = np.zeros((b, h, n_q, d), dtype) if coarse is None else np.ascontiguousarray(coarse, dtype=dtype)
    has_gate = gate is not None
    gate_c = _compute(gate).reshape(tiled) if has_gate else np.empty((0,) * 5, dtype)
    dq_tile, dk_tile, dv_tile = (np.ascontiguousarray(x, dtype=dtype) for x in (dq_tile, dk_tile, dv_tile))
    rows = _round_rows(volume)
    width = _round_lanes(volume)  # columns of the scratch that _accumulate_t reads as p

    qs = np.empty(tiled, dtype)
    dout_rows = np.empty((b, h, n_q, rows, d), dtype)
    delta = np.empty((b, h, n_q, volume), dtype)
    lse2 = np.empty((b, h, n_q, volume), dtype)
    _bwd_prep_kernel(
        q_c, _compute(dout).reshape(tiled), _compute(out).reshape(tiled),
        np.ascontiguousarray(lse, dtype=dtype).reshape(b, h, n_q, volume),
        _LSE_LIMIT if np.dtype(lse.dtype).itemsize <= 4 else np.inf,
        coarse, gate_c, has_gate, q_block_sizes, float(scale), qs, dout_rows, delta, lse2,
    )

    dq = np.empty(tiled, dtype)
    offsets, entries, slots = _reverse_lists(q2k_idx, q2k_num, h_kv, n_kv)
    dk = np.empty(k_rows.shape, dtype)
    dv = np.empty(v_rows.shape, dtype)
    blocks_shape = (b, h, n_q, q2k_idx.shape[3], rows, width)
    hand_over = math.prod(blocks_shape) * dtype.itemsize <= DS_BUDGET_BYTES
    ds_blocks = _touched(blocks_shape if hand_over else (0,) * 6, dtype)
    q_t, dout_t = _transposed(q_c, q_block_sizes), _transposed(dout_rows[:, :, :, :volume], q_block_sizes)
    with numba.parallel_chunksize(1):
        _dkdv_kernel(
            q_t, k_rows, v_rows, q_block_sizes, kv_block_sizes, float(scale), qs, dout_rows, dout_t, delta, lse2,
            offsets, entries, slots, ds_blocks, dk_tile, dv_tile, dk, dv,
            _scratch(rows, d, dtype), _scratch(rows, d, dtype), _scratch(rows, width, dtype),
            _scratch(rows, width, dtype), _scratch(rows, d, dtype), _scratch(rows, d, dtype),
        )
        del q_t, dout_t
        k_t = _transposed(k_rows, kv_block_sizes)
        if hand_over:
            _dq_from_ds_kernel(k_t, q2k_idx, q2k_num, q_block_sizes, kv_block_sizes, float(scale), ds_blocks,
                               dq_tile, dq, _scratch(rows, d, dtype))
        else:
            _dq_kernel(
                q_c, k_rows, v_rows, k_t, q2k_idx, q2k_num, q_block_sizes, kv_block_sizes, float(scale), dout_rows,
                delta, lse2, dq_tile, dq,
                _scratch(rows, d, dtype), _scratch(rows, width, dtype), _scratch(rows, width, dtype),
                _scratch(rows, d, dtype),
            )
    return tuple(_into(r, x.reshape(shape).astype(q.dtype, copy=False))
                 for r, x, shape in zip(results, (dq, dk, dv), (q.shape, k.shape, v.shape)))
