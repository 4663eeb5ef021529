// The only pybind11 file, and the whole torch-free boundary: Python passes raw data pointers
// (tensor.data_ptr()), sizes, strides in elements, dtype codes (format.h DType) and, for CUDA,
// the stream handle. Arguments are validated in sparsegemm/ops.py; heavy work drops the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cuda/gemm_heuristics.h"
#include "cuda/kernels.h"
#include "params.h"
#include "simt/emulator.h"
#include "simt/selftest.h"

#if defined(SPARSEGEMM_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace py = pybind11;
using namespace sparsegemm;

namespace {

template <typename T>
T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

GemmParams make_gemm_params(int64_t M, int64_t N, int64_t K, uintptr_t x, int64_t ldx, uintptr_t values,
                            uintptr_t meta, uintptr_t bias, uintptr_t y, int64_t ldy, int dtype, int act,
                            uintptr_t w_scale, uintptr_t x_scale) {
  GemmParams p;
  p.M = M; p.N = N; p.K = K;
  p.x = ptr<const void>(x); p.ldx = ldx;
  p.values = ptr<const void>(values);
  p.meta = ptr<const void>(meta);
  p.bias = ptr<const void>(bias);
  p.y = ptr<void>(y); p.ldy = ldy;
  p.dtype = static_cast<DType>(dtype);
  const int base_act = act & ~kGatedActivation;
  if (base_act < 0 || base_act > static_cast<int>(Activation::silu))
    throw std::invalid_argument("sparsegemm gemm: unknown activation code " + std::to_string(act));
  p.act = static_cast<Activation>(base_act);
  p.gated = (act & kGatedActivation) != 0;
  if (p.gated && N % (2 * kGateRows) != 0)
    throw std::invalid_argument("sparsegemm gemm: a gated activation needs N (gate and up rows interleaved in runs "
                                "of 8) to be a multiple of 16, got N = " + std::to_string(N));
  p.w_scale = ptr<const float>(w_scale);
  p.x_scale = ptr<const float>(x_scale);
  return p;
}

// The launch fields of GemmParams (params.h) every GEMM entry point takes from Python.
void set_launch(GemmParams& p, uintptr_t workspace, uintptr_t tile_counters, int config, int split_k) {
  if (tile_counters % 8 != 0)  // 64-bit atomics fault on a misaligned word
    throw std::invalid_argument("sparsegemm gemm: tile_counters must be 8-byte aligned uint64 words, got address " +
                                std::to_string(tile_counters));
  p.workspace = ptr<void>(workspace);
  p.tile_counters = ptr<uint64_t>(tile_counters);
  p.config = config;
  p.split_k = split_k;
}

CompressParams make_compress_params(int64_t N, int64_t K, uintptr_t w, int64_t ldw, uintptr_t values,
                                    uintptr_t meta, int dtype, bool prune, uintptr_t first_bad_group) {
  CompressParams p;
  p.N = N; p.K = K;
  p.w = ptr<const void>(w); p.ldw = ldw;
  p.values = ptr<void>(values);
  p.meta = ptr<uint8_t>(meta);
  p.dtype = static_cast<DType>(dtype);
  p.prune = prune;
  p.first_bad_group = ptr<int64_t>(first_bad_group);
  return p;
}

DecompressParams make_decompress_params(int64_t N, int64_t K, uintptr_t values, uintptr_t meta, uintptr_t w,
                                        int dtype) {
  DecompressParams p;
  p.N = N; p.K = K;
  p.values = ptr<const void>(values);
  p.meta = ptr<const uint8_t>(meta);
  p.w = ptr<void>(w);
  p.dtype = static_cast<DType>(dtype);
  return p;
}

py::dict build_info() {
  py::dict d;
  d["version"] = SPARSEGEMM_VERSION;
  d["cpu_isa"] = cpu::isa_name();
#if defined(SPARSEGEMM_WITH_CUDA)
  d["cuda_built"] = true;
  d["cuda_archs"] = std::string(SPARSEGEMM_CUDA_ARCHS_BUILT);
  d["cuda_runtime_version"] = CUDART_VERSION;
#else
  d["cuda_built"] = false;
  d["cuda_archs"] = std::string();
#endif
  return d;
}

// GPUs visible to the CUDA runtime. Any error (no driver: 35, no device: 100) means "none":
// cudaGetDeviceCount leaves the count unwritten on error, hence the initialisation.
py::list list_gpus() {
  py::list gpus;
#if defined(SPARSEGEMM_WITH_CUDA)
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return gpus;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    py::dict g;
    g["index"] = i;
    g["name"] = std::string(prop.name);
    g["capability"] = py::make_tuple(prop.major, prop.minor);
    g["sm_count"] = prop.multiProcessorCount;
    g["memory_bytes"] = static_cast<uint64_t>(prop.totalGlobalMem);
    gpus.append(g);
  }
#endif
  return gpus;
}

// Launches a grouped GEMM (gemm's fields in `p`, its split-K scratch, config and split_k included; the
// per-group pointer lists beside) through `launch` (gemm_grouped or gemm_s8_grouped),
// kMaxGemmGroups groups at a time, one after another on the stream (so they share the scratch).
// bias / w_scale: one pointer per group, or empty for none.
void launch_grouped(const GemmParams& p, int64_t x_rows, uintptr_t row_offsets,
                    const std::vector<uintptr_t>& values, const std::vector<uintptr_t>& meta,
                    const std::vector<uintptr_t>& bias, const std::vector<uintptr_t>& w_scale,
                    void (*launch)(const GroupedGemmParams&, void*), uintptr_t stream) {
  const size_t groups = values.size();
  if (meta.size() != groups || (!bias.empty() && bias.size() != groups) ||
      (!w_scale.empty() && w_scale.size() != groups))
    throw std::invalid_argument("sparsegemm gemm_grouped: values, meta, bias and w_scale need one pointer per group "
                                "(bias and w_scale may be empty), got " + std::to_string(groups) + ", " +
                                std::to_string(meta.size()) + ", " + std::to_string(bias.size()) + " and " +
                                std::to_string(w_scale.size()));
  py::gil_scoped_release nogil;
  for (size_t first = 0; first < groups; first += kMaxGemmGroups) {
    GroupedGemmParams grouped;
    grouped.gemm = p;
    grouped.row_offsets = ptr<const int64_t>(row_offsets) + first;
    grouped.x_rows = x_rows;
    grouped.planned_groups = int64_t(groups);
    grouped.groups = static_cast<int>(std::min<size_t>(kMaxGemmGroups, groups - first));
    for (int g = 0; g < grouped.groups; ++g) {
      grouped.values[g] = ptr<const void>(values[first + g]);
      grouped.meta[g] = ptr<const void>(meta[first + g]);
      grouped.bias[g] = bias.empty() ? nullptr : ptr<const void>(bias[first + g]);
      grouped.w_scale[g] = w_scale.empty() ? nullptr : ptr<const float>(w_scale[first + g]);
    }
    launch(grouped, ptr<void>(stream));
  }
}

void bind_cpu(py::module_& m) {
  m.def("cpu_set_num_threads", &cpu::set_num_threads);
  m.def("cpu_num_threads", &cpu::num_threads);
  m.def("cpu_use_openmp", &cpu::use_openmp);
  m.def("cpu_threading", &cpu::threading);
  // ISA control, for tests and benchmarks: the SPARSEGEMM_CPU_ISA environment variable does the
  // same before the first CPU call.
  m.def("cpu_isa_name", [] { return std::string(cpu::isa_name()); });
  m.def("cpu_isa_supported", [](const std::string& name) { return cpu::isa_supported(name.c_str()); });
  m.def("cpu_has_native_dot", [](int dtype) { return cpu::has_native_dot(static_cast<DType>(dtype)); });
  m.def("cpu_set_isa", [](const std::string& name) { cpu::set_isa(name.c_str()); });
  m.def("cpu_mask_2to4", [](int dtype, uintptr_t w, int64_t N, int64_t K, int64_t ldw, uintptr_t mask) {
    py::gil_scoped_release nogil;
    cpu::mask_2to4(static_cast<DType>(dtype), ptr<const void>(w), N, K, ldw, ptr<uint8_t>(mask));
  });
  m.def("cpu_compress", [](int64_t N, int64_t K, uintptr_t w, int64_t ldw, uintptr_t values, uintptr_t meta,
                           int dtype, bool prune) {
    int64_t first_bad = -1;
    auto p = make_compress_params(N, K, w, ldw, values, meta, dtype, prune, reinterpret_cast<uintptr_t>(&first_bad));
    {
      py::gil_scoped_release nogil;
      cpu::compress(p);
    }
    return first_bad;
  });
  m.def("cpu_decompress", [](int64_t N, int64_t K, uintptr_t values, uintptr_t meta, uintptr_t w, int dtype) {
    py::gil_scoped_release nogil;
    cpu::decompress(make_decompress_params(N, K, values, meta, w, dtype));
  });
  m.def("cpu_find_invalid_meta", [](uintptr_t meta, int64_t N, int64_t K) {
    py::gil_scoped_release nogil;
    return cpu::find_invalid_meta(ptr<const uint8_t>(meta), N, K);
  });
  m.def("cpu_gemm", [](int64_t M, int64_t N, int64_t K, uintptr_t x, int64_t ldx, uintptr_t values, uintptr_t meta,
                       uintptr_t bias, uintptr_t y, int64_t ldy, int dtype, int act, uintptr_t w_scale,
                       uintptr_t x_scale) {
    auto p = make_gemm_params(M, N, K, x, ldx, values, meta, bias, y, ldy, dtype, act, w_scale, x_scale);
    py::gil_scoped_release nogil;
    cpu::gemm(p);
  });
  // INT8 (issue 4). x_q: int8 [M, K] contiguous; x_scale: fp32 [M].
  m.def("cpu_quantize_rows", [](int64_t M, int64_t K, uintptr_t x, int64_t ldx, int in_dtype, uintptr_t x_q,
                                uintptr_t x_scale) {
    py::gil_scoped_release nogil;
    cpu::quantize_rows(static_cast<DType>(in_dtype), ptr<const void>(x), M, K, ldx, ptr<int8_t>(x_q),
                       ptr<float>(x_scale));
  });
  // meta is the logical layout; bias and y are in out_dtype.
  m.def("cpu_gemm_s8", [](int64_t M, int64_t N, int64_t K, uintptr_t x_q, int64_t ldx, uintptr_t values,
                          uintptr_t meta_logical, uintptr_t w_scale, uintptr_t x_scale, uintptr_t bias, uintptr_t y,
                          int64_t ldy, int out_dtype, int act) {
    auto p = make_gemm_params(M, N, K, x_q, ldx, values, meta_logical, bias, y, ldy, out_dtype, act, w_scale, x_scale);
    py::gil_scoped_release nogil;
    cpu::gemm_s8(p);
  });
  // acc: int32 [M, N] (row stride ld_acc), the exact products of an INT8 GEMM done elsewhere.
  m.def("cpu_s8_epilogue", [](int64_t M, int64_t N, uintptr_t acc, int64_t ld_acc, uintptr_t w_scale,
                              uintptr_t x_scale, uintptr_t bias, uintptr_t y, int64_t ldy, int out_dtype, int act) {
    auto p = make_gemm_params(M, N, 0, 0, 0, 0, 0, bias, y, ldy, out_dtype, act, w_scale, x_scale);
    py::gil_scoped_release nogil;
    cpu::s8_epilogue(p, ptr<const int32_t>(acc), ld_acc);
  });
}

// ---- SIMT emulator self-tests (instruction models fed from Python) ------------------------------
// Arrays arrive as data pointers of contiguous host buffers; shapes are fixed by each self-test
// (csrc/simt/selftest.h). Emulator errors surface as RuntimeError.
void bind_simt_selftest(py::module_& m) {
  namespace st = simt_selftest;
  m.def("simt_selftest_mma_sp_k32", [](bool bf16, int selector, uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t e,
                                       uintptr_t d) {
    py::gil_scoped_release nogil;
    st::mma_sp_k32(bf16, selector, ptr<const uint16_t>(a), ptr<const uint16_t>(b), ptr<const float>(c),
                   ptr<const uint32_t>(e), ptr<float>(d));
  });
  m.def("simt_selftest_mma_sp_k64_s8", [](uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t e, uintptr_t d) {
    py::gil_scoped_release nogil;
    st::mma_sp_k64_s8(ptr<const int8_t>(a), ptr<const int8_t>(b), ptr<const int32_t>(c), ptr<const uint32_t>(e),
                      ptr<int32_t>(d));
  });
  m.def("simt_selftest_ldmatrix", [](int matrices, bool trans, uintptr_t image, int64_t image_elems,
                                     uintptr_t lane_byte_offsets, uintptr_t out) {
    py::gil_scoped_release nogil;
    st::ldmatrix(matrices, trans, ptr<const uint16_t>(image), image_elems, ptr<const int32_t>(lane_byte_offsets),
                 ptr<uint32_t>(out));
  });
  m.def("simt_selftest_shuffles", [](uintptr_t values, uintptr_t src_lane, int xor_mask, int delta, int width,
                                     uintptr_t out) {
    py::gil_scoped_release nogil;
    st::shuffles(ptr<const int32_t>(values), ptr<const int32_t>(src_lane), xor_mask, delta, width, ptr<int32_t>(out));
  });
  m.def("simt_selftest_cp_async", [](int mode, uintptr_t src, uintptr_t pred, int chunks, uintptr_t out) {
    py::gil_scoped_release nogil;
    st::cp_async(mode, ptr<const uint8_t>(src), ptr<const uint8_t>(pred), chunks, ptr<uint8_t>(out));
  });
  m.def("simt_selftest_indices", [](std::tuple<unsigned, unsigned, unsigned> grid,
                                    std::tuple<unsigned, unsigned, unsigned> block, uintptr_t out) {
    py::gil_scoped_release nogil;
    st::indices(std::get<0>(grid), std::get<1>(grid), std::get<2>(grid), std::get<0>(block), std::get<1>(block),
                std::get<2>(block), ptr<int32_t>(out));
  });
  m.def("simt_selftest_block_arrivals", [](std::tuple<unsigned, unsigned, unsigned> grid, uintptr_t tickets,
                                           uintptr_t out) {
    py::gil_scoped_release nogil;
    st::block_arrivals(std::get<0>(grid), std::get<1>(grid), std::get<2>(grid), ptr<int32_t>(tickets),
                       ptr<int32_t>(out));
  });
  m.def("simt_selftest_atomics", [](int blocks, uintptr_t fsum, uintptr_t isum, uintptr_t imin, uintptr_t lmin) {
    py::gil_scoped_release nogil;
    st::atomics(blocks, ptr<float>(fsum), ptr<int32_t>(isum), ptr<int32_t>(imin), ptr<long long>(lmin));
  });
  m.def("simt_selftest_convert", [](int kind, uintptr_t in, uintptr_t out, int64_t n) {
    py::gil_scoped_release nogil;
    st::convert(kind, ptr<const void>(in), ptr<void>(out), n);
  });
  // Block order of every later emulator launch (emulator.h set_block_order): 0 = increasing.
  m.def("simt_set_block_order", &emu::set_block_order, py::arg("seed"));
  // Relaxed 64-bit loads of every later emulator launch return the launch's first value at their
  // address (emulator.h relaxed_load_u64): false = the current value.
  m.def("simt_set_stale_relaxed_loads", &emu::set_stale_relaxed_loads, py::arg("stale"));
  m.def("simt_selftest_misuse", [](int which) {
    py::gil_scoped_release nogil;
    st::misuse(which);
  });
}

// ---- GPU kernels, through the emulator (simt_*) and on the device (cuda_*) ----------------------
// The same entry points (csrc/cuda/kernels.h) twice: simt_* run the kernel sources on the CPU
// (host pointers, synchronous, tests only); cuda_* enqueue on `stream` (a cudaStream_t as an
// integer) with device pointers and never synchronise. gemm's meta is the kernel layout that
// *_reorder_meta writes; *_gemm_scratch(M, N, K, config, split_k) -> (workspace bytes, tile
// counters) sizes the split-K workspace and the uint64 tile counter words (8-byte aligned, any
// contents at launch: params.h GemmParams).
template <typename Api>
void bind_kernel_api(py::module_& m, const std::string& prefix) {
  m.def((prefix + "kernel_meta_bytes").c_str(), Api::kernel_meta_bytes);
  m.def((prefix + "gemm_scratch").c_str(), [](int64_t M, int64_t N, int64_t K, int config, int split_k) {
    const GemmScratch s = Api::gemm_scratch(M, N, K, config, split_k);
    return std::make_pair(s.workspace_bytes, s.tile_counters);
  }, py::arg("M"), py::arg("N"), py::arg("K"), py::arg("config") = -1, py::arg("split_k") = 0);
  m.def((prefix + "large_m_uses_wgmma").c_str(), Api::large_m_uses_wgmma);
  m.def((prefix + "tensor_map_memo_stats").c_str(), [] {
    const TensorMapMemoStats s = Api::tensor_map_memo_stats();
    return py::make_tuple(s.hits, s.encodes);
  });
  m.def((prefix + "wgmma_selftest").c_str(), [](int kind, int mode, bool b_upper_half, uintptr_t a, uintptr_t b,
                                                uintptr_t c, uintptr_t e, uintptr_t d, uintptr_t stream) {
    py::gil_scoped_release nogil;
    Api::wgmma_selftest(kind, mode, b_upper_half, ptr<const void>(a), ptr<const void>(b), ptr<const void>(c),
                        ptr<const uint32_t>(e), ptr<void>(d), ptr<void>(stream));
  }, py::arg("kind"), py::arg("mode"), py::arg("b_upper_half"), py::arg("a"), py::arg("b"), py::arg("c"),
     py::arg("e"), py::arg("d"), py::arg("stream") = 0);
  m.def((prefix + "tma_selftest").c_str(), [](int mode, uintptr_t src, int64_t rows, int64_t cols, int64_t row_stride,
                                              int box_cols, int box_rows, int swizzle, int c0, int c1, uintptr_t out,
                                              uintptr_t stream) {
    py::gil_scoped_release nogil;
    Api::tma_selftest(mode, ptr<const uint8_t>(src), rows, cols, row_stride, box_cols, box_rows, swizzle, c0, c1,
                      ptr<uint8_t>(out), ptr<void>(stream));
  }, py::arg("mode"), py::arg("src"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"), py::arg("box_cols"),
     py::arg("box_rows"), py::arg("swizzle"), py::arg("c0"), py::arg("c1"), py::arg("out"), py::arg("stream") = 0);
  m.def((prefix + "decompress").c_str(), [](int64_t N, int64_t K, uintptr_t values, uintptr_t meta, uintptr_t w,
                                            int dtype, uintptr_t stream) {
    py::gil_scoped_release nogil;
    Api::decompress(make_decompress_params(N, K, values, meta, w, dtype), ptr<void>(stream));
  }, py::arg("N"), py::arg("K"), py::arg("values"), py::arg("meta"), py::arg("w"), py::arg("dtype"),
     py::arg("stream") = 0);
  m.def((prefix + "reorder_meta").c_str(), [](uintptr_t logical_meta, uintptr_t kernel_meta, int64_t N, int64_t K,
                                              uintptr_t stream) {
    py::gil_scoped_release nogil;
    Api::reorder_meta(ptr<const uint8_t>(logical_meta), ptr<void>(kernel_meta), N, K, ptr<void>(stream));
  }, py::arg("logical_meta"), py::arg("kernel_meta"), py::arg("N"), py::arg("K"), py::arg("stream") = 0);
  m.def((prefix + "gemm").c_str(), [](int64_t M, int64_t N, int64_t K, uintptr_t x, int64_t ldx, uintptr_t values,
                                      uintptr_t meta, uintptr_t bias, uintptr_t y, int64_t ldy, int dtype, int act,
                                      uintptr_t workspace, uintptr_t tile_counters, int config, int split_k,
                                      uintptr_t stream) {
    auto p = make_gemm_params(M, N, K, x, ldx, values, meta, bias, y, ldy, dtype, act, 0, 0);
    set_launch(p, workspace, tile_counters, config, split_k);
    py::gil_scoped_release nogil;
    Api::gemm(p, ptr<void>(stream));
  }, py::arg("M"), py::arg("N"), py::arg("K"), py::arg("x"), py::arg("ldx"), py::arg("values"), py::arg("meta"),
     py::arg("bias"), py::arg("y"), py::arg("ldy"), py::arg("dtype"), py::arg("act") = 0, py::arg("workspace") = 0,
     py::arg("tile_counters") = 0, py::arg("config") = -1, py::arg("split_k") = 0, py::arg("stream") = 0);

  // Grouped GEMM (params.h GroupedGemmParams): values / meta / bias (empty: none) per group as
  // lists of pointers, row_offsets [groups + 1] int64 on the kernels' side, x_rows the rows of X
  // and Y; M bounds every group's rows; the scratch as gemm_grouped_scratch asks for the same
  // sizes, groups, config and split_k. Launched kMaxGemmGroups groups at a time.
  using GroupedScratch = GemmScratch (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int, int);
  for (const auto& [name, scratch] : {std::pair<const char*, GroupedScratch>{"gemm_grouped_scratch",
                                                                              Api::gemm_grouped_scratch},
                                      std::pair<const char*, GroupedScratch>{"gemm_s8_grouped_scratch",
                                                                              Api::gemm_s8_grouped_scratch}}) {
    m.def((prefix + name).c_str(), [scratch = scratch](int64_t M, int64_t N, int64_t K, int64_t x_rows,
                                                       int64_t groups, int config, int split_k) {
      const GemmScratch s = scratch(M, N, K, x_rows, groups, config, split_k);
      return std::make_pair(s.workspace_bytes, s.tile_counters);
    }, py::arg("M"), py::arg("N"), py::arg("K"), py::arg("x_rows"), py::arg("groups"), py::arg("config") = -1,
       py::arg("split_k") = 0);
  }
  m.def((prefix + "gemm_grouped").c_str(), [](int64_t M, int64_t N, int64_t K, uintptr_t x, int64_t ldx,
                                              int64_t x_rows, uintptr_t row_offsets,
                                              const std::vector<uintptr_t>& values, const std::vector<uintptr_t>& meta,
                                              const std::vector<uintptr_t>& bias, uintptr_t y, int64_t ldy, int dtype,
                                              int act, uintptr_t workspace, uintptr_t tile_counters, int config,
                                              int split_k, uintptr_t stream) {
    GemmParams p = make_gemm_params(M, N, K, x, ldx, 0, 0, 0, y, ldy, dtype, act, 0, 0);
    set_launch(p, workspace, tile_counters, config, split_k);
    launch_grouped(p, x_rows, row_offsets, values, meta, bias, {}, Api::gemm_grouped, stream);
  }, py::arg("M"), py::arg("N"), py::arg("K"), py::arg("x"), py::arg("ldx"), py::arg("x_rows"), py::arg("row_offsets"),
     py::arg("values"), py::arg("meta"), py::arg("bias"), py::arg("y"), py::arg("ldy"), py::arg("dtype"),
     py::arg("act") = 0, py::arg("workspace") = 0, py::arg("tile_counters") = 0, py::arg("config") = -1,
     py::arg("split_k") = 0, py::arg("stream") = 0);
  m.def((prefix + "gemm_s8_grouped").c_str(), [](int64_t M, int64_t N, int64_t K, uintptr_t x_q, int64_t ldx,
                                                 int64_t x_rows, uintptr_t row_offsets,
                                                 const std::vector<uintptr_t>& values,
                                                 const std::vector<uintptr_t>& kernel_meta_s8,
                                                 const std::vector<uintptr_t>& w_scale, uintptr_t x_scale,
                                                 const std::vector<uintptr_t>& bias, uintptr_t y, int64_t ldy,
                                                 int out_dtype, int act, uintptr_t workspace, uintptr_t tile_counters,
                                                 int config, int split_k, uintptr_t stream) {
    GemmParams p = make_gemm_params(M, N, K, x_q, ldx, 0, 0, 0, y, ldy, out_dtype, act, 0, x_scale);
    set_launch(p, workspace, tile_counters, config, split_k);
    launch_grouped(p, x_rows, row_offsets, values, kernel_meta_s8, bias, w_scale, Api::gemm_s8_grouped, stream);
  }, py::arg("M"), py::arg("N"), py::arg("K"), py::arg("x_q"), py::arg("ldx"), py::arg("x_rows"),
     py::arg("row_offsets"), py::arg("values"), py::arg("kernel_meta_s8"), py::arg("w_scale"), py::arg("x_scale"),
     py::arg("bias"), py::arg("y"), py::arg("ldy"), py::arg("out_dtype"), py::arg("act") = 0,
     py::arg("workspace") = 0, py::arg("tile_counters") = 0, py::arg("config") = -1, py::arg("split_k") = 0,
     py::arg("stream") = 0);

  // INT8 (the INT8 contract): per-token quantisation, the int8 kernel metadata and the s8 GEMM.
  // x_q int8 rows (stride ldx), values int8 Wc, w_scale fp32 [N], x_scale fp32 [M]; out_dtype is
  // Y's and bias's dtype (f16 or bf16).
  m.def((prefix + "quantize_rows").c_str(), [](int64_t M, int64_t K, uintptr_t x, int64_t ldx, int in_dtype,
                                               uintptr_t x_q, uintptr_t x_scale, uintptr_t stream) {
    py::gil_scoped_release nogil;
    Api::quantize_rows(M, K, ptr<const void>(x), ldx, static_cast<DType>(in_dtype), ptr<int8_t>(x_q),
                       ptr<float>(x_scale), ptr<void>(stream));
  }, py::arg("M"), py::arg("K"), py::arg("x"), py::arg("ldx"), py::arg("in_dtype"), py::arg("x_q"),
     py::arg("x_scale"), py::arg("stream") = 0);
  // row_offsets 0: one scale for every row; else int64 [groups + 1] (a grouped launch's), a scale per group.
  m.def((prefix + "quantize_rows_static").c_str(), [](int64_t M, int64_t K, uintptr_t x, int64_t ldx, int in_dtype,
                                                      uintptr_t scale, uintptr_t row_offsets, int64_t groups,
                                                      uintptr_t x_q, uintptr_t x_scale, uintptr_t stream) {
    py::gil_scoped_release nogil;
    Api::quantize_rows_static(M, K, ptr<const void>(x), ldx, static_cast<DType>(in_dtype), ptr<const float>(scale),
                              ptr<const int64_t>(row_offsets), groups, ptr<int8_t>(x_q), ptr<float>(x_scale),
                              ptr<void>(stream));
  }, py::arg("M"), py::arg("K"), py::arg("x"), py::arg("ldx"), py::arg("in_dtype"), py::arg("scale"),
     py::arg("row_offsets"), py::arg("groups"), py::arg("x_q"), py::arg("x_scale"), py::arg("stream") = 0);
  m.def((prefix + "kernel_meta_bytes_s8").c_str(), Api::kernel_meta_bytes_s8);
  m.def((prefix + "reorder_meta_s8").c_str(), [](uintptr_t logical_meta, uintptr_t kernel_meta, int64_t N, int64_t K,
                                                 uintptr_t stream) {
    py::gil_scoped_release nogil;
    Api::reorder_meta_s8(ptr<const uint8_t>(logical_meta), ptr<void>(kernel_meta), N, K, ptr<void>(stream));
  }, py::arg("logical_meta"), py::arg("kernel_meta"), py::arg("N"), py::arg("K"), py::arg("stream") = 0);
  m.def((prefix + "gemm_s8_scratch").c_str(), [](int64_t M, int64_t N, int64_t K, int config, int split_k) {
    const GemmScratch s = Api::gemm_s8_scratch(M, N, K, config, split_k);
    return std::make_pair(s.workspace_bytes, s.tile_counters);
  }, py::arg("M"), py::arg("N"), py::arg("K"), py::arg("config") = -1, py::arg("split_k") = 0);
  m.def((prefix + "gemm_s8").c_str(), [](int64_t M, int64_t N, int64_t K, uintptr_t x_q, int64_t ldx,
                                         uintptr_t values, uintptr_t kernel_meta_s8, uintptr_t w_scale,
                                         uintptr_t x_scale, uintptr_t bias, uintptr_t y, int64_t ldy, int out_dtype,
                                         int act, uintptr_t workspace, uintptr_t tile_counters, int config,
                                         int split_k, uintptr_t stream) {
    auto p = make_gemm_params(M, N, K, x_q, ldx, values, kernel_meta_s8, bias, y, ldy, out_dtype, act, w_scale,
                              x_scale);
    set_launch(p, workspace, tile_counters, config, split_k);
    py::gil_scoped_release nogil;
    Api::gemm_s8(p, ptr<void>(stream));
  }, py::arg("M"), py::arg("N"), py::arg("K"), py::arg("x_q"), py::arg("ldx"), py::arg("values"),
     py::arg("kernel_meta_s8"), py::arg("w_scale"), py::arg("x_scale"), py::arg("bias"), py::arg("y"), py::arg("ldy"),
     py::arg("out_dtype"), py::arg("act") = 0, py::arg("workspace") = 0, py::arg("tile_counters") = 0,
     py::arg("config") = -1, py::arg("split_k") = 0, py::arg("stream") = 0);
}

struct SimtKernelApi {
  static constexpr auto kernel_meta_bytes = &simt::kernel_meta_bytes;
  static constexpr auto gemm_scratch = &simt::gemm_scratch;
  static constexpr auto large_m_uses_wgmma = &simt::large_m_uses_wgmma;
  static constexpr auto tensor_map_memo_stats = &simt::tensor_map_memo_stats;
  static constexpr auto wgmma_selftest = &simt::wgmma_selftest;
  static constexpr auto tma_selftest = &simt::tma_selftest;
  static constexpr auto decompress = &simt::decompress;
  static constexpr auto reorder_meta = &simt::reorder_meta;
  static constexpr auto gemm = &simt::gemm;
  static constexpr auto quantize_rows = &simt::quantize_rows;
  static constexpr auto quantize_rows_static = &simt::quantize_rows_static;
  static constexpr auto kernel_meta_bytes_s8 = &simt::kernel_meta_bytes_s8;
  static constexpr auto reorder_meta_s8 = &simt::reorder_meta_s8;
  static constexpr auto gemm_s8_scratch = &simt::gemm_s8_scratch;
  static constexpr auto gemm_s8 = &simt::gemm_s8;
  static constexpr auto gemm_grouped = &simt::gemm_grouped;
  static constexpr auto gemm_s8_grouped = &simt::gemm_s8_grouped;
  static constexpr auto gemm_grouped_scratch = &simt::gemm_grouped_scratch;
  static constexpr auto gemm_s8_grouped_scratch = &simt::gemm_s8_grouped_scratch;
};

#if defined(SPARSEGEMM_WITH_CUDA)
struct CudaKernelApi {
  static constexpr auto kernel_meta_bytes = &cuda::kernel_meta_bytes;
  static constexpr auto gemm_scratch = &cuda::gemm_scratch;
  static constexpr auto large_m_uses_wgmma = &cuda::large_m_uses_wgmma;
  static constexpr auto tensor_map_memo_stats = &cuda::tensor_map_memo_stats;
  static constexpr auto wgmma_selftest = &cuda::wgmma_selftest;
  static constexpr auto tma_selftest = &cuda::tma_selftest;
  static constexpr auto decompress = &cuda::decompress;
  static constexpr auto reorder_meta = &cuda::reorder_meta;
  static constexpr auto gemm = &cuda::gemm;
  static constexpr auto quantize_rows = &cuda::quantize_rows;
  static constexpr auto quantize_rows_static = &cuda::quantize_rows_static;
  static constexpr auto kernel_meta_bytes_s8 = &cuda::kernel_meta_bytes_s8;
  static constexpr auto reorder_meta_s8 = &cuda::reorder_meta_s8;
  static constexpr auto gemm_s8_scratch = &cuda::gemm_s8_scratch;
  static constexpr auto gemm_s8 = &cuda::gemm_s8;
  static constexpr auto gemm_grouped = &cuda::gemm_grouped;
  static constexpr auto gemm_s8_grouped = &cuda::gemm_s8_grouped;
  static constexpr auto gemm_grouped_scratch = &cuda::gemm_grouped_scratch;
  static constexpr auto gemm_s8_grouped_scratch = &cuda::gemm_s8_grouped_scratch;
};
#endif

// Implicit-GEMM convolution (ConvParams, params.h): x the NHWC input [batch, height, width, channels]
// (contiguous), y the NHWC output [batch, out_h, out_w, out_channels] (contiguous); values / meta
// (kernel layout) / bias / workspace / tile_counters / config / split_k as for gemm; kernel, stride, padding,
// dilation as (h, w) pairs. K = kernel_h * kernel_w * channels in (ky, kx, c) order.
void bind_conv(py::module_& m, const std::string& name, void (*conv2d)(const ConvParams&, void*)) {
  m.def(name.c_str(), [conv2d](uintptr_t x, uintptr_t values, uintptr_t meta, uintptr_t bias, uintptr_t y,
                               int64_t batch, int64_t height, int64_t width, int64_t channels, int64_t out_channels,
                               int64_t out_h, int64_t out_w, std::array<int, 2> kernel, std::array<int, 2> stride,
                               std::array<int, 2> padding, std::array<int, 2> dilation, int dtype, int act,
                               uintptr_t workspace, uintptr_t tile_counters, int config, int split_k,
                               uintptr_t stream) {
    ConvParams p;
    const int64_t M = batch * out_h * out_w, K = int64_t(kernel[0]) * kernel[1] * channels;
    p.gemm = make_gemm_params(M, out_channels, K, x, channels, values, meta, bias, y, out_channels, dtype, act, 0, 0);
    if (p.gemm.gated) throw std::invalid_argument("sparsegemm conv2d: gated activations are for linear layers only");
    set_launch(p.gemm, workspace, tile_counters, config, split_k);
    p.batch = batch; p.height = height; p.width = width; p.channels = channels;
    p.out_h = out_h; p.out_w = out_w;
    p.kernel_h = kernel[0]; p.kernel_w = kernel[1];
    p.stride_h = stride[0]; p.stride_w = stride[1];
    p.pad_h = padding[0]; p.pad_w = padding[1];
    p.dilation_h = dilation[0]; p.dilation_w = dilation[1];
    py::gil_scoped_release nogil;
    conv2d(p, ptr<void>(stream));
  }, py::arg("x"), py::arg("values"), py::arg("meta"), py::arg("bias"), py::arg("y"), py::arg("batch"),
     py::arg("height"), py::arg("width"), py::arg("channels"), py::arg("out_channels"), py::arg("out_h"),
     py::arg("out_w"), py::arg("kernel"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
     py::arg("dtype"), py::arg("act") = 0, py::arg("workspace") = 0, py::arg("tile_counters") = 0,
     py::arg("config") = -1, py::arg("split_k") = 0, py::arg("stream") = 0);
}

void bind_kernels(py::module_& m) {
  bind_kernel_api<SimtKernelApi>(m, "simt_");
  bind_conv(m, "simt_conv2d", &simt::conv2d);
  // Emulator compress: returns the strict-mode result (smallest bad row * G + group, or -1).
  m.def("simt_compress", [](int64_t N, int64_t K, uintptr_t w, int64_t ldw, uintptr_t values, uintptr_t meta,
                            int dtype, bool prune) {
    int64_t first_bad = -1;
    auto p = make_compress_params(N, K, w, ldw, values, meta, dtype, prune, reinterpret_cast<uintptr_t>(&first_bad));
    {
      py::gil_scoped_release nogil;
      simt::compress(p, nullptr);
    }
    return first_bad;
  });
#if defined(SPARSEGEMM_WITH_CUDA)
  bind_kernel_api<CudaKernelApi>(m, "cuda_");
  bind_conv(m, "cuda_conv2d", &cuda::conv2d);
  // Device compress: the strict-mode result lands in device memory first_bad_group (int64), so
  // that no host sync happens here.
  m.def("cuda_compress", [](int64_t N, int64_t K, uintptr_t w, int64_t ldw, uintptr_t values, uintptr_t meta,
                            int dtype, bool prune, uintptr_t first_bad_group, uintptr_t stream) {
    auto p = make_compress_params(N, K, w, ldw, values, meta, dtype, prune, first_bad_group);
    py::gil_scoped_release nogil;
    cuda::compress(p, ptr<void>(stream));
  }, py::arg("N"), py::arg("K"), py::arg("w"), py::arg("ldw"), py::arg("values"), py::arg("meta"), py::arg("dtype"),
     py::arg("prune"), py::arg("first_bad_group"), py::arg("stream") = 0);
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparsegemm private extension: 2:4 kernels behind a torch-free boundary";
  m.def("build_info", &build_info);
  m.def("list_gpus", &list_gpus);
  // The GEMM plan (gemm_heuristics.h) for a GPU of `sms` SMs holding `blocks_per_sm` decode
  // blocks each, with no GPU needed: (config, split_k, k-tiles per split) of the 16-bit GEMM, or
  // of the int8 one with s8; wgmma: a GPU that runs the wgmma tile (kernels.h large_m_uses_wgmma).
  m.def("plan_gemm", [](int64_t M, int64_t N, int64_t K, int sms, int blocks_per_sm, bool s8, bool wgmma) {
    if (sms < 1 || blocks_per_sm < 1)
      throw std::invalid_argument("sparsegemm plan_gemm: sms and blocks_per_sm must be at least 1, got " +
                                  std::to_string(sms) + " and " + std::to_string(blocks_per_sm));
    const GemmPlan plan = sparsegemm::plan_gemm(M, N, K, DecodeWave{sms, blocks_per_sm}, -1, 0,
                                                s8 ? gemm_tiles::kBlockKS8 : gemm_tiles::kBlockK, wgmma);
    return std::make_tuple(static_cast<int>(plan.config), plan.split_k, plan.k_tiles_per_split);
  }, py::arg("M"), py::arg("N"), py::arg("K"), py::arg("sms"), py::arg("blocks_per_sm"), py::arg("s8") = false,
     py::arg("wgmma") = false);
  // The output tile (m, n) of each GEMM block in launch order (blockIdx.y * tiles_m + blockIdx.x;
  // gemm_heuristics.h raster_output_tile), for a grid of tiles_m x tiles_n tiles.
  m.def("raster_output_tiles", [](int64_t tiles_m, int64_t tiles_n) {
    constexpr int64_t kMostTiles = int64_t(1) << 24;
    if (tiles_m < 1 || tiles_n < 1 || tiles_m > kMostTiles / tiles_n)
      throw std::invalid_argument("sparsegemm raster_output_tiles: tiles_m and tiles_n must be at least 1 with at most " +
                                  std::to_string(kMostTiles) + " tiles in all, got " + std::to_string(tiles_m) +
                                  " x " + std::to_string(tiles_n));
    std::vector<std::pair<int64_t, int64_t>> tiles;
    tiles.reserve(size_t(tiles_m * tiles_n));
    for (int64_t block_y = 0; block_y < tiles_n; ++block_y)
      for (int64_t block_x = 0; block_x < tiles_m; ++block_x) {
        const OutputTile tile = raster_output_tile(uint32_t(block_x), uint32_t(block_y), uint32_t(tiles_m),
                                                   uint32_t(tiles_n));
        tiles.emplace_back(tile.m, tile.n);
      }
    return tiles;
  }, py::arg("tiles_m"), py::arg("tiles_n"));
  bind_cpu(m);
  bind_simt_selftest(m);
  bind_kernels(m);
}
