"""Overhead of the PyTorch adapter over the array-level API, on CUDA (needs CuPy and torch) or CPU.

For each shape: the full VSA forward through ``vsa_nd.video_sparse_attn`` on CuPy (CPU: NumPy)
arrays, through ``vsa_nd.adapters.torch.video_sparse_attn`` on torch tensors of the same memory
(without autograd, and with inputs that require grad, which also keeps the backward's
context), the forward and backward (``video_sparse_attn_backward`` against ``torch.autograd.grad``
of all four inputs), and ``tile`` both ways.  On CUDA both sides run on the same stream (torch's
current one); ``gpu ms`` is the median over repetitions of CUDA-event time around one call made
on an idle GPU, so host work inside the call (conversion, allocation, dispatch) counts wherever
it leaves the GPU waiting.  ``back to back`` is the other way to count: CUDA-event time of many
calls made in a row with no synchronisation between them, per call, as in a training loop; where
the GPU work of a call outlasts its host work, the host runs ahead and hides its own time, and
the median of several such runs is given.  The array and torch calls take turns (call by call,
run by run), so that the machine's drift, a few percent on the GPU between runs, reaches both.
``host us`` is the median wall time of the Python call itself; on CPU (float32, Numba backend,
small shapes where the per-call cost shows) it is the only column.  Target (CUDA): the torch
call within 3% (or 20 us) of the array call; the verdict is given for both ways of counting.
On CUDA two more rows per shape time torch's autograd floor: a trivial Python autograd.Function
of the same four inputs, and torch's own ``q * 2``, each against the same torch operations called
directly (what the autograd engine costs any such node); a last row gives the forward + backward
extra less the first floor.
Also reports whether this CuPy takes DLPack's bfloat16 (kDLBfloat) directly.  Before a shape is
timed, each of its four calls' results through torch (second call: the prepared path that is
timed) are compared with the array call's (``_common.agree``: listed after the table), and the
array call's second results with its first; the script stops if they differ by more than 1e-2.

    python benchmarks/bench_adapters.py [--device cuda|cpu] [--shapes small,mid,main] [--reps 50]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import time
import warnings

from _common import agree, commit, time_back_to_back

SHAPES = {
    # name: (seq_shape, heads, head_dim, topk)
    "small": ((4, 16, 16), 2, 64, 4),  # 1024 tokens: where a fixed per-call cost shows most
    "mid": ((8, 32, 32), 12, 64, 16),  # 8192 tokens
    "main": ((12, 64, 64), 12, 128, 77),  # VSA_SPEC.md section 6: 49152 tokens, 77 of 768 tiles
}
CPU_SHAPES = {
    # name: (seq_shape, heads, head_dim, topk[, tile_shape])
    "tiny": ((2, 4, 4), 2, 16, 2, (2, 2, 2)),  # 32 tokens in tiles of 8: the call is almost all host time
    "small": SHAPES["small"],
}


def _time(fns, reps: int, cuda: bool) -> list:
    """[(median GPU ms or None on CPU, median host us)] of one call of each of ``fns`` (on CUDA,
    on an idle GPU).  The functions take turns, one call each per repetition, so that a drift of
    the machine (clocks, other tenants) reaches them alike."""
    import torch

    for fn in fns:
        for _ in range(3):  # warm-up: kernels compile, caches fill
            fn()
    gpu, host = [[] for _ in fns], [[] for _ in fns]
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            if cuda:
                torch.cuda.synchronize()
                start.record()
            t0 = time.perf_counter()
            fn()
            host[i].append((time.perf_counter() - t0) * 1e6)
            if cuda:
                end.record()
                end.synchronize()
                gpu[i].append(start.elapsed_time(end))
    return [(statistics.median(g) if cuda else None, statistics.median(h)) for g, h in zip(gpu, host)]


def _verdict(extra_us: float, base_ms: float) -> str:
    return "yes" if extra_us <= max(20.0, 0.03 * base_ms * 1e3) else "NO"


def _bfloat16_probe() -> str:
    import cupy
    import torch

    from vsa_nd._xp import BFLOAT16

    verdicts = []
    try:
        cupy.from_dlpack(torch.zeros(2, dtype=torch.bfloat16, device="cuda"))
        verdicts.append("imports kDLBfloat from torch")
    except Exception as error:  # noqa: BLE001 - reporting which refusal
        verdicts.append(f"refuses kDLBfloat from torch ({type(error).__name__}: {error})")
    try:
        torch.from_dlpack(cupy.zeros(2, BFLOAT16))
        verdicts.append("exports ml_dtypes.bfloat16 to torch")
    except Exception as error:  # noqa: BLE001
        verdicts.append(f"cannot export ml_dtypes.bfloat16 ({type(error).__name__}: {error})")
    return f"CuPy {cupy.__version__}: " + "; ".join(verdicts)


def _profile(cases, label: str, calls: int = 200):
    """cProfile of ``calls`` calls of each side of each case: where the host time goes."""
    import cProfile
    import io
    import pstats

    for what, array_fn, torch_fn in cases:
        for side, fn in (("array", array_fn), ("torch", torch_fn)):
            for _ in range(3):
                fn()
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(calls):
                fn()
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
            print(f"## profile {label} | {what} | {side} ({calls} calls)")
            print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000], flush=True)


def _profile_backward(cases, label: str, calls: int = 200):
    """cProfile of the backward alone, forward + backward case: the array call's backward on the
    calling thread, the torch backward inside the autograd engine's device thread (where torch
    runs it), by profiling ``_vsa_input_grads`` from within that thread."""
    import cProfile
    import io
    import pstats

    import vsa_nd
    import vsa_nd.adapters.torch as vt

    for side in ("array", "torch"):
        owner, name = (vsa_nd, "video_sparse_attn_backward") if side == "array" else (vt, "_vsa_input_grads")
        original = getattr(owner, name)
        profiler = cProfile.Profile()

        def profiled(*args, **kwargs):
            profiler.enable()
            try:
                return original(*args, **kwargs)
            finally:
                profiler.disable()

        fn = cases[2][1] if side == "array" else cases[2][2]
        for _ in range(3):
            fn()
        setattr(owner, name, profiled)
        try:
            for _ in range(calls):
                fn()
        finally:
            setattr(owner, name, original)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        print(f"## backward profile {label} | {side} ({calls} calls)")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:8000], flush=True)


def _breakdown(cases, label: str, reps: int = 50):
    """Median host time from the start of a call to points inside it (entry, and ``name end`` at
    exit), for the array call and the torch call of the forward cases (up to the launch of the
    fine-stage kernel: the critical path of a GPU-bound call) and of forward + backward."""
    import torch

    import vsa_nd
    import vsa_nd.adapters.torch as vt
    from vsa_nd.adapters import _common
    from vsa_nd.backends import cuda_attention, cuda_vsa

    points = [(_common, "vsa_forward"), (_common, "vsa_inference"), (vsa_nd, "video_sparse_attn"),
              (cuda_vsa, "vsa_forward"), (cuda_vsa.ForwardLaunches, "__call__"),
              (vt, "_vsa_input_grads"), (_common, "vsa_backward"), (vsa_nd, "video_sparse_attn_backward"),
              (cuda_vsa, "vsa_backward"), (cuda_vsa.BackwardLaunches, "__call__"),
              (cuda_attention.FineBackward, "__call__")]
    originals = [getattr(owner, name) for owner, name in points]
    marks = {}

    def marked(name, fn):
        def wrapper(*args, **kwargs):
            marks.setdefault(name, time.perf_counter())
            result = fn(*args, **kwargs)
            marks.setdefault(name + " end", time.perf_counter())
            return result
        return wrapper

    for (owner, name), fn in zip(points, originals):
        setattr(owner, name, marked(f"{owner.__name__.rsplit('.', 1)[-1]}.{name}", fn))
    try:
        for what, array_fn, torch_fn in cases[:3]:
            for side, fn in (("array", array_fn), ("torch", torch_fn)):
                for _ in range(3):
                    fn()
                times = {}
                for _ in range(reps):
                    torch.cuda.synchronize()
                    marks.clear()
                    t0 = time.perf_counter()
                    fn()
                    marks["call end"] = time.perf_counter()
                    for name, t in marks.items():
                        times.setdefault(name, []).append((t - t0) * 1e6)
                cells = ", ".join(f"{name} {statistics.median(ts):.1f}"
                                  for name, ts in sorted(times.items(), key=lambda item: statistics.median(item[1])))
                print(f"| {label} | {what} | {side}: host us from the call to {cells} |", flush=True)
    finally:
        for (owner, name), fn in zip(points, originals):
            setattr(owner, name, fn)


def bench_shape(name: str, seq_shape, heads: int, head_dim: int, topk: int, tile_shape=None, *, reps: int,
                cuda: bool, profile: bool = False, breakdown: bool = False, profile_backward: bool = False,
                graphs: bool = False, compiled: bool = False, checks: list):
    import torch

    import vsa_nd
    import vsa_nd.adapters.torch as vt

    plan = vt.tile_plan(seq_shape, tile_shape, device="cuda:0" if cuda else "cpu")
    g = torch.Generator(device=plan.device).manual_seed(0)
    x = [torch.randn(1, plan.seq_len, heads, head_dim, device=plan.device, generator=g,
                     dtype=torch.bfloat16 if cuda else torch.float32) for _ in range(4)]
    q, k, v, gate = (vt.tile(t, plan) for t in x)
    graded = [t.clone().requires_grad_() for t in (q, k, v, gate)]
    dout = torch.randn(q.shape, device=q.device, dtype=q.dtype, generator=g)
    if cuda:
        import cupy

        as_array = cupy.from_dlpack
        with warnings.catch_warnings():  # CuPy 14 prefers Stream.from_external, which CuPy 13 lacks
            warnings.simplefilter("ignore", DeprecationWarning)
            stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    else:
        as_array, stream = torch.Tensor.numpy, contextlib.nullcontext()
    arrays = [as_array(t) for t in (q, k, v, gate)]
    x_array, dout_array = as_array(x[0]), as_array(dout)
    sizes, array_plan = plan.variable_block_sizes, plan.array_plan

    def array_call():
        with stream:
            return vsa_nd.video_sparse_attn(*arrays[:3], topk, array_plan.variable_block_sizes, gate=arrays[3])

    def array_call_with_context():
        with stream:
            return vsa_nd.video_sparse_attn(*arrays[:3], topk, array_plan.variable_block_sizes, gate=arrays[3],
                                            return_context=True)[0]

    def array_train_step():
        with stream:
            _, context = vsa_nd.video_sparse_attn(*arrays[:3], topk, array_plan.variable_block_sizes, gate=arrays[3],
                                                  return_context=True)
            return tuple(vsa_nd.video_sparse_attn_backward(dout_array, context))  # dq, dk, dv, dgate

    def torch_train_step():
        return torch.autograd.grad(vt.video_sparse_attn(*graded[:3], topk, sizes, gate=graded[3]), graded, dout)

    def array_tile():
        with stream:
            return vsa_nd.tile(x_array, array_plan)

    cases = [
        ("VSA forward", array_call, lambda: vt.video_sparse_attn(q, k, v, topk, sizes, gate=gate)),
        ("VSA forward, inputs require grad (array: return_context=True)", array_call_with_context,
         lambda: vt.video_sparse_attn(*graded[:3], topk, sizes, gate=graded[3])),
        ("VSA forward + backward", array_train_step, torch_train_step),
        ("tile", array_tile, lambda: vt.tile(x[0], plan)),
    ]
    for what, array_fn, torch_fn in cases:  # before any timing: both ways must give the same results
        # The first call of a shape passes every check; the later ones, which are timed, take the
        # prepared launches (array and torch alike): the check compares those, and the array
        # call's second result with its first.
        first, array_result = array_fn(), array_fn()
        torch_fn()
        torch_result = torch_fn()
        if cuda:
            torch.cuda.synchronize()
        checks.append(agree(first, array_result, f"{name}: {what}: array call, second", base_name="its first")
                      + "; " + agree(array_result, torch_result, "torch"))
    if cuda:
        cases.append((FLOOR, *_autograd_floor(q, graded, dout)))
        cases.append((NATIVE_FLOOR, lambda: (q * 2, dout * 2), lambda: torch.autograd.grad(graded[0] * 2, graded[0], dout)))
    if profile:
        _profile(cases, label=name)
        return
    if breakdown:
        _breakdown(cases, label=name, reps=reps)
        return
    if profile_backward:
        _profile_backward(cases, label=name)
        return
    tiles = "" if tile_shape is None else f" in {tile_shape} tiles"
    label = f"{name}: {seq_shape}{tiles}, {heads}h, D={head_dim}, top {topk}/{plan.num_blocks}"
    extras = {}  # call -> (extra us, array ms) single and back to back
    for what, array_fn, torch_fn in cases:
        (a_gpu, a_host), (t_gpu, t_host) = _time((array_fn, torch_fn), reps, cuda)
        if not cuda:
            print(f"| {label} | {what} | {a_host:.1f} | {t_host:.1f} | {t_host - a_host:+.1f} "
                  f"({100 * (t_host / a_host - 1):+.1f}%) |", flush=True)
            continue
        extras[what] = _cuda_row(label, what, array_fn, torch_fn, (a_gpu, a_host), (t_gpu, t_host), reps)
    if cuda:
        _net_of_floor(label, extras)
    if cuda and graphs:
        _graph_replay(label, torch_train_step, reps)
    if cuda and compiled:
        _compiled_calls(label, cases, (q, k, v, gate), graded, dout, topk, sizes, reps)


def _cuda_row(label: str, what: str, array_fn, torch_fn, array_single, torch_single, reps: int):
    """Print one CUDA table row: the single-call (gpu ms, host us) pairs of :func:`_time`, then
    both functions timed back to back, each way with its verdict."""
    (a_gpu, a_host), (t_gpu, t_host) = array_single, torch_single
    extra_us = (t_gpu - a_gpu) * 1e3
    a_b2b, t_b2b = time_back_to_back((array_fn, torch_fn), min(reps, 20))
    b2b_us = (t_b2b - a_b2b) * 1e3
    print(f"| {label} | {what} | {a_gpu:.3f} | {t_gpu:.3f} | {extra_us:+.1f} ({100 * (t_gpu / a_gpu - 1):+.1f}%) "
          f"| {_verdict(extra_us, a_gpu)} | {a_b2b:.3f} | {t_b2b:.3f} | {b2b_us:+.1f} "
          f"({100 * (t_b2b / a_b2b - 1):+.1f}%) | {_verdict(b2b_us, a_b2b)} | {a_host:.0f} / {t_host:.0f} |",
          flush=True)
    return (extra_us, a_gpu), (b2b_us, a_b2b)


FLOOR = "torch's autograd floor: a Python autograd.Function of q, k, v, gate (one torch op forward, four backward)"
NATIVE_FLOOR = "torch's autograd floor for its own operations: q * 2 and its gradient"


def _autograd_floor(q, graded, dout):
    """(direct, autograd) calls of the same five torch operations: ``q * 2``, then ``dout * 2``
    four times, called directly or as the forward and backward of a Python
    ``torch.autograd.Function`` of four inputs through ``torch.autograd.grad``, as the VSA
    forward + backward row is.  Their difference is what torch's autograd engine costs any such
    node (handing the backward to its device thread, waking the caller), whatever the node does:
    the part of the forward + backward row's extra that no adapter can remove."""
    import torch

    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, gate):
            return q * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * 2, grad * 2, grad * 2, grad * 2

    def direct():
        q * 2
        for _ in range(4):
            dout * 2

    def autograd():
        torch.autograd.grad(Scaled.apply(*graded), graded, dout)

    return direct, autograd


def _net_of_floor(label: str, extras: dict):
    """The forward + backward row's extra less the floor's (see :func:`_autograd_floor`)."""
    (fb_single, fb_ms), (fb_b2b, fb_b2b_ms) = extras["VSA forward + backward"]
    (floor_single, _), (floor_b2b, _) = extras[FLOOR]
    single, b2b = fb_single - floor_single, fb_b2b - floor_b2b
    print(f"| {label} | VSA forward + backward, torch extra less the floor's | | | {single:+.1f} "
          f"| {_verdict(single, fb_ms)} | | | {b2b:+.1f} | {_verdict(b2b, fb_b2b_ms)} | |", flush=True)


def _compiled_calls(label: str, cases, inputs, graded, dout, topk: int, sizes, reps: int):
    """The torch calls of the VSA forward and of forward + backward under
    ``torch.compile(mode="reduce-overhead")``, which records them in CUDA graphs (torch's graph
    trees) and replays them, against the same array calls as the eager rows.  Each call begins a
    new graph-tree step (``torch.compiler.cudagraph_mark_step_begin``), as a training loop's
    iterations do.  The inputs are marked static (``torch._dynamo.mark_static_address``): in a
    compiled model q, k, v and the gate come from projections inside the graph, whereas graph
    inputs that are not static are copied into the graph's own buffers on every replay (at the
    main shape ``aten::_foreach_copy_`` took 0.51 ms per call for the four 151 MB tensors, with
    the VSA kernels' times unchanged).  The output gradient of forward + backward cannot be
    marked (torch copies the backward graph's incoming gradients all the same): that copy, one
    q-sized tensor per call, is counted."""
    import torch
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    import vsa_nd.adapters.torch as vt

    for t in (*inputs, *graded):
        torch._dynamo.mark_static_address(t)
    # With inductor's on-disk graph cache on, a machine that had compiled the same function before
    # without the marks still copied the inputs (torch 2.11, H100, main shape: 4.40 against 3.50
    # ms per forward); compiling afresh avoids that.
    inductor_config.fx_graph_cache = False

    def attention(q, k, v, gate):
        return vt.video_sparse_attn(q, k, v, topk, sizes, gate=gate)

    forward = torch.compile(attention, mode="reduce-overhead", fullgraph=True)
    trained = torch.compile(attention, mode="reduce-overhead", fullgraph=True)

    def compiled_forward():
        torch.compiler.cudagraph_mark_step_begin()
        forward(*inputs)

    def compiled_train_step():
        torch.compiler.cudagraph_mark_step_begin()
        torch.autograd.grad(trained(*graded), graded, dout)

    skips = counters["inductor"]["cudagraph_skips"]
    for (what, array_fn, _), torch_fn in zip((cases[0], cases[2]), (compiled_forward, compiled_train_step)):
        _cuda_row(label, f'{what}, torch.compile(mode="reduce-overhead")', array_fn, torch_fn,
                  *_time((array_fn, torch_fn), reps, True), reps)
    if counters["inductor"]["cudagraph_skips"] != skips:  # the calls above then ran without graphs
        print(f"| {label} | torch.compile skipped CUDA graphs: the compiled rows above are not graph replays "
              f"| | | | | | | | | |", flush=True)


def _graph_replay(label: str, train_step, reps: int):
    """The torch forward + backward captured once in a CUDA graph and replayed (what a host-bound
    training step can do instead of eager calls): CUDA-event time of one replay."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: kernels compile, plans build, allocator pools fill
            train_step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        train_step()
    (replay_ms, _), (eager_ms, _) = _time((graph.replay, train_step), reps, True)
    print(f"| {label} | VSA forward + backward, torch, one CUDA graph replay | | {replay_ms:.3f} | "
          f"eager {eager_ms:.3f} ms: {eager_ms / replay_ms:.1f}x | | | | | | |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--shapes", help="comma-separated names (default: all of the device's)")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--profile", action="store_true", help="print cProfile tables instead of timings")
    parser.add_argument("--breakdown", action="store_true",
                        help="CUDA: host time from the call to the fine kernel's launch, instead of timings")
    parser.add_argument("--graphs", action="store_true",
                        help="CUDA: also time the torch forward + backward replayed from a CUDA graph")
    parser.add_argument("--compiled", action="store_true",
                        help='CUDA: also time the torch calls under torch.compile(mode="reduce-overhead") (CUDA graphs)')
    parser.add_argument("--profile-backward", action="store_true",
                        help="cProfile of the backward alone (the torch one inside autograd's thread)")
    args = parser.parse_args()
    import torch

    cuda = args.device == "cuda"
    shapes = SHAPES if cuda else CPU_SHAPES
    names = args.shapes.split(",") if args.shapes else list(shapes)
    if cuda:
        print(f"# Adapter overhead — {torch.cuda.get_device_name()}, {datetime.date.today()}, commit {commit()}, "
              f"torch {torch.__version__}")
        print(_bfloat16_probe())
        print("| shape | call | array gpu ms | torch gpu ms | torch extra us | within target "
              "| back to back: array ms | torch ms | torch extra us | within target | host us array / torch |")
        print("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | --- |")
    else:
        print(f"# Adapter overhead on CPU (float32, {torch.get_num_threads()} torch threads) — {datetime.date.today()}, "
              f"commit {commit()}, torch {torch.__version__}")
        print("| shape | call | array host us | torch host us | torch extra us |")
        print("| --- | --- | --- | --- | --- |")
    checks: list = []  # lines of bench_shape's result checks, listed after the table
    for name in names:
        bench_shape(name, *shapes[name], reps=args.reps, cuda=cuda, profile=args.profile, breakdown=args.breakdown,
                    profile_backward=args.profile_backward, graphs=args.graphs, compiled=args.compiled, checks=checks)
    print("\n" + "\n".join(f"- {line}" for line in checks))


if __name__ == "__main__":
    main()
