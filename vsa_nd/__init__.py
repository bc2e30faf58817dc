"""vsa_nd: Video Sparse Attention for NumPy, CuPy, PyTorch and JAX.

Importing this package imports neither CuPy, PyTorch nor JAX; the CPU backend (Numba) is
compiled on first use.  See README.md, and the docstrings of :mod:`vsa_nd.ops` and
:mod:`vsa_nd.tiling`, for the operator.
"""

from .ops import (
    Gradients,
    VSAContext,
    block_mean,
    block_sparse_attn,
    coarse_attn,
    select_topk_blocks,
    tile,
    untile,
    video_sparse_attn,
    video_sparse_attn_backward,
)
from .tiling import TilePlan, VSAMetadata, build_metadata, tile_plan, topk_from_sparsity
from . import reference  # the NumPy oracle (float64, dense): vsa_nd.reference.video_sparse_attn, ...

__version__ = "0.1.0"

__all__ = [
    "Gradients",
    "TilePlan",
    "VSAContext",
    "VSAMetadata",
    "block_mean",
    "block_sparse_attn",
    "build_metadata",
    "coarse_attn",
    "select_topk_blocks",
    "tile",
    "tile_plan",
    "topk_from_sparsity",
    "untile",
    "video_sparse_attn",
    "video_sparse_attn_backward",
]
