// Sparse GEMM on the 2:4 tensor cores:   Y[M, N] = act(X[M, K] @ W[N, K]^T + bias[N]).
// One kernel body, two MMA policies: Mma16<f16|bf16> below (mma.sp::ordered_metadata m16n8k32,
// fp32 accumulate) and MmaS8<out> in gemm_sp_s8.cuh (m16n8k64 s8, s32 accumulate, dequantising
// epilogue). A policy fixes the operand element, the k-tile, the metadata words and the epilogue
// arithmetic; tiling, pipeline, swizzles, tails and split-K are shared. Where X's 16-byte chunks
// come from is a second policy, the X loader: RowMajorX below (the GEMM) or NhwcConvX in
// conv_sp.cuh (the implicit-GEMM convolution, which reads an NHWC image instead of X rows).
//
// Naming legend (DESIGN.md letters; they never change meaning in this file):
//   N, M, K      problem sizes; K is the true K, Kp = padded_k(K), Kc = Kp / 2 compressed columns.
//   Wc[N, Kc]    kept weight values (format.h), the sparse A operand of mma.sp.
//   E            metadata in a kernel layout of reorder.cuh (per 16-row A tile and k-step).
//   X[M, K]      activations (row stride ldx; for a convolution, its implicit im2col matrix),
//                the B operand: X rows are K-contiguous, which is exactly mma's "col" B, so a
//                non-transposed ldmatrix yields B's fragment.
//   Y[M, N]      output (row stride ldy).
//   block tile   kBlockN rows of W x kBlockM rows of X x kBlockK logical K (kBlockK / 2 of Wc):
//                64 K of 16-bit or 128 K of int8, in both cases 64 bytes of a Wc row and 128
//                bytes of an X row, so the shared-memory layout below is the same in bytes.
//   warp tile    kWarpN x kWarpM = kTilesN A tiles (16 rows) x kTilesM B tiles (8 rows).
//   k-tile kt    logical K [kBlockK kt, kBlockK (kt + 1)); k-step ks: its half, one mma.sp
//                (32 K of 16-bit, 64 K of int8: 32 bytes of Wc and 64 bytes of X either way).
//   g, t         lane / 4 and lane % 4 (PTX fragment notation).
//
// The swap: the tensor core wants the sparse operand as A (16 rows), so each block computes
// Y^T[n, m] = sum_k W[n, k] X[m, k], i.e. Y^T = W @ X^T, and the epilogue stores it transposed
// through shared memory so that global stores run along N, Y's contiguous dimension.
//
// Shared memory per pipeline stage (kStages of them): kKTilesPerStage consecutive k-tiles (one
// for compute-bound tiles; several for decode, so that one stage reads kKTilesPerStage x 64
// contiguous bytes of each Wc row, longer DRAM bursts), each k-tile laid out as follows,
// XOR-swizzled so that every ldmatrix phase (8 rows x 16 bytes) hits 8 distinct 16-byte bank groups:
//   A    [kBlockN rows][64 B]:  16-byte chunk c of row r at chunk c ^ ((r >> 1) & 3)
//   B    [kBlockM rows][128 B]: chunk c of row r at chunk c ^ (r & 7)
//   Meta [kBlockN / 16][kMetaSliceBytes]: the two k-steps' metadata words of each 16-row slice
// Why ldmatrix (a b16 instruction) serves int8 too: a lane receives bytes 4t .. 4t + 3 of a
// 16-byte row, which is the m16n8k64 s8 fragment (A: compressed columns 16 (r / 2) + 4t + {0..3},
// B: k = 16j + 4t + {0..3}), so the same addresses yield both types' fragments.
// Epilogue: the same memory, reused as Ys[kBlockM][kBlockN + 8] in the output type (the +8
// halves shift rows by 16 bytes to spread the transposed writes over the banks).
//
// Tails: rows of W past N and K past Kp are zero-filled (cp.async with a false predicate reads
// nothing); rows of X past M are zeroed once before the main loop and never copied (decode
// blocks hold 1 to 16 real rows of 16); k-tiles of a stage past the block's K range are neither
// loaded nor computed; the kernel metadata is padded with legal nibbles (reorder.cuh).
// Global operands are copied with 16-byte cp.async when their rows allow it (c = 16 bytes in
// elements: Kc % c == 0 and a 16-byte aligned Wc; K % c == 0, ldx % c == 0 and a 16-byte aligned
// X), otherwise with predicated element loads: any K % 4 == 0 works without padding in ops.py,
// only slower.
// The kernel metadata must be 16-byte aligned (it is an allocation of its own).
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../format.h"
#include "../params.h"
#include "arch/portability.cuh"
#include "arch/warp_ops.cuh"
#include "element.cuh"
#include "fp_exact.cuh"
#include "gemm_heuristics.h"
#include "reorder.cuh"

namespace sparsegemm {
namespace SG_KERNEL_NS {

// MMA policy of the 16-bit GEMM (the interface every policy provides):
//   Operand      element of Wc and X;  Acc: the MMA accumulator;  PartialSum: split-K reduction
//   Out          ElementTraits of Y and bias
//   kBlockK      logical K per k-tile;  kStepK: logical K per mma.sp
//   kMetaWordsPerStep  kernel-metadata words of one 16-row A tile and one k-step (reorder.cuh)
//   meta_steps(K)      k-steps per 16-row tile row of the kernel metadata (its padded K / kStepK)
//   meta_word(lane)    the word of a tile that `lane` passes to mma.sp
//   mma(d, a, b, e)    d += A * B, one k-step
//   wgmma(d, a, desc, e)  the same for a warpgroup's 64 rows and 128 B columns (wgmma tiles), A
//                      this warp's fragment in registers or the 64 rows' shared-memory descriptor
//   saturate(sum)      a full-K split-K sum as the Acc a single-pass kernel would hold
//   dequantize(acc, w_scale_n, x_scale_m)  the fp32 value before bias and activation
//   kScaled            whether dequantize reads the scales (GemmParams w_scale / x_scale)
template <DType kDType>
struct Mma16 {
  using Operand = uint16_t;
  using Acc = float;
  using PartialSum = float;
  using Out = ElementTraits<kDType>;
  static constexpr int kBlockK = gemm_tiles::kBlockK;
  static constexpr int kStepK = 32;
  static constexpr int kMetaWordsPerStep = int(kMetaWordsPerTile);
  static constexpr int64_t kMetaKPadding = kMetaKPad;
  static constexpr bool kScaled = false;
  static SG_HOST_DEVICE int64_t meta_steps(int64_t K) { return meta_k_padded(K) / kStepK; }
  // Selector 0: lane 4g + p (p = lane & 1) supplies word 2g + p; t = 2, 3 duplicate it.
  static SG_DEVICE int meta_word(int lane) { return (lane >> 2) * 2 + (lane & 1); }
  static SG_DEVICE void mma(Acc (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e) {
    if constexpr (kDType == DType::bf16) {
      mma_sp_m16n8k32_bf16(d, a, b, d, e);
    } else {
      mma_sp_m16n8k32_f16(d, a, b, d, e);
    }
  }
  // d += A * B over one k-step for a warpgroup (wgmma tiles): this warp's A fragment and metadata
  // word as for mma, B = 128 X rows through the shared-memory descriptor.
  template <typename WgmmaA>
  static SG_DEVICE void wgmma(Acc (&d)[16][4], const WgmmaA& a, uint64_t b_desc, const uint32_t& e) {
    wgmma_sp_m64n128k32<kDType>(d, a, b_desc, e);
  }
  static SG_DEVICE Acc saturate(PartialSum sum) { return sum; }
  static SG_DEVICE float dequantize(Acc acc, float, float) { return acc; }
};

// Shape constants derived from an MMA policy and a tile configuration (gemm_heuristics.h).
template <typename Policy, typename Tile>
struct GemmShape {
  static constexpr int kBlockN = Tile::kBlockN, kBlockM = Tile::kBlockM, kStages = Tile::kStages;
  static constexpr int kKTilesPerStage = Tile::kKTilesPerStage;
  static constexpr int kWarpsN = Tile::kWarpsN, kWarpsM = Tile::kWarpsM;
  static constexpr int kThreads = 32 * kWarpsN * kWarpsM;
  static constexpr int kWarpN = kBlockN / kWarpsN, kWarpM = kBlockM / kWarpsM;
  static constexpr int kTilesN = kWarpN / 16, kTilesM = kWarpM / 8;
  static constexpr int kBlockK = Policy::kBlockK;
  static constexpr int kSteps = kBlockK / Policy::kStepK;
  static constexpr int kElemBytes = int(sizeof(typename Policy::Operand));
  static constexpr int kChunkElems = 16 / kElemBytes;             // elements per 16-byte chunk
  static constexpr int kRowBytesA = kBlockK / 2 * kElemBytes;      // kBlockK / 2 compressed values
  static constexpr int kRowBytesB = kBlockK * kElemBytes;
  static constexpr int kMetaSliceBytes = kSteps * Policy::kMetaWordsPerStep * 4;  // per 16 rows
  static constexpr int kBytesA = kBlockN * kRowBytesA;
  static constexpr int kBytesB = kBlockM * kRowBytesB;
  static constexpr int kBytesMeta = kBlockN / 16 * kMetaSliceBytes;
  // One k-tile's A, B and Meta; for wgmma tiles rounded up to 1024 bytes, so that every B tile
  // starts a 1024-byte swizzle atom (warp_ops.cuh wgmma_desc_b128: the swizzle reads address bits).
  static constexpr int kKTileAlign = Tile::kWgmma ? 1024 : 16;
  static constexpr int kKTileBytes = (kBytesA + kBytesB + kBytesMeta + kKTileAlign - 1) / kKTileAlign * kKTileAlign;
  static constexpr int kStageBytes = kKTilesPerStage * kKTileBytes;
  static constexpr int kEpilogueStride = kBlockN + 8;  // elements per row of Ys
  static constexpr int kEpilogueBytes = kBlockM * kEpilogueStride * int(sizeof(typename Policy::Out::Storage));
  static constexpr int kSmemBytes = kStages * kStageBytes > kEpilogueBytes ? kStages * kStageBytes : kEpilogueBytes;

  static_assert(kRowBytesA == 64 && kRowBytesB == 128, "the swizzles below assume 64-byte A rows and 128-byte B rows");
  static_assert(kSteps == 2, "ldmatrix addressing below: two k-steps of 32 A bytes and 64 B bytes per k-tile");
  // The kernel metadata is padded to whole kMetaKPadding x kMetaRowPad blocks (reorder.cuh): every
  // tile this kernel reads must lie inside that padding, so the padding must be a multiple of the tile.
  static_assert(Policy::kMetaKPadding % kBlockK == 0 && kMetaRowPad % kBlockN == 0,
                "metadata padding must cover every tile");
  static_assert(kWarpN % 16 == 0 && kWarpM % 8 == 0, "warp tile: whole mma tiles");
  static_assert(kStages >= 2, "cp.async pipeline needs two stages");
  // wgmma tiles: one 16-row A tile per warp (warpgroup w: rows 64w .. 64w + 63 of the block), all
  // kBlockM X rows as the instruction's N (the m64n128 wrappers), B tiles on swizzle atoms.
  // (A split-K wgmma tile, gemm_tiles::WgmmaSplitK, reduces through the same per-thread element
  // walk as the decode tile: the wgmma accumulator fragment of a warp's 16 rows is mma's C fragment
  // repeated over the 16 8-column groups, acc[0][j][r].)
  static_assert(!Tile::kWgmma || (kWarpsM == 1 && kTilesN == 1 && kBlockM == 128 && kThreads % 128 == 0 &&
                                  kBytesA % 1024 == 0 && kKTilesPerStage == 1),
                "wgmma tile: warps of 16 W rows x all 128 X rows, whole warpgroups, B at 1024-byte offsets, "
                "one k-tile a stage (its loads follow the stage's wgmma)");
  static_assert(kKTilesPerStage >= 1, "a stage holds whole k-tiles");
};

// Copies one 16-byte chunk (16 / sizeof(T) elements) of a global row into shared memory.
// vector_ok: the operand's rows allow cp.async (see the header comment); valid: elements of the
// row left from src on (<= 0 or !row_ok: the chunk is zero-filled and src is not read).
template <typename T>
SG_DEVICE void copy_chunk(char* dst, const T* src, bool row_ok, int64_t valid, bool vector_ok) {
  constexpr int kElems = 16 / int(sizeof(T));
  const bool any = row_ok && valid > 0;
  if (vector_ok) {
    cp_async_16(dst, src, any);
    return;
  }
  ElementPack<T, kElems> pack;
  for (int i = 0; i < kElems; ++i) pack.v[i] = (any && i < valid) ? src[i] : T(0);
  st_shared_16(dst, pack);
}

// 16 zero bytes at dst (shared memory, 16-byte aligned).
SG_DEVICE void zero_chunk(char* dst) { st_shared_16(dst, ElementPack<uint32_t, 4>{}); }

// B-operand loader policy (the interface every loader provides): where the 16-byte chunk of X
// row m that starts at logical K column col comes from.
//   Params                the kernel argument struct; gemm(params) is its GemmParams part
//   Loader(params)        per-thread setup, once per kernel
//   copy(dst, m, col)     issues the copy of that chunk into shared memory dst, zero-filled
//                         where X has no element (m >= M, K columns past K)
//   kStridedRows          true when row m starts at x + m ldx (then x, ldx, vector_ok are members)
//   source_bytes(params)  the bytes from X's start the copies may read (the emulator checks them)
//   kTma                  false: gemm_sp_kernel's threads copy through copy() (TmaRowMajorX: true)
//   kGrouped              false: one GEMM, blockIdx.z its K split (GroupedRowMajorX: true, blockIdx.z
//                         groups x splits)
// RowMajorX is the GEMM's: X[M, K] rows with stride ldx. conv_sp.cuh has the implicit-GEMM one.
template <typename Operand>
struct RowMajorX {
  using Params = GemmParams;
  static SG_HOST_DEVICE const GemmParams& gemm(const Params& p) { return p; }
  static constexpr bool kStridedRows = true;  // interior stages: precomputed pointers (gemm_sp_kernel)
  static constexpr bool kTma = false;
  static constexpr bool kGrouped = false;

  const Operand* x;
  int64_t M, K, ldx;
  bool vector_ok;  // see the header comment: 16-byte cp.async when X's rows allow it

  SG_DEVICE explicit RowMajorX(const Params& p)
      : x(static_cast<const Operand*>(p.x)), M(p.M), K(p.K), ldx(p.ldx),
        vector_ok(p.K % (16 / int(sizeof(Operand))) == 0 && p.ldx % (16 / int(sizeof(Operand))) == 0 &&
                  reinterpret_cast<uintptr_t>(p.x) % 16 == 0) {}

  SG_DEVICE void copy(char* dst, int64_t m, int64_t col) const {
    const bool row_ok = m < M;
    copy_chunk(dst, row_ok ? x + m * ldx + col : x, row_ok, K - col, vector_ok);
  }

  static int64_t source_bytes(const Params& p) {
    return p.M > 0 ? ((p.M - 1) * p.ldx + p.K) * int64_t(sizeof(Operand)) : 0;
  }
};

// A grouped block's GEMM (GroupedRowMajorX::block_gemm): the launch's X, Y and x_scale with its
// group's weight, over rows first_row .. M - 1 of them (M: the row its group ends at). Rows stay
// absolute, so that the pointers stay the launch's kernel parameters: a group's pointers held in
// registers through the main loop made the wgmma and INT8 tiles spill on sm_90a.
struct GroupBlockGemm : GemmParams {
  int first_row = 0;   // < 2^31 (ops.py keeps M below it)
  int64_t x_rows = 0;  // X's rows: the split-K workspace holds partial sums for each
};

// The first row of X a block's GEMM p covers: 0, or a grouped block's first_row.
template <typename BlockGemm>
SG_DEVICE int first_row(const BlockGemm& p) {
  if constexpr (std::is_same_v<BlockGemm, GroupBlockGemm>) {
    return p.first_row;
  } else {
    return 0;
  }
}

// The loader of the grouped GEMM (params.h GroupedGemmParams; blockIdx.z / splits is the group): each block
// computes its group's GEMM, block_gemm(params), and loads X rows as RowMajorX loads a GEMM's.
// Only the warp-level and wgmma tiles with copies by every thread (configs 0, 1, 2).
template <typename Operand>
struct GroupedRowMajorX {
  using Params = GroupedGemmParams;
  static SG_HOST_DEVICE const GemmParams& gemm(const Params& p) { return p.gemm; }
  static constexpr bool kStridedRows = true;
  static constexpr bool kTma = false;
  static constexpr bool kGrouped = true;

  // RowMajorX's members, but the rows' end in 32 bits: one register less through the main loop.
  const Operand* x;
  int64_t K, ldx;
  int M;
  bool vector_ok;

  SG_DEVICE explicit GroupedRowMajorX(const GemmParams& block)
      : x(static_cast<const Operand*>(block.x)), K(block.K), ldx(block.ldx), M(int(block.M)),
        vector_ok(RowMajorX<Operand>(block).vector_ok) {}

  SG_DEVICE void copy(char* dst, int64_t m, int64_t col) const {
    const bool row_ok = m < M;
    copy_chunk(dst, row_ok ? x + m * ldx + col : x, row_ok, K - col, vector_ok);
  }

  // The GEMM of the block's group: its rows (row_offsets clamped into X, at most gemm.M of them)
  // and its weight. The offsets may be written by the kernel before this one (dependent launch),
  // hence the wait first.
  static SG_DEVICE GroupBlockGemm block_gemm(const Params& params) {
    grid_dependency_wait();
    const int group = int(blockIdx.z) / (int(gridDim.z) / params.groups);
    auto clamp = [](int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : v > hi ? hi : v; };
    const int64_t first = clamp(params.row_offsets[group], 0, params.x_rows);
    const int64_t end = clamp(params.row_offsets[group + 1], first, params.x_rows);
    GroupBlockGemm p;
    static_cast<GemmParams&>(p) = params.gemm;
    p.first_row = int(first);
    p.x_rows = params.x_rows;
    p.M = clamp(end, first, first + params.gemm.M);
    p.values = params.values[group];
    p.meta = params.meta[group];
    p.bias = params.bias[group];
    p.w_scale = params.w_scale[group];
    return p;
  }

  // X's rows (the emulator's bounds for the copies).
  static int64_t source_bytes(const Params& p) {
    GemmParams all = p.gemm;
    all.M = p.x_rows;
    return RowMajorX<Operand>::source_bytes(all);
  }
};

// The loader of the TMA pipelines (configs 3 to 6: the wgmma, decode, 256-row and K-split wgmma tiles with
// their stages copied by the tensor memory accelerator, gemm_sp_kernel): X[M, K] as RowMajorX, but
// no thread copies anything. Params
// are the GEMM's and three tensor maps (kernels_dispatch.cuh tma_gemm_params), each box one
// k-tile of one stage in the layout above:
//   w_map     Wc[N, Kc] (Operand elements): box kBlockK / 2 x kBlockN, 64-byte swizzle, which is
//             the A layout (16-byte chunk c of 64-byte row r at c ^ ((r >> 1) & 3): address bits
//             [4, 6) XOR [7, 9));
//   x_map     X[M, K], rows ldx apart: box kBlockK x kBlockM, 128-byte swizzle, the B layout
//             (chunk c of 128-byte row r at c ^ (r & 7): bits [4, 7) XOR [7, 10));
//   meta_map  the kernel metadata as uint32 [meta_rows_padded(N) / 16][meta_steps x words per
//             step]: box one k-tile's words x kBlockN / 16 slices, unswizzled (the Meta layout).
// The tensor maps need 16-byte aligned X and Wc with row strides of whole 16 bytes.
template <typename Operand>
struct TmaRowMajorX {
  struct Params {
    GemmParams gemm;
    TensorMap2d w_map, x_map, meta_map;
  };
  static SG_HOST_DEVICE const GemmParams& gemm(const Params& p) { return p.gemm; }
  static constexpr bool kTma = true;
  static constexpr bool kGrouped = false;
  static int64_t source_bytes(const Params& p) { return RowMajorX<Operand>::source_bytes(p.gemm); }
};

// Dynamic shared memory of gemm_sp_kernel<Policy, Tile, XLoader>: the stages (or the epilogue's
// Ys, whichever is larger), then for the TMA pipeline a `full` mbarrier (8 bytes) and a
// `stage_done` counter (4 bytes) per stage.
template <typename Policy, typename Tile, typename XLoader>
constexpr int gemm_smem_bytes() {
  return GemmShape<Policy, Tile>::kSmemBytes + (XLoader::kTma ? 12 * Tile::kStages : 0);
}

// One k-tile of the wgmma tile from the stage at sA (layout above; acc: the warp's accumulators,
// a_lane_offset / e_lane_offset: gemm_sp_kernel's fragment addresses): both k-steps' A fragments
// and metadata first (distinct registers: a wgmma in flight still reads its own), one fence for
// them, then the two wgmma ops into the same accumulators (they run in order) as one group;
// overlap() runs while they are under way, and the group is retired before returning.
template <typename Policy, typename S, typename Overlap>
SG_DEVICE void wgmma_k_tile(typename Policy::Acc (&acc)[16][4], const char* sA, int a_lane_offset, int e_lane_offset,
                            Overlap&& overlap) {
  const char* sB = sA + S::kBytesA;
  const char* sMeta = sB + S::kBytesB;
  uint32_t a[S::kSteps][4], e[S::kSteps];
#pragma unroll
  for (int ks = 0; ks < S::kSteps; ++ks) {
    ldmatrix_x4(a[ks], sA + (a_lane_offset ^ (ks << 5)));
    e[ks] = *reinterpret_cast<const uint32_t*>(sMeta + e_lane_offset + ks * Policy::kMetaWordsPerStep * 4);
  }
  const uint32_t b_address = shared_address(sB);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < S::kSteps; ++ks) Policy::wgmma(acc, a[ks], wgmma_desc_b128(b_address + ks * 64), e[ks]);
  wgmma_commit_group();
  overlap();
  wgmma_wait_group<0>();
  wgmma_fence_operands(acc);
}

// One k-tile of a warp-level tile from the stage at sA (acc: the warp's accumulators; the lane
// offsets: gemm_sp_kernel's fragment addresses; warp_rows: rows of X from the warp's first B
// row on that the block really has). Per k-step, the warp's A fragments and metadata words, then
// per 8-row B tile its ldmatrix and the mma.sp of every A tile. 8-row B tiles wholly past M
// (decode at M <= 8: half the tile) are zeros: neither loaded nor multiplied; their accumulators
// stay 0 and are never stored. The test is warp-uniform, as ldmatrix and mma.sp require.
template <typename Policy, typename S>
SG_DEVICE void mma_k_tile(typename Policy::Acc (&acc)[S::kTilesN][S::kTilesM][4], const char* sA, int a_lane_offset,
                          int b_lane_offset, int e_lane_offset, int warp_rows) {
  const char* sB = sA + S::kBytesA;
  const char* sMeta = sB + S::kBytesB;
#pragma unroll
  for (int ks = 0; ks < S::kSteps; ++ks) {
    uint32_t a[S::kTilesN][4];
    uint32_t e[S::kTilesN];
#pragma unroll
    for (int i = 0; i < S::kTilesN; ++i) {
      ldmatrix_x4(a[i], sA + (a_lane_offset ^ (ks << 5)) + i * 16 * S::kRowBytesA);
      e[i] = *reinterpret_cast<const uint32_t*>(sMeta + e_lane_offset + i * S::kMetaSliceBytes +
                                                 ks * Policy::kMetaWordsPerStep * 4);
    }
#pragma unroll
    for (int j = 0; j < S::kTilesM; ++j) {
      if (j * 8 >= warp_rows) continue;
      uint32_t b[4];
      ldmatrix_x4(b, sB + (b_lane_offset ^ (ks << 6)) + j * 8 * S::kRowBytesB);
#pragma unroll
      for (int i = 0; i < S::kTilesN; ++i) Policy::mma(acc[i][j], a[i], b, e[i]);
    }
  }
}

// The epilogue of one output element, in the INT8 contract's order (one fp32 rounding per step,
// never fused): dequantize, + bias (only when there is one), activation.
template <typename Policy>
SG_DEVICE float epilogue_value(typename Policy::Acc acc, float w_scale_n, float x_scale_m, bool has_bias,
                               float bias_n, Activation act) {
  float v = Policy::dequantize(acc, w_scale_n, x_scale_m);
  if (has_bias) v = add_rn(v, bias_n);
  return apply_activation(v, act);
}

// Scale of output row n (w_scale) or column m (x_scale) for a scaled policy; 1 where unused or
// out of range (tail rows never reach global memory).
template <typename Policy>
SG_DEVICE float scale_at(const float* scales, int64_t index, int64_t count) {
  if constexpr (Policy::kScaled) {
    return index < count ? scales[index] : 1.f;
  } else {
    return 1.f;
  }
}

// Whether gemm_sp_kernel's X copies through precomputed pointers may take several passes per
// thread (LargeM; the decode tile has one): on sm_90 and newer and in the emulator. On sm_80-89
// ptxas (nvcc 13.0) took the LargeM tile from 125-126 to 157-159 registers with them (one block
// per SM on A100 instead of two), so there LargeM's X keeps copy(); on sm_90 it stayed at 126-128
// (114-120 since the MMA skips B tiles past M).
// Device code only: the host pass of nvcc sees `true` whatever the target.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr bool kMultiPassXCopies = false;
#else
constexpr bool kMultiPassXCopies = true;
#endif

// Split-K arrival: called by every thread of a block once its partial sums are stored; true in
// the block that arrives last at `counter` out of `splits`.
// The counter word (params.h GemmParams::tile_counters) holds this launch's `token` (56 bits, 55
// of them random, drawn per launch on the host: kernels_dispatch.cuh next_split_token) in bits 8-63 and its arrivals so far in
// bits 0-7; a word that holds another token counts as no arrivals. So it need not be zeroed before
// the launch: a CUDA graph's per-call counters come from the graph's memory pool as they are,
// without a fill node that replays before every split-K GEMM (about 3-4 us a call on an H200,
// bench/results/2026-11-27-H200-run21: targets against sweep.txt). The first arrival claims the
// word (compare-and-swap, retried while other blocks claim or add first), the others add 1, and the
// last one sets the word to 0 for the next launch: a replay of the same graph node, whose token is
// the same, again finds no arrivals. A word holds this launch's token only once this launch wrote
// it (a stale or foreign word matches the token with chance 2^-55). The first barrier
// orders every thread's stores before thread 0's read-modify-write, whose release publishes them at
// GPU scope and whose acquire (in the last block) makes the other splits' partials visible (all of
// them read-modify-writes of one word: a release sequence); the second barrier hands that on to the
// block. One acq_rel atomic instead of a __threadfence() in every thread (fence.sc, a full drain per
// thread). The first 4 bytes of `smem` (no warp reads the pipeline stages any more once the first
// barrier is passed, and the epilogue's barrier comes before its next write) carry the answer.
constexpr int kArrivalBits = 8;
static_assert(gemm_tiles::kMaxSplitK < (1 << kArrivalBits), "a tile counter counts every split's arrival");
SG_DEVICE bool arrived_last(uint64_t* counter, int splits, uint64_t token, char* smem) {
  __syncthreads();
  int* verdict = reinterpret_cast<int*>(smem);
  if (threadIdx.x == 0) {
    uint64_t seen = load_relaxed_gpu(counter);
    uint64_t arrivals;
    for (;;) {
      if (seen >> kArrivalBits == token) {
        // Claimed by this launch: the word keeps the token until the last arrival, this one at the
        // latest, so an add cannot land on another launch's word.
        arrivals = atomic_add_acq_rel_gpu(counter, 1) & ((uint64_t(1) << kArrivalBits) - 1);
        break;
      }
      const uint64_t held = atomic_cas_acq_rel_gpu(counter, seen, token << kArrivalBits | 1);
      if (held == seen) {
        arrivals = 0;
        break;
      }
      seen = held;  // another block claimed it (or added) first
    }
    const bool last = arrivals == uint64_t(splits - 1);
    if (last) store_relaxed_gpu(counter, 0);  // every split has arrived: nothing else touches it in this launch
    *verdict = last;
  }
  __syncthreads();
  return *verdict != 0;
}

// The blocks per SM gemm_sp_kernel's launch bounds ask for: the tile's, but one for the grouped
// large-M tiles (LargeM and the wgmma one): their group's weight pointers and row end, which a
// single GEMM reads from its kernel parameters, take them to 130-137 registers (ptxas, nvcc 13.0,
// sm_80 and sm_90a), and held to 128 for two blocks per SM they spilled 4-24 bytes. The grouped
// decode tile keeps two (68-80 registers).
template <typename Tile, typename XLoader>
constexpr int min_blocks_per_sm() {
  return XLoader::kGrouped && !std::is_same_v<Tile, gemm_tiles::Decode> ? 1 : Tile::kMinBlocksPerSm;
}

// The K splits of a gemm_sp_kernel launch: its grid's third dimension, of which a grouped launch's
// runs over groups x splits (block z: group z / splits, split z % splits).
template <typename XLoader>
SG_DEVICE int launch_splits(const typename XLoader::Params& params) {
  if constexpr (XLoader::kGrouped) {
    return int(gridDim.z) / params.groups;
  } else {
    return int(gridDim.z);
  }
}

// The rows of a split's partial sums in the split-K workspace: the GEMM's M, or for a grouped
// block (whose rows are absolute) all of X's.
template <typename BlockGemm>
SG_DEVICE int64_t partial_rows(const BlockGemm& p) {
  if constexpr (std::is_same_v<BlockGemm, GroupBlockGemm>) {
    return p.x_rows;
  } else {
    return p.M;
  }
}

// The GEMM a block of gemm_sp_kernel computes: the launch's (a reference to the kernel parameter),
// or for a grouped launch its group's (GroupBlockGemm, made after the wait for the kernel before).
template <typename XLoader>
SG_DEVICE decltype(auto) block_gemm(const typename XLoader::Params& params) {
  if constexpr (XLoader::kGrouped) {
    return XLoader::block_gemm(params);
  } else {
    return XLoader::gemm(params);
  }
}

// Block (blockIdx.x, blockIdx.y, blockIdx.z) computes output tile raster_output_tile(blockIdx.x,
// blockIdx.y) (gemm_heuristics.h: M tiles x N tiles in bands) of K split blockIdx.z, or for a
// grouped launch (XLoader::kGrouped) of K split blockIdx.z % splits of group blockIdx.z / splits's
// GEMM; a block whose tile starts past its group's rows has nothing to do (the grid is sized for
// the largest group).
// XLoader: the B-operand loader policy (RowMajorX above, or conv_sp.cuh's implicit-GEMM loader);
// params: its Params, whose GemmParams part p is described here.
// p: GemmParams (params.h) with x: X[M, K], values: Wc[N, Kc] (both Policy::Operand), meta: E
//    (the policy's kernel layout, reorder.cuh), bias: bias[N] or null and y: Y[M, N] (both
//    Policy::Out), w_scale[N] / x_scale[M] (scaled policies only), act: the activation, and when
//    it splits K (Tile::kSplitK only) workspace: Policy::Acc [splits, M, N] partial sums (a
//    grouped launch: [splits, x_rows, N]) and tile_counters: uint64 [gridDim.y][gridDim.x] (of
//    each group), any contents at launch (arrived_last), zero at exit where blocks arrived.
// k_tiles_per_split: k-tiles of each split (the last one may have fewer); split_token: this
// launch's token for the tile counters (arrived_last), when it splits K.
template <typename Policy, typename Tile, typename XLoader = RowMajorX<typename Policy::Operand>>
SG_GLOBAL void SG_LAUNCH_BOUNDS((GemmShape<Policy, Tile>::kThreads), (min_blocks_per_sm<Tile, XLoader>()))
    gemm_sp_kernel(SG_GRID_CONSTANT const typename XLoader::Params params, int64_t k_tiles_per_split,
                   uint64_t split_token) {
  if constexpr ((Tile::kWgmma && !kWgmmaCompiled) || (XLoader::kTma && !kTmaCompiled)) {
    // A device pass without wgmma (not sm_90a) or TMA (before sm_90): the dispatch never launches
    // this (wgmma_tile_runs), and the trap keeps the rest of the kernel out of that pass's machine code.
    trap("the wgmma tile and the TMA pipelines need sm_90a");
    return;
  }
  using S = GemmShape<Policy, Tile>;
  using Operand = typename Policy::Operand;
  using Acc = typename Policy::Acc;
  using Out = typename Policy::Out;
  const auto& p = block_gemm<XLoader>(params);
  static_assert(!XLoader::kGrouped || !XLoader::kTma, "grouped GEMMs copy through every thread");
  SG_DYNAMIC_SMEM(char, smem);

  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int warp_n = warp % S::kWarpsN, warp_m = warp / S::kWarpsN;
  const OutputTile tile = raster_output_tile(blockIdx.x, blockIdx.y, gridDim.x, gridDim.y);
  // 32-bit: a tile's rows m0 .. m0 + kBlockM - 1 stay below 2^31 (ops.py keeps M below it; m0 is a
  // multiple of kBlockM) and n0 + kBlockN below 2^24 (launch_gemm's 65535 N blocks of at most 256). Unlike blockIdx the
  // tile is not free to recompute, and two registers fewer kept the wgmma convolution from spilling.
  const int m0 = first_row(p) + int(tile.m) * S::kBlockM;
  const int n0 = int(tile.n) * S::kBlockN;
  if constexpr (XLoader::kGrouped) {
    if (m0 >= p.M) return;  // the whole block: no barrier is left waiting
  }
  const int64_t Kc = values_cols(p.K);
  const int64_t k_tiles = gemm_k_tiles(p.K, S::kBlockK);
  const int64_t meta_steps = Policy::meta_steps(p.K);
  const int splits = launch_splits<XLoader>(params);
  const int split = XLoader::kGrouped ? int(blockIdx.z) % splits : int(blockIdx.z);
  const int64_t kt_begin = int64_t(split) * k_tiles_per_split;
  const int64_t kt_end = kt_begin + k_tiles_per_split < k_tiles ? kt_begin + k_tiles_per_split : k_tiles;
  const int num_tiles = kt_end > kt_begin ? int(kt_end - kt_begin) : 0;

  Acc acc[S::kTilesN][S::kTilesM][4];
#pragma unroll
  for (int i = 0; i < S::kTilesN; ++i)
#pragma unroll
    for (int j = 0; j < S::kTilesM; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = Acc(0);

  // Fragment addresses, byte offsets within a k-tile that depend on the lane alone, set up once
  // (written per k-step, ptxas spent 40 instructions a stage on them in the decode main loop; 26 now).
  //  A: ldmatrix.x4 lanes 0-15 address rows 0-15 of the left 8 compressed columns, lanes 16-31
  //     the right 8, so registers come out in mma's A quadrant order (0,0) (8,0) (0,8) (8,8).
  //     Row warp_n kWarpN + 16 i + lane % 16, 16-byte chunk 2 ks + lane / 16 stored at chunk ^
  //     ((row / 2) % 4) (the swizzle of the copies): rows 16 apart share the swizzle, and as the
  //     chunk's bit 1 is ks alone, k-step ks is the offset of ks = 0 with bit 5 flipped.
  //  B: matrix q of the x4 = bytes 16q..16q+15 of the k-step in 8 X rows, so register q is B
  //     register q (16-bit: K 8q + 2t + {0, 1}; int8: K 16q + 4t + {0..3}). Row warp_m kWarpM +
  //     8 j + lane % 8, chunk 4 ks + lane / 8 at chunk ^ (row % 8): k-step ks flips bit 6.
  //  E: the lane's metadata word (Policy::meta_word) of slice warp_n kWarpN / 16 + i, k-step ks.
  const int a_lane_row = warp_n * S::kWarpN + (lane & 15);
  const int a_lane_offset = a_lane_row * S::kRowBytesA + (((lane >> 4) ^ ((a_lane_row >> 1) & 3)) << 4);
  const int b_lane_row = warp_m * S::kWarpM + (lane & 7);
  const int b_lane_offset = b_lane_row * S::kRowBytesB + (((lane >> 3) ^ (b_lane_row & 7)) << 4);
  const int e_lane_offset = (warp_n * S::kWarpN / 16) * S::kMetaSliceBytes + Policy::meta_word(lane) * 4;

  // Rows of X this block really has (the rest of B is zeros).
  const int x_rows = p.M - m0 < S::kBlockM ? int(p.M - m0) : S::kBlockM;
  constexpr int kStageKTiles = S::kKTilesPerStage;
  const int num_stage_tiles = (num_tiles + kStageKTiles - 1) / kStageKTiles;

  if constexpr (XLoader::kTma) {
    // TMA pipeline (TmaRowMajorX: configs 3 to 6, the wgmma, decode, 256-row and K-split wgmma tiles):
    // each k-tile of a stage comes with three TMA copies (its Wc, X and metadata boxes) that
    // complete on the stage's `full` mbarrier. Every warp waits on that, computes, then counts itself done with
    // the stage (`stage_done`, a shared counter); the last warp out refills the stage with the
    // stage tile kStages later, at once. No thread copies bytes itself, no barrier spans the block
    // (Nsight Compute saw the cp.async pipeline's per-thread copies and barriers take the wgmma
    // tile's issue slots and shared memory: gemm_heuristics.h), and no warp waits for another to
    // refill: warps drift up to kStages stages apart. (A producer warp after the tile's 8 took
    // the launch bound to 288 threads, which capped ptxas at 96 registers: the wgmma tile spilled;
    // thread 0 as producer, waiting for the slowest warp, held its warpgroup back.) Tails need
    // nothing: box elements past N, M, K and Kc are zeros, and k-tiles past the split's end are
    // neither copied nor computed.
    static_assert(S::kBytesA % 1024 == 0 && S::kKTileBytes % 1024 == 0 && S::kSmemBytes % 8 == 0,
                  "TMA boxes: every B tile on a 1024-byte swizzle atom, every A tile on a 512-byte one; "
                  "8-byte aligned mbarriers after the stages");
    uint64_t* full = reinterpret_cast<uint64_t*>(smem + S::kSmemBytes);  // gemm_smem_bytes
    int* stage_done = reinterpret_cast<int*>(full + S::kStages);
    constexpr int kWarps = S::kThreads / 32;
    constexpr int kMetaKTileWords = S::kSteps * Policy::kMetaWordsPerStep;
    const int meta_row = n0 / 16;
    const int first_stages = num_stage_tiles < S::kStages ? num_stage_tiles : S::kStages;
    // K-tiles of stage tile st (the last one of the split may hold fewer).
    auto stage_k_tiles = [&](int st) {
      const int left = num_tiles - st * kStageKTiles;
      return left < kStageKTiles ? left : kStageKTiles;
    };
    if (tid == 0) {
      tma_prefetch_descriptor(params.w_map);
      tma_prefetch_descriptor(params.x_map);
      tma_prefetch_descriptor(params.meta_map);
      for (int s = 0; s < S::kStages; ++s) {
        mbarrier_init(&full[s], 1);
        stage_done[s] = 0;
      }
      fence_mbarrier_init();
      // Before grid_dependency_wait only the weight boxes of the first stages, into L2 (see the
      // cp.async pipeline's prefetch below).
      for (int st = 0; st < first_stages; ++st)
        for (int sub = 0; sub < stage_k_tiles(st); ++sub) {
          const int kt = int(kt_begin) + st * kStageKTiles + sub;
          tma_prefetch_l2_2d(params.w_map, kt * (S::kBlockK / 2), n0);
          tma_prefetch_l2_2d(params.meta_map, kt * kMetaKTileWords, meta_row);
        }
    }
    grid_dependency_wait();
    launch_dependent_grids();
    __syncthreads();  // publishes the mbarrier inits and the zeroed counters
    // One thread: stage tile st into stage st % kStages, its bytes announced first.
    auto issue = [&](int st) {
      char* stage = smem + (st % S::kStages) * S::kStageBytes;
      uint64_t* bar = &full[st % S::kStages];
      const int k_tiles_here = stage_k_tiles(st);
      mbarrier_arrive(bar, k_tiles_here * (S::kBytesA + S::kBytesB + S::kBytesMeta));
      for (int sub = 0; sub < k_tiles_here; ++sub) {
        char* k_tile = stage + sub * S::kKTileBytes;
        const int kt = int(kt_begin) + st * kStageKTiles + sub;  // K < 2^31 (ops.py): every coordinate fits
        tma_load_2d(k_tile, params.w_map, kt * (S::kBlockK / 2), n0, bar);
        tma_load_2d(k_tile + S::kBytesA, params.x_map, kt * S::kBlockK, m0, bar);
        tma_load_2d(k_tile + S::kBytesA + S::kBytesB, params.meta_map, kt * kMetaKTileWords, meta_row, bar);
      }
    };
    if (tid == 0)
      for (int st = 0; st < first_stages; ++st) issue(st);
    // This warp is done with stage tile it: the last warp out (its add, acquire-release, comes
    // after every other warp's reads) resets the count (the next adds follow the refill's `full`
    // phase) and refills the stage.
    auto leave_stage = [&](int it) {
      const int stage = it % S::kStages;
      __syncwarp();  // every lane is done with the stage
      if (lane == 0 && atomic_add_acq_rel_cta_shared(&stage_done[stage], 1) == kWarps - 1) {
        stage_done[stage] = 0;
        // The warps' generic-proxy reads of the stage, which the atomics ordered before this
        // point, before the refill's async-proxy writes (CUTLASS omits this fence, Triton emits it).
        fence_proxy_async_shared();
        if (it + S::kStages < num_stage_tiles) issue(it + S::kStages);
      }
      __syncwarp();  // lane 0 rejoins its warp before the next warp-wide instructions
    };
    if constexpr (Tile::kWgmma) {
      // The SS form: the warpgroup's 64 rows of A straight from the stage through a descriptor
      // (64-byte swizzle: the TMA box's layout), so that the only registers a wgmma reads besides
      // its accumulators are the metadata words. Each k-tile's wgmma ops stay in flight while the
      // warp waits for the next k-tile's stage; they retire before that k-tile's metadata words are
      // loaded, since a wgmma reads its metadata registers while in flight: loading them with the
      // previous k-tile's ops in flight gave 16-row stripes of wrong outputs (one warp's metadata) on
      // an H200 (bench/results/2026-11-27-H200-run19). CUTLASS's sparse wgmma mainloop does the same
      // (K_PIPE_MMAS = 0 in sm90_sparse_mma_tma_gmma_ss_warpspecialized.hpp). The warp leaves a
      // stage once its ops retired.
      // (A fragments in registers, through ldmatrix, made ptxas serialise every wgmma: C7513.)
      static_assert(kStageKTiles == 1, "a wgmma stage holds one k-tile");
      const uint32_t a_row_offset = uint32_t(warp / 4) * 64 * S::kRowBytesA;  // the warpgroup's rows
      uint32_t e[S::kSteps];  // outside the loop: the emulator checks them when their ops retire
      wgmma_fence_operands(acc[0]);  // the zeroed accumulators stay before the first wgmma.fence
      for (int it = 0; it < num_stage_tiles; ++it) {
        const int stage = it % S::kStages;
        mbarrier_wait_parity(&full[stage], (it / S::kStages) & 1);
        wgmma_wait_group<0>();  // k-tile it - 1's ops are retired: its stage and metadata registers are free
        if (it > 0) leave_stage(it - 1);
        const char* sA = smem + stage * S::kStageBytes;
        const char* sMeta = sA + S::kBytesA + S::kBytesB;
#pragma unroll
        for (int ks = 0; ks < S::kSteps; ++ks)
          e[ks] = *reinterpret_cast<const uint32_t*>(sMeta + e_lane_offset + ks * Policy::kMetaWordsPerStep * 4);
        const uint32_t a_address = shared_address(sA) + a_row_offset, b_address = shared_address(sA + S::kBytesA);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < S::kSteps; ++ks)
          Policy::wgmma(acc[0], wgmma_desc_a64(a_address + ks * 32), wgmma_desc_b128(b_address + ks * 64), e[ks]);
        wgmma_commit_group();
      }
      wgmma_wait_group<0>();
      wgmma_fence_operands(acc[0]);
    } else {
      for (int it = 0; it < num_stage_tiles; ++it) {
        const int stage = it % S::kStages;
        mbarrier_wait_parity(&full[stage], (it / S::kStages) & 1);
        for (int sub = 0; sub < stage_k_tiles(it); ++sub)
          mma_k_tile<Policy, S>(acc, smem + stage * S::kStageBytes + sub * S::kKTileBytes, a_lane_offset,
                                b_lane_offset, e_lane_offset, x_rows - warp_m * S::kWarpM);
        leave_stage(it);
      }
    }
  } else {
    const Operand* values = static_cast<const Operand*>(p.values);
    const char* meta = static_cast<const char*>(p.meta);
    const bool a_vector_ok = Kc % S::kChunkElems == 0 && reinterpret_cast<uintptr_t>(values) % 16 == 0;
    const XLoader x_loader = [&] {
      if constexpr (XLoader::kGrouped) {
        return XLoader(p);  // the group's rows
      } else {
        return XLoader(params);
      }
    }();


    // Wc chunks of this thread in an interior stage (every row below N, every column below Kc,
    // 16-byte copies allowed): chunk c = tid + pass * kThreads is row c / kChunksPerRow of the tile,
    // so the passes differ only by kRowsPerPass rows, whose swizzle is the same (kRowsPerPass is a
    // multiple of 8). Source pointer and shared-memory offset are set up once here; an interior
    // stage then costs a 64-bit add and a cp.async per chunk instead of the general path's row /
    // column / predicate arithmetic (~60 SASS instructions per chunk; ncu saw the decode tile issue
    // an instruction every 1.8 cycles per scheduler at 53% of DRAM bandwidth).
    constexpr int kChunksPerRow = 4 * kStageKTiles;
    constexpr int kRowsPerPass = S::kThreads / kChunksPerRow;
    constexpr int kAPasses = S::kBlockN / kRowsPerPass;
    static_assert(S::kThreads % kChunksPerRow == 0 && S::kBlockN % kRowsPerPass == 0 && kRowsPerPass % 8 == 0,
                  "Wc copies: whole rows per pass, a swizzle that repeats every pass");
    const bool a_rows_interior = a_vector_ok && n0 + S::kBlockN <= p.N;
    const int a_row = tid / kChunksPerRow, a_sub = (tid / 4) % kStageKTiles, a_chunk = tid & 3;
    const int a_smem_offset = a_sub * S::kKTileBytes + a_row * S::kRowBytesA + ((a_chunk ^ ((a_row >> 1) & 3)) << 4);
    const Operand* a_source = values + (a_rows_interior ? (n0 + a_row) * Kc : 0) + a_sub * (S::kBlockK / 2) +
                              a_chunk * S::kChunkElems;
    const int64_t a_pass_stride = kRowsPerPass * Kc;

    // Metadata: one 16-byte chunk per thread and stage at most, its source set up once (a stage adds
    // the k offset). The padded kernel layout (reorder.cuh) holds every k-tile below k_tiles, but
    // not the one past the end: the kt_end check keeps the second k-tile of a half-used last stage
    // from reading past the buffer on the last 16-row slice (the emulator fails such a copy).
    constexpr int kMetaChunks = S::kBytesMeta / 16, kSliceChunks = S::kMetaSliceBytes / 16;
    constexpr int64_t kMetaKTileBytes = S::kSteps * Policy::kMetaWordsPerStep * 4;
    static_assert(kMetaChunks * kStageKTiles <= S::kThreads, "one metadata chunk per thread and stage at most");
    const bool meta_copier = tid < kMetaChunks * kStageKTiles;
    const int meta_sub = tid / kMetaChunks, meta_slice = (tid % kMetaChunks) / kSliceChunks;
    const int meta_smem_offset = meta_sub * S::kKTileBytes + S::kBytesA + S::kBytesB + meta_slice * S::kMetaSliceBytes +
                                 (tid % kSliceChunks) * 16;
    const char* meta_source = meta + ((n0 / 16 + meta_slice) * meta_steps + meta_sub * S::kSteps) *
                                         Policy::kMetaWordsPerStep * 4 + (tid % kSliceChunks) * 16;

    // X chunks of this thread, as for Wc: chunk c = tid + pass * kThreads is row c / kXChunksPerRow
    // of the tile, passes kXRowsPerPass rows apart with the same swizzle. For a loader with strided
    // rows (kStridedXCopies), a stage whose kBlockM rows are all below M and whose columns are all
    // below K is copied through one pointer per stage and pass (copy() spends ~30 instructions per
    // chunk: for LargeM, 4 chunks a thread per k-tile, more than its 16 ldmatrix / 32 mma.sp a warp).
    constexpr int kXChunksPerRow = 8 * kStageKTiles;
    constexpr int kXRowsPerPass = S::kThreads / kXChunksPerRow;
    constexpr int kXPasses = S::kBlockM / kXRowsPerPass;
    static_assert(S::kThreads % kXChunksPerRow == 0 && S::kBlockM % kXRowsPerPass == 0 && kXRowsPerPass % 8 == 0,
                  "X copies: whole rows per pass, a swizzle that repeats every pass");
    // In the tiles that stream W (split K: the decode tile, one pass, and the mid-M tile, four) a
    // block with fewer than kBlockM rows takes it too, each thread copying only rows below M (most
    // decode blocks hold 1-8 rows), on every GPU (no spills: tests/test_sass.py); in the large-M
    // tiles the block must be whole (a per-pass row check took LargeM from 126 to 156-159 registers
    // on sm_90).
    constexpr bool kRowCheckedXCopies = Tile::kSplitK;
    constexpr bool kStridedXCopies =
        XLoader::kStridedRows && (kRowCheckedXCopies || kXPasses == 1 || kMultiPassXCopies);
    bool x_rows_ok = false;
    if constexpr (kStridedXCopies) x_rows_ok = x_loader.vector_ok && (kRowCheckedXCopies || x_rows == S::kBlockM);

    // Issues the copies of stage tile st (k-tiles kt_begin + kStageKTiles st + sub, those below
    // kt_end) into pipeline stage `stage` (no commit). Consecutive threads take consecutive 16-byte
    // chunks of one row across the stage's k-tiles: kStageKTiles x 64 contiguous bytes of Wc.
    // With one k-tile a stage only stage tiles in range are loaded, so the kt_end checks drop out.
    auto load_stage = [&](int st, int stage) {
      char* stage_base = smem + stage * S::kStageBytes;
      const int64_t kt0 = kt_begin + int64_t(st) * kStageKTiles;
      const int64_t kt_stop = kt0 + kStageKTiles;
      // Columns below Kc keep the copies inside Wc; the split's end only saves loading a k-tile
      // that the next split computes (the compute loop stops at num_tiles either way).
      if (a_rows_interior && kt_stop <= kt_end && kt_stop * (S::kBlockK / 2) <= Kc) {
        const Operand* source = a_source + kt0 * (S::kBlockK / 2);
        char* destination = stage_base + a_smem_offset;
#pragma unroll
        for (int pass = 0; pass < kAPasses; ++pass)
          cp_async_16(destination + pass * kRowsPerPass * S::kRowBytesA, source + pass * a_pass_stride, true);
      } else {
        for (int c = tid; c < S::kBlockN * kChunksPerRow; c += S::kThreads) {
          const int r = c / kChunksPerRow, sub = (c / 4) % kStageKTiles, chunk = c & 3;
          const int64_t kt = kt0 + sub;
          if (kStageKTiles > 1 && kt >= kt_end) continue;
          char* sA = stage_base + sub * S::kKTileBytes;
          const int64_t n = n0 + r, col = kt * (S::kBlockK / 2) + chunk * S::kChunkElems;
          const bool row_ok = n < p.N;
          copy_chunk(sA + r * S::kRowBytesA + ((chunk ^ ((r >> 1) & 3)) << 4), row_ok ? values + n * Kc + col : values,
                     row_ok, Kc - col, a_vector_ok);
        }
      }
      bool x_copied = false;
      if constexpr (kStridedXCopies) {
        if (x_rows_ok && kt_stop <= kt_end && kt_stop * S::kBlockK <= p.K) {
          // Derived here rather than held across the main loop: held, they took the fp16 LargeM
          // tile from 128 to 162 registers on sm_90 (one block per SM).
          const int row = tid / kXChunksPerRow, sub = (tid / 8) % kStageKTiles, chunk = tid & 7;
          const int64_t ldx = x_loader.ldx;
          const Operand* source = x_loader.x + (m0 + row) * ldx + (kt0 + sub) * S::kBlockK + chunk * S::kChunkElems;
          char* destination =
              stage_base + sub * S::kKTileBytes + S::kBytesA + row * S::kRowBytesB + ((chunk ^ (row & 7)) << 4);
#pragma unroll
          for (int pass = 0; pass < kXPasses; ++pass)
            if (!kRowCheckedXCopies || row + pass * kXRowsPerPass < x_rows)  // rows past M: zeroed once, never copied
              cp_async_16(destination + pass * kXRowsPerPass * S::kRowBytesB, source + pass * kXRowsPerPass * ldx, true);
          x_copied = true;
        }
      }
      // Otherwise through copy(): all kBlockM rows with the missing ones skipped inside, rather than
      // a loop bounded by x_rows (the constant trip count kept the LargeM tile at 128 registers).
      if (!x_copied) {
        for (int c = tid; c < S::kBlockM * 8 * kStageKTiles; c += S::kThreads) {
          const int r = c / (8 * kStageKTiles), sub = (c / 8) % kStageKTiles, chunk = c & 7;
          const int64_t kt = kt0 + sub;
          if (r >= x_rows || (kStageKTiles > 1 && kt >= kt_end)) continue;
          char* sB = stage_base + sub * S::kKTileBytes + S::kBytesA;
          x_loader.copy(sB + r * S::kRowBytesB + ((chunk ^ (r & 7)) << 4), m0 + r,
                        kt * S::kBlockK + chunk * S::kChunkElems);
        }
      }
      if (meta_copier && (kStageKTiles == 1 || kt0 + meta_sub < kt_end))
        cp_async_16(stage_base + meta_smem_offset, meta_source + kt0 * kMetaKTileBytes, true);
    };

    // Programmatic dependent launch (launch_gemm): this grid may start while the kernel before it
    // on the stream still runs, so nothing that kernel may write (X, Y, bias, scales, the split-K
    // scratch) is read or written before grid_dependency_wait. Until then the block only prefetches
    // into L2 the weight bytes the pipeline's prologue copies first (Wc and metadata of its first
    // kStages - 1 stage tiles), so that their DRAM latency overlaps the previous kernel's tail. A
    // prefetch cannot make a later read stale (prefetch_l2), so a weight that kernel writes (an
    // optimizer step, compress) is still read as written.
    {
      constexpr int kPrefetchKTiles = (S::kStages - 1) * kStageKTiles;
      const int prefetch_tiles = num_tiles < kPrefetchKTiles ? num_tiles : kPrefetchKTiles;
      const int w_rows = p.N - n0 < S::kBlockN ? int(p.N - n0) : S::kBlockN;
      for (int c = tid; c < w_rows * prefetch_tiles; c += S::kThreads)
        prefetch_l2(values + (n0 + c / prefetch_tiles) * Kc + (kt_begin + c % prefetch_tiles) * (S::kBlockK / 2));
      for (int c = tid; c < S::kBlockN / 16 * prefetch_tiles; c += S::kThreads)
        prefetch_l2(meta + ((n0 / 16 + c / prefetch_tiles) * meta_steps + (kt_begin + c % prefetch_tiles) * S::kSteps) *
                               Policy::kMetaWordsPerStep * 4);
    }
    grid_dependency_wait();
    // The next kernel on the stream may launch now: it prefetches its own weights and waits for this
    // grid's completion in turn.
    launch_dependent_grids();

    // Rows of X past M: zero in every stage and k-tile, once (an 8-row MMA tile that also holds rows
    // below M reads them, and the wgmma tile reads all kBlockM rows; their results land in output
    // columns that are never stored).
    for (int c = tid; c < S::kStages * kStageKTiles * (S::kBlockM - x_rows) * 8; c += S::kThreads) {
      const int ktile = c / ((S::kBlockM - x_rows) * 8), rest = c % ((S::kBlockM - x_rows) * 8);
      char* sB = smem + ktile * S::kKTileBytes + S::kBytesA;
      zero_chunk(sB + (x_rows + rest / 8) * S::kRowBytesB + ((rest & 7) << 4));
    }

    // Multi-stage pipeline: kStages - 1 stage tiles in flight while one is computed. One commit
    // per iteration (possibly empty) keeps cp_async_wait's group count exact in the tail.
    for (int s = 0; s < S::kStages - 1; ++s) {
      if (s < num_stage_tiles) load_stage(s, s);
      cp_async_commit();
    }
    for (int it = 0; it < num_stage_tiles; ++it) {
      cp_async_wait<S::kStages - 2>();
      // wgmma reads B through the async proxy: each thread's landed copies (and the zeroed X rows)
      // are fenced to it before the barrier that publishes them.
      if constexpr (Tile::kWgmma) fence_proxy_async_shared();
      // Makes stage tile `it` visible to all threads and guarantees that everyone is done with the
      // stage the next load overwrites (the one computed in iteration it - 1; a wgmma tile waits
      // for its wgmma ops at the end of each iteration).
      __syncthreads();
      // The copies of stage tile it + kStages - 1, into the stage computed in iteration it - 1 (a
      // wgmma tile issues them once its wgmma ops are under way, so that they overlap).
      const int next = it + S::kStages - 1;
      auto load_next = [&] {
        if (next < num_stage_tiles) load_stage(next, next % S::kStages);
        cp_async_commit();
      };
      if constexpr (!Tile::kWgmma) load_next();

#pragma unroll
      for (int sub = 0; sub < kStageKTiles; ++sub) {
        if (it * kStageKTiles + sub >= num_tiles) break;  // the block's last stage tile may be partial
        const char* sA = smem + (it % S::kStages) * S::kStageBytes + sub * S::kKTileBytes;
        if constexpr (Tile::kWgmma) {
          // The next copies go out while the wgmma ops run: nothing in flight reads that stage.
          wgmma_k_tile<Policy, S>(acc[0], sA, a_lane_offset, e_lane_offset, load_next);
        } else {
          mma_k_tile<Policy, S>(acc, sA, a_lane_offset, b_lane_offset, e_lane_offset, x_rows - warp_m * S::kWarpM);
        }
      }
    }
    cp_async_wait_all();
  }

  const int g = lane >> 2, t = lane & 3;
  if constexpr (Tile::kSplitK) {
    if (splits > 1) {
      // Split-K: raw partial sums into workspace [split][m][n]. The last split of this tile to
      // arrive (any of them: blocks run in no fixed order) replaces its accumulators with the
      // sums of all splits, in split order (deterministic), and goes on to the ordinary epilogue;
      // the others are done. No second kernel. The partials of other blocks are read past L1
      // (load_global_cg): they were written during this launch.
      Acc* partials = static_cast<Acc*>(p.workspace);
      const int64_t split_stride = partial_rows(p) * p.N;
      // visit(i, j, r, offset) for each element acc[i][j][r] of A tiles i0 .. i0 + tiles - 1 inside
      // Y, at offset m N + n of its output row n and column m (mma's C fragment: rows g, g + 8;
      // columns 2t, 2t + 1). Tail rows and columns are neither stored nor read back.
      auto for_each_output_of = [&](int i0, int tiles, auto&& visit) {
#pragma unroll
        for (int i = i0; i < i0 + tiles; ++i)
#pragma unroll
          for (int j = 0; j < S::kTilesM; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
              const int64_t n = n0 + warp_n * S::kWarpN + i * 16 + g + 8 * (r >> 1);
              const int64_t m = m0 + warp_m * S::kWarpM + j * 8 + 2 * t + (r & 1);
              if (n < p.N && m < p.M) visit(i, j, r, m * p.N + n);
            }
      };
      for_each_output_of(0, S::kTilesN, [&](int i, int j, int r, int64_t offset) {
        partials[split * split_stride + offset] = acc[i][j][r];
      });
      // One counter per output tile (of each group: blockIdx.z / splits, 0 for one GEMM).
      const int64_t tile_index = (int64_t(blockIdx.z) / splits * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
      if (!arrived_last(p.tile_counters + tile_index, splits, split_token, smem)) return;
      // Split-major: per split, the loads of all this thread's elements (of the A tiles summed
      // together, below) are independent and in flight together. Reading one element's splits as a chain of L2 round
      // trips made the tail cost ~10 us at M = 16, split 8 (H200); unrolling the split loop by 4
      // measured the same as this and took 107-128 registers (80 without). Each sum still adds the
      // splits in order, so the result keeps its bits. At most two A tiles at a time (16
      // elements a thread): the mid-M tile's four at once, their sums and 64-bit offsets, spilled
      // at its 128 registers (ptxas, nvcc 13.0); the other split tiles have one.
      constexpr int kReduceTilesN = S::kTilesN < 2 ? S::kTilesN : 2;
      static_assert(S::kTilesN % kReduceTilesN == 0, "whole groups of A tiles");
#pragma unroll
      for (int i0 = 0; i0 < S::kTilesN; i0 += kReduceTilesN) {
        typename Policy::PartialSum sums[kReduceTilesN][S::kTilesM][4] = {};
        const Acc* split_partials = partials;
#pragma unroll 1
        for (int other = 0; other < splits; ++other, split_partials += split_stride)
          for_each_output_of(i0, kReduceTilesN, [&](int i, int j, int r, int64_t offset) {
            sums[i - i0][j][r] += load_global_cg(split_partials + offset);
          });
#pragma unroll
        for (int i = 0; i < kReduceTilesN; ++i)
#pragma unroll
          for (int j = 0; j < S::kTilesM; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i0 + i][j][r] = Policy::saturate(sums[i][j][r]);
      }
    }
  }

  // Epilogue: dequantize + bias + activation in fp32, one rounding to the output type,
  // transposed into Ys, then 16-byte stores along N. Gated (format.h): rows g and g + 8 of each
  // 16-row MMA tile are a gate and its up row, both in this thread's fragment; their product
  // goes to output column (16-row tile) / 2 + g, so Ys and Y hold half as many columns.
  __syncthreads();  // every warp is done reading the pipeline stages that Ys overwrites
  // The epilogue's GEMM fields: p's, derived again for a grouped block (its row offsets read again,
  // its pointers rebuilt) rather than held in registers through the main loop.
  const auto& epi = block_gemm<XLoader>(params);
  using T = typename Out::Storage;
  T* ys = reinterpret_cast<T*>(smem);
  const T* bias = static_cast<const T*>(epi.bias);
  float x_scales[S::kTilesM][2];
#pragma unroll
  for (int j = 0; j < S::kTilesM; ++j)
#pragma unroll
    for (int col = 0; col < 2; ++col)
      x_scales[j][col] = scale_at<Policy>(epi.x_scale, m0 + warp_m * S::kWarpM + j * 8 + 2 * t + col, epi.M);
  if (epi.gated) {
#pragma unroll
    for (int i = 0; i < S::kTilesN; ++i) {
      const int n_local = warp_n * S::kWarpN + i * 16 + g;
      const int64_t n_gate = n0 + n_local, n_up = n_gate + kGateRows;  // N % 16 == 0: both in or both out
      const bool read_bias = bias != nullptr && n_gate < epi.N;
      const float bias_gate = read_bias ? Out::to_float(bias[n_gate]) : 0.f;
      const float bias_up = read_bias ? Out::to_float(bias[n_up]) : 0.f;
      const float w_scale_gate = scale_at<Policy>(epi.w_scale, n_gate, epi.N);
      const float w_scale_up = scale_at<Policy>(epi.w_scale, n_up, epi.N);
      const int out_local = (n_local - g) / 2 + g;
#pragma unroll
      for (int j = 0; j < S::kTilesM; ++j)
#pragma unroll
        for (int col = 0; col < 2; ++col) {
          const int m_local = warp_m * S::kWarpM + j * 8 + 2 * t + col;
          const float gate = epilogue_value<Policy>(acc[i][j][col], w_scale_gate, x_scales[j][col], bias != nullptr,
                                                    bias_gate, epi.act);
          const float up = epilogue_value<Policy>(acc[i][j][2 + col], w_scale_up, x_scales[j][col], bias != nullptr,
                                                  bias_up, Activation::none);
          ys[m_local * S::kEpilogueStride + out_local] = Out::from_float(mul_rn(gate, up));
        }
    }
  } else {
#pragma unroll
    for (int i = 0; i < S::kTilesN; ++i)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int n_local = warp_n * S::kWarpN + i * 16 + g + 8 * half;
        const int64_t n = n0 + n_local;
        const float bias_n = (bias != nullptr && n < epi.N) ? Out::to_float(bias[n]) : 0.f;
        const float w_scale_n = scale_at<Policy>(epi.w_scale, n, epi.N);
#pragma unroll
        for (int j = 0; j < S::kTilesM; ++j)
#pragma unroll
          for (int col = 0; col < 2; ++col) {
            const int m_local = warp_m * S::kWarpM + j * 8 + 2 * t + col;
            ys[m_local * S::kEpilogueStride + n_local] = Out::from_float(epilogue_value<Policy>(
                acc[i][j][2 * half + col], w_scale_n, x_scales[j][col], bias != nullptr, bias_n, epi.act));
          }
      }
  }
  __syncthreads();
  T* y = static_cast<T*>(epi.y);
  // Output columns of this block and of Y: half of the W rows when gated.
  const int out_shift = epi.gated ? 1 : 0;
  const int row_chunks = (S::kBlockN / 8) >> out_shift;
  const int64_t out_n0 = n0 >> out_shift, out_cols = epi.N >> out_shift;
  for (int c = tid; c < S::kBlockM * row_chunks; c += S::kThreads) {
    const int m_local = c / row_chunks, chunk = c % row_chunks;
    const int64_t m = m0 + m_local, n = out_n0 + chunk * 8;
    if (m >= epi.M || n >= out_cols) continue;
    const auto& row = *reinterpret_cast<const ElementPack<T, 8>*>(ys + m_local * S::kEpilogueStride + chunk * 8);
    store_elements<T, 8>(y + m * epi.ldy + n, row.v, out_cols - n);
  }
}

}  // namespace SG_KERNEL_NS
}  // namespace sparsegemm
