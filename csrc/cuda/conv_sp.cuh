// Implicit-GEMM 2:4 convolution (groups = 1) on the sparse tensor cores: gemm_sp_kernel with the
// B-operand loader below, which reads the NHWC input where an im2col matrix would have been.
//   Y[m, n] = act(sum_k X[m, k] W[n, k] + bias[n]),  m = (b, ho, wo), n = Cout, k = (ky, kx, c)
//   X[m, k] = x[b, ho * stride_h - pad_h + ky * dilation_h, wo * stride_w - pad_w + kx * dilation_w, c]
// (ConvParams in params.h). Y[M, N] is the NHWC output, so the GEMM epilogue (bias, activation,
// transposed 16-byte stores along Cout) is the convolution's unchanged, as are split-K, the
// pipeline and the swizzles: only the address of each 16-byte chunk of an X row differs.
//
// Addressing: channels % 8 == 0 (and a 16-byte aligned x) puts every 8-element chunk of K inside
// one tap, contiguous in x, so one cp.async of 16 bytes moves it, or zero-fills it (false
// predicate: nothing is read) where the tap falls outside the image or past K. Otherwise (e.g.
// the 3 channels of an RGB stem) each element finds its own tap with predicated element loads.
// All index arithmetic is 32-bit: ops.py keeps the input, output and M + kBlockM below 2^31.
#pragma once
#include <cstdint>

#include "../params.h"
#include "arch/portability.cuh"
#include "arch/warp_ops.cuh"
#include "element.cuh"
#include "gemm_sp.cuh"

namespace sparsegemm {
namespace SG_KERNEL_NS {

// The loader policy of gemm_sp.cuh (interface documented at RowMajorX) for NHWC input.
// Operand: the 16-bit element (f16 or bf16 bits).
template <typename Operand>
struct NhwcConvX {
  using Params = ConvParams;
  static SG_HOST_DEVICE const GemmParams& gemm(const Params& p) { return p.gemm; }
  static constexpr bool kStridedRows = false;  // a row's K columns gather its taps: copy() alone
  static constexpr bool kTma = false;
  static constexpr bool kGrouped = false;
  static constexpr int kChunkElems = 16 / int(sizeof(Operand));

  const Operand* x;
  int M, K, channels, height, width, out_h, out_w, kernel_w;
  int stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  bool vector_ok;  // whole chunks lie in one tap and x allows 16-byte cp.async

  SG_DEVICE explicit NhwcConvX(const Params& p)
      : x(static_cast<const Operand*>(p.gemm.x)), M(int(p.gemm.M)), K(int(p.gemm.K)), channels(int(p.channels)),
        height(int(p.height)), width(int(p.width)), out_h(int(p.out_h)), out_w(int(p.out_w)),
        kernel_w(p.kernel_w), stride_h(p.stride_h), stride_w(p.stride_w), pad_h(p.pad_h), pad_w(p.pad_w),
        dilation_h(p.dilation_h), dilation_w(p.dilation_w),
        vector_ok(p.channels % kChunkElems == 0 && reinterpret_cast<uintptr_t>(p.gemm.x) % 16 == 0) {}

  // Offset of x[b, hi, wi, c] for the input pixel of output row (b, hi0, wi0) (the tap-(0, 0)
  // coordinates) and logical column k < K, or -1 where that tap lies in the zero padding.
  SG_DEVICE int offset(int b, int hi0, int wi0, int k) const {
    const int tap = k / channels, c = k - tap * channels;
    const int ky = tap / kernel_w, kx = tap - ky * kernel_w;
    const int hi = hi0 + ky * dilation_h, wi = wi0 + kx * dilation_w;
    if (hi < 0 || hi >= height || wi < 0 || wi >= width) return -1;
    return ((b * height + hi) * width + wi) * channels + c;
  }

  SG_DEVICE void copy(char* dst, int64_t row, int64_t col) const {
    const int m = int(row), k0 = int(col);
    const int wo = m % out_w, rest = m / out_w;
    const int ho = rest % out_h, b = rest / out_h;
    const int hi0 = ho * stride_h - pad_h, wi0 = wo * stride_w - pad_w;
    const bool row_ok = m < M;
    if (vector_ok) {
      const int at = row_ok && k0 < K ? offset(b, hi0, wi0, k0) : -1;
      cp_async_16(dst, at >= 0 ? x + at : x, at >= 0);
      return;
    }
    ElementPack<Operand, kChunkElems> pack;
#pragma unroll
    for (int i = 0; i < kChunkElems; ++i) {
      const int at = row_ok && k0 + i < K ? offset(b, hi0, wi0, k0 + i) : -1;
      pack.v[i] = at >= 0 ? x[at] : Operand(0);
    }
    st_shared_16(dst, pack);
  }

  // Bytes of the NHWC input from p.gemm.x on (the emulator checks the copies against them).
  static int64_t source_bytes(const Params& p) {
    return p.batch * p.height * p.width * p.channels * int64_t(sizeof(Operand));
  }
};

}  // namespace SG_KERNEL_NS
}  // namespace sparsegemm
