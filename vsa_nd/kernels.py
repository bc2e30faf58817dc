"""Every CUDA kernel instantiation vsa_nd can launch, and how each is compiled.

One :class:`KernelSpec` per source file names the template instantiations to build.  The
same specs and options serve the run-time loader (:func:`get_function`, CuPy) and the CI
compile check (``python -m vsa_nd.compile_check``, no GPU needed).  NVRTC is reached
through CuPy's wrapper when CuPy is installed, else through ``cuda.bindings``.

Cubins are cached on disk under ``$VSA_ND_CACHE_DIR`` (default ``$XDG_CACHE_HOME/vsa_nd``
or ``~/.cache/vsa_nd``; where that cannot be written, a folder of the user's in the
temporary directory), keyed by the source and vsa_nd's headers (read once and handed to
NVRTC in memory, so what is compiled is what the key was made of), the options, the NVRTC
version and the CUDA headers the sources include.  An entry is a cubin and a ``.json``
holding its lowered names and SHA-256, written after the cubin (each through a temporary
file and a rename, so a reader never sees a partial file); an entry whose digest does not
match is compiled again.  One thread and one process at a time compile a given entry (a lock,
and ``flock`` on a lock file); the others then read what it wrote.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: the thread lock alone (concurrent processes may then compile twice)
    fcntl = None



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


def padded_head_dim(head_dim: int):
    """The smallest head dim of the attention kernels at or above ``head_dim`` (None past the
    largest): what a head dim they lack can be zero-padded to, exactly (zero columns of q and k
    change no score given the real head dim's scale, zero columns of v give zero output columns)."""
    for dim in HEAD_DIMS:  # (ascending; a plain loop, which torch.compile traces, unlike min(..., default=))
        if dim >= head_dim:
            return dim
    return None


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
        # vsa_nd's own headers go to NVRTC in memory (see kernel_headers); no -I for their folder.
        opts = (f"--gpu-architecture={arch}", "-std=c++17", f"-I{cuda_include_dir()}")
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
    return (KERNEL_DIR / spec.source).read_text(encoding="utf-8")


def kernel_headers() -> dict:
    """{include name: text} of vsa_nd's headers (``cuda_kernels/*.cuh``), read now.  NVRTC gets
    them in memory, so a compilation sees exactly the text its cache key was made of."""
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(KERNEL_DIR.glob("*.cuh"))}


def _nvrtc_compile(source: str, filename: str, names: tuple, options: tuple, headers: dict):
    """(cubin bytes, {name: lowered name}, log) through CuPy's NVRTC or cuda.bindings;
    ``headers`` ({include name: text}) are the program's headers in memory."""
    try:
        from cupy_backends.cuda.libs import nvrtc as cnv
    except ImportError:
        cnv = None
    if cnv is not None:
        # (CuPy takes the headers and their names as bytes, the source and file name as str)
        prog = cnv.createProgram(source, filename, tuple(h.encode() for h in headers.values()),
                                 tuple(n.encode() for n in headers))
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

    prog = ok(nvrtc.nvrtcCreateProgram(source.encode(), filename.encode(), len(headers),
                                       [h.encode() for h in headers.values()], [n.encode() for n in headers]))
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


def compile_spec(spec: KernelSpec, arch: str, verbose: bool = False, source: str | None = None,
                 headers: dict | None = None):
    """Compile one program for ``arch`` (e.g. ``"sm_90a"``): (cubin, lowered names, log).

    ``source`` and ``headers`` (:func:`kernel_headers`): the program's text and vsa_nd's headers
    when the caller has read them already (default: read them now).
    """
    text = _source_text(spec) if source is None else source
    headers = kernel_headers() if headers is None else headers
    return _nvrtc_compile(text, spec.source, spec.names, spec.options(arch, verbose), headers)


# The CUDA headers the kernels include (cuda_fp16.h, cuda_bf16.h and what they pull in): their
# text goes into the cache key, so a toolkit changed in place does not serve stale cubins.
_TOOLKIT_HEADERS = ("cuda.h", "cuda_fp16.h", "cuda_fp16.hpp", "cuda_bf16.h", "cuda_bf16.hpp")


@functools.cache
def _toolkit_digest(include_dir: str) -> str:
    digest = hashlib.sha256()
    for name in _TOOLKIT_HEADERS:
        path = Path(include_dir) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _cache_dirs() -> list:
    """Where cubins may be cached, best first: $VSA_ND_CACHE_DIR, else $XDG_CACHE_HOME/vsa_nd or
    ~/.cache/vsa_nd (no home directory: none of these); then a folder of this user's in the
    temporary directory, for a cache that cannot be written."""
    configured = os.environ.get("VSA_ND_CACHE_DIR")
    if configured:
        first = [Path(configured)]
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        first = [Path(base) / "vsa_nd"] if os.path.isabs(base) else []  # "~" unexpanded: no home
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return first + [Path(tempfile.gettempdir()) / f"vsa_nd-{user}"]


def _read_entry(cubin_path: Path, names_path: Path):
    """The lowered names of a complete cache entry, else None (missing, unreadable or damaged)."""
    try:
        meta = json.loads(names_path.read_text(encoding="utf-8"))
        digest = hashlib.sha256(cubin_path.read_bytes()).hexdigest()
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("sha256") != digest or not isinstance(meta.get("lowered"), dict):
        return None
    return meta["lowered"]


def _write_file(path: Path, data: bytes):
    """``data`` into ``path`` through a temporary file in its folder, flushed to disk and renamed
    over it (readers see the old file or the new one, never part of one); readable by all."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600: a cache built by one user may be read by another
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


_COMPILE_LOCK = threading.Lock()


def cached_cubin(spec: KernelSpec, arch: str) -> tuple:
    """(path of the cubin on disk, {name: lowered name}), compiling on a cache miss."""
    # Read once: what a miss compiles is exactly what the key was made of.
    source, headers = _source_text(spec), kernel_headers()
    options = spec.options(arch)
    key = hashlib.sha256(
        json.dumps([source, sorted(headers.items()), spec.names, options, nvrtc_version(),
                    _toolkit_digest(cuda_include_dir())]).encode()
    ).hexdigest()[:32]
    stem = f"{spec.source}-{arch}-{key}"

    def entry(folder: Path) -> tuple:  # (cubin, .json) of this key in ``folder``
        return folder / f"{stem}.cubin", folder / f"{stem}.json"

    folders = _cache_dirs()  # one list for both loops: the folders read are those written
    for folder in folders:
        cubin_path, names_path = entry(folder)
        lowered = _read_entry(cubin_path, names_path)
        if lowered is not None:
            return cubin_path, lowered
    errors = []
    for folder in folders:
        cubin_path, names_path = entry(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with _COMPILE_LOCK, open(folder / f".{stem}.lock", "a") as lock:
                if fcntl is not None:
                    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                lowered = _read_entry(cubin_path, names_path)  # another thread or process may have written it
                if lowered is None:
                    cubin, lowered, _ = compile_spec(spec, arch, source=source, headers=headers)
                    _write_file(cubin_path, cubin)
                    meta = {"lowered": lowered, "sha256": hashlib.sha256(cubin).hexdigest()}
                    _write_file(names_path, json.dumps(meta).encode())  # last: it marks the entry complete
            if errors:
                warnings.warn(f"vsa_nd: cannot write the kernel cache ({'; '.join(errors)}); using {folder} "
                              "(set VSA_ND_CACHE_DIR to a writable folder)", RuntimeWarning, stacklevel=3)
            return cubin_path, lowered
        except OSError as e:
            errors.append(f"{folder}: {e}")
    raise RuntimeError("vsa_nd: no writable folder for the kernel cache: " + "; ".join(errors)
                       + " (set VSA_ND_CACHE_DIR to a writable folder)")


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
        arch, spec = device_arch(device_id), spec_for(source)
        if not spec.builds_for(arch):
            need = "sm_90a (an H100 or H200)" if spec.needs_sm90a else f"compute capability {spec.min_sm / 10:.1f} or higher"
            raise RuntimeError(f"{source}: vsa_nd's CUDA kernels need {need}; device {device_id} is {arch}")
        path, lowered = cached_cubin(spec, arch)
        _MODULES[key] = (cupy.RawModule(path=str(path)), lowered, {})
    module, lowered, functions = _MODULES[key]
    if name not in functions:  # CuPy makes a new handle object per lookup: keep one
        functions[name] = module.get_function(lowered[name])
    return functions[name]
