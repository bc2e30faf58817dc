"""What an install delivers: kernel sources and adapters in editable installs and wheels, a light
``import vsa_nd``, and a working ``vsa-nd demo``."""

import importlib
import re
import shutil
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import vsa_nd
from vsa_nd import cli, kernels, reference

ROOT = Path(__file__).resolve().parent.parent
KERNEL_SOURCES = sorted(p.name for p in (ROOT / "cuda_kernels").iterdir() if p.suffix in (".cu", ".cuh"))
ADAPTERS = sorted(p.name for p in (ROOT / "adapters").glob("*.py"))


def test_source_tree_has_kernels_and_adapters():
    assert any(name.endswith(".cu") for name in KERNEL_SOURCES), KERNEL_SOURCES
    assert any(name.endswith(".cuh") for name in KERNEL_SOURCES), KERNEL_SOURCES
    assert "__init__.py" in ADAPTERS


def test_editable_install_serves_kernel_sources_and_adapters():
    installed = sorted(p.name for p in kernels.KERNEL_DIR.iterdir() if p.suffix in (".cu", ".cuh"))
    assert installed == KERNEL_SOURCES
    for spec in kernels.catalogue():  # every program the loader may compile has its source
        assert (kernels.KERNEL_DIR / spec.source).is_file(), spec.source
    adapters = importlib.import_module("vsa_nd.adapters")
    assert Path(adapters.__file__).parent.resolve() == (ROOT / "adapters").resolve()


def _setuptools_version() -> tuple:
    """(major, minor) of this interpreter's setuptools, (0, 0) without one."""
    try:
        from importlib.metadata import version

        return tuple(int(part) for part in version("setuptools").split(".")[:2])
    except Exception:  # noqa: BLE001 - absent, or a version string not of numbers
        return (0, 0)


def test_wheel_contains_kernel_sources_adapters_and_the_console_script(tmp_path):
    # Build from a copy: pip builds in the source directory, and others work in this checkout.
    source = tmp_path / "src"
    shutil.copytree(
        ROOT, source,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis",
                                      ".pytest_cache", ".whl"),
    )
    # Without build isolation where this interpreter has a setuptools the build system accepts
    # (pyproject.toml: >= 68) that builds wheels by itself (70.1 and later; before, it needs the
    # `wheel` package): isolation fetches one from the index, which an offline machine (the GPU
    # machine) cannot reach.
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-w", str(tmp_path / "wheels")]
    if _setuptools_version() >= (70, 1):
        command.append("--no-build-isolation")
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheels").glob("vsa_nd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in KERNEL_SOURCES:
        assert f"vsa_nd/cuda_kernels/{name}" in names, name
    for name in ADAPTERS:
        assert f"vsa_nd/adapters/{name}" in names, name
    for name in ("vsa_nd/__init__.py", "vsa_nd/cli.py", "vsa_nd/__main__.py", "vsa_nd/backends/__init__.py"):
        assert name in names, name
    (entry_points,) = (n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert re.search(r"^vsa-nd\s*=\s*vsa_nd\.cli:main$", zipfile.ZipFile(wheel).read(entry_points).decode(), re.M)


def test_import_loads_no_framework_and_no_numba():
    code = (
        "import sys, vsa_nd, vsa_nd.adapters\n"
        "print(sorted(m for m in ('cupy', 'torch', 'jax', 'numba') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_reference_is_reachable_after_import_vsa_nd():
    code = "import vsa_nd; print(vsa_nd.reference.video_sparse_attn.__module__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "vsa_nd.reference"


@pytest.mark.parametrize("framework, extra", [("torch", "torch"), ("jax", "jax")])
def test_an_adapter_without_its_framework_says_which_extra_to_install(framework, extra):
    code = (f"import sys; sys.modules[{framework!r}] = None  # as if it were not installed\n"
            f"import vsa_nd.adapters.{framework}")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert (f"ModuleNotFoundError: vsa_nd.adapters.{framework} needs" in result.stderr
            and f"pip install 'vsa_nd[{extra}]'" in result.stderr), result.stderr


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_an_adapter_whose_framework_lacks_a_dependency_says_so_unchanged(framework, tmp_path):
    """The framework is there but something it imports is not: that error, not 'needs PyTorch'."""
    (tmp_path / framework).mkdir()
    (tmp_path / framework / "__init__.py").write_text("import a_dependency_nobody_has\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = subprocess.run([sys.executable, "-c", f"import vsa_nd.adapters.{framework}"], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 1
    assert "No module named 'a_dependency_nobody_has'" in result.stderr and "needs" not in result.stderr, result.stderr


DEMO_ARGS = ["demo", "--backend", "cpu", "--seq", "5,6,7", "--tile", "2,4,4", "--heads", "4", "--kv-heads", "2",
             "--head-dim", "16", "--sparsity", "0.5", "--repeats", "1"]


def test_demo_runs_checks_and_exits_zero():
    result = subprocess.run([sys.executable, "-m", "vsa_nd", *DEMO_ARGS], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    error = float(re.search(r"max relative error\s+(\S+)", result.stdout).group(1))
    assert error < cli.TOLERANCE["float32"]
    assert re.search(r"topk 6 of 12 key tiles", result.stdout)  # ceil(0.5 * 3*2*2 tiles)
    assert re.search(r"top-k selection\s+0 of 48 rows differ", result.stdout)
    assert "PASS" in result.stdout
    assert "checking against the NumPy reference" in result.stderr  # the progress bars go to stderr


def test_demo_exits_non_zero_when_the_error_exceeds_the_tolerance(monkeypatch, capsys):
    exact = vsa_nd.video_sparse_attn

    def off_by_a_thousandth(*args, **kwargs):
        result = exact(*args, **kwargs)
        (result[0] if isinstance(result, tuple) else result)[...] *= 1.001  # 1e-3 > the float32 tolerance
        return result

    monkeypatch.setattr(vsa_nd, "video_sparse_attn", off_by_a_thousandth)
    assert cli.main(DEMO_ARGS) == 1
    printed = capsys.readouterr().out
    assert 5e-4 < float(re.search(r"max relative error\s+(\S+)", printed).group(1)) < 2e-3
    assert "FAIL" in printed


@pytest.mark.parametrize("seq", ["", "8,,16", "8,16,"])
def test_demo_refuses_empty_sides(seq, capsys):
    """An empty --seq, or an empty side in it, is an error, not the default or a problem of fewer dimensions."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--backend", "cpu", "--seq", seq])
    assert exit_info.value.code == 2
    assert f"argument --seq: expected comma-separated ints like 8,16,16, got {seq!r}" in capsys.readouterr().err


def test_demo_reports_a_problem_too_large_for_memory(monkeypatch, capsys):
    """Out of memory: one line and exit status 2, not a traceback."""
    def too_large(*args, **kwargs):
        raise MemoryError("Unable to allocate 1.00 TiB")

    monkeypatch.setattr(vsa_nd, "video_sparse_attn", too_large)
    assert cli.main(DEMO_ARGS) == 2
    assert capsys.readouterr().err.strip().endswith(
        "vsa-nd demo: not enough memory for this problem; try smaller sizes (Unable to allocate 1.00 TiB)")


@pytest.mark.parametrize("flag", ["--batch", "--heads", "--head-dim"])
def test_demo_reports_sizes_past_what_numpy_can_shape(flag, capsys):
    """Sizes past NumPy's own limits (its ValueErrors "Maximum allowed dimension exceeded", "array
    is too big"): the out-of-memory line and exit status 2, not a traceback."""
    assert cli.main(["demo", "--backend", "cpu", "--seq", "4,4,4", flag, str(10**20)]) == 2
    assert "vsa-nd demo: not enough memory for this problem; try smaller sizes" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [("--seq", "-8,16,16", "--seq: seq_shape: expected every side >= 1"),
                                                  ("--tile", "-4,4,4", "--tile: tile_shape: expected every side >= 1")])
def test_demo_names_a_negative_side(flag, value, message, capsys):
    """A negative first side, given as its own argument, reaches vsa_nd's message (argparse alone
    would say "expected one argument")."""
    assert cli.main(["demo", "--backend", "cpu", "--seq", "8,16,16", flag, value]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--seq", "4,8,8,8"], "vsa-nd demo: --tile: tile_shape: no default for a 4-D seq_shape"),
    (["--sparsity", "2"], "vsa-nd demo: --sparsity: sparsity: expected a value in [0, 1], got 2.0"),
])
def test_demo_errors_name_the_flag(args, message, capsys):
    assert cli.main(["demo", "--backend", "cpu", *args]) == 2
    assert message in capsys.readouterr().err


def test_demo_refuses_a_problem_larger_than_the_memory_before_starting(monkeypatch, capsys):
    """A problem whose arrays would not fit is refused with the out-of-memory line before the plan
    is built (whose index arrays alone could exhaust the memory): not killed half-way."""
    monkeypatch.setattr(cli.Device, "memory_bytes", lambda self: 100 * 2**10)  # a 100 KiB machine
    monkeypatch.setattr(vsa_nd, "tile_plan", None)  # (never reached)
    assert cli.main(DEMO_ARGS) == 2
    assert capsys.readouterr().err.strip().endswith(
        "vsa-nd demo: not enough memory for this problem; try smaller sizes "
        "(1 x 4 x 210 x 16 elements per array: about 1.3 MiB, against 100.0 KiB here)")
    monkeypatch.undo()
    assert cli.Device("cpu").memory_bytes() > 2**28  # the real one: this machine's physical memory


def test_demo_skips_dense_timing_past_its_cpu_budget(monkeypatch, capsys):
    monkeypatch.setattr(cli, "CPU_DENSE_BUDGET", 0.0)
    assert cli.main(DEMO_ARGS) == 0
    printed = capsys.readouterr().out
    assert re.search(r"dense attention time\s+not timed: 1.1e-05 TFLOP a call, past the CPU demo's budget of 0 TFLOP",
                     printed)
    assert re.search(r"speed-up over dense\s+-", printed) and "PASS" in printed


@pytest.mark.parametrize("seed", ["-1", "x"])
def test_demo_refuses_a_bad_seed(seed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--backend", "cpu", "--seed", seed])
    assert exit_info.value.code == 2
    assert f"argument --seed: expected a non-negative int, got {seed!r}" in capsys.readouterr().err


def _demo_output(args, capsys, expected_code=0):
    assert cli.main(args) == expected_code
    return capsys.readouterr().out


def _field(printed, name):
    return re.search(rf"^  {re.escape(name)}\s+(.*)$", printed, re.M).group(1)


@pytest.mark.parametrize("flag", ["--heads", "--kv-heads", "--head-dim", "--batch", "--repeats"])
def test_demo_refuses_a_count_below_one(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--backend", "cpu", flag, "0"])
    assert exit_info.value.code == 2
    assert f"argument {flag}: expected a positive int, got '0'" in capsys.readouterr().err


def test_demo_says_kv_heads_must_divide_heads(capsys):
    assert cli.main(["demo", "--backend", "cpu", "--seq", "4,4,4", "--heads", "4", "--kv-heads", "3"]) == 2
    assert "vsa-nd demo: --kv-heads 3 must divide --heads 4" in capsys.readouterr().err


@pytest.mark.skipif(cli._cuda_available(), reason="a CUDA GPU is present")
def test_demo_on_cuda_without_a_gpu_says_what_it_needs(capsys):
    assert cli.main(["demo", "--backend", "cuda", "--seq", "4,4,4"]) == 2
    assert "vsa-nd demo: --backend cuda needs CuPy, a CUDA GPU" in capsys.readouterr().err


def test_demo_takes_sides_joined_by_x_and_sparsity_zero(capsys):
    printed = _demo_output(["demo", "--backend", "cpu", "--seq", "5x6x7", "--tile", "2x4x4", "--heads", "2",
                            "--head-dim", "8", "--sparsity", "0", "--repeats", "1"], capsys)
    assert "seq (5, 6, 7) = 210, tile (2, 4, 4): 12 tiles" in _field(printed, "tokens")
    assert _field(printed, "selection") == "sparsity 0 -> topk 12 of 12 key tiles"


def test_demo_draws_its_inputs_from_the_seed(capsys):
    errors = [_field(_demo_output(DEMO_ARGS + ["--seed", seed], capsys), "max relative error") for seed in ("0", "7", "0")]
    assert errors[0] == errors[2] != errors[1]


def test_demo_reports_the_speed_up_as_dense_over_vsa(capsys):
    printed = _demo_output(DEMO_ARGS, capsys)
    vsa = float(_field(printed, "VSA time").split()[0])
    dense = float(_field(printed, "dense attention time").split()[0])
    speed_up = float(_field(printed, "speed-up over dense").rstrip("x"))
    half = 0.005  # each figure is printed to two decimals
    assert (dense - half) / (vsa + half) - half <= speed_up <= (dense + half) / max(vsa - half, 1e-9) + half


@pytest.mark.parametrize("factor, code", [(1 + 2e-4, 1), (1 + 2e-5, 0)])
def test_demo_fails_just_above_its_tolerance_and_passes_just_below(factor, code, monkeypatch, capsys):
    """The float32 tolerance is 1e-4: an output off by 2e-4 fails, one off by 2e-5 passes."""
    exact = vsa_nd.video_sparse_attn

    def scaled(*args, **kwargs):
        result = exact(*args, **kwargs)
        (result[0] if isinstance(result, tuple) else result)[...] *= factor
        return result

    monkeypatch.setattr(vsa_nd, "video_sparse_attn", scaled)
    printed = _demo_output(DEMO_ARGS, capsys, code)
    assert ("FAIL: error above tolerance" in printed) == (code == 1)


def test_demo_fails_on_a_selection_that_differs(monkeypatch, capsys):
    checked = cli.check_against_reference
    monkeypatch.setattr(cli, "check_against_reference", lambda *a: dict(checked(*a), bad_rows=1))
    printed = _demo_output(DEMO_ARGS, capsys, 1)
    assert _field(printed, "result") == "FAIL: top-k selection differs"


def test_demo_checks_a_spread_of_tiles_past_its_budget_and_says_so(monkeypatch, capsys):
    assert list(cli._tiles_to_check(1, 1, 1000, 64, 4096)[[0, -1]]) == [0, 999]
    monkeypatch.setattr(cli, "REFERENCE_BUDGET", 1)  # one tile's worth or less: still the first and the last
    assert list(cli._tiles_to_check(1, 1, 12, 8, 96)) == [0, 11]
    printed = _demo_output(DEMO_ARGS, capsys)
    assert _field(printed, "query tiles checked") == "2 of 12 (spread; the reference is dense, O(S^2))"


def test_selection_check_forgives_rounding_and_nothing_more():
    """A chosen tile may score below an unchosen one by the coarse stage's rounding (1e-4 of the
    scores' scale), not by more."""
    idx, num = np.array([[[1]]]), np.array([[1]])
    assert cli._selection_mismatches(np.array([[[1.0, 1 - 1e-6, 0.0]]]), idx, num) == 0
    assert cli._selection_mismatches(np.array([[[1.0, 0.95, 0.0]]]), idx, num) == 1


def test_reference_check_is_relative_to_the_output_s_scale():
    rng = np.random.default_rng(1)
    volume, sizes, topk = 8, np.array([8, 8, 8]), 2
    q, k, v = rng.standard_normal((3, 1, 2, 24, 8))
    errors = []
    for magnitude in (1.0, 1000.0):
        expect = reference.video_sparse_attn(q, k, v * magnitude, sizes, sizes, topk, volume)
        errors.append(cli.check_against_reference(q, k, v * magnitude, expect.out * (1 + 1e-5),
                                                  (expect.q2k_idx, expect.q2k_num), sizes, sizes, topk, volume,
                                                  np.arange(3))["max_rel"])
    assert errors[0] == pytest.approx(1e-5, rel=1e-3) and errors[1] == pytest.approx(errors[0], rel=1e-6)


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("vsa-nd")
    result = subprocess.run([str(script), "demo", "--help"], capture_output=True, text=True, check=True)
    for flag in ("--seq", "--tile", "--heads", "--kv-heads", "--head-dim", "--batch", "--sparsity", "--dtype",
                 "--backend", "--repeats"):
        assert flag in result.stdout


def test_reference_check_catches_a_wrong_output_and_a_wrong_selection():
    rng = np.random.default_rng(0)
    volume, q_sizes, kv_sizes, topk = 8, np.array([8, 5, 8]), np.array([8, 8, 3, 8]), 2
    q = rng.standard_normal((1, 4, 24, 16))
    k, v = rng.standard_normal((2, 1, 2, 32, 16))
    expect = reference.video_sparse_attn(q, k, v, q_sizes, kv_sizes, topk, volume)
    selection = (expect.q2k_idx, expect.q2k_num)

    def check(out, selection=selection, tiles=np.arange(3)):
        return cli.check_against_reference(q, k, v, out, selection, q_sizes, kv_sizes, topk, volume, tiles)

    good = check(expect.out)
    assert good["max_rel"] < 1e-12 and good["bad_rows"] == 0 and good["rows"] == 4 * 3
    wrong = expect.out.copy()
    wrong[0, 3, 9] *= 1.01  # a real row of tile 1
    assert check(wrong)["max_rel"] > 1e-3
    assert check(wrong, tiles=np.array([0, 2]))["max_rel"] < 1e-12  # tile 1 not checked
    pad_only = expect.out.copy()
    pad_only[0, 2, 14] += 1.0  # a pad row of tile 1: untile drops it
    assert check(pad_only)["max_rel"] < 1e-12
    # One row takes its worst key tile instead of its best: the output matches a reference run with
    # that selection, but the selection check must flag the row.
    idx = expect.q2k_idx.copy()
    worst = np.argmin(expect.scores[0, 1, 2])
    assert worst not in idx[0, 1, 2]
    idx[0, 1, 2, np.argmax(expect.scores[0, 1, 2, idx[0, 1, 2]])] = worst
    out = reference.video_sparse_attn(q, k, v, q_sizes, kv_sizes, topk, volume, q2k_idx=idx, q2k_num=expect.q2k_num).out
    bad = check(out, selection=(idx, expect.q2k_num))
    assert bad["bad_rows"] == 1 and bad["max_rel"] < 1e-12


def test_no_module_defines_a_name_twice_at_its_top_level():
    """A second ``def test_x`` silently replaces the first, which then never runs (it happened
    once); the same goes for any function or class of the package.  torch's ``register_fake``
    idiom (``def _``) is the one exception."""
    import ast

    repeated = []
    for path in sorted([*(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
                        *(ROOT / "vsa_nd").rglob("*.py"), *(ROOT / "adapters").glob("*.py")]):
        seen = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name != "_":
                if node.name in seen:
                    repeated.append(f"{path.relative_to(ROOT)}: {node.name}")
                seen.add(node.name)
    assert not repeated, repeated


# What each Python block of the README must leave behind, checked after it runs (keyed by the
# framework the block imports).
README_CHECKS = {
    "numpy": "assert out.shape == q.shape and np.isfinite(out).all()\n"
             "assert [g.shape for g in (grads.dq, grads.dk, grads.dv)] == [qt.shape, kt.shape, vt.shape]\n",
    "torch": "assert out.shape == q.shape and torch.isfinite(out).all()\n"
             "assert qt.shape == (1, 4, meta.plan.padded_len, 64)\n",
    "jax": "import numpy as np\n"
           "assert dq.shape == q.shape and np.isfinite(np.asarray(dq)).all()\n"
           "assert np.array_equal(np.asarray(dq), np.asarray(dq_jit))\n",
}


def test_the_readme_python_examples_run_as_written():
    """Every ```python block of README.md runs in a fresh process (JAX on its CPU, where the
    block's float32 runs; torch on CUDA where it sees one) and leaves the arrays it shows."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    kinds = ["jax" if "import jax" in b else "torch" if "import torch" in b else "numpy" for b in blocks]
    assert sorted(kinds) == sorted(README_CHECKS), kinds
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for block, kind in zip(blocks, kinds):
        result = subprocess.run([sys.executable, "-c", block + README_CHECKS[kind]], capture_output=True, text=True,
                                timeout=300, env=env)
        assert result.returncode == 0, f"the README's {kind} example:\n{block}\n{result.stderr[-3000:]}"
