"""PyTorch adapter: vsa_nd on ``torch.Tensor`` (CPU and CUDA), through DLPack, with autograd.

Every function takes and returns torch tensors in the layouts of :mod:`vsa_nd.ops`::

    x, gate_untiled      [B, S, H, D]           tokens in row-major order of seq_shape
    q, gate, out         [B, H, Sq_pad, D]      tiled (see tile), head-major
    k, v                 [B, H_kv, Skv_pad, D]  H % H_kv == 0
    block sizes          [N] int32 tensor on q's device (plan.variable_block_sizes), or ints

Dtypes: float32, float64, float16 and bfloat16 on CPU (Numba backend; half types computed
in float32); float16 and bfloat16 on CUDA (CuPy backend; tile/untile also take float32).

Conversion is zero-copy both ways: DLPack (``numpy.from_dlpack`` of the tensor and
``torch.from_dlpack`` of the results on CPU; raw capsules on CUDA, see below).  NumPy 2.x
refuses DLPack's bfloat16 (kDLBfloat) in both directions, so on CPU bfloat16 crosses as int16
and is reinterpreted on the other side (``.view``, no copy); on CUDA it crosses directly where
CuPy takes kDLBfloat both ways (CuPy 14.2 does; probed once), else as int16 too.

On CUDA each call runs on the tensor's device and on torch's current stream there (wrapped
as a ``cupy.cuda.ExternalStream``, cached per stream, and made current), with no host
synchronisation.  Because both libraries then run on the same stream, tensors and results
cross as raw DLPack capsules (``torch.utils.dlpack.to_dlpack`` / ``from_dlpack`` with
CuPy's ``__dlpack__(stream=-1)``), skipping the protocol's stream hand-off.  The memory vsa_nd
allocates (outputs and intermediates) comes from torch's caching allocator, so torch accounts
for all memory and, under CUDA-graph capture, intermediates come from the graph's private
pool.  Every CUDA function can be captured in a CUDA graph, the VSA forward and backward
included (warm them up eagerly first: kernels compile and plans build on first use).  CuPy
is imported only when a CUDA tensor is passed; this module never imports JAX.

Autograd: :func:`video_sparse_attn` (custom op ``vsa_nd::video_sparse_attn``, with a fake
implementation for ``torch.compile``) differentiates q, k, v and gate through both VSA
stages, with the top-k selection a constant of the forward pass; pad query rows of dq and
dgate are zero.  :func:`tile` and :func:`untile` differentiate into each other.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

import vsa_nd
from vsa_nd._xp import BFLOAT16, device_key

from . import _common

TilePlan = _common.AdaptedTilePlan

__all__ = [
    "TilePlan",
    "VSAMetadata",
    "VideoSparseAttention",
    "block_sparse_attn",
    "build_metadata",
    "tile",
    "tile_plan",
    "untile",
    "video_sparse_attn",
]

_NUMPY_DTYPE = {
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: BFLOAT16,
    torch.int32: np.dtype(np.int32),
}
_TORCH_DTYPE = {v: k for k, v in _NUMPY_DTYPE.items()}


# ---------------------------------------------------------------------------------------
# DLPack both ways, and the device/stream/allocator a CUDA call runs with.


def _as_array(t: Tensor):
    """A NumPy (CPU) or CuPy (CUDA) view of ``t``, sharing its memory.

    On CUDA the tensor crosses as a raw DLPack capsule: no stream hand-off, so the caller
    orders the two libraries' streams (inside :func:`_running_on` they are the same stream).
    """
    if t.is_cuda:
        import cupy

        if t.dtype == torch.bfloat16 and not _cupy_takes_bfloat16(t.device.index):
            return cupy.from_dlpack(torch.utils.dlpack.to_dlpack(t.view(torch.int16))).view(BFLOAT16)
        return cupy.from_dlpack(torch.utils.dlpack.to_dlpack(t))
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return np.from_dlpack(t.view(torch.int16)).view(BFLOAT16)
    return np.from_dlpack(t)


def _as_tensor(a) -> Tensor:
    """A torch view of a NumPy or CuPy array, sharing its memory (CuPy: a raw capsule, as in :func:`_as_array`)."""
    if isinstance(a, np.ndarray):
        if a.dtype == BFLOAT16:
            return torch.from_dlpack(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_dlpack(a)
    if a.dtype == BFLOAT16 and not _cupy_takes_bfloat16(a.device.id):
        return torch.utils.dlpack.from_dlpack(a.view(np.int16).__dlpack__(stream=-1)).view(torch.bfloat16)
    return torch.utils.dlpack.from_dlpack(a.__dlpack__(stream=-1))


@functools.cache
def _cupy_takes_bfloat16(index: int) -> bool:
    """Whether this CuPy exchanges DLPack's bfloat16 (kDLBfloat) with torch both ways as
    ``ml_dtypes.bfloat16`` (probed once, on one-element buffers of cuda:<index>; nothing runs on
    the GPU).  If not, bfloat16 crosses as int16 and is reinterpreted on the other side."""
    import cupy

    try:
        with cupy.cuda.Device(index):
            imported = cupy.from_dlpack(
                torch.utils.dlpack.to_dlpack(torch.empty(1, dtype=torch.bfloat16, device=torch.device("cuda", index))))
            exported = torch.utils.dlpack.from_dlpack(cupy.empty(1, BFLOAT16).__dlpack__(stream=-1))
    except (BufferError, TypeError, ValueError, NotImplementedError, RuntimeError):
        return False
    return imported.dtype == BFLOAT16 and exported.dtype == torch.bfloat16


_EXTERNAL_STREAMS: dict = {}  # (stream pointer, device index) -> cupy.cuda.ExternalStream


def _cupy_stream(index: int):
    """CuPy's handle of torch's current stream on cuda:<index> (a wrapper, cached per pointer).

    ``torch._C._cuda_getCurrentRawStream`` is the pointer getter torch.compile's generated code
    calls before each launch; ``torch.cuda.current_stream`` would build a Stream object first.
    """
    import cupy

    key = (torch._C._cuda_getCurrentRawStream(index), index)
    stream = _EXTERNAL_STREAMS.get(key)
    if stream is None:
        with warnings.catch_warnings():  # CuPy 14 prefers Stream.from_external, which CuPy 13 lacks
            warnings.simplefilter("ignore", DeprecationWarning)
            stream = _EXTERNAL_STREAMS[key] = cupy.cuda.ExternalStream(*key)
    return stream


@functools.cache
def _torch_allocator(index: int):
    """A CuPy allocator drawing from torch's caching allocator on cuda:<index>.

    The block is allocated on torch's current stream, the one the kernels run on, and is
    released to torch when CuPy drops it; under CUDA-graph capture it comes from the
    graph's private pool, so intermediates stay reserved for replays.
    """
    import cupy

    device = torch.device("cuda", index)

    def malloc(nbytes: int):
        block = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(block.data_ptr(), nbytes, block, index), 0)

    return malloc


@contextlib.contextmanager
def _running_on(device: torch.device):
    """Make ``device`` and torch's current stream on it CuPy's current ones, and torch's caching
    allocator CuPy's (CPU: nothing to do).  torch's own current device is left alone: every
    torch call made inside names its device."""
    if device.type != "cuda":
        yield
        return
    import cupy

    index = device.index
    with cupy.cuda.Device(index), _cupy_stream(index), cupy.cuda.using_allocator(_torch_allocator(index)):
        yield


# ---------------------------------------------------------------------------------------
# Checks at the torch boundary (vsa_nd checks shapes and values with the same names).


def _device_key(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else f"cuda:{device.index}"


def _check_tensor(name: str, t, dtypes: dict, like: Optional[Tensor] = None, like_name: str = "q") -> Tensor:
    """A contiguous tensor on CPU or CUDA (``like``'s device) with a dtype that device takes."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type not in dtypes:
        raise TypeError(f"{name}: expected a tensor on cpu or cuda, got one on {t.device}")
    if like is not None and t.device != like.device:
        raise TypeError(f"{name}: expected a tensor on {like.device} like {like_name}, got one on {t.device}")
    allowed = dtypes[t.device.type]
    if t.dtype not in _NUMPY_DTYPE or _NUMPY_DTYPE[t.dtype] not in allowed:
        names = ", ".join(str(_TORCH_DTYPE[d]) for d in allowed)
        raise TypeError(f"{name}: expected dtype in ({names}) on {t.device.type}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}; pass {name}.contiguous()")
    return t


def _int_tensor(name: str, sizes, device: torch.device) -> Tensor:
    """Block sizes or index lists as a contiguous int32 tensor on ``device`` (plan tensors pass as they are)."""
    if isinstance(sizes, Tensor):
        if sizes.device != device:
            raise TypeError(f"{name}: expected a tensor on {device} like q, got one on {sizes.device}")
        if sizes.dtype.is_floating_point or sizes.dtype.is_complex or sizes.dtype == torch.bool:
            raise TypeError(f"{name}: expected an integer dtype, got {sizes.dtype}")
        return sizes.to(torch.int32).contiguous()
    array = np.asarray(sizes)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name}: expected ints or an integer tensor, got {array.dtype} values")
    return torch.from_numpy(array.astype(np.int32)).to(device)  # one host-to-device copy on CUDA


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---------------------------------------------------------------------------------------
# Custom ops.  Each takes and returns plain tensors; the public functions below check
# their arguments first.


def _run(device: torch.device, fn, *tensors, **static):
    """``fn`` on array views of ``tensors`` (None passes through), its array results as tensors."""
    with _running_on(device):
        results = fn(*(None if t is None else _as_array(t) for t in tensors), **static)
        if results is None:
            return None
        if isinstance(results, tuple):
            return tuple(None if r is None else _as_tensor(r) for r in results)
        return _as_tensor(results)


_FORWARD_RESULTS = tuple[(Tensor,) * (1 + len(_common.CONTEXT_FIELDS))]


def _forward_fake(q, k, v, gate, q_block_sizes, kv_block_sizes, topk, scale):
    specs = _common.forward_specs(q.shape, _NUMPY_DTYPE[q.dtype], k.shape, q_block_sizes.shape[0],
                                  kv_block_sizes.shape[0], topk)
    return tuple(q.new_empty(shape, dtype=_TORCH_DTYPE[dtype]) for shape, dtype in specs)


@torch.library.custom_op("vsa_nd::video_sparse_attn", mutates_args=())
def _vsa_op(q: Tensor, k: Tensor, v: Tensor, gate: Optional[Tensor], q_block_sizes: Tensor,
            kv_block_sizes: Tensor, topk: int, scale: float) -> _FORWARD_RESULTS:
    """(out, *CONTEXT_FIELDS): the output and what the backward pass needs."""
    return _run(q.device, _common.vsa_forward, q, k, v, gate, q_block_sizes, kv_block_sizes, topk=topk, scale=scale)


_vsa_op.register_fake(_forward_fake)


@torch.library.custom_op("vsa_nd::video_sparse_attn_inference", mutates_args=())
def _vsa_inference_op(q: Tensor, k: Tensor, v: Tensor, gate: Optional[Tensor], q_block_sizes: Tensor,
                      kv_block_sizes: Tensor, topk: int, scale: float) -> Tensor:
    """The output alone: no context to build, convert and free when nothing will be differentiated."""
    return _run(q.device, _common.vsa_inference, q, k, v, gate, q_block_sizes, kv_block_sizes, topk=topk, scale=scale)


@_vsa_inference_op.register_fake
def _(q, k, v, gate, q_block_sizes, kv_block_sizes, topk, scale):
    return torch.empty_like(q)


@torch.library.custom_op("vsa_nd::video_sparse_attn_backward", mutates_args=())
def _vsa_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, gate: Optional[Tensor], q_block_sizes: Tensor,
                     kv_block_sizes: Tensor, scale: float, out: Tensor, context: list[Tensor]) -> list[Tensor]:
    """[dq, dk, dv] and dgate when there is a gate."""
    grads = _run(q.device, _common.vsa_backward, dout, q, k, v, gate, q_block_sizes, kv_block_sizes, out, *context,
                 scale=scale)
    return [g for g in grads if g is not None]


@_vsa_backward_op.register_fake
def _(dout, q, k, v, gate, q_block_sizes, kv_block_sizes, scale, out, context):
    return [torch.empty_like(x) for x in (q, k, v, gate) if x is not None]


def _vsa_setup_context(ctx, inputs, output):
    q, k, v, gate, q_block_sizes, kv_block_sizes, _, scale = inputs
    ctx.scale = scale
    ctx.has_gate = gate is not None
    ctx.save_for_backward(q, k, v, gate, q_block_sizes, kv_block_sizes, *output)
    ctx.mark_non_differentiable(*output[1:])


def _vsa_backward(ctx, dout, *_context_grads):
    q, k, v, gate, q_block_sizes, kv_block_sizes, out, *context = ctx.saved_tensors
    # The incoming gradient may be broadcast or strided (e.g. from .sum()); the kernels read rows.
    grads = _vsa_backward_op(dout.contiguous(), q, k, v, gate, q_block_sizes, kv_block_sizes, ctx.scale, out, context)
    dgate = grads[3] if ctx.has_gate else None
    return grads[0], grads[1], grads[2], dgate, None, None, None, None


_vsa_op.register_autograd(_vsa_backward, setup_context=_vsa_setup_context)


@torch.library.custom_op("vsa_nd::block_sparse_attn", mutates_args=())
def _block_sparse_op(q: Tensor, k: Tensor, v: Tensor, kv_block_sizes: Tensor, q2k_idx: Tensor, q2k_num: Optional[Tensor],
                     scale: float) -> tuple[Tensor, Tensor]:
    """(out, lse) of the fine stage."""
    return _run(q.device, _block_sparse_arrays, q, k, v, kv_block_sizes, q2k_idx, q2k_num, scale=scale)


def _block_sparse_arrays(q, k, v, kv_block_sizes, q2k_idx, q2k_num, scale):
    return vsa_nd.block_sparse_attn(q, k, v, _common.trusted(kv_block_sizes), q2k_idx, q2k_num, scale=scale,
                                    return_lse=True)


@_block_sparse_op.register_fake
def _(q, k, v, kv_block_sizes, q2k_idx, q2k_num, scale):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("vsa_nd::tile", mutates_args=())
def _tile_op(x: Tensor, seq_shape: list[int], tile_shape: list[int]) -> Tensor:
    """x [B, S, H, D] -> [B, H, S_pad, D], pads zero."""
    return _run(x.device, _tile_arrays, x, seq_shape=seq_shape, tile_shape=tile_shape)


@torch.library.custom_op("vsa_nd::untile", mutates_args=())
def _untile_op(y: Tensor, seq_shape: list[int], tile_shape: list[int]) -> Tensor:
    """y [B, H, S_pad, D] -> [B, S, H, D]."""
    return _run(y.device, _untile_arrays, y, seq_shape=seq_shape, tile_shape=tile_shape)


@torch.library.custom_op("vsa_nd::tile_into", mutates_args=("out",))
def _tile_into_op(x: Tensor, out: Tensor, seq_shape: list[int], tile_shape: list[int]) -> None:
    """Fill the buffer ``out`` [B, H, S_pad, D] with the tiled x."""
    _run(x.device, _tile_arrays, x, out, seq_shape=seq_shape, tile_shape=tile_shape)


def _array_plan(like, seq_shape, tile_shape):
    return vsa_nd.tile_plan(tuple(seq_shape), tuple(tile_shape), device=device_key(like))


def _tile_arrays(x, out=None, *, seq_shape, tile_shape):
    result = vsa_nd.tile(x, _array_plan(x, seq_shape, tile_shape), out=out)
    return None if out is not None else result  # the caller already holds the buffer


def _untile_arrays(y, *, seq_shape, tile_shape):
    return vsa_nd.untile(y, _array_plan(y, seq_shape, tile_shape))


@_tile_op.register_fake
def _(x, seq_shape, tile_shape):
    b, _, h, d = x.shape
    return x.new_empty((b, h, _common.padded_len(seq_shape, tile_shape), d))


@_untile_op.register_fake
def _(y, seq_shape, tile_shape):
    b, h, _, d = y.shape
    return y.new_empty((b, math.prod(seq_shape), h, d))


def _tile_setup_context(ctx, inputs, output):
    ctx.shapes = inputs[1:]


_tile_op.register_autograd(lambda ctx, grad: (_untile_op(grad.contiguous(), *ctx.shapes), None, None),
                           setup_context=_tile_setup_context)
_untile_op.register_autograd(lambda ctx, grad: (_tile_op(grad.contiguous(), *ctx.shapes), None, None),
                             setup_context=_tile_setup_context)


# ---------------------------------------------------------------------------------------
# Public functions.


def tile_plan(seq_shape, tile_shape=None, *, device="cpu") -> TilePlan:
    """The cached :class:`TilePlan` of ``seq_shape`` cut into ``tile_shape`` with its index arrays
    as int32 tensors on ``device`` (views of :func:`vsa_nd.tile_plan`'s arrays; never write to them).

    ``tile_shape`` defaults to (64,), (8, 8) or (4, 4, 4) for 1-, 2- and 3-D sequences.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cpu", "cuda"):
        raise TypeError(f"device: expected a cpu or cuda device, got {device}")
    seq_shape, tile_shape = vsa_nd.tiling.normalize_shapes(seq_shape, tile_shape)
    return _cached_plan(seq_shape, tile_shape, device)


@functools.cache
def _cached_plan(seq_shape: tuple, tile_shape: tuple, device: torch.device) -> TilePlan:
    with _running_on(device):  # a CUDA plan is built on torch's current stream, like the calls that read it
        array_plan = vsa_nd.tile_plan(seq_shape, tile_shape, device=_device_key(device))
        return TilePlan.wrap(array_plan, device, _as_tensor)


@dataclass
class VSAMetadata:
    """A layer's VSA configuration: plan, ``topk`` and sparsity (see :func:`build_metadata`).

    With ``reuse_tile_buffer``, :meth:`VideoSparseAttention.tile` writes into
    ``tile_buffer`` (allocated on first use, reallocated when the shape, dtype or device
    changes) instead of a new tensor.
    """

    plan: TilePlan
    topk: int
    sparsity: float
    reuse_tile_buffer: bool = False
    tile_buffer: Optional[Tensor] = None


def build_metadata(latent_shape, patch_size, sparsity: float, tile_shape=None, *, device="cpu",
                   reuse_tile_buffer: bool = False) -> VSAMetadata:
    """Plan and ``topk`` for a latent of ``latent_shape`` patchified by ``patch_size`` (wraps
    :func:`vsa_nd.build_metadata`): ``seq_shape = latent_shape // patch_size`` per axis and
    ``topk = clamp(ceil((1 - sparsity) * N), 1, N)``."""
    meta = vsa_nd.build_metadata(latent_shape, patch_size, sparsity, tile_shape)
    plan = tile_plan(meta.plan.seq_shape, meta.plan.tile_shape, device=device)
    return VSAMetadata(plan, meta.topk, meta.sparsity, reuse_tile_buffer)


def tile(x: Tensor, plan, out: Optional[Tensor] = None) -> Tensor:
    """Reorder tokens into tiles: x [B, S, H, D] -> [B, H, S_pad, D], pad slots zero.

    ``plan`` is a :class:`TilePlan` (or a :class:`vsa_nd.TilePlan`).  Differentiable (the
    gradient is :func:`untile` of the incoming one).  With ``out`` ([B, H, S_pad, D], x's
    dtype and device, contiguous) the result is written there and ``out`` is returned: it
    aliases the buffer, and is not differentiable.
    """
    seq_shape, tile_shape = _common.plan_shapes(plan)
    _check_tensor("x", x, _common.TILE_DTYPES)
    if out is None:
        return _tile_op(x, list(seq_shape), list(tile_shape))
    _check_tensor("out", out, _common.TILE_DTYPES, like=x, like_name="x")
    if out.dtype != x.dtype:
        raise TypeError(f"out: expected dtype {x.dtype} to match x, got {out.dtype}")
    if _needs_grad(x):
        raise ValueError("out: tiling into a buffer is not differentiable; call tile(x, plan) without out "
                         "when x needs a gradient")
    _tile_into_op(x, out, list(seq_shape), list(tile_shape))
    return out


def untile(y: Tensor, plan) -> Tensor:
    """Undo :func:`tile`: y [B, H, S_pad, D] -> [B, S, H, D], pad slots dropped.  Differentiable
    (the gradient is :func:`tile` of the incoming one: pad slots get zero)."""
    seq_shape, tile_shape = _common.plan_shapes(plan)
    _check_tensor("y", y, _common.TILE_DTYPES)
    return _untile_op(y, list(seq_shape), list(tile_shape))


def video_sparse_attn(q: Tensor, k: Tensor, v: Tensor, topk: int, q_block_sizes, kv_block_sizes=None, *,
                      gate: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Video Sparse Attention on tiled tensors (see :func:`vsa_nd.video_sparse_attn`).

    q [B, H, Sq_pad, D]; k, v [B, H_kv, Skv_pad, D]; ``topk`` key tiles per query tile;
    ``q_block_sizes`` [N_q] and ``kv_block_sizes`` [N_kv] (default: ``q_block_sizes``) real
    tokens per tile, best ``plan.variable_block_sizes`` of a :func:`tile_plan` on q's device
    (other values are checked on every call, a host synchronisation on CUDA); ``gate``
    optional, q-shaped; ``scale`` default ``1/sqrt(D)``.  Returns out [B, H, Sq_pad, D] in
    q's dtype, differentiable with respect to q, k, v and gate.
    """
    _check_tensor("q", q, _common.ATTENTION_DTYPES)
    _check_tensor("k", k, _common.ATTENTION_DTYPES, like=q)
    _check_tensor("v", v, _common.ATTENTION_DTYPES, like=q)
    if gate is not None:
        _check_tensor("gate", gate, _common.ATTENTION_DTYPES, like=q)
    q_block_sizes = _int_tensor("q_block_sizes", q_block_sizes, q.device)
    kv_block_sizes = q_block_sizes if kv_block_sizes is None else _int_tensor("kv_block_sizes", kv_block_sizes, q.device)
    scale = _common.resolve_scale(scale, q.shape[-1])
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)):
        raise TypeError(f"topk: expected an int, got {type(topk).__name__} {topk!r}")
    args = (q, k, v, gate, q_block_sizes, kv_block_sizes, int(topk), scale)
    if _needs_grad(q, k, v, gate):
        return _vsa_op(*args)[0]
    return _vsa_inference_op(*args)


def block_sparse_attn(q: Tensor, k: Tensor, v: Tensor, kv_block_sizes, q2k_idx: Tensor, q2k_num: Optional[Tensor] = None,
                      *, scale: Optional[float] = None, return_lse: bool = False):
    """Fine stage only (see :func:`vsa_nd.block_sparse_attn`), forward only.

    q [B, H, Sq_pad, D]; k, v [B, H_kv, Skv_pad, D]; ``kv_block_sizes`` [N_kv];
    ``q2k_idx`` [B, H, N_q, L] and ``q2k_num`` [B, H, N_q] (default: all L) integer tensors
    on q's device (or ints).  Returns out [B, H, Sq_pad, D] (and lse [B, H, Sq_pad] float32, float64
    for float64 inputs, with ``return_lse``).  Index values are checked (on CUDA, one host
    synchronisation).  vsa_nd has no backward for the fine stage alone, so inputs that
    need a gradient are refused; differentiate :func:`video_sparse_attn` instead.
    """
    _check_tensor("q", q, _common.ATTENTION_DTYPES)
    _check_tensor("k", k, _common.ATTENTION_DTYPES, like=q)
    _check_tensor("v", v, _common.ATTENTION_DTYPES, like=q)
    if _needs_grad(q, k, v):
        raise ValueError("q, k, v: block_sparse_attn has no backward; call it under torch.no_grad() or "
                         "differentiate video_sparse_attn")
    kv_block_sizes = _int_tensor("kv_block_sizes", kv_block_sizes, q.device)
    q2k_idx = _int_tensor("q2k_idx", q2k_idx, q.device)
    if q2k_num is not None:
        q2k_num = _int_tensor("q2k_num", q2k_num, q.device)
    out, lse = _block_sparse_op(q, k, v, kv_block_sizes, q2k_idx, q2k_num, _common.resolve_scale(scale, q.shape[-1]))
    return (out, lse) if return_lse else out


class VideoSparseAttention(torch.nn.Module):
    """Drop-in VSA attention layer on untiled ``[B, S, H, D]`` tensors.

    :meth:`forward` tiles query, key, value (and the gate), runs :func:`video_sparse_attn`
    and untiles the result: it takes and returns ``[B, S, H, D]`` tokens in row-major order
    of ``metadata.plan.seq_shape``.  The tiled q, k, v of a forward pass are fresh tensors
    (they are alive together and kept for the backward, so they cannot share one buffer).

    :meth:`tile` / :meth:`preprocess_qkv` and :meth:`untile` / :meth:`postprocess_output`
    expose the two reorderings for callers that work on tiled tensors themselves.
    """

    def __init__(self, num_heads: int, head_size: int, softmax_scale: Optional[float] = None,
                 num_kv_heads: Optional[int] = None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: expected a divisor of num_heads={num_heads}, got {num_kv_heads}")
        self.num_heads, self.head_size, self.num_kv_heads = num_heads, head_size, num_kv_heads
        self.softmax_scale = _common.resolve_scale(softmax_scale, head_size)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_size={self.head_size}, num_kv_heads={self.num_kv_heads}, "
                f"softmax_scale={self.softmax_scale:.6g}")

    def tile(self, x: Tensor, metadata: VSAMetadata) -> Tensor:
        """x [B, S, H, D] -> [B, H, S_pad, D] (pads zero).

        Aliasing contract: with ``metadata.reuse_tile_buffer`` the result *is*
        ``metadata.tile_buffer`` and is valid only until the next :meth:`tile` /
        :meth:`preprocess_qkv` call with the same metadata, which overwrites it; consume or
        copy it before then.  It is not differentiable.  Without the flag the result is a
        new, differentiable tensor.
        """
        if not metadata.reuse_tile_buffer:
            return tile(x, metadata.plan)
        b, _, h, d = x.shape
        shape = (b, h, metadata.plan.padded_len, d)
        buffer = metadata.tile_buffer
        if buffer is None or buffer.shape != shape or buffer.dtype != x.dtype or buffer.device != x.device:
            buffer = metadata.tile_buffer = x.new_empty(shape)  # tile writes every slot, pads included
        return tile(x, metadata.plan, out=buffer)

    preprocess_qkv = tile

    def untile(self, y: Tensor, metadata: VSAMetadata) -> Tensor:
        """y [B, H, S_pad, D] -> [B, S, H, D] (a new tensor)."""
        return untile(y, metadata.plan)

    postprocess_output = untile

    def forward(self, query: Tensor, key: Tensor, value: Tensor, gate_compress: Optional[Tensor],
                metadata: VSAMetadata) -> Tensor:
        """query [B, S, H, D], key and value [B, S, H_kv, D], gate_compress None or query-shaped.

        Returns [B, S, H, D] in query's dtype: ``fine + gate_compress * coarse`` (``fine +
        coarse`` without a gate), with ``metadata.topk`` key tiles per query tile.
        """
        for name, x, heads in (("query", query, self.num_heads), ("key", key, self.num_kv_heads),
                               ("value", value, self.num_kv_heads)):
            if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[2] != heads or x.shape[3] != self.head_size:
                got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"{name}: expected shape [B, S, {heads}, {self.head_size}], got {got}")
        plan = metadata.plan
        q, k, v = (tile(x, plan) for x in (query, key, value))
        gate = None if gate_compress is None else tile(gate_compress, plan)
        out = video_sparse_attn(q, k, v, metadata.topk, plan.variable_block_sizes, gate=gate, scale=self.softmax_scale)
        return untile(out, plan)
