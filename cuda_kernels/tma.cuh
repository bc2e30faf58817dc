// Hopper (sm_90) bulk tensor copies (TMA) and the shared-memory barriers they complete on.
// A TmaDesc is the driver's 128-byte CUtensorMap, built on the host (cuTensorMapEncodeTiled)
// and passed by value as a __grid_constant__ kernel parameter.
#pragma once

namespace vsa {

struct alignas(64) TmaDesc {
    unsigned long long opaque[16];
};

__device__ __forceinline__ unsigned int smem_u32(const void* p) {
    return static_cast<unsigned int>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void fence_mbar_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

// One arrival that also announces `bytes` of copies still to land on the barrier.  Relaxed: the
// arrival only arms the barrier for copies and publishes nothing the thread wrote, while the
// default (release) semantics would first wait until the thread's earlier stores are performed
// (the dK/dV pass's refilling threads have just stored dS blocks; not timed on its own).
__device__ __forceinline__ void mbar_expect_tx(unsigned long long* bar, unsigned int bytes) {
    asm volatile("mbarrier.arrive.expect_tx.relaxed.cta.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
                 : "memory");
}

// Waits until the barrier's phase `phase` (0 or 1) has completed.
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned int phase) {
    unsigned int done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(smem_u32(bar)), "r"(phase)
            : "memory");
    } while (!done);
}

// Copies the box at element coordinates (x, y) of a 2-D tensor map into shared memory; the
// copy's bytes complete on `bar`.
__device__ __forceinline__ void tma_load_2d(void* dst, const TmaDesc* desc, int x, int y, unsigned long long* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
            smem_u32(dst)),
        "l"(reinterpret_cast<unsigned long long>(desc)), "r"(x), "r"(y), "r"(smem_u32(bar))
        : "memory");
}

}  // namespace vsa
