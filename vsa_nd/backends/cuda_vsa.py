"""The VSA forward and backward on CUDA, each as one prepared sequence of launches.

:func:`vsa_nd.video_sparse_attn` is, on the GPU, five kernel launches: the tile means of q, k and
v (block_mean.cu); the coarse scores ``scale * q_mean k_mean^T`` (gemm_f32.cu); the top-k
selection, which also turns the scores into their row softmax in place (topk.cu); the coarse
output ``probs v_mean`` (gemm_f32.cu); the fine attention with the coarse combine
(attention_fwd*.cu).  Everything about them but the pointers follows from the problem: shapes,
dtype, top-k, scale, device and kernel choice.  :func:`forward_launches` works it out once per
problem (cached), so that a call is its allocations and five launches: on small problems,
where the whole call is host time, that is about a third of the host time of building each
launch afresh.  :func:`backward_launches` does the same for the backward's dozen launches (the
coarse branch's gradient pass and products, then the fine backward,
``cuda_attention.FineBackward``).

Two callers run them: :func:`vsa_forward` and :func:`vsa_backward` on CuPy arrays (what
``vsa_nd.video_sparse_attn`` and its backward do on CuPy), and the torch adapter on CUDA
tensors' addresses, with buffers from torch's allocator.  Nothing here checks its inputs:
:mod:`vsa_nd.ops` (or, for a call it has checked before, the cheap checks of its fast path) does.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

from . import FORWARD_RESULTS as RESULTS  # noqa: F401 - the order of ForwardLaunches.results
from . import cuda, cuda_attention, forward_result_specs

_NULL = 0  # a null pointer (addresses are Python ints: see cuda.Launch)


class ForwardLaunches(NamedTuple):
    """The five launches of one problem's forward (see the module docstring) and its results'
    shapes: ``results`` holds a (shape, NumPy dtype) pair per name of :data:`RESULTS`;
    ``offsets`` and ``workspace_bytes`` place every result but ``out`` in one byte buffer, for
    calls that keep none of them."""

    means: object  # cuda.Launch, or None when there is nothing to average
    scores: cuda.Launch
    select: cuda.Launch
    coarse: cuda.Launch
    fine: cuda_attention.ForwardLaunch
    results: tuple
    offsets: tuple
    workspace_bytes: int

    def __call__(self, q: int, k: int, v: int, gate: int, q_block_sizes: int, kv_block_sizes: int, results: tuple,
                 stream=None):
        """Launch on ``stream`` (None: CuPy's current stream), with the launches' device current.

        Every argument is an address, a Python int (``gate`` 0 for none); ``results`` holds the
        nine results' buffers' addresses in :data:`RESULTS` order."""
        q_sizes, kv_sizes = q_block_sizes, kv_block_sizes
        out, lse, q2k_idx, q2k_num, q_mean, k_mean, v_mean, probs, coarse = results
        if self.means is not None:
            self.means((q, k, v, q_mean, k_mean, v_mean, q_sizes, kv_sizes, kv_sizes), stream)
        self.scores((q_mean, k_mean, probs, _NULL), stream)
        self.select((probs, q2k_idx, q2k_num), stream)
        self.coarse((probs, v_mean, coarse, _NULL), stream)
        self.fine((q, k, v, q2k_idx, q2k_num, kv_sizes, q_sizes, coarse, gate, out, lse), k, v, stream)

    def buffers(self, alloc, address, keep: bool, out=None) -> tuple:
        """(buffers, addresses) for a call: ``alloc(shape, NumPy dtype)`` makes a buffer and
        ``address(buffer)`` gives its address.  With ``keep`` the buffers are the nine results
        (``out`` used when given); else ``out`` and one workspace holding the other eight, which
        the caller keeps until the launches are queued and may then drop (freed in the stream's
        order).  ``addresses`` are the nine results', for :meth:`__call__`."""
        (out_shape, out_dtype), *small = self.results
        out = alloc(out_shape, out_dtype) if out is None else out
        if keep:
            buffers = (out, *(alloc(shape, dtype) for shape, dtype in small))
            return buffers, tuple(address(b) for b in buffers)
        workspace = alloc((self.workspace_bytes,), np.dtype(np.uint8))
        base = address(workspace)
        return (out, workspace), (address(out), *(base + offset for offset in self.offsets))


@functools.lru_cache(maxsize=256)
def forward_launches(q_shape: tuple, kv_shape: tuple, dtype: np.dtype, num_q_blocks: int, num_kv_blocks: int,
                     topk: int, scale: float, device_id: int, kernel_choice: str) -> ForwardLaunches:
    """The :class:`ForwardLaunches` of a checked problem: q [B, H, Sq_pad, D] and k, v ``kv_shape``
    [B, H_kv, Skv_pad, D] of ``dtype`` (float16 or bfloat16; every array 16-byte aligned), N_q and
    N_kv tiles, ``topk``, the softmax ``scale``, on ``device_id`` (which must be CuPy's current
    device), with ``kernel_choice`` (``cuda_attention.FORWARD_KERNEL``) for the fine stage.
    Raises what the launchers raise for problems the kernels cannot index."""
    b, h, q_len, d = q_shape
    h_kv = kv_shape[1]
    group = h // h_kv
    volume = q_len // num_q_blocks
    results, offsets, end = result_layout(q_shape, kv_shape, dtype, num_q_blocks, num_kv_blocks, topk)
    element = cuda_attention._CUDA_TYPES[dtype]
    means = cuda.block_mean_launch(element, cuda._VECTOR_BYTES // dtype.itemsize, d, volume,
                                   [b * h * num_q_blocks, b * h_kv * num_kv_blocks, b * h_kv * num_kv_blocks],
                                   [num_q_blocks, num_kv_blocks, num_kv_blocks])
    # The coarse products in the grouped layout of ops._coarse_scores: the query heads of a kv
    # group side by side, [B, H_kv, G * N_q, .], so shared kv heads are not copied.
    sm_count, batches, rows = cuda._sm_count(device_id), b * h_kv, group * num_q_blocks
    scores = cuda.gemm_launch(rows, num_kv_blocks, d, batches, False, True, scale,
                              cuda._gemm_tile(rows, num_kv_blocks, batches, sm_count))
    select = cuda.topk_launch(b * h * num_q_blocks, num_kv_blocks, topk, softmax=True)
    coarse = cuda.gemm_launch(rows, d, num_kv_blocks, batches, False, False, 1.0, cuda._gemm_tile(rows, d, batches, sm_count))
    fine = cuda_attention.forward_launch(q_shape, kv_shape, dtype, topk, volume, scale, kernel_choice)
    return ForwardLaunches(means, scores, select, coarse, fine, results, offsets, end)


def result_layout(q_shape: tuple, kv_shape: tuple, dtype: np.dtype, num_q_blocks: int, num_kv_blocks: int,
                  topk: int) -> tuple:
    """(results, offsets, workspace_bytes) of :class:`ForwardLaunches` for a problem (see there);
    the same on any device."""
    results = tuple(forward_result_specs(q_shape, dtype, kv_shape, num_q_blocks, num_kv_blocks, topk))
    offsets, end = cuda.workspace_layout(math.prod(shape) * result_dtype.itemsize for shape, result_dtype in results[1:])
    return results, offsets, end


def vsa_forward(q, k, v, gate, q_block_sizes, kv_block_sizes, topk: int, scale: float, out=None, keep: bool = True):
    """The forward on checked CuPy arrays, on CuPy's current device (q's) and stream: a tuple of
    the nine results of :data:`RESULTS` (``out`` filled when given); with ``keep`` False only
    ``out``, the rest in a workspace freed on return."""
    launches = forward_launches(q.shape, k.shape, np.dtype(q.dtype), len(q_block_sizes), len(kv_block_sizes), topk,
                                scale, q.data.device_id, cuda_attention.FORWARD_KERNEL)
    buffers, addresses = launches.buffers(cuda._alloc, cuda_attention._address, keep, out)
    launches(q.data.ptr, k.data.ptr, v.data.ptr, 0 if gate is None else gate.data.ptr, q_block_sizes.data.ptr,
             kv_block_sizes.data.ptr, addresses)
    return buffers if keep else buffers[:1]


# ---------------------------------------------------------------------------------------
# The backward: :func:`vsa_nd.video_sparse_attn_backward` on the GPU, prepared the same way.

# Whether the coarse-gradient pass also computes the fine backward's row terms (delta and
# lse * log2(e)); False: the fine backward's bwd_delta does (an ablation, and a test switch).
ROW_TERMS = True


class BackwardPointers(NamedTuple):
    """The addresses (Python ints) of one VSA backward: ``dout``, the forward's context (``gate`` 0
    for none), and the gradients' buffers (``dgate`` 0 without a gate)."""

    dout: object
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
    q_mean: object
    k_mean: object
    v_mean: object
    coarse_probs: object
    coarse: object
    dq: object
    dk: object
    dv: object
    dgate: object


class BackwardLaunches(NamedTuple):
    """The launches of one problem's backward, from :func:`backward_launches`: the coarse branch's
    (the coarse gradient and the row terms in one pass over dout, dP = d_coarse v_mean^T, the
    softmax backward in place, the three tile gradients), the lists' clean-up for contexts
    that may have changed, and the fine backward (``cuda_attention.FineBackward``).  Every
    temporary lies in one workspace (``offsets``)."""

    coarse_grad: cuda.Launch
    d_probs: cuda.Launch
    softmax_grad: cuda.Launch
    dq_tile: cuda.Launch
    dk_tile: cuda.Launch
    dv_tile: cuda.Launch
    clean: cuda.Launch
    fine: object
    row_terms: bool
    offsets: tuple  # d_coarse, delta, lse_log2, d_probs, dq_tile, dk_tile, dv_tile, clean q2k_idx, clean q2k_num
    workspace_bytes: int

    def __call__(self, p: BackwardPointers, clean: bool, alloc, address, stream=None):
        """Launch on ``stream`` (None: CuPy's current stream) with the launches' device current;
        ``clean``: run the lists through ``kv_lists_clean`` first (a context the caller cannot
        vouch for).  Temporaries come from ``alloc(shape, NumPy dtype)``, ``address(buffer)``
        giving their addresses, and are kept until the launches are queued."""
        workspace = alloc((self.workspace_bytes,), np.dtype(np.uint8))
        base = address(workspace)
        d_coarse, delta, lse_log2, d_probs, dq_tile, dk_tile, dv_tile, clean_idx, clean_num = (
            base + offset for offset in self.offsets)
        if not self.row_terms:
            delta = lse_log2 = _NULL
        self.coarse_grad((p.dout, p.gate, p.coarse, p.q_block_sizes, d_coarse, p.dgate, p.out if self.row_terms else _NULL,
                          p.lse if self.row_terms else _NULL, delta, lse_log2), stream)
        # The coarse attention's backward in the grouped layout of the forward's products.
        self.d_probs((d_coarse, p.v_mean, d_probs, _NULL), stream)
        self.softmax_grad((d_probs, p.coarse_probs, d_coarse, p.coarse), stream)
        self.dq_tile((d_probs, p.k_mean, dq_tile, p.q_block_sizes), stream)
        self.dk_tile((d_probs, p.q_mean, dk_tile, p.kv_block_sizes), stream)
        self.dv_tile((p.coarse_probs, d_coarse, dv_tile, p.kv_block_sizes), stream)
        q2k_idx, q2k_num = p.q2k_idx, p.q2k_num
        if clean:
            self.clean((q2k_idx, q2k_num, clean_idx, clean_num), stream)
            q2k_idx, q2k_num = clean_idx, clean_num
        fine = cuda_attention.FinePointers(
            p.dout, p.q, p.k, p.v, p.out, p.lse, q2k_idx, q2k_num, p.q_block_sizes, p.kv_block_sizes, p.coarse, p.gate,
            dq_tile, dk_tile, dv_tile, p.dq, p.dk, p.dv, delta, lse_log2)
        self.fine(fine, alloc, address, stream)


def backward_launches(q_shape: tuple, kv_shape: tuple, dtype, num_q_blocks: int, num_kv_blocks: int, topk: int,
                      scale: float, gated: bool, device_id: int) -> BackwardLaunches:
    """The :class:`BackwardLaunches` of a checked problem (q [B, H, Sq_pad, D], k and v
    ``kv_shape``, ``dtype`` float16 or bfloat16, every array 16-byte aligned) on ``device_id``,
    which must be CuPy's current device; cached, by the problem and the settings read here."""
    return _backward_launches(tuple(q_shape), tuple(kv_shape), np.dtype(dtype), num_q_blocks, num_kv_blocks, topk,
                              float(scale), gated, device_id, cuda_attention.backward_knobs(), ROW_TERMS)


@functools.lru_cache(maxsize=256)
def _backward_launches(q_shape, kv_shape, dtype, n_q, n_kv, topk, scale, gated, device_id, knobs,
                       row_terms) -> BackwardLaunches:
    b, h, q_len, d = q_shape
    h_kv = kv_shape[1]
    group, volume = h // h_kv, q_len // n_q
    element = cuda_attention._CUDA_TYPES[dtype]
    width = cuda._VECTOR_BYTES // dtype.itemsize
    row_terms = row_terms and cuda.row_terms_fit(element, width, d)
    tiles = b * h * n_q
    coarse_grad = cuda.coarse_grad_launch(element, width, gated, row_terms, tiles, n_q, volume, d)
    sm_count, batches, rows = cuda._sm_count(device_id), b * h_kv, group * n_q

    def gemm(m, n, k, transpose_a, transpose_b, alpha, period):
        tile = cuda._gemm_tile(m, n, batches, sm_count)
        return cuda.gemm_launch(m, n, k, batches, transpose_a, transpose_b, alpha, tile, period)

    d_probs = gemm(rows, n_kv, d, False, True, 1.0, 1)
    softmax_grad = cuda.softmax_grad_launch(tiles, n_kv, d)
    dq_tile = gemm(rows, d, n_kv, False, False, scale, n_q)
    dk_tile = gemm(n_kv, d, rows, True, False, scale, n_kv)
    dv_tile = gemm(n_kv, d, rows, True, False, 1.0, n_kv)
    clean = cuda_attention.clean_lists_launch(tiles, topk, n_kv)
    fine = cuda_attention.fine_backward(q_shape, kv_shape, dtype, n_q, topk, scale, row_terms, device_id, knobs)
    f32 = 4
    sizes = (tiles * d * f32, b * h * q_len * f32, b * h * q_len * f32, tiles * n_kv * f32, tiles * d * f32,
             b * h_kv * n_kv * d * f32, b * h_kv * n_kv * d * f32, tiles * topk * 4, tiles * 4)
    return BackwardLaunches(coarse_grad, d_probs, softmax_grad, dq_tile, dk_tile, dv_tile, clean, fine, row_terms,
                            *cuda.workspace_layout(sizes))


def vsa_backward(dout, c, dq=None, dk=None, dv=None, dgate=None, clean: bool = True) -> tuple:
    """The backward on CuPy arrays on CuPy's current device (q's) and stream: (dq, dk, dv, dgate or
    None) from ``dout`` and the forward's context ``c`` (a ``vsa_nd.VSAContext``, checked, every
    array and buffer 16-byte aligned); buffers filled where given.  ``clean``: see
    :meth:`BackwardLaunches.__call__`."""
    q, k = c.q, c.k
    launches = backward_launches(q.shape, k.shape, q.dtype, len(c.q_block_sizes), len(c.kv_block_sizes),
                                 c.q2k_idx.shape[3], c.scale, c.gate is not None, q.data.device_id)
    alloc = cuda._alloc  # (looked up per call: tests poison it)
    dq = alloc(q.shape, q.dtype) if dq is None else dq
    dk = alloc(k.shape, k.dtype) if dk is None else dk
    dv = alloc(c.v.shape, c.v.dtype) if dv is None else dv
    if c.gate is not None and dgate is None:
        dgate = alloc(c.gate.shape, c.gate.dtype)
    pointers = BackwardPointers(*(cuda_attention._address(x) for x in (
        dout, q, k, c.v, c.gate, c.out, c.lse, c.q2k_idx, c.q2k_num, c.q_block_sizes, c.kv_block_sizes, c.q_mean,
        c.k_mean, c.v_mean, c.coarse_probs, c.coarse, dq, dk, dv, dgate)))
    launches(pointers, clean, alloc, cuda_attention._address)
    return dq, dk, dv, dgate
