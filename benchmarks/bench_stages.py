"""Where the time of a VSA forward goes, stage by stage (CuPy; host and device time of each).

Uses cupyx.profiler.benchmark, which reports the host time of a call and the device time
between events around it: a stage whose host time exceeds its device time is bound by
Python/launch overhead, not by the GPU.

    python benchmarks/bench_stages.py [--seq 12,64,64] [--heads 12] [--head-dim 128] [--topk 77]
"""

from __future__ import annotations

import argparse

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", default="12,64,64")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--topk", type=int, default=77)
    args = parser.parse_args()

    import cupy
    from cupyx.profiler import benchmark

    import vsa_nd
    from vsa_nd import ops
    from vsa_nd._xp import BFLOAT16
    from vsa_nd.backends import cuda

    plan = vsa_nd.tile_plan(tuple(int(s) for s in args.seq.split(",")), device="cuda:0")
    shape = (1, args.heads, plan.padded_len, args.head_dim)
    rng = cupy.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32).astype(BFLOAT16) for _ in range(3))
    sizes, scale = plan.variable_block_sizes, args.head_dim**-0.5
    q_mean, k_mean, v_mean = (cuda.block_mean(x, sizes) for x in (q, k, v))
    scores = ops._coarse_scores(q_mean, k_mean, scale)
    q2k_idx, q2k_num = cuda.select_topk(scores, args.topk)
    probs = cuda.softmax_rows_(scores.copy())
    coarse = ops._coarse_output(probs, v_mean)

    stages = {
        "tile means (3 launches)": lambda: [cuda.block_mean(x, sizes) for x in (q, k, v)],
        "tile means (block_means, 1 launch)": lambda: cuda.block_means((q, k, v), (sizes, sizes, sizes)),
        "coarse scores (cuBLAS)": lambda: ops._coarse_scores(q_mean, k_mean, scale),
        "top-k selection": lambda: cuda.select_topk(scores, args.topk),
        "softmax in place": lambda: cuda.softmax_rows_(probs),
        "coarse output (cuBLAS)": lambda: ops._coarse_output(probs, v_mean),
        "block-sparse forward + combine": lambda: cuda.block_sparse_fwd(q, k, v, q2k_idx, q2k_num, sizes, scale, coarse,
                                                                        None),
        "video_sparse_attn (all, validated)": lambda: vsa_nd.video_sparse_attn(q, k, v, args.topk, sizes),
    }
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"{name}: seq {plan.seq_shape}, {args.heads} heads, D={args.head_dim}, top {args.topk}/{plan.num_blocks}")
    for label, fn in stages.items():
        r = benchmark(fn, n_repeat=50, n_warmup=5)
        print(f"  {label:38} host {np.median(r.cpu_times) * 1e3:8.3f} ms   device {np.median(r.gpu_times) * 1e3:8.3f} ms")


if __name__ == "__main__":
    main()
