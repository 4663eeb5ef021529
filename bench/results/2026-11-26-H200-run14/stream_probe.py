"""Read bandwidth of the decode tile's access pattern, without the GEMM: blocks of 256 threads
stream R rows x B bytes per pipeline stage (cp.async.cg 16 B, S stages, two blocks an SM, a
persistent grid with the same number of units per block) out of a matrix of 8192-byte rows,
for several (R, B). R x B = 16 KB is one decode-tile stage's weight bytes (128 rows x 128 B).

    python stream_probe.py     (needs CuPy)
"""
import cupy as cp

SRC = r"""
extern "C" __global__ void __launch_bounds__(256, 2)
probe(const unsigned char* __restrict__ w, long long row_bytes, long long units_per_block, unsigned int* sink) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int kStageBytes = R * B;
  constexpr int kChunksPerThread = kStageBytes / 16 / 256;
  constexpr int kChunksPerRow = B / 16;
  const long long steps_per_unit = row_bytes / B;
  const long long total_steps = units_per_block * steps_per_unit;
  auto issue = [&](long long s) {
    if (s < total_steps) {
      const long long unit = blockIdx.x + (s / steps_per_unit) * (long long)gridDim.x;
      const long long k_byte = (s % steps_per_unit) * B;
      unsigned char* stage = smem + (s % S) * kStageBytes;
#pragma unroll
      for (int i = 0; i < kChunksPerThread; ++i) {
        const int c = threadIdx.x + i * 256;
        const int r = c / kChunksPerRow, col = c % kChunksPerRow;
        const unsigned char* src = w + (unit * R + r) * row_bytes + k_byte + col * 16;
        const unsigned dst = (unsigned)__cvta_generic_to_shared(stage + c * 16);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(dst), "l"(src));
      }
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };
  for (int s = 0; s < S - 1; ++s) issue(s);
  unsigned acc = 0;
  for (long long s = 0; s < total_steps; ++s) {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(S - 2));
    __syncthreads();
    issue(s + S - 1);
    const uint4 v = reinterpret_cast<const uint4*>(smem + (s % S) * kStageBytes)[threadIdx.x];
    acc ^= v.x ^ v.w;
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}
"""

LINEAR = r"""
extern "C" __global__ void linear(const uint4* __restrict__ w, long long n16, unsigned int* sink) {
  unsigned acc = 0;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n16; i += (long long)gridDim.x * blockDim.x) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(w + i));
    acc ^= v.x ^ v.w;
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}
"""


def time_ms(fn, reps=10):
    fn()
    fn()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    times.sort()
    return times[0], times[len(times) // 2]


def main():
    dev = cp.cuda.Device()
    sms = dev.attributes["MultiProcessorCount"]
    row_bytes = 8192
    rows = 2 * sms * 128                       # a whole number of 128-row units per block
    total = rows * row_bytes
    w = cp.random.randint(0, 255, total, dtype=cp.uint8)
    sink = cp.zeros(1, dtype=cp.uint32)
    print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}: {sms} SMs, {total / 2**20:.0f} MiB read per call")
    grid = 2 * sms
    for r, b, s in ((128, 64, 4), (128, 128, 4), (64, 256, 4), (32, 512, 4), (16, 1024, 4), (2, 8192, 4),
                    (128, 128, 6), (128, 256, 3), (64, 512, 3)):
        mod = cp.RawModule(code=SRC, options=("-std=c++17", f"-DR={r}", f"-DB={b}", f"-DS={s}"))
        kernel = mod.get_function("probe")
        smem = s * r * b
        kernel.max_dynamic_shared_size_bytes = smem
        units = rows // r // grid
        best, median = time_ms(lambda: kernel((grid,), (256,), (w, cp.int64(row_bytes), cp.int64(units), sink),
                                              shared_mem=smem))
        print(f"R={r:4d} rows x B={b:5d} bytes per stage, {s} stages: best {best * 1e3:7.1f} us "
              f"{total / best / 1e6:6.0f} GB/s  (median {total / median / 1e6:6.0f})", flush=True)
    kernel = cp.RawModule(code=LINEAR).get_function("linear")
    for blocks_per_sm in (4, 8):
        best, median = time_ms(lambda: kernel((blocks_per_sm * sms,), (512,), (w, cp.int64(total // 16), sink)))
        print(f"linear ld.global.nc v4, {blocks_per_sm} x 512 threads an SM: best {best * 1e3:7.1f} us "
              f"{total / best / 1e6:6.0f} GB/s  (median {total / median / 1e6:6.0f})", flush=True)


if __name__ == "__main__":
    main()
