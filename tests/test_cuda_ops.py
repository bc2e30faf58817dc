"""The CUDA backend's tiling, tile-mean, top-k, softmax and coarse-gradient kernels against NumPy.

tile, untile, block_mean and select_topk_blocks run through the public API, coarse_grad_inputs,
block_means, the fused top-k + softmax and the softmax backward through the backend, on random
1- to 4-D plans with partial tiles.  Outputs are
poisoned (every byte 0xFF: NaN for floats, -1 for indices) before each launch; input pad slots
hold NaN.  tile, untile, top-k and dgate must match bit for bit; tile means and d_coarse (fp32
accumulation) to a relative error of 1e-5; every kernel must give identical bits when run
again.  Every test but the NVRTC compile check needs a GPU.

scripts/gpu-check.sh runs the ``smoke`` tests under compute-sanitizer with
``VSA_ND_CUPY_POOL=0`` (see conftest.py).
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import vsa_nd
from vsa_nd import reference
from vsa_nd._xp import BFLOAT16
from vsa_nd.backends import cuda as cuda_backend

from attention_problems import NEGATIVE_TOPK_ROWS, check_huge_tile_means, huge_tile_sums

try:
    import cupy
except ImportError:  # CI: only the compile check runs
    cupy = None

gpu = pytest.mark.gpu

DTYPES = (np.dtype(np.float32), np.dtype(np.float16), BFLOAT16)
# Tile shapes per dimension count: volumes 64 and 128, and odd ones.
TILES = {
    1: [(64,), (128,), (27,), (5,)],
    2: [(8, 8), (8, 16), (3, 9), (2, 3)],
    3: [(4, 4, 4), (2, 8, 8), (3, 3, 3), (1, 2, 3)],
    4: [(2, 2, 4, 4), (2, 4, 4, 4), (1, 3, 3, 3), (1, 1, 2, 2)],
}
MEAN_RTOL = 1e-5


def test_nvrtc_compile_check_passes():
    from vsa_nd import compile_check

    assert compile_check.main() == 0


def test_compile_check_without_nvrtc_says_what_to_install(monkeypatch, capsys):
    from vsa_nd import compile_check

    def missing():
        raise ModuleNotFoundError("No module named 'cuda'")

    monkeypatch.setattr(compile_check, "nvrtc_version", missing)
    assert compile_check.main() == 2
    err = capsys.readouterr().err
    assert "No module named 'cuda'" in err and "vsa_nd[test]" in err and "vsa_nd[cuda13]" in err


def test_compile_check_reads_wgmma_serialization_notes():
    from vsa_nd.compile_check import serialized_wgmma

    # Notes as ptxas printed them for this project's kernels (NVRTC 13.5), mangled names shortened.
    log = (
        "ptxas info    : Compiling entry function '_Z3foov' for 'sm_90a'\n"
        "ptxas info    : (C7514) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
        "non wgmma instructions reading accumulator registers of  a wgmma between start and end of the pipeline "
        "stage in the function '_Z3foov' in line 0\n"
        "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
        "non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline "
        "stage in the function '_Z3barv' in line 13109\n"
        "ptxas info    : (C7519) warpgroup.arrive is injected in around line 860 by compiler to allow use of "
        "registers in GMMA in function '_Z3bazv'\n"
        "ptxas info    : Used 168 registers\n"
    )
    found = serialized_wgmma(log)
    assert set(found) == {"_Z3foov", "_Z3barv"}  # C7519 is not a serialization
    assert found["_Z3barv"].startswith("due to non wgmma instructions defining accumulator registers")
    assert serialized_wgmma("ptxas info    : Used 168 registers\n") == {}


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def poisoned(monkeypatch):
    """Every output the backend allocates starts as 0xFF bytes."""

    def alloc(shape, dtype):
        out = cupy.empty(shape, dtype)
        _poison(out)
        return out

    monkeypatch.setattr(cuda_backend, "_alloc", alloc)


def _poison(a):
    a.view(cupy.uint8).fill(0xFF)
    return a


def _device(host, misalign: int = 0):
    """A copy of ``host`` on the GPU whose data starts ``misalign`` elements into its allocation."""
    flat = cupy.empty(host.size + misalign, host.dtype)
    dev = flat[misalign:].reshape(host.shape)
    dev.set(np.ascontiguousarray(host))
    return dev


def _empty(shape, dtype, misalign: int = 0):
    """A poisoned, C-contiguous device buffer starting ``misalign`` elements into its allocation."""
    size = int(np.prod(shape))
    return _poison(cupy.empty(size + misalign, dtype)[misalign:].reshape(shape))


def _random_bits(rng, shape, dtype):
    """Every bit pattern, NaNs and infinities included: tile/untile must move bytes untouched."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return rng.integers(0, 256, nbytes, dtype=np.uint8).view(dtype).reshape(shape)


def _assert_same_bits(got, expected):
    got = cupy.asnumpy(got)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert np.array_equal(np.ascontiguousarray(got).view(np.uint8), np.ascontiguousarray(expected).view(np.uint8))


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), np.finfo(np.float64).tiny)


def _tiled_reference(x, plan):
    """x [B, S, H, D] -> [B, H, S_pad, D] in NumPy, pad slots +0."""
    slots = np.asarray(plan.slot_token_index)
    out = np.zeros((x.shape[0], x.shape[2], slots.size, x.shape[3]), x.dtype)
    real = slots >= 0
    out[:, :, real] = x[:, slots[real]].transpose(0, 2, 1, 3)
    return out


def _tiled_values(rng, shape, block_sizes, volume, dtype):
    """Normal values [B, H, N*V, D] in ``dtype``; every pad slot NaN."""
    x = rng.standard_normal(shape).astype(dtype)
    x[:, :, ~reference.valid_slots(block_sizes, volume)] = np.nan
    return x


@st.composite
def plans(draw, max_tokens=4096):
    """A random N-D plan with partial tiles: each side 1 to two tiles and a bit."""
    tile_shape = draw(st.sampled_from(TILES[draw(st.integers(1, 4))]))
    seq = [draw(st.integers(1, 2 * t + 1)) for t in tile_shape]
    while np.prod(seq) > max_tokens:
        seq[int(np.argmax(seq))] //= 2
    return vsa_nd.tile_plan(tuple(seq), tile_shape)


# ---------------------------------------------------------------------------------------------
# tile / untile


def _check_tile_untile(plan, batch, heads, head_dim, dtype, misalign, rng):
    b, h, d = batch, heads, head_dim
    x_host = _random_bits(rng, (b, plan.seq_len, h, d), dtype)
    x = _device(x_host, misalign)
    expected = _tiled_reference(x_host, plan)

    out = _empty(expected.shape, dtype, misalign)
    tiled = vsa_nd.tile(x, plan, out=out)
    assert tiled is out
    _assert_same_bits(tiled, expected)
    _assert_same_bits(vsa_nd.tile(x, plan, out=_empty(expected.shape, dtype)), expected)  # again: same bits

    y_host = _random_bits(rng, expected.shape, dtype)
    y_host[:, :, np.asarray(plan.slot_token_index) < 0] = np.nan  # pads must never be read
    y = _device(y_host, misalign)
    untiled_ref = y_host[:, :, np.asarray(plan.untile_index)].transpose(0, 2, 1, 3)
    out = _empty(untiled_ref.shape, dtype, misalign)
    assert vsa_nd.untile(y, plan, out=out) is out
    _assert_same_bits(out, untiled_ref)
    _assert_same_bits(vsa_nd.untile(vsa_nd.tile(x, plan), plan), x_host)  # round trip


@gpu
@given(
    plans(),
    st.integers(1, 2),
    st.integers(1, 3),
    st.sampled_from([64, 128, 24, 12, 6, 3]),  # 16-, 8-, 4- and 2-byte copy units
    st.sampled_from(DTYPES),
    st.sampled_from([0, 1]),
    st.integers(0, 2**32 - 1),
)
def test_tile_untile_bit_exact(plan, batch, heads, head_dim, dtype, misalign, seed):
    _check_tile_untile(plan, batch, heads, head_dim, dtype, misalign, np.random.default_rng(seed))


@gpu
@pytest.mark.parametrize("head_dim, dtype, misalign", [(24, BFLOAT16, 0), (3, np.dtype(np.float16), 1), (6, np.dtype(np.float32), 1)])
def test_smoke_tile_untile(head_dim, dtype, misalign):
    plan = vsa_nd.tile_plan((5, 9, 7), (4, 4, 4))
    _check_tile_untile(plan, 2, 3, head_dim, dtype, misalign, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# block_mean


def _check_block_mean(plan, batch, heads, head_dim, dtype, misalign, rng):
    sizes, volume = plan.variable_block_sizes, plan.tile_volume
    x_host = _tiled_values(rng, (batch, heads, plan.padded_len, head_dim), sizes, volume, dtype)
    x = _device(x_host, misalign)
    mean = vsa_nd.block_mean(x, sizes)
    assert mean.dtype == np.float32 and mean.shape == (batch, heads, plan.num_blocks, head_dim)
    assert _rel_err(cupy.asnumpy(mean), reference.block_mean(x_host, sizes, volume)) <= MEAN_RTOL
    _assert_same_bits(vsa_nd.block_mean(x, sizes), cupy.asnumpy(mean))


@gpu
@given(
    plans(),
    st.integers(1, 2),
    st.integers(1, 3),
    st.sampled_from([64, 128, 20]),  # 20: rows not a multiple of 16 bytes, one element per load
    st.sampled_from(DTYPES),
    st.sampled_from([0, 1]),
    st.integers(0, 2**32 - 1),
)
def test_block_mean_matches_reference(poisoned, plan, batch, heads, head_dim, dtype, misalign, seed):
    _check_block_mean(plan, batch, heads, head_dim, dtype, misalign, np.random.default_rng(seed))


@gpu
@pytest.mark.parametrize("head_dim", [6, 8, 20])  # one element per load at 6 (both dtypes) and bf16 at 20, else 16 bytes
@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BFLOAT16])
def test_block_mean_of_tiles_whose_sums_pass_float32s_range(poisoned, dtype, head_dim):
    """Tile means that fit where the tile's sum does not: the mean, not inf (the kernel sums such
    a column again with its elements scaled down), as in the float64 reference."""
    x, sizes, infinite = huge_tile_sums(dtype, head_dim)
    check_huge_tile_means(cupy.asnumpy(vsa_nd.block_mean(cupy.asarray(x), cupy.asarray(sizes))), x, sizes, infinite,
                          MEAN_RTOL)


def _check_block_means(q_plan, kv_plan, heads, kv_heads, head_dim, dtype, rng, misalign=(0, 0, 0)):
    """q, k and v (GQA heads, cross-attention lengths) in one launch; ``misalign``: elements by
    which each of q, k, v starts into its allocation (any of them off a 16-byte boundary takes
    the launch to one element per load)."""
    q_sizes, kv_sizes = (cupy.asarray(p.variable_block_sizes) for p in (q_plan, kv_plan))
    volume = q_plan.tile_volume
    hosts = [
        _tiled_values(rng, (2, h, p.padded_len, head_dim), p.variable_block_sizes, volume, dtype)
        for h, p in ((heads, q_plan), (kv_heads, kv_plan), (kv_heads, kv_plan))
    ]
    means = cuda_backend.block_means([_device(a, m) for a, m in zip(hosts, misalign)], [q_sizes, kv_sizes, kv_sizes])
    for mean, host, p in zip(means, hosts, (q_plan, kv_plan, kv_plan)):
        assert _rel_err(cupy.asnumpy(mean), reference.block_mean(host, p.variable_block_sizes, volume)) <= MEAN_RTOL


@gpu
@given(plans(max_tokens=2048), st.data(), st.sampled_from([64, 128]), st.sampled_from(DTYPES), st.integers(0, 2**32 - 1))
def test_block_means_of_q_k_v_in_one_launch(poisoned, q_plan, data, head_dim, dtype, seed):
    kv_seq = tuple(data.draw(st.integers(1, 2 * t + 1)) for t in q_plan.tile_shape)
    kv_plan = vsa_nd.tile_plan(kv_seq, q_plan.tile_shape)
    kv_heads = data.draw(st.sampled_from([1, 2]))
    heads = kv_heads * data.draw(st.sampled_from([1, 3]))
    misalign = data.draw(st.sampled_from([(0, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 0)]))
    _check_block_means(q_plan, kv_plan, heads, kv_heads, head_dim, dtype, np.random.default_rng(seed), misalign)


@gpu
def test_smoke_block_mean(poisoned):
    rng = np.random.default_rng(1)
    plan = vsa_nd.tile_plan((5, 9, 7), (4, 4, 4))
    _check_block_mean(plan, 2, 3, 128, BFLOAT16, 0, rng)
    _check_block_mean(plan, 1, 2, 300, BFLOAT16, 0, rng)  # rows of 600 bytes: one element per load
    _check_block_mean(plan, 1, 2, 64, np.dtype(np.float32), 1, rng)
    _check_block_means(plan, vsa_nd.tile_plan((3, 4, 9), (4, 4, 4)), 4, 2, 64, np.dtype(np.float16), rng)
    # q on a 16-byte boundary, k or v not: the launch still takes one element per load.
    for misalign in ((0, 1, 0), (0, 0, 1)):
        _check_block_means(plan, vsa_nd.tile_plan((3, 4, 9), (4, 4, 4)), 4, 2, 64, BFLOAT16, rng, misalign)


# ---------------------------------------------------------------------------------------------
# select_topk


def _scores(rng, shape, kind: str):
    """Random fp32 scores of one of several kinds, most with many ties."""
    if kind == "normal":
        return rng.standard_normal(shape).astype(np.float32)
    if kind == "few_values":  # heavy ties, with -0.0 and +0.0 mixed
        v = rng.integers(-3, 4, shape).astype(np.float32)
        return np.where(v == 0, rng.choice(np.array([-0.0, 0.0], np.float32), shape), v)
    if kind == "pool":  # a handful of distinct normal values
        return rng.choice(rng.standard_normal(20).astype(np.float32), shape)
    if kind == "specials":
        special = np.array([-np.inf, np.inf, np.nan, -0.0, 0.0, 1.0, -1.0, 1e-45, -1e-45, 3.4e38, -3.4e38], np.float32)
        return rng.choice(special, shape)
    assert kind == "constant"
    return np.full(shape, rng.standard_normal(), np.float32)


def _check_topk(scores_host, topk):
    """The selection against the reference, bit for bit (and again: deterministic); and the
    forward's fused variant, which also turns the scores into their row softmax in place: the
    same selection, and probabilities close to a float64 softmax (NaN where it is NaN: rows with
    NaN or +inf), as those of the standalone softmax kernel.  The bound allows the row sum's fp32
    rounding and 4e-6 for __expf, whose error grows with |x - max| (2 + 1.173 |x| ulp): enough for
    the spans of these score kinds (at most ~10; the huge specials underflow to exactly 0)."""
    scores = cupy.asarray(scores_host)
    q2k_idx, q2k_num = vsa_nd.select_topk_blocks(scores, topk)
    expected_idx, expected_num = reference.select_topk(scores_host, topk)
    _assert_same_bits(q2k_idx, expected_idx)
    _assert_same_bits(q2k_num, expected_num)
    _assert_same_bits(vsa_nd.select_topk_blocks(scores, topk)[0], expected_idx)
    assert cupy.array_equal(scores, cupy.asarray(scores_host), equal_nan=True)  # select_topk_blocks leaves them
    fused_idx, fused_num, probs = cuda_backend.select_topk_softmax_(scores, topk)
    assert probs is scores
    _assert_same_bits(fused_idx, expected_idx)
    _assert_same_bits(fused_num, expected_num)
    x = scores_host.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        want = e / e.sum(axis=-1, keepdims=True)
    n = scores_host.shape[-1]
    alone = cuda_backend.softmax_rows_(cupy.asarray(scores_host))  # the standalone kernel: the same contract
    for result in (probs, alone):
        got = cupy.asnumpy(result).astype(np.float64)
        assert np.array_equal(np.isnan(got), np.isnan(want))
        fine = ~np.isnan(want)
        assert np.all(np.abs(got[fine] - want[fine]) <= 4e-6 * want[fine] + (n + 8) * 2.0**-24 * want[fine] + 1e-30)


@gpu
@given(
    st.one_of(st.integers(1, 40), st.integers(1, 3000), st.sampled_from([127, 128, 129, 1023, 1024, 1025, 2049])),
    st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 4)),
    st.sampled_from(["normal", "few_values", "pool", "specials", "constant"]),
    st.data(),
    st.integers(0, 2**32 - 1),
)
def test_select_topk_matches_reference(poisoned, num_kv, lead, kind, data, seed):
    topk = data.draw(st.one_of(st.integers(1, num_kv), st.sampled_from([1, num_kv])))
    _check_topk(_scores(np.random.default_rng(seed), (*lead, num_kv), kind), topk)


@gpu
@pytest.mark.parametrize(
    "row, topk",
    [
        ([2.0, 2.0, 2.0, 2.0], 2),  # all equal: the lowest indices
        ([1.0, 3.0, 3.0, 0.0, 3.0, 3.0], 3),  # the 4 threes tie for 3 places
        ([0.0, -0.0, 0.0, -0.0, -1.0], 3),  # -0.0 == +0.0
        ([np.nan, 1.0, np.nan, -np.inf, 2.0], 4),  # NaN below -inf
        ([np.nan, np.nan, np.nan], 2),
        ([-np.inf, np.inf, -np.inf, np.inf], 3),
        ([5.0] * 700 + [7.0] * 700 + [5.0] * 1700, 1000),  # ties across scan chunks
        *((row, topk) for row, topk, _ in NEGATIVE_TOPK_ROWS),  # the k-th largest score negative
    ],
)
def test_select_topk_ties(poisoned, row, topk):
    _check_topk(np.array(row, np.float32)[None, None, None, :], topk)


@gpu
def test_smoke_select_topk(poisoned):
    rng = np.random.default_rng(2)
    for kind in ("normal", "few_values", "specials"):
        _check_topk(_scores(rng, (1, 2, 3, 2500), kind), 700)
    _check_topk(_scores(rng, (2, 1, 2, 9), "pool"), 9)


# ---------------------------------------------------------------------------------------------
# softmax_grad_rows_ (the coarse branch's softmax backward)


def _check_softmax_grad(lead, n, d, rng):
    """softmax_grad_rows_ in place against float64: within the fp32 rounding of its dot product
    (d terms), its subtraction and its product; the NumPy backend's version likewise."""
    from vsa_nd.backends import numba_cpu

    scores = rng.standard_normal((*lead, n)) * 3
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = (probs / probs.sum(axis=-1, keepdims=True)).astype(np.float32)
    g, d_out, out = (rng.standard_normal(shape).astype(np.float32) for shape in ((*lead, n), (*lead, d), (*lead, d)))
    terms = d_out.astype(np.float64) * out
    want = probs * (g - terms.sum(axis=-1, keepdims=True))
    bound = probs * ((d + 4) * 2.0**-24 * (np.abs(terms).sum(axis=-1, keepdims=True) + np.abs(g))) + 2.0**-23 * np.abs(want)
    arrays = [cupy.asarray(x) for x in (g, probs, d_out, out)]
    result = cuda_backend.softmax_grad_rows_(*arrays)
    assert result is arrays[0]
    got = cupy.asnumpy(result)
    assert np.all(np.abs(got - want) <= bound)
    on_cpu = numba_cpu.softmax_grad_rows_(g.copy(), probs, d_out, out)
    assert np.all(np.abs(on_cpu - want) <= bound)


@gpu
@given(st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 40)), st.integers(1, 1500),
       st.sampled_from([1, 3, 31, 32, 33, 64, 128, 160]), st.integers(0, 2**32 - 1))
def test_softmax_grad_rows_matches_float64(lead, n, d, seed):
    _check_softmax_grad(lead, n, d, np.random.default_rng(seed))


@gpu
def test_smoke_softmax_grad_rows():
    rng = np.random.default_rng(4)
    _check_softmax_grad((1, 3, 13), 768, 128, rng)  # 39 rows: the last CTA has rows beyond the end
    _check_softmax_grad((2, 1, 1), 1, 64, rng)


# ---------------------------------------------------------------------------------------------
# coarse_grad_inputs


def _check_coarse_grad(plan, batch, heads, head_dim, dtype, gated, rng):
    """d_coarse and dgate against NumPy; with the forward's out and lse also the row terms (delta
    against float64 where the kernel can take them, lse * log2(e) bit for bit), and d_coarse and
    dgate the same bits either way."""
    sizes, volume = plan.variable_block_sizes, plan.tile_volume
    shape = (batch, heads, plan.padded_len, head_dim)
    dout_host = _tiled_values(rng, shape, sizes, volume, dtype)
    gate_host = _tiled_values(rng, shape, sizes, volume, dtype) if gated else None
    out_host = _tiled_values(rng, shape, sizes, volume, dtype)
    lse_host = rng.standard_normal(shape[:3]).astype(np.float32)
    coarse_host = rng.standard_normal((batch, heads, plan.num_blocks, head_dim)).astype(np.float32)

    def run(with_rows=False):
        gate = None if gate_host is None else cupy.asarray(gate_host)
        extra = {"out": cupy.asarray(out_host), "lse": cupy.asarray(lse_host)} if with_rows else {}
        return cuda_backend.coarse_grad_inputs(cupy.asarray(dout_host), gate, cupy.asarray(coarse_host),
                                               cupy.asarray(sizes), **extra)

    d_coarse, dgate, terms = run()
    assert terms is None
    real = reference.valid_slots(sizes, volume)[:, None]
    weighted = dout_host.astype(np.float64) * (1.0 if gate_host is None else gate_host.astype(np.float64))
    expected = np.where(real, weighted, 0.0).reshape(batch, heads, plan.num_blocks, volume, head_dim).sum(axis=3)
    assert d_coarse.dtype == np.float32 and _rel_err(cupy.asnumpy(d_coarse), expected) <= MEAN_RTOL
    _assert_same_bits(run()[0], cupy.asnumpy(d_coarse))
    if gated:
        product = dout_host.astype(np.float32) * np.repeat(coarse_host, volume, axis=2)  # NaN on pads, dropped
        _assert_same_bits(dgate, np.where(real, product, np.float32(0.0)).astype(dtype))
    else:
        assert dgate is None

    with_rows = run(with_rows=True)
    _assert_same_bits(with_rows[0], cupy.asnumpy(d_coarse))
    if gated:
        _assert_same_bits(with_rows[1], cupy.asnumpy(dgate))
    terms = with_rows[2]
    if dtype == np.float32 or head_dim % 8 or (head_dim // 8) & (head_dim // 8 - 1) or head_dim > 256:
        assert terms is None  # not an attention dtype, no 16-byte vectors, or a tile's lanes not 2^n <= 32
        return
    broadcast = np.repeat(coarse_host.astype(np.float64), volume, axis=2)
    fine = out_host.astype(np.float64) - (broadcast if gate_host is None else gate_host.astype(np.float64) * broadcast)
    rows = np.where(real, dout_host.astype(np.float64) * fine, 0.0)
    delta = cupy.asnumpy(terms.delta)
    assert delta.dtype == np.float32 and np.all(delta[:, :, ~real[:, 0]] == 0.0)
    # fp32 sums of D products: within D * 2**-24 of the sum of their magnitudes, row by row
    bound = (head_dim + 4) * 2.0**-24 * np.abs(rows).sum(axis=-1)
    assert np.all(np.abs(delta - rows.sum(axis=-1)) <= bound)
    _assert_same_bits(terms.lse_log2, lse_host * np.float32(1.4426950408889634))
    if head_dim in (64, 128):  # bwd_delta's head dims: the same bits as that kernel's
        own = _bwd_delta(dout_host, out_host, gate_host, coarse_host, sizes, lse_host, volume)
        _assert_same_bits(terms.delta, cupy.asnumpy(own[0]))
        _assert_same_bits(terms.lse_log2, cupy.asnumpy(own[1]))


def _bwd_delta(dout_host, out_host, gate_host, coarse_host, sizes, lse_host, volume):
    """(delta, lse_log2) of attention_bwd.cu's bwd_delta, by the launcher block_sparse_bwd calls."""
    from vsa_nd.backends.cuda_attention import bwd_delta

    shape = dout_host.shape[:3]
    assert dout_host.shape[2] // len(sizes) == volume
    delta, lse_log2 = cupy.full(shape, np.nan, np.float32), cupy.full(shape, np.nan, np.float32)
    gate = None if gate_host is None else cupy.asarray(gate_host)
    bwd_delta(cupy.asarray(dout_host), cupy.asarray(out_host), cupy.asarray(coarse_host), gate, cupy.asarray(sizes),
              cupy.asarray(lse_host), delta, lse_log2)
    return delta, lse_log2


@gpu
@given(
    plans(),
    st.integers(1, 2),
    st.integers(1, 3),
    st.sampled_from([64, 128, 256, 20]),
    st.sampled_from(DTYPES),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_coarse_grad_inputs_match_numpy(poisoned, plan, batch, heads, head_dim, dtype, gated, seed):
    _check_coarse_grad(plan, batch, heads, head_dim, dtype, gated, np.random.default_rng(seed))


@gpu
def test_smoke_coarse_grad_inputs(poisoned):
    rng = np.random.default_rng(3)
    plan = vsa_nd.tile_plan((5, 9, 7), (4, 4, 4))
    for gated in (False, True):
        _check_coarse_grad(plan, 2, 3, 128, BFLOAT16, gated, rng)
        _check_coarse_grad(plan, 2, 1, 64, np.dtype(np.float16), gated, rng)
        _check_coarse_grad(plan, 1, 2, 256, BFLOAT16, gated, rng)  # a tile's 32 lanes: a whole warp
        _check_coarse_grad(plan, 1, 2, 300, np.dtype(np.float16), gated, rng)  # one element per load


@gpu
def test_coarse_grad_row_terms_fall_back_where_the_kernel_cannot_take_them(poisoned):
    """No row terms (block_sparse_bwd then runs bwd_delta) without lse, or with an out whose rows
    are not 16-byte aligned; d_coarse and dgate are the same bits either way."""
    rng = np.random.default_rng(9)
    plan = vsa_nd.tile_plan((5, 9, 7), (4, 4, 4))
    shape = (1, 2, plan.padded_len, 64)
    sizes = cupy.asarray(plan.variable_block_sizes)
    dout, gate = (cupy.asarray(_tiled_values(rng, shape, plan.variable_block_sizes, 64, BFLOAT16)) for _ in range(2))
    coarse = cupy.asarray(rng.standard_normal((1, 2, plan.num_blocks, 64)).astype(np.float32))
    lse = cupy.asarray(rng.standard_normal(shape[:3]).astype(np.float32))
    out = cupy.asarray(rng.standard_normal(shape).astype(BFLOAT16))
    misaligned = cupy.empty(out.size + 1, out.dtype)[1:].reshape(shape)
    misaligned[...] = out
    base = cuda_backend.coarse_grad_inputs(dout, gate, coarse, sizes)
    for kwargs in ({"out": out}, {"out": misaligned, "lse": lse}):
        d_coarse, dgate, terms = cuda_backend.coarse_grad_inputs(dout, gate, coarse, sizes, **kwargs)
        assert terms is None
        _assert_same_bits(d_coarse, cupy.asnumpy(base[0]))
        _assert_same_bits(dgate, cupy.asnumpy(base[1]))
    assert cuda_backend.coarse_grad_inputs(dout, gate, coarse, sizes, out=out, lse=lse)[2] is not None


# ---------------------------------------------------------------------------------------------
# streams, graphs, devices


@gpu
def test_kernels_run_on_the_current_stream_and_capture_in_a_graph():
    """Launches made while a non-default stream captures are recorded, not run; replaying the
    graph on new input data gives the new results: every kernel went to CuPy's current stream,
    with no host synchronisation (which would break the capture)."""
    rng = np.random.default_rng(4)
    host_plan = vsa_nd.tile_plan((6, 10, 9), (4, 4, 4))
    b, h, d, dtype = 1, 2, 64, BFLOAT16
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        plan = host_plan.to("cuda:%d" % cupy.cuda.Device().id)
        sizes = plan.variable_block_sizes
        x = cupy.empty((b, plan.seq_len, h, d), dtype)
        y = cupy.empty((b, h, plan.padded_len, d), dtype)
        scores = cupy.empty((b, h, plan.num_blocks, plan.num_blocks), np.float32)
        coarse = cupy.empty((b, h, plan.num_blocks, d), np.float32)
        tiled, untiled = cupy.empty(y.shape, dtype), cupy.empty(x.shape, dtype)

        def run():
            return (
                vsa_nd.tile(x, plan, out=tiled),
                vsa_nd.untile(y, plan, out=untiled),
                vsa_nd.block_mean(y, sizes),
                *vsa_nd.select_topk_blocks(scores, 5),
                *cuda_backend.coarse_grad_inputs(y, y, coarse, sizes)[:2],
            )

        run()  # compiles and loads every kernel, builds nothing during the capture
        stream.synchronize()
        _poison(tiled)
        stream.begin_capture()
        outputs = run()
        graph = stream.end_capture()
        stream.synchronize()
        assert (tiled.view(cupy.uint8) == 0xFF).all(), "a kernel ran during the capture"

        x_host = rng.standard_normal(x.shape).astype(dtype)
        y_host = _tiled_values(rng, y.shape, host_plan.variable_block_sizes, host_plan.tile_volume, dtype)
        scores_host = _scores(rng, scores.shape, "few_values")
        coarse_host = rng.standard_normal(coarse.shape).astype(np.float32)
        for dev, host in ((x, x_host), (y, y_host), (scores, scores_host), (coarse, coarse_host)):
            dev.set(host, stream=stream)
        graph.launch(stream=stream)
        stream.synchronize()

    sizes_host, volume = host_plan.variable_block_sizes, host_plan.tile_volume
    _assert_same_bits(outputs[0], _tiled_reference(x_host, host_plan))
    _assert_same_bits(outputs[1], y_host[:, :, np.asarray(host_plan.untile_index)].transpose(0, 2, 1, 3))
    assert _rel_err(cupy.asnumpy(outputs[2]), reference.block_mean(y_host, sizes_host, volume)) <= MEAN_RTOL
    _assert_same_bits(outputs[3], reference.select_topk(scores_host, 5)[0])
    real = reference.valid_slots(sizes_host, volume)[:, None]
    y64 = np.where(real, y_host.astype(np.float64), 0.0)
    d_coarse = (y64 * y64).reshape(b, h, -1, volume, d).sum(axis=3)
    assert _rel_err(cupy.asnumpy(outputs[5]), d_coarse) <= MEAN_RTOL
    dgate = y_host.astype(np.float32) * np.repeat(coarse_host, volume, axis=2)
    _assert_same_bits(outputs[6], np.where(real, dgate, np.float32(0.0)).astype(dtype))


@gpu
def test_index_arrays_beyond_int32_are_refused_not_wrapped():
    """CuPy int64/uint64 block sizes and index lists beyond int32 saturate before the int32 cast
    (checking them first would synchronise), so the value checks refuse them: 2**32 + 8 must not
    pass as 8, nor 2**32 + 1 as tile 1."""
    rng = np.random.default_rng(12)
    plan = vsa_nd.tile_plan((4, 8, 8), (4, 4, 4))
    n = plan.num_blocks
    q, k, v = (cupy.asarray(rng.standard_normal((1, 2, plan.padded_len, 64)).astype(np.float16)) for _ in range(3))
    for dtype in (np.int64, np.uint64):
        sizes = cupy.full(n, 2**32 + 8, dtype)
        with pytest.raises(ValueError, match=r"q_block_sizes: expected every block size in \[1, 64\]"):
            vsa_nd.video_sparse_attn(q, k, v, 2, sizes)  # (kv_block_sizes default to them)
        with pytest.raises(ValueError, match=r"kv_block_sizes: expected every block size in \[1, 64\]"):
            vsa_nd.video_sparse_attn(q, k, v, 2, plan.variable_block_sizes, sizes)
    idx = cupy.tile(cupy.arange(2, dtype=cupy.int64), (1, 2, n, 1)) + 2**32
    with pytest.raises(ValueError, match=r"q2k_idx: expected tile indices in \[0, 4\)"):
        vsa_nd.block_sparse_attn(q, k, v, cupy.asarray(plan.variable_block_sizes), idx)


@gpu
def test_every_device_runs_on_its_own_device():
    """Arrays on device i, called while another device is current: the launch follows the array."""
    rng = np.random.default_rng(5)
    plan = vsa_nd.tile_plan((9, 11), (8, 8))
    count = cupy.cuda.runtime.getDeviceCount()
    for device in range(count):
        with cupy.cuda.Device(device):
            x_host = _random_bits(rng, (1, plan.seq_len, 2, 64), BFLOAT16)
            x = cupy.asarray(x_host)
            scores_host = _scores(rng, (1, 2, 4, 50), "few_values")
            scores = cupy.asarray(scores_host)
        with cupy.cuda.Device((device + 1) % count):
            tiled = vsa_nd.tile(x, plan)
            q2k_idx, _ = vsa_nd.select_topk_blocks(scores, 7)
        assert tiled.device.id == device and q2k_idx.device.id == device
        _assert_same_bits(tiled, _tiled_reference(x_host, plan))
        _assert_same_bits(q2k_idx, reference.select_topk(scores_host, 7)[0])
