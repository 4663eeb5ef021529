// Element types of the kernels and the vectorised global-memory helpers they share.
// 16-bit floats travel as their uint16_t bits (the arch layer converts them), so one kernel
// source serves nvcc and the host compiler of the SIMT emulator.
#pragma once
#include <cstdint>

#include "../format.h"
#include "arch/portability.cuh"

namespace sparsegemm {
namespace SG_KERNEL_NS {

// Storage type and conversions of one DType. Only float types: the int8 path has its own traits.
template <DType kDType> struct ElementTraits;

template <> struct ElementTraits<DType::f32> {
  using Storage = float;
  static SG_DEVICE float to_float(float v) { return v; }
  static SG_DEVICE float from_float(float v) { return v; }
};
template <> struct ElementTraits<DType::f16> {
  using Storage = uint16_t;
  static SG_DEVICE float to_float(uint16_t v) { return f16_to_f32(v); }
  static SG_DEVICE uint16_t from_float(float v) { return f32_to_f16_rn(v); }
};
template <> struct ElementTraits<DType::bf16> {
  using Storage = uint16_t;
  static SG_DEVICE float to_float(uint16_t v) { return bf16_to_f32(v); }
  static SG_DEVICE uint16_t from_float(float v) { return f32_to_bf16_rn(v); }
};

// kCount elements moved as one aligned vector access (one 16-byte access for 8 x 16-bit).
template <typename T, int kCount> struct alignas(sizeof(T) * kCount) ElementPack {
  T v[kCount];
};

// dst[i] <- src[i] for i < valid, 0 beyond: one vector load when all kCount are in bounds and
// the address is aligned for it, otherwise element loads that never touch src[valid..].
template <typename T, int kCount>
SG_DEVICE void load_elements(T (&dst)[kCount], const T* src, int64_t valid) {
  if (valid >= kCount && reinterpret_cast<uintptr_t>(src) % sizeof(ElementPack<T, kCount>) == 0) {
    const ElementPack<T, kCount> pack = *reinterpret_cast<const ElementPack<T, kCount>*>(src);
#pragma unroll
    for (int i = 0; i < kCount; ++i) dst[i] = pack.v[i];
    return;
  }
#pragma unroll
  for (int i = 0; i < kCount; ++i) dst[i] = i < valid ? src[i] : T(0);
}

// dst[i] <- src[i] for i < valid, as one vector store when possible (same rule as above).
template <typename T, int kCount>
SG_DEVICE void store_elements(T* dst, const T (&src)[kCount], int64_t valid) {
  if (valid >= kCount && reinterpret_cast<uintptr_t>(dst) % sizeof(ElementPack<T, kCount>) == 0) {
    ElementPack<T, kCount> pack;
#pragma unroll
    for (int i = 0; i < kCount; ++i) pack.v[i] = src[i];
    *reinterpret_cast<ElementPack<T, kCount>*>(dst) = pack;
    return;
  }
#pragma unroll
  for (int i = 0; i < kCount; ++i)
    if (i < valid) dst[i] = src[i];
}

}  // namespace SG_KERNEL_NS
}  // namespace sparsegemm
