"""Time vsa_nd's CUDA forward against dense and block-sparse peers (needs CuPy, torch, triton).

For each shape of VSA_SPEC.md section 6: our block-sparse forward (fine stage on the
selection VSA makes), our full VSA forward, our tile/untile, torch SDPA dense attention
(flash and cuDNN backends) and FlexAttention block-sparse on the same selection.
Times are medians of CUDA-event timings (triton.testing.do_bench, L2 flushed between
runs) on random data; the block-sparse and the full forward take turns over five rounds
(medians of the rounds), so that their ratio does not follow the card's drift.  Before any
timing, each shape's VSA forward is spot-checked against float64 rows (``_common.spot_check``:
a sample of query tiles of one head) and the script stops on results past the tests' bounds.
Prints a markdown table (the spot checks' errors below it); ``--out FILE`` also writes it there.

    python benchmarks/bench_vsa.py [--shapes main,480p,480p-d64,720p] [--out table.md]
"""

from __future__ import annotations

import argparse
import datetime
import statistics

import numpy as np

from _common import check_spot, commit, emit, spot_check

SHAPES = {
    # name: (seq_shape, heads, head_dim, sparsity or exact topk)
    "main": ((12, 64, 64), 12, 128, 77),  # 49152 tokens, 77 of 768 tiles
    "480p": ((21, 30, 52), 12, 128, 0.875),  # Wan2.1 480p latent tokens
    "480p-d64": ((21, 30, 52), 24, 64, 0.875),
    "720p": ((21, 45, 80), 40, 128, 0.875),  # Wan2.1-14B 720p
}


class _PeakMemory:
    """Context manager: the high-water mark of live CuPy allocations made inside it."""

    def __enter__(self):
        import cupy

        outer = self

        class Hook(cupy.cuda.MemoryHook):
            name = "vsa_nd_peak"

            def malloc_postprocess(self, **kw):
                outer.live += kw["mem_size"]
                outer.bytes = max(outer.bytes, outer.live)

            def free_postprocess(self, **kw):
                outer.live -= kw["mem_size"]

        self.live = self.bytes = 0
        self._hook = Hook()
        self._hook.__enter__()
        return self

    def __exit__(self, *exc):
        self._hook.__exit__(*exc)


MIN_CALLS = 5  # timed calls behind every median, however long one call takes


def _median_ms(fn) -> float:
    """do_bench's median (L2 flushed before each call).  do_bench times max(1, rep / estimate)
    calls, one for a 765 ms dense call at rep = 300 ms: a call longer than rep / MIN_CALLS is timed
    again with a rep that makes at least MIN_CALLS calls."""
    from triton.testing import do_bench

    ms = float(do_bench(fn, warmup=50, rep=300, return_mode="median"))
    if ms * MIN_CALLS > 300:
        ms = float(do_bench(fn, warmup=0, rep=ms * (MIN_CALLS + 1), return_mode="median"))
    return ms


def _alternating_ms(fns, rounds: int = 5) -> list:
    """[median over ``rounds`` of :func:`_median_ms`] of each of ``fns``, the functions taking
    turns round by round: a ratio of two of them then does not depend on which ran while the
    card was warmer (one run timed the full forward 1.26x the fine one measured back to back,
    1.07x taking turns)."""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            times[i].append(_median_ms(fn))
    return [statistics.median(t) for t in times]


def bench_shape(name, seq_shape, heads, head_dim, sparsity, rows, checks):
    import cupy
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import vsa_nd
    from vsa_nd._xp import BFLOAT16

    plan = vsa_nd.tile_plan(seq_shape, device="cuda:0")
    n = plan.num_blocks
    topk = sparsity if isinstance(sparsity, int) else vsa_nd.topk_from_sparsity(sparsity, n)
    s, s_pad, v_ = plan.seq_len, plan.padded_len, plan.tile_volume
    rng = cupy.random.default_rng(0)

    def rand(shape):
        return rng.standard_normal(shape, dtype=np.float32).astype(BFLOAT16)

    x = [rand((1, s, heads, head_dim)) for _ in range(3)]
    q, k, v = (vsa_nd.tile(t, plan) for t in x)
    sizes = plan.variable_block_sizes
    _, ctx = vsa_nd.video_sparse_attn(q, k, v, topk, sizes, return_context=True)
    q2k_idx, q2k_num = ctx.q2k_idx, ctx.q2k_num
    label = f"{name}: {seq_shape}, {heads}h, D={head_dim}, {s} tok, top {topk}/{n}"
    checks.append(check_spot(spot_check(ctx), BFLOAT16, label))  # before any timing: stops on wrong results
    print(checks[-1], flush=True)
    del ctx

    flops = 4.0 * heads * head_dim * s_pad * topk * v_
    dense_flops = 4.0 * heads * head_dim * s * s

    def add(what, ms, tflops=None, tbs=None):
        rows.append((label, what, ms, tflops, tbs))
        print(f"{label:58} {what:40} {ms:9.3f} ms" + (f" {tflops:7.1f} TFLOP/s" if tflops else "")
              + (f" {tbs:6.2f} TB/s" if tbs else ""), flush=True)

    fine = lambda: vsa_nd.block_sparse_attn(q, k, v, sizes, q2k_idx, q2k_num, check_indices=False)  # noqa: E731
    full = lambda: vsa_nd.video_sparse_attn(q, k, v, topk, sizes)  # noqa: E731
    ms, ms_full = _alternating_ms([fine, full])
    add("vsa_nd block-sparse forward", ms, flops / ms * 1e-9)
    add(f"vsa_nd full VSA forward ({ms_full / ms:.2f}x fine)", ms_full)

    tile_bytes = (s + s_pad) * heads * head_dim * 2
    out_buf = cupy.empty_like(q)
    ms_tile = _median_ms(lambda: vsa_nd.tile(x[0], plan, out=out_buf))
    add("vsa_nd tile", ms_tile, None, tile_bytes / ms_tile * 1e-9)
    un_buf = cupy.empty_like(x[0])
    ms_un = _median_ms(lambda: vsa_nd.untile(q, plan, out=un_buf))
    add("vsa_nd untile", ms_un, None, (s * 2) * heads * head_dim * 2 / ms_un * 1e-9)

    # Peak device memory of a VSA forward beyond its inputs and output: the high-water mark
    # of bytes allocated (and not yet freed) through CuPy during the call, minus the output.
    with _PeakMemory() as peak:
        out = vsa_nd.video_sparse_attn(q, k, v, topk, sizes)
    add(f"peak extra memory of VSA forward: {(peak.bytes - out.nbytes) / 2**20:.1f} MiB "
        f"(one [B,H,S_pad,D] tensor: {q.nbytes / 2**20:.0f} MiB)", 0.0)
    del out

    tq, tk, tv = (torch.from_dlpack(t.view(cupy.uint16)).view(torch.bfloat16) for t in x)
    tq, tk, tv = (t.transpose(1, 2).contiguous() for t in (tq, tk, tv))  # [B, H, S, D]
    for backend, what in ((SDPBackend.FLASH_ATTENTION, "torch SDPA dense (flash)"),
                          (SDPBackend.CUDNN_ATTENTION, "torch SDPA dense (cuDNN)")):
        try:
            with sdpa_kernel(backend):
                ms_d = _median_ms(lambda: F.scaled_dot_product_attention(tq, tk, tv))
            add(what, ms_d, dense_flops / ms_d * 1e-9)
        except RuntimeError as e:
            add(f"{what}: unavailable ({str(e)[:40]})", 0.0)

    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        pq, pk, pv = (torch.from_dlpack(t.view(cupy.uint16)).view(torch.bfloat16) for t in (q, k, v))
        num = torch.from_dlpack(q2k_num)
        idx = torch.from_dlpack(q2k_idx)
        full_idx = torch.zeros((1, heads, n, n), dtype=torch.int32, device="cuda")
        full_idx[..., :topk] = idx
        mask = BlockMask.from_kv_blocks(num, full_idx, BLOCK_SIZE=v_, seq_lengths=(s_pad, s_pad))
        flex = torch.compile(flex_attention)
        # 64 x 64 kernel blocks to match the tiles (Flex's default query block is 128 rows).
        options = {"BLOCK_M": v_, "BLOCK_N": v_}
        ms_f = _median_ms(lambda: flex(pq, pk, pv, block_mask=mask, kernel_options=options))
        add("FlexAttention block-sparse (same selection)", ms_f, flops / ms_f * 1e-9)
    except Exception as e:  # noqa: BLE001 - report, keep benchmarking
        add(f"FlexAttention: unavailable ({type(e).__name__}: {str(e)[:60]})", 0.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rows: list = []
    checks: list = []
    for shape in args.shapes.split(","):
        bench_shape(shape, *SHAPES[shape], rows, checks)

    lines = [
        f"### CUDA forward on {name}, {datetime.date.today()}, commit {commit()}",
        "",
        "| shape | what | time (ms) | TFLOP/s | TB/s |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for label, what, ms, tflops, tbs in rows:
        lines.append(f"| {label} | {what} | {ms:.3f} | {'' if tflops is None else f'{tflops:.0f}'} | "
                     f"{'' if tbs is None else f'{tbs:.2f}'} |")
    lines += [""] + [f"- {line}" for line in checks]
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
