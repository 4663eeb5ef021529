// The threads behind parallel_for (thread_pool.h) and the thread-count setting of cpu_ops.h.
//
// Jobs run on the OpenMP runtime the process already has loaded (torch's libgomp, or an LLVM /
// Intel runtime, which export the same GOMP entry points), found at run time: no link against
// it, and no second runtime. torch's idle OpenMP workers spin for milliseconds after each torch
// op, so threads of our own would share the cores with them: on a 2-core VM the M = 1 bf16 GEMM
// (4096^2) ran at one thread's speed after any torch op (1.48 ms; 0.91 ms with
// OMP_WAIT_POLICY=PASSIVE, 0.86 ms on the OpenMP team). Without a loaded runtime, in a forked
// child (GNU OpenMP's team does not survive fork) or when cpu_use_openmp(false) asks, jobs run on
// a persistent std::thread pool instead: one job at a time; the caller publishes it, wakes the
// workers, works on it itself and waits until every worker has left it, so the job (on the
// caller's stack) outlives all its uses.
#include "thread_pool.h"

#include <pthread.h>
#include <unistd.h>
#if defined(__linux__)
#include <dlfcn.h>
#include <link.h>
#endif

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cpu_ops.h"

namespace sparsegemm {
namespace cpu {
namespace {

// True on pool workers, and on a caller while it runs a job: a parallel_for issued from inside a
// job then runs inline (and the caller never try_locks the pool mutex it already holds).
thread_local bool t_inside_job = false;

class ThreadPool {
 public:
  explicit ThreadPool(int workers) {
    threads_.reserve(workers);
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { worker_loop(); });
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }

  int workers() const { return static_cast<int>(threads_.size()); }

  // Runs chunk_fn(c) for every c in [0, chunks) on the workers and the caller.
  void run(int64_t chunks, const std::function<void(int64_t)>& chunk_fn) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &chunk_fn;
      job_chunks_ = chunks;
      next_chunk_.store(0, std::memory_order_relaxed);
      workers_in_job_ = workers();
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    work_on_job(chunk_fn, chunks);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return workers_in_job_ == 0; });
    job_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void work_on_job(const std::function<void(int64_t)>& chunk_fn, int64_t chunks) {
    for (int64_t c = next_chunk_.fetch_add(1); c < chunks; c = next_chunk_.fetch_add(1)) {
      try {
        chunk_fn(c);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
    }
  }

  void worker_loop() {
    t_inside_job = true;
    uint64_t seen_generation = 0;
    for (;;) {
      const std::function<void(int64_t)>* job;
      int64_t chunks;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen_generation; });
        if (stop_) return;
        seen_generation = generation_;
        job = job_;
        chunks = job_chunks_;
      }
      work_on_job(*job, chunks);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--workers_in_job_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  bool stop_ = false;
  uint64_t generation_ = 0;
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t job_chunks_ = 0;
  std::atomic<int64_t> next_chunk_{0};
  int workers_in_job_ = 0;
  std::exception_ptr error_;
};

// A job on the OpenMP team: every team thread claims chunks until none are left.
struct TeamJob {
  const std::function<void(int64_t)>* chunk_fn;
  int64_t chunks;
  std::atomic<int64_t> next_chunk{0};
  std::mutex error_mutex;
  std::exception_ptr error;
};

// The body of the parallel region (GOMP_parallel's fn): no exception may leave it.
void run_team_job(void* data) {
  auto& job = *static_cast<TeamJob*>(data);
  const bool was_inside = t_inside_job;
  t_inside_job = true;
  for (int64_t c = job.next_chunk.fetch_add(1); c < job.chunks; c = job.next_chunk.fetch_add(1)) {
    try {
      (*job.chunk_fn)(c);
    } catch (...) {
      std::lock_guard<std::mutex> lock(job.error_mutex);
      if (!job.error) job.error = std::current_exception();
    }
  }
  t_inside_job = was_inside;
}

// The loaded OpenMP runtime's entry points (GNU ABI: GOMP_parallel(fn, data, num_threads, flags)
// runs fn(data) on a team that includes the caller and returns after its closing barrier; LLVM's
// libomp and Intel's libiomp5 export it too).
struct OpenMpRuntime {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;
  int (*in_parallel)() = nullptr;
  std::string library;  // its path, for cpu_threading()
};

// Set in a child of fork(): GNU OpenMP's team does not survive fork (the child's first parallel
// region waits for workers that are not there), so children use the pool. Registered when the
// extension loads; a child of a process that forked before loading it cannot be told, as torch
// cannot tell it either.
std::atomic<bool> g_forked{false};
[[maybe_unused]] const int g_fork_handler = pthread_atfork(nullptr, nullptr, [] { g_forked.store(true); });

#if defined(__linux__)
// The OpenMP runtimes' file names: libgomp.so.1 (torch's wheels), libgomp-<hash>.so.1 (auditwheel
// copies), libomp.so[.5], libiomp5.so; not other libraries that merely start like them (libompl).
bool names_openmp_runtime(const std::string& name) {
  for (const char* stem : {"libgomp.so", "libgomp-", "libomp.so", "libiomp5.so"})
    if (name.rfind(stem, 0) == 0) return true;
  return false;
}

// dl_iterate_phdr callback: every loaded object named like an OpenMP runtime, in load order.
int collect_openmp_libraries(dl_phdr_info* info, size_t, void* paths) {
  const std::string path = info->dlpi_name != nullptr ? info->dlpi_name : "";
  if (names_openmp_runtime(path.substr(path.find_last_of('/') + 1)))
    static_cast<std::vector<std::string>*>(paths)->push_back(path);
  return 0;
}

std::string directory_of(const std::string& path) { return path.substr(0, path.find_last_of('/') + 1); }

// The runtime torch uses (the one beside libtorch_cpu.so) when several are loaded, else the first
// that has the entry points.
OpenMpRuntime load_openmp_runtime() {
  std::vector<std::string> candidates;
  dl_iterate_phdr(collect_openmp_libraries, &candidates);
  std::string torch_directory;
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* dir) {
        const std::string path = info->dlpi_name != nullptr ? info->dlpi_name : "";
        if (path.find("/libtorch_cpu.so") == std::string::npos) return 0;
        *static_cast<std::string*>(dir) = directory_of(path);
        return 1;
      },
      &torch_directory);
  std::stable_partition(candidates.begin(), candidates.end(), [&](const std::string& path) {
    return !torch_directory.empty() && directory_of(path) == torch_directory;
  });
  for (const std::string& path : candidates) {
    // RTLD_NOLOAD: a handle to the copy already mapped, or nothing; never a second runtime. The
    // handle stays open: the runtime outlives every job.
    void* handle = dlopen(path.c_str(), RTLD_LAZY | RTLD_NOLOAD);
    if (handle == nullptr) continue;
    OpenMpRuntime runtime;
    runtime.parallel = reinterpret_cast<decltype(runtime.parallel)>(dlsym(handle, "GOMP_parallel"));
    runtime.in_parallel = reinterpret_cast<decltype(runtime.in_parallel)>(dlsym(handle, "omp_in_parallel"));
    if (runtime.parallel != nullptr && runtime.in_parallel != nullptr) {
      runtime.library = path;
      return runtime;
    }
    dlclose(handle);
  }
  return {};
}
#else
// Elsewhere (no dl_iterate_phdr) the pool runs every job.
OpenMpRuntime load_openmp_runtime() { return {}; }
#endif

// Looked up once, at the first parallel job (the extension is imported after torch, which loads
// its runtime).
const OpenMpRuntime& openmp_runtime() {
  static const OpenMpRuntime runtime = load_openmp_runtime();
  return runtime;
}

std::atomic<bool> g_use_openmp{true};

// The OpenMP team jobs may run on here, or null: none loaded, a forked child, or switched off.
const OpenMpRuntime* usable_openmp() {
  if (!g_use_openmp.load() || g_forked.load()) return nullptr;
  const OpenMpRuntime& runtime = openmp_runtime();
  return runtime.parallel != nullptr ? &runtime : nullptr;
}

int default_threads() { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())); }

std::atomic<int> g_threads{default_threads()};
// Held by the one caller that owns the pool for a job; others run their loops inline.
std::mutex g_pool_mutex;
ThreadPool* g_pool = nullptr;
pid_t g_pool_pid = 0;

// The pool sized for the current thread setting; g_pool_mutex must be held. After fork() the
// child has the pool object but none of its threads: that pool is abandoned (joining threads that
// do not exist would hang), never destroyed.
ThreadPool& pool_for(int threads) {
  const pid_t pid = getpid();
  if (g_pool != nullptr && g_pool_pid != pid) g_pool = nullptr;
  if (g_pool != nullptr && g_pool->workers() != threads - 1) {
    delete g_pool;
    g_pool = nullptr;
  }
  if (g_pool == nullptr) {
    g_pool = new ThreadPool(threads - 1);
    g_pool_pid = pid;
  }
  return *g_pool;
}

}  // namespace

void set_num_threads(int threads) { g_threads.store(std::max(1, threads)); }

int num_threads() { return g_threads.load(); }

void use_openmp(bool enabled) { g_use_openmp.store(enabled); }

std::string threading() {
  const OpenMpRuntime* runtime = usable_openmp();
  return runtime != nullptr ? "openmp:" + runtime->library : "threads";
}

void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (end <= begin) return;
  const int64_t total = end - begin;
  grain = std::max<int64_t>(1, grain);
  const int threads = num_threads();
  // A few chunks per thread so a thread slowed by the OS does not hold up the others.
  const int64_t chunks = std::min<int64_t>((total + grain - 1) / grain, int64_t{4} * threads);
  std::unique_lock<std::mutex> lock(g_pool_mutex, std::defer_lock);
  const OpenMpRuntime* team = usable_openmp();
  if (chunks <= 1 || threads <= 1 || t_inside_job || (team != nullptr && team->in_parallel()) || !lock.try_lock()) {
    fn(begin, end);
    return;
  }
  const int64_t chunk_size = (total + chunks - 1) / chunks;
  const std::function<void(int64_t)> chunk_fn = [&](int64_t c) {
    const int64_t b = begin + c * chunk_size;
    if (b < end) fn(b, std::min(end, b + chunk_size));
  };
  if (team != nullptr) {
    TeamJob job;
    job.chunk_fn = &chunk_fn;
    job.chunks = chunks;
    team->parallel(run_team_job, &job, static_cast<unsigned>(std::min<int64_t>(threads, chunks)), 0);
    if (job.error) std::rethrow_exception(job.error);
    return;
  }
  struct InsideJob {
    InsideJob() { t_inside_job = true; }
    ~InsideJob() { t_inside_job = false; }
  } inside_job;
  pool_for(threads).run(chunks, chunk_fn);
}

}  // namespace cpu
}  // namespace sparsegemm
