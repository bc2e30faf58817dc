"""Launchers of the block-sparse attention kernels (``cuda_kernels/attention_*.cu``).

Inputs are validated by :mod:`vsa_nd.ops`; the checks here are the kernels' own limits
(dtype, head dim, tile volume) and run before any launch.  Every launch goes to CuPy's
current stream on the inputs' device, with no host synchronisation.
"""

from __future__ import annotations

import numpy as np

from .._xp import BFLOAT16
from ..kernels import get_function

_CUDA_TYPES = {np.dtype(np.float16): "__half", BFLOAT16: "__nv_bfloat16"}
_HEAD_DIMS = (64, 128)
_BLOCK_M = 64  # query rows per CTA (FWD_BLOCK_M in attention_fwd.cu)
_CHUNK = 64  # keys per pipeline chunk; tile volumes must be multiples of it
_LOG2E = 1.4426950408889634


def _alloc(shape, dtype):
    """Output allocation (tests replace it to poison outputs before the kernel writes them)."""
    import cupy

    return cupy.empty(shape, dtype)


def check_kernel_support(q, tile_volume: int) -> str:
    """The kernels' CUDA element type for q; TypeError/ValueError for what they cannot run."""
    dtype = np.dtype(q.dtype)
    if dtype not in _CUDA_TYPES:
        raise TypeError(f"q: the CUDA attention kernels take float16 or bfloat16, got {dtype}")
    if q.shape[-1] not in _HEAD_DIMS:
        raise ValueError(f"q: the CUDA attention kernels take head dim 64 or 128, got {q.shape[-1]}")
    if tile_volume % _CHUNK:
        raise ValueError(f"q: the CUDA attention kernels take tile volumes that are multiples of {_CHUNK}, got {tile_volume}")
    return _CUDA_TYPES[dtype]


# "auto": the wgmma kernel on Hopper (sm_90a), the mma.sync kernel elsewhere; "mma" forces
# the portable kernel (tests run both on a Hopper card).
FORWARD_KERNEL = "auto"


def _forward_kernel(ctype: str, head_dim: int):
    """(kernel, number of K/V pipeline stages it was built with)."""
    import cupy

    from ..kernels import device_arch

    hopper = device_arch(cupy.cuda.runtime.getDevice()) == "sm_90a"
    if FORWARD_KERNEL == "auto" and hopper:
        return get_function("attention_fwd_sm90.cu", f"block_sparse_fwd_sm90<{ctype}, {head_dim}>"), 1
    return get_function("attention_fwd.cu", f"block_sparse_fwd<{ctype}, {head_dim}>"), 2


def _null_or(x):
    return np.uintp(0) if x is None else x


def block_sparse_fwd(q, k, v, q2k_idx, q2k_num, kv_block_sizes, scale, coarse, gate):
    """See :mod:`vsa_nd.backends`: (out [B, H, Sq_pad, D] q.dtype, lse [B, H, Sq_pad] float32)."""
    b, h, q_len, d = q.shape
    h_kv, kv_len = k.shape[1], k.shape[2]
    tile_volume = q_len // q2k_idx.shape[2]
    ctype = check_kernel_support(q, tile_volume)
    with q.device:
        out = _alloc(q.shape, q.dtype)
        lse = _alloc((b, h, q_len), np.float32)
        if coarse is not None:
            coarse = coarse.astype(np.float32, copy=False)
        kernel, stages = _forward_kernel(ctype, d)
        smem = (1 + 2 * stages) * _BLOCK_M * d * q.dtype.itemsize  # Q + K and V stages
        kernel.max_dynamic_shared_size_bytes = smem
        kernel(
            (q_len // _BLOCK_M, b * h),
            (128,),
            (
                q, k, v, q2k_idx, q2k_num, kv_block_sizes, _null_or(coarse), _null_or(gate), out, lse,
                np.int32(h), np.int32(h_kv), np.int32(q_len), np.int32(kv_len), np.int32(q2k_idx.shape[3]),
                np.int32(tile_volume), np.float32(scale * _LOG2E),
            ),
            shared_mem=smem,
        )
    return out, lse

