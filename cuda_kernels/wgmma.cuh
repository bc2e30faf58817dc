// Hopper (sm_90a) warpgroup MMA building blocks: shared-memory matrix descriptors and
// wgmma.mma_async wrappers with fp32 accumulation.
//
// Operand tiles use the swizzle-atom layout of attention_common.cuh (atom_offset).
//   K-major operand (Q and K for S = Q K^T): rows are M/N, 128-byte rows along K.
//     SBO = 1024 (next group of 8 rows); a k16 step advances the start address by 32 bytes
//     inside an atom and by one atom every 4 steps.
//   MN-major operand (V for O += P V, transposed by the instruction): rows are keys (K),
//     128-byte rows along N = head dim.  LBO = atom size (next 64 columns),
//     SBO = 1024 (next 8 keys); a k16 step advances 16 rows = 2048 bytes.
// The wgmma register fragments of a 64-row accumulator match mma.sync m16n8 per warp:
// warp w owns rows 16w..16w+15; per 8-column group i, d[4i..4i+1] sit on row lane/4 and
// d[4i+2..4i+3] on row lane/4 + 8, columns 2*(lane%4) + {0, 1}.
#pragma once

#include "attention_common.cuh"

namespace vsa {

__device__ __forceinline__ unsigned long long smem_desc(const void* smem, unsigned int lbo_bytes,
                                                         unsigned int sbo_bytes) {
    const unsigned int addr = static_cast<unsigned int>(__cvta_generic_to_shared(smem));
    return static_cast<unsigned long long>((addr & 0x3FFFF) >> 4) |
           static_cast<unsigned long long>((lbo_bytes >> 4) & 0x3FFF) << 16 |
           static_cast<unsigned long long>((sbo_bytes >> 4) & 0x3FFF) << 32 |
           1ull << 62;  // 128-byte swizzle
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Shared memory written by cp.async (generic proxy) must be fenced before wgmma reads it.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Keeps the compiler from moving accumulator reads/writes across in-flight wgmma.
template <int N> __device__ __forceinline__ void fence_registers(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

template <typename T> struct WgmmaSS;
template <typename T, int N> struct WgmmaRS;

template <> struct WgmmaSS<__nv_bfloat16> {  // D[64x64] (+)= A[64x16] * B[16x64], both K-major in smem
    __device__ static __forceinline__ void run(float (&d)[32], unsigned long long a, unsigned long long b, int accumulate) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
            : "l"(a), "l"(b), "r"(accumulate));
    }
};

template <> struct WgmmaRS<__nv_bfloat16, 64> {  // D[64x64] += A[64x16] (registers) * B[16x64] (MN-major smem)
    __device__ static __forceinline__ void run(float (&d)[32], const unsigned int (&a)[4], unsigned long long b, int accumulate) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 1;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
    }
};

template <> struct WgmmaRS<__nv_bfloat16, 128> {  // D[64x128] += A[64x16] (registers) * B[16x128] (MN-major smem)
    __device__ static __forceinline__ void run(float (&d)[64], const unsigned int (&a)[4], unsigned long long b, int accumulate) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, 1, 1, 1;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
    }
};

template <> struct WgmmaSS<__half> {  // D[64x64] (+)= A[64x16] * B[16x64], both K-major in smem
    __device__ static __forceinline__ void run(float (&d)[32], unsigned long long a, unsigned long long b, int accumulate) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
            : "l"(a), "l"(b), "r"(accumulate));
    }
};

template <> struct WgmmaRS<__half, 64> {  // D[64x64] += A[64x16] (registers) * B[16x64] (MN-major smem)
    __device__ static __forceinline__ void run(float (&d)[32], const unsigned int (&a)[4], unsigned long long b, int accumulate) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 1;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
    }
};

template <> struct WgmmaRS<__half, 128> {  // D[64x128] += A[64x16] (registers) * B[16x128] (MN-major smem)
    __device__ static __forceinline__ void run(float (&d)[64], const unsigned int (&a)[4], unsigned long long b, int accumulate) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, 1, 1, 1;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
    }
};

// Descriptor offset (16-byte units) of k16 step kk of a K-major operand: 32 bytes further inside
// a swizzle atom, one atom further every 4 steps.
__device__ __forceinline__ int k_major_step(int kk) { return ((kk >> 2) * ATOM_BYTES + (kk & 3) * 32) >> 4; }
// Descriptor offset of k16 step kk of an MN-major operand: 16 rows (2048 bytes) further.
__device__ __forceinline__ int mn_major_step(int kk) { return (kk * 16 * 128) >> 4; }

// d = A B over K = 16 * K16 with both operands K-major in shared memory (S = Q K^T and its kin),
// issued and committed as one group.  The caller fences (wgmma_fence) before the first group.
template <typename T, int K16>
__device__ __forceinline__ void wgmma_ss_issue(float (&d)[32], unsigned long long a, unsigned long long b) {
#pragma unroll
    for (int kk = 0; kk < K16; ++kk) WgmmaSS<T>::run(d, a + k_major_step(kk), b + k_major_step(kk), kk > 0);
    wgmma_commit();
}

// acc += P B over 64 keys: P as four k16 register fragments (p_fragment), B MN-major in shared
// memory; acc's registers fenced first, then issued and committed as one group.
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs_issue(float (&acc)[N / 2], const unsigned int (&p)[4][4], unsigned long long b,
                                               int accumulate = 1) {
    fence_registers(acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) WgmmaRS<T, N>::run(acc, p[kk], b + mn_major_step(kk), kk > 0 || accumulate);
    wgmma_commit();
}

// Zeroes rows `valid`..63 of the 64-row swizzle-atom tile `a` (and of `b` unless null), then
// fences the stores for the tensor cores and ends with a CTA barrier (call it from every thread
// of the CTA, with the same `valid`).  TMA copies whole 64-row boxes, so rows past a tile's
// block size hold whatever the tensor holds there (NaN, say), and 0 * NaN would reach a product.
template <int D>
__device__ __forceinline__ void zero_rows_from(unsigned char* a, unsigned char* b, int valid, int tid) {
    for (int i = valid * (D / 8) + tid; i < ATT_BLOCK_M * (D / 8); i += ATT_THREADS) {
        const int offset = atom_offset(i / (D / 8), i % (D / 8));
        *reinterpret_cast<uint4*>(a + offset) = make_uint4(0, 0, 0, 0);
        if (b) *reinterpret_cast<uint4*>(b + offset) = make_uint4(0, 0, 0, 0);
    }
    fence_proxy_async();
    __syncthreads();
}

}  // namespace vsa
