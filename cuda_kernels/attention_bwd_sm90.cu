// Block-sparse attention backward for Hopper: the dQ and dK/dV passes of attention_bwd.cu
// (same contract, decomposition, KV->Q lists and epilogues; see there) with every matrix
// product on warpgroup MMA (wgmma, sm_90a).  delta comes from attention_bwd.cu's bwd_delta.
//
// bwd_dq_sm90, one warpgroup per (64 query rows, batch*head), two cp.async stages of K/V:
//   S = Q K^T and dP = dO V^T (shared-memory operands, both K-major) issued together ->
//   P = exp2(scale*log2e*S - lse*log2e) while dP finishes -> dS = P (dP - delta) ->
//   dQ += dS K (dS from registers; K as an MN-major operand, transposed by the instruction).
// bwd_dkdv_sm90, one warpgroup per (64-key chunk, batch*kv head), K and V resident, two
// stages of (Q, dO, lse, delta):
//   S^T = K Q^T and dP^T = V dO^T issued together -> P^T (keys past the tile's block size
//   are 0) -> dV += P^T dO issued -> dS^T = P^T (dP^T - delta) while it runs -> dK += dS^T Q.
// Shared memory written by cp.async is fenced (fence.proxy.async) before wgmma reads it.
#include "wgmma.cuh"

template <typename T, int D>
__global__ void __launch_bounds__(vsa::ATT_THREADS)
bwd_dq_sm90(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
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
    const unsigned long long desc_q = smem_desc(sQ, 16, 1024), desc_do = smem_desc(sdO, 16, 1024);
    float acc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;

    for (int c = 0; c < cta.n_chunks; ++c) {
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();  // chunk c visible to the tensor cores; chunk c-1's stage is free
        if (c + 1 < cta.n_chunks) load_chunk(c + 1);
        cp_async_commit();
        const int valid = cta.chunk(c).valid;
        if (valid == 0) continue;  // a 64-key sub-chunk past the end of a short tile (V > 64)
        const unsigned char* cK = sK + (c & 1) * TILE;
        const unsigned char* cV = sV + (c & 1) * TILE;
        const unsigned long long desc_k = smem_desc(cK, 16, 1024), desc_v = smem_desc(cV, 16, 1024);

        float s[32], dp[32];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int step = ((kk >> 2) * ATOM_BYTES + (kk & 3) * 32) >> 4;
            WgmmaSS<T>::run(s, desc_q + step, desc_k + step, kk > 0);
        }
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int step = ((kk >> 2) * ATOM_BYTES + (kk & 3) * 32) >> 4;
            WgmmaSS<T>::run(dp, desc_do + step, desc_v + step, kk > 0);
        }
        wgmma_commit();
        wgmma_wait<1>();
        fence_registers(s);
#pragma unroll
        for (int i = 0; i < 32; ++i) {  // P
            const int key = (i >> 2) * 8 + (lane & 3) * 2 + (i & 1);
            const float p = fast_exp2(fmaf(s[i], scale_log2, -lse_log2[(i >> 1) & 1]));
            s[i] = valid == ATT_BLOCK_N || key < valid ? p : 0.f;
        }
        wgmma_wait<0>();
        fence_registers(dp);
#pragma unroll
        for (int i = 0; i < 32; ++i) s[i] *= dp[i] - row_delta[(i >> 1) & 1];  // dS

        unsigned int ds[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) p_fragment<T>(s, kk, ds[kk]);
        const unsigned long long desc_kt = smem_desc(cK, ATOM_BYTES, 1024);
        fence_registers(acc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) WgmmaRS<T, D>::run(acc, ds[kk], desc_kt + ((kk * 16 * 128) >> 4), 1);
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(acc);
    }
    cp_async_wait<0>();
    const float* tile_vec = dq_tile ? dq_tile + (static_cast<size_t>(cta.bh) * cta.num_q_blocks + cta.q_tile) * D : nullptr;
    write_rows<T, D>(dq + cta.q_offset, acc, scale, tile_vec, real_q, warp, lane);
}

template <typename T, int D>
__global__ void __launch_bounds__(vsa::ATT_THREADS)
bwd_dkdv_sm90(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
              const float* __restrict__ lse, const float* __restrict__ delta, const int* __restrict__ kv2q_code,
              const int* __restrict__ kv2q_offsets, const int* __restrict__ q_block_sizes,
              const int* __restrict__ kv_block_sizes, const float* __restrict__ dk_tile,
              const float* __restrict__ dv_tile, T* __restrict__ dk, T* __restrict__ dv, int num_heads,
              int num_kv_heads, int q_len, int kv_len, int tile_volume, float scale) {
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
    const int slices = tile_volume / ATT_BLOCK_M;
    const int list = bh_kv * num_kv_blocks + kv_tile;
    const int first = kv2q_offsets[list];
    const int steps = real_k > 0 ? (kv2q_offsets[list + 1] - first) * slices : 0;

    auto load_step = [&](int t) {
        const int code = kv2q_code[first + t / slices], slice = t % slices;
        const int h = kv_head * group + code / num_q_blocks, q_tile = code % num_q_blocks;
        const size_t row0 = static_cast<size_t>(b * num_heads + h) * q_len + q_tile * tile_volume + slice * ATT_BLOCK_M;
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
    const unsigned long long desc_k = smem_desc(sK, 16, 1024), desc_v = smem_desc(sV, 16, 1024);
    float acc_k[D / 2], acc_v[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc_k[i] = acc_v[i] = 0.f;

    for (int t = 0; t < steps; ++t) {
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        if (t + 1 < steps) load_step(t + 1);
        cp_async_commit();
        const unsigned char* cQ = sQ + (t & 1) * TILE;
        const unsigned char* cdO = sdO + (t & 1) * TILE;
        const float* c_lse = sStats + (t & 1) * 128;
        const float* c_delta = c_lse + 64;
        const unsigned long long desc_q = smem_desc(cQ, 16, 1024), desc_do = smem_desc(cdO, 16, 1024);

        float st[32], dpt[32];  // S^T and dP^T: this warp's 16 keys x 64 query rows
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int step = ((kk >> 2) * ATOM_BYTES + (kk & 3) * 32) >> 4;
            WgmmaSS<T>::run(st, desc_k + step, desc_q + step, kk > 0);
        }
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int step = ((kk >> 2) * ATOM_BYTES + (kk & 3) * 32) >> 4;
            WgmmaSS<T>::run(dpt, desc_v + step, desc_do + step, kk > 0);
        }
        wgmma_commit();
        wgmma_wait<1>();
        fence_registers(st);
        unsigned int pt[4][4];  // P^T packed: the A operand of dV += P^T dO, intact until it is done
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            const int key = warp * 16 + (lane >> 2) + ((i >> 1) & 1) * 8;
            const int col = (i >> 2) * 8 + (lane & 3) * 2 + (i & 1);
            const float p = fast_exp2(fmaf(st[i], scale_log2, -c_lse[col] * LOG2E));
            st[i] = real_k == ATT_BLOCK_N || key < real_k ? p : 0.f;
        }
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) p_fragment<T>(st, kk, pt[kk]);

        const unsigned long long desc_do_t = smem_desc(cdO, ATOM_BYTES, 1024);
        fence_registers(acc_v);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) WgmmaRS<T, D>::run(acc_v, pt[kk], desc_do_t + ((kk * 16 * 128) >> 4), 1);
        wgmma_commit();
        wgmma_wait<1>();  // dP^T done; dV may still run
        fence_registers(dpt);
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            const int col = (i >> 2) * 8 + (lane & 3) * 2 + (i & 1);
            dpt[i] = st[i] * (dpt[i] - c_delta[col]);  // dS^T
        }
        unsigned int ds[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) p_fragment<T>(dpt, kk, ds[kk]);
        const unsigned long long desc_q_t = smem_desc(cQ, ATOM_BYTES, 1024);
        fence_registers(acc_k);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) WgmmaRS<T, D>::run(acc_k, ds[kk], desc_q_t + ((kk * 16 * 128) >> 4), 1);
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(acc_k);
        fence_registers(acc_v);
    }
    cp_async_wait<0>();
    const size_t tile_row = (static_cast<size_t>(bh_kv) * num_kv_blocks + kv_tile) * D;
    write_rows<T, D>(dk + kv_offset, acc_k, scale, dk_tile ? dk_tile + tile_row : nullptr, real_k, warp, lane);
    write_rows<T, D>(dv + kv_offset, acc_v, 1.f, dv_tile ? dv_tile + tile_row : nullptr, real_k, warp, lane);
}
