// The one place that picks a tile configuration (and the split-K factor) for the sparse GEMM.
// Host code, but for gemm_k_tiles and raster_output_tile, which the kernel calls too; gemm_sp.cuh
// takes the chosen tile as a template parameter.
#pragma once
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../format.h"

namespace sparsegemm {
namespace gemm_tiles {

// Block tile shapes. N is the MMA's M (rows of W, the sparse A operand), M is the MMA's N (rows
// of X). The 16-bit GEMM uses a 64-wide logical k-tile, the int8 GEMM a 128-wide one: both are
// 128 bytes of an X row and 64 bytes of a Wc row, so one shared-memory layout serves both (kernel
// metadata is padded to the k-tile: reorder.cuh). The same two tiles serve both GEMMs.
// Each warp computes (kBlockN / kWarpsN) x (kBlockM / kWarpsM) of the output.

// Prefill / large M: compute bound, 8 warps of 64 (N) x 32 (M), 3 stages (75 KiB of shared memory,
// 78 KiB for int8). ptxas (nvcc 13.0): 118-123 registers on sm_90a (tests/test_sass.py holds it at
// <= 128), so two blocks per SM fit on H100, and 109-118 on sm_80 (159 before the metadata copies
// got their source set up once, gemm_sp.cuh), so two fit on A100 too (not measured there); no
// spills. The implicit-GEMM convolution runs the same plan with its NHWC loader (conv_sp.cuh). No
// split-K: a large-M grid fills the GPU by itself, and compiling the split-K tail into this tile
// took ptxas to 165 registers on sm_90. kMinBlocksPerSm 0: no minimum in the launch bounds, ptxas's
// own budget (that gives the counts above; a minimum of 1 took it to 170-182 registers, 2 made it
// spill).
struct LargeM {
  static constexpr int kBlockN = 128, kBlockM = 128, kWarpsN = 2, kWarpsM = 4, kStages = 3, kKTilesPerStage = 1;
  static constexpr bool kSplitK = false;
  static constexpr int kMinBlocksPerSm = 0;
  static constexpr bool kWgmma = false;
};

// Decode, M <= 16 (and the mid-size M where plan_gemm finds it faster than the wgmma tile,
// kMidMDecodeCostPerWgmmaKTile): memory bound on Wc. 8 warps of 16 (N) x 16 (M), four stages of
// two k-tiles each: a stage reads 128-byte runs of 128 Wc rows (whole L2 lines; 64-byte runs were
// 2-14% slower), 88 KiB of shared memory in all (96 KiB for int8). Split-K over blocks fills the GPU when N alone
// cannot (with WgmmaSplitK below, the tiles with kSplitK: gemm_sp.cuh compiles the split-K tail for
// them alone). Launch bounds of two blocks per SM, what its shared memory allows on H100 / H200:
// 60-67 registers on sm_90a, 58-68 on sm_80; without a stated minimum ptxas once held it to 64 and
// the convolution spilled on sm_80. Chosen by a sweep on H200
// (bench/results/2026-11-26-H200-run5/sweep.txt, config 5): 3-7% faster than 4 warps x 64 rows,
// which beat 6 stages, 4 k-tiles per stage, 32-row blocks and an L2 prefetch hint on the weight
// copies.
struct Decode {
  static constexpr int kBlockN = 128, kBlockM = 16, kWarpsN = 8, kWarpsM = 1, kStages = 4, kKTilesPerStage = 2;
  static constexpr bool kSplitK = true;
  static constexpr int kMinBlocksPerSm = 2;
  static constexpr bool kWgmma = false;
};

// Mid-size M (tuning: forced as GemmConfig::mid_m only, until a GPU has timed it against the decode
// and wgmma tiles: bench/mid_m_sweep.py "c7"; refused where a block may not have its shared memory,
// kernels_dispatch.cuh plan_device_gemm): the decode tile's way of streaming W (two k-tiles a
// stage, 128-byte runs of each Wc row, K split over blocks until one wave is full) for 64 X rows a
// block instead of 16. Why: above 16 rows the decode tile streams all of W once per 16 rows (at
// 4096 x 4096 on the H200: 12.4 us at M = 16, 24.7 us at 64, 36.1 us at 128, against dense cuBLAS's
// 12.2-14.1 us), and the wgmma tile, with 128 X rows a block, leaves most SMs idle there (43.8 us at
// every M from 16 to 256; bench/results/2026-11-27-H200-run22/mid_m.txt). 8 warps of 64 (N) x 16
// (M): per k-step each warp reads 4 A and 2 B fragments (3 KiB of shared memory) for 8 mma.sp,
// where 16 x 64 warps would read 4.5 KiB. 125-128 registers, no spills (ptxas, nvcc 13.0, sm_80
// and sm_90a), with its split-K tail summing two of a warp's four A tiles at a time (gemm_sp.cuh;
// all four at once, or 32 x 32 warps, spilled). Three stages of two k-tiles: 102 KiB of shared
// memory (108 KiB for int8), two blocks an SM on H100 / H200 like the decode tile, one on A100.
struct MidM {
  static constexpr int kBlockN = 128, kBlockM = 64, kWarpsN = 2, kWarpsM = 4, kStages = 3, kKTilesPerStage = 2;
  static constexpr bool kSplitK = true;
  static constexpr int kMinBlocksPerSm = 2;
  static constexpr bool kWgmma = false;
};
static_assert(MidM::kKTilesPerStage == Decode::kKTilesPerStage,
              "plan_gemm sizes both tiles' K splits in whole stages of the decode tile");

// Large M on sm_90a (H100 / H200), where dense cuBLAS runs on wgmma and warp-level mma.sp tops
// out near half of it (PTX_SPARSE.md): LargeM's block tile and shared-memory layout, computed by
// two warpgroups with wgmma.mma_async.sp m64n128 (warpgroup w: W rows 64w .. 64w + 63 against all
// 128 X rows; each warp's A fragment from ldmatrix as in the other tiles, B read by the tensor
// cores straight from the swizzled stage). 4 stages of 25 KiB (26 KiB for int8; k-tiles are whole
// 1024-byte swizzle atoms): two blocks per SM take 2 x (100 or 104 + 1 reserved) KiB of H100's
// 228 KiB, hence the 128-register launch bound (ptxas, nvcc 13.0: 125-128, no spills).
// H200 (bench/results/2026-11-26-H200-run16, -run17): 0.78-0.83x dense cuBLAS fp16 at 8192^3 and
// Llama shapes with 32768 rows, 1.1-1.4x in INT8 (the warp-level tile: 0.47-0.58x fp16). Keeping
// one k-tile's wgmma ops in flight through the next barrier (one stage less ahead) measured within
// 6% either way. Nsight Compute: tensor pipe 35% busy, issue slots 44% and shared memory 62%,
// taken by every thread's stage copies and a barrier per k-tile. GemmConfig::large_m_wgmma_tma runs
// this tile with TMA copies and mbarrier stages instead, A read from shared memory by the wgmma
// ops (the SS form) and one k-tile in flight (gemm_sp.cuh TmaRowMajorX): 92 registers (116 for
// int8) on sm_90a, 0.79-0.96x dense cuBLAS fp16 / bf16 and 1.42-1.69x in INT8 on the H200
// (-run20), where the GEMM takes it in this tile's place (kernels_dispatch.cuh tma_pipeline_opt_in).
struct WgmmaLargeM {
  static constexpr int kBlockN = 128, kBlockM = 128, kWarpsN = 8, kWarpsM = 1, kStages = 4, kKTilesPerStage = 1;
  static constexpr bool kSplitK = false;
  static constexpr int kMinBlocksPerSm = 2;
  static constexpr bool kWgmma = true;
};

// The TMA pipeline's wide variant of WgmmaLargeM (GemmConfig::large_m_wgmma_tma_wide): 256 W rows
// x 128 X rows, four warpgroups (warpgroup w: W rows 64w .. 64w + 63), one block per SM (16 warps,
// as two WgmmaLargeM blocks). Why: W is compressed, so a k-tile of 256 W rows and 128 X rows is 34
// KiB of TMA copies for twice the multiply-adds of the 128 x 128 tile's 25 KiB: a third fewer
// bytes through L2 and into shared memory per multiply-add (at the sparse tensor cores' rate the
// 128 x 128 tile needs ~49 bytes a cycle per SM for its copies alone, besides the ~64 its wgmma
// ops read of B). 4 stages of 34 KiB (the SIMT emulator holds a block to A100's 163 KiB); 128
// registers at most with 512 threads (ptxas: as config 3). Not chosen: on the H200 it ran 0.74-0.94x
// dense cuBLAS fp16, slower than config 3 (bench/results/2026-11-27-H200-run20; SPARSEGEMM_TMA=wide
// opts large M into it).
struct WgmmaWideLargeM {
  static constexpr int kBlockN = 256, kBlockM = 128, kWarpsN = 16, kWarpsM = 1, kStages = 4, kKTilesPerStage = 1;
  static constexpr bool kSplitK = false;
  static constexpr int kMinBlocksPerSm = 1;
  static constexpr bool kWgmma = true;
};

// WgmmaLargeM with K split over blocks (GemmConfig::large_m_wgmma_tma_split, fed by TMA; the 16-bit
// GEMM only), for mid-size M, where the 128 x 128 tiles alone leave SMs idle: 4096 x 4096 at M = 256
// is 64 tiles for an H200's 132 SMs, each through all of K (0.38-0.40x cuBLAS there, -run21
// bench.md). Each split's block stores its fp32 partial sums, and the tile's last block to arrive
// sums them in split order and runs the epilogue, as the decode tile does. Not chosen by plan_gemm
// yet: no GPU has timed it (bench/mid_m_sweep.py, "c6").
struct WgmmaSplitK : WgmmaLargeM {
  static constexpr bool kSplitK = true;
};

constexpr int kBlockK = 64;           // logical K per k-tile of the 16-bit GEMM
constexpr int kBlockKS8 = 128;        // logical K per k-tile of the int8 GEMM (same bytes)
constexpr int kMaxSplitK = 16;
constexpr int kMinKTilesPerSplit = 4; // keeps the pipeline prologue small next to the main loop

}  // namespace gemm_tiles

// large_m_wgmma_tma / decode_tma: the wgmma / decode tile with its stages copied by TMA (gemm_sp.cuh
// TmaRowMajorX), for GEMMs whose X and Wc rows are 16-byte aligned, on the GPUs that run the wgmma
// tile. plan_gemm plans large_m_wgmma and decode; the launch runs large_m_wgmma's GEMMs through
// large_m_wgmma_tma where the operands allow (faster on the H200), and keeps decode's cp.async
// pipeline (decode_tma ran 3-17% slower): kernels_dispatch.cuh tma_pipeline_opt_in.
// large_m_wgmma_tma_wide: gemm_tiles::WgmmaWideLargeM through the same TMA pipeline.
// large_m_wgmma_tma_split: gemm_tiles::WgmmaSplitK through the same TMA pipeline (only when asked).
// mid_m: gemm_tiles::MidM, fed by cp.async (only when asked).
enum class GemmConfig : int {
  large_m = 0,
  decode = 1,
  large_m_wgmma = 2,
  large_m_wgmma_tma = 3,
  decode_tma = 4,
  large_m_wgmma_tma_wide = 5,
  large_m_wgmma_tma_split = 6,
  mid_m = 7
};

// Whether `config` runs the decode tile (gemm_tiles::Decode).
constexpr bool is_decode(GemmConfig config) { return config == GemmConfig::decode || config == GemmConfig::decode_tma; }

// Whether `config` streams W the decode tile's way, its K split sized by best_decode_split: the
// decode tile and gemm_tiles::MidM.
constexpr bool streams_weights(GemmConfig config) { return is_decode(config) || config == GemmConfig::mid_m; }

// Whether `config`'s tile splits K over blocks: the decode and mid-M tiles and gemm_tiles::WgmmaSplitK.
constexpr bool splits_k(GemmConfig config) {
  return streams_weights(config) || config == GemmConfig::large_m_wgmma_tma_split;
}

// Whether `config` needs sm_90a machine code on a compute capability 9.0 GPU (the wgmma tiles and
// the TMA pipelines: configs 2 to 6).
constexpr bool needs_sm90a(GemmConfig config) {
  return config >= GemmConfig::large_m_wgmma && config <= GemmConfig::large_m_wgmma_tma_split;
}

// Output tiles of `Tile` over Y[M, N].
template <typename Tile>
constexpr int64_t tile_count(int64_t M, int64_t N) {
  return (M + Tile::kBlockM - 1) / Tile::kBlockM * ((N + Tile::kBlockN - 1) / Tile::kBlockN);
}

// What gemm() launches: the tile, the number of K splits (1: no workspace) and k-tiles per split.
struct GemmPlan {
  GemmConfig config = GemmConfig::large_m;
  int split_k = 1;
  int64_t k_tiles_per_split = 0;
};

// Which output tile GEMM block (block_x, block_y) computes, in a grid of tiles_m x tiles_n tiles
// (M tiles along blockIdx.x, N tiles along blockIdx.y; the GPU hands out blocks in the order
// block_y * tiles_m + block_x). Blocks run in bands of kRasterBandN N tiles, N tile fastest, then
// the next M tile. Why: in plain grid order the ~264 blocks resident at once on an H100 / H200
// (two an SM) share one or two N tiles and span every M tile, so each wave streams all of X from
// DRAM: at 32768 x 4096 x 11008, X's 721 MB once per 128 W rows. In bands a wave covers ~16 N x
// 16 M tiles, reading each X tile for 16 W tiles while both are in L2. H200, wgmma tile, against
// the plain order (bench/results/2026-11-26-H200-run17): 32768 x 4096 x 11008 fp16 7.89 -> 5.36
// ms, 32768 x 11008 x 4096 6.49 -> 5.43 ms, INT8 4.03 -> 3.49 and 3.78 -> 3.18 ms; 8192^3 within
// noise; the warp-level tile 9.2 -> 8.0 ms on both tall shapes. With one M tile (decode) the order
// is the plain one: block b computes N tile b.
// 32-bit arithmetic (64-bit divisions made the wgmma convolution spill on sm_90a): band-local
// indices stay below 16 tiles_m <= 2^28, as M < 2^31 (ops.py refuses larger).
constexpr uint32_t kRasterBandN = 16;
struct OutputTile {
  uint32_t m, n;
};
SG_HOST_DEVICE OutputTile raster_output_tile(uint32_t block_x, uint32_t block_y, uint32_t tiles_m, uint32_t tiles_n) {
  const uint32_t first_n = block_y / kRasterBandN * kRasterBandN;
  const uint32_t band_n = tiles_n - first_n < kRasterBandN ? tiles_n - first_n : kRasterBandN;  // the last is partial
  const uint32_t local = (block_y - first_n) * tiles_m + block_x;  // block index within the band
  return OutputTile{local / band_n, first_n + local % band_n};
}

// k-tiles of `block_k` logical K covering padded_k(K).
SG_HOST_DEVICE int64_t gemm_k_tiles(int64_t K, int64_t block_k = gemm_tiles::kBlockK) {
  return (padded_k(K) + block_k - 1) / block_k;
}

// The GPU as the decode split-K sees it: SMs, and decode-tile blocks one SM holds at once.
struct DecodeWave {
  int sms = 1;
  int blocks_per_sm = 1;
};

// How much faster an SM streams its k-tiles with two decode blocks than with one, per GEMM: the
// 16-bit tile 1.1x, the INT8 one not at all. H200, graph replay from DRAM, after dependent launches
// (bench/results/2026-11-26-H200-run16 and -run17, sweep.txt, both runs alike): fp16 1 x 4096 x
// 11008 19.0 us with 8 splits (256 blocks, two an SM) against 21 us with 4 (one an SM), 8192 x 8192
// 24.3-24.4 us with 4 against 26 us with 2 at M = 1 and 25.5 against 27.5 at M = 16, where INT8
// 16 x 4096 x 11008 took 19.9 us with 8 splits and 15.9 us with 4.
constexpr double kPairedDecodeSpeedup16 = 1.1;
constexpr double kPairedDecodeSpeedupS8 = 1.0;

// Cost of the decode tile's `blocks` output tiles with `splits` K splits, in half k-tiles: the
// k-tiles the busiest SM streams (blocks spread evenly, each split a whole number of pipeline
// stages), divided by paired_speedup when that SM holds more than one block, plus, when K is
// split, half a k-tile per row of M (each split stores M x 128 partial sums that the tile's last
// block reads back after everyone else). The decode GEMM is bound by the weight bytes the SMs
// stream, so the busiest one sets the time. -1: more blocks than one wave holds (a second, partial
// wave costs more than the split saves: on H200 258 blocks in one wave took 21 us, 344 in 1.3
// waves 26 us).
// Fitted on H200 (-run8, sweep_acq_rel_ticket.txt; -run16 / -run17, sweep.txt): over 8 decode
// shapes x fp16 / INT8 it picks the fastest measured split, or one within 2% of it, in 13 of 16,
// where "as many splits as one wave holds" lost up to 4.6 us (INT8 16 x 4096 x 11008: 8 splits
// 21.2 us, 4 splits 16.6 us in -run8). Missed: INT8 1 x 8192 x 8192 (2 splits 16.6 us, 4 splits
// 16.1-16.3 us) and fp16 16 x 22016 x 4096 (1 split 36.5 us, 3 splits 34.6 us: 516 blocks, two
// waves, which this rule never takes); fp16 1 x 22016 x 4096 is a toss-up between the runs (1
// split 34.7 / 32.4 us, 3 splits 32.2 / 33 us).
inline double decode_split_cost(int64_t M, int64_t blocks, int64_t k_tiles, int64_t splits, DecodeWave wave,
                                double paired_speedup) {
  constexpr int64_t kStage = gemm_tiles::Decode::kKTilesPerStage;
  const int64_t per_split = ((k_tiles + splits - 1) / splits + kStage - 1) / kStage * kStage;
  const int64_t used = (k_tiles + per_split - 1) / per_split;
  if (used > 1 && blocks * used > int64_t(wave.sms) * wave.blocks_per_sm) return -1;
  const int64_t busiest_sm_blocks = (blocks * used + wave.sms - 1) / wave.sms;
  const double rate = busiest_sm_blocks > 1 ? paired_speedup : 1.0;
  return double(2 * busiest_sm_blocks * per_split) / rate + double(used > 1 ? M : 0);
}

// The decode tile's K split for `blocks` output tiles (ties keep the fewer splits) and its cost
// (decode_split_cost; one split always has one).
struct DecodeSplit {
  int64_t splits = 1;
  double cost = 0;
};
inline DecodeSplit best_decode_split(int64_t M, int64_t blocks, int64_t k_tiles, DecodeWave wave, double paired) {
  const int64_t most = std::min<int64_t>(gemm_tiles::kMaxSplitK, k_tiles / gemm_tiles::kMinKTilesPerSplit);
  DecodeSplit best{1, decode_split_cost(M, blocks, k_tiles, 1, wave, paired)};
  for (int64_t candidate = 2; candidate <= most; ++candidate) {
    const double cost = decode_split_cost(M, blocks, k_tiles, candidate, wave, paired);
    if (cost >= 0 && cost < best.cost) best = DecodeSplit{candidate, cost};
  }
  return best;
}

// Mid-size M (more than 16 rows: batched decode, short prefill), 16-bit GEMM, on a GPU that runs
// the wgmma tile: the decode tile (16 X rows a block, weights re-streamed for each 16 rows) while
// its decode_split_cost, in half k-tiles, stays below this many times the k-tiles the wgmma tile's
// busiest SM runs through (its waves x K's k-tiles). Why: at a few M tiles the wgmma tile is bound
// by each k-tile's latency, not by the tensor cores: on the H200 it took 0.60-0.88 us a k-tile
// with one or two blocks an SM, and 44 us at 4096 x 4096 for every M from 16 to 256, where the
// decode tile took 0.15-0.20 us per unit of its cost. H200, graph replay from DRAM
// (bench/results/2026-11-27-H200-run22/mid_m.txt): the decode tile won every case up to a ratio
// of 3.6 (M = 32: 14.5 against 43.8 us at 4096 x 4096, 29.1 against 103.3 at 4096 x 11008; M = 128
// at 4096 x 4096: 36.1 against 44.2) and lost every case from 5.5 on (11008 x 4096 at M = 64: 70.8
// against 53.5). Applied where that sweep measured, N and K of 4096 and more: not to narrower
// layers or the convolutions' implicit GEMMs (e.g. 392 x 512 x 4608), nor to the int8 GEMM or GPUs
// without wgmma; none of those has been timed.
constexpr double kMidMDecodeCostPerWgmmaKTile = 4.5;
constexpr int64_t kMidMDecodeLeastSide = 4096;

// wave: the GPU (kernels_dispatch.cuh decode_wave); wgmma: whether it runs the wgmma tile
// (kernels_dispatch.cuh wgmma_tile_runs), which then takes the M above 16 that the decode tile
// does not (kMidMDecodeCostPerWgmmaKTile).
// forced_config / forced_split_k: GemmParams::config / split_k (-1 / 0: choose). block_k: the
// GEMM's k-tile (gemm_tiles::kBlockK or kBlockKS8, which also picks the paired-block speedup).
// busy_layers: GEMMs of this shape that run at once and have work (a grouped launch's groups with
// rows; 1 for one GEMM): their blocks share the wave the split is sized for.
inline GemmPlan plan_gemm(int64_t M, int64_t N, int64_t K, DecodeWave wave, int forced_config = -1,
                          int forced_split_k = 0, int64_t block_k = gemm_tiles::kBlockK, bool wgmma = false,
                          int64_t busy_layers = 1) {
  if (forced_config < -1 || forced_config > static_cast<int>(GemmConfig::mid_m)) {
    throw std::invalid_argument("sparsegemm gemm: config must be -1 (choose), 0 (large M), 1 (decode), 2 "
                                "(large M, wgmma), 3 (large M, wgmma fed by TMA), 4 (decode fed by TMA), 5 "
                                "(large M, 256-row wgmma tile fed by TMA), 6 (wgmma fed by TMA, K split) or 7 "
                                "(mid-size M, 64 rows a block), got " + std::to_string(forced_config));
  }
  if (forced_config == static_cast<int>(GemmConfig::large_m_wgmma_tma_split) && block_k != gemm_tiles::kBlockK) {
    // Its int64 split sums (MmaS8::PartialSum) beside the wgmma accumulators would not fit the
    // tile's 128 registers.
    throw std::invalid_argument("sparsegemm gemm: config 6 (the wgmma tile with K split) serves the fp16 / bf16 "
                                "GEMM, not the int8 one");
  }
  GemmPlan plan;
  const int64_t k_tiles = gemm_k_tiles(K, block_k);
  const double paired = block_k == gemm_tiles::kBlockKS8 ? kPairedDecodeSpeedupS8 : kPairedDecodeSpeedup16;
  const int64_t decode_blocks = tile_count<gemm_tiles::Decode>(M, N) * busy_layers;
  // A forced mid-M tile's K split: the decode rule over its own (4x fewer at 64 rows) blocks.
  const int64_t streaming_blocks =
      forced_config == static_cast<int>(GemmConfig::mid_m) ? tile_count<gemm_tiles::MidM>(M, N) * busy_layers
                                                            : decode_blocks;
  if (forced_config >= 0) {
    plan.config = static_cast<GemmConfig>(forced_config);
  } else if (M <= 16) {
    plan.config = GemmConfig::decode;
  } else if (wgmma && block_k == gemm_tiles::kBlockK && N >= kMidMDecodeLeastSide && K >= kMidMDecodeLeastSide) {
    const int64_t wgmma_blocks = tile_count<gemm_tiles::WgmmaLargeM>(M, N) * busy_layers;
    const int64_t wave_blocks = int64_t(wave.sms) * wave.blocks_per_sm;
    const int64_t wgmma_k_tiles = (wgmma_blocks + wave_blocks - 1) / wave_blocks * k_tiles;
    const double decode_cost = best_decode_split(M, decode_blocks, k_tiles, wave, paired).cost;
    plan.config = decode_cost < kMidMDecodeCostPerWgmmaKTile * double(wgmma_k_tiles) ? GemmConfig::decode
                                                                                     : GemmConfig::large_m_wgmma;
  } else {
    plan.config = wgmma ? GemmConfig::large_m_wgmma : GemmConfig::large_m;
  }
  int64_t splits = 1;
  if (forced_split_k > gemm_tiles::kMaxSplitK) {
    // A tile counter counts its arrivals in 8 bits (gemm_sp.cuh arrived_last).
    throw std::invalid_argument("sparsegemm gemm: split_k must be at most " + std::to_string(gemm_tiles::kMaxSplitK) +
                                ", got " + std::to_string(forced_split_k));
  }
  if (forced_split_k > 1 && !splits_k(plan.config)) {
    throw std::invalid_argument("sparsegemm gemm: split_k = " + std::to_string(forced_split_k) +
                                " needs the decode tile (config 1 or 4), config 6 or config 7; the other large-M "
                                "tiles do not split K");
  }
  if (forced_split_k > 0) {
    splits = forced_split_k;
  } else if (plan.config == GemmConfig::large_m_wgmma_tma_split && k_tiles > 0) {
    // As many splits as keep every tile's blocks within one wave (wave.blocks_per_sm: the decode
    // tile's, two on H100 / H200, as many as the wgmma tile's launch bound asks), and no more than
    // k-tiles / kMinKTilesPerSplit (the last split may hold fewer).
    const int64_t tiles = tile_count<gemm_tiles::WgmmaSplitK>(M, N) * busy_layers;
    const int64_t most = std::min<int64_t>(gemm_tiles::kMaxSplitK, k_tiles / gemm_tiles::kMinKTilesPerSplit);
    splits = std::max<int64_t>(1, std::min<int64_t>(most, int64_t(wave.sms) * wave.blocks_per_sm / tiles));
  } else if (streams_weights(plan.config) && k_tiles > 0) {
    splits = best_decode_split(M, streaming_blocks, k_tiles, wave, paired).splits;
  }
  splits = std::max<int64_t>(1, std::min(splits, std::max<int64_t>(k_tiles, 1)));
  plan.k_tiles_per_split = (k_tiles + splits - 1) / splits;
  if (streams_weights(plan.config) && forced_split_k <= 0) {
    // Whole pipeline stages per split, so that only the last split can end on a half-used stage.
    constexpr int64_t kStage = gemm_tiles::Decode::kKTilesPerStage;
    plan.k_tiles_per_split = (plan.k_tiles_per_split + kStage - 1) / kStage * kStage;
  }
  // Re-derive the count so that no split is empty (e.g. 10 tiles over 4 splits -> 3 x 4 tiles).
  plan.split_k = plan.k_tiles_per_split > 0 ? static_cast<int>((k_tiles + plan.k_tiles_per_split - 1) / plan.k_tiles_per_split) : 1;
  return plan;
}

// Split-K partial sums: fp32 (16-bit GEMM) or int32 (int8 GEMM), 4 bytes either way.
inline int64_t gemm_plan_workspace_bytes(const GemmPlan& plan, int64_t M, int64_t N) {
  return plan.split_k > 1 ? int64_t(plan.split_k) * M * N * 4 : 0;
}

// Split-K arrival counters: one uint64 word per output tile (M tiles x N tiles of the tile that
// splits), 0 when the plan does not split. Any contents at launch (gemm_sp.cuh arrived_last), so
// one buffer serves every launch that runs after it in order, and a fresh one needs no fill.
inline int64_t gemm_plan_tile_counters(const GemmPlan& plan, int64_t M, int64_t N) {
  if (plan.split_k <= 1) return 0;
  if (is_decode(plan.config)) return tile_count<gemm_tiles::Decode>(M, N);
  if (plan.config == GemmConfig::mid_m) return tile_count<gemm_tiles::MidM>(M, N);
  return tile_count<gemm_tiles::WgmmaSplitK>(M, N);
}

}  // namespace sparsegemm
