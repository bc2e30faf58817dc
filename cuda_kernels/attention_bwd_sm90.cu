// Block-sparse attention backward for Hopper: the dQ and dK/dV passes (same contract, CTA work,
// KV->Q lists and epilogues as attention_bwd.cuh's dq_pass and dkdv_pass) with every matrix
// product on warpgroup MMA (wgmma, sm_90a) and their own pipelines, the streamed tiles arriving
// by TMA as in the forward (attention_fwd_sm90.cu): one thread issues one bulk tensor copy per
// 64-column atom, completing on a shared-memory barrier, so the warps spend no instructions on
// addresses.  delta (and lse * log2(e)) come from coarse_grad.cu's ROWS variant in a VSA backward,
// else from attention_bwd.cu's bwd_delta (the same values).  Measurements behind the choices
// below are in BENCHMARKS.md (the backward sections, H100).
//
// Two ways to get dQ (the launcher, block_sparse_bwd, picks one per call):
//   - with dS blocks (the default at D = 128, and at D = 64 where the DRAM is fast (the
//     launcher's ds_head_dims), on problems of 512 MiB of blocks and more, in
//     chunks of (batch, kv head) pairs within a 2 GiB budget, or in parts of one pair's blocks):
//     bwd_dkdv_sm90 runs first and stores each step's dS (8 KB per 64 x 64 block, "dS blocks"
//     below), then bwd_dq_ds_sm90 sums dS K from them: five matrix products per (query tile,
//     key tile) pair instead of seven, 8-13% faster at the benchmark shapes.  In parts, both
//     passes run once per part, each taking the key tiles whose lists start in that part;
//   - without (D = 64 on slower DRAM, small problems, too little budget or memory): bwd_dq_sm90
//     recomputes S, P, dP and dS for its own dQ, before bwd_dkdv_sm90.
//
// Both passes first copy their CTA's index list into shared memory, one int2 per entry (the dQ
// pass: key tile and its block size; the dK/dV pass: list code and its query tile's block size),
// when it has at most `list_cap` (and LIST_CAP = 1024) entries; longer lists are read from
// global memory as the loop goes (two dependent loads per chunk, whose latency the warps would
// otherwise wait out).  Lists run in increasing tile order, so CTAs that start together sweep
// their head's tiles together and share them in L2: starting each dK/dV CTA at a scattered
// entry of its list made the backward 3-4% slower.
//
// bwd_dq_sm90: Q and dO come once by cp.async; K and V chunks by TMA, one barrier per K and per
// V stage.  K and V have DQ_STAGES = 1 stage (Q + dO + K + V + the staged list = 72 KB at
// D = 128: three CTAs per SM; 40 KB at D = 64: four).  K feeds both S = Q K^T and dQ += dS K,
// so a stage is refilled (K and V together) once the chunk's last product is done:
//   wait K_j, V_j -> dq_chunk (below) -> barrier -> refill the stage with chunk j + DQ_STAGES.
// With one stage a CTA's copy does not overlap its own products; the other CTAs on the SM hide
// it, and the third CTA that the smaller footprint admits beat two stages with two CTAs, also
// when chunks were pipelined as the dK/dV pass pipelines its steps.  The pipeline takes 1 to 4
// stages (DQ_STAGES here and _DQ_STAGES in the launcher).  TMA copies whole 64-key chunks: past
// a tile's block size the key and value rows are zeroed in shared memory (fenced for the tensor
// cores) before the products, since both reach dQ (dP = dO V^T, then dS K) and 0 * NaN is NaN.
// Chunks holding no key (sub-chunks past a short tile's block size, tile volume > 64) are
// neither loaded nor computed.
//
// bwd_dkdv_sm90: K and V of the CTA's 64 keys come once by cp.async (pad key rows read as 0).
// Each step's 64-row Q and dO slices come by TMA and its 64 lse * log2(e) values (bwd_delta's
// lse_log2) and 64 delta values by two 1-D bulk copies, all completing on one barrier per
// stage (expecting their summed bytes; lane 0 of warps 0, 1 and 2 each issues a third of them).
// They have DKDV_STAGES<D> stages: two at D = 128 (K + V + 2 x (Q + dO) + 2 x (lse + delta) +
// the staged list = 105 KB: two CTAs per SM, as registers allow; a third stage would not fit
// beside the second CTA), three at D = 64 (74 KB, three CTAs per SM; 1% faster than two).  At
// D = 128 steps are pipelined: step t's S^T and dP^T are issued behind step t - 1's dV and dK,
// which are still running; once those two are done, step t - 1's stage is refilled (with step
// t - 1 + STAGES) while S^T and dP^T run:
//   wait step t -> issue S^T, dP^T -> wait for step t - 1's dV, dK -> barrier -> refill step
//   t - 1's stage with step t - 1 + STAGES -> wait S^T -> P^T, dV, dS^T, dK (dkdv_finish,
//   below; dV and dK left running).
// At D = 64 (DKDV_PIPELINED<64> false) each step waits for its own dV and dK, then refills its
// stage with step t + STAGES; that frees the registers that let three CTAs share an SM, whose
// products overlap one another's waits instead:
//   wait step t -> issue S^T, dP^T -> wait S^T -> P^T, dV, dS^T, dK -> wait dV, dK -> barrier
//   -> refill step t's stage with step t + STAGES.
// Step 0's products overwrite the accumulators (no zeroing ahead of the loop: a write to them on
// a path that meets the in-flight products at the loop's head makes ptxas serialize every
// wgmma; `python -m vsa_nd.compile_check` fails on that).  The refill's list entry is read a
// step ahead.  TMA copies whole 64-row slices: past a tile's block size the Q and dO rows are
// zeroed in shared memory (fenced) before the products, since dout's pad rows may hold anything
// (NaN) and 0 * NaN is NaN; P^T is 0 in those columns whatever lse holds there, and delta is 0
// there (bwd_delta), so they add exact zeros.  Slices holding no query row (sub-slices past a
// short tile's block size, tile volume > 64) are computed all the same (zeros): a branch around
// them would break the pipeline.  At D = 128 the pass is bound by its four products (the tensor
// cores busy ~72% of its time); waits on its Q/dO loads and dS stores take most of the rest,
// while its exponentials and dS arithmetic hide behind the other CTA's products.  Slower
// variants tried there: the unpipelined loop, a CTA of two warpgroups splitting a step's
// products, register-A score products, dropping the refill's barrier.  At D = 64 the products
// are half as long and the rest is not: there three CTAs per SM hide one another's waits.
//
// WgmmaProducts, per dQ chunk:
//   S = Q K^T and dP = dO V^T (shared-memory operands, both K-major) issued together ->
//   P = exp2(scale*log2e*S - lse*log2e) (0 past the block size) while dP finishes ->
//   dS = P (dP - delta) -> acc += dS K (dS from registers; K as an MN-major operand, transposed
//   by the instruction).
// per dK/dV step (this CTA's 64 keys are the warpgroup's 64 rows):
//   S^T = K Q^T and dP^T = V dO^T issued together (dkdv_scores) -> P^T (0 for keys past the
//   tile's block size and for pad query rows) -> dV += P^T dO issued -> dS^T = P^T (dP^T -
//   delta) while it runs -> dK += dS^T Q issued (dkdv_finish).
// Shared memory written by cp.async or by the threads is fenced (fence.proxy.async) before
// wgmma reads it.
//
// bwd_dq_ds_sm90: see its comment.  The dS hand-over costs the dK/dV pass four 16-byte stores
// per thread and step, and more for their traffic than for the instructions: the 5.8 GB of dS
// (main shape) pass through L2 to DRAM and evict Q and dO tiles, which then come from DRAM
// (hints to L2 did not help).  Each step's block index comes by one addition (consecutive steps'
// blocks lie `slices` blocks apart): the divisions it took before cost 16% of the pass.
#include "attention_bwd.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace vsa {

// ---- dS blocks: the dK/dV pass hands dS to the dQ pass ----------------------------------------
//
// With a workspace (the launcher's choice, see block_sparse_bwd), the dK/dV pass stores each
// step's dS^T (64 keys x 64 query rows, already rounded to T as the A operand of dK += dS^T Q)
// as one 8 KB block, and the dQ pass computes dQ += dS K from those blocks instead of
// recomputing S, P and dP (one product per chunk instead of three, and neither Q, dO, lse nor
// delta to read).  Block (p, s, c) = (list position, 64-row query slice, 64-key chunk of the key
// tile) is block (p * slices + s) * slices + c, p counting the entries of all KV->Q lists in
// order (kv_lists.cu: the dK/dV CTA of list lst writes p = offsets[lst] + its entry, the dQ CTA
// reads p from kv_lists_rank's pos[b, h, i, l]).
//
// Layout of a block: 512 16-byte groups; group (w, m) (w, m in 0..3) at (w * 4 + m) * 32 + lane
// holds what thread `lane` of dQ warp w needs for key step m (keys 16m..16m+15): the four 8x8
// sub-blocks (query rows 16w + 8a.., keys 16m + 8b..) for (a, b) = (0,0), (0,1), (1,0), (1,1),
// each as the dK/dV warp m holds it (its fragment of dS^T: key row lane / 4, query columns
// 2 (lane % 4) + {0, 1}).  So the dK/dV thread stores its dS^T fragments of query step w
// (ds[w], in p_fragment order) as one 16-byte group each: four coalesced 512-byte warp stores
// per step.  The dQ thread loads its four groups and transposes each 8x8 sub-block with
// movmatrix into the fragment of dS (query row lane / 4, keys 2 (lane % 4) + {0, 1}): the
// register A operand of dQ += dS K.
constexpr int DS_BLOCK_ELEMS = ATT_BLOCK_M * ATT_BLOCK_N;
constexpr int DS_BLOCK_BYTES = DS_BLOCK_ELEMS * 2;

// `mine`: the block's group (0, warp) + lane, i.e. block + warp * 32 + lane (uint4 units).
__device__ __forceinline__ void store_ds_block(uint4* mine, const unsigned int (&ds)[4][4]) {
#pragma unroll
    for (int w = 0; w < 4; ++w)  // streaming stores: the block is read once, by another kernel
        __stcs(mine + w * 128, make_uint4(ds[w][0], ds[w][1], ds[w][2], ds[w][3]));
}

// With a pair's blocks in parts (the launcher's ds_parts), the part that takes a KV->Q list
// starting at position `start` (counted from the pair's first list): parts of part_cap positions,
// the last one also taking the lists that start at or past its end (empty lists after every
// entry, when the entries fill the parts exactly).  Both passes decide by it.
__device__ __forceinline__ int part_of_list(int start, int part_cap, int parts) {
    return min(start / part_cap, parts - 1);
}

__device__ __forceinline__ unsigned int transpose8x8(unsigned int x) {
    unsigned int y;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
    return y;
}

// dS for this warp's 16 query rows as four k16 register fragments (p_fragment's layout), from a
// block in shared memory.
__device__ __forceinline__ void load_ds_fragments(unsigned int (&a)[4][4], const unsigned char* block, int warp,
                                                  int lane) {
    const uint4* groups = reinterpret_cast<const uint4*>(block);
#pragma unroll
    for (int m = 0; m < 4; ++m) {
        const uint4 g = groups[(warp * 4 + m) * 32 + lane];  // x: rows +0 keys +0, y: +0 +8, z: +8 +0, w: +8 +8 (as dS^T)
        a[m][0] = transpose8x8(g.x);  // rows 0-7, keys 0-7
        a[m][1] = transpose8x8(g.z);  // rows 8-15, keys 0-7
        a[m][2] = transpose8x8(g.y);  // rows 0-7, keys 8-15
        a[m][3] = transpose8x8(g.w);  // rows 8-15, keys 8-15
    }
}

template <typename T, int D> struct WgmmaProducts {
    unsigned long long desc_q, desc_do;  // bwd_dq: the CTA's Q and dO tiles

    __device__ void start_dq(const unsigned char* sQ, const unsigned char* sdO, int, int) {
        desc_q = smem_desc(sQ, 16, 1024);
        desc_do = smem_desc(sdO, 16, 1024);
    }

    __device__ void dq_chunk(float (&acc)[D / 2], const unsigned char* cK, const unsigned char* cV, int valid,
                             const float (&lse_log2)[2], const float (&row_delta)[2], float scale_log2, int,
                             int lane) {
        const unsigned long long desc_k = smem_desc(cK, 16, 1024), desc_v = smem_desc(cV, 16, 1024);
        float s[32], dp[32];
        wgmma_fence();
        wgmma_ss_issue<T, D / 16>(s, desc_q, desc_k);
        wgmma_ss_issue<T, D / 16>(dp, desc_do, desc_v);
        wgmma_wait<1>();
        fence_registers(s);
#pragma unroll
        for (int i = 0; i < 32; ++i) {  // P
            const int key = (i >> 2) * 8 + (lane & 3) * 2 + (i & 1);
            const float p = fast_exp2(fmaf(s[i], scale_log2, -lse_log2[(i >> 1) & 1]));
            s[i] = valid == ATT_BLOCK_N || key < valid ? p : 0.f;
        }
        wgmma_wait<0>();
        fence_registers(dp);
#pragma unroll
        for (int i = 0; i < 32; ++i) s[i] *= dp[i] - row_delta[(i >> 1) & 1];  // dS

        unsigned int ds[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) p_fragment<T>(s, kk, ds[kk]);
        wgmma_rs_issue<T, D>(acc, ds, smem_desc(cK, ATOM_BYTES, 1024));
        wgmma_wait<0>();
        fence_registers(acc);
    }

    // dK/dV step, first half: issues S^T = K Q^T and dP^T = V dO^T (two groups), from the
    // K-major descriptors of K, V and the step's Q and dO (DkdvDescs).
    __device__ void dkdv_scores(float (&st)[32], float (&dpt)[32], unsigned long long desc_k,
                                unsigned long long desc_v, unsigned long long desc_q, unsigned long long desc_do) {
        wgmma_fence();
        wgmma_ss_issue<T, D / 16>(st, desc_k, desc_q);
        wgmma_ss_issue<T, D / 16>(dpt, desc_v, desc_do);
    }

    // dK/dV step, second half, once S^T is done (wgmma_wait<1> after dkdv_scores): P^T (0 for
    // keys past the tile's block size and for pad query rows) -> dV += P^T dO issued -> dS^T =
    // P^T (dP^T - delta) once dP^T is done -> dK += dS^T Q issued.  Returns with dV and dK in
    // flight (two groups); at D = 128 the next step's scores are issued behind them.
    __device__ void dkdv_finish(float (&acc_k)[D / 2], float (&acc_v)[D / 2], float (&st)[32], float (&dpt)[32],
                                unsigned long long desc_q_mn, unsigned long long desc_do_mn, const float* c_lse_log2,
                                const float* c_delta, int real_k, int real_q, float scale_log2, int warp, int lane, int accumulate,
                                uint4* ds_mine) {
        // st and dpt are only read here: they are the next step's accumulators too, and ptxas
        // serializes every wgmma if other instructions write them while dV and dK are in flight.
        fence_registers(st);
        float p[32];
        if (real_k == ATT_BLOCK_N && real_q == ATT_BLOCK_M) {  // whole tiles, most steps: no mask to apply
#pragma unroll
            for (int i = 0; i < 32; ++i) {
                const int col = (i >> 2) * 8 + (lane & 3) * 2 + (i & 1);
                p[i] = fast_exp2(fmaf(st[i], scale_log2, -c_lse_log2[col]));
            }
        } else {
#pragma unroll
            for (int i = 0; i < 32; ++i) {
                const int key = warp * 16 + (lane >> 2) + ((i >> 1) & 1) * 8;
                const int col = (i >> 2) * 8 + (lane & 3) * 2 + (i & 1);
                const float e = fast_exp2(fmaf(st[i], scale_log2, -c_lse_log2[col]));
                // 0 for pad keys and pad query rows, whatever lse holds there (the pad rows of dO
                // and delta are 0 too, so the pad columns of P^T and dS^T add exact zeros).
                p[i] = key < real_k && col < real_q ? e : 0.f;
            }
        }
        unsigned int pt[4][4];  // P^T packed: the A operand of dV += P^T dO, intact until it is done
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) p_fragment<T>(p, kk, pt[kk]);

        wgmma_rs_issue<T, D>(acc_v, pt, desc_do_mn, accumulate);
        wgmma_wait<1>();  // dP^T done; dV may still run
        fence_registers(dpt);
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            const int col = (i >> 2) * 8 + (lane & 3) * 2 + (i & 1);
            p[i] *= dpt[i] - c_delta[col];  // dS^T
        }
        unsigned int ds[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) p_fragment<T>(p, kk, ds[kk]);
        if (ds_mine) store_ds_block(ds_mine, ds);
        wgmma_rs_issue<T, D>(acc_k, ds, desc_q_mn, accumulate);  // dK += dS^T Q
    }
};

// bwd_dq_sm90: K and V stages (the launcher's _DQ_STAGES must match), shared memory (Q, dO,
// K and V stages, one 8-byte barrier per K and per V stage) and the CTAs per SM that it leaves
// room for (228 KB per SM, 1 KB of it reserved per CTA; at most 4, i.e. 128 registers), which
// __launch_bounds__ asks the register allocation to allow.
constexpr int DQ_STAGES = 1;
// Both passes copy their CTA's list (key tiles, or query-tile codes, with each tile's block size)
// into shared memory first when it has at most min(list_cap, LIST_CAP) entries (list_cap is the
// launcher's _LIST_STAGE_LIMIT, LIST_BYTES its _LIST_BYTES), so that the loop reads its indices
// there rather than by two dependent global loads per chunk.
constexpr int LIST_CAP = 1024;
constexpr int LIST_BYTES = LIST_CAP * 8;  // one int2 per entry
template <int D> struct DqSmem {
    static constexpr int BYTES = (2 + 2 * DQ_STAGES) * AttentionSmem<D>::TILE + 16 * DQ_STAGES + LIST_BYTES;
    static constexpr int FIT = 228 * 1024 / (BYTES + 1024);
    static constexpr int MIN_CTAS = FIT < 4 ? FIT : 4;
};

// bwd_dkdv_sm90: stages of (Q, dO, lse, delta) (the launcher's _DKDV_STAGES must match),
// shared memory (K, V, the Q and dO stages, 64 lse and 64 delta floats per stage, one 8-byte
// barrier per stage), DKDV_CTAS per SM:
// - D = 128: two, as shared memory allows; their registers (251) fit without asking.
// - D = 64: three, asked of __launch_bounds__ (DKDV_MIN_CTAS: <= 168 registers).  The pipelined
//   loop holds the next step's scores beside the last step's operands, and at 168 registers
//   ptxas serializes its wgmma; the unpipelined loop (DKDV_PIPELINED) compiles to 168 without
//   spills.  Three CTAs unpipelined were 4-5% faster than two pipelined at Wan2.1 480p with 24
//   heads of 64 (H200, BENCHMARKS.md), the three stages 1% faster than two.
template <int D> constexpr int DKDV_STAGES = D == 64 ? 3 : 2;
template <int D> constexpr int DKDV_CTAS = D == 64 ? 3 : 2;
template <int D> constexpr bool DKDV_PIPELINED = D != 64;
// What __launch_bounds__ asks for: the CTAs the unpipelined loop is there to fit (the pipelined
// one's two fit without asking).
template <int D> constexpr int DKDV_MIN_CTAS = DKDV_PIPELINED<D> ? 1 : DKDV_CTAS<D>;
template <int D> struct DkdvSmem {
    static constexpr int STATS = 2 * ATT_BLOCK_M * 4;  // bytes of one stage's lse and delta
    static constexpr int BYTES =
        (2 + 2 * DKDV_STAGES<D>) * AttentionSmem<D>::TILE + DKDV_STAGES<D> * (STATS + 8) + LIST_BYTES;
    static_assert(228 * 1024 / (BYTES + 1024) >= DKDV_CTAS<D>, "CTAs per SM");
};

// bwd_dq_ds_sm90<T, D, STAGES>: STAGES stages of (K chunk, dS block), then its staged list of
// {key tile, block size, list position} (12 bytes per entry) in the room the launcher gives it
// (`list_room` entries, at least DQDS_MIN_LIST): the CTAs per SM that leaves room for
// (DqDsSmem::CTAS, at most 4) is what __launch_bounds__ asks the register allocation to allow;
// the launcher (_dq_ds_layout) computes the same numbers.
constexpr int DQDS_MIN_LIST = 128;
template <int D, int STAGES> struct DqDsSmem {
    static constexpr int STAGE = AttentionSmem<D>::TILE + DS_BLOCK_BYTES;
    static constexpr int FIXED = STAGES * (STAGE + 8);  // stages and their barriers
    static constexpr int FIT = 228 * 1024 / (FIXED + DQDS_MIN_LIST * 12 + 1024);
    static constexpr int CTAS = FIT < 4 ? FIT : 4;
    static_assert(CTAS >= 1, "one CTA per SM");
};

// The dK/dV pass's shared-memory matrix descriptors, built once per CTA: K and V (K-major), and
// stage 0's Q and dO both K-major (for S^T and dP^T) and MN-major (the B operands of dK and
// dV); stage s is `stage_step * s` further (descriptors count 16-byte units, and every stage's
// tile lies within the 256 KB that their 14-bit address field reaches).
template <int D> struct DkdvDescs {
    unsigned long long k, v, q, dout, q_mn, dout_mn, stage_step;
    __device__ DkdvDescs(const unsigned char* sK, const unsigned char* sV, const unsigned char* sQ,
                         const unsigned char* sdO)
        : k(smem_desc(sK, 16, 1024)), v(smem_desc(sV, 16, 1024)), q(smem_desc(sQ, 16, 1024)),
          dout(smem_desc(sdO, 16, 1024)), q_mn(smem_desc(sQ, ATOM_BYTES, 1024)),
          dout_mn(smem_desc(sdO, ATOM_BYTES, 1024)), stage_step(AttentionSmem<D>::TILE >> 4) {}
};

// The load cursor of both dQ passes, kept alike by every thread (thread 0 issues the copies):
// chunk `load` (`current`, from the kernel's chunk function `chunk_of`) goes into stage
// `issued % STAGES` next, and `stage_valid` holds each stage's real keys, one byte per stage.
// A chunk past its tile's block size (tile volume > 64) holds no key: it is skipped, and so is
// the rest of its tile.  Made once the chunk function can read the staged list.
template <class Chunk, class ChunkOf, int STAGES> struct LoadCursor {
    static_assert(STAGES >= 1 && STAGES <= 4, "stage_valid holds one byte per stage");
    const ChunkOf& chunk_of;
    int n, per_tile, load = 0;
    unsigned int issued = 0, stage_valid = 0;
    Chunk current{};

    __device__ LoadCursor(const ChunkOf& chunk, int chunks, int chunks_per_tile)
        : chunk_of(chunk), n(chunks), per_tile(chunks_per_tile) {
        if (n > 0) current = chunk_of(0);
        skip_empty();
    }
    __device__ bool more() const { return load < n; }
    __device__ unsigned int next_stage() const { return issued % STAGES; }
    __device__ int valid(unsigned int stage) const { return (stage_valid >> 8 * stage) & 0xff; }
    // The chunk after `current`, read early so that its index loads overlap other work.
    __device__ Chunk peek() const { return load + 1 < n ? chunk_of(load + 1) : Chunk{}; }
    // Once `current`'s copies into next_stage() are issued: records its real keys, moves on to `next` (peek()).
    __device__ void advance(const Chunk& next) {
        const unsigned int stage = next_stage();
        stage_valid = (stage_valid & ~(0xffu << 8 * stage)) | static_cast<unsigned int>(current.valid) << 8 * stage;
        ++issued;
        ++load;
        current = next;
        skip_empty();
    }
    __device__ void skip_empty() {
        while (load < n && current.valid == 0) {
            load = (load / per_tile + 1) * per_tile;
            if (load < n) current = chunk_of(load);
        }
    }
};

// Copies `bytes` (a multiple of 16; both addresses 16-byte aligned) from global to shared
// memory; the bytes complete on `bar`.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, unsigned int bytes, unsigned long long* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                     smem_u32(dst)),
                 "l"(src), "r"(bytes), "r"(smem_u32(bar))
                 : "memory");
}

// bulk_load with the copied lines marked evict-first in L2 (for data read once).
__device__ __forceinline__ void bulk_load_evict_first(void* dst, const void* src, unsigned int bytes, unsigned long long* bar) {
    asm volatile("{\n.reg .b64 policy;\ncreatepolicy.fractional.L2::evict_first.b64 policy, 1.0;\n"
                 "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], policy;\n}\n" ::"r"(
                     smem_u32(dst)),
                 "l"(src), "r"(bytes), "r"(smem_u32(bar))
                 : "memory");
}

}  // namespace vsa

// The dQ pass with K and V by TMA: same arguments as attention_bwd.cu's bwd_dq, after
// the tensor maps of K and V ([B * H_kv * kv_len, D], 64 x 64 boxes, 128-byte swizzle), and
// then `list_cap`: lists of at most that many entries (<= LIST_CAP) are staged in shared memory.
template <typename T, int D>
__global__ void __launch_bounds__(vsa::ATT_THREADS, vsa::DqSmem<D>::MIN_CTAS)
bwd_dq_sm90(const __grid_constant__ vsa::TmaDesc tma_k, const __grid_constant__ vsa::TmaDesc tma_v,
            const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
            const float* __restrict__ lse, const float* __restrict__ delta, const int* __restrict__ q2k_idx,
            const int* __restrict__ q2k_num, const int* __restrict__ q_block_sizes,
            const int* __restrict__ kv_block_sizes, const float* __restrict__ dq_tile, T* __restrict__ dq,
            int num_heads, int num_kv_heads, int q_len, int kv_len, int list_len, int tile_volume, float scale,
            int list_cap) {
    using namespace vsa;
    using Chunk = typename AttentionCta<T, D>::Chunk;
    constexpr int TILE = AttentionSmem<D>::TILE, STAGES = DQ_STAGES;
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned char* sQ = smem;
    unsigned char* sdO = smem + TILE;
    unsigned char* sK = smem + 2 * TILE;     // STAGES tiles
    unsigned char* sV = sK + STAGES * TILE;  // STAGES tiles
    unsigned long long* bar_k = reinterpret_cast<unsigned long long*>(sV + STAGES * TILE);  // one per K stage
    unsigned long long* bar_v = bar_k + STAGES;                                              // one per V stage
    int2* sList = reinterpret_cast<int2*>(bar_v + STAGES);  // {key tile, its block size} per list entry

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const AttentionCta<T, D> cta(k, v, q2k_idx, q2k_num, kv_block_sizes, num_heads, num_kv_heads, q_len, kv_len,
                                 list_len, tile_volume);
    const int n = cta.n_chunks;
    const int real_q = real_rows(q_block_sizes[cta.q_tile], (blockIdx.x * ATT_BLOCK_M) % tile_volume);
    const int kv_row0 = static_cast<int>((cta.k - k) / D);  // tensor-map row of this (batch, kv head)'s key 0

    const int entries = n / cta.chunks_per_tile;
    const bool staged = entries <= min(list_cap, LIST_CAP);  // the same in every thread
    if (staged)
        for (int i = tid; i < entries; i += ATT_THREADS) {
            const int tile = cta.list[i];
            sList[i] = make_int2(tile, kv_block_sizes[tile]);
        }
    // Chunk c as AttentionCta::chunk computes it, from the staged list when there is one (the
    // caller makes the staging visible first).
    auto chunk = [&](int c) -> Chunk {
        if (!staged) return cta.chunk(c);
        const int entry = cta.chunks_per_tile == 1 ? c : c / cta.chunks_per_tile;
        const int2 e = sList[entry];
        const int sub = c - entry * cta.chunks_per_tile, left = e.y - sub * ATT_BLOCK_N;
        return {(static_cast<size_t>(e.x) * tile_volume + sub * ATT_BLOCK_N) * D, min(max(left, 0), ATT_BLOCK_N)};
    };

    // Loads the cursor's chunk into its next stage and moves it on to `next` (cursor.peek()).
    auto push = [&](LoadCursor<Chunk, decltype(chunk), STAGES>& cursor, const Chunk& next) {
        const unsigned int stage = cursor.next_stage();
        if (tid == 0) {
            const int row = kv_row0 + static_cast<int>(cursor.current.offset / D);
            mbar_expect_tx(bar_k + stage, TILE);
#pragma unroll
            for (int atom = 0; atom < D / 64; ++atom)
                tma_load_2d(sK + stage * TILE + atom * ATOM_BYTES, &tma_k, atom * 64, row, bar_k + stage);
            mbar_expect_tx(bar_v + stage, TILE);
#pragma unroll
            for (int atom = 0; atom < D / 64; ++atom)
                tma_load_2d(sV + stage * TILE + atom * ATOM_BYTES, &tma_v, atom * 64, row, bar_v + stage);
        }
        cursor.advance(next);
    };

    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(bar_k + s, 1);
            mbar_init(bar_v + s, 1);
        }
        fence_mbar_init();
    }
    __syncthreads();  // barriers initialised, list staged
    LoadCursor<Chunk, decltype(chunk), STAGES> cursor(chunk, n, cta.chunks_per_tile);
    if (cursor.more()) push(cursor, cursor.peek());
    load_tile_async<D>(sQ, q + cta.q_offset, ATT_BLOCK_M, tid);
    load_tile_async<D>(sdO, dout + cta.q_offset, real_q, tid);  // pad rows read as 0
    cp_async_commit();
#pragma unroll
    for (int s = 1; s < STAGES; ++s)
        if (cursor.more()) push(cursor, cursor.peek());

    float lse_log2[2], row_delta[2];
    load_row_stats(lse, delta, cta.q_offset / D, lse_log2, row_delta, warp, lane);
    float acc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;
    WgmmaProducts<T, D> products;
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();  // Q and dO visible to the tensor cores
    products.start_dq(sQ, sdO, warp, lane);

    // Load j sits in stage j % STAGES; that stage's barriers complete one phase per load.
    for (unsigned int j = 0; j < cursor.issued; ++j) {
        const unsigned int stage = j % STAGES, phase = (j / STAGES) & 1;
        unsigned char* cK = sK + stage * TILE;
        unsigned char* cV = sV + stage * TILE;
        const int valid = cursor.valid(stage);
        const Chunk next = cursor.peek();  // index loads overlap the products
        mbar_wait(bar_k + stage, phase);
        mbar_wait(bar_v + stage, phase);
        // Pad keys' K and V rows both reach dQ (dP = dO V^T, then dS K): zero both.
        if (valid < ATT_BLOCK_N) zero_rows_from<D>(cK, cV, valid, tid);
        products.dq_chunk(acc, cK, cV, valid, lse_log2, row_delta, scale * LOG2E, warp, lane);
        if (cursor.more()) {  // the same in every thread
            __syncthreads();  // every warp is done reading this stage's K and V
            push(cursor, next);
        }
    }
    const float* tile_vec = dq_tile ? dq_tile + (static_cast<size_t>(cta.bh) * cta.num_q_blocks + cta.q_tile) * D : nullptr;
    write_rows<T, D>(dq + cta.q_offset, acc, scale, tile_vec, real_q, warp, lane);
}

// The dQ pass from the dK/dV pass's dS blocks (see "dS blocks" above): dQ = scale * sum over the
// chunks of dS K (+ dq_tile).  One CTA per (64 query rows, batch * head), as bwd_dq_sm90; its
// chunks' K (TMA, as there) and dS block (one 8 KB bulk copy, marked evict-first in L2: read
// once; 2.37 against 2.48 ms for the pass without the hint) arrive on one barrier per stage.
// Per chunk j: issue acc += dS_j K_j -> read chunk j + 1's dS fragments (wait for its stage,
// zero K's pad rows if its tile is short: dS is 0 there, but K may hold NaN) while it runs ->
// wait for it -> barrier -> refill its stage.  STAGES = 3 (three CTAs per SM at D = 128, four
// at D = 64) was 1-2% faster than 4 stages with two; 2 stages with four CTAs were 5.0-7.5%
// slower (at most 128 registers: ptxas spills).  Arguments: the tensor map of K, then k,
// the dS blocks, `pos` (kv_lists_rank: [B, H, N_q, L], the list position of each used selection
// entry) and bwd_dq's arguments from q2k_idx on, then `list_cap` (as in bwd_dq_sm90), the KV->Q
// list offsets, `partial` (null, or with parts: fp32 sums carried from part to part, D * 64
// floats per CTA), `bh0` (the (batch, head) of blockIdx.y == 0: launches cover chunks of the
// heads, each with its dS blocks from the start of the workspace), `list_room` (entries of
// shared memory for the staged list, _dq_ds_layout), and `part`, `parts` and `part_cap` (0:
// no parts; see ds_base below and the launcher's ds_parts).
template <typename T, int D, int STAGES>
__global__ void __launch_bounds__(vsa::ATT_THREADS, vsa::DqDsSmem<D, STAGES>::CTAS)
bwd_dq_ds_sm90(const __grid_constant__ vsa::TmaDesc tma_k, const T* __restrict__ k, const T* __restrict__ ds_blocks,
               const int* __restrict__ pos, const int* __restrict__ q2k_idx, const int* __restrict__ q2k_num,
               const int* __restrict__ q_block_sizes, const int* __restrict__ kv_block_sizes,
               const float* __restrict__ dq_tile, T* __restrict__ dq, const int* __restrict__ kv2q_offsets,
               float* __restrict__ partial, int num_heads, int num_kv_heads, int q_len, int kv_len, int list_len,
               int tile_volume, float scale, int list_cap, int bh0, int list_room, int part, int parts, int part_cap) {
    using namespace vsa;
    constexpr int TILE = AttentionSmem<D>::TILE, STAGE = DqDsSmem<D, STAGES>::STAGE;
    // Chunk j + 1's fragments are read while chunk j's product runs (step, below), so chunk j + 1
    // must already be loading then: with one stage it would be pushed only after chunk j is done.
    static_assert(STAGES >= 2, "the loop reads one chunk ahead");
    extern __shared__ __align__(1024) unsigned char smem[];
    // Stage s: K at smem + s * STAGE (1024-byte aligned: TILE and DS_BLOCK_BYTES are multiples of 1024), its dS block after it.
    unsigned long long* bar = reinterpret_cast<unsigned long long*>(smem + STAGES * STAGE);  // one per stage
    int* sTile = reinterpret_cast<int*>(bar + STAGES);  // per list entry: key tile, its block size, its list position
    int* sSize = sTile + list_room;
    int* sPos = sSize + list_room;
    if (threadIdx.x == 0) {  // the launcher's layout (_dq_ds_layout) must give all of this
        unsigned int given;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(given));
        if (reinterpret_cast<unsigned char*>(sPos + list_room) - smem > given) __trap();
    }

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const AttentionCta<T, D> cta(k, k, q2k_idx, q2k_num, kv_block_sizes, num_heads, num_kv_heads, q_len, kv_len,
                                 list_len, tile_volume, bh0);
    // The launch's dS blocks start at the first list position of its first (batch, kv head):
    // bh0 is a multiple of the group, bh0 / group that (batch, kv head).  With the blocks in
    // parts (part_cap > 0), at that position plus part * part_cap: this launch sums the key tiles
    // whose lists start in part `part` (as bwd_dkdv_sm90 counts them) and skips the others.
    const int* pair_offsets = kv2q_offsets + bh0 / (num_heads / num_kv_heads) * (kv_len / tile_volume);
    const int ds_base = pair_offsets[0] + part * part_cap;
    auto size_in_part = [&](int tile) {  // the tile's block size, 0 (skipped) outside this part
        return part_cap == 0 || part_of_list(pair_offsets[tile] - pair_offsets[0], part_cap, parts) == part
                   ? kv_block_sizes[tile]
                   : 0;
    };
    const int n = cta.n_chunks, per_tile = cta.chunks_per_tile;  // per_tile: also the query slices per tile
    const int slice = (blockIdx.x * ATT_BLOCK_M) % tile_volume / ATT_BLOCK_M;
    const int real_q = real_rows(q_block_sizes[cta.q_tile], slice * ATT_BLOCK_M);
    const int kv_row0 = static_cast<int>((cta.k - k) / D);  // tensor-map row of this (batch, kv head)'s key 0
    const int* list_pos = pos + (cta.list - q2k_idx);

    const int entries = n / per_tile;
    const bool staged = entries <= min(list_cap, list_room);  // the same in every thread
    if (staged)
        for (int i = tid; i < entries; i += ATT_THREADS) {
            const int tile = cta.list[i];
            sTile[i] = tile;
            sSize[i] = size_in_part(tile);
            sPos[i] = list_pos[i];
        }
    // Chunk c: its first key row (of this batch and kv head), its real keys and its dS block.
    struct Chunk {
        int row, valid;
        size_t block;
    };
    auto chunk = [&](int c) -> Chunk {
        const int entry = per_tile == 1 ? c : c / per_tile, sub = c - entry * per_tile;
        const int tile = staged ? sTile[entry] : cta.list[entry];
        const int size = staged ? sSize[entry] : size_in_part(tile);
        const int p = (staged ? sPos[entry] : list_pos[entry]) - ds_base;
        return {tile * tile_volume + sub * ATT_BLOCK_N, min(max(size - sub * ATT_BLOCK_N, 0), ATT_BLOCK_N),
                (static_cast<size_t>(p) * per_tile + slice) * per_tile + sub};
    };

    auto push = [&](LoadCursor<Chunk, decltype(chunk), STAGES>& cursor, const Chunk& next) {
        const unsigned int stage = cursor.next_stage();
        unsigned char* cK = smem + stage * STAGE;
        if (tid == 0) {
            mbar_expect_tx(bar + stage, TILE + DS_BLOCK_BYTES);
#pragma unroll
            for (int atom = 0; atom < D / 64; ++atom)
                tma_load_2d(cK + atom * ATOM_BYTES, &tma_k, atom * 64, kv_row0 + cursor.current.row, bar + stage);
            bulk_load_evict_first(cK + TILE, ds_blocks + cursor.current.block * DS_BLOCK_ELEMS, DS_BLOCK_BYTES,
                                  bar + stage);
        }
        cursor.advance(next);
    };

    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) mbar_init(bar + s, 1);
        fence_mbar_init();
    }
    __syncthreads();  // barriers initialised, list staged
    LoadCursor<Chunk, decltype(chunk), STAGES> cursor(chunk, n, per_tile);
#pragma unroll
    for (int s = 0; s < STAGES; ++s)
        if (cursor.more()) push(cursor, cursor.peek());

    // With parts, every part after the first goes on from the sums of the parts before it (fp32,
    // unscaled, in each thread's accumulator order), and every part but the last leaves its sums
    // there for the next: the parts of a chunk run one after another, on one stream, over the
    // same grid.
    float* my_partial = partial ? partial + static_cast<size_t>(blockIdx.y * gridDim.x + blockIdx.x) * (D / 2) * ATT_THREADS + tid
                                : nullptr;
    float acc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc[i] = my_partial && part > 0 ? my_partial[i * ATT_THREADS] : 0.f;
    // Load j sits in stage j % STAGES, whose barrier completes one phase per load.  Chunk j + 1's
    // fragments are read while chunk j's product runs, into the other of two register sets.
    auto prepare = [&](unsigned int j, unsigned int (&a)[4][4]) {
        const unsigned int stage = j % STAGES;
        unsigned char* cK = smem + stage * STAGE;
        const int valid = cursor.valid(stage);
        mbar_wait(bar + stage, (j / STAGES) & 1);
        if (valid < ATT_BLOCK_N) zero_rows_from<D>(cK, nullptr, valid, tid);
        load_ds_fragments(a, cK + TILE, warp, lane);
    };
    auto step = [&](unsigned int j, const unsigned int (&a)[4][4], unsigned int (&a_next)[4][4]) {
        const Chunk next = cursor.peek();  // index loads overlap the product
        wgmma_rs_issue<T, D>(acc, a, smem_desc(smem + (j % STAGES) * STAGE, ATOM_BYTES, 1024));
        if (j + 1 < cursor.issued) prepare(j + 1, a_next);
        wgmma_wait<0>();
        fence_registers(acc);
        if (cursor.more()) {  // the same in every thread
            __syncthreads();  // every warp is done reading this stage
            push(cursor, next);
        }
    };
    unsigned int a0[4][4], a1[4][4];
    if (cursor.issued > 0) prepare(0, a0);
    for (unsigned int j = 0; j < cursor.issued; j += 2) {
        step(j, a0, a1);
        if (j + 1 < cursor.issued) step(j + 1, a1, a0);
    }
    if (my_partial && part + 1 < parts) {
#pragma unroll
        for (int i = 0; i < D / 2; ++i) my_partial[i * ATT_THREADS] = acc[i];
        return;
    }
    const float* tile_vec = dq_tile ? dq_tile + (static_cast<size_t>(cta.bh) * cta.num_q_blocks + cta.q_tile) * D : nullptr;
    write_rows<T, D>(dq + cta.q_offset, acc, scale, tile_vec, real_q, warp, lane);
}

// The dK/dV pass with Q and dO by TMA: the arguments of attention_bwd.cu's bwd_dkdv but its last
// (`order`), after the tensor maps of q and dout ([B * H * q_len, D], 64 x 64 boxes, 128-byte
// swizzle), and then `list_cap` (as in bwd_dq_sm90), `ds_blocks` (null, or the workspace where
// each step's dS block goes for bwd_dq_ds_sm90), `bh_kv0` (the first (batch, kv head) of the
// launch's lists: with dS blocks, a launch may cover a chunk of the kv heads, whose blocks start
// the workspace), `order` (null, or kv_lists_order's schedule: see DkdvCta), and `part`,
// `parts` and `part_cap` (0: one launch for the chunk's lists; else the launch of one part of a
// single (batch, kv head)'s blocks, see below and the launcher's ds_parts); `lse` holds
// lse * log2(e) here (bwd_delta's lse_log2).
template <typename T, int D>
__global__ void __launch_bounds__(vsa::ATT_THREADS, vsa::DKDV_MIN_CTAS<D>)
bwd_dkdv_sm90(const __grid_constant__ vsa::TmaDesc tma_q, const __grid_constant__ vsa::TmaDesc tma_do,
              const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
              const float* __restrict__ lse, const float* __restrict__ delta, const int* __restrict__ kv2q_code,
              const int* __restrict__ kv2q_offsets, const int* __restrict__ q_block_sizes,
              const int* __restrict__ kv_block_sizes, const float* __restrict__ dk_tile,
              const float* __restrict__ dv_tile, T* __restrict__ dk, T* __restrict__ dv, T* __restrict__ ds_blocks,
              const int* __restrict__ order, int num_heads, int num_kv_heads, int q_len, int kv_len, int tile_volume,
              float scale, int list_cap, int bh_kv0, int part, int parts, int part_cap) {
    using namespace vsa;
    constexpr int TILE = AttentionSmem<D>::TILE, STAGES = DKDV_STAGES<D>, STATS = DkdvSmem<D>::STATS;
    static_assert(STAGES >= 2 && STAGES <= 4, "stage_rows holds one byte per stage");
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned char* sK = smem;
    unsigned char* sV = smem + TILE;
    unsigned char* sQ = smem + 2 * TILE;     // STAGES tiles
    unsigned char* sdO = sQ + STAGES * TILE;  // STAGES tiles
    float* sStats = reinterpret_cast<float*>(sdO + STAGES * TILE);  // [stage][lse | delta][64]
    unsigned long long* bar = reinterpret_cast<unsigned long long*>(sStats + STAGES * 2 * ATT_BLOCK_M);  // per stage
    int2* sList = reinterpret_cast<int2*>(bar + STAGES);  // {code, its query tile's block size} per list entry

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const DkdvCta<D> cta(kv2q_offsets, kv_block_sizes, num_heads, num_kv_heads, q_len, kv_len, tile_volume, bh_kv0,
                         order);
    const int b = cta.b, kv_head = cta.kv_head, group = cta.group, num_q_blocks = cta.num_q_blocks;
    const int real_k = cta.real_k, slices = cta.slices, first = cta.first, steps = cta.steps;
    const size_t kv_offset = cta.kv_offset;
    // Step t's dS block is block ((p0 + e) * slices + s) * slices + c for its entry e and query
    // slice s (t = e * slices + s), chunk c of the key tile and p0 this list's first position
    // counted from the launch's first list: (p0 * slices + t) * slices + c, so consecutive
    // steps' blocks lie slices blocks apart (no division per step).
    // With the blocks in parts (part_cap > 0), this launch takes the lists whose first position
    // p0 (counted as below, before the part's offset) lies in part `part` (part_of_list).  Every
    // list lies in exactly one part, whose launch writes its dK and dV; the others' CTAs return
    // here.
    uint4* ds_step0 = nullptr;
    const int ds_step_groups = slices * DS_BLOCK_BYTES / 16;
    if (ds_blocks) {
        int p0 = first - kv2q_offsets[bh_kv0 * cta.num_kv_blocks];
        if (part_cap > 0) {  // the same in every thread
            if (part_of_list(p0, part_cap, parts) != part) return;
            p0 -= part * part_cap;
        }
        const size_t block0 = static_cast<size_t>(p0) * slices * slices + cta.chunk % slices;
        ds_step0 = reinterpret_cast<uint4*>(ds_blocks + block0 * DS_BLOCK_ELEMS) + warp * 32 + lane;
    }

    // Step t: query slice t % slices of the t / slices-th query tile that selected this key tile,
    // whose list code is (head in the group) * num_q_blocks + query tile, so that, as q_len =
    // num_q_blocks * tile_volume, the tile starts code * tile_volume rows after the group's
    // first row.  Step t sits in stage t % STAGES; stage_rows holds each stage's real query
    // rows, one byte per stage.  Steps are pushed in order: push_slice is the next one's slice.
    // The block size of a code's query tile (code % num_q_blocks; without GQA the code is the
    // tile itself, and the division is skipped).
    auto block_size_of = [&](int code) { return q_block_sizes[group == 1 ? code : code % num_q_blocks]; };
    const int entries = steps / slices;
    const bool staged = entries <= min(list_cap, LIST_CAP);  // the same in every thread
    if (staged)
        for (int i = tid; i < entries; i += ATT_THREADS) {
            const int code = kv2q_code[first + i];
            sList[i] = make_int2(code, block_size_of(code));
        }
    // Step t's {code, block size}, from the staged list when there is one (the caller makes the
    // staging visible first).
    auto entry_of = [&](int t) -> int2 {
        const int e = slices == 1 ? t : t / slices;
        if (staged) return sList[e];
        const int code = kv2q_code[first + e];
        return make_int2(code, block_size_of(code));
    };
    const int group_row0 = (b * num_heads + kv_head * group) * q_len;  // tensor-map row (the launcher checks int)
    unsigned int stage_rows = 0;
    int push_slice = 0;
    auto push = [&](int t, int code, int block_size) {
        const int stage = t % STAGES, slice = push_slice;
        push_slice = slice + 1 < slices ? slice + 1 : 0;
        const int row0 = group_row0 + code * tile_volume + slice * ATT_BLOCK_M;
        // Lane 0 of warps 0, 1 and 2 each issues a third of the copies (stats, Q, dO).  A copy's
        // bytes may land before warp 0's arrival announces them: the barrier's transaction count
        // may dip below zero, and the phase completes only once that arrival is in.
        if (lane == 0 && warp < 3) {
            unsigned long long* full = bar + stage;
            if (warp == 0) {
                mbar_expect_tx(full, 2 * TILE + STATS);
                bulk_load(sStats + stage * 2 * ATT_BLOCK_M, lse + row0, STATS / 2, full);
                bulk_load(sStats + stage * 2 * ATT_BLOCK_M + ATT_BLOCK_M, delta + row0, STATS / 2, full);
            } else {
                unsigned char* dst = (warp == 1 ? sQ : sdO) + stage * TILE;
                const TmaDesc* map = warp == 1 ? &tma_q : &tma_do;
#pragma unroll
                for (int atom = 0; atom < D / 64; ++atom)
                    tma_load_2d(dst + atom * ATOM_BYTES, map, atom * 64, row0, full);
            }
        }
        const unsigned int rows = real_rows(block_size, slice * ATT_BLOCK_M);
        stage_rows = (stage_rows & ~(0xffu << 8 * stage)) | rows << 8 * stage;
    };

    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) mbar_init(bar + s, 1);
        fence_mbar_init();
    }
    __syncthreads();  // barriers initialised, list staged
    if (steps > 0) {
        for (int t = 0; t < STAGES && t < steps; ++t) {
            const int2 e = entry_of(t);
            push(t, e.x, e.y);
        }
        load_tile_async<D>(sK, k + kv_offset, real_k, tid);  // pad key rows read as 0
        load_tile_async<D>(sV, v + kv_offset, real_k, tid);
        cp_async_commit();
    }

    // Step 0's products overwrite the accumulators rather than add to them: zeroing them here
    // would be a write on a path that meets the loop's in-flight dV and dK at its head, and
    // ptxas would then serialize every wgmma.
    float acc_k[D / 2], acc_v[D / 2];
    WgmmaProducts<T, D> products;
    const DkdvDescs<D> descs(sK, sV, sQ, sdO);
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();  // K and V visible to the tensor cores

    // Pipelined (D = 128): step t's scores are issued behind step t - 1's dV and dK, so the
    // tensor cores have work queued while the warps wait for barriers and refill; once S^T of
    // step t is done, so is step t - 1, and its stage is refilled with step t - 1 + STAGES.
    // Unpipelined (D = 64): step t waits for its own dV and dK, then refills its stage with step
    // t + STAGES.  Each stage's barrier completes one phase per load: step t waits for phase
    // (t / STAGES) & 1.
    // Pipelined, in step t: the entry of step t + STAGES - 1 (the refill), read a step early.
    int2 entry_next = make_int2(0, 0);
    for (int t = 0; t < steps; ++t) {
        const int stage = t % STAGES;
        const bool refill = t >= 1 && t - 1 + STAGES < steps;  // the same in every thread
        const int2 entry_after = t + STAGES < steps ? entry_of(t + STAGES) : make_int2(0, 0);
        const int rows = (stage_rows >> 8 * stage) & 0xff;
        unsigned char* cQ = sQ + stage * TILE;
        unsigned char* cdO = sdO + stage * TILE;
        const float* stats = sStats + stage * 2 * ATT_BLOCK_M;
        mbar_wait(bar + stage, (t / STAGES) & 1);
        // Pad query rows of q and dout (either may hold NaN) reach dK += dS^T Q and dV += P^T dO.
        // A slice past a short tile's block size (tile volume > 64, rows = 0) is computed all
        // the same (all zeros): skipping it would leave a branch around the wgmma pipeline.
        if (rows < ATT_BLOCK_M) zero_rows_from<D>(cQ, cdO, rows, tid);
        float st[32], dpt[32];  // S^T and dP^T: this warp's 16 keys x 64 query rows
        const unsigned long long stage_offset = descs.stage_step * stage;
        products.dkdv_scores(st, dpt, descs.k, descs.v, descs.q + stage_offset, descs.dout + stage_offset);
        if (vsa::DKDV_PIPELINED<D> && refill) {  // while S^T and dP^T run
            wgmma_wait<2>();  // step t - 1's dV and dK done
            __syncthreads();  // every warp is done with step t - 1's stage
            push(t - 1 + STAGES, entry_next.x, entry_next.y);
        }
        wgmma_wait<1>();  // S^T done
        uint4* ds_mine = ds_blocks ? ds_step0 + static_cast<size_t>(t) * ds_step_groups : nullptr;  // see store_ds_block
        products.dkdv_finish(acc_k, acc_v, st, dpt, descs.q_mn + stage_offset, descs.dout_mn + stage_offset, stats,
                             stats + ATT_BLOCK_M, real_k, rows, scale * LOG2E, warp, lane, t > 0, ds_mine);
        if (!vsa::DKDV_PIPELINED<D>) {
            wgmma_wait<0>();  // dV and dK done: their register operands are free for the next step
            if (t + STAGES < steps) {  // the same in every thread
                __syncthreads();  // every warp is done with step t's stage
                push(t + STAGES, entry_after.x, entry_after.y);
            }
        }
        entry_next = entry_after;
    }
    wgmma_wait<0>();
    fence_registers(acc_k);
    fence_registers(acc_v);
    if (steps == 0) {  // no query tile selected these keys
#pragma unroll
        for (int i = 0; i < D / 2; ++i) acc_k[i] = acc_v[i] = 0.f;
    }
    write_rows<T, D>(dk + kv_offset, acc_k, scale, dk_tile ? dk_tile + cta.tile_row : nullptr, real_k, warp, lane);
    write_rows<T, D>(dv + kv_offset, acc_v, 1.f, dv_tile ? dv_tile + cta.tile_row : nullptr, real_k, warp, lane);
}
