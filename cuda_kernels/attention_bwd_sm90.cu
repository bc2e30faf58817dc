// Block-sparse attention backward for Hopper: the dQ and dK/dV passes of attention_bwd.cuh
// (same contract, pipelines, KV->Q lists and epilogues) with every matrix product on warpgroup
// MMA (wgmma, sm_90a); delta comes from attention_bwd.cu's bwd_delta.
//
// WgmmaProducts, per dQ chunk:
//   S = Q K^T and dP = dO V^T (shared-memory operands, both K-major) issued together ->
//   P = exp2(scale*log2e*S - lse*log2e) while dP finishes -> dS = P (dP - delta) ->
//   acc += dS K (dS from registers; K as an MN-major operand, transposed by the instruction).
// per dK/dV step (this CTA's 64 keys are the warpgroup's 64 rows):
//   S^T = K Q^T and dP^T = V dO^T issued together -> P^T (keys past the tile's block size are
//   0) -> dV += P^T dO issued -> dS^T = P^T (dP^T - delta) while it runs -> dK += dS^T Q.
// Shared memory written by cp.async is fenced (fence.proxy.async) before wgmma reads it.
#include "attention_bwd.cuh"
#include "wgmma.cuh"

namespace vsa {

// Descriptor offset (16-byte units) of k16 step kk of a K-major operand.
__device__ __forceinline__ int k_major_step(int kk) { return ((kk >> 2) * ATOM_BYTES + (kk & 3) * 32) >> 4; }
// Descriptor offset of k16 step kk (16 rows further) of an MN-major operand.
__device__ __forceinline__ int mn_major_step(int kk) { return (kk * 16 * 128) >> 4; }

template <typename T, int D> struct WgmmaProducts {
    unsigned long long desc_q, desc_do;  // bwd_dq: the CTA's Q and dO tiles

    __device__ static void visible() { fence_proxy_async(); }

    __device__ void start_dq(const unsigned char* sQ, const unsigned char* sdO, int, int) {
        desc_q = smem_desc(sQ, 16, 1024);
        desc_do = smem_desc(sdO, 16, 1024);
    }

    __device__ void dq_chunk(float (&acc)[D / 2], const unsigned char* cK, const unsigned char* cV, int valid,
                             const float (&lse_log2)[2], const float (&row_delta)[2], float scale_log2, int,
                             int lane) {
        const unsigned long long desc_k = smem_desc(cK, 16, 1024), desc_v = smem_desc(cV, 16, 1024);
        float s[32], dp[32];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) WgmmaSS<T>::run(s, desc_q + k_major_step(kk), desc_k + k_major_step(kk), kk > 0);
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
            WgmmaSS<T>::run(dp, desc_do + k_major_step(kk), desc_v + k_major_step(kk), kk > 0);
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
        for (int kk = 0; kk < 4; ++kk) WgmmaRS<T, D>::run(acc, ds[kk], desc_kt + mn_major_step(kk), 1);
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(acc);
    }

    __device__ void dkdv_step(float (&acc_k)[D / 2], float (&acc_v)[D / 2], const unsigned char* sK,
                              const unsigned char* sV, const unsigned char* cQ, const unsigned char* cdO,
                              const float* c_lse, const float* c_delta, int real_k, float scale_log2, int warp,
                              int lane) {
        const unsigned long long desc_k = smem_desc(sK, 16, 1024), desc_v = smem_desc(sV, 16, 1024),
                                 desc_q = smem_desc(cQ, 16, 1024), desc_do = smem_desc(cdO, 16, 1024);
        float st[32], dpt[32];  // S^T and dP^T: this warp's 16 keys x 64 query rows
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
            WgmmaSS<T>::run(st, desc_k + k_major_step(kk), desc_q + k_major_step(kk), kk > 0);
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
            WgmmaSS<T>::run(dpt, desc_v + k_major_step(kk), desc_do + k_major_step(kk), kk > 0);
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
        for (int kk = 0; kk < 4; ++kk) WgmmaRS<T, D>::run(acc_v, pt[kk], desc_do_t + mn_major_step(kk), 1);
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
        for (int kk = 0; kk < 4; ++kk) WgmmaRS<T, D>::run(acc_k, ds[kk], desc_q_t + mn_major_step(kk), 1);
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(acc_k);
        fence_registers(acc_v);
    }
};

}  // namespace vsa

VSA_BWD_KERNELS(bwd_dq_sm90, bwd_dkdv_sm90, vsa::WgmmaProducts, 1)
