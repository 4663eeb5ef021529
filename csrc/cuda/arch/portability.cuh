// One kernel source, two compilers (DESIGN.md "Verification without a GPU"):
// - nvcc (__CUDACC__): the real device code and launch;
// - the host compiler with SPARSEGEMM_SIMT defined by the including .cpp: the same source runs on
//   the CPU in the SIMT emulator (csrc/simt/emulator.h).
// Kernels are written inside `namespace sparsegemm { namespace SG_KERNEL_NS { ... } }` so that the
// two copies (sparsegemm::cuda and sparsegemm::simt) can live in one module.
//
// What a kernel may use, on both sides:
//   SG_DEVICE, SG_GLOBAL, SG_LAUNCH_BOUNDS(threads[, min blocks per SM]), SG_DYNAMIC_SMEM(type, name) (the only way to
//   declare shared memory), SG_GRID_CONSTANT (a const kernel parameter whose address is taken),
//   threadIdx/blockIdx/blockDim/gridDim, dim3, __syncthreads,
//   __shfl_sync/__shfl_xor_sync/__shfl_down_sync/__shfl_up_sync (32-bit types, full-warp mask),
//   __ballot_sync, __syncwarp, __threadfence, atomicAdd (float, int, uint64), atomicCAS (uint64),
//   atomicMin (int, long long), min/max,
//   __restrict__, the 16-bit float helpers below, byte_perm, and sg_launch(kernel, grid, block,
//   smem_bytes, stream, args...) from host code, or sg_launch_dependent(...) (same arguments) for a
//   kernel that calls grid_dependency_wait (warp_ops.cuh) before it reads anything an earlier
//   kernel on the stream may write.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
// ================================ device (nvcc) ==================================================
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#define SG_DEVICE __device__ __forceinline__
#define SG_GLOBAL __global__
#define SG_KERNEL_NS cuda
#define SG_LAUNCH_BOUNDS(...) __launch_bounds__(__VA_ARGS__)
// 1024-byte aligned: wgmma's 128-byte swizzle works on absolute shared-memory addresses, so its B
// tiles must start 1024-byte atoms (warp_ops.cuh wgmma_desc_b128). ptxas relies on it (it folds
// the descriptors' address arithmetic accordingly; on sm_90 the buffer starts at 0x400, past the
// 1 KiB the system reserves); no kernel has static shared memory, so it costs nothing.
#define SG_DYNAMIC_SMEM(type, name) extern __shared__ __align__(1024) type name[]
// A const kernel parameter whose address the kernel may take (a TMA tensor map's must be the
// parameter's own: PTX cp.async.bulk.tensor reads it from the parameter space); sm_70 and newer.
#define SG_GRID_CONSTANT __grid_constant__

using sg_stream_t = cudaStream_t;

namespace sparsegemm {
namespace cuda_launch_detail {

[[noreturn]] inline void throw_launch_error(const char* launch_text, const char* step, cudaError_t err) {
  throw std::runtime_error(std::string("sparsegemm: ") + step + " failed for sg_launch(" + launch_text +
                           "): " + cudaGetErrorString(err));
}

// Dynamic shared memory above 48 KiB needs the kernel's opt-in attribute, which lasts for the
// kernel on the current device: set once per (kernel, device) and raised when a launch needs more,
// not on every launch (both GEMM tiles are above 48 KiB, and a decode GEMM is host bound).
inline void opt_in_shared_memory(const char* launch_text, const void* kernel, size_t smem_bytes) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) throw_launch_error(launch_text, "cudaGetDevice", err);
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> granted;
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& bytes = granted[{kernel, device}];
  if (bytes >= smem_bytes) return;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
  if (err != cudaSuccess) throw_launch_error(launch_text, "cudaFuncSetAttribute", err);
  bytes = smem_bytes;
}

// Launches `kernel` and checks the launch (not the execution: no host sync, so graph capture works).
template <typename... KernelParams, typename... Args>
void launch(const char* launch_text, void (*kernel)(KernelParams...), dim3 grid, dim3 block, size_t smem_bytes,
            cudaStream_t stream, Args&&... args) {
  if (smem_bytes > 48 * 1024) opt_in_shared_memory(launch_text, reinterpret_cast<const void*>(kernel), smem_bytes);
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw_launch_error(launch_text, "kernel launch", err);
}

// Whether `kernel` may be launched on `device` so that it overlaps the kernel before it on the
// stream (programmatic dependent launch): the device must have it (compute capability 9.0 and
// newer) and the kernel's code must have been compiled for it, from sm_90 PTX or newer (a build
// for sm_80 only that runs JIT-compiled on a Hopper has no griddepcontrol.wait in it, so its
// reads would not wait for the previous kernel's writes). Asked once per (kernel, device).
// SPARSEGEMM_PDL=0 in the environment at the first launch turns it off, to time both ways in one
// build or to rule it out.
inline bool programmatic_launch_allowed(const void* kernel, int device) {
  static const bool disabled = [] {
    const char* value = std::getenv("SPARSEGEMM_PDL");
    return value != nullptr && std::string(value) == "0";
  }();
  if (disabled) return false;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, bool> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find({kernel, device});
  if (found != known.end()) return found->second;
  int major = 0;
  cudaFuncAttributes attributes = {};
  const bool allowed = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                       major >= 9 && cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess &&
                       attributes.ptxVersion >= 90;
  if (!allowed) cudaGetLastError();  // a failed query means no overlap, not an error to report later
  known[{kernel, device}] = allowed;
  return allowed;
}

// launch() with the programmatic-stream-serialization attribute where the device has it: the grid
// may start once every block of the kernel before it has run griddepcontrol.launch_dependents (or
// exited), and its threads' griddepcontrol.wait returns when that kernel has completed and its
// writes are visible. Only for kernels that wait before reading anything an earlier kernel may
// write; what they do before the wait (prefetching weights into L2) overlaps that kernel's tail
// and this launch's own start-up. A launch with the attribute is captured into a CUDA graph as a
// programmatic edge, so graph replays overlap the same way.
template <typename... KernelParams, typename... Args>
void launch_dependent(const char* launch_text, void (*kernel)(KernelParams...), dim3 grid, dim3 block,
                      size_t smem_bytes, cudaStream_t stream, Args&&... args) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) throw_launch_error(launch_text, "cudaGetDevice", err);
  if (!programmatic_launch_allowed(reinterpret_cast<const void*>(kernel), device)) {
    launch(launch_text, kernel, grid, block, smem_bytes, stream, std::forward<Args>(args)...);
    return;
  }
  if (smem_bytes > 48 * 1024) opt_in_shared_memory(launch_text, reinterpret_cast<const void*>(kernel), smem_bytes);
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = attribute;
  config.numAttrs = 1;
  err = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  if (err != cudaSuccess) throw_launch_error(launch_text, "cudaLaunchKernelEx", err);
}

}  // namespace cuda_launch_detail
}  // namespace sparsegemm

// A macro so that the kernel's text can name it in error messages (templates with commas included).
#define sg_launch(...) ::sparsegemm::cuda_launch_detail::launch(#__VA_ARGS__, __VA_ARGS__)
#define sg_launch_dependent(...) ::sparsegemm::cuda_launch_detail::launch_dependent(#__VA_ARGS__, __VA_ARGS__)

namespace sparsegemm {

SG_DEVICE float f16_to_f32(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
SG_DEVICE float bf16_to_f32(uint16_t bits) { return __bfloat162float(__ushort_as_bfloat16(bits)); }
SG_DEVICE uint16_t f32_to_f16_rn(float x) { return __half_as_ushort(__float2half_rn(x)); }
SG_DEVICE uint16_t f32_to_bf16_rn(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }

// Byte n of the result is byte (selector >> 4n) & 7 of {x: bytes 0-3, y: bytes 4-7} (PTX prmt,
// default mode; selectors here never set a nibble's sign-replicate bit 3).
SG_DEVICE uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t selector) { return __byte_perm(x, y, selector); }

}  // namespace sparsegemm

#elif defined(SPARSEGEMM_SIMT)
// ================================ host (SIMT emulator) ===========================================
#include <atomic>
#include <type_traits>

#include "half_bits.h"
#include "simt/emulator.h"
#include "simt/warp_models.h"

#define SG_DEVICE inline
#define SG_GLOBAL
#define SG_KERNEL_NS simt
#define SG_LAUNCH_BOUNDS(...)
#define SG_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::sparsegemm::emu::shared_memory())
#define SG_GRID_CONSTANT

using sg_stream_t = void*;
using dim3 = ::sparsegemm::emu::Dim3;
using uint3 = ::sparsegemm::emu::UInt3;
using ::sparsegemm::emu::blockDim;
using ::sparsegemm::emu::blockIdx;
using ::sparsegemm::emu::gridDim;
using ::sparsegemm::emu::threadIdx;

// The stream is accepted for symmetry with the device launch; the emulator runs synchronously.
#define sg_launch(...) ::sparsegemm::simt_launch_detail::launch(#__VA_ARGS__, false, __VA_ARGS__)
// A dependent launch runs after the previous one here too; the emulator checks its threads copy
// nothing before grid_dependency_wait (emulator.h).
#define sg_launch_dependent(...) ::sparsegemm::simt_launch_detail::launch(#__VA_ARGS__, true, __VA_ARGS__)

namespace sparsegemm {
namespace simt_launch_detail {
template <typename... KernelParams, typename... Args>
void launch(const char* launch_text, bool dependent, void (*kernel)(KernelParams...), dim3 grid, dim3 block,
            size_t smem_bytes, sg_stream_t /*stream*/, Args&&... args) {
  ::sparsegemm::emu::launch(launch_text, dependent, kernel, grid, block, smem_bytes, std::forward<Args>(args)...);
}
}  // namespace simt_launch_detail
}  // namespace sparsegemm

inline void __syncthreads() { ::sparsegemm::emu::syncthreads(); }
// Fibers of one launch run on one OS thread, so ordering within the grid needs nothing more.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Atomics: fibers switch only at barriers and collectives, so a plain read-modify-write is atomic.
inline float atomicAdd(float* address, float value) {
  ::sparsegemm::emu::check_dependency_waited("atomicAdd");
  const float old = *address;
  *address = old + value;
  return old;
}
inline int atomicAdd(int* address, int value) {
  ::sparsegemm::emu::check_dependency_waited("atomicAdd");
  const int old = *address;
  *address = static_cast<int>(static_cast<unsigned>(old) + static_cast<unsigned>(value));  // wraps like the hardware
  return old;
}
inline uint64_t atomicAdd(uint64_t* address, uint64_t value) {
  ::sparsegemm::emu::check_dependency_waited("atomicAdd");
  const uint64_t old = *address;
  *address = old + value;  // unsigned: wraps like the hardware
  return old;
}
inline uint64_t atomicCAS(uint64_t* address, uint64_t expected, uint64_t value) {
  ::sparsegemm::emu::check_dependency_waited("atomicCAS");
  const uint64_t old = *address;
  if (old == expected) *address = value;
  return old;
}
inline int atomicMin(int* address, int value) {
  ::sparsegemm::emu::check_dependency_waited("atomicMin");
  const int old = *address;
  if (value < old) *address = value;
  return old;
}
inline long long atomicMin(long long* address, long long value) {
  ::sparsegemm::emu::check_dependency_waited("atomicMin");
  const long long old = *address;
  if (value < old) *address = value;
  return old;
}

template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

// ---- warp shuffles and vote on the host (device: the CUDA built-ins) ---------------------------
// CUDA's intrinsics are shfl.sync / vote.sync with c = ((32 - width) << 8) | clamp; 32-bit types.
template <typename T>
inline uint32_t sg_simt_bits(T value) {
  static_assert(sizeof(T) == 4 && std::is_trivially_copyable<T>::value, "warp shuffles model 32-bit types");
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return bits;
}
template <typename T>
inline T sg_simt_from_bits(uint32_t bits) {
  T value;
  std::memcpy(&value, &bits, 4);
  return value;
}

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  return sg_simt_from_bits<T>(::sparsegemm::emu::shfl(::sparsegemm::emu::ShuffleMode::idx, mask, sg_simt_bits(var),
                                                      src_lane, ((32 - width) << 8) | 0x1F));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  return sg_simt_from_bits<T>(::sparsegemm::emu::shfl(::sparsegemm::emu::ShuffleMode::bfly, mask, sg_simt_bits(var),
                                                      lane_mask, ((32 - width) << 8) | 0x1F));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return sg_simt_from_bits<T>(::sparsegemm::emu::shfl(::sparsegemm::emu::ShuffleMode::down, mask, sg_simt_bits(var),
                                                      static_cast<int>(delta), ((32 - width) << 8) | 0x1F));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return sg_simt_from_bits<T>(::sparsegemm::emu::shfl(::sparsegemm::emu::ShuffleMode::up, mask, sg_simt_bits(var),
                                                      static_cast<int>(delta), (32 - width) << 8));
}
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) { ::sparsegemm::emu::syncwarp(mask); }
inline unsigned __ballot_sync(unsigned mask, int predicate) { return ::sparsegemm::emu::ballot(mask, predicate != 0); }

namespace sparsegemm {

// The exact IEEE binary16 / bfloat16 conversions of half_bits.h (shared with the CPU kernels): the
// same values the device intrinsics return (round to nearest even, subnormals kept, overflow to
// infinity). NaN stays NaN, but its bit pattern may differ: fp32 arithmetic on the GPU returns the
// canonical 0x7fffffff for a NaN input (CUDA Programming Guide), x86 keeps the payload. Tests
// compare NaN positions, not NaN bits.
using half_bits::bf16_to_f32;
using half_bits::f16_to_f32;
using half_bits::f32_to_bf16_rn;
using half_bits::f32_to_f16_rn;

// __byte_perm / prmt.b32 in its default mode (see the device definition).
inline uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t selector) {
  const uint64_t bytes = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t result = 0;
  for (int n = 0; n < 4; ++n)
    result |= static_cast<uint32_t>((bytes >> (8 * ((selector >> (4 * n)) & 7))) & 0xFF) << (8 * n);
  return result;
}

}  // namespace sparsegemm

#else
#error "cuda/arch/portability.cuh: compile with nvcc, or define SPARSEGEMM_SIMT for the SIMT emulator"
#endif

namespace sparsegemm {

// Two 16-bit values in one 32-bit register, `lo` in bits [15:0] (the element order of .f16x2).
SG_DEVICE uint32_t pack_u16x2(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

}  // namespace sparsegemm
