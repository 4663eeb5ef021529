// Argument structs shared by every backend (CPU, SIMT emulator, CUDA). Plain pointers and sizes:
// this is the torch-free boundary. Shapes use the letters of DESIGN.md; strides are in elements.
// Python (sparsegemm/ops.py) validates dtypes, devices, shapes and alignment before filling them.
#pragma once
#include <cstdint>

#include "format.h"

namespace sparsegemm {

// Y[M, N] = act(X[M, K] @ W[N, K]^T + bias[N]), W given compressed (format.h); gated: Y[M, N / 2].
struct GemmParams {
  int64_t M = 0, N = 0, K = 0;  // K is the true K; the weight is stored for padded_k(K)
  const void* x = nullptr;       // X[M, K], row stride ldx, K contiguous
  int64_t ldx = 0;
  const void* values = nullptr;  // Wc[N, padded_k(K)/2], contiguous
  const void* meta = nullptr;    // logical E (CPU) or the kernel layout (CUDA/SIMT GEMM)
  const void* bias = nullptr;    // bias[N] in the output dtype, or null
  void* y = nullptr;             // Y[M, N], row stride ldy, N contiguous
  int64_t ldy = 0;
  DType dtype = DType::f16;      // dtype of X, Wc, bias and Y (int8 GEMM: Y's dtype)
  Activation act = Activation::none;
  // Gated epilogue (format.h kGatedActivation): Y[M, N / 2] = act(gate rows) * up rows; N % 16 == 0.
  bool gated = false;
  // INT8 only (issue 4): per-row weight scale[N] and per-token activation scale[M], fp32.
  const float* w_scale = nullptr;
  const float* x_scale = nullptr;
  // CUDA/SIMT GEMM only, for split-K (csrc/cuda/kernels.h gemm_scratch; null where it asks for
  // none): workspace, partial sums of GemmScratch::workspace_bytes bytes; tile_counters,
  // GemmScratch::tile_counters 8-byte aligned uint64 words. Neither needs any contents at launch
  // (a counter word carries its launch's token: gemm_sp.cuh arrived_last); the kernel leaves zero
  // every word its blocks arrive at (a grouped launch's blocks past their group's rows arrive at
  // none). No other launch may use either while this one runs.
  void* workspace = nullptr;
  uint64_t* tile_counters = nullptr;
  // Tests and tuning only: -1 lets csrc/cuda/gemm_heuristics.h choose; otherwise a GemmConfig
  // value (0 to 7), with split_k in 1 .. 16 forcing the number of K splits (the decode tile,
  // config 6 and config 7 only).
  int config = -1;
  int split_k = 0;
};

// Grouped GEMM (CUDA/SIMT): `groups` GEMMs of one shape in one launch, the projections of a
// mixture of experts. Group g multiplies rows row_offsets[g] .. row_offsets[g + 1] - 1 of X by its
// own weight (values[g], meta[g] in the kernel layout, bias[g] or null, w_scale[g] for INT8) into
// the same rows of Y (x_scale likewise per row). The offsets live in device memory (CUDA) and may
// be written by the kernel just before the launch: no host synchronisation reads them, so the
// kernel clamps them into [0, x_rows] (bad offsets cannot move a copy outside X or Y) and computes
// at most gemm.M rows of a group.
// gemm: N, K, x, ldx, y, ldy, dtype, act, gated, x_scale and config as for one GEMM; gemm.M bounds
// every group's rows (it sizes the grid, and picks the tile as M does for one GEMM); gemm.values,
// meta, bias and w_scale are unused; gemm.workspace, tile_counters and split_k as
// gemm_grouped_scratch asks (kernels.h). blockIdx.z is group x splits + split.
// kMaxGemmGroups: groups per launch; the host entry point launches more in chunks, each of which
// waits for the one before (dependent launches), so one launch should hold a layer's experts: 128
// covers Qwen3-MoE's, DeepSeek-V3's 256 take two. The pointer tables travel in the kernel's
// parameters: 4.3 KB, past the 4 KiB limit of drivers before CUDA 12.1 (CUDA 13's take 32 KiB).
constexpr int kMaxGemmGroups = 128;
struct GroupedGemmParams {
  GemmParams gemm;
  const int64_t* row_offsets = nullptr;  // [groups + 1], non-decreasing, row_offsets[0] >= 0
  int64_t x_rows = 0;                      // rows of X and Y
  int groups = 0;
  int64_t planned_groups = 0;  // the groups of every launch of the GEMM: the split-K plan's (gemm_grouped_scratch)
  const void* values[kMaxGemmGroups] = {};
  const void* meta[kMaxGemmGroups] = {};
  const void* bias[kMaxGemmGroups] = {};
  const float* w_scale[kMaxGemmGroups] = {};
};

// Wc, E (logical) <- W[N, K] with row stride ldw. prune=false: strict 2:4 check.
struct CompressParams {
  int64_t N = 0, K = 0;
  const void* w = nullptr;
  int64_t ldw = 0;
  void* values = nullptr;  // Wc[N, padded_k(K)/2], 4-byte aligned (the GPU kernel stores 16-bit kept pairs as words)
  uint8_t* meta = nullptr; // E[N, meta_cols(K)]
  DType dtype = DType::f16;
  bool prune = false;
  // Strict mode: receives the smallest row * num_groups(K) + group index of a group with more
  // than two non-zeros, or stays -1. Host memory for CPU/SIMT, device memory for CUDA.
  int64_t* first_bad_group = nullptr;
};

// What a GEMM launch needs besides its operands (GemmParams workspace / tile_counters): bytes of
// workspace and uint64 counter words; all zero when the plan does not split K.
struct GemmScratch {
  int64_t workspace_bytes = 0;
  int64_t tile_counters = 0;
};

// W[N, K] (contiguous) <- Wc, E (logical).
struct DecompressParams {
  int64_t N = 0, K = 0;
  const void* values = nullptr;
  const uint8_t* meta = nullptr;
  void* w = nullptr;
  DType dtype = DType::f16;
};

// Implicit-GEMM 2:4 convolution (groups = 1), CUDA/SIMT: the GEMM above with
//   M = batch * out_h * out_w  (m = (b, ho, wo), wo fastest),  N = Cout,
//   K = kernel_h * kernel_w * channels  (k = (ky, kx, c), c fastest: SparseConv2d's weight order),
//   X[m, k] = x[b, ho * stride_h - pad_h + ky * dilation_h, wo * stride_w - pad_w + kx * dilation_w, c]
//             (0 outside the image), read straight from the NHWC input: no im2col buffer.
// gemm: M, N, K as above; x: the input [batch, height, width, channels], contiguous (ldx unused);
// y: Y[M, N] = the NHWC output [batch, out_h, out_w, N] (ldy = N); values, meta, bias, dtype, act,
// workspace, config and split_k as for the GEMM. ops.py keeps every index below 2^31.
struct ConvParams {
  GemmParams gemm;
  int64_t batch = 0, height = 0, width = 0, channels = 0;
  int64_t out_h = 0, out_w = 0;
  int kernel_h = 1, kernel_w = 1;
  int stride_h = 1, stride_w = 1;
  int pad_h = 0, pad_w = 0;
  int dilation_h = 1, dilation_w = 1;
};

}  // namespace sparsegemm
