"""Command line: ``python -m vsa_nd demo`` (or ``vsa-nd demo``).

The demo builds a random video-shaped attention problem, runs VSA on the best available
backend (CUDA through CuPy when a GPU is present, else Numba on the CPU), checks it against
the NumPy reference, times it against dense attention on the same device, and prints a
table.  It exits with status 1 when the error exceeds the tolerance of the dtype.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import threading
import time

import numpy as np

import vsa_nd
from . import reference
from ._xp import BFLOAT16, compute_dtype

DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64), "float16": np.dtype(np.float16),
          "bfloat16": BFLOAT16}
TOLERANCE = {"float32": 1e-4, "float64": 1e-10, "float16": 3e-2, "bfloat16": 3e-2}
# Defaults per backend: a 2048-token problem that runs in seconds on two cores, and on a GPU the
# 49152-token, 12-head shape of VSA_SPEC.md section 6 (768 tiles, 77 selected at sparsity 0.9).
DEFAULTS = {
    "cpu": dict(seq=(8, 16, 16), heads=4, head_dim=64, sparsity=0.75, dtype="float32"),
    "cuda": dict(seq=(16, 48, 64), heads=12, head_dim=128, sparsity=0.9, dtype="bfloat16"),
}
# The reference is dense and runs in float64: cap the score entries it computes (B*H*rows*S_kv)
# in total and per call, and check a spread-out subset of query tiles when a problem is larger.
REFERENCE_BUDGET = 2**27
REFERENCE_CHUNK = 2**22
# Dense attention is timed as the baseline only up to this many FLOPs a call on the CPU (a few
# seconds on two cores; 4*B*H*S^2*D grows with the square of the tokens): beyond, it is skipped.
CPU_DENSE_BUDGET = 1e11
# Arrays of the problem's size [B, H, S_pad, D] the demo holds at once, at most (inputs in the
# model's layout, tiled copies, outputs, dense baseline's copies), in float32 or wider: a problem
# that needs more than the machine has is refused before it starts, not killed half-way.
ARRAYS_HELD = 16
# The flags behind vsa_nd's argument names, for messages that start with the name.
FLAG_OF = {"seq_shape": "--seq", "tile_shape": "--tile", "sparsity": "--sparsity"}


class Progress:
    """A one-line progress bar on stderr, redrawn by a ticker thread so that it keeps moving
    (elapsed seconds) through a long single step such as a JIT compilation.  When stderr is
    not a terminal, only the final line is written."""

    def __init__(self, label: str, total: int, stream=sys.stderr):
        self.label, self.total, self.done, self.stream = label, total, 0, stream
        self.live = stream.isatty()
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def __enter__(self):
        self.start = time.perf_counter()
        if self.live:
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()
        return self

    def advance(self, steps: int = 1):
        self.done += steps
        self._draw()

    def _tick(self):
        while not self._stop.wait(0.2):
            self._draw()

    def _draw(self, end: str = ""):
        if not (self.live or end):
            return
        width = 24
        filled = width * self.done // max(self.total, 1)
        line = (f"\r{self.label:<38} [{'#' * filled}{'.' * (width - filled)}] "
                f"{self.done}/{self.total} {time.perf_counter() - self.start:5.1f} s")
        with self._lock:
            self.stream.write(line[0 if self.live else 1:] + end)
            self.stream.flush()

    def __exit__(self, *exc):
        self._stop.set()
        if self.live:
            self._ticker.join()
        self._draw(end="\n")


def _ints(text: str) -> tuple:
    """Sides such as "8,16,16" or "8x16x16"; an empty side is refused rather than dropped (a typo
    such as "8,,16" would otherwise run a problem of fewer dimensions)."""
    try:
        return tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 8,16,16, got {text!r}") from None


def _int_at_least(low: int, what: str):
    """An argparse type: an int >= ``low`` (``what`` names such ints in the error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive = _int_at_least(1, "a positive int")
_seed = _int_at_least(0, "a non-negative int")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vsa-nd", description="Video Sparse Attention toolkit")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run VSA on a random video-shaped problem, check it, time it")
    demo.add_argument("--seq", type=_ints, help="token grid, e.g. 8,16,16 (default: 8,16,16 on CPU, 16,48,64 on CUDA)")
    demo.add_argument("--tile", type=_ints, help="tile shape (default: 4,4,4 for 3-D; see vsa_nd.tile_plan)")
    demo.add_argument("--heads", type=_positive, help="query heads (default: 4 on CPU, 12 on CUDA)")
    demo.add_argument("--kv-heads", type=_positive, help="key/value heads, dividing --heads (default: --heads)")
    demo.add_argument("--head-dim", type=_positive, help="head dimension D (default: 64 on CPU, 128 on CUDA)")
    demo.add_argument("--batch", type=_positive, default=1, help="batch size B (default: 1)")
    demo.add_argument("--sparsity", type=float, help="fraction of key tiles skipped (default: 0.75 CPU, 0.9 CUDA)")
    demo.add_argument("--dtype", choices=DTYPES, help="default: float32 on CPU, bfloat16 on CUDA")
    demo.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="auto")
    demo.add_argument("--repeats", type=_positive, default=3, help="timed runs; the median is reported (default: 3)")
    demo.add_argument("--seed", type=_seed, default=0, help="random seed, >= 0 (default: 0)")
    return parser


def _cuda_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0 and importlib.util.find_spec("vsa_nd.backends.cuda") is not None
    except Exception:  # noqa: BLE001 - no CuPy, no driver or no device
        return False


class Device:
    """Where the demo runs: the array module, how to move arrays and how to time a call."""

    def __init__(self, kind: str):
        if kind == "cuda":
            import cupy

            self.xp = cupy
            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())
            self.name = f"CUDA, {props['name'].decode()} (CuPy {cupy.__version__})"
            self.key = f"cuda:{cupy.cuda.runtime.getDevice()}"
        else:
            import numba

            self.xp = np
            self.name = f"Numba CPU ({numba.get_num_threads()} threads)"
            self.key = "cpu"

    def memory_bytes(self) -> int:
        """The memory the demo's arrays live in: on the CPU the physical memory, or a container's
        (cgroup) limit where that is smaller; on CUDA the GPU's own.  0 where it cannot be told,
        which skips the check.  (Memory others use is not counted: the check refuses only what
        could never fit.)"""
        if self.xp is not np:
            return int(self.xp.cuda.Device().mem_info[1])
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, OSError, ValueError):  # not a POSIX system
            return 0
        for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
            try:
                with open(limit_file) as f:
                    total = min(total, int(f.read().strip()))
            except (OSError, ValueError):  # absent, or "max": no limit
                pass
        return total

    def to_device(self, x):
        return self.xp.asarray(x)

    def to_host(self, x):
        return x if self.xp is np else self.xp.asnumpy(x)

    def seconds(self, fn) -> float:
        """Wall time of one call; on CUDA measured with events on the current stream."""
        if self.xp is np:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        start, stop = self.xp.cuda.Event(), self.xp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return self.xp.cuda.get_elapsed_time(start, stop) / 1e3


def dense_attention(xp, q, k, v, scale: float):
    """softmax(scale q k^T) v over all tokens, q [B, H, S, D], k and v [B, H_kv, S_kv, D].

    The timing baseline: NumPy in the compute dtype on the host (NumPy has no fast half matmul),
    CuPy matmuls in the input dtype on the GPU with the softmax in float32; query rows go in chunks
    so that a block of scores holds at most 2**26 entries.
    """
    b_, h_, s_q, _ = q.shape
    group = h_ // k.shape[1]
    rows = max(1, 2**26 // k.shape[2])
    out = xp.empty_like(q)
    for b in range(b_):
        for h in range(h_):
            keys_t, values = k[b, h // group].T, v[b, h // group]
            for r in range(0, s_q, rows):
                scores = (q[b, h, r : r + rows] @ keys_t).astype(compute_dtype(q.dtype)) * scale
                probs = xp.exp(scores - scores.max(axis=1, keepdims=True))
                probs /= probs.sum(axis=1, keepdims=True)
                out[b, h, r : r + rows] = probs.astype(q.dtype) @ values
    return out


def _median_time(device: Device, fn, repeats: int, bar: Progress) -> float:
    times = []
    for _ in range(repeats):
        times.append(device.seconds(fn))
        bar.advance()
    return float(np.median(times))


def _tiles_to_check(b: int, h: int, n_q: int, volume: int, s_kv: int) -> np.ndarray:
    """Query tiles the reference checks: all, or an even spread (first and last included) within budget."""
    affordable = max(2, REFERENCE_BUDGET // (b * h * volume * s_kv))  # at least the first and the last
    if affordable >= n_q:
        return np.arange(n_q)
    return np.unique(np.linspace(0, n_q - 1, affordable).round().astype(int))


def check_against_reference(q, k, v, out, selection, q_sizes, kv_sizes, topk: int, volume: int, tiles) -> dict:
    """Errors of ``out`` on the real rows of the query tiles ``tiles``, all heads, against the reference.

    Host arrays in the tiled layout; ``selection`` = (q2k_idx, q2k_num) of the backend, which the
    reference reuses so that the outputs are comparable, and which is checked separately: every
    chosen tile must score within a tolerance of the best unchosen one in the reference's scores.
    """
    b_, h_, _, _ = q.shape
    h_kv = k.shape[1]
    group = h_ // h_kv
    step = max(1, REFERENCE_CHUNK // (group * volume * k.shape[2]))
    chunks = [tiles[i : i + step] for i in range(0, len(tiles), step)]
    err_max = err_sq = ref_max = ref_sq = 0.0
    bad_rows = rows = 0
    q2k_idx, q2k_num = selection
    with Progress("checking against the NumPy reference", b_ * h_kv * len(chunks)) as bar:
        for b in range(b_):
            for g in range(h_kv):
                heads = slice(g * group, (g + 1) * group)
                for part in chunks:
                    part_slots = (part[:, None] * volume + np.arange(volume)).reshape(-1)
                    expect = reference.video_sparse_attn(
                        q[b : b + 1, heads, part_slots], k[b : b + 1, g : g + 1], v[b : b + 1, g : g + 1],
                        q_sizes[part], kv_sizes, topk, volume,
                        q2k_idx=q2k_idx[b : b + 1, heads][:, :, part], q2k_num=q2k_num[b : b + 1, heads][:, :, part],
                    )
                    keep = reference.valid_slots(q_sizes[part], volume)
                    diff = out[b, heads][:, part_slots][:, keep].astype(np.float64) - expect.out[0][:, keep]
                    err_max, err_sq = max(err_max, float(np.abs(diff).max())), err_sq + float(np.sum(diff**2))
                    ref_max = max(ref_max, float(np.abs(expect.out[0][:, keep]).max()))
                    ref_sq += float(np.sum(expect.out[0][:, keep] ** 2))
                    bad_rows += _selection_mismatches(expect.scores[0], q2k_idx[b, heads][:, part], q2k_num[b, heads][:, part])
                    rows += expect.scores.shape[1] * expect.scores.shape[2]
                    bar.advance()
    return dict(max_rel=err_max / ref_max, norm_rel=math.sqrt(err_sq / ref_sq), bad_rows=bad_rows, rows=rows)


def _selection_mismatches(scores, q2k_idx, q2k_num) -> int:
    """Rows whose chosen tiles are not a top set of ``scores`` up to rounding of the coarse stage."""
    chosen = reference.block_map_from_indices(q2k_idx[None], q2k_num[None], scores.shape[-1])[0]
    tolerance = 1e-4 * max(1.0, float(np.abs(scores).max()))
    worst_chosen = np.where(chosen, scores, np.inf).min(axis=-1)
    best_other = np.where(chosen, -np.inf, scores).max(axis=-1)
    return int(np.sum(worst_chosen < best_other - tolerance))


def _check_memory(device: Device, dtype, batch: int, heads: int, tokens: int, head_dim: int) -> None:
    """MemoryError, before anything is allocated, where ARRAYS_HELD arrays [B, H, tokens, D] and
    the dense baseline's blocks of scores would not fit in the device's memory (or NumPy could
    not even shape one array)."""
    elements = batch * heads * tokens * head_dim
    shape = f"{batch} x {heads} x {tokens} x {head_dim} elements per array"
    if elements >= 2**60:
        raise MemoryError(shape)
    width = max(dtype.itemsize, 4)
    scores = 3 * min(2**26, tokens * tokens) * width  # dense_attention's block of scores, ~3 alive at once
    need, have = ARRAYS_HELD * elements * width + scores, device.memory_bytes()
    if have and need > have:
        raise MemoryError(f"{shape}: about {_size(need)}, against {_size(have)} here")


def _size(nbytes: int) -> str:
    """``nbytes`` in the largest of KiB, MiB and GiB that keeps the number at least 1 (KiB below)."""
    unit = max(1, min(3, int(math.log(max(nbytes, 1), 1024))))
    return f"{nbytes / 1024**unit:.1f} {('KiB', 'MiB', 'GiB')[unit - 1]}"


def demo(args) -> int:
    kind = args.backend
    if kind == "auto":
        kind = "cuda" if _cuda_available() else "cpu"
    elif kind == "cuda" and not _cuda_available():
        print("vsa-nd demo: --backend cuda needs CuPy, a CUDA GPU and vsa_nd.backends.cuda", file=sys.stderr)
        return 2
    defaults = DEFAULTS[kind]
    seq = args.seq or defaults["seq"]
    heads = args.heads or defaults["heads"]
    kv_heads = args.kv_heads or heads
    head_dim = args.head_dim or defaults["head_dim"]
    sparsity = defaults["sparsity"] if args.sparsity is None else args.sparsity
    dtype_name = args.dtype or defaults["dtype"]
    dtype, batch, repeats = DTYPES[dtype_name], args.batch, args.repeats
    if heads % kv_heads:
        print(f"vsa-nd demo: --kv-heads {kv_heads} must divide --heads {heads}", file=sys.stderr)
        return 2

    device = Device(kind)
    # Before the plan, whose index arrays alone can exhaust the memory for absurd sizes: the
    # tokens as given (the padded count, checked below, is at least as large).
    if all(side >= 1 for side in seq):
        _check_memory(device, dtype, batch, max(heads, kv_heads), math.prod(seq), head_dim)
    try:
        plan = vsa_nd.tile_plan(seq, args.tile, device=device.key)
        topk = vsa_nd.topk_from_sparsity(sparsity, plan.num_blocks)
    except (TypeError, ValueError) as error:  # a bad --seq, --tile or --sparsity
        message = str(error)
        flag = FLAG_OF.get(message.split(":", 1)[0])
        print(f"vsa-nd demo: {flag + ': ' if flag else ''}{message}", file=sys.stderr)
        return 2
    n, volume = plan.num_blocks, plan.tile_volume
    _check_memory(device, dtype, batch, max(heads, kv_heads), plan.padded_len, head_dim)
    sizes = plan.variable_block_sizes
    rng = np.random.default_rng(args.seed)

    def tokens(h):  # [B, S, H, D] in the model's token order
        return device.to_device(rng.standard_normal((batch, plan.seq_len, h, head_dim), dtype=np.float32).astype(dtype))

    q, k, v = tokens(heads), tokens(kv_heads), tokens(kv_heads)

    # First calls compile the kernels (Numba JIT or NVRTC); do them on a small problem of the same types.
    small = vsa_nd.tile_plan(tuple(t + 1 for t in plan.tile_shape), plan.tile_shape, device=device.key)
    compiler = "NVRTC" if kind == "cuda" else "Numba JIT"
    with Progress(f"compiling kernels ({compiler})", 3) as bar:
        x = device.to_device(np.ones((1, small.seq_len, 1, head_dim), dtype=dtype))
        xt = vsa_nd.tile(x, small)
        bar.advance()
        y = vsa_nd.video_sparse_attn(xt, xt, xt, 1, small.variable_block_sizes)
        bar.advance()
        vsa_nd.untile(y, small)
        bar.advance()

    qt, kt, vt = (vsa_nd.tile(x, plan) for x in (q, k, v))
    out, context = vsa_nd.video_sparse_attn(qt, kt, vt, topk, sizes, return_context=True)
    scale = head_dim**-0.5

    dense_flops = 4.0 * batch * heads * plan.seq_len**2 * head_dim
    time_dense = kind != "cpu" or dense_flops <= CPU_DENSE_BUDGET
    if time_dense:
        dense_in = [x.transpose(0, 2, 1, 3) for x in (q, k, v)]  # [B, H, S, D], real tokens only
        if kind == "cpu":
            dense_in = [np.ascontiguousarray(x, dtype=compute_dtype(dtype)) for x in dense_in]
        else:
            dense_in = [device.xp.ascontiguousarray(x) for x in dense_in]
    with Progress("timing VSA, dense and tile/untile", (2 + time_dense) * repeats) as bar:
        vsa_time = _median_time(device, lambda: vsa_nd.video_sparse_attn(qt, kt, vt, topk, sizes), repeats, bar)
        if time_dense:
            dense_time = _median_time(device, lambda: dense_attention(device.xp, *dense_in, scale), repeats, bar)
        tile_time = _median_time(
            device, lambda: [vsa_nd.tile(x, plan) for x in (q, k, v)] + [vsa_nd.untile(out, plan)], repeats, bar
        )

    host = [device.to_host(x) for x in (qt, kt, vt, out, context.q2k_idx, context.q2k_num)]
    host_sizes = device.to_host(sizes)
    tiles = _tiles_to_check(batch, heads, n, volume, kt.shape[2])
    err = check_against_reference(*host[:4], host[4:], host_sizes, host_sizes, topk, volume, tiles)

    tolerance = TOLERANCE[dtype_name]
    failures = [why for ok, why in ((err["max_rel"] <= tolerance, "error above tolerance"),
                                    (err["bad_rows"] == 0, "top-k selection differs")) if not ok]
    coverage = "all" if len(tiles) == n else f"{len(tiles)} of {n} (spread; the reference is dense, O(S^2))"
    dense_note = f"NumPy matmul, {compute_dtype(dtype).name}" if kind == "cpu" else f"CuPy matmul, {dtype_name}"
    rows = [
        ("backend", device.name),
        ("q, k, v", f"B={batch}, H={heads} (kv {kv_heads}), D={head_dim}, {dtype_name}"),
        ("tokens", f"seq {plan.seq_shape} = {plan.seq_len}, tile {plan.tile_shape}: {n} tiles, {plan.padded_len} slots"),
        ("selection", f"sparsity {sparsity:g} -> topk {topk} of {n} key tiles"),
        ("query tiles checked", coverage),
        ("max relative error", f"{err['max_rel']:.2e} (tolerance {tolerance:.0e}), norm-relative {err['norm_rel']:.2e}"),
        ("top-k selection", f"{err['bad_rows']} of {err['rows']} rows differ from the reference"),
        ("VSA time", f"{vsa_time * 1e3:.2f} ms (median of {repeats})"),
        ("dense attention time", f"{dense_time * 1e3:.2f} ms ({dense_note})" if time_dense else
         f"not timed: {dense_flops / 1e12:.2g} TFLOP a call, past the CPU demo's budget of "
         f"{CPU_DENSE_BUDGET / 1e12:.2g} TFLOP"),
        ("speed-up over dense", f"{dense_time / vsa_time:.2f}x" if time_dense else "-"),
        ("tile q, k, v + untile out", f"{tile_time * 1e3:.2f} ms"),
        ("result", "FAIL: " + ", ".join(failures) if failures else "PASS"),
    ]
    width = max(len(key) for key, _ in rows)
    print("vsa_nd demo: Video Sparse Attention against the NumPy reference and dense attention")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return 1 if failures else 0


def _attached(argv: list) -> list:
    """``--seq -8,16,16`` as ``--seq=-8,16,16`` (likewise --tile): argparse reads a separate value
    that starts with "-" and is not a plain negative number as an option, and its "expected one
    argument" hides the message that names the bad side."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ("--seq", "--tile") and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv=None) -> int:
    args = _parser().parse_args(_attached(sys.argv[1:] if argv is None else list(argv)))
    try:
        return demo(args)
    except MemoryError as error:  # (CuPy's OutOfMemoryError too) a problem too large for this machine
        print(f"vsa-nd demo: not enough memory for this problem; try smaller sizes ({error})", file=sys.stderr)
        return 2
