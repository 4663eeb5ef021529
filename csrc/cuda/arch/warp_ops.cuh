// Warp-level tensor-core and memory instructions behind one C++ signature each: inline PTX under
// nvcc, the SIMT emulator's models (simt/warp_models.h) on the host. Layout facts are quoted from
// /work/shared/PTX_SPARSE.md; notation: lane L, g = L / 4 ("groupID"), t = L % 4.
//
// Confirmations against the PTX ISA (text read through the docs search; figures are images, so
// the lane tables come from the sources named in PTX_SPARSE_REFERENCE.md):
// - mma.sp selector range: 0..1 for m16n8k32 f16/bf16, 0 only for m16n8k64 s8; the selector
//   must be an immediate (LLVM NVPTX sp_selector_gen and IntrinsicsNVVM num_threads, PR #154984;
//   MLIR D146110 "expects the sparsity selector as a direct literal").
// - ::ordered_metadata: indices of a group in increasing order from the LSB, otherwise undefined
//   (PTX ISA 9.7.14.6, summarised in PTX_SPARSE_REFERENCE.md 1.4); needs PTX ISA 8.5 (CUDA 12.5).
// - ldmatrix: .sync.aligned - every lane of the warp executes the same ldmatrix; undefined if a
//   lane exited (PTX ISA 9.7.14.5.15 text as mirrored in ptx-90-parser docs).
// - cp.async: src-size smaller than cp-size zero-fills the rest of the destination, so src-size 0
//   writes 16 zero bytes without reading the source; .cg requires cp-size 16 (PTX ISA 9.7.9.25
//   text mirrored in ptx-90-parser docs; NVIDIA forum thread 349443).
#pragma once
#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda/arch/portability.cuh"
#include "format.h"

#if defined(__CUDACC__)
#if (__CUDACC_VER_MAJOR__ < 12) || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ < 5)
#error "mma.sp::ordered_metadata needs PTX ISA 8.5: CUDA 12.5 or newer"
#endif
#include <cuda.h>  // CUtensorMap, a type only: the driver's encoder is looked up at run time (kernels_dispatch.cuh)
#else
#include "simt/warp_models.h"
#endif

namespace sparsegemm {

// Lane of the calling thread in its warp (PTX %laneid).
SG_DEVICE unsigned lane_id() {
#if defined(__CUDACC__)
  unsigned lane;
  asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
  return lane;
#else
  return emu::lane_id();
#endif
}

// ---- mma.sp, m16n8k32, f16/bf16 -> f32 ---------------------------------------------------------
// PTX ISA 9.7.14.6 "Warp-level matrix multiply-accumulate with sparse matrix A", fragments
// "Matrix fragments for mma.sp m16n8k32" (PTX_SPARSE.md "Fragments of mma.sp m16n8k32"):
//   a[r]: compressed A (16 x 16 kept values of a 16 x 32 tile), halves at row g + 8 (r % 2),
//         kept columns 8 (r / 2) + 2t + {0, 1} (lo, hi);
//   b[j]: B[k = 8j + 2t + {0, 1}][n = g] (B is 32 x 8, "col": stored as X rows, K contiguous);
//   c, d: row g (c0, c1) and g + 8 (c2, c3), columns 2t + {0, 1};
//   e:    read from lanes 4g + 2 Selector (K 0..15) and 4g + 2 Selector + 1 (K 16..31) only;
//         bits [15:0] row g, bits [31:16] row g + 8, nibble n = group n of that 16-wide K range,
//         i0 in bits [1:0] < i1 in bits [3:2]. Other lanes' e is ignored.
// Selector (0 or 1, an immediate) picks the metadata lane pair of each quad.
template <int Selector>
SG_DEVICE void mma_sp_m16n8k32_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                   const float (&c)[4], uint32_t e) {
  static_assert(Selector == 0 || Selector == 1, "m16n8k32 f16 takes sparsity selector 0 or 1");
#if defined(__CUDACC__)
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%12, %13, %14, %15}, %16, %17;\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "f"(c[0]),
        "f"(c[1]), "f"(c[2]), "f"(c[3]), "r"(e), "n"(Selector));
#else
  emu::mma_sp_m16n8k32(emu::HalfType::f16, Selector, d, a, b, c, e);
#endif
}

SG_DEVICE void mma_sp_m16n8k32_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                   const float (&c)[4], uint32_t e) {
  mma_sp_m16n8k32_f16<0>(d, a, b, c, e);
}

// Same instruction and layouts with bf16 inputs (.f32.bf16.bf16.f32).
template <int Selector>
SG_DEVICE void mma_sp_m16n8k32_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                    const float (&c)[4], uint32_t e) {
  static_assert(Selector == 0 || Selector == 1, "m16n8k32 bf16 takes sparsity selector 0 or 1");
#if defined(__CUDACC__)
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%12, %13, %14, %15}, %16, %17;\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "f"(c[0]),
        "f"(c[1]), "f"(c[2]), "f"(c[3]), "r"(e), "n"(Selector));
#else
  emu::mma_sp_m16n8k32(emu::HalfType::bf16, Selector, d, a, b, c, e);
#endif
}

SG_DEVICE void mma_sp_m16n8k32_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                    const float (&c)[4], uint32_t e) {
  mma_sp_m16n8k32_bf16<0>(d, a, b, c, e);
}

// ---- mma.sp, m16n8k64, s8 -> s32 (saturating) --------------------------------------------------
// PTX ISA 9.7.14.6, fragments for m16n8k64 .u8/.s8 (PTX_SPARSE.md "Fragments of mma.sp m16n8k64"):
//   a[r]: bytes = compressed A (16 x 32) row g + 8 (r % 2), kept columns 16 (r / 2) + 4t + {0..3};
//   b[j]: bytes = B[k = 16j + 4t + {0..3}][n = g] (B is 64 x 8, K contiguous);
//   c, d: s32, as the f32 layout above; .satfinite clamps to [INT32_MIN, INT32_MAX];
//   e:    every lane: lane 4g + 0 row g K 0..31, 4g + 1 row g + 8 K 0..31, 4g + 2 row g K 32..63,
//         4g + 3 row g + 8 K 32..63; nibble n = group n of those 32 K (NOT the 16-bit layout).
// Sparsity selector 0 only (ptxas rejects 1 for this shape).
SG_DEVICE void mma_sp_m16n8k64_s8(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], const int (&c)[4],
                                  uint32_t e) {
#if defined(__CUDACC__)
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k64.row.col.satfinite.s32.s8.s8.s32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%12, %13, %14, %15}, %16, 0x0;\n"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(c[0]),
        "r"(c[1]), "r"(c[2]), "r"(c[3]), "r"(e));
#else
  emu::mma_sp_m16n8k64_s8(d, a, b, c, e);
#endif
}

// ---- shared-memory addresses, trap -------------------------------------------------------------
// The shared-state-space address of a pointer into shared memory (cvta.to.shared): what the
// tensor cores' matrix descriptors hold. The emulator's dynamic shared memory starts at 0.
SG_DEVICE uint32_t shared_address(const void* smem_pointer) {
#if defined(__CUDACC__)
  return static_cast<uint32_t>(__cvta_generic_to_shared(smem_pointer));
#else
  return emu::shared_window_address(smem_pointer);
#endif
}

// Ends the kernel with an error (the launch fails with "unspecified launch failure"; in the
// emulator, a std::runtime_error): for states that would otherwise give silently wrong results.
SG_DEVICE void trap(const char* why) {
#if defined(__CUDACC__)
  (void)why;
  __trap();
#else
  emu::fail(std::string("trap: ") + why);
#endif
}

// ---- wgmma.mma_async.sp (sm_90a) -----------------------------------------------------------------
// PTX ISA 9.7.15.6 "Asynchronous warpgroup level matrix multiply-accumulate with sparse matrix A"
// (facts and sources: PTX_SPARSE_REFERENCE.md 7.1; CUTLASS cute/arch/mma_sm90_gmma_sparse.hpp
// GMMA_64x128x32_F32F16F16_RS and cute/atom/mma_traits_sm90_gmma{,_sparse}.hpp layouts, which a
// helper evaluated for all 128 threads). A warpgroup = 4 consecutive warps from a warp index
// divisible by 4; all 128 threads issue the same instruction. For warp w = warp % 4 of it:
//   a[r]: the m16n8k32 (16-bit) / m16n8k64 (s8) A fragment of A rows 16w .. 16w + 15, as mma.sp;
//   e:    the metadata word of those rows in the mma.sp lane layout, selector 0 (16-bit: lanes
//         4g + {0, 1}; s8: every lane). wgmma has no ::ordered_metadata form (ptxas rejects it);
//         the kernels' metadata keeps i0 < i1 anyway, which the emulator checks.
//   B:    K x N through the shared-memory descriptor b_desc (wgmma_desc_b128), "non-transposed"
//         = K-major: each of the N columns 64 contiguous bytes of K (32 f16 / 64 s8 values);
//   d[j][r]: row 16w + g + 8 (r / 2), column 8j + 2t + (r % 2) (mma's C layout per 8 columns;
//         CUTLASS CLayout_64xN).
// scale-d is the literal 1 (d += A * B: the kernels zero their accumulators first), imm-scale-a/b
// 1, imm-trans-b 0. The instruction runs asynchronously: wgmma_fence() before it, once the
// registers it reads are written (A fragment, metadata, accumulators); its results exist only
// after wgmma_commit_group() and wgmma_wait_group<N>(), then wgmma_fence_operands() keeps the
// compiler from reading the accumulators before that wait. ptxas (nvcc 13.0) assembles these
// forms for sm_90a into HGMMA.SP.64x128x32.F32[.BF16] / IGMMA.SP.64x128x64.S8.S8.SAT.
// Only sm_90a has them (__CUDA_ARCH_FEAT_SM90_ALL); other device passes compile a trap, which
// the dispatch never reaches (kernels_dispatch.cuh wgmma_tile_runs).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SG_WGMMA_ASM 1
#endif
// TMA, mbarrier transaction counts and the async-proxy fence: every sm_90 and newer device pass.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define SG_TMA_ASM 1
#endif

// Whether this compilation has wgmma: the sm_90a device pass and the emulator. A wgmma kernel
// instantiated in any other device pass reduces to a trap (gemm_sp.cuh).
#if defined(SG_WGMMA_ASM) || !defined(__CUDACC__)
constexpr bool kWgmmaCompiled = true;
#else
constexpr bool kWgmmaCompiled = false;
#endif

#define SG_WGMMA_D_REGS "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define SG_WGMMA_D4(c, d, j) c(d[j][0]), c(d[j][1]), c(d[j][2]), c(d[j][3])
#define SG_WGMMA_D64(c, d)                                                                                    \
  SG_WGMMA_D4(c, d, 0), SG_WGMMA_D4(c, d, 1), SG_WGMMA_D4(c, d, 2), SG_WGMMA_D4(c, d, 3), SG_WGMMA_D4(c, d, 4), \
      SG_WGMMA_D4(c, d, 5), SG_WGMMA_D4(c, d, 6), SG_WGMMA_D4(c, d, 7), SG_WGMMA_D4(c, d, 8),                   \
      SG_WGMMA_D4(c, d, 9), SG_WGMMA_D4(c, d, 10), SG_WGMMA_D4(c, d, 11), SG_WGMMA_D4(c, d, 12),                \
      SG_WGMMA_D4(c, d, 13), SG_WGMMA_D4(c, d, 14), SG_WGMMA_D4(c, d, 15)

// Matrix descriptor of a K-major B tile with the 128-byte swizzle (PTX ISA "Matrix Descriptor
// Format"; CUTLASS GmmaDescriptor): start address >> 4 in bits 0-13; leading byte offset 1 (the
// PTX value for swizzled K-major layouts, where it is unused); stride byte offset 1024 >> 4 in
// bits 32-45 (8 rows of 128 bytes to the next 8); base offset 0 (bits 49-51: the tile starts a
// 1024-byte atom); swizzle mode 1 = 128-byte in bits 62-63. The swizzle XORs address bits [4, 7)
// with bits [7, 10) of the address the hardware forms, so chunk c of row n sits at c ^ (n % 8)
// (gemm_sp.cuh's B layout), and a k-step inside the 128-byte rows is the start address + 64.
SG_HOST_DEVICE uint64_t wgmma_desc_b128(uint32_t start_address) {
  return uint64_t((start_address & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}

// Matrix descriptor of a K-major sparse A tile with the 64-byte swizzle (the SS form of
// wgmma.mma_async.sp): 64-byte rows of compressed values (two k-steps of 32 bytes), 8-row atoms of
// 512 bytes (stride byte offset 512 >> 4), leading byte offset 1 (unused when swizzled), base
// offset 0, swizzle mode 2 = 64-byte in bits 62-63. The swizzle XORs address bits [4, 6) with
// bits [7, 9): chunk c of row r at c ^ ((r >> 1) & 3) (gemm_sp.cuh's A layout); k-step 1 is the
// start address + 32.
SG_HOST_DEVICE uint64_t wgmma_desc_a64(uint32_t start_address) {
  return uint64_t((start_address & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(512 >> 4) << 32) |
         (uint64_t(2) << 62);
}

SG_DEVICE void wgmma_fence() {
#if defined(SG_WGMMA_ASM)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#elif defined(__CUDACC__)
  trap("wgmma needs sm_90a");
#else
  emu::wgmma_fence();
#endif
}

SG_DEVICE void wgmma_commit_group() {
#if defined(SG_WGMMA_ASM)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#elif !defined(__CUDACC__)
  emu::wgmma_commit();
#endif
}

template <int Pending>
SG_DEVICE void wgmma_wait_group() {
  static_assert(Pending >= 0, "wgmma.wait_group takes a non-negative immediate");
#if defined(SG_WGMMA_ASM)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
#elif !defined(__CUDACC__)
  emu::wgmma_wait(Pending);
#endif
}

// An empty asm that "redefines" every accumulator: orders later reads after wgmma_wait_group
// (CUTLASS warpgroup_fence_operand); nothing on the host.
template <typename Acc>
SG_DEVICE void wgmma_fence_operands(Acc (&d)[16][4]) {
#if defined(SG_WGMMA_ASM)
#pragma unroll
  for (int j = 0; j < 16; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      if constexpr (std::is_floating_point<Acc>::value) {
        asm volatile("" : "+f"(d[j][r])::"memory");
      } else {
        asm volatile("" : "+r"(d[j][r])::"memory");
      }
    }
#else
  (void)d;
#endif
}

// fence.proxy.async.shared::cta: orders this thread's earlier shared-memory accesses (stores,
// landed cp.async copies; reads, as synchronisation handed them on) before later accesses by the
// async proxy (wgmma's B operand, TMA writes), once a barrier or an atomic hands them on. PTX ISA
// 9.7.15.4 asks for it; CUTLASS's cp.async wgmma mainloops omit it, XLA emits it. The emulator
// tracks it for cp.async writes and st_shared_16 stores (emulator.h wgmma_read_shared).
SG_DEVICE void fence_proxy_async_shared() {
#if defined(SG_TMA_ASM)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#elif !defined(__CUDACC__)
  emu::fence_proxy_async();
#endif
}

// wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.{f16,bf16}.{f16,bf16}; kDType: DType::f16 or
// DType::bf16. A is either this warp's fragment in registers (WgmmaA = uint32_t[4], see above) or,
// the SS form, the warpgroup's 64 rows of compressed values in shared memory through the
// descriptor a (WgmmaA = uint64_t, wgmma_desc_a64; imm-trans-a 0). In the SS form no register a
// wgmma reads but the metadata word e, which the hardware reads while the op is in flight, as A
// fragments: neither may be written before the wgmma.wait_group that retires the op (gemm_sp.cuh).
// References, so that the emulator checks the caller's registers when the op retires.
#define SG_WGMMA_SP_K32(type, d, a, b_desc, e)                                                      \
  asm volatile("wgmma.mma_async.sp.sync.aligned.m64n128k32.f32." type "." type " " SG_WGMMA_D_REGS \
               ", {%64, %65, %66, %67}, %68, %69, 0, 1, 1, 1, 0;\n"                                \
               : SG_WGMMA_D64("+f", d)                                                              \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(e))
#define SG_WGMMA_SP_SS_K32(type, d, a_desc, b_desc, e)                                              \
  asm volatile("wgmma.mma_async.sp.sync.aligned.m64n128k32.f32." type "." type " " SG_WGMMA_D_REGS \
               ", %64, %65, %66, 0, 1, 1, 1, 0, 0;\n"                                              \
               : SG_WGMMA_D64("+f", d)                                                              \
               : "l"(a_desc), "l"(b_desc), "r"(e))
template <DType kDType, typename WgmmaA>
SG_DEVICE void wgmma_sp_m64n128k32(float (&d)[16][4], const WgmmaA& a, uint64_t b_desc, const uint32_t& e) {
  static_assert(kDType == DType::f16 || kDType == DType::bf16, "wgmma k32 takes f16 or bf16");
#if defined(SG_WGMMA_ASM)
  constexpr bool kSs = std::is_same<WgmmaA, uint64_t>::value;
  if constexpr (kSs && kDType == DType::bf16) {
    SG_WGMMA_SP_SS_K32("bf16", d, a, b_desc, e);
  } else if constexpr (kSs) {
    SG_WGMMA_SP_SS_K32("f16", d, a, b_desc, e);
  } else if constexpr (kDType == DType::bf16) {
    SG_WGMMA_SP_K32("bf16", d, a, b_desc, e);
  } else {
    SG_WGMMA_SP_K32("f16", d, a, b_desc, e);
  }
#elif defined(__CUDACC__)
  trap("wgmma needs sm_90a");
#else
  emu::wgmma_sp_m64n128k32(kDType == DType::bf16 ? emu::HalfType::bf16 : emu::HalfType::f16, &d[0][0],
                           emu::WgmmaA(a), b_desc, e);
#endif
}
#undef SG_WGMMA_SP_K32
#undef SG_WGMMA_SP_SS_K32

// wgmma.mma_async.sp.sync.aligned.m64n128k64.satfinite.s32.s8.s8, A in registers or through a
// descriptor as above, with the m16n8k64 A and metadata layouts; s32 accumulators clamped like
// mma.sp's .satfinite. s8 takes no scale or transpose immediates (B must be K-major).
template <typename WgmmaA>
SG_DEVICE void wgmma_sp_m64n128k64_s8(int (&d)[16][4], const WgmmaA& a, uint64_t b_desc, const uint32_t& e) {
#if defined(SG_WGMMA_ASM)
  if constexpr (std::is_same<WgmmaA, uint64_t>::value) {
    asm volatile("wgmma.mma_async.sp.sync.aligned.m64n128k64.satfinite.s32.s8.s8 " SG_WGMMA_D_REGS
                 ", %64, %65, %66, 0, 1;\n"
                 : SG_WGMMA_D64("+r", d)
                 : "l"(a), "l"(b_desc), "r"(e));
  } else {
    asm volatile("wgmma.mma_async.sp.sync.aligned.m64n128k64.satfinite.s32.s8.s8 " SG_WGMMA_D_REGS
                 ", {%64, %65, %66, %67}, %68, %69, 0, 1;\n"
                 : SG_WGMMA_D64("+r", d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(e));
  }
#elif defined(__CUDACC__)
  trap("wgmma needs sm_90a");
#else
  emu::wgmma_sp_m64n128k64_s8(&d[0][0], emu::WgmmaA(a), b_desc, e);
#endif
}

// ---- ldmatrix ----------------------------------------------------------------------------------
// PTX ISA 9.7.14.5.15 ldmatrix.sync.aligned.m8n8{.x1,.x2,.x4}{.trans}.shared.b16
// (PTX_SPARSE.md "ldmatrix"): lanes 8i .. 8i + 7 give the row addresses of matrix i (16 bytes,
// 16-byte aligned, in shared memory; .x1 reads lanes 0..7, .x2 lanes 0..15, the rest are ignored).
// r[i] of lane L = matrix i, row g, elements 2t (lo) and 2t + 1 (hi); with .trans, elements
// (row 2t, col g) (lo) and (row 2t + 1, col g) (hi).
SG_DEVICE void ldmatrix_x1(uint32_t (&r)[1], const void* smem_row_address) {
#if defined(__CUDACC__)
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem_row_address));
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(address) : "memory");
#else
  emu::ldmatrix(1, false, r, smem_row_address);
#endif
}

SG_DEVICE void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row_address) {
#if defined(__CUDACC__)
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem_row_address));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(address)
               : "memory");
#else
  emu::ldmatrix(2, false, r, smem_row_address);
#endif
}

SG_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row_address) {
#if defined(__CUDACC__)
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem_row_address));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
#else
  emu::ldmatrix(4, false, r, smem_row_address);
#endif
}

SG_DEVICE void ldmatrix_x1_trans(uint32_t (&r)[1], const void* smem_row_address) {
#if defined(__CUDACC__)
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem_row_address));
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(address) : "memory");
#else
  emu::ldmatrix(1, true, r, smem_row_address);
#endif
}

SG_DEVICE void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row_address) {
#if defined(__CUDACC__)
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem_row_address));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(address)
               : "memory");
#else
  emu::ldmatrix(2, true, r, smem_row_address);
#endif
}

SG_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row_address) {
#if defined(__CUDACC__)
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem_row_address));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
#else
  emu::ldmatrix(4, true, r, smem_row_address);
#endif
}

// ---- 16-byte shared-memory store ---------------------------------------------------------------
// A plain store of one 16-byte pack (st.shared.v4.b32) into 16-byte aligned shared memory: the
// loaders' element path and zero fill. It is a generic-proxy write, so a wgmma reading it through
// a descriptor needs this thread's fence.proxy.async first (fence_proxy_async_shared), as for
// cp.async data; the emulator checks that (emulator.h st_shared_16).
template <typename Pack>
SG_DEVICE void st_shared_16(void* smem_dst, const Pack& pack) {
  static_assert(sizeof(Pack) == 16, "st_shared_16 stores one 16-byte pack");
#if defined(__CUDACC__)
  *reinterpret_cast<Pack*>(smem_dst) = pack;
#else
  emu::st_shared_16(smem_dst, &pack);
#endif
}

// ---- cp.async (sm_80) --------------------------------------------------------------------------
// PTX ISA 9.7.9.25 cp.async: 16 bytes global -> shared, L1 bypassed (.cg; cp-size must be 16),
// both addresses 16-byte aligned. pred == false passes src-size 0: the 16 destination bytes
// are zero-filled and the source is not read (so a tail tile may point past the tensor).
// The emulator defers the shared-memory write until the group is waited for (emulator.h).
SG_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src, bool pred) {
#if defined(__CUDACC__)
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(pred ? 16 : 0)
               : "memory");
#else
  emu::cp_async_16(smem_dst, gmem_src, pred);
#endif
}

// cp.async.commit_group: closes the group of this thread's cp.async issued since the last commit.
SG_DEVICE void cp_async_commit() {
#if defined(__CUDACC__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
  emu::cp_async_commit();
#endif
}

// cp.async.wait_group Pending: returns once at most the newest `Pending` committed groups of
// this thread are still in flight. Other threads' copies need a __syncthreads after it.
template <int Pending>
SG_DEVICE void cp_async_wait() {
  static_assert(Pending >= 0, "cp.async.wait_group takes a non-negative immediate");
#if defined(__CUDACC__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
#else
  emu::cp_async_wait(Pending);
#endif
}

// cp.async.wait_all = commit_group + wait_group 0: every copy of this thread has landed.
SG_DEVICE void cp_async_wait_all() {
#if defined(__CUDACC__)
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#else
  emu::cp_async_commit();
  emu::cp_async_wait(0);
#endif
}

// ---- griddepcontrol (sm_90), prefetch.global.L2 -------------------------------------------------
// PTX griddepcontrol (sm_90): in a grid launched with programmatic stream serialization
// (sg_launch_dependent), .wait blocks until the prerequisite grid has completed and its writes
// are visible; .launch_dependents lets the grid launched after this one start once every block
// of this grid has issued it (or exited), and says nothing about this grid's writes (NVIDIA's
// cuda.tile grid_dependency_control_wait / _launch_dependents docs state both). Both are no-ops in a grid launched
// without the attribute. Before sm_90 there is no such launch, so neither is emitted there; the
// emulator records the wait (emulator.h) and has nothing to launch early.
SG_DEVICE void grid_dependency_wait() {
#if defined(__CUDACC__)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
#else
  emu::grid_dependency_wait();
#endif
}

SG_DEVICE void launch_dependent_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// PTX prefetch.global.L2: brings the line holding `address` into L2; a hint with no
// effect on any value read later (L2 is the point of coherence: a write that lands after the
// prefetch updates the same line). Emitted for sm_90, where it runs before grid_dependency_wait
// and overlaps the previous kernel; elsewhere the pipeline's first copies follow at once and it
// would only add instructions. The emulator checks the address as it checks a cp.async source.
SG_DEVICE void prefetch_l2(const void* address) {
#if defined(__CUDACC__)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(address));
#endif
#else
  emu::prefetch_l2(address);
#endif
}

// ---- mbarrier and TMA (sm_90) -------------------------------------------------------------------
// PTX ISA "mbarrier" and "cp.async.bulk.tensor" (PTX ISA 8.0, sm_90; the instruction forms as
// CCCL's cuda::ptx docs list them and CUTLASS's cute/arch/copy_sm90_tma.hpp SM90_TMA_LOAD_2D and
// cutlass/arch/barrier.h emit them; the swizzle and out-of-bounds rules: cuda.h's
// cuTensorMapEncodeTiled documentation, the bit-level swizzle as emulator.h states it). The
// tensor map is the driver's opaque 128-byte CUtensorMap on the device (made on the host by
// cuTensorMapEncodeTiled, passed as a __grid_constant__ kernel parameter so that its address is
// the parameter's), the emulator's TensorMap2d on the host (emulator.h, which also gives the
// swizzle and out-of-bounds rules). Only sm_90 and newer device passes emit these; the others
// compile a trap, which the dispatch never reaches (the TMA pipelines run where the wgmma tile runs).
#if defined(__CUDACC__)
using TensorMap2d = CUtensorMap;
#else
using TensorMap2d = emu::TensorMap2d;
#endif
// Whether this compilation has TMA and mbarrier transactions: sm_90 and newer device passes and the
// emulator. A TMA pipeline instantiated in any other device pass reduces to a trap (gemm_sp.cuh).
#if defined(SG_TMA_ASM) || !defined(__CUDACC__)
constexpr bool kTmaCompiled = true;
#else
constexpr bool kTmaCompiled = false;
#endif

// mbarrier.init.shared::cta.b64: `arrivals` arrivals complete a phase (with no transactions due).
SG_DEVICE void mbarrier_init(uint64_t* bar, unsigned arrivals) {
#if defined(SG_TMA_ASM)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(bar)), "r"(arrivals) : "memory");
#elif defined(__CUDACC__)
  trap("mbarrier transactions need sm_90");
#else
  emu::mbarrier_init(bar, arrivals);
#endif
}

// fence.mbarrier_init.release.cluster: this thread's mbarrier inits become visible to the async
// proxy (TMA's complete_tx); a __syncthreads after it publishes them to the block.
SG_DEVICE void fence_mbarrier_init() {
#if defined(SG_TMA_ASM)
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// mbarrier.arrive.expect_tx (tx_bytes > 0: that many TMA bytes are due in this phase) or plain
// mbarrier.arrive (tx_bytes == 0), release semantics at CTA scope: this thread's earlier reads of
// the stage are done before a thread that sees the phase complete overwrites it.
SG_DEVICE void mbarrier_arrive(uint64_t* bar, uint32_t tx_bytes) {
#if defined(SG_TMA_ASM)
  if (tx_bytes > 0) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(shared_address(bar)), "r"(tx_bytes)
                 : "memory");
  } else {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(shared_address(bar)) : "memory");
  }
#elif defined(__CUDACC__)
  trap("mbarrier transactions need sm_90");
#else
  emu::mbarrier_arrive(bar, tx_bytes);
#endif
}

// Waits (acquire, CTA scope) until the phase of parity `parity` of `bar` has completed: a loop of
// mbarrier.try_wait.parity, which suspends the thread for a system-dependent time per try. After
// it the TMA bytes that completed the phase are visible to this thread.
SG_DEVICE void mbarrier_wait_parity(uint64_t* bar, unsigned parity) {
#if defined(SG_TMA_ASM)
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(shared_address(bar)),
      "r"(parity)
      : "memory");
#elif defined(__CUDACC__)
  trap("mbarrier transactions need sm_90");
#else
  emu::mbarrier_wait_parity(bar, parity);
#endif
}

// cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes: the box of
// `map` whose first element is (c0: contiguous dimension, c1: row) to shared `smem_dst`, with the
// map's swizzle; out-of-bounds elements are zeros; its bytes count against `bar`'s transactions.
// One thread issues it (the bytes are announced by that thread's mbarrier_arrive first).
SG_DEVICE void tma_load_2d(void* smem_dst, const TensorMap2d& map, int32_t c0, int32_t c1, uint64_t* bar) {
#if defined(SG_TMA_ASM)
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(shared_address(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(&map)), "r"(c0), "r"(c1), "r"(shared_address(bar))
      : "memory");
#elif defined(__CUDACC__)
  trap("TMA needs sm_90");
#else
  emu::bulk_tensor_load_2d(smem_dst, map, c0, c1, bar);
#endif
}

// prefetch.tensormap: brings the tensor map (a kernel parameter) into the TMA unit's descriptor
// cache ahead of its first copy, as CUTLASS's kernels do; nothing in the emulator.
SG_DEVICE void tma_prefetch_descriptor(const TensorMap2d& map) {
#if defined(SG_TMA_ASM)
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&map)) : "memory");
#else
  (void)map;
#endif
}

// cp.async.bulk.prefetch.tensor.2d.L2.global.tile: the box at (c0, c1) into L2, a hint like
// prefetch_l2 (no value read later can be stale); the emulator checks its source as tma_load_2d's.
SG_DEVICE void tma_prefetch_l2_2d(const TensorMap2d& map, int32_t c0, int32_t c1) {
#if defined(SG_TMA_ASM)
  asm volatile("cp.async.bulk.prefetch.tensor.2d.L2.global.tile [%0, {%1, %2}];\n" ::"l"(
                   reinterpret_cast<uint64_t>(&map)), "r"(c0), "r"(c1)
               : "memory");
#elif !defined(__CUDACC__)
  emu::bulk_tensor_prefetch_2d(map, c0, c1);
#endif
}

// ---- ld.global.cg ------------------------------------------------------------------------------
// A global load cached in L2 only (PTX ISA ld .cg; CUDA's __ldcg): for data that other blocks of
// the same launch wrote, which this SM's L1 (not coherent across SMs) might hold a stale copy of.
// The emulator runs blocks one after another, so a plain load is the same there.
template <typename T>
SG_DEVICE T load_global_cg(const T* address) {
#if defined(__CUDACC__)
  return __ldcg(address);
#else
  emu::check_dependency_waited("ld.global.cg");
  return *address;
#endif
}

// ---- ld.relaxed.gpu / st.relaxed.gpu (64-bit) -------------------------------------------------
// A load and a store of a word other blocks update with atomics at the same time (PTX ISA ld / st
// .relaxed .gpu): morally strong, so the memory model gives them a value rather than a data race;
// neither orders anything else. The emulator runs blocks one after another: a plain store, and a
// load that returns an older value of the word when asked to (emulator.h relaxed_load_u64).
SG_DEVICE uint64_t load_relaxed_gpu(const uint64_t* address) {
#if defined(__CUDACC__)
  uint64_t value;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];\n" : "=l"(value) : "l"(address) : "memory");
  return value;
#else
  return emu::relaxed_load_u64(address);
#endif
}

SG_DEVICE void store_relaxed_gpu(uint64_t* address, uint64_t value) {
#if defined(__CUDACC__)
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;\n" ::"l"(address), "l"(value) : "memory");
#else
  emu::check_dependency_waited("st.relaxed.gpu");
  *address = value;
#endif
}

// ---- atom.add / atom.cas .acq_rel.gpu (64-bit) ------------------------------------------------
// Atomic add and compare-and-swap on a 64-bit global word, acquire-release at GPU scope (PTX ISA
// atom .acq_rel .gpu .b64 / .u64, sm_70+). The release half publishes every write that happens
// before it, the writes of the whole block when a bar.sync comes first (PTX memory model:
// causality order runs through the barrier); the acquire half makes the writes released by earlier
// read-modify-writes of the same word visible here and, after the next bar.sync, to the block. One
// thread of the block fences instead of all of them (CUTLASS's split-K semaphores in
// cutlass/barrier.h use the same arrive / wait pattern). The emulator runs blocks one after
// another, so plain read-modify-writes are the same there.
SG_DEVICE uint64_t atomic_add_acq_rel_gpu(uint64_t* address, uint64_t value) {
#if defined(__CUDACC__)
  uint64_t previous;
  asm volatile("atom.acq_rel.gpu.global.add.u64 %0, [%1], %2;\n"
               : "=l"(previous)
               : "l"(address), "l"(value)
               : "memory");
  return previous;
#else
  return atomicAdd(address, value);
#endif
}

// Writes `value` where the word holds `expected`; returns what it held.
SG_DEVICE uint64_t atomic_cas_acq_rel_gpu(uint64_t* address, uint64_t expected, uint64_t value) {
#if defined(__CUDACC__)
  uint64_t previous;
  asm volatile("atom.acq_rel.gpu.global.cas.b64 %0, [%1], %2, %3;\n"
               : "=l"(previous)
               : "l"(address), "l"(expected), "l"(value)
               : "memory");
  return previous;
#else
  return atomicCAS(address, expected, value);
#endif
}

// ---- atom.shared.add.acq_rel.cta --------------------------------------------------------------
// Atomic add on shared memory, acquire-release at CTA scope (PTX ISA atom .acq_rel .cta .shared::cta,
// sm_70+): the release half orders the calling thread's earlier accesses (a __syncwarp before it
// brings in its warp's) before the add, the acquire half makes those released by earlier adds to the
// same address happen before what follows. The emulator's fibers switch only at synchronisation
// points, so a plain add is the same there.
SG_DEVICE int atomic_add_acq_rel_cta_shared(int* address, int value) {
#if defined(__CUDACC__)
  int previous;
  asm volatile("atom.acq_rel.cta.shared::cta.add.u32 %0, [%1], %2;\n"
               : "=r"(previous)
               : "r"(shared_address(address)), "r"(value)
               : "memory");
  return previous;
#else
  const int previous = *address;
  *address = previous + value;
  return previous;
#endif
}

}  // namespace sparsegemm
