// Dynamic per-token INT8 quantisation of the activations, the first half of the INT8 GEMM
// (the INT8 contract of the project, followed to the bit by the CPU path):
//   amax[m]    = max |X[m, 0:K]| in fp32 (a NaN anywhere in the row makes it NaN)
//   x_scale[m] = amax[m] / 127 (correctly rounded), or 1 where that is 0 (amax 0, or below 127 x 2^-150)
//   X_q[m, k]  = clamp(rint(X[m, k] / x_scale[m]), -127, 127), NaN -> 0
// One block per row (grid-stride over rows): a block-wide max, then one pass that writes X_q,
// both in 16-byte accesses where the row allows.
#pragma once
#include <cstdint>
#include <limits>

#include "../format.h"
#include "arch/portability.cuh"
#include "arch/warp_ops.cuh"
#include "element.cuh"
#include "fp_exact.cuh"

namespace sparsegemm {
namespace SG_KERNEL_NS {

constexpr int kQuantizeThreads = 256;

// Elements of X one thread reads in one 16-byte access, and the accesses it issues before it
// waits for any. Why: a decode step quantizes one to 16 rows, one block each, so the GEMM behind
// it (which waits for this kernel) waits for one SM walking a row; read an element at a time, each
// thread's loads of a 4096-wide row went one after another, and on the H200 the INT8 decode call
// took 6 us longer than its GEMM (bench/results/2026-11-27-H200-run22: 1 x 11008 x 4096 18.9
// against 12.9 us).
template <typename T>
constexpr int kQuantizeVector = 16 / static_cast<int>(sizeof(T));
constexpr int kQuantizeLoadsInFlight = 4;

// One thread's round of a row's reads: vectors first, first + kQuantizeThreads x kVector, ...,
// kQuantizeLoadsInFlight of them, all issued before any is used (zeros past K, never read).
template <typename T, int kVector>
SG_DEVICE void load_row_round(T (&v)[kQuantizeLoadsInFlight][kVector], const T* row, int64_t first, int64_t K) {
#pragma unroll
  for (int i = 0; i < kQuantizeLoadsInFlight; ++i) {
    const int64_t k = first + int64_t(i) * kQuantizeThreads * kVector;
    load_elements(v[i], row + k, k < K ? K - k : 0);
  }
}

// Block (blockIdx.x): rows blockIdx.x, + gridDim.x, ... Dynamic shared memory: one float per warp.
// x: X[M, K] of kInDType with row stride ldx; x_q: int8 [M, K] contiguous; x_scale: float[M].
// Thread t reads the vectors t, t + kQuantizeThreads, ... of a row (16-byte loads where the row
// is aligned for them, element loads otherwise: load_elements), for the row's max and again to
// write X_q, which the first pass has left in L1.
template <DType kInDType>
SG_GLOBAL void SG_LAUNCH_BOUNDS(kQuantizeThreads)
    quantize_rows_kernel(int64_t M, int64_t K, const void* x, int64_t ldx, int8_t* x_q, float* x_scale) {
  using Traits = ElementTraits<kInDType>;
  using T = typename Traits::Storage;
  constexpr int kVector = kQuantizeVector<T>;
  constexpr int64_t kStride = int64_t(kQuantizeThreads) * kVector;  // elements a block reads per access round
  SG_DYNAMIC_SMEM(float, warp_max);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int kWarps = kQuantizeThreads / 32;
  // A dependent launch (launch_quantize_rows): X is the previous kernel's output. Then the GEMM
  // that reads this kernel's output may launch and prefetch its weights while the rows are quantized.
  grid_dependency_wait();
  launch_dependent_grids();
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    const T* row = static_cast<const T*>(x) + m * ldx;
    float amax = 0.f;
    for (int64_t first = int64_t(threadIdx.x) * kVector; first < K; first += kStride * kQuantizeLoadsInFlight) {
      T v[kQuantizeLoadsInFlight][kVector];
      load_row_round(v, row, first, K);
#pragma unroll
      for (int i = 0; i < kQuantizeLoadsInFlight; ++i)
#pragma unroll
        for (int j = 0; j < kVector; ++j) amax = max_propagate_nan(amax, fabsf(Traits::to_float(v[i][j])));
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
      amax = max_propagate_nan(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, offset));
    if (lane == 0) warp_max[warp] = amax;
    __syncthreads();
    amax = warp_max[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) amax = max_propagate_nan(amax, warp_max[w]);
    // Every thread has read warp_max before the next row's writes to it.
    __syncthreads();
    const float quotient = div_rn(amax, 127.f);
    const float scale = quotient == 0.f ? 1.f : quotient;  // all zeros, or too small for fp32
    if (threadIdx.x == 0) x_scale[m] = scale;
    int8_t* out = x_q + m * K;
    for (int64_t k = int64_t(threadIdx.x) * kVector; k < K; k += kStride) {
      T v[kVector];
      load_elements(v, row + k, K - k);
      int8_t q[kVector];
#pragma unroll
      for (int j = 0; j < kVector; ++j) q[j] = round_to_int8(div_rn(Traits::to_float(v[j]), scale));
      store_elements(out + k, q, K - k);
    }
  }
}

// The group of row m in a grouped launch (quantize_rows_static_kernel): how many of
// row_offsets[1 .. groups] are at or below m, at most groups - 1; every thread of the block gets
// it. The block's threads read the offsets at once (one round for up to kQuantizeThreads groups),
// not one after another as a search would. warp_count: one int per warp of shared memory, free
// on entry and on return.
SG_DEVICE int64_t group_of_row(const int64_t* row_offsets, int64_t groups, int64_t m, int* warp_count) {
  constexpr int kWarps = kQuantizeThreads / 32;
  int count = 0;
  for (int64_t g = int64_t(threadIdx.x) + 1; g <= groups; g += kQuantizeThreads) count += row_offsets[g] <= m;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) count += __shfl_xor_sync(0xFFFFFFFFu, count, offset);
  if ((threadIdx.x & 31) == 0) warp_count[threadIdx.x >> 5] = count;
  __syncthreads();
  int64_t total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += warp_count[w];
  __syncthreads();  // every thread has read warp_count before its next use
  return total < groups ? total : groups - 1;
}

// Static INT8 quantisation: the scale calibrated beforehand (SparseLinear.set_input_scale; a
// grouped launch's experts one each) instead of found per row, as quant.quantize_static computes it:
//   X_q[m, k]  = clamp(rint(X[m, k] / s), -127, 127), NaN -> 0, where s is row m's scale
//   x_scale[m] = s, or NaN where row m holds a NaN or an infinity (its output row is then NaN, as
//                in dynamic mode, rather than zeros and saturated values)
// One pass over X (the quantized values do not depend on the row's other elements), in the
// accesses of quantize_rows_kernel. Why a kernel: those torch ops were nine launches a decode
// step, each as long as the GEMM's wait for it (and a grouped launch found each row's scale with
// four more).
// Block (blockIdx.x): rows blockIdx.x, + gridDim.x, ... Dynamic shared memory: one int per warp.
// scale: float on the device, read here (no host read of it: capturable): scale[0] for every row
// when row_offsets is null, else scale[g] for the rows of group g, g the number of offsets among
// row_offsets[1 .. groups] at or below the row (int64 [groups + 1], non-decreasing, on the device:
// the grouped GEMM's), the last group's for rows past every group, which it never writes.
template <DType kInDType>
SG_GLOBAL void SG_LAUNCH_BOUNDS(kQuantizeThreads)
    quantize_rows_static_kernel(int64_t M, int64_t K, const void* x, int64_t ldx, const float* scale,
                                const int64_t* row_offsets, int64_t groups, int8_t* x_q, float* x_scale) {
  using Traits = ElementTraits<kInDType>;
  using T = typename Traits::Storage;
  constexpr int kVector = kQuantizeVector<T>;
  constexpr int64_t kStride = int64_t(kQuantizeThreads) * kVector;
  SG_DYNAMIC_SMEM(int, warp_count);  // per warp: offsets at or below the row, then finite flags
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int kWarps = kQuantizeThreads / 32;
  grid_dependency_wait();  // as quantize_rows_kernel
  launch_dependent_grids();
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    const T* row = static_cast<const T*>(x) + m * ldx;
    int8_t* out = x_q + m * K;
    const float s = row_offsets == nullptr ? scale[0] : scale[group_of_row(row_offsets, groups, m, warp_count)];
    bool finite = true;
    for (int64_t first = int64_t(threadIdx.x) * kVector; first < K; first += kStride * kQuantizeLoadsInFlight) {
      T v[kQuantizeLoadsInFlight][kVector];
      load_row_round(v, row, first, K);
#pragma unroll
      for (int i = 0; i < kQuantizeLoadsInFlight; ++i) {
        const int64_t k = first + i * kStride;
        int8_t q[kVector];
#pragma unroll
        for (int j = 0; j < kVector; ++j) {
          const float value = Traits::to_float(v[i][j]);
          finite = finite && fabsf(value) <= std::numeric_limits<float>::max();  // false for NaN, +-inf
          q[j] = round_to_int8(div_rn(value, s));
        }
        if (k < K) store_elements(out + k, q, K - k);
      }
    }
    const unsigned not_finite = __ballot_sync(0xFFFFFFFFu, !finite);
    if (lane == 0) warp_count[warp] = not_finite == 0;
    __syncthreads();
    if (threadIdx.x == 0) {
      bool row_finite = true;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) row_finite = row_finite && warp_count[w];
      x_scale[m] = row_finite ? s : std::numeric_limits<float>::quiet_NaN();
    }
    // Thread 0 has read warp_count before the next row's writes to it.
    __syncthreads();
  }
}

}  // namespace SG_KERNEL_NS
}  // namespace sparsegemm
