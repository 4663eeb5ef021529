// Host side of every kernel in csrc/cuda/: launch shapes, the dtype/tile dispatch and with it the
// complete instantiation list. Compiled twice from this one source: by nvcc into
// sparsegemm::cuda (kernels.cu) and by the host compiler into sparsegemm::simt, where the SIMT
// emulator runs the same kernels (csrc/simt/kernels_simt.cpp). Declarations: kernels.h.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <vector>

#if defined(__CUDACC__)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#endif

#include "../format.h"
#include "../params.h"
#include "arch/portability.cuh"
#include "compress.cuh"
#include "conv_sp.cuh"
#include "gemm_heuristics.h"
#include "gemm_sp.cuh"
#include "gemm_sp_s8.cuh"
#include "kernels.h"
#include "quantize.cuh"
#include "reorder.cuh"
#include "tma_selftest.cuh"
#include "wgmma_selftest.cuh"

namespace sparsegemm {
namespace SG_KERNEL_NS {

namespace {

// Blocks for a grid-stride loop over `total` items: enough to fill any GPU. The emulator runs at
// most 8, so that tests on small shapes take the grid-stride loops that large weights take on a GPU.
#if defined(__CUDACC__)
constexpr int64_t kMaxElementwiseBlocks = 4096;
#else
constexpr int64_t kMaxElementwiseBlocks = 8;
#endif
unsigned elementwise_blocks(int64_t total) {
  const int64_t blocks = (total + kElementwiseThreads - 1) / kElementwiseThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, kMaxElementwiseBlocks)));
}

// Where the decode tile's blocks run on the current device, for MMA policy Policy: its SMs and
// the decode GEMM blocks one SM holds (shared memory bounds it: 88 KiB a 16-bit block, 96 KiB an
// int8 one, so two on H100 / H200, one on A100 and the 100 KiB parts), which size the decode
// split-K (gemm_heuristics.h). Asked of the runtime once per device (ids past 63 ask each time),
// and a failed query is kept as 1 x 1 (no split), so that the workspace size and the launch
// always plan alike. The emulator reports 4 "SMs" x 2, so that tests on small shapes still take
// the split-K path.
template <typename Policy>
DecodeWave decode_wave() {
#if defined(__CUDACC__)
  constexpr int kCachedDevices = 64;
  // sms << 8 | blocks per SM; 0: not asked yet (a race only repeats the query)
  static std::atomic<int> cached[kCachedDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return DecodeWave{1, 1};
  }
  if (device < kCachedDevices) {
    const int known = cached[device].load(std::memory_order_relaxed);
    if (known > 0) return DecodeWave{known >> 8, known & 0xFF};
  }
  using S = GemmShape<Policy, gemm_tiles::Decode>;
  const auto kernel = gemm_sp_kernel<Policy, gemm_tiles::Decode, RowMajorX<typename Policy::Operand>>;
  int sms = 0, per_sm = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmemBytes) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, S::kThreads, S::kSmemBytes) != cudaSuccess) {
    cudaGetLastError();
    sms = per_sm = 1;
  }
  const DecodeWave wave{std::max(1, sms), std::min(0xFF, std::max(1, per_sm))};
  if (device < kCachedDevices) cached[device].store(wave.sms << 8 | wave.blocks_per_sm, std::memory_order_relaxed);
  return wave;
#else
  return DecodeWave{4, 2};
#endif
}

#if defined(__CUDACC__)
// SPARSEGEMM_WGMMA=0, or CUDA_FORCE_PTX_JIT (which makes the driver JIT the plain compute_90 PTX,
// whose wgmma tile is only a trap), in the environment at the first call.
bool wgmma_turned_off() {
  static const bool turned_off = [] {
    const char* value = std::getenv("SPARSEGEMM_WGMMA");
    const char* forced_jit = std::getenv("CUDA_FORCE_PTX_JIT");
    return (value != nullptr && std::string(value) == "0") ||
           (forced_jit != nullptr && std::string(forced_jit) != "0" && std::string(forced_jit) != "");
  }();
  return turned_off;
}

// Compute capability of the current device as 10 major + minor, asked once per device (ids past 63
// ask each time); 0 when the runtime cannot say.
int device_capability() {
  constexpr int kCachedDevices = 64;
  static std::atomic<int> cached[kCachedDevices] = {};  // 0: not asked yet
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  if (device < kCachedDevices && cached[device].load(std::memory_order_relaxed) != 0)
    return cached[device].load(std::memory_order_relaxed);
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  if (device < kCachedDevices) cached[device].store(10 * major + minor, std::memory_order_relaxed);
  return 10 * major + minor;
}
#endif

// Whether the current device runs the wgmma tile (gemm_tiles::WgmmaLargeM), which plan_gemm then
// takes for large M: the build holds sm_90a machine code (CMake builds SM 90 as sm_90a,
// SPARSEGEMM_SM90A), the device is compute capability 9.0, the only one that runs it (other GPUs
// JIT the sm_90 PTX, whose wgmma tile only traps), and wgmma_turned_off() is false (SPARSEGEMM_WGMMA=0
// runs the warp-level LargeM tile instead, to time both in one build).
// The emulator plans like an sm_80 GPU; its tests force the wgmma tile (config 2).
bool wgmma_tile_runs() {
#if defined(__CUDACC__) && defined(SPARSEGEMM_SM90A)
  return !wgmma_turned_off() && device_capability() == 90;
#else
  return false;
#endif
}

#if defined(__CUDACC__)
// Why wgmma_tile_runs() is false here, for error messages.
std::string wgmma_blocker() {
#if !defined(SPARSEGEMM_SM90A)
  return "this build has no sm_90a machine code (SPARSEGEMM_CUDA_ARCHS without 90)";
#else
  if (wgmma_turned_off()) return "SPARSEGEMM_WGMMA=0 or CUDA_FORCE_PTX_JIT is set";
  const int capability = device_capability();
  return "the current device is compute capability " + std::to_string(capability / 10) + "." +
         std::to_string(capability % 10) + ", not 9.0";
#endif
}
#endif

#if defined(__CUDACC__)
// Shared memory one block of the current device may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin),
// 0 when the runtime cannot say.
int device_block_smem_limit() {
  int device = 0, bytes = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return bytes;
}
#endif

// plan_gemm for the current device, with a forced tile refused where it cannot run: the wgmma tile
// and the TMA pipelines off sm_90a, the mid-M tile (102 / 108 KiB a block) on GPUs that give a
// block less shared memory (99 KiB on compute capability 8.6 and 8.9).
GemmPlan plan_device_gemm(int64_t M, int64_t N, int64_t K, DecodeWave wave, int config, int split_k, int64_t block_k,
                          int64_t busy_layers = 1) {
  const bool wgmma = wgmma_tile_runs();
#if defined(__CUDACC__)
  if (needs_sm90a(static_cast<GemmConfig>(config)) && !wgmma) {
    throw std::invalid_argument("sparsegemm gemm: config " + std::to_string(config) + " (the wgmma tile or a TMA "
                                "pipeline) needs sm_90a machine code on a compute capability 9.0 GPU, but " +
                                wgmma_blocker());
  }
  if (config == static_cast<int>(GemmConfig::mid_m)) {
    const int needed = block_k == gemm_tiles::kBlockKS8 ? GemmShape<MmaS8<DType::f16>, gemm_tiles::MidM>::kSmemBytes
                                                         : GemmShape<Mma16<DType::f16>, gemm_tiles::MidM>::kSmemBytes;
    const int limit = device_block_smem_limit();
    if (limit < needed)
      throw std::invalid_argument("sparsegemm gemm: config 7 (the mid-size M tile) needs " + std::to_string(needed) +
                                  " bytes of shared memory a block, the current GPU allows " + std::to_string(limit));
  }
#endif
  return plan_gemm(M, N, K, wave, config, split_k, block_k, wgmma, busy_layers);
}

// Bytes of the kernel-layout metadata (reorder.cuh) the GEMM of MMA policy Policy reads for W[N, K].
template <typename Policy>
int64_t policy_kernel_meta_bytes(int64_t N, int64_t K) {
  return meta_rows_padded(N) / 16 * Policy::meta_steps(K) * Policy::kMetaWordsPerStep * int64_t(sizeof(uint32_t));
}

GemmScratch plan_scratch(const GemmPlan& plan, int64_t M, int64_t N) {
  GemmScratch scratch;
  scratch.workspace_bytes = gemm_plan_workspace_bytes(plan, M, N);
  scratch.tile_counters = gemm_plan_tile_counters(plan, M, N);
  return scratch;
}

// ops.py admits only the dtypes each entry point instantiates; anything else is a caller bug that
// must fail loudly rather than leave the output unwritten.
[[noreturn]] void unsupported_dtype(const char* op, DType dtype) {
  throw std::invalid_argument(std::string("sparsegemm ") + op + ": dtype code " +
                              std::to_string(static_cast<int>(dtype)) + " has no kernel here");
}

template <DType kDType>
void launch_compress(const CompressParams& p, sg_stream_t stream) {
  const int64_t total = p.N * meta_cols(p.K);
  auto* first_bad = reinterpret_cast<long long*>(p.first_bad_group);
  if (!p.prune) sg_launch(first_bad_group_init_kernel, dim3(1), dim3(1), 0, stream, first_bad);
  if (total > 0) {
    const dim3 grid(elementwise_blocks(total)), block(kElementwiseThreads);
    if (p.prune)
      sg_launch(compress_kernel<kDType, false>, grid, block, 0, stream, p);
    else
      sg_launch(compress_kernel<kDType, true>, grid, block, 0, stream, p);
  }
  if (!p.prune) sg_launch(first_bad_group_finish_kernel, dim3(1), dim3(1), 0, stream, first_bad);
}

template <DType kDType>
void launch_decompress(const DecompressParams& p, sg_stream_t stream) {
  const int64_t total = p.N * meta_cols(p.K);
  if (total > 0)
    sg_launch(decompress_kernel<kDType>, dim3(elementwise_blocks(total)), dim3(kElementwiseThreads), 0, stream, p);
}

// What a tensor map describes: a row-major tensor at `base` of `rows` x `cols` elements of
// element_bytes (1, 2 or 4), rows row_stride bytes apart, for tma_load_2d boxes of box_cols x
// box_rows elements with a swizzle of swizzle_bytes (0, 32, 64 or 128). The map depends on these
// alone (not on the bytes at base), so equal keys give equal maps.
struct TensorMapKey {
  const void* base;
  uint64_t cols, rows, row_stride;
  uint32_t element_bytes, box_cols, box_rows, swizzle_bytes;

  bool operator==(const TensorMapKey& o) const {
    return base == o.base && cols == o.cols && rows == o.rows && row_stride == o.row_stride &&
           element_bytes == o.element_bytes && box_cols == o.box_cols && box_rows == o.box_rows &&
           swizzle_bytes == o.swizzle_bytes;
  }
};

struct TensorMapKeyHash {
  size_t operator()(const TensorMapKey& k) const {
    uint64_t h = reinterpret_cast<uintptr_t>(k.base);
    for (const uint64_t v : {k.cols, k.rows, k.row_stride, uint64_t(k.element_bytes) << 32 | k.box_cols,
                             uint64_t(k.box_rows) << 32 | k.swizzle_bytes})
      h = (h ^ v) * 0x100000001b3ull;  // FNV-1a style mixing, a word at a time
    return size_t(h ^ (h >> 29));
  }
};

// The tensor map of `key`: on the device through the driver's cuTensorMapEncodeTiled, looked up
// once through the runtime (no link to libcuda); for the emulator its TensorMap2d.
TensorMap2d encode_tensor_map_2d(const TensorMapKey& key) {
  TensorMap2d map;
#if defined(__CUDACC__)
  using Encode = PFN_cuTensorMapEncodeTiled_v12000;
  static const Encode encode = [] {
    void* function = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &function, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      function = nullptr;
    }
    return reinterpret_cast<Encode>(function);
  }();
  if (encode == nullptr)
    throw std::runtime_error("sparsegemm gemm: the CUDA driver offers no cuTensorMapEncodeTiled (TMA needs a CUDA 12 "
                             "driver)");
  const CUtensorMapDataType type = key.element_bytes == 1   ? CU_TENSOR_MAP_DATA_TYPE_UINT8
                                   : key.element_bytes == 2 ? CU_TENSOR_MAP_DATA_TYPE_UINT16
                                                            : CU_TENSOR_MAP_DATA_TYPE_UINT32;
  const CUtensorMapSwizzle swizzle = key.swizzle_bytes == 128  ? CU_TENSOR_MAP_SWIZZLE_128B
                                     : key.swizzle_bytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                     : key.swizzle_bytes == 32 ? CU_TENSOR_MAP_SWIZZLE_32B
                                                               : CU_TENSOR_MAP_SWIZZLE_NONE;
  const cuuint64_t dims[2] = {key.cols, key.rows};
  const cuuint64_t strides[1] = {key.row_stride};
  const cuuint32_t box[2] = {key.box_cols, key.box_rows};
  const cuuint32_t element_strides[2] = {1, 1};
  // 256-byte L2 promotion: a box row of Wc is 64 bytes, and its neighbours along K follow in the
  // next k-tiles (CUTLASS's default is 128 bytes). Out-of-bounds elements read as zeros.
  const CUresult result = encode(&map, type, 2, const_cast<void*>(key.base), dims, strides, box, element_strides,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                 CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (result != CUDA_SUCCESS)
    throw std::runtime_error("sparsegemm gemm: cuTensorMapEncodeTiled failed with CUresult " +
                             std::to_string(static_cast<int>(result)) + " for a " + std::to_string(key.rows) + " x " +
                             std::to_string(key.cols) + " tensor of " + std::to_string(key.element_bytes) +
                             "-byte elements");
#else
  map.base = key.base;
  map.element_bytes = key.element_bytes;
  map.dims[0] = key.cols;
  map.dims[1] = key.rows;
  map.row_stride = key.row_stride;
  map.box[0] = key.box_cols;
  map.box[1] = key.box_rows;
  map.swizzle_bytes = key.swizzle_bytes;
#endif
  return map;
}

// tensor_map_2d's memo of the maps it has encoded. Why: a TMA GEMM needs three maps per call, and
// an eager decode step makes hundreds of calls (PyTorch's Inductor caches its host-side TMA
// descriptors for the same reason); the weights' maps repeat every step, X's whenever the caching
// allocator hands back the same buffer. Room for the weights of a large mixture-of-experts model
// (two maps per layer) besides X's; when full it starts over (~4 MB of maps then). Thread-safe:
// calls may come from several host threads.
class TensorMapMemo {
 public:
  TensorMap2d get(const TensorMapKey& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto found = maps_.find(key);
    if (found != maps_.end()) {
      ++stats_.hits;
      return found->second;
    }
    const TensorMap2d map = encode_tensor_map_2d(key);  // may throw: then the memo is as it was
    ++stats_.encodes;
    if (maps_.size() >= kCapacity) maps_.clear();
    maps_.emplace(key, map);
    return map;
  }

  TensorMapMemoStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }

 private:
  static constexpr size_t kCapacity = 16384;
  std::mutex mutex_;
  std::unordered_map<TensorMapKey, TensorMap2d, TensorMapKeyHash> maps_;
  TensorMapMemoStats stats_{};
};

TensorMapMemo& tensor_map_memo() {
  static TensorMapMemo memo;
  return memo;
}

// The tensor map of `key`'s tensor and boxes (TensorMapKey), encoded once.
TensorMap2d tensor_map_2d(const void* base, uint32_t element_bytes, uint64_t cols, uint64_t rows, uint64_t row_stride,
                          uint32_t box_cols, uint32_t box_rows, uint32_t swizzle_bytes) {
  return tensor_map_memo().get({base, cols, rows, row_stride, element_bytes, box_cols, box_rows, swizzle_bytes});
}

// Why the TMA pipeline's tensor maps cannot describe GEMM p's operands (16-byte aligned X, Wc and
// kernel metadata, rows of whole 16 bytes), or "" when they can.
template <typename Policy>
std::string tma_operands_refusal(const GemmParams& p) {
  constexpr int64_t kElem = int64_t(sizeof(typename Policy::Operand));
  const int64_t Kc = values_cols(p.K);
  // cuTensorMapEncodeTiled takes row strides below 2^40 bytes (an M = 1 view may have any stride).
  if (reinterpret_cast<uintptr_t>(p.x) % 16 != 0 || (p.ldx * kElem) % 16 != 0 || p.ldx * kElem >= (int64_t(1) << 40))
    return "X 16-byte aligned with rows a multiple of 16 bytes apart, below 2^40 bytes, got ldx = " +
           std::to_string(p.ldx) + " elements of " + std::to_string(kElem) + " bytes";
  if (reinterpret_cast<uintptr_t>(p.values) % 16 != 0 || (Kc * kElem) % 16 != 0)
    return "Wc 16-byte aligned with rows of whole 16 bytes, got " + std::to_string(Kc * kElem) + "-byte rows (K = " +
           std::to_string(p.K) + ")";
  if (reinterpret_cast<uintptr_t>(p.meta) % 16 != 0) return "16-byte aligned kernel metadata";
  return "";
}

// Which TMA pipelines the GEMMs that plan_gemm gives the wgmma or the decode tile run, on a GPU that
// runs the wgmma tile and where their operands allow it: SPARSEGEMM_TMA in the environment at the
// first call. Unset (large_m): the wgmma tile's (config 3), which matched config 2 bit for bit and
// ran faster at large M on an H200 in all but one cell of -run20 against -run17 and -run18's config
// 2 (other machine starts; bench/results/README.md); the decode tile keeps cp.async, its TMA pipeline
// (config 4) 3-17% slower (-run18's sweep.txt).
// "0": neither; "1": configs 3 and 4; "wide": the 256-row wgmma tile (config 5) and 4. Any other
// value is refused: "off" or "false" must not silently mean on.
enum class TmaOptIn { none, large_m, standard, wide };
TmaOptIn tma_pipeline_opt_in() {
  static const TmaOptIn opt_in = [] {
    const char* value = std::getenv("SPARSEGEMM_TMA");
    const std::string text = value != nullptr ? value : "";
    if (text.empty()) return TmaOptIn::large_m;
    if (text == "0") return TmaOptIn::none;
    if (text == "1") return TmaOptIn::standard;
    if (text == "wide") return TmaOptIn::wide;
    throw std::invalid_argument("sparsegemm gemm: SPARSEGEMM_TMA must be unset (TMA for large M), 0 (no TMA), 1 "
                                "(large M and decode) or wide (the 256-row tile), got '" + text + "'");
  }();
  return opt_in;
}

// The kernel parameters of tile Tile's TMA pipeline for GEMM p (gemm_sp.cuh TmaRowMajorX), whose
// operands tma_operands_refusal accepts.
template <typename Policy, typename Tile>
typename TmaRowMajorX<typename Policy::Operand>::Params tma_gemm_params(const GemmParams& p) {
  using S = GemmShape<Policy, Tile>;
  constexpr int64_t kElem = S::kElemBytes;
  const int64_t Kc = values_cols(p.K);
  const int64_t meta_words = Policy::meta_steps(p.K) * Policy::kMetaWordsPerStep;  // per 16-row slice
  typename TmaRowMajorX<typename Policy::Operand>::Params params;
  params.gemm = p;
  params.w_map = tensor_map_2d(p.values, kElem, Kc, p.N, Kc * kElem, S::kBlockK / 2, S::kBlockN, 64);
  params.x_map = tensor_map_2d(p.x, kElem, p.K, p.M, p.ldx * kElem, S::kBlockK, S::kBlockM, 128);
  params.meta_map = tensor_map_2d(p.meta, 4, meta_words, meta_rows_padded(p.N) / 16, meta_words * 4,
                                  S::kSteps * Policy::kMetaWordsPerStep, S::kBlockN / 16, 0);
  return params;
}

// A split-K launch's token for its tile counters (gemm_sp.cuh arrived_last): 56 bits, the top one
// set, so that no token is 0, the value a counter word is left at, and 55 random ones: splitmix64
// over a per-thread seed (the OS's entropy, the clock and the thread), so two launches' tokens are
// equal with chance 2^-55. Drawn at each launch, so each call captured into a CUDA graph keeps its
// own.
uint64_t next_split_token() {
  thread_local uint64_t state = [] {
    std::random_device entropy;
    return (uint64_t(entropy()) << 32 ^ entropy()) ^
           uint64_t(std::chrono::steady_clock::now().time_since_epoch().count()) ^
           uint64_t(std::hash<std::thread::id>{}(std::this_thread::get_id()));
  }();
  uint64_t z = state += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return (z ^ (z >> 31)) >> 8 | uint64_t(1) << 55;
}

// XLoader: the B-operand loader (RowMajorX: the GEMM; NhwcConvX: the implicit-GEMM convolution);
// params: its Params.
template <typename Policy, typename Tile, typename XLoader>
void launch_gemm(const typename XLoader::Params& params, const GemmPlan& plan, sg_stream_t stream) {
  using S = GemmShape<Policy, Tile>;
  const GemmParams& p = XLoader::gemm(params);
  const int64_t n_blocks = (p.N + S::kBlockN - 1) / S::kBlockN;
  if (n_blocks > 65535) {  // gridDim.y limit
    throw std::invalid_argument("sparsegemm gemm: N = " + std::to_string(p.N) + " needs " + std::to_string(n_blocks) +
                                " blocks along N, more than the 65535 a launch allows; split the weight");
  }
  // plan_gemm splits only the decode and mid-M tiles and config 6's; the scratch is the caller's
  // (gemm_scratch).
  if (plan.split_k > 1 && (p.workspace == nullptr || p.tile_counters == nullptr)) {
    throw std::invalid_argument("sparsegemm gemm: split_k = " + std::to_string(plan.split_k) +
                                " needs a workspace and tile counters (gemm_scratch), got null pointers");
  }
  // The third grid dimension: the K splits, for a grouped launch of each group (p.M bounds their rows).
  int64_t layers = plan.split_k;
  if constexpr (XLoader::kGrouped) layers *= params.groups;
  if (layers > 65535)  // gridDim.z limit
    throw std::invalid_argument("sparsegemm gemm: " + std::to_string(layers) + " K splits (of all groups) exceed the "
                                "65535 blocks a launch allows along z");
  const dim3 grid(static_cast<unsigned>((p.M + S::kBlockM - 1) / S::kBlockM), static_cast<unsigned>(n_blocks),
                  static_cast<unsigned>(layers));
#if defined(SPARSEGEMM_SIMT)
  // What the kernel's cp.async copies may read: the emulator fails any copy outside (the tails'
  // predicates and the fast copies' bounds are what keeps them inside).
  const size_t values_bytes = size_t(p.N * values_cols(p.K)) * sizeof(typename Policy::Operand);
  const size_t meta_bytes = size_t(policy_kernel_meta_bytes<Policy>(p.N, p.K));
  std::vector<emu::ReadableBuffer> buffers{{p.x, size_t(XLoader::source_bytes(params)), "X"}};
  if constexpr (XLoader::kGrouped) {
    for (int g = 0; g < params.groups; ++g) {
      buffers.push_back({params.values[g], values_bytes, "a group's Wc"});
      buffers.push_back({params.meta[g], meta_bytes, "a group's kernel metadata"});
    }
  } else {
    buffers.push_back({p.values, values_bytes, "Wc"});
    buffers.push_back({p.meta, meta_bytes, "kernel metadata"});
  }
  const emu::ReadableBuffers readable(buffers);
#endif
  // Dependent: the kernel waits for the one before it before touching X, Y or the scratch.
  sg_launch_dependent(gemm_sp_kernel<Policy, Tile, XLoader>, grid, dim3(S::kThreads),
                      size_t(gemm_smem_bytes<Policy, Tile, XLoader>()), stream, params, plan.k_tiles_per_split,
                      plan.split_k > 1 ? next_split_token() : uint64_t(0));
}

// The tile of plan.config, fed by its TMA pipeline (TmaRowMajorX) where the config asks for it (3
// to 6) or tma_pipeline_opt_in (SPARSEGEMM_TMA) takes it, and the GEMM's operands allow it.
template <typename Policy, typename XLoader = RowMajorX<typename Policy::Operand>>
void launch_gemm_tile(const typename XLoader::Params& params, const GemmPlan& plan, sg_stream_t stream) {
  using Operand = typename Policy::Operand;
  const bool decode = is_decode(plan.config);
  const bool wide = plan.config == GemmConfig::large_m_wgmma_tma_wide;
  const bool split_wgmma = plan.config == GemmConfig::large_m_wgmma_tma_split;
  const bool wgmma =
      plan.config == GemmConfig::large_m_wgmma || plan.config == GemmConfig::large_m_wgmma_tma || wide || split_wgmma;
  const bool forced_tma =
      plan.config == GemmConfig::large_m_wgmma_tma || plan.config == GemmConfig::decode_tma || wide || split_wgmma;
  auto tma_name = [&] {  // for errors only: no string work on the decode path's host time
    return "config " + std::to_string(static_cast<int>(plan.config)) + " (the " +
           (decode ? "decode" : wide ? "256-row wgmma" : split_wgmma ? "K-split wgmma" : "wgmma") + " tile fed by TMA)";
  };
  if (plan.config == GemmConfig::mid_m) {
    // Forced only (tuning): the convolution's implicit GEMM does not instantiate the tile.
    if constexpr (std::is_same_v<XLoader, RowMajorX<Operand>>) {
      launch_gemm<Policy, gemm_tiles::MidM, XLoader>(params, plan, stream);
      return;
    } else {
      throw std::invalid_argument("sparsegemm conv2d: config 7 (the mid-size M tile) serves the GEMM only");
    }
  }
  if constexpr (std::is_same_v<XLoader, RowMajorX<Operand>>) {
    const GemmParams& p = XLoader::gemm(params);
    // The opt-in applies to the tiles plan_gemm chose: a config forced by the caller stays as asked.
    const TmaOptIn opt_in = p.config < 0 ? tma_pipeline_opt_in() : TmaOptIn::none;
    const bool opted_in = opt_in != TmaOptIn::none && wgmma_tile_runs() &&
                          (wgmma || (decode && opt_in != TmaOptIn::large_m));
    // K = 0 copies nothing (and a tensor map cannot describe an empty tensor): the cp.async
    // pipeline writes the same act(bias).
    if ((forced_tma || opted_in) && p.K > 0) {
      const std::string refusal = tma_operands_refusal<Policy>(p);
      if (forced_tma && !refusal.empty())
        throw std::invalid_argument("sparsegemm gemm: " + tma_name() + " needs " + refusal + "; config " +
                                    (decode ? "1" : "2") + " takes any operand" +
                                    (split_wgmma ? " (without splitting K)" : ""));
      if (refusal.empty()) {
        using Tma = TmaRowMajorX<Operand>;
        if (decode) {
          launch_gemm<Policy, gemm_tiles::Decode, Tma>(tma_gemm_params<Policy, gemm_tiles::Decode>(p), plan, stream);
        } else if (wide || opt_in == TmaOptIn::wide) {  // opt_in is none when a config was forced
          using Wide = gemm_tiles::WgmmaWideLargeM;
          launch_gemm<Policy, Wide, Tma>(tma_gemm_params<Policy, Wide>(p), plan, stream);
        } else if (split_wgmma) {
          // plan_gemm refuses config 6 to the int8 GEMM, whose policy never instantiates the tile.
          if constexpr (Policy::kBlockK == gemm_tiles::kBlockK) {
            using Split = gemm_tiles::WgmmaSplitK;
            launch_gemm<Policy, Split, Tma>(tma_gemm_params<Policy, Split>(p), plan, stream);
          } else {
            throw std::invalid_argument("sparsegemm gemm: config 6 serves the fp16 / bf16 GEMM only");
          }
        } else {
          launch_gemm<Policy, gemm_tiles::WgmmaLargeM, Tma>(tma_gemm_params<Policy, gemm_tiles::WgmmaLargeM>(p), plan,
                                                             stream);
        }
        return;
      }
    }
  } else if (forced_tma) {
    throw std::invalid_argument("sparsegemm conv2d: " + tma_name() + " serves the GEMM only; the convolution takes "
                                "config " + (decode ? "1" : "2"));
  }
  if (decode) {
    launch_gemm<Policy, gemm_tiles::Decode, XLoader>(params, plan, stream);
  } else if (wgmma) {
    launch_gemm<Policy, gemm_tiles::WgmmaLargeM, XLoader>(params, plan, stream);
  } else {
    launch_gemm<Policy, gemm_tiles::LargeM, XLoader>(params, plan, stream);
  }
}

// The GPU as the decode tile of the f16 policy of the GEMM's family sees it (block_k: its k-tile),
// for every output dtype, so that the scratch query and the launch always plan alike (gemm_scratch).
DecodeWave family_decode_wave(int64_t block_k) {
  return block_k == gemm_tiles::kBlockKS8 ? decode_wave<MmaS8<DType::f16>>() : decode_wave<Mma16<DType::f16>>();
}

// The plan of a grouped GEMM (params.h GroupedGemmParams) with `groups` groups in all, M bounding a
// group's rows and X holding x_rows: the tile plan_gemm takes for M, and for the decode tile the K
// split that fills the GPU with the groups that can have rows (at most one per row of X: a decode
// step's routed experts) sharing the wave. Rows past X's are refused: 32-bit tile rows (gemm_sp.cuh
// GroupBlockGemm: absolute, below first row + M + kBlockM <= 2 x_rows + kBlockM).
GemmPlan plan_grouped(int64_t M, int64_t N, int64_t K, int64_t x_rows, int64_t groups, int config, int split_k,
                      int64_t block_k) {
  if (x_rows > (int64_t(1) << 30) - 256)
    throw std::invalid_argument("sparsegemm gemm_grouped: X must have at most 2^30 - 256 rows, got " +
                                std::to_string(x_rows));
  if (config > static_cast<int>(GemmConfig::large_m_wgmma))
    throw std::invalid_argument("sparsegemm gemm_grouped: config must be -1 (choose), 0 (large M), 1 (decode) or 2 "
                                "(large M, wgmma), got " + std::to_string(config) + ": the TMA pipelines serve "
                                "single GEMMs");
  // A K split keeps partial sums for every row of X (a group's rows are absolute: gemm_sp.cuh
  // partial_rows), so an X of more rows than the groups can hold (M each) would take a workspace of
  // rows no group computes: 8 GiB for 65536 rows of 4096 outputs split 8 ways, for 16 rows a group.
  // No split there unless asked (a mixture of experts, whose routed rows the groups cover, splits).
  const int64_t rows = std::max<int64_t>(1, std::min(M, x_rows));
  const int planned_split = split_k <= 0 && x_rows > rows * groups ? 1 : split_k;
  return plan_device_gemm(rows, N, K, family_decode_wave(block_k), config, planned_split, block_k,
                          std::max<int64_t>(1, std::min(groups, x_rows)));
}

// Split-K scratch of a grouped GEMM planned as plan_grouped: partial sums for every row of X (a
// group's rows are absolute) and one arrival counter per output tile of each group of a launch.
GemmScratch grouped_scratch(int64_t M, int64_t N, int64_t K, int64_t x_rows, int64_t groups, int config, int split_k,
                            int64_t block_k) {
  GemmScratch scratch;
  if (std::min(M, x_rows) <= 0 || N == 0 || groups == 0) return scratch;
  const GemmPlan plan = plan_grouped(M, N, K, x_rows, groups, config, split_k, block_k);
  scratch.workspace_bytes = gemm_plan_workspace_bytes(plan, x_rows, N);
  scratch.tile_counters =
      gemm_plan_tile_counters(plan, std::min(M, x_rows), N) * std::min<int64_t>(groups, kMaxGemmGroups);
  return scratch;
}

// The grouped GEMM of MMA policy Policy (params.h GroupedGemmParams): one launch of the tile
// plan_grouped takes, its grid's third dimension groups x K splits.
template <typename Policy>
void launch_grouped(GroupedGemmParams params, int64_t block_k, sg_stream_t stream) {
  GemmParams& p = params.gemm;
  if (params.groups < 0 || params.groups > kMaxGemmGroups)
    throw std::invalid_argument("sparsegemm gemm_grouped: groups must be 0 to " + std::to_string(kMaxGemmGroups) +
                                " per launch, got " + std::to_string(params.groups));
  const GemmPlan plan = plan_grouped(p.M, p.N, p.K, params.x_rows, params.planned_groups, p.config, p.split_k, block_k);
  p.M = std::min(p.M, params.x_rows);  // no group has more rows than X
  if (p.M <= 0 || p.N == 0 || params.groups == 0) return;
  launch_gemm_tile<Policy, GroupedRowMajorX<typename Policy::Operand>>(params, plan, stream);
}

template <DType kInDType>
void launch_quantize_rows(int64_t M, int64_t K, const void* x, int64_t ldx, int8_t* x_q, float* x_scale,
                          sg_stream_t stream) {
  // One block per row up to a cap (grid-stride beyond); rows are independent.
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(M, 65535));
  sg_launch_dependent(quantize_rows_kernel<kInDType>, dim3(blocks), dim3(kQuantizeThreads),
                      size_t(kQuantizeThreads / 32 * sizeof(float)), stream, M, K, x, ldx, x_q, x_scale);
}

template <DType kInDType>
void launch_quantize_rows_static(int64_t M, int64_t K, const void* x, int64_t ldx, const float* scale,
                                 const int64_t* row_offsets, int64_t groups, int8_t* x_q, float* x_scale,
                                 sg_stream_t stream) {
  // As launch_quantize_rows.
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(M, 65535));
  sg_launch_dependent(quantize_rows_static_kernel<kInDType>, dim3(blocks), dim3(kQuantizeThreads),
                      size_t(kQuantizeThreads / 32 * sizeof(int)), stream, M, K, x, ldx, scale, row_offsets, groups,
                      x_q, x_scale);
}

}  // namespace

void compress(const CompressParams& p, void* stream) {
  const auto s = static_cast<sg_stream_t>(stream);
  switch (p.dtype) {
    case DType::f32: launch_compress<DType::f32>(p, s); break;
    case DType::f16: launch_compress<DType::f16>(p, s); break;
    case DType::bf16: launch_compress<DType::bf16>(p, s); break;
    default: unsupported_dtype("compress", p.dtype);
  }
}

void decompress(const DecompressParams& p, void* stream) {
  const auto s = static_cast<sg_stream_t>(stream);
  switch (p.dtype) {
    case DType::f32: launch_decompress<DType::f32>(p, s); break;
    case DType::f16: launch_decompress<DType::f16>(p, s); break;
    case DType::bf16: launch_decompress<DType::bf16>(p, s); break;
    default: unsupported_dtype("decompress", p.dtype);
  }
}

int64_t kernel_meta_bytes(int64_t N, int64_t K) { return policy_kernel_meta_bytes<Mma16<DType::f16>>(N, K); }

void reorder_meta(const uint8_t* logical_meta, void* kernel_meta, int64_t N, int64_t K, void* stream) {
  const int64_t words = kernel_meta_bytes(N, K) / int64_t(sizeof(uint32_t));
  if (words == 0) return;
  sg_launch(reorder_meta_kernel, dim3(elementwise_blocks(words)), dim3(kElementwiseThreads), 0,
            static_cast<sg_stream_t>(stream), logical_meta, static_cast<uint32_t*>(kernel_meta), N, K);
}

GemmScratch gemm_scratch(int64_t M, int64_t N, int64_t K, int config, int split_k) {
  return plan_scratch(
      plan_device_gemm(M, N, K, decode_wave<Mma16<DType::f16>>(), config, split_k, gemm_tiles::kBlockK), M, N);
}

bool large_m_uses_wgmma() { return wgmma_tile_runs(); }

TensorMapMemoStats tensor_map_memo_stats() { return tensor_map_memo().stats(); }

void wgmma_selftest(int kind, int mode, bool b_upper_half, const void* a, const void* b, const void* c,
                    const uint32_t* e, void* d, void* stream) {
  if (kind < 0 || kind > 2) throw std::invalid_argument("sparsegemm wgmma_selftest: kind must be 0 (f16), 1 (bf16) "
                                                        "or 2 (s8), got " + std::to_string(kind));
#if defined(__CUDACC__)
  if (mode != 0 && mode != 2 && mode != 3)
    throw std::invalid_argument("sparsegemm wgmma_selftest: mode must be 0, 2 or 3 on the device (1 reads registers "
                                "in flight), got " + std::to_string(mode));
  if (!wgmma_tile_runs()) throw std::invalid_argument("sparsegemm wgmma_selftest: needs sm_90a machine code on a "
                                                      "compute capability 9.0 GPU, but " + wgmma_blocker());
#else
  if (mode < 0 || mode > 3) throw std::invalid_argument("sparsegemm wgmma_selftest: mode must be 0, 1, 2 or 3, got " +
                                                        std::to_string(mode));
#endif
  const auto s = static_cast<sg_stream_t>(stream);
  const auto* a8 = static_cast<const uint8_t*>(a);
  const auto* b8 = static_cast<const uint8_t*>(b);
  const auto* c32 = static_cast<const uint32_t*>(c);
  auto* d32 = static_cast<uint32_t*>(d);
  if (kind == 0) launch_wgmma_selftest<0>(mode, b_upper_half, a8, b8, c32, e, d32, s);
  if (kind == 1) launch_wgmma_selftest<1>(mode, b_upper_half, a8, b8, c32, e, d32, s);
  if (kind == 2) launch_wgmma_selftest<2>(mode, b_upper_half, a8, b8, c32, e, d32, s);
}

void tma_selftest(int mode, const uint8_t* src, int64_t rows, int64_t cols, int64_t row_stride, int box_cols,
                  int box_rows, int swizzle, int c0, int c1, uint8_t* out, void* stream) {
  const std::string op = "sparsegemm tma_selftest: ";
#if defined(__CUDACC__)
  if (mode != 0) throw std::invalid_argument(op + "mode must be 0 on the device (1 reads a copy in flight), got " +
                                             std::to_string(mode));
  if (!wgmma_tile_runs()) throw std::invalid_argument(op + "needs sm_90a machine code on a compute capability 9.0 "
                                                      "GPU, but " + wgmma_blocker());
#else
  if (mode != 0 && mode != 1) throw std::invalid_argument(op + "mode must be 0 or 1, got " + std::to_string(mode));
#endif
  if (rows < 1 || cols < 1 || box_cols < 1 || box_rows < 1 || box_cols * box_rows > 32768)
    throw std::invalid_argument(op + "the tensor and the box must not be empty, and the box at most 32 KiB");
  if (swizzle != 0 && swizzle != 32 && swizzle != 64 && swizzle != 128)
    throw std::invalid_argument(op + "swizzle must be 0, 32, 64 or 128, got " + std::to_string(swizzle));
  const TensorMap2d map = tensor_map_2d(src, 1, uint64_t(cols), uint64_t(rows), uint64_t(row_stride),
                                        uint32_t(box_cols), uint32_t(box_rows), uint32_t(swizzle));
  const auto bytes = static_cast<uint32_t>(box_cols * box_rows);
#if defined(SPARSEGEMM_SIMT)
  const emu::ReadableBuffers readable{{src, size_t((rows - 1) * row_stride + cols), "src"}};
#endif
  sg_launch(tma_selftest_kernel, dim3(1), dim3(32), size_t(kTmaSelftestBoxOffset) + bytes,
            static_cast<sg_stream_t>(stream), mode, map, bytes, c0, c1, out);
}

void gemm(const GemmParams& p, void* stream) {
  if (p.M == 0 || p.N == 0) return;
  const GemmPlan plan =
      plan_device_gemm(p.M, p.N, p.K, decode_wave<Mma16<DType::f16>>(), p.config, p.split_k, gemm_tiles::kBlockK);
  const auto s = static_cast<sg_stream_t>(stream);
  switch (p.dtype) {
    case DType::f16: launch_gemm_tile<Mma16<DType::f16>>(p, plan, s); break;
    case DType::bf16: launch_gemm_tile<Mma16<DType::bf16>>(p, plan, s); break;
    default: unsupported_dtype("gemm", p.dtype);
  }
}

GemmScratch gemm_grouped_scratch(int64_t M, int64_t N, int64_t K, int64_t x_rows, int64_t groups, int config,
                                 int split_k) {
  return grouped_scratch(M, N, K, x_rows, groups, config, split_k, gemm_tiles::kBlockK);
}

GemmScratch gemm_s8_grouped_scratch(int64_t M, int64_t N, int64_t K, int64_t x_rows, int64_t groups, int config,
                                    int split_k) {
  return grouped_scratch(M, N, K, x_rows, groups, config, split_k, gemm_tiles::kBlockKS8);
}

void gemm_grouped(const GroupedGemmParams& p, void* stream) {
  const auto s = static_cast<sg_stream_t>(stream);
  switch (p.gemm.dtype) {
    case DType::f16: launch_grouped<Mma16<DType::f16>>(p, gemm_tiles::kBlockK, s); break;
    case DType::bf16: launch_grouped<Mma16<DType::bf16>>(p, gemm_tiles::kBlockK, s); break;
    default: unsupported_dtype("gemm_grouped", p.gemm.dtype);
  }
}

void conv2d(const ConvParams& p, void* stream) {
  const GemmParams& g = p.gemm;
  if (g.M == 0 || g.N == 0) return;
  // The convolution is the GEMM of its implicit X: the same plan (tile, split-K) and workspace.
  const GemmPlan plan =
      plan_device_gemm(g.M, g.N, g.K, decode_wave<Mma16<DType::f16>>(), g.config, g.split_k, gemm_tiles::kBlockK);
  const auto s = static_cast<sg_stream_t>(stream);
  switch (g.dtype) {
    case DType::f16: launch_gemm_tile<Mma16<DType::f16>, NhwcConvX<uint16_t>>(p, plan, s); break;
    case DType::bf16: launch_gemm_tile<Mma16<DType::bf16>, NhwcConvX<uint16_t>>(p, plan, s); break;
    default: unsupported_dtype("conv2d", g.dtype);
  }
}

void quantize_rows(int64_t M, int64_t K, const void* x, int64_t ldx, DType in_dtype, int8_t* x_q, float* x_scale,
                   void* stream) {
  if (M == 0) return;
  const auto s = static_cast<sg_stream_t>(stream);
  switch (in_dtype) {
    case DType::f32: launch_quantize_rows<DType::f32>(M, K, x, ldx, x_q, x_scale, s); break;
    case DType::f16: launch_quantize_rows<DType::f16>(M, K, x, ldx, x_q, x_scale, s); break;
    case DType::bf16: launch_quantize_rows<DType::bf16>(M, K, x, ldx, x_q, x_scale, s); break;
    default: unsupported_dtype("quantize_rows", in_dtype);
  }
}

void quantize_rows_static(int64_t M, int64_t K, const void* x, int64_t ldx, DType in_dtype, const float* scale,
                          const int64_t* row_offsets, int64_t groups, int8_t* x_q, float* x_scale, void* stream) {
  if (row_offsets != nullptr && groups < 1)
    throw std::invalid_argument("sparsegemm quantize_rows_static: row_offsets needs at least one group, got groups = " +
                                std::to_string(groups));
  if (M == 0) return;
  const auto s = static_cast<sg_stream_t>(stream);
  switch (in_dtype) {
    case DType::f32:
      launch_quantize_rows_static<DType::f32>(M, K, x, ldx, scale, row_offsets, groups, x_q, x_scale, s);
      break;
    case DType::f16:
      launch_quantize_rows_static<DType::f16>(M, K, x, ldx, scale, row_offsets, groups, x_q, x_scale, s);
      break;
    case DType::bf16:
      launch_quantize_rows_static<DType::bf16>(M, K, x, ldx, scale, row_offsets, groups, x_q, x_scale, s);
      break;
    default: unsupported_dtype("quantize_rows_static", in_dtype);
  }
}

int64_t kernel_meta_bytes_s8(int64_t N, int64_t K) { return policy_kernel_meta_bytes<MmaS8<DType::f16>>(N, K); }

void reorder_meta_s8(const uint8_t* logical_meta, void* kernel_meta, int64_t N, int64_t K, void* stream) {
  const int64_t words = kernel_meta_bytes_s8(N, K) / int64_t(sizeof(uint32_t));
  if (words == 0) return;
  sg_launch(reorder_meta_s8_kernel, dim3(elementwise_blocks(words)), dim3(kElementwiseThreads), 0,
            static_cast<sg_stream_t>(stream), logical_meta, static_cast<uint32_t*>(kernel_meta), N, K);
}

GemmScratch gemm_s8_scratch(int64_t M, int64_t N, int64_t K, int config, int split_k) {
  return plan_scratch(
      plan_device_gemm(M, N, K, decode_wave<MmaS8<DType::f16>>(), config, split_k, gemm_tiles::kBlockKS8), M, N);
}

void gemm_s8(const GemmParams& p, void* stream) {
  if (p.M == 0 || p.N == 0) return;
  const GemmPlan plan = plan_device_gemm(p.M, p.N, p.K, decode_wave<MmaS8<DType::f16>>(), p.config, p.split_k,
                                         gemm_tiles::kBlockKS8);
  const auto s = static_cast<sg_stream_t>(stream);
  switch (p.dtype) {
    case DType::f16: launch_gemm_tile<MmaS8<DType::f16>>(p, plan, s); break;
    case DType::bf16: launch_gemm_tile<MmaS8<DType::bf16>>(p, plan, s); break;
    default: unsupported_dtype("gemm_s8", p.dtype);
  }
}

void gemm_s8_grouped(const GroupedGemmParams& p, void* stream) {
  const auto s = static_cast<sg_stream_t>(stream);
  switch (p.gemm.dtype) {
    case DType::f16: launch_grouped<MmaS8<DType::f16>>(p, gemm_tiles::kBlockKS8, s); break;
    case DType::bf16: launch_grouped<MmaS8<DType::bf16>>(p, gemm_tiles::kBlockKS8, s); break;
    default: unsupported_dtype("gemm_s8_grouped", p.gemm.dtype);
  }
}

}  // namespace SG_KERNEL_NS
}  // namespace sparsegemm
