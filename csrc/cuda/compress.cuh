// Prune + compress (W -> Wc + logical E) and decompress (Wc + logical E -> W), the logical
// format of csrc/format.h, bit for bit the CPU backend's rules:
//   - the two largest |w| of a group are kept, NaN beats every number, ties go to the lower
//     index (format.h's integer ordering keys and select rule, shared with the CPU backend;
//     16-bit types take the equivalent max network of choose_group16);
//   - "non-zero" is tested by value, so -0.0 counts as zero in the strict 2:4 check;
//   - a partial last group (K % 4 != 0) reads zeros past K; an odd group count leaves the pad
//     nibble 0x4 in the high half of a row's last byte.
// Memory bound: one thread per byte of E, i.e. two groups = 8 consecutive elements of W, read
// with one 16-byte load for 16-bit types (two for f32) when in bounds and aligned; consecutive
// threads take consecutive bytes of a row, so a warp reads 512 contiguous bytes.
#pragma once
#include <cstdint>

#include "../format.h"
#include "../params.h"
#include "arch/portability.cuh"
#include "element.cuh"

namespace sparsegemm {
namespace SG_KERNEL_NS {

// Threads per block of the element-wise kernels in this file.
constexpr int kElementwiseThreads = 256;

// Strict-mode result before the scan: larger than every real index, so atomicMin works; the
// finish kernel turns it back into the -1 of the contract.
constexpr long long kNoBadGroup = 0x7fffffffffffffffLL;

SG_GLOBAL void first_bad_group_init_kernel(long long* first_bad_group) { *first_bad_group = kNoBadGroup; }

SG_GLOBAL void first_bad_group_finish_kernel(long long* first_bad_group) {
  if (*first_bad_group == kNoBadGroup) *first_bad_group = -1;
}

// Visits the bytes of E that thread (blockIdx, threadIdx) owns in a grid-stride loop over the
// N * meta_cols(K) bytes (row-major), as visit(row, byte). Steps (row, byte) by the stride's
// quotient and remainder instead of dividing every index: the division the GPU emulates in software
// was a sixth of compress's instructions, and compress is issue bound (Nsight Compute on H200:
// 81% SM, 49% DRAM throughput). 32-bit indices: ops.py refuses weights past 2^31 elements for the
// kernels, so the byte count is below 2^31 and idx + stride (stride <= 2^20) cannot wrap (64-bit
// division was worse still: 85% SM, 24% DRAM).
template <typename Visit>
SG_DEVICE void for_each_meta_byte(int64_t N, int64_t K, Visit&& visit) {
  const uint32_t row_bytes = static_cast<uint32_t>(meta_cols(K));
  const uint32_t total = static_cast<uint32_t>(N * meta_cols(K));
  if (total == 0) return;  // K = 0: no row bytes to divide by
  const uint32_t stride = gridDim.x * blockDim.x;
  const uint32_t stride_rows = stride / row_bytes, stride_bytes = stride - stride_rows * row_bytes;
  uint32_t idx = blockIdx.x * blockDim.x + threadIdx.x;
  uint32_t row = idx / row_bytes, byte = idx - row * row_bytes;
  for (; idx < total; idx += stride) {
    visit(static_cast<int64_t>(row), static_cast<int64_t>(byte));
    row += stride_rows;
    byte += stride_bytes;
    if (byte >= row_bytes) {
      byte -= row_bytes;
      ++row;
    }
  }
}

// format.h's rule for one group of 16-bit elements in two words (element i in bits
// [16 (i % 2), +16) of word i / 2), by a max network on rank = key << 2 | (3 - i) instead of the
// pairwise ranks of format.h's kept_positions: a third of the instructions. The rank is distinct
// per position and orders as the rule does (the larger key first, ties to the lower index); keys
// are below 2^15, so it fits 32 bits.
struct GroupChoice {
  uint32_t kept;       // the kept elements: i0's in bits [15:0], i1's in [31:16] (their order in Wc)
  uint32_t nibble;     // i0 | i1 << 2
  bool more_than_two;  // a third non-zero element (strict mode's error)
};

template <DType kDType>
SG_DEVICE GroupChoice choose_group16(uint32_t lo, uint32_t hi) {
  const uint32_t r0 = (ordering_key<kDType>(lo & 0xFFFF) << 2) | 3, r1 = (ordering_key<kDType>(lo >> 16) << 2) | 2;
  const uint32_t r2 = (ordering_key<kDType>(hi & 0xFFFF) << 2) | 1, r3 = ordering_key<kDType>(hi >> 16) << 2;
  const uint32_t high01 = max(r0, r1), low01 = min(r0, r1), high23 = max(r2, r3), low23 = min(r2, r3);
  const uint32_t lesser_high = min(high01, high23), greater_low = max(low01, low23);
  const uint32_t first = max(high01, high23), second = max(lesser_high, greater_low);
  const uint32_t third = min(lesser_high, greater_low);
  const uint32_t p = 3 - (first & 3), q = 3 - (second & 3);
  const uint32_t i0 = min(p, q), i1 = max(p, q);
  // Bytes 2 i0, 2 i0 + 1, 2 i1, 2 i1 + 1 of {lo, hi}.
  return {byte_perm(lo, hi, 0x1010 + 0x22 * i0 + 0x2200 * i1), i0 | (i1 << 2), third > 3};
}

// One byte of E: groups 2 byte and 2 byte + 1 of W row `row`, whose 8 elements (zeros past K)
// are `elems`; writes the kept values and the metadata byte, and in strict mode (kStrict,
// p.prune false) reports a group with more than two non-zeros. A template parameter so that
// prune mode, the common one, carries none of the check's instructions.
template <DType kDType, bool kStrict>
SG_DEVICE void compress_byte(const CompressParams& p, int64_t row, int64_t byte,
                             const typename ElementTraits<kDType>::Storage (&elems)[8]) {
  using T = typename ElementTraits<kDType>::Storage;
  const int64_t groups = num_groups(p.K);
  const int groups_here = (2 * byte + 1 < groups) ? 2 : 1;
  uint8_t meta_byte;
  [[maybe_unused]] bool bad[2];  // read in strict mode only
  T* values = static_cast<T*>(p.values) + row * values_cols(p.K) + byte * 4;
  if constexpr (sizeof(T) == 2) {
    const GroupChoice low = choose_group16<kDType>(pack_u16x2(elems[0], elems[1]), pack_u16x2(elems[2], elems[3]));
    const GroupChoice high = choose_group16<kDType>(pack_u16x2(elems[4], elems[5]), pack_u16x2(elems[6], elems[7]));
    // The high nibble stays the pad nibble when group 2 byte + 1 is padding.
    meta_byte = static_cast<uint8_t>(low.nibble | ((groups_here == 2 ? high.nibble : kPadNibble) << 4));
    bad[0] = low.more_than_two;
    bad[1] = groups_here == 2 && high.more_than_two;
    const uint32_t kept[2] = {low.kept, high.kept};
    store_elements<uint32_t, 2>(reinterpret_cast<uint32_t*>(values), kept, groups_here);
  } else {
    T kept[4];
    meta_byte = kPadNibble << 4;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      bad[half] = false;
      if (half == 1 && groups_here == 1) continue;
      uint32_t key[4];
      int nonzeros = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        // Integer keys (format.h): no float conversion, and key 0 is exactly +-0.0 (NaN is non-zero).
        key[i] = ordering_key<kDType>(storage_bits(elems[4 * half + i]));
        nonzeros += key[i] != 0 ? 1 : 0;
      }
      const unsigned kept_mask = kept_positions(key);
      const uint8_t nibble = nibble_of_kept(kept_mask);
      // Selects with the mask's bits rather than the nibble's indices: nvcc turned the
      // index-comparison form into an indexed local-memory load (16-byte stack frame).
      const T* e = elems + 4 * half;
      kept[2 * half] = (kept_mask & 1u) ? e[0] : (kept_mask & 2u) ? e[1] : e[2];
      kept[2 * half + 1] = (kept_mask & 8u) ? e[3] : (kept_mask & 4u) ? e[2] : e[1];
      meta_byte = half == 0 ? static_cast<uint8_t>((meta_byte & 0xF0) | nibble)
                            : static_cast<uint8_t>((meta_byte & 0x0F) | (nibble << 4));
      bad[half] = nonzeros > 2;
    }
    store_elements<T, 4>(values, kept, 2 * groups_here);
  }
  p.meta[row * meta_cols(p.K) + byte] = meta_byte;
  if constexpr (kStrict) {
    if (bad[0] || bad[1])
      atomicMin(reinterpret_cast<long long*>(p.first_bad_group), row * groups + 2 * byte + (bad[0] ? 0 : 1));
  }
}

// p: see CompressParams (params.h). One byte of E per thread and iteration: two bytes with both
// loads issued first measured 11% slower on H200 (88.7 vs 79.7 us for 8192 x 8192 fp16).
template <DType kDType, bool kStrict>
SG_GLOBAL void compress_kernel(CompressParams p) {
  using T = typename ElementTraits<kDType>::Storage;
  const T* w = static_cast<const T*>(p.w);
  for_each_meta_byte(p.N, p.K, [&](int64_t row, int64_t byte) {
    T elems[8];
    load_elements<T, 8>(elems, w + row * p.ldw + byte * 8, p.K - byte * 8);
    compress_byte<kDType, kStrict>(p, row, byte, elems);
  });
}

// Grid-stride over the N * meta_cols(K) bytes of E; writes W[N, K] contiguous.
template <DType kDType>
SG_GLOBAL void decompress_kernel(DecompressParams p) {
  using T = typename ElementTraits<kDType>::Storage;
  const int64_t groups = num_groups(p.K);
  const T* values = static_cast<const T*>(p.values);
  T* w = static_cast<T*>(p.w);
  for_each_meta_byte(p.N, p.K, [&](int64_t row, int64_t byte) {
    const int groups_here = (2 * byte + 1 < groups) ? 2 : 1;
    T kept[4];
    load_elements<T, 4>(kept, values + row * values_cols(p.K) + byte * 4, 2 * groups_here);
    const uint8_t meta_byte = p.meta[row * meta_cols(p.K) + byte];
    T elems[8];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int nibble = half < groups_here ? (meta_byte >> (4 * half)) & 0xF : 0;
      const int i0 = nibble & 3, i1 = nibble >> 2;
      // A select per position with constant indices (no computed index into elems, which nvcc
      // would place in local memory).
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        elems[4 * half + i] = (half < groups_here && i == i0) ? kept[2 * half]
                              : (half < groups_here && i == i1) ? kept[2 * half + 1] : T(0);
      }
    }
    store_elements<T, 8>(w + row * p.K + byte * 8, elems, p.K - byte * 8);
  });
}

}  // namespace SG_KERNEL_NS
}  // namespace sparsegemm
