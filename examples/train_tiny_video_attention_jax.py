"""Train a one-layer video attention model with VSA in JAX, data-parallel over CPU devices.

The JAX twin of train_tiny_video_attention.py: a student layer (projections around
tile -> :func:`vsa_nd.adapters.jax.video_sparse_attn` -> untile, with a learned gate and
positional embedding) learns to reproduce a fixed teacher, the same architecture with dense
softmax attention and random weights, on random videos of 4 x 8 x 8 latent tokens in 2 x 4 x 4
tiles (8 tiles, the best 4 key tiles kept per query tile).

Each step runs under ``jax.jit`` with ``shard_map`` over ``--devices`` XLA CPU devices: every
device takes its share of the batch, and the gradients of the replicated weights are summed
over the devices by JAX's AD (vsa_nd's results are typed as varying over the batch's mesh axis,
like its inputs).  Adam, written out.  Prints the loss curve and exits non-zero if the loss did
not fall.

    python examples/train_tiny_video_attention_jax.py [--steps 300] [--devices 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

SEQ_SHAPE, TILE_SHAPE = (4, 8, 8), (2, 4, 4)
CHANNELS, HEADS = 32, 2  # head dim 16


def positive(text: str) -> int:
    """An argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive, default=300)
    parser.add_argument("--batch", type=positive, default=4, help="per device")
    parser.add_argument("--devices", type=positive, default=2, help="XLA CPU devices to split the batch over")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # before JAX starts: the CPU devices, and the CPU only
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import vsa_nd.adapters.jax as vsa  # noqa: E402

try:
    from jax import shard_map
except ImportError:  # JAX before 0.7
    from jax.experimental.shard_map import shard_map


def init(key, seq_len: int) -> dict:
    """The layer's weights: positions [S, C], qkv [C, 3C], gate and out [C, C], with biases."""
    keys = jax.random.split(key, 4)
    dense = lambda k, n: jax.random.normal(k, (CHANNELS, n)) / np.sqrt(CHANNELS)  # noqa: E731
    return {"position": 0.5 * jax.random.normal(keys[0], (seq_len, CHANNELS)),
            "qkv": dense(keys[1], 3 * CHANNELS), "qkv_bias": jnp.zeros(3 * CHANNELS),
            "gate": dense(keys[2], CHANNELS), "gate_bias": jnp.zeros(CHANNELS),
            "out": dense(keys[3], CHANNELS), "out_bias": jnp.zeros(CHANNELS)}


def layer(params: dict, x, meta, sparse: bool):
    """x [B, S, C] -> [B, S, C]: one attention layer, VSA (sparse) or dense softmax."""
    b, s, c = x.shape
    h = x + params["position"]
    q, k, v = jnp.moveaxis((h @ params["qkv"] + params["qkv_bias"]).reshape(b, s, 3, HEADS, c // HEADS), 2, 0)
    if sparse:
        gate = jax.nn.sigmoid(h @ params["gate"] + params["gate_bias"]).reshape(q.shape)
        qt, kt, vt, gt = (vsa.tile(t, meta.plan) for t in (q, k, v, gate))  # [B, H, S_pad, D]
        y = vsa.untile(vsa.video_sparse_attn(qt, kt, vt, meta.topk, meta.plan.variable_block_sizes, gate=gt),
                       meta.plan)
    else:
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(c // HEADS)
        y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    return y.reshape(b, s, c) @ params["out"] + params["out_bias"]


def main(args) -> int:
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("batch",))
    meta = vsa.build_metadata(SEQ_SHAPE, (1, 1, 1), sparsity=0.5, tile_shape=TILE_SHAPE)
    seq_len = meta.plan.seq_len
    key_teacher, key_student, key_data = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    teacher, student = init(key_teacher, seq_len), init(key_student, seq_len)
    spread = layer(teacher, jax.random.normal(key_data, (16, seq_len, CHANNELS)), meta, sparse=False).std()
    teacher["out"], teacher["out_bias"] = teacher["out"] / spread, teacher["out_bias"] / spread  # unit-variance targets

    def local_loss(params, x):  # this device's share of the batch; the mean over all devices
        error = layer(params, x, meta, sparse=True) - layer(teacher, x, meta, sparse=False)
        return jax.lax.pmean(jnp.mean(error ** 2), "batch")

    loss_and_grad = jax.value_and_grad(shard_map(local_loss, mesh=mesh, in_specs=(P(), P("batch")), out_specs=P()))

    @jax.jit
    def step(params, moments, t, x):
        loss, grads = loss_and_grad(params, x)
        first, second = moments
        first = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, first, grads)
        second = jax.tree.map(lambda m, g: 0.999 * m + 0.001 * g * g, second, grads)
        correction = jnp.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        params = jax.tree.map(lambda p, m, v: p - args.lr * correction * m / (jnp.sqrt(v) + 1e-8), params, first, second)
        return params, (first, second), loss

    moments = (jax.tree.map(jnp.zeros_like, student), jax.tree.map(jnp.zeros_like, student))
    batch = args.batch * len(devices)
    print(f"video {SEQ_SHAPE} in tiles {TILE_SHAPE}: {meta.plan.num_blocks} tiles, top-{meta.topk} per query tile; "
          f"{HEADS} heads of dim {CHANNELS // HEADS}; {args.steps} steps of batch {batch} over {len(devices)} "
          f"{devices[0].platform} device{'s' if len(devices) > 1 else ''}")

    losses, start = [], time.perf_counter()
    for t in range(1, args.steps + 1):
        key_data, key = jax.random.split(key_data)
        student, moments, loss = step(student, moments, t, jax.random.normal(key, (batch, seq_len, CHANNELS)))
        losses.append(float(loss))
        if t % 50 == 1 or t == args.steps:
            print(f"step {t - 1:4d}  loss {losses[-1]:.4f}")

    window = max(1, min(20, len(losses) // 5))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"mean loss of the first {window} steps {first:.4f}, of the last {window} {last:.4f} "
          f"({last / first:.1%} of the start) in {time.perf_counter() - start:.1f} s")
    return 0 if last < 0.5 * first else 1


if __name__ == "__main__":
    sys.exit(main(ARGS))
