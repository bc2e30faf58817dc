// Inversion of the forward's tile selection for the backward's dK/dV pass (kv_to_q_lists in
// vsa_nd/backends/cuda_attention.py).
//
// Input: q2k_idx int32 [B, H, N_q, L] and q2k_num int32 [B, H, N_q]; entry l of row (b, h, i) is
// used when l < q2k_num[b, h, i] and then names a key tile j in [0, N_kv).  With group = H / H_kv,
// query head h belongs to kv head g = h / group; its query tile i gets the code
// (h % group) * N_q + i, below span = group * N_q.
// Output: for list lst = (b * H_kv + g) * N_kv + j, the codes of the query tiles that selected key
// tile j of (b, g) are codes[offsets[lst] : offsets[lst + 1]], in strictly increasing order.  The
// dK/dV kernel sums its contributions in exactly that order, so the order must not depend on
// scheduling: it is the order of the codes, fixed by a bitmap, never the order atomics land in.
//
// Work buffer (zeroed by the launcher, one memset): offsets int32 [lists + 1] followed by the
// bitmap, `words` = ceil(span / 32) 32-bit words per list, bit `code` of list lst set when that
// query tile selected key tile j.
//
// Kernels, in launch order:
//  1. kv_lists_mark   one thread per entry (b, h, i, l); a used entry sets its bit (atomicOr) and,
//                     if the bit was not set yet, adds 1 to the list's count, kept in
//                     offsets[lst + 1].  Integer atomics only: bits and counts are the same
//                     whatever order they land in (a duplicate entry would be counted once).
//  2. kv_lists_scan   one CTA: in-place inclusive scan of offsets[1 .. lists] (the counts), in
//                     segments of SCAN_THREADS * SCAN_ITEMS counts with a carry, so
//                     offsets[lst] = codes of the lists before lst; offsets[0] stays 0.
//  3. kv_lists_write  a group of `lanes` (a power of two <= 32, >= words when words <= 32) lanes
//                     per list walks its words in order, `lanes` at a time: popcount, prefix sum
//                     over the group's lanes, and each lane writes the codes of its set bits in
//                     increasing bit order from offsets[lst] + (set bits of the earlier words).
//                     Codes thus come out in increasing order, and each is written exactly once.
//  4. kv_lists_rank   (optional, for the backward that keeps dS: attention_bwd_sm90.cu) one thread
//                     per entry (b, h, i, l): pos[e] = the place of the entry's code in its list,
//                     offsets[lst] + (set bits of the list's bitmap below the code); -1 for an
//                     unused entry.  It lets the dQ pass find the dS blocks that the dK/dV pass
//                     wrote in list order.
//  5. kv_lists_order  (for the dK/dV pass's schedule) one CTA per segment of consecutive lists
//                     (a launch of the dK/dV pass): order[segment] = its lists, the long ones
//                     first, longest first, then the others in their own order (see below).
// No host synchronisation: the counts stay on the device between the launches.
//
// And, before any of them where the lists were not checked on the host (block_sparse_attn with
// check_indices=False; a backward context, whose lists may have changed since the forward):
//  0. kv_lists_clean  one thread per row (b, h, i): copies the row's used entries that lie in
//                     [0, N_kv) to the front of a new row, in order, 0 after them, and their
//                     number as the new count (a count is first clamped to [0, L]).  Valid lists
//                     come out unchanged; the attention kernels index with the result unguarded.
// Only built-ins are used (no header: NVRTC has no host standard library).

namespace {

constexpr int MARK_THREADS = 256;
constexpr int SCAN_THREADS = 1024;
constexpr int SCAN_WARPS = SCAN_THREADS / 32;
constexpr int SCAN_ITEMS = 4;  // consecutive counts per thread per segment
static_assert(SCAN_WARPS == 32, "kv_lists_scan scans the warps' sums with one warp");
constexpr int WRITE_THREADS = 256;
constexpr unsigned int FULL_MASK = 0xffffffffu;

// The list number and code of entry e, or false for an unused or out-of-range entry.
__device__ __forceinline__ bool entry_list_code(const int* q2k_idx, const int* q2k_num, unsigned int e, int length,
                                                int num_q, int num_heads, int group, int num_kv_heads, int num_kv,
                                                long long& lst, int& code) {
    const unsigned int row = e / length;  // (b, h, i)
    const int l = static_cast<int>(e - row * length);
    if (l >= q2k_num[row]) return false;  // unused entry: whatever it holds is ignored
    const int j = q2k_idx[e];
    if (static_cast<unsigned int>(j) >= static_cast<unsigned int>(num_kv)) return false;  // validated upstream
    const unsigned int bh = row / num_q;
    const int i = static_cast<int>(row - bh * num_q);
    const unsigned int b = bh / num_heads;
    const int h = static_cast<int>(bh - b * num_heads);
    const int g = h / group;
    code = (h - g * group) * num_q + i;
    lst = (static_cast<long long>(b) * num_kv_heads + g) * num_kv + j;
    return true;
}

}  // namespace

__global__ void __launch_bounds__(MARK_THREADS)
kv_lists_mark(const int* __restrict__ q2k_idx, const int* __restrict__ q2k_num, unsigned int* __restrict__ bits,
              int* __restrict__ offsets, int entries, int length, int num_q, int num_heads, int group,
              int num_kv_heads, int num_kv, int words) {
    // 32-bit unsigned index arithmetic: the launcher keeps entries (and the grid's last CTA) below 2^31.
    const unsigned int e = blockIdx.x * MARK_THREADS + threadIdx.x;
    if (e >= static_cast<unsigned int>(entries)) return;
    long long lst;
    int code;
    if (!entry_list_code(q2k_idx, q2k_num, e, length, num_q, num_heads, group, num_kv_heads, num_kv, lst, code)) return;
    const unsigned int bit = 1u << (code & 31);
    const unsigned int old = atomicOr(bits + lst * words + (code >> 5), bit);
    if (!(old & bit)) atomicAdd(offsets + 1 + lst, 1);
}

__global__ void __launch_bounds__(SCAN_THREADS)
kv_lists_scan(int* __restrict__ offsets, long long lists) {
    __shared__ int warp_sums[SCAN_WARPS];
    int* __restrict__ counts = offsets + 1;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int carry = 0;  // sum of the counts of the earlier segments
    for (long long base = 0; base < lists; base += SCAN_THREADS * SCAN_ITEMS) {
        const long long first = base + static_cast<long long>(tid) * SCAN_ITEMS;
        int local[SCAN_ITEMS], sum = 0;  // inclusive sums of this thread's items
#pragma unroll
        for (int k = 0; k < SCAN_ITEMS; ++k) {
            sum += first + k < lists ? counts[first + k] : 0;
            local[k] = sum;
        }
        int incl = sum;  // inclusive scan of the threads' sums within the warp
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const int t = __shfl_up_sync(FULL_MASK, incl, off);
            if (lane >= off) incl += t;
        }
        if (lane == 31) warp_sums[warp] = incl;
        __syncthreads();
        if (warp == 0) {  // inclusive scan of the warps' sums (SCAN_WARPS == 32)
            int w = warp_sums[lane];
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                const int t = __shfl_up_sync(FULL_MASK, w, off);
                if (lane >= off) w += t;
            }
            warp_sums[lane] = w;
        }
        __syncthreads();
        const int before = carry + (warp ? warp_sums[warp - 1] : 0) + incl - sum;
#pragma unroll
        for (int k = 0; k < SCAN_ITEMS; ++k)
            if (first + k < lists) counts[first + k] = before + local[k];
        carry += warp_sums[SCAN_WARPS - 1];
        __syncthreads();  // every thread has read warp_sums before the next segment writes it
    }
}

__global__ void __launch_bounds__(WRITE_THREADS)
kv_lists_write(const unsigned int* __restrict__ bits, const int* __restrict__ offsets, int* __restrict__ codes,
               long long lists, int words, int lanes_log2) {
    // Every lane runs the same loop (no early exit) so the width-`lanes` shuffles see the whole warp;
    // lanes past the last list read nothing and write nothing.
    const int lanes = 1 << lanes_log2;
    const long long t = static_cast<long long>(blockIdx.x) * WRITE_THREADS + threadIdx.x;
    const long long lst = t >> lanes_log2;
    const int sub = static_cast<int>(t & (lanes - 1));
    const bool live = lst < lists;
    const unsigned int* __restrict__ row = bits + (live ? lst : 0) * words;
    int pos = live ? offsets[lst] : 0;  // where the codes of this step's words start
    for (int base = 0; base < words; base += lanes) {
        const int w_index = base + sub;
        unsigned int w = live && w_index < words ? row[w_index] : 0u;
        const int count = __popc(w);
        int incl = count;  // inclusive scan over the list's lanes
        for (int off = 1; off < lanes; off <<= 1) {
            const int s = __shfl_up_sync(FULL_MASK, incl, off, lanes);
            if (sub >= off) incl += s;
        }
        int out = pos + incl - count;
        const int code_base = w_index * 32;
        while (w) {  // set bits from the lowest: increasing codes
            codes[out++] = code_base + (__ffs(w) - 1);
            w &= w - 1;
        }
        pos += __shfl_sync(FULL_MASK, incl, lanes - 1, lanes);  // the group's total
    }
}

__global__ void __launch_bounds__(MARK_THREADS)
kv_lists_clean(const int* __restrict__ q2k_idx, const int* __restrict__ q2k_num, int* __restrict__ clean_idx,
               int* __restrict__ clean_num, int rows, int length, int num_kv) {
    const unsigned int row = blockIdx.x * MARK_THREADS + threadIdx.x;
    if (row >= static_cast<unsigned int>(rows)) return;
    const int used = min(max(q2k_num[row], 0), length);
    const int* __restrict__ in = q2k_idx + static_cast<size_t>(row) * length;
    int* __restrict__ out = clean_idx + static_cast<size_t>(row) * length;
    int kept = 0;
    for (int l = 0; l < used; ++l) {
        const int j = in[l];
        if (static_cast<unsigned int>(j) < static_cast<unsigned int>(num_kv)) out[kept++] = j;
    }
    for (int l = kept; l < length; ++l) out[l] = 0;
    clean_num[row] = kept;
}

__global__ void __launch_bounds__(MARK_THREADS)
kv_lists_rank(const int* __restrict__ q2k_idx, const int* __restrict__ q2k_num, const unsigned int* __restrict__ bits,
              const int* __restrict__ offsets, int* __restrict__ pos, int entries, int length, int num_q,
              int num_heads, int group, int num_kv_heads, int num_kv, int words) {
    const unsigned int e = blockIdx.x * MARK_THREADS + threadIdx.x;
    if (e >= static_cast<unsigned int>(entries)) return;
    long long lst;
    int code;
    if (!entry_list_code(q2k_idx, q2k_num, e, length, num_q, num_heads, group, num_kv_heads, num_kv, lst, code)) {
        pos[e] = -1;
        return;
    }
    const unsigned int* __restrict__ row = bits + lst * words;
    int rank = __popc(row[code >> 5] & ((1u << (code & 31)) - 1u));
    for (int w = 0; w < (code >> 5); ++w) rank += __popc(row[w]);
    pos[e] = offsets[lst] + rank;
}

// ---- kv_lists_order: which list each dK/dV CTA takes -------------------------------------------
//
// A dK/dV CTA's time is proportional to its list's length.  With VSA's selection on real
// attention, some key tiles are chosen by many query tiles (in a test with 10 key tiles per head
// chosen by every query tile, their lists were 10x the mean): in list order such a CTA may start
// late and finish long after the rest, the pass then waiting for a few SMs.  So lists of at
// least LONG_FACTOR times the segment's mean length (and at least LONG_MIN) go first, longest
// first (by count >> shift, 256 buckets; order within a bucket is whatever the atomics give: CTA
// order changes no result, each CTA writes its own rows and sums in list order), and the others
// follow in their own order, which keeps the CTAs running at once on a few heads (their Q and dO
// tiles share L2).  order holds list numbers, as offsets counts them.
constexpr int ORDER_THREADS = 1024;
constexpr int ORDER_BUCKETS = 256;
constexpr int LONG_FACTOR = 2;
constexpr int LONG_MIN = 16;

__global__ void __launch_bounds__(ORDER_THREADS)
kv_lists_order(const int* __restrict__ offsets, int* __restrict__ order, long long lists, long long segment) {
    __shared__ int bucket_start[ORDER_BUCKETS];
    __shared__ int warp_sums[ORDER_THREADS / 32];
    __shared__ int shared_max, long_total;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long first = static_cast<long long>(blockIdx.x) * segment;
    const long long n = min(segment, lists - first);
    const int* __restrict__ off = offsets + first;
    // Long: count * n >= LONG_FACTOR * (entries of the segment), i.e. LONG_FACTOR x the mean.
    const long long entries = off[n] - off[0];
    auto is_long = [&](int count) {
        return count >= LONG_MIN && static_cast<long long>(count) * n >= LONG_FACTOR * entries;
    };

    if (tid < ORDER_BUCKETS) bucket_start[tid] = 0;
    if (tid == 0) shared_max = 0;
    __syncthreads();
    int local_max = 0;
    for (long long i = tid; i < n; i += ORDER_THREADS) {
        const int count = off[i + 1] - off[i];
        if (is_long(count)) local_max = max(local_max, count);
    }
    atomicMax(&shared_max, local_max);
    __syncthreads();
    const int shift = max(0, 32 - __clz(shared_max) - 8);  // shared_max >> shift < 256
    for (long long i = tid; i < n; i += ORDER_THREADS) {
        const int count = off[i + 1] - off[i];
        if (is_long(count)) atomicAdd(bucket_start + (count >> shift), 1);
    }
    __syncthreads();
    if (tid == 0) {  // bucket b's lists start after those of the buckets above it
        int sum = 0;
        for (int bucket = ORDER_BUCKETS - 1; bucket >= 0; --bucket) {
            const int c = bucket_start[bucket];
            bucket_start[bucket] = sum;
            sum += c;
        }
        long_total = sum;
    }
    __syncthreads();
    int* __restrict__ out = order + first;
    int carry = long_total;  // where the next short list goes
    for (long long base = 0; base < n; base += ORDER_THREADS) {
        const long long i = base + tid;
        const int count = i < n ? off[i + 1] - off[i] : 0;
        const bool is_short = i < n && !is_long(count);
        if (i < n && !is_short) out[atomicAdd(bucket_start + (count >> shift), 1)] = static_cast<int>(first + i);
        // Short lists keep their order: an exclusive scan of the flags over the block.
        const unsigned int ballot = __ballot_sync(FULL_MASK, is_short);
        if (lane == 0) warp_sums[warp] = __popc(ballot);
        __syncthreads();
        int before = carry;
        for (int w = 0; w < warp; ++w) before += warp_sums[w];
        if (is_short) out[before + __popc(ballot & ((1u << lane) - 1u))] = static_cast<int>(first + i);
        int total = 0;
        for (int w = 0; w < ORDER_THREADS / 32; ++w) total += warp_sums[w];
        carry += total;
        __syncthreads();  // every thread has read warp_sums before the next round writes it
    }
}
