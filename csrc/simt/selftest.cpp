// Self-test kernels of the SIMT emulator (selftest.h). They use only the portability API, so they
// double as its smallest demo: fragments are loaded from global memory per the layouts quoted in
// cuda/arch/warp_ops.cuh, the instruction runs, and every lane stores what it received.
#define SPARSEGEMM_SIMT 1
#include "simt/selftest.h"

#include <stdexcept>
#include <string>

#include "cuda/arch/portability.cuh"
#include "cuda/arch/warp_ops.cuh"
#include "cuda/element.cuh"

namespace sparsegemm {
namespace SG_KERNEL_NS {
namespace selftest {

// a[16][16] compressed A, b[8][32] X rows (B[k][n] = b[n][k]), c/d[16][8], e[32] per lane.
template <bool Bf16, int Selector>
SG_GLOBAL void mma_sp_k32_kernel(const uint16_t* __restrict__ a, const uint16_t* __restrict__ b,
                                 const float* __restrict__ c, const uint32_t* __restrict__ e, float* __restrict__ d) {
  const unsigned lane = lane_id(), g = lane / 4, t = lane % 4;
  uint32_t a_regs[4], b_regs[4];
  float c_regs[4], d_regs[4];
  for (int r = 0; r < 4; ++r) {
    const unsigned row = g + 8 * (r % 2), col = 8 * (r / 2) + 2 * t;
    a_regs[r] = pack_u16x2(a[row * 16 + col], a[row * 16 + col + 1]);
  }
  for (int j = 0; j < 4; ++j) b_regs[j] = pack_u16x2(b[g * 32 + 8 * j + 2 * t], b[g * 32 + 8 * j + 2 * t + 1]);
  for (int i = 0; i < 4; ++i) c_regs[i] = c[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
  if (Bf16)
    mma_sp_m16n8k32_bf16<Selector>(d_regs, a_regs, b_regs, c_regs, e[lane]);
  else
    mma_sp_m16n8k32_f16<Selector>(d_regs, a_regs, b_regs, c_regs, e[lane]);
  for (int i = 0; i < 4; ++i) d[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = d_regs[i];
}

// a[16][32], b[8][64] X rows, c/d[16][8], e[32].
SG_GLOBAL void mma_sp_k64_s8_kernel(const int8_t* __restrict__ a, const int8_t* __restrict__ b,
                                    const int32_t* __restrict__ c, const uint32_t* __restrict__ e,
                                    int32_t* __restrict__ d) {
  const unsigned lane = lane_id(), g = lane / 4, t = lane % 4;
  auto pack4 = [](const int8_t* p) {
    return static_cast<uint32_t>(static_cast<uint8_t>(p[0])) | static_cast<uint32_t>(static_cast<uint8_t>(p[1])) << 8 |
           static_cast<uint32_t>(static_cast<uint8_t>(p[2])) << 16 | static_cast<uint32_t>(static_cast<uint8_t>(p[3])) << 24;
  };
  uint32_t a_regs[4], b_regs[4];
  int c_regs[4], d_regs[4];
  for (int r = 0; r < 4; ++r) a_regs[r] = pack4(a + (g + 8 * (r % 2)) * 32 + 16 * (r / 2) + 4 * t);
  for (int j = 0; j < 4; ++j) b_regs[j] = pack4(b + g * 64 + 16 * j + 4 * t);
  for (int i = 0; i < 4; ++i) c_regs[i] = c[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
  mma_sp_m16n8k64_s8(d_regs, a_regs, b_regs, c_regs, e[lane]);
  for (int i = 0; i < 4; ++i) d[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = d_regs[i];
}

// Shared memory <- image (one 16-bit element per thread and step), then one ldmatrix.
template <int Matrices, bool Trans>
SG_GLOBAL void ldmatrix_kernel(const uint16_t* __restrict__ image, int64_t image_elems,
                               const int32_t* __restrict__ lane_byte_offsets, uint32_t* __restrict__ out) {
  SG_DYNAMIC_SMEM(char, smem);
  auto* smem16 = reinterpret_cast<uint16_t*>(smem);
  for (int64_t i = threadIdx.x; i < image_elems; i += blockDim.x) smem16[i] = image[i];
  __syncthreads();
  const unsigned lane = lane_id();
  uint32_t regs[4] = {0, 0, 0, 0};
  const void* row = smem + lane_byte_offsets[lane];
  auto& r = reinterpret_cast<uint32_t(&)[Matrices]>(regs);
  if constexpr (Matrices == 1) Trans ? ldmatrix_x1_trans(r, row) : ldmatrix_x1(r, row);
  if constexpr (Matrices == 2) Trans ? ldmatrix_x2_trans(r, row) : ldmatrix_x2(r, row);
  if constexpr (Matrices == 4) Trans ? ldmatrix_x4_trans(r, row) : ldmatrix_x4(r, row);
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = regs[i];
}

SG_GLOBAL void shuffles_kernel(const int32_t* __restrict__ values, const int32_t* __restrict__ src_lane, int xor_mask,
                               int delta, int width, int32_t* __restrict__ out) {
  const unsigned lane = lane_id();
  const int v = values[lane];
  __syncwarp();
  out[lane * 5 + 0] = __shfl_sync(0xFFFFFFFFu, v, src_lane[lane], width);
  out[lane * 5 + 1] = __shfl_xor_sync(0xFFFFFFFFu, v, xor_mask, width);
  out[lane * 5 + 2] = __shfl_down_sync(0xFFFFFFFFu, v, static_cast<unsigned>(delta), width);
  out[lane * 5 + 3] = __shfl_up_sync(0xFFFFFFFFu, v, static_cast<unsigned>(delta), width);
  out[lane * 5 + 4] = static_cast<int32_t>(__ballot_sync(0xFFFFFFFFu, v & 1));
}

SG_GLOBAL void cp_async_kernel(int mode, const uint8_t* __restrict__ src, const uint8_t* __restrict__ pred, int chunks,
                               uint8_t* __restrict__ out) {
  SG_DYNAMIC_SMEM(uint8_t, smem);
  const int lane = static_cast<int>(threadIdx.x);
  for (int group = 0; group < 2; ++group) {
    const int chunk = lane + 32 * group;
    if (chunk < chunks) cp_async_16(smem + 16 * chunk, src + 16 * chunk, pred[chunk] != 0);
    cp_async_commit();
  }
  auto store = [&](uint8_t* dst) {
    __syncthreads();
    for (int i = lane; i < chunks * 16; i += 32) dst[i] = smem[i];
    __syncthreads();
  };
  if (mode == 0) cp_async_wait<0>();
  if (mode == 2) cp_async_wait<1>();
  store(out);
  if (mode == 2) {
    cp_async_wait<0>();
    store(out + chunks * 16);
  }
}

SG_GLOBAL void indices_kernel(int32_t* __restrict__ out) {
  SG_DYNAMIC_SMEM(char, smem);
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  int32_t* o = out + 8 * (static_cast<size_t>(block) * threads + thread);
  o[0] = static_cast<int32_t>(blockIdx.x);
  o[1] = static_cast<int32_t>(blockIdx.y);
  o[2] = static_cast<int32_t>(blockIdx.z);
  o[3] = static_cast<int32_t>(threadIdx.x);
  o[4] = static_cast<int32_t>(threadIdx.y);
  o[5] = static_cast<int32_t>(threadIdx.z);
  o[6] = static_cast<int32_t>(lane_id());
  o[7] = smem != nullptr ? 48 : -1;  // every thread sees the launch's 48-byte buffer
}

SG_GLOBAL void atomics_kernel(float* fsum, int32_t* isum, int32_t* imin, long long* lmin) {
  const int id = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  atomicAdd(fsum, 0.5f);
  atomicAdd(isum, 1);
  atomicMin(imin, id);
  atomicMin(lmin, static_cast<long long>(id) << 33);
  __threadfence();
}

SG_GLOBAL void block_arrivals_kernel(int32_t* tickets, int32_t* out) {
  if (threadIdx.x != 0) return;
  out[atomicAdd(tickets, 1)] = static_cast<int32_t>(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z));
}

SG_GLOBAL void convert_kernel(int kind, const void* __restrict__ in, void* __restrict__ out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const auto* in16 = static_cast<const uint16_t*>(in);
  const auto* in32 = static_cast<const float*>(in);
  if (kind == 0) static_cast<float*>(out)[i] = f16_to_f32(in16[i]);
  if (kind == 1) static_cast<float*>(out)[i] = bf16_to_f32(in16[i]);
  if (kind == 2) static_cast<uint16_t*>(out)[i] = f32_to_f16_rn(in32[i]);
  if (kind == 3) static_cast<uint16_t*>(out)[i] = f32_to_bf16_rn(in32[i]);
}

// ---- kernels that break the rules (selftest.h Misuse) -------------------------------------------
// Global memory of the cp_async_past_a_buffer case: its first 16 bytes are declared readable (24
// for cp_async_straddles_a_buffer).
alignas(16) const uint8_t misuse_source[32] = {};

SG_GLOBAL void misuse_kernel(int which) {
  SG_DYNAMIC_SMEM(char, smem);
  const unsigned lane = lane_id();
  switch (static_cast<simt_selftest::Misuse>(which)) {
    case simt_selftest::Misuse::barrier_not_reached:
      if (threadIdx.x >= 32) return;
      __syncthreads();
      break;
    case simt_selftest::Misuse::different_collectives:
      if (lane == 0)
        __shfl_sync(0xFFFFFFFFu, 1, 0);
      else
        __ballot_sync(0xFFFFFFFFu, 1);
      break;
    case simt_selftest::Misuse::ldmatrix_out_of_range:
    case simt_selftest::Misuse::ldmatrix_misaligned: {
      uint32_t r[4];
      const bool out_of_range = static_cast<simt_selftest::Misuse>(which) == simt_selftest::Misuse::ldmatrix_out_of_range;
      const unsigned offset = lane == 3 ? (out_of_range ? 1024 - 8 : 8) : 16 * lane;  // 1024-byte buffer
      ldmatrix_x4(r, smem + offset);
      break;
    }
    case simt_selftest::Misuse::cp_async_out_of_range: {
      alignas(16) static const uint8_t src[16] = {};
      cp_async_16(smem + 1024, src, true);
      break;
    }
    case simt_selftest::Misuse::cp_async_past_a_buffer:
    case simt_selftest::Misuse::cp_async_straddles_a_buffer:  // 24 bytes readable there: a tail bug's copy
      if (lane == 0) cp_async_16(smem, misuse_source + 16, true);
      break;
    case simt_selftest::Misuse::cp_async_before_dependency_wait:
      if (lane == 0) cp_async_16(smem, misuse_source, true);
      grid_dependency_wait();
      break;
    case simt_selftest::Misuse::atomic_before_dependency_wait: {
      static int counter = 0;
      if (lane == 0) atomicAdd(&counter, 1);
      grid_dependency_wait();
      break;
    }
    case simt_selftest::Misuse::prefetch_past_a_buffer:
      if (lane == 0) prefetch_l2(misuse_source + 16);
      break;
    case simt_selftest::Misuse::lane_exited_at_collective:
      if (lane >= 16) return;
      __shfl_sync(0xFFFFFFFFu, 1, 0);
      break;
    case simt_selftest::Misuse::partial_warp_block:
    case simt_selftest::Misuse::too_much_shared_memory:
      __shfl_sync(0xFFFFFFFFu, 1, 0);
      break;
    case simt_selftest::Misuse::barrier_in_divergent_warp:
      if (lane < 16)
        __shfl_sync(0xFFFFFFFFu, 1, 0);
      else
        __syncthreads();
      break;
    case simt_selftest::Misuse::wgmma_without_fence:
    case simt_selftest::Misuse::wgmma_never_waited:
    case simt_selftest::Misuse::wgmma_divergent_warpgroup:
    case simt_selftest::Misuse::wgmma_partial_warpgroup:
    case simt_selftest::Misuse::wgmma_reads_unfenced_copy:
    case simt_selftest::Misuse::copy_into_wgmma_operand_in_flight:
    case simt_selftest::Misuse::wgmma_descriptors_differ:
    case simt_selftest::Misuse::ldmatrix_after_wgmma_fence:
    case simt_selftest::Misuse::copy_in_flight_under_wgmma:
    case simt_selftest::Misuse::unfenced_rewrite:
    case simt_selftest::Misuse::wgmma_reads_unfenced_store:
    case simt_selftest::Misuse::wgmma_metadata_written_in_flight:
    case simt_selftest::Misuse::wgmma_fragment_written_in_flight: {
      using simt_selftest::Misuse;
      const auto m = static_cast<Misuse>(which);
      const uint32_t zero[4] = {0, 0, 0, 0};
      float acc[16][4] = {};
      if (m == Misuse::wgmma_divergent_warpgroup && threadIdx.x >= 32) {
        __syncthreads();
        break;
      }
      if (m == Misuse::wgmma_reads_unfenced_copy) {  // landed and published, but not fenced
        if (threadIdx.x == 0) cp_async_16(smem, misuse_source, true);
        cp_async_wait_all();
        __syncthreads();
      }
      if (m == Misuse::wgmma_reads_unfenced_store) {  // stored and published, but not fenced
        if (threadIdx.x == 0) st_shared_16(smem, ElementPack<uint32_t, 4>{});
        __syncthreads();
      }
      if (m == Misuse::copy_in_flight_under_wgmma) {  // issued, never waited for before the wgmma
        if (threadIdx.x == 0) cp_async_16(smem, misuse_source, true);
        cp_async_commit();
        __syncthreads();
      }
      if (m == Misuse::unfenced_rewrite) {  // the chunk's last writer (thread 1) never fences
        for (unsigned writer = 0; writer < 2; ++writer) {
          if (threadIdx.x == writer) cp_async_16(smem, misuse_source, true);
          cp_async_wait_all();
          __syncthreads();
        }
        if (threadIdx.x == 0) fence_proxy_async_shared();
        __syncthreads();
      }
      if (m != Misuse::wgmma_without_fence) wgmma_fence();
      uint32_t a[4] = {0, 0, 0, 0};
      if (m == Misuse::ldmatrix_after_wgmma_fence) ldmatrix_x4(a, smem + 16 * (threadIdx.x % 32));
      const bool other_descriptor = m == Misuse::wgmma_descriptors_differ && threadIdx.x == 5;
      const uint32_t start = shared_address(smem) + (other_descriptor ? 16 : 0);
      uint32_t meta = 0x88888888u;
      const bool fragment_in_registers = m == Misuse::ldmatrix_after_wgmma_fence ||
                                         m == Misuse::wgmma_fragment_written_in_flight;
      wgmma_sp_m64n128k32<DType::f16>(acc, fragment_in_registers ? a : zero, wgmma_desc_b128(start), meta);
      wgmma_commit_group();
      if (m == Misuse::copy_into_wgmma_operand_in_flight && threadIdx.x == 0) cp_async_16(smem, misuse_source, true);
      if (m == Misuse::wgmma_metadata_written_in_flight && threadIdx.x == 7) meta = 0x44444444u;
      if (m == Misuse::wgmma_fragment_written_in_flight && threadIdx.x == 9) a[2] = 1;
      if (m != Misuse::wgmma_never_waited) wgmma_wait_group<0>();
      break;
    }
    case simt_selftest::Misuse::tma_never_waited:
    case simt_selftest::Misuse::tma_bytes_not_announced: {
      TensorMap2d map;
      map.base = misuse_source;
      map.element_bytes = 1;
      map.dims[0] = map.row_stride = map.box[0] = 16;
      map.dims[1] = map.box[1] = 1;
      auto* bar = reinterpret_cast<uint64_t*>(smem);
      if (threadIdx.x == 0) {
        mbarrier_init(bar, 1);
        const bool announce = static_cast<simt_selftest::Misuse>(which) == simt_selftest::Misuse::tma_never_waited;
        mbarrier_arrive(bar, announce ? 16 : 0);
        tma_load_2d(smem + 128, map, 0, 0, bar);
      }
      __syncthreads();
      if (static_cast<simt_selftest::Misuse>(which) == simt_selftest::Misuse::tma_bytes_not_announced)
        mbarrier_wait_parity(bar, 0);  // passes: the phase completed at the arrival, before the copy
      break;
    }
    case simt_selftest::Misuse::mbarrier_not_published:
    case simt_selftest::Misuse::mbarrier_never_completes: {
      auto* bar = reinterpret_cast<uint64_t*>(smem);
      if (lane == 0) mbarrier_init(bar, 1);
      if (static_cast<simt_selftest::Misuse>(which) == simt_selftest::Misuse::mbarrier_never_completes) __syncthreads();
      mbarrier_wait_parity(bar, 0);
      break;
    }
    case simt_selftest::Misuse::copy_over_mbarrier: {
      auto* bar = reinterpret_cast<uint64_t*>(smem + 16);
      if (lane == 0) mbarrier_init(bar, 1);
      __syncthreads();
      if (lane == 0) cp_async_16(smem + 16, misuse_source, true);
      break;
    }
    case simt_selftest::Misuse::mixed_selectors: {
      const uint32_t zero[4] = {0, 0, 0, 0};
      const float c[4] = {0, 0, 0, 0};
      float d[4];
      if (lane == 0)
        mma_sp_m16n8k32_f16<0>(d, zero, zero, c, 0x88888888u);
      else
        mma_sp_m16n8k32_f16<1>(d, zero, zero, c, 0x88888888u);
      break;
    }
  }
}

}  // namespace selftest
}  // namespace SG_KERNEL_NS

namespace simt_selftest {
namespace kernels = ::sparsegemm::simt::selftest;

void mma_sp_k32(bool bf16, int selector, const uint16_t* a, const uint16_t* b, const float* c, const uint32_t* e,
                float* d) {
  if (selector != 0 && selector != 1) throw std::invalid_argument("mma_sp_k32: selector must be 0 or 1");
  if (bf16)
    selector == 0 ? sg_launch(kernels::mma_sp_k32_kernel<true, 0>, dim3(1), dim3(32), 0, nullptr, a, b, c, e, d)
                  : sg_launch(kernels::mma_sp_k32_kernel<true, 1>, dim3(1), dim3(32), 0, nullptr, a, b, c, e, d);
  else
    selector == 0 ? sg_launch(kernels::mma_sp_k32_kernel<false, 0>, dim3(1), dim3(32), 0, nullptr, a, b, c, e, d)
                  : sg_launch(kernels::mma_sp_k32_kernel<false, 1>, dim3(1), dim3(32), 0, nullptr, a, b, c, e, d);
}

void mma_sp_k64_s8(const int8_t* a, const int8_t* b, const int32_t* c, const uint32_t* e, int32_t* d) {
  sg_launch(kernels::mma_sp_k64_s8_kernel, dim3(1), dim3(32), 0, nullptr, a, b, c, e, d);
}

void ldmatrix(int matrices, bool trans, const uint16_t* image, int64_t image_elems, const int32_t* lane_byte_offsets,
              uint32_t* out) {
  const size_t smem = static_cast<size_t>(image_elems) * 2;
  switch (matrices * 2 + (trans ? 1 : 0)) {
    case 2: sg_launch(kernels::ldmatrix_kernel<1, false>, dim3(1), dim3(32), smem, nullptr, image, image_elems, lane_byte_offsets, out); break;
    case 3: sg_launch(kernels::ldmatrix_kernel<1, true>, dim3(1), dim3(32), smem, nullptr, image, image_elems, lane_byte_offsets, out); break;
    case 4: sg_launch(kernels::ldmatrix_kernel<2, false>, dim3(1), dim3(32), smem, nullptr, image, image_elems, lane_byte_offsets, out); break;
    case 5: sg_launch(kernels::ldmatrix_kernel<2, true>, dim3(1), dim3(32), smem, nullptr, image, image_elems, lane_byte_offsets, out); break;
    case 8: sg_launch(kernels::ldmatrix_kernel<4, false>, dim3(1), dim3(32), smem, nullptr, image, image_elems, lane_byte_offsets, out); break;
    case 9: sg_launch(kernels::ldmatrix_kernel<4, true>, dim3(1), dim3(32), smem, nullptr, image, image_elems, lane_byte_offsets, out); break;
    default: throw std::invalid_argument("ldmatrix: matrices must be 1, 2 or 4, got " + std::to_string(matrices));
  }
}

void shuffles(const int32_t* values, const int32_t* src_lane, int xor_mask, int delta, int width, int32_t* out) {
  sg_launch(kernels::shuffles_kernel, dim3(1), dim3(32), 0, nullptr, values, src_lane, xor_mask, delta, width, out);
}

void cp_async(int mode, const uint8_t* src, const uint8_t* pred, int chunks, uint8_t* out) {
  if (chunks < 1 || chunks > 64) throw std::invalid_argument("cp_async: chunks must be in 1..64");
  sg_launch(kernels::cp_async_kernel, dim3(1), dim3(32), static_cast<size_t>(chunks) * 16, nullptr, mode, src, pred,
            chunks, out);
}

void indices(unsigned grid_x, unsigned grid_y, unsigned grid_z, unsigned block_x, unsigned block_y, unsigned block_z,
             int32_t* out) {
  sg_launch(kernels::indices_kernel, dim3(grid_x, grid_y, grid_z), dim3(block_x, block_y, block_z), 48, nullptr, out);
}

void atomics(int blocks, float* fsum, int32_t* isum, int32_t* imin, long long* lmin) {
  sg_launch(kernels::atomics_kernel, dim3(static_cast<unsigned>(blocks)), dim3(64), 0, nullptr, fsum, isum, imin, lmin);
}

void block_arrivals(unsigned grid_x, unsigned grid_y, unsigned grid_z, int32_t* tickets, int32_t* out) {
  sg_launch(kernels::block_arrivals_kernel, dim3(grid_x, grid_y, grid_z), dim3(32), 0, nullptr, tickets, out);
}

void convert(int kind, const void* in, void* out, int64_t n) {
  if (kind < 0 || kind > 3) throw std::invalid_argument("convert: kind must be 0..3");
  const auto blocks = static_cast<unsigned>((n + 63) / 64);
  if (blocks > 0) sg_launch(kernels::convert_kernel, dim3(blocks), dim3(64), 0, nullptr, kind, in, out, n);
}

void misuse(int which) {
  const auto m = static_cast<Misuse>(which);
  const bool wgmma = m == Misuse::wgmma_without_fence || m == Misuse::wgmma_never_waited ||
                     m == Misuse::wgmma_divergent_warpgroup || m == Misuse::wgmma_reads_unfenced_copy ||
                     m == Misuse::copy_into_wgmma_operand_in_flight || m == Misuse::wgmma_descriptors_differ ||
                     m == Misuse::ldmatrix_after_wgmma_fence || m == Misuse::copy_in_flight_under_wgmma ||
                     m == Misuse::unfenced_rewrite || m == Misuse::wgmma_reads_unfenced_store ||
                     m == Misuse::wgmma_metadata_written_in_flight || m == Misuse::wgmma_fragment_written_in_flight;
  const unsigned threads = m == Misuse::barrier_not_reached || m == Misuse::wgmma_partial_warpgroup ? 64
                           : m == Misuse::partial_warp_block                                        ? 48
                           : wgmma                                                                   ? 128
                                                                                                     : 32;
  const size_t smem = m == Misuse::too_much_shared_memory ? 164 * 1024 : wgmma ? 128 * 128 : 1024;
  if (m == Misuse::cp_async_past_a_buffer || m == Misuse::prefetch_past_a_buffer ||
      m == Misuse::cp_async_straddles_a_buffer) {
    const emu::ReadableBuffers readable{
      {kernels::misuse_source, m == Misuse::cp_async_straddles_a_buffer ? size_t{24} : size_t{16}, "misuse_source"}};
    sg_launch(kernels::misuse_kernel, dim3(1), dim3(threads), smem, nullptr, which);
    return;
  }
  if (m == Misuse::cp_async_before_dependency_wait || m == Misuse::atomic_before_dependency_wait) {
    sg_launch_dependent(kernels::misuse_kernel, dim3(1), dim3(threads), smem, nullptr, which);
    return;
  }
  sg_launch(kernels::misuse_kernel, dim3(1), dim3(threads), smem, nullptr, which);
}

}  // namespace simt_selftest
}  // namespace sparsegemm
