// Exact conversions between fp32 and the 16-bit float formats as raw uint16_t bit patterns, in
// portable host C++ (no torch, no CUDA, no compiler extensions). One implementation serves the CPU
// kernels' generic build (cpu/convert.h) and the SIMT emulator's host branch of
// cuda/arch/portability.cuh, and gives the bits of the hardware conversions (F16C vcvtps2ph /
// vcvtph2ps, CUDA's __float2half_rn and friends): round to nearest even, subnormals kept, overflow
// to infinity, NaN stays a quiet NaN with its sign and top payload bits.
#pragma once
#include <cstdint>
#include <cstring>

namespace sparsegemm {
namespace half_bits {

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

inline float bf16_to_f32(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

inline uint16_t f32_to_bf16_rn(float f) {
  const uint32_t u = float_bits(f);
  // NaN: keep sign and top payload bits, force the quiet bit so truncation cannot make it an inf.
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  // Round to nearest even on the 16 dropped bits (a carry into the exponent is the correct result,
  // including the overflow to infinity).
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float f16_to_f32(uint16_t h) {
  // Move exponent and mantissa into place, then fix the exponent bias; subnormal halves become
  // normal floats through one exact float subtraction (F. Giesen's half_to_float).
  constexpr uint32_t kShiftedExp = 0x7C00u << 13;
  uint32_t u = (static_cast<uint32_t>(h) & 0x7FFFu) << 13;
  const uint32_t exp = u & kShiftedExp;
  u += (127u - 15u) << 23;
  if (exp == kShiftedExp) {
    u += (128u - 16u) << 23;  // inf / NaN: exponent all ones, payload kept
  } else if (exp == 0) {
    u += 1u << 23;
    u = float_bits(bits_float(u) - bits_float(113u << 23));
  }
  return bits_float(u | ((static_cast<uint32_t>(h) & 0x8000u) << 16));
}

inline uint16_t f32_to_f16_rn(float f) {
  // F. Giesen's float_to_half_fast3_rtne: round to nearest even with integer adds in the normal
  // range and one float add (which rounds to nearest even by itself) in the subnormal range.
  uint32_t u = float_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t out;
  if (u >= (127u + 16u) << 23) {  // |f| >= 65536 (or inf/NaN): inf, or a quiet NaN with the top payload bits
    out = u > 0x7F800000u ? static_cast<uint16_t>(0x7E00u | ((u >> 13) & 0x3FFu)) : 0x7C00u;
  } else if (u < 113u << 23) {  // result is a half subnormal or zero
    constexpr uint32_t kDenormMagic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    out = static_cast<uint16_t>(float_bits(bits_float(u) + bits_float(kDenormMagic)) - kDenormMagic);
  } else {
    const uint32_t mantissa_odd = (u >> 13) & 1u;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFu + mantissa_odd;
    out = static_cast<uint16_t>(u >> 13);
  }
  return static_cast<uint16_t>(out | (sign >> 16));
}

}  // namespace half_bits
}  // namespace sparsegemm
