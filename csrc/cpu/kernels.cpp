// CPU kernels on the logical 2:4 layout (format.h). CMakeLists.txt compiles this file once per ISA
// level with -DSPARSEGEMM_CPU_ISA=<generic|avx2|avx512> and matching -m flags; every copy lives in
// its own namespace sparsegemm::cpu::<isa> so the three link side by side, and dispatch.cpp enters
// a vector copy only after checking the CPU supports it.
//
// Sparse GEMM strategy (Y[M, N] = X[M, K] @ W[N, K]^T): X rows are copied once per call into a
// buffer padded with zero values (widened to fp32; bf16 on AVX512-BF16 stays bf16; int8 as its
// Steps type says). For each weight row n the
// kernel walks K in "steps" of whole groups: the step's kept values (two per group) fill one
// register, and the metadata nibbles become per-lane indices that pick the matching X values out
// of the step's X values with one register permute. One FMA (or VDPBF16PS) per step then does the
// work of twice as many dense multiply-adds while reading only the compressed weight bytes, which
// is what makes decode (M = 1, memory bound) faster than a dense GEMV. Register blocking: the index
// and weight vectors of a step are reused for kMaxRows rows of X, and each loaded X step for kCols
// rows of W, so that loads do not limit M > 1.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "convert.h"
#include "cpu_ops.h"
#include "kernels.h"
#include "thread_pool.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if !defined(SPARSEGEMM_CPU_ISA)
#error "kernels.cpp is compiled with -DSPARSEGEMM_CPU_ISA=<generic|avx2|avx512> (see CMakeLists.txt)"
#endif
#define SG_STRINGIFY_IMPL(x) #x
#define SG_STRINGIFY(x) SG_STRINGIFY_IMPL(x)

namespace sparsegemm {
namespace cpu {
namespace SPARSEGEMM_CPU_ISA {
namespace {

// ---- Vector step: kStepGroups groups = 2 * kStepGroups kept values = one register of lanes ------
//
// Lane l of a step holds kept value l, i.e. index i_(l % 2) of group l / 2, whose 2-bit code sits
// at bits [2l+1 : 2l] of the step's little-endian metadata bytes (format.h: group 2b in the low
// nibble of byte b, i0 in the nibble's low two bits). The X position it multiplies is
// 4 * (l / 2) + code within the step.

#if defined(__AVX512F__)
constexpr int kStepGroups = 8;  // 16 fp32 lanes, 32 K positions, 4 metadata bytes
constexpr int kMaxRows = 4;  // X rows per register block
constexpr int kCols = 4;     // W rows per register block: 16 accumulators + 8 step + 2 X registers
using Fp32Acc = __m512;
struct XStep {  // the step's 32 fp32 X values
  __m512 low, high;
};
struct Step {
  __m512i index;  // 0..31: position within the step's 32 X values
  __m512 weight;  // kept values widened to fp32
};

template <DType D>
inline __m512 widen_lanes(const typename ElemTraits<D>::Storage* p) {
  if constexpr (D == DType::f32) {
    return _mm512_loadu_ps(p);
  } else if constexpr (D == DType::f16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {  // bf16 is the top half of an fp32
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
}

// Lane l of a step's index vector: 0..31, the position of kept value l among the step's 32 values.
inline __m512i step_lane_index(const uint8_t* meta) {
  uint32_t codes;
  std::memcpy(&codes, meta, sizeof codes);
  const __m512i shift = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i group_base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i code = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(codes)), shift),
                                        _mm512_set1_epi32(3));
  return _mm512_add_epi32(code, group_base);
}

template <DType D>
inline Step load_step(const typename ElemTraits<D>::Storage* values, const uint8_t* meta) {
  return {step_lane_index(meta), widen_lanes<D>(values)};
}

inline Fp32Acc zero_acc() { return _mm512_setzero_ps(); }

inline XStep load_x(const float* x) { return {_mm512_loadu_ps(x), _mm512_loadu_ps(x + 16)}; }

inline Fp32Acc fma_step(Fp32Acc acc, const Step& step, const XStep& x) {
  return _mm512_fmadd_ps(_mm512_permutex2var_ps(x.low, step.index, x.high), step.weight, acc);
}

inline float reduce_acc(Fp32Acc a) { return _mm512_reduce_add_ps(a); }

#elif defined(__AVX2__)
constexpr int kStepGroups = 4;  // 8 fp32 lanes, 16 K positions, 2 metadata bytes
constexpr int kMaxRows = 2;  // 16 ymm registers: 4 accumulators + 4 step + 2 X + 2 temporaries
constexpr int kCols = 2;
using Fp32Acc = __m256;
struct XStep {  // the step's 16 fp32 X values
  __m256 low, high;
};
struct Step {
  __m256i index;  // 0..7: position within the 8 X values of the lane's half of the step
  __m256 weight;
};

template <DType D>
inline __m256 widen_lanes(const typename ElemTraits<D>::Storage* p) {
  if constexpr (D == DType::f32) {
    return _mm256_loadu_ps(p);
  } else if constexpr (D == DType::f16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
}

// Lane l of a step's index vector: 0..7, the position of kept value l within its half of the step.
// vpermps only reaches 8 values: lanes 0-3 (groups 0, 1) index values [0, 8), lanes 4-7 [8, 16).
inline __m256i step_lane_index(const uint8_t* meta) {
  uint16_t codes;
  std::memcpy(&codes, meta, sizeof codes);
  const __m256i shift = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i group_base = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
  const __m256i code = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(codes), shift), _mm256_set1_epi32(3));
  return _mm256_add_epi32(code, group_base);
}

template <DType D>
inline Step load_step(const typename ElemTraits<D>::Storage* values, const uint8_t* meta) {
  return {step_lane_index(meta), widen_lanes<D>(values)};
}

inline Fp32Acc zero_acc() { return _mm256_setzero_ps(); }

inline XStep load_x(const float* x) { return {_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8)}; }

inline Fp32Acc fma_step(Fp32Acc acc, const Step& step, const XStep& x) {
  const __m256 from_low = _mm256_permutevar8x32_ps(x.low, step.index);
  const __m256 from_high = _mm256_permutevar8x32_ps(x.high, step.index);
  return _mm256_fmadd_ps(_mm256_blend_ps(from_low, from_high, 0xF0), step.weight, acc);
}

inline float reduce_acc(Fp32Acc a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

#else
constexpr int kStepGroups = 2;  // one metadata byte: 4 lanes, 8 K positions
constexpr int kMaxRows = 2;
constexpr int kCols = 2;
struct XStep {  // the step's 8 X values, read in place
  const float* values;
};
struct Fp32Acc {
  float lane[4];
};
struct Step {
  int index[4];
  float weight[4];
};

template <DType D>
inline Step load_step(const typename ElemTraits<D>::Storage* values, const uint8_t* meta) {
  Step step;
  for (int l = 0; l < 4; ++l) {
    step.index[l] = ((meta[0] >> (2 * l)) & 3) + 4 * (l / 2);
    step.weight[l] = ElemTraits<D>::to_float(values[l]);
  }
  return step;
}

inline Fp32Acc zero_acc() { return Fp32Acc{{0.0f, 0.0f, 0.0f, 0.0f}}; }

inline XStep load_x(const float* x) { return {x}; }

inline Fp32Acc fma_step(Fp32Acc acc, const Step& step, const XStep& x) {
  for (int l = 0; l < 4; ++l) acc.lane[l] += step.weight[l] * x.values[step.index[l]];
  return acc;
}

inline float reduce_acc(Fp32Acc a) { return (a.lane[0] + a.lane[1]) + (a.lane[2] + a.lane[3]); }
#endif

static_assert(kStepGroups % 2 == 0, "a step must cover whole metadata bytes");

// ---- Shared scalar helpers ---------------------------------------------------------------------

template <typename Fn>
void with_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f32: fn(std::integral_constant<DType, DType::f32>{}); return;
    case DType::f16: fn(std::integral_constant<DType, DType::f16>{}); return;
    case DType::bf16: fn(std::integral_constant<DType, DType::bf16>{}); return;
    default:
      throw std::invalid_argument("sparsegemm cpu: dtype code " + std::to_string(static_cast<int>(dtype)) +
                                  " is not a CPU floating dtype (expected f32, f16 or bf16)");
  }
}

// Rows per parallel chunk so that one chunk is worth waking a thread for (about 16K elements).
int64_t rows_grain(int64_t row_len) { return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, row_len)); }

#if defined(__AVX512BW__)
// Indices for a step of 16 groups (64 K positions, 32 kept 16-bit values, 8 metadata bytes) whose
// kept values sit in 16-bit lanes: lane l gets 0..63, the position of kept value l among the
// step's 64 X values, for a two-register permute (vpermt2w). Lane l needs bits [2l+1 : 2l] of the
// 8 metadata bytes: 16-bit word l / 8, shifted by 2 (l % 8). Shared by the bf16 and int8 GEMM
// steps and by compress (which gathers W's kept values with it).
inline __m512i pair_step_index(const uint8_t* meta) {
  alignas(64) static constexpr uint16_t kWordOfLane[32] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                           2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
  alignas(64) static constexpr uint16_t kShift[32] = {0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14,
                                                      0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14};
  alignas(64) static constexpr uint16_t kGroupBase[32] = {0,  0,  4,  4,  8,  8,  12, 12, 16, 16, 20,
                                                          20, 24, 24, 28, 28, 32, 32, 36, 36, 40, 40,
                                                          44, 44, 48, 48, 52, 52, 56, 56, 60, 60};
  uint64_t codes;
  std::memcpy(&codes, meta, sizeof codes);
  const __m512i words = _mm512_permutexvar_epi16(_mm512_load_si512(kWordOfLane),
                                                 _mm512_set1_epi64(static_cast<long long>(codes)));
  const __m512i code = _mm512_and_si512(_mm512_srlv_epi16(words, _mm512_load_si512(kShift)), _mm512_set1_epi16(3));
  return _mm512_add_epi16(code, _mm512_load_si512(kGroupBase));
}
#endif

// ---- Vector selection for mask_2to4 and compress: 16 groups (64 K positions) per step -----------
//
// Branch-free form of format.h's select_top2 on its ordering keys (format.h OrderingKey):
// rank_i counts the positions beating i, and the kept positions are those with rank < 2. Vectors
// hold whole groups, so rotating each group's lanes by d puts position (p + d) % 4 under
// position p; that rival has the lower index exactly when p + d >= 4.
//
// A step's result is a 64-bit mask per property, bit 4g + p for position p of group g. The kept
// mask's nibble g is then group g's nibble of E after a 2-of-4 pattern -> i0 | i1 << 2 lookup.
#if defined(__AVX2__)
#define SG_VECTOR_SELECT 1
constexpr int64_t kSelectGroups = 16;

struct SelectedStep {
  uint64_t kept;     // the two positions each group keeps
  uint64_t nonzero;  // positions whose value is not +-0.0 (NaN is non-zero)
};

// Majority of three lane predicates: set where at least two rivals beat the lane (rank >= 2).
template <typename V>
inline V at_least_two(V b1, V b2, V b3) {
  return (b1 & b2) | (b3 & (b1 | b2));
}

#if defined(__AVX512BW__)
// Rivals at distance d with the lower index, per lane of a 32 x 16-bit or 16 x 32-bit register.
constexpr __mmask32 kLowerRival16[4] = {0, 0x88888888u, 0xCCCCCCCCu, 0xEEEEEEEEu};
constexpr __mmask16 kLowerRival32[4] = {0, 0x8888, 0xCCCC, 0xEEEE};

// One 64-bit lane is one group of 16-bit values: a 64-bit rotation by 16 d bits brings position
// (p + d) % 4 under p. Returns the rank >= 2 lanes of the register's 8 groups.
inline __mmask32 dropped_lanes16(__m512i key) {
  auto beats = [&](__m512i rival, int d) {
    return _mm512_cmpgt_epu16_mask(rival, key) | _mm512_mask_cmpeq_epu16_mask(kLowerRival16[d], rival, key);
  };
  return at_least_two<__mmask32>(beats(_mm512_ror_epi64(key, 16), 1), beats(_mm512_ror_epi64(key, 32), 2),
                                 beats(_mm512_ror_epi64(key, 48), 3));
}

// One 128-bit lane is one group of fp32 values; pshufd rotates within it.
inline __mmask16 dropped_lanes32(__m512i key) {
  auto beats = [&](__m512i rival, int d) {
    return _mm512_cmpgt_epu32_mask(rival, key) | _mm512_mask_cmpeq_epu32_mask(kLowerRival32[d], rival, key);
  };
  return at_least_two<__mmask16>(beats(_mm512_shuffle_epi32(key, _MM_PERM_ADCB), 1),
                                 beats(_mm512_shuffle_epi32(key, _MM_PERM_BADC), 2),
                                 beats(_mm512_shuffle_epi32(key, _MM_PERM_CBAD), 3));
}

template <DType D>
inline SelectedStep select_step(const typename ElemTraits<D>::Storage* w) {
  uint64_t dropped = 0, zero = 0;
  if constexpr (D == DType::f32) {
    const __m512i magnitude = _mm512_set1_epi32(static_cast<int>(OrderingKey<D>::kMagnitude));
    const __m512i first_nan = _mm512_set1_epi32(static_cast<int>(OrderingKey<D>::kFirstNan));
    for (int q = 0; q < 4; ++q) {
      const __m512i bits = _mm512_and_si512(_mm512_loadu_si512(w + 16 * q), magnitude);
      dropped |= uint64_t{dropped_lanes32(_mm512_min_epu32(bits, first_nan))} << (16 * q);
      zero |= uint64_t{_mm512_testn_epi32_mask(bits, bits)} << (16 * q);
    }
  } else {
    const __m512i magnitude = _mm512_set1_epi16(static_cast<short>(OrderingKey<D>::kMagnitude));
    const __m512i first_nan = _mm512_set1_epi16(static_cast<short>(OrderingKey<D>::kFirstNan));
    for (int q = 0; q < 2; ++q) {
      const __m512i bits = _mm512_and_si512(_mm512_loadu_si512(w + 32 * q), magnitude);
      dropped |= uint64_t{dropped_lanes16(_mm512_min_epu16(bits, first_nan))} << (32 * q);
      zero |= uint64_t{_mm512_testn_epi16_mask(bits, bits)} << (32 * q);
    }
  }
  return {~dropped, ~zero};
}

inline void store_mask_bytes(uint64_t kept, uint8_t* out) {
  _mm512_storeu_si512(out, _mm512_maskz_mov_epi8(kept, _mm512_set1_epi8(1)));
}

// out[0, 32) <- the step's kept values, the ones E's 8 bytes at `meta` name.
template <DType D>
inline void store_kept_values(const typename ElemTraits<D>::Storage* w, const uint8_t* meta,
                              typename ElemTraits<D>::Storage* out) {
  if constexpr (D == DType::f32) {
    for (int q = 0; q < 2; ++q) {
      const __m512 kept = _mm512_permutex2var_ps(_mm512_loadu_ps(w + 32 * q), step_lane_index(meta + 4 * q),
                                                 _mm512_loadu_ps(w + 32 * q + 16));
      _mm512_storeu_ps(out + 16 * q, kept);
    }
  } else {
    _mm512_storeu_si512(out, _mm512_permutex2var_epi16(_mm512_loadu_si512(w), pair_step_index(meta),
                                                       _mm512_loadu_si512(w + 32)));
  }
}

#else  // AVX2: lane predicates are all-ones lanes, gathered into bit masks with movemask.
// 16-bit lanes: pshufb rotation of each 4-lane group by d positions, and where the rival is lower.
inline __m256i rotate_groups16(__m256i v, int d) {
  const __m256i by1 = _mm256_setr_epi8(2, 3, 4, 5, 6, 7, 0, 1, 10, 11, 12, 13, 14, 15, 8, 9, 2, 3, 4, 5, 6, 7, 0, 1,
                                       10, 11, 12, 13, 14, 15, 8, 9);
  const __m256i by2 = _mm256_setr_epi8(4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3,
                                       12, 13, 14, 15, 8, 9, 10, 11);
  const __m256i by3 = _mm256_setr_epi8(6, 7, 0, 1, 2, 3, 4, 5, 14, 15, 8, 9, 10, 11, 12, 13, 6, 7, 0, 1, 2, 3, 4, 5,
                                       14, 15, 8, 9, 10, 11, 12, 13);
  return _mm256_shuffle_epi8(v, d == 1 ? by1 : d == 2 ? by2 : by3);
}

inline __m256i lower_rival16(int d) {
  const int16_t on = -1;
  const int16_t p1 = d >= 3 ? on : 0, p2 = d >= 2 ? on : 0;
  return _mm256_setr_epi16(0, p1, p2, on, 0, p1, p2, on, 0, p1, p2, on, 0, p1, p2, on);
}

inline __m256i lower_rival32(int d) {
  const int on = -1;
  const int p1 = d >= 3 ? on : 0, p2 = d >= 2 ? on : 0;
  return _mm256_setr_epi32(0, p1, p2, on, 0, p1, p2, on);
}

inline __m256i beats_lanes16(__m256i rival, __m256i key, int d) {
  return _mm256_or_si256(_mm256_cmpgt_epi16(rival, key),
                         _mm256_and_si256(_mm256_cmpeq_epi16(rival, key), lower_rival16(d)));
}

inline __m256i beats_lanes32(__m256i rival, __m256i key, int d) {
  return _mm256_or_si256(_mm256_cmpgt_epi32(rival, key),
                         _mm256_and_si256(_mm256_cmpeq_epi32(rival, key), lower_rival32(d)));
}

// 32 bits, one per 16-bit lane of a then b, of two all-ones/zero lane vectors.
inline uint32_t lane_bits16(__m256i a, __m256i b) {
  // packs works per 128-bit half: [a.lo b.lo a.hi b.hi]; vpermq restores [a b].
  return static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_permute4x64_epi64(_mm256_packs_epi16(a, b), 0xD8)));
}

template <DType D>
inline SelectedStep select_step(const typename ElemTraits<D>::Storage* w) {
  uint64_t dropped = 0, zero = 0;
  const __m256i zeros = _mm256_setzero_si256();
  if constexpr (D == DType::f32) {
    const __m256i magnitude = _mm256_set1_epi32(static_cast<int>(OrderingKey<D>::kMagnitude));
    const __m256i first_nan = _mm256_set1_epi32(static_cast<int>(OrderingKey<D>::kFirstNan));
    for (int q = 0; q < 8; ++q) {
      const __m256i bits = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 8 * q)), magnitude);
      const __m256i key = _mm256_min_epi32(bits, first_nan);
      const __m256i rank2 = at_least_two(beats_lanes32(_mm256_shuffle_epi32(key, _MM_SHUFFLE(0, 3, 2, 1)), key, 1),
                                         beats_lanes32(_mm256_shuffle_epi32(key, _MM_SHUFFLE(1, 0, 3, 2)), key, 2),
                                         beats_lanes32(_mm256_shuffle_epi32(key, _MM_SHUFFLE(2, 1, 0, 3)), key, 3));
      dropped |= uint64_t(_mm256_movemask_ps(_mm256_castsi256_ps(rank2))) << (8 * q);
      zero |= uint64_t(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(bits, zeros)))) << (8 * q);
    }
  } else {
    const __m256i magnitude = _mm256_set1_epi16(static_cast<short>(OrderingKey<D>::kMagnitude));
    const __m256i first_nan = _mm256_set1_epi16(static_cast<short>(OrderingKey<D>::kFirstNan));
    for (int q = 0; q < 2; ++q) {
      __m256i rank2[2], is_zero[2];
      for (int h = 0; h < 2; ++h) {
        const __m256i bits =
            _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * q + 16 * h)), magnitude);
        const __m256i key = _mm256_min_epi16(bits, first_nan);
        rank2[h] = at_least_two(beats_lanes16(rotate_groups16(key, 1), key, 1),
                                beats_lanes16(rotate_groups16(key, 2), key, 2),
                                beats_lanes16(rotate_groups16(key, 3), key, 3));
        is_zero[h] = _mm256_cmpeq_epi16(bits, zeros);
      }
      dropped |= uint64_t{lane_bits16(rank2[0], rank2[1])} << (32 * q);
      zero |= uint64_t{lane_bits16(is_zero[0], is_zero[1])} << (32 * q);
    }
  }
  return {~dropped, ~zero};
}

// out[i] = bit i of kept, for i in [0, 64).
inline void store_mask_bytes(uint64_t kept, uint8_t* out) {
  // pshufb stays within 128-bit halves, so each half of the broadcast picks its own two bytes.
  const __m256i byte_of_lane = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2,
                                                3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit_of_lane = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
  for (int h = 0; h < 2; ++h) {
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(kept >> (32 * h))), byte_of_lane);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit_of_lane), bit_of_lane);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 * h), _mm256_and_si256(set, _mm256_set1_epi8(1)));
  }
}

// pshufb control that moves the two kept 16-bit values of each group of one E byte (two groups,
// 16 bytes of W) into the low 8 bytes, in order: the 256 possible bytes, computed at compile time.
struct PairShuffleTable {
  uint64_t control[256];
  constexpr PairShuffleTable() : control() {
    for (int byte = 0; byte < 256; ++byte) {
      uint64_t c = 0;
      for (int slot = 0; slot < 4; ++slot) {  // kept value `slot` = index slot % 2 of group slot / 2
        const int group = slot / 2, code = (byte >> (4 * group + 2 * (slot % 2))) & 3;
        const int src = 2 * (4 * group + code);
        c |= uint64_t(src) << (16 * slot) | uint64_t(src + 1) << (16 * slot + 8);
      }
      control[byte] = c;
    }
  }
};
constexpr PairShuffleTable kPairShuffle{};

template <DType D>
inline void store_kept_values(const typename ElemTraits<D>::Storage* w, const uint8_t* meta,
                              typename ElemTraits<D>::Storage* out) {
  if constexpr (D == DType::f32) {
    for (int q = 0; q < 4; ++q) {  // 16 values (4 groups, 2 E bytes) -> 8 kept
      const __m256i index = step_lane_index(meta + 2 * q);
      const __m256 from_low = _mm256_permutevar8x32_ps(_mm256_loadu_ps(w + 16 * q), index);
      const __m256 from_high = _mm256_permutevar8x32_ps(_mm256_loadu_ps(w + 16 * q + 8), index);
      _mm256_storeu_ps(out + 8 * q, _mm256_blend_ps(from_low, from_high, 0xF0));
    }
  } else {
    auto kept_in_low_halves = [&](int q) {  // 16 values (2 E bytes) -> 8 kept: 4 in each half's low 8 bytes
      const __m256i control = _mm256_set_epi64x(0, static_cast<long long>(kPairShuffle.control[meta[2 * q + 1]]), 0,
                                                static_cast<long long>(kPairShuffle.control[meta[2 * q]]));
      return _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 * q)), control);
    };
    for (int q = 0; q < 4; q += 2) {
      // [a.q0 b.q0 a.q2 b.q2] -> [a.q0 a.q2 b.q0 b.q2]: 16 kept values in order.
      const __m256i both = _mm256_unpacklo_epi64(kept_in_low_halves(q), kept_in_low_halves(q + 1));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * q), _mm256_permute4x64_epi64(both, 0xD8));
    }
  }
}
#endif

// E's 8 bytes for a step from its kept mask: kept bits [4g+3 : 4g] sit where E keeps group g's
// nibble, and pshufb maps each 2-of-4 pattern to its nibble i0 | i1 << 2.
inline uint64_t meta_of_kept(uint64_t kept) {
  const __m128i nibble_of_pattern = _mm_setr_epi8(0, 0, 0, 0x4, 0, 0x8, 0x9, 0, 0, 0xC, 0xD, 0, 0xE, 0, 0, 0);
  const __m128i low_nibbles = _mm_set1_epi8(0x0F);
  const __m128i patterns = _mm_cvtsi64_si128(static_cast<long long>(kept));
  const __m128i even = _mm_shuffle_epi8(nibble_of_pattern, _mm_and_si128(patterns, low_nibbles));
  const __m128i odd = _mm_shuffle_epi8(nibble_of_pattern, _mm_and_si128(_mm_srli_epi16(patterns, 4), low_nibbles));
  return static_cast<uint64_t>(_mm_cvtsi128_si64(_mm_or_si128(even, _mm_slli_epi16(odd, 4))));
}
#endif  // __AVX2__

// Nibble selected by the format.h rule for group `group` of one W row. Positions k >= K do not
// exist and are never read: key 0 (a zero) at the end of the group loses every tie, as padding
// zeros do in the GPU kernel.
template <DType D>
uint8_t select_group(const typename ElemTraits<D>::Storage* row, int64_t group, int64_t K) {
  uint32_t key[4];
  for (int i = 0; i < 4; ++i) {
    const int64_t k = 4 * group + i;
    key[i] = k < K ? ordering_key<D>(storage_bits(row[k])) : 0u;
  }
  return select_top2(key);
}

template <DType D>
void mask_typed(const void* w_ptr, int64_t N, int64_t K, int64_t ldw, uint8_t* mask) {
  using T = typename ElemTraits<D>::Storage;
  const T* w = static_cast<const T*>(w_ptr);
  const int64_t groups = num_groups(K);
  parallel_for(0, N, rows_grain(K), [&](int64_t n_begin, int64_t n_end) {
    for (int64_t n = n_begin; n < n_end; ++n) {
      const T* row = w + n * ldw;
      uint8_t* mask_row = mask + n * K;
      int64_t g = 0;
#if defined(SG_VECTOR_SELECT)
      for (; 4 * (g + kSelectGroups) <= K; g += kSelectGroups) {
        store_mask_bytes(select_step<D>(row + 4 * g).kept, mask_row + 4 * g);
      }
#endif
      for (; g < groups; ++g) {
        const uint8_t nibble = select_group<D>(row, g, K);
        const int i0 = nibble & 3, i1 = nibble >> 2;
        for (int i = 0; i < 4 && 4 * g + i < K; ++i) mask_row[4 * g + i] = (i == i0 || i == i1) ? 1 : 0;
      }
    }
  });
}

template <DType D>
void compress_typed(const CompressParams& p) {
  using T = typename ElemTraits<D>::Storage;
  const T* w = static_cast<const T*>(p.w);
  T* values = static_cast<T*>(p.values);
  const int64_t K = p.K, groups = num_groups(K), vcols = values_cols(K), mcols = meta_cols(K);
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  parallel_for(0, p.N, rows_grain(K), [&](int64_t n_begin, int64_t n_end) {
    int64_t chunk_first_bad = std::numeric_limits<int64_t>::max();
    for (int64_t n = n_begin; n < n_end; ++n) {
      const T* row = w + n * p.ldw;
      T* kept = values + n * vcols;
      uint8_t* meta_row = p.meta + n * mcols;
      int64_t g = 0;
#if defined(SG_VECTOR_SELECT)
      for (; 4 * (g + kSelectGroups) <= K; g += kSelectGroups) {
        const SelectedStep step = select_step<D>(row + 4 * g);
        const uint64_t meta = meta_of_kept(step.kept);
        std::memcpy(meta_row + g / 2, &meta, sizeof meta);
        store_kept_values<D>(row + 4 * g, meta_row + g / 2, kept + 2 * g);
        // The non-zeros of a group with at most two outrank its zeros and are all kept, so a
        // dropped non-zero marks exactly a group with more than two.
        const uint64_t dropped_nonzero = step.nonzero & ~step.kept;
        if (!p.prune && dropped_nonzero != 0 && chunk_first_bad == std::numeric_limits<int64_t>::max()) {
          chunk_first_bad = n * groups + g + __builtin_ctzll(dropped_nonzero) / 4;
        }
      }
#endif
      // The scalar groups below OR their nibbles in; g is even here, so they start a fresh byte.
      std::fill(meta_row + g / 2, meta_row + mcols, uint8_t{0});
      for (; g < groups; ++g) {
        const uint8_t nibble = select_group<D>(row, g, K);
        const int64_t k0 = 4 * g, k1 = 4 * g + (nibble & 3), k2 = 4 * g + (nibble >> 2);
        kept[2 * g] = k1 < K ? row[k1] : T{};
        kept[2 * g + 1] = k2 < K ? row[k2] : T{};
        meta_row[g >> 1] |= static_cast<uint8_t>(nibble << ((g & 1) * 4));
        if (!p.prune && chunk_first_bad == std::numeric_limits<int64_t>::max()) {
          int nonzeros = 0;  // NaN != 0 counts as non-zero; -0.0 == 0 does not
          for (int64_t k = k0; k < k0 + 4 && k < K; ++k) nonzeros += ElemTraits<D>::to_float(row[k]) != 0.0f;
          if (nonzeros > 2) chunk_first_bad = n * groups + g;
        }
      }
      if (groups % 2 == 1) meta_row[mcols - 1] |= static_cast<uint8_t>(kPadNibble << 4);
    }
    int64_t seen = first_bad.load();
    while (chunk_first_bad < seen && !first_bad.compare_exchange_weak(seen, chunk_first_bad)) {
    }
  });
  if (!p.prune && first_bad.load() != std::numeric_limits<int64_t>::max()) *p.first_bad_group = first_bad.load();
}

#if defined(__AVX512BW__)
// Decompression of 8 groups (32 K positions, 16 kept 16-bit values, 4 metadata bytes) per step:
// output lane p belongs to group p / 4 at position p % 4; it takes kept value 2 * (p / 4) when
// that position is the group's i0, 2 * (p / 4) + 1 when it is i1, and zero otherwise. One masked
// permute does the scatter, so the large-M CPU path (decompress a tile, then a dense GEMM) pays
// little for the decompression.
inline void decompress_step16(const uint16_t* kept, const uint8_t* meta, uint16_t* out) {
  alignas(64) static constexpr uint16_t kWordOfLane[32] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                           1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
  alignas(64) static constexpr uint16_t kShift[32] = {0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
                                                      0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12};
  alignas(64) static constexpr uint16_t kPosition[32] = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3,
                                                         0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3};
  alignas(64) static constexpr uint16_t kFirstKept[32] = {0,  0,  0,  0,  2,  2,  2,  2,  4,  4,  4,
                                                          4,  6,  6,  6,  6,  8,  8,  8,  8,  10, 10,
                                                          10, 10, 12, 12, 12, 12, 14, 14, 14, 14};
  uint32_t codes;
  std::memcpy(&codes, meta, sizeof codes);
  const __m512i words = _mm512_permutexvar_epi16(_mm512_load_si512(kWordOfLane), _mm512_set1_epi32(static_cast<int>(codes)));
  const __m512i nibble = _mm512_srlv_epi16(words, _mm512_load_si512(kShift));
  const __m512i three = _mm512_set1_epi16(3);
  const __m512i pos = _mm512_load_si512(kPosition);
  const __mmask32 is_i0 = _mm512_cmpeq_epi16_mask(_mm512_and_si512(nibble, three), pos);
  const __mmask32 is_i1 = _mm512_cmpeq_epi16_mask(_mm512_and_si512(_mm512_srli_epi16(nibble, 2), three), pos);
  const __m512i first = _mm512_load_si512(kFirstKept);
  const __m512i index = _mm512_mask_add_epi16(first, is_i1, first, _mm512_set1_epi16(1));
  const __m512i values = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kept)));
  _mm512_storeu_si512(out, _mm512_maskz_permutexvar_epi16(is_i0 | is_i1, index, values));
}
#endif

#if defined(__AVX512VBMI__)
// The same for 8-bit values, 16 groups (64 K positions, 32 kept bytes, 8 metadata bytes) per step:
// vpmultishiftqb gives output byte p the 8 metadata bits that start at group p / 4's nibble, and
// one masked vpermb does the scatter.
inline void decompress_step8(const int8_t* kept, const uint8_t* meta, int8_t* out) {
  alignas(64) static constexpr uint8_t kFirstKept[64] = {
      0,  0,  0,  0,  2,  2,  2,  2,  4,  4,  4,  4,  6,  6,  6,  6,  8,  8,  8,  8,  10, 10,
      10, 10, 12, 12, 12, 12, 14, 14, 14, 14, 16, 16, 16, 16, 18, 18, 18, 18, 20, 20, 20, 20,
      22, 22, 22, 22, 24, 24, 24, 24, 26, 26, 26, 26, 28, 28, 28, 28, 30, 30, 30, 30};
  uint64_t codes;
  std::memcpy(&codes, meta, sizeof codes);
  // Multishift control of output byte p: bit 4 * (p / 4), where group p / 4's nibble starts in
  // the 8 metadata bytes (every qword of the source holds all of them).
  alignas(64) static constexpr uint8_t kNibbleBit[64] = {
      0,  0,  0,  0,  4,  4,  4,  4,  8,  8,  8,  8,  12, 12, 12, 12, 16, 16, 16, 16, 20, 20,
      20, 20, 24, 24, 24, 24, 28, 28, 28, 28, 32, 32, 32, 32, 36, 36, 36, 36, 40, 40, 40, 40,
      44, 44, 44, 44, 48, 48, 48, 48, 52, 52, 52, 52, 56, 56, 56, 56, 60, 60, 60, 60};
  alignas(64) static constexpr uint8_t kPosition[64] = {
      0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3,
      0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3};
  const __m512i nibble = _mm512_multishift_epi64_epi8(_mm512_load_si512(kNibbleBit),
                                                      _mm512_set1_epi64(static_cast<long long>(codes)));
  const __m512i three = _mm512_set1_epi8(3);
  const __m512i pos = _mm512_load_si512(kPosition);
  const __mmask64 is_i0 = _mm512_cmpeq_epi8_mask(_mm512_and_si512(nibble, three), pos);
  const __mmask64 is_i1 = _mm512_cmpeq_epi8_mask(_mm512_and_si512(_mm512_srli_epi16(nibble, 2), three), pos);
  const __m512i first = _mm512_load_si512(kFirstKept);
  const __m512i index = _mm512_mask_add_epi8(first, is_i1, first, _mm512_set1_epi8(1));
  const __m512i values = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kept)));
  _mm512_storeu_si512(out, _mm512_maskz_permutexvar_epi8(is_i0 | is_i1, index, values));
}
#endif

// W[N, K] <- the decompressed rows, for any element type T of 1, 2 or 4 bytes.
template <typename T>
void decompress_typed(const DecompressParams& p) {
  const T* values = static_cast<const T*>(p.values);
  T* w = static_cast<T*>(p.w);
  const int64_t K = p.K, groups = num_groups(K), vcols = values_cols(K), mcols = meta_cols(K);
  parallel_for(0, p.N, rows_grain(K), [&](int64_t n_begin, int64_t n_end) {
    for (int64_t n = n_begin; n < n_end; ++n) {
      const T* kept = values + n * vcols;
      const uint8_t* meta_row = p.meta + n * mcols;
      T* row = w + n * K;
      int64_t g = 0;
#if defined(__AVX512BW__)
      if constexpr (sizeof(T) == 2) {
        for (; 4 * g + 32 <= K; g += 8) decompress_step16(kept + 2 * g, meta_row + g / 2, row + 4 * g);
      }
#endif
#if defined(__AVX512VBMI__)
      if constexpr (sizeof(T) == 1) {
        for (; 4 * g + 64 <= K; g += 16) decompress_step8(kept + 2 * g, meta_row + g / 2, row + 4 * g);
      }
#endif
      std::fill(row + 4 * g, row + K, T{});
      for (; g < groups; ++g) {
        const int nibble = group_nibble(meta_row, g);
        const int64_t k1 = 4 * g + (nibble & 3), k2 = 4 * g + (nibble >> 2);
        if (k1 < K) row[k1] = kept[2 * g];
        if (k2 < K) row[k2] = kept[2 * g + 1];
      }
    }
  });
}

// ---- GEMM --------------------------------------------------------------------------------------

// X rows copied per slab: bounds the copy of X (slab * padded K * 4 bytes at most).
constexpr int64_t kSlabRows = 256;
// X rows per task: their copy (kTileRows * K * 4 bytes at most) stays in L2 across a task's W rows.
constexpr int64_t kTileRows = 32;
static_assert(kTileRows % kMaxRows == 0, "tiles split into whole row blocks");

// What the GEMM driver (sparse_gemm) needs from a "Steps" type, one per ISA and operand types:
//   Storage                 element of W's kept values and of X as the caller passes it
//   XElem                   element of the driver's copy of X (widened as the step's permutes want)
//   StepVectors, XVectors   one step of W (X indices and weights) and of X, in registers
//   Acc, Sum                per-lane accumulators, and the reduced dot product they give
//   kGroups                 groups per step: 4 * kGroups K positions, kGroups / 2 metadata bytes
//   kFlushSteps             steps after which Acc lanes must move into Sum, or kNeverFlush
//   kColumnSums             true when the dot product needs a per-W-row term as well: then
//                           column_madd(acc, step) accumulates it over the same steps (into an
//                           Acc, reduced and flushed like the others) and correct(sum, column_sum)
//                           gives the dot product from a row's sum and its W row's term
//   load(values, meta), load_x_step(x), zero(), madd(acc, step, x), reduce(acc),
//   copy_x_row(src, K, dst, padded_len)
constexpr int64_t kNeverFlush = std::numeric_limits<int64_t>::max();

// Accumulation of the floating steps: fp32 lanes, reduced once at the end of a dot product. The
// portable kernel has only four lanes, each of which would add K / 8 products in sequence: its
// lanes move into a double every kFlushSteps steps instead, so that its error stays that of a
// short fp32 sum (within twice the dense GEMM's, the oracle's bound, where K / 8 sequential adds
// were up to 9x it on a single output at K = 1024).
struct Fp32Accumulation {
  using Acc = Fp32Acc;
#if defined(__AVX512F__) || defined(__AVX2__)
  using Sum = float;
  static constexpr int64_t kFlushSteps = kNeverFlush;
#else
  using Sum = double;
  static constexpr int64_t kFlushSteps = 16;
#endif
  static constexpr bool kColumnSums = false;
  static Acc zero() { return zero_acc(); }
  static Sum reduce(Acc a) { return reduce_acc(a); }
};

// The ISA's fp32 step: X widened to fp32, one kept value per fp32 lane, one FMA per step.
template <DType D>
struct Fp32Steps : Fp32Accumulation {
  using Storage = typename ElemTraits<D>::Storage;
  using XElem = float;  // element of the X copy the steps read
  using StepVectors = Step;
  using XVectors = XStep;
  static constexpr int kGroups = kStepGroups;

  static StepVectors load(const Storage* values, const uint8_t* meta) { return load_step<D>(values, meta); }
  static XVectors load_x_step(const float* x) { return load_x(x); }
  static Acc madd(Acc acc, const StepVectors& step, const XVectors& x) { return fma_step(acc, step, x); }

  // dst[0, padded_len) <- fp32 of src[0, K), then zeros (the padded tail of the last step).
  static void copy_x_row(const Storage* src, int64_t K, float* dst, int64_t padded_len) {
    int64_t k = 0;
#if defined(__AVX512F__)
    for (; k + 16 <= K; k += 16) _mm512_storeu_ps(dst + k, widen_lanes<D>(src + k));
#elif defined(__AVX2__)
    for (; k + 8 <= K; k += 8) _mm256_storeu_ps(dst + k, widen_lanes<D>(src + k));
#endif
    for (; k < K; ++k) dst[k] = ElemTraits<D>::to_float(src[k]);
    std::fill(dst + K, dst + padded_len, 0.0f);
  }
};

#if defined(__AVX512BF16__)
// bf16 on AVX512-BF16: X stays bf16 and VDPBF16PS multiplies 32 bf16 pairs per instruction, twice
// the K per step of the fp32 path at the same permute + FMA cost. The products are exact in fp32
// and accumulate with round to nearest even, as the fp32 path does; like every VDPBF16PS user,
// this path treats subnormal inputs and results (|v| < 2^-126) as zero.
struct Bf16PairSteps : Fp32Accumulation {
  using Storage = uint16_t;
  using XElem = uint16_t;
  struct StepVectors {
    __m512i index;   // 32 x 16-bit: 0..63, position within the step's 64 X values
    __m512i weight;  // the 32 kept bf16 values; lanes 2i, 2i+1 (one group) feed fp32 lane i
  };
  struct XVectors {
    __m512i low, high;  // the step's 64 bf16 X values
  };
  static constexpr int kGroups = 16;  // 64 K positions, 8 metadata bytes

  static StepVectors load(const uint16_t* values, const uint8_t* meta) {
    return {pair_step_index(meta), _mm512_loadu_si512(values)};
  }

  static XVectors load_x_step(const uint16_t* x) { return {_mm512_loadu_si512(x), _mm512_loadu_si512(x + 32)}; }

  static Acc madd(Acc acc, const StepVectors& step, const XVectors& x) {
    const __m512i kept_x = _mm512_permutex2var_epi16(x.low, step.index, x.high);
    return _mm512_dpbf16_ps(acc, reinterpret_cast<const __m512bh&>(kept_x),
                            reinterpret_cast<const __m512bh&>(step.weight));
  }

  static void copy_x_row(const uint16_t* src, int64_t K, uint16_t* dst, int64_t padded_len) {
    std::copy(src, src + K, dst);
    std::fill(dst + K, dst + padded_len, uint16_t{0});
  }
};
#endif

// The step implementation the GEMM uses for dtype D on this ISA.
template <DType D>
struct StepsFor {
  using type = Fp32Steps<D>;
};
#if defined(__AVX512BF16__)
template <>
struct StepsFor<DType::bf16> {
  using type = Bf16PairSteps;
};
#endif

// One register block: sums[r * Cols + c] = W row c . X row r for r < Rows, c < Cols.
// values[c], meta[c]: W row c in the logical layout; its last step comes from tail_values[c] and
// tail_meta[c] (staged copies, zero / pad filled) when has_tail. x: X copy rows, row stride ldx.
// Steps that flush move their lanes into the exact sums every kFlushSteps steps; the others reduce
// their lanes once, so an fp32 result is the lanes' reduction itself, with no extra rounding.
// column_sums[c]: W row c's per-row term (kColumnSums Steps only), accumulated here and stored when
// !have_column_sums, else read: the W rows' first register block of X rows computes it for the rest.
template <typename Steps, int Rows, int Cols>
void dot_block(const typename Steps::Storage* const* values, const uint8_t* const* meta, int64_t full_steps,
               bool has_tail, const typename Steps::Storage (*tail_values)[2 * Steps::kGroups],
               const uint8_t (*tail_meta)[Steps::kGroups / 2], const typename Steps::XElem* x, int64_t ldx,
               typename Steps::Sum* column_sums, bool have_column_sums, typename Steps::Sum* sums) {
  constexpr int kValues = 2 * Steps::kGroups, kMetaBytes = Steps::kGroups / 2, kK = 4 * Steps::kGroups;
  constexpr bool kFlushes = Steps::kFlushSteps != kNeverFlush;
  using StepVectors = typename Steps::StepVectors;
  [[maybe_unused]] typename Steps::Sum flushed[Rows][Cols] = {};
  [[maybe_unused]] typename Steps::Sum column_flushed[Cols] = {};
  typename Steps::Acc acc[Rows][Cols];
  [[maybe_unused]] typename Steps::Acc column_acc[Cols];
  auto reset = [&] {
    for (int r = 0; r < Rows; ++r)
      for (int c = 0; c < Cols; ++c) acc[r][c] = Steps::zero();
    if constexpr (Steps::kColumnSums)
      for (int c = 0; c < Cols; ++c) column_acc[c] = Steps::zero();
  };
  auto accumulate = [&](const StepVectors (&step)[Cols], int64_t s) {
    if constexpr (Steps::kColumnSums) {
      if (!have_column_sums)
        for (int c = 0; c < Cols; ++c) column_acc[c] = Steps::column_madd(column_acc[c], step[c]);
    }
    for (int r = 0; r < Rows; ++r) {
      const typename Steps::XVectors xs = Steps::load_x_step(x + r * ldx + s * kK);
      for (int c = 0; c < Cols; ++c) acc[r][c] = Steps::madd(acc[r][c], step[c], xs);
    }
  };
  reset();
  [[maybe_unused]] int64_t since_flush = 0;
  for (int64_t s = 0; s < full_steps; ++s) {
    StepVectors step[Cols];
    for (int c = 0; c < Cols; ++c) step[c] = Steps::load(values[c] + s * kValues, meta[c] + s * kMetaBytes);
    accumulate(step, s);
    if constexpr (kFlushes) {
      if (++since_flush == Steps::kFlushSteps) {
        for (int r = 0; r < Rows; ++r)
          for (int c = 0; c < Cols; ++c) flushed[r][c] += Steps::reduce(acc[r][c]);
        if constexpr (Steps::kColumnSums)
          for (int c = 0; c < Cols; ++c) column_flushed[c] += Steps::reduce(column_acc[c]);
        reset();
        since_flush = 0;
      }
    }
  }
  if (has_tail) {
    StepVectors step[Cols];
    for (int c = 0; c < Cols; ++c) step[c] = Steps::load(tail_values[c], tail_meta[c]);
    accumulate(step, full_steps);
  }
  if constexpr (Steps::kColumnSums) {
    if (!have_column_sums)
      for (int c = 0; c < Cols; ++c) column_sums[c] = column_flushed[c] + Steps::reduce(column_acc[c]);
  }
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < Cols; ++c) {
      if constexpr (kFlushes) {
        sums[r * Cols + c] = flushed[r][c] + Steps::reduce(acc[r][c]);
      } else {
        sums[r * Cols + c] = Steps::reduce(acc[r][c]);
      }
      if constexpr (Steps::kColumnSums) sums[r * Cols + c] = Steps::correct(sums[r * Cols + c], column_sums[c]);
    }
}

// dot_block with a run-time row count 1 <= rows <= Rows.
template <typename Steps, int Cols, int Rows = kMaxRows, typename... Args>
void dot_block_rows(int rows, Args... args) {
  if constexpr (Rows > 1) {
    if (rows < Rows) return dot_block_rows<Steps, Cols, Rows - 1>(rows, args...);
  }
  dot_block<Steps, Rows, Cols>(args...);
}

// The tiling driver of both GEMMs: Y[M, N] (dtype D) = epilogue(X[M, K] @ W[N, K]^T). p.x holds
// Steps::Storage with row stride p.ldx, p.values Steps::Storage [N, values_cols(K)], p.meta the
// logical metadata, p.bias D [N] or null. epilogue(sum, m, n, bias) gives Y[m, n] from the dot
// product (Steps::Sum) and a pointer to bias[n] as fp32 (null without bias); Y's elements are of
// the type it returns (D's storage, or fp32 for the gated epilogue's pre-activations).
template <typename Steps, DType D, typename Epilogue>
void sparse_gemm(const GemmParams& p, const Epilogue& epilogue) {
  using T = typename ElemTraits<D>::Storage;
  using Storage = typename Steps::Storage;
  using XElem = typename Steps::XElem;
  using Sum = typename Steps::Sum;
  using YElem = std::invoke_result_t<const Epilogue&, Sum, int64_t, int64_t, const float*>;
  const int64_t M = p.M, N = p.N, K = p.K;
  if (M <= 0 || N <= 0) return;
  const Storage* x = static_cast<const Storage*>(p.x);
  const Storage* values = static_cast<const Storage*>(p.values);
  const uint8_t* meta = static_cast<const uint8_t*>(p.meta);
  const T* bias = static_cast<const T*>(p.bias);
  YElem* y = static_cast<YElem*>(p.y);

  constexpr int kGroups = Steps::kGroups, kValues = 2 * kGroups, kMetaBytes = kGroups / 2;
  const int64_t groups = num_groups(K), vcols = values_cols(K), mcols = meta_cols(K);
  const int64_t full_steps = groups / kGroups;
  const int64_t tail_groups = groups % kGroups;
  // Row stride of the X copy: the steps, plus one cache line when that would leave the rows a
  // multiple of 4 KiB apart, where the kMaxRows rows read together would share L1 sets.
  const int64_t ldxc_steps = (full_steps + (tail_groups != 0 ? 1 : 0)) * 4 * kGroups;
  const int64_t ldxc = ldxc_steps + ((ldxc_steps * int64_t{sizeof(XElem)}) % 4096 == 0 ? 64 / sizeof(XElem) : 0);

  // The calling thread owns the copy of X; workers only read it during the call.
  thread_local std::vector<XElem> x_copy;
  const int64_t slab_rows = std::min(M, kSlabRows);
  x_copy.resize(static_cast<size_t>(std::max<int64_t>(1, slab_rows * ldxc)));
  XElem* xc = x_copy.data();

  const int threads = num_threads();
  for (int64_t m0 = 0; m0 < M; m0 += kSlabRows) {
    const int64_t rows = std::min(kSlabRows, M - m0);
    parallel_for(0, rows, rows_grain(ldxc), [&](int64_t r_begin, int64_t r_end) {
      for (int64_t r = r_begin; r < r_end; ++r) Steps::copy_x_row(x + (m0 + r) * p.ldx, K, xc + r * ldxc, ldxc);
    });

    // Tasks are (X row tile, W row tile) pairs; enough W tiles that every thread gets several.
    const int64_t m_tiles = (rows + kTileRows - 1) / kTileRows;
    const int64_t n_tiles =
        std::max<int64_t>(1, std::min<int64_t>((N + 7) / 8, (int64_t{16} * threads + m_tiles - 1) / m_tiles));
    const int64_t n_tile = (N + n_tiles - 1) / n_tiles;
    parallel_for(0, m_tiles * n_tiles, 1, [&](int64_t t_begin, int64_t t_end) {
      for (int64_t t = t_begin; t < t_end; ++t) {
        const int64_t n_begin = (t / m_tiles) * n_tile, n_end = std::min(N, n_begin + n_tile);
        const int64_t r_begin = (t % m_tiles) * kTileRows, r_end = std::min(rows, r_begin + kTileRows);
        // Memory bound (one X row tile, decode): the task's W rows as kCols runs of consecutive
        // rows, one per column of the register block; block j takes row j of every run, so each
        // column streams through consecutive rows (one long run of contiguous values and metadata,
        // which the hardware prefetcher follows) rather than kCols neighbouring rows per block
        // (kCols short streams a row apart, started anew every block: the int8 M = 1 GEMM read
        // DRAM at half a core's rate that way). Compute bound (several X row tiles): blocks of
        // kCols neighbouring rows, as the streamed order measured no faster there (M = 64).
        // Either way the span's first kCols * full rows make `full` whole blocks and the rest
        // (fewer than kCols rows) one last partial block, taken a row at a time.
        const int64_t span = n_end - n_begin, full = span / kCols;
        const bool streamed = rows <= kTileRows;
        for (int64_t j = 0; j < full + (span % kCols != 0 ? 1 : 0); ++j) {
          const int cols = j < full ? kCols : static_cast<int>(span % kCols);
          int64_t row_n[kCols];
          for (int c = 0; c < cols; ++c)
            row_n[c] = n_begin + (j == full ? kCols * full + c : streamed ? c * full + j : j * kCols + c);
          const Storage* row_values[kCols];
          const uint8_t* row_meta[kCols];
          // A partial last step is staged so the vector code never reads past a row: missing values
          // are 0 and missing metadata bytes are pad bytes (two valid (0, 1) nibbles).
          Storage tail_values[kCols][kValues] = {};
          uint8_t tail_meta[kCols][kMetaBytes];
          float bias_n[kCols];
          for (int c = 0; c < cols; ++c) {
            row_values[c] = values + row_n[c] * vcols;
            row_meta[c] = meta + row_n[c] * mcols;
            if (tail_groups != 0) {
              std::copy(row_values[c] + full_steps * kValues, row_values[c] + vcols, tail_values[c]);
              std::fill(tail_meta[c], tail_meta[c] + kMetaBytes, static_cast<uint8_t>(kPadNibble | kPadNibble << 4));
              std::copy(row_meta[c] + full_steps * kMetaBytes, row_meta[c] + mcols, tail_meta[c]);
            }
            bias_n[c] = bias != nullptr ? ElemTraits<D>::to_float(bias[row_n[c]]) : 0.0f;
          }
          Sum column_sums[kCols] = {};  // the W rows' per-row terms (kColumnSums), from their first block
          for (int64_t r = r_begin; r < r_end; r += kMaxRows) {
            const int block = static_cast<int>(std::min<int64_t>(kMaxRows, r_end - r));
            const bool have_column_sums = r != r_begin;
            Sum sums[kMaxRows * kCols];
            if (cols == kCols) {
              dot_block_rows<Steps, kCols>(block, row_values, row_meta, full_steps, tail_groups != 0, tail_values,
                                           tail_meta, xc + r * ldxc, ldxc, column_sums, have_column_sums, sums);
            } else {  // the last partial block, one row at a time
              for (int c = 0; c < cols; ++c) {
                Sum col_sums[kMaxRows];
                dot_block_rows<Steps, 1>(block, row_values + c, row_meta + c, full_steps, tail_groups != 0,
                                         tail_values + c, tail_meta + c, xc + r * ldxc, ldxc, column_sums + c,
                                         have_column_sums, col_sums);
                for (int i = 0; i < block; ++i) sums[i * kCols + c] = col_sums[i];
              }
            }
            for (int i = 0; i < block; ++i) {
              const int64_t m = m0 + r + i;
              YElem* y_row = y + m * p.ldy;
              for (int c = 0; c < cols; ++c)
                y_row[row_n[c]] = epilogue(sums[i * kCols + c], m, row_n[c], bias != nullptr ? &bias_n[c] : nullptr);
            }
          }
        }
      }
    });
  }
}

// The GEMM with its activation. pre_activation(sum, m, n, bias) is Y[m, n]'s fp32 value before
// the activation, in the order of operations the backends share. Plain: the activation, one
// rounding to D. Gated (format.h kGatedActivation): per slab of kGatedSlabRows rows of X, the
// fp32 values of all N rows of W first, then Y[m, 8q + r] = act(gate) * up with one rounding, the
// pairs the CUDA epilogue multiplies; slabs keep the fp32 scratch small at any M.
constexpr int64_t kGatedSlabRows = 64;

template <typename Steps, DType D, typename PreActivation>
void sparse_gemm_activated(const GemmParams& p, const PreActivation& pre_activation) {
  const Activation act = p.act;
  if (!p.gated) {
    sparse_gemm<Steps, D>(p, [&](auto sum, int64_t m, int64_t n, const float* bias) {
      return ElemTraits<D>::from_float(apply_activation(pre_activation(sum, m, n, bias), act));
    });
    return;
  }
  if (p.M <= 0 || p.N <= 0) return;
  using T = typename ElemTraits<D>::Storage;
  const int64_t out_cols = p.N / 2;
  std::unique_ptr<float[]> rows(new float[std::min(p.M, kGatedSlabRows) * p.N]);  // no fill: all written
  for (int64_t m0 = 0; m0 < p.M; m0 += kGatedSlabRows) {
    GemmParams slab = p;
    slab.M = std::min(kGatedSlabRows, p.M - m0);
    slab.x = static_cast<const typename Steps::Storage*>(p.x) + m0 * p.ldx;
    slab.y = rows.get();
    slab.ldy = p.N;
    sparse_gemm<Steps, D>(slab, [&](auto sum, int64_t m, int64_t n, const float* bias) {
      return pre_activation(sum, m0 + m, n, bias);
    });
    T* y = static_cast<T*>(p.y) + m0 * p.ldy;
    parallel_for(0, slab.M, rows_grain(p.N), [&](int64_t m_begin, int64_t m_end) {
      for (int64_t m = m_begin; m < m_end; ++m) {
        const float* row = rows.get() + m * p.N;
        for (int64_t j = 0; j < out_cols; ++j) {
          const int64_t gate = j / kGateRows * (2 * kGateRows) + j % kGateRows;
          y[m * p.ldy + j] = ElemTraits<D>::from_float(apply_activation(row[gate], act) * row[gate + kGateRows]);
        }
      }
    });
  }
}

// Y = activation(X @ W^T + bias), one rounding to D; a missing bias adds +0.0.
template <DType D>
void gemm_typed(const GemmParams& p) {
  sparse_gemm_activated<typename StepsFor<D>::type, D>(p, [](float dot, int64_t, int64_t, const float* bias) {
    return dot + (bias != nullptr ? *bias : 0.0f);
  });
}

// ---- INT8 (issue 4): dynamic per-token quantization and the s8 x s8 -> s32 sparse GEMM ---------
//
// The order of operations is the contract shared with the CUDA kernels (sparsegemm/quant.py
// docstring) so that both backends give the same bits: everything here is exact integer work or
// one correctly rounded fp32 operation at a time.

// Row m of X -> x_q[m, :K] and x_scale[m]: x_scale = amax / 127 (amax = max |x| in fp32; 1 where
// that is 0: an all-zero row, or one too small for an fp32 scale; NaN when the row holds a NaN), q = clamp(rint(x / x_scale), -127, 127)
// with fp32 division and round half to even, 0 where x / x_scale is NaN.
inline float row_scale(float amax, bool has_nan) {
  if (has_nan) return std::numeric_limits<float>::quiet_NaN();
  const float quotient = amax / 127.0f;
  return quotient == 0.0f ? 1.0f : quotient;  // all zeros, or too small for fp32
}

inline int8_t quantize_value(float v, float scale) {
  const float q = v / scale;
  if (q != q) return 0;
  // Clamp before the conversion so that no out-of-range float reaches it; rint is monotone and
  // +-127 are integers, so this equals clamp(rint(q)).
  return static_cast<int8_t>(std::nearbyint(std::min(127.0f, std::max(-127.0f, q))));
}

template <DType D>
void quantize_rows_typed(const void* x_ptr, int64_t M, int64_t K, int64_t ldx, int8_t* x_q, float* x_scale) {
  using T = typename ElemTraits<D>::Storage;
  const T* x = static_cast<const T*>(x_ptr);
  parallel_for(0, M, rows_grain(K), [&](int64_t m_begin, int64_t m_end) {
    for (int64_t m = m_begin; m < m_end; ++m) {
      const T* row = x + m * ldx;
      int8_t* q_row = x_q + m * K;
      int64_t k = 0;
      float amax = 0.0f;
      bool has_nan = false;
#if defined(__AVX512F__)
      const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
      __m512 amax_v = _mm512_setzero_ps();
      __mmask16 nan_lanes = 0;
      for (; k + 16 <= K; k += 16) {
        const __m512 v = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(widen_lanes<D>(row + k)), abs_mask));
        nan_lanes |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        amax_v = _mm512_max_ps(amax_v, v);
      }
      amax = _mm512_reduce_max_ps(amax_v);
      has_nan = nan_lanes != 0;
#endif
      for (; k < K; ++k) {
        const float v = std::fabs(ElemTraits<D>::to_float(row[k]));
        has_nan |= v != v;
        amax = std::max(amax, v);
      }
      const float scale = row_scale(amax, has_nan);
      x_scale[m] = scale;
      k = 0;
#if defined(__AVX512F__)
      const __m512 scale_v = _mm512_set1_ps(scale);
      const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
      for (; k + 16 <= K; k += 16) {
        const __m512 q = _mm512_div_ps(widen_lanes<D>(row + k), scale_v);
        const __mmask16 ordered = _mm512_cmp_ps_mask(q, q, _CMP_ORD_Q);
        const __m512 clamped = _mm512_min_ps(hi, _mm512_max_ps(lo, q));
        const __m512i rounded = _mm512_maskz_cvt_roundps_epi32(ordered, clamped,
                                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q_row + k), _mm512_cvtepi32_epi8(rounded));
      }
#endif
      for (; k < K; ++k) q_row[k] = quantize_value(ElemTraits<D>::to_float(row[k]), scale);
    }
  });
}

// Steps of the s8 GEMM, as for the floating GEMM: a step's kept weights fill one register, the
// metadata nibbles become permute indices into the step's X values, and multiply-adds of
// adjacent kept values go into int32 lanes (two a lane, four with VNNI). X is copied as XElem.
// Every ISA's per-lane int32 sums are moved into int64 every kFlushSteps steps (by dot_block), so no
// lane can wrap for any K; the int64 total is saturated to int32 once per output (as .satfinite does).
#if defined(__AVX512VBMI__) && defined(__AVX512VNNI__)
// AVX-512 VNNI + VBMI: a step is 64 kept int8 weights (128 K positions, 16 metadata bytes); one
// vpermt2b gathers their X bytes out of the step's 128 and one vpdpbusd multiplies and adds four
// adjacent pairs into each int32 lane: a third of the instructions per weight byte of the 16-bit
// form (sign extension, vpermt2w, vpmaddwd), which made the int8 decode GEMM compute bound. vpdpbusd
// takes one unsigned operand, so X is stored as x + 128 (x ^ 0x80) and each W row's kept sum,
// accumulated over the same steps (column_madd), takes 128 * sum(w) back off: exact in integers.
struct S8Steps {
  using Storage = int8_t;
  using XElem = uint8_t;  // x + 128
  using Acc = __m512i;    // 16 int32 lanes, each the sum of four products
  using Sum = int64_t;
  struct StepVectors {
    __m512i index;   // 64 x 8-bit: position 0..127 of kept value l among the step's X values
    __m512i weight;  // the 64 kept values
  };
  struct XVectors {
    __m512i low, high;  // the step's 128 X bytes
  };
  static constexpr int kGroups = 32;  // 128 K positions, 16 metadata bytes
  // One step adds at most 4 * 255 * 128 < 2^17 to a lane: 2^13 steps keep a lane below 2^30.
  static constexpr int64_t kFlushSteps = int64_t{1} << 13;
  static constexpr bool kColumnSums = true;

  // Lane l needs bits [2l+1 : 2l] of the 16 metadata bytes, i.e. 16-bit word l / 8: vpermw puts
  // word j at the bottom of qword j, vpmultishiftqb moves bits 2 (l % 8) of it to byte l, and
  // ternlog keeps the 2-bit code and adds (ORs) the group's base 4 (l / 2).
  static __m512i step_index(const uint8_t* meta) {
    alignas(64) static constexpr uint16_t kWordToQword[32] = {0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0,
                                                              4, 0, 0, 0, 5, 0, 0, 0, 6, 0, 0, 0, 7, 0, 0, 0};
    alignas(64) static constexpr uint8_t kGroupBase[64] = {
        0,   0,   4,   4,   8,   8,   12,  12,  16,  16,  20,  20,  24,  24,  28,  28,  32,  32,  36,  36,  40, 40,
        44,  44,  48,  48,  52,  52,  56,  56,  60,  60,  64,  64,  68,  68,  72,  72,  76,  76,  80,  80,  84, 84,
        88,  88,  92,  92,  96,  96,  100, 100, 104, 104, 108, 108, 112, 112, 116, 116, 120, 120, 124, 124};
    const __m512i meta_words =
        _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(meta)));
    const __m512i per_qword = _mm512_permutexvar_epi16(_mm512_load_si512(kWordToQword), meta_words);
    const __m512i shifts = _mm512_set1_epi64(0x0E0C0A0806040200LL);  // bit 2i for byte i of a qword
    const __m512i codes = _mm512_multishift_epi64_epi8(shifts, per_qword);
    // (codes & 3) | base: ternlog truth table 0xEA is (A & B) | C.
    return _mm512_ternarylogic_epi32(codes, _mm512_set1_epi8(3), _mm512_load_si512(kGroupBase), 0xEA);
  }
  static StepVectors load(const int8_t* values, const uint8_t* meta) {
    return {step_index(meta), _mm512_loadu_si512(values)};
  }
  static XVectors load_x_step(const uint8_t* x) { return {_mm512_loadu_si512(x), _mm512_loadu_si512(x + 64)}; }
  static Acc zero() { return _mm512_setzero_si512(); }
  static Acc madd(Acc acc, const StepVectors& step, const XVectors& x) {
    return _mm512_dpbusd_epi32(acc, _mm512_permutex2var_epi8(x.low, step.index, x.high), step.weight);
  }
  static Acc column_madd(Acc acc, const StepVectors& step) {
    return _mm512_dpbusd_epi32(acc, _mm512_set1_epi8(1), step.weight);
  }
  static int64_t correct(int64_t biased_sum, int64_t weight_sum) { return biased_sum - 128 * weight_sum; }
  static int64_t reduce(Acc a) {
    const __m512i low = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(a));
    const __m512i high = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(a, 1));
    return _mm512_reduce_add_epi64(_mm512_add_epi64(low, high));
  }
  // dst[0, padded_len) <- src[0, K) + 128, then 128 (x = 0) in the padding.
  static void copy_x_row(const int8_t* src, int64_t K, uint8_t* dst, int64_t padded_len) {
    int64_t k = 0;
    for (; k + 64 <= K; k += 64)
      _mm512_storeu_si512(dst + k, _mm512_xor_si512(_mm512_loadu_si512(src + k), _mm512_set1_epi8(-128)));
    for (; k < K; ++k) dst[k] = static_cast<uint8_t>(src[k]) ^ 0x80;
    std::fill(dst + K, dst + padded_len, uint8_t{0x80});
  }
};
#elif defined(__AVX2__)
struct S8Steps {
  // X as int32 lanes holding the 16-bit two's complement value in the low half and zero in the
  // high half (weights likewise): vpmaddwd then multiplies the low halves as signed 16-bit numbers
  // and adds 0 * 0 for the high halves, an exact 32-bit product on the fp32 path's vpermps layout.
  using Storage = int8_t;
  using XElem = int32_t;
  using Acc = __m256i;
  using Sum = int64_t;
  struct StepVectors {
    __m256i index;   // 0..7 within the lane's half of the step (as load_step)
    __m256i weight;  // the 8 kept values, low-half encoded
  };
  struct XVectors {
    __m256i low, high;  // the step's 16 X values
  };
  static constexpr int kGroups = 4;  // 16 K positions, 2 metadata bytes
  // One step adds at most 128 * 128 = 2^14 to a lane: 2^16 steps keep a lane below 2^30.
  static constexpr int64_t kFlushSteps = int64_t{1} << 16;
  static constexpr bool kColumnSums = false;

  static StepVectors load(const int8_t* values, const uint8_t* meta) {
    uint16_t codes;
    std::memcpy(&codes, meta, sizeof codes);
    const __m256i shift = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i group_base = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
    const __m256i code = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(codes), shift), _mm256_set1_epi32(3));
    int64_t packed;
    std::memcpy(&packed, values, sizeof packed);
    const __m256i wide = _mm256_cvtepi8_epi32(_mm_cvtsi64_si128(packed));
    return {_mm256_add_epi32(code, group_base), _mm256_and_si256(wide, _mm256_set1_epi32(0xFFFF))};
  }
  static XVectors load_x_step(const int32_t* x) {
    return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 8))};
  }
  static Acc zero() { return _mm256_setzero_si256(); }
  static Acc madd(Acc acc, const StepVectors& step, const XVectors& x) {
    const __m256i from_low = _mm256_permutevar8x32_epi32(x.low, step.index);
    const __m256i from_high = _mm256_permutevar8x32_epi32(x.high, step.index);
    const __m256i kept_x = _mm256_blend_epi32(from_low, from_high, 0xF0);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(kept_x, step.weight));
  }
  static int64_t reduce(Acc a) {
    const __m256i low = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(a));
    const __m256i high = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(a, 1));
    const __m256i sum = _mm256_add_epi64(low, high);
    alignas(32) int64_t lanes[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sum);
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  }
  static void copy_x_row(const int8_t* src, int64_t K, int32_t* dst, int64_t padded_len) {
    for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<uint16_t>(static_cast<int16_t>(src[k]));
    std::fill(dst + K, dst + padded_len, int32_t{0});
  }
};
#else
struct S8Steps {
  using Storage = int8_t;
  using XElem = int16_t;
  using Acc = int64_t;  // scalar: the int64 sum itself, never wraps
  using Sum = int64_t;
  struct StepVectors {
    int index[4];
    int weight[4];
  };
  struct XVectors {
    const int16_t* values;  // the step's 8 X values, read in place
  };
  static constexpr int kGroups = 2;  // one metadata byte: 8 K positions
  static constexpr int64_t kFlushSteps = kNeverFlush;
  static constexpr bool kColumnSums = false;

  static StepVectors load(const int8_t* values, const uint8_t* meta) {
    StepVectors step;
    for (int l = 0; l < 4; ++l) {
      step.index[l] = ((meta[0] >> (2 * l)) & 3) + 4 * (l / 2);
      step.weight[l] = values[l];
    }
    return step;
  }
  static XVectors load_x_step(const int16_t* x) { return {x}; }
  static Acc zero() { return 0; }
  static Acc madd(Acc acc, const StepVectors& step, const XVectors& x) {
    int32_t sum = 0;  // four products of at most 2^14 each
    for (int l = 0; l < 4; ++l) sum += step.weight[l] * x.values[step.index[l]];
    return acc + sum;
  }
  static int64_t reduce(Acc a) { return a; }
  static void copy_x_row(const int8_t* src, int64_t K, int16_t* dst, int64_t padded_len) {
    std::copy(src, src + K, dst);
    std::fill(dst + K, dst + padded_len, int16_t{0});
  }
};
#endif

// The contract's epilogue up to the activation: y = ((float)sat32(acc) * w_scale) * x_scale,
// + bias, in fp32 (sparse_gemm_activated applies the activation and rounds once to the output
// dtype). `scaled` is volatile so that the compiler cannot contract the product and the bias
// addition into an FMA (the CUDA kernel uses __fmul_rn / __fadd_rn).
inline float s8_pre_activation(int64_t acc, float w_scale, float x_scale, const float* bias) {
  const int64_t sat = std::min<int64_t>(std::numeric_limits<int32_t>::max(),
                                        std::max<int64_t>(std::numeric_limits<int32_t>::min(), acc));
  volatile float scaled = (static_cast<float>(static_cast<int32_t>(sat)) * w_scale) * x_scale;
  float y = scaled;
  if (bias != nullptr) y = y + *bias;
  return y;
}

// Y[M, N] (dtype D) = epilogue(X_q[M, K] @ Wq[N, K]^T): p.x is int8 with row stride p.ldx, p.values
// int8 [N, padded_k(K)/2], p.meta logical, p.bias D or null, p.w_scale [N], p.x_scale [M].
template <DType D>
void gemm_s8_typed(const GemmParams& p) {
  sparse_gemm_activated<S8Steps, D>(p, [&p](int64_t acc, int64_t m, int64_t n, const float* bias) {
    return s8_pre_activation(acc, p.w_scale[n], p.x_scale[m], bias);
  });
}

// gemm_s8_typed's epilogue on the given int32 sums (cpu_ops.h s8_epilogue), row by row, in the
// order of operations of sparse_gemm_activated: one rounding to D after the (gated) activation.
template <DType D>
void s8_epilogue_typed(const GemmParams& p, const int32_t* acc, int64_t ld_acc) {
  using T = typename ElemTraits<D>::Storage;
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const Activation act = p.act;
  parallel_for(0, p.M, rows_grain(p.N), [&](int64_t m_begin, int64_t m_end) {
    for (int64_t m = m_begin; m < m_end; ++m) {
      const int32_t* sums = acc + m * ld_acc;
      auto pre_activation = [&](int64_t n) {
        const float bias_n = bias != nullptr ? ElemTraits<D>::to_float(bias[n]) : 0.0f;
        return s8_pre_activation(sums[n], p.w_scale[n], p.x_scale[m], bias != nullptr ? &bias_n : nullptr);
      };
      T* y_row = y + m * p.ldy;
      if (!p.gated) {
        for (int64_t n = 0; n < p.N; ++n) y_row[n] = ElemTraits<D>::from_float(apply_activation(pre_activation(n), act));
        continue;
      }
      for (int64_t j = 0; j < p.N / 2; ++j) {
        const int64_t gate = j / kGateRows * (2 * kGateRows) + j % kGateRows;
        y_row[j] = ElemTraits<D>::from_float(apply_activation(pre_activation(gate), act) * pre_activation(gate + kGateRows));
      }
    }
  });
}

void mask_2to4(DType dtype, const void* w, int64_t N, int64_t K, int64_t ldw, uint8_t* mask) {
  with_dtype(dtype, [&](auto d) { mask_typed<decltype(d)::value>(w, N, K, ldw, mask); });
}

void compress(const CompressParams& p) {
  with_dtype(p.dtype, [&](auto d) { compress_typed<decltype(d)::value>(p); });
}

void decompress(const DecompressParams& p) {
  if (p.dtype == DType::i8) return decompress_typed<int8_t>(p);
  with_dtype(p.dtype, [&](auto d) { decompress_typed<typename ElemTraits<decltype(d)::value>::Storage>(p); });
}

void gemm(const GemmParams& p) {
  with_dtype(p.dtype, [&](auto d) { gemm_typed<decltype(d)::value>(p); });
}

void quantize_rows(DType in_dtype, const void* x, int64_t M, int64_t K, int64_t ldx, int8_t* x_q, float* x_scale) {
  with_dtype(in_dtype, [&](auto d) { quantize_rows_typed<decltype(d)::value>(x, M, K, ldx, x_q, x_scale); });
}

void gemm_s8(const GemmParams& p) {
  with_dtype(p.dtype, [&](auto d) { gemm_s8_typed<decltype(d)::value>(p); });
}

void s8_epilogue(const GemmParams& p, const int32_t* acc, int64_t ld_acc) {
  with_dtype(p.dtype, [&](auto d) { s8_epilogue_typed<decltype(d)::value>(p, acc, ld_acc); });
}

}  // namespace

const KernelTable& kernel_table() {
  static const KernelTable table{SG_STRINGIFY(SPARSEGEMM_CPU_ISA), &mask_2to4, &compress, &decompress, &gemm,
                                 &quantize_rows, &gemm_s8, &s8_epilogue};
  return table;
}

}  // namespace SPARSEGEMM_CPU_ISA
}  // namespace cpu
}  // namespace sparsegemm
