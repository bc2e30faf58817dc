"""Checks run once at the public boundary.

Each raises ``TypeError`` (wrong kind of object, dtype or device) or ``ValueError`` (wrong
shape or value) naming the argument, what was expected and what was received.  Value
checks of device arrays cost one host synchronisation, so during CUDA graph capture, which
forbids it, they raise a ValueError instead; index arrays that come from a cached
:class:`~vsa_nd.tiling.TilePlan` or from vsa_nd's own selection are trusted.
"""

from __future__ import annotations

import numpy as np

from ._xp import FLOAT_DTYPES, array_module, device_key, is_cupy_array, on_device_of
from .tiling import trusted_tile_volume


def describe(x) -> str:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{type(x).__module__.split('.')[0]} array of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__}"


def check_array(name: str, x, ndim: int | None = None, dtypes=None, like=None):
    """``x`` is a NumPy or CuPy ndarray of ``ndim`` dims, one of ``dtypes``, on ``like``'s device."""
    if not (isinstance(x, np.ndarray) or is_cupy_array(x) and hasattr(x, "data")):
        raise TypeError(f"{name}: expected a NumPy or CuPy array, got {describe(x)}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and np.dtype(x.dtype) not in dtypes:
        names = ", ".join(np.dtype(d).name for d in dtypes)
        native = np.dtype(x.dtype).newbyteorder("=")
        if not np.dtype(x.dtype).isnative and native in dtypes:
            raise TypeError(f"{name}: expected dtype in ({names}) in the machine's byte order, got {x.dtype} "
                            f"({native.name}, byte-swapped); pass {name}.astype(numpy.{native.name})")
        raise TypeError(f"{name}: expected dtype in ({names}), got {x.dtype}")
    if like is not None and device_key(x) != device_key(like):
        raise TypeError(f"{name}: expected an array on {device_key(like)}, got one on {device_key(x)}")
    return x


def check_float(name: str, x, ndim: int, like=None):
    """A floating array as :func:`check_array` checks it, with no axis of length 0 but the batch
    (axis 0): an empty batch gives empty results."""
    check_array(name, x, ndim, FLOAT_DTYPES, like)
    check_nonempty(name, x)
    return x


def check_nonempty(name: str, x):
    """No axis of ``x`` after the first (the batch, which may be empty) has length 0."""
    if 0 in tuple(x.shape)[1:]:
        raise ValueError(f"{name}: expected every axis after the batch (axis 0) of length at least 1, "
                         f"got shape {list(x.shape)}")
    return x


def check_contiguous(name: str, x, remedy: str | None = None):
    """``x`` if C-contiguous; else a ValueError naming ``name`` and suggesting ``remedy`` (by
    default a C-contiguous copy)."""
    if not x.flags.c_contiguous:
        remedy = remedy or f"pass a C-contiguous copy: xp.ascontiguousarray({name}) (a torch tensor: {name}.contiguous())"
        raise ValueError(f"{name}: expected a C-contiguous array, got strides {x.strides}; {remedy}")
    return x


def check_shape(name: str, x, expected: tuple):
    """``expected`` may hold None for a free axis."""
    shape = tuple(x.shape)
    if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(shape)}")
    return x


def check_same_dtype(name: str, x, ref, ref_name: str):
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} to match {ref_name}, got {x.dtype}")
    return x


def check_int_range(name: str, value, low: int, high: int) -> int:
    """A Python int with ``low <= value <= high``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if not low <= int(value) <= high:
        raise ValueError(f"{name}: expected {low} <= {name} <= {high}, got {value}")
    return int(value)


def as_index_array(name: str, x, like, length: int | None = None, ndim: int = 1):
    """An int32, C-contiguous index array on ``like``'s device (copied only if needed)."""
    xp = array_module(like)
    if isinstance(x, (list, tuple)):
        x = _list_array(name, x)
    refuse_plan(name, x)
    check_array(name, x, ndim)
    if not np.issubdtype(np.dtype(x.dtype), np.integer):
        raise TypeError(f"{name}: expected an integer dtype, got {x.dtype}")
    if length is not None and x.shape[-1] != length:
        raise ValueError(f"{name}: expected {length} entries, got shape {list(x.shape)}")
    if device_key(x) != device_key(like):
        if is_cupy_array(x) and not is_cupy_array(like):
            raise TypeError(f"{name}: expected an array on {device_key(like)}, got one on {device_key(x)}")
        with on_device_of(like):
            x = xp.asarray(x)
    if x.dtype != np.int32:
        bounds = int32_saturation(x.dtype)
        if bounds is not None:
            if isinstance(x, np.ndarray):
                check_fits_int32(name, x)
            else:  # a device array: checking would synchronise, so saturate for the value checks to see
                x = xp.clip(x, *bounds)
        x = x.astype(np.int32)
    if not x.flags.c_contiguous:
        x = xp.ascontiguousarray(x)
    return x


def refuse_plan(name: str, x):
    """Where ``name`` is an argument of block sizes and ``x`` a tile plan (of vsa_nd or an
    adapter) or the metadata holding one, a TypeError naming the fix; else nothing."""
    if not name.endswith("block_sizes"):
        return
    if hasattr(x, "variable_block_sizes"):
        raise TypeError(f"{name}: expected block sizes, got a tile plan ({type(x).__name__}); pass its "
                        f"variable_block_sizes")
    if hasattr(getattr(x, "plan", None), "variable_block_sizes"):
        raise TypeError(f"{name}: expected block sizes, got {type(x).__name__}; pass its plan.variable_block_sizes")


def _list_array(name: str, x):
    """``np.asarray`` of a list or tuple, with a ValueError naming ``name`` for a ragged one."""
    try:
        return np.asarray(x)
    except ValueError:
        raise ValueError(f"{name}: expected a rectangular list of ints, got a ragged one: {x!r}") from None


_INT32 = np.iinfo(np.int32)


def int32_saturation(dtype):
    """(low, high) that clip an integer ``dtype`` into int32's range, or None where every value of
    ``dtype`` fits.  Index arrays are saturated, not wrapped, before their int32 cast: a value
    beyond int32 then stays out of every valid range, so the value checks still see it (2**32 + 64
    must not pass as 64)."""
    info = np.iinfo(np.dtype(dtype))
    if info.min >= _INT32.min and info.max <= _INT32.max:
        return None
    return max(info.min, _INT32.min), min(info.max, _INT32.max)


def values_in(low: int, high: int) -> str:
    """"[low, high]" for a message about an int32 array's values, saying so where a limit may be
    a saturated value (:func:`int32_saturation`: device arrays and the adapters' integer tensors)
    rather than the one given."""
    note = " (values beyond int32 may show as its limits)" if low <= _INT32.min or high >= _INT32.max else ""
    return f"[{low}, {high}]{note}"


def check_fits_int32(name: str, x: np.ndarray):
    """ValueError naming ``name`` if a value of the NumPy integer array ``x`` lies beyond int32."""
    if x.size and (x.min() < _INT32.min or x.max() > _INT32.max):
        raise ValueError(f"{name}: expected values that fit in int32, got values in [{x.min()}, {x.max()}]")


_CAPTURE_IMPLICIT = 906  # cudaErrorStreamCaptureImplicit


def _capturing(like) -> bool:
    """Whether a CUDA graph is being captured on CuPy's current stream, for work on ``like``'s
    device (always False for NumPy arrays): then nothing may synchronise with the host."""
    if not is_cupy_array(like):
        return False
    import cupy

    try:
        return cupy.cuda.get_current_stream().is_capturing()
    except cupy.cuda.runtime.CUDARuntimeError as e:
        # Querying the legacy stream while a blocking stream of the device captures: a capture it is.
        if e.status == _CAPTURE_IMPLICIT:
            return True
        raise


def refuse_value_check_under_capture(name: str, like, remedy: str):
    """ValueError if checking ``name``'s values for work on ``like``'s device would have to
    synchronise with the host during CUDA graph capture, which forbids it."""
    if _capturing(like):
        raise ValueError(
            f"{name}: its values cannot be checked while a CUDA graph is being captured (the check synchronises "
            f"with the host); {remedy}"
        )


def check_block_sizes(name: str, block_sizes, like, num_blocks: int, tile_volume: int):
    """int32 block sizes on ``like``'s device, each in ``[1, tile_volume]``.  A cached plan's
    own array for this tile volume is trusted without a check (no host synchronisation)."""
    checked = num_blocks and trusted_tile_volume(block_sizes) != tile_volume
    if checked:  # before any copy to like's device, which would break the capture too
        refuse_value_check_under_capture(
            name, like, "pass a plan's variable_block_sizes (tile_plan), which vsa_nd trusts without a check")
    out = as_index_array(name, block_sizes, like, num_blocks)
    if checked:
        low, high = int(out.min()), int(out.max())
        if low < 1 or high > tile_volume:
            raise ValueError(
                f"{name}: expected every block size in [1, {tile_volume}] (the tile volume), got values in "
                f"{values_in(low, high)}"
            )
    return out


def check_index_lists(q2k_idx, q2k_num, num_kv_blocks: int, check_values: bool, prefix: str = ""):
    """Index lists: entries ``[0, num)`` of each row inside ``[0, N_kv)`` and distinct.

    ``prefix`` goes before the arguments' names in messages (e.g. "context.")."""
    if not check_values or q2k_num.size == 0:  # (an empty batch: nothing to check)
        return
    refuse_value_check_under_capture(f"{prefix}q2k_idx", q2k_idx, "pass check_indices=False for lists known to be valid")
    xp = array_module(q2k_idx)
    num = q2k_num.astype(np.int64)
    if int(num.min(initial=0) if xp is np else num.min()) < 0 or int(num.max()) > q2k_idx.shape[-1]:
        raise ValueError(
            f"{prefix}q2k_num: expected counts in [0, {q2k_idx.shape[-1]}] (the list length), "
            f"got values in {values_in(int(num.min()), int(num.max()))}"
        )
    if q2k_idx.shape[-1] == 0:  # empty lists (all counts 0): no entry to check
        return
    used = xp.arange(q2k_idx.shape[-1])[None, None, None, :] < num[..., None]
    live = xp.where(used, q2k_idx, 0)
    if int(live.min()) < 0 or int(live.max()) >= num_kv_blocks:
        raise ValueError(
            f"{prefix}q2k_idx: expected tile indices in [0, {num_kv_blocks}) (N_kv), got values in "
            f"{values_in(int(live.min()), int(live.max()))}"
        )
    ordered = xp.sort(xp.where(used, q2k_idx, -1 - xp.arange(q2k_idx.shape[-1], dtype=q2k_idx.dtype)), axis=-1)
    repeated = ordered[..., 1:] == ordered[..., :-1]
    if bool(repeated.any()):
        b, h, i, j = (int(c) for c in xp.argwhere(repeated)[0])
        raise ValueError(
            f"{prefix}q2k_idx: expected no tile index twice in one row, got tile {int(ordered[b, h, i, j])} twice in row [{b}, {h}, {i}]"
        )
