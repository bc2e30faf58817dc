"""What the PyTorch and JAX adapters share: VSA as flat tuples of arrays, and their shapes.

A framework's autograd node can only carry arrays, so the forward pass is exposed here as a
function returning the output followed by every small tensor of :class:`vsa_nd.VSAContext`
(``CONTEXT_FIELDS``), and the backward pass as a function that rebuilds the context from
them.  :func:`forward_specs` gives the shape and dtype of each result without running
anything, which is what a traced (``torch.compile``, ``jax.jit``) graph needs.

Arrays here are NumPy or CuPy; no framework is imported.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np

import vsa_nd
from vsa_nd._xp import BFLOAT16
from vsa_nd.backends import FORWARD_RESULTS
from vsa_nd.backends import forward_result_specs as forward_specs  # noqa: F401 - the adapters' name for it
from vsa_nd.tiling import trusted_index_arrays


def raise_framework_missing(error: ModuleNotFoundError, framework: str, name: str):
    """Raise what ``vsa_nd.adapters.<framework>`` raises when importing its framework raised
    ``error``: ``error`` itself where the framework is there but something it imports is not,
    else a ModuleNotFoundError naming the extra to install."""
    if (error.name or "").split(".")[0] != framework:
        raise error
    raise ModuleNotFoundError(f"vsa_nd.adapters.{framework} needs {name}, which this environment lacks ({error}): "
                              f"pip install 'vsa_nd[{framework}]'", name=error.name) from error

_F16, _F32, _F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)

# Floating dtypes each entry point takes, per device kind.  The CUDA attention kernels are
# written for half precision; tile/untile move bytes and also take float32 there.
ATTENTION_DTYPES = {"cpu": (_F32, _F64, _F16, BFLOAT16), "cuda": (_F16, BFLOAT16)}
TILE_DTYPES = {"cpu": (_F32, _F64, _F16, BFLOAT16), "cuda": (_F32, _F16, BFLOAT16)}

# The forward's results after ``out``, in this order (VSAContext field names), and their shapes.
CONTEXT_FIELDS = FORWARD_RESULTS[1:]


def resolve_scale(scale, head_dim: int) -> float:
    """The softmax scale as a float (default ``1/sqrt(head_dim)``); vsa_nd checks its value."""
    if scale is None:
        if head_dim < 1:  # (the tensors' checks refuse empty axes first; a layer's head_size comes here)
            raise ValueError(f"head dim: expected at least 1, got {head_dim}")
        return float(head_dim) ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a positive float, got {type(scale).__name__} {scale!r}")
    try:
        return float(scale)
    except OverflowError:  # an int past float's range
        raise ValueError(f"scale: expected a positive finite float, got {scale!r}") from None


def trusted(block_sizes):
    """The cached plan array that ``block_sizes`` views exactly, else ``block_sizes`` itself.

    vsa_nd skips the value check (a host synchronisation on CUDA) for the block-size arrays
    of its cached plans, recognised by identity.  A framework tensor converted through
    DLPack is a new array object over the same memory, so it is matched by data pointer,
    length and device; plan arrays live as long as the process, so the match is exact.
    A plan array itself (what the torch adapter passes for a plan's tensor) is returned at once.
    """
    candidates = trusted_index_arrays()
    if any(candidate is block_sizes for candidate in candidates):
        return block_sizes
    for candidate in candidates:
        if _same_memory(candidate, block_sizes):
            return candidate
    return block_sizes


def _same_memory(a, b) -> bool:
    """Whether NumPy/CuPy arrays ``a`` and ``b`` view the same memory the same way (pointer,
    device, shape and dtype; the arrays compared here are contiguous)."""
    return (_data_pointer(a) == _data_pointer(b) and _device(a) == _device(b) and a.shape == b.shape
            and a.dtype == b.dtype)


def _data_pointer(a) -> int:
    return a.ctypes.data if isinstance(a, np.ndarray) else a.data.ptr


def _device(a):
    return "cpu" if isinstance(a, np.ndarray) else a.device.id


def vsa_forward(q, k, v, gate, q_block_sizes, kv_block_sizes, topk: int, scale: float, results=None) -> tuple:
    """:func:`vsa_nd.video_sparse_attn` returning ``(out, *CONTEXT_FIELDS)`` (see :func:`forward_specs`).

    ``results``: None, or buffers for those results (only ``out``'s is used: the rest are small).
    """
    out, context = vsa_nd.video_sparse_attn(
        q, k, v, topk, trusted(q_block_sizes), _kv_sizes(q_block_sizes, kv_block_sizes), gate=gate, scale=scale,
        return_context=True, out=results[0] if results else None,
    )
    return (out,) + tuple(getattr(context, name) for name in CONTEXT_FIELDS)


def vsa_inference(q, k, v, gate, q_block_sizes, kv_block_sizes, topk: int, scale: float, results=None):
    """:func:`vsa_nd.video_sparse_attn`'s output alone, for calls that will not be differentiated
    (``results``: None, or a buffer for it, first)."""
    return vsa_nd.video_sparse_attn(q, k, v, topk, trusted(q_block_sizes), _kv_sizes(q_block_sizes, kv_block_sizes),
                                    gate=gate, scale=scale, out=results[0] if results else None)


def _kv_sizes(q_block_sizes, kv_block_sizes):
    """``kv_block_sizes`` for vsa_nd: None when it is ``q_block_sizes`` (the same array, or a view of
    the same memory), so that vsa_nd checks the values once and names q_block_sizes in its errors."""
    if kv_block_sizes is q_block_sizes or _same_memory(kv_block_sizes, q_block_sizes):
        return None
    return trusted(kv_block_sizes)


def vsa_backward(dout, q, k, v, gate, q_block_sizes, kv_block_sizes, out, *context, scale: float, results=None,
                 trusted: bool = True) -> tuple:
    """:func:`vsa_nd.video_sparse_attn_backward` from the results of :func:`vsa_forward`.

    ``dout`` [B, H, Sq_pad, D] C-contiguous in q's dtype; block sizes int32 as passed to the
    forward; ``context`` the ``CONTEXT_FIELDS``; ``results`` None or buffers for
    (dq, dk, dv[, dgate]).  Returns (dq, dk, dv, dgate or None).  ``trusted``: the context is
    the forward's results as the framework kept them (below); False checks it as
    :func:`vsa_nd.video_sparse_attn_backward` does, for arrays from anywhere.
    """
    fields = dict(zip(CONTEXT_FIELDS, context))
    ctx = vsa_nd.VSAContext(
        q=q, k=k, v=v, gate=gate, out=out, q_block_sizes=q_block_sizes, kv_block_sizes=kv_block_sizes,
        scale=scale, **fields,
    )
    buffers = None if not results else (*results[:3], results[3] if gate is not None else None)
    if not trusted:  # the context checked; the buffers, if any, are new
        return tuple(vsa_nd.ops.backward_into_new_buffers(dout, ctx, out=buffers))
    # The context is the forward's results as the framework kept them: torch's saved tensors
    # (version-checked) or immutable JAX arrays, so vsa_nd need not check it again.
    return tuple(vsa_nd.ops.backward_of_unchanged_context(dout, ctx, out=buffers))


_EXTERNAL_STREAMS: dict = {}  # (stream pointer, device index) -> cupy.cuda.ExternalStream


def external_stream(pointer: int, device: int):
    """CuPy's handle of a framework's CUDA stream (``cupy.cuda.ExternalStream``), cached per
    (pointer, device): frameworks keep a few streams per device for the process's life."""
    stream = _EXTERNAL_STREAMS.get((pointer, device))
    if stream is None:
        import cupy

        with warnings.catch_warnings():  # CuPy 14 prefers Stream.from_external, which CuPy 13 lacks
            warnings.simplefilter("ignore", DeprecationWarning)
            stream = _EXTERNAL_STREAMS[pointer, device] = cupy.cuda.ExternalStream(pointer, device)
    return stream


def padded_len(seq_shape, tile_shape) -> int:
    """S_pad of a tiling, without building its index arrays (for shape-only tracing)."""
    seq_shape, tile_shape = vsa_nd.tiling.normalize_shapes(seq_shape, tile_shape)
    return math.prod(-(-n // t) * t for n, t in zip(seq_shape, tile_shape))


@dataclass(frozen=True, eq=False, repr=False)
class AdaptedTilePlan:
    """A :class:`vsa_nd.TilePlan` whose index arrays are a framework's tensors.

    ``array_plan`` is the NumPy/CuPy plan the tensors view or copy; ``device`` the framework's device.
    The tensors are shared by every caller of the adapter's cached plan: never write to them.
    """

    array_plan: vsa_nd.TilePlan
    device: object
    tile_partition_indices: object
    reverse_tile_partition_indices: object
    variable_block_sizes: object
    non_pad_index: object
    untile_index: object
    slot_token_index: object

    INDEX_FIELDS = ("tile_partition_indices", "reverse_tile_partition_indices", "variable_block_sizes",
                    "non_pad_index", "untile_index", "slot_token_index")

    @classmethod
    def wrap(cls, array_plan, device, convert) -> "AdaptedTilePlan":
        """``convert(array) -> tensor`` is applied to each index array of ``array_plan``."""
        return cls(array_plan, device, *(convert(getattr(array_plan, name)) for name in cls.INDEX_FIELDS))

    seq_shape = property(lambda self: self.array_plan.seq_shape)
    tile_shape = property(lambda self: self.array_plan.tile_shape)
    num_tiles = property(lambda self: self.array_plan.num_tiles)
    num_blocks = property(lambda self: self.array_plan.num_blocks)
    tile_volume = property(lambda self: self.array_plan.tile_volume)
    seq_len = property(lambda self: self.array_plan.seq_len)
    padded_len = property(lambda self: self.array_plan.padded_len)

    def __repr__(self) -> str:
        return (f"TilePlan(seq_shape={self.seq_shape}, tile_shape={self.tile_shape}, "
                f"num_tiles={self.num_tiles}, padded_len={self.padded_len}, device={self.device})")


def plan_shapes(plan) -> tuple:
    """(seq_shape, tile_shape) of a vsa_nd or adapted plan; TypeError naming ``plan`` otherwise."""
    if not isinstance(plan, (vsa_nd.TilePlan, AdaptedTilePlan)):
        raise TypeError(f"plan: expected a TilePlan (from tile_plan or build_metadata), got {type(plan).__name__}")
    return plan.seq_shape, plan.tile_shape
