// The pipelines of the block-sparse attention backward on mma.sync (attention_bwd.cu; the wgmma
// kernels of attention_bwd_sm90.cu do the same CTA work with pipelines of their own, below).
// Each kernel supplies a Products policy with the matrix products of one step; everything else
// (work assignment, two-stage cp.async streaming, statistics, epilogues) lives here:
//
//   dq_pass:    one CTA per (64 query rows, batch*head) streams the query tile's selected key
//               chunks (K and V, two stages).  Products::dq_chunk does S = Q K^T, dP = dO V^T,
//               P = exp(scale S - lse), dS = P (dP - delta), acc += dS K.
//               Writes dq = scale * acc + dq_tile.
//   dkdv_pass:  one CTA per (64-key chunk, batch*kv head) keeps K and V and streams (Q, dO,
//               lse * log2(e) from bwd_delta or coarse_grad, delta) of every query tile that
//               selected the chunk's key tile — all query heads of the kv group, so GQA sums
//               happen here — from the KV->Q lists built on the GPU.
//               Products::dkdv_step does S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T,
//               dS^T = P^T (dP^T - delta), dK += dS^T Q.  Writes dk = scale * dK + dk_tile and
//               dv = dV + dv_tile.
// bwd_dq_sm90 and bwd_dkdv_sm90 (attention_bwd_sm90.cu) do the same CTA work with wgmma and
// pipelines of their own, in which the streamed tiles (K and V, resp. Q, dO, lse and delta)
// arrive by TMA; they use this file's DkdvCta and load_row_stats but not dq_pass or dkdv_pass,
// and their WgmmaProducts splits a dK/dV step in two (dkdv_scores, dkdv_finish) to pipeline
// steps: see there.
// Policy interface (MmaProducts, attention_bwd.cu):
//   void start_dq(sQ, sdO, warp, lane)      once, when Q and dO have arrived
//   void dq_chunk(acc, sK, sV, valid, lse_log2, delta, scale_log2, warp, lane)
//   void dkdv_step(acc_k, acc_v, sK, sV, sQ, sdO, lse_log2, delta, real_k, real_q, scale_log2, warp, lane)
// Pad query rows read as 0 in dO (and Q in dkdv_pass) and get P^T = 0 whatever lse holds there,
// so they add nothing to any gradient; pad keys read as 0 and get P = 0.  Pad slots of dq, dk
// and dv are written as zeros.
#pragma once

#include "attention_common.cuh"

namespace vsa {

// A dQ CTA's statistics of its thread's two rows (warp * 16 + lane / 4 + {0, 8} from row0):
// lse in the log2 domain and delta.
__device__ __forceinline__ void load_row_stats(const float* lse, const float* delta, size_t row0, float (&lse_log2)[2],
                                               float (&row_delta)[2], int warp, int lane) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const size_t row = row0 + warp * 16 + (lane >> 2) + r * 8;
        lse_log2[r] = backward_lse(lse[row]) * LOG2E;
        row_delta[r] = delta[row];
    }
}

template <typename T, int D, class Products>
__device__ __forceinline__ void dq_pass(const T* q, const T* k, const T* v, const T* dout, const float* lse,
                                        const float* delta, const int* q2k_idx, const int* q2k_num,
                                        const int* q_block_sizes, const int* kv_block_sizes, const float* dq_tile,
                                        T* dq, int num_heads, int num_kv_heads, int q_len, int kv_len, int list_len,
                                        int tile_volume, float scale) {
    constexpr int TILE = AttentionSmem<D>::TILE;
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned char* sQ = smem;
    unsigned char* sdO = smem + TILE;
    unsigned char* sK = smem + 2 * TILE;  // two stages
    unsigned char* sV = smem + 4 * TILE;  // two stages

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const AttentionCta<T, D> cta(k, v, q2k_idx, q2k_num, kv_block_sizes, num_heads, num_kv_heads, q_len, kv_len,
                                 list_len, tile_volume);
    const int real_q = real_rows(q_block_sizes[cta.q_tile], (blockIdx.x * ATT_BLOCK_M) % tile_volume);
    auto load_chunk = [&](int c) {
        const auto chunk = cta.chunk(c);
        load_tile_async<D>(sK + (c & 1) * TILE, cta.k + chunk.offset, chunk.valid, tid);
        load_tile_async<D>(sV + (c & 1) * TILE, cta.v + chunk.offset, chunk.valid, tid);
    };

    load_tile_async<D>(sQ, q + cta.q_offset, ATT_BLOCK_M, tid);
    load_tile_async<D>(sdO, dout + cta.q_offset, real_q, tid);  // pad rows read as 0
    if (cta.n_chunks > 0) load_chunk(0);
    cp_async_commit();

    float lse_log2[2], row_delta[2];
    load_row_stats(lse, delta, cta.q_offset / D, lse_log2, row_delta, warp, lane);
    float acc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;
    Products products;

    for (int c = 0; c < cta.n_chunks; ++c) {
        cp_async_wait<0>();
        __syncthreads();  // chunk c has arrived; every warp is done with chunk c-1's stage
        if (c == 0) products.start_dq(sQ, sdO, warp, lane);
        if (c + 1 < cta.n_chunks) load_chunk(c + 1);
        cp_async_commit();
        const int valid = cta.chunk(c).valid;
        if (valid == 0) continue;  // a 64-key sub-chunk past the end of a short tile (V > 64)
        products.dq_chunk(acc, sK + (c & 1) * TILE, sV + (c & 1) * TILE, valid, lse_log2, row_delta,
                          scale * LOG2E, warp, lane);
    }
    cp_async_wait<0>();
    const float* tile_vec = dq_tile ? dq_tile + (static_cast<size_t>(cta.bh) * cta.num_q_blocks + cta.q_tile) * D : nullptr;
    write_rows<T, D>(dq + cta.q_offset, acc, scale, tile_vec, real_q, warp, lane);
}

// A dK/dV CTA's work (both dK/dV kernels): a 64-key chunk (`chunk`) of a (batch, kv head), its
// real keys, where its rows and its tile's coarse share live, and its steps: one per 64-row slice
// of each query tile on the chunk's KV->Q list.  Without `order` the chunk is blockIdx.x of
// (batch, kv head) blockIdx.y + bh_kv0; with it (kv_lists_order: the launch's lists, long ones
// first) the CTA's rank in the grid, c = blockIdx.y * gridDim.x + blockIdx.x, takes list
// order[bh_kv0 * N_kv + c / slices] and its sub-chunk c % slices.
template <int D> struct DkdvCta {
    int bh_kv, b, kv_head, group, num_q_blocks, num_kv_blocks, slices, chunk, kv_tile, real_k, first, steps;
    size_t kv_offset;  // element offset of the chunk's first key row in k, v, dk, dv
    size_t tile_row;   // element offset of the key tile's row in dk_tile / dv_tile

    __device__ DkdvCta(const int* kv2q_offsets, const int* kv_block_sizes, int num_heads, int num_kv_heads, int q_len,
                       int kv_len, int tile_volume, int bh_kv0 = 0, const int* order = nullptr)
        : group(num_heads / num_kv_heads), num_q_blocks(q_len / tile_volume), num_kv_blocks(kv_len / tile_volume),
          slices(tile_volume / ATT_BLOCK_M) {
        int list;
        if (order) {
            const int c = blockIdx.y * gridDim.x + blockIdx.x;
            const int rank = slices == 1 ? c : c / slices;
            list = order[bh_kv0 * num_kv_blocks + rank];
            bh_kv = list / num_kv_blocks;
            kv_tile = list - bh_kv * num_kv_blocks;
            chunk = kv_tile * slices + (c - rank * slices);
        } else {
            bh_kv = blockIdx.y + bh_kv0;
            chunk = blockIdx.x;
            kv_tile = chunk / slices;
            list = bh_kv * num_kv_blocks + kv_tile;
        }
        b = bh_kv / num_kv_heads;
        kv_head = bh_kv % num_kv_heads;
        const int key0 = chunk * ATT_BLOCK_N;
        real_k = real_rows(kv_block_sizes[kv_tile], key0 % tile_volume);
        kv_offset = (static_cast<size_t>(bh_kv) * kv_len + key0) * D;
        tile_row = (static_cast<size_t>(bh_kv) * num_kv_blocks + kv_tile) * D;
        first = kv2q_offsets[list];
        steps = real_k > 0 ? (kv2q_offsets[list + 1] - first) * slices : 0;
    }
};

template <typename T, int D, class Products>
__device__ __forceinline__ void dkdv_pass(const T* q, const T* k, const T* v, const T* dout, const float* lse_log2,
                                          const float* delta, const int* kv2q_code, const int* kv2q_offsets,
                                          const int* q_block_sizes, const int* kv_block_sizes, const float* dk_tile,
                                          const float* dv_tile, T* dk, T* dv, int num_heads, int num_kv_heads,
                                          int q_len, int kv_len, int tile_volume, float scale, const int* order) {
    constexpr int TILE = AttentionSmem<D>::TILE;
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned char* sK = smem;
    unsigned char* sV = smem + TILE;
    unsigned char* sQ = smem + 2 * TILE;   // two stages
    unsigned char* sdO = smem + 4 * TILE;  // two stages
    float* sStats = reinterpret_cast<float*>(smem + 6 * TILE);  // [stage][lse_log2 | delta][64]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const DkdvCta<D> cta(kv2q_offsets, kv_block_sizes, num_heads, num_kv_heads, q_len, kv_len, tile_volume, 0, order);
    const int b = cta.b, kv_head = cta.kv_head, group = cta.group, num_q_blocks = cta.num_q_blocks;
    const int real_k = cta.real_k, slices = cta.slices, first = cta.first, steps = cta.steps;
    const size_t kv_offset = cta.kv_offset;

    // Step t: query slice t % slices of the t / slices-th query tile that selected this key tile.
    // stage_rows holds each stage's real query rows (0..64), one byte per stage.
    unsigned int stage_rows = 0;
    auto load_step = [&](int t) {
        const int code = kv2q_code[first + t / slices], slice = t % slices;
        const int h = kv_head * group + code / num_q_blocks, q_tile = code % num_q_blocks;
        const size_t row0 = static_cast<size_t>(b * num_heads + h) * q_len + q_tile * tile_volume + slice * ATT_BLOCK_M;
        const int stage = t & 1, real_q = real_rows(q_block_sizes[q_tile], slice * ATT_BLOCK_M);
        stage_rows = (stage_rows & ~(0xffu << 8 * stage)) | static_cast<unsigned int>(real_q) << 8 * stage;
        load_tile_async<D>(sQ + stage * TILE, q + row0 * D, real_q, tid);
        load_tile_async<D>(sdO + stage * TILE, dout + row0 * D, real_q, tid);
        if (tid < 32) {  // 64 lse_log2 then 64 delta values: 16-byte pieces
            const float* src = (tid < 16 ? lse_log2 : delta) + row0 + (tid & 15) * 4;
            cp_async_16(sStats + stage * 128 + tid * 4, src, 16);
        }
    };

    load_tile_async<D>(sK, k + kv_offset, real_k, tid);
    load_tile_async<D>(sV, v + kv_offset, real_k, tid);
    if (steps > 0) load_step(0);
    cp_async_commit();

    float acc_k[D / 2], acc_v[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc_k[i] = acc_v[i] = 0.f;
    Products products;

    for (int t = 0; t < steps; ++t) {
        cp_async_wait<0>();
        __syncthreads();  // step t has arrived; every warp is done with step t-1's stage
        if (t + 1 < steps) load_step(t + 1);
        cp_async_commit();
        const float* stats = sStats + (t & 1) * 128;
        const int real_q = (stage_rows >> 8 * (t & 1)) & 0xff;
        products.dkdv_step(acc_k, acc_v, sK, sV, sQ + (t & 1) * TILE, sdO + (t & 1) * TILE, stats, stats + 64, real_k,
                           real_q, scale * LOG2E, warp, lane);
    }
    cp_async_wait<0>();
    write_rows<T, D>(dk + kv_offset, acc_k, scale, dk_tile ? dk_tile + cta.tile_row : nullptr, real_k, warp, lane);
    write_rows<T, D>(dv + kv_offset, acc_v, 1.f, dv_tile ? dv_tile + cta.tile_row : nullptr, real_k, warp, lane);
}

}  // namespace vsa
