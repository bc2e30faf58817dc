"""A second GPU: every call follows its arrays' device, whatever device is current (needs two GPUs).

The same problem runs on cuda:0 and on cuda:1, each time with the other device current; the
results must sit on the arrays' device and agree bit for bit (the kernels are deterministic).
Covers what is cached per device: compiled kernels, plans, TMA descriptors, streams, the torch
adapter's allocator and views, the JAX adapter's XLA calls.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import vsa_nd
from vsa_nd._xp import BFLOAT16

from attention_problems import force_ds_hand_over

pytestmark = pytest.mark.gpu

SEQ = (8, 12, 20)  # 30 tiles of (4, 4, 4), some partial
HEADS, DIM, TOPK = 4, 128, 7


def two_devices():
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")


def host_problem(padded_len: int, seed: int = 0):
    """q, k, v, gate, dout [1, HEADS, padded_len, DIM] as bfloat16 NumPy arrays."""
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal((1, HEADS, padded_len, DIM)).astype(np.float32) for _ in range(5)]
    arrays[3] = 1 / (1 + np.exp(-arrays[3]))
    return [a.astype(BFLOAT16) for a in arrays]


def bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(np.uint16) if x.dtype.itemsize == 2 else x.view(np.uint32)


@pytest.mark.parametrize("workspace", [False, True])
def test_cupy_forward_and_backward_on_either_device(workspace, monkeypatch):
    import cupy

    from vsa_nd.backends import cuda_attention

    two_devices()
    # With the workspace: one (batch, kv head) pair per chunk at either head dim, so that the
    # chunks run on the backward's own streams, which must be those of the arrays' device.
    if workspace:
        force_ds_hand_over(monkeypatch)
    else:
        monkeypatch.setattr(cuda_attention, "DS_WORKSPACE_BYTES", 0)
    host = host_problem(vsa_nd.tile_plan(SEQ).padded_len)
    results = []
    for device in (0, 1):
        with cupy.cuda.Device(device):
            q, k, v, gate, dout = (cupy.asarray(a) for a in host)
            sizes = vsa_nd.tile_plan(SEQ, device=f"cuda:{device}").variable_block_sizes
        with cupy.cuda.Device(1 - device):
            out, ctx = vsa_nd.video_sparse_attn(q, k, v, TOPK, sizes, gate=gate, return_context=True)
            grads = vsa_nd.video_sparse_attn_backward(dout, ctx)
        assert out.device.id == device and all(g.device.id == device for g in grads)
        results.append([cupy.asnumpy(x) for x in (out, *grads)])
    for a, b in zip(*results):
        assert np.array_equal(bits(a), bits(b))


def test_torch_adapter_on_either_device(monkeypatch):
    """The forward runs with the other device current; autograd runs the backward on its own
    thread for the tensors' device (so it is current there): the CuPy test above covers the
    backward with another device current.  Then, with the tensors' device current, calls like
    it take the prepared forward and backward on that device: the same results, bit for bit."""
    torch = pytest.importorskip("torch")
    import vsa_nd.adapters.torch as vt

    two_devices()
    backward = vt._prepared_backward
    prepared = []
    monkeypatch.setattr(vt, "_prepared_backward", lambda *args: prepared.append(backward(*args)) or prepared[-1])
    host = host_problem(vsa_nd.tile_plan(SEQ).padded_len, seed=1)
    results = []
    for index in (0, 1):
        device = torch.device("cuda", index)
        q, k, v, gate, dout = (torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).to(device) for a in host)
        q, k, v, gate = (t.requires_grad_() for t in (q, k, v, gate))
        plan = vt.tile_plan(SEQ, device=device)
        with torch.cuda.device(1 - index):
            out = vt.video_sparse_attn(q, k, v, TOPK, plan.variable_block_sizes, gate=gate)
            out.backward(dout)
        assert all(t.device == device for t in (out, q.grad, k.grad, v.grad, gate.grad))
        results.append([t.detach().view(torch.int16).cpu().numpy() for t in (out, q.grad, k.grad, v.grad, gate.grad)])
        with torch.cuda.device(index):
            for _ in range(2):  # like the call above, which was checked: prepared, forward and backward
                del prepared[:]
                grads = torch.autograd.grad(vt.video_sparse_attn(q, k, v, TOPK, plan.variable_block_sizes, gate=gate),
                                            (q, k, v, gate), dout)
                assert [g is not None for g in prepared] == [True]
                for got, want in zip(grads, results[-1][1:]):
                    assert got.device == device and np.array_equal(got.view(torch.int16).cpu().numpy(), want)
    for a, b in zip(*results):
        assert np.array_equal(a, b)


def test_jax_adapter_on_either_device():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import vsa_nd.adapters.jax as vj

    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if len(gpus) < 2:
        pytest.skip("needs two GPUs visible to JAX")
    import cupy

    host = host_problem(vsa_nd.tile_plan(SEQ).padded_len, seed=2)
    results = []
    for index, device in enumerate(gpus[:2]):
        q, k, v, gate, dout = (jax.device_put(jnp.asarray(a), device) for a in host)
        plan = vj.tile_plan(SEQ, device=device)
        attention = lambda *a: vj.video_sparse_attn(*a[:3], TOPK, plan.variable_block_sizes, gate=a[3])  # noqa: E731
        other = gpus[1 - index]
        with cupy.cuda.Device(other.id), jax.default_device(other):  # the eager calls follow their arrays
            out, vjp = jax.vjp(attention, q, k, v, gate)
            grads = vjp(dout)
            jitted = jax.jit(attention)(q, k, v, gate)
            jitted_grads = jax.jit(lambda *a: jax.vjp(attention, *a[:4])[1](a[4]))(q, k, v, gate, dout)
        assert all(x.devices() == {device} for x in (out, *grads, jitted, *jitted_grads))
        for eager, again in zip((out, *grads), (jitted, *jitted_grads)):
            assert np.array_equal(bits(eager), bits(again))
        results.append([np.asarray(x) for x in (out, *grads)])
    for a, b in zip(*results):
        assert np.array_equal(bits(a), bits(b))


def test_jax_adapter_in_shard_map_over_two_gpus():
    """tests/jax_sharding.py on the first two GPUs (a fresh process): inside shard_map over the
    batch or the heads, results and gradients bit for bit those of one GPU; shared k, v and gate
    get summed gradients; a varying result claimed replicated is refused."""
    jax = pytest.importorskip("jax")
    two_devices()
    if len([d for d in jax.devices() if d.platform == "gpu"]) < 2:
        pytest.skip("needs two GPUs visible to JAX")
    script = os.path.join(os.path.dirname(__file__), "jax_sharding.py")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # beside this process's JAX
    result = subprocess.run([sys.executable, script, "gpu"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and result.stdout.rstrip().endswith("OK"), result.stdout + result.stderr


_CUDA1_ONLY = """
import torch
import vsa_nd.adapters.torch as vt

plan = vt.tile_plan((8, 8, 8), (4, 4, 4), device="cuda:1")
gen = torch.Generator(device="cuda:1").manual_seed(0)
q, k, v = (torch.randn(1, 2, plan.padded_len, 64, device="cuda:1", dtype=torch.bfloat16, generator=gen, requires_grad=True)
           for _ in range(3))
out = vt.video_sparse_attn(q, k, v, 2, plan.variable_block_sizes)
out.backward(torch.ones_like(out))
torch.cuda.synchronize(1)
print(torch.cuda.memory_stats(0).get("allocation.all.allocated", 0), torch.cuda.memory_stats(1)["allocation.all.allocated"])
"""


def test_torch_adapter_books_memory_on_the_tensors_device_in_a_fresh_process():
    """A process that only ever uses cuda:1: torch sets devices lazily, so its current device may
    stay 0 while the CUDA runtime's is 1, and torch's raw allocations go to the pool of torch's
    current device.  vsa_nd's intermediates must still be booked on cuda:1, none on cuda:0
    (where a later cuda:0 tensor could be given a block of cuda:1's memory)."""
    two_devices()
    pytest.importorskip("torch")
    run = subprocess.run([sys.executable, "-c", _CUDA1_ONLY], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    on_0, on_1 = map(int, run.stdout.split()[-2:])
    assert on_0 == 0 and on_1 > 0, run.stdout
