// Host entry points of the GPU kernels (csrc/cuda/), declared twice with the same signatures:
//   sparsegemm::cuda  - launches on the device (kernels.cu, built by nvcc);
//   sparsegemm::simt  - runs the very same kernel sources on the CPU through the SIMT emulator
//                       (csrc/simt/kernels_simt.cpp), for tests on machines without a GPU.
// Every pointer is device memory for cuda and host memory for simt. `stream` is a cudaStream_t
// for cuda (the caller's current stream; nothing here synchronises) and is ignored by simt.
// Nothing validates arguments: sparsegemm/ops.py does that first.
#pragma once
#include <cstdint>

#include "../params.h"

namespace sparsegemm {

// What tensor_map_memo_stats reports: maps served from the memo, maps encoded.
struct TensorMapMemoStats {
  int64_t hits, encodes;
};

#define SPARSEGEMM_DECLARE_KERNEL_API                                                              \
  /* W[N, K] -> Wc + the LOGICAL E (format.h). Strict mode (prune=false) writes the smallest   */ \
  /* bad row * num_groups(K) + group to *first_bad_group, or -1.                               */ \
  void compress(const CompressParams& p, void* stream);                                           \
  /* Wc + logical E -> W[N, K] (contiguous). */                                                   \
  void decompress(const DecompressParams& p, void* stream);                                       \
  /* Bytes of the kernel-layout E that reorder_meta writes and gemm reads (layout: reorder.cuh). */ \
  int64_t kernel_meta_bytes(int64_t N, int64_t K);                                                \
  /* logical E[N, meta_cols(K)] -> kernel_meta[kernel_meta_bytes(N, K)] (16-byte aligned). */     \
  void reorder_meta(const uint8_t* logical_meta, void* kernel_meta, int64_t N, int64_t K, void* stream); \
  /* Y = act(X @ W^T + bias); p.meta is the kernel-layout E, p.workspace / p.tile_counters as  */ \
  /* gemm_scratch(M, N, K, p.config, p.split_k) asks (params.h GemmParams).                    */ \
  void gemm(const GemmParams& p, void* stream);                                                   \
  /* The split-K workspace bytes and tile counters a launch with these sizes needs (all 0: none); */ \
  /* config / split_k as in GemmParams (-1 / 0: the heuristic's choice).                         */ \
  GemmScratch gemm_scratch(int64_t M, int64_t N, int64_t K, int config, int split_k);             \
  /* Whether large-M GEMMs on the current device take the wgmma tile (config 2; only then may a */ \
  /* launch force it on the device). The emulator plans like sm_80 (false) but runs config 2.  */ \
  bool large_m_uses_wgmma();                                                                      \
  /* The TMA pipelines' tensor-map memo (kernels_dispatch.cuh tensor_map_2d) since the start.  */ \
  TensorMapMemoStats tensor_map_memo_stats();                                                     \
  /* One warpgroup's wgmma.mma_async.sp m64n128 on operands in memory (wgmma_selftest.cuh).   */ \
  void wgmma_selftest(int kind, int mode, bool b_upper_half, const void* a, const void* b, const void* c, \
                      const uint32_t* e, void* d, void* stream);                                  \
  /* One TMA box of a byte tensor src[rows][cols] (rows row_stride bytes apart) at (c0, c1) into */ \
  /* shared memory with a swizzle of 0 / 32 / 64 / 128 bytes; out = the landed bytes            */ \
  /* (tma_selftest.cuh; mode 1, a read before the wait, only in the emulator).                  */ \
  void tma_selftest(int mode, const uint8_t* src, int64_t rows, int64_t cols, int64_t row_stride, int box_cols, \
                    int box_rows, int swizzle, int c0, int c1, uint8_t* out, void* stream);     \
  /* Implicit-GEMM convolution (params.h ConvParams, conv_sp.cuh): NHWC x -> NHWC Y; p.gemm's  */ \
  /* meta is the kernel-layout E, its scratch the GEMM's for (M, N, K): the same plan.          */ \
  void conv2d(const ConvParams& p, void* stream);                                                 \
  /* ---- INT8 (quantize.cuh, gemm_sp_s8.cuh) ----                                              */ \
  /* X[M, K] (in_dtype f32/f16/bf16, row stride ldx) -> x_q int8 [M, K] contiguous and          */ \
  /* x_scale fp32 [M]: dynamic per-token symmetric quantisation.                                */ \
  void quantize_rows(int64_t M, int64_t K, const void* x, int64_t ldx, DType in_dtype, int8_t* x_q, float* x_scale, \
                     void* stream);                                                               \
  /* The same with a calibrated scale on the device: scale[0], or with row_offsets (int64      */ \
  /* [groups + 1], a grouped launch's) scale[g] for group g's rows; x_scale[m] is it, or NaN    */ \
  /* for a row holding a NaN or an infinity.                                                    */ \
  void quantize_rows_static(int64_t M, int64_t K, const void* x, int64_t ldx, DType in_dtype,      \
                            const float* scale, const int64_t* row_offsets, int64_t groups,       \
                            int8_t* x_q, float* x_scale, void* stream);                           \
  /* Bytes of the int8 kernel-layout E (reorder.cuh), written by reorder_meta_s8. */              \
  int64_t kernel_meta_bytes_s8(int64_t N, int64_t K);                                             \
  void reorder_meta_s8(const uint8_t* logical_meta, void* kernel_meta, int64_t N, int64_t K, void* stream); \
  /* Y = act(acc * w_scale[n] * x_scale[m] + bias); p.x: x_q, p.values: int8 Wc, p.meta: the    */ \
  /* int8 kernel E, p.dtype: Y's (and bias's) dtype, f16 or bf16; scratch: gemm_s8_scratch.    */ \
  void gemm_s8(const GemmParams& p, void* stream);                                                \
  GemmScratch gemm_s8_scratch(int64_t M, int64_t N, int64_t K, int config, int split_k);          \
  /* ---- grouped (params.h GroupedGemmParams: at most kMaxGemmGroups groups a launch) ----      */ \
  /* gemm / gemm_s8 of each group, one launch: p.gemm.meta etc. unused, the tables per group.   */ \
  void gemm_grouped(const GroupedGemmParams& p, void* stream);                                    \
  void gemm_s8_grouped(const GroupedGemmParams& p, void* stream);                                 \
  /* Their split-K scratch, for groups in all (every launch's planned_groups) and X's x_rows.   */ \
  GemmScratch gemm_grouped_scratch(int64_t M, int64_t N, int64_t K, int64_t x_rows, int64_t groups, int config, \
                                   int split_k);                                                  \
  GemmScratch gemm_s8_grouped_scratch(int64_t M, int64_t N, int64_t K, int64_t x_rows, int64_t groups, int config, \
                                      int split_k);

namespace simt {
SPARSEGEMM_DECLARE_KERNEL_API
}  // namespace simt

namespace cuda {
SPARSEGEMM_DECLARE_KERNEL_API
}  // namespace cuda

#undef SPARSEGEMM_DECLARE_KERNEL_API

}  // namespace sparsegemm
