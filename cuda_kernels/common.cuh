// Small helpers shared by every vsa_nd kernel.  NVRTC has no host standard library:
// only CUDA headers are included here.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace vsa {

// Element <-> float conversions for the three storage types the kernels read.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
// bf16 is the top half of an fp32, so a shift is the exact conversion.  Written out because on
// sm_90a __bfloat162float in unrolled loops sent loaded rows to local memory (stack and spills
// in the ptxas report); the shift keeps them in registers.
__device__ __forceinline__ float to_float(__nv_bfloat16 x) {
    return __uint_as_float(static_cast<unsigned int>(__bfloat16_as_ushort(x)) << 16);
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

constexpr float LOG2E = 1.4426950408889634f;  // log2(e): exp(x) = exp2(x * LOG2E)

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// The backward rebuilds each probability as exp(scale * s - lse) from the forward's float32 lse,
// whose rounding, about |lse| * 2^-24, becomes the probability's relative error: ~3% at |lse| =
// 5e5, ~25% at 5e6, and meaningless (10x and more, or infinite) beyond 5e7 (BENCHMARKS.md, "the
// CUDA kernels at large scores").  So the backward takes the lse of a row only up to LSE_LIMIT
// (2^20, an error of about 6%) and NaN beyond, which makes that row's gradients NaN (its dq,
// and dk and dv of every key tile it selected) rather than silently wrong.  -inf (pad rows, rows
// without keys) and NaN pass as they are.  The Numba backend applies the same limit
// (numba_cpu._LSE_LIMIT) when it computes in float32.
constexpr float LSE_LIMIT = 1048576.f;
__device__ __forceinline__ float backward_lse(float lse) {
    return fabsf(lse) > LSE_LIMIT && lse != neg_inf() ? quiet_nan() : lse;
}

// Order-preserving map of a float onto an unsigned int (larger float -> larger key).
__device__ __forceinline__ unsigned int float_to_ordered(float x) {
    unsigned int u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace vsa
