"""An empty batch (B = 0) through the array API: every op returns empty results with the shapes
and dtypes it returns for a batch of one, fills and returns the buffers it is given, and still
checks everything but the batch.  NumPy (Numba backend) always; CuPy (CUDA backend) on a GPU,
where nothing is launched for the empty call and a batch of one afterwards still matches the
reference.  The torch and JAX adapters' empty batches are tested in their own files.
"""

import dataclasses

import numpy as np
import pytest

import vsa_nd
from vsa_nd import reference as ref
from vsa_nd._xp import BFLOAT16

try:
    import cupy
except ImportError:
    cupy = None

CPU_DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), BFLOAT16]
GPU_DTYPES = [np.dtype(np.float16), BFLOAT16]  # what the CUDA attention kernels take
H, H_KV, TOPK = 4, 2, 3


def _problem(xp, dtype, batch: int, head_dim: int, seed: int):
    """q, k, v, gate [batch, H(_KV), S_pad, D] of a 3-D plan with partial tiles (block sizes on xp's device)."""
    plan = vsa_nd.tile_plan((5, 6, 7), (4, 4, 4))
    if xp is not np:
        plan = plan.to("cuda:0")
    rng = np.random.default_rng(seed)
    arrays = [xp.asarray(rng.standard_normal((batch, h, plan.padded_len, head_dim)).astype(dtype))
              for h in (H, H_KV, H_KV, H)]
    return plan, arrays


def _results(xp, q, k, v, gate, sizes):
    """Every op's results on these inputs, in a dict of name -> array (the backward's from dout = 1)."""
    out, ctx = vsa_nd.video_sparse_attn(q, k, v, TOPK, sizes, gate=gate, return_context=True)
    grads = vsa_nd.video_sparse_attn_backward(xp.ones_like(out), ctx)
    means = [vsa_nd.block_mean(x, sizes) for x in (q, k, v)]
    scores, coarse = vsa_nd.coarse_attn(*means)
    idx, num = vsa_nd.select_topk_blocks(scores, TOPK)
    fine, lse = vsa_nd.block_sparse_attn(q, k, v, sizes, idx, num, return_lse=True, check_indices=xp is np)
    found = {"out": out, "dq": grads.dq, "dk": grads.dk, "dv": grads.dv, "dgate": grads.dgate, "q_mean": means[0],
             "k_mean": means[1], "scores": scores, "coarse": coarse, "q2k_idx": idx, "q2k_num": num, "fine": fine,
             "lse": lse}
    found.update({f"context.{name}": getattr(ctx, name) for name in
                  ("lse", "q2k_idx", "q2k_num", "q_mean", "k_mean", "v_mean", "coarse_probs", "coarse")})
    return found


def _check_empty_batch(xp, dtype, head_dim: int):
    plan, one = _problem(xp, dtype, 1, head_dim, seed=0)
    _, empty = _problem(xp, dtype, 0, head_dim, seed=1)
    sizes = plan.variable_block_sizes
    want, got = _results(xp, *one, sizes), _results(xp, *empty, sizes)
    assert got.keys() == want.keys()
    for name, array in got.items():
        assert type(array) is type(want[name]), name
        assert array.shape == (0, *want[name].shape[1:]), name
        assert array.dtype == want[name].dtype, name
    # Buffers given are filled (nothing to fill) and returned as they are.
    q, k, v, gate = empty
    out = xp.empty_like(q)
    result, ctx = vsa_nd.video_sparse_attn(q, k, v, TOPK, sizes, gate=gate, return_context=True, out=out)
    assert result is out and ctx.out is out
    buffers = vsa_nd.Gradients(xp.empty_like(q), xp.empty_like(k), xp.empty_like(v), xp.empty_like(gate))
    grads = vsa_nd.video_sparse_attn_backward(xp.empty_like(q), ctx, out=buffers)
    assert all(g is b for g, b in zip(grads, buffers))
    # Everything but the batch is still checked.
    with pytest.raises(ValueError, match=r"topk: expected 1 <= topk <= 8, got 9"):
        vsa_nd.video_sparse_attn(q, k, v, 9, sizes)
    with pytest.raises(ValueError, match=r"k: expected shape \[0, \*, \*, " + str(head_dim) + r"\]"):
        vsa_nd.video_sparse_attn(q, *one[1:3], TOPK, sizes)
    with pytest.raises(ValueError, match=r"q: expected every axis after the batch \(axis 0\) of length at least 1"):
        vsa_nd.video_sparse_attn(q[:, :0], k[:, :0], v[:, :0], TOPK, sizes)
    with pytest.raises(ValueError, match=r"block_sizes: expected every block size in \[1, 64\]"):
        vsa_nd.video_sparse_attn(q, k, v, TOPK, xp.full(plan.num_blocks, 65, np.int32))
    with pytest.raises(ValueError, match=r"dout: expected shape \[0, 4, 512, " + str(head_dim) + r"\]"):
        vsa_nd.video_sparse_attn_backward(xp.empty((0, 4, 512, head_dim + 1), q.dtype), ctx)
    means = [vsa_nd.block_mean(x, sizes) for x in (q, k, v)]
    with pytest.raises(ValueError, match=r"scale: expected a positive finite float, got -1.0"):
        vsa_nd.coarse_attn(*means, scale=-1.0)
    return plan, one


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=lambda d: d.name)
def test_an_empty_batch_gives_empty_results_on_the_cpu(dtype):
    _check_empty_batch(np, dtype, 16)


def test_an_empty_batch_of_cross_attention_keeps_each_side_s_tile_count():
    """q and kv of different tile counts (4 and 8): the context's key-side arrays and the
    gradients have the shapes of a batch of one."""
    q_plan, kv_plan = vsa_nd.tile_plan((4, 4), (2, 2)), vsa_nd.tile_plan((8, 4), (2, 2))
    rng = np.random.default_rng(5)

    def run(batch):
        q = rng.standard_normal((batch, H, q_plan.padded_len, 8)).astype(np.float32)
        k, v = (rng.standard_normal((batch, H_KV, kv_plan.padded_len, 8)).astype(np.float32) for _ in range(2))
        out, ctx = vsa_nd.video_sparse_attn(q, k, v, TOPK, q_plan.variable_block_sizes, kv_plan.variable_block_sizes,
                                            return_context=True)
        grads = vsa_nd.video_sparse_attn_backward(np.ones_like(out), ctx)
        found = {name: getattr(ctx, name) for name in
                 ("lse", "q2k_idx", "q2k_num", "q_mean", "k_mean", "v_mean", "coarse_probs", "coarse")}
        return found | {"out": out, "dq": grads.dq, "dk": grads.dk, "dv": grads.dv}

    want, got = run(1), run(0)
    assert want["k_mean"].shape[2] == 8 and want["coarse_probs"].shape[2:] == (4, 8)
    for name, array in got.items():
        assert array.shape == (0, *want[name].shape[1:]) and array.dtype == want[name].dtype, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: d.name)
def test_an_empty_batch_gives_empty_results_on_cuda(dtype):
    plan, (q, k, v, gate) = _check_empty_batch(cupy, dtype, 64)
    cupy.cuda.Device().synchronize()  # nothing launched for the empty calls failed
    # A context the CUDA kernels cannot run (float32, made by hand) is refused at B = 0 as at B = 1.
    _, (q0, k0, v0, g0) = _problem(cupy, dtype, 0, 64, seed=2)
    _, ctx = vsa_nd.video_sparse_attn(q0, k0, v0, TOPK, plan.variable_block_sizes, gate=g0, return_context=True)
    as32 = {name: getattr(ctx, name).astype(np.float32) for name in ("q", "k", "v", "gate", "out")}
    with pytest.raises(TypeError, match=r"context.q: the CUDA attention kernels take float16 or bfloat16, got float32"):
        vsa_nd.video_sparse_attn_backward(cupy.empty((0, H, plan.padded_len, 64), np.float32),
                                          dataclasses.replace(ctx, **as32))
    # A batch of one after the empty calls (whose signatures are not remembered) takes the full
    # path, then the prepared one: both against the reference.
    host = [cupy.asnumpy(x).astype(np.float64) for x in (q, k, v, gate)]
    sizes = cupy.asnumpy(plan.variable_block_sizes)
    want = ref.video_sparse_attn(*host[:3], sizes, sizes, TOPK, plan.tile_volume, gate=host[3]).out
    real = ref.valid_slots(sizes, plan.tile_volume)
    for _ in range(2):
        out = vsa_nd.video_sparse_attn(q, k, v, TOPK, plan.variable_block_sizes, gate=gate)
        got = cupy.asnumpy(out).astype(np.float64)[:, :, real]
        assert np.linalg.norm(got - want[:, :, real]) / np.linalg.norm(want[:, :, real]) < 1e-2
