// Tensor-core and async-copy building blocks (sm_80+): cp.async, ldmatrix, and mma.sync
// m16n8k16 with fp32 accumulation.
#pragma once

#include "common.cuh"

namespace vsa {

// ---- cp.async: 16-byte global -> shared copies that bypass registers ----------------------
// src_bytes = 0 fills the 16 bytes with zeros (used for keys past a tile's block size, so
// pad slots never contribute, whatever they hold).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
    unsigned int s = static_cast<unsigned int>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---- ldmatrix ----------------------------------------------------------------------------
__device__ __forceinline__ void ldmatrix_x4(unsigned int (&r)[4], const void* smem) {
    unsigned int s = static_cast<unsigned int>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned int (&r)[4], const void* smem) {
    unsigned int s = static_cast<unsigned int>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

// ---- mma.sync m16n8k16, fp32 accumulate ---------------------------------------------------
// A: 4 regs (row-major 16x16), B: 2 regs (col-major 16x8), C/D: 4 floats (16x8) at d[0..3].
template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
    __device__ static __forceinline__ void run(float* d, const unsigned int (&a)[4], unsigned int b0, unsigned int b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};
template <> struct Mma<__half> {
    __device__ static __forceinline__ void run(float* d, const unsigned int (&a)[4], unsigned int b0, unsigned int b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

// Two floats -> one register of two 16-bit values (low half = first), as mma operands want.
template <typename T> __device__ __forceinline__ unsigned int pack2(float lo, float hi);
template <> __device__ __forceinline__ unsigned int pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned int*>(&v);
}
template <> __device__ __forceinline__ unsigned int pack2<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned int*>(&v);
}
template <typename T> __device__ __forceinline__ float2 unpack2(unsigned int x) {
    T lo, hi;
    unsigned short l = static_cast<unsigned short>(x & 0xffffu), h = static_cast<unsigned short>(x >> 16);
    lo = *reinterpret_cast<T*>(&l);
    hi = *reinterpret_cast<T*>(&h);
    return make_float2(to_float(lo), to_float(hi));
}

__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx: exp2(-inf) = 0
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

}  // namespace vsa
