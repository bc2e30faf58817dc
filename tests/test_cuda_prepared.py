"""The VSA forward's prepared launches (``vsa_nd.backends.cuda_vsa``) and the fast paths that
run them for a call like one checked before: ``vsa_nd.video_sparse_attn`` on CuPy arrays and the
torch adapter on CUDA tensors (GPU only).

A fast-path call skips every check but those of its arrays' memory, so each test here makes a
first call (checked) and then more with fresh random inputs of the same signature, and holds
them to the reference, to the checked path bit for bit, and to the checked path's errors."""

import contextlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import vsa_nd
from vsa_nd import ops, reference
from vsa_nd._xp import BFLOAT16

from attention_problems import force_ds_hand_over, problems, random_inputs, rounds_on_threads, worst_row_error

pytestmark = pytest.mark.gpu

TOLERANCE = {np.dtype(np.float16): 3e-3, BFLOAT16: 1e-2}  # norm-relative, the whole output
ROW_TOLERANCE = {np.dtype(np.float16): 5e-3, BFLOAT16: 3e-2}  # its worst row (attention_problems.worst_row_error)


@pytest.fixture
def poisoned(monkeypatch):
    """Every array the CUDA backend allocates (the forward's results and its workspace) starts as NaN bytes."""
    import cupy

    from vsa_nd.backends import cuda, cuda_attention

    def alloc(shape, dtype):
        out = cupy.empty(shape, dtype)
        out.view(cupy.uint8).fill(0xFF)  # NaN in every float type, -1 in int32
        return out

    monkeypatch.setattr(cuda, "_alloc", alloc)
    monkeypatch.setattr(cuda_attention, "_alloc", alloc)


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1.0)


@pytest.fixture
def checked_calls(monkeypatch):
    """A list that grows by one at each checked call of ``vsa_nd.video_sparse_attn`` (the other
    calls take the fast path), with no call checked before."""
    checked = []
    full = ops._video_sparse_attn

    def counted(*args, **kwargs):
        checked.append(1)
        return full(*args, **kwargs)

    monkeypatch.setattr(ops, "_video_sparse_attn", counted)
    monkeypatch.setattr(ops, "_CHECKED_FORWARDS", {})
    return checked


@given(problems(max_tokens=1200, groups=(1, 3)), st.data())
def test_later_calls_take_the_fast_path_and_match_the_reference(poisoned, checked_calls, p, data):
    """Three calls of one signature on fresh inputs: the first checked, the others on the fast
    path; each against the reference (pad rows 0, lse -inf), the context's small arrays equal to
    the checked call's on the same inputs, and the backward of a fast-path context equal to the
    checked one's, bit for bit."""
    import cupy

    ops._CHECKED_FORWARDS.clear()
    checked_calls.clear()
    q_plan, kv_plan = p["q_plan"].to("cuda:0"), p["kv_plan"].to("cuda:0")
    same_sizes = q_plan is kv_plan and data.draw(st.booleans(), label="kv_block_sizes left to default")
    kv_sizes = None if same_sizes else kv_plan.variable_block_sizes
    scale = data.draw(st.sampled_from([None, 0.05]))
    with_context = data.draw(st.booleans(), label="return_context")
    q_sizes, kv_host = p["q_plan"].variable_block_sizes, p["kv_plan"].variable_block_sizes
    real = reference.valid_slots(q_sizes, p["volume"])
    for call in range(3):
        rng = np.random.default_rng(p["seed"] + call)
        q, k, v = random_inputs(p, rng)
        gate = rng.standard_normal(q.shape).astype(p["dtype"]) if p["gated"] else None
        gpu = lambda x: None if x is None else cupy.asarray(x)  # noqa: E731
        args = (gpu(q), gpu(k), gpu(v), p["topk"], q_plan.variable_block_sizes, kv_sizes)
        result = vsa_nd.video_sparse_attn(*args, gate=gpu(gate), scale=scale, return_context=with_context)
        assert len(checked_calls) == 1
        out = cupy.asnumpy(result[0] if with_context else result)
        ref = reference.video_sparse_attn(q, k, v, q_sizes, kv_host, p["topk"], p["volume"], scale=scale, gate=gate)
        assert (np.asarray(out[:, :, ~real], np.float32) == 0).all()
        assert np.isfinite(np.asarray(out, np.float32)).all()
        assert _rel_err(out[:, :, real], ref.out[:, :, real]) <= TOLERANCE[p["dtype"]]
        assert worst_row_error(out[:, :, real], ref.out[:, :, real]) <= ROW_TOLERANCE[p["dtype"]]
        if not with_context:
            continue
        context = result[1]
        assert context.kv_block_sizes is (kv_sizes if kv_sizes is not None else q_plan.variable_block_sizes)
        # The checked path on the same inputs, called directly (every call of this signature now takes the fast path).
        expected_out, expected = ops._video_sparse_attn(*args, gate=gpu(gate), scale=scale, return_context=True,
                                                        out=None, signature=None)
        assert len(checked_calls) == 2
        del checked_calls[1:]
        # The fast path with a result buffer: filled and returned, bit for bit the checked call's output.
        buffer = cupy.full_like(args[0], np.nan)
        filled, _ = vsa_nd.video_sparse_attn(*args, gate=gpu(gate), scale=scale, return_context=True, out=buffer)
        assert len(checked_calls) == 1 and filled is buffer
        assert cupy.array_equal(buffer.view(np.uint8), expected_out.view(np.uint8))
        for name in ("out", "lse", "q2k_idx", "q2k_num", "q_mean", "k_mean", "v_mean", "coarse_probs", "coarse"):
            got, want = getattr(context, name), getattr(expected, name)
            assert got.shape == want.shape and got.dtype == want.dtype
            assert cupy.array_equal(got.view(np.uint8), want.view(np.uint8)), name
        dout = gpu(rng.standard_normal(q.shape).astype(p["dtype"]))
        for got, want in zip(vsa_nd.video_sparse_attn_backward(dout, context),
                             vsa_nd.video_sparse_attn_backward(dout, expected)):
            assert (got is None) == (want is None)
            if got is not None:
                assert cupy.array_equal(got.view(np.uint8), want.view(np.uint8))


def _problem(dtype=BFLOAT16, heads=4, kv_heads=2, dim=64, seed=0):
    import cupy

    plan = vsa_nd.tile_plan((4, 6, 8), (4, 4, 4), device="cuda:0")
    rng = np.random.default_rng(seed)
    q, gate = (cupy.asarray(rng.standard_normal((1, heads, plan.padded_len, dim)).astype(dtype)) for _ in range(2))
    k, v = (cupy.asarray(rng.standard_normal((1, kv_heads, plan.padded_len, dim)).astype(dtype)) for _ in range(2))
    return plan, q, k, v, gate


def test_fast_path_refers_memory_it_cannot_take_to_the_checks(checked_calls):
    """After a checked call, a call of the same signature whose arrays are not contiguous, not
    16-byte aligned or on another current device goes through every check again, and gets its
    error there."""
    import cupy

    checked = checked_calls
    plan, q, k, v, gate = _problem()
    sizes = plan.variable_block_sizes
    vsa_nd.video_sparse_attn(q, k, v, 3, sizes, gate=gate)
    vsa_nd.video_sparse_attn(q, k, v, 3, sizes, gate=gate)
    assert len(checked) == 1
    strided = cupy.empty((1, 4, plan.padded_len, 128), q.dtype)[..., ::2]
    with pytest.raises(ValueError, match="contiguous"):
        vsa_nd.video_sparse_attn(strided, k, v, 3, sizes, gate=gate)
    shifted = cupy.empty(q.size + 1, q.dtype)[1:].reshape(q.shape)
    shifted[...] = q
    with pytest.raises(ValueError, match="16-byte boundary"):
        vsa_nd.video_sparse_attn(q, k, v, 3, sizes, gate=shifted)
    assert len(checked) == 3
    # A topk or scale of another type than the checked call's is checked again: bool is refused.
    with pytest.raises(TypeError, match="scale"):
        vsa_nd.video_sparse_attn(q, k, v, 3, sizes, gate=gate, scale=True)
    vsa_nd.video_sparse_attn(q, k, v, 1, sizes, gate=gate)
    with pytest.raises(TypeError, match="topk"):
        vsa_nd.video_sparse_attn(q, k, v, True, sizes, gate=gate)
    # Block sizes equal to the plan's but not its own array: checked on every call.
    copied = cupy.array(sizes)
    before = len(checked)
    for _ in range(2):
        vsa_nd.video_sparse_attn(q, k, v, 3, copied, gate=gate)
    assert len(checked) == before + 2


def test_fast_path_follows_the_kernel_choice(checked_calls, monkeypatch):
    """The prepared launches are per kernel choice: switching FORWARD_KERNEL between two calls of
    one signature makes the fast path build the portable kernel's launch, with the same results
    within the tolerance."""
    import cupy

    from vsa_nd.backends import cuda_attention, cuda_vsa

    plan, q, k, v, gate = _problem()
    sizes = plan.variable_block_sizes
    made = []
    make_launch = cuda_attention.make_launch

    def recorded(source, *args, **kwargs):
        made.append(source)
        return make_launch(source, *args, **kwargs)

    monkeypatch.setattr(cuda_attention, "make_launch", recorded)
    cuda_vsa.forward_launches.cache_clear()  # (launches made by earlier tests are not made again)
    try:
        first = vsa_nd.video_sparse_attn(q, k, v, 3, sizes, gate=gate, scale=0.11)
        assert len(made) == 1
        monkeypatch.setattr(cuda_attention, "FORWARD_KERNEL", "mma")
        second = vsa_nd.video_sparse_attn(q, k, v, 3, sizes, gate=gate, scale=0.11)
        assert len(checked_calls) == 1 and made[1:] == ["attention_fwd.cu"]
        assert _rel_err(cupy.asnumpy(second), cupy.asnumpy(first)) <= TOLERANCE[BFLOAT16]
    finally:
        cuda_vsa.forward_launches.cache_clear()  # (none of the recorded launches outlives the test)


def test_prepared_launches_refuse_what_the_products_cannot_index():
    """A problem whose coarse product would overflow the GEMM kernel's int32 offsets is refused
    with a ValueError when its launches are made, before anything runs (here 12000 tiles of 64
    and 16 query heads per kv head: probs [16 * 12000, 12000] as one operand)."""
    from vsa_nd.backends import cuda_attention, cuda_vsa

    n = 12000
    with pytest.raises(ValueError, match="int32 indexing"):
        cuda_vsa.forward_launches((1, 16, n * 64, 128), (1, 1, n * 64, 128), BFLOAT16, n, n, 77, 0.1, 0,
                                  cuda_attention.FORWARD_KERNEL)


_SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) {}
}
"""


def test_fast_path_is_ordered_on_the_current_stream(checked_calls):
    """A fast-path call on a side stream runs after the work queued there before it: q is
    written on that stream behind a long spin, and the result is that of the written q (a
    launch on another stream would read the zeros q held before)."""
    import cupy

    plan, q, k, v, gate = _problem(seed=3)
    sizes = plan.variable_block_sizes
    vsa_nd.video_sparse_attn(q, k, v, 2, sizes, gate=gate)  # checked
    expected = vsa_nd.video_sparse_attn(q, k, v, 2, sizes, gate=gate)
    q2 = cupy.zeros_like(q)
    cupy.cuda.Device().synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        cupy.RawKernel(_SPIN, "spin")((1,), (1,), (np.int64(200_000_000),))  # ~0.1 s
        q2[...] = q
        got = vsa_nd.video_sparse_attn(q2, k, v, 2, sizes, gate=gate)
    stream.synchronize()
    assert len(checked_calls) == 1
    assert cupy.array_equal(got.view(np.uint16), expected.view(np.uint16))


# ---------------------------------------------------------------------------------------
# The torch adapter's fast path.


@pytest.fixture
def prepared_calls(monkeypatch):
    """A list that records, for each call the torch adapter considers for its prepared path,
    whether it took it (True) or the checked path (False); no call remembered before."""
    import vsa_nd.adapters.torch as vt

    taken = []
    run = vt._prepared_forward

    def recorded(*args):
        out = run(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(vt, "_prepared_forward", recorded)
    monkeypatch.setattr(vt, "_CHECKED_FORWARDS", {})
    return taken


@pytest.fixture
def prepared_backwards(monkeypatch):
    """A list that records, for each prepared node's backward, what the prepared backward
    launches returned: None where the call went to the checked path."""
    import vsa_nd.adapters.torch as vt

    returned = []
    run = vt._prepared_backward

    def recorded(*args):
        returned.append(run(*args))
        return returned[-1]

    monkeypatch.setattr(vt, "_prepared_backward", recorded)
    return returned


@pytest.fixture
def poisoned_torch(monkeypatch):
    """Every buffer the torch adapter's prepared path allocates starts as 0xFF bytes."""
    torch = pytest.importorskip("torch")
    import vsa_nd.adapters.torch as vt

    empty = vt._empty

    def poisoned(shape, dtype, device):
        out = empty(shape, dtype, device)
        out.view(torch.uint8).fill_(0xFF)
        return out

    monkeypatch.setattr(vt, "_empty", poisoned)


@pytest.mark.parametrize("needs_grad", [False, True])
def test_torch_fast_path_matches_the_checked_path(needs_grad, poisoned_torch, prepared_calls, prepared_backwards):
    """Torch calls of one signature: the first through vsa_nd's checks, later ones on the
    prepared launches with torch's allocator (poisoned here), their backward too; outputs, the
    autograd context and gradients equal the checked path's bit for bit, on fresh inputs each call."""
    torch = pytest.importorskip("torch")
    import vsa_nd.adapters.torch as vt

    prepared = prepared_calls
    plan = vt.tile_plan((4, 6, 8), (4, 4, 4), device="cuda")
    sizes = plan.variable_block_sizes
    generator = torch.Generator(device="cuda")
    for seed in range(3):
        generator.manual_seed(seed)
        x = [torch.randn(1, plan.seq_len, h, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
             for h in (4, 2, 2, 4)]
        q, k, v, g = (vt.tile(t, plan).requires_grad_(needs_grad) for t in x)
        out = vt.video_sparse_attn(q, k, v, 3, sizes, gate=g)
        # The checked path on the same inputs: the custom op (under a function mode) never takes the fast path.
        with torch.device("cuda"):
            expected = vt.video_sparse_attn(q, k, v, 3, sizes, gate=g)
        assert torch.equal(out.view(torch.int16), expected.view(torch.int16))
        if needs_grad and seed:  # a prepared call: its node saved one workspace, the context's tensors made from it
            node = out.grad_fn
            assert len(node.saved_tensors) == 8 and node.saved_tensors[7].dtype == torch.uint8
            want = vt._vsa_forward(*(t.detach() for t in (q, k, v, g)), sizes, sizes, 3, 0.125)[1:]
            got = vt._context_views(node.saved_tensors[7], node.prepared.context)
            assert len(got) == len(want) == 8
            for a, b in zip(got, want):
                assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        if needs_grad:
            dout = torch.randn(out.shape, device="cuda", dtype=out.dtype, generator=generator)
            for got, want in zip(torch.autograd.grad(out, (q, k, v, g), dout),
                                 torch.autograd.grad(expected, (q, k, v, g), dout)):
                assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert prepared[0::2] == [False, True, True] and not any(prepared[1::2])  # never under the function mode
    assert [b is not None for b in prepared_backwards] == ([True, True] if needs_grad else [])


def _torch_problem(seed: int):
    """A bf16 GQA problem with a gate, tiled by a CUDA plan: (block sizes, q, k, v, gate), each
    needing a gradient, and a dout."""
    torch = pytest.importorskip("torch")
    import vsa_nd.adapters.torch as vt

    plan = vt.tile_plan((4, 6, 8), (4, 4, 4), device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x = [torch.randn(1, plan.seq_len, h, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
         for h in (4, 2, 2, 4)]
    q, k, v, g = (vt.tile(t, plan).requires_grad_() for t in x)
    dout = torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=generator)
    return plan.variable_block_sizes, q, k, v, g, dout


def test_torch_prepared_node_under_create_graph_takes_the_checked_backward(prepared_calls, prepared_backwards):
    """A prepared forward's node differentiated with create_graph=True: its backward goes to the
    checked path (the prepared launches record no graph), so the gradients come back needing a
    gradient, bit for bit the plain backward's, and differentiating them again is refused by name,
    as on the checked path's node."""
    torch = pytest.importorskip("torch")
    import vsa_nd.adapters.torch as vt

    sizes, q, k, v, g, dout = _torch_problem(seed=31)
    vt.video_sparse_attn(q, k, v, 3, sizes, gate=g)  # checked: the signature is remembered
    out = vt.video_sparse_attn(q, k, v, 3, sizes, gate=g)
    assert prepared_calls == [False, True]
    plain = torch.autograd.grad(out, (q, k, v, g), dout, retain_graph=True)
    graphed = torch.autograd.grad(out, (q, k, v, g), dout, create_graph=True)
    assert [b is not None for b in prepared_backwards] == [True, False]
    for got, want in zip(graphed, plain):
        assert got.requires_grad and torch.equal(got.view(torch.int16), want.view(torch.int16))
    with pytest.raises(NotImplementedError, match="vsa_nd: video_sparse_attn has first-order gradients only"):
        graphed[0].float().sum().backward()


def test_torch_checkpointing_saves_the_same_tensors_when_it_recomputes(prepared_calls):
    """Non-reentrant activation checkpointing runs the forward under saved-tensor hooks, runs it
    again in the backward and wants the same tensors saved both times; the prepared path's node
    saves fewer than the checked path's.  So under such hooks every call takes the checked path:
    a signature first seen under checkpointing, and one seen before.  Gradients equal those of the
    calls without checkpointing, bit for bit; without it the same signature takes the prepared path."""
    torch = pytest.importorskip("torch")
    from torch.utils.checkpoint import checkpoint

    import vsa_nd.adapters.torch as vt

    sizes, q, k, v, g, dout = _torch_problem(seed=21)
    layer = lambda q, k, v, g: vt.video_sparse_attn(q, k, v, 3, sizes, gate=g)  # noqa: E731
    grads = []
    for checkpointed in (True, True, False, False):
        out = checkpoint(layer, q, k, v, g, use_reentrant=False) if checkpointed else layer(q, k, v, g)
        grads.append(torch.autograd.grad(out, (q, k, v, g), dout))
    assert prepared_calls == [False] * 4 + [True, True]  # two checkpointed calls, each run twice; then two plain ones
    for got in grads[:2] + grads[3:]:
        for a, b in zip(got, grads[2]):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_torch_backward_takes_an_incoming_gradient_at_any_address(prepared_calls):
    """torch.cat's backward hands each input a narrowed view of the gradient, which may start at
    any element: the kernels load 16 bytes at a time, so the adapter copies such a dout rather
    than have vsa_nd refuse it.  Checked and prepared nodes alike; gradients equal those of an
    aligned dout, bit for bit."""
    torch = pytest.importorskip("torch")

    import vsa_nd.adapters.torch as vt

    sizes, q, k, v, g, dout = _torch_problem(seed=22)
    for _ in range(2):  # checked, then prepared
        out = vt.video_sparse_attn(q, k, v, 3, sizes, gate=g)
        flat = torch.cat([torch.zeros(3, device="cuda", dtype=out.dtype), out.reshape(-1)])
        got = torch.autograd.grad(flat, (q, k, v, g), torch.cat([flat.new_zeros(3), dout.reshape(-1)]))
        want = torch.autograd.grad(vt.video_sparse_attn(q, k, v, 3, sizes, gate=g), (q, k, v, g), dout)
        for a, b in zip(got, want):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert prepared_calls == [False, True, True, True]


def _kept_for_a_side_stream(torch, make) -> bool:
    """Whether the tensor ``make()`` returns stays intact for a side stream that reads it late,
    after the caller dropped it with ``record_stream`` (what torch's caching allocator honours
    for its own blocks): a block handed back at once is the next allocation's, overwritten here.
    Also false where the tensor's storage is not the allocator's (not resizable: a view of memory
    made elsewhere, say by CuPy through torch's allocator), which may stay intact here by chance."""
    result = make()
    if not result.untyped_storage().resizable():
        return False
    want = result.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s
        seen = result.clone()
    result.record_stream(side)
    del result
    torch.full_like(want, 7)  # on the current stream, while the side stream still sleeps
    torch.cuda.synchronize()
    return torch.equal(seen.view(torch.uint8), want.view(torch.uint8))


def test_torch_results_honour_record_stream(prepared_calls, monkeypatch):
    """The checked path's results (first calls) come from torch's allocator like the prepared
    path's, not as views of memory vsa_nd allocated (torch ignores record_stream on those): the
    forward's output, the gradients, tile's and untile's results."""
    torch = pytest.importorskip("torch")

    import vsa_nd.adapters.torch as vt

    monkeypatch.setattr(vt, "_CHECKED_REORDERS", {})
    sizes, q, k, v, g, dout = _torch_problem(seed=23)
    plan = vt.tile_plan((4, 6, 8), (4, 4, 4), device="cuda")
    x = torch.randn(1, plan.seq_len, 3, 64, device="cuda", dtype=torch.float16)  # tile and untile shapes of their own
    y = torch.randn(1, 3, plan.padded_len, 64, device="cuda", dtype=torch.float16)
    for _ in range(2):  # checked, then prepared
        with torch.no_grad():
            assert _kept_for_a_side_stream(torch, lambda: vt.video_sparse_attn(q, k, v, 3, sizes, gate=g))
        out = vt.video_sparse_attn(q, k, v, 3, sizes, gate=g)
        assert _kept_for_a_side_stream(torch, lambda: torch.autograd.grad(out, k, dout)[0])
        assert _kept_for_a_side_stream(torch, lambda: vt.tile(x, plan))
        assert _kept_for_a_side_stream(torch, lambda: vt.untile(y, plan))
    assert prepared_calls == [False, False, True, True]  # (no grad and grad: two signatures)
    checked = {key[:3] for key in vt._CHECKED_REORDERS}
    assert ("tile", x.shape, x.dtype) in checked and ("untile", y.shape, y.dtype) in checked


def test_torch_fast_path_leaves_calls_under_a_dispatch_mode_to_the_custom_op(monkeypatch):
    """After a plain call has been checked, the same call under a torch dispatch mode goes to
    vsa_nd's custom op, which the mode sees, not to the prepared launches."""
    torch = pytest.importorskip("torch")
    from torch.utils._python_dispatch import TorchDispatchMode

    import vsa_nd.adapters.torch as vt

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(vt, "_CHECKED_FORWARDS", {})
    plan = vt.tile_plan((4, 6, 8), (4, 4, 4), device="cuda")
    q, k, v, g = (vt.tile(torch.randn(1, plan.seq_len, 2, 64, device="cuda", dtype=torch.bfloat16), plan)
                  for _ in range(4))
    sizes = plan.variable_block_sizes
    expected = [vt.video_sparse_attn(q, k, v, 3, sizes, gate=g) for _ in range(2)][-1]  # checked, prepared
    seen = []
    with Recorder():
        out = vt.video_sparse_attn(q, k, v, 3, sizes, gate=g)
    assert any(name.startswith("vsa_nd.video_sparse_attn") for name in seen), seen
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


def test_torch_fast_path_leaves_changed_plan_tensors_to_the_checked_path(prepared_calls):
    """A plan's block-size tensor changed in place (its version counter moved) no longer stands
    for the plan's array: the next call takes the checked path."""
    torch = pytest.importorskip("torch")
    import vsa_nd.adapters.torch as vt

    prepared = prepared_calls
    plan = vt.tile_plan((4, 6, 9), (4, 4, 4), device="cuda")
    q, k, v, g = (vt.tile(torch.randn(1, plan.seq_len, 2, 64, device="cuda", dtype=torch.float16), plan)
                  for _ in range(4))
    sizes = plan.variable_block_sizes
    for _ in range(2):
        vt.video_sparse_attn(q, k, v, 2, sizes, gate=g)
    assert prepared == [False, True]  # checked, then prepared
    sizes.add_(0)  # the same values, a new version
    try:
        vt.video_sparse_attn(q, k, v, 2, sizes, gate=g)
        assert prepared == [False, True, False]
    finally:  # the plan's tensor trusted again, at its new version, for whoever uses this plan next
        entry = vt._PLAN_BLOCK_SIZES[id(sizes)]
        vt._PLAN_BLOCK_SIZES[id(sizes)] = (sizes, entry[1], sizes._version)


def test_torch_fast_path_under_cuda_graph_capture(prepared_calls):
    """The fast path allocates from torch's allocator on the capturing stream: a call captured on
    it replays with new inputs and gives the checked path's results."""
    torch = pytest.importorskip("torch")
    import vsa_nd.adapters.torch as vt

    prepared = prepared_calls
    plan = vt.tile_plan((4, 6, 8), (4, 4, 4), device="cuda")
    sizes = plan.variable_block_sizes
    static = [vt.tile(torch.randn(1, plan.seq_len, 2, 64, device="cuda", dtype=torch.bfloat16), plan) for _ in range(4)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # checked, then the fast path
            vt.video_sparse_attn(*static[:3], 3, sizes, gate=static[3])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = vt.video_sparse_attn(*static[:3], 3, sizes, gate=static[3])
    assert prepared == [False, True, True]  # checked, prepared, prepared under capture
    for seed in range(2):
        fresh = [vt.tile(torch.randn(1, plan.seq_len, 2, 64, device="cuda", dtype=torch.bfloat16,
                                     generator=torch.Generator(device="cuda").manual_seed(seed + 10 * i)), plan)
                 for i in range(4)]
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        with torch.device("cuda"):  # the checked path (the custom op, under a function mode)
            expected = vt.video_sparse_attn(*fresh[:3], 3, sizes, gate=fresh[3])
        assert torch.equal(captured.view(torch.int16), expected.view(torch.int16))


# ---------------------------------------------------------------------------------------
# tile and untile.


def test_tile_and_untile_fast_paths_match_the_host(poisoned, monkeypatch):
    """Repeated tile/untile calls of one signature on CuPy arrays (the first checked, the others
    prepared, into poisoned buffers), with an input that starts 2 bytes into its allocation
    among them (a narrower copy unit), equal the NumPy backend's results; a strided input of
    the same shape is refused by the checks."""
    import cupy

    monkeypatch.setattr(ops, "_CHECKED_REORDERS", {})
    checked = []
    for name in ("_tile", "_untile"):
        full = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda x, *args, full=full, name=name:
                            checked.append((name, type(x).__module__.split(".")[0])) or full(x, *args))
    plan = vsa_nd.tile_plan((3, 5, 6), (2, 4, 4), device="cuda:0")
    host_plan = plan.to("cpu")
    shape = (2, plan.seq_len, 3, 40)
    rng = np.random.default_rng(5)
    for call in range(4):
        x = rng.standard_normal(shape).astype(np.float16)
        if call == 2:  # 2 bytes in: the copy unit drops from 16 bytes to 2
            device_x = cupy.empty(x.size + 1, x.dtype)[1:].reshape(shape)
            device_x.set(x)
        else:
            device_x = cupy.asarray(x)
        tiled = vsa_nd.tile(device_x, plan)
        expected = vsa_nd.tile(x, host_plan)
        assert np.array_equal(cupy.asnumpy(tiled).view(np.uint16), expected.view(np.uint16))
        back = vsa_nd.untile(tiled, plan)
        assert np.array_equal(cupy.asnumpy(back).view(np.uint16), x.view(np.uint16))
    # On the GPU only the first call of each was checked; the others were prepared.
    assert [call for call in checked if call[1] == "cupy"] == [("_tile", "cupy"), ("_untile", "cupy")]
    strided = cupy.empty((2, plan.seq_len, 3, 80), np.float16)[..., ::2]
    with pytest.raises(ValueError, match="contiguous"):
        vsa_nd.tile(strided, plan)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_torch_tile_and_untile_fast_paths_match_the_checked_path(poisoned_torch, monkeypatch, dtype):
    """Repeated torch tile/untile calls on CUDA (the first checked, the others prepared, into
    poisoned buffers; with and without grad) equal the CPU adapter's results, and the gradient
    through tile is untile's; for every dtype the CUDA tile kernels take."""
    torch = pytest.importorskip("torch")
    import vsa_nd.adapters.torch as vt

    dtype = getattr(torch, dtype)
    bits = lambda t: t.view({2: torch.int16, 4: torch.int32}[t.element_size()])  # noqa: E731
    monkeypatch.setattr(vt, "_CHECKED_REORDERS", {})
    run = vt._run
    checked = []
    monkeypatch.setattr(vt, "_run", lambda fn, x, *args, **kwargs: checked.append(x.is_cuda) or run(fn, x, *args, **kwargs))
    plan, host_plan = vt.tile_plan((3, 5, 6), (2, 4, 4), device="cuda"), vt.tile_plan((3, 5, 6), (2, 4, 4))
    for call in range(3):
        x = torch.randn(2, plan.seq_len, 3, 64, dtype=dtype)
        device_x = x.to("cuda").requires_grad_(call == 2)
        tiled = vt.tile(device_x, plan)
        assert tiled.dtype == dtype and torch.equal(bits(tiled.cpu()), bits(vt.tile(x, host_plan)))
        back = vt.untile(tiled, plan)
        assert torch.equal(bits(back.detach().cpu()), bits(x))
        if call == 2:
            grad = torch.randn(tiled.shape, dtype=dtype, device="cuda")
            (got,) = torch.autograd.grad(tiled, device_x, grad)
            assert torch.equal(bits(got), bits(vt.untile(grad, plan)))
    assert checked.count(True) == 2  # on CUDA, the first tile and untile (the others prepared, the gradient's too)


def test_torch_prepared_backward_hands_ds_over_on_streams(poisoned_torch, prepared_calls, prepared_backwards,
                                                          monkeypatch):
    """The prepared backward of torch calls (head dim 128, GQA, gate) with the dS hand-over in
    chunks of one (batch, kv head) pair on three streams of its own, into poisoned buffers:
    gradients bit for bit those of the checked path (the custom op's backward, by vsa_nd's
    CuPy arrays), and each chunk's two passes ran."""
    torch = pytest.importorskip("torch")
    import vsa_nd.adapters.torch as vt
    from vsa_nd.backends import cuda, cuda_attention

    from vsa_nd.kernels import device_arch

    from attention_problems import force_ds_hand_over

    if device_arch(torch.cuda.current_device()) != "sm_90a":
        pytest.skip("the dS hand-over runs on Hopper only")
    force_ds_hand_over(monkeypatch)
    monkeypatch.setattr(cuda_attention, "_DS_STREAMS", 3)
    names = []
    launch = cuda.Launch.__call__
    monkeypatch.setattr(cuda.Launch, "__call__",
                        lambda self, pointers, stream=None: names.append(self.name.split("<")[0]) or launch(self, pointers, stream))
    plan = vt.tile_plan((6, 12, 10), (4, 4, 4), device="cuda")  # 18 tiles, partial ones included
    generator = torch.Generator(device="cuda").manual_seed(3)
    pairs = 2 * 2  # batch x kv heads: one chunk each
    for call in range(3):
        x = [torch.randn(2, plan.seq_len, h, 128, device="cuda", dtype=torch.bfloat16, generator=generator)
             for h in (4, 2, 2, 4)]
        q, k, v, g = (vt.tile(t, plan).requires_grad_() for t in x)
        dout = torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=generator)
        names.clear()
        got = torch.autograd.grad(vt.video_sparse_attn(q, k, v, 5, plan.variable_block_sizes, gate=g), (q, k, v, g), dout)
        if call:
            assert prepared_backwards[-1] is not None  # the prepared backward ran
            assert names.count("bwd_dkdv_sm90") == names.count("bwd_dq_ds_sm90") == pairs
        with torch.device("cuda"):  # the custom op: the checked path, forward and backward
            expected = vt.video_sparse_attn(q, k, v, 5, plan.variable_block_sizes, gate=g)
        for a, b in zip(got, torch.autograd.grad(expected, (q, k, v, g), dout)):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert prepared_calls[0::2] == [False, True, True] and len(prepared_backwards) == 2


@pytest.mark.parametrize("hand_over", [False, True])
def test_threads_on_their_own_streams_get_their_own_results(hand_over, monkeypatch):
    """Four Python threads, each on a CuPy stream of its own, run forward + backward of one
    signature at once (the prepared launches and their caches shared; with ``hand_over`` the
    backward's dS workspace and side streams too), each on inputs of its own, for several rounds:
    every result equals, bit for bit, the same call made alone beforehand."""
    import cupy

    if hand_over:
        force_ds_hand_over(monkeypatch)
    plan = vsa_nd.tile_plan((4, 6, 8), (4, 4, 4), device="cuda:0")
    sizes = plan.variable_block_sizes
    inputs = []
    for seed in range(4):
        rng = np.random.default_rng(100 + seed)
        q, gate, dout = (cupy.asarray(rng.standard_normal((2, 4, plan.padded_len, 64)).astype(BFLOAT16))
                         for _ in range(3))
        k, v = (cupy.asarray(rng.standard_normal((2, 2, plan.padded_len, 64)).astype(BFLOAT16)) for _ in range(2))
        inputs.append((q, k, v, gate, dout))

    def step(q, k, v, gate, dout):
        out, ctx = vsa_nd.video_sparse_attn(q, k, v, 3, sizes, gate=gate, return_context=True)
        return (out, *vsa_nd.video_sparse_attn_backward(dout, ctx))

    alone = []
    for args in inputs:  # (the first call is the checked one; the rest take the prepared launches)
        step(*args)
        alone.append([x.copy() for x in step(*args)])
    cupy.cuda.Device().synchronize()

    @contextlib.contextmanager
    def own_stream():
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            yield
        stream.synchronize()

    results = rounds_on_threads(len(inputs), own_stream, lambda i: [x.copy() for x in step(*inputs[i])])
    for i, rounds in enumerate(results):
        for got in rounds:
            for name, a, b in zip(("out", "dq", "dk", "dv", "dgate"), got, alone[i]):
                assert cupy.array_equal(a.view(np.uint16), b.view(np.uint16)), (i, name)
