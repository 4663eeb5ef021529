// Dynamic per-token INT8 quantisation of the activations, the first half of the INT8 GEMM
// (the INT8 contract of the project, followed to the bit by the CPU path):
//   amax[m]    = max |X[m, 0:K]| in fp32 (a NaN anywhere in the row makes it NaN)
//   x_scale[m] = amax[m] / 127 (correctly rounded), or 1 where that is 0 (amax 0, or below 127 x 2^-150)
//   X_q[m, k]  = clamp(rint(X[m, k] / x_scale[m]), -127, 127), NaN -> 0
// One block per row (grid-stride over rows): a block-wide max, then one pass that writes X_q.
#pragma once
#include <cstdint>

#include "../format.h"
#include "arch/portability.cuh"
#include "arch/warp_ops.cuh"
#include "element.cuh"
#include "fp_exact.cuh"

namespace sparsegemm {
namespace SG_KERNEL_NS {

constexpr int kQuantizeThreads = 256;

// Block (blockIdx.x): rows blockIdx.x, + gridDim.x, ... Dynamic shared memory: one float per warp.
// x: X[M, K] of kInDType with row stride ldx; x_q: int8 [M, K] contiguous; x_scale: float[M].
template <DType kInDType>
SG_GLOBAL void SG_LAUNCH_BOUNDS(kQuantizeThreads)
    quantize_rows_kernel(int64_t M, int64_t K, const void* x, int64_t ldx, int8_t* x_q, float* x_scale) {
  using Traits = ElementTraits<kInDType>;
  using T = typename Traits::Storage;
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
    for (int64_t k = threadIdx.x; k < K; k += kQuantizeThreads)
      amax = max_propagate_nan(amax, fabsf(Traits::to_float(row[k])));
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
    for (int64_t k = threadIdx.x; k < K; k += kQuantizeThreads)
      out[k] = round_to_int8(div_rn(Traits::to_float(row[k]), scale));
  }
}

}  // namespace SG_KERNEL_NS
}  // namespace sparsegemm
