// Tile means: x [B, H, N*V, D] -> mean [B, H, N, D] (fp32), the mean over the first
// block_sizes[i] slots (the real tokens) of tile i.  Pad slots are never read, so they may hold
// anything, NaN included.
//
// One launch serves up to three tensors (the forward pass's q, k and v): the tiles of the three
// are numbered one after the other (tensor 0's are [0, end0), tensor 1's [end0, end1), tensor
// 2's [end1, end2)).  The tensors share the element type, the head dim D and the tile volume V;
// each has its own head count, tile count N and block sizes.  Because x is contiguous, tile
// `idx` of a tensor (over b, h and i together) starts at element idx * V * D, its mean goes to
// idx * D and its block size is block_sizes[idx % N].
//
// Algorithm: one thread per (tile, column vector).  A row of D elements is `cols = D / VEC`
// vectors of VEC elements (16 bytes when the launcher finds rows and pointers 16-byte aligned,
// else one element); thread (idx, c) walks the real rows of its tile, UNROLL rows of loads in
// flight at a time, sums them in fp32 in row order and writes VEC means.  Consecutive threads
// read consecutive 16-byte vectors of one row, so a warp reads whole rows.  No shared memory,
// no barrier: a thread waits only on its own loads, and enough of them are in flight (UNROLL
// per thread, 32 warps per SM) to cover memory latency.  A thread whose sum is not finite (one
// past float32's range, whose mean may still fit) sums its rows a second time, scaled (below).
//
// Memory traffic: each real row read once (B*H*S*D elements of the real tokens; twice by such a
// thread), one fp32 row written per tile; the block sizes are a few KB, read through L1/L2.
// Bandwidth bound.

#include "common.cuh"

namespace {

constexpr int THREADS = 128;
constexpr int UNROLL = 8;  // rows of loads in flight per thread
constexpr int MIN_CTAS = 8;  // per SM: caps registers at 64, so 1024 threads keep 128 KB of loads in flight

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
    T v[VEC];
};

}  // namespace

template <typename T, int VEC>
__global__ void __launch_bounds__(THREADS, MIN_CTAS)
block_mean(const T* __restrict__ x0, const T* __restrict__ x1, const T* __restrict__ x2,
           float* __restrict__ mean0, float* __restrict__ mean1, float* __restrict__ mean2,
           const int* __restrict__ sizes0, const int* __restrict__ sizes1, const int* __restrict__ sizes2,
           int end0, int end1, int end2,          // cumulative tile counts of the tensors
           int blocks0, int blocks1, int blocks2,  // N of each tensor
           int volume, int head_dim) {
    const int cols = head_dim / VEC;
    const long long thread = static_cast<long long>(blockIdx.x) * THREADS + threadIdx.x;
    int idx = static_cast<int>(thread / cols);
    if (idx >= end2) return;
    const int c = static_cast<int>(thread - static_cast<long long>(idx) * cols);

    const T* x = x0;
    float* mean = mean0;
    const int* sizes = sizes0;
    int num_blocks = blocks0;
    if (idx >= end1) {
        idx -= end1, x = x2, mean = mean2, sizes = sizes2, num_blocks = blocks2;
    } else if (idx >= end0) {
        idx -= end0, x = x1, mean = mean1, sizes = sizes1, num_blocks = blocks1;
    }
    // Clamped to the tile: a trusted plan array (never checked) may have been written to.
    const int n = min(max(sizes[idx % num_blocks], 0), volume);
    const Vec<T, VEC>* column =
        reinterpret_cast<const Vec<T, VEC>*>(x + static_cast<long long>(idx) * volume * head_dim) + c;

    float acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;
    for (int r = 0; r < n; r += UNROLL) {
        Vec<T, VEC> rows[UNROLL];
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            if (r + k < n) rows[k] = column[static_cast<long long>(r + k) * cols];
        }
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            if (r + k < n) {
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[e] += vsa::to_float(rows[k].v[e]);
            }
        }
    }
    float divisor = static_cast<float>(n);
    bool overflow = false;
#pragma unroll
    for (int e = 0; e < VEC; ++e) overflow |= !isfinite(acc[e]);
    if (overflow) {
        // A sum past float32's range (inputs of ~5e36 and more, whose mean still fits), or
        // NaN from one past it beside an infinite input: sum again, one row at a time, with every
        // element scaled by 2^-k <= 1 / n, which cannot overflow, and divide by n * 2^-k.  Powers
        // of two change no rounding (but below float32's normal range, where elements that small
        // are lost beside the others).  An infinite or NaN input gives inf or NaN again.
        const float scale = ldexpf(1.0f, -(32 - __clz(max(n - 1, 1))));
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;
        for (int r = 0; r < n; ++r) {
            const Vec<T, VEC> row = column[static_cast<long long>(r) * cols];
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[e] = fmaf(vsa::to_float(row.v[e]), scale, acc[e]);
        }
        divisor *= scale;
    }
    float* out = mean + static_cast<long long>(idx) * head_dim + c * VEC;
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = acc[e] / divisor;
}
