"""JAX adapter: vsa_nd on ``jax.Array``, with ``jax.custom_vjp`` gradients.

The functions take and return JAX arrays (they also take NumPy arrays, and any other array with
``__dlpack__``, a torch tensor say, viewed through ``jax.dlpack.from_dlpack``) in the layouts of
:mod:`vsa_nd.ops`::

    x                    [B, S, H, D]           tokens in row-major order of seq_shape
    q, gate, out         [B, H, Sq_pad, D]      tiled (see tile), head-major
    k, v                 [B, H_kv, Skv_pad, D]  H % H_kv == 0
    block sizes          [N] integer array, or ints (plan.variable_block_sizes)

Dtypes: float32, float64 (with ``jax_enable_x64``), float16 and bfloat16 on CPU; float16 and
bfloat16 on GPU (tile/untile also take float32).  JAX arrays are immutable, so there is no
``out`` buffer here.  ``topk`` and ``scale`` are Python numbers (or concrete 0-d JAX arrays):
under ``jax.jit`` make them static arguments or close over them.  Gradients are first-order
reverse mode (``jax.grad``, ``jax.vjp``, under ``jit`` and ``vmap`` too); forward mode
(``jax.jvp``, ``jax.hessian``) and gradients of gradients raise.  Eager results on the CPU lie
where ``jit`` would place them for single-device inputs: on a committed input's device, else on
the default one.

Where it runs:

- **CPU** — the Numba backend, on NumPy views of the operands (zero-copy; results are
  copied into JAX buffers).
- **GPU** — the CUDA backend, on CuPy views of the operands (zero-copy): eagerly through
  DLPack (``cupy.from_dlpack`` and ``jax.dlpack.from_dlpack``) on the array's device and
  CuPy's current stream (JAX has no current-stream notion; DLPack's stream hand-off orders
  the work after JAX's producer and JAX's consumers after it).  bfloat16 crosses DLPack
  directly where CuPy reads kDLBfloat, else as int16 with a bitcast on the JAX side.
- **Under** ``jax.jit`` (and inside other traced code), on either: each call is one XLA
  foreign-function call (``jax.ffi.ffi_call`` of a ``ctypes`` handler, ``_xla_ffi``) that runs
  the same vsa_nd function on views of XLA's buffers, on GPU on XLA's own stream with no host
  synchronisation.  vsa_nd writes the large results (out, dq, dk, dv, dgate, tile/untile)
  straight into XLA's result buffers (``out=``); the small ones (the backward's context) are
  copied.  Costs of that route: the handler is Python, run on XLA's dispatching thread
  (0.3-0.6 ms of host time per call besides vsa_nd's own, which a GPU-bound program hides
  when calls are queued back to back); vsa_nd's intermediates come from CuPy's memory pool,
  beside XLA's preallocated share; errors that shapes and dtypes decide are raised while
  tracing, but vsa_nd's value errors surface as JAX's runtime error carrying vsa_nd's
  message (so does a dtype the GPU refuses, e.g. float32 attention: at trace time a GPU
  process cannot tell where XLA will place the program); under ``vmap``
  XLA loops over the batch and calls vsa_nd once per element (correct, but no faster than a
  Python loop of jitted calls: fold a batch into B where you can).
  Pass a plan's ``variable_block_sizes`` (:func:`tile_plan`) closed over, not as a jitted
  function's argument: then they are no operand of the program and vsa_nd trusts them;
  block sizes that are operands are checked in each call, on GPU with a host
  synchronisation.

Several devices: inside ``shard_map`` each device runs vsa_nd on its own shard, split over
the batch or the heads (q's heads and k's and v's alike: q head h reads kv head h // (H / H_kv)
of its shard, so k and v may stay replicated while q's heads are split only where H_kv = 1),
never the tokens (each call attends within its own shard's tokens; with the plan's block sizes
a token shard fails vsa_nd's shape checks, but not with block sizes sharded alike).  Results
are typed as varying over the mesh axes their operands vary over, so an array every device
shares (replicated k, v or gate) gets its gradient summed over the devices.  Under plain
``jax.jit``, XLA has no partitioning rule for the foreign call: it gathers sharded operands and
every device runs the whole call (replicated results, no faster than one device): ``shard_map``
splits the work.  ``jax.pmap`` runs one call per device.  An error vsa_nd raises on some
devices only (a value check of one shard's index lists, say) leaves the others waiting in the
program's collectives: on the CPU, XLA then ends the process after its rendezvous timeout
(40 s) without vsa_nd's message.

Gradients: :func:`video_sparse_attn` differentiates q, k, v and gate through both VSA
stages, with the top-k selection a constant of the forward; :func:`tile` and
:func:`untile` differentiate into each other; :func:`block_sparse_attn` has no backward.
This module never imports PyTorch, and imports CuPy only for GPU arrays.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from . import _common  # (imports no framework: it comes first, for the message below)

try:
    import jax
    import jax.numpy as jnp
except ModuleNotFoundError as error:  # an install without the 'jax' extra
    _common.raise_framework_missing(error, "jax", "JAX")

import vsa_nd
from vsa_nd import ops
from vsa_nd import validation as check
from vsa_nd._xp import BFLOAT16, device_key


TilePlan = _common.AdaptedTilePlan

__all__ = ["TilePlan", "block_sparse_attn", "build_metadata", "tile", "tile_plan", "untile", "video_sparse_attn"]


# ---------------------------------------------------------------------------------------
# Running a NumPy/CuPy function on JAX arrays.


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


# ---- shard_map: the mesh axes a value varies over ------------------------------------------
#
# Inside ``shard_map`` (with its default check_vma=True) JAX types every value with the manual
# mesh axes it varies over, and its AD relies on those types: an input that is the same on every
# device (invariant) but meets varying ones is cast to varying first, and that cast's transpose
# sums its cotangent over the devices.  An XLA foreign-function call has no such rule: it takes
# operands that vary alike, and its results are typed invariant whatever its operands were.
# Typed so, a result that differs per device could leave shard_map as if replicated
# (``out_specs=P()`` takes device 0's) and its gradient's type would not match its input's.  So
# the public functions cast their array operands to the axes any of them varies over before
# the custom_vjp (invariant inputs then get summed cotangents), and _call types each foreign
# call's results like its operands.  Outside shard_map, or with check_vma=False, nothing varies
# and nothing is cast.  (JAX 0.10 and 0.11, tested, name the type ``aval.manual_axis_type.varying``
# and the cast ``lax.pcast(..., to="varying")``; earlier ones with shard_map's check_vma name
# them ``aval.vma`` and ``lax.pvary``, untested here.)


def _varying_axes(x) -> frozenset:
    """The manual mesh axes over which the traced array x varies (empty outside shard_map)."""
    aval = jax.typeof(x) if hasattr(jax, "typeof") else getattr(x, "aval", None)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def _cast_varying(x, axes: frozenset):
    """x typed as varying over ``axes`` too (the values are not changed)."""
    missing = tuple(sorted(axes - _varying_axes(x), key=str))
    if not missing:
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, missing, to="varying")
    return jax.lax.pvary(x, missing)


def _vary_alike(*arrays) -> tuple:
    """``(arrays, axes)``: ``axes`` the manual mesh axes any traced one of ``arrays`` (JAX arrays
    or anything else, passed as it is) varies over, and every JAX array cast to vary over them."""
    axes = frozenset().union(*(_varying_axes(a) for a in arrays if _is_traced(a)))
    if not axes:
        return arrays, axes
    return tuple(_cast_varying(a, axes) if isinstance(a, jax.Array) else a for a in arrays), axes


def _platform(x):
    """"cpu" or "gpu": the kind of device that holds x.  A traced array's device is known only
    once XLA places the program: "cpu" when JAX's default backend is the CPU, else None (a
    process whose default backend is a GPU may still place a program on its CPU)."""
    if _is_traced(x):
        return "cpu" if jax.default_backend() == "cpu" else None
    if isinstance(x, jax.Array):
        return next(iter(x.devices())).platform
    return "cpu"  # a host array (e.g. a NumPy constant inside a transformation)


@jax.tree_util.register_static
@dataclass(frozen=True)
class _PlanSizes:
    """The block sizes of the cached plan of (seq_shape, tile_shape), passed by name.

    Handed to vsa_nd as the plan's own array on the device that runs the call, which vsa_nd
    trusts without a value check (on GPU a host synchronisation, which inside an XLA program
    would stall it); under ``jax.jit`` they are no operand of the program at all.  A static
    pytree: no leaves, nothing to differentiate.
    """

    seq_shape: tuple
    tile_shape: tuple
    num_blocks: int

    def on(self, like):
        """The plan's block sizes on ``like``'s device (a NumPy or CuPy array)."""
        return _array_plan(self.seq_shape, self.tile_shape, like).variable_block_sizes


_BUILT: set = set()  # (seq_shape, tile_shape, device key) of the plans _array_plan has made sure of


def _array_plan(seq_shape: tuple, tile_shape: tuple, like):
    """vsa_nd's cached plan on ``like``'s device (NumPy or CuPy).

    Under jit the caller runs on XLA's stream, while the plan it may build first is cached for
    every stream of the process: on GPU a plan is therefore built on CuPy's null stream and
    waited for, once, before anyone uses it.
    """
    key = (seq_shape, tile_shape, device_key(like))
    if key in _BUILT or isinstance(like, np.ndarray):
        return vsa_nd.tile_plan(seq_shape, tile_shape, device=key[2])
    import cupy

    with cupy.cuda.Stream.null:
        plan = vsa_nd.tile_plan(seq_shape, tile_shape, device=key[2])
        cupy.cuda.Stream.null.synchronize()
    _BUILT.add(key)
    return plan


def _bind(fn, args, static):
    """``run(operands, results=None)``: ``fn(*args, **static, results=results)`` with the array
    arguments taken from ``operands`` (NumPy or CuPy, in order), ``None`` passed as it is and a
    :class:`_PlanSizes` as its array; the results as a tuple without ``None``.  ``results``
    (under jit: views of XLA's result buffers) are buffers ``fn`` may fill and return instead
    of new arrays.  Also a description of the call that names all but the operands (the XLA
    call's key)."""
    kinds = tuple(None if a is None else a if isinstance(a, _PlanSizes) else "array" for a in args)

    def run(operands, results=None):
        arrays = iter(operands)
        full = [k if k is None else next(arrays) if k == "array" else k.on(operands[0]) for k in kinds]
        return _present(fn(*full, **static, results=results))

    names = ["-" if k is None else "a" if k == "array" else f"plan{k.seq_shape}{k.tile_shape}" for k in kinds]
    description = f"{fn.__module__}.{fn.__qualname__}({', '.join(names)}; {sorted(static.items())!r})"
    return run, description


def _call(fn, specs, *args, **static):
    """``fn(*arrays, **static)`` on NumPy (CPU) or CuPy (GPU) views of ``args``.

    ``args`` holds JAX arrays, ``None`` (passed as it is) and :class:`_PlanSizes`; ``specs`` is
    a tuple of ``jax.ShapeDtypeStruct``, one per non-None result of ``fn``; returns a tuple of
    JAX arrays.  Concrete arrays run eagerly (so vsa_nd's errors reach the caller as they are);
    traced ones (``jax.jit``) become one XLA foreign-function call (see ``_xla_ffi``), where an
    error of vsa_nd surfaces as JAX's runtime error carrying vsa_nd's message.
    """
    run, description = _bind(fn, args, static)
    operands = [a for a in args if a is not None and not isinstance(a, _PlanSizes)]
    if any(_is_traced(a) for a in operands):
        if not hasattr(jax, "ffi"):
            raise TypeError(f"vsa_nd under jax.jit (or another transformation) needs jax.ffi, which JAX "
                            f"{jax.__version__} lacks: upgrade JAX, or call vsa_nd outside the transformation")
        from . import _xla_ffi

        _xla_ffi.register_call(description, run)
        # Under vmap, XLA loops over the batch and calls vsa_nd once per element (unbatched
        # operands as they are), so the handler only ever sees the shapes it was described with.
        call = jax.ffi.ffi_call(_xla_ffi.target(), specs, vmap_method="sequential")
        operands, axes = _vary_alike(*operands)
        return tuple(_cast_varying(r, axes) for r in call(*operands, call=description))
    if _platform(operands[0]) == "cpu":
        results = run([np.asarray(a) for a in operands])
        committed = [a for a in operands if getattr(a, "committed", False) and len(a.devices()) == 1]
        if committed:  # placed as jit places them: on the committed input's device, not the default one
            device = next(iter(committed[0].devices()))
            return tuple(jax.device_put(r, device) for r in results)
        return tuple(jnp.asarray(r) for r in results)
    return _on_gpu(operands, run)


def _present(results) -> tuple:
    return tuple(r for r in (results if isinstance(results, tuple) else (results,)) if r is not None)


def _on_gpu(operands, run) -> tuple:
    import cupy

    with cupy.cuda.Device(next(iter(operands[0].devices())).id):
        return tuple(_from_cupy(r) for r in run([_to_cupy(a) for a in operands]))


@functools.cache
def _cupy_reads_bfloat16() -> bool:
    """Whether this CuPy takes DLPack's bfloat16 (kDLBfloat) both ways (probed once)."""
    import cupy

    try:
        cupy.from_dlpack(jnp.zeros(1, jnp.bfloat16, device=jax.devices("gpu")[0]))
        jax.dlpack.from_dlpack(cupy.zeros(1, BFLOAT16))
    except (BufferError, TypeError, ValueError, NotImplementedError, RuntimeError):
        return False
    return True


def _to_cupy(x):
    import cupy

    if x.dtype == jnp.bfloat16 and not _cupy_reads_bfloat16():
        return cupy.from_dlpack(jax.lax.bitcast_convert_type(x, jnp.int16)).view(BFLOAT16)
    return cupy.from_dlpack(x)


def _from_cupy(a):
    if a.dtype == BFLOAT16 and not _cupy_reads_bfloat16():
        return jax.lax.bitcast_convert_type(jax.dlpack.from_dlpack(a.view(np.int16)), jnp.bfloat16)
    return jax.dlpack.from_dlpack(a)


# ---------------------------------------------------------------------------------------
# Checks at the JAX boundary (vsa_nd checks shapes and values with the same names).


# Dtypes per JAX platform ("gpu" is the device kind _common calls "cuda").
_ATTENTION_DTYPES = {"cpu": _common.ATTENTION_DTYPES["cpu"], "gpu": _common.ATTENTION_DTYPES["cuda"]}
_TILE_DTYPES = {"cpu": _common.TILE_DTYPES["cpu"], "gpu": _common.TILE_DTYPES["cuda"]}


def _check_array(name: str, x, dtypes: dict, like=None, like_name: str = "q"):
    """x as a JAX array (NumPy arrays are put on JAX's default device, as jax.numpy does) on a
    platform in ``dtypes`` (``like``'s devices), with a dtype that platform takes.

    A traced array whose platform is not known yet (a GPU process: see :func:`_platform`) is
    held to the dtypes some platform takes; one that its platform refuses then fails when the
    program runs, with vsa_nd's message (e.g. float32 attention on a GPU)."""
    if isinstance(x, np.ndarray):
        x = jnp.asarray(x)
    elif not isinstance(x, jax.Array) and hasattr(x, "__dlpack__"):  # another framework's array (VSA_SPEC section 4)
        x = _from_dlpack(name, x)
    if not isinstance(x, jax.Array):
        raise TypeError(f"{name}: expected a jax.Array or NumPy array, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name}: expected 4 dimensions, got shape {tuple(x.shape)}")
    platform = _platform(x)
    if platform is not None and platform not in dtypes:
        raise TypeError(f"{name}: expected an array on cpu or gpu, got one on {platform}")
    if like is not None and not _is_traced(x) and not _is_traced(like) and x.devices() != like.devices():
        raise TypeError(f"{name}: expected an array on {like.devices()} like {like_name}, got one on {x.devices()}")
    allowed = dtypes[platform] if platform is not None else tuple(dict.fromkeys(d for ds in dtypes.values() for d in ds))
    if np.dtype(x.dtype) not in allowed:
        names = ", ".join(np.dtype(d).name for d in allowed)
        where = platform or " or ".join(dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}) on {where}, got {x.dtype}")
    return x


def _from_dlpack(name: str, x):
    """A JAX array over the memory of ``x``, an object with ``__dlpack__`` (a torch tensor, a CuPy array)."""
    try:
        return jax.dlpack.from_dlpack(x)
    except (BufferError, RuntimeError, TypeError, ValueError) as error:
        raise TypeError(f"{name}: expected a jax.Array or an array JAX can view through DLPack; "
                        f"jax.dlpack.from_dlpack refused this {type(x).__name__} ({error})") from None


def _check_attention_arrays(q, k, v, gate=None) -> tuple:
    """q, k, v and gate (or None) as :func:`_check_array` gives them, with no axis but the batch of length 0."""
    q = _check_array("q", q, _ATTENTION_DTYPES)
    k, v = (_check_array(name, x, _ATTENTION_DTYPES, like=q) for name, x in (("k", k), ("v", v)))
    gate = None if gate is None else _check_array("gate", gate, _ATTENTION_DTYPES, like=q)
    for name, x in (("q", q), ("k", k), ("v", v), ("gate", gate)):
        if x is not None:
            check.check_nonempty(name, x)
    return q, k, v, gate


def _int_array(name: str, x, ndim: int):
    """Block sizes ([N], ``ndim`` 1) or index lists as an int32 JAX array of ``ndim`` dimensions."""
    if not isinstance(x, jax.Array):
        check.refuse_plan(name, x)
        x = np.asarray(x)
    if not np.issubdtype(np.dtype(x.dtype), np.integer):
        raise TypeError(f"{name}: expected ints or an integer array, got {x.dtype} values")
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimension{'s' if ndim > 1 else ''}, got shape {tuple(x.shape)}")
    bounds = check.int32_saturation(x.dtype)
    if bounds is not None:
        if isinstance(x, np.ndarray):
            check.check_fits_int32(name, x)
        else:  # a wider JAX array (x64 mode): saturated, also under jit, for vsa_nd's value checks
            x = jnp.clip(x, *bounds)
    return jnp.asarray(x, dtype=jnp.int32)


def _block_sizes(name: str, x):
    """Block sizes: a :class:`_PlanSizes` for a plan's own ``variable_block_sizes`` (see
    :func:`tile_plan`), else the values as an int32 JAX array."""
    plan = _PLANS_BY_SIZES.get(id(x))
    if plan is not None and plan.variable_block_sizes is x:
        return _PlanSizes(plan.seq_shape, plan.tile_shape, plan.num_blocks)
    return _int_array(name, x, 1)


def _num_blocks(block_sizes) -> int:
    return block_sizes.num_blocks if isinstance(block_sizes, _PlanSizes) else block_sizes.shape[0]


def _spec(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


# ---------------------------------------------------------------------------------------
# Tiling.


def _tile_arrays(x, *, seq_shape, tile_shape, results=None):
    return vsa_nd.tile(x, _array_plan(seq_shape, tile_shape, x), out=results and results[0])


def _untile_arrays(y, *, seq_shape, tile_shape, results=None):
    return vsa_nd.untile(y, _array_plan(seq_shape, tile_shape, y), out=results and results[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _tile(x, seq_shape: tuple, tile_shape: tuple):
    b, _, h, d = x.shape
    spec = _spec((b, h, _common.padded_len(seq_shape, tile_shape), d), x.dtype)
    return _call(_tile_arrays, (spec,), x, seq_shape=seq_shape, tile_shape=tile_shape)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _untile(y, seq_shape: tuple, tile_shape: tuple):
    b, h, _, d = y.shape
    spec = _spec((b, int(np.prod(seq_shape)), h, d), y.dtype)
    return _call(_untile_arrays, (spec,), y, seq_shape=seq_shape, tile_shape=tile_shape)[0]


_tile.defvjp(lambda x, s, t: (_tile(x, s, t), None), lambda s, t, _, g: (_untile(g, s, t),))
_untile.defvjp(lambda y, s, t: (_untile(y, s, t), None), lambda s, t, _, g: (_tile(g, s, t),))


def tile_plan(seq_shape, tile_shape=None, *, device=None) -> TilePlan:
    """The cached :class:`TilePlan` of ``seq_shape`` cut into ``tile_shape``, its index arrays
    int32 JAX arrays on ``device`` (default: JAX's default device; or a str such as "cpu",
    "gpu:1").

    On GPU they are zero-copy views of :func:`vsa_nd.tile_plan`'s CuPy arrays, which lets
    vsa_nd skip re-checking the block sizes (a host synchronisation); on CPU, copies.
    """
    seq_shape, tile_shape = vsa_nd.tiling.normalize_shapes(seq_shape, tile_shape)
    return _cached_plan(seq_shape, tile_shape, _device(device))


def _device(device):
    """A JAX device from None (JAX's default: ``jax.default_device``'s, a device or a platform
    name, else the first device), a jax.Device, or a str: "cpu", "gpu", "cuda", or one of those
    with ":<index>"."""
    if device is None:
        default = jax.config.jax_default_device
        if default is None:
            return jax.devices()[0]
        return jax.devices(default)[0] if isinstance(default, str) else default
    if isinstance(device, str):
        kind, _, index = device.partition(":")
        if kind in ("cpu", "gpu", "cuda") and (index == "" or index.isdigit()):
            try:
                devices = jax.devices("cpu" if kind == "cpu" else "gpu")
            except RuntimeError:
                devices = []
            if int(index or 0) < len(devices):
                return devices[int(index or 0)]
            raise ValueError(f"device: expected a device JAX has, got {device!r} (JAX has {jax.devices()})")
        raise ValueError(f"device: expected 'cpu', 'gpu' or 'cuda', optionally with ':<index>', got {device!r}")
    if not isinstance(device, jax.Device):
        raise TypeError(f"device: expected None, a str or a jax.Device, got {type(device).__name__}")
    return device


@functools.cache
def _cached_plan(seq_shape: tuple, tile_shape: tuple, device) -> TilePlan:
    if device.platform == "cpu":
        plan = TilePlan.wrap(vsa_nd.tile_plan(seq_shape, tile_shape), device, lambda a: jax.device_put(a, device))
    else:
        import cupy

        with cupy.cuda.Device(device.id):
            array_plan = vsa_nd.tile_plan(seq_shape, tile_shape, device=f"cuda:{device.id}")
            plan = TilePlan.wrap(array_plan, device, _from_cupy)
    _PLANS_BY_SIZES[id(plan.variable_block_sizes)] = plan  # cached plans live as long as the process
    return plan


_PLANS_BY_SIZES: dict = {}  # id(plan.variable_block_sizes) -> plan, for _block_sizes


def build_metadata(latent_shape, patch_size, sparsity: float, tile_shape=None, *, device=None) -> vsa_nd.VSAMetadata:
    """:func:`vsa_nd.build_metadata` with the plan's arrays on a JAX device (see :func:`tile_plan`)."""
    meta = vsa_nd.build_metadata(latent_shape, patch_size, sparsity, tile_shape)
    plan = tile_plan(meta.plan.seq_shape, meta.plan.tile_shape, device=device)
    return vsa_nd.VSAMetadata(plan=plan, topk=meta.topk, sparsity=meta.sparsity)


def tile(x, plan):
    """Reorder tokens into tiles: x [B, S, H, D] -> [B, H, S_pad, D], pad slots zero.

    Differentiable: the gradient is :func:`untile` of the incoming one.
    """
    seq_shape, tile_shape = _common.plan_shapes(plan)
    x = _check_array("x", x, _TILE_DTYPES)
    ops.check_reorder_shape("tile", x, plan)  # at trace time under jit
    return _tile(x, seq_shape, tile_shape)


def untile(y, plan):
    """Undo :func:`tile`: y [B, H, S_pad, D] -> [B, S, H, D], pad slots dropped.

    Differentiable: the gradient is :func:`tile` of the incoming one (pad slots get zero).
    """
    seq_shape, tile_shape = _common.plan_shapes(plan)
    y = _check_array("y", y, _TILE_DTYPES)
    ops.check_reorder_shape("untile", y, plan)  # at trace time under jit
    return _untile(y, seq_shape, tile_shape)


# ---------------------------------------------------------------------------------------
# Attention.


def _static(name: str, value):
    """``value`` as a Python number where it is a concrete 0-d JAX array (else as it is, for the
    checks to judge); a traced one (an argument of a jitted function) is refused with the remedy:
    topk sets the shapes of the selection, and the scale is baked into the program."""
    if _is_traced(value):
        raise TypeError(f"{name}: expected a Python number, got a traced value ({value.aval}); pass {name} as a "
                        f"static argument of jax.jit (static_argnums / static_argnames) or close over it, and do "
                        f"not differentiate or vmap over it")
    if isinstance(value, jax.Array) and value.ndim == 0:
        return value.item()
    return value


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _vsa(q, k, v, gate, q_block_sizes, kv_block_sizes, topk: int, scale: float):
    return _vsa_fwd(q, k, v, gate, q_block_sizes, kv_block_sizes, topk, scale)[0]


def _vsa_fwd(q, k, v, gate, q_block_sizes, kv_block_sizes, topk, scale):
    specs = _common.forward_specs(q.shape, q.dtype, k.shape, _num_blocks(q_block_sizes), _num_blocks(kv_block_sizes),
                                  topk)
    run = functools.partial(_call, _common.vsa_forward, tuple(_spec(*s) for s in specs), topk=topk, scale=scale)
    # (a first-order gradient never differentiates this rule; a second-order one would, and is refused)
    results = _refusing_gradients(run, _SECOND_ORDER, q, k, v, gate, q_block_sizes, kv_block_sizes)
    return results[0], (q, k, v, gate, q_block_sizes, kv_block_sizes, results)


def _vsa_bwd(topk, scale, residuals, dout):
    q, k, v, gate, q_block_sizes, kv_block_sizes, results = residuals
    specs = tuple(_spec(x.shape, x.dtype) for x in (q, k, v, gate) if x is not None)
    run = functools.partial(_call, _common.vsa_backward, specs, scale=scale)
    grads = _refusing_gradients(run, _SECOND_ORDER, dout, q, k, v, gate, q_block_sizes, kv_block_sizes, *results)
    dgate = grads[3] if gate is not None else None
    return grads[0], grads[1], grads[2], dgate, None, None


_vsa.defvjp(_vsa_fwd, _vsa_bwd)


def video_sparse_attn(q, k, v, topk: int, q_block_sizes, kv_block_sizes=None, *, gate=None, scale=None):
    """Video Sparse Attention on tiled arrays (see :func:`vsa_nd.video_sparse_attn`).

    q [B, H, Sq_pad, D]; k, v [B, H_kv, Skv_pad, D]; ``topk`` key tiles per query tile;
    ``q_block_sizes`` [N_q] and ``kv_block_sizes`` [N_kv] (default: ``q_block_sizes``) real
    tokens per tile, e.g. ``plan.variable_block_sizes``; ``gate`` optional, q-shaped;
    ``scale`` default ``1/sqrt(D)``.  Returns out [B, H, Sq_pad, D] in q's dtype,
    differentiable (``jax.custom_vjp``) with respect to q, k, v and gate.
    """
    q, k, v, gate = _check_attention_arrays(q, k, v, gate)
    kv_name = "q_block_sizes" if kv_block_sizes is None else "kv_block_sizes"
    q_block_sizes = _block_sizes("q_block_sizes", q_block_sizes)
    kv_block_sizes = q_block_sizes if kv_block_sizes is None else _block_sizes("kv_block_sizes", kv_block_sizes)
    # What shapes and dtypes decide is checked here too, so that under jit it fails at trace time
    # rather than as JAX's runtime error when the program runs; and topk is a static shape there.
    ops.check_qkv_layout(q, k, v, gate)
    ops.check_tiles(q, k, _num_blocks(q_block_sizes), _num_blocks(kv_block_sizes), kv_blocks_name=kv_name)
    topk = check.check_int_range("topk", _static("topk", topk), 1, _num_blocks(kv_block_sizes))
    scale = _common.resolve_scale(_static("scale", scale), q.shape[-1])
    # (inside shard_map: alike in the mesh axes they vary over, so that AD sums the cotangents of
    # the invariant ones over the devices; _varying_axes' comment)
    q, k, v, gate, q_block_sizes, kv_block_sizes = _vary_alike(q, k, v, gate, q_block_sizes, kv_block_sizes)[0]
    return _vsa(q, k, v, gate, q_block_sizes, kv_block_sizes, topk, scale)


def _block_sparse_arrays(q, k, v, kv_block_sizes, q2k_idx, q2k_num, q_block_sizes, *, scale, results=None):  # no out=
    return vsa_nd.block_sparse_attn(q, k, v, _common.trusted(kv_block_sizes), q2k_idx, q2k_num, scale=scale,
                                    return_lse=True,
                                    q_block_sizes=None if q_block_sizes is None else _common.trusted(q_block_sizes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _forward_only(run, refusal: tuple, *arrays):
    """``run(*arrays)``; differentiating it raises ``refusal`` (an exception type and its message:
    vsa_nd's words rather than JAX's about an FFI call)."""
    return run(*arrays)


def _refuse_gradient(run, refusal, residuals, cotangents):
    raise refusal[0](refusal[1])


_forward_only.defvjp(lambda run, refusal, *arrays: (run(*arrays), None), _refuse_gradient)


def _refusing_gradients(run, refusal: tuple, *arrays):
    """``run(*arrays)``, through :func:`_forward_only` where an operand is traced (something may
    differentiate it); a plain eager call skips the custom_vjp's dispatch (~0.15 ms of host time)."""
    if any(_is_traced(a) for a in arrays if a is not None):
        return _forward_only(run, refusal, *arrays)
    return run(*arrays)


_NO_BACKWARD = (TypeError, "q, k, v: block_sparse_attn has no backward; differentiate video_sparse_attn instead, "
                           "or pass jax.lax.stop_gradient of the inputs")
_SECOND_ORDER = (NotImplementedError,
                 "vsa_nd: video_sparse_attn has first-order reverse-mode gradients only (jax.grad, jax.vjp); its "
                 "backward is not differentiable, so gradients of gradients (grad of grad, jacrev of grad) are not "
                 "supported")


def block_sparse_attn(q, k, v, kv_block_sizes, q2k_idx, q2k_num=None, *, scale=None, return_lse=False,
                      q_block_sizes=None):
    """Fine stage only (see :func:`vsa_nd.block_sparse_attn`), forward only.

    q [B, H, Sq_pad, D]; k, v [B, H_kv, Skv_pad, D]; ``kv_block_sizes`` [N_kv];
    ``q2k_idx`` [B, H, N_q, L] and ``q2k_num`` [B, H, N_q] (default: all L) integer arrays;
    ``q_block_sizes`` [N_q] (optional): rows past it in each query tile are pad rows, 0 (lse
    -inf) whatever q holds there.  Returns out [B, H, Sq_pad, D] (and lse [B, H, Sq_pad],
    float32 or float64 for float64 inputs, with ``return_lse``).  Not differentiable (vsa_nd has no backward for the fine
    stage alone): differentiate :func:`video_sparse_attn` instead.
    """
    q, k, v, _ = _check_attention_arrays(q, k, v)
    q2k_idx = _int_array("q2k_idx", q2k_idx, 4)
    q2k_num = None if q2k_num is None else _int_array("q2k_num", q2k_num, 3)
    # What shapes and dtypes decide, at trace time under jit (as in video_sparse_attn).
    ops.check_qkv_layout(q, k, v, None)
    check.check_shape("q2k_idx", q2k_idx, (*q.shape[:2], None, None))
    if q2k_num is not None:
        check.check_shape("q2k_num", q2k_num, q2k_idx.shape[:3])
    lse_dtype = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    specs = (_spec(q.shape, q.dtype), _spec(q.shape[:3], lse_dtype))
    sizes, scale = _block_sizes("kv_block_sizes", kv_block_sizes), _common.resolve_scale(_static("scale", scale),
                                                                                          q.shape[-1])
    q_sizes = None if q_block_sizes is None else _block_sizes("q_block_sizes", q_block_sizes)
    ops.check_tiles(q, k, q2k_idx.shape[2], _num_blocks(sizes), "q2k_idx (axis 2)")
    if q_sizes is not None and _num_blocks(q_sizes) != q2k_idx.shape[2]:  # (N_q as the lists count it)
        raise ValueError(f"q_block_sizes: expected {q2k_idx.shape[2]} entries, got shape [{_num_blocks(q_sizes)}]")
    run = lambda q, k, v, idx, num: _call(_block_sparse_arrays, specs, q, k, v, sizes, idx, num, q_sizes,  # noqa: E731
                                          scale=scale)
    out, lse = _refusing_gradients(run, _NO_BACKWARD, q, k, v, q2k_idx, q2k_num)
    return (out, lse) if return_lse else out
