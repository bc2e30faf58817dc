"""vsa_nd's JAX adapter inside ``shard_map`` over two devices, against the same calls on one.

Run as a script (a process of its own, since the CPU needs XLA_FLAGS before JAX starts):
``python tests/jax_sharding.py cpu`` (two XLA CPU devices; test_adapter_jax.py), ``... gpu``
(the first two GPUs; test_multi_gpu.py) or ``... gpu 1`` (a mesh of one GPU, where the calls
are still typed and run as inside any shard_map; test_adapter_jax.py).  Prints one line per
check and "OK" last; any mismatch raises.

Checks, each against the unsharded jitted call on the first device:
  - tile -> video_sparse_attn (gated, GQA) -> untile, sharded over the batch and over the heads:
    the output and the gradients of q, k, v and gate, bit for bit;
  - q sharded over the batch, k, v and gate replicated (one kv sequence shared by every batch
    element), with check_vma on and off: the gradients of k, v and gate are summed over the
    devices (the sum is taken at another point of the chain than the unsharded call's, so it may
    round differently: within 1e-6 of the largest in float32, 1e-2 in bfloat16);
  - a result that varies over the devices, claimed replicated (out_specs=P()), is refused;
  - block_sparse_attn and a jitted call on sharded inputs (no shard_map), bit for bit.
"""

import os
import sys

PLATFORM = sys.argv[1] if len(sys.argv) > 1 else "cpu"
COUNT = int(sys.argv[2]) if len(sys.argv) > 2 else 2
if PLATFORM == "cpu":
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={COUNT}"
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import vsa_nd.adapters.jax as vj  # noqa: E402

try:
    from jax import shard_map
except ImportError:  # JAX before 0.7
    from jax.experimental.shard_map import shard_map

DEVICES = jax.devices(PLATFORM)[:COUNT]
assert len(DEVICES) == COUNT, f"needs {COUNT} {PLATFORM} devices, JAX has {jax.devices()}"
DTYPE = jnp.float32 if PLATFORM == "cpu" else jnp.bfloat16
B, H, H_KV, D, TOPK = 2, 4, 2, 64, 3
PLAN = vj.tile_plan((5, 8, 12), (4, 4, 4), device=DEVICES[0])  # 12 tiles, the last row of them partial
SIZES = PLAN.variable_block_sizes
MESH = Mesh(np.array(DEVICES), ("d",))


def inputs(seed: int, heads=(H, H_KV, H_KV, H), batch=(B, B, B, B)) -> list:
    """q, k, v, gate as [B, S, heads, D] arrays on the first device, and a float32 weight like q."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    arrays = [jax.random.normal(key, (b, PLAN.seq_len, h, D), jnp.float32) for key, b, h in zip(keys, batch, heads)]
    arrays.append(jax.random.normal(keys[4], arrays[0].shape, jnp.float32))
    return [jax.device_put(a.astype(DTYPE) if i < 4 else a, DEVICES[0]) for i, a in enumerate(arrays)]


def layer(q, k, v, gate):
    qt, kt, vt, gt = (vj.tile(a, PLAN) for a in (q, k, v, gate))
    return vj.untile(vj.video_sparse_attn(qt, kt, vt, TOPK, SIZES, gate=jax.nn.sigmoid(gt)), PLAN)


def bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(np.uint16) if x.dtype.itemsize == 2 else x.view(np.uint32)


def same(name: str, got, want) -> None:
    assert np.array_equal(bits(got), bits(want)), f"{name}: differs from the unsharded call"
    print(f"{name}: identical", flush=True)


def close(name: str, got, want) -> None:
    got, want = (np.asarray(x, np.float32) for x in (got, want))
    error = float(np.abs(got - want).max() / np.abs(want).max())
    assert np.isfinite(want).all() and error <= (1e-6 if PLATFORM == "cpu" else 1e-2), f"{name}: error {error:.2e}"
    print(f"{name}: max error {error:.1e} of the largest", flush=True)


def sharded_layer_and_gradients() -> None:
    q, k, v, gate, w = inputs(0)
    loss = lambda q, k, v, gate, w: jnp.sum(layer(q, k, v, gate).astype(jnp.float32) * w)  # noqa: E731
    want = jax.jit(layer)(q, k, v, gate), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, gate, w)
    for axis, spec in (("batch", P("d")), ("heads", P(None, None, "d"))):
        mapped = shard_map(layer, mesh=MESH, in_specs=(spec,) * 4, out_specs=spec)
        args = [jax.device_put(a, NamedSharding(MESH, spec)) for a in (q, k, v, gate, w)]
        out = jax.jit(mapped)(*args[:4])
        assert {s.device for s in out.addressable_shards} == set(DEVICES)
        same(f"shard_map over the {axis}: out", out, want[0])
        sharded_loss = lambda q, k, v, gate, w: jnp.sum(mapped(q, k, v, gate).astype(jnp.float32) * w)  # noqa: E731
        grads = jax.jit(jax.grad(sharded_loss, argnums=(0, 1, 2, 3)))(*args)
        for name, got, expected in zip(("dq", "dk", "dv", "dgate"), grads, want[1]):
            same(f"shard_map over the {axis}: {name}", got, expected)
        same(f"jit of inputs sharded over the {axis}: out", jax.jit(layer)(*args[:4]), want[0])


def shared_layer(q, k, v, gate):
    """layer with k, v and gate of batch 1 shared by q's batch elements (B / COUNT in shard_map)."""
    return layer(q, *(jnp.broadcast_to(a, (q.shape[0], *a.shape[1:])) for a in (k, v, gate)))


def shared_kv_gate() -> None:
    q, k, v, gate, w = inputs(1, batch=(B, 1, 1, 1))

    def loss(q, k, v, gate, w):
        return jnp.sum(shared_layer(q, k, v, gate).astype(jnp.float32) * w)

    def local(q, k, v, gate, w):
        return jax.lax.psum(jnp.sum(shared_layer(q, k, v, gate).astype(jnp.float32) * w), "d")

    want = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, gate, w)
    specs = (P("d"), P(), P(), P(), P("d"))
    q, k, v, gate, w = (jax.device_put(a, NamedSharding(MESH, spec)) for a, spec in zip((q, k, v, gate, w), specs))
    for check_vma in (True, False):
        mapped = shard_map(local, mesh=MESH, in_specs=specs, out_specs=P(), check_vma=check_vma)
        grads = jax.jit(jax.grad(mapped, argnums=(0, 1, 2, 3)))(q, k, v, gate, w)
        for name, got, expected in zip(("dq", "dk", "dv", "dgate"), grads, want):
            (same if name == "dq" else close)(f"shared k, v, gate (check_vma={check_vma}): {name}", got, expected)


def varying_result_claimed_replicated() -> None:
    specs = (P("d"), P(), P(), P())
    arrays = inputs(2, batch=(B, 1, 1, 1))[:4]
    q, k, v, gate = (jax.device_put(a, NamedSharding(MESH, spec)) for a, spec in zip(arrays, specs))
    mapped = shard_map(shared_layer, mesh=MESH, in_specs=specs, out_specs=P())
    try:
        jax.jit(mapped)(q, k, v, gate)
    except ValueError as error:
        assert "out_specs" in str(error), error
        print("a varying result claimed replicated: refused", flush=True)
    else:
        raise AssertionError("shard_map took a result that varies over the devices as replicated")


def block_sparse() -> None:
    q, k, v = (vj.tile(a, PLAN) for a in inputs(3)[:3])
    rng = np.random.default_rng(3)
    idx = np.argsort(rng.random((B, H, PLAN.num_blocks, PLAN.num_blocks)), axis=-1)[..., :TOPK].astype(np.int32)
    num = rng.integers(1, TOPK + 1, (B, H, PLAN.num_blocks)).astype(np.int32)
    idx, num = (jax.device_put(a, DEVICES[0]) for a in (idx, num))
    call = lambda q, k, v, idx, num: vj.block_sparse_attn(q, k, v, SIZES, idx, num)  # noqa: E731
    want = jax.jit(call)(q, k, v, idx, num)
    args = (jax.device_put(a, NamedSharding(MESH, P("d"))) for a in (q, k, v, idx, num))
    mapped = shard_map(call, mesh=MESH, in_specs=(P("d"),) * 5, out_specs=P("d"))
    same("block_sparse_attn, shard_map over the batch", jax.jit(mapped)(*args), want)


if __name__ == "__main__":
    print(f"JAX {jax.__version__} on {DEVICES}", flush=True)
    sharded_layer_and_gradients()
    shared_kv_gate()
    varying_result_claimed_replicated()
    block_sparse()
    print("OK")
