// Batched fp32 matrix product for the coarse stage: C[b] = alpha * op(A[b]) op(B[b]), b < batches,
// with each row r of C divided by row_divisor[r % divisor_period] when row_divisor is not null
// (the coarse backward's per-token share of a tile: (alpha * product) / block size, rounded as
// two steps; the period lets the rows of a head group repeat one head's tile sizes).
//
//   op(A) [m, k]: A stored [m, k] (TRANS_A false) or [k, m] (TRANS_A true), row-major
//   op(B) [k, n]: B stored [k, n] (TRANS_B false) or [n, k] (TRANS_B true), row-major
//   C [m, n] row-major; the batches of A, B and C follow one another (strides m*k, k*n, m*n).
//
// Exact fp32 arithmetic (one fused multiply-add per product, no TF32), accumulated in increasing k
// order: the coarse scores feed the top-k selection, which must match a float64 reference on all
// but near-ties.  Our own kernel instead of cuBLAS because CuPy refuses cuBLAS calls while a
// stream is captured into a CUDA graph.
//
// Algorithm: one CTA of THREADS = 256 threads (a 16 x 16 grid of (tx, ty)) per BM x BN tile of C
// and batch (grid z strides over batches beyond 65535).  k is walked in steps of BK = 16: both
// operand tiles (BM x BK of A, BK x BN of B) sit in shared memory k-major (a_tile[kk][row],
// b_tile[kk][col]), two buffers deep: cp.async copies the next step into one buffer while the CTA
// multiplies out of the other (one barrier per step).  Thread (tx, ty) owns TM x TN = (BM/16) x
// (BN/16) outputs: rows g*64 + 4*ty + {0..3} and columns h*64 + 4*tx + {0..3} for g < BM/64,
// h < BN/64, so each k reads its rows and columns as float4s from shared memory and does TM*TN
// FMAs.  Out-of-range rows, columns and k are copied as zeros and not stored.
//
// Global reads are coalesced for both layouts of each operand: along k when the operand is stored
// k-contiguous (A plain, B transposed; a warp reads 2 rows of 16 floats), along m or n otherwise
// (a warp reads 32 consecutive floats).  Shared rows are padded by 4 floats (keeps float4
// alignment); the k-contiguous layout then writes with at most a 2-way bank conflict.
//
// Memory traffic: each CTA reads its BM rows of op(A) and BN columns of op(B) once (A is read
// n/BN times and B m/BM times in all, mostly from L2 at the coarse stage's sizes: a few MB per
// head) and writes its C tile once.  Arithmetic intensity per CTA is BM*BN/(BM+BN) FMAs per float
// loaded: 64 for 128 x 128 tiles, so the kernel is bound by FMA issue, not memory (H100, 128 x 128
// tiles: 30-36 TFLOP/s, about half the fp32 peak; ncu finds the SMs issuing ~80% of cycles with
// 4 warps per scheduler, so the rest of the peak is lost to the non-FMA instructions).
#include "mma.cuh"

namespace {

constexpr int THREADS = 256;
constexpr int BK = 16;
constexpr int PAD = 4;  // floats added to each shared row: keeps float4 reads aligned, breaks bank conflicts

// 4-byte cp.async (global -> shared without registers); src_bytes = 0 writes a zero instead.
__device__ __forceinline__ void cp_async_4(float* smem, const float* gmem, int src_bytes) {
    const unsigned int s = static_cast<unsigned int>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}

// Copies the BW x BK slice of one operand for one k step into shared memory, k-major (BW = BM for
// A, BN for B).  K_CONTIGUOUS: the operand is stored [BW side][k] (A plain, B transposed);
// otherwise [k][BW side].  `extent` is the operand's length along the BW side (m or n), `k` its
// length along k.  Consecutive threads walk the contiguous axis: each thread keeps one coordinate
// on it and copies PER_THREAD elements STRIDE apart on the other axis.  Everything but the k step
// is worked out once per batch, so a copy costs an address, a bounds test and the cp.async;
// element offsets inside one batch fit in int32 (the launcher checks).
template <int BW, bool K_CONTIGUOUS>
struct OperandCopy {
    static constexpr int CONTIGUOUS = K_CONTIGUOUS ? BK : BW;  // threads side by side on the contiguous axis
    static constexpr int STRIDE = THREADS / CONTIGUOUS;
    static constexpr int PER_THREAD = BW * BK / THREADS;
    static constexpr int DST_STRIDE = K_CONTIGUOUS ? STRIDE : STRIDE * (BW + PAD);  // floats between a thread's copies
    static_assert(THREADS % CONTIGUOUS == 0 && PER_THREAD * STRIDE == (K_CONTIGUOUS ? BW : BK), "tile/threads mismatch");

    const float* src;  // this batch's operand
    int offset;        // element offset of the thread's first copy at k step 0
    int between;       // elements between the thread's consecutive copies
    int per_step;      // elements between consecutive k steps
    int rows_left;     // rows of the operand from the thread's (first) row on; <= 0: none
    int k_coord;       // the thread's (first) k inside a step
    int dst;           // the thread's first slot in a shared tile, in floats

    __device__ __forceinline__ OperandCopy(const float* batch_src, int extent, int k, int row0) : src(batch_src) {
        const int along = threadIdx.x % CONTIGUOUS, across = threadIdx.x / CONTIGUOUS;
        if (K_CONTIGUOUS) {  // element (row, kk) at row * k + kk; the thread's rows are row0 + across + i*STRIDE
            offset = (row0 + across) * k + along;
            between = STRIDE * k;
            per_step = BK;
            rows_left = extent - row0 - across;
            k_coord = along;
            dst = along * (BW + PAD) + across;
        } else {  // element (row, kk) at kk * extent + row; the thread's k are across + i*STRIDE
            offset = across * extent + row0 + along;
            between = STRIDE * extent;
            per_step = BK * extent;
            rows_left = extent - row0 - along;
            k_coord = across;
            dst = across * (BW + PAD) + along;
        }
    }

    __device__ __forceinline__ void issue(float (*tile)[BW + PAD], int step, int k) const {
        const int k_left = k - step * BK - k_coord;  // the thread's k coordinates below this are inside
        const int step_offset = offset + step * per_step;
        float* first = &tile[0][0] + dst;
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) {
            const bool inside = K_CONTIGUOUS ? (i * STRIDE < rows_left && k_left > 0) : (rows_left > 0 && i * STRIDE < k_left);
            cp_async_4(first + i * DST_STRIDE, src + (inside ? step_offset + i * between : 0), inside ? 4 : 0);
        }
    }
};

// CTAs per SM the registers must allow (caps them at 128, 80 and 64 per thread): enough warps to
// hide the shared-memory and global latencies around each barrier.
template <int BM, int BN>
struct MinCtas {
    static constexpr int value = BM * BN >= 128 * 128 ? 2 : BM * BN >= 128 * 64 ? 3 : 4;
};

}  // namespace

template <bool TRANS_A, bool TRANS_B, int BM, int BN>
__global__ void __launch_bounds__(THREADS, MinCtas<BM, BN>::value)
gemm_f32(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ c,
         const int* __restrict__ row_divisor, int m, int n, int k, int batches, float alpha, int divisor_period) {
    static_assert(BM % 64 == 0 && BN % 64 == 0, "a thread's rows and columns are 4-wide groups 64 apart");
    constexpr int TM = BM / 16, TN = BN / 16;
    __shared__ __align__(16) float a_tile[2][BK][BM + PAD];
    __shared__ __align__(16) float b_tile[2][BK][BN + PAD];

    // Warp w, lane l: tx = 8 (w % 2) + l % 8, ty = 4 (w / 2) + l / 8.  A warp then reads 4 row and 8
    // column float4s per k (64 + 128 bytes: one shared-memory wavefront each, no conflict).
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int tx = (warp % 2) * 8 + lane % 8, ty = (warp / 2) * 4 + lane / 8;
    const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;
    const int steps = (k + BK - 1) / BK;

    for (int batch = blockIdx.z; batch < batches; batch += gridDim.z) {
        const OperandCopy<BM, !TRANS_A> a_copy(a + static_cast<size_t>(batch) * m * k, m, k, row0);
        const OperandCopy<BN, TRANS_B> b_copy(b + static_cast<size_t>(batch) * k * n, n, k, col0);
        if (steps > 0) {
            a_copy.issue(a_tile[0], 0, k);
            b_copy.issue(b_tile[0], 0, k);
            vsa::cp_async_commit();
        }

        float acc[TM][TN] = {};
        for (int step = 0; step < steps; ++step) {
            const int cur = step & 1;
            vsa::cp_async_wait<0>();
            // Step `step`'s copies are visible to all, and every thread is done with the other
            // buffer (read in the previous step), so the next step's copies may overwrite it.
            __syncthreads();
            if (step + 1 < steps) {  // in flight while this step's FMAs run
                a_copy.issue(a_tile[cur ^ 1], step + 1, k);
                b_copy.issue(b_tile[cur ^ 1], step + 1, k);
                vsa::cp_async_commit();
            }
#pragma unroll
            for (int kk = 0; kk < BK; ++kk) {
                float a_frag[TM], b_frag[TN];
#pragma unroll
                for (int g = 0; g < TM / 4; ++g) {
                    const float4 v = *reinterpret_cast<const float4*>(&a_tile[cur][kk][g * 64 + ty * 4]);
                    a_frag[g * 4] = v.x, a_frag[g * 4 + 1] = v.y, a_frag[g * 4 + 2] = v.z, a_frag[g * 4 + 3] = v.w;
                }
#pragma unroll
                for (int h = 0; h < TN / 4; ++h) {
                    const float4 v = *reinterpret_cast<const float4*>(&b_tile[cur][kk][h * 64 + tx * 4]);
                    b_frag[h * 4] = v.x, b_frag[h * 4 + 1] = v.y, b_frag[h * 4 + 2] = v.z, b_frag[h * 4 + 3] = v.w;
                }
#pragma unroll
                for (int i = 0; i < TM; ++i)
#pragma unroll
                    for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a_frag[i], b_frag[j], acc[i][j]);
            }
        }
        __syncthreads();  // the next batch's first copies go to buffer 0, which may still be read

        float* c_batch = c + static_cast<size_t>(batch) * m * n;
        const bool vector_rows = n % 4 == 0;  // every row (and C, allocated by vsa_nd) 16-byte aligned
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            const int row = row0 + (i / 4) * 64 + ty * 4 + i % 4;
            if (row >= m) continue;
            float* c_row = c_batch + static_cast<size_t>(row) * n;
            const float divisor = row_divisor ? static_cast<float>(row_divisor[row % divisor_period]) : 1.f;  // x / 1 is exact
#pragma unroll
            for (int h = 0; h < TN / 4; ++h) {
                const int col = col0 + h * 64 + tx * 4;
                const float* r = &acc[i][h * 4];
                if (vector_rows && col + 3 < n) {
                    *reinterpret_cast<float4*>(c_row + col) = make_float4(
                        alpha * r[0] / divisor, alpha * r[1] / divisor, alpha * r[2] / divisor, alpha * r[3] / divisor);
                } else {
#pragma unroll
                    for (int j = 0; j < 4; ++j)
                        if (col + j < n) c_row[col + j] = alpha * r[j] / divisor;
                }
            }
        }
    }
}
