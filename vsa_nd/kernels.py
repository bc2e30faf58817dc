"""Every CUDA kernel instantiation vsa_nd can launch, and how each is compiled.

One :class:`KernelSpec` per source file names the template instantiations to build.  The
same specs and options serve the run-time loader (:func:`get_function`, CuPy) and the CI
compile check (``python -m vsa_nd.compile_check``, no GPU needed).  NVRTC is reached
through CuPy's wrapper when CuPy is installed, else through ``cuda.bindings``.  Cubins
are cached on disk under ``$VSA_ND_CACHE_DIR`` (default ``~/.cache/vsa_nd``), keyed by
the sources, the options and the NVRTC version.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path



def _kernel_dir() -> Path:
    try:  # installed (editable or not): the sources are the package data of vsa_nd.cuda_kernels
        return Path(str(files("vsa_nd.cuda_kernels")))
    except ModuleNotFoundError:  # a source checkout on sys.path without installing
        return Path(__file__).resolve().parent.parent / "cuda_kernels"


KERNEL_DIR = _kernel_dir()

ATTENTION_DTYPES = ("__half", "__nv_bfloat16")
HEAD_DIMS = (64, 128)
DQDS_STAGES = (3,)  # pipeline stages of the bwd_dq_ds_sm90 instantiations (cuda_attention's _DQDS_STAGES)
COPY_UNITS = ("uint4", "uint2", "unsigned int", "unsigned short")  # 16, 8, 4, 2 bytes
GEMM_TILES = ((128, 128), (128, 64), (64, 64))  # (BM, BN) output tiles of gemm_f32.cu (picked per product by the launcher)


@dataclass(frozen=True)
class KernelSpec:
    """One NVRTC program: a source file and the kernels instantiated from it."""

    source: str
    names: tuple
    min_sm: int = 80  # lowest compute capability (x10) it is built for
    needs_sm90a: bool = False  # uses wgmma/setmaxnreg: sm_90a only

    def builds_for(self, arch: str) -> bool:
        sm = int(arch.removeprefix("sm_").rstrip("a"))
        return sm >= self.min_sm and (not self.needs_sm90a or arch == "sm_90a")

    def options(self, arch: str, verbose: bool = False) -> tuple:
        opts = (f"--gpu-architecture={arch}", "-std=c++17", f"-I{KERNEL_DIR}", f"-I{cuda_include_dir()}")
        return opts + (("--ptxas-options=-v",) if verbose else ())


def catalogue() -> list:
    """All kernel programs of the package."""
    dtypes = ("float",) + ATTENTION_DTYPES
    # Elements per vector: one 16-byte load where rows and pointers are 16-byte aligned, else one element.
    vector_widths = [(t, w) for t in dtypes for w in (16 // (4 if t == "float" else 2), 1)]
    return [
        KernelSpec("tile.cu", tuple(f"{k}<{u}>" for k in ("tile_rows", "untile_rows") for u in COPY_UNITS)),
        KernelSpec("block_mean.cu", tuple(f"block_mean<{t}, {w}>" for t, w in vector_widths)),
        KernelSpec("topk.cu", ("select_topk<false>", "select_topk<true>")),
        KernelSpec("softmax.cu", ("softmax_rows", "softmax_grad_rows")),
        KernelSpec("kv_lists.cu",
                   ("kv_lists_clean", "kv_lists_mark", "kv_lists_scan", "kv_lists_write", "kv_lists_rank",
                    "kv_lists_order")),
        KernelSpec(
            "gemm_f32.cu",
            tuple(f"gemm_f32<{ta}, {tb}, {bm}, {bn}>" for ta in ("false", "true") for tb in ("false", "true")
                  for bm, bn in GEMM_TILES),
        ),
        KernelSpec(
            "coarse_grad.cu",
            tuple(f"coarse_grad<{t}, {w}, {g}, false>" for t, w in vector_widths for g in ("false", "true"))
            # with the fine backward's row terms: 16-byte vectors of the attention dtypes only
            + tuple(f"coarse_grad<{t}, 8, {g}, true>" for t in ATTENTION_DTYPES for g in ("false", "true")),
        ),
        KernelSpec(
            "attention_fwd.cu",
            tuple(f"block_sparse_fwd<{t}, {d}>" for t in ATTENTION_DTYPES for d in HEAD_DIMS),
        ),
        KernelSpec(
            "attention_bwd.cu",
            tuple(f"{k}<{t}, {d}>" for k in ("bwd_delta", "bwd_dq", "bwd_dkdv") for t in ATTENTION_DTYPES for d in HEAD_DIMS),
        ),
        KernelSpec(
            "attention_bwd_sm90.cu",
            tuple(f"{k}<{t}, {d}>" for k in ("bwd_dq_sm90", "bwd_dkdv_sm90") for t in ATTENTION_DTYPES for d in HEAD_DIMS)
            + tuple(f"bwd_dq_ds_sm90<{t}, {d}, {s}>" for t in ATTENTION_DTYPES for d in HEAD_DIMS for s in DQDS_STAGES),
            min_sm=90,
            needs_sm90a=True,
        ),
        KernelSpec(
            "attention_fwd_sm90.cu",
            tuple(f"block_sparse_fwd_sm90<{t}, {d}>" for t in ATTENTION_DTYPES for d in HEAD_DIMS),
            min_sm=90,
            needs_sm90a=True,
        ),
    ]


def spec_for(source: str) -> KernelSpec:
    for spec in catalogue():
        if spec.source == source:
            return spec
    raise KeyError(source)


def cuda_include_dir() -> str:
    """Directory holding cuda_fp16.h / cuda_bf16.h: $CUDA_PATH, $CUDA_HOME or /usr/local/cuda."""
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_bf16.h").is_file():
            return str(Path(root) / "include")
    try:
        import cupy

        return str(Path(cupy.cuda.get_cuda_path()) / "include")
    except Exception:  # noqa: BLE001 - any failure means: not found
        raise RuntimeError("CUDA headers not found: set CUDA_PATH to a CUDA toolkit holding include/cuda_bf16.h") from None


class CompileError(RuntimeError):
    pass


def _source_text(spec: KernelSpec) -> str:
    return (KERNEL_DIR / spec.source).read_text()


def _nvrtc_compile(source: str, filename: str, names: tuple, options: tuple):
    """(cubin bytes, {name: lowered name}, log) through CuPy's NVRTC or cuda.bindings."""
    try:
        from cupy_backends.cuda.libs import nvrtc as cnv
    except ImportError:
        cnv = None
    if cnv is not None:
        prog = cnv.createProgram(source, filename, (), ())
        try:
            for n in names:
                cnv.addNameExpression(prog, n)
            try:
                cnv.compileProgram(prog, list(options))
            except cnv.NVRTCError:
                raise CompileError(f"{filename}: NVRTC failed with {options}\n{cnv.getProgramLog(prog)}") from None
            lowered = {n: cnv.getLoweredName(prog, n) for n in names}
            return bytes(cnv.getCUBIN(prog)), lowered, cnv.getProgramLog(prog)
        finally:
            cnv.destroyProgram(prog)

    from cuda.bindings import nvrtc

    def ok(result):
        err, *rest = result
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"{filename}: NVRTC error {err}")
        return rest[0] if len(rest) == 1 else rest

    prog = ok(nvrtc.nvrtcCreateProgram(source.encode(), filename.encode(), 0, [], []))
    try:
        for n in names:
            ok(nvrtc.nvrtcAddNameExpression(prog, n.encode()))
        status = nvrtc.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])[0]
        log = bytearray(ok(nvrtc.nvrtcGetProgramLogSize(prog)))
        nvrtc.nvrtcGetProgramLog(prog, log)
        log = log.rstrip(b"\0").decode()
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"{filename}: NVRTC failed with {options}\n{log}")
        lowered = {n: ok(nvrtc.nvrtcGetLoweredName(prog, n.encode())).decode() for n in names}
        cubin = bytearray(ok(nvrtc.nvrtcGetCUBINSize(prog)))
        nvrtc.nvrtcGetCUBIN(prog, cubin)
        return bytes(cubin), lowered, log
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def nvrtc_version() -> str:
    try:
        from cupy_backends.cuda.libs import nvrtc as cnv

        return "%d.%d" % cnv.getVersion()
    except ImportError:
        from cuda.bindings import nvrtc

        _, major, minor = nvrtc.nvrtcVersion()
        return f"{major}.{minor}"


def compile_spec(spec: KernelSpec, arch: str, verbose: bool = False):
    """Compile one program for ``arch`` (e.g. ``"sm_90a"``): (cubin, lowered names, log)."""
    return _nvrtc_compile(_source_text(spec), spec.source, spec.names, spec.options(arch, verbose))


def _cache_dir() -> Path:
    return Path(os.environ.get("VSA_ND_CACHE_DIR", Path.home() / ".cache" / "vsa_nd"))


def cached_cubin(spec: KernelSpec, arch: str) -> tuple:
    """(path of the cubin on disk, {name: lowered name}), compiling on a cache miss."""
    headers = sorted(p.read_text() for p in KERNEL_DIR.glob("*.cuh"))
    key = hashlib.sha256(
        json.dumps([_source_text(spec), headers, spec.names, spec.options(arch), nvrtc_version()]).encode()
    ).hexdigest()[:32]
    folder = _cache_dir()
    cubin_path, names_path = folder / f"{spec.source}-{arch}-{key}.cubin", folder / f"{spec.source}-{arch}-{key}.json"
    if not (cubin_path.is_file() and names_path.is_file()):
        cubin, lowered, _ = compile_spec(spec, arch)
        folder.mkdir(parents=True, exist_ok=True)
        for path, data in ((cubin_path, cubin), (names_path, json.dumps(lowered).encode())):
            with tempfile.NamedTemporaryFile(dir=folder, delete=False) as f:  # atomic for concurrent runs
                f.write(data)
            os.replace(f.name, path)
    return cubin_path, json.loads(names_path.read_text())


@functools.lru_cache(maxsize=None)
def device_arch(device_id: int) -> str:
    """NVRTC architecture for a CUDA device: ``sm_90a`` on Hopper (wgmma), else ``sm_XY``."""
    import cupy

    cc = cupy.cuda.Device(device_id).compute_capability
    return "sm_90a" if cc == "90" else f"sm_{cc}"


_MODULES: dict = {}


def get_function(source: str, name: str):
    """The kernel ``name`` of ``source`` for CuPy's current device, compiled once and cached."""
    import cupy

    device_id = cupy.cuda.runtime.getDevice()
    key = (source, device_id)
    if key not in _MODULES:
        arch = device_arch(device_id)
        path, lowered = cached_cubin(spec_for(source), arch)
        _MODULES[key] = (cupy.RawModule(path=str(path)), lowered, {})
    module, lowered, functions = _MODULES[key]
    if name not in functions:  # CuPy makes a new handle object per lookup: keep one
        functions[name] = module.get_function(lowered[name])
    return functions[name]
