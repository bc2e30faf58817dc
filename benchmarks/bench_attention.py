"""Time the block-sparse attention forward kernels alone (CuPy; no torch needed).

Random q, k, v and a random selection of ``topk`` distinct key tiles per query tile, every
tile full.  Times are medians of CUDA-event timings over many runs after a warm-up.  Before a
kernel is timed, its results are spot-checked against float64 rows (``_common.spot_check`` with
``coarse=False``: out and lse of 4 query tiles, and with ``--backward`` their dq and the dk and
dv of 2 key tiles); the script stops if one is past the bf16 bounds.  (Here every tile is full
and the scale is the one passed, so of the helper's checks only those of the values can fail.)

    python benchmarks/bench_attention.py [--tokens 49152] [--heads 12] [--head-dim 128]
                                         [--topk 77] [--kernels auto,mma]
"""

from __future__ import annotations

import argparse
import types

import numpy as np

from _common import check_spot, median_ms, spot_check


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=49152)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--topk", type=int, default=77)
    parser.add_argument("--kernels", default="auto,mma")
    parser.add_argument("--backward", action="store_true", help="also time the backward kernels")
    parser.add_argument("--selection", default="random", choices=["random", "same", "window"],
                        help="random tiles per row; the same tiles for every row; a window of neighbours")
    args = parser.parse_args()

    import cupy

    from vsa_nd._xp import BFLOAT16
    from vsa_nd.backends import cuda_attention

    volume, n = 64, args.tokens // 64
    shape = (1, args.heads, n * volume, args.head_dim)
    rng = cupy.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32).astype(BFLOAT16) for _ in range(3))
    if args.selection == "random":
        order = cupy.argsort(rng.random((1, args.heads, n, n)), axis=-1)
        q2k_idx = cupy.sort(order[..., : args.topk], axis=-1).astype(np.int32)
    else:
        first = cupy.zeros(n, np.int32) if args.selection == "same" else cupy.clip(cupy.arange(n) - args.topk // 2, 0, n - args.topk)
        q2k_idx = cupy.broadcast_to((first[:, None] + cupy.arange(args.topk)).astype(np.int32), (1, args.heads, n, args.topk))
        q2k_idx = cupy.ascontiguousarray(q2k_idx)
    q2k_num = cupy.full((1, args.heads, n), args.topk, np.int32)
    sizes = cupy.full(n, volume, np.int32)
    flops = 4.0 * args.heads * args.head_dim * n * volume * args.topk * volume
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    label = f"B=1 H={args.heads} D={args.head_dim} tokens={n * volume} top {args.topk}/{n} ({args.selection})"
    scale = args.head_dim**-0.5

    def check(what, out, lse, dout=None, grads=None):
        """Spot-check one call's results (stops the script past the bounds), and print the errors."""
        ctx = types.SimpleNamespace(q=q, k=k, v=v, out=out, lse=lse, q2k_idx=q2k_idx, q2k_num=q2k_num,
                                    q_block_sizes=sizes, kv_block_sizes=sizes, scale=scale, gate=None)
        errors = spot_check(ctx, dout, grads, scale=scale, coarse=False)
        print(check_spot(errors, BFLOAT16, f"{what} {label}", backward=grads is not None, coarse=False))

    for kernel in args.kernels.split(","):
        cuda_attention.FORWARD_KERNEL = kernel
        run = lambda: cuda_attention.block_sparse_fwd(q, k, v, q2k_idx, q2k_num, sizes, scale, None, None)  # noqa: E731
        check(f"forward kernel={kernel}", *run())
        ms = median_ms(run)
        print(f"{name}: forward kernel={kernel:5} {label}: {ms:.3f} ms, {flops / ms * 1e-9:.0f} TFLOP/s")
    if args.backward:
        out, lse = cuda_attention.block_sparse_fwd(q, k, v, q2k_idx, q2k_num, sizes, scale, None, None)
        dout = rng.standard_normal(shape, dtype=np.float32).astype(BFLOAT16)
        run = lambda: cuda_attention.block_sparse_bwd(  # noqa: E731
            dout, q, k, v, out, lse, q2k_idx, q2k_num, sizes, sizes, scale, None, None, None, None, None)
        dq, dk, dv = run()
        check("backward", out, lse, dout, types.SimpleNamespace(dq=dq, dk=dk, dv=dv))
        ms = median_ms(run, repeats=20)
        print(f"{name}: backward {label}: {ms:.3f} ms, {2.5 * flops / ms * 1e-9:.0f} TFLOP/s (2.5x forward FLOPs)")


if __name__ == "__main__":
    main()
