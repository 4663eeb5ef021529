// cpu_ops.h entry points: run-time choice among the per-ISA kernel copies (kernels.cpp) and the
// ISA-independent metadata check. The wheel must run on any x86-64, so a vector copy is entered
// only after __builtin_cpu_supports (which also checks that the OS saves the wide registers)
// confirms every extension its compile flags allow.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cpu_ops.h"
#include "kernels.h"

namespace sparsegemm {
namespace cpu {
namespace {

// nullptr when this build or CPU cannot run the named ISA.
const KernelTable* table_if_supported(const std::string& name) {
  if (name == "generic") return &generic::kernel_table();
#if defined(SPARSEGEMM_X86)
  __builtin_cpu_init();
  if (name == "avx2") {
    const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    return ok ? &avx2::kernel_table() : nullptr;
  }
  if (name == "avx512") {
    // Matches the flags of the avx512 object in CMakeLists.txt (which also enables avx2/fma/f16c).
    const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                    __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi") &&
                    __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx2") &&
                    __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    return ok ? &avx512::kernel_table() : nullptr;
  }
#endif
  return nullptr;
}

const KernelTable& required_table(const std::string& name, const char* source) {
  const KernelTable* table = table_if_supported(name);
  if (table == nullptr) {
    throw std::runtime_error(std::string("sparsegemm: CPU ISA '") + name + "' (" + source +
                             ") is not available on this CPU or build; expected one of avx512, avx2, generic "
                             "that the CPU supports");
  }
  return *table;
}

const KernelTable& best_table() {
  for (const char* name : {"avx512", "avx2"}) {
    if (const KernelTable* table = table_if_supported(name)) return *table;
  }
  return generic::kernel_table();
}

std::atomic<const KernelTable*> g_table{nullptr};

// The table in use; the first call resolves SPARSEGEMM_CPU_ISA (and throws, retrying next time,
// if it names an ISA that cannot run here).
const KernelTable& current_table() {
  const KernelTable* table = g_table.load(std::memory_order_acquire);
  if (table != nullptr) return *table;
  const char* requested = std::getenv("SPARSEGEMM_CPU_ISA");
  table = (requested != nullptr && requested[0] != '\0')
              ? &required_table(requested, "from the SPARSEGEMM_CPU_ISA environment variable")
              : &best_table();
  const KernelTable* expected = nullptr;
  g_table.compare_exchange_strong(expected, table, std::memory_order_acq_rel);
  return *g_table.load(std::memory_order_acquire);
}

}  // namespace

const char* isa_name() { return current_table().name; }

bool isa_supported(const char* name) { return table_if_supported(name) != nullptr; }

bool has_native_dot(DType dtype) {
#if defined(SPARSEGEMM_X86)
  __builtin_cpu_init();
  if (dtype == DType::bf16) return __builtin_cpu_supports("avx512bf16") != 0;
  if (dtype == DType::i8 && __builtin_cpu_supports("avx512vnni")) return true;
#if (defined(__clang__) && __clang_major__ >= 16) || (!defined(__clang__) && __GNUC__ >= 12)
  if (dtype == DType::f16) return __builtin_cpu_supports("avx512fp16") != 0;
  if (dtype == DType::i8) return __builtin_cpu_supports("avxvnni") != 0;
#endif
#endif
  (void)dtype;
  return false;
}

void set_isa(const char* name) { g_table.store(&required_table(name, "requested by set_isa"), std::memory_order_release); }

void mask_2to4(DType dtype, const void* w, int64_t N, int64_t K, int64_t ldw, uint8_t* mask) {
  current_table().mask_2to4(dtype, w, N, K, ldw, mask);
}

void compress(const CompressParams& p) { current_table().compress(p); }

void decompress(const DecompressParams& p) { current_table().decompress(p); }

void gemm(const GemmParams& p) { current_table().gemm(p); }

void quantize_rows(DType in_dtype, const void* x, int64_t M, int64_t K, int64_t ldx, int8_t* x_q, float* x_scale) {
  current_table().quantize_rows(in_dtype, x, M, K, ldx, x_q, x_scale);
}

void gemm_s8(const GemmParams& p) { current_table().gemm_s8(p); }

void s8_epilogue(const GemmParams& p, const int32_t* acc, int64_t ld_acc) {
  current_table().s8_epilogue(p, acc, ld_acc);
}

int64_t find_invalid_meta(const uint8_t* meta, int64_t N, int64_t K) {
  const int64_t groups = num_groups(K), mcols = meta_cols(K), slots = 2 * mcols;
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* row = meta + n * mcols;
    for (int64_t g = 0; g < groups; ++g) {
      if (!nibble_is_ordered_pair(group_nibble(row, g))) return n * slots + g;
    }
    if (groups % 2 == 1 && (row[mcols - 1] >> 4) != kPadNibble) return n * slots + groups;
  }
  return -1;
}

}  // namespace cpu
}  // namespace sparsegemm
