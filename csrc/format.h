// The logical (canonical) 2:4 format, host and device. This file and sparsegemm/format.py are the
// only two places that spell it out; everything else calls these helpers.
//
//   W[N, K]    dense weight, 2:4 along K: every aligned group of 4 K-elements keeps at most 2.
//   Kp         = round_up(K, 4); a partial last group is padded with zeros (true K is kept apart).
//   G          = Kp / 4 groups per row.
//   Wc[N, Kp/2] kept values, two per group, in K order: Wc[n, 2g + j] = W[n, 4g + i_j].
//   E[N, ceil(G/2)] uint8 metadata: byte b holds group 2b in bits [3:0] and group 2b+1 in [7:4];
//              a group's nibble is i0 | i1 << 2 with 0 <= i0 < i1 <= 3 (the six legal pairs,
//              nibbles 0x4 0x8 0x9 0xC 0xD 0xE: the order mma.sp::ordered_metadata requires).
//              When G is odd the unused high nibble of a row's last byte is 0x4 (canonical).
//   Groups with fewer than two non-zeros still name two distinct indices (their values are 0):
//   the selection rule is the magnitude rule below, so compress and mask always agree.
//
// Selection (mask_2to4 and compress): the two largest |w| of a group are kept; NaN counts as
// larger than every number (so a NaN is never silently dropped); ties go to the lower index.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SG_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SG_HOST_DEVICE inline
#endif

namespace sparsegemm {

// Element types crossing the C++ boundary. Values mirror sparsegemm/format.py DTYPE_CODES.
enum class DType : int32_t { f32 = 0, f16 = 1, bf16 = 2, i8 = 3 };

// Fused epilogue activation. gelu is the exact erf form (torch.nn.functional.gelu's default).
enum class Activation : int32_t { none = 0, relu = 1, gelu = 2, silu = 3 };

SG_HOST_DEVICE int64_t padded_k(int64_t K) { return (K + 3) / 4 * 4; }
SG_HOST_DEVICE int64_t num_groups(int64_t K) { return padded_k(K) / 4; }
SG_HOST_DEVICE int64_t values_cols(int64_t K) { return padded_k(K) / 2; }
SG_HOST_DEVICE int64_t meta_cols(int64_t K) { return (num_groups(K) + 1) / 2; }

SG_HOST_DEVICE uint8_t encode_group(int i0, int i1) { return static_cast<uint8_t>(i0 | (i1 << 2)); }

// Nibble of group `group` in one row of E.
SG_HOST_DEVICE int group_nibble(const uint8_t* meta_row, int64_t group) {
  return (meta_row[group >> 1] >> ((group & 1) * 4)) & 0xF;
}

SG_HOST_DEVICE bool nibble_is_ordered_pair(int nibble) {
  return (nibble & 3) < ((nibble >> 2) & 3);
}

// The canonical filler for the unused high nibble of a row with an odd number of groups.
constexpr uint8_t kPadNibble = 0x4;

// Choose the two kept positions of a group from ordering keys: larger key wins, lower index wins
// ties. key_is_nan[i] marks NaN, which beats every number. Returns the nibble (i0 < i1).
SG_HOST_DEVICE uint8_t select_top2(const float key[4]) {
  auto beats = [&](int a, int b) {  // does position a rank before position b?
    const bool na = key[a] != key[a], nb = key[b] != key[b];
    if (na != nb) return na;
    if (!na && key[a] != key[b]) return key[a] > key[b];
    return a < b;
  };
  int i0 = -1, i1 = -1;
  for (int i = 0; i < 4; ++i) {
    int rank = 0;
    for (int j = 0; j < 4; ++j) rank += (j != i && beats(j, i)) ? 1 : 0;
    if (rank < 2) {
      if (i0 < 0) i0 = i; else i1 = i;
    }
  }
  return encode_group(i0, i1);
}

}  // namespace sparsegemm
