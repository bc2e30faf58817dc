"""Errors of the CUDA VSA forward and backward against the float64 NumPy reference (needs CuPy).

For fixed problem families (3-D tiles 4x4x4 with partial tiles, cross attention, GQA, gate on and
off, head dims 64 and 128, float16 and bfloat16) and several seeds: the norm-relative error
||x - ref|| / ||ref|| over real tokens of out, dq, dk, dv and dgate.  The backward reference is
given the kernels' own rounded ``out`` (see reference.video_sparse_attn_backward), as the tests
do; the forward reference is exact.  Prints the largest error per (dtype, quantity) and the
tests' tolerances (bf16 3e-2, fp16 1e-2).

    python benchmarks/bench_accuracy.py [--seeds 5]
"""

from __future__ import annotations

import argparse
import datetime

import numpy as np

from _common import commit

FAMILIES = [
    # (q seq, kv seq, batch, heads, kv heads, head dim, topk, gated)
    ((8, 8, 8), (8, 8, 8), 1, 4, 4, 128, 3, True),
    ((5, 6, 7), (5, 6, 7), 2, 4, 2, 64, 4, False),
    ((5, 6, 7), (3, 9, 6), 1, 4, 2, 128, 2, True),
    ((12, 16, 16), (12, 16, 16), 1, 2, 1, 128, 9, True),
]


def _err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    import cupy

    import vsa_nd
    from vsa_nd import reference
    from vsa_nd._xp import BFLOAT16

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"# CUDA VSA errors against the float64 reference — {name}, {datetime.date.today()}, commit {commit()}")
    worst = {}
    for dtype in (np.dtype(np.float16), BFLOAT16):
        for q_seq, kv_seq, b, h, hk, d, topk, gated in FAMILIES:
            q_plan, kv_plan = vsa_nd.tile_plan(q_seq, (4, 4, 4)), vsa_nd.tile_plan(kv_seq, (4, 4, 4))
            q_sizes, kv_sizes = q_plan.variable_block_sizes, kv_plan.variable_block_sizes
            q_real = reference.valid_slots(q_sizes, 64)
            kv_real = reference.valid_slots(kv_sizes, 64)
            for seed in range(args.seeds):
                rng = np.random.default_rng(seed)
                q = rng.standard_normal((b, h, q_plan.padded_len, d)).astype(dtype)
                q[:, :, ~q_real] = 0
                k, v = (rng.standard_normal((b, hk, kv_plan.padded_len, d)).astype(dtype) for _ in range(2))
                gate = rng.standard_normal(q.shape).astype(dtype) if gated else None
                dout = rng.standard_normal(q.shape).astype(dtype)
                gpu = lambda x: None if x is None else cupy.asarray(x)  # noqa: E731
                out, ctx = vsa_nd.video_sparse_attn(gpu(q), gpu(k), gpu(v), topk, gpu(q_sizes), gpu(kv_sizes),
                                                    gate=gpu(gate), return_context=True)
                grads = vsa_nd.video_sparse_attn_backward(gpu(dout), ctx)
                idx, num = cupy.asnumpy(ctx.q2k_idx), cupy.asnumpy(ctx.q2k_num)
                ref_out = reference.video_sparse_attn(q, k, v, q_sizes, kv_sizes, topk, 64, gate=gate,
                                                      q2k_idx=idx, q2k_num=num).out
                ref = reference.video_sparse_attn_backward(dout, q, k, v, q_sizes, kv_sizes, idx, num, 64, gate=gate,
                                                           out=cupy.asnumpy(out))
                got = dict(out=(out, ref_out, q_real), dq=(grads.dq, ref.dq, q_real), dk=(grads.dk, ref.dk, kv_real),
                           dv=(grads.dv, ref.dv, kv_real))
                if gated:
                    got["dgate"] = (grads.dgate, ref.dgate, q_real)
                for what, (x, r, real) in got.items():
                    e = _err(cupy.asnumpy(x)[:, :, real], np.asarray(r)[:, :, real])
                    key = (dtype.name, what)
                    worst[key] = max(worst.get(key, 0.0), e)
    print("| dtype | out | dq | dk | dv | dgate | problems |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for dtype in ("float16", "bfloat16"):
        cells = " | ".join(f"{worst.get((dtype, w), float('nan')):.2e}" for w in ("out", "dq", "dk", "dv", "dgate"))
        print(f"| {dtype} | {cells} | {len(FAMILIES) * args.seeds} |")


if __name__ == "__main__":
    main()
