"""Helpers shared by the benchmark scripts: which commit a figure belongs to, and where a table goes."""

from __future__ import annotations

import os
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
