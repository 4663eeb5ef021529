// Instruction-level check of wgmma.mma_async.sp (warp_ops.cuh): one warpgroup, one m64n128 op with
// operands from global memory, so that the first GPU run tells a fragment, metadata, descriptor or
// accumulator layout mistake apart from a pipeline bug of the GEMM, and the emulator's model is
// held to the same numpy oracle (tests/test_simt_emulator.py, tests/test_kernels_cuda.py).
// Kind 0: f16, 1: bf16 (k32: 16 compressed values of 16 bits a row), 2: s8 (k64: 32 bytes a row).
//   a[64][32 bytes]  compressed A, row-major;  b[128][64 bytes]  B stored as X rows (row n = B
//   column n's K values);  c, d[64][128]  f32 (int32 for s8) accumulators in and out;
//   e[128]  each thread's metadata register (the mma.sp lane layouts, per warp).
// B goes to shared memory in the 128-byte-swizzle K-major layout the GEMM uses (row n at byte
// n * 128, chunk q at q ^ (n % 8)), in the second 64 bytes of each row when b_upper_half
// (descriptor start + 64, the GEMM's second k-step).
//   mode 0: fence, one wgmma, commit, wait, store d;
//   mode 2: two wgmma ops into the same accumulators in one group: d = c + 2 A B;
//   mode 1 (emulator only: undefined on the device): store d before the wait, then wait;
//   mode 3: as mode 0 in the SS form, A from shared memory through wgmma_desc_a64: its 64 rows in
//   the 64-byte-swizzle layout (row m's 16-byte chunk c at c ^ ((m >> 1) & 3) of 64-byte rows, the
//   32 bytes in the second half when b_upper_half, the GEMM's second k-step) after B.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "arch/portability.cuh"
#include "arch/warp_ops.cuh"

namespace sparsegemm {
namespace SG_KERNEL_NS {

constexpr int kWgmmaSelftestABase = 128 * 128;  // 128 B columns of 128 bytes: 16 swizzle atoms
constexpr int kWgmmaSelftestSmemBytes = kWgmmaSelftestABase + 64 * 64;  // then mode 3's A: 8 atoms of 512 bytes

// Kind and Mode as above; both compile-time, so that ptxas sees one straight wgmma sequence (a
// data-dependent second wgmma or a read in flight makes it inject waits and fences of its own).
template <int Kind, int Mode>
SG_GLOBAL void SG_LAUNCH_BOUNDS(128) wgmma_selftest_kernel(bool b_upper_half, const uint8_t* __restrict__ a,
                                                           const uint8_t* __restrict__ b,
                                                           const uint32_t* __restrict__ c,
                                                           const uint32_t* __restrict__ e, uint32_t* __restrict__ d) {
  SG_DYNAMIC_SMEM(char, smem);  // char, as every kernel of this namespace declares it
  const unsigned tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  for (unsigned i = tid; i < 128 * 4; i += 128) {
    const unsigned n = i / 4, chunk = i % 4 + (b_upper_half ? 4 : 0);
    for (int y = 0; y < 16; ++y) smem[n * 128 + ((chunk ^ (n % 8)) << 4) + y] = char(b[n * 64 + (i % 4) * 16 + y]);
  }
  if constexpr (Mode == 3) {
    for (unsigned i = tid; i < 64 * 2; i += 128) {
      const unsigned m = i / 2, chunk = i % 2 + (b_upper_half ? 2 : 0);
      for (int y = 0; y < 16; ++y)
        smem[kWgmmaSelftestABase + m * 64 + ((chunk ^ ((m >> 1) & 3)) << 4) + y] = char(a[m * 32 + (i % 2) * 16 + y]);
    }
  }
  // A fragment (warp_ops.cuh): register r = row 16 warp + g + 8 (r % 2), bytes 16 (r / 2) + 4t .. + 3
  // of its 32 compressed bytes (16-bit: values 8 (r / 2) + 2t, + 1; s8: 16 (r / 2) + 4t .. + 3).
  uint32_t a_regs[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const uint8_t* p = a + (16 * warp + g + 8 * (r % 2)) * 32 + 16 * (r / 2) + 4 * t;
    a_regs[r] = uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
  }
  using Acc = std::conditional_t<Kind == 2, int, float>;
  Acc acc[16][4];
  auto element = [&](int j, int r) { return (16 * warp + g + 8 * (r / 2)) * 128 + 8 * j + 2 * t + r % 2; };
#pragma unroll
  for (int j = 0; j < 16; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) std::memcpy(&acc[j][r], &c[element(j, r)], 4);
  auto store = [&] {
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) std::memcpy(&d[element(j, r)], &acc[j][r], 4);
  };
  fence_proxy_async_shared();  // B was written with ordinary stores; the tensor cores read it
  __syncthreads();
  const uint64_t desc = wgmma_desc_b128(shared_address(smem) + (b_upper_half ? 64 : 0));
  const uint64_t a_desc = wgmma_desc_a64(shared_address(smem + kWgmmaSelftestABase) + (b_upper_half ? 32 : 0));
  const uint32_t meta = e[tid];
  wgmma_fence();
  auto issue = [&](const auto& a_operand) {  // the fragment in registers, or mode 3's descriptor
    if constexpr (Kind == 0) wgmma_sp_m64n128k32<DType::f16>(acc, a_operand, desc, meta);
    if constexpr (Kind == 1) wgmma_sp_m64n128k32<DType::bf16>(acc, a_operand, desc, meta);
    if constexpr (Kind == 2) wgmma_sp_m64n128k64_s8(acc, a_operand, desc, meta);
  };
#pragma unroll
  for (int op = 0; op < (Mode == 2 ? 2 : 1); ++op) {
    if constexpr (Mode == 3) {
      issue(a_desc);
    } else {
      issue(a_regs);
    }
  }
  wgmma_commit_group();
  if constexpr (Mode == 1) store();
  wgmma_wait_group<0>();
  wgmma_fence_operands(acc);
  if constexpr (Mode != 1) store();
}

// Launches kind x mode (checked by the caller; mode 1 only in the emulator).
template <int Kind>
void launch_wgmma_selftest(int mode, bool b_upper_half, const uint8_t* a, const uint8_t* b, const uint32_t* c,
                           const uint32_t* e, uint32_t* d, sg_stream_t stream) {
  const dim3 grid(1), block(128);
  const size_t smem = kWgmmaSelftestSmemBytes;
  if (mode == 0) sg_launch(wgmma_selftest_kernel<Kind, 0>, grid, block, smem, stream, b_upper_half, a, b, c, e, d);
  if (mode == 2) sg_launch(wgmma_selftest_kernel<Kind, 2>, grid, block, smem, stream, b_upper_half, a, b, c, e, d);
  if (mode == 3) sg_launch(wgmma_selftest_kernel<Kind, 3>, grid, block, smem, stream, b_upper_half, a, b, c, e, d);
#if !defined(__CUDACC__)
  if (mode == 1) sg_launch(wgmma_selftest_kernel<Kind, 1>, grid, block, smem, stream, b_upper_half, a, b, c, e, d);
#endif
}

}  // namespace SG_KERNEL_NS
}  // namespace sparsegemm
