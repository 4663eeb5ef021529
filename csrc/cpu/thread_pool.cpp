// Persistent worker threads behind parallel_for (thread_pool.h) and the thread-count setting of
// cpu_ops.h. One job at a time: the caller publishes it, wakes the workers, works on it itself and
// waits until every worker has left it, so the job (on the caller's stack) outlives all its uses.
#include "thread_pool.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
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

void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (end <= begin) return;
  const int64_t total = end - begin;
  grain = std::max<int64_t>(1, grain);
  const int threads = num_threads();
  // A few chunks per thread so a thread slowed by the OS does not hold up the others.
  const int64_t chunks = std::min<int64_t>((total + grain - 1) / grain, int64_t{4} * threads);
  std::unique_lock<std::mutex> lock(g_pool_mutex, std::defer_lock);
  if (chunks <= 1 || threads <= 1 || t_inside_job || !lock.try_lock()) {
    fn(begin, end);
    return;
  }
  const int64_t chunk_size = (total + chunks - 1) / chunks;
  struct InsideJob {
    InsideJob() { t_inside_job = true; }
    ~InsideJob() { t_inside_job = false; }
  } inside_job;
  pool_for(threads).run(chunks, [&](int64_t c) {
    const int64_t b = begin + c * chunk_size;
    if (b < end) fn(b, std::min(end, b + chunk_size));
  });
}

}  // namespace cpu
}  // namespace sparsegemm
