"""Random block-sparse attention problems shared by the CUDA attention tests (not a test file)."""

import numpy as np
from hypothesis import strategies as st

import vsa_nd
from vsa_nd import reference
from vsa_nd._xp import BFLOAT16

# Tile shapes per dimension count, all with volumes the CUDA kernels take (64 and 128).
TILES = {1: [(64,), (128,)], 2: [(8, 8), (8, 16)], 3: [(4, 4, 4), (4, 4, 8)], 4: [(2, 2, 4, 4)]}
DTYPES = [np.dtype(np.float16), BFLOAT16]


@st.composite
def problems(draw, max_tokens: int, groups=(1, 2)):
    """q and kv plans (same tile shape, partial tiles, cross attention half the time), batch,
    heads (H_kv in {1, 2}, ``groups`` query heads per kv head), head dim, dtype, topk, gate, seed."""
    dims = draw(st.integers(1, 4))
    tile_shape = draw(st.sampled_from(TILES[dims]))

    def seq():
        shape = [draw(st.integers(1, 2 * t)) for t in tile_shape]
        while np.prod(shape) > max_tokens:
            shape[int(np.argmax(shape))] //= 2
        return tuple(max(s, 1) for s in shape)

    q_seq = seq()
    kv_seq = q_seq if draw(st.booleans()) else seq()
    kv_heads = draw(st.sampled_from([1, 2]))
    kv_plan = vsa_nd.tile_plan(kv_seq, tile_shape)
    return dict(
        q_plan=vsa_nd.tile_plan(q_seq, tile_shape),
        kv_plan=kv_plan,
        volume=int(np.prod(tile_shape)),
        batch=draw(st.integers(1, 2)),
        heads=kv_heads * draw(st.sampled_from(groups)),
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([64, 128])),
        dtype=draw(st.sampled_from(DTYPES)),
        topk=draw(st.integers(1, kv_plan.num_blocks)),
        gated=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def random_inputs(p, rng):
    """Random q, k, v as NumPy arrays in the problem's dtype; key/value pad slots hold NaN, which
    must never reach a result."""
    b, h, hk, d = p["batch"], p["heads"], p["kv_heads"], p["head_dim"]
    q = rng.standard_normal((b, h, p["q_plan"].padded_len, d)).astype(p["dtype"])
    k = rng.standard_normal((b, hk, p["kv_plan"].padded_len, d)).astype(p["dtype"])
    v = rng.standard_normal((b, hk, p["kv_plan"].padded_len, d)).astype(p["dtype"])
    pads = ~reference.valid_slots(p["kv_plan"].variable_block_sizes, p["volume"])
    k[:, :, pads] = np.nan
    v[:, :, pads] = np.nan
    return q, k, v


def force_ds_hand_over(monkeypatch):
    """Make the CUDA backward hand dS over on the tests' small problems, one (batch, kv head)
    pair per chunk at head dims 64 and 128 (within a 1 GiB budget), so that chunks of more than
    one pair run on the backward's own streams."""
    from vsa_nd.backends import cuda_attention

    for name, value in (("DS_WORKSPACE_BYTES", 1 << 30), ("_DS_MIN_BYTES", 0), ("_DS_CHUNK_PAIRS", 1),
                        ("_DS_HEAD_DIMS", (64, 128))):
        monkeypatch.setattr(cuda_attention, name, value)


def spoil_lists(q2k_idx, q2k_num, num_kv_blocks: int, rng):
    """Copies of the lists with some used entries outside [0, N_kv) (above, negative, int32's
    largest) and some counts outside [0, L]: what an unchecked list may hold."""
    idx, num = q2k_idx.copy(), q2k_num.copy()
    length = idx.shape[-1]
    used = np.arange(length) < np.clip(num, 0, length)[..., None]
    spoilt = used & (rng.random(idx.shape) < 0.3)
    idx[spoilt] = rng.choice([num_kv_blocks, num_kv_blocks + 7, -1, -3, 2**31 - 1], size=int(spoilt.sum()))
    rows = rng.random(num.shape)
    num[rows < 0.1] = -2
    num[rows > 0.9] = length + 5
    return idx, num


def cleaned_lists(q2k_idx, q2k_num, num_kv_blocks: int):
    """What the CUDA backend makes of unchecked lists (kv_lists.cu's kv_lists_clean): per row, the
    used entries inside [0, N_kv) in order, then 0; counts clamped to [0, L] first."""
    length = q2k_idx.shape[-1]
    idx, num = np.zeros_like(q2k_idx), np.zeros_like(q2k_num)
    for row in np.ndindex(q2k_num.shape):
        entries = q2k_idx[row][: min(max(int(q2k_num[row]), 0), length)]
        kept = entries[(entries >= 0) & (entries < num_kv_blocks)]
        idx[row][: kept.size], num[row] = kept, kept.size
    return idx, num
