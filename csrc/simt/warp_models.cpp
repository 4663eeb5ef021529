// Instruction models for the SIMT emulator: what every lane of a warp receives from mma.sp,
// ldmatrix, shfl and vote, per the layouts in /work/shared/PTX_SPARSE.md (PTX ISA sections cited
// at each wrapper in cuda/arch/warp_ops.cuh). Notation: lane L, g = L / 4, t = L % 4.
//
// Floating-point model of mma.sp (NVIDIA does not specify the tensor core's order or rounding,
// so tests compare FP results with tolerances): for each output (row, n), start from C and add,
// in increasing K order, the product of every kept A value with the B row its metadata index
// names. Products are formed in fp32, which is exact for f16 and bf16 inputs (unless a bf16
// product leaves fp32's range); each addition rounds to nearest even in fp32. B values at pruned
// positions are never read, so an Inf/NaN there cannot leak into D (no 0 * Inf).
// Integer model: exact sums in 64 bits, then .satfinite clamps to the int32 range.
#define SPARSEGEMM_SIMT 1
#include "simt/warp_models.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "cuda/arch/portability.cuh"
#include "simt/emulator.h"

namespace sparsegemm {
namespace emu {
namespace {

constexpr int kLanes = 32;

// Decodes one metadata nibble of mma.sp::ordered_metadata; both indices must be distinct and
// increasing (PTX: equal indices are undefined everywhere, descending ones with ::ordered_metadata).
void decode_nibble(const char* op, uint32_t word, int bit, int lane, int row, int group, int& i0, int& i1) {
  const int nibble = static_cast<int>((word >> bit) & 0xFu);
  i0 = nibble & 3;
  i1 = nibble >> 2;
  if (i0 < i1) return;
  char buf[320];
  std::snprintf(buf, sizeof buf,
                "%s: illegal metadata nibble 0x%X in lane %d bits [%d:%d] (A row %d, K group %d): "
                "::ordered_metadata needs two distinct indices in increasing order "
                "(legal nibbles 0x4 0x8 0x9 0xC 0xD 0xE)",
                op, nibble, lane, bit + 3, bit, row, group);
  fail(buf);
}

// ---- mma.sp m16n8k32 f16/bf16 ------------------------------------------------------------------
struct MmaK32In {
  uint32_t a[4], b[4];
  float c[4];
  uint32_t e;
};
struct MmaOut32 {
  uint32_t d[4];  // f32 or s32 bit patterns
};

template <HalfType Type, int Selector>
void compute_mma_k32(const void* const lane_inputs[32], void* const lane_outputs[32]);

template <HalfType Type, int Selector>
const WarpOp& mma_k32_op() {
  static const WarpOp op{Type == HalfType::f16
                             ? (Selector == 0 ? "mma.sp::ordered_metadata.m16n8k32.f32.f16.f16.f32 (selector 0)"
                                              : "mma.sp::ordered_metadata.m16n8k32.f32.f16.f16.f32 (selector 1)")
                             : (Selector == 0 ? "mma.sp::ordered_metadata.m16n8k32.f32.bf16.bf16.f32 (selector 0)"
                                              : "mma.sp::ordered_metadata.m16n8k32.f32.bf16.bf16.f32 (selector 1)"),
                         &compute_mma_k32<Type, Selector>};
  return op;
}

// One m16n8k32 tile: lane_inputs are MmaK32In, lane_outputs MmaOut32; `name` for metadata errors.
// Also the per-warp, per-8-column share of the wgmma model below.
template <HalfType Type, int Selector>
void mma_k32_tile(const char* name, const void* const lane_inputs[32], void* const lane_outputs[32]) {
  auto to_f32 = [](uint32_t bits) {
    return Type == HalfType::f16 ? f16_to_f32(static_cast<uint16_t>(bits)) : bf16_to_f32(static_cast<uint16_t>(bits));
  };
  float a[16][16], b[32][8], c[16][8];  // compressed A (rows x kept values), B (K x N), C
  uint32_t e[kLanes];
  for (int lane = 0; lane < kLanes; ++lane) {
    const auto& in = *static_cast<const MmaK32In*>(lane_inputs[lane]);
    const int g = lane / 4, t = lane % 4;
    for (int r = 0; r < 4; ++r) {  // A reg r: row g + 8 (r % 2), kept columns 8 (r / 2) + 2t + {0, 1}
      const int row = g + 8 * (r % 2), col = 8 * (r / 2) + 2 * t;
      a[row][col] = to_f32(in.a[r] & 0xFFFFu);
      a[row][col + 1] = to_f32(in.a[r] >> 16);
    }
    for (int j = 0; j < 4; ++j) {  // B reg j: k = 8j + 2t + {0, 1}, n = g
      b[8 * j + 2 * t][g] = to_f32(in.b[j] & 0xFFFFu);
      b[8 * j + 2 * t + 1][g] = to_f32(in.b[j] >> 16);
    }
    for (int i = 0; i < 4; ++i) c[g + 8 * (i / 2)][2 * t + i % 2] = in.c[i];
    e[lane] = in.e;
  }
  float d[16][8];
  for (int row = 0; row < 16; ++row) {
    int pos[8][2];
    for (int q = 0; q < 8; ++q) {  // lane 4 (row % 8) + 2 Selector + (q / 4); row + 8 in bits [31:16]
      const int lane = 4 * (row % 8) + 2 * Selector + q / 4;
      decode_nibble(name, e[lane], 16 * (row / 8) + 4 * (q % 4), lane, row, q, pos[q][0], pos[q][1]);
    }
    for (int n = 0; n < 8; ++n) {
      float acc = c[row][n];
      for (int q = 0; q < 8; ++q) {
        acc += a[row][2 * q] * b[4 * q + pos[q][0]][n];
        acc += a[row][2 * q + 1] * b[4 * q + pos[q][1]][n];
      }
      d[row][n] = acc;
    }
  }
  for (int lane = 0; lane < kLanes; ++lane) {
    auto& out = *static_cast<MmaOut32*>(lane_outputs[lane]);
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) std::memcpy(&out.d[i], &d[g + 8 * (i / 2)][2 * t + i % 2], 4);
  }
}

template <HalfType Type, int Selector>
void compute_mma_k32(const void* const lane_inputs[32], void* const lane_outputs[32]) {
  mma_k32_tile<Type, Selector>(mma_k32_op<Type, Selector>().name, lane_inputs, lane_outputs);
}

// ---- mma.sp m16n8k64 s8 ------------------------------------------------------------------------
struct MmaK64In {
  uint32_t a[4], b[4];
  int32_t c[4];
  uint32_t e;
};

void compute_mma_k64_s8(const void* const lane_inputs[32], void* const lane_outputs[32]);
const WarpOp kMmaK64S8{"mma.sp::ordered_metadata.m16n8k64.satfinite.s32.s8.s8.s32 (selector 0)",
                       &compute_mma_k64_s8};

// One m16n8k64 s8 tile, as mma_k32_tile.
void mma_k64_s8_tile(const char* name, const void* const lane_inputs[32], void* const lane_outputs[32]) {
  auto byte = [](uint32_t word, int i) { return static_cast<int>(static_cast<int8_t>(word >> (8 * i))); };
  int a[16][32], b[64][8], c[16][8];
  uint32_t e[kLanes];
  for (int lane = 0; lane < kLanes; ++lane) {
    const auto& in = *static_cast<const MmaK64In*>(lane_inputs[lane]);
    const int g = lane / 4, t = lane % 4;
    for (int r = 0; r < 4; ++r)  // A reg r: row g + 8 (r % 2), kept columns 16 (r / 2) + 4t + {0..3}
      for (int y = 0; y < 4; ++y) a[g + 8 * (r % 2)][16 * (r / 2) + 4 * t + y] = byte(in.a[r], y);
    for (int j = 0; j < 4; ++j)  // B reg j: k = 16j + 4t + {0..3}, n = g
      for (int y = 0; y < 4; ++y) b[16 * j + 4 * t + y][g] = byte(in.b[j], y);
    for (int i = 0; i < 4; ++i) c[g + 8 * (i / 2)][2 * t + i % 2] = in.c[i];
    e[lane] = in.e;
  }
  int d[16][8];
  for (int row = 0; row < 16; ++row) {
    int pos[16][2];
    for (int q = 0; q < 16; ++q) {  // lane 4 (row % 8) + (row / 8) + 2 (q / 8), nibble q % 8
      const int lane = 4 * (row % 8) + row / 8 + 2 * (q / 8);
      decode_nibble(name, e[lane], 4 * (q % 8), lane, row, q, pos[q][0], pos[q][1]);
    }
    for (int n = 0; n < 8; ++n) {
      int64_t acc = c[row][n];
      for (int q = 0; q < 16; ++q)
        acc += int64_t{a[row][2 * q]} * b[4 * q + pos[q][0]][n] + int64_t{a[row][2 * q + 1]} * b[4 * q + pos[q][1]][n];
      d[row][n] = static_cast<int>(std::clamp<int64_t>(acc, INT32_MIN, INT32_MAX));
    }
  }
  for (int lane = 0; lane < kLanes; ++lane) {
    auto& out = *static_cast<MmaOut32*>(lane_outputs[lane]);
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) std::memcpy(&out.d[i], &d[g + 8 * (i / 2)][2 * t + i % 2], 4);
  }
}

void compute_mma_k64_s8(const void* const lane_inputs[32], void* const lane_outputs[32]) {
  mma_k64_s8_tile(kMmaK64S8.name, lane_inputs, lane_outputs);
}

// ---- wgmma.mma_async.sp m64n128 ---------------------------------------------------------------
// A warp's share of m64n128k32 (16-bit) or m64n128k64 (s8) is rows 16w .. 16w + 15 of A and D, its
// own A fragment and metadata in the m16n8k32 / m16n8k64 lane layouts (PTX_SPARSE_REFERENCE.md
// 7.1), against all 128 columns of B; D register 4j + r is mma's C/D register r of columns 8j ..
// 8j + 7. So the model runs, per warp and 8 columns, the mma.sp tile model above with B's fragment
// gathered from shared memory: the same arithmetic, metadata rules and errors. N = 128 is the one
// shape the kernels issue (warp_ops.cuh).
constexpr int kWgmmaN = 128;

struct WgmmaIn {
  WgmmaA a;
  uint32_t e;
  uint64_t b_desc;
  const uint32_t* c;  // kWgmmaN / 2 accumulator bit patterns (wgmma_accumulator_input)
};
struct WgmmaOut {
  uint32_t d[kWgmmaN / 2];
  size_t read;  // emulator.h wgmma_read_shared
};

// A K-major operand in shared memory through its matrix descriptor, fields per PTX ISA "Matrix
// Descriptor Format": start address, leading and stride byte offsets (each >> 4, 14 bits at bits
// 0, 16 and 32), base offset (bits 49-51), swizzle mode (bits 62-63: 1 = 128-byte, 2 = 64-byte).
// A swizzle of `span` bytes has the canonical K-major layout of 8 rows of `span` bytes per atom,
// atoms `stride byte offset` apart along M or N; the hardware XORs the address bits of the
// 16-byte chunk ([4, 4 + log2(span / 16))) with those of the row in the atom ([7, ...)) of the
// address it forms, so the kernels store chunk c of row r at c ^ (r % 8) (128-byte) or
// c ^ ((r >> 1) & 3) (64-byte) in an aligned atom. The leading byte offset steps between atoms
// along K, which the k-steps inside one row never cross; the start may add a K offset inside the
// atom's first row (the second k-step).
struct SwizzledOperand {
  uint32_t start, stride, span;
  // The shared-memory offset of byte `byte` of row `row`.
  uint32_t offset(int row, uint32_t byte) const {
    const uint32_t logical = start + uint32_t(row / 8) * stride + uint32_t(row % 8) * span + byte;
    return logical ^ (((logical >> 7) & (span / 16 - 1)) << 4);
  }
};

// Decodes descriptor `desc` of `operand` ("A" or "B") with the `span`-byte swizzle the model
// covers (B: 128, A: 64), base offset 0.
SwizzledOperand swizzled_operand(const char* name, const char* operand, uint64_t desc, uint32_t span) {
  const uint32_t start = uint32_t(desc & 0x3FFF) << 4;
  const uint32_t stride = uint32_t((desc >> 32) & 0x3FFF) << 4;
  const int base_offset = int((desc >> 49) & 7), swizzle = int(desc >> 62);
  const int mode = span == 128 ? 1 : 2;
  if (swizzle != mode || base_offset != 0)
    fail(std::string(name) + ": " + operand + " descriptor with swizzle mode " + std::to_string(swizzle) +
         " and base offset " + std::to_string(base_offset) + "; the model covers the " + std::to_string(span) +
         "-byte swizzle (mode " + std::to_string(mode) + ") with base offset 0");
  if (start % (8 * span) >= span || start % 16 != 0)
    fail(std::string(name) + ": " + operand + " descriptor start address " + std::to_string(start) +
         " is not inside the first " + std::to_string(span) + "-byte row of a " + std::to_string(8 * span) +
         "-byte swizzle atom (a K offset inside the row is the only start the swizzle leaves unchanged)");
  return SwizzledOperand{start, stride, span};
}

// Copies `bytes` bytes at byte `byte` of row `row` of `operand` (a 16-byte aligned run within one
// 16-byte chunk, or whole chunks) to dst, and widens [lowest, highest) (shared-memory offsets) to
// the 16-byte chunks read.
void read_operand(const char* name, const SwizzledOperand& operand, int row, uint32_t byte, void* dst, uint32_t bytes,
                  uint32_t& lowest, uint32_t& highest) {
  for (uint32_t done = 0; done < bytes; done += 16) {
    const uint32_t physical = operand.offset(row, byte + done);
    const uint32_t piece = bytes - done < 16 ? bytes - done : 16;
    const char* address = shared_memory() + physical;
    check_shared_range(address, piece, piece, name);
    std::memcpy(static_cast<char*>(dst) + done, address, piece);
    lowest = std::min(lowest, physical & ~15u);
    highest = std::max(highest, (physical & ~15u) + 16);
  }
}

// The warpgroup's wgmma: per warp w and 8-column block j, `tile` (the mma tile model, TileIn its
// lane input) with lane inputs built from the threads' A, metadata and C, and B's fragment
// (register q: bytes 16q + 4t .. +3 of B column 8j + g, the m16n8k32 / m16n8k64 B layout in bytes)
// from shared memory. The descriptor must be the same in all 128 threads (PTX).
template <typename TileIn>
void compute_wgmma(const char* name, void (*tile)(const char*, const void* const[32], void* const[32]),
                   const void* const thread_inputs[128], void* const thread_outputs[128]) {
  const auto& first = *static_cast<const WgmmaIn*>(thread_inputs[0]);
  for (int thread = 1; thread < 128; ++thread) {
    const auto& in = *static_cast<const WgmmaIn*>(thread_inputs[thread]);
    if (in.b_desc != first.b_desc || in.a.desc != first.a.desc)
      fail(std::string(name) + ": thread " + std::to_string(thread) + " passes A / B descriptors " +
           std::to_string(in.a.desc) + " / " + std::to_string(in.b_desc) + ", thread 0 " +
           std::to_string(first.a.desc) + " / " + std::to_string(first.b_desc) +
           " (they must be the same across the warpgroup)");
  }
  const SwizzledOperand b = swizzled_operand(name, "B", first.b_desc, 128);
  const SwizzledOperand a = first.a.desc != 0 ? swizzled_operand(name, "A", first.a.desc, 64) : SwizzledOperand{};
  uint32_t lowest = UINT32_MAX, highest = 0;
  for (int warp = 0; warp < 4; ++warp)
    for (int j = 0; j < kWgmmaN / 8; ++j) {
      TileIn in[kLanes];
      MmaOut32 out[kLanes];
      const void* lane_inputs[kLanes];
      void* lane_outputs[kLanes];
      for (int lane = 0; lane < kLanes; ++lane) {
        const auto& thread = *static_cast<const WgmmaIn*>(thread_inputs[32 * warp + lane]);
        // B column 8j + g: 64 bytes of K; A (SS form) register r: bytes 16 (r / 2) + 4t of row
        // 16w + g + 8 (r % 2), the register form's fragment (warp_ops.cuh).
        unsigned char column[64];
        read_operand(name, b, 8 * j + lane / 4, 0, column, sizeof column, lowest, highest);
        if (first.a.desc != 0) {
          for (int r = 0; r < 4; ++r)
            read_operand(name, a, 16 * warp + lane / 4 + 8 * (r % 2), 16 * (r / 2) + 4 * (lane % 4), &in[lane].a[r], 4,
                         lowest, highest);
        } else {
          std::memcpy(in[lane].a, thread.a.regs, sizeof in[lane].a);
        }
        for (int q = 0; q < 4; ++q) std::memcpy(&in[lane].b[q], column + 16 * q + 4 * (lane % 4), 4);
        std::memcpy(in[lane].c, thread.c + 4 * j, sizeof in[lane].c);
        in[lane].e = thread.e;
        lane_inputs[lane] = &in[lane];
        lane_outputs[lane] = &out[lane];
      }
      tile(name, lane_inputs, lane_outputs);
      for (int lane = 0; lane < kLanes; ++lane)
        std::memcpy(static_cast<WgmmaOut*>(thread_outputs[32 * warp + lane])->d + 4 * j, out[lane].d,
                    sizeof out[lane].d);
    }
  const size_t read = wgmma_read_shared(lowest, highest, name);
  for (int thread = 0; thread < 128; ++thread) static_cast<WgmmaOut*>(thread_outputs[thread])->read = read;
}

// The wgmma ops' models: kSharedA, the SS form (A through a shared-memory descriptor); the same
// computation either way (compute_wgmma reads A where the thread's input says), only the op differs.
template <HalfType Type, bool kSharedA>
void compute_wgmma_k32(const void* const thread_inputs[128], void* const thread_outputs[128]);
template <bool kSharedA>
void compute_wgmma_k64_s8(const void* const thread_inputs[128], void* const thread_outputs[128]);

const WarpgroupOp kWgmmaF16{"wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.f16.f16 (A in registers, selector 0)",
                            &compute_wgmma_k32<HalfType::f16, false>};
const WarpgroupOp kWgmmaBf16{"wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.bf16.bf16 (A in registers, "
                             "selector 0)",
                             &compute_wgmma_k32<HalfType::bf16, false>};
const WarpgroupOp kWgmmaS8{"wgmma.mma_async.sp.sync.aligned.m64n128k64.s32.s8.s8.satfinite (A in registers, "
                           "selector 0)",
                           &compute_wgmma_k64_s8<false>};

const WarpgroupOp kWgmmaSsF16{"wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.f16.f16 (A in shared memory, "
                              "selector 0)",
                              &compute_wgmma_k32<HalfType::f16, true>};
const WarpgroupOp kWgmmaSsBf16{"wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.bf16.bf16 (A in shared memory, "
                               "selector 0)",
                               &compute_wgmma_k32<HalfType::bf16, true>};
const WarpgroupOp kWgmmaSsS8{"wgmma.mma_async.sp.sync.aligned.m64n128k64.s32.s8.s8.satfinite (A in shared memory, "
                             "selector 0)",
                             &compute_wgmma_k64_s8<true>};

template <HalfType Type, bool kSharedA>
void compute_wgmma_k32(const void* const thread_inputs[128], void* const thread_outputs[128]) {
  const WarpgroupOp& op =
      Type == HalfType::f16 ? (kSharedA ? kWgmmaSsF16 : kWgmmaF16) : (kSharedA ? kWgmmaSsBf16 : kWgmmaBf16);
  compute_wgmma<MmaK32In>(op.name, &mma_k32_tile<Type, 0>, thread_inputs, thread_outputs);
}

template <bool kSharedA>
void compute_wgmma_k64_s8(const void* const thread_inputs[128], void* const thread_outputs[128]) {
  compute_wgmma<MmaK64In>((kSharedA ? kWgmmaSsS8 : kWgmmaS8).name, &mma_k64_s8_tile, thread_inputs, thread_outputs);
}

// One thread's wgmma: C from the results in flight (emulator.h), the result handed back pending.
void issue_wgmma(const WarpgroupOp& op, void* d, const WgmmaA& a, uint64_t b_desc, const uint32_t& e) {
  const WgmmaIn in{a, e, b_desc, static_cast<const uint32_t*>(wgmma_accumulator_input(d, op.name))};
  WgmmaOut out;
  warpgroup_collective(op, &in, &out);
  std::vector<WgmmaRegister> registers{{&e, e}};
  if (a.source != nullptr)
    for (int i = 0; i < 4; ++i) registers.push_back({a.source + i, a.regs[i]});
  wgmma_issue(d, out.d, sizeof out.d, out.read, std::move(registers));
}

// ---- ldmatrix ----------------------------------------------------------------------------------
struct LdmatrixOut {
  uint32_t r[4];
};

template <int Matrices, bool Trans>
void compute_ldmatrix(const void* const lane_inputs[32], void* const lane_outputs[32]);

template <int Matrices, bool Trans>
const WarpOp& ldmatrix_op() {
  static const std::string name = "ldmatrix.sync.aligned.m8n8.x" + std::to_string(Matrices) +
                                  (Trans ? ".trans" : "") + ".shared.b16";
  static const WarpOp op{name.c_str(), &compute_ldmatrix<Matrices, Trans>};
  return op;
}

template <int Matrices, bool Trans>
void compute_ldmatrix(const void* const lane_inputs[32], void* const lane_outputs[32]) {
  uint16_t m[4][8][8];  // [matrix][row][column]
  for (int i = 0; i < Matrices; ++i)
    for (int row = 0; row < 8; ++row) {  // lane 8i + row gives the address of row `row` of matrix i
      const int lane = 8 * i + row;
      const void* address = *static_cast<const void* const*>(lane_inputs[lane]);
      const std::string what = std::string(ldmatrix_op<Matrices, Trans>().name) + ", row address of lane " +
                               std::to_string(lane);
      check_shared_range(address, 16, 16, what.c_str());
      std::memcpy(m[i][row], address, 16);
    }
  for (int lane = 0; lane < kLanes; ++lane) {
    auto& out = *static_cast<LdmatrixOut*>(lane_outputs[lane]);
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < Matrices; ++i) {
      out.r[i] = Trans ? pack_u16x2(m[i][2 * t][g], m[i][2 * t + 1][g]) : pack_u16x2(m[i][g][2 * t], m[i][g][2 * t + 1]);
    }
  }
}

// ---- shfl / ballot -----------------------------------------------------------------------------
struct ShflIn {
  uint32_t mask, value;
  int b, c;
};

void require_full_mask(const char* op, uint32_t mask, int lane) {
  if (mask != 0xFFFFFFFFu) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "%s: lane %d passes membermask 0x%08X; the emulator models full-warp masks only",
                  op, lane, mask);
    fail(buf);
  }
}

template <ShuffleMode Mode>
void compute_shfl(const void* const lane_inputs[32], void* const lane_outputs[32]);

template <ShuffleMode Mode>
const WarpOp& shfl_op() {
  static const WarpOp op{Mode == ShuffleMode::idx    ? "shfl.sync.idx.b32"
                         : Mode == ShuffleMode::up   ? "shfl.sync.up.b32"
                         : Mode == ShuffleMode::down ? "shfl.sync.down.b32"
                                                     : "shfl.sync.bfly.b32",
                         &compute_shfl<Mode>};
  return op;
}

// PTX shfl.sync: the source lane j and whether it is in range (else the lane keeps its value).
template <ShuffleMode Mode>
void compute_shfl(const void* const lane_inputs[32], void* const lane_outputs[32]) {
  uint32_t values[kLanes];
  for (int lane = 0; lane < kLanes; ++lane) {
    const auto& in = *static_cast<const ShflIn*>(lane_inputs[lane]);
    require_full_mask(shfl_op<Mode>().name, in.mask, lane);
    values[lane] = in.value;
  }
  for (int lane = 0; lane < kLanes; ++lane) {
    const auto& in = *static_cast<const ShflIn*>(lane_inputs[lane]);
    const int bval = in.b & 0x1F, cval = in.c & 0x1F, segmask = (in.c >> 8) & 0x1F;
    const int max_lane = (lane & segmask) | (cval & ~segmask);
    const int min_lane = lane & segmask;
    int j = lane;
    bool in_range = false;
    switch (Mode) {
      case ShuffleMode::up: j = lane - bval; in_range = j >= max_lane; break;
      case ShuffleMode::down: j = lane + bval; in_range = j <= max_lane; break;
      case ShuffleMode::bfly: j = lane ^ bval; in_range = j <= max_lane; break;
      case ShuffleMode::idx: j = min_lane | (bval & ~segmask); in_range = j <= max_lane; break;
    }
    *static_cast<uint32_t*>(lane_outputs[lane]) = values[in_range ? j : lane];
  }
}

void compute_syncwarp(const void* const lane_inputs[32], void* const lane_outputs[32]);
const WarpOp kSyncwarp{"bar.warp.sync", &compute_syncwarp};

void compute_syncwarp(const void* const lane_inputs[32], void* const /*lane_outputs*/[32]) {
  for (int lane = 0; lane < kLanes; ++lane)
    require_full_mask(kSyncwarp.name, *static_cast<const uint32_t*>(lane_inputs[lane]), lane);
}

struct BallotIn {
  uint32_t mask;
  bool predicate;
};

void compute_ballot(const void* const lane_inputs[32], void* const lane_outputs[32]);
const WarpOp kBallot{"vote.sync.ballot.b32", &compute_ballot};

void compute_ballot(const void* const lane_inputs[32], void* const lane_outputs[32]) {
  uint32_t bits = 0;
  for (int lane = 0; lane < kLanes; ++lane) {
    const auto& in = *static_cast<const BallotIn*>(lane_inputs[lane]);
    require_full_mask(kBallot.name, in.mask, lane);
    bits |= (in.predicate ? 1u : 0u) << lane;
  }
  for (int lane = 0; lane < kLanes; ++lane) *static_cast<uint32_t*>(lane_outputs[lane]) = bits;
}

}  // namespace

void mma_sp_m16n8k32(HalfType type, int selector, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                     const float (&c)[4], uint32_t e) {
  MmaK32In in;
  std::memcpy(in.a, a, sizeof in.a);
  std::memcpy(in.b, b, sizeof in.b);
  std::memcpy(in.c, c, sizeof in.c);
  in.e = e;
  MmaOut32 out;
  const WarpOp& op = type == HalfType::f16
                         ? (selector == 0 ? mma_k32_op<HalfType::f16, 0>() : mma_k32_op<HalfType::f16, 1>())
                         : (selector == 0 ? mma_k32_op<HalfType::bf16, 0>() : mma_k32_op<HalfType::bf16, 1>());
  warp_collective(op, &in, &out);
  std::memcpy(d, out.d, sizeof out.d);
}

void mma_sp_m16n8k64_s8(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], const int (&c)[4], uint32_t e) {
  MmaK64In in;
  std::memcpy(in.a, a, sizeof in.a);
  std::memcpy(in.b, b, sizeof in.b);
  std::memcpy(in.c, c, sizeof in.c);
  in.e = e;
  MmaOut32 out;
  warp_collective(kMmaK64S8, &in, &out);
  std::memcpy(d, out.d, sizeof out.d);
}

void wgmma_sp_m64n128k32(HalfType type, float* d, const WgmmaA& a, uint64_t b_desc, const uint32_t& e) {
  const bool ss = a.desc != 0;
  issue_wgmma(type == HalfType::f16 ? (ss ? kWgmmaSsF16 : kWgmmaF16) : (ss ? kWgmmaSsBf16 : kWgmmaBf16), d, a, b_desc,
              e);
}

void wgmma_sp_m64n128k64_s8(int* d, const WgmmaA& a, uint64_t b_desc, const uint32_t& e) {
  issue_wgmma(a.desc != 0 ? kWgmmaSsS8 : kWgmmaS8, d, a, b_desc, e);
}

void ldmatrix(int matrices, bool trans, uint32_t* regs, const void* row_address) {
  const WarpOp* op = nullptr;
  switch (matrices * 2 + (trans ? 1 : 0)) {
    case 2: op = &ldmatrix_op<1, false>(); break;
    case 3: op = &ldmatrix_op<1, true>(); break;
    case 4: op = &ldmatrix_op<2, false>(); break;
    case 5: op = &ldmatrix_op<2, true>(); break;
    case 8: op = &ldmatrix_op<4, false>(); break;
    case 9: op = &ldmatrix_op<4, true>(); break;
    default: fail("ldmatrix: .x" + std::to_string(matrices) + " is not a PTX form (x1, x2, x4)");
  }
  LdmatrixOut out;
  warp_collective(*op, &row_address, &out);
  std::memcpy(regs, out.r, sizeof(uint32_t) * static_cast<size_t>(matrices));
  wgmma_operands_written();  // registers a wgmma may read: it needs a wgmma.fence after this
}

uint32_t shfl(ShuffleMode mode, uint32_t mask, uint32_t value, int b, int c) {
  const ShflIn in{mask, value, b, c};
  uint32_t out = 0;
  switch (mode) {
    case ShuffleMode::idx: warp_collective(shfl_op<ShuffleMode::idx>(), &in, &out); break;
    case ShuffleMode::up: warp_collective(shfl_op<ShuffleMode::up>(), &in, &out); break;
    case ShuffleMode::down: warp_collective(shfl_op<ShuffleMode::down>(), &in, &out); break;
    case ShuffleMode::bfly: warp_collective(shfl_op<ShuffleMode::bfly>(), &in, &out); break;
  }
  return out;
}

void syncwarp(uint32_t mask) { warp_collective(kSyncwarp, &mask, nullptr); }

uint32_t ballot(uint32_t mask, bool predicate) {
  const BallotIn in{mask, predicate};
  uint32_t out = 0;
  warp_collective(kBallot, &in, &out);
  return out;
}

}  // namespace emu
}  // namespace sparsegemm
