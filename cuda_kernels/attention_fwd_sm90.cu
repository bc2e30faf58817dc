// Block-sparse attention forward (VSA fine stage) for Hopper: warpgroup MMA (wgmma, sm_90a).
//
// Same contract, CTA decomposition, pipeline and epilogue as attention_fwd.cu (see there),
// with the two matrix products on wgmma instead of mma.sync:
//   S[64x64] = Q K^T : 64-row warpgroup MMAs, Q and K both read from swizzled shared memory
//                      (K-major), D/16 steps of k16;
//   O[64xD] += P V   : P from registers (the S accumulators re-packed to bf16/fp16), V read
//                      from shared memory as an MN-major operand transposed by the instruction.
// The tensor cores read shared memory directly (no ldmatrix through the register file);
// cp.async writes are made visible to them with fence.proxy.async before each barrier.
// Two CTAs share an SM (80 KB of shared memory each at D = 128), so one's softmax overlaps
// the other's matrix products.
#include "wgmma.cuh"

template <typename T, int D>
__global__ void __launch_bounds__(vsa::ATT_THREADS)
block_sparse_fwd_sm90(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                      const int* __restrict__ q2k_idx, const int* __restrict__ q2k_num,
                      const int* __restrict__ kv_block_sizes, const float* __restrict__ coarse,
                      const T* __restrict__ gate, T* __restrict__ out, float* __restrict__ lse, int num_heads,
                      int num_kv_heads, int q_len, int kv_len, int list_len, int tile_volume, float scale_log2) {
    using namespace vsa;
    constexpr int TILE = AttentionSmem<D>::TILE;
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned char* sQ = smem;
    unsigned char* sK = smem + TILE;
    unsigned char* sV = smem + 3 * TILE;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const AttentionCta<T, D> cta(k, v, q2k_idx, q2k_num, kv_block_sizes, num_heads, num_kv_heads, q_len, kv_len,
                                 list_len, tile_volume);
    auto load_chunk = [&](int c) {
        const int valid = cta.valid_keys(c);
        load_tile_async<D>(sK + (c & 1) * TILE, cta.k + cta.chunk_offset(c), valid, tid);
        load_tile_async<D>(sV + (c & 1) * TILE, cta.v + cta.chunk_offset(c), valid, tid);
    };

    load_tile_async<D>(sQ, q + cta.q_offset, ATT_BLOCK_M, tid);
    if (cta.n_chunks > 0) load_chunk(0);
    cp_async_commit();

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float row_max[2] = {neg_inf(), neg_inf()}, row_sum[2] = {0.f, 0.f};

    for (int c = 0; c < cta.n_chunks; ++c) {
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();  // chunk c visible to the tensor cores; chunk c-1's buffers are free
        if (c + 1 < cta.n_chunks) load_chunk(c + 1);
        cp_async_commit();

        const int valid = cta.valid_keys(c);
        if (valid == 0) continue;  // a 64-key sub-chunk past the end of a short tile (V > 64)
        const unsigned char* cK = sK + (c & 1) * TILE;
        const unsigned char* cV = sV + (c & 1) * TILE;

        float s[32];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int step = (kk >> 2) * ATOM_BYTES + (kk & 3) * 32;
            WgmmaSS<T>::run(s, smem_desc(sQ + step, 16, 1024), smem_desc(cK + step, 16, 1024), kk > 0);
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(s);

        softmax_step(s, o, row_max, row_sum, valid, scale_log2, lane);

        fence_registers(o);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            unsigned int a[4];
            p_fragment<T>(s, kk, a);
            WgmmaRS<T, D>::run(o, a, smem_desc(cV + kk * 16 * 128, ATOM_BYTES, 1024), 1);
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(o);
    }
    cp_async_wait<0>();
    write_output<T, D>(o, row_max, row_sum, cta, coarse, gate, out, lse, q_len, warp, lane);
}
