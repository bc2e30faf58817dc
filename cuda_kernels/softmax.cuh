// Row softmax in place by one CTA, shared by softmax.cu (softmax_rows) and topk.cu (the top-k
// selection that also turns its row of scores into probabilities).
//
// Pass 1 keeps a running (max, sum of exp) per thread over a strided walk of the row (the
// online-softmax merge), reduced across the CTA through warp shuffles and shared memory; pass 2
// rewrites the row.  Two reads and one write of the row (rows of a few thousand floats stay in
// L1/L2 between the passes).
#pragma once

#include "common.cuh"

namespace vsa {

// Merge (m, s) into (max, sum): sum is kept relative to max.  A NaN makes both NaN, so that a
// row holding one comes out all NaN, as in the reference (fmaxf alone would drop a NaN met by an
// empty accumulator and keep one met by a non-empty one: a result depending on the thread count).
__device__ __forceinline__ void softmax_merge(float& max, float& sum, float m, float s) {
    if (m != m || max != max) {
        max = sum = quiet_nan();
        return;
    }
    const float top = fmaxf(max, m);
    if (top == neg_inf()) return;  // both empty
    sum = sum * __expf(max - top) + s * __expf(m - top);
    max = top;
}

// row[0, n) becomes exp(row - max) / sum.  Every thread of the CTA (THREADS, a multiple of 32)
// calls it; shared_max and shared_sum hold THREADS / 32 floats each.  It has one barrier, after
// pass 1: rows the CTA read before the call may be rewritten.
template <int THREADS>
__device__ __forceinline__ void softmax_row_inplace(float* row, int n, float* shared_max, float* shared_sum) {
    float max = neg_inf(), sum = 0.f;
    for (int i = threadIdx.x; i < n; i += THREADS) softmax_merge(max, sum, row[i], 1.f);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float m = __shfl_xor_sync(0xffffffffu, max, offset), s = __shfl_xor_sync(0xffffffffu, sum, offset);
        softmax_merge(max, sum, m, s);
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
    for (int w = 1; w < THREADS / 32; ++w) softmax_merge(max, sum, shared_max[w], shared_sum[w]);
    const float inv = 1.f / sum;
    for (int i = threadIdx.x; i < n; i += THREADS) row[i] = __expf(row[i] - max) * inv;
}

}  // namespace vsa
