"""Time tile, untile, the tile means of q, k and v, and top-k selection on the GPU (needs CuPy).

Shapes (B = 1, D = 128, bf16, tile 4x4x4): 49152 tokens (12, 64, 64) with 12 heads; Wan2.1
480p (21, 30, 52) with 12 heads; Wan2.1 720p (21, 45, 80) with 40 heads.  Each operation is
captured CALLS times in a CUDA graph, cycling over enough input buffers that they do not fit in
L2 together, and the graph is replayed; time per call = median over replays of the CUDA-event
time / CALLS, warm-up excluded.  Inputs are random.  TB/s counts the bytes each operation must
move: every input byte it needs read once plus every output byte written once (indices and
block sizes included).  A device-to-device copy of a tiled tensor gives the card's ceiling.
Before timing a shape, each operation's result is checked on the host (``check_results``): tile
(into a NaN-filled buffer) and untile bit for bit against NumPy's, the tile means within 1e-5 of
float64 (relative to the input's RMS), and the top-k lists equal to a stable sort's (ties to the
lower index); the script stops on a wrong one.
Prints a markdown table with the card, date and commit; ``--out FILE`` also writes it there.

    python benchmarks/bench_tile.py [--shapes main,480p,720p] [--out table.md]
"""

from __future__ import annotations

import argparse
import datetime

import numpy as np

from _common import commit, emit

SHAPES = {
    # name: (seq_shape, heads, sparsity or exact topk)
    "main": ((12, 64, 64), 12, 77),  # 49152 tokens, 77 of 768 tiles
    "480p": ((21, 30, 52), 12, 0.875),  # Wan2.1 480p latent tokens
    "720p": ((21, 45, 80), 40, 0.875),  # Wan2.1 720p
}
HEAD_DIM = 128
CALLS, WARMUP, REPLAYS = 20, 3, 15
ROTATE_BYTES = 256 * 2**20  # inputs cycled per graph: several times the 50 MB L2 of an H100


def _random_bf16(rng, shape):
    """Random finite bf16 values, drawn as bits (bit 14 cleared: exponent below the inf/NaN range)."""
    import cupy

    from vsa_nd._xp import BFLOAT16

    bits = rng.integers(0, 2**16, size=shape, dtype=cupy.int32).astype(cupy.uint16) & 0xBFFF
    return bits.view(BFLOAT16)


def _ms_per_call(fn) -> float:
    """Median replay time of a graph of CALLS calls ``fn(i)``, divided by CALLS."""
    import cupy

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        fn(0)  # compile and load outside the capture
        stream.synchronize()
        stream.begin_capture()
        keep = [fn(i) for i in range(CALLS)]  # outputs stay alive while the graph writes them
        graph = stream.end_capture()
        for _ in range(WARMUP):
            graph.launch(stream)
        times = []
        for _ in range(REPLAYS):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            graph.launch(stream)
            end.record(stream)
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end) / CALLS)
    del keep
    return float(np.median(times))


MEANS_BOUND = 1e-5  # largest error of a tile mean, relative to the input's RMS


def _bits(x) -> np.ndarray:
    """The bit patterns of an array's elements (NumPy), so that NaN and -0.0 compare as what they are."""
    x = np.ascontiguousarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def check_results(x, tiled, back, plan, means, scores, idx, num, topk: int) -> str:
    """A line saying what was checked; SystemExit on a wrong result.  NumPy arrays fetched from the
    GPU: ``x`` [B, S, H, D] an input, ``tiled`` tile(x) and ``back`` untile(tiled), each written
    into a NaN-filled buffer, ``means`` a list of (tiled tensor [B, H, S_pad, D], its tile means
    [B, H, N, D]) pairs (the tensors of one launch); ``scores`` [B, H, N_q, N_kv]
    and ``idx``, ``num`` select_topk_blocks(scores, topk)'s lists.  ``plan``: the tiling, built
    for the CPU (``vsa_nd.tile_plan(seq_shape)``), which gives NumPy's tile to compare with."""
    import vsa_nd

    problems = []
    want = vsa_nd.tile(x, plan)
    if tiled.shape != want.shape or not np.array_equal(_bits(tiled), _bits(want)):
        problems.append("tile differs from NumPy's")
    if back.shape != x.shape or not np.array_equal(_bits(back), _bits(x)):
        problems.append("untile(tile(x)) is not x")
    sizes = np.asarray(plan.variable_block_sizes)
    real = (np.arange(plan.tile_volume) < sizes[:, None])[..., None]  # [N, V, 1]
    errors = []
    for source, got in means:
        blocks = source.astype(np.float64).reshape(*source.shape[:2], len(sizes), plan.tile_volume, -1)
        real_values = np.where(real, blocks, 0)  # [B, H, N, V, D]
        want_means = real_values.sum(3) / sizes[:, None]
        if got.shape != want_means.shape:
            raise SystemExit(f"wrong results: tile means of shape {got.shape}, expected {want_means.shape}")
        count = blocks.shape[0] * blocks.shape[1] * blocks.shape[-1] * sizes.sum()  # B * H * D * S real values
        rms = float(np.sqrt(np.sum(np.square(real_values)) / count))
        errors.append(float(np.max(np.abs(got - want_means), initial=0.0)) / rms)
    means_error = float(np.max(errors))  # (NaN stays NaN, which max() would drop)
    if not means_error <= MEANS_BOUND:  # (NaN fails)
        problems.append(f"tile means off by {means_error:.1e} of the input's RMS (bound {MEANS_BOUND})")
    want_idx = np.sort(np.argsort(-scores, axis=-1, kind="stable")[..., :topk], axis=-1)
    if idx.shape != want_idx.shape or not np.array_equal(idx, want_idx) or not np.all(num == topk):
        problems.append(f"top-{topk} lists differ from a stable sort's")
    if problems:
        raise SystemExit("wrong results: " + "; ".join(problems))
    return f"checked: tile and untile bit for bit, tile means within {means_error:.1e} of the RMS, top-{topk} lists exact"


def _copies(make, nbytes: int) -> list:
    """Enough independent buffers from ``make()`` that together they exceed ROTATE_BYTES."""
    return [make() for _ in range(max(1, min(16, -(-ROTATE_BYTES // nbytes))))]


def bench_shape(name, seq_shape, heads, sparsity, rows, checks):
    import cupy

    import vsa_nd
    from vsa_nd.backends import cuda as cuda_backend

    plan = vsa_nd.tile_plan(seq_shape, device=f"cuda:{cupy.cuda.Device().id}")
    n, s, s_pad = plan.num_blocks, plan.seq_len, plan.padded_len
    topk = sparsity if isinstance(sparsity, int) else vsa_nd.topk_from_sparsity(sparsity, n)
    rng = cupy.random.default_rng(0)
    row_bytes = HEAD_DIM * 2
    label = f"{name}: {seq_shape}, {heads} heads, {s} tokens, {n} tiles"

    def add(what, ms, nbytes):
        rows.append((label, what, ms, nbytes / ms * 1e-9))
        print(f"{label:50} {what:34} {ms:8.4f} ms {nbytes / ms * 1e-9:6.2f} TB/s", flush=True)

    xs = _copies(lambda: _random_bf16(rng, (1, s, heads, HEAD_DIM)), s * heads * row_bytes)
    tiled = [vsa_nd.tile(x, plan) for x in xs]
    scores_bytes = heads * n * n * 4
    scores = _copies(lambda: rng.standard_normal((1, heads, n, n), dtype=np.float32), scores_bytes)

    qkv = tiled[:3] if len(tiled) >= 3 else [vsa_nd.tile(_random_bf16(rng, xs[0].shape), plan) for _ in range(3)]
    sizes = plan.variable_block_sizes

    def poisoned(like):  # NaN everywhere: every slot must be written
        return cupy.full(like.shape, np.nan, np.float32).astype(like.dtype)

    first = vsa_nd.tile(xs[0], plan, out=poisoned(tiled[0]))  # each call as it is timed below
    back = vsa_nd.untile(first, plan, out=poisoned(xs[0]))
    means = cuda_backend.block_means(qkv, [sizes] * 3)
    idx, num = vsa_nd.select_topk_blocks(scores[0], topk)
    line = check_results(xs[0].get(), first.get(), back.get(), vsa_nd.tile_plan(seq_shape),
                         [(x.get(), m.get()) for x, m in zip(qkv, means)], scores[0].get(), idx.get(), num.get(), topk)
    checks.append(f"{label}: {line}")
    print(checks[-1], flush=True)

    src, dst = tiled[0], cupy.empty_like(tiled[0])
    add("device-to-device copy (ceiling)",
        _ms_per_call(lambda i: dst.data.copy_from_device_async(src.data, src.nbytes)), 2 * src.nbytes)

    out = cupy.empty_like(tiled[0])
    add("tile", _ms_per_call(lambda i: vsa_nd.tile(xs[i % len(xs)], plan, out=out)),
        (s + s_pad) * heads * row_bytes + s_pad * 4)
    back = cupy.empty_like(xs[0])
    add("untile", _ms_per_call(lambda i: vsa_nd.untile(tiled[i % len(tiled)], plan, out=back)),
        2 * s * heads * row_bytes + s * 4)

    add("block_means of q, k, v (one launch)", _ms_per_call(lambda i: cuda_backend.block_means(qkv, [sizes] * 3)),
        3 * (s * heads * row_bytes + heads * n * HEAD_DIM * 4) + n * 4)

    add(f"select_topk (top {topk} of {n})",
        _ms_per_call(lambda i: vsa_nd.select_topk_blocks(scores[i % len(scores)], topk)),
        scores_bytes + heads * n * (topk + 1) * 4)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    rows: list = []
    checks: list = []
    for shape in args.shapes.split(","):
        bench_shape(shape, *SHAPES[shape], rows, checks)
        cupy.get_default_memory_pool().free_all_blocks()

    lines = [
        f"### tile / untile / tile means / top-k on {name}, {datetime.date.today()}, commit {commit()}",
        "",
        f"B = 1, D = {HEAD_DIM}, bf16, tile 4x4x4; CUDA-graph replays of {CALLS} calls, median of {REPLAYS}.",
        "",
        "| shape | what | time (ms) | TB/s (read + written) |",
        "| --- | --- | ---: | ---: |",
    ]
    lines += [f"| {label} | {what} | {ms:.4f} | {tbs:.2f} |" for label, what, ms, tbs in rows]
    lines += [""] + [f"- {line}" for line in checks]
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
