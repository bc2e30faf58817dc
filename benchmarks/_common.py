"""Helpers shared by the benchmark scripts: which commit a figure belongs to, where a table goes, and
CUDA-event time of calls made back to back."""

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
