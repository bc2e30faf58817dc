// Block-sparse attention forward (VSA fine stage) with the coarse combine in its epilogue;
// the portable tensor-core version (mma.sync, sm_80+).  Hopper uses attention_fwd_sm90.cu.
//
// Template parameters: T (__half or __nv_bfloat16) and D (head dim, 64 or 128).
//
// Algorithm (FlashAttention-2 style): one CTA of 4 warps per (64 query rows, batch*head);
// each warp owns 16 rows.  The CTA's query tile i selects q2k_num[b,h,i] key tiles
// q2k_idx[b,h,i,:]; each key tile is streamed as V/64 chunks of 64 keys through a
// two-stage cp.async pipeline in swizzled shared memory.  Keys past kv_block_sizes[j] are
// zero-filled by the copy and masked to -inf, so pad slots never contribute.
// S = Q K^T (ldmatrix + mma.sync, fp32) -> online softmax in the log2 domain (ex2) ->
// O += P V with P re-packed from the S accumulators as the A operand.
// Epilogue: out = O / l + gate * coarse[b,h,i] (or + coarse), lse = ln(sum of exp).
// Pad query rows (past q_block_sizes[i], when given) get out 0 and lse -inf instead.
//
// Memory traffic per CTA: Q and out once (64*D*2 bytes each), gate once if given, and
// 2 * 64*D*2 bytes of K/V per selected chunk (re-read by every query tile that selects
// it; L2 serves most of that, since the CTAs of one head run together).
#include "attention_common.cuh"

template <typename T, int D>
__global__ void __launch_bounds__(vsa::ATT_THREADS)
block_sparse_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                 const int* __restrict__ q2k_idx, const int* __restrict__ q2k_num,
                 const int* __restrict__ kv_block_sizes, const int* __restrict__ q_block_sizes,
                 const float* __restrict__ coarse,
                 const T* __restrict__ gate, T* __restrict__ out, float* __restrict__ lse, int num_heads,
                 int num_kv_heads, int q_len, int kv_len, int list_len, int tile_volume, float scale_log2) {
    using namespace vsa;
    constexpr int TILE = AttentionSmem<D>::TILE;
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned char* sQ = smem;
    unsigned char* sK = smem + TILE;      // two stages
    unsigned char* sV = smem + 3 * TILE;  // two stages

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const AttentionCta<T, D> cta(k, v, q2k_idx, q2k_num, kv_block_sizes, num_heads, num_kv_heads, q_len, kv_len,
                                 list_len, tile_volume);
    const int valid_rows = forward_real_rows(q_block_sizes, cta);
    const int n = valid_rows > 0 ? cta.n_chunks : 0;  // no real row (tile volume 128, short tile): nothing to attend
    auto load_chunk = [&](int c) {
        const auto chunk = cta.chunk(c);
        load_tile_async<D>(sK + (c & 1) * TILE, cta.k + chunk.offset, chunk.valid, tid);
        load_tile_async<D>(sV + (c & 1) * TILE, cta.v + chunk.offset, chunk.valid, tid);
    };

    load_tile_async<D>(sQ, q + cta.q_offset, ATT_BLOCK_M, tid);
    if (n > 0) load_chunk(0);
    cp_async_commit();

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float row_max[2] = {neg_inf(), neg_inf()}, row_sum[2] = {0.f, 0.f};
    unsigned int qf[D / 16][4];

    for (int c = 0; c < n; ++c) {
        cp_async_wait<0>();
        __syncthreads();  // chunk c visible to all; everyone is done with chunk c-1's buffers
        if (c == 0) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                ldmatrix_x4(qf[kk], sQ + atom_offset(warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, kk * 2 + (lane >> 4)));
        }
        if (c + 1 < n) load_chunk(c + 1);
        cp_async_commit();

        const int valid = cta.chunk(c).valid;
        // A 64-key sub-chunk past the end of a short tile (V > 64).  Never chunk 0 (the first
        // sub-chunk of a tile: block sizes are >= 1), whose softmax takes the rows' first max.
        if (valid == 0) continue;
        const unsigned char* cK = sK + (c & 1) * TILE;
        const unsigned char* cV = sV + (c & 1) * TILE;

        float s[32];
#pragma unroll
        for (int i = 0; i < 32; ++i) s[i] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < 4; ++np) {  // 16 keys per ldmatrix.x4
                unsigned int kf[4];
                ldmatrix_x4(kf, cK + atom_offset(np * 16 + (lane & 7) + (lane >> 4) * 8, kk * 2 + ((lane >> 3) & 1)));
                Mma<T>::run(s + 8 * np, qf[kk], kf[0], kf[1]);
                Mma<T>::run(s + 8 * np + 4, qf[kk], kf[2], kf[3]);
            }
        }
        float alpha[2];
        if (softmax_scores(s, row_max, row_sum, alpha, valid, scale_log2, lane, c == 0)) rescale(o, alpha);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            unsigned int a[4];
            p_fragment<T>(s, kk, a);
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                unsigned int vf[4];
                ldmatrix_x4_trans(vf, cV + atom_offset(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dp * 2 + (lane >> 4)));
                Mma<T>::run(o + 8 * dp, a, vf[0], vf[1]);
                Mma<T>::run(o + 8 * dp + 4, a, vf[2], vf[3]);
            }
        }
    }
    cp_async_wait<0>();
    write_output<T, D>(o, row_max, row_sum, cta, coarse, gate, out, lse, valid_rows, warp, lane);
}
