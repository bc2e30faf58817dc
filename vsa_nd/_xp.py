"""Array-module helpers: tell NumPy from CuPy arrays without importing CuPy.

vsa_nd works on whatever array module the caller uses.  CuPy is imported only when
a CuPy array is actually passed in, so ``import vsa_nd`` works on machines without it.
"""

from __future__ import annotations

import contextlib

import numpy as np

try:  # ml_dtypes gives NumPy (and CuPy) a bfloat16 dtype
    from ml_dtypes import bfloat16
except ImportError:  # pragma: no cover - ml_dtypes is a hard dependency
    bfloat16 = None

BFLOAT16 = np.dtype(bfloat16)
HALF_DTYPES = (np.dtype(np.float16), BFLOAT16)
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64)) + HALF_DTYPES


def is_cupy_array(x) -> bool:
    module = type(x).__module__
    return module == "cupy" or module.startswith("cupy.")


def array_module(x):
    """NumPy for host arrays, CuPy for CuPy arrays (imported lazily)."""
    if is_cupy_array(x):
        import cupy

        return cupy
    return np


def device_key(x) -> str:
    """A hashable name of the device that holds ``x``: ``"cpu"`` or ``"cuda:<id>"``."""
    if is_cupy_array(x):
        return f"cuda:{x.device.id}"
    return "cpu"


_NO_CONTEXT = contextlib.nullcontext()  # stateless, so one instance serves every host call


def on_device_of(x):
    """Context that makes ``x``'s GPU current (allocations and launches go there); no-op on the host."""
    return x.device if is_cupy_array(x) else _NO_CONTEXT


def compute_dtype(dtype) -> np.dtype:
    """The floating type arithmetic runs in: float64 stays float64, everything else float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name
