// The per-ISA kernel set. kernels.cpp is compiled once per ISA level (CMakeLists.txt) into
// namespace sparsegemm::cpu::<isa>, and each copy exposes its functions through one KernelTable;
// dispatch.cpp picks a table at run time. Arguments and semantics are those of cpu_ops.h.
#pragma once
#include <cstdint>

#include "params.h"

namespace sparsegemm {
namespace cpu {

struct KernelTable {
  const char* name;  // "generic", "avx2" or "avx512"
  void (*mask_2to4)(DType dtype, const void* w, int64_t N, int64_t K, int64_t ldw, uint8_t* mask);
  void (*compress)(const CompressParams& p);
  void (*decompress)(const DecompressParams& p);
  void (*gemm)(const GemmParams& p);
  void (*quantize_rows)(DType in_dtype, const void* x, int64_t M, int64_t K, int64_t ldx, int8_t* x_q, float* x_scale);
  void (*gemm_s8)(const GemmParams& p);
  void (*s8_epilogue)(const GemmParams& p, const int32_t* acc, int64_t ld_acc);
};

namespace generic {
const KernelTable& kernel_table();
}
#if defined(SPARSEGEMM_X86)
namespace avx2 {
const KernelTable& kernel_table();
}
namespace avx512 {
const KernelTable& kernel_table();
}
#endif

}  // namespace cpu
}  // namespace sparsegemm
