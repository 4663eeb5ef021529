// Self-tests of the SIMT emulator: small kernels (selftest.cpp, written with the portability API
// like every csrc/cuda kernel) that feed one instruction from global memory and store what it
// returns, so tests/test_simt_emulator.py can compare each model with numpy. All arrays are
// contiguous host memory; every function throws std::runtime_error on an emulator error.
#pragma once
#include <cstdint>

namespace sparsegemm {
namespace simt_selftest {

// One warp, one mma.sp m16n8k32: d[16][8] = mma(a, b, c) with
//   a[16][16] compressed A (f16 or bf16 bits), b[8][32] B stored as X rows (B[k][n] = b[n][k]),
//   c[16][8] f32, e[32] each lane's metadata register, selector 0 or 1.
void mma_sp_k32(bool bf16, int selector, const uint16_t* a, const uint16_t* b, const float* c, const uint32_t* e,
                float* d);

// One warp, one mma.sp m16n8k64 s8: a[16][32], b[8][64] (X rows), c/d[16][8] int32, e[32].
void mma_sp_k64_s8(const int8_t* a, const int8_t* b, const int32_t* c, const uint32_t* e, int32_t* d);

// One warp: shared memory <- image[image_elems] (16-bit), then ldmatrix.x{matrices}{.trans} with
// lane L's row address = shared base + lane_byte_offsets[L]; out[32][4] (unused registers 0).
void ldmatrix(int matrices, bool trans, const uint16_t* image, int64_t image_elems, const int32_t* lane_byte_offsets,
              uint32_t* out);

// One warp: out[32][5] = __shfl_sync(v, src_lane[L], width), __shfl_xor_sync(v, xor_mask, width),
// __shfl_down_sync(v, delta, width), __shfl_up_sync(v, delta, width), __ballot_sync(v & 1).
void shuffles(const int32_t* values, const int32_t* src_lane, int xor_mask, int delta, int width, int32_t* out);

// One warp copies chunks (16 bytes each, chunks <= 64) of src into shared memory with cp_async_16
// (lane L: chunk L in group 0, chunk L + 32 in group 1; pred[i] == 0 zero-fills chunk i) and
// stores shared memory to out[2][chunks * 16]:
//   mode 0: wait_group 0, store to out[0];   mode 1: no wait at all, store to out[0];
//   mode 2: wait_group 1, store to out[0], then wait_group 0, store to out[1].
void cp_async(int mode, const uint8_t* src, const uint8_t* pred, int chunks, uint8_t* out);

// Every thread of the grid writes blockIdx.xyz, threadIdx.xyz, lane_id(), and the dynamic shared
// memory byte count it can address to out[global thread][8] (global thread = block-major order).
void indices(unsigned grid_x, unsigned grid_y, unsigned grid_z, unsigned block_x, unsigned block_y, unsigned block_z,
             int32_t* out);

// blocks x 64 threads: thread (b, t) adds 0.5 to *fsum, 1 to *isum, and atomicMin's b * 64 + t into
// *imin and (b * 64 + t) << 33 into *lmin (a value only 64 bits can hold).
void atomics(int blocks, float* fsum, int32_t* isum, int32_t* imin, long long* lmin);

// Arrival order: thread 0 of each block of a (grid_x, grid_y, grid_z) grid of 32-thread blocks
// takes a ticket with atomicAdd(*tickets, 1) and writes its linear block index x + Gx (y + Gy z)
// to out[ticket]. With set_block_order (emulator.h) that is the order it chose.
void block_arrivals(unsigned grid_x, unsigned grid_y, unsigned grid_z, int32_t* tickets, int32_t* out);

// 16-bit float helpers of portability.cuh over n values, in a grid of 64-thread blocks:
//   kind 0: f16_to_f32(in16) -> out32, 1: bf16_to_f32(in16) -> out32,
//   kind 2: f32_to_f16_rn(in32) -> out16, 3: f32_to_bf16_rn(in32) -> out16.
void convert(int kind, const void* in, void* out, int64_t n);

// Kernels that break a rule the emulator must report (see the test for each case's message).
enum class Misuse : int {
  barrier_not_reached = 0,       // half the block returns, the other half waits at __syncthreads
  different_collectives = 1,     // lane 0 shuffles, the other lanes ballot
  ldmatrix_out_of_range = 2,     // lane 3's row ends past the block's shared memory
  ldmatrix_misaligned = 3,       // lane 3's row address is 8-byte aligned only
  cp_async_out_of_range = 4,     // a cp.async destination past the shared memory
  lane_exited_at_collective = 5, // lanes 16..31 return while lanes 0..15 shuffle
  partial_warp_block = 6,        // a 48-thread block uses a shuffle
  barrier_in_divergent_warp = 7, // lanes 0..15 shuffle while 16..31 wait at __syncthreads
  too_much_shared_memory = 8,    // a launch asks for more than sm_80's 163 KiB
  mixed_selectors = 9,           // mma.sp with selector 0 in lane 0, 1 in the others
  cp_async_past_a_buffer = 10,   // lane 0 copies the 16 bytes after the one 16-byte buffer declared readable
  cp_async_before_dependency_wait = 11,  // a dependent launch's lane 0 copies before griddepcontrol.wait
  prefetch_past_a_buffer = 12,   // lane 0 prefetches the byte after the one 16-byte buffer declared readable
  atomic_before_dependency_wait = 13,  // a dependent launch's lane 0 adds to a global counter before the wait
  wgmma_without_fence = 14,      // a warpgroup issues wgmma with no wgmma.fence before it
  wgmma_never_waited = 15,       // a warpgroup exits with its wgmma results in flight
  wgmma_divergent_warpgroup = 16,  // warp 0 issues wgmma while warps 1..3 wait at __syncthreads
  wgmma_partial_warpgroup = 17,  // a 64-thread block issues wgmma
  wgmma_reads_unfenced_copy = 18,  // B written by a landed cp.async, published by a barrier, not proxy-fenced
  copy_into_wgmma_operand_in_flight = 19,  // thread 0 copies into B before wgmma.wait_group
  wgmma_descriptors_differ = 20,  // thread 5 passes another B descriptor than the rest of its warpgroup
  ldmatrix_after_wgmma_fence = 21,  // wgmma reads an A fragment that ldmatrix wrote after the fence
  copy_in_flight_under_wgmma = 22,   // thread 0's cp.async into B is not waited for before the wgmma
  unfenced_rewrite = 23,  // thread 1 lands a copy over thread 0's, only thread 0 fences, then wgmma
  wgmma_reads_unfenced_store = 24,  // B written by a plain 16-byte store, published by a barrier, not fenced
  tma_never_waited = 25,         // thread 0's TMA copy completes an mbarrier nobody waits on
  mbarrier_not_published = 26,   // lane 1 waits on the mbarrier lane 0 initialised, with no barrier between
  mbarrier_never_completes = 27, // every lane waits for a phase that no arrival completes
  copy_over_mbarrier = 28,       // a cp.async into a live mbarrier's bytes
  tma_bytes_not_announced = 29,  // a TMA copy whose bytes no expect_tx announced: the phase ends before it lands
  wgmma_metadata_written_in_flight = 30,  // thread 7 loads its next metadata word before wgmma.wait_group
  wgmma_fragment_written_in_flight = 31,  // thread 9 overwrites an A fragment register before wgmma.wait_group
  cp_async_straddles_a_buffer = 32,  // lane 0 copies bytes 16..31 of a 24-byte readable buffer
};
void misuse(int which);

}  // namespace simt_selftest
}  // namespace sparsegemm
