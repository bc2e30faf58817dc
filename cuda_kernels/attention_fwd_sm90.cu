// Block-sparse attention forward (VSA fine stage) for Hopper: warpgroup MMA (wgmma, sm_90a).
//
// Same contract, CTA decomposition and epilogue as attention_fwd.cu (see there); the two
// matrix products run on wgmma:
//   S[64x64] = Q K^T : Q and K read from swizzled shared memory (K-major), D/16 k16 steps;
//   O[64xD] += P V   : P from registers (S re-packed to 16 bits), V from shared memory as an
//                      MN-major operand transposed by the instruction.
// K and V chunks arrive by TMA (one thread issues two or four bulk tensor copies per chunk,
// completing on a shared-memory barrier per buffer), so the warps spend no instructions on
// addresses.  Latency is hidden mostly by occupancy rather than by deep buffering: K and V have
// FWD_STAGES<D> shared-memory stages each, one at D = 128 (Q + K + V = 48 KB, so four CTAs share
// an SM) and two at D = 64 (Q + 2 x (K + V) = 40 KB; by registers, 90, and shared memory five CTAs
// fit).  Chunk c sits in stage c % STAGES, and each buffer is refilled as soon as its product is
// done:
//   wait K_c -> S = Q K_c^T -> refill K with chunk c + STAGES -> softmax -> wait V_c
//   -> O += P V_c -> refill V with chunk c + STAGES.
// With one stage the K load overlaps the softmax and P V, the V load the next Q K^T and
// softmax; a second stage gives each load one more chunk to arrive.  At D = 64 that made the
// forward 1.1% faster (Wan2.1 480p, 24 heads); writing the loop for any number of stages also
// made the one-stage D = 128 kernel 1% faster (main shape; BENCHMARKS.md).  More stages cost
// CTAs per SM and were 15-18% slower: a second at D = 128 (80 KB: two CTAs), a third or fourth
// at D = 64 (three CTAs).
// TMA copies whole 64-key chunks: past a tile's block size, scores are masked and the value
// rows are zeroed in shared memory (fenced for the tensor cores) before P V.
#include "tma.cuh"
#include "wgmma.cuh"

namespace vsa {
// K and V stages per head dim (the launcher's _FWD_STAGES must match; see above).
template <int D> constexpr int FWD_STAGES = D == 64 ? 2 : 1;
}  // namespace vsa

template <typename T, int D>
__global__ void __launch_bounds__(vsa::ATT_THREADS, 4)
block_sparse_fwd_sm90(const __grid_constant__ vsa::TmaDesc tma_k, const __grid_constant__ vsa::TmaDesc tma_v,
                      const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                      const int* __restrict__ q2k_idx, const int* __restrict__ q2k_num,
                      const int* __restrict__ kv_block_sizes, const int* __restrict__ q_block_sizes,
                      const float* __restrict__ coarse,
                      const T* __restrict__ gate, T* __restrict__ out, float* __restrict__ lse, int num_heads,
                      int num_kv_heads, int q_len, int kv_len, int list_len, int tile_volume, float scale_log2) {
    using namespace vsa;
    constexpr int TILE = AttentionSmem<D>::TILE, STAGES = FWD_STAGES<D>;
    static_assert(STAGES >= 1 && STAGES <= 4, "stage_valid holds one byte per stage");
    using Chunk = typename AttentionCta<T, D>::Chunk;
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned char* sQ = smem;
    unsigned char* sK = smem + TILE;                // STAGES tiles
    unsigned char* sV = sK + STAGES * TILE;         // STAGES tiles
    unsigned long long* bar_k = reinterpret_cast<unsigned long long*>(sV + STAGES * TILE);  // one per K stage
    unsigned long long* bar_v = bar_k + STAGES;                                              // one per V stage

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const AttentionCta<T, D> cta(k, v, q2k_idx, q2k_num, kv_block_sizes, num_heads, num_kv_heads, q_len, kv_len,
                                 list_len, tile_volume);
    const int valid_rows = forward_real_rows(q_block_sizes, cta);
    const int n = valid_rows > 0 ? cta.n_chunks : 0;  // no real row (tile volume 128, short tile): nothing to attend
    // Row of the K / V tensor maps ([B * H_kv * kv_len, D]) where chunk c starts.
    const int kv_row0 = static_cast<int>((cta.k - k) / D);
    auto issue = [&](unsigned char* tile, const TmaDesc* desc, unsigned long long* bar, int row) {
        if (tid == 0) {
            mbar_expect_tx(bar, TILE);
#pragma unroll
            for (int atom = 0; atom < D / 64; ++atom) tma_load_2d(tile + atom * ATOM_BYTES, desc, atom * 64, row, bar);
        }
    };
    auto row_of = [&](const Chunk& chunk) { return kv_row0 + static_cast<int>(chunk.offset / D); };

    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(bar_k + s, 1);
            mbar_init(bar_v + s, 1);
        }
        fence_mbar_init();
    }
    __syncthreads();
    // Chunk c sits in stage c % STAGES; stage_valid holds each stage's real keys, one byte per stage.
    unsigned int stage_valid = 0;
#pragma unroll
    for (int s = 0; s < STAGES; ++s)
        if (s < n) {
            const Chunk chunk = cta.chunk(s);
            issue(sK + s * TILE, &tma_k, bar_k + s, row_of(chunk));
            issue(sV + s * TILE, &tma_v, bar_v + s, row_of(chunk));
            stage_valid |= static_cast<unsigned int>(chunk.valid) << 8 * s;
        }
    load_tile_async<D>(sQ, q + cta.q_offset, ATT_BLOCK_M, tid);
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();  // Q visible to the tensor cores

    const unsigned long long desc_q = smem_desc(sQ, 16, 1024), desc_k = smem_desc(sK, 16, 1024),
                             desc_v = smem_desc(sV, ATOM_BYTES, 1024), stage_step = TILE >> 4;
    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float row_max[2] = {neg_inf(), neg_inf()}, row_sum[2] = {0.f, 0.f}, alpha[2];

    for (int c = 0; c < n; ++c) {
        const int stage = STAGES == 1 ? 0 : c % STAGES;
        const unsigned int phase = (c / STAGES) & 1;  // each barrier completes one phase per load
        const int valid = (stage_valid >> 8 * stage) & 0xff;
        const bool refill = c + STAGES < n;  // the same in every thread
        const Chunk ahead = refill ? cta.chunk(c + STAGES) : Chunk{0, 0};  // index loads overlap Q K^T
        unsigned char* cV = sV + stage * TILE;
        mbar_wait(bar_k + stage, phase);
        float s[32];
        wgmma_fence();
        wgmma_ss_issue<T, D / 16>(s, desc_q, desc_k + stage_step * stage);
        wgmma_wait<0>();
        fence_registers(s);
        __syncthreads();  // every warp is done reading this stage's K
        if (refill) issue(sK + stage * TILE, &tma_k, bar_k + stage, row_of(ahead));

        if (softmax_scores(s, row_max, row_sum, alpha, valid, scale_log2, lane, c == 0)) rescale(o, alpha);
        unsigned int p[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) p_fragment<T>(s, kk, p[kk]);

        mbar_wait(bar_v + stage, phase);
        if (valid < ATT_BLOCK_N) zero_rows_from<D>(cV, nullptr, valid, tid);  // pad keys' values
        wgmma_rs_issue<T, D>(o, p, desc_v + stage_step * stage);
        wgmma_wait<0>();
        fence_registers(o);
        __syncthreads();  // every warp is done reading this stage's V
        if (refill) {
            issue(cV, &tma_v, bar_v + stage, row_of(ahead));
            stage_valid = (stage_valid & ~(0xffu << 8 * stage)) | static_cast<unsigned int>(ahead.valid) << 8 * stage;
        }
    }
    write_output<T, D>(o, row_max, row_sum, cta, coarse, gate, out, lse, valid_rows, warp, lane);
}
