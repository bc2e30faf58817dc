"""CUDA C++ sources of vsa_nd's kernels, compiled at run time with NVRTC (see vsa_nd.kernels)."""
