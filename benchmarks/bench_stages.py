"""Where the time of a VSA forward goes, stage by stage (CuPy; host and device time of each).

Uses cupyx.profiler.benchmark, which reports the host time of a call and the device time
between events around it: a stage whose host time exceeds its device time is bound by
Python/launch overhead, not by the GPU.

The coarse stage's six matrix products (forward: scores, output; backward: dP, dq, dk, dv) run
on vsa_nd's own fp32 GEMM (cuda_kernels/gemm_f32.cu, capturable in a CUDA graph); each is also
timed through CuPy's ``@`` (cuBLAS, exact fp32 unless CUPY_TF32 is set, plus the separate
scaling kernel: what the coarse stage ran before), and the GEMM once per output tile shape
(* marks the tile matmul picks).  These are device milliseconds per call of many calls
queued back to back (CUDA events around all of them), so launch and host overhead hide behind
the GPU as they do inside a VSA call.

    python benchmarks/bench_stages.py [--seq 12,64,64] [--heads 12] [--head-dim 128] [--topk 77]

The coarse shapes of VSA_SPEC.md: ``--seq 12,64,64 --heads 12`` (768 tiles, batch 12 of
768 x 768 x 128) and ``--seq 21,45,80 --heads 40`` (Wan 14B at 720p: 40 heads of 1440 tiles).
"""

from __future__ import annotations

import argparse
import datetime
import time

import numpy as np

from _common import commit


def _coarse_products(ops, xp, q_mean, k_mean, v_mean, probs, d_coarse, scale):
    """{name: (gemm_f32 call, cuBLAS call, (a, b, transpose_a, transpose_b, alpha))} of the six coarse products."""
    from vsa_nd.backends import cuda

    h_kv = k_mean.shape[1]
    q_g, probs_g, d_coarse_g = (ops._grouped(x, h_kv) for x in (q_mean, probs, d_coarse))
    d_scores = cuda.matmul(d_coarse_g, v_mean, transpose_b=True)
    t = lambda x: xp.swapaxes(x, -1, -2)  # noqa: E731
    products = {
        "coarse scores  C = s q_c k_c^T": ((q_g, k_mean, False, True, scale), lambda: (q_g * scale) @ t(k_mean)),
        "coarse output  o_c = P v_c": ((probs_g, v_mean, False, False, 1.0), lambda: probs_g @ v_mean),
        "bwd dP = dO_c v_c^T": ((d_coarse_g, v_mean, False, True, 1.0), lambda: d_coarse_g @ t(v_mean)),
        "bwd dq_c = s dC k_c": ((d_scores, k_mean, False, False, scale), lambda: (d_scores @ k_mean) * scale),
        "bwd dk_c = s dC^T q_c": ((d_scores, q_g, True, False, scale), lambda: (t(d_scores) @ q_g) * scale),
        "bwd dv_c = P^T dO_c": ((probs_g, d_coarse_g, True, False, 1.0), lambda: t(probs_g) @ d_coarse_g),
    }
    return {name: (lambda args=args: cuda.matmul(*args), cublas, args) for name, (args, cublas) in products.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", default="12,64,64")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--topk", type=int, default=77)
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()

    import cupy
    from cupyx.profiler import benchmark

    import vsa_nd
    from vsa_nd import ops
    from vsa_nd._xp import BFLOAT16
    from vsa_nd.backends import cuda
    from vsa_nd.kernels import GEMM_TILES

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
    d_coarse = rng.standard_normal(coarse.shape, dtype=np.float32)

    def timed(fn):
        """(median host ms, median device ms) of one call on an idle GPU (cupyx.profiler.benchmark)."""
        r = benchmark(fn, n_repeat=args.reps, n_warmup=5)
        return np.median(r.cpu_times) * 1e3, np.median(r.gpu_times) * 1e3

    def queued(fn):
        """(device ms per call, host ms per call) of ``reps`` calls queued back to back."""
        for _ in range(5):
            fn()
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        cupy.cuda.Device().synchronize()
        t0 = time.perf_counter()
        start.record()
        for _ in range(args.reps):
            fn()
        end.record()
        host = (time.perf_counter() - t0) / args.reps * 1e3
        end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end) / args.reps, host

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"{name}, {datetime.date.today()}, commit {commit()}: seq {plan.seq_shape}, {args.heads} heads, "
          f"D={args.head_dim}, top {args.topk}/{plan.num_blocks}")
    stages = {
        "tile means (3 launches)": lambda: [cuda.block_mean(x, sizes) for x in (q, k, v)],
        "tile means (block_means, 1 launch)": lambda: cuda.block_means((q, k, v), (sizes, sizes, sizes)),
        "coarse scores (gemm_f32)": lambda: ops._coarse_scores(q_mean, k_mean, scale),
        "top-k selection": lambda: cuda.select_topk(scores, args.topk),
        "softmax in place": lambda: cuda.softmax_rows_(probs),
        # What the forward runs since 976a3a3 in place of the two rows above; in place, so timed on a
        # copy of the scores, which the next row times alone (~16% of the pair at the main shape).
        "top-k + softmax (one launch) + a copy": lambda: cuda.select_topk_softmax_(scores.copy(), args.topk),
        "  that copy alone (subtract it above)": lambda: scores.copy(),
        "coarse output (gemm_f32)": lambda: ops._coarse_output(probs, v_mean),
        "block-sparse forward + combine": lambda: cuda.block_sparse_fwd(q, k, v, q2k_idx, q2k_num, sizes, scale, coarse,
                                                                        None, q_block_sizes=sizes),
        "video_sparse_attn (all, validated)": lambda: vsa_nd.video_sparse_attn(q, k, v, args.topk, sizes),
    }
    for label, fn in stages.items():
        host, device = timed(fn)
        print(f"  {label:38} host {host:8.3f} ms   device {device:8.3f} ms")

    print("\nCoarse products: device ms per call, queued back to back (host ms per call); gemm_f32 with the tile"
          " matmul picks, CuPy @ (cuBLAS), then gemm_f32 per output tile (* = picked)")
    print("| product | batch x m x n x k | gemm_f32 | TFLOP/s | cuBLAS | gemm / cuBLAS | "
          + " | ".join(f"{bm}x{bn}" for bm, bn in GEMM_TILES) + " |")
    print("|" + " --- |" * (6 + len(GEMM_TILES)))
    sm_count = cuda._sm_count(0)
    for label, (ours, cublas, (a, b, ta, tb, alpha)) in _coarse_products(ops, cupy, q_mean, k_mean, v_mean, probs,
                                                                         d_coarse, scale).items():
        out = ours()
        batches, (m, n) = out.size // (out.shape[-2] * out.shape[-1]), out.shape[-2:]
        kk = a.shape[-2] if ta else a.shape[-1]
        (ours_dev, ours_host), (cublas_dev, cublas_host) = queued(ours), queued(cublas)
        picked = cuda._gemm_tile(m, n, batches, sm_count)
        sweep = []
        for tile in GEMM_TILES:
            dev, _ = queued(lambda tile=tile: cuda._launch_gemm(a, b, out, ta, tb, alpha, tile))
            sweep.append(f"{dev:.4f}{' *' if tile == picked else ''}")
        tflops = 2.0 * batches * m * n * kk / (ours_dev * 1e-3) / 1e12
        print(f"| {label} | {batches} x {m} x {n} x {kk} | {ours_dev:.4f} ({ours_host:.3f}) | {tflops:.1f} | "
              f"{cublas_dev:.4f} ({cublas_host:.3f}) | {ours_dev / cublas_dev:.2f} | " + " | ".join(sweep) + " |",
              flush=True)


if __name__ == "__main__":
    main()
