"""CPU benchmark: the Numba block-sparse forward against dense attention with NumPy matmuls.

Both sides run float32 on every core (Numba's threads; NumPy's BLAS threads).  Times are
medians of ``--repeats`` consecutive runs after a warm-up call, taken while no other process
loads the machine (see median_time).  Effective GFLOP/s: block-sparse
4*B*H*D*Sq_pad*(topk*V) / time, dense 4*B*H*D*S^2 / time.  The selection is VSA's own (coarse
stage on the same inputs); the "full VSA" columns time the whole operator (tile means,
coarse attention, top-k, fine stage) and its backward (``video_sparse_attn_backward`` from the
forward's context, random dout: dq, dk, dv through both branches).

    python benchmarks/bench_cpu.py              # print the table, append it to BENCHMARKS.md
    python benchmarks/bench_cpu.py --no-record  # print only
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from pathlib import Path

import numba
import numpy as np

import vsa_nd

from _common import commit

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
    """The model name of /proc/cpuinfo, with its family and model numbers."""
    info = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return f"{info.get('model name', 'unknown CPU')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"


def dense_attention(q, k, v, scale):
    """Softmax(scale q k^T) v per head with BLAS matmuls; q, k, v [B, H, S, D] float32."""
    scores = (q * np.float32(scale)) @ np.swapaxes(k, -1, -2)
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    out = scores @ v
    out /= scores.sum(axis=-1, keepdims=True)
    return out


def cpu_seconds() -> tuple:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process) so far."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def wait_for_quiet(timeout: float) -> None:
    """Sleep until other processes leave the machine idle for a second (at most ``timeout`` s).

    The pause also lets the previous block's threads go idle: OpenBLAS's threads spin for a
    while after a call and would steal the cores of the next one.
    """
    deadline = time.monotonic() + timeout
    while True:
        machine, own = cpu_seconds()
        time.sleep(1.0)
        machine_end, own_end = cpu_seconds()
        if (machine_end - machine) - (own_end - own) < 0.05 or time.monotonic() > deadline:
            return


def median_time(f, repeats: int, attempts: int = 5, timeout: float = 120.0) -> tuple:
    """(median wall time of ``repeats`` consecutive runs of f after a warm-up call, quiet).

    Functions are timed in blocks, never interleaved.  A block during which other processes
    kept more than 10% of the cores busy is run again, up to ``attempts`` times; ``quiet``
    says whether the last one was clean.
    """
    for _ in range(attempts):
        wait_for_quiet(timeout)
        f()
        machine, own = cpu_seconds()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
        machine_end, own_end = cpu_seconds()
        quiet = (machine_end - machine) - (own_end - own) <= 0.1 * sum(times) * os.cpu_count()
        if quiet:
            break
    return float(np.median(times)), quiet


def run_case(batch, heads, dim, seq_shape, topk, repeats, rng):
    plan = vsa_nd.tile_plan(seq_shape, TILE)
    sizes, volume, s_pad = plan.variable_block_sizes, plan.tile_volume, plan.padded_len
    q, k, v = (rng.standard_normal((batch, heads, s_pad, dim), dtype=np.float32) for _ in range(3))
    scale = dim**-0.5
    out, context = vsa_nd.video_sparse_attn(q, k, v, topk, sizes, scale=scale, return_context=True)
    q2k_idx = context.q2k_idx
    dout = rng.standard_normal(out.shape, dtype=np.float32)
    (dense_s, dense_quiet), (sparse_s, sparse_quiet), (full_s, full_quiet), (bwd_s, bwd_quiet) = (
        median_time(f, repeats)
        for f in (
            lambda: dense_attention(q, k, v, scale),
            lambda: vsa_nd.block_sparse_attn(q, k, v, sizes, q2k_idx, scale=scale),
            lambda: vsa_nd.video_sparse_attn(q, k, v, topk, sizes, scale=scale),
            lambda: vsa_nd.video_sparse_attn_backward(dout, context),
        )
    )
    seq_len = plan.seq_len
    dense_flops = 4 * batch * heads * dim * s_pad**2  # the dense baseline runs on the padded sequence
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
        bwd_ms=bwd_s * 1e3,
        quiet=dense_quiet and sparse_quiet and full_quiet and bwd_quiet,
    )


def table(rows) -> str:
    lines = [
        "| shape (tile 4x4x4, float32) | topk | dense ms | dense GFLOP/s | block-sparse ms | block-sparse GFLOP/s "
        "| GFLOP/s ratio | full VSA fwd ms | full VSA bwd ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        mark = "" if r["quiet"] else " (busy machine)"
        lines.append(
            f"| {r['shape']}{mark} | {r['topk']} | {r['dense_ms']:.1f} | {r['dense_gflops']:.1f} | {r['sparse_ms']:.1f} "
            f"| {r['sparse_gflops']:.1f} | {r['ratio']:.2f} | {r['full_ms']:.1f} | {r['bwd_ms']:.1f} |"
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
        f"{today}; {cpu_model()}, {os.cpu_count()} cores, {numba.get_num_threads()} Numba threads "
        f"({numba.threading_layer()}); commit {commit()}; numba {numba.__version__}, numpy {np.__version__}.\n"
        f"Medians of {args.repeats} runs, each block re-run while other processes used more than 10% of the "
        "cores.  Effective FLOP/s: block-sparse 4·B·H·D·Sq_pad·(topk·V)/time (`vsa_nd.block_sparse_attn`), "
        "dense 4·B·H·D·S²/time (NumPy matmul, exp, matmul).  Full VSA fwd = `vsa_nd.video_sparse_attn` "
        "(tile means, coarse attention with the Numba backend's own matmul kernel, top-k, fine stage); full VSA "
        "bwd = `vsa_nd.video_sparse_attn_backward` from its context (dq, dk, dv through both branches).  "
        "The dense baseline's NumPy matmuls leave OpenBLAS threads spinning; a second's pause before each "
        "block lets them go idle."
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
