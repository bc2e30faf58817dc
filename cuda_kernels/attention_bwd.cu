// Block-sparse attention backward (VSA fine stage), mma.sync (sm_80+); deterministic: no
// atomics and no fp32 [B, H, S, D] accumulator, every gradient element is written once.
//
// Template parameters: T (__half or __nv_bfloat16) and D (head dim, 64 or 128).
// With P = exp(scale * Q K^T - lse) over the real keys of the selected tiles (the forward's
// probabilities, recomputed from its LSE) and delta = rowsum(dO * fine):
//   dV = P^T dO,  dS = P * (dO V^T - delta),  dQ = scale * dS K,  dK = scale * dS^T Q.
// Three kernels:
//   bwd_delta:  delta per query row, with fine = out - gate * coarse recovered from out; 0 on
//               pad query rows (their dO is treated as 0: pad rows are not part of the output).
//   bwd_dq:     one CTA per (64 query rows, batch*head), streaming the selected key chunks like
//               the forward (two-stage cp.async); per chunk S = Q K^T, dP = dO V^T, dQ += dS K.
//               Q and dO fragments stay in registers.  Writes dq = scale * dQ + dq_tile.
//   bwd_dkdv:   one CTA per (64-key chunk, batch*kv head), keeping K and V in shared memory and
//               streaming (Q, dO, lse, delta) of every query tile that selected the chunk's key
//               tile (all query heads of the kv group: GQA sums happen here), from the KV->Q
//               lists built on the GPU; per step S^T = K Q^T, dV += P^T dO, dP^T = V dO^T,
//               dK += dS^T Q.  Writes dk = scale * dK + dk_tile, dv = dV + dv_tile.
// Each warp owns 16 rows (query rows in bwd_dq, keys in bwd_dkdv).  The *_tile vectors carry
// the coarse branch's gradient per tile, added to every real token of the tile; pad slots of
// dq, dk and dv are written as zeros.
//
// Memory traffic: bwd_dq reads Q, dO once and K, V per selected chunk (as the forward);
// bwd_dkdv reads K, V once and Q, dO (+ 512 bytes of lse/delta) per selecting query tile.
#include "attention_common.cuh"

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

}  // namespace vsa

// delta[b, h, row] = sum_d dout * (out - gate * coarse) on real query rows, 0 on pad rows.
// One warp per row.
template <typename T, int D>
__global__ void __launch_bounds__(128)
bwd_delta(const T* __restrict__ dout, const T* __restrict__ out, const float* __restrict__ coarse,
          const T* __restrict__ gate, const int* __restrict__ q_block_sizes, float* __restrict__ delta,
          long long rows, int q_len, int tile_volume) {
    using namespace vsa;
    const long long row = static_cast<long long>(blockIdx.x) * 4 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const int bh = static_cast<int>(row / q_len), slot = static_cast<int>(row % q_len);
    const int tile = slot / tile_volume;
    float acc = 0.f;
    if (slot % tile_volume < q_block_sizes[tile]) {
        const size_t base = static_cast<size_t>(row) * D;
        const float* c = coarse ? coarse + (static_cast<size_t>(bh) * (q_len / tile_volume) + tile) * D : nullptr;
#pragma unroll
        for (int i = lane; i < D; i += 32) {
            float fine = to_float(out[base + i]);
            if (c) fine -= gate ? to_float(gate[base + i]) * c[i] : c[i];
            acc += to_float(dout[base + i]) * fine;
        }
#pragma unroll
        for (int m = 16; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
    }
    if (lane == 0) delta[row] = acc;
}

template <typename T, int D>
__global__ void __launch_bounds__(vsa::ATT_THREADS)
bwd_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
       const float* __restrict__ lse, const float* __restrict__ delta, const int* __restrict__ q2k_idx,
       const int* __restrict__ q2k_num, const int* __restrict__ q_block_sizes,
       const int* __restrict__ kv_block_sizes, const float* __restrict__ dq_tile, T* __restrict__ dq,
       int num_heads, int num_kv_heads, int q_len, int kv_len, int list_len, int tile_volume, float scale) {
    using namespace vsa;
    constexpr int TILE = AttentionSmem<D>::TILE;
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned char* sQ = smem;
    unsigned char* sdO = smem + TILE;
    unsigned char* sK = smem + 2 * TILE;  // two stages
    unsigned char* sV = smem + 4 * TILE;  // two stages

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const AttentionCta<T, D> cta(k, v, q2k_idx, q2k_num, kv_block_sizes, num_heads, num_kv_heads, q_len, kv_len,
                                 list_len, tile_volume);
    const int row0 = blockIdx.x * ATT_BLOCK_M;
    const int real_q = real_rows(q_block_sizes[cta.q_tile], row0 % tile_volume);
    auto load_chunk = [&](int c) {
        const auto chunk = cta.chunk(c);
        load_tile_async<D>(sK + (c & 1) * TILE, cta.k + chunk.offset, chunk.valid, tid);
        load_tile_async<D>(sV + (c & 1) * TILE, cta.v + chunk.offset, chunk.valid, tid);
    };

    load_tile_async<D>(sQ, q + cta.q_offset, ATT_BLOCK_M, tid);
    load_tile_async<D>(sdO, dout + cta.q_offset, real_q, tid);  // pad rows read as 0
    if (cta.n_chunks > 0) load_chunk(0);
    cp_async_commit();

    const float scale_log2 = scale * LOG2E;
    float lse_log2[2], row_delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const size_t row = cta.q_offset / D + warp * 16 + (lane >> 2) + r * 8;
        lse_log2[r] = lse[row] * LOG2E;
        row_delta[r] = delta[row];
    }
    float acc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;
    unsigned int qf[D / 16][4], dof[D / 16][4];

    for (int c = 0; c < cta.n_chunks; ++c) {
        cp_async_wait<0>();
        __syncthreads();
        if (c == 0) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                ldmatrix_x4(qf[kk], sQ + a_operand(warp * 16, kk, lane));
                ldmatrix_x4(dof[kk], sdO + a_operand(warp * 16, kk, lane));
            }
        }
        if (c + 1 < cta.n_chunks) load_chunk(c + 1);
        cp_async_commit();

        const int valid = cta.chunk(c).valid;
        if (valid == 0) continue;
        const unsigned char* cK = sK + (c & 1) * TILE;
        const unsigned char* cV = sV + (c & 1) * TILE;

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
    cp_async_wait<0>();
    const float* tile_vec = dq_tile ? dq_tile + (static_cast<size_t>(cta.bh) * cta.num_q_blocks + cta.q_tile) * D : nullptr;
    write_rows<T, D>(dq + cta.q_offset, acc, scale, tile_vec, real_q, warp, lane);
}

template <typename T, int D>
__global__ void __launch_bounds__(vsa::ATT_THREADS)
bwd_dkdv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
         const float* __restrict__ lse, const float* __restrict__ delta, const int* __restrict__ kv2q_code,
         const int* __restrict__ kv2q_offsets, const int* __restrict__ q_block_sizes,
         const int* __restrict__ kv_block_sizes, const float* __restrict__ dk_tile, const float* __restrict__ dv_tile,
         T* __restrict__ dk, T* __restrict__ dv, int num_heads, int num_kv_heads, int q_len, int kv_len,
         int tile_volume, float scale) {
    using namespace vsa;
    constexpr int TILE = AttentionSmem<D>::TILE;
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned char* sK = smem;
    unsigned char* sV = smem + TILE;
    unsigned char* sQ = smem + 2 * TILE;   // two stages
    unsigned char* sdO = smem + 4 * TILE;  // two stages
    float* sStats = reinterpret_cast<float*>(smem + 6 * TILE);  // [stage][lse | delta][64]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int bh_kv = blockIdx.y, b = bh_kv / num_kv_heads, kv_head = bh_kv % num_kv_heads;
    const int group = num_heads / num_kv_heads;
    const int num_q_blocks = q_len / tile_volume, num_kv_blocks = kv_len / tile_volume;
    const int key0 = blockIdx.x * ATT_BLOCK_N, kv_tile = key0 / tile_volume;
    const int real_k = real_rows(kv_block_sizes[kv_tile], key0 % tile_volume);
    const size_t kv_offset = (static_cast<size_t>(bh_kv) * kv_len + key0) * D;
    const int slices = tile_volume / ATT_BLOCK_M;  // 64-row slices per query tile
    const int list = bh_kv * num_kv_blocks + kv_tile;
    const int first = kv2q_offsets[list];
    const int steps = real_k > 0 ? (kv2q_offsets[list + 1] - first) * slices : 0;

    // Step t: query slice t % slices of the t / slices-th query tile that selected this key tile.
    auto load_step = [&](int t) {
        const int code = kv2q_code[first + t / slices], slice = t % slices;
        const int h = kv_head * group + code / num_q_blocks, q_tile = code % num_q_blocks;
        const int slot0 = q_tile * tile_volume + slice * ATT_BLOCK_M;
        const size_t row0 = static_cast<size_t>(b * num_heads + h) * q_len + slot0;
        const int stage = t & 1, real_q = real_rows(q_block_sizes[q_tile], slice * ATT_BLOCK_M);
        // Pad query rows read as 0 in Q and dO, so they add nothing to dK and dV whatever they hold.
        load_tile_async<D>(sQ + stage * TILE, q + row0 * D, real_q, tid);
        load_tile_async<D>(sdO + stage * TILE, dout + row0 * D, real_q, tid);
        if (tid < 32) {  // 64 lse then 64 delta values: 16-byte pieces
            const float* src = (tid < 16 ? lse : delta) + row0 + (tid & 15) * 4;
            cp_async_16(sStats + stage * 128 + tid * 4, src, 16);
        }
    };

    load_tile_async<D>(sK, k + kv_offset, real_k, tid);  // pad keys read as 0
    load_tile_async<D>(sV, v + kv_offset, real_k, tid);
    if (steps > 0) load_step(0);
    cp_async_commit();

    const float scale_log2 = scale * LOG2E;
    float acc_k[D / 2], acc_v[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc_k[i] = acc_v[i] = 0.f;

    for (int t = 0; t < steps; ++t) {
        cp_async_wait<0>();
        __syncthreads();
        if (t + 1 < steps) load_step(t + 1);
        cp_async_commit();
        const unsigned char* cQ = sQ + (t & 1) * TILE;
        const unsigned char* cdO = sdO + (t & 1) * TILE;
        const float* c_lse = sStats + (t & 1) * 128;
        const float* c_delta = c_lse + 64;

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
                st[i] = key < real_k ? fast_exp2(fmaf(st[i], scale_log2, -c_lse[col] * LOG2E)) : 0.f;
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
    cp_async_wait<0>();
    const size_t tile_row = (static_cast<size_t>(bh_kv) * num_kv_blocks + kv_tile) * D;
    write_rows<T, D>(dk + kv_offset, acc_k, scale, dk_tile ? dk_tile + tile_row : nullptr, real_k, warp, lane);
    write_rows<T, D>(dv + kv_offset, acc_v, 1.f, dv_tile ? dv_tile + tile_row : nullptr, real_k, warp, lane);
}
