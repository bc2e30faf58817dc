// Gradients that enter the backward pass through the coarse branch `out = fine + gate * coarse`
// (or `fine + coarse` without a gate), where coarse [B, H, N_q, D] (fp32) is broadcast to the slots
// of its query tile:
//
//   d_coarse[b, h, i, :] = sum over the real rows r of tile i of gate[r, :] * dout[r, :]   (fp32;
//                          dout alone without a gate)
//   dgate[b, h, r, :]    = dout[r, :] * coarse[b, h, i, :] on the real rows of tile i, 0 on pad rows
//                          (element type T, computed in fp32 and rounded once; gated variant only)
//
// and, in the ROWS variant, the fine backward's per-row terms in the same pass over dout (what
// attention_bwd.cu's bwd_delta computes otherwise, reading dout and gate a second time):
//
//   delta[b, h, r]    = sum over d of dout[r, d] * (out[r, d] - gate[r, d] * coarse[b, h, i, d])
//                       on real rows (the fine output recovered from out), 0 on pad rows
//   lse_log2[b, h, r] = lse[b, h, r] * log2(e) on every row, unless lse_log2 is null (NaN where
//                       |lse| passes common.cuh's LSE_LIMIT)
//
// Layout as in block_mean.cu: tile `idx` (over b, h and i together) starts at element
// idx * V * D and its block size is q_block_sizes[idx % N_q]; one thread per (tile, column vector
// of VEC elements, 16 bytes when aligned) walks the real rows of its tile in order with LOADS
// vector loads in flight (8 rows of dout, or 4 rows of dout and gate; 3 or 2 rows of dout, out
// and gate in the ROWS variant), accumulating in fp32 and writing dgate as it goes, then zeroes
// dgate on the pad rows.  In the ROWS variant the D / VEC threads of a tile (consecutive lanes of
// one warp: the launcher requires D / VEC to be a power of two up to 32) sum each row's products
// with shuffles.  No shared memory, no barrier.  Pad rows of dout, gate and out are never read
// (they may hold anything).
//
// Memory traffic, one pass: dout (and gate, and out in the ROWS variant) read once on the real
// rows; dgate written once on every row; coarse read once and d_coarse written once per tile.

#include "common.cuh"

namespace {

constexpr int THREADS = 128;
constexpr int LOADS = 8;  // 16-byte loads in flight per thread
// CTAs per SM: caps registers at 64 (85 for the gated and ROWS variants, which also hold the
// coarse row), so that 1024 (768) threads keep 128 KB (96 KB) of loads in flight per SM without
// spilling.
template <bool GATED, bool ROWS>
constexpr int MIN_CTAS = GATED || ROWS ? 6 : 8;
// Rows per batch of loads: LOADS vector loads spread over the arrays read per row.
template <bool GATED, bool ROWS>
constexpr int ROWS_PER_BATCH = ROWS ? (GATED ? 2 : 3) : (GATED ? LOADS / 2 : LOADS);

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
    T v[VEC];
};

}  // namespace

template <typename T, int VEC, bool GATED, bool ROWS>
__global__ void __launch_bounds__(THREADS, (MIN_CTAS<GATED, ROWS>))
coarse_grad(const T* __restrict__ dout, const T* __restrict__ gate, const float* __restrict__ coarse,
            const int* __restrict__ q_block_sizes, float* __restrict__ d_coarse, T* __restrict__ dgate,
            const T* __restrict__ out, const float* __restrict__ lse, float* __restrict__ delta,
            float* __restrict__ lse_log2, int num_tiles, int num_blocks, int volume, int head_dim) {
    using V = Vec<T, VEC>;
    constexpr int UNROLL = ROWS_PER_BATCH<GATED, ROWS>;

    const int cols = head_dim / VEC;
    const long long thread = static_cast<long long>(blockIdx.x) * THREADS + threadIdx.x;
    const int idx = static_cast<int>(thread / cols);
    if (idx >= num_tiles) return;  // (ROWS: a tile's lanes all return or all stay)
    const int c = static_cast<int>(thread - static_cast<long long>(idx) * cols);
    // Clamped to the tile: a backward context's block sizes are not checked on the host.
    const int n = min(max(q_block_sizes[idx % num_blocks], 0), volume);
    const long long tile_start = static_cast<long long>(idx) * volume * head_dim;  // elements
    const long long row_start = static_cast<long long>(idx) * head_dim + c * VEC;   // in coarse, d_coarse
    const long long first_row = static_cast<long long>(idx) * volume;               // in delta, lse

    const V* dout_col = reinterpret_cast<const V*>(dout + tile_start) + c;
    const V* gate_col = nullptr;
    const V* out_col = nullptr;
    V* dgate_col = nullptr;
    float acc[VEC], co[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;
    if constexpr (GATED) {
        gate_col = reinterpret_cast<const V*>(gate + tile_start) + c;
        dgate_col = reinterpret_cast<V*>(dgate + tile_start) + c;
    }
    if constexpr (GATED || ROWS) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) co[e] = coarse[row_start + e];
    }
    // ROWS: the lanes of this tile, for the shuffles (cols divides 32, and tiles start at
    // multiples of cols).
    unsigned int lanes = 0u;
    if constexpr (ROWS) {
        out_col = reinterpret_cast<const V*>(out + tile_start) + c;
        const int lane = threadIdx.x % 32;
        lanes = cols == 32 ? 0xffffffffu : ((1u << cols) - 1u) << (lane - lane % cols);
    }

    for (int r = 0; r < n; r += UNROLL) {
        V d[UNROLL], w[UNROLL], o[UNROLL];
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            if (r + k < n) {
                const long long at = static_cast<long long>(r + k) * cols;
                d[k] = dout_col[at];
                if constexpr (GATED) w[k] = gate_col[at];
                if constexpr (ROWS) o[k] = out_col[at];
            }
        }
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            if (r + k < n) {
                float part = 0.0f;  // ROWS: this thread's share of the row's delta
                V dg;
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    const float dv = vsa::to_float(d[k].v[e]);
                    float weight = 1.0f;
                    if constexpr (GATED) {
                        weight = vsa::to_float(w[k].v[e]);
                        acc[e] += weight * dv;
                        dg.v[e] = vsa::from_float<T>(dv * co[e]);
                    } else {
                        acc[e] += dv;
                    }
                    if constexpr (ROWS) {  // fine = out - gate * coarse, rounded as bwd_delta rounds it
                        const float fine = __fsub_rn(vsa::to_float(o[k].v[e]), __fmul_rn(weight, co[e]));
                        part = fmaf(dv, fine, part);
                    }
                }
                if constexpr (GATED) dgate_col[static_cast<long long>(r + k) * cols] = dg;
                if constexpr (ROWS) {
                    for (int m = cols / 2; m > 0; m >>= 1) part += __shfl_xor_sync(lanes, part, m);
                    if (c == 0) delta[first_row + r + k] = part;
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
    if constexpr (ROWS) {  // the tile's lanes share its pad rows' deltas and every row's lse_log2
        for (int r = n + c; r < volume; r += cols) delta[first_row + r] = 0.0f;
        if (lse_log2)
            for (int r = c; r < volume; r += cols) lse_log2[first_row + r] = vsa::backward_lse(lse[first_row + r]) * vsa::LOG2E;
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) d_coarse[row_start + e] = acc[e];
}
