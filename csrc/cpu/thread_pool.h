// Parallel loops of the CPU kernels: on the OpenMP runtime the process has loaded (torch's),
// found at run time, else on a small persistent std::thread pool (thread_pool.cpp says why). The
// extension never links an OpenMP runtime itself: two in one process fight over threads (or crash).
#pragma once
#include <cstdint>
#include <functional>

namespace sparsegemm {
namespace cpu {

// Calls fn(chunk_begin, chunk_end) on disjoint chunks covering [begin, end), each at least `grain`
// indices long (except the last), on the pool's workers and the calling thread; returns when all
// chunks are done and rethrows the first exception a chunk threw. Chunks are claimed dynamically.
// A call made from inside fn, or while another thread is using the pool, runs serially on the
// calling thread: no deadlock and no oversubscription.
void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace cpu
}  // namespace sparsegemm
