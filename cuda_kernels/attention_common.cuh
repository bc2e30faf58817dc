// Pieces shared by the block-sparse attention kernels (mma.sync and wgmma versions):
// the CTA's work assignment, the swizzled shared-memory tile layout, async tile loads,
// the online-softmax step and the epilogue that adds the gated coarse output.
//
// Fragment layout: each warp owns 16 query rows; a 16x64 score fragment is float s[32]
// where group n (8 keys) holds s[4n], s[4n+1] on row lane/4 and s[4n+2], s[4n+3] on row
// lane/4 + 8, keys 8n + 2*(lane%4) + {0, 1}.  The output accumulator o[D/2] is laid out
// the same way over D columns.  This is the mma.sync m16n8 layout, which wgmma shares.
#pragma once

#include "mma.cuh"

namespace vsa {

constexpr int ATT_BLOCK_M = 64;   // query rows per CTA
constexpr int ATT_BLOCK_N = 64;   // keys per pipeline chunk
constexpr int ATT_THREADS = 128;  // 4 warps: one warpgroup
constexpr int ATOM_BYTES = 64 * 128;

// Swizzle-atom layout of a 64-row tile with D 16-bit columns: D/64 atoms of 64 rows x 128
// bytes, each 1024-byte aligned; 16-byte chunk c of row r of an atom sits at chunk c ^ (r & 7).
// ldmatrix reads 8 rows of one chunk without bank conflicts, and it is wgmma's 128B swizzle.
__device__ __forceinline__ int atom_offset(int row, int chunk) {
    return (chunk >> 3) * ATOM_BYTES + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

template <int D> struct AttentionSmem {
    static constexpr int TILE = ATT_BLOCK_M * D * 2;  // bytes of one 64-row tile
    static constexpr int BYTES = 5 * TILE;             // Q, K[2], V[2] (mma.sync kernel)
    static constexpr int BYTES_3STAGE = 7 * TILE;      // Q, K[3], V[3] (wgmma kernel)
};

// The CTA's query rows, its key-tile list and where its keys live.
template <typename T, int D> struct AttentionCta {
    int bh, q_tile, num_q_blocks, chunks_per_tile, tile_volume, n_chunks;
    size_t q_offset;  // element offset of the CTA's first query row in q / out / gate
    const T* k;       // this (batch, kv head)'s keys
    const T* v;
    const int* list;
    const int* kv_block_sizes;

    __device__ AttentionCta(const T* k_all, const T* v_all, const int* q2k_idx, const int* q2k_num,
                            const int* block_sizes, int num_heads, int num_kv_heads, int q_len, int kv_len,
                            int list_len, int volume, int bh0 = 0)  // bh0: (batch, head) of blockIdx.y == 0
        : bh(blockIdx.y + bh0), tile_volume(volume), kv_block_sizes(block_sizes) {
        const int b = bh / num_heads, h = bh % num_heads;
        const int kv_head = h / (num_heads / num_kv_heads);
        const int row0 = blockIdx.x * ATT_BLOCK_M;
        num_q_blocks = q_len / volume;
        q_tile = row0 / volume;
        chunks_per_tile = volume / ATT_BLOCK_N;
        q_offset = (static_cast<size_t>(bh) * q_len + row0) * D;
        const size_t kv_base = static_cast<size_t>(b * num_kv_heads + kv_head) * kv_len * D;
        k = k_all + kv_base;
        v = v_all + kv_base;
        list = q2k_idx + (static_cast<size_t>(bh) * num_q_blocks + q_tile) * list_len;
        n_chunks = q2k_num[bh * num_q_blocks + q_tile] * chunks_per_tile;
    }
    // Where chunk c's 64 key rows start (element offset) and how many of them are real.
    struct Chunk {
        size_t offset;
        int valid;
    };
    __device__ Chunk chunk(int c) const {
        // Tile volume 64 (one chunk per tile) is the common case: skip the integer division.
        const int entry = chunks_per_tile == 1 ? c : c / chunks_per_tile;
        const int tile = list[entry], sub = c - entry * chunks_per_tile;
        const int left = kv_block_sizes[tile] - sub * ATT_BLOCK_N;
        return {(static_cast<size_t>(tile) * tile_volume + sub * ATT_BLOCK_N) * D, min(max(left, 0), ATT_BLOCK_N)};
    }
};

// cp.async 64 rows of D elements (row-major in global memory) into a swizzle-atom tile;
// rows at or past `valid` are zero-filled, so pad slots never reach the tensor cores.
template <int D, typename T>
__device__ __forceinline__ void load_tile_async(unsigned char* tile, const T* src, int valid, int tid) {
    constexpr int CH = D / 8;
    if (valid == ATT_BLOCK_M) {  // full chunk (the common case): no per-row predicate
#pragma unroll
        for (int it = 0; it < ATT_BLOCK_M * CH / ATT_THREADS; ++it) {
            const int i = tid + it * ATT_THREADS, r = i / CH, ch = i % CH;
            cp_async_16(tile + atom_offset(r, ch), src + static_cast<size_t>(r) * D + ch * 8, 16);
        }
    } else {
#pragma unroll
        for (int it = 0; it < ATT_BLOCK_M * CH / ATT_THREADS; ++it) {
            const int i = tid + it * ATT_THREADS, r = i / CH, ch = i % CH;
            cp_async_16(tile + atom_offset(r, ch), src + static_cast<size_t>(r) * D + ch * 8, r < valid ? 16 : 0);
        }
    }
}

// The running row max of the online softmax moves only when a chunk's max exceeds it by more
// than RESCALE_SLACK (log2 units).  Below that P = exp2(scale * s - max) stays under 2^8 (far
// inside fp32 and the 16-bit P), and the output accumulator keeps its scale, so most chunks
// skip the rescale (o *= alpha); out and lse are the same functions of the same sums, only
// their rounding differs.  FlashAttention-4's rescaling rule: it made the forward 1.0-1.7%
// faster at the main shape on H200s (BENCHMARKS.md, "The forward's running max").
constexpr float RESCALE_SLACK = 8.f;

__device__ __forceinline__ bool is_minus_zero(float x) { return __float_as_uint(x) == 0x80000000u; }
// x, with -0 made +0 (on the bits, which no compiler may fold away).
__device__ __forceinline__ float plus_zero(float x) { return is_minus_zero(x) ? 0.f : x; }

// Online softmax over a 16x64 fragment of raw scores q.k (log2 domain, scale_log2 > 0):
// masks keys >= valid, updates the running row max (kept scaled; see RESCALE_SLACK) and sum,
// and leaves P = exp2(scale_log2 * s - max) in s.  The scale is folded into one FFMA per score.
// Returns whether the output accumulator must be rescaled (o *= alpha, see rescale), the same in
// every lane of the warp, so that a caller can apply it once an in-flight matrix product into o
// has finished.  `first`: the rows' first chunk (the same in every lane), whose max is taken
// from scratch; it must hold a real key (a list's first chunk is never empty).  After it the
// scores are first taken relative to the running max, and only a warp where some score passes
// it by more than the slack (rare) looks for its rows' new max: the common case needs neither a
// shuffle nor the factor alpha.  That made the forward 2.4% faster at D = 64 and 0.4% at
// D = 128 (H200; BENCHMARKS.md, "The forward's softmax").
// A row without a finite score so far (all -inf or NaN) keeps -0 as its max, which no other row
// holds (a max of -0, or one that rounds to -0 from below, is stored as +0): its P and sum are 0
// (or NaN where a score is NaN), its scores are taken relative to 0, and its warp looks for the
// max at every chunk until a finite score sets it, so that a row whose first keys all score -inf
// still gets the softmax of the later ones, as in the reference.  Elsewhere that costs two more
// tests in the vote (a flag of its own, kept across the loop, took one register too many at
// D = 128); a warp holding a row that never sees a finite score (a pad row whose q holds NaN)
// takes the slow path at every chunk, which costs it time only.
__device__ __forceinline__ bool softmax_scores(float (&s)[32], float (&row_max)[2], float (&row_sum)[2],
                                               float (&alpha)[2], int valid, float scale_log2, int lane, bool first) {
    if (valid < ATT_BLOCK_N) {
        const int limit = valid - (lane & 3) * 2;  // key (i/4)*8 + (i&1) + 2*(lane%4) < valid
#pragma unroll
        for (int i = 0; i < 32; ++i)
            if ((i >> 2) * 8 + (i & 1) >= limit) s[i] = neg_inf();
    }
    if (first) {
        float chunk_max[2] = {neg_inf(), neg_inf()};
#pragma unroll
        for (int i = 0; i < 32; ++i) chunk_max[(i >> 1) & 1] = fmaxf(chunk_max[(i >> 1) & 1], s[i]);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            chunk_max[r] = fmaxf(chunk_max[r], __shfl_xor_sync(0xffffffffu, chunk_max[r], 1));
            chunk_max[r] = fmaxf(chunk_max[r], __shfl_xor_sync(0xffffffffu, chunk_max[r], 2));
            // +0 where the scaled max is -0 or underflows from below (-2^-150 rounds to -0).
            row_max[r] = plus_zero(chunk_max[r] * scale_log2);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r)  // every score -inf or NaN: the -0 marker (see above)
            if (row_max[r] == neg_inf()) row_max[r] = -0.f;
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            s[i] = fast_exp2(fmaf(s[i], scale_log2, -row_max[(i >> 1) & 1]));
            row_sum[(i >> 1) & 1] += s[i];  // per-thread partial; reduced across the row at the end
        }
        return false;  // o is still 0
    }
    float above[4] = {neg_inf(), neg_inf(), neg_inf(), neg_inf()};  // four independent max chains
#pragma unroll
    for (int i = 0; i < 32; ++i) {
        s[i] = fmaf(s[i], scale_log2, -row_max[(i >> 1) & 1]);
        above[i & 3] = fmaxf(above[i & 3], s[i]);
    }
    if (!__any_sync(0xffffffffu,
                    is_minus_zero(row_max[0]) || is_minus_zero(row_max[1]) ||
                        fmaxf(fmaxf(above[0], above[1]), fmaxf(above[2], above[3])) > RESCALE_SLACK)) {
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            s[i] = fast_exp2(s[i]);
            row_sum[(i >> 1) & 1] += s[i];
        }
        return false;
    }
    float shift[2] = {fmaxf(above[0], above[1]), fmaxf(above[2], above[3])};  // i & 3 < 2: row 0
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        shift[r] = fmaxf(shift[r], __shfl_xor_sync(0xffffffffu, shift[r], 1));
        shift[r] = fmaxf(shift[r], __shfl_xor_sync(0xffffffffu, shift[r], 2));
        if (is_minus_zero(row_max[r])) {  // this chunk's max, if finite, is the row's first (scores relative to 0)
            if (shift[r] != neg_inf()) {
                row_max[r] = plus_zero(shift[r]);
            } else {
                shift[r] = 0.f;
            }
            alpha[r] = 1.f;
        } else {
            if (shift[r] > RESCALE_SLACK) {  // the max moves, by exactly what the stored max moves by
                const float moved = row_max[r] + shift[r];
                shift[r] = moved - row_max[r];
                row_max[r] = moved;
            } else {
                shift[r] = 0.f;
            }
            alpha[r] = fast_exp2(-shift[r]);
        }
        row_sum[r] *= alpha[r];
    }
#pragma unroll
    for (int i = 0; i < 32; ++i) {
        s[i] = fast_exp2(s[i] - shift[(i >> 1) & 1]);
        row_sum[(i >> 1) & 1] += s[i];
    }
    return true;
}

// o *= alpha per row (after softmax_scores asked for it).
template <int NO> __device__ __forceinline__ void rescale(float (&o)[NO], const float (&alpha)[2]) {
#pragma unroll
    for (int i = 0; i < NO; ++i) o[i] *= alpha[(i >> 1) & 1];
}

// P for keys 16kk..16kk+15 as an m16k16 A operand (mma.sync and wgmma register A alike).
template <typename T>
__device__ __forceinline__ void p_fragment(const float (&s)[32], int kk, unsigned int (&a)[4]) {
    a[0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
    a[1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
    a[2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
    a[3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
}

// Real rows of the 64-row slice starting at `first_slot` of a tile with `block_size` tokens.
__device__ __forceinline__ int real_rows(int block_size, int first_slot) {
    return min(max(block_size - first_slot, 0), ATT_BLOCK_M);
}

// Real rows of a forward CTA's 64 query rows: from q_block_sizes (VSA), or all 64 where it is
// null (block_sparse_attn, which knows no pad rows).  Loaded before the main loop, so the load's
// latency stays off the epilogue.
template <typename T, int D>
__device__ __forceinline__ int forward_real_rows(const int* q_block_sizes, const AttentionCta<T, D>& cta) {
    return q_block_sizes ? real_rows(q_block_sizes[cta.q_tile], blockIdx.x * ATT_BLOCK_M - cta.q_tile * cta.tile_volume)
                         : ATT_BLOCK_M;
}

// out = o / rowsum + gate * coarse (or + coarse, or nothing); lse = ln(rowsum) + max.
// Rows at or past `valid_rows` are pad slots: out 0 and lse -inf there, whatever q and gate
// hold in them (NaN included), so the output's pad rows are never NaN or Inf.  A real row
// without keys (none selected) has a max of -inf and a rowsum of 0: fine output 0 and lse -inf,
// as in the reference.  A real row with keys whose scores are all -inf or NaN (an input holding
// -inf or NaN, or products past float32's range) has a rowsum of 0 or NaN: out and lse NaN, as
// in the reference (0 / 0).  A row with a finite max has rowsum >= 1 (its largest score's P is
// at least 1) unless the float32 softmax failed: at |lse| of ~1.5e9 and beyond, the running max
// (log2 units) reaches 2^31 and every P can underflow to 0.  Such a row gets out and lse NaN,
// not a silent 0 and -inf.  So a real row of a CTA with keys fails exactly where its rowsum is
// not positive.
template <typename T, int D>
__device__ __forceinline__ void write_output(const float (&o)[D / 2], const float (&row_max)[2], const float (&row_sum)[2],
                                             const AttentionCta<T, D>& cta, const float* coarse, const T* gate, T* out,
                                             float* lse, int valid_rows, int warp, int lane) {
    const float* coarse_row = coarse ? coarse + (static_cast<size_t>(cta.bh) * cta.num_q_blocks + cta.q_tile) * D : nullptr;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float total = row_sum[r];
        total += __shfl_xor_sync(0xffffffffu, total, 1);
        total += __shfl_xor_sync(0xffffffffu, total, 2);
        const bool failed = !(total > 0.f) && cta.n_chunks > 0;
        const float inv = total > 0.f ? 1.f / total : failed ? quiet_nan() : 0.f;
        const int row = warp * 16 + (lane >> 2) + r * 8;
        const bool real = row < valid_rows;
        const size_t offset = cta.q_offset + static_cast<size_t>(row) * D;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            const int col = n * 8 + (lane & 3) * 2;
            float x0 = 0.f, x1 = 0.f;
            if (real) {
                x0 = o[4 * n + 2 * r] * inv;
                x1 = o[4 * n + 2 * r + 1] * inv;
            }
            if (real && coarse_row) {
                const float2 c = *reinterpret_cast<const float2*>(coarse_row + col);
                if (gate) {
                    const float2 g = unpack2<T>(*reinterpret_cast<const unsigned int*>(gate + offset + col));
                    x0 += g.x * c.x;
                    x1 += g.y * c.y;
                } else {
                    x0 += c.x;
                    x1 += c.y;
                }
            }
            *reinterpret_cast<unsigned int*>(out + offset + col) = pack2<T>(x0, x1);
        }
        if ((lane & 3) == 0)
            lse[cta.q_offset / D + row] = !real         ? neg_inf()
                                          : total > 0.f ? (row_max[r] + __log2f(total)) * 0.69314718055994531f
                                          : failed      ? quiet_nan()
                                                        : neg_inf();
    }
}

// ---- backward -----------------------------------------------------------------------

// Writes rows of acc * scale + tile_vec (fp32, may be null) for real rows and 0 for the others.
template <typename T, int D>
__device__ __forceinline__ void write_rows(T* dst, const float (&acc)[D / 2], float scale, const float* tile_vec,
                                           int valid, int warp, int lane) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = warp * 16 + (lane >> 2) + r * 8;
        const bool real = row < valid;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            const int col = n * 8 + (lane & 3) * 2;
            float x0 = 0.f, x1 = 0.f;
            if (real) {
                x0 = acc[4 * n + 2 * r] * scale;
                x1 = acc[4 * n + 2 * r + 1] * scale;
                if (tile_vec) {
                    x0 += tile_vec[col];
                    x1 += tile_vec[col + 1];
                }
            }
            *reinterpret_cast<unsigned int*>(dst + static_cast<size_t>(row) * D + col) = pack2<T>(x0, x1);
        }
    }
}

}  // namespace vsa
