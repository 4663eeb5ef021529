// Scalar conversions between fp32 and the 16-bit storage formats (raw uint16_t bit patterns), and
// per-dtype traits for the CPU kernels. Exact bit code, no compiler extensions, so the generic
// build gives the same bits as the F16C/AVX paths: fp16 and bf16 narrowing round to nearest even,
// overflow goes to infinity, NaN stays a (quiet) NaN with its sign.
#pragma once
#include <cstdint>
#include <cstring>

#include "format.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace sparsegemm {
namespace cpu {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float bf16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  // NaN: keep sign and top payload bits, force the quiet bit so truncation cannot make it an inf.
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  // Round to nearest even on the 16 dropped bits (a carry into the exponent is the correct result,
  // including the overflow to infinity).
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float f16_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  // Move exponent and mantissa into place, then fix the exponent bias; subnormal halves become
  // normal floats through one exact float subtraction (F. Giesen's half_to_float).
  constexpr uint32_t kShiftedExp = 0x7C00u << 13;
  uint32_t u = (static_cast<uint32_t>(h) & 0x7FFFu) << 13;
  const uint32_t exp = u & kShiftedExp;
  u += (127u - 15u) << 23;
  if (exp == kShiftedExp) {
    u += (128u - 16u) << 23;  // inf / NaN: exponent all ones
  } else if (exp == 0) {
    u += 1u << 23;
    u = float_bits(bits_float(u) - bits_float(113u << 23));
  }
  return bits_float(u | ((static_cast<uint32_t>(h) & 0x8000u) << 16));
#endif
}

inline uint16_t float_to_f16(float f) {
#if defined(__F16C__)
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  // F. Giesen's float_to_half_fast3_rtne: round to nearest even with integer adds in the normal
  // range and one float add (which rounds to nearest even by itself) in the subnormal range.
  uint32_t u = float_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t out;
  if (u >= (127u + 16u) << 23) {  // |f| >= 65536 (or inf/NaN): inf, or a quiet NaN
    out = u > 0x7F800000u ? 0x7E00u : 0x7C00u;
  } else if (u < 113u << 23) {  // result is a half subnormal or zero
    constexpr uint32_t kDenormMagic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    out = static_cast<uint16_t>(float_bits(bits_float(u) + bits_float(kDenormMagic)) - kDenormMagic);
  } else {
    const uint32_t mantissa_odd = (u >> 13) & 1u;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFu + mantissa_odd;
    out = static_cast<uint16_t>(u >> 13);
  }
  return static_cast<uint16_t>(out | (sign >> 16));
#endif
}

// Storage type and scalar conversions for each floating DType (i8 is not a CPU dtype here).
template <DType D>
struct ElemTraits;

template <>
struct ElemTraits<DType::f32> {
  using Storage = float;
  static float to_float(float v) { return v; }
  static float from_float(float v) { return v; }
};

template <>
struct ElemTraits<DType::f16> {
  using Storage = uint16_t;
  static float to_float(uint16_t v) { return f16_to_float(v); }
  static uint16_t from_float(float v) { return float_to_f16(v); }
};

template <>
struct ElemTraits<DType::bf16> {
  using Storage = uint16_t;
  static float to_float(uint16_t v) { return bf16_to_float(v); }
  static uint16_t from_float(float v) { return float_to_bf16(v); }
};

}  // namespace cpu
}  // namespace sparsegemm
