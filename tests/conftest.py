"""Shared test set-up: the ``gpu`` marker and hypothesis profiles."""

import os

import pytest
from hypothesis import HealthCheck, settings

# Fixtures used with @given only patch idempotent hooks (e.g. output poisoning), so
# function-scoped fixtures are safe to share across examples.
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("default", deadline=None, max_examples=25, suppress_health_check=_QUIET)
settings.register_profile("gpu", deadline=None, max_examples=60, suppress_health_check=_QUIET)
# A long search for rare failures, run by hand: HYPOTHESIS_PROFILE=soak make test (or pytest).
settings.register_profile("soak", deadline=None, max_examples=400, suppress_health_check=_QUIET)
# Few examples, for property tests run under compute-sanitizer (every launch there runs far slower):
# HYPOTHESIS_PROFILE=sanitize.
settings.register_profile("sanitize", deadline=None, max_examples=5, suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def _gpu_available() -> tuple:
    """(whether CuPy sees a GPU, why not)."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0, "CuPy sees no device"
    except Exception as error:  # noqa: BLE001 - no CuPy, no driver or no device: no GPU tests
        return False, f"{type(error).__name__}: {error}"


GPU, _NO_GPU_REASON = _gpu_available()

if GPU and os.environ.get("VSA_ND_CUPY_POOL") == "0":
    # Every CuPy array its own cudaMalloc (no memory pool), so that compute-sanitizer sees an
    # out-of-bounds access at the array's edge.
    import cupy

    cupy.cuda.set_allocator(None)


def pytest_collection_modifyitems(config, items):
    if GPU:
        return
    if os.environ.get("VSA_ND_REQUIRE_GPU") == "1":  # scripts/gpu-check.sh: skipping them all would pass
        raise pytest.UsageError(f"VSA_ND_REQUIRE_GPU=1 but the GPU tests cannot run: {_NO_GPU_REASON}")
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
