"""kv_to_q_lists (cuda_kernels/kv_lists.cu) against a NumPy inversion of the selection (GPU only).

The kernels turn q2k_idx / q2k_num into the per-key-tile lists of query tiles the dK/dV pass
reads; the lists must be exact and each in strictly increasing order (the backward's fixed
summation order).  Inputs are fresh random selections whose unused entries hold junk (negative,
out of range, or valid-looking tile numbers) that must be ignored; every array CuPy hands out
uninitialised (``cupy.empty``, hence ``codes``) is poisoned with 0xFF bytes (-1) first.
"""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

pytestmark = pytest.mark.gpu


@pytest.fixture
def poisoned(monkeypatch):
    """cupy.empty returns arrays filled with 0xFF bytes (its contents are unspecified anyway)."""
    import cupy

    empty = cupy.empty

    def poisoned_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        if out.nbytes:
            out.data.memset_async(0xFF, out.nbytes)  # on the current stream, like the launches after it
        return out

    monkeypatch.setattr(cupy, "empty", poisoned_empty)


def random_selection(rng, b: int, h: int, n_q: int, n_kv: int, length: int):
    """(q2k_idx int32 [B, H, N_q, L], q2k_num int32 [B, H, N_q]): the first q2k_num entries of a
    row distinct tiles in random order, the rest junk; counts in 0..L, 0 and L included."""
    rows = b * h * n_q
    num = rng.integers(0, length + 1, rows)
    num[0] = 0
    num[-1] = length
    picks = np.argsort(rng.random((rows, n_kv)), axis=1)[:, :length]  # distinct per row
    junk = rng.choice(np.array([-7, -1, n_kv, 2**31 - 1, 0]), (rows, length))
    junk = np.where(rng.random((rows, length)) < 0.5, junk, rng.integers(0, n_kv, (rows, length)))
    used = np.arange(length)[None, :] < num[:, None]
    idx = np.where(used, picks, junk).astype(np.int32).reshape(b, h, n_q, length)
    return idx, num.astype(np.int32).reshape(b, h, n_q)


def expected_lists(q2k_idx, q2k_num, num_kv_heads: int, num_kv_blocks: int):
    """(codes of the used entries in list order then code order, offsets int64) from the contract."""
    b, h, n_q, length = q2k_idx.shape
    group = h // num_kv_heads
    bb, hh, ii, ll = np.indices(q2k_idx.shape)
    used = ll < q2k_num[..., None]
    lists = (bb * num_kv_heads + hh // group) * num_kv_blocks + q2k_idx.astype(np.int64)
    codes = (hh % group) * n_q + ii
    lists, codes = lists[used], codes[used]
    order = np.lexsort((codes, lists))
    counts = np.bincount(lists, minlength=b * num_kv_heads * num_kv_blocks)
    return codes[order], np.concatenate([[0], np.cumsum(counts)])


def check(q2k_idx, q2k_num, num_kv_heads: int, num_kv_blocks: int):
    import cupy

    from vsa_nd.backends.cuda_attention import kv_to_q_lists

    b, h, n_q, length = q2k_idx.shape
    codes, offsets, pos = kv_to_q_lists(cupy.asarray(q2k_idx), cupy.asarray(q2k_num), num_kv_heads, num_kv_blocks,
                                        positions=True)
    assert codes.dtype == np.int32 and offsets.dtype == np.int32 and pos.dtype == np.int32
    assert pos.shape == q2k_idx.shape
    assert codes.shape == (b * h * n_q * length,)
    assert offsets.shape == (b * num_kv_heads * num_kv_blocks + 1,)
    codes, offsets = cupy.asnumpy(codes), cupy.asnumpy(offsets)
    want_codes, want_offsets = expected_lists(q2k_idx, q2k_num, num_kv_heads, num_kv_blocks)
    np.testing.assert_array_equal(offsets, want_offsets)
    total = int(want_offsets[-1])
    # With the offsets equal, equal used prefixes mean every list codes[offsets[l]:offsets[l + 1]] is exact.
    np.testing.assert_array_equal(codes[:total], want_codes)
    starts = np.zeros(total, bool)  # first position of each non-empty list
    starts[offsets[:-1][offsets[:-1] < total]] = True
    assert np.all(np.diff(codes[:total])[~starts[1:]] > 0), "a list is not strictly increasing"
    # pos: each used entry's place in its list (the code there is the entry's, inside the list's
    # range), -1 for the unused ones.
    pos = cupy.asnumpy(pos)
    group = h // num_kv_heads
    bb, hh, ii, ll = np.indices(q2k_idx.shape)
    used = ll < q2k_num[..., None]
    assert np.all(pos[~used] == -1)
    lists = ((bb * num_kv_heads + hh // group) * num_kv_blocks + q2k_idx.astype(np.int64))[used]
    at = pos[used]
    assert np.all((offsets[lists] <= at) & (at < offsets[lists + 1]))
    np.testing.assert_array_equal(codes[at], ((hh % group) * n_q + ii)[used])
    return codes, offsets


@st.composite
def problems(draw):
    """(B, H_kv, group, N_q, N_kv, L, seed); group * N_q spans 1 to 210 codes (1 to 7 bitmap words)."""
    n_kv = draw(st.integers(1, 70))
    return (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 70)),
            n_kv, draw(st.integers(1, n_kv)), draw(st.integers(0, 2**32 - 1)))


@given(problems())
@example((1, 1, 1, 1, 1, 1, 0))  # one code, one list
@example((1, 1, 1, 32, 5, 3, 1))  # exactly one full word
@example((1, 1, 1, 33, 5, 3, 2))  # two words, the second with one bit
@example((2, 3, 3, 70, 70, 70, 3))  # 7 words per list, full rows
@example((2, 2, 3, 11, 64, 1, 4))  # 33 codes, L = 1
def test_kv_to_q_lists_matches_numpy(poisoned, problem):
    b, h_kv, group, n_q, n_kv, length, seed = problem
    rng = np.random.default_rng(seed)
    q2k_idx, q2k_num = random_selection(rng, b, h_kv * group, n_q, n_kv, length)
    check(q2k_idx, q2k_num, h_kv, n_kv)


@pytest.mark.parametrize(
    "b, h, h_kv, n_q, n_kv, length",
    [
        (1, 12, 12, 768, 768, 77),  # 9216 lists: several segments of the single-CTA scan; 24 words per list
        (2, 8, 2, 400, 300, 40),  # group 4: 1600 codes, 50 words per list (two 32-lane steps)
        (1, 6, 3, 50, 2000, 9),  # 6000 short lists, 4 words each
    ],
)
def test_kv_to_q_lists_large(poisoned, b, h, h_kv, n_q, n_kv, length):
    rng = np.random.default_rng(b * 1000 + h * 100 + n_q)
    q2k_idx, q2k_num = random_selection(rng, b, h, n_q, n_kv, length)
    check(q2k_idx, q2k_num, h_kv, n_kv)


def test_kv_to_q_lists_nothing_used(poisoned):
    """All counts 0: every list empty (offsets all 0), junk everywhere ignored."""
    rng = np.random.default_rng(7)
    q2k_idx = rng.integers(-5, 50, (2, 4, 40, 6)).astype(np.int32)
    check(q2k_idx, np.zeros((2, 4, 40), np.int32), 2, 45)


def test_kv_to_q_lists_deterministic_and_on_the_current_stream(poisoned):
    """A call on a non-blocking stream gives the same lists, bit for bit, as one on the default stream."""
    import cupy

    from vsa_nd.backends.cuda_attention import kv_to_q_lists

    rng = np.random.default_rng(11)
    q2k_idx, q2k_num = random_selection(rng, 2, 6, 100, 90, 30)
    idx, num = cupy.asarray(q2k_idx), cupy.asarray(q2k_num)
    codes, offsets = kv_to_q_lists(idx, num, 3, 90)
    cupy.cuda.Device().synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        codes2, offsets2 = kv_to_q_lists(idx, num, 3, 90)
    stream.synchronize()
    total = int(offsets[-1])
    assert cupy.array_equal(offsets, offsets2)
    assert cupy.array_equal(codes[:total], codes2[:total])


def test_kv_to_q_lists_graph_capture_and_replay():
    """No host synchronisation: the call is captured whole in a CUDA graph, and replays with new
    selections copied into the captured inputs give the NumPy lists."""
    import cupy

    from vsa_nd.backends.cuda_attention import kv_to_q_lists

    b, h, h_kv, n_q, n_kv, length = 1, 4, 2, 50, 40, 12
    rng = np.random.default_rng(3)
    idx, num = (cupy.asarray(x) for x in random_selection(rng, b, h, n_q, n_kv, length))
    stream = cupy.cuda.Stream(non_blocking=True)
    pool = cupy.cuda.MemoryPool()
    cupy.cuda.Device().synchronize()
    with stream, cupy.cuda.using_allocator(pool.malloc):
        kv_to_q_lists(idx, num, h_kv, n_kv)  # warm-up: the kernels compile and load outside the capture
        stream.synchronize()
        stream.begin_capture()
        codes, offsets = kv_to_q_lists(idx, num, h_kv, n_kv)
        graph = stream.end_capture()
    for _ in range(2):
        q2k_idx, q2k_num = random_selection(rng, b, h, n_q, n_kv, length)
        fresh_idx, fresh_num = cupy.asarray(q2k_idx), cupy.asarray(q2k_num)
        cupy.cuda.Device().synchronize()  # the fresh inputs were written on the default stream
        with stream:
            idx[...] = fresh_idx
            num[...] = fresh_num
            codes.fill(-1)  # poisoned: the replay must write every entry compared below
            offsets.fill(-1)
            graph.launch(stream)
        stream.synchronize()
        want_codes, want_offsets = expected_lists(q2k_idx, q2k_num, h_kv, n_kv)
        np.testing.assert_array_equal(cupy.asnumpy(offsets), want_offsets)
        np.testing.assert_array_equal(cupy.asnumpy(codes)[: int(want_offsets[-1])], want_codes)


def expected_order(counts, first: int, segment: int):
    """dkdv_order's contract for the segment of lists starting at ``first``: (its long lists, at
    least 16 entries and twice the segment's mean; the shift that brings the longest below 256;
    the other lists in list order)."""
    c = counts[first:first + segment]
    long = (c >= 16) & (c * len(c) >= 2 * c.sum())
    shift = max(0, int(c[long].max()).bit_length() - 8) if long.any() else 0
    return first + np.flatnonzero(long), shift, first + np.flatnonzero(~long)


@pytest.mark.parametrize("lists, segment", [(9216, 9216), (9216, 768), (3000, 1000), (5, 5), (1025, 1024)])
def test_dkdv_order(poisoned, lists, segment):
    """The dK/dV pass's schedule: a permutation of each segment, its long lists first, longest
    first (by count >> shift, in any order within a bucket), then the others in list order."""
    import cupy

    from vsa_nd.backends.cuda_attention import dkdv_order

    rng = np.random.default_rng(lists + segment)
    counts = rng.poisson(77, lists)
    hot = rng.random(lists) < 0.02  # a few key tiles chosen by far more query tiles than the others
    counts[hot] = rng.integers(160, 4000, hot.sum())
    counts[rng.random(lists) < 0.05] = 0
    counts[-1] = 3999  # last in list order, first in the schedule
    offsets = cupy.asarray(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    order = cupy.asnumpy(dkdv_order(offsets, segment))
    for first in range(0, lists, segment):
        long_lists, shift, short_lists = expected_order(counts, first, segment)
        got = order[first:first + segment]
        head, tail = got[:len(long_lists)], got[len(long_lists):]
        assert sorted(head) == sorted(long_lists)
        assert np.all(np.diff(counts[head] >> shift) <= 0), "long lists not longest first"
        np.testing.assert_array_equal(tail, short_lists)
    assert len(expected_order(counts, 0, segment)[0]), "the case has long lists"
    assert not np.array_equal(order, np.arange(lists))
