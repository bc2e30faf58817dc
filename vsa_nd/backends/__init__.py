"""Backends: one module per device kind, all with the same functions.

``vsa_nd.ops`` validates its inputs once and then calls the backend chosen from the
input's array module: :mod:`vsa_nd.backends.numba_cpu` for NumPy arrays and
:mod:`vsa_nd.backends.cuda` for CuPy arrays.  A backend may assume validated input:
C-contiguous arrays of the documented shapes, int32 index arrays on the same device,
``0 < block_sizes <= V``, ``q2k_idx`` rows free of duplicates and inside ``[0, N_kv)``
for the first ``q2k_num`` entries, ``H % H_kv == 0``.

Shapes (tiled, head-major): q, dout, out, gate [B, H, Sq_pad, D]; k, v [B, H_kv, Skv_pad, D];
``Sq_pad = N_q * V``, ``Skv_pad = N_kv * V``; V is implied by ``Sq_pad // N_q``.
"Compute dtype" is float64 for float64 inputs and float32 otherwise.

The interface every backend implements:

``tile(x, slot_token_index, out) -> out``
    x [B, S, H, D] -> out [B, H, S_pad, D]; ``out[b, h, s] = x[b, slot_token_index[s], h]``,
    or zero where ``slot_token_index[s] < 0``.  Every element of ``out`` is written.
``untile(y, untile_index, out) -> out``
    y [B, H, S_pad, D] -> out [B, S, H, D]; ``out[b, t, h] = y[b, h, untile_index[t]]``.
``block_mean(x, block_sizes) -> [B, H, N, D]`` in the compute dtype.
``block_means(tensors, block_sizes_list) -> list``
    :func:`block_mean` of up to three tensors of one dtype, D and V (one launch on CUDA).
``softmax_rows_(x) -> x``
    Row softmax of a compute-dtype array [..., n] in place.  A row holding NaN or +inf, or only
    -inf, becomes all NaN, as in the reference (as in the fine stage, where only a row that
    selects no key gets 0 and lse -inf).
``softmax_grad_rows_(d_probs, probs, d_out, out) -> d_probs``
    Softmax backward in place: d_probs [..., n] becomes ``probs * (d_probs - rowsum(d_out * out))``
    for out = probs @ v [..., d] with gradient d_out (so that the row sum equals
    ``rowsum(d_probs * probs)``); all four in the compute dtype with the same leading axes,
    C-contiguous, d_probs sharing no memory with the others.
``matmul(a, b, transpose_a=False, transpose_b=False, alpha=1.0, row_divisor=None) -> [batch..., m, n]``
    ``alpha * op(a) @ op(b)`` for every batch index, in the compute dtype, then row r divided by
    ``row_divisor[r % p]`` when an int32 ``row_divisor`` [p] is given (p divides m): a [batch..., m, k]
    (stored [batch..., k, m] with ``transpose_a``), b [batch..., k, n] (stored
    [batch..., n, k] with ``transpose_b``), both C-contiguous with the same batch axes.  The
    coarse stage's products, each element one sum in increasing k order: exact fp32 arithmetic
    on CUDA (no TF32, no cuBLAS, so the forward and backward can be captured in a CUDA graph),
    a Numba kernel on the CPU (no BLAS, whose spinning threads slowed the fine stage after it).
``select_topk(scores, topk) -> (q2k_idx [B, H, N_q, topk] int32, q2k_num [B, H, N_q] int32)``
    scores [B, H, N_q, N_kv] float; the ``topk`` largest per row, ties to the lower index,
    each row listed in increasing tile order.
``select_topk_softmax_(scores, topk) -> (q2k_idx, q2k_num, scores)``
    ``select_topk``, then ``softmax_rows_`` of ``scores`` in place (the forward needs both; one
    launch on CUDA).  NaN counts as the smallest score for the selection only.
``block_sparse_fwd(q, k, v, q2k_idx, q2k_num, kv_block_sizes, scale, coarse, gate, out=None, q_block_sizes=None) -> (out, lse)``
    out [B, H, Sq_pad, D] in q's dtype = fine + (gate *) broadcast(coarse), where ``coarse``
    is None or [B, H, N_q, D] in the compute dtype and ``gate`` None or q-shaped;
    lse [B, H, Sq_pad] float32 (float64 for float64 inputs), -inf for a row with no key (out 0
    there), NaN for a row whose every score is -inf or NaN (out NaN there).
    With ``q_block_sizes`` [N_q], rows at or past ``q_block_sizes[i]`` of query tile i are
    pad rows: out 0 and lse -inf there, whatever q and gate hold in them.
``coarse_grad_inputs(dout, gate, coarse, q_block_sizes, dgate=None, out=None, lse=None) -> (d_coarse, dgate, row_terms)``
    d_coarse [B, H, N_q, D] compute dtype: sum over the real rows of each query tile of
    ``gate * dout`` (``dout`` without a gate); dgate (None without a gate) q-shaped in
    the gate's dtype: ``dout * broadcast(coarse)`` on real rows, 0 on pad rows.  Given the
    forward's ``out`` and ``lse``, a backend may compute in the same pass the per-row terms of
    the fine backward (``rowsum(dout * fine)`` ...), returned as ``row_terms`` for
    :func:`block_sparse_bwd`; else ``row_terms`` is None.
``block_sparse_bwd(dout, q, k, v, out, lse, q2k_idx, q2k_num, q_block_sizes, kv_block_sizes,
                   scale, coarse, gate, dq_tile, dk_tile, dv_tile, dq=None, dk=None, dv=None,
                   row_terms=None) -> (dq, dk, dv)``
    Gradients in the input dtype of ``sum(dout * out)`` over the real query rows for the
    fine branch, with ``fine = out - (gate *) broadcast(coarse)`` recovered from ``out``.
    ``dq_tile`` [B, H, N_q, D] and ``dk_tile``/``dv_tile`` [B, H_kv, N_kv, D] (compute dtype)
    are added to every real token of their tile (the coarse branch's share).  Pad slots of
    dq, dk, dv are zero.  ``row_terms``: what ``coarse_grad_inputs`` returned for this
    backward, or None.

The CUDA backend also has ``vsa_forward(q, k, v, gate, q_block_sizes, kv_block_sizes, topk, scale,
out=None, keep=True)``, the whole VSA forward as five prepared launches (the results of
``block_means`` to ``block_sparse_fwd`` above, in the order of
:data:`FORWARD_RESULTS`; see ``vsa_nd.backends.cuda_vsa``), ``vsa_backward(dout, context, dq=None,
dk=None, dv=None, dgate=None, clean=True) -> (dq, dk, dv, dgate)``, the whole backward the same
way (``coarse_grad_inputs`` to ``block_sparse_bwd`` and the coarse products between them, for
contexts whose arrays are all 16-byte aligned), and ``reorder``, tile/untile on addresses;
``vsa_nd.ops`` runs the stages one by one on the CPU, and the backward's on CUDA for other contexts.

A result argument that is not None (``out``, ``dgate``, ``dq``, ``dk``, ``dv``; checked by
:mod:`vsa_nd.ops`: shape, dtype, device, contiguity, no shared memory) is filled and returned
in place of a new array.
"""

import numpy as np

from .._xp import compute_dtype

# The VSA forward's results: its output, then the small arrays of vsa_nd.VSAContext that the
# backward needs, in the order the CUDA backend's prepared forward returns them and the
# adapters save them.
FORWARD_RESULTS = ("out", "lse", "q2k_idx", "q2k_num", "q_mean", "k_mean", "v_mean", "coarse_probs", "coarse")


def forward_result_specs(q_shape, q_dtype, kv_shape, num_q_blocks: int, num_kv_blocks: int, topk: int) -> list:
    """(shape, NumPy dtype) of each of the VSA forward's results, in :data:`FORWARD_RESULTS` order.

    q_shape [B, H, Sq_pad, D]; kv_shape [B, H_kv, Skv_pad, D].  The small tensors are in the
    compute dtype (float64 for float64 inputs, else float32), the selection in int32.
    """
    b, h, s_q, d = q_shape
    h_kv = kv_shape[1]
    c = compute_dtype(q_dtype)
    i32 = np.dtype(np.int32)
    return [
        ((b, h, s_q, d), np.dtype(q_dtype)),  # out
        ((b, h, s_q), c),  # lse
        ((b, h, num_q_blocks, topk), i32),  # q2k_idx
        ((b, h, num_q_blocks), i32),  # q2k_num
        ((b, h, num_q_blocks, d), c),  # q_mean
        ((b, h_kv, num_kv_blocks, d), c),  # k_mean
        ((b, h_kv, num_kv_blocks, d), c),  # v_mean
        ((b, h, num_q_blocks, num_kv_blocks), c),  # coarse_probs
        ((b, h, num_q_blocks, d), c),  # coarse
    ]
