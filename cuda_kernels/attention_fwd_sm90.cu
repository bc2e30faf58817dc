// Block-sparse attention forward (VSA fine stage) for Hopper: warpgroup MMA (wgmma, sm_90a).
//
// Same contract, CTA decomposition and epilogue as attention_fwd.cu (see there); the two
// matrix products run on wgmma:
//   S[64x64] = Q K^T : Q and K read from swizzled shared memory (K-major), D/16 k16 steps;
//   O[64xD] += P V   : P from registers (S re-packed to 16 bits), V from shared memory as an
//                      MN-major operand transposed by the instruction.
// Latency is hidden by occupancy rather than by deep buffering: K and V have one shared-
// memory stage each (Q + K + V = 48 KB at D = 128), so three CTAs share an SM, and each
// buffer is refilled as soon as its product is done:
//   wait K_c -> S = Q K_c^T -> refill K with chunk c+1 -> softmax -> wait V_c -> O += P V_c
//   -> refill V with chunk c+1.
// The K load overlaps the softmax and P V; the V load overlaps the next Q K^T and softmax.
// cp.async writes are fenced (fence.proxy.async) before the tensor cores read them.
#include "wgmma.cuh"

template <typename T, int D>
__global__ void __launch_bounds__(vsa::ATT_THREADS, 3)
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
    unsigned char* sV = smem + 2 * TILE;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const AttentionCta<T, D> cta(k, v, q2k_idx, q2k_num, kv_block_sizes, num_heads, num_kv_heads, q_len, kv_len,
                                 list_len, tile_volume);
    const int n = cta.n_chunks;
    auto ready = [&]() {  // this thread's copies are done: make everyone's visible to the tensor cores
        fence_proxy_async();
        __syncthreads();
    };

    // Matrix descriptors of the three tiles; a k16 step adds its byte offset / 16 to the
    // start-address field (no carry: shared addresses stay below 256 KB).
    const unsigned long long desc_q = smem_desc(sQ, 16, 1024), desc_k = smem_desc(sK, 16, 1024),
                             desc_v = smem_desc(sV, ATOM_BYTES, 1024);

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float row_max[2] = {neg_inf(), neg_inf()}, row_sum[2] = {0.f, 0.f}, alpha[2];

    // cp.async groups complete in commit order: {Q, K_0}, {V_0}, then K_{c+1}, V_{c+1} per chunk.
    auto current = n > 0 ? cta.chunk(0) : typename AttentionCta<T, D>::Chunk{0, 0};
    load_tile_async<D>(sQ, q + cta.q_offset, ATT_BLOCK_M, tid);
    if (n > 0) load_tile_async<D>(sK, cta.k + current.offset, current.valid, tid);
    cp_async_commit();
    if (n > 0) load_tile_async<D>(sV, cta.v + current.offset, current.valid, tid);
    cp_async_commit();

    for (int c = 0; c < n; ++c) {
        // Fetch the next chunk's place early: its index loads then overlap Q K^T.
        const auto next = c + 1 < n ? cta.chunk(c + 1) : current;
        cp_async_wait<1>();  // K_c (V_c may still be in flight)
        ready();
        float s[32];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int step = ((kk >> 2) * ATOM_BYTES + (kk & 3) * 32) >> 4;  // in 16-byte units
            WgmmaSS<T>::run(s, desc_q + step, desc_k + step, kk > 0);
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(s);
        __syncthreads();  // every warp is done reading K_c
        if (c + 1 < n) load_tile_async<D>(sK, cta.k + next.offset, next.valid, tid);
        cp_async_commit();

        softmax_scores(s, row_max, row_sum, alpha, current.valid, scale_log2, lane);
        rescale(o, alpha);
        unsigned int p[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) p_fragment<T>(s, kk, p[kk]);

        cp_async_wait<1>();  // V_c (K_{c+1} may still be in flight)
        ready();
        fence_registers(o);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
            WgmmaRS<T, D>::run(o, p[kk], desc_v + ((kk * 16 * 128) >> 4), 1);
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(o);
        __syncthreads();  // every warp is done reading V_c
        if (c + 1 < n) load_tile_async<D>(sV, cta.v + next.offset, next.valid, tid);
        cp_async_commit();
        current = next;
    }
    cp_async_wait<0>();
    write_output<T, D>(o, row_max, row_sum, cta, coarse, gate, out, lse, q_len, warp, lane);
}
