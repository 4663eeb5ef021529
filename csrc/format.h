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
#include <cmath>
#include <cstdint>
#include <cstring>

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

// Gated (GLU) epilogue: W's N rows hold a gate and an up projection interleaved in runs of
// kGateRows (rows 16q + r, r < 8: gate of output column 8q + r; rows 16q + 8 + r: its up row),
//   Y[m, 8q + r] = act(gate) * up,   Y has N / 2 columns, N a multiple of 2 kGateRows.
// Runs of 8 put a gate row and its up row in one thread's MMA accumulator fragment (rows g and
// g + 8 of a 16-row tile), so the kernel pairs them in registers. At the pybind boundary the
// flag is bit kGatedActivation of the activation code (GemmParams::gated inside): ReGLU, GEGLU,
// SwiGLU, or the bilinear GLU with Activation::none. Mirrored in sparsegemm/format.py.
constexpr int32_t kGatedActivation = 16;
constexpr int kGateRows = 8;

// The epilogue's activation of an fp32 pre-activation, one function for the CPU kernels, the CUDA
// kernels and the emulator (a runtime switch: one kernel instantiation serves every activation).
SG_HOST_DEVICE float apply_activation(float v, Activation act) {
  switch (act) {
    case Activation::relu: return v < 0.f ? 0.f : v;  // keeps NaN, as torch.relu does
    // 1 + erf(z) as erfc(-z): the sum cancels below v = -4 (57% off at -5.5, -0 from -6 on).
    case Activation::gelu: return 0.5f * v * erfcf(v * -0.70710678118654752f);
    // v sigmoid(v) with exp of a negative argument only: exp(-v) overflowed below v = -88.7, giving
    // -0 where silu is still a normal fp32 / bf16 number (-1.98e-37 at -89).
    case Activation::silu: {
      if (v >= 0.f) return v / (1.f + expf(-v));
      const float e = expf(v);
      return v * e / (1.f + e);
    }
    default: return v;
  }
}

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

// Ordering keys: the selection rule on integers (the GPU compress kernel, the CPU paths). A
// value's bit pattern with the sign cleared orders |w| for IEEE-style formats (-0.0 becomes
// +0.0, subnormals sit below the normals, +inf above every number), and every NaN pattern lies
// above +inf. All NaNs tie under the rule (the lower index wins), so each NaN key is clamped down
// to the smallest NaN pattern, its payload no longer ordering it. Key 0 means the value is +-0.0.
// Defined for the floating types only (an int8 weight is selected before it is quantized).
template <DType D>
struct OrderingKey;
template <>
struct OrderingKey<DType::f16> {
  static constexpr uint32_t kMagnitude = 0x7FFF;
  static constexpr uint32_t kFirstNan = 0x7C01;  // 5-bit exponent
};
template <>
struct OrderingKey<DType::bf16> {
  static constexpr uint32_t kMagnitude = 0x7FFF;
  static constexpr uint32_t kFirstNan = 0x7F81;  // 8-bit exponent, as f32
};
template <>
struct OrderingKey<DType::f32> {
  static constexpr uint32_t kMagnitude = 0x7FFFFFFF;
  static constexpr uint32_t kFirstNan = 0x7F800001;
};

// Storage bits of an element: the 16 bits of f16 / bf16 (held as uint16_t), the f32 pattern.
SG_HOST_DEVICE uint32_t storage_bits(uint16_t v) { return v; }
SG_HOST_DEVICE uint32_t storage_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}

// `bits`: the element's storage bits (f32 bit pattern, or the 16 bits of f16 / bf16).
template <DType D>
SG_HOST_DEVICE uint32_t ordering_key(uint32_t bits) {
  const uint32_t magnitude = bits & OrderingKey<D>::kMagnitude;
  return magnitude < OrderingKey<D>::kFirstNan ? magnitude : OrderingKey<D>::kFirstNan;
}

// The two kept positions of a group from ordering keys, as a 4-bit mask (bit i: position i is
// kept): position j beats position i when key_j > key_i, or key_j == key_i and j < i (a strict
// total order), and the kept positions are those beaten by fewer than two.
SG_HOST_DEVICE unsigned kept_positions(const uint32_t key[4]) {
  unsigned kept = 0;
  for (int i = 0; i < 4; ++i) {
    int rank = 0;
    for (int j = 0; j < 4; ++j) rank += (j < i ? key[j] >= key[i] : key[j] > key[i]) ? 1 : 0;
    kept |= (rank < 2 ? 1u : 0u) << i;
  }
  return kept;
}

// The nibble (i0 < i1) of a kept mask with two bits set.
SG_HOST_DEVICE uint8_t nibble_of_kept(unsigned kept) {
  const int i0 = (kept & 1u) ? 0 : (kept & 2u) ? 1 : 2;
  const int i1 = (kept & 8u) ? 3 : (kept & 4u) ? 2 : 1;
  return encode_group(i0, i1);
}

// The nibble of E the selection rule gives a group with these ordering keys.
SG_HOST_DEVICE uint8_t select_top2(const uint32_t key[4]) { return nibble_of_kept(kept_positions(key)); }

}  // namespace sparsegemm
