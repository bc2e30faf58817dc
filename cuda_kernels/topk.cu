// Top-k tile selection: scores fp32 [B, H, N_q, N_kv] -> q2k_idx int32 [B, H, N_q, topk] (each row
// in increasing tile order) and q2k_num int32 [B, H, N_q] (= topk).  Row r keeps its topk largest
// scores, ties to the lower index: the set np.argsort(-row, kind="stable")[:topk].
//
// Ordering: each score becomes an order-preserving unsigned key (vsa::float_to_ordered).  -0.0 is
// read as +0.0 (they compare equal, so the lower index wins, as in NumPy), and NaN gets key 0,
// below every number including -inf: NaN counts as the smallest value, ties among NaNs to the
// lower index, which is where NumPy's sort puts NaNs too.
//
// Algorithm: one CTA per row, no sort and no dense mask.
//  1. Radix select of the topk-th largest key, 8 bits per pass from the top (at most 4 passes):
//     a shared-memory histogram of the next digit of the keys that still match the prefix chosen
//     so far; warp 0 scans it from the top and picks the digit holding the `needed`-th largest
//     key.  It stops early once every key of that digit is needed.  The result is a prefix
//     (under `mask`) such that all keys above it are taken, plus the first `needed` keys equal
//     to it under the mask.
//  2. One block-wide scan in index order (chunks of THREADS * ITEMS scores, ITEMS consecutive ones
//     per thread) counts, before each score, the keys above the prefix and those equal to it; a
//     score is taken if it is above, or equal with fewer than `needed` equal ones before it, and
//     its output slot is (above before) + min(equal before, needed).  Output is ascending by
//     construction and deterministic (no atomics decide anything but histogram counts).
// Rows of any length work: every pass reads the row from global memory (L1/L2 after the first).
//
// Memory traffic: each row read from DRAM once (later passes hit L1/L2) and topk + 1 ints written.
//
// select_topk<true> then turns the row into its softmax in place (vsa::softmax_row_inplace), as
// the forward needs next: one launch and one pass over the scores fewer than a separate
// softmax_rows, with the row still in L1/L2.  select_topk<false> leaves the scores as they are.

#include "softmax.cuh"

namespace {

constexpr int THREADS = 128;
constexpr int WARPS = THREADS / 32;
constexpr int BINS = 256;         // 8-bit digits
constexpr int BINS_PER_LANE = BINS / 32;
constexpr int ITEMS = 8;          // consecutive scores per thread in the final scan

__device__ __forceinline__ unsigned int score_key(float s) {
    if (s != s) return 0u;                             // NaN: below every number
    return vsa::float_to_ordered(s == 0.0f ? 0.0f : s);  // -0.0 == +0.0
}

}  // namespace

template <bool SOFTMAX>
__global__ void __launch_bounds__(THREADS)
select_topk(float* scores, int* __restrict__ q2k_idx, int* __restrict__ q2k_num, int num_kv, int topk) {
    __shared__ unsigned int hist[2][BINS];  // this pass's histogram and the next one's
    __shared__ unsigned int s_prefix, s_mask;
    __shared__ int s_needed, s_done;
    __shared__ unsigned long long warp_sums[2][WARPS];

    const long long row = blockIdx.x;
    const float* s = scores + row * num_kv;  // not __restrict__: select_topk<true> rewrites the row
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    for (int i = tid; i < BINS; i += THREADS) hist[0][i] = 0u;
    __syncthreads();

    // 1. Radix select.  Invariant: `needed` (>= 1) of the keys matching `prefix` under `mask`
    //    are still to be taken, and every key above that prefix is taken.
    unsigned int prefix = 0u, mask = 0u;
    int needed = topk;
    for (int pass = 0; pass < 4; ++pass) {
        const int shift = 24 - 8 * pass;
        unsigned int* h = hist[pass & 1];
        // Clear the next pass's histogram: its last reader (warp 0, two passes ago) is behind the
        // previous pass's second barrier.
        for (int i = tid; i < BINS; i += THREADS) hist[(pass + 1) & 1][i] = 0u;
#pragma unroll 4
        for (int i = tid; i < num_kv; i += THREADS) {
            const unsigned int key = score_key(s[i]);
            if ((key & mask) == prefix) atomicAdd(&h[(key >> shift) & 0xffu], 1u);
        }
        __syncthreads();
        if (warp == 0) {
            // Lane l owns bins [8l, 8l + 8); `above` = keys in the bins of higher lanes.
            unsigned int counts[BINS_PER_LANE], total = 0u;
#pragma unroll
            for (int j = 0; j < BINS_PER_LANE; ++j) total += counts[j] = h[lane * BINS_PER_LANE + j];
            unsigned int suffix = total;  // inclusive sum over lanes >= this one
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                const unsigned int t = __shfl_down_sync(0xffffffffu, suffix, off);
                if (lane + off < 32) suffix += t;
            }
            unsigned int above = suffix - total;
#pragma unroll
            for (int j = BINS_PER_LANE - 1; j >= 0; --j) {
                const unsigned int c = counts[j];
                if (above < static_cast<unsigned int>(needed) && static_cast<unsigned int>(needed) <= above + c) {
                    const int left = needed - static_cast<int>(above);
                    s_prefix = prefix | (static_cast<unsigned int>(lane * BINS_PER_LANE + j) << shift);
                    s_mask = mask | (0xffu << shift);
                    s_needed = left;
                    s_done = left == static_cast<int>(c);
                }
                above += c;
            }
        }
        __syncthreads();
        prefix = s_prefix, mask = s_mask, needed = s_needed;
        if (s_done) break;
    }

    // 2. Ordered scan: (above, equal) counts packed as (high 32 bits, low 32 bits).
    int* __restrict__ out = q2k_idx + row * topk;
    unsigned int above_before = 0u, equal_before = 0u;  // over the chunks already scanned
    for (int base = 0, chunk = 0; base < num_kv; base += THREADS * ITEMS, ++chunk) {
        unsigned int gt_bits = 0u, eq_bits = 0u;
#pragma unroll
        for (int j = 0; j < ITEMS; ++j) {
            const int i = base + tid * ITEMS + j;
            if (i < num_kv) {
                const unsigned int key = score_key(s[i]) & mask;
                gt_bits |= static_cast<unsigned int>(key > prefix) << j;
                eq_bits |= static_cast<unsigned int>(key == prefix) << j;
            }
        }
        const unsigned long long mine =
            (static_cast<unsigned long long>(__popc(gt_bits)) << 32) | static_cast<unsigned int>(__popc(eq_bits));
        unsigned long long incl = mine;  // inclusive scan within the warp
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const unsigned long long t = __shfl_up_sync(0xffffffffu, incl, off);
            if (lane >= off) incl += t;
        }
        // warp_sums is double-buffered by chunk parity: the buffer written here was last read
        // before the previous chunk's barrier.
        if (lane == 31) warp_sums[chunk & 1][warp] = incl;
        __syncthreads();
        unsigned long long before = incl - mine, chunk_total = 0ull;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const unsigned long long t = warp_sums[chunk & 1][w];
            if (w < warp) before += t;
            chunk_total += t;
        }
        unsigned int gt = above_before + static_cast<unsigned int>(before >> 32);
        unsigned int eq = equal_before + static_cast<unsigned int>(before);
#pragma unroll
        for (int j = 0; j < ITEMS; ++j) {
            if ((gt_bits >> j) & 1u) {
                out[gt + min(eq, static_cast<unsigned int>(needed))] = base + tid * ITEMS + j;
                ++gt;
            } else if ((eq_bits >> j) & 1u) {
                if (eq < static_cast<unsigned int>(needed)) out[gt + eq] = base + tid * ITEMS + j;
                ++eq;
            }
        }
        above_before += static_cast<unsigned int>(chunk_total >> 32);
        equal_before += static_cast<unsigned int>(chunk_total);
        if (above_before + min(equal_before, static_cast<unsigned int>(needed)) == static_cast<unsigned int>(topk)) break;
    }
    if (tid == 0) q2k_num[row] = topk;
    if constexpr (SOFTMAX) {
        // Every thread is past its last read of the scores above (the scan's exits are uniform);
        // the softmax's own barrier comes before its writes.
        __shared__ float shared_max[WARPS], shared_sum[WARPS];
        vsa::softmax_row_inplace<THREADS>(scores + row * num_kv, num_kv, shared_max, shared_sum);
    }
}
