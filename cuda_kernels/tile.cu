// Tiling and untiling: row gathers between the model's token-major layout x [B, S, H, D] and
// the tiled, head-major layout [B, H, S_pad, D] that the attention kernels read.
//
//   tile_rows:   out[b, h, s, :] = x[b, slot_token_index[s], h, :], or 0 where slot_token_index[s] < 0
//   untile_rows: out[b, t, h, :] = y[b, h, untile_index[t], :]
//
// Algorithm: one pass in output order.  A row of D elements is `row_units` copy units of type U
// (uint4 / uint2 / unsigned int / unsigned short: 16 / 8 / 4 / 2 bytes; the launcher picks the
// widest that divides the row bytes and the alignment of both pointers).  Each thread moves
// UNITS units spaced THREADS apart, so every warp-wide store covers consecutive output bytes and
// every warp-wide load covers whole input rows; all UNITS loads are issued before the first
// store, to keep enough bytes in flight to cover memory latency.  grid.x covers the units of one
// batch element, grid.y strides over the batch.
//
// Memory traffic: every output byte is written once; every input byte that reaches the output is
// read once (tile reads no pad, untile never reads pad slots); plus one int32 index per output row,
// shared by the lanes that copy that row (an L1 broadcast).  Nothing else.
//
// Indexing: unit indices within one batch element are int32 (the launcher checks
// H * S_pad * row_units and S * H * row_units leave headroom below 2^31); element offsets are
// computed in 64 bits.

#include "common.cuh"

namespace {

constexpr int THREADS = 256;
constexpr int UNITS = 4;  // copy units in flight per thread

}  // namespace

template <typename U>
__global__ void __launch_bounds__(THREADS)
tile_rows(const U* __restrict__ x, const int* __restrict__ slot_token_index, U* __restrict__ out,
          int seq_len, int num_heads, int padded_len, int row_units, int batch) {
    const int units_per_batch = num_heads * padded_len * row_units;
    const int first = blockIdx.x * (THREADS * UNITS) + threadIdx.x;
    for (int b = blockIdx.y; b < batch; b += gridDim.y) {
        const U* xb = x + static_cast<long long>(b) * seq_len * num_heads * row_units;
        U* ob = out + static_cast<long long>(b) * units_per_batch;
        U v[UNITS];
#pragma unroll
        for (int k = 0; k < UNITS; ++k) {
            const int u = first + k * THREADS;
            v[k] = U{};
            if (u < units_per_batch) {
                const int row = u / row_units;  // h * S_pad + s
                const int col = u - row * row_units;
                const int h = row / padded_len;
                const int token = slot_token_index[row - h * padded_len];
                if (token >= 0) v[k] = xb[(static_cast<long long>(token) * num_heads + h) * row_units + col];
            }
        }
#pragma unroll
        for (int k = 0; k < UNITS; ++k) {
            const int u = first + k * THREADS;
            if (u < units_per_batch) ob[u] = v[k];
        }
    }
}

template <typename U>
__global__ void __launch_bounds__(THREADS)
untile_rows(const U* __restrict__ y, const int* __restrict__ untile_index, U* __restrict__ out,
            int seq_len, int num_heads, int padded_len, int row_units, int batch) {
    const int units_per_batch = seq_len * num_heads * row_units;
    const int first = blockIdx.x * (THREADS * UNITS) + threadIdx.x;
    for (int b = blockIdx.y; b < batch; b += gridDim.y) {
        const U* yb = y + static_cast<long long>(b) * num_heads * padded_len * row_units;
        U* ob = out + static_cast<long long>(b) * units_per_batch;
        U v[UNITS];
#pragma unroll
        for (int k = 0; k < UNITS; ++k) {
            const int u = first + k * THREADS;
            if (u < units_per_batch) {
                const int row = u / row_units;  // t * H + h
                const int col = u - row * row_units;
                const int t = row / num_heads;
                const int h = row - t * num_heads;
                v[k] = yb[(static_cast<long long>(h) * padded_len + untile_index[t]) * row_units + col];
            }
        }
#pragma unroll
        for (int k = 0; k < UNITS; ++k) {
            const int u = first + k * THREADS;
            if (u < units_per_batch) ob[u] = v[k];
        }
    }
}
