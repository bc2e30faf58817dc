"""CPU benchmark: the Numba block-sparse forward against dense attention with NumPy matmuls.

Both sides run float32 on every core (Numba's threads; NumPy's BLAS threads).  Times are
medians of ``--repeats`` consecutive runs after a warm-up call.  Effective GFLOP/s: block-sparse 4*B*H*D*Sq_pad*(topk*V) / time, dense
4*B*H*D*S^2 / time.  The selection is VSA's own (coarse stage on the same inputs); the
"full VSA" column times the whole operator (tile means, coarse attention, top-k, fine stage).

    python benchmarks/bench_cpu.py              # print the table, append it to BENCHMARKS.md
    python benchmarks/bench_cpu.py --no-record  # print only
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import time
from pathlib import Path

import numba
import numpy as np

import vsa_nd

ROOT = Path(__file__).resolve().parents[1]
HEADING = "CPU: Numba block-sparse forward vs NumPy dense attention"
TILE = (4, 4, 4)
# (B, H, D, seq_shape, topk): 4096 and 8192 tokens, 25% to 50% of the 64 or 128 tiles kept.
CASES = [
    (1, 2, 64, (8, 16, 32), 16),
    (1, 2, 64, (8, 16, 32), 32),
    (1, 4, 64, (8, 16, 32), 16),
    (1, 2, 128, (8, 16, 32), 16),
    (1, 2, 128, (8, 16, 32), 32),
    (1, 2, 64, (16, 16, 32), 32),
]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" + uncommitted changes" if git("status", "--porcelain") else "")


def dense_attention(q, k, v, scale):
    """Softmax(scale q k^T) v per head with BLAS matmuls; q, k, v [B, H, S, D] float32."""
    scores = (q * np.float32(scale)) @ np.swapaxes(k, -1, -2)
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    out = scores @ v
    out /= scores.sum(axis=-1, keepdims=True)
    return out


def median_times(functions, repeats: int) -> list:
    """Median wall time of each function over ``repeats`` consecutive runs after a warm-up call.

    Each function is timed in its own block, not interleaved with the others: OpenBLAS's
    threads spin for a while after a call and would steal the cores of the next one."""
    medians = []
    for f in functions:
        time.sleep(0.5)  # let the previous block's threads go idle
        f()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
        medians.append(float(np.median(times)))
    return medians


def run_case(batch, heads, dim, seq_shape, topk, repeats, rng):
    plan = vsa_nd.tile_plan(seq_shape, TILE)
    sizes, volume, s_pad = plan.variable_block_sizes, plan.tile_volume, plan.padded_len
    q, k, v = (rng.standard_normal((batch, heads, s_pad, dim), dtype=np.float32) for _ in range(3))
    scale = dim**-0.5
    _, context = vsa_nd.video_sparse_attn(q, k, v, topk, sizes, return_context=True)
    q2k_idx = context.q2k_idx
    dense_s, sparse_s, full_s = median_times(
        [
            lambda: dense_attention(q, k, v, scale),
            lambda: vsa_nd.block_sparse_attn(q, k, v, sizes, q2k_idx, scale=scale),
            lambda: vsa_nd.video_sparse_attn(q, k, v, topk, sizes, scale=scale),
        ],
        repeats,
    )
    seq_len = plan.seq_len
    dense_flops = 4 * batch * heads * dim * seq_len**2
    sparse_flops = 4 * batch * heads * dim * s_pad * topk * volume
    return dict(
        shape=f"B={batch} H={heads} D={dim} seq={'x'.join(map(str, seq_shape))} ({seq_len} tokens)",
        topk=f"{topk}/{plan.num_blocks}",
        dense_ms=dense_s * 1e3,
        dense_gflops=dense_flops / dense_s / 1e9,
        sparse_ms=sparse_s * 1e3,
        sparse_gflops=sparse_flops / sparse_s / 1e9,
        ratio=(sparse_flops / sparse_s) / (dense_flops / dense_s),
        full_ms=full_s * 1e3,
    )


def table(rows) -> str:
    lines = [
        "| shape (tile 4x4x4, float32) | topk | dense ms | dense GFLOP/s | block-sparse ms | block-sparse GFLOP/s "
        "| GFLOP/s ratio | full VSA fwd ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['topk']} | {r['dense_ms']:.1f} | {r['dense_gflops']:.1f} | {r['sparse_ms']:.1f} "
            f"| {r['sparse_gflops']:.1f} | {r['ratio']:.2f} | {r['full_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    rows = []
    for case in CASES:
        rows.append(run_case(*case, args.repeats, rng))
        print(f"{rows[-1]['shape']}, topk {rows[-1]['topk']}: ratio {rows[-1]['ratio']:.2f}", flush=True)

    today = datetime.date.today().isoformat()
    header = (
        f"{today}, {cpu_model()} ({os.cpu_count()} cores; {numba.get_num_threads()} Numba threads, "
        f"threading layer {numba.threading_layer()}), commit {commit()}, numba {numba.__version__}, "
        f"numpy {np.__version__}; medians of {args.repeats} runs.  Effective FLOP/s: block-sparse "
        f"4·B·H·D·Sq_pad·(topk·V)/time, dense 4·B·H·D·S²/time; dense = NumPy matmul + exp softmax."
    )
    section = f"## {HEADING} — {today}\n\n{header}\n\n{table(rows)}\n"
    print()
    print(section)
    if not args.no_record:
        path = ROOT / "BENCHMARKS.md"
        with path.open("a") as f:  # append only: others may be editing the rest of the file
            f.write("\n" + section)
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
