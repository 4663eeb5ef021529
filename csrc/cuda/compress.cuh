// Prune + compress (W -> Wc + logical E) and decompress (Wc + logical E -> W), the logical
// format of csrc/format.h, bit for bit the CPU backend's rules:
//   - the two largest |w| of a group are kept, NaN beats every number, ties go to the lower
//     index (format.h select_top2 on integer ordering keys, shared with the CPU backend);
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

// One byte of E: groups 2 byte and 2 byte + 1 of W row `row`, whose 8 elements (zeros past K)
// are `elems`; writes the kept values and the metadata byte, and in strict mode reports a group
// with more than two non-zeros.
template <DType kDType>
SG_DEVICE void compress_byte(const CompressParams& p, int64_t row, int64_t byte,
                             const typename ElementTraits<kDType>::Storage (&elems)[8]) {
  using T = typename ElementTraits<kDType>::Storage;
  const int64_t groups = num_groups(p.K);
  T kept[4];
  uint8_t meta_byte = kPadNibble << 4;  // the high nibble stays 0x4 when group 2*byte+1 is padding
  int64_t bad = kNoBadGroup;
  const int groups_here = (2 * byte + 1 < groups) ? 2 : 1;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
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
    if (nonzeros > 2 && bad == kNoBadGroup) bad = row * groups + 2 * byte + half;
  }
  store_elements<T, 4>(static_cast<T*>(p.values) + row * values_cols(p.K) + byte * 4, kept, 2 * groups_here);
  p.meta[row * meta_cols(p.K) + byte] = meta_byte;
  if (!p.prune && bad != kNoBadGroup) atomicMin(reinterpret_cast<long long*>(p.first_bad_group), bad);
}

// Grid-stride over the N * meta_cols(K) bytes of E. p: see CompressParams (params.h).
// One byte of E per thread and iteration: two bytes with both loads issued first measured 11%
// slower on H200 (88.7 vs 79.7 us for 8192 x 8192 fp16).
template <DType kDType>
SG_GLOBAL void compress_kernel(CompressParams p) {
  using T = typename ElementTraits<kDType>::Storage;
  const T* w = static_cast<const T*>(p.w);
  // 32-bit index division: ops.py refuses weights past 2^31 elements for the kernels (so the
  // byte count is below 2^28 here), and the 64-bit division the GPU emulates in software made
  // this memory-bound kernel compute bound (Nsight Compute on H200: 85% SM, 24% DRAM throughput).
  const uint32_t row_bytes = static_cast<uint32_t>(meta_cols(p.K));
  const uint32_t total = static_cast<uint32_t>(p.N * meta_cols(p.K));
  for (uint32_t idx = blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += gridDim.x * blockDim.x) {
    const uint32_t row32 = idx / row_bytes;
    const int64_t row = row32, byte = idx - row32 * row_bytes;
    T elems[8];
    load_elements<T, 8>(elems, w + row * p.ldw + byte * 8, p.K - byte * 8);
    compress_byte<kDType>(p, row, byte, elems);
  }
}

// Grid-stride over the N * meta_cols(K) bytes of E; writes W[N, K] contiguous.
template <DType kDType>
SG_GLOBAL void decompress_kernel(DecompressParams p) {
  using T = typename ElementTraits<kDType>::Storage;
  const int64_t groups = num_groups(p.K);
  const int64_t bytes_per_row = meta_cols(p.K);
  const int64_t values_per_row = values_cols(p.K);
  const int64_t total = p.N * bytes_per_row;
  const T* values = static_cast<const T*>(p.values);
  T* w = static_cast<T*>(p.w);
  const uint32_t row_bytes = static_cast<uint32_t>(bytes_per_row);  // 32-bit division: see compress_kernel
  for (uint32_t idx = blockIdx.x * blockDim.x + threadIdx.x; idx < static_cast<uint32_t>(total);
       idx += gridDim.x * blockDim.x) {
    const uint32_t row32 = idx / row_bytes;
    const int64_t row = row32;
    const int64_t byte = idx - row32 * row_bytes;
    const int groups_here = (2 * byte + 1 < groups) ? 2 : 1;
    T kept[4];
    load_elements<T, 4>(kept, values + row * values_per_row + byte * 4, 2 * groups_here);
    const uint8_t meta_byte = p.meta[row * bytes_per_row + byte];
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
  }
}

}  // namespace SG_KERNEL_NS
}  // namespace sparsegemm
