"""Helpers shared by the benchmark scripts: which commit a figure belongs to, where a table goes,
CUDA-event time of single calls (CuPy) and of calls made back to back (torch), and the SM clock."""

from __future__ import annotations

import os
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def commit() -> str:
    """$VSA_COMMIT where it is set, else the short hash of HEAD (with "+ uncommitted changes" if the
    tree differs).  Set it on the GPU machine: the copy of the tree there may carry git metadata
    older than the tree itself (on 2026-11-28 it named the session's first commit all day)."""
    if os.environ.get("VSA_COMMIT"):
        return os.environ["VSA_COMMIT"]

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown"
    return head + (" + uncommitted changes" if git("status", "--porcelain") else "")


def emit(table: str, out: str | None) -> None:
    """Print a markdown table and, with ``out``, write it to that file too."""
    print(table)
    if out:
        Path(out).write_text(table + "\n")


def median_ms(fn, repeats: int = 50, warmup: int = 5) -> float:
    """Median CUDA-event ms (CuPy events on the current stream) of one call of ``fn``, after ``warmup`` calls."""
    import cupy

    for _ in range(warmup):
        fn()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def time_back_to_back(fns, calls: int, runs: int = 9) -> list:
    """[median over ``runs`` of the CUDA-event ms per call of ``calls`` calls made in a row] for each
    of ``fns``, the functions taking turns run by run."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    per_call = [[] for _ in fns]
    for _ in range(runs):
        for i, fn in enumerate(fns):
            torch.cuda.synchronize()
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            per_call[i].append(start.elapsed_time(end) / calls)
    return [statistics.median(p) for p in per_call]


class ClockSampler:
    """The SM clock of one GPU, sampled by ``nvidia-smi`` every ``interval_ms`` on a background
    thread while the context is open.  Under sustained load an H100 lowers its clock to stay within
    its power cap, so a time means little without the clock it ran at.  :meth:`between` summarises
    the samples of a time window (``time.perf_counter`` values) as "median / min MHz", or "" when
    there are none (no ``nvidia-smi``, or a window shorter than the interval)."""

    def __init__(self, device: int = 0, interval_ms: int = 50):
        self._command = ["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader,nounits", "-i", str(device),
                         "-lms", str(interval_ms)]
        self._samples: list = []  # (perf_counter time, MHz)
        self._process = None

    def __enter__(self):
        import threading
        import time

        try:
            self._process = subprocess.Popen(self._command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                             text=True)
        except OSError:
            return self

        def read(stream):
            for line in stream:
                try:
                    self._samples.append((time.perf_counter(), float(line.strip())))
                except ValueError:
                    pass

        threading.Thread(target=read, args=(self._process.stdout,), daemon=True).start()
        return self

    def __exit__(self, *exc):
        if self._process is not None:
            self._process.kill()
            self._process.wait()

    def between(self, start: float, end: float) -> str:
        mhz = [m for t, m in list(self._samples) if start <= t <= end]
        return f"{statistics.median(mhz):.0f} / {min(mhz):.0f}" if mhz else ""


def smooth_inputs(rng, plan, heads: int, head_dim: int, sigma: float, noise: float = 1.0):
    """Video-like q and k for one batch, tiled ([1, heads, S_pad, head_dim] float32, CuPy arrays for
    a CuPy ``rng``, NumPy for a NumPy one): per head one random field over the token grid, smoothed
    by a Gaussian of ``sigma`` tokens along every axis (unit variance), plus independent white noise
    of std ``noise`` for each of q and k.  Nearby tiles then have similar means, so each query tile
    picks key tiles mostly near it and neighbouring query tiles pick many of the same ones, as
    attention in video transformers tends to; ``sigma`` = 0 leaves the field white, which gives
    random selections.  Pad slots are 0."""
    import numpy

    import vsa_nd

    xp = numpy
    if type(rng).__module__.startswith("cupy"):
        import cupy as xp
    grid = tuple(plan.seq_shape)
    freqs = [xp.fft.fftfreq(n) for n in grid[:-1]] + [xp.fft.rfftfreq(grid[-1])]
    gain = xp.ones((1,) * len(grid))
    for axis, f in enumerate(freqs):  # the Gaussian's transfer function, one axis at a time
        shape = [1] * len(grid)
        shape[axis] = -1
        gain = gain * xp.exp(-2.0 * (numpy.pi * f * sigma) ** 2).reshape(shape)
    axes = tuple(range(len(grid)))
    q = xp.empty((1, plan.seq_len, heads, head_dim), dtype=xp.float32)
    k = xp.empty_like(q)
    for h in range(heads):
        white = rng.standard_normal(grid + (head_dim,), dtype=xp.float32)
        field = xp.fft.irfftn(xp.fft.rfftn(white, axes=axes) * gain[..., None], s=grid, axes=axes)
        field = (field / field.std()).reshape(plan.seq_len, head_dim)
        q[0, :, h] = field + noise * rng.standard_normal(field.shape, dtype=xp.float32)
        k[0, :, h] = field + noise * rng.standard_normal(field.shape, dtype=xp.float32)
    return vsa_nd.tile(q, plan), vsa_nd.tile(k, plan)


def selection_overlap(q2k_idx, topk: int) -> float:
    """Mean fraction of a query tile's selected key tiles that the next query tile (in tile order,
    same batch and head) selects too: ~topk / tiles for random selections, near 1 for local ones."""
    import numpy as np

    idx = np.asarray(q2k_idx.get() if hasattr(q2k_idx, "get") else q2k_idx)[..., :topk]
    n = idx.shape[-2]
    flat = idx.reshape(-1, n, topk)
    shared = 0
    for head in flat:
        member = np.zeros((n, int(head.max()) + 1), dtype=bool)
        np.put_along_axis(member, head, True, axis=1)
        shared += (member[:-1] & member[1:]).sum()
    return shared / (flat.shape[0] * (n - 1) * topk)
