"""The on-disk cubin cache of vsa_nd.kernels (no GPU: NVRTC is replaced by a stub that counts
its calls): entries are reused, damaged ones rebuilt, an unwritable folder falls back to the
temporary directory, and threads that miss together compile once."""

import hashlib
import json
import os
import stat
import sys
import threading
import time

import pytest

from vsa_nd import kernels

SPEC = kernels.spec_for("tile.cu")


@pytest.fixture
def nvrtc(monkeypatch, tmp_path):
    """A stub compile_spec (its calls counted) and a temporary directory of the test's own."""
    calls = []

    def compile_spec(spec, arch, verbose=False, source=None, headers=None):
        # the texts the cache key was made of
        assert source == kernels._source_text(spec) and headers == kernels.kernel_headers()
        calls.append((spec.source, arch))
        time.sleep(0.05)  # long enough for threads that miss together to overlap
        return b"cubin of " + spec.source.encode() + os.urandom(64), {n: f"_lowered_{i}" for i, n in enumerate(spec.names)}, ""

    monkeypatch.setattr(kernels, "compile_spec", compile_spec)
    monkeypatch.setattr(kernels.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("VSA_ND_CACHE_DIR", str(tmp_path / "cache"))
    return calls


def test_an_entry_is_compiled_once_then_read(nvrtc, tmp_path):
    path, lowered = kernels.cached_cubin(SPEC, "sm_80")
    assert path.parent == tmp_path / "cache" and len(nvrtc) == 1
    assert kernels.cached_cubin(SPEC, "sm_80") == (path, lowered) and len(nvrtc) == 1
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta == {"lowered": lowered, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    for f in (path, path.with_suffix(".json")):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644  # a cache one user builds, another may read
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    kernels.cached_cubin(SPEC, "sm_90a")  # another architecture: another entry
    assert len(nvrtc) == 2


@pytest.mark.parametrize("damage", ["truncated cubin", "empty cubin", "truncated json", "json of another cubin"])
def test_a_damaged_entry_is_compiled_again(nvrtc, damage):
    path, lowered = kernels.cached_cubin(SPEC, "sm_80")
    names = path.with_suffix(".json")
    if damage == "truncated cubin":
        path.write_bytes(path.read_bytes()[:10])
    elif damage == "empty cubin":
        path.write_bytes(b"")
    elif damage == "truncated json":
        names.write_text(names.read_text()[:17])
    else:
        names.write_text(json.dumps({"lowered": lowered, "sha256": hashlib.sha256(b"other").hexdigest()}))
    again, lowered_again = kernels.cached_cubin(SPEC, "sm_80")
    assert len(nvrtc) == 2 and again == path and lowered_again == lowered
    assert json.loads(names.read_text())["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_unwritable_cache_falls_back_to_the_temporary_directory(nvrtc, monkeypatch, tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("VSA_ND_CACHE_DIR", str(blocker / "cache"))  # mkdir fails, even as root
    with pytest.warns(RuntimeWarning, match="cannot write the kernel cache.*VSA_ND_CACHE_DIR"):
        path, _ = kernels.cached_cubin(SPEC, "sm_80")
    assert path.parent.parent == tmp_path / "tmp" and path.parent.name.startswith("vsa_nd-")
    kernels.cached_cubin(SPEC, "sm_80")  # found there next time, without a warning or a compile
    assert len(nvrtc) == 1


def test_threads_that_miss_together_compile_once(nvrtc):
    results = []
    threads = [threading.Thread(target=lambda: results.append(kernels.cached_cubin(SPEC, "sm_80"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(nvrtc) == 1 and len(results) == 4 and all(r == results[0] for r in results)


def test_cupy_nvrtc_wrapper_gets_the_headers_as_bytes(monkeypatch):
    """CuPy's createProgram (Cython) takes the source and file name as str and the in-memory
    headers and their include names as bytes; str headers raise a TypeError there (found on the
    GPU machine).  A stand-in with those types checks what _nvrtc_compile hands it."""
    import types

    calls = {}

    def create_program(src, name, headers, include_names):
        assert isinstance(src, str) and isinstance(name, str)
        assert all(isinstance(x, bytes) for x in (*headers, *include_names)), "headers must be bytes for CuPy"
        calls["headers"] = dict(zip(include_names, headers))
        return 1

    nvrtc = types.SimpleNamespace(
        NVRTCError=RuntimeError, createProgram=create_program, addNameExpression=lambda prog, n: None,
        compileProgram=lambda prog, options: None, getLoweredName=lambda prog, n: "_lowered_" + n,
        getCUBIN=lambda prog: b"cubin", getProgramLog=lambda prog: "", destroyProgram=lambda prog: None)
    libs = types.ModuleType("cupy_backends.cuda.libs")
    libs.nvrtc = nvrtc
    for name, module in (("cupy_backends", types.ModuleType("cupy_backends")),
                         ("cupy_backends.cuda", types.ModuleType("cupy_backends.cuda")),
                         ("cupy_backends.cuda.libs", libs), ("cupy_backends.cuda.libs.nvrtc", nvrtc)):
        monkeypatch.setitem(sys.modules, name, module)
    cubin, lowered, _ = kernels._nvrtc_compile("src", "x.cu", ("k<int>",), ("-arch",), {"a.cuh": "// a\n"})
    assert cubin == b"cubin" and lowered == {"k<int>": "_lowered_k<int>"}
    assert calls["headers"] == {b"a.cuh": b"// a\n"}


# ---------------------------------------------------------------------------------------
# What an entry is keyed by, where the cache lies, and what the catalogue and NVRTC give
# (from a mutation audit of kernels.py: each test fails a change its name describes).


def _edit(monkeypatch, what):
    """Change one input of the cache key the way an edit of the tree or the toolchain would."""
    if what == "source":
        text = kernels._source_text(SPEC) + "\n// edited\n"
        monkeypatch.setattr(kernels, "_source_text", lambda spec: text)
    elif what == "header":
        headers = kernels.kernel_headers()
        headers["common.cuh"] += "\n// edited\n"
        monkeypatch.setattr(kernels, "kernel_headers", lambda: dict(headers))
    elif what == "options":
        options = kernels.KernelSpec.options
        monkeypatch.setattr(kernels.KernelSpec, "options", lambda self, arch, verbose=False: (*options(self, arch, verbose), "-DX=1"))
    else:  # another NVRTC
        monkeypatch.setattr(kernels, "nvrtc_version", lambda: "99.9")


@pytest.mark.parametrize("what", ["source", "header", "options", "nvrtc"])
def test_an_entry_is_rebuilt_when_what_it_was_built_from_changes(nvrtc, monkeypatch, what):
    first, _ = kernels.cached_cubin(SPEC, "sm_80")
    _edit(monkeypatch, what)
    second, _ = kernels.cached_cubin(SPEC, "sm_80")
    assert len(nvrtc) == 2 and second != first


def test_other_kernel_names_get_an_entry_of_their_own(nvrtc):
    import dataclasses

    kernels.cached_cubin(SPEC, "sm_80")
    fewer = dataclasses.replace(SPEC, names=SPEC.names[:1])
    _, lowered = kernels.cached_cubin(fewer, "sm_80")
    assert set(lowered) == set(fewer.names) and len(nvrtc) == 2


@pytest.mark.parametrize("header", ["cuda_fp16.h", "cuda_fp16.hpp", "cuda_bf16.h", "cuda_bf16.hpp"])
def test_an_entry_is_rebuilt_when_a_cuda_header_changes(nvrtc, monkeypatch, tmp_path, header):
    include = tmp_path / "cuda" / "include"
    include.mkdir(parents=True)
    for name in ("cuda.h", "cuda_fp16.h", "cuda_fp16.hpp", "cuda_bf16.h", "cuda_bf16.hpp"):
        (include / name).write_text("// " + name)
    monkeypatch.setenv("CUDA_PATH", str(tmp_path / "cuda"))
    kernels._toolkit_digest.cache_clear()
    try:
        kernels.cached_cubin(SPEC, "sm_80")
        (include / header).write_text("// changed in place")
        kernels._toolkit_digest.cache_clear()
        kernels.cached_cubin(SPEC, "sm_80")
    finally:
        kernels._toolkit_digest.cache_clear()
    assert len(nvrtc) == 2


def test_an_entry_whose_names_are_not_a_mapping_is_rebuilt(nvrtc):
    path, lowered = kernels.cached_cubin(SPEC, "sm_80")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_suffix(".json").write_text(json.dumps({"lowered": list(lowered), "sha256": digest}))
    assert kernels.cached_cubin(SPEC, "sm_80")[1] == lowered and len(nvrtc) == 2


def test_cuda_path_wins_over_cuda_home(monkeypatch, tmp_path):
    for name in ("a", "b"):
        (tmp_path / name / "include").mkdir(parents=True)
        (tmp_path / name / "include" / "cuda_bf16.h").write_text("")
    monkeypatch.setenv("CUDA_PATH", str(tmp_path / "a"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "b"))
    assert kernels.cuda_include_dir() == str(tmp_path / "a" / "include")


def test_the_cache_lies_under_xdg_cache_home_or_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("VSA_ND_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kernels._cache_dirs()[0] == tmp_path / "xdg" / "vsa_nd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert kernels._cache_dirs()[0] == tmp_path / "home" / ".cache" / "vsa_nd"


def test_each_program_builds_for_the_architectures_it_is_written_for():
    hopper = kernels.spec_for("attention_fwd_sm90.cu")
    assert SPEC.builds_for("sm_80") and SPEC.builds_for("sm_86") and not SPEC.builds_for("sm_75")
    assert hopper.builds_for("sm_90a") and not hopper.builds_for("sm_90") and not hopper.builds_for("sm_100")


def test_the_catalogue_holds_what_the_backends_ask_for():
    names = {spec.source: set(spec.names) for spec in kernels.catalogue()}
    assert {"select_topk<false>", "select_topk<true>"} <= names["topk.cu"]
    assert {"block_mean<float, 4>", "block_mean<__half, 8>", "block_mean<__nv_bfloat16, 1>"} <= names["block_mean.cu"]
    assert {f"block_sparse_fwd<{t}, {d}>" for t in ("__half", "__nv_bfloat16") for d in (64, 128)} <= \
        names["attention_fwd.cu"]


def test_a_verbose_compile_reports_registers():
    """compile_check reads registers, spills and wgmma serialization from ptxas's verbose log."""
    assert "--ptxas-options=-v" in SPEC.options("sm_80", verbose=True)
    log = kernels.compile_spec(SPEC, "sm_80", verbose=True)[2]
    assert "Used" in log and "registers" in log


def test_compile_spec_compiles_the_texts_it_is_given_and_reports_nvrtcs_log():
    with pytest.raises(kernels.CompileError, match="marker_source"):
        kernels.compile_spec(SPEC, "sm_80", source='#error "marker_source"\n')
    headers = kernels.kernel_headers()
    headers["common.cuh"] = '#error "marker_header"\n'
    with pytest.raises(kernels.CompileError, match="marker_header"):
        kernels.compile_spec(SPEC, "sm_80", headers=headers)


def test_lowered_names_are_strings_an_entry_can_store():
    _, lowered, _ = kernels.compile_spec(kernels.spec_for("topk.cu"), "sm_80")
    assert set(lowered) == {"select_topk<false>", "select_topk<true>"}
    assert all(isinstance(v, str) and v.startswith("_Z") for v in lowered.values())
    json.dumps(lowered)


def test_the_nvrtc_version_has_its_major_and_minor():
    try:  # the library nvrtc_version itself asks first
        from cupy_backends.cuda.libs import nvrtc as cupy_nvrtc

        major, minor = cupy_nvrtc.getVersion()
    except ImportError:
        from cuda.bindings import nvrtc

        _, major, minor = nvrtc.nvrtcVersion()
    assert kernels.nvrtc_version() == f"{major}.{minor}"


def _stand_in_cupy(monkeypatch, compute_capability):
    """A cupy module of one or more stand-in devices (the current one in state["device"]) whose
    RawModule records the cubins it loads."""
    import types

    state = {"device": 0, "loaded": []}

    class RawModule:
        def __init__(self, path):
            state["loaded"].append(path)

        def get_function(self, name):
            return name

    cupy = types.ModuleType("cupy")
    cupy.RawModule = RawModule
    cupy.cuda = types.SimpleNamespace(
        Device=lambda i: types.SimpleNamespace(compute_capability=compute_capability),
        runtime=types.SimpleNamespace(getDevice=lambda: state["device"]))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    kernels.device_arch.cache_clear()
    monkeypatch.setattr(kernels, "_MODULES", {})
    return state


def test_a_hopper_gpu_gets_sm_90a(monkeypatch):
    _stand_in_cupy(monkeypatch, "90")
    try:
        assert kernels.device_arch(0) == "sm_90a"
    finally:
        kernels.device_arch.cache_clear()


def test_each_gpu_loads_its_own_module(monkeypatch, nvrtc):
    state = _stand_in_cupy(monkeypatch, "80")
    try:
        kernels.get_function("tile.cu", "tile_rows<uint4>")
        state["device"] = 1
        kernels.get_function("tile.cu", "tile_rows<uint4>")
    finally:
        kernels.device_arch.cache_clear()
    assert len(state["loaded"]) == 2
