"""How fast the L2 cache serves VSA's access pattern: reads, and fp32 additions (needs CuPy, sm_90).

Block-sparse attention at the spec's main shape (12 heads x 49152 tokens, 64-token tiles, 77 of
768 tiles per query tile, D=128) moves 64 x 128 blocks between L2 and the SMs, one per
(query tile, selected key tile) pair: 12 x 768 x 77 = 709,632 pairs.  The forward and the dQ pass
read a K and a V block per pair, the dK/dV pass a Q and a dO block; a backward fused into one pass
would instead add a 64 x 128 fp32 block of dQ per pair into an accumulator.  This times that
traffic alone, without any arithmetic: 9216 CTAs (one per query tile and head) each move 77
blocks of 32 KB at pseudo-random tiles of their head's [49152, 128] fp32 buffer (25 MB: it stays
in L2), by

- bulk copies to shared memory (``cp.async.bulk``, what the TMA loads of the passes do);
- the same by clusters of two CTAs (neighbouring query tiles) kept in step, where a share of the
  steps want the same block in both (as video-like selections do): each CTA copying it, or one
  copy multicast into both CTAs;
- bulk reductions from shared memory (``cp.reduce.async.bulk .add.f32``), one or up to four in
  flight per CTA;
- ``red.global.add.v4.f32`` from registers (what the atomic-dQ experiment in BENCHMARKS.md used).

Medians of CUDA-event timings of 7 launches after a warm-up one; the reduction is checked once
against the sum it must produce.

``--load-smem-kb`` sets the copy kernels' shared memory per CTA, and so how many share an SM.

    python benchmarks/bench_l2.py [--load-smem-kb 32] [--out table.md]
"""

from __future__ import annotations

import argparse
import datetime

import numpy as np

from _common import commit, emit, median_ms

HEADS, TILES, TOPK, TILE_ROWS, D = 12, 768, 77, 64, 128
BLOCK_FLOATS = TILE_ROWS * D  # 8192 floats, 32 KB

SOURCE = r"""
// Tile of a CTA's i-th block: a hash, so that the CTAs of a head hit its tiles in no order.
__device__ __forceinline__ unsigned int tile_of(unsigned int cta, unsigned int i) {
    unsigned int x = cta * 131u + i;
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
    return x % TILES;
}
__device__ __forceinline__ unsigned int shared_address(const void* p) {
    return static_cast<unsigned int>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ float* block_of(float* buffer, unsigned int i) {
    return buffer + (static_cast<size_t>(blockIdx.x / TILES) * TILES + tile_of(blockIdx.x, i)) * BLOCK_FLOATS;
}

extern "C" __global__ void __launch_bounds__(128) bulk_load(float* buffer, int blocks, float* sink) {
    extern __shared__ __align__(128) float staged[];
    __shared__ __align__(8) unsigned long long bar;
    if (threadIdx.x == 0) {
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(&bar)));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    for (int i = 0; i < blocks; ++i) {
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(&bar)),
                     "r"(BLOCK_FLOATS * 4) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     ::"r"(shared_address(staged)), "l"(block_of(buffer, i)), "r"(BLOCK_FLOATS * 4),
                     "r"(shared_address(&bar)) : "memory");
        asm volatile("{\n .reg .pred done;\n wait: mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                     " @!done bra wait;\n}" ::"r"(shared_address(&bar)), "r"(i & 1) : "memory");
    }
    if (staged[5] == 12345.f) sink[0] = staged[7];  // keeps the copies
}

// Clusters of two CTAs (two neighbouring query tiles of one head).  At share_pct percent of the
// steps both CTAs want the same block, as neighbouring query tiles of video-like selections do:
// rank 0 copies it into both CTAs' shared memory with one multicast bulk copy (multicast = 1),
// or each CTA copies it for itself (multicast = 0).  The other steps copy a block of each CTA's
// own.  A cluster barrier per step keeps the pair in step: each CTA arms its barrier for step i
// before either issues the step's copies, so that no copy's bytes reach the partner's barrier
// while it is still waiting for step i - 1.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(128)
bulk_load_pairs(float* buffer, int blocks, float* sink, int share_pct, int multicast) {
    extern __shared__ __align__(128) float staged[];
    __shared__ __align__(8) unsigned long long bar;
    unsigned int rank;
    asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    const unsigned int pair = blockIdx.x / 2, head = blockIdx.x / TILES;
    if (threadIdx.x == 0) {
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(&bar)));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    cluster_sync();
    for (int i = 0; i < blocks; ++i) {
        const bool both = tile_of(pair + 7919u * TILES, i) % 100u < static_cast<unsigned int>(share_pct);
        const unsigned int tile = both ? tile_of(pair, i) : tile_of(blockIdx.x, i);
        const float* block = buffer + (static_cast<size_t>(head) * TILES + tile) * BLOCK_FLOATS;
        if (threadIdx.x == 0)
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(&bar)),
                         "r"(BLOCK_FLOATS * 4) : "memory");
        cluster_sync();
        if (threadIdx.x == 0) {
            if (both && multicast) {
                if (rank == 0)
                    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
                                 " [%0], [%1], %2, [%3], %4;" ::"r"(shared_address(staged)), "l"(block),
                                 "r"(BLOCK_FLOATS * 4), "r"(shared_address(&bar)), "h"(static_cast<unsigned short>(3))
                                 : "memory");
            } else {
                asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                             ::"r"(shared_address(staged)), "l"(block), "r"(BLOCK_FLOATS * 4),
                             "r"(shared_address(&bar)) : "memory");
            }
            asm volatile("{\n .reg .pred done;\n wait: mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                         " @!done bra wait;\n}" ::"r"(shared_address(&bar)), "r"(i & 1) : "memory");
        }
    }
    if (staged[5] == 12345.f) sink[0] = staged[7];  // keeps the copies
}

extern "C" __global__ void __launch_bounds__(128) bulk_reduce(float* buffer, int blocks, int in_flight) {
    extern __shared__ __align__(128) float staged[];
    for (int i = threadIdx.x; i < BLOCK_FLOATS; i += blockDim.x) staged[i] = 1e-3f * (i & 7);
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    if (threadIdx.x != 0) return;
    for (int i = 0; i < blocks; ++i) {
        asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;"
                     ::"l"(block_of(buffer, i)), "r"(shared_address(staged)), "r"(BLOCK_FLOATS * 4) : "memory");
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        if (in_flight == 1) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
        else asm volatile("cp.async.bulk.wait_group.read 3;" ::: "memory");
    }
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

extern "C" __global__ void __launch_bounds__(128) red_v4(float* buffer, int blocks) {
    const float x = 1e-3f * (threadIdx.x & 7);
    for (int i = 0; i < blocks; ++i) {
        float* block = block_of(buffer, i);
#pragma unroll 4
        for (int j = threadIdx.x * 4; j < BLOCK_FLOATS; j += blockDim.x * 4)
            asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(block + j), "f"(x), "f"(x), "f"(x),
                         "f"(x) : "memory");
    }
}
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--load-smem-kb", type=int, default=32,
                        help="dynamic shared memory per CTA of the copy kernels (fewer CTAs per SM above 32)")
    args = parser.parse_args()

    import cupy

    module = cupy.RawModule(code=SOURCE, options=("-arch=sm_90a", "-std=c++17", f"-DTILES={TILES}",
                                                  f"-DBLOCK_FLOATS={BLOCK_FLOATS}"))
    ctas, blocks = HEADS * TILES, np.int32(TOPK)
    total_bytes = ctas * TOPK * BLOCK_FLOATS * 4
    buffer = cupy.random.random((HEADS, TILES * TILE_ROWS, D), dtype=np.float32)
    sink = cupy.zeros(1, np.float32)

    def time_ms(name, kernel_args, smem):
        kernel = module.get_function(name)
        kernel.max_dynamic_shared_size_bytes = smem
        return median_ms(lambda: kernel((ctas,), (128,), kernel_args, shared_mem=smem), repeats=7, warmup=1)

    block_bytes = BLOCK_FLOATS * 4
    load_bytes = max(block_bytes, args.load_smem_kb * 1024)
    cases = [
        ("bulk copy L2 -> shared memory (cp.async.bulk)", "bulk_load", (buffer, blocks, sink), load_bytes),
        ("the same, CTAs in pairs kept in step, no block shared", "bulk_load_pairs",
         (buffer, blocks, sink, np.int32(0), np.int32(0)), load_bytes),
        *((f"the same, pairs sharing {pct}% of their blocks, each CTA copying its own", "bulk_load_pairs",
           (buffer, blocks, sink, np.int32(pct), np.int32(0)), load_bytes) for pct in (36, 72)),
        *((f"the same, pairs sharing {pct}% of their blocks, shared ones multicast", "bulk_load_pairs",
           (buffer, blocks, sink, np.int32(pct), np.int32(1)), load_bytes) for pct in (36, 72)),
        ("bulk fp32 add shared memory -> L2, one in flight", "bulk_reduce", (buffer, blocks, np.int32(1)),
         block_bytes),
        ("bulk fp32 add shared memory -> L2, four in flight", "bulk_reduce", (buffer, blocks, np.int32(4)),
         block_bytes),
        ("red.global.add.v4.f32 from registers", "red_v4", (buffer, blocks), 0),
    ]
    device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rows = []
    for what, name, kernel_args, smem in cases:
        ms = time_ms(name, kernel_args, smem)
        rows.append(f"| {what} | {ms:.3f} | {total_bytes / ms / 1e9:.2f} |")
        print(rows[-1], flush=True)

    zeros = cupy.zeros_like(buffer)  # one reduction launch must add exactly what the blocks hold
    module.get_function("bulk_reduce")((ctas,), (128,), (zeros, blocks, np.int32(1)), shared_mem=block_bytes)
    expected = ctas * TOPK * 1e-3 * sum(i & 7 for i in range(BLOCK_FLOATS))
    got = float(zeros.sum(dtype=np.float64))
    if abs(got - expected) > 1e-4 * expected:
        raise SystemExit(f"bulk reduction check failed: sum {got}, expected {expected}")

    table = "\n".join([
        f"### L2 traffic of VSA's pattern on {device}, {datetime.date.today()}, commit {commit()}",
        "",
        f"{ctas} CTAs x {TOPK} blocks of 64 x {D} fp32 (32 KB) at pseudo-random tiles of their head's "
        f"buffer: {total_bytes / 1e9:.1f} GB (bulk reduction checked: sum {got:.6g}, expected {expected:.6g})",
        "",
        "| traffic | time (ms) | TB/s |",
        "| --- | ---: | ---: |",
        *rows,
    ])
    emit(table, args.out)


if __name__ == "__main__":
    main()
