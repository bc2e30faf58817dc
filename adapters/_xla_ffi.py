"""vsa_nd as an XLA foreign function, so that the JAX adapter runs inside ``jax.jit``.

XLA calls a foreign function (``jax.ffi.ffi_call``) through a C handler with the signature
``XLA_FFI_Error* handler(XLA_FFI_CallFrame*)`` (``xla/ffi/api/c_api.h``, which jaxlib ships:
``jax.ffi.include_dir()``).  The handler here is a ``ctypes`` callback into Python, so no
native code is built: it reads the call frame (operand and result buffers, attributes, and on
GPU the CUDA stream and device that XLA runs the call on), views the buffers as NumPy or CuPy
arrays without copying and runs vsa_nd on them, which fills XLA's result buffers (results it
did not write in place, the small ones, are copied there).

On GPU, vsa_nd's kernels go onto XLA's own stream (``cupy.cuda.ExternalStream``), so they are
ordered after the operands' producers and before the results' consumers with no host
synchronisation; the handler returns as soon as the work is queued.  vsa_nd's intermediates
come from CuPy's memory pool on that stream (stream-ordered reuse), outside XLA's allocator:
XLA takes 75% of GPU memory at start by default (``XLA_PYTHON_CLIENT_MEM_FRACTION``), and the
intermediates of one call are small (a few percent of the inputs at the spec's shapes), except
the Hopper backward's dS workspace: up to 2 GiB by default (1.45 GB at 12 heads x 49152
tokens), which CuPy's pool keeps for the next call; ``VSA_ND_DS_WORKSPACE_GIB`` sets that
budget (0: none), and when the memory is not there the backward recomputes dS instead.  The
handler declares no traits, so XLA never records it into a command buffer (CUDA graph).

One call is described by a string attribute ``call`` that names everything the Python side
needs besides the buffers (the vsa_nd function, its static arguments, which operands are
absent or fixed); the handler finds the function registered under that string when the call
was traced.  The description is the whole key, so an executable compiled by another process
(JAX's persistent compilation cache) finds the function that the same trace registers there.

An error raised by vsa_nd inside the handler is returned to XLA, which raises it as JAX's
runtime error carrying vsa_nd's message.
"""

from __future__ import annotations

import atexit
import ctypes as C
import functools
import math
import os
import sys
import threading
import traceback
import types

import numpy as np

from vsa_nd._xp import BFLOAT16

from . import _common

# ---- the C API's structs, as far as the handler reads them (field order of c_api.h) ----------


class _ExtensionBase(C.Structure):
    pass


_ExtensionBase._fields_ = [("struct_size", C.c_size_t), ("type", C.c_int), ("next", C.POINTER(_ExtensionBase))]


class _ApiVersion(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("major_version", C.c_int),
                ("minor_version", C.c_int)]


class _Buffer(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("dtype", C.c_int),
                ("data", C.c_void_p), ("rank", C.c_int64), ("dims", C.POINTER(C.c_int64))]


class _List(C.Structure):  # XLA_FFI_Args and XLA_FFI_Rets
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("size", C.c_int64),
                ("types", C.POINTER(C.c_int)), ("items", C.POINTER(C.c_void_p))]


class _ByteSpan(C.Structure):
    _fields_ = [("ptr", C.c_void_p), ("len", C.c_size_t)]


class _Attrs(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("size", C.c_int64),
                ("types", C.POINTER(C.c_int)), ("names", C.POINTER(C.POINTER(_ByteSpan))),
                ("attrs", C.POINTER(C.c_void_p))]


_ApiFunction = C.CFUNCTYPE(C.c_void_p, C.c_void_p)  # XLA_FFI_Error* fn(XLA_FFI_..._Args*)
_API_FUNCTIONS = ("Error_Create", "Error_GetMessage", "Error_Destroy", "Handler_Register", "Stream_Get",
                  "Type_Register", "ExecutionContext_Get", "State_Set", "State_Get", "DeviceMemory_Allocate",
                  "DeviceMemory_Free", "ThreadPool_Schedule", "ThreadPool_NumThreads", "Future_Create",
                  "Future_SetAvailable", "Future_SetError", "RunId_Get", "DeviceOrdinal_Get")


class _Api(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("api_version", _ApiVersion),
                ("internal_api", C.c_void_p)] + [(name, _ApiFunction) for name in _API_FUNCTIONS]


class _CallFrame(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.POINTER(_ExtensionBase)),
                ("api", C.POINTER(_Api)), ("ctx", C.c_void_p), ("stage", C.c_int), ("args", _List),
                ("rets", _List), ("attrs", _Attrs)]


class _Metadata(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("api_version", _ApiVersion), ("traits", C.c_uint32),
                ("state_type_id", C.c_int64)]


class _MetadataExtension(C.Structure):
    _fields_ = [("extension_base", _ExtensionBase), ("metadata", C.POINTER(_Metadata))]


class _ErrorCreateArgs(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("message", C.c_char_p),
                ("errc", C.c_int)]


class _StreamQuery(C.Structure):  # XLA_FFI_Stream_Get_Args
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("ctx", C.c_void_p),
                ("out", C.c_void_p)]


class _OrdinalQuery(C.Structure):  # XLA_FFI_DeviceOrdinal_Get_Args
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("ctx", C.c_void_p),
                ("out", C.c_int32)]


_EXTENSION_METADATA = 1
_STAGE_EXECUTE = 3
_ATTR_STRING = 4
_API_VERSION = (0, 3)  # of the c_api.h these structs follow (XLA accepts handlers of its major version and a minor up to its own)
_ERROR_INVALID_ARGUMENT, _ERROR_INTERNAL = 3, 13
_DTYPES = {  # XLA_FFI_DataType -> NumPy
    1: np.dtype(np.bool_), 4: np.dtype(np.int32), 5: np.dtype(np.int64), 10: np.dtype(np.float16),
    11: np.dtype(np.float32), 12: np.dtype(np.float64), 16: BFLOAT16,
}


def _field_in(struct_size: int, struct, field: str) -> bool:
    """Whether a struct XLA passed (``struct_size`` bytes, maybe from older headers) holds ``field``."""
    member = getattr(struct, field)
    return struct_size >= member.offset + member.size


# ---- calls: what the handler runs, by description ------------------------------------------

# What must outlive a reload of this module, or its import under a second name: XLA keeps the
# handlers' addresses for the life of the process (so their ctypes callbacks must live as long,
# and reach the calls registered later) and refuses a second registration of the target.
_STATE = sys.modules.setdefault("vsa_nd._xla_ffi_state", types.ModuleType("vsa_nd._xla_ffi_state"))
_CALLS: dict = _STATE.__dict__.setdefault("calls", {})  # description -> run(operands: list of arrays) -> tuple of arrays
_LOCK = _STATE.__dict__.setdefault("lock", threading.Lock())


def register_call(description: str, run) -> None:
    """Make ``run`` the function of calls described by ``description`` (the first one stays:
    equal descriptions must mean equal functions)."""
    with _LOCK:
        _CALLS.setdefault(description, run)


# ---- the handler -------------------------------------------------------------------------------


def _buffer(pointer: int):
    buffer = _Buffer.from_address(pointer)
    shape = tuple(buffer.dims[: buffer.rank])
    dtype = _DTYPES.get(buffer.dtype)
    if dtype is None:
        raise TypeError(f"vsa_nd's XLA call got a buffer of XLA dtype code {buffer.dtype}, which it does not take")
    return buffer.data or 0, shape, dtype


def _host_array(pointer: int, shape: tuple, dtype):
    count = math.prod(shape)
    if count == 0:
        return np.empty(shape, dtype)
    return np.frombuffer((C.c_char * (count * dtype.itemsize)).from_address(pointer), dtype).reshape(shape)


def _device_array(pointer: int, shape: tuple, dtype, device: int):
    import cupy

    count = math.prod(shape)
    if count == 0:
        return cupy.empty(shape, dtype)
    memory = cupy.cuda.UnownedMemory(pointer, count * dtype.itemsize, None, device)
    return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(memory, 0))


def _description(attrs: _Attrs) -> str:
    for i in range(attrs.size):
        name = attrs.names[i].contents
        if C.string_at(name.ptr, name.len) == b"call" and attrs.types[i] == _ATTR_STRING:
            value = _ByteSpan.from_address(attrs.attrs[i])
            return C.string_at(value.ptr, value.len).decode()
    raise RuntimeError("vsa_nd's XLA call has no 'call' attribute")


def _store(description: str, results, outputs, copy) -> None:
    """Put ``results`` into XLA's result buffers ``outputs``: ``copy(output, result)`` for each
    one vsa_nd did not write in place."""
    if len(results) != len(outputs):
        raise RuntimeError(f"{description}: {len(results)} results for {len(outputs)} XLA result buffers")
    for r, o in zip(results, outputs):
        if r.shape != o.shape or r.dtype != o.dtype:
            raise RuntimeError(f"{description}: a result of shape {r.shape} and dtype {r.dtype} for an XLA "
                               f"buffer of shape {o.shape} and dtype {o.dtype}")
    for r, o in zip(results, outputs):
        if o.size and not _written_in_place(r, o):
            copy(o, r)


def _written_in_place(result, output) -> bool:
    """Whether vsa_nd filled ``output`` itself (returned it, or a view of exactly its memory)."""
    if result is output:
        return True
    pointer = result.ctypes.data if isinstance(result, np.ndarray) else result.data.ptr
    start = output.ctypes.data if isinstance(output, np.ndarray) else output.data.ptr
    return pointer == start and result.strides == output.strides and result.flags.c_contiguous


def _run_on_host(frame: _CallFrame, run, description: str) -> None:
    operands = [_host_array(*_buffer(frame.args.items[i])) for i in range(frame.args.size)]
    for a in operands:
        a.flags.writeable = False  # XLA's operands (constants among them): vsa_nd never writes its inputs
    outputs = [_host_array(*_buffer(frame.rets.items[i])) for i in range(frame.rets.size)]
    _store(description, run(operands, outputs), outputs, np.copyto)


class _XlaError(Exception):
    """An error XLA's own API returned, handed back to XLA as it is."""

    def __init__(self, pointer: int):
        super().__init__("an XLA FFI API call failed")
        self.pointer = pointer


def _check_call(error) -> None:
    if error:
        raise _XlaError(error)


def _run_on_gpu(frame: _CallFrame, run, description: str) -> None:
    import cupy

    api = frame.api.contents
    query = _StreamQuery(C.sizeof(_StreamQuery), None, frame.ctx, None)
    _check_call(api.Stream_Get(C.addressof(query)))
    stream = query.out or 0
    if _field_in(api.struct_size, _Api, "DeviceOrdinal_Get"):
        ordinal = _OrdinalQuery(C.sizeof(_OrdinalQuery), None, frame.ctx, 0)
        _check_call(api.DeviceOrdinal_Get(C.addressof(ordinal)))
        device = ordinal.out
    else:  # older XLA: the device whose context XLA made current
        device = cupy.cuda.runtime.getDevice()
    with cupy.cuda.Device(device), _common.external_stream(stream, device) as current:
        operands = [_device_array(*_buffer(frame.args.items[i]), device) for i in range(frame.args.size)]
        outputs = [_device_array(*_buffer(frame.rets.items[i]), device) for i in range(frame.rets.size)]
        _store(description, run(operands, outputs), outputs,
               lambda o, r: o.data.copy_from_device_async(cupy.ascontiguousarray(r).data, o.nbytes, current))


def _error(api: _Api, exception: BaseException):
    """An XLA error carrying ``exception``'s message (with its traceback unless it is a
    ValueError or TypeError of vsa_nd's checks)."""
    if isinstance(exception, _XlaError):
        return exception.pointer
    code = _ERROR_INVALID_ARGUMENT if isinstance(exception, (ValueError, TypeError)) else _ERROR_INTERNAL
    try:
        message = f"{type(exception).__name__}: {exception}"
        if code == _ERROR_INTERNAL:
            message += "\n" + "".join(traceback.format_exception(exception))
    except BaseException:  # noqa: BLE001 - an exception that cannot be printed
        message = f"{type(exception).__name__} (its message could not be formatted)"
    text = message.encode("utf-8", "backslashreplace")
    args = _ErrorCreateArgs(C.sizeof(_ErrorCreateArgs), None, text, code)
    return api.Error_Create(C.addressof(args))  # XLA copies the message


def _describe_metadata(frame: _CallFrame) -> None:
    """Answer XLA's metadata query: the C API version these structs follow, no traits (so XLA
    never records the call into a command buffer), no state.  As api.h's PopulateMetadata does,
    without touching ``frame.api`` (some XLA versions pass none here)."""
    extension = _MetadataExtension.from_address(C.addressof(frame.extension_start.contents))
    if extension.extension_base.struct_size < C.sizeof(_MetadataExtension) or not extension.metadata:
        raise RuntimeError("XLA's metadata extension is smaller than vsa_nd's handler expects")
    metadata = extension.metadata.contents
    if not _field_in(metadata.struct_size, _Metadata, "traits"):
        raise RuntimeError("XLA's handler metadata is smaller than vsa_nd's handler expects")
    metadata.api_version = _ApiVersion(C.sizeof(_ApiVersion), None, *_API_VERSION)
    metadata.traits = 0
    if _field_in(metadata.struct_size, _Metadata, "state_type_id"):
        metadata.state_type_id = 0


def _handle_or_raise(frame: _CallFrame, on_gpu: bool) -> None:
    if frame.stage != _STAGE_EXECUTE:
        raise RuntimeError(f"vsa_nd's XLA handler called at stage {frame.stage}, not execute")
    description = _description(frame.attrs)
    run = _CALLS.get(description)
    if run is None:
        raise RuntimeError(f"no vsa_nd function is registered in this process for the XLA call {description!r}")
    (_run_on_gpu if on_gpu else _run_on_host)(frame, run, description)


def _refuse_metadata(frame: _CallFrame, exception: BaseException) -> None:
    """A metadata query that cannot be answered (XLA passes no ``api`` to make an error with):
    say why on stderr and answer an API version no XLA takes, so that XLA refuses the handler."""
    print(f"vsa_nd: cannot answer XLA's metadata query ({exception}); XLA will refuse vsa_nd's calls", file=sys.stderr)
    try:
        extension = _MetadataExtension.from_address(C.addressof(frame.extension_start.contents))
        if extension.metadata:
            extension.metadata.contents.api_version = _ApiVersion(C.sizeof(_ApiVersion), None, 999, 0)
    except BaseException:  # noqa: BLE001 - nothing more can be done here
        pass


def _handle(frame_pointer: int, on_gpu: bool):
    """The handler: None (success) or an XLA error.  Nothing may escape a ctypes callback (its
    return value would then be garbage that XLA takes for an error pointer, or a success whose
    results were never written).

    The ctypes callbacks are C-level partial objects of this function, so that Python code runs
    only from its first line on, inside the ``try``.  Python may still run a pending signal's
    handler on entering the function itself (Ctrl-C while XLA runs the program on the main
    thread): such a KeyboardInterrupt escapes, which pure Python cannot prevent."""
    try:
        frame = _CallFrame.from_address(frame_pointer)
        if frame.extension_start and frame.extension_start.contents.type == _EXTENSION_METADATA:
            try:
                return _describe_metadata(frame)
            except BaseException as e:  # noqa: BLE001 - as every error: not through ctypes
                return _refuse_metadata(frame, e)
        try:
            return _handle_or_raise(frame, on_gpu)
        except BaseException as e:  # noqa: BLE001 - every error must reach XLA, not ctypes
            return _error_with_room(frame.api.contents, e)
    except BaseException as e:  # noqa: BLE001 - e.g. Ctrl-C while reporting: report that instead
        try:
            return _error(_CallFrame.from_address(frame_pointer).api.contents, e)
        except BaseException:  # noqa: BLE001 - not even an error could be made: stop rather than report success
            try:
                traceback.print_exc()
            finally:
                os.abort()


# Recursion room for reporting errors: the limit is the interpreter's, and XLA may run several
# handlers at once on its threads.  The first reporter raises it, the last one out restores it
# (unless the caller changed it meanwhile); an unlocked save-raise-restore left it raised by
# 200 for good whenever two reports interleaved.
_ROOM_LOCK = threading.Lock()
_ROOM = {"reporters": 0, "limit": 0}


def _error_with_room(api: _Api, exception: BaseException):
    """:func:`_error` with 200 frames more of recursion limit: room to report a RecursionError
    met deep in the caller's stack."""
    with _ROOM_LOCK:
        if _ROOM["reporters"] == 0:
            _ROOM["limit"] = sys.getrecursionlimit()
            sys.setrecursionlimit(_ROOM["limit"] + 200)
        _ROOM["reporters"] += 1
    try:
        return _error(api, exception)
    finally:
        with _ROOM_LOCK:
            _ROOM["reporters"] -= 1
            if _ROOM["reporters"] == 0 and sys.getrecursionlimit() == _ROOM["limit"] + 200:
                sys.setrecursionlimit(_ROOM["limit"])


_HANDLER_TYPE = C.CFUNCTYPE(C.c_void_p, C.c_void_p)
_HANDLERS = _STATE.__dict__.setdefault("handlers", {  # (the first module's, kept by _STATE: see there)
    "cpu": _HANDLER_TYPE(functools.partial(_handle, on_gpu=False)),  # (no lambda: see _handle)
    "gpu": _HANDLER_TYPE(functools.partial(_handle, on_gpu=True)),
})
_XLA_PLATFORMS = {"cpu": "cpu", "gpu": "CUDA"}
_TARGET = "vsa_nd"
_registered: set = _STATE.__dict__.setdefault("registered", set())


def _wait_for_jax() -> None:
    """At exit, before JAX's own exit hook shuts its clients down (atexit runs hooks in reverse
    order, and JAX's was registered when it was imported): wait for the programs still running.
    On the CPU the handler runs on an XLA thread; one that enters it once Python has begun to
    finalize is stopped there, and XLA's shut-down then waits for that thread for ever.  So wait
    for the arrays still being computed, then, on each host device, for a trivial program: it
    runs after the programs queued before it (measured: 7 s behind a gradient whose result was
    dropped at once, which is no live array), whatever they feed."""
    try:
        import jax

        for array in jax.live_arrays():
            array.block_until_ready()
        if "cpu" in _registered:
            barrier = jax.jit(lambda x: x + 1)
            for device in _devices(jax, "cpu"):
                barrier(jax.device_put(np.zeros((), np.float32), device)).block_until_ready()
    except BaseException:  # noqa: BLE001 - at exit: never stop the rest of the shut-down
        pass


def target() -> str:
    """The FFI target name of vsa_nd's handler, registered with XLA on first use for every
    platform JAX has here (one name: XLA picks the handler of the platform it compiles for)."""
    with _LOCK:
        if not _registered:
            import jax

            platforms = {d.platform for backend in ("cpu", "gpu") for d in _devices(jax, backend)}
            for platform in sorted(platforms & set(_HANDLERS)):
                pointer = C.cast(_HANDLERS[platform], C.c_void_p).value
                jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(pointer), platform=_XLA_PLATFORMS[platform])
                _registered.add(platform)
            atexit.register(_wait_for_jax)
    return _TARGET


def _devices(jax, backend: str) -> list:
    try:
        return jax.devices(backend)
    except RuntimeError:  # no such backend here
        return []
