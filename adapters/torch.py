"""PyTorch adapter: vsa_nd on ``torch.Tensor`` (CPU and CUDA), through zero-copy views, with autograd.

Every function takes and returns torch tensors (it also takes any other array with ``__dlpack__``,
a NumPy, CuPy or JAX array say, as a torch view of its memory) in the layouts of :mod:`vsa_nd.ops`::

    x, gate_untiled      [B, S, H, D]           tokens in row-major order of seq_shape
    q, gate, out         [B, H, Sq_pad, D]      tiled (see tile), head-major
    k, v                 [B, H_kv, Skv_pad, D]  H % H_kv == 0
    block sizes          [N] int32 tensor on q's device (plan.variable_block_sizes), or ints

Dtypes: float32, float64, float16 and bfloat16 on CPU (Numba backend; half types computed
in float32); float16 and bfloat16 on CUDA (CuPy backend; tile/untile also take float32).

Conversion is zero-copy both ways.  On CPU through torch's NumPy bridge (``Tensor.numpy`` /
``torch.from_numpy``: one C call each, where the DLPack exchange runs Python code on torch's
side; read-only arrays, the cached plans', cross by DLPack, which carries the flag).  NumPy
has no bfloat16 that torch knows (and NumPy 2.x refuses DLPack's kDLBfloat), so on CPU
bfloat16 crosses as int16 and is reinterpreted on the other side (``.view``, no copy).  On
CUDA a contiguous tensor becomes a ``cupy.ndarray`` over its pointer (cheaper than a DLPack
capsule on a call's critical path, and cached by pointer, shape and dtype: see ``_as_array``), and results come back
as raw DLPack capsules (see below), bfloat16 directly where CuPy takes kDLBfloat both ways
(CuPy 14.2 does; probed once), else as int16 too.  A plan's tensors view vsa_nd's cached
plan arrays on CUDA; on CPU they are copies, since torch cannot keep the NumPy arrays'
read-only flag and an in-place change would reach every user of the cached plan.  A plan's
``variable_block_sizes`` tensor is not converted at all: while torch's version counter shows it
unchanged, it stands for the plan's own array, which vsa_nd trusts without a value check.

On CUDA each call runs on the tensor's device and on torch's current stream there (wrapped
as a ``cupy.cuda.ExternalStream``, cached per stream, and made current), with no host
synchronisation; the backward's dS hand-over also runs chunks on streams of its own, forked
from that stream by an event and joined back to it before the call returns.  Because both
libraries then run on the same stream, nothing crossing between them needs the DLPack
protocol's stream hand-off: results cross as raw capsules (CuPy's ``__dlpack__(stream=-1)``
into ``torch.utils.dlpack.from_dlpack``).  The memory vsa_nd
allocates (outputs and intermediates) comes from torch's caching allocator (raw allocations on
the current stream), so torch accounts for all memory and, under CUDA-graph capture,
intermediates come from the graph's private pool.  The large results (the VSA output, the
gradients, tile's and untile's results) are tensors torch allocated and vsa_nd wrote, so
``Tensor.record_stream`` works on them as on any torch result; it does nothing on the rest,
views of raw allocations: :func:`block_sparse_attn`'s output and lse, and the autograd context's
small tensors.  Every CUDA function can be captured in a CUDA graph, the VSA forward and backward
included (warm them up eagerly first: kernels compile and plans build on first use), given
block sizes from a plan and, for :func:`block_sparse_attn`, ``check_indices=False``: value
checks need the host, and under capture they raise a ValueError saying so.  CuPy
is imported only when a CUDA tensor is passed; this module never imports JAX.

Autograd: :func:`video_sparse_attn` differentiates q, k, v and gate through both VSA stages,
with the top-k selection a constant of the forward pass; pad query rows of dq and dgate are
zero.  :func:`tile` and :func:`untile` differentiate into each other.

Two paths, one implementation.  Every operation is a ``torch.library.custom_op``
(``vsa_nd::video_sparse_attn`` with its ``_inference`` and ``_backward`` siblings,
``vsa_nd::block_sparse_attn``, ``vsa_nd::tile``, ``vsa_nd::untile``, ``vsa_nd::tile_into``)
with a fake implementation and, where differentiable, registered autograd.  That is the path
``torch.compile``, ``torch.export`` and ``torch.jit.trace`` record, and the one taken under a
torch dispatch mode (FakeTensor, functionalization, FlopCounterMode, ...), a torch function mode
(``torch.device`` as a context manager or ``torch.set_default_device`` among them), a functorch
transform (``vmap`` works, as a loop of calls; torch refuses ``torch.func.grad``, ``vjp`` and
``jacrev`` for custom ops with registered autograd, and vsa_nd refuses them first in its own words,
:func:`_refuse_transforms`: differentiate with ``torch.autograd``) or with a tensor subclass as an
argument.  Dispatching
a custom op costs tens of microseconds of host time per call, and more with autograd, against a
few hundred for a whole VSA call on small shapes.  So a call in plain eager mode (none of the
above, every tensor exactly a ``torch.Tensor``: :func:`_plain_eager`) runs the same
implementation function directly, through a ``torch.autograd.Function`` (:class:`_VSAFunction`,
:class:`_ReorderFunction`) when an input needs a gradient.  Those save what the custom ops'
autograd saves (saved-tensor hooks and in-place modification checks see the same tensors),
their backwards run the same implementation (directly again in plain eager mode; the backward
op, which anyone can call with tensors from anywhere, first checks them as
``vsa_nd.video_sparse_attn_backward`` does, tens of microseconds of host time), and both
paths compute on the same views, so outputs and gradients are bit-identical.  On both paths the
VSA backward is not differentiable itself (a second backward through it raises), tile and
untile differentiate to any order, and ``tile(..., out=buffer)`` bumps the buffer's version
counter.  No operation has a forward-mode derivative: under ``torch.func.jvp``, ``jacfwd`` or
``hessian``, or given ``torch.autograd.forward_ad`` dual tensors, torch would silently give
their outputs zero tangents (or none), so every public function refuses a call whose inputs
carry tangents (:func:`_refuse_transforms`).

A prepared path for calls like one already made.  On CUDA, a plain eager call of
:func:`video_sparse_attn`, :func:`tile` or :func:`untile` whose signature (shapes, dtypes,
device, the plan or a plan's block-size tensors, topk, scale, whether it needs a gradient)
equals that of an earlier call which passed every check differs from it only in its tensors'
memory.  It checks just that (devices, contiguity, 16-byte alignment, the current device,
torch's modes, the plan tensors' version counters) and runs vsa_nd's prepared launches
(:mod:`vsa_nd.backends.cuda_vsa`, ``vsa_nd.backends.cuda.reorder``) on the tensors'
addresses, on torch's current stream, into tensors from torch's allocator: no CuPy view,
context or conversion.  With grad, its autograd node saves the context's small tensors as one
workspace, and its backward runs the prepared backward launches the same way (unless the
backward is itself differentiated, or runs under a mode).  Since that node saves fewer tensors,
a call with grad under saved-tensor hooks (activation checkpointing, which recomputes the
forward and wants the same tensors saved again; offloading) takes the checked path, whose node
saves what the custom op's does.  Outputs, the autograd context and
gradients are those of the checked path, bit for bit; any other call takes the checked path,
with its messages.  On small problems this is most of a call's host time (``BENCHMARKS.md``).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from . import _common  # (imports no framework: it comes first, for the message below)

try:
    import torch
    import torch.autograd.forward_ad as _forward_ad
    from torch import Tensor
except ModuleNotFoundError as error:  # an install without the 'torch' extra
    _common.raise_framework_missing(error, "torch", "PyTorch")

import vsa_nd
from vsa_nd import validation as check
from vsa_nd._xp import BFLOAT16, device_key
from vsa_nd.kernels import padded_head_dim
from vsa_nd.tiling import trusted_tile_volume


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
_TORCH_DTYPE = {v: k for k, v in _NUMPY_DTYPE.items()} | {np.dtype(np.uint8): torch.uint8}  # (uint8: workspaces)

# _common's tables of accepted dtypes per device type, in torch dtypes (same order, for the messages).
_ATTENTION_DTYPES, _TILE_DTYPES = ({device: tuple(_TORCH_DTYPE[d] for d in dtypes) for device, dtypes in table.items()}
                                  for table in (_common.ATTENTION_DTYPES, _common.TILE_DTYPES))


# ---------------------------------------------------------------------------------------
# Zero-copy views both ways, and the device/stream/allocator a CUDA call runs with.


# (pointer, shape, dtype, device index) -> a cupy.ndarray over that memory which owns nothing:
# the views _as_array hands out for contiguous CUDA tensors, kept because building one costs
# several microseconds on every call's critical path, while the tensors a training loop passes
# come back with the same pointers call after call (torch's caching allocator).  A view is only
# ever used while its call runs, when the caller holds the tensor; a later tensor at the same
# pointer with the same shape and dtype has exactly that view.  Cleared when it fills up.
_CUDA_VIEWS: dict = {}
_CUDA_VIEWS_MAX = 4096  # a training step of a 40-layer model passes ~1000 distinct tensors


def _as_array(t: Tensor):
    """A NumPy (CPU) or CuPy (CUDA) view of ``t``, sharing its memory, for use during one call.

    On CUDA a contiguous tensor is wrapped directly (a ``cupy.ndarray`` over its pointer, cached
    in ``_CUDA_VIEWS``: no DLPack capsule, which costs a few microseconds more per tensor on a
    call's critical path); others cross as a raw DLPack capsule.  Either way there is no stream
    hand-off, so the caller orders the two libraries' streams (inside :func:`_running_on` they
    are the same stream).  The cached views do not keep their tensors alive, so no view may
    outlive the call it was made for: no array this module turns into a tensor is an input's view
    (vsa_nd's results are fresh arrays, except those written into buffers: tile/untile with
    ``out=``, which return ``out`` itself and ``_tile_arrays`` drops, and ``_run``'s ``into``,
    returned as the tensors they view).  A GPU test checks every adapter call for it.
    """
    if t.is_cuda:
        if t.is_contiguous():
            key = (t.data_ptr(), t.shape, t.dtype, t.get_device())
            view = _CUDA_VIEWS.get(key)
            if view is None:
                if len(_CUDA_VIEWS) >= _CUDA_VIEWS_MAX:
                    _CUDA_VIEWS.clear()
                cupy, memory_pointer, unowned_memory = _cupy_parts()
                memory = unowned_memory(key[0], t.nbytes, None, key[3])
                view = _CUDA_VIEWS[key] = cupy.ndarray(t.shape, _NUMPY_DTYPE[t.dtype], memory_pointer(memory, 0))
            return view
        import cupy

        if t.dtype == torch.bfloat16 and not _cupy_takes_bfloat16(t.get_device()):
            return cupy.from_dlpack(torch.utils.dlpack.to_dlpack(t.view(torch.int16))).view(BFLOAT16)
        return cupy.from_dlpack(torch.utils.dlpack.to_dlpack(t))
    if t.requires_grad:  # Tensor.numpy refuses such a tensor; detaching only then saves a call
        t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BFLOAT16)
    return t.numpy()


@functools.cache
def _cupy_parts():
    """(cupy, MemoryPointer, UnownedMemory), imported on the first CUDA tensor."""
    import cupy
    from cupy.cuda import MemoryPointer, UnownedMemory

    return cupy, MemoryPointer, UnownedMemory


def _as_tensor(a) -> Tensor:
    """A torch view of a NumPy or CuPy array, sharing its memory (CuPy: a raw capsule, as in :func:`_as_array`)."""
    if isinstance(a, np.ndarray):
        bits = a.view(np.int16) if a.dtype == BFLOAT16 else a
        # torch.from_numpy warns on read-only arrays (it cannot mark a tensor read-only); DLPack 1.0 carries the flag.
        t = torch.from_numpy(bits) if bits.flags.writeable else torch.from_dlpack(bits)
        return t if bits is a else t.view(torch.bfloat16)
    if a.dtype == BFLOAT16 and not _cupy_takes_bfloat16(a.data.device_id):
        return torch.utils.dlpack.from_dlpack(a.view(np.int16).__dlpack__(stream=-1)).view(torch.bfloat16)
    return torch.utils.dlpack.from_dlpack(a.__dlpack__(stream=-1))


def _plan_copy(a: np.ndarray) -> Tensor:
    """A CPU tensor holding a copy of the read-only plan array ``a``."""
    return torch.from_numpy(a.copy())


# id(tensor) -> (tensor, array, version): the variable_block_sizes tensor of every cached plan of
# this module (see _cached_plan), the plan array it views or copies, and its version counter then
# (an in-place change bumps it).  The cache keeps the tensors alive, so an id here is never
# reused by another object.
_PLAN_BLOCK_SIZES: dict = {}


def _plan_array(t):
    """The plan array that ``t`` stands for when it is a cached plan's block-size tensor, unchanged, else None."""
    plan_entry = _PLAN_BLOCK_SIZES.get(id(t))
    if plan_entry is None or plan_entry[0] is not t:
        return None
    # A traced program sees no version (the ops it records check again when they run).
    if not torch.compiler.is_compiling() and t._version != plan_entry[2]:
        return None
    return plan_entry[1]


def _array_of(t: Optional[Tensor]):
    """What vsa_nd gets for ``t``: None for None; for a plan's block-size tensor the plan's own
    array (trusted by identity: no view, no pointer search, no value check); else :func:`_as_array`."""
    if t is None:
        return None
    plan_array = _plan_array(t)
    return _as_array(t) if plan_array is None else plan_array


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


def _cupy_stream(index: int):
    """CuPy's handle of torch's current stream on cuda:<index> (cached per pointer).

    ``torch._C._cuda_getCurrentRawStream`` is the pointer getter torch.compile's generated code
    calls before each launch; ``torch.cuda.current_stream`` would build a Stream object first.
    """
    return _common.external_stream(torch._C._cuda_getCurrentRawStream(index), index)


@functools.cache
def _torch_allocator(index: int):
    """A CuPy allocator drawing from torch's caching allocator on cuda:<index>.

    Each block is a raw allocation of torch's caching allocator (what
    ``torch.cuda.caching_allocator_alloc`` does, without its per-call argument handling and
    device switch: inside :func:`_running_on` the CUDA runtime's current device is already
    cuda:<index>), made on torch's current stream, the one the kernels run on, and handed back
    (``caching_allocator_delete``) when CuPy drops it.  Under CUDA-graph capture on that stream
    torch serves it from the graph's private pool, so intermediates stay reserved for replays.
    No tensor object is built per block: CuPy's ``PythonFunctionAllocator`` calls the two
    functions directly, which is what makes this cheap enough for every intermediate.
    The raw calls skip torch's lazy CUDA initialisation, so it is done here, once: a CUDA plan
    built before any other torch CUDA call would otherwise meet an allocator with no devices.
    """
    from cupy.cuda.memory import PythonFunctionAllocator

    torch.cuda.init()

    raw_alloc = torch._C._cuda_cudaCachingAllocator_raw_alloc
    raw_delete = torch._C._cuda_cudaCachingAllocator_raw_delete
    current_stream = torch._C._cuda_getCurrentRawStream

    def malloc(nbytes: int, device_id: int) -> int:
        return raw_alloc(nbytes, current_stream(index))

    def free(pointer: int, device_id: int) -> None:
        raw_delete(pointer)

    return PythonFunctionAllocator(malloc, free).malloc


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
    allocator = _torch_allocator(index)  # first: it initialises torch's CUDA state, which _cupy_stream reads
    with cupy.cuda.Device(index), _cupy_stream(index), cupy.cuda.using_allocator(allocator):
        yield


# ---------------------------------------------------------------------------------------
# Checks at the torch boundary (vsa_nd checks shapes and values with the same names).


def _device_key(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else f"cuda:{device.index}"


def _check_tensor(name: str, t, dtypes: dict, like: Optional[Tensor] = None, like_name: str = "q") -> Tensor:
    """A contiguous tensor on CPU or CUDA (``like``'s device) with a dtype that device takes
    (``dtypes``: device type -> torch dtypes)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    device = t.device
    allowed = dtypes.get(device.type)
    if allowed is None:
        raise TypeError(f"{name}: expected a tensor on cpu or cuda, got one on {device}")
    if like is not None and device != like.device:
        raise TypeError(f"{name}: expected a tensor on {like.device} like {like_name}, got one on {device}")
    if t.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise TypeError(f"{name}: expected dtype in ({names}) on {t.device.type}, got {t.dtype}")
    try:
        contiguous = t.is_contiguous()
    except RuntimeError:  # compressed sparse layouts (CSR, BSR, ...) have no contiguity to ask about
        contiguous = False
    if not contiguous:
        if t.layout != torch.strided:
            raise TypeError(f"{name}: expected a dense tensor, got layout {t.layout}; pass {name}.to_dense()")
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}; pass {name}.contiguous() "
                         "(another framework's array: a C-contiguous copy, as numpy.ascontiguousarray makes)")
    return t


def _viewed(name: str, x):
    """``x`` if it is a torch.Tensor (or None); another framework's array, any object with
    ``__dlpack__`` (a NumPy, CuPy or JAX array: VSA_SPEC section 4), as a torch view of its memory;
    anything else as it is, for the checks to refuse by name.  Inputs only: torch.from_dlpack
    drops a read-only flag, so no result is ever written through such a view.  On CUDA the
    DLPack hand-off orders the array's stream before torch's; ordering the other framework after
    the call's work on torch's stream is the caller's (as for any DLPack consumer)."""
    if x is None or isinstance(x, Tensor) or not hasattr(x, "__dlpack__"):
        return x
    if isinstance(x, np.ndarray) and x.dtype == BFLOAT16:  # DLPack has no ml_dtypes bfloat16: its bits, as torch's
        return _as_tensor(x)
    try:
        return torch.from_dlpack(x)
    except (BufferError, RuntimeError, TypeError, ValueError) as error:
        raise TypeError(f"{name}: expected a torch.Tensor or an array torch can view through DLPack; "
                        f"torch.from_dlpack refused this {type(x).__name__} ({error})") from None


def _check_attention_tensors(q, k, v, gate=None):
    """q, k, v (and gate) as :func:`_check_tensor` checks them, with no axis but the batch of length 0."""
    if _usual_attention_tensors(q, k, v, gate):
        return
    for name, t in (("q", q), ("k", k), ("v", v), ("gate", gate)):
        if t is not None or name != "gate":
            _check_tensor(name, t, _ATTENTION_DTYPES, like=None if name == "q" else q)
            check.check_nonempty(name, t)


def _usual_attention_tensors(q, k, v, gate) -> bool:
    """Whether q, k, v (and gate) pass :func:`_check_attention_tensors` in the usual way: plain
    tensors of one device and one dtype it takes, contiguous, none empty.  A quick test of the
    common case on every call's critical path; anything else gets the named checks."""
    if type(q) is not Tensor:
        return False
    device, dtype = q.device, q.dtype
    if dtype not in _ATTENTION_DTYPES.get(device.type, ()):
        return False
    try:
        for t in (q, k, v) if gate is None else (q, k, v, gate):
            if (type(t) is not Tensor or t.dtype != dtype or not t.is_contiguous() or not t.numel()
                    or (t is not q and t.device != device)):
                return False
    except RuntimeError:  # is_contiguous of a compressed sparse layout (CSR, BSR, ...): the named checks refuse it
        return False
    return True


def _int_tensor(name: str, sizes, device: torch.device) -> Tensor:
    """Block sizes or index lists as a contiguous int32 tensor on ``device`` (plan tensors pass as they are)."""
    if not isinstance(sizes, (Tensor, np.ndarray)):  # (NumPy values, like lists, are copied to the device below)
        check.refuse_plan(name, sizes)
        sizes = _viewed(name, sizes)
        if isinstance(sizes, Tensor) and sizes.device != device:  # another framework's values, elsewhere:
            sizes = sizes.to(device)                              # copied, as lists are
    if isinstance(sizes, Tensor):
        if _plan_array(sizes) is not None and sizes.device == device:
            return sizes  # a cached plan's int32 tensor, contiguous: nothing to check or convert
        if sizes.device != device:
            raise TypeError(f"{name}: expected a tensor on {device} like q, got one on {sizes.device}")
        if sizes.dtype.is_floating_point or sizes.dtype.is_complex or sizes.dtype == torch.bool:
            raise TypeError(f"{name}: expected an integer dtype, got {sizes.dtype}")
        if sizes.dtype != torch.int32:  # Tensor.to costs a dispatch even when it returns the tensor itself
            if torch.iinfo(sizes.dtype).bits > 32 or sizes.dtype == torch.uint32:
                # Saturate, not wrap (see vsa_nd.validation.int32_saturation).  clamp is not
                # implemented for unsigned tensors; a uint64 of 2**63 or more turns negative in
                # int64, which the checks refuse as well.
                sizes = sizes.to(torch.int64).clamp(*check.int32_saturation(np.int64))
            sizes = sizes.to(torch.int32)
        return sizes.contiguous()
    array = np.asarray(sizes)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name}: expected ints or an integer tensor, got {array.dtype} values")
    bounds = check.int32_saturation(array.dtype)
    if bounds is not None:
        array = np.asarray(np.clip(array, *bounds))  # (np.clip makes a 0-d array a NumPy scalar)
    return torch.from_numpy(array.astype(np.int32)).to(device)  # one host-to-device copy on CUDA


def _needs_grad(*tensors) -> bool:
    """Grad mode on and a tensor requiring grad: inside a functorch transform (``vmap``), the
    tensor a wrapper wraps, since the wrapper itself says False."""
    if not torch.is_grad_enabled():
        return False
    if any(t is not None and t.requires_grad for t in tensors):
        return True
    return torch._C._are_functorch_transforms_active() and any(_wraps_grad(t) for t in tensors if t is not None)


def _wraps_grad(t: Tensor) -> bool:
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
        if t.requires_grad:
            return True
    return False


def _plain_eager(*tensors) -> bool:
    """Whether a call on ``tensors`` (None allowed) may run its implementation without its custom
    op: nothing that must see the op is active, and every tensor is exactly a ``torch.Tensor``.

    Not torch.compile's tracing (checked first: Dynamo folds it to True and traces nothing
    after it), not ``torch.jit.trace`` (it records dispatched ops only), no torch dispatch mode
    (FakeTensor, make_fx/export's proxy mode, functionalization, FlopCounterMode, ...), no
    torch function mode, no functorch transform, and no tensor subclass (a FakeTensor, DTensor
    or ``__torch_function__`` subclass expects the dispatcher; Parameters, rare here, take it too).
    """
    if torch.compiler.is_compiling() or _mode_active():
        return False
    for t in tensors:
        if t is not None and type(t) is not Tensor:
            return False
    return True


def _refuse_transforms(op: str, *tensors, reverse: bool = True) -> None:
    """NotImplementedError where a transform vsa_nd's operations lack would differentiate this
    call of ``op`` on ``tensors`` (anything; None allowed).

    Forward mode: an input carries a tangent, as a ``torch.autograd.forward_ad`` dual tensor or
    under a ``torch.func`` jvp transform (``jvp``, ``jacfwd``, ``hessian``), at any level of the
    functorch wrappers (:func:`_has_tangent`); torch would give the outputs zero tangents, or
    none, without a word.  While torch.compile traces a call (fake tensors), an open dual level
    is refused: with ``fullgraph=True`` Dynamo's error then carries this message; without,
    Dynamo runs the call eagerly, where the exact check decides.

    With ``reverse``, also ``torch.func.grad``, ``vjp`` and ``jacrev`` of an input (a grad
    wrapper level requires grad), which torch refuses for custom ops with registered autograd
    in words about ``autograd.Function.setup_context``.

    Inputs the transform does not differentiate pass: constants, tensors computed from them
    inside it, and tensors only the outer ``torch.autograd`` differentiates.  Costs an
    attribute read and one call of torch's when no transform and no dual level is active."""
    functorch = torch._C._are_functorch_transforms_active()
    if not functorch and _forward_ad._current_level < 0:
        return
    if torch.compiler.is_compiling():  # traced tensors are fakes: a dual level open is all there is to go by
        forward, backward = _forward_ad._current_level >= 0, False
    else:
        tensors = [t for t in tensors if isinstance(t, Tensor)]
        forward = any(_has_tangent(t) for t in tensors)
        backward = reverse and functorch and torch.is_grad_enabled() and any(_grad_level_requires_grad(t)
                                                                            for t in tensors)
    if forward:
        raise NotImplementedError(
            f"vsa_nd: {op} has no forward-mode derivative (torch.func.jvp, jacfwd and hessian, and "
            f"torch.autograd.forward_ad's dual tensors); torch would give its output a zero tangent (or none), so "
            f"the call is refused. Differentiate in reverse mode (backward, torch.autograd.grad)")
    if backward:
        raise NotImplementedError(
            f"vsa_nd: {op} is differentiated by torch.autograd only; torch.func.grad, vjp and jacrev refuse custom "
            f"ops with registered autograd. Use loss.backward() or torch.autograd.grad (vmap works, as a loop of calls)")


# Both helpers below run eagerly, on the real tensors, also where Dynamo runs a call it could not
# trace (the refusal above, without fullgraph) and would otherwise trace them: that lost the tangent.
@torch.compiler.disable
def _has_tangent(t: Tensor) -> bool:
    """Whether ``t``, or a tensor that one of its functorch wrappers wraps, is a forward-AD dual
    with a tangent (batched levels are stepped over: ``unpack_dual`` refuses them)."""
    functorch = torch._C._functorch
    while True:
        if not functorch.is_batchedtensor(t) and _forward_ad.unpack_dual(t).tangent is not None:
            return True
        if not functorch.is_functorch_wrapped_tensor(t):
            return False
        t = functorch.get_unwrapped(t)


@torch.compiler.disable
def _grad_level_requires_grad(t: Tensor) -> bool:
    """Whether one of ``t``'s functorch wrapper levels requires grad (a torch.func grad transform
    differentiates it); the plain tensor under them all only the outer torch.autograd does."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if t.requires_grad:
            return True
        t = functorch.get_unwrapped(t)
    return False


def _mode_active() -> bool:
    """Whether ``torch.jit.trace``, a torch dispatch or function mode or a functorch transform is active."""
    return (torch._C._get_tracing_state() is not None or bool(torch._C._len_torch_dispatch_stack())
            or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active())


# ---------------------------------------------------------------------------------------
# Implementations: plain tensors in, plain tensors out, arguments checked by the public
# functions.  The custom ops below are these functions; a plain eager call runs them directly.


def _run(fn, *tensors, into: tuple = (), **static):
    """``fn`` on the arrays of ``tensors`` (:func:`_array_of`; the first one is not None and gives
    the device), its array results (an array, a tuple with None allowed, or None) as tensors.

    ``into``: tensors (None allowed) for ``fn``'s leading results, handed to it as ``results=``
    (their arrays) and returned in their place.  On CUDA the large results come from torch's
    allocator this way (:func:`_results_on`): a tensor viewing memory vsa_nd allocated, even
    from torch's caching allocator, is not the allocator's, and its ``record_stream`` does nothing."""
    first = tensors[0]
    if first.is_cuda:  # _running_on's contexts, entered directly: this is every CUDA call's critical path
        index = first.get_device()
        cuda = _cupy_parts()[0].cuda
        with cuda.Device(index), _cupy_stream(index), cuda.using_allocator(_torch_allocator(index)):
            return _call(fn, tensors, static, into)
    return _call(fn, tensors, static, into)


def _call(fn, tensors, static, into: tuple = ()):
    """:func:`_run` once the device is set up."""
    if into:
        static = dict(static, results=tuple(_array_of(t) for t in into))
    results = fn(*(_array_of(t) for t in tensors), **static)
    if results is None:
        return None
    if isinstance(results, tuple):
        return tuple(into) + tuple(None if r is None else _as_tensor(r) for r in results[len(into):])
    return into[0] if into else _as_tensor(results)


def _results_on(device: torch.device, *likes) -> tuple:
    """New tensors shaped as ``likes`` (None: None) for a call's large results on CUDA (see
    :func:`_run`); () elsewhere, where vsa_nd allocates them."""
    if device.type != "cuda":
        return ()
    return tuple(None if t is None else _empty(t.shape, t.dtype, device) for t in likes)


_FORWARD_RESULTS = tuple[(Tensor,) * (1 + len(_common.CONTEXT_FIELDS))]


def _vsa_forward(q: Tensor, k: Tensor, v: Tensor, gate: Optional[Tensor], q_block_sizes: Tensor,
                 kv_block_sizes: Tensor, topk: int, scale: float) -> _FORWARD_RESULTS:
    """(out, *CONTEXT_FIELDS): the output and what the backward pass needs."""
    return _run(_common.vsa_forward, q, k, v, gate, q_block_sizes, kv_block_sizes, topk=topk, scale=scale,
                into=_results_on(q.device, q))


def _vsa_inference(q: Tensor, k: Tensor, v: Tensor, gate: Optional[Tensor], q_block_sizes: Tensor,
                   kv_block_sizes: Tensor, topk: int, scale: float) -> Tensor:
    """The output alone: no context to build, convert and free when nothing will be differentiated."""
    return _run(_common.vsa_inference, q, k, v, gate, q_block_sizes, kv_block_sizes, topk=topk, scale=scale,
                into=_results_on(q.device, q))


def _vsa_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, gate: Optional[Tensor], q_block_sizes: Tensor,
                  kv_block_sizes: Tensor, scale: float, out: Tensor, context: list[Tensor],
                  trusted: bool = True) -> list[Tensor]:
    """[dq, dk, dv] and dgate when there is a gate.  ``trusted``: the arguments are what the
    forward saved, version-checked by autograd (False: checked, for the custom op, which anyone
    can call with tensors from anywhere)."""
    if dout.is_cuda and dout.data_ptr() % 16:  # the kernels load 16 bytes at a time; autograd's dout may
        dout = dout.clone()  # be a view starting anywhere (torch.cat's backward narrows its gradient)
    grads = _run(_common.vsa_backward, dout, q, k, v, gate, q_block_sizes, kv_block_sizes, out, *context,
                 scale=scale, trusted=trusted, into=_results_on(q.device, q, k, v, gate))
    return [g for g in grads if g is not None]


def _vsa_backward_checked(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, gate: Optional[Tensor],
                          q_block_sizes: Tensor, kv_block_sizes: Tensor, scale: float, out: Tensor,
                          context: list[Tensor]) -> list[Tensor]:
    """:func:`_vsa_backward` checking its context: the implementation of the custom op
    ``vsa_nd::video_sparse_attn_backward``, which traced backwards call but a user may call too
    (shapes, dtypes and devices checked, index lists cleaned on CUDA, as in
    :func:`vsa_nd.video_sparse_attn_backward`).  The plain eager backward calls _vsa_backward."""
    return _vsa_backward(dout, q, k, v, gate, q_block_sizes, kv_block_sizes, scale, out, context, trusted=False)


def _block_sparse(q: Tensor, k: Tensor, v: Tensor, kv_block_sizes: Tensor, q2k_idx: Tensor, q2k_num: Optional[Tensor],
                  q_block_sizes: Optional[Tensor], scale: float, check_indices: bool) -> tuple[Tensor, Tensor]:
    """(out, lse) of the fine stage."""
    return _run(_block_sparse_arrays, q, k, v, kv_block_sizes, q2k_idx, q2k_num, q_block_sizes, scale=scale,
                check_indices=check_indices)


def _block_sparse_arrays(q, k, v, kv_block_sizes, q2k_idx, q2k_num, q_block_sizes, scale, check_indices):
    return vsa_nd.block_sparse_attn(q, k, v, _common.trusted(kv_block_sizes), q2k_idx, q2k_num, scale=scale,
                                    return_lse=True, check_indices=check_indices,
                                    q_block_sizes=None if q_block_sizes is None else _common.trusted(q_block_sizes))


def _tile(x: Tensor, seq_shape: list[int], tile_shape: list[int]) -> Tensor:
    """x [B, S, H, D] -> [B, H, S_pad, D], pads zero."""
    return _reordered("tile", _tile_arrays, x, tuple(seq_shape), tuple(tile_shape))


def _untile(y: Tensor, seq_shape: list[int], tile_shape: list[int]) -> Tensor:
    """y [B, H, S_pad, D] -> [B, S, H, D]."""
    return _reordered("untile", _untile_arrays, y, tuple(seq_shape), tuple(tile_shape))


# tile and untile's side of the prepared path (see _CHECKED_FORWARDS): a CUDA call whose kind,
# shape, dtype, device and plan shapes equal those of a checked call only checks contiguity and
# the current device, and launches tile.cu on the addresses, into a tensor of torch's allocator.
class _CheckedReorder(NamedTuple):
    index: object  # the CuPy plan's slot_token_index (tile) or untile_index (untile)
    shape: tuple  # the result's
    other_len: int  # S_pad (tile) or S (untile): see vsa_nd.backends.cuda.reorder


_CHECKED_REORDERS: dict = {}  # (kind, shape, dtype, device index, seq_shape, tile_shape) -> _CheckedReorder
_CHECKED_REORDERS_MAX = 256  # cleared when full


def _reordered(kind: str, arrays_fn, x: Tensor, seq_shape: tuple, tile_shape: tuple) -> Tensor:
    """tile or untile of ``x`` (``arrays_fn`` on its arrays), by the prepared path where it may."""
    if not x.is_cuda:
        return _run(arrays_fn, x, seq_shape=seq_shape, tile_shape=tile_shape)
    index = x.get_device()
    key = (kind, x.shape, x.dtype, index, seq_shape, tile_shape)
    checked = _CHECKED_REORDERS.get(key)
    if checked is not None and x.is_contiguous() and torch._C._cuda_getDevice() == index:
        out = _empty(checked.shape, x.dtype, x.device)
        _cuda_backend()[0].reorder(kind, x.data_ptr(), checked.index.data.ptr, out.data_ptr(), x.shape, x.element_size(),
                                   checked.other_len, _cupy_stream(index))
        return out
    if x.dim() == 4:  # the result from torch's allocator (see _run); vsa_nd refuses other x by name
        out = _empty(_reordered_shape(kind, x.shape, seq_shape, tile_shape), x.dtype, x.device)
        _run(arrays_fn, x, out, seq_shape=seq_shape, tile_shape=tile_shape)
    else:
        out = _run(arrays_fn, x, seq_shape=seq_shape, tile_shape=tile_shape)
    if len(_CHECKED_REORDERS) >= _CHECKED_REORDERS_MAX:
        _CHECKED_REORDERS.clear()
    plan = _array_plan(seq_shape, tile_shape, _device_key(x.device))
    other_len = out.shape[2] if kind == "tile" else out.shape[1]
    _CHECKED_REORDERS[key] = _CheckedReorder(plan.slot_token_index if kind == "tile" else plan.untile_index,
                                             tuple(out.shape), other_len)
    return out


def _tile_into(x: Tensor, out: Tensor, seq_shape: list[int], tile_shape: list[int]) -> None:
    """Fill the buffer ``out`` [B, H, S_pad, D] with the tiled x."""
    _run(_tile_arrays, x, out, seq_shape=tuple(seq_shape), tile_shape=tuple(tile_shape))


@functools.cache
def _array_plan(seq_shape: tuple, tile_shape: tuple, device: str) -> vsa_nd.TilePlan:
    """vsa_nd's cached plan, looked up once per shape and device (its shapes come from a plan, already checked)."""
    return vsa_nd.tile_plan(seq_shape, tile_shape, device=device)


def _tile_arrays(x, out=None, *, seq_shape, tile_shape):
    result = vsa_nd.tile(x, _array_plan(seq_shape, tile_shape, device_key(x)), out=out)
    return None if out is not None else result  # the caller already holds the buffer


def _reordered_shape(kind: str, shape, seq_shape, tile_shape) -> tuple:
    """The shape of tile's or untile's result for an input of ``shape``."""
    if kind == "tile":  # x [B, S, H, D] -> [B, H, S_pad, D]
        b, _, h, d = shape
        return (b, h, _common.padded_len(seq_shape, tile_shape), d)
    b, h, _, d = shape  # y [B, H, S_pad, D] -> [B, S, H, D]
    return (b, math.prod(seq_shape), h, d)


def _untile_arrays(y, out=None, *, seq_shape, tile_shape):
    result = vsa_nd.untile(y, _array_plan(seq_shape, tile_shape, device_key(y)), out=out)
    return None if out is not None else result  # the caller already holds the buffer


# ---------------------------------------------------------------------------------------
# Custom ops: the implementations as dispatcher operators, with fake kernels (shapes and
# dtypes only) and autograd.


_vsa_op = torch.library.custom_op("vsa_nd::video_sparse_attn", _vsa_forward, mutates_args=())
_vsa_inference_op = torch.library.custom_op("vsa_nd::video_sparse_attn_inference", _vsa_inference, mutates_args=())
_vsa_backward_op = torch.library.custom_op("vsa_nd::video_sparse_attn_backward", _vsa_backward_checked,
                                           mutates_args=())
_block_sparse_op = torch.library.custom_op("vsa_nd::block_sparse_attn", _block_sparse, mutates_args=())
_tile_op = torch.library.custom_op("vsa_nd::tile", _tile, mutates_args=())
_untile_op = torch.library.custom_op("vsa_nd::untile", _untile, mutates_args=())
_tile_into_op = torch.library.custom_op("vsa_nd::tile_into", _tile_into, mutates_args=("out",))


@_vsa_op.register_fake
def _(q, k, v, gate, q_block_sizes, kv_block_sizes, topk, scale):
    specs = _common.forward_specs(q.shape, _NUMPY_DTYPE[q.dtype], k.shape, q_block_sizes.shape[0],
                                  kv_block_sizes.shape[0], topk)
    return tuple(q.new_empty(shape, dtype=_TORCH_DTYPE[dtype]) for shape, dtype in specs)


@_vsa_inference_op.register_fake
def _(q, k, v, gate, q_block_sizes, kv_block_sizes, topk, scale):
    return torch.empty_like(q)


@_vsa_backward_op.register_fake
def _(dout, q, k, v, gate, q_block_sizes, kv_block_sizes, scale, out, context):
    return [torch.empty_like(x) for x in (q, k, v, gate) if x is not None]


@_block_sparse_op.register_fake
def _(q, k, v, kv_block_sizes, q2k_idx, q2k_num, q_block_sizes, scale, check_indices):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=lse_dtype)


@_tile_op.register_fake
def _(x, seq_shape, tile_shape):
    return x.new_empty(_reordered_shape("tile", x.shape, seq_shape, tile_shape))


@_untile_op.register_fake
def _(y, seq_shape, tile_shape):
    return y.new_empty(_reordered_shape("untile", y.shape, seq_shape, tile_shape))


def _vsa_setup_context(ctx, inputs, output):
    q, k, v, gate, q_block_sizes, kv_block_sizes, _, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, gate, q_block_sizes, kv_block_sizes, *output)
    ctx.mark_non_differentiable(*output[1:])


def _vsa_input_grads(ctx, dout) -> tuple:
    """Gradients of the forward's inputs from what it saved (q, k, v, gate, block sizes, out, context),
    for both paths; the custom op when the backward itself must be traced or differentiated."""
    q, k, v, gate, q_block_sizes, kv_block_sizes, out, *context = ctx.saved_tensors
    # The incoming gradient may be broadcast or strided (e.g. from .sum()); the kernels read rows.
    dout = dout.contiguous()
    prepared = getattr(ctx, "prepared", None)
    if prepared is not None:  # the prepared forward saved its workspace: the context is views of it
        grads = _prepared_backward(prepared, dout, q, k, v, gate, out, context[0])
        if grads is not None:
            return *grads, None, None, None, None
        context = _context_views(context[0], prepared.context)
    args = (dout, q, k, v, gate, q_block_sizes, kv_block_sizes, ctx.scale, out, context)
    if _plain_eager(*args[:7], out, *context) and not _needs_grad(*args[:5]):
        grads = _vsa_backward(*args)
    else:  # e.g. create_graph=True: the op's autograd (_refuse_second_order) then refuses a second backward
        grads = _vsa_backward_op(*args)
    return grads[0], grads[1], grads[2], grads[3] if gate is not None else None, None, None, None, None


_vsa_op.register_autograd(lambda ctx, dout, *_context_grads: _vsa_input_grads(ctx, dout),
                          setup_context=_vsa_setup_context)


def _refuse_second_order(ctx, *grads):
    raise NotImplementedError(
        "vsa_nd: video_sparse_attn has first-order gradients only; its backward is not differentiable, so a "
        "backward through gradients taken with create_graph=True (a gradient penalty, a Hessian) is not supported")


_vsa_backward_op.register_autograd(_refuse_second_order, setup_context=lambda ctx, inputs, output: None)


def _tile_setup_context(ctx, inputs, output):
    ctx.shapes = inputs[1:]


_tile_op.register_autograd(lambda ctx, grad: (_reorder("untile", grad.contiguous(), *ctx.shapes), None, None),
                           setup_context=_tile_setup_context)
_untile_op.register_autograd(lambda ctx, grad: (_reorder("tile", grad.contiguous(), *ctx.shapes), None, None),
                             setup_context=_tile_setup_context)


# ---------------------------------------------------------------------------------------
# The plain eager path (see the module docstring): autograd Functions over the same
# implementations, and the choice between the two paths.


class _VSAFunction(torch.autograd.Function):
    """video_sparse_attn's autograd node in plain eager mode: saves what the custom op's autograd saves.

    The forward has already run when the node is built (``results`` is the output and context
    of :func:`_vsa_forward`): building a node costs tens of microseconds of host time, and
    spent after the launches it is off the GPU's critical path.
    """

    @staticmethod
    def forward(ctx, q, k, v, gate, q_block_sizes, kv_block_sizes, scale, results, prepared=None):
        """``results``: (out, *CONTEXT_FIELDS), or with ``prepared`` (the prepared path's
        :class:`_CheckedForward`) (out, workspace), the context tensors then made in the backward."""
        out, *context = results
        ctx.scale, ctx.prepared = scale, prepared
        ctx.save_for_backward(q, k, v, gate, q_block_sizes, kv_block_sizes, out, *context)
        return out

    @staticmethod
    def backward(ctx, dout):  # under create_graph=True this calls the backward op, as the custom op's autograd does
        return *_vsa_input_grads(ctx, dout), None  # one entry per forward argument


_apply_vsa = torch._C._FunctionBase.__dict__["apply"].__get__(None, _VSAFunction)  # see _prepared_forward
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _vsa(q, k, v, gate, q_block_sizes, kv_block_sizes, topk: int, scale: float, signature=None) -> Tensor:
    """The VSA output by the path that fits the call; with autograd when an input needs a gradient.
    ``signature``: the call's :func:`_forward_signature`, remembered when the checked call succeeds."""
    args = (q, k, v, gate, q_block_sizes, kv_block_sizes, topk, scale)
    needs_grad = _needs_grad(q, k, v, gate)
    if _plain_eager(q, k, v, gate, q_block_sizes, kv_block_sizes):
        if not needs_grad:
            out = _vsa_inference(*args)
        else:
            out = _VSAFunction.apply(q, k, v, gate, q_block_sizes, kv_block_sizes, scale, _vsa_forward(*args))
        if signature is not None and q.is_cuda:
            _remember_checked(signature, q, k, q_block_sizes, kv_block_sizes, topk, scale)
        return out
    return _vsa_op(*args)[0] if needs_grad else _vsa_inference_op(*args)


# The torch side of vsa_nd.video_sparse_attn's fast path (see _CHECKED_FORWARDS in vsa_nd.ops).
# A plain eager call on CUDA tensors whose signature (below) equals that of a call which passed
# every check, with a plan's block-size tensors (unchanged since: their version counters),
# differs from it only in its tensors' memory.  After the checks of that (device, contiguity,
# 16-byte alignment, the current device) and of torch's modes, it runs the prepared launches of
# vsa_nd.backends.cuda_vsa on the tensors' addresses, on torch's current stream, with results
# from torch's allocator: no other check, CuPy view, context or conversion.  Outputs and
# gradients are those of the checked path, bit for bit.
class _CheckedForward(NamedTuple):
    q_block_sizes: Tensor  # the plan tensors, kept so that their ids stay theirs
    kv_block_sizes: Tensor  # (q_block_sizes when the caller gave none)
    device_index: int
    problem: tuple  # the arguments of cuda_vsa.forward_launches but the kernel choice
    scale: float
    context: tuple  # _context_layout(problem)


_CHECKED_FORWARDS: dict = {}  # signature -> _CheckedForward
_CHECKED_FORWARDS_MAX = 256  # cleared when full


def _forward_signature(q, k, v, gate, topk, q_block_sizes, kv_block_sizes, scale):
    """Everything but the tensors' memory that the checks of a :func:`video_sparse_attn` call
    depend on, hashable; None for a call the prepared path does not take (under torch.compile's
    tracing, arguments that are not exactly tensors, a topk or scale of another type than int,
    or None and float)."""
    if torch.compiler.is_compiling():  # first: Dynamo folds it to True and traces nothing after it
        return None
    if not (type(q) is Tensor and type(k) is Tensor and type(v) is Tensor and (gate is None or type(gate) is Tensor)
            and type(q_block_sizes) is Tensor and (kv_block_sizes is None or type(kv_block_sizes) is Tensor)
            and type(topk) is int and (scale is None or type(scale) is float)) or not q.shape[0]:
        return None  # (an empty batch: nothing to launch)
    return (q.shape, q.dtype, k.shape, k.dtype, v.shape, v.dtype, None if gate is None else (gate.shape, gate.dtype),
            topk, scale, id(q_block_sizes), id(kv_block_sizes), _needs_grad(q, k, v, gate))


def _remember_checked(signature: tuple, q, k, q_block_sizes, kv_block_sizes, topk: int, scale: float):
    """After a checked call of ``signature`` (on CUDA, in plain eager mode): later calls of it may
    take the prepared launches, when the block sizes are plan tensors (the caller's own: the
    signature holds their ids)."""
    q_sizes, kv_sizes = _plan_array(q_block_sizes), _plan_array(kv_block_sizes)
    if q_sizes is None or kv_sizes is None:
        return
    if signature[-3] != id(q_block_sizes) or signature[-2] not in (id(kv_block_sizes), id(None)):
        return
    volume = q.shape[2] // q_block_sizes.shape[0]  # trusted by vsa_nd only as block sizes of tiles of their plan's volume
    if trusted_tile_volume(q_sizes) != volume or trusted_tile_volume(kv_sizes) != volume:
        return
    if len(_CHECKED_FORWARDS) >= _CHECKED_FORWARDS_MAX:
        _CHECKED_FORWARDS.clear()
    index = q.get_device()
    problem = (tuple(q.shape), tuple(k.shape), _NUMPY_DTYPE[q.dtype], q_block_sizes.shape[0], kv_block_sizes.shape[0],
               topk, scale, index)
    _CHECKED_FORWARDS[signature] = _CheckedForward(q_block_sizes, kv_block_sizes, index, problem, scale,
                                                   _context_layout(problem))


def _context_layout(problem: tuple) -> tuple:
    """Where the context's eight tensors (every result but out) lie in the workspace of
    ``ForwardLaunches.buffers`` for ``problem``: (torch dtype, shape, strides, offset in elements)
    each, for ``as_strided`` views of the workspace viewed as that dtype.  One allocation and
    eight views cost less host time than eight allocations (``torch.empty`` ~4 µs each)."""
    results, offsets, _ = _cuda_backend()[2].result_layout(*problem[:6])
    layout = []
    for (shape, dtype), offset in zip(results[1:], offsets):
        strides = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        layout.append((_TORCH_DTYPE[dtype], shape, strides, offset // dtype.itemsize))
    return tuple(layout)


def _context_views(workspace: Tensor, layout: tuple) -> tuple:
    """The context's tensors (CONTEXT_FIELDS order) as views of a prepared forward's workspace."""
    typed = {torch.float32: workspace.view(torch.float32), torch.int32: workspace.view(torch.int32)}
    return tuple(typed[dtype].as_strided(shape, strides, offset) for dtype, shape, strides, offset in layout)


@functools.cache
def _cuda_backend():
    """(vsa_nd.backends.cuda, .cuda_attention, .cuda_vsa), imported on first use (they import CuPy)."""
    from vsa_nd.backends import cuda, cuda_attention, cuda_vsa

    return cuda, cuda_attention, cuda_vsa


def _empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every result buffer of the prepared path (the tests swap in a poisoned one)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _prepared_forward(signature: tuple, q, k, v, gate):
    """The output of a call like one that passed every check, by the prepared launches; None when
    the call is not one, or its tensors' memory or torch's modes need the checked path."""
    checked = _CHECKED_FORWARDS.get(signature)
    if checked is None:
        return None
    index = checked.device_index
    q_sizes, kv_sizes = _plan_array(checked.q_block_sizes), _plan_array(checked.kv_block_sizes)
    if q_sizes is None or kv_sizes is None or torch._C._cuda_getDevice() != index:
        return None
    if not _launchable(index, q, k, v, gate) or _mode_active():  # (modes: see _plain_eager)
        return None
    _, cuda_attention, cuda_vsa = _cuda_backend()
    launches = cuda_vsa.forward_launches(*checked.problem, cuda_attention.FORWARD_KERNEL)
    needs_grad = signature[-1]
    if needs_grad and torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return None  # saved-tensor hooks see what a node saves: the checked path's node (module docstring)
    device = q.device
    # A workspace holds every result but out: without grad it is kept until the launches are
    # queued (then freed in the stream's order); with grad it is the context, saved for the backward.
    buffers, addresses = launches.buffers(lambda shape, dtype: _empty(shape, _TORCH_DTYPE[dtype], device),
                                          Tensor.data_ptr, False)
    launches(q.data_ptr(), k.data_ptr(), v.data_ptr(), 0 if gate is None else gate.data_ptr(), q_sizes.data.ptr,
             kv_sizes.data.ptr, addresses, _cupy_stream(index))
    if not needs_grad:
        return buffers[0]
    # The autograd node saves the workspace, and the backward makes the context's tensors from
    # it.  The base class's apply: Function.apply's own work is for functorch (no transform is
    # active, no input is a functorch wrapper) and binding default arguments (all are given).
    return _apply_vsa(q, k, v, gate, checked.q_block_sizes, checked.kv_block_sizes, checked.scale, buffers, checked)


def _launchable(index: int, *tensors) -> bool:
    """Whether every tensor of ``tensors`` (None allowed) lies on cuda:<index>, contiguous, at a
    16-byte aligned address: all the prepared launches ask of their memory.  (A functorch
    wrapper, say one that escaped a transform, has no data pointer.)"""
    for t in tensors:
        if t is not None and (t.get_device() != index or not t.is_contiguous() or _is_functorch_wrapped(t)
                              or t.data_ptr() % 16):
            return False
    return True


def _prepared_backward(checked: _CheckedForward, dout, q, k, v, gate, out, workspace):
    """(dq, dk, dv, dgate or None) of a prepared forward's node by the prepared backward launches
    (``cuda_vsa.BackwardLaunches``) on the tensors' addresses, on torch's current stream, with
    results and temporaries from torch's allocator; None where the call needs the checked path
    (a backward to be differentiated, an active mode, a dout of other memory or type)."""
    index = checked.device_index
    if (type(dout) is not Tensor or dout.dtype != q.dtype or dout.shape != q.shape or _mode_active()
            or torch._C._cuda_getDevice() != index or _needs_grad(dout, q, k, v, gate)):
        return None
    # The saved tensors are the forward's unless a saved-tensor hook made new ones: all checked.
    if not _launchable(index, dout, q, k, v, gate, out, workspace):
        return None
    q_sizes, kv_sizes = _plan_array(checked.q_block_sizes), _plan_array(checked.kv_block_sizes)
    if q_sizes is None or kv_sizes is None:
        return None
    _, _, cuda_vsa = _cuda_backend()
    q_shape, kv_shape, dtype, n_q, n_kv, topk, scale, _ = checked.problem
    launches = cuda_vsa.backward_launches(q_shape, kv_shape, dtype, n_q, n_kv, topk, scale, gate is not None, index)
    device = q.device
    grads = (_empty(q.shape, q.dtype, device), _empty(k.shape, k.dtype, device), _empty(v.shape, v.dtype, device),
             None if gate is None else _empty(gate.shape, gate.dtype, device))
    # The context's eight tensors in the workspace (CONTEXT_FIELDS order).
    base = workspace.data_ptr()
    lse, q2k_idx, q2k_num, q_mean, k_mean, v_mean, probs, coarse = (
        base + offset * dtype.itemsize for dtype, _, _, offset in checked.context)
    address = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    pointers = cuda_vsa.BackwardPointers(
        address(dout), address(q), address(k), address(v), address(gate), address(out), lse, q2k_idx, q2k_num,
        q_sizes.data.ptr, kv_sizes.data.ptr, q_mean, k_mean, v_mean, probs, coarse,
        *(address(g) for g in grads))
    launches(pointers, False, lambda shape, dtype: _empty(shape, _TORCH_DTYPE[dtype], device), Tensor.data_ptr,
             _cupy_stream(index))
    return grads


# kind -> (implementation, custom op, the other kind: its gradient)
_REORDERINGS = {"tile": (_tile, _tile_op, "untile"), "untile": (_untile, _untile_op, "tile")}


class _ReorderFunction(torch.autograd.Function):
    """tile or untile with autograd, in plain eager mode; the gradient of each is the other."""

    @staticmethod
    def forward(ctx, x, kind: str, seq_shape, tile_shape):
        implementation, _, ctx.inverse = _REORDERINGS[kind]
        ctx.shapes = (seq_shape, tile_shape)
        return implementation(x, seq_shape, tile_shape)

    @staticmethod
    def backward(ctx, grad):
        return _reorder(ctx.inverse, grad.contiguous(), *ctx.shapes), None, None, None


def _reorder(kind: str, x: Tensor, seq_shape, tile_shape) -> Tensor:
    """tile (``kind="tile"``) or untile of ``x`` by the path that fits the call."""
    implementation, op, _ = _REORDERINGS[kind]
    if not _plain_eager(x):
        return op(x, list(seq_shape), list(tile_shape))
    if _needs_grad(x):
        return _ReorderFunction.apply(x, kind, seq_shape, tile_shape)
    return implementation(x, seq_shape, tile_shape)


# ---------------------------------------------------------------------------------------
# Public functions.


def tile_plan(seq_shape, tile_shape=None, *, device="cpu") -> TilePlan:
    """The cached :class:`TilePlan` of ``seq_shape`` cut into ``tile_shape`` with its index arrays
    as int32 tensors on ``device``, shared by every caller of this plan: views of
    :func:`vsa_nd.tile_plan`'s arrays on CUDA, copies on CPU.  Do not write to them.  On CUDA a
    write changes vsa_nd's cached plan itself, which it trusts unchecked (as a write to a CuPy
    plan array would).  On CPU vsa_nd's plan stays as it was; a ``variable_block_sizes`` changed
    by an in-place torch operation (which bumps its version counter) is checked on every call,
    while a write torch does not count (through ``.numpy()`` or ``.data``) goes unseen: calls
    keep computing with the plan's own values.

    ``tile_shape`` defaults to (64,), (8, 8) or (4, 4, 4) for 1-, 2- and 3-D sequences.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise TypeError(f"device: expected a cpu or cuda device like 'cpu' or 'cuda:0', got {device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise TypeError(f"device: expected a cpu or cuda device, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device} asked for, but torch sees no CUDA device here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    seq_shape, tile_shape = vsa_nd.tiling.normalize_shapes(seq_shape, tile_shape)
    return _cached_plan(seq_shape, tile_shape, device)


@functools.cache
def _cached_plan(seq_shape: tuple, tile_shape: tuple, device: torch.device) -> TilePlan:
    # Not inference tensors, even when first asked for under torch.inference_mode(): the plan is
    # cached for later calls, which may train (saved for backward) and read its version counter.
    # A CUDA plan is built on torch's current stream, like the calls that read it.
    with torch.inference_mode(False), _running_on(device):
        array_plan = vsa_nd.tile_plan(seq_shape, tile_shape, device=_device_key(device))
        plan = TilePlan.wrap(array_plan, device, _as_tensor if device.type == "cuda" else _plan_copy)
    sizes = plan.variable_block_sizes
    _PLAN_BLOCK_SIZES[id(sizes)] = (sizes, array_plan.variable_block_sizes, sizes._version)
    if device.type == "cuda":
        # A static address for torch.compile: under mode="reduce-overhead" its CUDA graphs copy
        # every input that is not static into a buffer of their own on each call, and a copy of the
        # block sizes is no longer the plan's array, so vsa_nd would check its values, a copy to
        # the host that graph capture forbids.  This is what torch._dynamo.mark_static_address
        # does, without importing torch._dynamo (a second of start-up); a GPU test covers it.
        plan.variable_block_sizes._dynamo_static_input_type = "unguarded"
    return plan


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
    _refuse_transforms("tile", x, out)
    seq_shape, tile_shape = _common.plan_shapes(plan)
    x = _viewed("x", x)  # (out is written, so it must be a tensor: see _viewed)
    _check_tensor("x", x, _TILE_DTYPES)
    if out is None:
        return _reorder("tile", x, seq_shape, tile_shape)
    _check_tensor("out", out, _TILE_DTYPES, like=x, like_name="x")
    if out.dtype != x.dtype:
        raise TypeError(f"out: expected dtype {x.dtype} to match x, got {out.dtype}")
    if _needs_grad(x):
        raise ValueError("out: tiling into a buffer is not differentiable; call tile(x, plan) without out "
                         "when x needs a gradient")
    if out.requires_grad and torch.is_grad_enabled():
        raise ValueError("out: expected a buffer that does not require grad (tiling into it is an in-place write), "
                         "got one that does")
    if _plain_eager(x, out):
        _tile_into(x, out, seq_shape, tile_shape)
        torch.autograd.graph.increment_version(out)  # as the op's mutates_args does: in-place checks see out change
    else:
        _tile_into_op(x, out, list(seq_shape), list(tile_shape))
    return out


def untile(y: Tensor, plan) -> Tensor:
    """Undo :func:`tile`: y [B, H, S_pad, D] -> [B, S, H, D], pad slots dropped.  Differentiable
    (the gradient is :func:`tile` of the incoming one: pad slots get zero)."""
    _refuse_transforms("untile", y)
    seq_shape, tile_shape = _common.plan_shapes(plan)
    y = _viewed("y", y)
    _check_tensor("y", y, _TILE_DTYPES)
    return _reorder("untile", y, seq_shape, tile_shape)


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
    _refuse_transforms("video_sparse_attn", q, k, v, gate)
    signature = _forward_signature(q, k, v, gate, topk, q_block_sizes, kv_block_sizes, scale)
    if signature is not None:
        out = _prepared_forward(signature, q, k, v, gate)
        if out is not None:
            return out
    if not (type(q) is Tensor and type(k) is Tensor and type(v) is Tensor and (gate is None or type(gate) is Tensor)):
        q, k, v, gate = (_viewed(name, x) for name, x in (("q", q), ("k", k), ("v", v), ("gate", gate)))
    _check_attention_tensors(q, k, v, gate)
    q_block_sizes = _int_tensor("q_block_sizes", q_block_sizes, q.device)
    kv_name = "q_block_sizes" if kv_block_sizes is None else "kv_block_sizes"
    kv_block_sizes = q_block_sizes if kv_block_sizes is None else _int_tensor("kv_block_sizes", kv_block_sizes, q.device)
    scale = _common.resolve_scale(scale, q.shape[-1])
    # Checked here, not only by vsa_nd: a traced program takes their lengths and topk as static shapes of its results.
    if q_block_sizes.dim() != 1 or kv_block_sizes.dim() != 1:
        for name, sizes in (("q_block_sizes", q_block_sizes), (kv_name, kv_block_sizes)):
            if sizes.dim() != 1:
                raise ValueError(f"{name}: expected 1 dimension, got shape {list(sizes.shape)}")
    topk = check.check_int_range("topk", topk, 1, kv_block_sizes.shape[0])
    return _vsa(q, k, v, gate, q_block_sizes, kv_block_sizes, topk, scale, signature)


def block_sparse_attn(q: Tensor, k: Tensor, v: Tensor, kv_block_sizes, q2k_idx: Tensor, q2k_num: Optional[Tensor] = None,
                      *, scale: Optional[float] = None, return_lse: bool = False, check_indices: bool = True,
                      q_block_sizes=None):
    """Fine stage only (see :func:`vsa_nd.block_sparse_attn`), forward only.

    q [B, H, Sq_pad, D]; k, v [B, H_kv, Skv_pad, D]; ``kv_block_sizes`` [N_kv];
    ``q2k_idx`` [B, H, N_q, L] and ``q2k_num`` [B, H, N_q] (default: all L) integer tensors
    on q's device (or ints); ``q_block_sizes`` [N_q] (optional): rows past it in each query
    tile are pad rows, 0 (lse -inf) whatever q holds there.  Returns out [B, H, Sq_pad, D]
    (and lse [B, H, Sq_pad] float32, float64 for float64 inputs, with ``return_lse``).  Index
    values are checked (on CUDA, one host synchronisation, which CUDA graph capture forbids);
    ``check_indices=False`` skips that on CUDA for lists known to be valid, e.g. from vsa_nd's
    own selection (what unchecked lists do: :func:`vsa_nd.block_sparse_attn`).  vsa_nd has no backward for the fine stage alone, so
    inputs that need a gradient are refused; differentiate :func:`video_sparse_attn` instead.
    """
    _refuse_transforms("block_sparse_attn", q, k, v, reverse=False)  # (refused below, by name)
    q, k, v = (_viewed(name, x) for name, x in (("q", q), ("k", k), ("v", v)))
    _check_attention_tensors(q, k, v)
    if _needs_grad(q, k, v):
        raise ValueError("q, k, v: block_sparse_attn has no backward; call it under torch.no_grad() or "
                         "differentiate video_sparse_attn")
    kv_block_sizes = _int_tensor("kv_block_sizes", kv_block_sizes, q.device)
    q2k_idx = _int_tensor("q2k_idx", q2k_idx, q.device)
    if q2k_num is not None:
        q2k_num = _int_tensor("q2k_num", q2k_num, q.device)
    if q_block_sizes is not None:
        q_block_sizes = _int_tensor("q_block_sizes", q_block_sizes, q.device)
    args = (q, k, v, kv_block_sizes, q2k_idx, q2k_num, q_block_sizes, _common.resolve_scale(scale, q.shape[-1]),
            bool(check_indices))
    out, lse = _block_sparse(*args) if _plain_eager(*args[:7]) else _block_sparse_op(*args)
    return (out, lse) if return_lse else out


def _padded_head_dim(query: Tensor) -> int:
    """The head dim that :class:`VideoSparseAttention` zero-pads a CUDA call to (0: none): the
    next one the kernels take, for a smaller one they lack (past the largest, none: the kernels
    refuse it).  Exact: zero columns of q and k add nothing to any score (the layer passes the
    real head dim's scale), zero columns of v give zero output columns, which it drops, and the
    tile means keep both; the gradients of the real columns are the unpadded ones
    (test_numba_backend's test of the padding)."""
    dim = query.shape[-1]
    padded = padded_head_dim(dim) if query.device.type == "cuda" else None
    return 0 if padded is None or padded == dim else padded


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
        for name, value in (("num_heads", num_heads), ("head_size", head_size), ("num_kv_heads", num_kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
            if value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: expected a divisor of num_heads={num_heads}, got {num_kv_heads}")
        self.num_heads, self.head_size, self.num_kv_heads = num_heads, head_size, num_kv_heads
        self.softmax_scale = _common.resolve_scale(softmax_scale, head_size)
        if not (math.isfinite(self.softmax_scale) and self.softmax_scale > 0):
            raise ValueError(f"softmax_scale: expected a positive finite float, got {softmax_scale!r}")

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_size={self.head_size}, num_kv_heads={self.num_kv_heads}, "
                f"softmax_scale={self.softmax_scale:.6g}")

    def tile(self, x: Tensor, metadata: VSAMetadata) -> Tensor:
        """x [B, S, H, D] -> [B, H, S_pad, D] (pads zero).

        Aliasing contract: with ``metadata.reuse_tile_buffer`` the result *is*
        ``metadata.tile_buffer`` and is valid only until the next :meth:`tile` /
        :meth:`preprocess_qkv` call with the same metadata, which overwrites it; consume or
        copy it before then.  It is not differentiable: an ``x`` that needs a gradient is
        refused.  Without the flag the result is a new, differentiable tensor.
        """
        if not metadata.reuse_tile_buffer:
            return tile(x, metadata.plan)
        x = _check_tensor("x", _viewed("x", x), _TILE_DTYPES)
        if _needs_grad(x):
            raise ValueError("x: tiling into the metadata's reused buffer (reuse_tile_buffer=True) is not "
                             "differentiable; build the metadata without reuse_tile_buffer when x needs a gradient")
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
        coarse`` without a gate), with ``metadata.topk`` key tiles per query tile.  Unlike the
        functions, the layer takes strided views (e.g. ``qkv.unbind(2)`` of a fused projection):
        it copies them to contiguous memory first (one extra pass over each such input).  On
        CUDA, a head dim below 128 other than 64 is zero-padded to the next of the two for the
        kernels, which is exact, and costs the copies and the larger head dim's time.
        """
        if not isinstance(metadata, VSAMetadata):
            raise TypeError(f"metadata: expected the VSAMetadata of vsa_nd.adapters.torch.build_metadata, got "
                            f"{type(metadata).__module__}.{type(metadata).__name__}")
        plan = metadata.plan
        usual = _usual_attention_tensors(query, key, value, gate_compress)
        if not usual:
            query, key, value, gate_compress = (_viewed(name, x) for name, x in (
                ("query", query), ("key", key), ("value", value), ("gate_compress", gate_compress)))
            # Strided views (a fused QKV projection's q, k, v; a transposed layout) are copied to
            # contiguous memory here, as the layer's user would have to: tile's gather reads rows.
            query, key, value, gate_compress = (
                x.contiguous() if isinstance(x, Tensor) and x.layout == torch.strided else x
                for x in (query, key, value, gate_compress))
        checks = [("query", query, self.num_heads), ("key", key, self.num_kv_heads), ("value", value, self.num_kv_heads)]
        if gate_compress is not None:
            checks.append(("gate_compress", gate_compress, self.num_heads))
        for name, x, heads in checks:
            if not isinstance(x, Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 4 or x.shape[1] != plan.seq_len or x.shape[2] != heads or x.shape[3] != self.head_size:
                raise ValueError(f"{name}: expected shape [B, {plan.seq_len}, {heads}, {self.head_size}] "
                                 f"(seq_len of the plan's {plan.seq_shape}), got {list(x.shape)}")
        if gate_compress is not None and gate_compress.shape != query.shape:
            raise ValueError(f"gate_compress: expected query's shape {list(query.shape)}, got {list(gate_compress.shape)}")
        for name, x, _ in () if usual else checks:  # named here: tile and video_sparse_attn would say x, q, k, v, gate
            _check_tensor(name, x, _ATTENTION_DTYPES, like=None if x is query else query, like_name="query")
            if x.dtype != query.dtype:
                raise TypeError(f"{name}: expected dtype {query.dtype} to match query, got {x.dtype}")
        padded = _padded_head_dim(query)
        if padded:  # zero columns change no score and give zero output columns: exact (see _padded_head_dim)
            query, key, value, gate_compress = (
                None if x is None else torch.nn.functional.pad(x, (0, padded - self.head_size))
                for x in (query, key, value, gate_compress))
        q, k, v = (tile(x, plan) for x in (query, key, value))
        gate = None if gate_compress is None else tile(gate_compress, plan)
        out = video_sparse_attn(q, k, v, metadata.topk, plan.variable_block_sizes, gate=gate, scale=self.softmax_scale)
        return untile(out, plan)[..., :self.head_size].contiguous() if padded else untile(out, plan)
