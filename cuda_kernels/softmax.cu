// Row softmax in place, and its backward.
//
// softmax_rows: x [rows, n] fp32 becomes exp(x - max) / sum per row (the coarse stage's
// probabilities over the N_kv key tiles).  One CTA of THREADS threads per row.  Pass 1 keeps a running (max, sum of exp) per thread
// over a strided walk of the row (the online-softmax merge), reduced across the CTA through
// warp shuffles and shared memory; pass 2 rewrites the row.  Two reads and one write of the
// row (rows of a few thousand floats stay in L1/L2 between the passes).
//
// softmax_grad_rows: the backward of o = softmax(s) v for one row, in place on g = dL/dP:
// g becomes P * (g - rowsum(g * P)), with rowsum(g * P) = dot(dL/do, o) (as g = dL/do v^T and
// o = P v), which reads D floats instead of n.  One warp per row: the dot product by shuffles,
// then one read of P and a read and write of g; (g - dot) and the product round separately.
#include "common.cuh"

namespace {

constexpr int THREADS = 256;
constexpr int GRAD_WARPS = 8;  // rows per CTA of softmax_grad_rows

// Merge (m, s) into (max, sum): sum is kept relative to max.
__device__ __forceinline__ void merge(float& max, float& sum, float m, float s) {
    const float top = fmaxf(max, m);
    if (top == vsa::neg_inf()) return;  // both empty
    sum = sum * __expf(max - top) + s * __expf(m - top);
    max = top;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) softmax_rows(float* __restrict__ x, int n) {
    __shared__ float shared_max[THREADS / 32], shared_sum[THREADS / 32];
    float* row = x + static_cast<size_t>(blockIdx.x) * n;
    float max = vsa::neg_inf(), sum = 0.f;
    for (int i = threadIdx.x; i < n; i += THREADS) merge(max, sum, row[i], 1.f);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float m = __shfl_xor_sync(0xffffffffu, max, offset), s = __shfl_xor_sync(0xffffffffu, sum, offset);
        merge(max, sum, m, s);
    }
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) {
        shared_max[warp] = max;
        shared_sum[warp] = sum;
    }
    __syncthreads();
    max = shared_max[0];
    sum = shared_sum[0];
#pragma unroll
    for (int w = 1; w < THREADS / 32; ++w) merge(max, sum, shared_max[w], shared_sum[w]);
    const float inv = 1.f / sum;
    for (int i = threadIdx.x; i < n; i += THREADS) row[i] = __expf(row[i] - max) * inv;
}

extern "C" __global__ void __launch_bounds__(GRAD_WARPS * 32)
    softmax_grad_rows(float* __restrict__ g, const float* __restrict__ p, const float* __restrict__ d_out,
                      const float* __restrict__ out, long long rows, int n, int d) {
    const long long row = static_cast<long long>(blockIdx.x) * GRAD_WARPS + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const float* a = d_out + row * d;
    const float* b = out + row * d;
    float dot = 0.f;
    for (int i = lane; i < d; i += 32) dot = fmaf(a[i], b[i], dot);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
    float* g_row = g + row * n;
    const float* p_row = p + row * n;
    for (int i = lane; i < n; i += 32) g_row[i] = __fmul_rn(__fsub_rn(g_row[i], dot), p_row[i]);
}
