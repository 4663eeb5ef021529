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

#include "cuda/arch/portability.cuh"

#if defined(__CUDACC__)
#if (__CUDACC_VER_MAJOR__ < 12) || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ < 5)
#error "mma.sp::ordered_metadata needs PTX ISA 8.5: CUDA 12.5 or newer"
#endif
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

// ---- atom.add.acq_rel.gpu ----------------------------------------------------------------------
// Atomic add, acquire-release at GPU scope (PTX ISA atom .acq_rel .gpu, sm_70+). The release half
// publishes every write that happens before it, the writes of the whole block when a bar.sync
// comes first (PTX memory model: causality order runs through the barrier); the acquire half
// makes the writes released by earlier adds to the same address visible here and, after the next
// bar.sync, to the block. One thread of the block fences instead of all of them (CUTLASS's
// split-K semaphores in cutlass/barrier.h use the same arrive / wait pattern). The emulator runs
// blocks one after another, so a plain atomic add is the same there.
SG_DEVICE int atomic_add_acq_rel_gpu(int* address, int value) {
#if defined(__CUDACC__)
  int previous;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;\n"
               : "=r"(previous)
               : "l"(address), "r"(value)
               : "memory");
  return previous;
#else
  return atomicAdd(address, value);
#endif
}

}  // namespace sparsegemm
