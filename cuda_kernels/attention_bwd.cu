// Block-sparse attention backward (VSA fine stage) on mma.sync (sm_80+), and the delta
// preprocessing kernel both backward variants use.  Deterministic: no atomics and no fp32
// [B, H, S, D] accumulator; every gradient element is written once.
//
// Template parameters: T (__half or __nv_bfloat16) and D (head dim, 64 or 128).
// With P = exp(scale * Q K^T - lse) over the real keys of the selected tiles (the forward's
// probabilities, recomputed from its LSE) and delta = rowsum(dO * fine):
//   dV = P^T dO,  dS = P * (dO V^T - delta),  dQ = scale * dS K,  dK = scale * dS^T Q.
// Kernels:
//   bwd_delta:  delta per query row, with fine = out - gate * coarse recovered from out; 0 on
//               pad query rows (their dO is treated as 0: pad rows are not part of the output);
//               and, for the dK/dV passes, lse * log2(e) per row.  (A VSA backward takes both
//               from coarse_grad.cu's ROWS variant instead, in its pass over dout.)
//   bwd_dq, bwd_dkdv: the two passes of attention_bwd.cuh with MmaProducts: each warp owns 16
//               rows (query rows in bwd_dq, keys in bwd_dkdv); Q and dO fragments of bwd_dq stay
//               in registers, everything else is read with ldmatrix per step.
//
// Memory traffic: bwd_dq reads Q, dO once and K, V per selected chunk (as the forward);
// bwd_dkdv reads K, V once and Q, dO (+ 512 bytes of lse/delta) per selecting query tile.
#include "attention_bwd.cuh"

namespace vsa {

// ldmatrix addresses of the three operand roles in a swizzle-atom tile (see attention_common):
// A rows r0..r0+15 x k16 step kk; B with n = tile rows n0..n0+15 and k = columns (K in Q K^T);
// B with k = tile rows k0..k0+15 and n = columns (V in P V; loaded transposed).
__device__ __forceinline__ int a_operand(int r0, int kk, int lane) {
    return atom_offset(r0 + (lane & 7) + ((lane >> 3) & 1) * 8, kk * 2 + (lane >> 4));
}
__device__ __forceinline__ int b_operand_rows_n(int n0, int kk, int lane) {
    return atom_offset(n0 + (lane & 7) + (lane >> 4) * 8, kk * 2 + ((lane >> 3) & 1));
}
__device__ __forceinline__ int b_operand_rows_k(int k0, int np, int lane) {
    return atom_offset(k0 + (lane & 7) + ((lane >> 3) & 1) * 8, np * 2 + (lane >> 4));
}

// acc[16 x 64] (+)= A[16 x D] (register fragments) * tile[64 rows x D]^T.
template <typename T, int D>
__device__ __forceinline__ void mma_a_regs_bt(float (&acc)[32], const unsigned int (&a)[D / 16][4],
                                              const unsigned char* tile, int lane) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int np = 0; np < 4; ++np) {
            unsigned int b[4];
            ldmatrix_x4(b, tile + b_operand_rows_n(np * 16, kk, lane));
            Mma<T>::run(acc + 8 * np, a[kk], b[0], b[1]);
            Mma<T>::run(acc + 8 * np + 4, a[kk], b[2], b[3]);
        }
    }
}

// acc[16 x 64] (+)= a_tile[rows r0..r0+15 x D] * b_tile[64 rows x D]^T, both from shared memory.
template <typename T, int D>
__device__ __forceinline__ void mma_a_smem_bt(float (&acc)[32], const unsigned char* a_tile, int r0,
                                              const unsigned char* b_tile, int lane) {
#pragma unroll 2  // fully unrolled, the hoisted loads spill the dK/dV kernel at D = 128
    for (int kk = 0; kk < D / 16; ++kk) {
        unsigned int a[4];
        ldmatrix_x4(a, a_tile + a_operand(r0, kk, lane));
#pragma unroll
        for (int np = 0; np < 4; ++np) {
            unsigned int b[4];
            ldmatrix_x4(b, b_tile + b_operand_rows_n(np * 16, kk, lane));
            Mma<T>::run(acc + 8 * np, a, b[0], b[1]);
            Mma<T>::run(acc + 8 * np + 4, a, b[2], b[3]);
        }
    }
}

// acc[16 x D] += P[16 x 64] * tile[64 rows x D], P given as four packed k16 A fragments.
template <typename T, int D>
__device__ __forceinline__ void mma_p_b(float (&acc)[D / 2], const unsigned int (&p)[4][4], const unsigned char* tile,
                                        int lane) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
        for (int np = 0; np < D / 16; ++np) {
            unsigned int b[4];
            ldmatrix_x4_trans(b, tile + b_operand_rows_k(kk * 16, np, lane));
            Mma<T>::run(acc + 8 * np, p[kk], b[0], b[1]);
            Mma<T>::run(acc + 8 * np + 4, p[kk], b[2], b[3]);
        }
    }
}

// The same with P in the fp32 score-fragment layout (re-packed to T here).
template <typename T, int D>
__device__ __forceinline__ void mma_p_b(float (&acc)[D / 2], const float (&p)[32], const unsigned char* tile,
                                        int lane) {
    unsigned int packed[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) p_fragment<T>(p, kk, packed[kk]);
    mma_p_b<T, D>(acc, packed, tile, lane);
}

template <typename T, int D> struct MmaProducts {
    unsigned int qf[D / 16][4], dof[D / 16][4];  // this warp's Q and dO rows (bwd_dq)

    __device__ void start_dq(const unsigned char* sQ, const unsigned char* sdO, int warp, int lane) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            ldmatrix_x4(qf[kk], sQ + a_operand(warp * 16, kk, lane));
            ldmatrix_x4(dof[kk], sdO + a_operand(warp * 16, kk, lane));
        }
    }

    __device__ void dq_chunk(float (&acc)[D / 2], const unsigned char* cK, const unsigned char* cV, int valid,
                             const float (&lse_log2)[2], const float (&row_delta)[2], float scale_log2, int, int lane) {
        float s[32], dp[32];
#pragma unroll
        for (int i = 0; i < 32; ++i) s[i] = dp[i] = 0.f;
        mma_a_regs_bt<T, D>(s, qf, cK, lane);
        mma_a_regs_bt<T, D>(dp, dof, cV, lane);
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            const int key = (i >> 2) * 8 + (lane & 3) * 2 + (i & 1), r = (i >> 1) & 1;
            const float p = key < valid ? fast_exp2(fmaf(s[i], scale_log2, -lse_log2[r])) : 0.f;
            s[i] = p * (dp[i] - row_delta[r]);  // dS
        }
        mma_p_b<T, D>(acc, s, cK, lane);
    }

    __device__ void dkdv_step(float (&acc_k)[D / 2], float (&acc_v)[D / 2], const unsigned char* sK,
                              const unsigned char* sV, const unsigned char* cQ, const unsigned char* cdO,
                              const float* c_lse_log2, const float* c_delta, int real_k, int real_q,
                              float scale_log2, int warp, int lane) {
        // P^T (this warp's 16 keys x 64 query rows), kept packed in 16 bits from here on so
        // that it and dP^T are not live in fp32 together (register pressure at D = 128).
        unsigned int pt[4][4];
        {
            float st[32];
#pragma unroll
            for (int i = 0; i < 32; ++i) st[i] = 0.f;
            mma_a_smem_bt<T, D>(st, sK, warp * 16, cQ, lane);
#pragma unroll
            for (int i = 0; i < 32; ++i) {
                const int key = warp * 16 + (lane >> 2) + ((i >> 1) & 1) * 8;
                const int col = (i >> 2) * 8 + (lane & 3) * 2 + (i & 1);
                // 0 for pad keys and pad query rows, whatever lse holds there (-inf from the
                // forward, where exp2 gives +inf; anything in a context changed since).
                st[i] = key < real_k && col < real_q ? fast_exp2(fmaf(st[i], scale_log2, -c_lse_log2[col])) : 0.f;
            }
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) p_fragment<T>(st, kk, pt[kk]);
        }
        mma_p_b<T, D>(acc_v, pt, cdO, lane);  // dV += P^T dO
        float dst[32];                        // dP^T, then dS^T
#pragma unroll
        for (int i = 0; i < 32; ++i) dst[i] = 0.f;
        mma_a_smem_bt<T, D>(dst, sV, warp * 16, cdO, lane);
#pragma unroll
        for (int i = 0; i < 32; i += 2) {
            const int col = (i >> 2) * 8 + (lane & 3) * 2;  // i and i + 1: columns col, col + 1
            const float2 p = unpack2<T>(pt[i >> 3][(i >> 1) & 3]);
            dst[i] = p.x * (dst[i] - c_delta[col]);
            dst[i + 1] = p.y * (dst[i + 1] - c_delta[col + 1]);
        }
        mma_p_b<T, D>(acc_k, dst, cQ, lane);  // dK += dS^T Q
    }
};

}  // namespace vsa

// delta[b, h, row] = sum_d dout * (out - gate * coarse) on real query rows, 0 on pad rows;
// and, unless lse_log2 is null, lse_log2[row] = lse[row] * log2(e) (NaN where |lse| passes
// common.cuh's LSE_LIMIT, as every pass of the backward takes it; what both dK/dV passes read:
// it saves them that work per query column and step).  D / 8 threads per row,
// each reading 16-byte pieces (the launcher checks the 16-byte alignment), so a CTA of 128
// threads takes BWD_DELTA_ROWS<D> rows (the launcher's grid); memory-bound: it reads dout and out
// once (and gate where there is one).
template <int D> constexpr int BWD_DELTA_ROWS = 128 / (D / 8);
template <typename T, int D>
__global__ void __launch_bounds__(128)
bwd_delta(const T* __restrict__ dout, const T* __restrict__ out, const float* __restrict__ coarse,
          const T* __restrict__ gate, const int* __restrict__ q_block_sizes, const float* __restrict__ lse,
          float* __restrict__ delta, float* __restrict__ lse_log2, long long rows, int q_len, int tile_volume) {
    using namespace vsa;
    constexpr int LANES = D / 8;  // threads per row, 8 elements each
    const long long row = static_cast<long long>(blockIdx.x) * BWD_DELTA_ROWS<D> + threadIdx.x / LANES;
    const int col = (threadIdx.x % LANES) * 8;
    const bool active = row < rows;  // no early return: the row's threads reduce with shuffles
    float acc = 0.f;
    if (active) {
        const int bh = static_cast<int>(row / q_len), slot = static_cast<int>(row % q_len);
        const int tile = slot / tile_volume;
        if (slot % tile_volume < q_block_sizes[tile]) {
            const size_t base = static_cast<size_t>(row) * D + col;
            const uint4 o = *reinterpret_cast<const uint4*>(out + base);
            const uint4 g = *reinterpret_cast<const uint4*>(dout + base);
            const unsigned int ow[4] = {o.x, o.y, o.z, o.w}, gw[4] = {g.x, g.y, g.z, g.w};
            float fine[8], grad[8];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float2 f = unpack2<T>(ow[j]), d = unpack2<T>(gw[j]);
                fine[2 * j] = f.x;
                fine[2 * j + 1] = f.y;
                grad[2 * j] = d.x;
                grad[2 * j + 1] = d.y;
            }
            if (coarse) {
                const float* c = coarse + (static_cast<size_t>(bh) * (q_len / tile_volume) + tile) * D + col;
                float cv[8];
                *reinterpret_cast<float4*>(cv) = *reinterpret_cast<const float4*>(c);
                *reinterpret_cast<float4*>(cv + 4) = *reinterpret_cast<const float4*>(c + 4);
                if (gate) {
                    const uint4 gt = *reinterpret_cast<const uint4*>(gate + base);
                    const unsigned int tw[4] = {gt.x, gt.y, gt.z, gt.w};
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const float2 t = unpack2<T>(tw[j]);
                        cv[2 * j] = __fmul_rn(cv[2 * j], t.x);
                        cv[2 * j + 1] = __fmul_rn(cv[2 * j + 1], t.y);
                    }
                }
                // Rounded as written (no contraction into an FMA): coarse_grad.cu's ROWS variant
                // computes the same terms and must give the same bits.
#pragma unroll
                for (int j = 0; j < 8; ++j) fine[j] = __fsub_rn(fine[j], cv[j]);
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) acc = fmaf(grad[j], fine[j], acc);
        }
    }
#pragma unroll
    for (int m = LANES / 2; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
    if (active && col == 0) {
        delta[row] = acc;
        if (lse_log2) lse_log2[row] = backward_lse(lse[row]) * LOG2E;
    }
}

template <typename T, int D>
__global__ void __launch_bounds__(vsa::ATT_THREADS, 1)
bwd_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
       const float* __restrict__ lse, const float* __restrict__ delta, const int* __restrict__ q2k_idx,
       const int* __restrict__ q2k_num, const int* __restrict__ q_block_sizes, const int* __restrict__ kv_block_sizes,
       const float* __restrict__ dq_tile, T* __restrict__ dq, int num_heads, int num_kv_heads, int q_len, int kv_len,
       int list_len, int tile_volume, float scale) {
    vsa::dq_pass<T, D, vsa::MmaProducts<T, D>>(q, k, v, dout, lse, delta, q2k_idx, q2k_num, q_block_sizes,
                                               kv_block_sizes, dq_tile, dq, num_heads, num_kv_heads, q_len, kv_len,
                                               list_len, tile_volume, scale);
}

template <typename T, int D>
__global__ void __launch_bounds__(vsa::ATT_THREADS, 1)
bwd_dkdv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
         const float* __restrict__ lse_log2, const float* __restrict__ delta, const int* __restrict__ kv2q_code,
         const int* __restrict__ kv2q_offsets, const int* __restrict__ q_block_sizes,
         const int* __restrict__ kv_block_sizes, const float* __restrict__ dk_tile, const float* __restrict__ dv_tile,
         T* __restrict__ dk, T* __restrict__ dv, const int* __restrict__ order, int num_heads, int num_kv_heads,
         int q_len, int kv_len, int tile_volume, float scale) {
    vsa::dkdv_pass<T, D, vsa::MmaProducts<T, D>>(q, k, v, dout, lse_log2, delta, kv2q_code, kv2q_offsets, q_block_sizes,
                                                 kv_block_sizes, dk_tile, dv_tile, dk, dv, num_heads, num_kv_heads,
                                                 q_len, kv_len, tile_volume, scale, order);
}
