// Block-sparse attention forward (VSA fine stage) for Hopper: warpgroup MMA (wgmma, sm_90a).
//
// Same contract, CTA decomposition and epilogue as attention_fwd.cu (see there); the two
// matrix products run on wgmma:
//   S[64x64] = Q K^T : Q and K read from swizzled shared memory (K-major), D/16 k16 steps;
//   O[64xD] += P V   : P from registers (S re-packed to 16 bits), V from shared memory as an
//                      MN-major operand transposed by the instruction.
// K and V chunks arrive by TMA (one thread issues two or four bulk tensor copies per chunk,
// completing on a shared-memory barrier per buffer), so the warps spend no instructions on
// addresses.  Latency is hidden by occupancy rather than by deep buffering: K and V have one
// shared-memory stage each (Q + K + V = 48 KB at D = 128), so four CTAs share an SM, and each
// buffer is refilled as soon as its product is done:
//   wait K_c -> S = Q K_c^T -> refill K with chunk c+1 -> softmax -> wait V_c -> O += P V_c
//   -> refill V with chunk c+1.
// The K load overlaps the softmax and P V; the V load overlaps the next Q K^T and softmax.
// TMA copies whole 64-key chunks: past a tile's block size, scores are masked and the value
// rows are zeroed in shared memory (fenced for the tensor cores) before P V.
#include "tma.cuh"
#include "wgmma.cuh"

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
    constexpr int TILE = AttentionSmem<D>::TILE;
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned char* sQ = smem;
    unsigned char* sK = smem + TILE;
    unsigned char* sV = smem + 2 * TILE;
    unsigned long long* bar_k = reinterpret_cast<unsigned long long*>(smem + 3 * TILE);
    unsigned long long* bar_v = bar_k + 1;

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
    auto row_of = [&](const typename AttentionCta<T, D>::Chunk& chunk) { return kv_row0 + static_cast<int>(chunk.offset / D); };

    if (tid == 0) {
        mbar_init(bar_k, 1);
        mbar_init(bar_v, 1);
        fence_mbar_init();
    }
    __syncthreads();
    auto current = n > 0 ? cta.chunk(0) : typename AttentionCta<T, D>::Chunk{0, 0};
    if (n > 0) {
        issue(sK, &tma_k, bar_k, row_of(current));
        issue(sV, &tma_v, bar_v, row_of(current));
    }
    load_tile_async<D>(sQ, q + cta.q_offset, ATT_BLOCK_M, tid);
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();  // Q visible to the tensor cores

    const unsigned long long desc_q = smem_desc(sQ, 16, 1024), desc_k = smem_desc(sK, 16, 1024),
                             desc_v = smem_desc(sV, ATOM_BYTES, 1024);
    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float row_max[2] = {neg_inf(), neg_inf()}, row_sum[2] = {0.f, 0.f}, alpha[2];

    for (int c = 0; c < n; ++c) {
        const unsigned int phase = c & 1;  // each barrier completes one phase per chunk
        const auto next = c + 1 < n ? cta.chunk(c + 1) : current;  // index loads overlap Q K^T
        mbar_wait(bar_k, phase);
        float s[32];
        wgmma_fence();
        wgmma_ss_issue<T, D / 16>(s, desc_q, desc_k);
        wgmma_wait<0>();
        fence_registers(s);
        __syncthreads();  // every warp is done reading K_c
        if (c + 1 < n) issue(sK, &tma_k, bar_k, row_of(next));

        softmax_scores(s, row_max, row_sum, alpha, current.valid, scale_log2, lane);
        rescale(o, alpha);
        unsigned int p[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) p_fragment<T>(s, kk, p[kk]);

        mbar_wait(bar_v, phase);
        if (current.valid < ATT_BLOCK_N) zero_rows_from<D>(sV, nullptr, current.valid, tid);  // pad keys' values
        wgmma_rs_issue<T, D>(o, p, desc_v);
        wgmma_wait<0>();
        fence_registers(o);
        __syncthreads();  // every warp is done reading V_c
        if (c + 1 < n) issue(sV, &tma_v, bar_v, row_of(next));
        current = next;
    }
    write_output<T, D>(o, row_max, row_sum, cta, coarse, gate, out, lse, valid_rows, warp, lane);
}
