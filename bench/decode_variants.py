"""Patch candidate decode tiles into THIS checkout as forced GEMM configs 2-7, for
bench/decode_sweep.py --configs 1 2 3 4 5 6 7 (then rebuild). A tuning aid: run it in a scratch
copy (e.g. on a GPU machine) and never commit what it writes.

    2  64 x 16, 4 warps, two k-tiles a stage, 4 stages    (the decode tile before the H200 sweep)
    3  64 x 16, 4 warps, one k-tile a stage, 6 stages     (the first decode tile)
    4  64 x 16, 4 warps, four k-tiles a stage, 3 stages
    5  64 x 16, 4 warps, two k-tiles a stage, 6 stages
    6  32 x 16, 2 warps, four k-tiles a stage, 4 stages
    7  64 x 16, 4 warps, two k-tiles a stage, 5 stages, Wc copies with the L2::256B prefetch hint
"""
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
TILES = {
    2: ("Decode64", "64, kBlockM = 16, kWarpsN = 4, kWarpsM = 1, kStages = 4, kKTilesPerStage = 2"),
    3: ("Decode64S1", "64, kBlockM = 16, kWarpsN = 4, kWarpsM = 1, kStages = 6, kKTilesPerStage = 1"),
    4: ("Decode64S4", "64, kBlockM = 16, kWarpsN = 4, kWarpsM = 1, kStages = 3, kKTilesPerStage = 4"),
    5: ("Decode64x6", "64, kBlockM = 16, kWarpsN = 4, kWarpsM = 1, kStages = 6, kKTilesPerStage = 2"),
    6: ("Decode32", "32, kBlockM = 16, kWarpsN = 2, kWarpsM = 1, kStages = 4, kKTilesPerStage = 4"),
    7: ("Decode64Prefetch", "64, kBlockM = 16, kWarpsN = 4, kWarpsM = 1, kStages = 5, kKTilesPerStage = 2"),
}
PREFETCH_STAGES = 5  # config 7 is the only tile with 5 stages: it alone takes the prefetching copy


def patch(path: str, anchor: str, text: str, before: bool = True) -> None:
    file = ROOT / path
    source = file.read_text()
    if anchor not in source:
        raise SystemExit(f"decode_variants: {path} no longer contains {anchor!r}; update this script")
    file.write_text(source.replace(anchor, text + anchor if before else anchor + text, 1))


def main() -> None:
    patch("csrc/cuda/gemm_heuristics.h", "constexpr int kBlockK = 64;", "".join(
        f"struct {name} {{ static constexpr int kBlockN = {fields}; }};\n" for name, fields in TILES.values()))
    patch("csrc/cuda/kernels_dispatch.cuh", "  if (plan.config == GemmConfig::decode) {", "".join(
        f"  if (int(plan.config) == {config}) {{ launch_gemm<Policy, gemm_tiles::{name}, XLoader>(params, plan, stream); "
        "return; }\n" for config, (name, _) in TILES.items()))
    patch("csrc/cuda/arch/warp_ops.cuh", "// cp.async.commit_group: closes", """\
SG_DEVICE void cp_async_16_prefetch256(void* smem_dst, const void* gmem_src, bool pred) {
#if defined(__CUDACC__)
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\\n" ::"r"(dst), "l"(gmem_src),
               "r"(pred ? 16 : 0) : "memory");
#else
  emu::cp_async_16(smem_dst, gmem_src, pred);
#endif
}

""")
    patch("csrc/cuda/gemm_sp.cuh",
          "      copy_chunk(sA + r * S::kRowBytesA + ((chunk ^ ((r >> 1) & 3)) << 4), row_ok ? values + n * Kc + col : values,",
          f"""\
      if constexpr (S::kStages == {PREFETCH_STAGES}) {{
        if (a_vector_ok) {{
          cp_async_16_prefetch256(sA + r * S::kRowBytesA + ((chunk ^ ((r >> 1) & 3)) << 4),
                                  row_ok ? values + n * Kc + col : values, row_ok && Kc - col > 0);
          continue;
        }}
      }}
""")
    print("decode variants patched in as configs", ", ".join(map(str, TILES)))


if __name__ == "__main__":
    main()
