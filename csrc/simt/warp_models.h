// Host models of the warp-level instructions in cuda/arch/warp_ops.cuh. Each call is one lane's
// share of a warp collective (emulator.h): it returns once all 32 lanes issued the same
// instruction, with this lane's results. Lane layouts and checks are documented in warp_models.cpp
// and, per instruction, in warp_ops.cuh.
#pragma once
#include <cstdint>

namespace sparsegemm {
namespace emu {

enum class HalfType { f16, bf16 };

// mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.{f16,bf16}.{f16,bf16}.f32, selector 0 or 1.
void mma_sp_m16n8k32(HalfType type, int selector, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                     const float (&c)[4], uint32_t e);

// mma.sp::ordered_metadata.sync.aligned.m16n8k64.row.col.satfinite.s32.s8.s8.s32, selector 0.
void mma_sp_m16n8k64_s8(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], const int (&c)[4], uint32_t e);

// The A operand of a wgmma: this thread's fragment in registers, or (the SS form) the
// shared-memory descriptor of the warpgroup's 64 rows (K-major, 64-byte swizzle, 512-byte atoms of
// 8 rows; the same in all 128 threads), from which each thread's fragment is the bytes the register
// form would hold (warp w: rows 16w .. 16w + 15).
struct WgmmaA {
  uint32_t regs[4] = {0, 0, 0, 0};
  uint64_t desc = 0;                 // 0: A in regs
  const uint32_t* source = nullptr;  // the registers regs came from (emulator.h wgmma_issue)
  WgmmaA(const uint32_t (&a)[4]) : regs{a[0], a[1], a[2], a[3]}, source(a) {}
  WgmmaA(uint64_t a_desc) : desc(a_desc) {}
};

// wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.{f16,bf16}.{f16,bf16} with A as above and B
// in shared memory through the matrix descriptor b_desc (K-major, 128-byte swizzle: the layout
// warp_ops.cuh describes), sparsity selector 0, accumulating: d[64] += A * B. One thread's share
// of the warpgroup collective; the result lands in d at wgmma_wait (emulator.h).
// e: the thread's metadata register, which must keep its value until the op retires (as a's).
void wgmma_sp_m64n128k32(HalfType type, float* d, const WgmmaA& a, uint64_t b_desc, const uint32_t& e);

// wgmma.mma_async.sp.sync.aligned.m64n128k64.s32.s8.s8.satfinite, otherwise as above.
void wgmma_sp_m64n128k64_s8(int* d, const WgmmaA& a, uint64_t b_desc, const uint32_t& e);

// ldmatrix.sync.aligned.m8n8.x{matrices}{.trans}.shared.b16; regs[0 .. matrices-1] are written.
void ldmatrix(int matrices, bool trans, uint32_t* regs, const void* row_address);

// shfl.sync with PTX operands: b = source lane / delta / xor mask, c = clamp and segment mask
// ((32 - width) << 8 | clamp), membermask = mask. Only full-warp masks are modelled.
enum class ShuffleMode { idx, up, down, bfly };
uint32_t shfl(ShuffleMode mode, uint32_t mask, uint32_t value, int b, int c);

// bar.warp.sync (__syncwarp; full-warp masks only).
void syncwarp(uint32_t mask);

// vote.sync.ballot.b32 (full-warp masks only).
uint32_t ballot(uint32_t mask, bool predicate);

}  // namespace emu
}  // namespace sparsegemm
