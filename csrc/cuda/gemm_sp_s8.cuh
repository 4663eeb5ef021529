// The INT8 sparse GEMM: gemm_sp.cuh's kernel with the m16n8k64 s8 MMA policy below.
//   Y[M, N] = act(((float)acc[m, n] * w_scale[n]) * x_scale[m] + bias[n])   (INT8 contract order)
//   acc[m, n] = sum_k X_q[m, k] * Wq[n, k], exact int32 (s32 accumulate, .satfinite)
// X_q: int8 [M, K] rows with stride ldx (quantize.cuh), Wq: int8 2:4, Wc int8 [N, Kp/2] and the
// int8 kernel metadata (reorder.cuh), w_scale[N] / x_scale[M] fp32, bias[N] and Y in Out (f16 or
// bf16, the caller's activation dtype).
//
// Saturation: the tensor core clamps each mma's s32 result (.satfinite), split-K partials are
// summed in int64 and clamped once (as the CPU path clamps its int64 sum). Both agree whenever no
// partial sum of one row leaves the int32 range on its way, which needs |X_q Wq| sums beyond
// 2^31: with |q| <= 127 that takes K > 2 * 2^31 / 127^2, about 266k, far past any layer.
#pragma once
#include <cstdint>

#include "../format.h"
#include "arch/warp_ops.cuh"
#include "element.cuh"
#include "fp_exact.cuh"
#include "gemm_heuristics.h"
#include "gemm_sp.cuh"
#include "reorder.cuh"

namespace sparsegemm {
namespace SG_KERNEL_NS {

// The policy interface is documented at Mma16 (gemm_sp.cuh). kOutDType: f16 or bf16.
template <DType kOutDType>
struct MmaS8 {
  using Operand = int8_t;
  using Acc = int32_t;
  using PartialSum = int64_t;
  using Out = ElementTraits<kOutDType>;
  static constexpr int kBlockK = gemm_tiles::kBlockKS8;
  static constexpr int kStepK = 64;
  static constexpr int kMetaWordsPerStep = int(kMetaWordsPerTileS8);
  static constexpr int64_t kMetaKPadding = kMetaKPadS8;
  static constexpr bool kScaled = true;
  static SG_HOST_DEVICE int64_t meta_steps(int64_t K) { return meta_k_padded_s8(K) / kStepK; }
  // Every lane supplies its own metadata word (reorder.cuh's int8 layout is in lane order).
  static SG_DEVICE int meta_word(int lane) { return lane; }
  static SG_DEVICE void mma(Acc (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e) {
    mma_sp_m16n8k64_s8(d, a, b, d, e);
  }
  template <typename WgmmaA>
  static SG_DEVICE void wgmma(Acc (&d)[16][4], const WgmmaA& a, uint64_t b_desc, const uint32_t& e) {
    wgmma_sp_m64n128k64_s8(d, a, b_desc, e);
  }
  static SG_DEVICE Acc saturate(PartialSum sum) {
    return sum > INT32_MAX ? INT32_MAX : (sum < INT32_MIN ? INT32_MIN : static_cast<Acc>(sum));
  }
  static SG_DEVICE float dequantize(Acc acc, float w_scale_n, float x_scale_m) {
    return mul_rn(mul_rn(static_cast<float>(acc), w_scale_n), x_scale_m);
  }
};

}  // namespace SG_KERNEL_NS
}  // namespace sparsegemm
