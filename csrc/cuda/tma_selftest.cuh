// Instruction-level check of the TMA copy and the mbarrier transaction count (warp_ops.cuh): one
// warp copies one box of a byte tensor into shared memory and stores what landed, so that the first
// GPU run tells a tensor-map, swizzle or out-of-bounds mistake apart from a pipeline bug of the
// GEMM's TMA pipelines, and the emulator's model is held to the same numpy oracle
// (tests/test_simt_emulator.py, tests/test_kernels_cuda.py).
#pragma once
#include <cstdint>

#include "arch/portability.cuh"
#include "arch/warp_ops.cuh"

namespace sparsegemm {
namespace SG_KERNEL_NS {

// Where the box lands: past the mbarrier, on a 1024-byte boundary (aligned for every swizzle).
constexpr int kTmaSelftestBoxOffset = 1024;

// One warp: thread 0 initialises the mbarrier (one arrival), every thread waits for parity 1 (which
// passes on a fresh mbarrier), then thread 0 announces the box's `bytes` and copies the box of `map`
// at (c0, c1) to shared memory at kTmaSelftestBoxOffset; out[bytes] = the shared bytes there.
//   mode 0: everyone waits for parity 0 (the copy's phase), then stores;
//   mode 1 (emulator only: undefined on the device): everyone stores with the copy in flight, then
//   (after a barrier) waits.
SG_GLOBAL void SG_LAUNCH_BOUNDS(32) tma_selftest_kernel(int mode, SG_GRID_CONSTANT const TensorMap2d map,
                                                        uint32_t bytes, int c0, int c1, uint8_t* __restrict__ out) {
  if constexpr (!kTmaCompiled) {
    trap("TMA needs sm_90");
    return;
  }
  SG_DYNAMIC_SMEM(char, smem);
  auto* bar = reinterpret_cast<uint64_t*>(smem);
  if (threadIdx.x == 0) {
    mbarrier_init(bar, 1);
    fence_mbarrier_init();
  }
  __syncthreads();
  mbarrier_wait_parity(bar, 1);
  __syncthreads();  // else a thread still on its way to that wait would find phase 0 over: parity 1 is then next
  if (threadIdx.x == 0) {
    mbarrier_arrive(bar, bytes);
    tma_load_2d(smem + kTmaSelftestBoxOffset, map, c0, c1, bar);
  }
  if (mode == 0) mbarrier_wait_parity(bar, 0);
  for (uint32_t i = threadIdx.x; i < bytes; i += 32) out[i] = static_cast<uint8_t>(smem[kTmaSelftestBoxOffset + i]);
  if (mode == 1) {
    __syncthreads();  // every thread has stored before any waits (a wait lands the copy)
    mbarrier_wait_parity(bar, 0);
  }
}

}  // namespace SG_KERNEL_NS
}  // namespace sparsegemm
