// Row softmax in place, and its backward.
//
// softmax_rows: x [rows, n] fp32 becomes exp(x - max) / sum per row (the coarse stage's
// probabilities over the N_kv key tiles): one CTA of THREADS threads per row, by
// vsa::softmax_row_inplace (softmax.cuh).  The forward's selection does the same in its own
// kernel (topk.cu, select_topk<true>); this one serves the coarse attention on its own.
//
// softmax_grad_rows: the backward of o = softmax(s) v for one row, in place on g = dL/dP:
// g becomes P * (g - rowsum(g * P)), with rowsum(g * P) = dot(dL/do, o) (as g = dL/do v^T and
// o = P v), which reads D floats instead of n.  One warp per row: the dot product by shuffles,
// then one read of P and a read and write of g; (g - dot) and the product round separately.
#include "softmax.cuh"

namespace {

constexpr int THREADS = 256;
constexpr int GRAD_WARPS = 8;  // rows per CTA of softmax_grad_rows

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) softmax_rows(float* __restrict__ x, int n) {
    __shared__ float shared_max[THREADS / 32], shared_sum[THREADS / 32];
    vsa::softmax_row_inplace<THREADS>(x + static_cast<size_t>(blockIdx.x) * n, n, shared_max, shared_sum);
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
