// Gradients that enter the backward pass through the coarse branch `out = fine + gate * coarse`
// (or `fine + coarse` without a gate), where coarse [B, H, N_q, D] (fp32) is broadcast to the slots
// of its query tile:
//
//   d_coarse[b, h, i, :] = sum over the real rows r of tile i of gate[r, :] * dout[r, :]   (fp32;
//                          dout alone without a gate)
//   dgate[b, h, r, :]    = dout[r, :] * coarse[b, h, i, :] on the real rows of tile i, 0 on pad rows
//                          (element type T, computed in fp32 and rounded once; gated variant only)
//
// Layout as in block_mean.cu: tile `idx` (over b, h and i together) starts at element
// idx * V * D and its block size is q_block_sizes[idx % N_q]; one thread per (tile, column vector
// of VEC elements, 16 bytes when aligned) walks the real rows of its tile in order with LOADS
// vector loads in flight (8 rows of dout, or 4 rows of dout and gate), accumulating in fp32 and
// writing dgate as it goes, then zeroes dgate on the pad rows.  No shared memory, no barrier.
// Pad rows of dout and gate are never read (they may hold anything).
//
// Memory traffic, one pass: dout (and gate) read once on the real rows; dgate written once on
// every row; coarse read once and d_coarse written once per tile.

#include "common.cuh"

namespace {

constexpr int THREADS = 128;
constexpr int LOADS = 8;  // 16-byte loads in flight per thread
// CTAs per SM: caps registers at 64 (85 for the gated variant, which also holds the coarse row),
// so that 1024 (768) threads keep 128 KB (96 KB) of loads in flight per SM without spilling.
template <bool GATED>
constexpr int MIN_CTAS = GATED ? 6 : 8;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
    T v[VEC];
};

}  // namespace

template <typename T, int VEC, bool GATED>
__global__ void __launch_bounds__(THREADS, MIN_CTAS<GATED>)
coarse_grad(const T* __restrict__ dout, const T* __restrict__ gate, const float* __restrict__ coarse,
            const int* __restrict__ q_block_sizes, float* __restrict__ d_coarse, T* __restrict__ dgate,
            int num_tiles, int num_blocks, int volume, int head_dim) {
    using V = Vec<T, VEC>;
    constexpr int UNROLL = GATED ? LOADS / 2 : LOADS;  // rows per batch

    const int cols = head_dim / VEC;
    const long long thread = static_cast<long long>(blockIdx.x) * THREADS + threadIdx.x;
    const int idx = static_cast<int>(thread / cols);
    if (idx >= num_tiles) return;
    const int c = static_cast<int>(thread - static_cast<long long>(idx) * cols);
    const int n = q_block_sizes[idx % num_blocks];
    const long long tile_start = static_cast<long long>(idx) * volume * head_dim;  // elements
    const long long row_start = static_cast<long long>(idx) * head_dim + c * VEC;   // in coarse, d_coarse

    const V* dout_col = reinterpret_cast<const V*>(dout + tile_start) + c;
    const V* gate_col = nullptr;
    V* dgate_col = nullptr;
    float acc[VEC], co[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;
    if constexpr (GATED) {
        gate_col = reinterpret_cast<const V*>(gate + tile_start) + c;
        dgate_col = reinterpret_cast<V*>(dgate + tile_start) + c;
#pragma unroll
        for (int e = 0; e < VEC; ++e) co[e] = coarse[row_start + e];
    }

    for (int r = 0; r < n; r += UNROLL) {
        V d[UNROLL], w[UNROLL];
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            if (r + k < n) {
                const long long at = static_cast<long long>(r + k) * cols;
                d[k] = dout_col[at];
                if constexpr (GATED) w[k] = gate_col[at];
            }
        }
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            if (r + k < n) {
                if constexpr (GATED) {
                    V dg;
#pragma unroll
                    for (int e = 0; e < VEC; ++e) {
                        const float dv = vsa::to_float(d[k].v[e]);
                        acc[e] += vsa::to_float(w[k].v[e]) * dv;
                        dg.v[e] = vsa::from_float<T>(dv * co[e]);
                    }
                    dgate_col[static_cast<long long>(r + k) * cols] = dg;
                } else {
#pragma unroll
                    for (int e = 0; e < VEC; ++e) acc[e] += vsa::to_float(d[k].v[e]);
                }
            }
        }
    }
    if constexpr (GATED) {
        V zero;
#pragma unroll
        for (int e = 0; e < VEC; ++e) zero.v[e] = vsa::from_float<T>(0.0f);
        for (int r = n; r < volume; ++r) dgate_col[static_cast<long long>(r) * cols] = zero;
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) d_coarse[row_start + e] = acc[e];
}
