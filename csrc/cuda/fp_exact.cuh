// fp32 operations with one IEEE rounding each (round to nearest even), never fused: the INT8
// contract (quantize and GEMM epilogue) fixes the order of operations, so the CPU path, the
// emulator and the device agree bit for bit. nvcc would contract a*b + c into an FMA, hence the
// intrinsics on the device; on the host a volatile temporary stops the compiler from fusing.
#pragma once
#include <cmath>
#include <cstdint>

#include "arch/portability.cuh"

namespace sparsegemm {

SG_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDACC__)
  return __fmul_rn(a, b);
#else
  volatile float product = a * b;
  return product;
#endif
}

SG_DEVICE float add_rn(float a, float b) {
#if defined(__CUDACC__)
  return __fadd_rn(a, b);
#else
  volatile float sum = a + b;
  return sum;
#endif
}

// Correctly rounded division (the device's plain '/' may be approximate under --use_fast_math).
SG_DEVICE float div_rn(float a, float b) {
#if defined(__CUDACC__)
  return __fdiv_rn(a, b);
#else
  volatile float quotient = a / b;
  return quotient;
#endif
}

// max that propagates NaN from either side (fmaxf would drop it): a NaN row must give a NaN scale.
SG_DEVICE float max_propagate_nan(float a, float b) { return (a > b || a != a) ? a : b; }

// clamp(rint(v), -127, 127) as int8, rint rounding half to even; NaN -> 0.
SG_DEVICE int8_t round_to_int8(float v) {
  if (v != v) return 0;
  const float r = rintf(v);
  return static_cast<int8_t>(r > 127.f ? 127 : (r < -127.f ? -127 : static_cast<int>(r)));
}

}  // namespace sparsegemm
