"""Helpers shared by the benchmark scripts: which commit a figure belongs to, where a table goes,
CUDA-event time of single calls (CuPy) and of calls made back to back (torch), and the SM clock."""

from __future__ import annotations

import functools
import os
import statistics
import subprocess
from pathlib import Path

import numpy as np

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
    import vsa_nd

    xp = np
    if type(rng).__module__.startswith("cupy"):
        import cupy as xp
    grid = tuple(plan.seq_shape)
    freqs = [xp.fft.fftfreq(n) for n in grid[:-1]] + [xp.fft.rfftfreq(grid[-1])]
    gain = xp.ones((1,) * len(grid))
    for axis, f in enumerate(freqs):  # the Gaussian's transfer function, one axis at a time
        shape = [1] * len(grid)
        shape[axis] = -1
        gain = gain * xp.exp(-2.0 * (np.pi * f * sigma) ** 2).reshape(shape)
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
    idx = np.asarray(q2k_idx.get() if hasattr(q2k_idx, "get") else q2k_idx)[..., :topk]
    n = idx.shape[-2]
    flat = idx.reshape(-1, n, topk)
    shared = 0
    for head in flat:
        member = np.zeros((n, int(head.max()) + 1), dtype=bool)
        np.put_along_axis(member, head, True, axis=1)
        shared += (member[:-1] & member[1:]).sum()
    return shared / (flat.shape[0] * (n - 1) * topk)


# Spot checks: the timed calls' results at the benchmark's own shape (the tests run the same
# kernels at small shapes only) against float64 rows computed here, on a sample of tiles.
# Bounds as in the GPU tests: (whole sample, worst row) for the forward output and the gradients.
SPOT_BOUNDS = {
    "float16": {"out": (3e-3, 5e-3), "grad": (5e-3, 1e-2)},
    "bfloat16": {"out": (1e-2, 3e-2), "grad": (3e-2, 1e-1)},
}
LSE_BOUND = 1e-5  # largest error, relative above 1 in magnitude, absolute below
SELECTION_BOUND = 0.05  # how far (in the row's score spread) a skipped tile may outscore a chosen one
GRADIENTS = ("dq", "dk", "dv", "dgate")


def _host64(x):
    """A float64 NumPy copy of a NumPy or CuPy array (bfloat16 included)."""
    if type(x).__module__.startswith("cupy"):
        x = x.get()
    return np.asarray(x).astype(np.float64)


def _leaves64(x) -> list:
    """float64 NumPy copies of an array (NumPy, CuPy, torch or JAX) or of each array of a
    (nested) tuple or list, in order."""
    if isinstance(x, (tuple, list)):
        return [leaf for item in x for leaf in _leaves64(item)]
    if hasattr(x, "detach"):  # torch: its bfloat16 has no NumPy twin
        x = x.detach().float().cpu().numpy()
    elif type(x).__module__.startswith("jax"):
        x = np.asarray(x)
    return [_host64(x)]


AGREE_BOUND = 1e-2  # two ways to call the same kernels: equal in practice, bf16 rounding at worst


def agree(base, other, what: str, bound: float = AGREE_BOUND, base_name: str = "the array call's") -> str:
    """A line saying how far ``other``'s results are from ``base``'s (the array-level call's), as
    the largest norm-relative error over their arrays (in order; a norm below 1e-30 counts as
    1e-30, so an all-zero base must be matched exactly); SystemExit if past ``bound``, NaN
    anywhere, or the arrays' count or shapes differ: a benchmark of an adapter that returns
    something else is not reported.  ``base_name`` names ``base`` in the line."""
    a, b = _leaves64(base), _leaves64(other)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise SystemExit(f"{what}: results differ in count or shape: {[x.shape for x in a]} against "
                         f"{[y.shape for y in b]}")
    identical = all(np.array_equal(x, y) for x, y in zip(a, b))
    errors = [float(np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-30)) for x, y in zip(a, b)]
    error = max(errors, default=0.0) if np.all(np.isfinite(errors)) else np.inf  # (max() would skip a NaN)
    if not error <= bound:
        raise SystemExit(f"{what}: results {error:.1e} from {base_name} (bound {bound})")
    return f"{what}: " + (f"identical to {base_name}" if identical else f"{error:.1e} from {base_name}")


def _softmax_rows(scores):
    """(probabilities, log-sum-exp) of each row of ``scores``, in float64."""
    top = scores.max(axis=-1, keepdims=True)
    lse = top + np.log(np.exp(scores - top).sum(axis=-1, keepdims=True))
    return np.exp(scores - lse), lse[..., 0]


def _errors(got, want, floor: float = 0.01) -> tuple:
    """(norm-relative error of the whole sample, that of its worst row), rows [rows, D]; norms
    floored at an RMS of ``floor`` per element, a row's also at 0.1 times the RMS row norm (as
    tests/attention_problems.worst_row_error).  NaN anywhere gives inf."""
    diff = np.linalg.norm(got - want, axis=1)
    norms = np.linalg.norm(want, axis=1)
    floor = floor * np.sqrt(want.shape[1])
    whole = np.sqrt(np.sum(diff**2)) / max(np.sqrt(np.sum(norms**2)), floor * np.sqrt(len(want)))
    row_floor = max(0.1 * np.sqrt(np.mean(norms**2)), floor)
    worst = np.max(diff / np.maximum(norms, row_floor))
    return tuple(float(e) if np.isfinite(e) else np.inf for e in (whole, worst))


def _nonzero(x) -> float:
    """The largest magnitude in ``x`` (inf for NaN): what a pad row holds beyond 0."""
    top = np.max(np.abs(x), initial=0.0)
    return float(top) if np.isfinite(top) else np.inf


def spot_check(ctx, dout=None, grads=None, q_tiles: int = 4, kv_tiles: int = 2, seed: int = 0,
               scale=None, coarse: bool = True) -> dict:
    """Errors of a VSA call's results on a sample of tiles of one (batch, kv head), against float64.

    ``ctx``: the ``VSAContext`` of ``vsa_nd.video_sparse_attn(..., return_context=True)`` (NumPy
    or CuPy arrays; GQA, gate and partial tiles allowed); ``dout`` and ``grads`` (what
    ``video_sparse_attn_backward(dout, ctx)`` returned) both or neither; ``scale`` the one the
    call was given (None: the default).  Recomputed from q, k, v and gate: the coarse branch over
    the whole head, the fine rows of ``q_tiles`` random query tiles of one query head, and, with
    ``grads``, dk and dv of ``kv_tiles`` random key tiles (among those the group selected) from
    every query tile of the group that selected them.  The sampled tiles' selections must be a
    top-k of the float64 coarse scores (within ``SELECTION_BOUND``); the fine branch then uses
    them, and, as ``reference.video_sparse_attn_backward(..., out=...)`` does, the softmax term
    rowsum(dO * fine) takes fine from the call's own ``out``.

    Returns {"scale", "selection", "out", "lse", "pad" and, with ``grads``, "dq", "dk", "dv" (and
    "dgate" with a gate)}: "out" and the gradients (whole sample, worst row) as in
    :func:`_errors`; "lse" its largest error (relative above 1, absolute below); "scale" the
    relative error of ``ctx.scale``; "selection" how far a skipped key tile outscores a chosen one,
    in units of the row's score spread (0 if none does; inf for a repeated or missing entry);
    "pad" the largest magnitude in the sample's pad rows of out and the gradients (inf for
    NaN, or an lse other than -inf there).

    ``coarse=False`` checks the fine stage alone (``block_sparse_attn``, or the backends'
    ``block_sparse_fwd`` / ``block_sparse_bwd`` without coarse and gate): no coarse branch is
    added, and the selection, which the caller chose, is not checked ("selection" is absent).
    ``ctx`` then needs only the attributes named above (q, k, v, out, lse, q2k_idx, q2k_num,
    q_block_sizes, kv_block_sizes, scale; gate None) and ``grads`` only dq, dk and dv.
    """
    if (dout is None) != (grads is None):
        raise ValueError("spot_check: pass dout and grads together (the backward's input and results), or neither")
    if q_tiles < 1 or kv_tiles < 1:
        raise ValueError(f"spot_check: expected q_tiles, kv_tiles >= 1, got {q_tiles}, {kv_tiles}")
    rng = np.random.default_rng(seed)
    batch, heads, _, dim = ctx.q.shape
    kv_heads = ctx.k.shape[1]
    q_sizes, kv_sizes = (_host64(s).astype(np.int64) for s in (ctx.q_block_sizes, ctx.kv_block_sizes))
    volume, group = ctx.q.shape[2] // len(q_sizes), heads // kv_heads
    b, hk = int(rng.integers(batch)), int(rng.integers(kv_heads))
    group_heads = range(hk * group, (hk + 1) * group)
    h = int(rng.choice(group_heads))
    q_real = (np.arange(volume) < q_sizes[:, None])[..., None]  # [N_q, V, 1]
    kv_real = (np.arange(volume) < kv_sizes[:, None])[..., None]
    k, v = (np.where(kv_real, _host64(x[b, hk]).reshape(len(kv_sizes), volume, dim), 0) for x in (ctx.k, ctx.v))
    k_c, v_c = (x.sum(1) / kv_sizes[:, None] for x in (k, v))
    idx, num = (_host64(x[b]).astype(np.int64) for x in (ctx.q2k_idx, ctx.q2k_num))
    topk = idx.shape[-1]
    backward = grads is not None
    expected_scale = dim**-0.5 if scale is None else scale
    errors = {"scale": abs(ctx.scale / expected_scale - 1), "pad": 0.0}
    if coarse:
        errors["selection"] = 0.0
    scale = ctx.scale

    @functools.lru_cache(maxsize=None)  # the sampled head's again among the group's below
    def head(hq):
        """Query head hq's arrays as [N_q, V, D] (q, dout, gate weight, out; lse [N_q, V]), pad
        slots zeroed, its coarse scores, and its coarse branch: output [N_q, D] and, for the
        backward, the gradients of its tile means."""
        def per_tile(x):
            return np.where(q_real, _host64(x[b, hq]).reshape(len(q_sizes), volume, -1), 0)

        t = dict(q=per_tile(ctx.q), out=_host64(ctx.out[b, hq]).reshape(len(q_sizes), volume, dim),
                 lse=_host64(ctx.lse[b, hq]).reshape(len(q_sizes), volume))
        if not coarse:
            t["w"] = 0.0  # (so the coarse branch and its gradients below add nothing)
        else:
            t["w"] = 1.0 if ctx.gate is None else per_tile(ctx.gate)
        q_c = t["q"].sum(1) / q_sizes[:, None]
        t["scores"] = scale * q_c @ k_c.T
        probs, _ = _softmax_rows(t["scores"])
        t["coarse"] = probs @ v_c
        if backward:
            t["do"] = per_tile(dout)
            d_coarse = (t["do"] * t["w"]).sum(1)
            da = d_coarse @ v_c.T
            dc = probs * (da - (da * probs).sum(-1, keepdims=True))
            t.update(dq_c=scale * dc @ k_c, dk_c=scale * dc.T @ q_c, dv_c=probs.T @ d_coarse)
        return t

    def selection_error(hq, t, i) -> float:
        tiles = idx[hq, i, :num[hq, i]]
        if num[hq, i] != topk or len(np.unique(tiles)) != topk or not np.all((0 <= tiles) & (tiles < len(kv_sizes))):
            return np.inf
        row = t["scores"][i]
        skipped = np.delete(row, tiles)
        if not skipped.size:
            return 0.0
        return max(0.0, float(skipped.max() - row[tiles].min()) / max(float(row.std()), 1e-30))

    def fine(hq, t, i):
        """Query tile i's (selected tiles, their keys, values, probabilities, lse, gate weight and
        the rowsum(dO * fine) term) over its real rows."""
        tiles = idx[hq, i, :num[hq, i]]
        keys, values = (np.concatenate([x[j, :kv_sizes[j]] for j in tiles]) for x in (k, v))
        p, lse = _softmax_rows(scale * t["q"][i, :q_sizes[i]] @ keys.T)
        n = q_sizes[i]
        w = t["w"] if np.isscalar(t["w"]) else t["w"][i, :n]
        delta = (t["do"][i, :n] * (t["out"][i, :n] - w * t["coarse"][i])).sum(-1, keepdims=True) if backward else None
        return tiles, keys, values, p, lse, w, delta

    pairs = {}

    def compare(name, got, want):
        pairs.setdefault(name, []).append((got, want))

    def check_pads(*arrays):
        errors["pad"] = max(errors["pad"], *(_nonzero(x) for x in arrays))

    t = head(h)
    if backward:
        dq, dgate = (None if g is None else _host64(g[b, h]).reshape(len(q_sizes), volume, dim)
                     for g in (grads.dq, getattr(grads, "dgate", None)))
    lse_errors = []
    for i in rng.choice(len(q_sizes), min(q_tiles, len(q_sizes)), replace=False):
        n = q_sizes[i]
        if coarse:
            errors["selection"] = max(errors["selection"], selection_error(h, t, i))
            if errors["selection"] == np.inf:
                break  # the selection itself is broken: nothing below would mean anything
        _, keys, values, p, lse, w, delta = fine(h, t, i)
        compare("out", t["out"][i, :n], p @ values + w * t["coarse"][i])
        lse_errors.append(np.abs(t["lse"][i, :n] - lse) / np.maximum(np.abs(lse), 1.0))
        check_pads(t["out"][i, n:])
        if not np.all(t["lse"][i, n:] == -np.inf):
            errors["pad"] = np.inf
        if backward:
            ds = p * (t["do"][i, :n] @ values.T - delta)
            compare("dq", dq[i, :n], scale * ds @ keys + t["dq_c"][i] / n)
            check_pads(dq[i, n:])
            if dgate is not None and coarse:
                compare("dgate", dgate[i, :n], t["do"][i, :n] * t["coarse"][i])
                check_pads(dgate[i, n:])
    if lse_errors:
        errors["lse"] = _nonzero(np.concatenate(lse_errors))
    if backward and errors.get("selection", 0.0) < np.inf:
        chosen = np.arange(topk) < num[:, :, None]  # [H, N_q, topk]: the real entries
        used = np.unique(idx[list(group_heads)][chosen[list(group_heads)]])
        pool = used if used.size else np.arange(len(kv_sizes))
        sampled = rng.choice(pool, min(kv_tiles, len(pool)), replace=False)
        want_dk = {j: np.zeros((kv_sizes[j], dim)) for j in sampled}
        want_dv = {j: np.zeros((kv_sizes[j], dim)) for j in sampled}
        for hq in group_heads:
            t = head(hq)
            for j in sampled:
                want_dk[j] += t["dk_c"][j] / kv_sizes[j]
                want_dv[j] += t["dv_c"][j] / kv_sizes[j]
            for i in np.flatnonzero((np.isin(idx[hq], sampled) & chosen[hq]).any(-1)):
                n = q_sizes[i]
                tiles, _, _, p, _, _, delta = fine(hq, t, i)
                starts = np.concatenate([[0], np.cumsum(kv_sizes[tiles])])
                for position, j in enumerate(tiles):
                    if j in want_dk:
                        p_j = p[:, starts[position]:starts[position + 1]]
                        ds_j = p_j * (t["do"][i, :n] @ v[j, :kv_sizes[j]].T - delta)
                        want_dk[j] += scale * ds_j.T @ t["q"][i, :n]
                        want_dv[j] += p_j.T @ t["do"][i, :n]
        dk, dv = (_host64(g[b, hk]).reshape(k.shape) for g in (grads.dk, grads.dv))
        for j in sampled:
            m = kv_sizes[j]
            compare("dk", dk[j, :m], want_dk[j])
            compare("dv", dv[j, :m], want_dv[j])
            check_pads(dk[j, m:], dv[j, m:])
    # Absolute floors: 0.01 times the RMS of the operand a result is a sum of products with (out:
    # v; dq: k; dk: q; dv, dgate: dout), as in tests/test_cuda_backward.py, so that inputs of
    # another scale (video-like ones) are held to the same standard.
    real_q, real_kv = q_real[..., 0], kv_real[..., 0]
    operands = {"out": v[real_kv], "dq": k[real_kv], "dk": t["q"][real_q]}
    if backward:
        operands["dv"] = operands["dgate"] = t["do"][real_q]
    for name, found in pairs.items():
        floor = 0.01 * float(np.sqrt(np.mean(np.square(operands[name]))))
        errors[name] = _errors(np.concatenate([g for g, _ in found]), np.concatenate([w for _, w in found]), floor)
    return errors


def check_spot(errors: dict, dtype, what: str, backward: bool = False, gate: bool = False,
               coarse: bool = True) -> str:
    """A one-line summary of :func:`spot_check`'s ``errors``; SystemExit if one is past its bound
    (``SPOT_BOUNDS`` for ``dtype``, ``LSE_BOUND``, ``SELECTION_BOUND``, 1e-6 for the scale, 0 for
    pad rows) or missing (out, lse, the selection unless ``coarse`` is False, and with
    ``backward`` dq, dk, dv, and dgate with ``gate``): a benchmark of wrong results is not
    reported."""
    if np.dtype(dtype).name not in SPOT_BOUNDS:
        raise ValueError(f"check_spot: no bounds for {np.dtype(dtype).name} (float16 and bfloat16 only)")
    bounds = SPOT_BOUNDS[np.dtype(dtype).name]
    limits = dict(scale=1e-6, selection=SELECTION_BOUND, lse=LSE_BOUND, pad=0.0, out=bounds["out"],
                  **{name: bounds["grad"] for name in GRADIENTS})
    required = ["scale", "pad", "out", "lse"] + (["selection"] if coarse else []) + (["dq", "dk", "dv"] if backward else [])
    required += ["dgate"] if backward and gate else []
    missing = [name for name in required if name not in errors]
    bad = [name for name, err in errors.items()
           if not np.all(np.asarray(err) <= np.asarray(limits[name]))]  # (NaN fails)

    def show(err):
        return "/".join(f"{e:.1e}" for e in err) if isinstance(err, tuple) else f"{err:.1e}"

    line = f"spot check of {what}: " + ", ".join(f"{name} {show(err)}" for name, err in errors.items())
    if missing or bad:
        raise SystemExit(f"{line}: " + "; ".join(
            [f"{', '.join(missing)} not checked"] * bool(missing)
            + [f"{name} past its bound {limits[name]}" for name in bad]))
    return line
