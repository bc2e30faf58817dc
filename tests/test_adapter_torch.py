"""The PyTorch adapter against the array-level API and the NumPy reference.

The adapter runs the same backend on zero-copy views, so its results equal the array API's
bit for bit.  Against the float64 reference, relative errors ||x - ref|| / ||ref|| over real
rows within FWD_TOL and BWD_TOL (per dtype).  On CUDA the bounds are test_cuda_attention's and
test_cuda_backward's (CUDA_FWD_TOL, CUDA_BWD_TOL), whole array and worst row, though the
gradients here are compared with the exact reference, not one given the kernels' rounded
output as there: that rounding takes part of the margin (a review replayed it on the CPU:
about 1.5e-3 of fp16's worst-row 1e-2 and 1.7e-2 of bf16's 1e-1).
"""

import contextlib
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import vsa_nd
import vsa_nd.adapters.torch as vt
from vsa_nd import reference as ref

from attention_problems import assert_rows_close, force_ds_hand_over, rounds_on_threads

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# CPU (Numba) results; the audit measured fp16 2e-4 and bf16 1.7e-3 (forward) / 2e-3 (backward).
FWD_TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 1e-2}
BWD_TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 3e-3, torch.bfloat16: 1e-2}
# CUDA results: the bounds of the CUDA backend's own tests (test_cuda_attention, test_cuda_backward),
# each a (whole array, worst row) pair (attention_problems.assert_rows_close: norms floored at 0.01).
CUDA_FWD_TOL = {torch.float16: (3e-3, 5e-3), torch.bfloat16: (1e-2, 3e-2)}
CUDA_BWD_TOL = {torch.float16: (5e-3, 1e-2), torch.bfloat16: (3e-2, 1e-1)}

# A 3-D plan with partial edge tiles on every axis (8 tiles, 6 of them padded).
SEQ, TILE = (3, 5, 6), (2, 4, 4)


def rel_err(x, expected, floor=0.0):
    """||x - expected|| / ||expected||, the norm floored at an RMS of ``floor``."""
    x, expected = np.asarray(x, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(x - expected) / max(np.linalg.norm(expected), floor * np.sqrt(expected.size), 1e-12)


def numpy_of(t):
    """A float64 NumPy copy of a tensor, whatever its dtype or device."""
    return t.detach().to("cpu", torch.float64).numpy()


def untiled_inputs(plan, dtype, heads=(4, 2, 2, 4), dim=16, seed=0, device="cpu", batch=2):
    """q, k, v, gate [B, S, H, D] (gate in (0, 1), like a sigmoid gate)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, gate = (torch.randn(batch, plan.seq_len, h, dim, generator=g, dtype=torch.float64) for h in heads)
    gate = torch.sigmoid(gate)
    return [x.to(device, dtype) for x in (q, k, v, gate)]


def host_sizes(plan):
    """The plan's block sizes as a NumPy array, whatever its device."""
    return plan.array_plan.to("cpu").variable_block_sizes


def real_rows(plan):
    """[S_pad] bool: the slots holding real tokens."""
    return ref.valid_slots(host_sizes(plan), plan.tile_volume)


# ---------------------------------------------------------------------------------------
# Imports, conversion, plans.


def test_import_brings_neither_jax_nor_cupy():
    code = "import sys, vsa_nd.adapters.torch; print(sorted(m for m in ('jax', 'cupy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("dtype", DTYPES + [torch.int32])
def test_dlpack_conversion_shares_memory(dtype):
    t = torch.arange(24).reshape(2, 3, 4).to(dtype)
    array = vt._as_array(t)
    assert array.ctypes.data == t.data_ptr()
    assert array.shape == tuple(t.shape)
    assert np.array_equal(np.asarray(array, np.float64), t.to(torch.float64).numpy())
    back = vt._as_tensor(array)
    assert back.data_ptr() == t.data_ptr() and back.dtype == dtype


def test_dtype_table_pairs_each_torch_dtype_with_its_numpy_namesake():
    # (on CPU every view goes through DLPack, which would not notice a swapped entry; CUDA views use the table)
    for torch_dtype, numpy_dtype in vt._NUMPY_DTYPE.items():
        assert numpy_dtype.name == str(torch_dtype).removeprefix("torch.") and numpy_dtype.itemsize == torch_dtype.itemsize


def test_bfloat16_crosses_as_int16_because_numpy_refuses_kdlbfloat():
    with pytest.raises((RuntimeError, BufferError, TypeError)):
        np.from_dlpack(torch.zeros(2, dtype=torch.bfloat16))
    assert vt._as_array(torch.zeros(2, dtype=torch.bfloat16)).dtype == vsa_nd._xp.BFLOAT16


def test_plan_tensors_copy_the_cached_plan_on_cpu():
    plan = vt.tile_plan(SEQ, TILE)
    assert plan is vt.tile_plan(list(SEQ), TILE, device=torch.device("cpu"))
    for name in vt.TilePlan.INDEX_FIELDS:  # on CPU, copies: torch cannot keep NumPy's read-only flag
        tensor, array = getattr(plan, name), getattr(plan.array_plan, name)
        assert tensor.dtype == torch.int32 and tensor.data_ptr() != array.ctypes.data
        np.testing.assert_array_equal(tensor.numpy(), array)
    assert (plan.padded_len, plan.num_blocks, plan.seq_len) == (8 * 32, 8, 90)


def test_a_plan_first_asked_for_in_inference_mode_serves_training_too():
    seq, tile = (5, 9), (4, 4)  # a plan of this test's own: the torch plan is cached
    with torch.inference_mode():
        plan = vt.tile_plan(seq, tile)
        q = torch.randn(1, 2, plan.padded_len, 8)
        expected = vt.video_sparse_attn(q, q, q, 2, plan.variable_block_sizes)
    assert not plan.variable_block_sizes.is_inference()
    q = q.clone().requires_grad_()
    out = vt.video_sparse_attn(q, q.detach(), q.detach(), 2, plan.variable_block_sizes)
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)
    out.sum().backward()
    arrays = vt._as_array(q.detach())
    _, context = vsa_nd.video_sparse_attn(arrays, arrays, arrays, 2, plan.array_plan.variable_block_sizes,
                                          return_context=True)
    expected_dq = vsa_nd.video_sparse_attn_backward(np.ones(arrays.shape, arrays.dtype), context).dq
    assert np.array_equal(q.grad.numpy(), expected_dq)  # the array API's gradient, bit for bit


def test_block_size_tensors_of_a_plan_are_trusted():
    plan = vt.tile_plan(SEQ, TILE)
    assert vt._array_of(plan.variable_block_sizes) is plan.array_plan.variable_block_sizes
    view = plan.array_plan.variable_block_sizes.view()  # another array over the plan's memory
    assert vsa_nd.adapters._common.trusted(view) is plan.array_plan.variable_block_sizes
    assert vsa_nd.adapters._common.trusted(view.copy()) is not plan.array_plan.variable_block_sizes


def test_a_plan_tensor_changed_in_place_is_checked_and_leaves_vsa_nds_plan_alone():
    seq, tile = (6, 7), (4, 4)  # a plan of this test's own: the torch plan is cached
    plan = vt.tile_plan(seq, tile)
    sizes, expected = plan.variable_block_sizes, plan.array_plan.variable_block_sizes.copy()
    q = torch.randn(1, 2, plan.padded_len, 8)
    before = vt.video_sparse_attn(q, q, q, 2, sizes)
    sizes.sub_(16)
    try:
        np.testing.assert_array_equal(vsa_nd.tile_plan(seq, tile).variable_block_sizes, expected)
        assert vt._array_of(sizes) is not plan.array_plan.variable_block_sizes
        with pytest.raises(ValueError, match="block_sizes: expected every block size in \\[1, 16\\]"):
            vt.video_sparse_attn(q, q, q, 2, sizes)
    finally:
        sizes.add_(16)
    torch.testing.assert_close(vt.video_sparse_attn(q, q, q, 2, sizes), before, rtol=0, atol=0)


def test_build_metadata_wraps_the_array_level_one():
    meta = vt.build_metadata((6, 10, 12), (2, 2, 2), 0.75, TILE)
    expected = vsa_nd.build_metadata((6, 10, 12), (2, 2, 2), 0.75, TILE)
    assert meta.plan is vt.tile_plan(SEQ, TILE)
    assert (meta.topk, meta.sparsity, meta.reuse_tile_buffer, meta.tile_buffer) == (expected.topk, 0.75, False, None)


# ---------------------------------------------------------------------------------------
# Tiling.


@pytest.mark.parametrize("dtype", DTYPES)
def test_tile_and_untile_match_the_array_api(dtype):
    plan = vt.tile_plan(SEQ, TILE)
    x = untiled_inputs(plan, dtype)[0]
    tiled = vt.tile(x, plan)
    expected = vsa_nd.tile(vt._as_array(x), plan.array_plan)
    assert np.array_equal(vt._as_array(tiled).view(np.uint8), expected.view(np.uint8))
    assert not tiled[:, :, ~torch.from_numpy(real_rows(plan))].any()
    assert torch.equal(vt.untile(tiled, plan), x)


def test_tile_and_untile_are_each_others_gradient():
    plan = vt.tile_plan(SEQ, TILE)
    x = untiled_inputs(plan, torch.float64)[0].requires_grad_()
    weight = torch.randn(x.shape[0], x.shape[2], plan.padded_len, x.shape[3], dtype=torch.float64)
    (vt.tile(x, plan) * weight).sum().backward()
    assert torch.equal(x.grad, vt.untile(weight, plan))
    y = vt.tile(x.detach(), plan).requires_grad_()
    (vt.untile(y, plan) * x).sum().backward()
    assert torch.equal(y.grad, vt.tile(x.detach(), plan))  # pad slots get zero


@pytest.mark.parametrize("path", ["eager", "custom op"])
def test_tile_and_untile_take_broadcast_gradients(path):
    # .sum() hands back an expanded (stride 0) gradient: the reorderings must make it contiguous,
    # on both paths (the custom ops' registered autograd is what torch.compile records).
    plan = vt.tile_plan(SEQ, TILE)
    with contextlib.nullcontext() if path == "eager" else RecordVsaOps():
        x = untiled_inputs(plan, torch.float64)[0].requires_grad_()
        vt.tile(x, plan).sum().backward()
        assert torch.equal(x.grad, torch.ones_like(x))
        y = vt.tile(x.detach(), plan).requires_grad_()
        vt.untile(y, plan).sum().backward()
        assert torch.equal(y.grad, vt.tile(torch.ones_like(x), plan))


def test_tile_into_a_buffer_returns_the_buffer():
    plan = vt.tile_plan(SEQ, TILE)
    x = untiled_inputs(plan, torch.float32)[0]
    buffer = torch.full((x.shape[0], x.shape[2], plan.padded_len, x.shape[3]), float("nan"))
    result = vt.tile(x, plan, out=buffer)
    assert result is buffer and torch.equal(buffer, vt.tile(x, plan))
    with pytest.raises(ValueError, match="not differentiable"):
        vt.tile(x.requires_grad_(), plan, out=buffer)
    with pytest.raises(TypeError, match="out: expected dtype torch.float32"):
        vt.tile(x.detach(), plan, out=buffer.double())
    leaf = torch.zeros_like(buffer, requires_grad=True)  # (torch's own in-place ops refuse such a leaf too)
    with pytest.raises(ValueError, match="out: expected a buffer that does not require grad"):
        vt.tile(x.detach(), plan, out=leaf)
    assert torch.equal(leaf, torch.zeros_like(leaf))
    with torch.no_grad():  # where torch allows the write (initialising a parameter, say), so does tile
        assert vt.tile(x.detach(), plan, out=leaf) is leaf and torch.equal(leaf, buffer)


# ---------------------------------------------------------------------------------------
# Attention forward.


def attention(plan, dtype, gate=True, device="cpu", requires_grad=False):
    """Tiled q, k, v, gate leaf tensors and the untiled float64 inputs they come from."""
    untiled = untiled_inputs(plan, dtype, device=device)
    tiled = [vt.tile(x, plan).requires_grad_(requires_grad) for x in untiled]
    if not gate:
        tiled[3] = None
    return tiled, untiled


def reference_forward(plan, tiled, topk):
    q, k, v, gate = (None if x is None else numpy_of(x) for x in tiled)
    sizes = host_sizes(plan)
    return ref.video_sparse_attn(q, k, v, sizes, sizes, topk, plan.tile_volume, gate=gate)


def reference_gradients(plan, tiled, dout, topk):
    """The float64 reference's (dq, dk, dv, dgate) for tiled (q, k, v, gate or None) and dout,
    with the selection the reference forward makes."""
    forward = reference_forward(plan, tiled, topk)
    q, k, v, gate = (None if x is None else numpy_of(x) for x in tiled)
    sizes = host_sizes(plan)
    return ref.video_sparse_attn_backward(numpy_of(dout), q, k, v, sizes, sizes, forward.q2k_idx, forward.q2k_num,
                                          plan.tile_volume, gate=gate)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate", [True, False])
def test_forward_matches_array_api_and_reference(dtype, gate):
    plan = vt.tile_plan(SEQ, TILE)
    (q, k, v, g), _ = attention(plan, dtype, gate)
    out = vt.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes, gate=g)
    assert out.dtype == dtype and out.shape == q.shape
    arrays = [None if x is None else vt._as_array(x) for x in (q, k, v, g)]
    expected = vsa_nd.video_sparse_attn(*arrays[:3], 3, plan.array_plan.variable_block_sizes, gate=arrays[3])
    assert np.array_equal(vt._as_array(out).view(np.uint8), expected.view(np.uint8))
    real = real_rows(plan)
    assert rel_err(numpy_of(out)[:, :, real], reference_forward(plan, (q, k, v, g), 3).out[:, :, real]) <= FWD_TOL[dtype]


def test_forward_with_and_without_autograd_agree():
    plan = vt.tile_plan(SEQ, TILE)
    (q, k, v, g), _ = attention(plan, torch.float32, requires_grad=True)
    with_graph = vt.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes, gate=g)
    with torch.no_grad():
        without = vt.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes, gate=g)
    assert with_graph.requires_grad and not without.requires_grad
    assert torch.equal(with_graph.detach(), without)


def test_cross_attention_with_block_size_lists_and_custom_scale():
    plan_q, plan_kv = vt.tile_plan(SEQ, TILE), vt.tile_plan((4, 8, 7), TILE)
    q = vt.tile(untiled_inputs(plan_q, torch.float64)[0], plan_q)
    k, v = (vt.tile(x, plan_kv) for x in untiled_inputs(plan_kv, torch.float64, seed=1)[1:3])
    q_sizes = plan_q.array_plan.variable_block_sizes.tolist()
    kv_sizes = plan_kv.array_plan.variable_block_sizes.tolist()
    out = vt.video_sparse_attn(q, k, v, 2, q_sizes, kv_sizes, scale=0.3)
    expected = ref.video_sparse_attn(numpy_of(q), numpy_of(k), numpy_of(v), q_sizes, kv_sizes, 2, plan_q.tile_volume,
                                     scale=0.3)
    real = real_rows(plan_q)
    assert rel_err(numpy_of(out)[:, :, real], expected.out[:, :, real]) <= FWD_TOL[torch.float64]


@pytest.mark.parametrize("path", ["eager", "custom op"])
def test_cross_attention_gradients_with_gqa_gate_and_custom_scale(path):
    """q and kv of different plans, two query heads per kv head, a gate and scale 0.3: the
    output and all four gradients against the reference, by either path (the custom op's when a
    dispatch mode is active)."""
    plan_q, plan_kv = vt.tile_plan(SEQ, TILE), vt.tile_plan((6, 8, 7), TILE)  # 8 and 12 tiles
    untiled_q, untiled_kv = untiled_inputs(plan_q, torch.float64), untiled_inputs(plan_kv, torch.float64, seed=1)
    leaves = [vt.tile(x, plan).requires_grad_() for x, plan in zip((untiled_q[0], *untiled_kv[1:3], untiled_q[3]),
                                                                    (plan_q, plan_kv, plan_kv, plan_q))]
    q_sizes, kv_sizes = (host_sizes(plan).tolist() for plan in (plan_q, plan_kv))
    dout = torch.randn(leaves[0].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with RecordVsaOps() if path == "custom op" else contextlib.nullcontext() as mode:
        out = vt.video_sparse_attn(*leaves[:3], 2, q_sizes, kv_sizes, gate=leaves[3], scale=0.3)
        out.backward(dout)
    if mode is not None:
        assert "video_sparse_attn" in mode.ops and "video_sparse_attn_backward" in mode.ops
    q, k, v, gate = (numpy_of(x) for x in leaves)
    forward = ref.video_sparse_attn(q, k, v, q_sizes, kv_sizes, 2, plan_q.tile_volume, scale=0.3, gate=gate)
    expected = ref.video_sparse_attn_backward(numpy_of(dout), q, k, v, q_sizes, kv_sizes, forward.q2k_idx,
                                              forward.q2k_num, plan_q.tile_volume, scale=0.3, gate=gate)
    real_q, real_kv = real_rows(plan_q), real_rows(plan_kv)
    assert rel_err(numpy_of(out)[:, :, real_q], forward.out[:, :, real_q]) <= FWD_TOL[torch.float64]
    for leaf, want, real in zip(leaves, expected, (real_q, real_kv, real_kv, real_q)):
        assert rel_err(numpy_of(leaf.grad)[:, :, real], want[:, :, real]) <= BWD_TOL[torch.float64]


@pytest.mark.parametrize("path", ["eager", "custom op"])
def test_pad_rows_of_the_output_are_zero_whatever_q_and_gate_hold_there(path):
    """NaN in q's and gate's pad slots: out is 0 in pad rows, its real rows and every gradient
    as with zero pads (bit for bit), by either path."""
    plan = vt.tile_plan(SEQ, TILE)
    (q, k, v, g), _ = attention(plan, torch.float32)
    pads = torch.from_numpy(~real_rows(plan))
    q_nan, g_nan = (x.clone().index_fill_(2, pads.nonzero()[:, 0], float("nan")) for x in (q, g))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    results = []
    for inputs in ((q, k, v, g), (q_nan, k, v, g_nan)):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        with RecordVsaOps() if path == "custom op" else contextlib.nullcontext():
            out = vt.video_sparse_attn(*leaves[:3], 3, plan.variable_block_sizes, gate=leaves[3])
            out.backward(dout)
        results.append((out.detach(), [x.grad for x in leaves]))
    (out_zero, grads_zero), (out_nan, grads_nan) = results
    assert torch.isnan(q_nan).any() and (out_nan[:, :, pads] == 0).all() and torch.equal(out_nan, out_zero)
    for got, want in zip(grads_nan, grads_zero):
        assert torch.equal(got, want)


def test_fake_implementations_give_the_real_shapes_and_dtypes():
    """What torch.compile traces with: the fake forward, backward and block_sparse_attn ops
    against the real ones, on a cross-attention problem with two query heads per kv head and
    more key tiles than query tiles (12 and 8); and tile and untile on a sequence whose tiles
    have pad slots."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    plan_q, plan_kv = vt.tile_plan(SEQ, TILE), vt.tile_plan((6, 8, 7), TILE)
    assert (plan_q.num_blocks, plan_kv.num_blocks) == (8, 12)
    untiled_q, untiled_kv = untiled_inputs(plan_q, torch.float64), untiled_inputs(plan_kv, torch.float64, seed=1)
    q, gate = vt.tile(untiled_q[0], plan_q), vt.tile(untiled_q[3], plan_q)
    k, v = (vt.tile(x, plan_kv) for x in untiled_kv[1:3])
    q_sizes, kv_sizes = plan_q.variable_block_sizes, plan_kv.variable_block_sizes
    idx = torch.tensor([0, 1], dtype=torch.int32).expand(2, 4, plan_q.num_blocks, 2).contiguous()
    inputs = (q, k, v, gate, q_sizes, kv_sizes)
    real = vt._vsa_op(*inputs, 2, 0.3)
    real_calls = [real, vt._vsa_backward_op(real[0], *inputs, 0.3, real[0], list(real[1:])),
                  vt._block_sparse_op(q, k, v, kv_sizes, idx, None, q_sizes, 0.3, True)]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_inputs = [mode.from_tensor(x) for x in inputs]
        fake_out = vt._vsa_op(*fake_inputs, 2, 0.3)
        fake_calls = [fake_out,
                      vt._vsa_backward_op(fake_out[0], *fake_inputs, 0.3, fake_out[0], list(fake_out[1:])),
                      vt._block_sparse_op(*fake_inputs[:3], fake_inputs[5], mode.from_tensor(idx), None,
                                          fake_inputs[4], 0.3, True)]
        fake_tiled = vt.tile(mode.from_tensor(untiled_q[0]), plan_q)
        fake_untiled = vt.untile(mode.from_tensor(q), plan_q)
    real_calls.append((vt.tile(untiled_q[0], plan_q), vt.untile(q, plan_q)))
    fake_calls.append((fake_tiled, fake_untiled))
    assert plan_q.padded_len > plan_q.seq_len
    for real_results, fake_results in zip(real_calls, fake_calls):
        assert len(real_results) == len(fake_results)
        for r, f in zip(real_results, fake_results):
            assert (tuple(r.shape), r.dtype) == (tuple(f.shape), f.dtype)


def test_block_sparse_attn_matches_array_api():
    plan = vt.tile_plan(SEQ, TILE)
    (q, k, v, _), _ = attention(plan, torch.float32)
    idx = torch.tensor([[0, 3], [1, 2], [5, 7], [6, 0], [2, 4], [1, 7], [0, 5], [3, 6]], dtype=torch.int32)
    idx = idx.expand(q.shape[0], q.shape[1], -1, -1).contiguous()
    num = torch.full(idx.shape[:3], 2, dtype=torch.int32)
    num[:, :, 0] = 1
    out, lse = vt.block_sparse_attn(q, k, v, plan.variable_block_sizes, idx, num, return_lse=True)
    expected, expected_lse = vsa_nd.block_sparse_attn(*(vt._as_array(x) for x in (q, k, v)),
                                                      plan.array_plan.variable_block_sizes, idx.numpy(), num.numpy(),
                                                      return_lse=True)
    assert np.array_equal(out.numpy(), expected) and np.array_equal(lse.numpy(), expected_lse)
    # With query block sizes: pad rows 0 (lse -inf) whatever q holds there, by either path.
    pads = torch.from_numpy(~real_rows(plan))
    assert pads.any()
    q_nan = q.clone().index_fill_(2, pads.nonzero()[:, 0], float("nan"))
    for context in (contextlib.nullcontext(), RecordVsaOps()):
        with context:
            padded, padded_lse = vt.block_sparse_attn(q_nan, k, v, plan.variable_block_sizes, idx, num,
                                                      return_lse=True, q_block_sizes=plan.variable_block_sizes)
        assert (padded[:, :, pads] == 0).all() and (padded_lse[:, :, pads] == -np.inf).all()
        assert torch.equal(padded[:, :, ~pads], out[:, :, ~pads]) and torch.equal(padded_lse[:, :, ~pads], lse[:, :, ~pads])
    with pytest.raises(ValueError, match="no backward"):
        vt.block_sparse_attn(q.requires_grad_(), k, v, plan.variable_block_sizes, idx)


# ---------------------------------------------------------------------------------------
# Attention backward.


def test_gradcheck_float64_through_tile_vsa_untile():
    """Finite differences of the untiled layer (pad rows dropped), with a gate, GQA and partial tiles."""
    plan = vt.tile_plan((3, 5), (2, 2))

    def layer(q, k, v, gate=None):
        q, k, v = (vt.tile(x, plan) for x in (q, k, v))
        gate = None if gate is None else vt.tile(gate, plan)
        return vt.untile(vt.video_sparse_attn(q, k, v, 2, plan.variable_block_sizes, gate=gate), plan)

    untiled = untiled_inputs(plan, torch.float64, heads=(2, 1, 1, 2), dim=4, seed=3, batch=1)
    inputs = [x.requires_grad_() for x in untiled]
    assert torch.autograd.gradcheck(layer, inputs)
    assert torch.autograd.gradcheck(layer, inputs[:3], fast_mode=True)  # the ungated path, one random projection


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate", [True, False])
def test_gradients_match_the_reference_backward(dtype, gate):
    plan = vt.tile_plan(SEQ, TILE)
    (q, k, v, g), _ = attention(plan, dtype, gate, requires_grad=True)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    out = vt.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes, gate=g)
    out.backward(dout)

    expected = reference_gradients(plan, (q, k, v, g), dout, 3)
    real = real_rows(plan)
    for tensor, want in zip((q, k, v, g), expected):
        if tensor is None:
            continue
        assert tensor.grad.dtype == dtype
        assert rel_err(numpy_of(tensor.grad)[:, :, real], want[:, :, real]) <= BWD_TOL[dtype]
        assert not tensor.grad[:, :, ~torch.from_numpy(real)].any()  # pad rows get zero
    assert not any(t is not None and t.grad is None for t in (q, k, v, g))


@pytest.mark.parametrize("needing", ["q", "k", "v", "gate", "kv"])
def test_gradients_of_a_subset_of_the_inputs(needing):
    """Only some inputs need a gradient (a frozen gate, or frozen q): the output still has a
    grad_fn, those inputs get the reference's gradients and the others none."""
    plan = vt.tile_plan(SEQ, TILE)
    (q, k, v, g), _ = attention(plan, torch.float32)
    names = ("q", "k", "v", "gate")
    wanted = {"kv": ("k", "v")}.get(needing, (needing,))
    for name, tensor in zip(names, (q, k, v, g)):
        tensor.requires_grad_(name in wanted)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(8))
    vt.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes, gate=g).backward(dout)
    expected = reference_gradients(plan, (q, k, v, g), dout, 3)
    real = real_rows(plan)
    for name, tensor, want in zip(names, (q, k, v, g), expected):
        if name in wanted:
            assert rel_err(numpy_of(tensor.grad)[:, :, real], want[:, :, real]) <= BWD_TOL[torch.float32], name
        else:
            assert tensor.grad is None, name


def test_selection_is_a_constant_of_the_forward():
    """Scaling q changes the coarse scores but not their order here: the gradient along q
    must match the finite difference of the output with the selection frozen."""
    plan = vt.tile_plan(SEQ, TILE)
    (q, k, v, _), _ = attention(plan, torch.float64, gate=False, requires_grad=True)
    out = vt.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes)
    direction = torch.randn_like(q)
    (grad,) = torch.autograd.grad(out, q, out.detach())
    eps = 1e-6
    with torch.no_grad():
        plus = vt.video_sparse_attn(q + eps * direction, k, v, 3, plan.variable_block_sizes)
        minus = vt.video_sparse_attn(q - eps * direction, k, v, 3, plan.variable_block_sizes)
    real = torch.from_numpy(real_rows(plan))
    numeric = ((plus - minus) / (2 * eps) * out.detach())[:, :, real].sum()
    assert torch.allclose((grad * direction).sum(), numeric, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Errors.


class Refusing:
    """An object with ``__dlpack__`` whose export fails."""

    def __dlpack__(self, *args, **kwargs):
        raise BufferError("no")

    def __dlpack_device__(self):
        return (1, 0)


def test_other_frameworks_arrays_are_viewed_through_dlpack():
    """VSA_SPEC section 4: any object with ``__dlpack__`` is taken, viewed without a copy, by every
    function (NumPy here; JAX where installed): the results are those of the same tensors."""
    plan = vt.tile_plan(SEQ, TILE)
    (q, k, v, g), (x, *_) = attention(plan, torch.float32)
    sizes = plan.variable_block_sizes
    expected = vt.video_sparse_attn(q, k, v, 3, sizes, gate=g)
    assert torch.equal(vt.video_sparse_attn(q.numpy(), k.numpy(), v, 3, sizes.numpy(), gate=g.numpy()), expected)
    idx = torch.tensor([[0, 3], [1, 2], [5, 7], [6, 0], [2, 4], [1, 7], [0, 5], [3, 6]], dtype=torch.int32)
    idx = idx.expand(q.shape[0], q.shape[1], -1, -1).contiguous()
    assert torch.equal(vt.block_sparse_attn(q.numpy(), k.numpy(), v.numpy(), sizes.numpy(), idx.numpy()),
                       vt.block_sparse_attn(q, k, v, sizes, idx))
    buffer = torch.zeros_like(q)
    assert vt.tile(x.numpy(), plan, out=buffer) is buffer and torch.equal(buffer, vt.tile(x, plan))
    # out is written, so it must be a tensor: a view would drop a read-only array's flag
    read_only = np.zeros(q.shape, np.float32)
    read_only.flags.writeable = False
    with pytest.raises(TypeError, match="out: expected a torch.Tensor, got ndarray"):
        vt.tile(x, plan, out=read_only)
    assert not read_only.any()
    view = vt._viewed("q", q.numpy())  # a view, not a copy
    assert view.data_ptr() == q.numpy().ctypes.data
    # another framework's block sizes on another device are copied there, as lists are
    jnp = pytest.importorskip("jax.numpy")
    moved = vt._int_tensor("q_block_sizes", jnp.asarray(np.int32([8, 8, 5])), torch.device("meta"))
    assert moved.device.type == "meta" and moved.dtype == torch.int32 and moved.shape == (3,)
    assert torch.equal(vt.untile(q.numpy(), plan), vt.untile(q, plan))
    layer = vt.VideoSparseAttention(4, 16, num_kv_heads=2)
    meta = vt.build_metadata(SEQ, (1, 1, 1), 0.6, TILE)
    untiled = untiled_inputs(meta.plan, torch.float32)
    assert torch.equal(layer(*(t.numpy() for t in untiled), meta), layer(*untiled, meta))
    reuse = vt.build_metadata(SEQ, (1, 1, 1), 0.6, TILE, reuse_tile_buffer=True)
    assert torch.equal(layer.tile(untiled[0].numpy(), reuse), vt.tile(untiled[0], reuse.plan))
    # NumPy's bfloat16 (ml_dtypes), which DLPack cannot name, by its bits
    halves = [t.to(torch.bfloat16) for t in (q, k, v, g)]
    arrays = [t.view(torch.int16).numpy().view(vsa_nd._xp.BFLOAT16) for t in halves]
    assert vt._viewed("q", arrays[0]).data_ptr() == arrays[0].ctypes.data
    assert torch.equal(vt.video_sparse_attn(*arrays[:3], 3, sizes, gate=arrays[3]),
                       vt.video_sparse_attn(*halves[:3], 3, sizes, gate=halves[3]))
    jax = pytest.importorskip("jax")  # (on JAX's CPU: a JAX with CUDA would put it on the GPU by default)
    assert torch.equal(vt.video_sparse_attn(jax.device_put(q.numpy(), jax.devices("cpu")[0]), k, v, 3, sizes, gate=g),
                       expected)


def test_errors_name_the_argument_and_what_was_expected():
    plan = vt.tile_plan(SEQ, TILE)
    (q, k, v, _), _ = attention(plan, torch.float32)
    sizes = plan.variable_block_sizes
    with pytest.raises(TypeError, match=r"q: expected a torch.Tensor, got list"):
        vt.video_sparse_attn(q.tolist(), k, v, 3, sizes)
    with pytest.raises(TypeError, match=r"q: expected a torch.Tensor or an array torch can view through DLPack; "
                                        r"torch.from_dlpack refused this Refusing \(no\)"):
        vt.video_sparse_attn(Refusing(), k, v, 3, sizes)
    with pytest.raises(TypeError, match=r"q: expected dtype in \(torch.float32, .*\) on cpu, got torch.int64"):
        vt.video_sparse_attn(q.long(), k, v, 3, sizes)
    with pytest.raises(TypeError, match=r"q: expected dtype in \(torch.float32, .*\) on cpu, got torch.int64"):
        vt.video_sparse_attn(q.long(), k.long(), v.long(), 3, sizes)  # one dtype, not one q takes
    with pytest.raises(TypeError, match="k: expected dtype float32 to match q, got float64"):
        vt.video_sparse_attn(q, k.double(), v, 3, sizes)
    with pytest.raises(TypeError, match="v: expected a tensor on cpu or cuda, got one on meta"):
        vt.video_sparse_attn(q, k, v.to("meta"), 3, sizes)
    with pytest.raises(ValueError, match=r"k: expected a contiguous tensor.*k.contiguous\(\)"):
        vt.video_sparse_attn(q, k.transpose(2, 3), v, 3, sizes)
    with pytest.raises(ValueError, match=r"gate: expected a contiguous tensor.*gate.contiguous\(\)"):
        vt.video_sparse_attn(q, k, v, 3, sizes, gate=q.transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(ValueError, match=r"v: expected a contiguous tensor.*numpy.ascontiguousarray"):
        vt.video_sparse_attn(q, k, v.numpy().transpose(0, 1, 3, 2).copy().transpose(0, 1, 3, 2), 3, sizes)
    with pytest.raises(TypeError, match="q_block_sizes: expected ints or an integer tensor, got float64 values"):
        vt.video_sparse_attn(q, k, v, 3, [31.9] * plan.num_blocks)
    with pytest.raises(TypeError, match=r"gate: expected a torch.Tensor, got str"):
        vt.video_sparse_attn(q, k, v, 3, sizes, gate="q")
    with pytest.raises(TypeError, match=r"gate: expected a tensor on cpu or cuda, got one on meta"):
        vt.video_sparse_attn(q, k, v, 3, sizes, gate=q.to("meta"))
    with pytest.raises(TypeError, match="q_block_sizes: expected an integer dtype, got torch.float32"):
        vt.video_sparse_attn(q, k, v, 3, sizes.float())
    with pytest.raises(ValueError, match="topk: expected 1 <= topk <= 8, got 9"):
        vt.video_sparse_attn(q, k, v, 9, sizes)
    with pytest.raises(TypeError, match="topk: expected an int"):
        vt.video_sparse_attn(q, k, v, 2.0, sizes)
    assert vt.video_sparse_attn(q[:0], k[:0], v[:0], 3, sizes).shape == (0, *q.shape[1:])  # an empty batch
    with pytest.raises(ValueError, match=r"q: expected every axis after the batch \(axis 0\) of length at least 1, "
                                         r"got shape \[2, 4, 256, 0\]"):
        vt.video_sparse_attn(q[..., :0], k[..., :0], v[..., :0], 3, sizes)
    x = torch.randn(0, 90, 4, 16)  # tile and untile take an empty batch, as vsa_nd's do
    assert vt.untile(vt.tile(x, plan), plan).shape == x.shape
    with pytest.raises(ValueError, match=r"block_sizes: expected every block size in \[1, 32\]"):
        vt.video_sparse_attn(q, k, v, 3, [40] * 8)
    # beyond int32: saturated, so still out of range (not wrapped round to 32)
    with pytest.raises(ValueError, match=r"block_sizes: expected every block size in \[1, 32\] \(the tile volume\), got values "
                                         r"in \[2147483647, 2147483647\] \(values beyond int32 may show as its limits\)"):
        vt.video_sparse_attn(q, k, v, 3, torch.full((8,), 2**32 + 32, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"block_sizes: expected every block size in \[1, 32\]"):
        vt.video_sparse_attn(q, k, v, 3, [2**32 + 32] * 8)
    with pytest.raises(ValueError, match=r"block_sizes: expected every block size in \[1, 32\]"):
        vt.video_sparse_attn(q, k, v, 3, torch.full((8,), 2**32 + 32, dtype=torch.uint64))
    # unsigned tensors within range work (clamp is not implemented for them: they go through int64)
    expected = vt.video_sparse_attn(q, k, v, 3, sizes)
    assert torch.equal(vt.video_sparse_attn(q, k, v, 3, sizes.to(torch.uint32)), expected)
    with pytest.raises(TypeError, match="plan: expected a TilePlan"):
        vt.tile(q, SEQ)
    for given in (plan, plan.array_plan):  # the plan where its block sizes belong
        with pytest.raises(TypeError, match="q_block_sizes: expected block sizes, got a tile plan .*variable_block_sizes"):
            vt.video_sparse_attn(q, k, v, 3, given)
    with pytest.raises(TypeError, match="q_block_sizes: expected block sizes, got VSAMetadata; pass its "
                                        "plan.variable_block_sizes"):
        vt.video_sparse_attn(q, k, v, 3, vt.build_metadata((6, 10, 12), (2, 2, 2), 0.5, TILE))
    with pytest.raises(TypeError, match="q2k_idx: expected ints or an integer tensor"):  # no block-size advice there
        vt.block_sparse_attn(q, k, v, sizes, plan)
    for sparse in (k.to_sparse(), k.to_sparse_csr()):  # (CSR tensors cannot say whether they are contiguous)
        with pytest.raises(TypeError, match=f"k: expected a dense tensor, got layout {sparse.layout}; pass k.to_dense"):
            vt.video_sparse_attn(q, sparse, v, 3, sizes)
    with pytest.raises(ValueError, match=r"block_sizes: expected every block size in \[1, 32\] \(the tile volume\), got values in \[40, 40\]$"):
        vt.video_sparse_attn(q, k, v, 3, [40] * 8)  # (no saturation note within int32)
    with pytest.raises(ValueError, match="x: expected 90 tokens"):
        vt.tile(q, plan)
    # block sizes given as one int, or bad ones given once for both: named as the caller passed them
    with pytest.raises(ValueError, match=r"q_block_sizes: expected 1 dimension, got shape \[\]"):
        vt.video_sparse_attn(q, k, v, 3, 32)
    with pytest.raises(ValueError, match=r"kv_block_sizes: expected 1 dimension, got shape \[\]"):
        vt.video_sparse_attn(q, k, v, 3, sizes, 32)
    with pytest.raises(ValueError, match=r"q_block_sizes: expected 1 dimension, got shape \[1, 8\]"):
        vt.video_sparse_attn(q, k, v, 3, sizes[None])
    bad = sizes.clone()
    bad[2] = 0
    with pytest.raises(ValueError, match=r"q_block_sizes: expected every block size in \[1, 32\]"):
        vt.video_sparse_attn(q, k, v, 3, bad)
    with pytest.raises(ValueError, match=r"kv_block_sizes: expected every block size in \[1, 32\]"):
        vt.video_sparse_attn(q, k, v, 3, sizes, bad)
    idx = torch.zeros(*q.shape[:2], 8, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"q2k_num: expected 3 dimensions, got shape \(\)"):
        vt.block_sparse_attn(q, k, v, sizes, idx, 1)
    # tile_plan's device
    with pytest.raises(TypeError, match="device: expected a cpu or cuda device like 'cpu' or 'cuda:0', got 'gpu'"):
        vt.tile_plan(SEQ, TILE, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: cuda asked for, but torch sees no CUDA device here"):
            vt.tile_plan(SEQ, TILE, device="cuda")


# ---------------------------------------------------------------------------------------
# The drop-in layer.


def test_layer_matches_the_functional_path_and_checks_shapes():
    meta = vt.build_metadata((6, 10, 12), (2, 2, 2), 0.6, TILE)
    layer = vt.VideoSparseAttention(num_heads=4, head_size=16, softmax_scale=0.2, num_kv_heads=2)
    query, key, value, gate = untiled_inputs(meta.plan, torch.float32)
    out = layer(query, key, value, gate, meta)
    plan = meta.plan
    expected = vt.untile(vt.video_sparse_attn(*(vt.tile(x, plan) for x in (query, key, value)), meta.topk,
                                              plan.variable_block_sizes, gate=vt.tile(gate, plan), scale=0.2), plan)
    assert out.shape == query.shape and torch.equal(out, expected)
    with pytest.raises(ValueError, match=r"key: expected shape \[B, 90, 2, 16\] .*, got \[2, 90, 4, 16\]"):
        layer(query, query, value, None, meta)
    with pytest.raises(ValueError, match=r"query: expected shape \[B, 90, 4, 16\] \(seq_len of the plan's \(3, 5, 6\)\)"):
        layer(query[:, :80], key, value, None, meta)
    with pytest.raises(TypeError, match="query: expected a torch.Tensor, got list"):
        layer(query.tolist(), key, value, None, meta)
    with pytest.raises(ValueError, match=r"gate_compress: expected query's shape \[2, 90, 4, 16\], got \[1, 90, 4, 16\]"):
        layer(query, key, value, gate[:1], meta)
    with pytest.raises(TypeError, match="metadata: expected the VSAMetadata of vsa_nd.adapters.torch.build_metadata, "
                                        "got builtins.NoneType"):
        layer(query, key, value, gate, None)
    with pytest.raises(TypeError, match="metadata: .*build_metadata, got vsa_nd.tiling.VSAMetadata"):
        layer(query, key, value, gate, vsa_nd.build_metadata((6, 10, 12), (2, 2, 2), 0.6, TILE))
    # strided views are copied first: a transposed layout, and the q, k, v of a fused projection
    strided = value.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous() and torch.equal(layer(query, key, strided, None, meta),
                                                        layer(query, key, value, None, meta))
    fused = torch.cat([x.reshape(2, 90, -1) for x in (query, key, value, key)], dim=-1)  # [B, S, 4 + 2 + 2 + 2 heads]
    q_view, k_view, v_view = fused[..., :64].view(2, 90, 4, 16), fused[..., 64:96].view(2, 90, 2, 16), \
        fused[..., 96:128].view(2, 90, 2, 16)
    assert not any(x.is_contiguous() for x in (q_view, k_view, v_view))
    assert torch.equal(layer(q_view, k_view, v_view, gate, meta), out)
    projection = fused.clone().requires_grad_()  # gradients through the views reach the fused tensor
    views = (projection[..., :64].view(2, 90, 4, 16), projection[..., 64:96].view(2, 90, 2, 16),
             projection[..., 96:128].view(2, 90, 2, 16))
    dense = [x.detach().contiguous().requires_grad_() for x in views]
    for inputs in (views, dense):
        (layer(*inputs, gate, meta) ** 2).sum().backward()
    want = torch.cat([x.grad.reshape(2, 90, -1) for x in dense] + [torch.zeros(2, 90, 32)], dim=-1)
    assert torch.equal(projection.grad, want)
    with pytest.raises(TypeError, match="value: expected a dense tensor, got layout torch.sparse_coo; pass value.to_dense"):
        layer(query, key, value.to_sparse(), None, meta)
    # the layer's own argument names, not those of the functions it calls
    with pytest.raises(TypeError, match="key: expected dtype torch.float32 to match query, got torch.float64"):
        layer(query, key.double(), value, None, meta)
    with pytest.raises(TypeError, match=r"gate_compress: expected dtype in \(torch.float32, .*\) on cpu, got torch.int64"):
        layer(query, key, value, gate.long(), meta)
    for scale in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="softmax_scale: expected a positive finite float"):
            vt.VideoSparseAttention(4, 16, scale)
    with pytest.raises(ValueError, match="num_kv_heads: expected a divisor of num_heads=4, got 3"):
        vt.VideoSparseAttention(4, 16, None, num_kv_heads=3)
    with pytest.raises(TypeError, match="num_kv_heads: expected a positive int, got float 2.0"):
        vt.VideoSparseAttention(4, 16, None, num_kv_heads=2.0)
    for name, args in (("num_heads", (0, 16)), ("head_size", (4, 0)), ("num_kv_heads", (4, 16, None, -1))):
        with pytest.raises(ValueError, match=f"{name}: expected a positive int, got "):
            vt.VideoSparseAttention(*args)


def test_tile_buffer_aliasing_contract():
    """With reuse_tile_buffer, tile() returns the metadata's buffer; the next tile() with the
    same metadata overwrites it; another metadata has its own; a new shape reallocates."""
    layer = vt.VideoSparseAttention(4, 16)
    meta = vt.build_metadata(SEQ, (1, 1, 1), 0.5, TILE, reuse_tile_buffer=True)
    other = vt.build_metadata(SEQ, (1, 1, 1), 0.5, TILE, reuse_tile_buffer=True)
    a, b, _, _ = untiled_inputs(meta.plan, torch.float32, heads=(4, 4, 4, 4))
    first = layer.preprocess_qkv(a, meta)
    assert first is meta.tile_buffer and torch.equal(first, vt.tile(a, meta.plan))
    kept = first.clone()
    second = layer.tile(b, meta)
    assert second is first
    assert torch.equal(first, vt.tile(b, meta.plan)) and not torch.equal(first, kept)  # overwritten
    assert layer.tile(a, other) is other.tile_buffer is not meta.tile_buffer
    assert torch.equal(meta.tile_buffer, vt.tile(b, meta.plan))  # untouched by the other metadata
    wider = layer.tile(a[..., :8].contiguous(), meta)
    assert wider is meta.tile_buffer and wider.shape[-1] == 8 and wider is not first
    fresh = layer.tile(a, vt.build_metadata(SEQ, (1, 1, 1), 0.5, TILE))
    assert torch.equal(fresh, kept) and fresh is not kept
    single = layer.tile(a, meta)
    double = layer.tile(a.double(), meta)  # the same shape in a new dtype reallocates too
    assert single.dtype == torch.float32 and double is not single
    assert double is meta.tile_buffer and double.dtype == torch.float64 and torch.equal(double, vt.tile(a.double(), meta.plan))
    # The buffer is written in place: an x that needs a gradient is refused, naming the flag, buffer untouched
    kept = meta.tile_buffer.clone()
    with pytest.raises(ValueError, match=r"x: tiling into the metadata's reused buffer \(reuse_tile_buffer=True\) is not"):
        layer.tile(b.double().requires_grad_(), meta)
    assert torch.equal(meta.tile_buffer, kept)
    with torch.no_grad():
        assert layer.tile(b.double().requires_grad_(), meta) is meta.tile_buffer


def test_only_a_whole_plan_array_is_trusted():
    from vsa_nd.adapters import _common

    sizes = vsa_nd.tile_plan(SEQ, TILE).variable_block_sizes
    assert _common.trusted(sizes) is sizes
    assert _common.trusted(sizes.view()) is sizes  # the same memory, shape and dtype: the plan's own
    prefix = sizes[:4]  # same pointer, not the same array: checked as any other
    assert _common.trusted(prefix) is prefix


# ---------------------------------------------------------------------------------------
# torch.compile.


class TinyVideoAttention(torch.nn.Module):
    """Projections around one VSA layer: x [B, S, C] -> [B, S, C]."""

    def __init__(self, channels=16, heads=2):
        super().__init__()
        self.heads, self.dim = heads, channels // heads
        self.qkv = torch.nn.Linear(channels, 3 * channels)
        self.gate = torch.nn.Linear(channels, channels)
        self.proj = torch.nn.Linear(channels, channels)
        self.attn = vt.VideoSparseAttention(heads, self.dim)

    def forward(self, x, meta):
        b, s, c = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, self.dim).unbind(2)
        gate = torch.sigmoid(self.gate(x)).view(b, s, self.heads, self.dim)
        out = self.attn(q.contiguous(), k.contiguous(), v.contiguous(), gate, meta)
        return self.proj(out.reshape(b, s, c))


def test_torch_compile_traces_the_ops_forward_and_backward():
    torch.manual_seed(0)
    meta = vt.build_metadata((3, 8), (1, 2), 0.5, (2, 2))
    model = TinyVideoAttention()
    x = torch.randn(2, meta.plan.seq_len, 16)
    eager = model(x, meta)
    (eager_grad,) = torch.autograd.grad(eager.square().sum(), model.qkv.weight)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: the ops must trace without a break
    out = compiled(x, meta)
    (grad,) = torch.autograd.grad(out.square().sum(), model.qkv.weight)
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad, eager_grad, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# The two paths: a plain eager call runs the implementations directly (autograd.Functions
# when a gradient is needed); under a dispatch mode (and compile, tracing, transforms) the
# custom ops run.  Same bits either way.


class RecordVsaOps(TorchDispatchMode):
    """Records the vsa_nd ops that reach the dispatcher; being active, it also sends every call
    down the custom-op path."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "vsa_nd":
            self.ops.append(func.name().removeprefix("vsa_nd::"))
        return func(*args, **(kwargs or {}))


def bits(t):
    """The bytes of a contiguous tensor: equal bits, not just equal values (-0.0 vs 0.0, NaN payloads)."""
    return t.detach().contiguous().view(torch.uint8)


def graph_nodes(t):
    """Class names of every autograd node behind ``t``."""
    names, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            todo.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("dtype", DTYPES)
def test_eager_and_custom_op_paths_give_the_same_bits_forward_and_backward(dtype):
    """The drop-in layer (tile, VSA with GQA and a gate, untile), forward and all four gradients."""
    plan = vt.tile_plan(SEQ, TILE)
    untiled = untiled_inputs(plan, dtype)
    dout = torch.randn(untiled[0].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)

    def step():
        inputs = [x.clone().requires_grad_() for x in untiled]
        q, k, v, gate = (vt.tile(x, plan) for x in inputs)
        out = vt.untile(vt.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes, gate=gate), plan)
        return out, torch.autograd.grad(out, inputs, dout)

    eager_out, eager_grads = step()
    with RecordVsaOps() as recorded:
        op_out, op_grads = step()
    assert {"_ReorderFunctionBackward", "_VSAFunctionBackward"} <= graph_nodes(eager_out)
    assert not any("vsa_nd" in name for name in graph_nodes(eager_out))
    assert set(recorded.ops) == {"tile", "video_sparse_attn", "untile", "video_sparse_attn_backward"}
    assert any("vsa_nd_video_sparse_attn" in name for name in graph_nodes(op_out))
    assert torch.equal(bits(eager_out), bits(op_out))
    for eager_grad, op_grad in zip(eager_grads, op_grads):
        assert torch.equal(bits(eager_grad), bits(op_grad))


def test_eager_and_custom_op_paths_agree_without_autograd():
    """Inference VSA, the fine stage alone, and tiling into a buffer (its version bumped both ways)."""
    plan = vt.tile_plan(SEQ, TILE)
    (q, k, v, g), (x, *_) = attention(plan, torch.float32)
    idx = torch.tensor([[0, 3], [1, 2], [5, 7], [6, 0], [2, 4], [1, 7], [0, 5], [3, 6]], dtype=torch.int32)
    idx = idx.expand(q.shape[0], q.shape[1], -1, -1).contiguous()

    def step():
        buffer = torch.full_like(q, float("nan"))
        version = buffer._version
        results = (vt.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes, gate=g),
                   *vt.block_sparse_attn(q, k, v, plan.variable_block_sizes, idx, return_lse=True),
                   vt.tile(x, plan, out=buffer))
        assert buffer._version > version
        return results

    eager = step()
    with RecordVsaOps() as recorded:
        dispatched = step()
    assert recorded.ops == ["video_sparse_attn_inference", "block_sparse_attn", "tile_into"]
    for a, b in zip(eager, dispatched):
        assert torch.equal(bits(a), bits(b))


def test_second_order_gradients_match_between_the_paths():
    """tile and untile differentiate to any order on both paths; the VSA backward has no
    derivative on either (its first-order gradients still come back under create_graph)."""
    plan = vt.tile_plan((3, 5), (2, 2))
    x = untiled_inputs(plan, torch.float64, heads=(2, 1, 1, 2), dim=4, seed=3, batch=1)[0].requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: vt.untile(vt.tile(x, plan) * vt.tile(x, plan), plan), (x,))
    with RecordVsaOps():
        assert torch.autograd.gradgradcheck(lambda x: vt.untile(vt.tile(x, plan) * vt.tile(x, plan), plan), (x,))
    for mode in (contextlib.nullcontext, RecordVsaOps):
        with mode():
            q = vt.tile(x, plan)
            (dq,) = torch.autograd.grad(vt.video_sparse_attn(q, q, q, 2, plan.variable_block_sizes).sum(), q,
                                        create_graph=True)
            assert dq.requires_grad
            with pytest.raises(NotImplementedError, match="vsa_nd: video_sparse_attn has first-order gradients only"):
                dq.sum().backward()


def _direct_backward_op_calls(plan, q, k, v, g, check_list_values: bool):
    """``vsa_nd::video_sparse_attn_backward`` is a public operator: called with tensors that no
    forward returned together, it refuses them by name instead of trusting them as autograd's
    saved tensors (on CUDA, a v shorter than k had the kernels read and write past v and dv)."""
    sizes = plan.variable_block_sizes
    scale = 0.25
    out, *context = torch.ops.vsa_nd.video_sparse_attn(q, k, v, g, sizes, sizes, 3, scale)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q)
    grads = torch.ops.vsa_nd.video_sparse_attn_backward(dout, q, k, v, g, sizes, sizes, scale, out, context)
    leaves = [x.detach().requires_grad_() for x in (q, k, v, g)]
    want = torch.autograd.grad(vt.video_sparse_attn(*leaves[:3], 3, sizes, gate=leaves[3], scale=scale), leaves,
                               dout)
    for got, expected in zip(grads, want):
        assert torch.equal(got, expected)

    short_v = v[:, :, : v.shape[2] - plan.tile_volume].contiguous()
    with pytest.raises(ValueError, match="context.v"):
        torch.ops.vsa_nd.video_sparse_attn_backward(dout, q, k, short_v, g, sizes, sizes, scale, out, context)
    fields = dict(zip(vt._common.CONTEXT_FIELDS, context))
    with pytest.raises(ValueError, match="context.lse"):
        torch.ops.vsa_nd.video_sparse_attn_backward(
            dout, q, k, v, g, sizes, sizes, scale, out,
            [x[:, :, :-1].contiguous() if name == "lse" else x for name, x in fields.items()])
    if check_list_values:  # (CUDA cleans the lists instead: checking values there would synchronise)
        bad_lists = fields["q2k_idx"].clone()
        bad_lists[0, 0, 0, 0] = plan.num_blocks  # one past the last key tile
        with pytest.raises(ValueError, match="context.q2k_idx"):
            torch.ops.vsa_nd.video_sparse_attn_backward(
                dout, q, k, v, g, sizes, sizes, scale, out,
                [bad_lists if name == "q2k_idx" else x for name, x in fields.items()])


def test_the_backward_op_called_directly_checks_what_it_is_given():
    plan = vt.tile_plan(SEQ, TILE)
    (q, k, v, g), _ = attention(plan, torch.float32)
    _direct_backward_op_calls(plan, q, k, v, g, check_list_values=True)


def test_layer_refuses_a_head_dim_other_than_its_head_size():
    """A D that is not head_size would run at the wrong default scale (1/sqrt(head_size))."""
    meta = vt.build_metadata(SEQ, (1, 1, 1), 0.5, TILE)
    x = untiled_inputs(meta.plan, torch.float32, heads=(4, 4, 4, 4), dim=8)[0]
    with pytest.raises(ValueError, match=r"query: expected shape \[B, 90, 4, 16\]"):
        vt.VideoSparseAttention(num_heads=4, head_size=16)(x, x, x, None, meta)


@pytest.mark.parametrize("scale", [True, False, "0.1"])
def test_a_scale_of_the_wrong_type_is_refused(scale):
    plan = vt.tile_plan(SEQ, TILE)
    (q, k, v, _), _ = attention(plan, torch.float32)
    with pytest.raises(TypeError, match="scale: expected a positive float, got"):
        vt.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes, scale=scale)
    with pytest.raises(TypeError, match="scale: expected a positive float, got"):
        vt.VideoSparseAttention(4, 16, softmax_scale=scale)


def test_a_scale_past_floats_range_is_refused_by_name():
    plan = vt.tile_plan(SEQ, TILE)
    (q, k, v, _), _ = attention(plan, torch.float32)
    with pytest.raises(ValueError, match="^scale: expected a positive finite float, got 1000"):
        vt.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes, scale=10**400)


def test_wide_integer_tensors_are_left_as_they_were():
    """Block sizes and index lists beyond int32 saturate on a copy, never in the caller's tensor."""
    plan = vt.tile_plan(SEQ, TILE)
    (q, k, v, _), _ = attention(plan, torch.float32)
    sizes = torch.full((plan.num_blocks,), 2**32 + 32, dtype=torch.int64)
    with pytest.raises(ValueError, match="block_sizes"):
        vt.video_sparse_attn(q, k, v, 3, sizes)
    assert (sizes == 2**32 + 32).all()
    idx = torch.tensor([0, 3, 2**40], dtype=torch.int64).expand(*q.shape[:2], plan.num_blocks, 3).contiguous()
    num = torch.full(idx.shape[:3], 2, dtype=torch.int32)  # the third entry is unused: never checked
    before = idx.clone()
    vt.block_sparse_attn(q, k, v, plan.variable_block_sizes, idx, num)
    assert torch.equal(idx, before)


def test_a_torch_function_mode_sees_the_custom_ops():
    """Inside a torch function mode (the module docstring's promise) calls take the custom-op path,
    so the mode sees vsa_nd's ops; the results are the eager path's."""
    class Seen(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    plan = vt.tile_plan(SEQ, TILE)
    (q, k, v, g), (x, *_) = attention(plan, torch.float32)
    expected = vt.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes, gate=g)
    with Seen() as mode:
        out = vt.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes, gate=g)
        vt.tile(x, plan)
    assert any("video_sparse_attn_inference" in name for name in mode.names)
    assert any("vsa_nd.tile" in name for name in mode.names)
    assert torch.equal(out, expected)


def test_vmap_gives_a_loop_of_calls():
    plan = vt.tile_plan(SEQ, TILE)
    (q, k, v, g), _ = attention(plan, torch.float32)
    qs = torch.stack([q, 0.5 * q + 1, -q])
    layer = lambda q: vt.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes, gate=g)  # noqa: E731
    assert torch.equal(torch.vmap(layer)(qs), torch.stack([layer(x) for x in qs]))


def test_vmap_differentiates_with_autograd():
    """Inside vmap a batched tensor says it needs no gradient whatever it wraps: the call must see
    through it, or its output would come from the op without autograd (an error at backward).
    The gradients are those of the loop of calls; block_sparse_attn refuses as outside vmap."""
    plan = vt.tile_plan(SEQ, TILE)
    (q, k, v, g), _ = attention(plan, torch.float32)
    sizes = plan.variable_block_sizes
    qs = torch.stack([q, 0.5 * q + 1, -q])
    weights = torch.randn(qs.shape[0], *q.shape, generator=torch.Generator().manual_seed(5))
    for k_grad in (False, True):  # (k needing one, outside vmap, would hide the batched q's)
        grads = []
        for batched in (True, False):
            a, b = qs.clone().requires_grad_(), k.clone().requires_grad_(k_grad)
            layer = lambda x: vt.video_sparse_attn(x, b, v, 3, sizes, gate=g)  # noqa: E731
            out = torch.vmap(layer)(a) if batched else torch.stack([layer(x) for x in a])
            (out * weights).sum().backward()
            grads.append((a.grad, b.grad))
        for got, want in zip(*grads):
            assert (got is None) == (want is None) and (got is None or torch.allclose(got, want, rtol=1e-5, atol=1e-6))
        assert grads[0][0] is not None and (grads[0][1] is not None) == k_grad
    idx = torch.zeros(*q.shape[:2], plan.num_blocks, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="q, k, v: block_sparse_attn has no backward"):
        torch.vmap(lambda x: vt.block_sparse_attn(x, k, v, sizes, idx))(qs.clone().requires_grad_())


def _transform_calls(plan):
    """name -> (function of one tensor calling that op on it, an input for it)."""
    (q, _, _, _), _ = attention(plan, torch.float64)
    sizes = plan.variable_block_sizes
    x = torch.randn(2, plan.seq_len, 4, 16, dtype=torch.float64)
    idx = torch.zeros(*q.shape[:2], plan.num_blocks, 1, dtype=torch.int32)
    return {"video_sparse_attn": (lambda q: vt.video_sparse_attn(q, q, q, 3, sizes), q),
            "tile": (lambda x: vt.tile(x, plan), x), "untile": (lambda y: vt.untile(y, plan), q),
            "block_sparse_attn": (lambda q: vt.block_sparse_attn(q, q, q, sizes, idx), q)}


@pytest.mark.parametrize("op", ["video_sparse_attn", "tile", "untile", "block_sparse_attn"])
@pytest.mark.parametrize("how", ["torch.func.jvp", "jacfwd", "jvp of vmap", "vmap of jvp", "forward_ad dual",
                                 "vmap over a dual", "torch.compile over a dual"])
def test_forward_mode_autodiff_is_refused_not_given_zero_tangents(op, how):
    """torch gives a custom op without a forward-mode rule a zero tangent (torch.func.jvp, jacfwd)
    or none (a forward_ad dual tensor), silently: every op refuses instead, by name."""
    fn, arg = _transform_calls(vt.tile_plan(SEQ, TILE))[op]
    tangent = torch.randn_like(arg)
    with pytest.raises(NotImplementedError, match=f"vsa_nd: {op} has no forward-mode derivative"):
        if how == "torch.func.jvp":
            torch.func.jvp(fn, (arg,), (tangent,))
        elif how == "jacfwd":  # (of a scalar factor: of the tensor itself it would vmap over its size)
            torch.func.jacfwd(lambda s: fn(arg * s).sum())(torch.tensor(1.0, dtype=arg.dtype))
        elif how == "jvp of vmap":
            torch.func.jvp(torch.func.vmap(fn), (arg[None],), (tangent[None],))
        elif how == "vmap of jvp":
            torch.func.vmap(lambda a, t: torch.func.jvp(fn, (a,), (t,))[1])(arg[None], tangent[None])
        else:
            with torch.autograd.forward_ad.dual_level():
                dual = torch.autograd.forward_ad.make_dual(arg, tangent)
                if how == "forward_ad dual":
                    fn(dual)
                elif how == "vmap over a dual":
                    torch.func.vmap(fn)(dual[None])
                else:  # (not fullgraph: there Dynamo itself refuses the check's eager call)
                    torch._dynamo.reset()
                    torch.compile(fn, backend="eager")(dual)


def test_torch_compile_fullgraph_over_a_dual_tensor_stops_with_vsa_nds_message():
    """Traced with fullgraph, the refusal is Dynamo's error, carrying vsa_nd's words; a call on
    plain tensors inside a dual level, not fullgraph, runs (Dynamo falls back to eager there)."""
    fn, arg = _transform_calls(vt.tile_plan(SEQ, TILE))["tile"]
    torch._dynamo.reset()
    with torch.autograd.forward_ad.dual_level():
        with pytest.raises(Exception, match="vsa_nd: tile has no forward-mode derivative"):
            torch.compile(fn, fullgraph=True, backend="eager")(torch.autograd.forward_ad.make_dual(arg, arg))
        torch._dynamo.reset()
        assert torch.equal(torch.compile(fn, backend="eager")(arg), fn(arg))


@pytest.mark.parametrize("op", ["video_sparse_attn", "tile", "untile"])
@pytest.mark.parametrize("how", ["grad", "vjp", "jacrev"])
def test_torch_func_reverse_transforms_are_refused_in_vsa_nds_words(op, how):
    """torch.func's grad, vjp and jacrev refuse custom ops with registered autograd, in words
    about autograd.Function.setup_context; vsa_nd names the op and the remedy instead."""
    fn, arg = _transform_calls(vt.tile_plan(SEQ, TILE))[op]
    with pytest.raises(NotImplementedError, match=f"vsa_nd: {op} is differentiated by torch.autograd only"):
        if how == "grad":
            torch.func.grad(lambda a: fn(a).sum())(arg)
        elif how == "vjp":
            torch.func.vjp(fn, arg)
        else:
            torch.func.jacrev(lambda a: fn(a).sum())(arg)


def test_transforms_pass_calls_whose_inputs_they_do_not_differentiate():
    """An input the transform does not differentiate has a zero derivative, which torch gets
    right: a constant, one computed from constants inside the transform, one vmapped inside it,
    or one only the outer torch.autograd differentiates (a parameter).  Such calls under jvp,
    grad and a dual level run, and give what they give outside."""
    calls = _transform_calls(vt.tile_plan(SEQ, TILE))
    x = torch.randn(3, dtype=torch.float64)
    for op, (fn, arg) in calls.items():
        want = fn(arg)
        batched = torch.stack([arg, arg])
        for inner in (lambda: fn(arg), lambda: fn(arg * 1.0 + 0.0), lambda: torch.func.vmap(fn)(batched)[0]):
            f = lambda x: x.sum() * 2 + inner().sum()  # noqa: E731
            out, tangent = torch.func.jvp(f, (x,), (torch.ones_like(x),))
            assert tangent.item() == 6.0 and torch.allclose(out, x.sum() * 2 + want.sum()), op
            assert torch.equal(torch.func.grad(f)(x), torch.full_like(x, 2.0)), op
        if op != "block_sparse_attn":  # (it refuses inputs that need a gradient by name)
            parameter = arg.clone().requires_grad_()  # differentiated by the outer autograd only
            t = torch.tensor(1.5, dtype=torch.float64)
            got = torch.func.grad(lambda t: (t * fn(parameter)).sum())(t)
            assert torch.allclose(got, want.sum()), op
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
            assert torch.equal(fn(arg), want), op
            assert torch.equal(torch.autograd.forward_ad.unpack_dual(dual * 2).tangent, torch.full_like(x, 2.0))


def test_topk_may_be_every_key_tile_of_a_kv_side_with_more_tiles():
    plan_q, plan_kv = vt.tile_plan(SEQ, TILE), vt.tile_plan((6, 8, 7), TILE)  # 8 and 12 tiles
    (q, _, _, _), _ = attention(plan_q, torch.float32, gate=False)
    k, v = (vt.tile(torch.randn(2, plan_kv.seq_len, 2, 16), plan_kv) for _ in range(2))
    sizes_q, sizes_kv = plan_q.variable_block_sizes, plan_kv.variable_block_sizes
    out = vt.video_sparse_attn(q, k, v, 12, sizes_q, sizes_kv)
    want = vsa_nd.video_sparse_attn(*(x.numpy() for x in (q, k, v)), 12, host_sizes(plan_q), host_sizes(plan_kv))
    assert torch.equal(out, torch.from_numpy(want))


def test_plan_and_layer_say_what_they_hold():
    """The reprs name what was asked (the plan's device, the layer's kv heads), and the metadata
    keeps the sparsity as a Python float, as vsa_nd.build_metadata does."""
    assert repr(vt.tile_plan(SEQ, TILE)).endswith("padded_len=256, device=cpu)")
    assert "num_heads=4, head_size=16, num_kv_heads=2," in repr(vt.VideoSparseAttention(4, 16, num_kv_heads=2))
    sparsity = vt.build_metadata((6, 10, 12), (2, 2, 2), np.float32(0.5), TILE).sparsity
    assert type(sparsity) is float and sparsity == 0.5
    with pytest.raises(TypeError, match="^device: expected a cpu or cuda device, got meta"):
        vt.tile_plan(SEQ, TILE, device="meta")


def test_block_sizes_on_another_device_are_refused_by_name():
    plan = vt.tile_plan(SEQ, TILE)
    (q, k, v, _), _ = attention(plan, torch.float32)
    with pytest.raises(TypeError, match="^q_block_sizes: expected a tensor on cpu like q, got one on meta"):
        vt.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes.to("meta"))


def test_read_only_numpy_arrays_are_tiled_without_warnings():
    import warnings

    plan = vt.tile_plan(SEQ, TILE)
    x = torch.randn(1, plan.seq_len, 2, 8)
    for dtype, torch_dtype in ((np.float32, torch.float32), (vsa_nd._xp.BFLOAT16, torch.bfloat16)):
        array = x.numpy().astype(dtype)  # rounded as x.to(torch_dtype) rounds
        array.flags.writeable = False
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = vt.tile(array, plan)
        assert torch.equal(got, vt.tile(x.to(torch_dtype), plan))


def test_a_tensor_subclass_goes_through_the_op_and_stays_a_subclass():
    class Tagged(torch.Tensor):
        pass

    plan = vt.tile_plan(SEQ, TILE)
    x = torch.randn(1, plan.seq_len, 2, 8)
    tiled = vt.tile(x.as_subclass(Tagged), plan)
    assert type(tiled) is Tagged and torch.equal(tiled.as_subclass(torch.Tensor), vt.tile(x, plan))


def test_torch_func_grad_meets_block_sparse_attn_s_own_refusal_and_passes_no_grad_calls():
    """Under torch.func.grad, block_sparse_attn on a differentiated input says it has no
    backward (as under autograd), and a tile under no_grad inside the transform runs."""
    plan = vt.tile_plan(SEQ, TILE)
    (q, k, v, _), _ = attention(plan, torch.float32)
    idx = torch.zeros(*q.shape[:2], plan.num_blocks, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="block_sparse_attn has no backward; call it under torch.no_grad"):
        torch.func.grad(lambda a: vt.block_sparse_attn(a, k, v, plan.variable_block_sizes, idx).sum())(q)
    x = torch.randn(1, plan.seq_len, 2, 8)

    def f(a):
        with torch.no_grad():
            vt.tile(a, plan)
        return (a * 2).sum()

    assert torch.equal(torch.func.grad(f)(x), torch.full_like(x, 2.0))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_a_traced_function_tiles_new_inputs():
    """torch.jit.trace records the op, not its result: new inputs give their own tiles."""
    plan = vt.tile_plan(SEQ, TILE)
    x, y = (torch.randn(1, plan.seq_len, 2, 8) for _ in range(2))
    traced = torch.jit.trace(lambda t: vt.tile(t, plan), x)
    assert torch.equal(traced(y), vt.tile(y, plan))


def test_the_forward_op_s_context_outputs_need_no_gradient():
    plan = vt.tile_plan(SEQ, TILE)
    (q, k, v, _), _ = attention(plan, torch.float32)
    sizes = plan.variable_block_sizes
    results = torch.ops.vsa_nd.video_sparse_attn(q.clone().requires_grad_(), k, v, None, sizes, sizes, 3, 0.25)
    assert results[0].requires_grad and not any(t.requires_grad for t in results[1:])


def test_topk_may_be_every_key_tile():
    plan = vt.tile_plan(SEQ, TILE)
    (q, k, v, g), _ = attention(plan, torch.float32)
    out = vt.video_sparse_attn(q, k, v, plan.num_blocks, plan.variable_block_sizes, gate=g)
    expected = reference_forward(plan, (q, k, v, g), plan.num_blocks).out
    real = real_rows(plan)
    assert rel_err(numpy_of(out)[:, :, real], expected[:, :, real]) <= 1e-5


def _empty_batch_step(plan, dtype, device, dim, mode=None):
    """tile -> VSA -> untile, forward and backward, on an empty batch (as torch SDPA takes one):
    an empty output with a gradient function and empty gradients of every input; the fine stage
    alone too.  ``mode``: a dispatch mode to run them under (the custom-op path), or None."""
    leaves = [x.requires_grad_() for x in untiled_inputs(plan, dtype, dim=dim, device=device, batch=0)]
    q, k, v, gate = leaves
    with mode or contextlib.nullcontext():
        out = vt.untile(vt.video_sparse_attn(*(vt.tile(x, plan) for x in (q, k, v)), 2, plan.variable_block_sizes,
                                             gate=vt.tile(gate, plan)), plan)
        assert out.shape == q.shape and out.dtype == dtype and out.grad_fn is not None
        out.sum().backward()
        with torch.no_grad():
            fine, lse = vt.block_sparse_attn(*(vt.tile(x, plan) for x in (q, k, v)), plan.variable_block_sizes,
                                             torch.zeros(0, 4, plan.num_blocks, 2, dtype=torch.int32, device=device),
                                             return_lse=True)
    assert fine.shape == (0, 4, plan.padded_len, dim) and lse.shape == (0, 4, plan.padded_len)
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape and leaf.grad.dtype == dtype


@pytest.mark.parametrize("path", ["eager", "custom op"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_empty_batch_gives_an_empty_output_and_empty_gradients(path, dtype):
    mode = RecordVsaOps() if path == "custom op" else None
    _empty_batch_step(vt.tile_plan(SEQ, TILE), dtype, "cpu", 16, mode)
    if mode is not None:
        assert "video_sparse_attn" in mode.ops and "video_sparse_attn_backward" in mode.ops
# ---------------------------------------------------------------------------------------
# CUDA.


def cuda_attention_inputs(dtype, seq=(5, 7, 6), dim=64, heads=(2, 1, 1, 2), seed=0):
    """A plan of (4, 4, 4) tiles on the GPU (8 tiles, 7 of them partial) and tiled q, k, v, gate."""
    plan = vt.tile_plan(seq, (4, 4, 4), device="cuda")
    tiled = [vt.tile(x, plan) for x in untiled_inputs(plan, dtype, heads=heads, dim=dim, seed=seed, device="cuda")]
    return plan, tiled


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["eager", "custom op"])
def test_cuda_empty_batch_then_a_batch_of_one(path):
    """An empty batch on CUDA launches nothing and is not remembered for the prepared path: the
    calls after it (the checked path, then the prepared one) still match the reference."""
    plan = vt.tile_plan((5, 7, 6), (4, 4, 4), device="cuda")
    for _ in range(2):
        _empty_batch_step(plan, torch.bfloat16, "cuda", 64, RecordVsaOps() if path == "custom op" else None)
    torch.cuda.synchronize()
    tiled = [vt.tile(x, plan) for x in untiled_inputs(plan, torch.bfloat16, heads=(4, 2, 2, 4), dim=64,
                                                      device="cuda", batch=1)]
    expected = reference_forward(plan, tiled, 2).out
    for _ in range(2):
        out = vt.video_sparse_attn(*tiled[:3], 2, plan.variable_block_sizes, gate=tiled[3])
        assert_rows_close(numpy_of(out), expected, real_rows(plan), CUDA_FWD_TOL[torch.bfloat16], "out")


@pytest.mark.gpu
def test_cuda_backward_op_called_directly_checks_what_it_is_given():
    plan, (q, k, v, g) = cuda_attention_inputs(torch.bfloat16)
    _direct_backward_op_calls(plan, q, k, v, g, check_list_values=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_forward_matches_array_api_and_reference(dtype):
    import cupy

    plan, (q, k, v, g) = cuda_attention_inputs(dtype)
    view = vt._as_array(q)
    assert isinstance(view, cupy.ndarray) and view.data.ptr == q.data_ptr()  # no copy, bfloat16 included
    out = vt.video_sparse_attn(q, k, v, 2, plan.variable_block_sizes, gate=g)
    assert out.device == q.device and out.dtype == dtype
    arrays = [vt._as_array(x) for x in (q, k, v, g)]
    expected = vsa_nd.video_sparse_attn(*arrays[:3], 2, plan.array_plan.variable_block_sizes, gate=arrays[3])
    assert cupy.array_equal(vt._as_array(out).view(np.uint16), expected.view(np.uint16))
    real = real_rows(plan)
    forward = reference_forward(plan, (q, k, v, g), 2)
    assert_rows_close(numpy_of(out), forward.out, real, CUDA_FWD_TOL[dtype], "out")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_backward_matches_reference(dtype):
    plan, tiled = cuda_attention_inputs(dtype)
    q, k, v, g = (x.requires_grad_() for x in tiled)
    dout = torch.randn(q.shape, device=q.device, dtype=dtype)
    vt.video_sparse_attn(q, k, v, 2, plan.variable_block_sizes, gate=g).backward(dout)
    expected = reference_gradients(plan, (q, k, v, g), dout, 2)
    real = real_rows(plan)
    for name, tensor, want in zip(("dq", "dk", "dv", "dgate"), (q, k, v, g), expected):
        assert_rows_close(numpy_of(tensor.grad), want, real, CUDA_BWD_TOL[dtype], name)



@pytest.mark.gpu
def test_cuda_views_cached_by_pointer_follow_new_tensors_at_that_pointer():
    # _as_array caches its CuPy views by (pointer, shape, dtype, device) without keeping the tensors
    # alive: a new tensor that torch's allocator places at a freed tensor's address must be seen with
    # its own values (and dtype), and the cache must stay bounded.
    import cupy

    plan, (q, k, v, _) = cuda_attention_inputs(torch.bfloat16)
    storage = torch.empty(q.numel(), device=q.device, dtype=q.dtype)
    shape = q.shape
    first_q = storage.view(shape).copy_(q)
    first = vt.video_sparse_attn(first_q, k, v, 2, plan.variable_block_sizes)
    del first_q, q
    storage.normal_()
    q = storage.view(shape)  # a new tensor at the first one's address, other values
    second = vt.video_sparse_attn(q, k, v, 2, plan.variable_block_sizes)
    arrays = [cupy.from_dlpack(x.view(torch.int16)).view(vsa_nd._xp.BFLOAT16) for x in (q, k, v)]
    expected = vsa_nd.video_sparse_attn(*arrays, 2, plan.array_plan.variable_block_sizes)
    assert cupy.array_equal(vt._as_array(second).view(np.uint16), expected.view(np.uint16))
    assert not torch.equal(first, second)
    same_place = q.view(torch.float16)  # same pointer and shape, another dtype
    assert vt._as_array(same_place).dtype == np.float16 and vt._as_array(q).dtype == vsa_nd._xp.BFLOAT16
    flat = q.view(-1)  # same pointer and dtype, another shape
    assert vt._as_array(flat).shape == (q.numel(),) and vt._as_array(q).shape == tuple(shape)
    for n in range(vt._CUDA_VIEWS_MAX + 10):
        vt._as_array(torch.empty(n + 1, device="cuda"))
    assert len(vt._CUDA_VIEWS) <= vt._CUDA_VIEWS_MAX


@pytest.mark.gpu
def test_cuda_results_never_alias_the_cached_input_views(monkeypatch):
    # The cached views own nothing, so no result of an adapter call may be one of them (or lie in
    # an input's memory): every array turned into a tensor is checked against the views handed out.
    handed_out = []
    as_array, as_tensor = vt._as_array, vt._as_tensor

    def recording_as_array(t):
        view = as_array(t)
        handed_out.append((view.data.ptr, view.data.ptr + view.nbytes))
        return view

    converted = []

    def checking_as_tensor(a):
        start = a.data.ptr
        assert not any(lo <= start < hi for lo, hi in handed_out if hi > lo), "a result aliases an input"
        converted.append(a)
        return as_tensor(a)

    plan, tiled = cuda_attention_inputs(torch.bfloat16)
    q, k, v, g = (x.detach().requires_grad_() for x in tiled)
    x = torch.randn(1, plan.seq_len, 2, 64, device="cuda", dtype=torch.bfloat16)
    idx = torch.zeros(q.shape[0], q.shape[1], plan.num_blocks, 2, device="cuda", dtype=torch.int32)
    idx[..., 1] = 1
    tiled_x = vt.tile(x, plan)
    sizes = plan.variable_block_sizes
    monkeypatch.setattr(vt, "_as_array", recording_as_array)
    monkeypatch.setattr(vt, "_as_tensor", checking_as_tensor)
    monkeypatch.setattr(vt, "_CHECKED_FORWARDS", {})  # every call converts (none takes the prepared launches)

    def call(fn):  # views handed out by one call, all of whose inputs are alive meanwhile
        handed_out.clear()
        return fn()

    out = call(lambda: vt.video_sparse_attn(q, k, v, 2, sizes, gate=g))
    dout = torch.randn_like(out)
    call(lambda: out.backward(dout))
    with torch.no_grad():
        call(lambda: vt.video_sparse_attn(q, k, v, 2, sizes, gate=g))
        call(lambda: vt.block_sparse_attn(q, k, v, sizes, idx, return_lse=True))
    call(lambda: vt.tile(x, plan))
    call(lambda: vt.untile(tiled_x, plan))
    buffer = torch.empty_like(tiled_x)
    call(lambda: vt.tile(x, plan, out=buffer))
    with torch.device("cuda"):  # a torch function mode: the custom-op path
        out = call(lambda: vt.video_sparse_attn(q, k, v, 2, sizes, gate=g))
        dout = torch.ones_like(out)
        call(lambda: out.backward(dout))
    assert len(converted) >= 18  # (the large results are written into torch's tensors: those are not converted)


_OUT_OF_MEMORY_SCRIPT = """
import torch
import vsa_nd.adapters.torch as vt
from vsa_nd.backends import cuda, cuda_attention

plan = vt.tile_plan((16, 32, 32), (4, 4, 4), device="cuda:0")  # 256 tiles: 128 MB of dS per head at top 64
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v, dout = (torch.randn(1, 4, plan.padded_len, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
                 for _ in range(4))


def grads():
    x = [t.detach().requires_grad_() for t in (q, k, v)]
    vt.video_sparse_attn(*x, 64, plan.variable_block_sizes).backward(dout)
    return [t.grad for t in x]


launched = []
real_call = cuda.Launch.__call__
cuda.Launch.__call__ = lambda launch, pointers, stream=None: launched.append(launch.name) or real_call(launch, pointers, stream)
cuda_attention.DS_WORKSPACE_BYTES, cuda_attention._DS_MIN_BYTES = 0, 0
want = grads()
cuda_attention.DS_WORKSPACE_BYTES = 2 << 30
assert cuda_attention.ds_schedule(4, 128 << 20, 256, 2 << 30) == (2, 2)  # two 256 MB workspaces
handed_over = grads()
assert any(name.startswith("bwd_dq_ds") for name in launched)
torch.cuda.synchronize()
torch.cuda.empty_cache()
total = torch.cuda.get_device_properties(0).total_memory
torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + (150 << 20)) / total)
launched.clear()
got = grads()
torch.cuda.set_per_process_memory_fraction(1.0)
assert not any(name.startswith("bwd_dq_ds") for name in launched), "the workspace was allocated"
assert all(torch.equal(a, b) for a, b in zip(got, want))
# The hand-over computes dS from S^T, the recomputing dQ pass from S: equal up to rounding.
assert all(torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2 * float(b.float().abs().max()))
           for a, b in zip(handed_over, want))
print("ok")
"""


@pytest.mark.gpu
def test_backward_recomputes_when_the_ds_workspace_does_not_fit_in_torch_memory():
    """With torch's allocator capped (``set_per_process_memory_fraction``, in a fresh process) so
    that the dS blocks cannot be allocated, the backward recomputes dS, without an error: bit for
    bit the gradients of the backward without a workspace (and close to those with it)."""
    result = subprocess.run([sys.executable, "-c", _OUT_OF_MEMORY_SCRIPT], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


@pytest.mark.gpu
def test_a_cuda_plan_can_be_the_first_cuda_call_of_a_process():
    # The allocator hook's raw calls skip torch's lazy CUDA initialisation; a fresh process
    # whose first CUDA call builds a plan must still work (a fresh process: this one is initialised).
    # 'cuda:0', not 'cuda': resolving a bare 'cuda' asks torch for the current device, which
    # initialises it and would hide the case.
    code = ("import vsa_nd.adapters.torch as vt; plan = vt.tile_plan((4, 8, 8), (4, 4, 4), device='cuda:0'); "
            "print(int(plan.variable_block_sizes.sum()))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "256"


@pytest.mark.gpu
def test_cuda_side_stream_is_followed_without_host_sync():
    """Inputs written on a side stream behind a long sleep: VSA must queue behind them on that
    stream (reading stale inputs otherwise) and return before the sleep ends (no host sync)."""
    plan, (q, k, v, g) = cuda_attention_inputs(torch.bfloat16)
    expected = vt.video_sparse_attn(q, k, v, 2, plan.variable_block_sizes, gate=g)
    expected_untiled = vt.untile(expected, plan)  # both also compile their kernels before the timed part
    inputs = [torch.zeros_like(x) for x in (q, k, v, g)]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on the side stream
        for dst, src in zip(inputs, (q, k, v, g)):
            dst.copy_(src)
        out = vt.video_sparse_attn(*inputs[:3], 2, plan.variable_block_sizes, gate=inputs[3])
        untiled = vt.untile(out, plan)
    assert not side.query(), "the call waited for the GPU"
    side.synchronize()
    assert torch.equal(out, expected)
    assert torch.equal(untiled, expected_untiled)


def _tile_untile(plan, query, key, value, gate):
    return vt.untile(vt.tile(query, plan), plan)


def _tile_vsa_untile(plan, query, key, value, gate):
    q, k, v, g = (vt.tile(x, plan) for x in (query, key, value, gate))
    return vt.untile(vt.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes, gate=g), plan)


@pytest.mark.gpu
@pytest.mark.parametrize("step", [_tile_untile, _tile_vsa_untile])
def test_cuda_graph_capture_and_replay_with_new_inputs(step):
    plan = vt.tile_plan((5, 7, 6), (4, 4, 4), device="cuda")  # 7 of its 8 tiles partial
    static = untiled_inputs(plan, torch.bfloat16, heads=(2, 2, 2, 2), dim=64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on the capture stream: kernels compile, library handles settle
        for _ in range(2):
            step(plan, *static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        captured = step(plan, *static)
    for seed in (1, 2):
        fresh = untiled_inputs(plan, torch.bfloat16, heads=(2, 2, 2, 2), dim=64, seed=seed, device="cuda")
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        captured.fill_(float("nan"))  # poisoned: the replay must write it whole
        graph.replay()
        assert torch.equal(captured, step(plan, *fresh))


@pytest.mark.gpu
@pytest.mark.parametrize("streams", [False, True])
def test_cuda_graph_capture_of_forward_and_backward(streams, monkeypatch):
    """Forward and backward (through tile, VSA with GQA and a gate, untile) captured in one graph;
    each replay with new inputs and output gradient gives the eager output and gradients bit
    for bit (the backward is deterministic).  ``streams``: the backward hands dS over one kv
    head at a time on streams of its own, forked from torch's capturing stream and joined back."""
    if streams:
        force_ds_hand_over(monkeypatch)
    plan = vt.tile_plan((5, 7, 6), (4, 4, 4), device="cuda")  # 7 of its 8 tiles partial
    heads = (4, 2, 2, 4)

    def inputs(seed):
        tensors = untiled_inputs(plan, torch.bfloat16, heads=heads, dim=64, seed=seed, device="cuda")
        dout = torch.randn(tensors[0].shape, device="cuda", dtype=torch.bfloat16,
                           generator=torch.Generator(device="cuda").manual_seed(100 + seed))
        return [x.requires_grad_() for x in tensors], dout

    def step(tensors, dout):
        out = _tile_vsa_untile(plan, *tensors)
        out.backward(dout)
        return out.detach()

    static, static_dout = inputs(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(static, static_dout)
    torch.cuda.current_stream().wait_stream(side)
    for x in static:
        x.grad = None  # the captured backward allocates the gradients from the graph's pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        captured = step(static, static_dout)
    captured_grads = [x.grad for x in static]
    for seed in (1, 2):
        fresh, fresh_dout = inputs(seed)
        with torch.no_grad():
            for dst, src in zip(static + [static_dout], fresh + [fresh_dout]):
                dst.copy_(src)
            for result in [captured] + captured_grads:
                result.fill_(float("nan"))  # poisoned: the replay must write them whole
        graph.replay()
        expected = step(fresh, fresh_dout)
        assert torch.equal(captured, expected)
        for grad, x in zip(captured_grads, fresh):
            assert torch.equal(grad, x.grad)


@pytest.mark.gpu
def test_cuda_graph_capture_of_block_sparse_attn_with_unchecked_indices():
    """block_sparse_attn checks index values through the host unless check_indices=False: under
    capture it says so (ValueError) without breaking the capture, and with check_indices=False
    it is captured and replays with new inputs as the eager call computes."""
    plan = vt.tile_plan((5, 7, 6), (4, 4, 4), device="cuda")  # 7 of its 8 tiles partial
    q, k, v, _ = (vt.tile(x, plan) for x in
                  untiled_inputs(plan, torch.bfloat16, heads=(2, 2, 2, 2), dim=64, device="cuda"))
    idx = torch.zeros(q.shape[0], q.shape[1], plan.num_blocks, 2, device="cuda", dtype=torch.int32)
    idx[..., 1] = 1
    sizes = plan.variable_block_sizes

    def step():
        return vt.block_sparse_attn(q, k, v, sizes, idx, check_indices=False)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on the capture stream
        step()
        vt.block_sparse_attn(q, k, v, sizes, idx)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        with pytest.raises(ValueError, match="q2k_idx: .*captured.*check_indices=False"):
            vt.block_sparse_attn(q, k, v, sizes, idx)
        captured = step()
    fresh = [vt.tile(x, plan) for x in
             untiled_inputs(plan, torch.bfloat16, heads=(2, 2, 2, 2), dim=64, seed=1, device="cuda")[:3]]
    for dst, src in zip((q, k, v), fresh):
        dst.copy_(src)
    captured.fill_(float("nan"))
    graph.replay()
    assert torch.equal(captured, step())


@pytest.mark.gpu
def test_torch_compile_reduce_overhead_replays_forward_and_backward(monkeypatch):
    """torch.compile(mode="reduce-overhead") records the VSA forward and backward (through tile,
    VSA with GQA and a gate, untile) in CUDA graphs and replays them: after the warm-up and
    recording calls no Python of vsa_nd runs, no graph is skipped, and each call with new inputs
    gives the eager output and gradients bit for bit."""
    from torch._dynamo.utils import counters

    from vsa_nd.adapters import _common

    plan = vt.tile_plan((5, 7, 6), (4, 4, 4), device="cuda")  # 7 of its 8 tiles partial
    heads = (4, 2, 2, 4)
    runs = {"forward": 0, "backward": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            runs[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(_common, "vsa_forward", counted("forward", _common.vsa_forward))
    monkeypatch.setattr(_common, "vsa_backward", counted("backward", _common.vsa_backward))

    def attention(q, k, v, g):
        return _tile_vsa_untile(plan, q, k, v, g)

    compiled = torch.compile(attention, mode="reduce-overhead", fullgraph=True)
    skips = counters["inductor"]["cudagraph_skips"]
    python_runs = []
    for seed in range(5):  # warm-up, recording, then replays
        tensors = [x.requires_grad_() for x in
                   untiled_inputs(plan, torch.bfloat16, heads=heads, dim=64, seed=seed, device="cuda")]
        dout = torch.randn(tensors[0].shape, device="cuda", dtype=torch.bfloat16,
                           generator=torch.Generator(device="cuda").manual_seed(100 + seed))
        before = dict(runs)
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(*tensors)
        grads = torch.autograd.grad(out, tensors, dout)
        out, grads = out.detach().clone(), [g.clone() for g in grads]  # the next replay reuses their memory
        python_runs.append((runs["forward"] - before["forward"], runs["backward"] - before["backward"]))
        expected = attention(*tensors)
        for got, want in zip([out, *grads], [expected, *torch.autograd.grad(expected, tensors, dout)]):
            assert torch.equal(got, want)
    assert python_runs[0] == (1, 1)  # the warm-up runs eagerly
    assert python_runs[-2:] == [(0, 0), (0, 0)]  # replays run no Python of vsa_nd
    assert counters["inductor"]["cudagraph_skips"] == skips


@pytest.mark.gpu
def test_cuda_mixed_torch_and_cupy():
    """CuPy-tiled arrays fed to the torch adapter, torch results read by CuPy, same numbers."""
    import cupy

    plan, (q, k, v, g) = cuda_attention_inputs(torch.float16)
    arrays = [cupy.from_dlpack(x) for x in (q, k, v, g)]
    torch.cuda.synchronize()  # the CuPy stream below is not ordered after torch's
    with cupy.cuda.Stream(non_blocking=True) as stream:
        expected = vsa_nd.video_sparse_attn(*arrays[:3], 2, plan.array_plan.variable_block_sizes, gate=arrays[3])
        stream.synchronize()
    tensors = [torch.from_dlpack(a) for a in arrays]
    out = vt.video_sparse_attn(*tensors[:3], 2, plan.variable_block_sizes, gate=tensors[3])
    torch.cuda.synchronize()
    assert cupy.array_equal(cupy.from_dlpack(out), expected)
    # CuPy arrays passed as they are: viewed through DLPack (VSA_SPEC section 4)
    direct = vt.video_sparse_attn(*arrays[:3], 2, plan.array_plan.variable_block_sizes, gate=arrays[3])
    assert direct.is_cuda and torch.equal(direct, out)
    # block sizes as NumPy values (or a list) are copied to the tensors' device, as before
    host_sizes = cupy.asnumpy(plan.array_plan.variable_block_sizes)
    for sizes in (host_sizes, host_sizes.tolist()):
        assert torch.equal(vt.video_sparse_attn(*tensors[:3], 2, sizes, gate=tensors[3]), out)
    assert cupy.array_equal(vsa_nd.untile(cupy.from_dlpack(out), plan.array_plan),
                            cupy.from_dlpack(vt.untile(out, plan)))


@pytest.mark.gpu
def test_cuda_dtype_and_device_errors():
    plan, (q, k, v, _) = cuda_attention_inputs(torch.float16)
    with pytest.raises(TypeError, match=r"q: expected dtype in \(torch.float16, torch.bfloat16\) on cuda, got torch.float32"):
        vt.video_sparse_attn(q.float(), k.float(), v.float(), 2, plan.variable_block_sizes)
    with pytest.raises(TypeError, match="k: expected a tensor on cuda:0 like q, got one on cpu"):
        vt.video_sparse_attn(q, k.cpu(), v, 2, plan.variable_block_sizes)
    with pytest.raises(TypeError, match="q_block_sizes: expected a tensor on cuda:0 like q, got one on cpu"):
        vt.video_sparse_attn(q, k, v, 2, plan.variable_block_sizes.cpu())


def test_the_training_example_runs_and_its_loss_falls():
    """examples/train_tiny_video_attention.py (README): it exits non-zero unless the mean loss of
    its last steps is below half that of its first."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "train_tiny_video_attention.py"
    result = subprocess.run([sys.executable, str(example), "--steps", "150"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mean loss of the first 20 steps" in result.stdout


def test_forward_results_are_context_fields():
    """The forward's results (``vsa_nd.backends.FORWARD_RESULTS``: what the CUDA backend's
    prepared forward returns, and, after ``out``, what the adapters save as
    ``_common.CONTEXT_FIELDS``) are fields of ``VSAContext``, from which the adapters read them by name."""
    from vsa_nd.backends import FORWARD_RESULTS

    assert set(FORWARD_RESULTS) <= {field.name for field in dataclasses.fields(vsa_nd.VSAContext)}



@pytest.mark.gpu
@pytest.mark.parametrize("streams", [False, True])
def test_threads_on_their_own_torch_streams_get_their_own_gradients(streams, monkeypatch):
    """Four Python threads, each on a torch stream of its own, run tile -> VSA -> untile forward and
    backward of one signature at once (the prepared forward and backward shared; ``streams``: the
    backward's dS hand-over on its side streams), each on inputs of its own, five rounds: output and
    gradients bit-identical to the same step run alone."""
    if streams:
        force_ds_hand_over(monkeypatch)
    plan = vt.tile_plan((5, 7, 6), (4, 4, 4), device="cuda")
    cases = []
    for seed in range(4):
        tensors = untiled_inputs(plan, torch.bfloat16, dim=64, seed=seed, device="cuda")
        dout = torch.randn(tensors[0].shape, device="cuda", dtype=torch.bfloat16,
                           generator=torch.Generator(device="cuda").manual_seed(50 + seed))
        cases.append((tensors, dout))

    def step(tensors, dout):
        graded = [x.detach().clone().requires_grad_() for x in tensors]
        out = _tile_vsa_untile(plan, *graded)
        out.backward(dout)
        return [out.detach(), *(x.grad for x in graded)]

    alone = []
    for case in cases:
        step(*case)  # (the first call of the signature is the checked one)
        alone.append(step(*case))
    torch.cuda.synchronize()

    @contextlib.contextmanager
    def own_stream():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            yield
        stream.synchronize()

    results = rounds_on_threads(len(cases), own_stream, lambda i: step(*cases[i]))
    for i, rounds in enumerate(results):
        for got in rounds:
            for name, a, b in zip(("out", "dq", "dk", "dv", "dgate"), got, alone[i]):
                assert torch.equal(a.view(torch.int16), b.view(torch.int16)), (i, name)


@pytest.mark.gpu
@pytest.mark.parametrize("head_size", [40, 96])
def test_cuda_layer_zero_pads_a_head_dim_the_kernels_lack(head_size):
    """VideoSparseAttention on CUDA with a head dim below 128 other than 64: padded to the next
    kernel head dim and back, so output and gradients (q, k, v, gate) match the layer on the CPU
    (float64 of the same bfloat16 values) within the CUDA bf16 bounds (whole array), and the
    output has the caller's head dim."""
    meta = vt.build_metadata((5, 9, 7), (1, 1, 1), sparsity=0.5, tile_shape=(4, 4, 4), device="cuda")
    layer = vt.VideoSparseAttention(num_heads=4, head_size=head_size, num_kv_heads=2)
    inputs = untiled_inputs(meta.plan, torch.bfloat16, dim=head_size, seed=head_size, device="cuda")
    dout = torch.randn(inputs[0].shape, device="cuda", dtype=torch.bfloat16)
    results = []
    for device, dtype in (("cuda", torch.bfloat16), ("cpu", torch.float64)):
        plan_meta = meta if device == "cuda" else vt.build_metadata((5, 9, 7), (1, 1, 1), sparsity=0.5,
                                                                     tile_shape=(4, 4, 4))
        xs = [x.detach().to(device, dtype).requires_grad_() for x in inputs]
        out = layer(*xs, plan_meta)
        out.backward(dout.to(device, dtype))
        results.append([out, *(x.grad for x in xs)])
    assert results[0][0].shape == inputs[0].shape and results[0][0].is_contiguous()
    for name, got, want, tol in zip(("out", "dq", "dk", "dv", "dgate"), *results,
                                    [CUDA_FWD_TOL[torch.bfloat16][0]] + [CUDA_BWD_TOL[torch.bfloat16][0]] * 4):
        error = rel_err(numpy_of(got), numpy_of(want))
        assert error <= tol, f"{name}: relative error {error:.2e}"


def test_layer_head_dim_padding_is_exact_when_forced_on_the_cpu(monkeypatch):
    """The layer's padding branch (taken on CUDA for head dims the kernels lack), forced on the
    CPU in float64: output and gradients equal the unpadded layer's to 1e-12; the output keeps
    the caller's head dim and is contiguous."""
    meta = vt.build_metadata(SEQ, (1, 1, 1), sparsity=0.5, tile_shape=TILE)
    layer = vt.VideoSparseAttention(num_heads=4, head_size=40, num_kv_heads=2)
    inputs = untiled_inputs(meta.plan, torch.float64, dim=40, seed=5)
    dout = torch.randn(inputs[0].shape, dtype=torch.float64)
    results = []
    for padded in (0, 64):
        monkeypatch.setattr(vt, "_padded_head_dim", lambda query, padded=padded: padded)
        xs = [x.detach().clone().requires_grad_() for x in inputs]
        out = layer(*xs, meta)
        out.backward(dout)
        assert out.shape == inputs[0].shape and out.is_contiguous()
        results.append([out.detach(), *(x.grad for x in xs)])
    for name, got, want in zip(("out", "dq", "dk", "dv", "dgate"), *results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("head_size", [40, 64])
def test_the_layer_compiles_without_a_graph_break_whatever_its_head_dim(head_size, monkeypatch):
    """torch.compile(fullgraph=True) of the layer with its CUDA head-dim logic run on the CPU
    (kernels.padded_head_dim traced: head dim 40 padded to 64, 64 left as it is): no graph break,
    the eager layer's results."""
    from vsa_nd.kernels import padded_head_dim

    def as_on_cuda(query):  # vt._padded_head_dim without its device test
        padded = padded_head_dim(query.shape[-1])
        return 0 if padded is None or padded == query.shape[-1] else padded

    monkeypatch.setattr(vt, "_padded_head_dim", as_on_cuda)
    meta = vt.build_metadata(SEQ, (1, 1, 1), sparsity=0.5, tile_shape=TILE)
    layer = vt.VideoSparseAttention(num_heads=4, head_size=head_size, num_kv_heads=2)
    inputs = untiled_inputs(meta.plan, torch.float32, dim=head_size, seed=6)
    compiled = torch.compile(lambda *a: layer(*a, meta), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*inputs), layer(*inputs, meta), rtol=0, atol=0)
