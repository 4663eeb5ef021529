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

template <HalfType Type, int Selector>
void compute_mma_k32(const void* const lane_inputs[32], void* const lane_outputs[32]) {
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
  const char* name = mma_k32_op<Type, Selector>().name;
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

// ---- mma.sp m16n8k64 s8 ------------------------------------------------------------------------
struct MmaK64In {
  uint32_t a[4], b[4];
  int32_t c[4];
  uint32_t e;
};

void compute_mma_k64_s8(const void* const lane_inputs[32], void* const lane_outputs[32]);
const WarpOp kMmaK64S8{"mma.sp::ordered_metadata.m16n8k64.satfinite.s32.s8.s8.s32 (selector 0)",
                       &compute_mma_k64_s8};

void compute_mma_k64_s8(const void* const lane_inputs[32], void* const lane_outputs[32]) {
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
      decode_nibble(kMmaK64S8.name, e[lane], 4 * (q % 8), lane, row, q, pos[q][0], pos[q][1]);
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

uint32_t ballot(uint32_t mask, bool predicate) {
  const BallotIn in{mask, predicate};
  uint32_t out = 0;
  warp_collective(kBallot, &in, &out);
  return out;
}

}  // namespace emu
}  // namespace sparsegemm
