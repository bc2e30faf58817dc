"""N-dimensional tiling: which token goes to which slot of the padded, tiled sequence.

A sequence of shape ``seq_shape = (n_1, ..., n_d)`` (row-major, last axis fastest) is cut
into tiles of ``tile_shape = (t_1, ..., t_d)``.  Tiles are laid out in row-major order of
the tile grid, and each tile owns ``V = prod(tile_shape)`` consecutive slots of the padded
sequence.  A tile at the far edge of an axis whose length is not a multiple of its side
holds fewer real tokens; they fill the *first* slots of the tile (in row-major order of
their in-tile coordinates) and the remaining slots are pads.

Every index array is computed in closed form (broadcast arithmetic on an index grid) on
the array module of the device it is built for, and cached per (seq_shape, tile_shape,
device).
"""

from __future__ import annotations

import math
import numbers
import threading
from dataclasses import dataclass

import numpy as np

DEFAULT_TILE_SHAPES = {1: (64,), 2: (8, 8), 3: (4, 4, 4)}
MAX_DIMS = 4


@dataclass(frozen=True, eq=False, repr=False)
class TilePlan:
    """Index arrays of one (seq_shape, tile_shape) on one device.

    A plan is cached and shared by every caller, and the kernels take its arrays without
    checking their values: never write to them (NumPy's are read-only; CuPy has no such flag).

    Attributes (all int32, on ``device``):
        tile_partition_indices [S]: original token index of each real token, in tiled order.
        reverse_tile_partition_indices [S]: inverse permutation of the above.
        variable_block_sizes [N]: number of real tokens in each tile (1..V).
        non_pad_index [S]: increasing slots of the padded sequence that hold real tokens.
        untile_index [S]: for each original token, its slot in the padded sequence.
        slot_token_index [S_pad]: for each padded slot, its original token, or -1 for a pad.
    """

    seq_shape: tuple
    tile_shape: tuple
    device: str
    tile_partition_indices: object
    reverse_tile_partition_indices: object
    variable_block_sizes: object
    non_pad_index: object
    untile_index: object
    slot_token_index: object

    @property
    def num_tiles(self) -> tuple:
        """Tiles along each axis: ``ceil(n_i / t_i)``."""
        return tuple(-(-n // t) for n, t in zip(self.seq_shape, self.tile_shape))

    @property
    def num_blocks(self) -> int:
        """N, the total number of tiles."""
        return math.prod(self.num_tiles)

    @property
    def tile_volume(self) -> int:
        """V, the slots per tile."""
        return math.prod(self.tile_shape)

    @property
    def seq_len(self) -> int:
        """S, the number of real tokens."""
        return math.prod(self.seq_shape)

    @property
    def padded_len(self) -> int:
        """S_pad = N * V."""
        return self.num_blocks * self.tile_volume

    def to(self, device: str) -> "TilePlan":
        """The same plan with its arrays on ``device`` (``"cpu"`` or ``"cuda:<id>"``), cached."""
        return tile_plan(self.seq_shape, self.tile_shape, device=device)

    def __repr__(self) -> str:
        return (
            f"TilePlan(seq_shape={self.seq_shape}, tile_shape={self.tile_shape}, "
            f"num_tiles={self.num_tiles}, padded_len={self.padded_len}, device={self.device!r})"
        )


def _positive_int_tuple(name: str, value) -> tuple:
    try:
        if isinstance(value, str):  # iterable, but its characters are no shape
            raise TypeError
        items = tuple(value)  # once: an iterator is used up by reading it
        if any(isinstance(v, (bool, np.bool_)) for v in items):  # int-like, but no side
            raise TypeError
        out = tuple(int(v) for v in items)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite float
        raise TypeError(f"{name}: expected a sequence of ints, got {value!r}") from None
    if any(int(v) != v for v in items):
        raise TypeError(f"{name}: expected integers, got {items!r}")
    if not 1 <= len(out) <= MAX_DIMS:
        raise ValueError(f"{name}: expected 1 to {MAX_DIMS} dimensions, got {len(out)} ({out})")
    if any(v < 1 for v in out):
        raise ValueError(f"{name}: expected every side >= 1, got {out}")
    return out


def normalize_shapes(seq_shape, tile_shape=None) -> tuple:
    """Validated ``(seq_shape, tile_shape)`` as int tuples; fills in the default tile."""
    seq_shape = _positive_int_tuple("seq_shape", seq_shape)
    if tile_shape is None:
        if len(seq_shape) not in DEFAULT_TILE_SHAPES:
            raise ValueError(
                f"tile_shape: no default for a {len(seq_shape)}-D seq_shape {seq_shape}; "
                f"pass one with {len(seq_shape)} sides"
            )
        tile_shape = DEFAULT_TILE_SHAPES[len(seq_shape)]
    tile_shape = _positive_int_tuple("tile_shape", tile_shape)
    if len(tile_shape) != len(seq_shape):
        raise ValueError(
            f"tile_shape: expected {len(seq_shape)} sides to match seq_shape {seq_shape}, got {tile_shape}"
        )
    padded = math.prod(-(-n // t) * t for n, t in zip(seq_shape, tile_shape))
    if padded >= 2**31:
        raise ValueError(f"seq_shape: padded length must stay below 2**31 slots, got {padded}")
    return seq_shape, tile_shape


def _array_module_for(device: str):
    if device == "cpu":
        return np
    index = device.removeprefix("cuda:")
    if index != device and index.isdigit() and index.isascii():
        try:
            import cupy
        except ImportError as error:
            raise ValueError(f"device: {device!r} needs CuPy, which could not be imported here ({error}; the extra "
                             f"vsa_nd[cuda12] or vsa_nd[cuda13] installs it)") from error
        return cupy
    raise ValueError(f"device: expected 'cpu' or 'cuda:<id>', got {device!r}")


def tile_plan(seq_shape, tile_shape=None, *, device: str = "cpu") -> TilePlan:
    """The cached :class:`TilePlan` of ``seq_shape`` cut into ``tile_shape`` on ``device``.

    ``tile_shape`` defaults to (64,), (8, 8) or (4, 4, 4) for 1-, 2- and 3-D sequences.
    """
    seq_shape, tile_shape = normalize_shapes(seq_shape, tile_shape)
    if not isinstance(device, str):
        raise TypeError(f"device: expected a str like 'cpu' or 'cuda:0', got {device!r}")
    key = (seq_shape, tile_shape, device)
    plan = _PLANS.get(key)
    if plan is None:
        xp = _array_module_for(device)
        with _PLANS_LOCK:  # one plan per key, also when threads ask at once: only its arrays are trusted
            plan = _PLANS.get(key)
            if plan is None:
                if xp is np:
                    plan = _build_plan(np, seq_shape, tile_shape, device)
                else:
                    with xp.cuda.Device(int(device.split(":")[1])):
                        plan = _build_plan(xp, seq_shape, tile_shape, device)
                        # Its last kernels are queued on the current stream, and callers read the
                        # plan on theirs, unordered: wait for them once (the build synchronised
                        # twice already, reading mask counts).
                        xp.cuda.get_current_stream().synchronize()
                _TRUSTED[id(plan.variable_block_sizes)] = plan
                _PLANS[key] = plan
    return plan


_PLANS: dict = {}  # (seq_shape, tile_shape, device) -> TilePlan; a handful per model
_TRUSTED: dict = {}  # id(plan.variable_block_sizes) -> plan (cached plans live as long as the process)
_PLANS_LOCK = threading.Lock()


def trusted_index_arrays():
    """The block-size arrays of every cached plan: built here, so their values need no check."""
    return [plan.variable_block_sizes for plan in list(_TRUSTED.values())]


def trusted_tile_volume(block_sizes):
    """The tile volume of the cached plan whose ``variable_block_sizes`` is ``block_sizes`` (the
    same object), else None: its values are known to lie in ``[1, tile volume]``."""
    plan = _TRUSTED.get(id(block_sizes))
    return plan.tile_volume if plan is not None and plan.variable_block_sizes is block_sizes else None


def block_sizes_per_axis(xp, seq_shape: tuple, tile_shape: tuple) -> list:
    """For each axis, the real length of each of its tiles (t_i, except a shorter last one)."""
    return [
        xp.minimum(t, n - xp.arange(-(-n // t), dtype=xp.int64) * t)
        for n, t in zip(seq_shape, tile_shape)
    ]


def _outer(xp, per_axis: list, combine, axes_of) -> object:
    """Broadcast-combine one array per axis into the grid whose axes ``axes_of(i)`` names."""
    d = len(per_axis)
    total = None
    for i, a in enumerate(per_axis):
        shape = [1] * (2 * d)
        for axis, size in zip(axes_of(i), a.shape):
            shape[axis] = size
        a = a.reshape(shape)
        total = a if total is None else combine(total, a)
    return total


def _build_plan(xp, seq_shape: tuple, tile_shape: tuple, device: str) -> TilePlan:
    d = len(seq_shape)
    num_tiles = [-(-n // t) for n, t in zip(seq_shape, tile_shape)]
    n_blocks, volume = math.prod(num_tiles), math.prod(tile_shape)
    strides = [math.prod(seq_shape[i + 1 :]) for i in range(d)]

    # Geometric position of every slot of a full tile: axis i of the grid (m_1..m_d, t_1..t_d)
    # is the tile coordinate, axis d+i the in-tile coordinate.
    coords = [
        xp.arange(m, dtype=xp.int64)[:, None] * t + xp.arange(t, dtype=xp.int64)[None, :]
        for m, t in zip(num_tiles, tile_shape)
    ]
    axes_of = lambda i: (i, d + i)  # noqa: E731
    token = _outer(xp, [c * s for c, s in zip(coords, strides)], xp.add, axes_of)
    inside = _outer(xp, [c < n for c, n in zip(coords, seq_shape)], xp.logical_and, axes_of)
    token = token.reshape(n_blocks, volume)
    inside = inside.reshape(n_blocks, volume)

    sizes = block_sizes_per_axis(xp, seq_shape, tile_shape)
    variable_block_sizes = _outer(xp, sizes, xp.multiply, lambda i: (i,)).reshape(-1)

    # Real tokens keep their in-tile row-major order and move to the front of their tile.
    tile_partition_indices = token[inside]
    slots = xp.arange(n_blocks * volume, dtype=xp.int64).reshape(n_blocks, volume)
    front = xp.arange(volume, dtype=xp.int64)[None, :] < variable_block_sizes[:, None]
    non_pad_index = slots[front]

    seq_len = math.prod(seq_shape)
    reverse = xp.empty(seq_len, dtype=xp.int64)
    reverse[tile_partition_indices] = xp.arange(seq_len, dtype=xp.int64)
    slot_token_index = xp.full(n_blocks * volume, -1, dtype=xp.int64)
    slot_token_index[non_pad_index] = tile_partition_indices

    def i32(a):
        a = xp.ascontiguousarray(a.astype(xp.int32))
        if xp is np:
            a.flags.writeable = False  # shared by every caller of the cached plan
        return a

    return TilePlan(
        seq_shape=seq_shape,
        tile_shape=tile_shape,
        device=device,
        tile_partition_indices=i32(tile_partition_indices),
        reverse_tile_partition_indices=i32(reverse),
        variable_block_sizes=i32(variable_block_sizes),
        non_pad_index=i32(non_pad_index),
        untile_index=i32(non_pad_index[reverse]),
        slot_token_index=i32(slot_token_index),
    )


def float_of_real(x: numbers.Real) -> float:
    """``float(x)`` for any Real (a Fraction, a NumPy scalar), inf for one past float's range
    (an int such as 10**400, where float() raises OverflowError): callers then refuse it by name."""
    try:
        return float(x)
    except OverflowError:
        return math.inf


def topk_from_sparsity(sparsity: float, num_kv_blocks: int) -> int:
    """``clamp(ceil((1 - sparsity) * num_kv_blocks), 1, num_kv_blocks)``, where a product within
    1e-9 above an integer counts as that integer: floating point puts (1 - 0.7) * 10 at
    3.0000000000000004 and (1 - 6/7) * 7 at 1.0000000000000004, which mean 3 and 1.
    ``sparsity`` in [0, 1]; ``num_kv_blocks`` from 1 to below 2**53 (past it floats skip integers)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"sparsity: expected a float in [0, 1], got {type(sparsity).__name__} {sparsity!r}")
    if isinstance(num_kv_blocks, bool) or not isinstance(num_kv_blocks, numbers.Integral):
        raise TypeError(f"num_kv_blocks: expected an int, got {type(num_kv_blocks).__name__} {num_kv_blocks!r}")
    value = float_of_real(sparsity)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"sparsity: expected a value in [0, 1], got {sparsity if value == math.inf else value}")
    sparsity = value
    if not 1 <= int(num_kv_blocks) < 2**53:  # (where floats still count every integer)
        raise ValueError(f"num_kv_blocks: expected >= 1 and < 2**53, got {num_kv_blocks}")
    # The small slack keeps e.g. (1 - 0.7) * 10 = 3.0000000000000004 at 3.
    keep = math.ceil((1.0 - sparsity) * num_kv_blocks - 1e-9)
    return min(max(keep, 1), int(num_kv_blocks))


@dataclass(frozen=True)
class VSAMetadata:
    """What a video model's attention layer needs: the tiling plan and the top-k count."""

    plan: TilePlan
    topk: int
    sparsity: float


def build_metadata(
    latent_shape, patch_size, sparsity: float, tile_shape=None, *, device: str = "cpu"
) -> VSAMetadata:
    """Plan and ``topk`` for a latent of ``latent_shape`` patchified by ``patch_size``.

    ``seq_shape = latent_shape // patch_size`` per axis, rounded down as a patch embedding whose
    stride is its patch size does (each patch side at most its latent side);
    ``topk = topk_from_sparsity(sparsity, N)`` for self-attention over the N tiles.
    """
    latent_shape = _positive_int_tuple("latent_shape", latent_shape)
    patch_size = _positive_int_tuple("patch_size", patch_size)
    if len(patch_size) != len(latent_shape):
        raise ValueError(
            f"patch_size: expected {len(latent_shape)} sides to match latent_shape {latent_shape}, got {patch_size}"
        )
    if any(p > n for n, p in zip(latent_shape, patch_size)):
        raise ValueError(f"patch_size: expected sides no larger than latent_shape {latent_shape}, got {patch_size}")
    seq_shape = tuple(n // p for n, p in zip(latent_shape, patch_size))
    plan = tile_plan(seq_shape, tile_shape, device=device)
    return VSAMetadata(plan=plan, topk=topk_from_sparsity(sparsity, plan.num_blocks), sparsity=float(sparsity))
