"""CUDA-graph capture of the array-level API on CuPy (GPU only).

VSA_SPEC.md section 4: the forward and backward run on CuPy's current stream with no host
synchronisation, so a stream capture (``cupy.cuda.Stream.begin_capture``) records them whole.
The graphs are replayed after new inputs are copied into the captured arrays, and every
replay must give the eager call's results bit for bit (all kernels are deterministic).

Memory: the captured calls allocate from a private CuPy memory pool that nothing else uses
afterwards, so the blocks the graph reads and writes are never handed to anyone else (the
role torch's private graph pool plays for torch.cuda.graph).
"""

import numpy as np
import pytest

import vsa_nd
from vsa_nd._xp import BFLOAT16

from attention_problems import force_ds_hand_over

pytestmark = pytest.mark.gpu

SEQ, TILE, TOPK = (4, 6, 8), (4, 4, 4), 3  # 8 tiles, half of them partial: pads in every kv tile row
HEADS, KV_HEADS, DIM = 4, 2, 64


def _inputs(plan, seed):
    """Tiled q, gate, dout [1, H, S_pad, D] and k, v [1, H_kv, S_pad, D] in bfloat16 (gate in (0, 1))."""
    import cupy

    rng = np.random.default_rng(seed)

    def tiled(heads, squash=False):
        x = rng.standard_normal((1, plan.seq_len, heads, DIM)).astype(np.float32)
        x = 1 / (1 + np.exp(-x)) if squash else x
        return vsa_nd.tile(cupy.asarray(x).astype(BFLOAT16), plan)

    q, k, v, gate, dout = tiled(HEADS), tiled(KV_HEADS), tiled(KV_HEADS), tiled(HEADS, True), tiled(HEADS)
    return [q, k, v, gate, dout]


def _forward_and_backward(plan, q, k, v, gate, dout):
    out, context = vsa_nd.video_sparse_attn(q, k, v, TOPK, plan.variable_block_sizes, gate=gate, return_context=True)
    return (out, *vsa_nd.video_sparse_attn_backward(dout, context))


def _forward(plan, q, k, v, gate, dout):
    return (vsa_nd.video_sparse_attn(q, k, v, TOPK, plan.variable_block_sizes, gate=gate),)


@pytest.mark.parametrize("step, streams", [(_forward, False), (_forward_and_backward, False),
                                          (_forward_and_backward, True)])
def test_capture_and_replay_with_new_inputs(step, streams, monkeypatch):
    """``streams``: the backward's dS hand-over one (batch, kv head) at a time on streams of its
    own, forked from the capturing stream and joined back to it, so they are captured too."""
    import cupy

    if streams:
        force_ds_hand_over(monkeypatch)
    plan = vsa_nd.tile_plan(SEQ, TILE, device="cuda:0")
    static = _inputs(plan, seed=0)
    stream = cupy.cuda.Stream(non_blocking=True)
    pool = cupy.cuda.MemoryPool()
    cupy.cuda.Device().synchronize()  # the inputs were written on the default stream
    with stream, cupy.cuda.using_allocator(pool.malloc):
        step(plan, *static)  # warm-up: kernels compile and load outside the capture
        stream.synchronize()
        stream.begin_capture()
        captured = step(plan, *static)
        graph = stream.end_capture()
    for seed in (1, 2):
        fresh = _inputs(plan, seed)
        cupy.cuda.Device().synchronize()
        with stream:
            for dst, src in zip(static, fresh):
                dst[...] = src
            for result in captured:  # poisoned (NaN): the replay must write every value, pads included
                if result is not None:
                    result.view(np.uint16).fill(0xFFFF)
            graph.launch(stream)
            expected = step(plan, *fresh)
        stream.synchronize()
        for got, want in zip(captured, expected):
            assert (got is None) == (want is None)
            if got is not None:
                assert cupy.array_equal(got.view(np.uint16), want.view(np.uint16))


def test_matmul_capture_and_replay():
    """The coarse stage's GEMM alone, every transpose combination, against the eager call."""
    import cupy

    from vsa_nd.backends import cuda

    rng = np.random.default_rng(0)
    shapes = {(False, False): ((3, 40, 24), (3, 24, 72)), (False, True): ((3, 40, 24), (3, 72, 24)),
              (True, False): ((3, 24, 40), (3, 24, 72)), (True, True): ((3, 24, 40), (3, 72, 24))}
    static = {flags: [cupy.asarray(rng.standard_normal(s, dtype=np.float32)) for s in pair] for flags, pair in shapes.items()}
    stream = cupy.cuda.Stream(non_blocking=True)
    pool = cupy.cuda.MemoryPool()
    cupy.cuda.Device().synchronize()
    with stream, cupy.cuda.using_allocator(pool.malloc):
        for (ta, tb), (a, b) in static.items():
            cuda.matmul(a, b, ta, tb, alpha=0.5)
        stream.synchronize()
        stream.begin_capture()
        captured = {(ta, tb): cuda.matmul(a, b, ta, tb, alpha=0.5) for (ta, tb), (a, b) in static.items()}
        graph = stream.end_capture()
    for arrays in static.values():
        for x in arrays:
            x[...] = cupy.asarray(rng.standard_normal(x.shape, dtype=np.float32))
    cupy.cuda.Device().synchronize()
    graph.launch(stream)
    stream.synchronize()
    for (ta, tb), (a, b) in static.items():
        assert cupy.array_equal(captured[ta, tb], cuda.matmul(a, b, ta, tb, alpha=0.5))


@pytest.mark.parametrize("what", ["block sizes", "index lists"])
def test_value_checks_refused_under_capture(what):
    """Arrays whose values vsa_nd would check (block sizes that are not a plan's, index lists with
    check_indices) raise a ValueError that says why and what to pass instead, before any copy to
    the host breaks the capture; the capture then ends cleanly."""
    import cupy

    plan = vsa_nd.tile_plan(SEQ, TILE, device="cuda:0")
    q, k, v, gate, _ = _inputs(plan, seed=0)
    sizes = plan.variable_block_sizes.copy()  # same values, but not the plan's array: checked
    q2k_idx = cupy.zeros((1, HEADS, plan.num_blocks, 1), dtype=np.int32)
    stream = cupy.cuda.Stream(non_blocking=True)
    cupy.cuda.Device().synchronize()
    with stream:
        vsa_nd.video_sparse_attn(q, k, v, TOPK, sizes, gate=gate)  # outside a capture the check runs
        vsa_nd.block_sparse_attn(q, k, v, plan.variable_block_sizes, q2k_idx)
        stream.synchronize()
        stream.begin_capture()
        try:
            if what == "block sizes":
                with pytest.raises(ValueError, match="block_sizes: .*captured.*variable_block_sizes"):
                    vsa_nd.video_sparse_attn(q, k, v, TOPK, sizes, gate=gate)
            else:
                with pytest.raises(ValueError, match="q2k_idx: .*captured.*check_indices=False"):
                    vsa_nd.block_sparse_attn(q, k, v, plan.variable_block_sizes, q2k_idx)
        finally:
            stream.end_capture()


def test_block_map_selection_is_captured_and_matches_the_reference():
    """block_sparse_attn with a boolean block map: its lists come from a running count and a
    scatter (no sort, which synchronised on CuPy < 14), so the call is captured whole; its
    replay on new inputs matches the float64 reference, rows that select nothing included."""
    import cupy

    from vsa_nd import reference

    plan = vsa_nd.tile_plan(SEQ, TILE, device="cuda:0")
    n = plan.num_blocks
    rng = np.random.default_rng(7)
    block_map = rng.random((1, HEADS, n, n)) < 0.4
    block_map[0, 0, 0] = False  # a row that selects nothing: 0, lse -inf
    block_map[0, 1, 1] = True  # and one that selects every tile
    static = [cupy.asarray(x) for x in _inputs(plan, seed=0)[:3]]
    sizes, device_map = plan.variable_block_sizes, cupy.asarray(block_map)
    stream = cupy.cuda.Stream(non_blocking=True)
    pool = cupy.cuda.MemoryPool()
    cupy.cuda.Device().synchronize()
    with stream, cupy.cuda.using_allocator(pool.malloc):
        vsa_nd.block_sparse_attn(*static, sizes, block_map=device_map, return_lse=True)  # warm-up
        stream.synchronize()
        stream.begin_capture()
        out, lse = vsa_nd.block_sparse_attn(*static, sizes, block_map=device_map, return_lse=True)
        graph = stream.end_capture()
        fresh = _inputs(plan, seed=3)[:3]
        for dst, src in zip(static, fresh):
            dst[...] = src
        out[...] = cupy.nan  # poisoned: the replay must write every value
        graph.launch(stream)
    stream.synchronize()
    q, k, v = (cupy.asnumpy(x).astype(np.float64) for x in fresh)
    host_sizes = cupy.asnumpy(sizes)
    with np.errstate(invalid="ignore"):
        ref_out, ref_lse = reference.block_sparse_attn(q, k, v, block_map, host_sizes, plan.tile_volume)
    got = cupy.asnumpy(out).astype(np.float64)
    real = np.concatenate([np.arange(j * plan.tile_volume, j * plan.tile_volume + s) for j, s in enumerate(host_sizes)])
    err = np.linalg.norm(got[:, :, real] - ref_out[:, :, real]) / np.linalg.norm(ref_out[:, :, real])
    assert err < 1e-2, err
    lse = cupy.asnumpy(lse)
    assert (lse[0, 0, :plan.tile_volume] == -np.inf).all() and (got[0, 0, :plan.tile_volume] == 0).all()
    np.testing.assert_allclose(lse[:, :, real], ref_lse[:, :, real], rtol=1e-4, atol=1e-4)
