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
