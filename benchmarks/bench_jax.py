"""The JAX adapter on GPU against the array-level API: eager calls and calls under ``jax.jit``.

For each shape: the full VSA forward, and the forward and backward (``jax.vjp`` of all four
inputs against ``video_sparse_attn(..., return_context=True)`` + ``video_sparse_attn_backward``
on CuPy arrays of the same memory), each three ways: the array-level call, the JAX adapter
called eagerly, and the same function under ``jax.jit`` (one XLA program whose vsa_nd calls are
foreign-function calls on XLA's stream).  XLA's stream is not CuPy's, so the times are host wall
time around the calls and a synchronisation: ``one call`` is the median over repetitions of one
call on an idle GPU, ``back to back`` the median over runs of the time per call of ``--calls``
calls in a row.  The three ways take turns, call by call and run by run.  Before a shape is
timed, the JAX ways' results (out; dq, dk, dv, dgate; each way's second call, as timed) are
compared with the array call's (``_common.agree``); the script stops if they differ by more than
1e-2.

    python benchmarks/bench_jax.py [--shapes small,main] [--reps 30] [--calls 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

from _common import agree, commit, emit

SHAPES = {
    # name: (seq_shape, heads, head_dim, topk)
    "small": ((4, 16, 16), 2, 64, 4),  # 1024 tokens: where a fixed per-call cost shows most
    "main": ((12, 64, 64), 12, 128, 77),  # VSA_SPEC.md section 6: 49152 tokens, 77 of 768 tiles
}


def _problem(name: str):
    import cupy
    import jax
    import jax.numpy as jnp
    import numpy as np

    import vsa_nd
    import vsa_nd.adapters.jax as vj

    seq_shape, heads, dim, topk = SHAPES[name]
    gpu = jax.devices("gpu")[0]
    plan = vj.tile_plan(seq_shape, (4, 4, 4), device=gpu)
    rng = np.random.default_rng(0)
    shape = (1, heads, plan.padded_len, dim)
    q, k, v, dout = (jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16, device=gpu) for _ in range(4))
    gate = jnp.asarray(rng.uniform(size=shape).astype(np.float32), jnp.bfloat16, device=gpu)
    sizes = plan.variable_block_sizes
    arrays = [vj._to_cupy(x) for x in (q, k, v, gate, dout)]
    array_sizes = plan.array_plan.variable_block_sizes

    def array_forward():
        return vsa_nd.video_sparse_attn(*arrays[:3], topk, array_sizes, gate=arrays[3])

    def array_step():
        _, ctx = vsa_nd.video_sparse_attn(*arrays[:3], topk, array_sizes, gate=arrays[3], return_context=True)
        return tuple(vsa_nd.video_sparse_attn_backward(arrays[4], ctx))  # dq, dk, dv, dgate

    attention = lambda q, k, v, g: vj.video_sparse_attn(q, k, v, topk, sizes, gate=g)  # noqa: E731
    step = lambda q, k, v, g: jax.vjp(attention, q, k, v, g)[1](dout)  # noqa: E731
    jit_forward, jit_step = jax.jit(attention), jax.jit(step)
    inputs = (q, k, v, gate)

    def sync_array(result):
        cupy.cuda.get_current_stream().synchronize()

    def sync_jax(result):
        jax.block_until_ready(result)

    calls = {
        "forward": [("array", array_forward, sync_array), ("jax eager", lambda: attention(*inputs), sync_jax),
                    ("jax.jit", lambda: jit_forward(*inputs), sync_jax)],
        "forward + backward": [("array", array_step, sync_array), ("jax eager", lambda: step(*inputs), sync_jax),
                               ("jax.jit", lambda: jit_step(*inputs), sync_jax)],
    }
    return calls


def _measure(ways, reps: int, calls: int, runs: int) -> list:
    """[(one call ms, back to back ms per call)] for each (label, fn, sync) in ``ways``."""

    def run(fn, sync, n):
        result = None
        start = time.perf_counter()
        for _ in range(n):
            result = fn()
        sync(result)
        return (time.perf_counter() - start) * 1e3 / n

    for _, fn, sync in ways:  # warm-up: kernels compile, XLA compiles, caches fill
        for _ in range(3):
            run(fn, sync, 1)
    single, batched = [[] for _ in ways], [[] for _ in ways]
    for _ in range(reps):
        for i, (_, fn, sync) in enumerate(ways):
            time.sleep(0.002)  # an idle GPU before each single call
            single[i].append(run(fn, sync, 1))
    for _ in range(runs):
        for i, (_, fn, sync) in enumerate(ways):
            batched[i].append(run(fn, sync, calls))
    return [(statistics.median(s), statistics.median(b)) for s, b in zip(single, batched)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="small,main")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import jax

    device = jax.devices("gpu")[0].device_kind
    lines = [f"JAX adapter against the array-level call, {device}, bf16, B=1, tiles (4, 4, 4), "
             f"{datetime.date.today()}, commit {commit()}; host wall time around calls and a synchronisation", "",
             "| shape | call | way | one call ms | back to back ms per call |", "| --- | --- | --- | ---: | ---: |"]
    checks = []
    for name in args.shapes.split(","):
        for call, ways in _problem(name).items():
            # Before any timing, every way must give the array call's results.  Each way is called
            # twice and its second result checked: later calls of a shape take the prepared
            # launches (and jax.jit its compiled program), which is what is timed.
            results = []
            for _, fn, sync in ways:
                fn()
                results.append(fn())
                sync(results[-1])
            for (label, _, _), result in zip(ways[1:], results[1:]):
                checks.append(agree(results[0], result, f"{name}: {call}, {label}"))
                print(checks[-1], flush=True)
            for (label, _, _), (one, b2b) in zip(ways, _measure(ways, args.reps, args.calls, args.runs)):
                lines.append(f"| {name}: {SHAPES[name]} | {call} | {label} | {one:.3f} | {b2b:.3f} |")
    emit("\n".join(lines + [""] + [f"- {line}" for line in checks]), args.out)


if __name__ == "__main__":
    main()
