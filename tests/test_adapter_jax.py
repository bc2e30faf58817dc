"""The JAX adapter against the array-level API and the NumPy reference.

On CPU the adapter runs the Numba backend (eagerly, and under ``jax.jit`` as an XLA foreign
function call), so its results equal the array API's bit for bit both ways.  Against the float64 reference,
relative errors over real rows: forward float32 1e-5, float64 1e-10, float16/bfloat16 2e-2;
backward float32 1e-4, float64 1e-9, float16/bfloat16 3e-2.
"""

import contextlib
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import vsa_nd
import vsa_nd.adapters.jax as vj
from vsa_nd import reference as ref
from vsa_nd._xp import BFLOAT16

from attention_problems import assert_rows_close, force_ds_hand_over

DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), BFLOAT16]
# CPU (Numba) results, which the non-GPU tests here compute (JAX on the CPU in CI).
FWD_TOL = {"float32": 1e-5, "float64": 1e-10, "float16": 2e-3, "bfloat16": 1e-2}
BWD_TOL = {"float32": 1e-4, "float64": 1e-9, "float16": 3e-3, "bfloat16": 1e-2}
# CUDA bfloat16 gradients: test_cuda_backward's bounds (whole array, worst row; attention_problems.assert_rows_close).
CUDA_BWD_TOL = (3e-2, 1e-1)
SEQ, TILE = (3, 5, 6), (2, 4, 4)


@pytest.fixture(autouse=True)
def float64_enabled(request):
    """JAX truncates float64 to float32 unless x64 is on; keep it on for these tests only.  Tests
    not marked gpu run on JAX's CPU, also where a JAX with CUDA would default to the GPU."""
    on_cpu = request.node.get_closest_marker("gpu") is None
    with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]) if on_cpu else contextlib.nullcontext():
        yield


def rel_err(x, expected, floor=0.0):
    """||x - expected|| / ||expected||, the norm floored at an RMS of ``floor``."""
    x, expected = np.asarray(x, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(x - expected) / max(np.linalg.norm(expected), floor * np.sqrt(expected.size), 1e-12)


def host_sizes(plan):
    return plan.array_plan.to("cpu").variable_block_sizes


def real_rows(plan):
    return ref.valid_slots(host_sizes(plan), plan.tile_volume)


def untiled_inputs(plan, dtype, heads=(4, 2, 2, 4), dim=16, seed=0, batch=2, device=None):
    """q, k, v, gate [B, S, H, D] as JAX arrays (gate in (0, 1))."""
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal((batch, plan.seq_len, h, dim)) for h in heads]
    arrays[3] = 1 / (1 + np.exp(-arrays[3]))
    return [jax.device_put(a.astype(dtype), device) for a in arrays]


def tiled_inputs(plan, dtype, gate=True, **kwargs):
    tiled = [vj.tile(x, plan) for x in untiled_inputs(plan, dtype, **kwargs)]
    return tiled if gate else tiled[:3] + [None]


def test_import_brings_neither_torch_nor_cupy():
    code = "import sys, vsa_nd.adapters.jax; print(sorted(m for m in ('torch', 'cupy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_host_views_share_memory_with_jax_arrays():
    for dtype in DTYPES:
        x = jnp.ones((4, 8), dtype)
        view = np.asarray(x)  # what the CPU path hands to vsa_nd
        assert view.dtype == dtype and view.ctypes.data == x.unsafe_buffer_pointer()


def test_plan_and_metadata_helpers():
    plan = vj.tile_plan(SEQ, TILE)
    assert plan is vj.tile_plan(list(SEQ), TILE)
    for name in vj.TilePlan.INDEX_FIELDS:
        tensor = getattr(plan, name)
        assert isinstance(tensor, jax.Array) and tensor.dtype == jnp.int32
        assert np.array_equal(np.asarray(tensor), getattr(plan.array_plan, name))
    meta = vj.build_metadata((6, 10, 12), (2, 2, 2), 0.75, TILE)
    assert meta.plan is plan and meta.topk == vsa_nd.build_metadata((6, 10, 12), (2, 2, 2), 0.75, TILE).topk


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tile_and_untile_match_the_array_api_and_are_each_others_gradient(dtype):
    plan = vj.tile_plan(SEQ, TILE)
    x = untiled_inputs(plan, dtype)[0]
    tiled = vj.tile(x, plan)
    expected = vsa_nd.tile(np.asarray(x), plan.array_plan)
    assert tiled.dtype == dtype and np.array_equal(np.asarray(tiled).view(np.uint8), expected.view(np.uint8))
    assert np.array_equal(np.asarray(vj.untile(tiled, plan)).view(np.uint8), np.asarray(x).view(np.uint8))
    # Gradients: each reordering's is the other one (random cotangents, so a permutation shows).
    rng = np.random.default_rng(3)

    def in_dtype(a):  # a float32 cotangent as the gradient of a `dtype` input comes back
        return a.astype(dtype).astype(np.float32)

    weight = rng.standard_normal(tiled.shape).astype(np.float32)
    grad = jax.grad(lambda a: (vj.tile(a, plan).astype(jnp.float32) * weight).sum())(x)
    assert np.array_equal(np.asarray(grad, np.float32), in_dtype(vsa_nd.untile(weight, plan.array_plan)))
    weight = rng.standard_normal(x.shape).astype(np.float32)
    back = jax.grad(lambda y: (vj.untile(y, plan).astype(jnp.float32) * weight).sum())(tiled)
    assert np.array_equal(np.asarray(back, np.float32), in_dtype(vsa_nd.tile(weight, plan.array_plan)))
    assert not np.asarray(back, np.float32)[:, :, ~real_rows(plan)].any()
    # Under jit, the same arrays.
    assert np.array_equal(np.asarray(jax.jit(lambda a: vj.tile(a, plan))(x)).view(np.uint8), expected.view(np.uint8))
    assert np.array_equal(np.asarray(jax.jit(lambda y: vj.untile(y, plan))(tiled)).view(np.uint8),
                          np.asarray(x).view(np.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gate", [True, False])
def test_forward_matches_array_api_and_reference_eager_and_jitted(dtype, gate):
    plan = vj.tile_plan(SEQ, TILE)
    q, k, v, g = tiled_inputs(plan, dtype, gate)
    attention = lambda q, k, v, g: vj.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes, gate=g)  # noqa: E731
    out = attention(q, k, v, g)
    arrays = [None if x is None else np.asarray(x) for x in (q, k, v, g)]
    expected = vsa_nd.video_sparse_attn(*arrays[:3], 3, plan.array_plan.variable_block_sizes, gate=arrays[3])
    assert out.dtype == dtype and np.array_equal(np.asarray(out).view(np.uint8), expected.view(np.uint8))
    assert np.array_equal(np.asarray(jax.jit(attention)(q, k, v, g)).view(np.uint8), expected.view(np.uint8))
    sizes, real = host_sizes(plan), real_rows(plan)
    reference = ref.video_sparse_attn(*arrays[:3], sizes, sizes, 3, plan.tile_volume, gate=arrays[3])
    assert rel_err(np.asarray(out)[:, :, real], reference.out[:, :, real]) <= FWD_TOL[dtype.name]


def test_pad_rows_of_the_output_are_zero_whatever_q_and_gate_hold_there():
    """NaN in q's and gate's pad slots: out is 0 in pad rows and its real rows are those of zero
    pads, bit for bit, eager and under jit; the gradients of real tokens are unchanged."""
    plan = vj.tile_plan(SEQ, TILE)
    q, k, v, g = tiled_inputs(plan, jnp.float32, True)
    real = jnp.asarray(real_rows(plan))[:, None]
    q_nan, g_nan = (jnp.where(real, x, jnp.nan) for x in (q, g))
    attention = lambda q, k, v, g: vj.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes, gate=g)  # noqa: E731
    expected = np.asarray(attention(q, k, v, g))
    for fn in (attention, jax.jit(attention)):
        out = np.asarray(fn(q_nan, k, v, g_nan))
        assert (out[:, :, ~real_rows(plan)] == 0).all() and np.array_equal(out, expected)
    loss = lambda q, k, v, g: (attention(q, k, v, g) * jnp.where(real, 1.0, 0.0)).sum()  # noqa: E731
    for got, want in zip(jax.grad(loss, argnums=(0, 1, 2, 3))(q_nan, k, v, g_nan), jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, g)):
        assert np.array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_match_the_reference_backward_eager_and_jitted(dtype):
    plan = vj.tile_plan(SEQ, TILE)
    q, k, v, g = tiled_inputs(plan, dtype)
    dout = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape).astype(dtype))
    attention = lambda *a: vj.video_sparse_attn(*a[:3], 3, plan.variable_block_sizes, gate=a[3])  # noqa: E731
    _, vjp = jax.vjp(attention, q, k, v, g)
    grads = vjp(dout)
    jitted = jax.jit(lambda *a: jax.vjp(attention, *a)[1](dout))(q, k, v, g)

    arrays = [np.asarray(x) for x in (q, k, v, g)]
    sizes, real = host_sizes(plan), real_rows(plan)
    forward = ref.video_sparse_attn(*arrays[:3], sizes, sizes, 3, plan.tile_volume, gate=arrays[3])
    expected = ref.video_sparse_attn_backward(np.asarray(dout), *arrays[:3], sizes, sizes, forward.q2k_idx,
                                              forward.q2k_num, plan.tile_volume, gate=arrays[3])
    for grad, again, want in zip(grads, jitted, expected):
        assert grad.dtype == dtype and np.array_equal(np.asarray(grad), np.asarray(again))
        assert rel_err(np.asarray(grad)[:, :, real], want[:, :, real]) <= BWD_TOL[dtype.name]
        assert not np.asarray(grad)[:, :, ~real].any()  # pad rows get zero


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jitted"])
def test_cross_attention_gradients_with_gqa_gate_and_custom_scale(jit):
    """q and kv of different plans, two query heads per kv head, a gate and scale 0.3: the
    output and all four gradients against the reference; more key tiles than query tiles (12 and
    8), up to every key tile under jit, one more refused."""
    plan_q, plan_kv = vj.tile_plan(SEQ, TILE), vj.tile_plan((6, 8, 7), TILE)
    assert (plan_q.num_blocks, plan_kv.num_blocks) == (8, 12)
    untiled_q, untiled_kv = untiled_inputs(plan_q, np.float64), untiled_inputs(plan_kv, np.float64, seed=1)
    q, gate = vj.tile(untiled_q[0], plan_q), vj.tile(untiled_q[3], plan_q)
    k, v = (vj.tile(x, plan_kv) for x in untiled_kv[1:3])
    dout = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape))
    attention = lambda *a: vj.video_sparse_attn(*a[:3], 2, plan_q.variable_block_sizes,  # noqa: E731
                                                plan_kv.variable_block_sizes, gate=a[3], scale=0.3)
    step = lambda *a: (attention(*a), jax.vjp(attention, *a)[1](dout))  # noqa: E731
    out, grads = (jax.jit(step) if jit else step)(q, k, v, gate)

    arrays = [np.asarray(x) for x in (q, k, v, gate)]
    q_sizes, kv_sizes = host_sizes(plan_q), host_sizes(plan_kv)
    forward = ref.video_sparse_attn(*arrays[:3], q_sizes, kv_sizes, 2, plan_q.tile_volume, scale=0.3, gate=arrays[3])
    expected = ref.video_sparse_attn_backward(np.asarray(dout), *arrays[:3], q_sizes, kv_sizes, forward.q2k_idx,
                                              forward.q2k_num, plan_q.tile_volume, scale=0.3, gate=arrays[3])
    real_q, real_kv = real_rows(plan_q), real_rows(plan_kv)
    assert rel_err(np.asarray(out)[:, :, real_q], forward.out[:, :, real_q]) <= FWD_TOL["float64"]
    for grad, want, real in zip(grads, expected, (real_q, real_kv, real_kv, real_q)):
        assert rel_err(np.asarray(grad)[:, :, real], want[:, :, real]) <= BWD_TOL["float64"]
    every = lambda q, k, v, topk: vj.video_sparse_attn(q, k, v, topk, plan_q.variable_block_sizes,  # noqa: E731
                                                       plan_kv.variable_block_sizes)
    call = jax.jit(every, static_argnums=3) if jit else every
    want = vsa_nd.video_sparse_attn(*arrays[:3], 12, q_sizes, kv_sizes)
    np.testing.assert_array_equal(np.asarray(call(q, k, v, 12)), want)
    with pytest.raises(ValueError, match="topk: expected 1 <= topk <= 12, got 13"):
        call(q, k, v, 13)


def test_gradients_without_a_gate():
    plan = vj.tile_plan(SEQ, TILE)
    q, k, v, _ = tiled_inputs(plan, np.float64, gate=False)
    dout = np.random.default_rng(4).standard_normal(q.shape)
    grads = jax.grad(lambda *a: (vj.video_sparse_attn(*a, 3, plan.variable_block_sizes) * dout).sum(),
                     argnums=(0, 1, 2))(q, k, v)
    arrays = [np.asarray(x) for x in (q, k, v)]
    sizes, real = host_sizes(plan), real_rows(plan)
    forward = ref.video_sparse_attn(*arrays, sizes, sizes, 3, plan.tile_volume)
    expected = ref.video_sparse_attn_backward(dout, *arrays, sizes, sizes, forward.q2k_idx, forward.q2k_num,
                                              plan.tile_volume)
    assert expected.dgate is None
    for grad, want in zip(grads, expected[:3]):
        assert rel_err(np.asarray(grad)[:, :, real], want[:, :, real]) <= BWD_TOL["float64"]


def test_finite_differences_float64_through_tile_vsa_untile():
    plan = vj.tile_plan((3, 5), (2, 2))

    def layer(q, k, v, gate):
        q, k, v, gate = (vj.tile(x, plan) for x in (q, k, v, gate))
        return vj.untile(vj.video_sparse_attn(q, k, v, 2, plan.variable_block_sizes, gate=gate), plan)

    inputs = untiled_inputs(plan, np.float64, heads=(2, 1, 1, 2), dim=4, seed=3, batch=1)
    check_grads(layer, inputs, order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-7)


def test_jitted_calls_are_one_xla_call_each_and_report_vsa_nd_errors():
    plan = vj.tile_plan(SEQ, TILE)
    q, k, v, g = tiled_inputs(plan, np.float32)
    layer = lambda q, sizes: vj.video_sparse_attn(q, k, v, 3, sizes, gate=g)  # noqa: E731
    # The plan's own block sizes are named in the call's description, not passed as an operand.
    closed = jax.jit(lambda q: layer(q, plan.variable_block_sizes)).lower(q).as_text()
    assert closed.count("stablehlo.custom_call @vsa_nd(") == 1
    assert "vsa_forward(a, a, a, a, plan(3, 5, 6)(2, 4, 4), plan(3, 5, 6)(2, 4, 4); [('scale', 0.25), ('topk', 3)])" in closed
    other = jnp.asarray(np.asarray(plan.variable_block_sizes))  # equal values, not the plan's array: an operand
    assert "vsa_forward(a, a, a, a, a, a;" in jax.jit(layer).lower(q, other).as_text()
    np.testing.assert_array_equal(jax.jit(layer)(q, other), layer(q, plan.variable_block_sizes))
    bad = jnp.full(plan.num_blocks, plan.tile_volume + 1, jnp.int32)
    # (the layer passes q's block sizes alone: the error names them, not the kv_block_sizes they stand for)
    with pytest.raises(Exception, match=r"INVALID_ARGUMENT: ValueError: q_block_sizes: expected every block size") as info:
        jax.jit(layer)(q, bad).block_until_ready()
    assert "Traceback" not in str(info.value)  # vsa_nd's own errors come as their one line
    with pytest.raises(ValueError, match=r"q_block_sizes: expected every block size"):
        layer(q, bad)
    with pytest.raises(ValueError, match=r"kv_block_sizes: expected every block size"):
        vj.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes, bad)


def test_what_shapes_and_dtypes_decide_fails_at_trace_time():
    """Under jit, disagreeing dtypes, shapes, head groups and tile counts raise vsa_nd's
    TypeError/ValueError while tracing (``lower``), not JAX's runtime error when the program runs."""
    plan = vj.tile_plan(SEQ, TILE)
    q, k, v, g = tiled_inputs(plan, np.float32)
    sizes = plan.variable_block_sizes
    idx = jnp.zeros((*q.shape[:2], plan.num_blocks, 2), jnp.int32)
    fwd = lambda *a, **kw: jax.jit(lambda q, k, v: vj.video_sparse_attn(q, k, v, 3, *a, **kw)).lower  # noqa: E731
    fine = lambda *a: jax.jit(lambda q, k, v, idx: vj.block_sparse_attn(q, k, v, *a, idx)).lower  # noqa: E731
    cases = [
        (fwd(sizes), (q, k.astype(jnp.float16), v), TypeError, "k: expected dtype float32 to match q, got float16"),
        (fwd(sizes), (q, k, v[..., :8]), ValueError, re.escape("v: expected shape [2, 2, 256, 16], got [2, 2, 256, 8]")),
        (fwd(sizes), (q, k[:, :1].repeat(3, 1), v[:, :1].repeat(3, 1)), ValueError,
         "k: expected a head count dividing the 4 query heads, got 3"),
        (fwd(sizes, gate=g[..., :8]), (q, k, v), ValueError, re.escape("gate: expected shape [2, 4, 256, 16]")),
        (fwd(sizes[:3]), (q, k, v), ValueError, "q_block_sizes: expected a tile count that divides the 256 slots"),
        (fwd(sizes, sizes[:4]), (q, k, v), ValueError, "k: expected 4 tiles of 32 slots"),
        (fine(sizes), (q, k, v, idx[:, :1]), ValueError, re.escape("q2k_idx: expected shape [2, 4, *, *]")),
        (fine(sizes), (q, k, v, idx[:, :, :3]), ValueError, re.escape("q2k_idx (axis 2): expected a tile count")),
        (jax.jit(lambda q, k, v, idx: vj.block_sparse_attn(q, k, v, sizes, idx, jnp.ones((2, 4, 5), jnp.int32))).lower,
         (q, k, v, idx), ValueError, re.escape(f"q2k_num: expected shape [2, 4, {plan.num_blocks}], got [2, 4, 5]")),
        (jax.jit(lambda q, k, v, idx: vj.block_sparse_attn(q, k, v, sizes, idx, q_block_sizes=sizes[:5])).lower,
         (q, k, v, idx), ValueError, re.escape(f"q_block_sizes: expected {plan.num_blocks} entries, got shape [5]")),
        (jax.jit(lambda x: vj.tile(x, plan)).lower, (jnp.zeros((1, plan.seq_len - 1, 2, 8)),), ValueError,
         f"x: expected {plan.seq_len} tokens"),
        (jax.jit(lambda y: vj.untile(y, plan)).lower, (q[:, :, 1:],), ValueError,
         f"y: expected {plan.padded_len} slots"),
    ]
    for lower, args, error, message in cases:
        with pytest.raises(error, match=message):
            lower(*args)


def test_failing_calls_from_threads_leave_the_recursion_limit_as_they_found_it():
    """A failing XLA call raises the interpreter's recursion limit while it reports its error
    (room for a RecursionError's report); XLA runs calls from several threads at once, and the
    limit must come back to where it was (an unlocked save-raise-restore left it 200 higher for
    good each time two reports interleaved)."""
    import sys
    import threading

    plan = vj.tile_plan(SEQ, TILE)
    q, k, v, _ = tiled_inputs(plan, np.float32)
    bad = jnp.full(plan.num_blocks, plan.tile_volume + 1, jnp.int32)
    layer = jax.jit(lambda q, sizes: vj.video_sparse_attn(q, k, v, 3, sizes))
    with pytest.raises(Exception, match="q_block_sizes: expected every block size"):
        layer(q, bad).block_until_ready()  # compiled
    limit, interval, missing = sys.getrecursionlimit(), sys.getswitchinterval(), []

    def fail():
        for _ in range(150):
            try:
                layer(q, bad).block_until_ready()
            except Exception:  # noqa: BLE001 - JAX's runtime error, expected
                continue
            missing.append("a call with bad block sizes did not fail")

    sys.setswitchinterval(1e-6)  # threads switch as often as they can
    try:
        threads = [threading.Thread(target=fail) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not missing and sys.getrecursionlimit() == limit


def test_traced_dtype_checks_where_the_platform_is_not_known_yet(monkeypatch):
    """In a process with a GPU, a traced array's platform is known only once XLA places the
    program: a dtype that some platform takes passes the trace (float32 on CPU runs; on a GPU
    it fails at run time with vsa_nd's message, see the GPU test), others fail at once."""
    plan = vj.tile_plan(SEQ, TILE)
    q, k, v, _ = tiled_inputs(plan, np.float32)
    eager = vj.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes)
    layer = jax.jit(lambda q, k, v: vj.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    np.testing.assert_array_equal(layer(q, k, v), eager)
    with pytest.raises(TypeError, match=r"q: expected dtype in \(float32, float64, float16, bfloat16\) on cpu or gpu, "
                                        r"got int32"):
        layer(q.astype(jnp.int32), k, v)


def test_transformation_without_jax_ffi_fails_clearly(monkeypatch):
    plan = vj.tile_plan(SEQ, TILE)
    q, k, v, _ = tiled_inputs(plan, np.float32)
    monkeypatch.delattr(jax, "ffi")
    with pytest.raises(TypeError, match="needs jax.ffi, which JAX .* lacks: upgrade JAX"):
        jax.jit(lambda q: vj.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes))(q)


def test_vmap_matches_a_loop_of_calls():
    """Under vmap (eager, inside jit and around it) XLA loops over the batch: bit-equal to a loop
    of calls, per-example gradients included, with batched and unbatched operands mixed."""
    plan = vj.tile_plan(SEQ, TILE)
    q, k, v, g = tiled_inputs(plan, np.float32)
    qs, ks = jnp.stack([q, 0.5 * q + 1, -q]), jnp.stack([k, 2 * k, k - 1])
    layer = lambda q, k: vj.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes, gate=g)  # noqa: E731
    looped = jnp.stack([layer(a, b) for a, b in zip(qs, ks)])
    for mapped in (jax.vmap(layer), jax.vmap(jax.jit(layer)), jax.jit(jax.vmap(layer))):
        np.testing.assert_array_equal(mapped(qs, ks), looped)
    np.testing.assert_array_equal(jax.vmap(layer, in_axes=(0, None))(qs, k), jnp.stack([layer(a, k) for a in qs]))
    loss = lambda q, k: (layer(q, k) ** 2).sum()  # noqa: E731
    per_example = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(qs, ks)
    looped = [jax.grad(loss, argnums=(0, 1))(a, b) for a, b in zip(qs, ks)]
    for i in range(2):
        np.testing.assert_array_equal(per_example[i], jnp.stack([grads[i] for grads in looped]))
    untiled = jnp.stack([vj.untile(x, plan) for x in qs])
    tiled = jnp.stack([vj.tile(x, plan) for x in untiled])
    np.testing.assert_array_equal(jax.vmap(lambda x: vj.tile(x, plan))(untiled), tiled)


def test_xla_call_without_registered_function_fails_clearly():
    from vsa_nd.adapters import _xla_ffi

    x = jnp.ones((2, 3), jnp.float32)
    call = jax.ffi.ffi_call(_xla_ffi.target(), jax.ShapeDtypeStruct(x.shape, x.dtype))
    with pytest.raises(Exception, match="no vsa_nd function is registered in this process for the XLA call 'nothing'"):
        jax.jit(lambda x: call(x, call="nothing"))(x).block_until_ready()


def test_xla_call_errors_reach_jax_whatever_their_message():
    """An exception in the handler becomes XLA's error, even one whose message is no valid UTF-8
    (a ctypes callback that raised would hand XLA garbage for an error pointer)."""
    from vsa_nd.adapters import _xla_ffi

    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError("no message")

    def fails(exception):
        def run(operands, results=None):
            raise exception
        return run

    x = jnp.ones((2, 3), jnp.float32)
    call = jax.ffi.ffi_call(_xla_ffi.target(), jax.ShapeDtypeStruct(x.shape, x.dtype))
    _xla_ffi.register_call("test: bad text", fails(ValueError("bad \udcff text")))
    _xla_ffi.register_call("test: unprintable", fails(Unprintable()))
    with pytest.raises(Exception, match=r"INVALID_ARGUMENT: ValueError: bad \\udcff text"):
        jax.jit(lambda x: call(x, call="test: bad text"))(x).block_until_ready()
    with pytest.raises(Exception, match=r"Unprintable \(its message could not be formatted\)"):
        jax.jit(lambda x: call(x, call="test: unprintable"))(x).block_until_ready()


def test_a_metadata_query_that_cannot_be_answered_is_refused_not_aborted(capfd):
    """XLA's metadata query has no api to make an error with: the handler answers an API version
    no XLA takes (so XLA refuses it) and says why, rather than abort the process."""
    import ctypes as C

    from vsa_nd.adapters import _xla_ffi as X

    metadata = X._Metadata()
    metadata.struct_size = 8  # an XLA whose metadata is smaller than the handler knows
    extension = X._MetadataExtension()
    extension.extension_base.struct_size, extension.extension_base.type = C.sizeof(extension), X._EXTENSION_METADATA
    extension.metadata = C.pointer(metadata)
    frame = X._CallFrame()
    frame.struct_size = C.sizeof(frame)
    frame.extension_start = C.cast(C.pointer(extension), C.POINTER(X._ExtensionBase))  # api NULL, as XLA passes
    assert X._handle(C.addressof(frame), False) is None
    assert metadata.api_version.major_version == 999
    assert "cannot answer XLA's metadata query" in capfd.readouterr().err


def test_reloading_the_ffi_module_keeps_the_handlers_xla_holds():
    """XLA keeps the handlers' addresses for the process's life: a reload of the module (a
    notebook's autoreload) must neither free them nor register the target again."""
    import importlib

    from vsa_nd.adapters import _xla_ffi

    plan = vj.tile_plan(SEQ, TILE)
    q, k, v, _ = tiled_inputs(plan, np.float32)
    compiled = jax.jit(lambda q: vj.video_sparse_attn(q, k, v, 3, plan.variable_block_sizes))
    expected = compiled(q)
    handlers = dict(_xla_ffi._HANDLERS)
    importlib.reload(_xla_ffi)
    assert _xla_ffi._HANDLERS == handlers
    np.testing.assert_array_equal(compiled(q), expected)
    traced_anew = jax.jit(lambda q: vj.video_sparse_attn(q * 1, k, v, 3, plan.variable_block_sizes))
    np.testing.assert_array_equal(traced_anew(q), expected)


def test_a_process_exits_while_its_last_jitted_forward_is_not_waited_for(tmp_path):
    """JAX's exit hook waits for XLA's threads; a vsa_nd call still running on one of them used
    to keep that wait going for ever.  The adapter waits for live arrays first."""
    script = tmp_path / "exit_early.py"
    script.write_text(
        "import jax, jax.numpy as jnp, numpy as np\n"
        "import vsa_nd.adapters.jax as vj\n"
        "plan = vj.tile_plan((8, 16, 16), (4, 4, 4))\n"
        "q = vj.tile(jnp.asarray(np.random.default_rng(0).standard_normal((1, plan.seq_len, 8, 64)), jnp.float32), plan)\n"
        "f = jax.jit(lambda q: vj.video_sparse_attn(q, q, q, 8, plan.variable_block_sizes))\n"
        "f(q).block_until_ready()\n"
        "y = f(q * 2)  # the last call, never waited for\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # (a test not marked gpu; beside this process a GPU JAX ran out of memory)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]


def test_block_sparse_attn_matches_array_api():
    plan = vj.tile_plan(SEQ, TILE)
    q, k, v, _ = tiled_inputs(plan, np.float32)
    idx = np.broadcast_to(np.array([[0, 3], [1, 2], [5, 7], [6, 0], [2, 4], [1, 7], [0, 5], [3, 6]], np.int32),
                          (2, 4, 8, 2))
    out, lse = vj.block_sparse_attn(q, k, v, plan.variable_block_sizes, idx, return_lse=True)
    expected, expected_lse = vsa_nd.block_sparse_attn(*(np.asarray(x) for x in (q, k, v)),
                                                      plan.array_plan.variable_block_sizes, idx, return_lse=True)
    assert np.array_equal(np.asarray(out), expected) and np.array_equal(np.asarray(lse), expected_lse)
    # With query block sizes: pad rows 0 (lse -inf) whatever q holds there, eager and under jit.
    real = real_rows(plan)
    assert not real.all()
    q_nan = jnp.where(jnp.asarray(real)[:, None], q, jnp.nan)
    attention = lambda q: vj.block_sparse_attn(q, k, v, plan.variable_block_sizes, idx, return_lse=True,  # noqa: E731
                                               q_block_sizes=plan.variable_block_sizes)
    for fn in (attention, jax.jit(attention)):
        padded, padded_lse = (np.asarray(x) for x in fn(q_nan))
        assert (padded[:, :, ~real] == 0).all() and (padded_lse[:, :, ~real] == -np.inf).all()
        assert np.array_equal(padded[:, :, real], expected[:, :, real])
        assert np.array_equal(padded_lse[:, :, real], expected_lse[:, :, real])


def test_errors_name_the_argument_and_what_was_expected():
    plan = vj.tile_plan(SEQ, TILE)
    q, k, v, _ = tiled_inputs(plan, np.float32)
    sizes = plan.variable_block_sizes
    with pytest.raises(TypeError, match="q: expected a jax.Array or NumPy array, got list"):
        vj.video_sparse_attn(np.asarray(q).tolist(), k, v, 3, sizes)
    # any other array with __dlpack__ (VSA_SPEC section 4) is viewed: a torch tensor here
    torch = pytest.importorskip("torch")
    expected = vj.video_sparse_attn(q, k, v, 3, sizes)
    np.testing.assert_array_equal(vj.video_sparse_attn(torch.from_numpy(np.asarray(q).copy()), k, v, 3, sizes), expected)
    with pytest.raises(TypeError, match="q: expected a jax.Array or an array JAX can view through DLPack; "
                                        "jax.dlpack.from_dlpack refused this Tensor"):
        vj.video_sparse_attn(torch.zeros(q.shape, requires_grad=True), k, v, 3, sizes)
    with pytest.raises(TypeError, match=r"q: expected dtype in \(float32, float64, float16, bfloat16\) on cpu, got int32"):
        vj.video_sparse_attn(q.astype(jnp.int32), k, v, 3, sizes)
    with pytest.raises(TypeError, match="k: expected dtype float32 to match q, got float16"):
        vj.video_sparse_attn(q, k.astype(jnp.float16), v, 3, sizes)
    with pytest.raises(TypeError, match=r"^v: expected dtype in \(float32, .*\) on cpu, got int32"):
        vj.video_sparse_attn(q, k, v.astype(jnp.int32), 3, sizes)
    with pytest.raises(TypeError, match=r"^gate: expected dtype in \(float32, .*\) on cpu, got int32"):
        vj.video_sparse_attn(q, k, v, 3, sizes, gate=q.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"^gate: expected 4 dimensions, got shape \(4, 256, 16\)"):
        vj.video_sparse_attn(q, k, v, 3, sizes, gate=q[0])
    with pytest.raises(ValueError, match="^k: expected 8 tiles of 32 slots .* to match q_block_sizes"):
        vj.video_sparse_attn(q, k[:, :, :128], v[:, :, :128], 3, sizes)  # kv_block_sizes left to q's
    with pytest.raises(ValueError, match="topk: expected 1 <= topk <= 8, got 0"):
        vj.video_sparse_attn(q, k, v, 0, sizes)
    with pytest.raises(ValueError, match="topk: expected 1 <= topk <= 8, got -1"):  # a static shape under jit
        jax.jit(lambda q, k, v: vj.video_sparse_attn(q, k, v, -1, sizes))(q, k, v)
    assert vj.video_sparse_attn(q[:0], k[:0], v[:0], 3, sizes).shape == (0, *q.shape[1:])  # an empty batch
    with pytest.raises(ValueError, match=r"q: expected every axis after the batch \(axis 0\) of length at least 1, "
                                         r"got shape \[2, 4, 256, 0\]"):
        vj.video_sparse_attn(q[..., :0], k[..., :0], v[..., :0], 3, sizes)
    x = jnp.zeros((0, plan.seq_len, 4, 16))  # tile and untile take an empty batch, as vsa_nd's do
    assert vj.untile(vj.tile(x, plan), plan).shape == x.shape
    with pytest.raises(TypeError, match="q_block_sizes: expected ints or an integer array, got float64 values"):
        vj.video_sparse_attn(q, k, v, 3, [32.0] * 8)
    with pytest.raises(TypeError, match="plan: expected a TilePlan"):
        vj.untile(q, SEQ)
    with pytest.raises(ValueError, match=r"q: expected 4 dimensions, got shape \(2, 4, 256\)"):
        vj.video_sparse_attn(q[:, :, :, 0], k, v, 3, sizes)
    with pytest.raises(ValueError, match=r"x: expected 4 dimensions"):
        vj.tile(q[0], plan)
    with pytest.raises(ValueError, match=r"^q: expected 4 dimensions, got shape \(1, 2, 4, 256, 16\)"):
        vj.video_sparse_attn(q[None], k, v, 3, sizes)
    with pytest.raises(ValueError, match=r"^x: expected 4 dimensions, got shape \(1, 1, 90, 4, 16\)"):
        vj.tile(jnp.zeros((1, 1, plan.seq_len, 4, 16)), plan)
    with pytest.raises(ValueError, match=r"^y: expected 4 dimensions, got shape \(1, 2, 4, 256, 16\)"):
        vj.untile(q[None], plan)
    with pytest.raises(ValueError, match=r"q_block_sizes: expected 1 dimension, got shape \(\)"):
        vj.video_sparse_attn(q, k, v, 3, 32)
    with pytest.raises(ValueError, match="q_block_sizes: expected values that fit in int32"):
        vj.video_sparse_attn(q, k, v, 3, np.full(8, 2**32 + 32))
    with pytest.raises(ValueError, match=r"q2k_num: expected 3 dimensions"):
        vj.block_sparse_attn(q, k, v, sizes, np.zeros((2, 4, 8, 2), np.int32), np.zeros((2, 4), np.int32))
    with pytest.raises(ValueError, match="device: expected 'cpu', 'gpu' or 'cuda'"):
        vj.tile_plan(SEQ, TILE, device="tpu")
    with pytest.raises(TypeError, match="device: expected None, a str or a jax.Device, got int"):
        vj.tile_plan(SEQ, TILE, device=0)
    if not any(d.platform == "gpu" for d in jax.devices()):  # the GPU names are taken, and refused as absent
        for name in ("gpu", "cuda", "cuda:0"):
            with pytest.raises(ValueError, match=f"^device: expected a device JAX has, got '{name}'"):
                vj.tile_plan(SEQ, TILE, device=name)


def test_wide_integer_arrays_saturate_rather_than_wrap():
    """With x64 on, an int64 JAX array beyond int32 is refused by the value checks (2**32 + 32
    must not pass as 32, 2**32 + 1 not as tile 1), eagerly and under jit."""
    enable_x64 = getattr(jax, "enable_x64", None)
    if enable_x64 is None:
        from jax.experimental import enable_x64
    plan = vj.tile_plan(SEQ, TILE)
    q, k, v, _ = tiled_inputs(plan, np.float32)
    with enable_x64(True):
        sizes = jnp.full((plan.num_blocks,), 2**32 + 32, dtype=jnp.int64)
        assert sizes.dtype == jnp.int64
        with pytest.raises(ValueError, match=r"block_sizes: expected every block size in \[1, 32\]"):
            vj.video_sparse_attn(q, k, v, 3, sizes)
        idx = jnp.tile(jnp.arange(2, dtype=jnp.int64), (*q.shape[:2], plan.num_blocks, 1)) + 2**32
        with pytest.raises(ValueError, match=r"q2k_idx: expected tile indices in \[0, 8\)"):
            vj.block_sparse_attn(q, k, v, plan.variable_block_sizes, idx)


def test_device_names_and_block_sparse_gradient_message():
    """A plan's device may be named by a str; differentiating block_sparse_attn says what to do."""
    plan = vj.tile_plan(SEQ, TILE, device="cpu")
    assert plan is vj.tile_plan(SEQ, TILE, device=jax.devices("cpu")[0])
    assert vj.build_metadata((6, 10, 12), (2, 2, 2), 0.75, TILE, device="cpu:0").plan is plan
    q, k, v, _ = tiled_inputs(plan, np.float32)
    idx = np.tile(np.arange(2, dtype=np.int32), (*q.shape[:2], plan.num_blocks, 1))
    loss = lambda q: vj.block_sparse_attn(q, k, v, plan.variable_block_sizes, idx).sum()  # noqa: E731
    expected = vsa_nd.block_sparse_attn(np.asarray(q), np.asarray(k), np.asarray(v), plan.array_plan.variable_block_sizes,
                                        idx)
    assert float(loss(q)) == float(jnp.asarray(expected).sum())  # the array API's output, summed alike
    for grad in (jax.grad(loss), jax.jit(jax.grad(loss))):
        with pytest.raises(TypeError, match="block_sparse_attn has no backward; differentiate video_sparse_attn"):
            grad(q)


def test_arrays_on_different_devices_are_refused_by_name():
    """Two host devices (XLA_FLAGS in a fresh process): k on the second, q on the first."""
    code = """
import jax, jax.numpy as jnp, numpy as np
import vsa_nd.adapters.jax as vj
cpu0, cpu1 = jax.devices("cpu")[:2]
plan = vj.tile_plan((3, 5, 6), (2, 4, 4))
q = jax.device_put(jnp.ones((1, 2, plan.padded_len, 8), jnp.float32), cpu0)
for name, args, gate in (("k", (q, jax.device_put(q, cpu1), q), None), ("v", (q, q, jax.device_put(q, cpu1)), None),
                         ("gate", (q, q, q), jax.device_put(q, cpu1))):
    try:
        vj.video_sparse_attn(*args, 2, plan.variable_block_sizes, gate=gate)
        print(name, "accepted")
    except TypeError as e:
        print(e)
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    for name, line in zip(("k", "v", "gate"), lines):
        assert line.startswith(f"{name}: expected an array on") and "like q, got one on" in line, result.stdout


SHARDING_SCRIPT = os.path.join(os.path.dirname(__file__), "jax_sharding.py")


def run_sharding_script(*args, **env):
    """tests/jax_sharding.py with ``args`` in a fresh process (``env`` added to this one's);
    asserts that it passed every check."""
    result = subprocess.run([sys.executable, SHARDING_SCRIPT, *args], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, **env))
    assert result.returncode == 0 and result.stdout.rstrip().endswith("OK"), result.stdout + result.stderr


def test_shard_map_over_two_devices_matches_one_device():
    """Two host devices (a fresh process, tests/jax_sharding.py): the adapter inside shard_map over
    the batch or the heads gives the unsharded results and gradients bit for bit, sums the
    gradients of k, v and gate shared by both devices, and types its results as varying, so that
    shard_map refuses one claimed replicated (before, shard_map took device 0's as the whole
    result, and gradients through shard_map raised JAX's error about manual axis types)."""
    run_sharding_script("cpu")


def test_shard_map_over_two_devices_under_numbas_workqueue_layer():
    """The same with Numba's workqueue layer, which ends the process when two threads (here the two
    XLA CPU devices') run parallel kernels at once: vsa_nd serialises its host calls there."""
    run_sharding_script("cpu", NUMBA_THREADING_LAYER="workqueue")


def test_the_training_example_runs_data_parallel_and_its_loss_falls():
    """examples/train_tiny_video_attention_jax.py (README), shard_map over two CPU devices: it
    exits non-zero unless the mean loss of its last steps is below half that of its first."""
    example = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "train_tiny_video_attention_jax.py")
    result = subprocess.run([sys.executable, example, "--steps", "150", "--devices", "2"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "over 2 cpu devices" in result.stdout and "mean loss of the first 20 steps" in result.stdout


@pytest.mark.gpu
def test_shard_map_over_one_gpu_matches_the_plain_call():
    """tests/jax_sharding.py on a mesh of one GPU (a fresh process): the foreign calls inside
    shard_map on the GPU, typed as there, give the unsharded results and gradients bit for bit
    (two GPUs: test_multi_gpu.py)."""
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("JAX sees no GPU")
    run_sharding_script("gpu", "1", XLA_PYTHON_CLIENT_PREALLOCATE="false")  # (beside this process's JAX)


def test_eager_results_lie_on_the_committed_inputs_device():
    """Two host devices (a fresh process): eager results, gradients and tiles on the second device,
    as jit places them, not on the default one; uncommitted inputs, and inputs sharded over both
    devices, give uncommitted results; a plan asked for without a device lies on
    jax.default_device's (a device, or a platform name), and build_metadata's on the one named."""
    code = """
import jax, jax.numpy as jnp, numpy as np
import vsa_nd.adapters.jax as vj
cpu1 = jax.devices("cpu")[1]
plan = vj.tile_plan((3, 5, 6), (2, 4, 4))
sizes = plan.variable_block_sizes
x = np.random.default_rng(0).standard_normal((1, 2, plan.padded_len, 8)).astype(np.float32)
q = jax.device_put(x, cpu1)
f = lambda q: vj.video_sparse_attn(q, q, q, 2, sizes)
print("eager", f(q).devices() == {cpu1}, f(q).committed)
print("jit", jax.jit(f)(q).devices() == {cpu1})
print("grad", jax.grad(lambda q: f(q).sum())(q).devices() == {cpu1})
print("tile", vj.tile(jax.device_put(np.ones((1, plan.seq_len, 2, 8), np.float32), cpu1), plan).devices() == {cpu1})
print("uncommitted", f(jnp.asarray(x)).committed)
with jax.default_device(cpu1):
    print("default", vj.tile_plan((4, 5)).variable_block_sizes.devices() == {cpu1})
with jax.default_device("cpu"):
    print("named", vj.tile_plan((4, 6)).variable_block_sizes.devices() == {jax.devices("cpu")[0]})
meta = vj.build_metadata((6, 10, 12), (2, 2, 2), 0.75, (2, 4, 4), device="cpu:1")
print("metadata", meta.plan.variable_block_sizes.devices() == {cpu1})
from jax.sharding import Mesh, NamedSharding, PartitionSpec
mesh = Mesh(np.array(jax.devices("cpu")[:2]), ("d",))
sharded = jax.device_put(np.ones((2, plan.seq_len, 2, 8), np.float32), NamedSharding(mesh, PartitionSpec("d")))
print("sharded", vj.tile(sharded, plan).committed)
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["eager", "True", "True", "jit", "True", "grad", "True", "tile", "True",
                                     "uncommitted", "False", "default", "True", "named", "True", "metadata", "True",
                                     "sharded", "False"], result.stdout


def test_a_process_exits_while_a_jitted_call_still_runs():
    """A script whose last jitted gradient's result is dropped at once ends with that program
    still queued; its vsa_nd handler must not run into Python's finalization on an XLA thread
    (the process then hung at exit, every time, until _xla_ffi's exit hook waited for it)."""
    code = """
import jax, jax.numpy as jnp, numpy as np
import vsa_nd.adapters.jax as vj
plan = vj.tile_plan((8, 16, 16), (4, 4, 4))
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((1, 4, plan.padded_len, 64)), jnp.float32) for _ in range(3))
loss = lambda q: jnp.sum(vj.video_sparse_attn(q, k, v, 4, plan.variable_block_sizes) ** 2)
print(jax.jit(jax.grad(loss))(q).shape, flush=True)
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(f"the process did not exit within 120 s; its output: {timeout.stdout!r}")
    assert result.returncode == 0 and "(1, 4, 2048, 64)" in result.stdout, result.stderr


def test_topk_and_scale_are_static_and_gradients_first_order():
    """A traced topk or scale is refused with the remedy, a concrete 0-d array is taken as its
    number; gradients of gradients raise vsa_nd's message, eagerly and under jit."""
    plan = vj.tile_plan(SEQ, TILE)
    q, k, v, _ = tiled_inputs(plan, np.float32)
    sizes = plan.variable_block_sizes
    for name, f, value in [("topk", lambda q, t: vj.video_sparse_attn(q, k, v, t, sizes), 3),
                           ("scale", lambda q, s: vj.video_sparse_attn(q, k, v, 3, sizes, scale=s), 0.3)]:
        with pytest.raises(TypeError, match=f"{name}: expected a Python number, got a traced value .*static_argnums"):
            jax.jit(f)(q, value)
    with pytest.raises(TypeError, match="scale: expected a Python number, got a traced value"):
        jax.jit(lambda q, s: vj.block_sparse_attn(q, k, v, sizes, np.zeros((2, 4, 8, 1), np.int32), scale=s))(q, 0.3)
    expected = vj.video_sparse_attn(q, k, v, 3, sizes, scale=float(np.float32(0.3)))
    np.testing.assert_array_equal(vj.video_sparse_attn(q, k, v, jnp.int32(3), sizes, scale=jnp.float32(0.3)), expected)
    with pytest.raises(TypeError, match="topk: expected an int, got float 3.0"):
        vj.video_sparse_attn(q, k, v, jnp.float32(3), sizes)
    loss = lambda q: jnp.sum(vj.video_sparse_attn(q, k, v, 3, sizes) ** 2)  # noqa: E731
    assert jnp.isfinite(jax.grad(loss)(q)).all()
    second = jax.grad(lambda q: jnp.sum(jax.grad(loss)(q)))
    for fn in (second, jax.jit(second)):
        with pytest.raises(NotImplementedError, match="first-order reverse-mode gradients only"):
            fn(q)


def test_a_plan_given_for_block_sizes_is_named():
    plan = vj.tile_plan(SEQ, TILE)
    q, k, v, _ = tiled_inputs(plan, np.float32)
    for given in (plan, plan.array_plan):
        with pytest.raises(TypeError, match="q_block_sizes: expected block sizes, got a tile plan .*variable_block_sizes"):
            vj.video_sparse_attn(q, k, v, 3, given)
    with pytest.raises(TypeError, match="q_block_sizes: expected block sizes, got a tile plan"):
        vsa_nd.video_sparse_attn(*(np.asarray(x) for x in (q, k, v)), 3, plan.array_plan)


@pytest.mark.parametrize("op", ["video_sparse_attn", "tile", "untile", "block_sparse_attn"])
def test_forward_mode_autodiff_is_refused_not_given_zero_tangents(op):
    """Every op is a custom_vjp function (block_sparse_attn when traced), which JAX refuses to
    differentiate in forward mode: jax.jvp and jacfwd raise rather than return zero tangents."""
    plan = vj.tile_plan(SEQ, TILE)
    q, _, _, _ = tiled_inputs(plan, np.float32)
    sizes = plan.variable_block_sizes
    idx = jnp.zeros((*q.shape[:2], plan.num_blocks, 1), jnp.int32)
    fn, arg = {"video_sparse_attn": (lambda q: vj.video_sparse_attn(q, q, q, 3, sizes), q),
               "tile": (lambda x: vj.tile(x, plan), untiled_inputs(plan, np.float32)[0]),
               "untile": (lambda y: vj.untile(y, plan), q),
               "block_sparse_attn": (lambda q: vj.block_sparse_attn(q, q, q, sizes, idx), q)}[op]
    # (jacfwd of a scalar factor: of the array itself it would build an identity of its size squared)
    for transform in (lambda: jax.jvp(fn, (arg,), (jnp.ones_like(arg),)), lambda: jax.jacfwd(lambda s: fn(arg * s).sum())(1.0)):
        with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
            transform()


def _empty_batch_calls(plan, dtype, dim, device=None):
    """tile -> VSA -> untile and its gradients, eager and jitted, and the fine stage alone, on an
    empty batch: empty results of the shapes and dtypes the calls give for a batch of any size."""
    q, k, v, g = untiled_inputs(plan, dtype, dim=dim, batch=0, device=device)
    sizes = plan.variable_block_sizes

    def loss(q, k, v, g):
        tiled = [vj.tile(x, plan) for x in (q, k, v, g)]
        return jnp.sum(vj.untile(vj.video_sparse_attn(*tiled[:3], 2, sizes, gate=tiled[3]), plan).astype(jnp.float32))

    for call in (lambda f: f, jax.jit):
        out = call(lambda *a: vj.video_sparse_attn(*(vj.tile(x, plan) for x in a[:3]), 2, sizes,
                                                   gate=vj.tile(a[3], plan)))(q, k, v, g)
        assert out.shape == (0, 4, plan.padded_len, dim) and out.dtype == dtype
        grads = call(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, g)
        assert [(x.shape, x.dtype) for x in grads] == [(x.shape, x.dtype) for x in (q, k, v, g)]
        idx = jnp.zeros((0, 4, plan.num_blocks, 2), jnp.int32)
        fine, lse = call(lambda q: vj.block_sparse_attn(q, q, q, sizes, idx, return_lse=True))(vj.tile(q, plan))
        assert fine.shape == (0, 4, plan.padded_len, dim) and lse.shape == (0, 4, plan.padded_len)


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BFLOAT16], ids=str)
def test_an_empty_batch_gives_empty_results_and_gradients(dtype):
    _empty_batch_calls(vj.tile_plan(SEQ, TILE), dtype, 16)


def gpu_problem(dtype=jnp.bfloat16, dim=64, seed=0):
    """A plan of (4, 4, 4) tiles on the GPU (8 tiles, 7 of them partial) and tiled q, k, v, gate."""
    gpu = jax.devices("gpu")[0]
    plan = vj.tile_plan((5, 7, 6), (4, 4, 4), device=gpu)
    return plan, tiled_inputs(plan, dtype, heads=(2, 1, 1, 2), dim=dim, device=gpu, seed=seed)


@pytest.mark.gpu
def test_gpu_forward_matches_array_api_eager_and_jitted():
    import cupy

    plan, (q, k, v, g) = gpu_problem()
    out = vj.video_sparse_attn(q, k, v, 2, plan.variable_block_sizes, gate=g)
    arrays = [vj._to_cupy(x) for x in (q, k, v, g)]
    expected = vsa_nd.video_sparse_attn(*arrays[:3], 2, plan.array_plan.variable_block_sizes, gate=arrays[3])
    assert cupy.array_equal(vj._to_cupy(out).view(np.uint16), expected.view(np.uint16))
    # Under jit, between XLA's own operations on its stream: the plan's block sizes closed over
    # (no operand of the program), or passed as an argument (an operand, checked in the call).
    layer = lambda q, k, v, g, sizes: 2 * vj.video_sparse_attn(q * 1.5, k, v, 2, sizes, gate=g) + 1  # noqa: E731
    eager = layer(q, k, v, g, plan.variable_block_sizes)
    closed = jax.jit(lambda q, k, v, g: layer(q, k, v, g, plan.variable_block_sizes))
    assert "plan(5, 7, 6)(4, 4, 4)" in closed.lower(q, k, v, g).as_text()
    for jitted in (closed(q, k, v, g), jax.jit(layer)(q, k, v, g, plan.variable_block_sizes)):
        assert jitted.dtype == jnp.bfloat16
        assert np.array_equal(np.asarray(jitted).view(np.uint16), np.asarray(eager).view(np.uint16))


@pytest.mark.gpu
def test_gpu_jitted_call_runs_after_the_xla_work_that_makes_its_inputs():
    """Under jit the call's kernels go on the stream XLA hands the handler, behind the XLA work
    that makes its inputs: here q comes out of six sorts of 2**25 floats (several ms) queued just
    before it.  Each run (new inputs every time) equals the call on the same q made ahead and
    waited for, bit for bit."""
    plan, (q, k, v, g) = gpu_problem()
    keys = jax.device_put(np.random.default_rng(0).standard_normal(2**25).astype(np.float32), q.devices().pop())

    def late(q, scale, keys):  # (keys an argument: a constant of 128 MiB would be part of each program)
        sorted_keys = keys
        for _ in range(6):
            sorted_keys = jnp.sort(-sorted_keys)
        factor = jnp.where(jnp.isnan(sorted_keys[0]), jnp.nan, 1.0)  # 1, but only once the sorts are done
        return q * scale * factor.astype(q.dtype)

    layer = jax.jit(lambda q, scale, keys: vj.video_sparse_attn(late(q, scale, keys), k, v, 2,
                                                                plan.variable_block_sizes, gate=g))
    made_ahead = jax.jit(late)
    for scale in (1.0, -0.5, 2.0):  # powers of two: q * scale * 1 is exact however XLA fuses it
        made = made_ahead(q, scale, keys).block_until_ready()
        want = vj.video_sparse_attn(made, k, v, 2, plan.variable_block_sizes, gate=g)
        got = layer(q, scale, keys)
        assert np.array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16)), scale


@pytest.mark.gpu
def test_gpu_empty_batch_gives_empty_results_and_gradients():
    gpu = jax.devices("gpu")[0]
    _empty_batch_calls(vj.tile_plan((5, 7, 6), (4, 4, 4), device=gpu), jnp.bfloat16, 64, gpu)


@pytest.mark.gpu
def test_gpu_vmap_matches_a_loop_of_calls():
    plan, (q, k, v, g) = gpu_problem()
    qs = jnp.stack([q, q * 0.5, -q])
    layer = lambda q: vj.video_sparse_attn(q, k, v, 2, plan.variable_block_sizes, gate=g)  # noqa: E731
    looped = np.asarray(jnp.stack([layer(x) for x in qs])).view(np.uint16)
    for mapped in (jax.vmap(layer), jax.jit(jax.vmap(layer))):
        assert np.array_equal(np.asarray(mapped(qs)).view(np.uint16), looped)


@pytest.mark.gpu
def test_gpu_errors_under_jit_carry_vsa_nd_message():
    plan, (q, k, v, g) = gpu_problem()
    bad = jnp.full(plan.num_blocks, plan.tile_volume + 1, jnp.int32, device=q.devices().pop())
    attention = jax.jit(lambda q, sizes: vj.video_sparse_attn(q, k, v, 2, sizes, gate=g))
    with pytest.raises(Exception, match=r"block_sizes: expected every block size in \[1, 64\]"):
        attention(q, bad).block_until_ready()
    attention(q, plan.variable_block_sizes).block_until_ready()  # the handler still works afterwards
    # A dtype the GPU refuses (float32 attention) passes the trace (a CPU would take it) and
    # fails when the program runs, with vsa_nd's message.
    as_f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    with pytest.raises(Exception, match=r"q: .*got float32"):
        jax.jit(lambda q, k, v: vj.video_sparse_attn(q, k, v, 2, plan.variable_block_sizes))(*as_f32).block_until_ready()


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("hand_over", [False, True])
def test_gpu_gradients_match_reference_eager_and_jitted(dim, hand_over, monkeypatch):
    """``hand_over``: the backward's dS hand-over forced on, one (batch, kv head) pair per chunk
    on two streams of its own forked from the stream XLA gives the foreign call (under jit)."""
    if hand_over:
        force_ds_hand_over(monkeypatch)
    plan, (q, k, v, g) = gpu_problem(dim=dim, seed=dim)
    dout = jnp.asarray(np.random.default_rng(dim).standard_normal(q.shape), jnp.bfloat16, device=q.devices().pop())
    attention = lambda *a: vj.video_sparse_attn(*a[:3], 2, plan.variable_block_sizes, gate=a[3])  # noqa: E731
    grads = jax.vjp(attention, q, k, v, g)[1](dout)
    jitted = jax.jit(lambda *a: jax.vjp(attention, *a)[1](dout))(q, k, v, g)
    arrays = [np.asarray(x, np.float64) for x in (q, k, v, g)]
    sizes, real = host_sizes(plan), real_rows(plan)
    forward = ref.video_sparse_attn(*arrays[:3], sizes, sizes, 2, plan.tile_volume, gate=arrays[3])
    expected = ref.video_sparse_attn_backward(np.asarray(dout, np.float64), *arrays[:3], sizes, sizes, forward.q2k_idx,
                                              forward.q2k_num, plan.tile_volume, gate=arrays[3])
    for name, grad, again, want in zip(("dq", "dk", "dv", "dgate"), grads, jitted, expected):
        # The backward is deterministic: jitted and eager gradients agree bit for bit.
        assert np.array_equal(np.asarray(grad).view(np.uint16), np.asarray(again).view(np.uint16))
        assert_rows_close(np.asarray(grad, np.float64), want, real, CUDA_BWD_TOL, name)


def test_a_device_index_jax_lacks_is_refused_by_name():
    n = len(jax.devices("cpu"))
    with pytest.raises(ValueError, match=f"device: expected a device JAX has, got 'cpu:{n}'"):
        vj.tile_plan(SEQ, TILE, device=f"cpu:{n}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_jitted_block_sparse_attn_gives_the_array_calls_dtypes_and_bits(dtype):
    plan = vj.tile_plan(SEQ, TILE)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 2, plan.padded_len, 8)).astype(dtype)) for _ in range(3))
    idx = np.tile(np.arange(2, dtype=np.int32), (1, 2, plan.num_blocks, 1))
    out, lse = jax.jit(lambda q: vj.block_sparse_attn(q, k, v, plan.variable_block_sizes, idx, return_lse=True))(q)
    want_out, want_lse = vsa_nd.block_sparse_attn(*(np.asarray(x) for x in (q, k, v)),
                                                  plan.array_plan.variable_block_sizes, idx, return_lse=True)
    assert out.dtype == want_out.dtype and lse.dtype == want_lse.dtype
    np.testing.assert_array_equal(np.asarray(out), want_out)
    np.testing.assert_array_equal(np.asarray(lse), want_lse)
