// Scalar conversions between fp32 and the 16-bit storage formats (raw uint16_t bit patterns), and
// per-dtype traits for the CPU kernels. F16C builds use the hardware's fp16 instructions; the rest
// use the exact bit code of half_bits.h, which gives the same bits (fp16 and bf16 narrowing round
// to nearest even, overflow goes to infinity, NaN stays a quiet NaN with its sign and payload).
#pragma once
#include <cstdint>

#include "format.h"
#include "half_bits.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace sparsegemm {
namespace cpu {

inline float bf16_to_float(uint16_t b) { return half_bits::bf16_to_f32(b); }

inline uint16_t float_to_bf16(float f) { return half_bits::f32_to_bf16_rn(f); }

inline float f16_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return half_bits::f16_to_f32(h);
#endif
}

inline uint16_t float_to_f16(float f) {
#if defined(__F16C__)
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  return half_bits::f32_to_f16_rn(f);
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
