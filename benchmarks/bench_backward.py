"""Time vsa_nd's CUDA backward against torch SDPA's dense backward (needs CuPy, torch, triton).

For each shape: the block-sparse forward and backward alone (effective TFLOP/s counting 2.5x the
forward's FLOPs for the backward), the full VSA backward (coarse branch included), and a training
step (VSA forward + backward) against dense SDPA forward + backward (flash and cuDNN).  Medians
of CUDA-event timings (triton.testing.do_bench: calls queued without synchronising, each after a
256 MB write that flushes L2) on random data.  The block-sparse forward and backward are also
timed back to back: 20 calls in a row with no flush, per call, as in a training loop.  The
backward is timed once more without the dS workspace (``VSA_ND_DS_WORKSPACE_GIB=0``: the dQ pass
recomputes dS), and, where this card's default recomputes dS at the shape's head dim (DRAM below
the hand-over's threshold, as on an H100 at D = 64), once more with the hand-over forced.  Under
sustained load the H100 lowers its SM clock to stay within its power cap, which the longer runs
feel more (see BENCHMARKS.md): each row also gives the SM clock
that ``nvidia-smi`` saw while it was timed (blank without ``nvidia-smi``), and ``--rest``
seconds of idle GPU (default 3) come before each row, so that a row does not inherit the clock
its predecessor left (the card recovers its full clock within a second or two of idling).
``--out FILE`` also writes the table.  Before any timing, each shape's VSA forward and backward
are spot-checked against float64 rows (``_common.spot_check``: a sample of query and key tiles
of one head); the script stops on results past the tests' bounds, and lists the errors below
the table.

``--smooth SIGMA`` draws video-like q and k (see ``_common.smooth_inputs``), whose selections are local
instead of random; each row names the mean overlap of neighbouring query tiles' selections.

    python benchmarks/bench_backward.py [--shapes main,480p] [--rest 3] [--smooth 2] [--out table.md]
"""

from __future__ import annotations

import argparse
import datetime
import time

import numpy as np

from _common import (ClockSampler, check_spot, commit, emit, selection_overlap, smooth_inputs, spot_check,
                     time_back_to_back)
from bench_vsa import SHAPES, _median_ms


def bench_shape(name, seq_shape, heads, head_dim, sparsity, rows, checks, clocks, rest=0.0, smooth=None):
    import cupy
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import vsa_nd
    from vsa_nd._xp import BFLOAT16
    from vsa_nd.backends import cuda_attention

    plan = vsa_nd.tile_plan(seq_shape, device="cuda:0")
    n = plan.num_blocks
    topk = sparsity if isinstance(sparsity, int) else vsa_nd.topk_from_sparsity(sparsity, n)
    s, s_pad, volume = plan.seq_len, plan.padded_len, plan.tile_volume
    rng = cupy.random.default_rng(1)
    shape = (1, heads, s_pad, head_dim)
    q, k, v, dout = (rng.standard_normal(shape, dtype=np.float32).astype(BFLOAT16) for _ in range(4))
    if smooth is not None:  # video-like q and k, whose selections are local (see smooth_inputs)
        q, k = (x.astype(BFLOAT16) for x in smooth_inputs(rng, plan, heads, head_dim, smooth))
    sizes = plan.variable_block_sizes
    label = f"{name}: {seq_shape}, {heads}h, D={head_dim}, {s} tok, top {topk}/{n}"
    flops = 4.0 * heads * head_dim * s_pad * topk * volume

    last = time.perf_counter()  # end of the previous row: each row's clock samples are those since

    def settle():
        """Idle the GPU for ``rest`` seconds; the next row's clock samples start after it."""
        nonlocal last
        cupy.cuda.runtime.deviceSynchronize()
        time.sleep(rest)
        last = time.perf_counter()

    def add(what, ms, tflops=None, clock=None):
        nonlocal last
        now = time.perf_counter()
        clock, last = clocks.between(last, now) if clock is None else clock, now
        rows.append((label, what, ms, tflops, clock))
        print(f"{label:58} {what:48} {ms:9.3f} ms" + (f" {tflops:7.1f} TFLOP/s" if tflops else "")
              + (f"  SM {clock} MHz" if clock else ""), flush=True)

    out, ctx = vsa_nd.video_sparse_attn(q, k, v, topk, sizes, return_context=True)
    overlap = selection_overlap(ctx.q2k_idx, topk)
    label += f", {'random' if smooth is None else f'smooth q/k (sigma {smooth:g})'}: overlap {overlap:.2f}"
    # Before any timing: the forward and backward at this shape against float64 (stops if wrong).
    grads = vsa_nd.video_sparse_attn_backward(dout, ctx)
    checks.append(check_spot(spot_check(ctx, dout, grads), BFLOAT16, label, backward=True))
    print(checks[-1], flush=True)
    del grads
    fine_fwd = lambda: vsa_nd.block_sparse_attn(  # noqa: E731
        q, k, v, sizes, ctx.q2k_idx, ctx.q2k_num, check_indices=False)
    settle()
    ms_fwd = _median_ms(fine_fwd)
    add("block-sparse forward", ms_fwd, flops / ms_fwd * 1e-9)
    fine_bwd = lambda: cuda_attention.block_sparse_bwd(  # noqa: E731
        dout, q, k, v, ctx.out, ctx.lse, ctx.q2k_idx, ctx.q2k_num, ctx.q_block_sizes, ctx.kv_block_sizes, ctx.scale,
        ctx.coarse, None, None, None, None)
    settle()
    ms = _median_ms(fine_bwd)
    add(f"block-sparse backward ({ms / ms_fwd:.2f}x forward)", ms, 2.5 * flops / ms * 1e-9)
    def backward_with(setting, value):
        """fine_bwd's median time with one of the launcher's settings changed for the while."""
        saved = getattr(cuda_attention, setting)
        setattr(cuda_attention, setting, value)
        try:
            settle()
            return _median_ms(fine_bwd)
        finally:
            setattr(cuda_attention, setting, saved)

    # The same without the dS workspace (the dQ pass recomputes dS: seven products per pair, not five).
    ms_rc = backward_with("DS_WORKSPACE_BYTES", 0)
    add(f"block-sparse backward, dS recomputed ({ms_rc / ms_fwd:.2f}x forward)", ms_rc, 2.5 * flops / ms_rc * 1e-9)
    if head_dim not in cuda_attention.ds_head_dims(cupy.cuda.Device().id):
        # This card's default recomputes dS at this head dim (its DRAM below the hand-over's
        # threshold): the hand-over too, forced, so that one run shows whether the rule holds here.
        ms_ho = backward_with("_DS_FAST_DRAM", 0.0)
        add(f"block-sparse backward, dS handed over ({ms_ho / ms_fwd:.2f}x forward)", ms_ho, 2.5 * flops / ms_ho * 1e-9)
    # The other way of counting: calls in a row with no L2 flush between them, as in a training loop.
    settle()
    b2b_fwd, b2b_bwd = time_back_to_back((fine_fwd, fine_bwd), calls=20)
    clock = clocks.between(last, time.perf_counter())  # the two take turns: one window for both
    add("block-sparse forward, back to back", b2b_fwd, flops / b2b_fwd * 1e-9, clock)
    add(f"block-sparse backward, back to back ({b2b_bwd / b2b_fwd:.2f}x forward)", b2b_bwd,
        2.5 * flops / b2b_bwd * 1e-9, clock)
    settle()
    ms_bwd = _median_ms(lambda: vsa_nd.video_sparse_attn_backward(dout, ctx))
    add("full VSA backward", ms_bwd)

    def vsa_step():
        _, c = vsa_nd.video_sparse_attn(q, k, v, topk, sizes, return_context=True)
        vsa_nd.video_sparse_attn_backward(dout, c)

    settle()
    ms_vsa = _median_ms(vsa_step)
    add("VSA training step (forward + backward)", ms_vsa)

    tq, tk, tv, tdo = (torch.from_dlpack(t[:, :, :s].copy().view(cupy.uint16)).view(torch.bfloat16)
                       for t in (q, k, v, dout))
    tq, tk, tv = (t.detach().requires_grad_(True) for t in (tq, tk, tv))
    for backend, what in ((SDPBackend.FLASH_ATTENTION, "flash"), (SDPBackend.CUDNN_ATTENTION, "cuDNN")):
        def dense_step():
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(tq, tk, tv)
            torch.autograd.grad(o, (tq, tk, tv), tdo)

        try:
            settle()
            ms_d = _median_ms(dense_step)
            add(f"dense SDPA ({what}) forward + backward: VSA {ms_d / ms_vsa:.1f}x faster", ms_d)
        except RuntimeError as e:
            add(f"dense SDPA ({what}): unavailable ({str(e)[:40]})", 0.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="main,480p")
    parser.add_argument("--rest", type=float, default=3.0, help="seconds of idle GPU before each row")
    parser.add_argument("--smooth", type=float, default=None, metavar="SIGMA",
                        help="video-like q and k: a random field smoothed over SIGMA tokens, plus noise")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rows: list = []
    checks: list = []
    with ClockSampler() as clocks:
        for shape in args.shapes.split(","):
            bench_shape(shape, *SHAPES[shape], rows, checks, clocks, args.rest, args.smooth)
    lines = [f"### CUDA backward on {name}, {datetime.date.today()}, commit {commit()}", "",
             "| shape | what | time (ms) | TFLOP/s | SM clock while timed (MHz, median / min) |",
             "| --- | --- | ---: | ---: | --- |"]
    for label, what, ms, tflops, clock in rows:
        lines.append(f"| {label} | {what} | {ms:.3f} | {'' if tflops is None else f'{tflops:.0f}'} | {clock} |")
    lines += [""] + [f"- {line}" for line in checks]
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
