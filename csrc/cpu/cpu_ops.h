// CPU backend on the logical layout (format.h): vectorised with run-time ISA dispatch, threaded.
// Every function is synchronous and validates nothing: ops.py checks arguments first.
#pragma once
#include <cstdint>
#include <string>

#include "params.h"

namespace sparsegemm {
namespace cpu {

// Worker threads used by the functions below (ops.py passes torch.get_num_threads()).
void set_num_threads(int threads);
int num_threads();
// Whether those threads may be the team of an OpenMP runtime the process has loaded (torch's;
// default true), and where jobs run now: "openmp:<path of the runtime>" or "threads" (the
// extension's own pool; thread_pool.cpp says when and why).
void use_openmp(bool enabled);
std::string threading();

// Name of the vector ISA picked at run time: "avx512", "avx2" or "generic". The first call picks
// the best one this CPU supports, or the one the environment variable SPARSEGEMM_CPU_ISA names
// (std::runtime_error, naming it, if this CPU or build cannot run it).
const char* isa_name();

// Whether this build and CPU can run the named ISA ("avx512", "avx2", "generic").
bool isa_supported(const char* name);

// Whether the CPU has dot-product instructions for dtype's values (bf16: AVX512-BF16, which every
// AMX-BF16 CPU also has; f16: AVX512-FP16; i8: AVX512-VNNI or AVX-VNNI): then a dense GEMM in that
// dtype (torch's) runs at their full rate, which the sparse GEMM, one permute per multiply-add
// instruction, cannot reach once M makes it compute bound (ops.py routes large M to dense tiles
// then). False for f32.
bool has_native_dot(DType dtype);

// Forces the ISA used from now on (tests compare all of them); std::runtime_error, naming it, if
// isa_supported(name) is false.
void set_isa(const char* name);

// mask[N, K] (contiguous, 0/1 bytes) <- magnitude 2:4 mask of W[N, K] (row stride ldw).
void mask_2to4(DType dtype, const void* w, int64_t N, int64_t K, int64_t ldw, uint8_t* mask);

void compress(const CompressParams& p);
// Any floating dtype, and int8 (the large-M INT8 path's weight tiles, ops.py).
void decompress(const DecompressParams& p);

// First bad nibble slot of E[N, meta_cols(K)], as row * (2 * meta_cols(K)) + slot: slot g < G is
// group g (not an ordered pair), slot G is the unused high nibble of a row with an odd group count
// (not kPadNibble). -1 when all is valid.
int64_t find_invalid_meta(const uint8_t* meta, int64_t N, int64_t K);

// Y = act(X @ W^T + bias), fp32 accumulation, output rounded once to p.dtype. bf16 on the avx512
// ISA multiplies with VDPBF16PS, which treats subnormal inputs and partial sums (|v| < 2^-126) as
// zero; every other path keeps them.
void gemm(const GemmParams& p);

// INT8 (issue 4), dynamic per-token activation quantization: for every row m of X[M, K] (dtype
// in_dtype: f32, f16 or bf16; row stride ldx), x_scale[m] = amax_m / 127 in fp32 (amax_m = max
// |x[m, :K]|; 1 for an all-zero row; NaN for a row holding a NaN) and x_q[m, k] (int8 [M, K],
// contiguous) = clamp(rint(x / x_scale[m]), -127, 127), fp32 division, ties to even, 0 where the
// quotient is NaN. The order of operations is the one the CUDA kernel follows (sparsegemm/quant.py).
void quantize_rows(DType in_dtype, const void* x, int64_t M, int64_t K, int64_t ldx, int8_t* x_q, float* x_scale);

// INT8 GEMM: p.x is X_q int8 [M, K] (row stride p.ldx), p.values int8 [N, padded_k(K)/2] with the
// logical p.meta, p.w_scale fp32 [N], p.x_scale fp32 [M], p.bias (or null) and Y in p.dtype (f32,
// f16 or bf16). acc = exact sum saturated to int32; y = ((float)acc * w_scale[n]) * x_scale[m]
// (+ bias[n]) in fp32 without FMA contraction, then the activation and one rounding to p.dtype.
void gemm_s8(const GemmParams& p);

// gemm_s8's epilogue alone, on int32 products X_q @ Wq^T computed elsewhere (ops.py's large-M path
// runs torch's dense int8 GEMM on decompressed weight tiles): acc [M, N] int32 with row stride
// ld_acc, exact (the caller bounds K so that no sum wraps), then the same steps as gemm_s8 from the
// saturated sum on. p.M, p.N, p.w_scale, p.x_scale, p.bias, p.y, p.ldy, p.dtype, p.act and p.gated
// as there; p.x, p.values and p.meta are not read.
void s8_epilogue(const GemmParams& p, const int32_t* acc, int64_t ld_acc);

}  // namespace cpu
}  // namespace sparsegemm
