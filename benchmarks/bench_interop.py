"""Host cost of the torch <-> CuPy building blocks the PyTorch adapter uses on CUDA (microseconds per call).

Views of a torch tensor as a CuPy array and back, and allocations through torch's caching
allocator, each timed as the median of many batches of back-to-back calls (host time only:
nothing here launches work on the GPU).  Used to choose how the adapter converts and allocates.

    python benchmarks/bench_interop.py
"""

from __future__ import annotations

import datetime
import statistics
import time
import warnings

from _common import commit


def _us(fn, calls: int = 2000, batches: int = 7) -> float:
    for _ in range(100):
        fn()
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def main():
    import cupy
    import torch
    from cupy.cuda import MemoryPointer, UnownedMemory
    from cupy.cuda.memory import PythonFunctionAllocator

    print(f"# torch <-> CuPy host costs — {torch.cuda.get_device_name()}, {datetime.date.today()}, commit {commit()}, "
          f"torch {torch.__version__}, CuPy {cupy.__version__}")
    t = torch.randn(1, 12, 4096, 128, device="cuda", dtype=torch.bfloat16)
    a = cupy.from_dlpack(torch.utils.dlpack.to_dlpack(t))
    raw_alloc = torch._C._cuda_cudaCachingAllocator_raw_alloc
    raw_delete = torch._C._cuda_cudaCachingAllocator_raw_delete
    current_stream = torch._C._cuda_getCurrentRawStream

    def tensor_block(nbytes):
        block = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        return MemoryPointer(UnownedMemory(block.data_ptr(), nbytes, block, 0), 0)

    function_allocator = PythonFunctionAllocator(lambda n, d: raw_alloc(n, current_stream(0)),
                                                 lambda p, d: raw_delete(p)).malloc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        stream = cupy.cuda.ExternalStream(current_stream(0), 0)
    device = cupy.cuda.Device(0)
    cases = {
        "torch -> cupy: cupy.from_dlpack(to_dlpack(t))": lambda: cupy.from_dlpack(torch.utils.dlpack.to_dlpack(t)),
        "torch -> cupy: ndarray over UnownedMemory(t.data_ptr())": lambda: cupy.ndarray(
            t.shape, a.dtype, MemoryPointer(UnownedMemory(t.data_ptr(), t.nbytes, t, 0), 0)),
        "cupy -> torch: torch.utils.dlpack.from_dlpack(a.__dlpack__(stream=-1))":
            lambda: torch.utils.dlpack.from_dlpack(a.__dlpack__(stream=-1)),
        "cupy -> torch: torch._C._from_dlpack(a.toDlpack())": lambda: torch._C._from_dlpack(a.toDlpack()),
        "alloc 1 MiB: torch.empty block + MemoryPointer": lambda: tensor_block(1 << 20),
        "alloc 1 MiB: PythonFunctionAllocator(raw_alloc/raw_delete)": lambda: function_allocator(1 << 20),
        "alloc 1 MiB: cupy.empty with the function allocator": None,
        "alloc 1 MiB: cupy.empty from CuPy's pool": lambda: cupy.empty(1 << 20, cupy.uint8),
        "torch.empty 1 MiB": lambda: torch.empty(1 << 20, dtype=torch.uint8, device="cuda"),
        "context: Device + ExternalStream + using_allocator": None,
    }

    def empty_via_function_allocator():
        with cupy.cuda.using_allocator(function_allocator):
            cupy.empty(1 << 20, cupy.uint8)

    def contexts():
        with device, stream, cupy.cuda.using_allocator(function_allocator):
            pass

    cases["alloc 1 MiB: cupy.empty with the function allocator"] = empty_via_function_allocator
    cases["context: Device + ExternalStream + using_allocator"] = contexts
    print("| operation | us per call |")
    print("| --- | ---: |")
    for name, fn in cases.items():
        print(f"| {name} | {_us(fn):.2f} |", flush=True)


if __name__ == "__main__":
    main()
