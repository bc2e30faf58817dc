"""Helpers shared by the benchmark scripts: which commit a figure belongs to, where a table goes,
CUDA-event time of single calls (CuPy) and of calls made back to back (torch), and the SM clock."""

from __future__ import annotations

import os
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def commit() -> str:
    """Short hash of HEAD (with "+ uncommitted changes" if the tree differs), or $VSA_COMMIT where
    there is no git checkout (the GPU machine gets a copy of the tree without .git)."""

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return os.environ.get("VSA_COMMIT", "unknown")
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
