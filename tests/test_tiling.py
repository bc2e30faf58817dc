"""Tiling (VSA_SPEC.md section 2): the plan's index arrays against definitions written out with
loops, FastVideo's 3-D arrays, tile/untile round trips, the plan cache and the builder helpers."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import vsa_nd
from vsa_nd._xp import BFLOAT16

MAX_TOKENS = 6000  # keeps the loop-based definitions fast; sides still reach 40


@st.composite
def seq_and_tile_shapes(draw, dims=st.integers(1, 4), max_side=40, max_tile_side=8):
    d = draw(dims)
    sides, budget = [], MAX_TOKENS
    for _ in range(d):
        side = draw(st.integers(1, min(max_side, budget)))
        sides.append(side)
        budget //= side
    seq = tuple(draw(st.permutations(sides)))  # the budget must not always shrink the last axes
    tile = tuple(draw(st.integers(1, max_tile_side)) for _ in range(d))
    return seq, tile


def loop_plan(seq_shape, tile_shape):
    """Section 2 of the spec, one tile and one in-tile position at a time."""
    num_tiles = [-(-n // t) for n, t in zip(seq_shape, tile_shape)]
    volume = math.prod(tile_shape)
    strides = [math.prod(seq_shape[i + 1 :]) for i in range(len(seq_shape))]
    partition, sizes, non_pad, slot_token = [], [], [], []
    for j, tile_coord in enumerate(itertools.product(*(range(m) for m in num_tiles))):  # row-major tile grid
        real = []
        for offset in itertools.product(*(range(t) for t in tile_shape)):  # row-major inside the tile
            position = [c * t + o for c, t, o in zip(tile_coord, tile_shape, offset)]
            if all(p < n for p, n in zip(position, seq_shape)):
                real.append(sum(p * s for p, s in zip(position, strides)))
        partition += real
        sizes.append(len(real))
        non_pad += [j * volume + r for r in range(len(real))]  # real tokens fill the first slots
        slot_token += real + [-1] * (volume - len(real))
    reverse = [0] * len(partition)
    for position, token in enumerate(partition):
        reverse[token] = position
    return {
        "tile_partition_indices": partition,
        "reverse_tile_partition_indices": reverse,
        "variable_block_sizes": sizes,
        "non_pad_index": non_pad,
        "untile_index": [non_pad[reverse[t]] for t in range(len(partition))],
        "slot_token_index": slot_token,
    }


@given(seq_and_tile_shapes())
def test_plan_arrays_match_the_loop_definitions(shapes):
    seq_shape, tile_shape = shapes
    plan = vsa_nd.tile_plan(seq_shape, tile_shape)
    expected = loop_plan(seq_shape, tile_shape)
    for name, values in expected.items():
        array = getattr(plan, name)
        assert array.dtype == np.int32 and array.flags.c_contiguous, name
        assert array.tolist() == values, name

    seq_len, volume = math.prod(seq_shape), math.prod(tile_shape)
    sizes = plan.variable_block_sizes
    assert sizes.sum() == seq_len == plan.seq_len
    assert sizes.min() >= 1 and sizes.max() <= volume == plan.tile_volume
    assert plan.num_tiles == tuple(math.ceil(n / t) for n, t in zip(seq_shape, tile_shape))
    assert plan.padded_len == plan.num_blocks * volume == len(plan.slot_token_index)
    assert np.all(np.diff(plan.non_pad_index) > 0)
    assert sorted(plan.tile_partition_indices.tolist()) == list(range(seq_len))  # a permutation


def fastvideo_arrays(seq_shape):
    """FastVideo's 3-D arrays for tile (4, 4, 4), as VSA_SPEC.md section 2 and its backend page describe them."""
    side = 4
    num_tiles = [-(-n // side) for n in seq_shape]
    grid = np.arange(math.prod(seq_shape)).reshape(seq_shape)
    # Per tile in (t, h, w) tile order: the tokens of the cropped tile, row-major.
    tile_partition_indices = np.concatenate([
        grid[i * side : (i + 1) * side, j * side : (j + 1) * side, l * side : (l + 1) * side].reshape(-1)
        for i, j, l in itertools.product(*(range(m) for m in num_tiles))
    ])

    def per_axis(n, m):  # full tiles, then whatever is left for the last one
        sizes = np.full(m, side)
        sizes[-1] = n - (m - 1) * side
        return sizes

    t_sizes, h_sizes, w_sizes = (per_axis(n, m) for n, m in zip(seq_shape, num_tiles))
    variable_block_sizes = (t_sizes[:, None, None] * h_sizes[None, :, None] * w_sizes[None, None, :]).reshape(-1)
    n_blocks = math.prod(num_tiles)
    slots = np.arange(n_blocks * side**3).reshape(n_blocks, side**3)
    non_pad_index = slots[np.arange(side**3)[None, :] < variable_block_sizes[:, None]]
    untile_combined_index = non_pad_index[np.argsort(tile_partition_indices)]
    return tile_partition_indices, variable_block_sizes, non_pad_index, untile_combined_index


@given(st.tuples(*[st.integers(1, 40)] * 3))
def test_3d_default_tile_equals_fastvideo(seq_shape):
    plan = vsa_nd.tile_plan(seq_shape)  # the 3-D default tile is (4, 4, 4)
    assert plan.tile_shape == (4, 4, 4)
    partition, sizes, non_pad, untile_combined = fastvideo_arrays(seq_shape)
    np.testing.assert_array_equal(plan.tile_partition_indices, partition)
    np.testing.assert_array_equal(plan.reverse_tile_partition_indices, np.argsort(partition))
    np.testing.assert_array_equal(plan.variable_block_sizes, sizes)
    np.testing.assert_array_equal(plan.non_pad_index, non_pad)
    np.testing.assert_array_equal(plan.untile_index, untile_combined)


DTYPES = [np.dtype(np.float32), np.dtype(np.float16), BFLOAT16, np.dtype(np.float64)]


def random_tokens(seed, shape, dtype):
    """Normal values plus -0.0, inf and NaN: a copy must keep every bit."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    flat = x.reshape(-1)
    for value in (-0.0, np.inf, -np.inf, np.nan):
        flat[rng.integers(flat.size)] = value
    return x


def bits(x):
    return x.view(f"u{x.dtype.itemsize}")


layouts = st.tuples(seq_and_tile_shapes(), st.integers(1, 2), st.integers(1, 3), st.integers(1, 5),
                    st.sampled_from(DTYPES), st.integers(0, 2**32 - 1))


@given(layouts)
def test_tile_places_tokens_zeroes_pads_and_untile_restores_every_bit(layout):
    (seq_shape, tile_shape), b, h, d, dtype, seed = layout
    plan = vsa_nd.tile_plan(seq_shape, tile_shape)
    x = random_tokens(seed, (b, plan.seq_len, h, d), dtype)
    x_before = x.copy()

    tiled = vsa_nd.tile(x, plan)
    assert tiled.shape == (b, h, plan.padded_len, d) and tiled.dtype == dtype
    slot_token = plan.slot_token_index
    pads = slot_token < 0
    assert np.all(bits(tiled[:, :, pads]) == 0)  # +0.0 exactly
    expected = x[:, slot_token[~pads]].transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(bits(tiled[:, :, ~pads]), bits(expected))

    restored = vsa_nd.untile(tiled, plan)
    assert restored.shape == x.shape and restored.dtype == dtype
    np.testing.assert_array_equal(bits(restored), bits(x))
    np.testing.assert_array_equal(bits(x), bits(x_before))


@pytest.mark.parametrize("dtype", ["int16", "uint16", "int32", "uint32", "int64", "uint64"])
def test_tile_and_untile_move_integers_of_two_four_and_eight_bytes(dtype):
    """Integer tensors (token ids, positions) tile and untile bit for bit, pads 0."""
    plan = vsa_nd.tile_plan((3, 5, 6), (2, 2, 4))
    info = np.iinfo(dtype)
    x = np.random.default_rng(1).integers(info.min, info.max, (2, plan.seq_len, 3, 4), dtype=dtype, endpoint=True)
    tiled = vsa_nd.tile(x, plan)
    pads = plan.slot_token_index < 0
    assert tiled.dtype == x.dtype and np.all(tiled[:, :, pads] == 0)
    np.testing.assert_array_equal(tiled[:, :, ~pads], x[:, plan.slot_token_index[~pads]].transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(vsa_nd.untile(tiled, plan), x)


@given(layouts)
def test_out_buffers_are_filled_and_returned(layout):
    (seq_shape, tile_shape), b, h, d, dtype, seed = layout
    plan = vsa_nd.tile_plan(seq_shape, tile_shape)
    x = random_tokens(seed, (b, plan.seq_len, h, d), dtype)
    fresh = vsa_nd.tile(x, plan)

    # A buffer left over from another layer: stale values everywhere, pads included.
    buffer = random_tokens(seed + 1, fresh.shape, dtype)
    result = vsa_nd.tile(x, plan, out=buffer)
    assert np.shares_memory(result, buffer) and result.shape == buffer.shape
    np.testing.assert_array_equal(bits(buffer), bits(fresh))

    tokens = random_tokens(seed + 2, x.shape, dtype)
    result = vsa_nd.untile(buffer, plan, out=tokens)
    assert np.shares_memory(result, tokens)
    np.testing.assert_array_equal(bits(tokens), bits(x))
    np.testing.assert_array_equal(bits(buffer), bits(fresh))  # untile only reads its input


@pytest.mark.parametrize(
    "sparsity, num_kv_blocks, topk",
    [
        (0.9, 768, 77),  # ceil(76.8)
        (0.875, 768, 96),
        (0.7, 10, 3),  # (1 - 0.7) * 10 = 3.0000000000000004 in floats: still 3
        (0.3, 10, 7),
        (0.5, 3, 2),
        (0.95, 10, 1),
        (0.0, 768, 768),
        (1.0, 768, 1),  # clamped: at least one tile
        (1.0, 1, 1),
        (0.0, 1, 1),
    ],
)
def test_topk_from_sparsity(sparsity, num_kv_blocks, topk):
    assert vsa_nd.topk_from_sparsity(sparsity, num_kv_blocks) == topk


@given(st.integers(1, 10_000), st.integers(0, 10**6))
def test_topk_from_sparsity_is_exact_for_decimal_sparsities(num_kv_blocks, millionths):
    # The user means the decimal they wrote: compare with exact rational arithmetic.
    sparsity = Fraction(millionths, 10**6)
    exact = math.ceil((1 - sparsity) * num_kv_blocks)
    assert vsa_nd.topk_from_sparsity(float(sparsity), num_kv_blocks) == min(max(exact, 1), num_kv_blocks)


@given(st.integers(1, 10_000), st.data())
def test_topk_from_sparsity_of_a_fraction_of_the_tiles(num_kv_blocks, data):
    skipped = data.draw(st.integers(0, num_kv_blocks))
    assert vsa_nd.topk_from_sparsity(skipped / num_kv_blocks, num_kv_blocks) == max(num_kv_blocks - skipped, 1)


@given(st.integers(1, 10_000), st.data(), st.sampled_from([1e-8, 1e-7, 1e-6]))
def test_topk_from_sparsity_rounds_up_just_above_an_integer(num_kv_blocks, data, above):
    # The slack forgives float error (~1e-16 relative), not a product meant to lie above k.
    k = data.draw(st.integers(0, num_kv_blocks - 1))
    sparsity = 1 - (k + above) / num_kv_blocks
    assert vsa_nd.topk_from_sparsity(sparsity, num_kv_blocks) == k + 1


def test_topk_from_sparsity_just_above_an_integer():
    assert vsa_nd.topk_from_sparsity(0.5999999, 10) == 5  # (1 - s) * 10 = 4.000001


def test_topk_from_sparsity_takes_tile_counts_below_2_to_the_53():
    """Where float64 still holds every integer: 2**53 - 1 is taken, 2**53 refused."""
    assert vsa_nd.topk_from_sparsity(0.0, 2**53 - 1) == 2**53 - 1
    with pytest.raises(ValueError, match=r"num_kv_blocks: .*< 2\*\*53"):
        vsa_nd.topk_from_sparsity(0.0, 2**53)


def test_padded_length_bound_is_2_to_the_31():
    normalize = vsa_nd.tiling.normalize_shapes  # shapes only: nothing of this size is allocated
    assert normalize((2**31 - 1,), (1,)) == ((2**31 - 1,), (1,))
    assert normalize((1024, 1024, 2044), (4, 4, 4))[0] == (1024, 1024, 2044)
    for seq, tile in (((2**31 - 1,), (2,)), ((1024, 1024, 2048), (4, 4, 4)), ((1024, 1024, 2045), (4, 4, 4))):
        with pytest.raises(ValueError, match=r"below 2\*\*31 slots, got 2147483648"):
            normalize(seq, tile)


def test_build_metadata():
    meta = vsa_nd.build_metadata((16, 60, 104), (1, 2, 2), 0.875)  # a Wan2.1-like 480p latent
    assert meta.plan is vsa_nd.tile_plan((16, 30, 52), (4, 4, 4))
    assert meta.plan.num_blocks == 4 * 8 * 13
    assert meta.topk == 52 and meta.sparsity == 0.875
    for given_sparsity in (1, np.float32(0.875), Fraction(7, 8)):  # kept as the Python float it was read as
        sparsity = vsa_nd.build_metadata((16, 60, 104), (1, 2, 2), given_sparsity).sparsity
        assert type(sparsity) is float and sparsity == float(given_sparsity)
    meta_2d = vsa_nd.build_metadata([64, 48], [2, 2], 0.9, tile_shape=(4, 8))
    assert meta_2d.plan.seq_shape == (32, 24) and meta_2d.plan.tile_shape == (4, 8)
    assert meta_2d.topk == math.ceil(0.1 * 8 * 3)
    # Sides that patches do not divide round down (the spec's latent // patch), as a patch
    # embedding whose stride is its patch size does; a patch side may equal its latent side.
    assert vsa_nd.build_metadata((21, 45, 81), (1, 2, 2), 0.875).plan.seq_shape == (21, 22, 40)
    assert vsa_nd.build_metadata((3, 7), (3, 2), 0.5).plan.seq_shape == (1, 3)


def test_plans_are_cached_and_read_only():
    plan = vsa_nd.tile_plan((5, 9, 13), (4, 4, 4))
    assert vsa_nd.tile_plan([5, 9, 13], [4, 4, 4]) is plan
    assert vsa_nd.tile_plan(np.array([5, 9, 13])) is plan
    assert plan.to("cpu") is plan
    assert vsa_nd.tile_plan((5, 9, 13), (2, 4, 4)) is not plan
    for name in ("tile_partition_indices", "reverse_tile_partition_indices", "variable_block_sizes",
                 "non_pad_index", "untile_index", "slot_token_index"):
        array = getattr(plan, name)
        assert not array.flags.writeable, name
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 1


def test_threads_asking_for_a_new_plan_at_once_get_the_same_trusted_one():
    """The calls trust a cached plan's block sizes by identity: two threads that ask for the same
    new plan at once must get the one cached plan, not one each (the loser's sizes would then be
    checked in every call, with a host synchronisation on CUDA, and refused under graph capture)."""
    import sys
    import threading

    from vsa_nd.tiling import trusted_tile_volume

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, inside the plan's build too
    try:
        for n in range(40):
            seq = (3, 5 + n, 7)
            barrier, plans = threading.Barrier(2), []

            def ask():
                barrier.wait()
                plans.append(vsa_nd.tile_plan(seq, (2, 4, 4)))

            threads = [threading.Thread(target=ask) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert plans[0] is plans[1], seq
            assert trusted_tile_volume(plans[0].variable_block_sizes) == 32
    finally:
        sys.setswitchinterval(interval)


@pytest.mark.parametrize("seq_shape, tile_shape", [((100,), (64,)), ((9, 17), (8, 8)), ((5, 6, 7), (4, 4, 4))])
def test_default_tile_shapes_are_the_documented_ones(seq_shape, tile_shape):
    assert vsa_nd.tile_plan(seq_shape).tile_shape == tile_shape
    assert vsa_nd.build_metadata(seq_shape, (1,) * len(seq_shape), 0.5).plan.tile_shape == tile_shape


def test_shapes_may_come_from_iterators():
    """A generator or map of sides is read once (a check that iterated it first would see nothing left)."""
    plan = vsa_nd.tile_plan((s for s in (3, 5, 6)), map(int, "222"))
    assert plan.seq_shape == (3, 5, 6) and plan.tile_shape == (2, 2, 2)
    with pytest.raises(TypeError, match=r"seq_shape: expected integers, got \(3.5, 5\)"):
        vsa_nd.tile_plan((s for s in (3.5, 5)), (2, 2))
