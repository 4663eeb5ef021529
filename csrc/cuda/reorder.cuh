// Logical E (format.h) -> the kernel layout of E that gemm_sp.cuh loads without any shuffling.
//
// Kernel layout (private to the CUDA kernels, never written to disk):
//   The weight is cut into A tiles of 16 rows (N) x 32 logical K, the operand of one
//   mma.sp.m16n8k32. Rows are padded to kMetaRowPad and K to kMetaKPad (a multiple of every
//   GEMM k-tile), padding groups carry the legal nibble 0x4 (their values are zero-filled by
//   the GEMM's loads), so a block never needs a bounds check on metadata.
//   Tile (tn, tk), tn < Npad / 16, tk < Kpad / 32, occupies the 16 uint32 words at
//       word offset (tn * (Kpad / 32) + tk) * 16,
//   word 2 * g + p (g = 0..7, p = 0..1) being what lane 4g + p passes to mma.sp with selector 0
//   (PTX_SPARSE.md "Metadata"): bits [15:0] = the 4 nibbles of row 16 tn + g for logical K
//   32 tk + 16 p .. + 15, bits [31:16] = the same for row 16 tn + g + 8. Lanes 4g + 2, 4g + 3
//   load the same words (their metadata is ignored with selector 0).
//   So one block's metadata for one 64-wide k-tile and one 16-row slice is 128 contiguous bytes.
//
// Int8 kernel layout (mma.sp m16n8k64 s8, selector 0: every lane supplies its own word, and the
// words are NOT the 16-bit ones extended, PTX_SPARSE.md "Fragments of mma.sp m16n8k64 s8"):
//   A tiles of 16 rows x 64 logical K; K is padded to kMetaKPadS8 (the int8 GEMM k-tile), rows to
//   kMetaRowPad, padding groups carry 0x4. Tile (tn, tk), tk < Kpad / 64, occupies the 32 words at
//       word offset (tn * (Kpad / 64) + tk) * 32,
//   word 4g + q (g = 0..7, q = 0..3) being lane 4g + q's register: the 8 nibbles of row
//   16 tn + g + 8 (q & 1) for logical K 64 tk + 32 (q >> 1) .. + 31, group n in nibble n.
//   One 128-wide int8 k-tile of a 16-row slice is 256 contiguous bytes.
#pragma once
#include <cstdint>

#include "../format.h"
#include "arch/portability.cuh"

namespace sparsegemm {
namespace SG_KERNEL_NS {

constexpr int64_t kMetaRowPad = 256;  // the largest GEMM block tile along N (gemm_tiles::WgmmaWideLargeM)
constexpr int64_t kMetaKPad = 64;     // the GEMM k-tile (logical K)
constexpr int64_t kMetaWordsPerTile = 16;
constexpr int64_t kMetaKPadS8 = 128;  // the int8 GEMM k-tile (logical K)
constexpr int64_t kMetaWordsPerTileS8 = 32;

SG_HOST_DEVICE int64_t meta_rows_padded(int64_t N) { return (N + kMetaRowPad - 1) / kMetaRowPad * kMetaRowPad; }
SG_HOST_DEVICE int64_t meta_k_padded(int64_t K) { return (padded_k(K) + kMetaKPad - 1) / kMetaKPad * kMetaKPad; }
SG_HOST_DEVICE int64_t meta_k_padded_s8(int64_t K) {
  return (padded_k(K) + kMetaKPadS8 - 1) / kMetaKPadS8 * kMetaKPadS8;
}

// Nibbles of groups first_group .. first_group + count - 1 of `row`, the first in bits [3:0]
// (padding rows and groups: kPadNibble). count = 4 gives a 16-bit half word, 8 an int8 word.
SG_DEVICE uint32_t meta_nibbles(const uint8_t* logical_meta, int64_t row, int64_t first_group, int count, int64_t N,
                                int64_t groups) {
  uint32_t half = 0;
  for (int n = 0; n < count; ++n) {
    const int64_t group = first_group + n;
    const int64_t bytes_per_row = (groups + 1) / 2;  // meta_cols(K)
    const int nibble = (row < N && group < groups) ? group_nibble(logical_meta + row * bytes_per_row, group)
                                                   : int(kPadNibble);
    half |= uint32_t(nibble) << (4 * n);
  }
  return half;
}

// One thread per kernel word, grid-stride. logical_meta: E[N, meta_cols(K)];
// kernel_meta: uint32[Npad / 16 * Kpad / 32 * 16].
SG_GLOBAL void reorder_meta_kernel(const uint8_t* logical_meta, uint32_t* kernel_meta, int64_t N, int64_t K) {
  const int64_t k_tiles = meta_k_padded(K) / 32;
  const int64_t total = meta_rows_padded(N) / 16 * k_tiles * kMetaWordsPerTile;
  const int64_t groups = num_groups(K);
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t tile = idx / kMetaWordsPerTile;
    const int word = static_cast<int>(idx % kMetaWordsPerTile);
    const int64_t tn = tile / k_tiles, tk = tile % k_tiles;
    const int g = word >> 1, p = word & 1;
    const int64_t row = tn * 16 + g;
    const int64_t first_group = tk * 8 + 4 * p;
    kernel_meta[idx] = meta_nibbles(logical_meta, row, first_group, 4, N, groups) |
                       (meta_nibbles(logical_meta, row + 8, first_group, 4, N, groups) << 16);
  }
}

// The int8 layout above. One thread per kernel word, grid-stride. logical_meta: E[N, meta_cols(K)];
// kernel_meta: uint32[Npad / 16 * Kpad / 64 * 32].
SG_GLOBAL void reorder_meta_s8_kernel(const uint8_t* logical_meta, uint32_t* kernel_meta, int64_t N, int64_t K) {
  const int64_t k_tiles = meta_k_padded_s8(K) / 64;
  const int64_t total = meta_rows_padded(N) / 16 * k_tiles * kMetaWordsPerTileS8;
  const int64_t groups = num_groups(K);
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t tile = idx / kMetaWordsPerTileS8;
    const int word = static_cast<int>(idx % kMetaWordsPerTileS8);
    const int64_t tn = tile / k_tiles, tk = tile % k_tiles;
    const int g = word >> 2, q = word & 3;
    kernel_meta[idx] = meta_nibbles(logical_meta, tn * 16 + g + 8 * (q & 1), tk * 16 + 8 * (q >> 1), 8, N, groups);
  }
}

}  // namespace SG_KERNEL_NS
}  // namespace sparsegemm
