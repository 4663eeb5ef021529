// SIMT emulator runtime: fibers, the block scheduler, barriers, warp collectives, cp.async.
// The execution model is documented in emulator.h.
#include "simt/emulator.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <numeric>
#include <random>
#include <stdexcept>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define SG_SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SG_SIMT_ASAN 1
#endif
#endif
#if defined(SG_SIMT_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace sparsegemm {
namespace emu {

UInt3 threadIdx;
UInt3 blockIdx;
Dim3 blockDim;
Dim3 gridDim;

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr unsigned kMaxThreadsPerBlock = 1024;
// sm_80's per-block opt-in limit (163 KiB): a kernel that runs here must also fit an A100.
constexpr size_t kMaxSharedBytes = 163 * 1024;
constexpr unsigned kWarpSize = 32;
constexpr unsigned kWarpgroupSize = 128;
constexpr uint32_t kInFlightPoison = 0x7FBADBADu;  // wgmma accumulators in flight (wgmma_issue)

// The buffers of the live ReadableBuffers on this OS thread (launches run on the launching thread).
thread_local std::vector<ReadableBuffer> readable_buffers;

// Throws unless the `bytes` global bytes at `address` lie inside one declared readable buffer;
// the message places the address after the nearest buffer that starts below it.
void check_readable(const void* address, size_t bytes, const char* what) {
  if (readable_buffers.empty()) return;
  const auto at = reinterpret_cast<uintptr_t>(address);
  const ReadableBuffer* below = nullptr;
  for (const ReadableBuffer& b : readable_buffers) {
    const auto begin = reinterpret_cast<uintptr_t>(b.begin);
    if (at >= begin && at + bytes <= begin + b.bytes) return;
    if (at >= begin && (below == nullptr || begin > reinterpret_cast<uintptr_t>(below->begin))) below = &b;
  }
  std::string where = "below every buffer this launch may read";
  if (below != nullptr)
    where = "at byte " + std::to_string(at - reinterpret_cast<uintptr_t>(below->begin)) + " of " + below->name +
            ", which holds " + std::to_string(below->bytes) + " bytes";
  fail(std::string(what) + ": " + std::to_string(bytes) + " source bytes " + where +
       " (outside every buffer the launch may read)");
}

// ---- execution contexts ------------------------------------------------------------------------
#if defined(__x86_64__)
// A saved context is its stack pointer; the callee-saved registers, MXCSR and the x87 control
// word sit on the stack below it (SysV x86-64: everything else is caller-saved, so a plain call
// to sg_simt_switch preserves the fiber's state).
struct Context {
  void* sp = nullptr;
};
extern "C" void sg_simt_switch(void** save_sp, void* load_sp);
extern "C" void sg_simt_fiber_start();
asm(R"(
  .text
  .p2align 4
  .globl sg_simt_switch
  .hidden sg_simt_switch
  .type sg_simt_switch,@function
sg_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size sg_simt_switch,.-sg_simt_switch
  .p2align 4
  .globl sg_simt_fiber_start
  .hidden sg_simt_fiber_start
  .type sg_simt_fiber_start,@function
sg_simt_fiber_start:
  callq *%r12
  ud2
  .size sg_simt_fiber_start,.-sg_simt_fiber_start
)");

// Builds a first frame that sg_simt_switch "returns" into: sg_simt_fiber_start calls entry
// (held in r12) with the stack 16-byte aligned as the ABI requires at a call.
void context_init(Context& c, char* stack_lo, size_t bytes, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack_lo + bytes) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = reinterpret_cast<uint64_t>(&sg_simt_fiber_start);  // return address
  *--sp = 0;                                                  // rbp
  *--sp = 0;                                                  // rbx
  *--sp = reinterpret_cast<uint64_t>(entry);                  // r12
  *--sp = 0;                                                  // r13
  *--sp = 0;                                                  // r14
  *--sp = 0;                                                  // r15
  *--sp = (uint64_t{0x037F} << 32) | 0x1F80;                  // default x87 control word, MXCSR
  c.sp = sp;
}
void context_switch(Context& from, Context& to) { sg_simt_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
void context_init(Context& c, char* stack_lo, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack_lo;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// Fiber stacks, kept across launches: one mapping, each stack with a PROT_NONE guard page below
// it so that an overflow faults instead of corrupting a neighbour.
class StackPool {
 public:
  char* stack(unsigned i) { return base_ + i * slot_ + page_; }
  void reserve(unsigned count) {
    if (count <= count_) return;
    page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    slot_ = kStackBytes + page_;
    void* p = mmap(nullptr, slot_ * count, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("SIMT emulator: cannot map fiber stacks");
    for (unsigned i = 0; i < count; ++i) mprotect(static_cast<char*>(p) + i * slot_, page_, PROT_NONE);
    if (base_) munmap(base_, slot_ * count_);
    base_ = static_cast<char*>(p);
    count_ = count;
  }

 private:
  char* base_ = nullptr;
  unsigned count_ = 0;
  size_t page_ = 0, slot_ = 0;
};

// ---- block state -------------------------------------------------------------------------------
enum class ThreadState { ready, at_barrier, at_collective, at_mbarrier, exited };

struct PendingCopy {
  char* dst;
  unsigned char bytes[16];
};

// The result of one wgmma.mma_async, written to the accumulator registers (`d`, in the thread's
// frame) when a wgmma.wait_group retires its group.
struct PendingAccumulator {
  void* d;
  std::vector<unsigned char> bytes;
  size_t read;  // its warpgroup op's entry in Launch::wgmma_reads
  std::vector<WgmmaRegister> registers;  // the other registers the op reads, unchanged until it retires
};

// The shared-memory bytes [begin, end) (offsets) that one warpgroup wgmma op reads, and how many of
// its threads have not yet retired it with wgmma.wait_group: while any has not, the hardware may
// still be reading them.
struct WgmmaRead {
  uint32_t begin, end;
  unsigned holders;
};

// A TMA copy in flight: its box as it will land at shared-memory offset dst.
struct PendingBulkCopy {
  uint32_t dst;
  std::vector<unsigned char> bytes;
};

// One mbarrier object (emulator.h mbarrier_init): its counts, its phase (completed phases so
// far), the TMA copies that signal it, and who initialised it when (Launch::barrier_generation).
struct Mbarrier {
  unsigned expected = 0, pending = 0;
  int64_t tx = 0;  // may dip below 0 on the device too (PTX: tx-count range is signed)
  uint32_t phase = 0;
  unsigned init_thread = 0;
  uint64_t init_generation = 0;
  std::vector<PendingBulkCopy> copies;
};

// One thread's asynchronous operations in PTX's commit-group model (cp.async, wgmma.mma_async):
// those issued since the last commit, then the committed groups, oldest first.
template <typename Op>
struct AsyncGroups {
  std::vector<Op> open;
  std::deque<std::vector<Op>> committed;

  void issue(Op op) { open.push_back(std::move(op)); }
  void commit() {
    committed.push_back(std::move(open));
    open.clear();
  }
  // The *.wait_group semantics: completes all but the newest `pending` committed groups, oldest
  // first, calling complete(op) for each of their operations.
  template <typename Complete>
  void wait(size_t pending, Complete complete) {
    while (committed.size() > pending) {
      for (const Op& op : committed.front()) complete(op);
      committed.pop_front();
    }
  }
  // visit(op) for every operation not yet completed, oldest first.
  template <typename Visit>
  void for_each_pending(Visit visit) const {
    for (const auto& group : committed)
      for (const Op& op : group) visit(op);
    for (const Op& op : open) visit(op);
  }
  bool empty() const { return open.empty() && committed.empty(); }
  void clear() {
    open.clear();
    committed.clear();
  }
};

struct Fiber {
  Context context;
  ThreadState state = ThreadState::ready;
  UInt3 index;
  unsigned linear = 0;
  // Valid while state == at_collective: the instruction's name (warp or warpgroup collective).
  const char* op_name = nullptr;
  unsigned op_group = 0;  // threads of the collective: 32 or 128
  const void* input = nullptr;
  void* output = nullptr;
  AsyncGroups<PendingCopy> copies;  // cp.async
  bool dependency_waited = false;  // grid_dependency_wait called
  AsyncGroups<PendingAccumulator> wgmma_results;  // wgmma.mma_async
  bool wgmma_fenced = false;  // wgmma.fence since the last wgmma.wait_group or ldmatrix (or the start)
  // 16-byte shared-memory chunks this thread's landed cp.async wrote since its last
  // fence.proxy.async (Launch::unfenced_writer holds the writer of each chunk).
  std::vector<uint32_t> unfenced_chunks;
  // Valid while state == at_mbarrier: the mbarrier's offset and the parity waited for.
  uint32_t wait_bar = 0;
  unsigned wait_parity = 0;
};

struct AlignedDelete {
  void operator()(char* p) const { ::operator delete[](p, std::align_val_t(128)); }
};

struct Launch {
  std::string kernel;
  ThreadBody body = nullptr;
  void* body_context = nullptr;
  Dim3 grid, block;
  size_t smem_bytes = 0;
  unsigned threads = 0;
  bool dependent = false;  // a programmatic dependent launch

  std::vector<Fiber> fibers;
  std::unique_ptr<char[], AlignedDelete> smem;
  // Per block: wgmma reads of shared memory (WgmmaRead), and per 16-byte chunk the thread whose
  // cp.async wrote it and has not fenced it to the async proxy since (-1: none).
  std::vector<WgmmaRead> wgmma_reads;
  size_t first_live_read = 0;  // the wgmma_reads before it are all retired: checks start here
  std::vector<int> unfenced_writer;
  std::map<uint32_t, Mbarrier> mbarriers;  // by shared-memory offset
  std::map<const uint64_t*, uint64_t> first_relaxed_loads;  // relaxed_load_u64: address -> value
  uint64_t barrier_generation = 0;         // __syncthreads released so far in this block
  Context scheduler;
  unsigned running = 0;
  unsigned waiting_at_barrier = 0;
  unsigned exited = 0;
  std::exception_ptr error;
#if defined(SG_SIMT_ASAN)
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
#endif
};

Launch* g_launch = nullptr;
std::mutex g_launch_mutex;
uint64_t g_block_order_seed = 0;  // set_block_order; read under g_launch_mutex
bool g_stale_relaxed_loads = false;  // set_stale_relaxed_loads; read under g_launch_mutex
StackPool g_stacks;

Fiber& current() { return g_launch->fibers[g_launch->running]; }

std::string dim_text(unsigned x, unsigned y, unsigned z) {
  return "(" + std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(z) + ")";
}

std::string kernel_text() { return "SIMT emulator, kernel '" + g_launch->kernel + "'"; }

// Where the running thread is, for error messages.
std::string location() {
  const Fiber& f = current();
  return kernel_text() + ", block " + dim_text(blockIdx.x, blockIdx.y, blockIdx.z) + ", thread " +
         dim_text(f.index.x, f.index.y, f.index.z) + " (warp " + std::to_string(f.linear / kWarpSize) + ", lane " +
         std::to_string(f.linear % kWarpSize) + ")";
}

void record_error(std::exception_ptr error) {
  if (g_launch->error) return;
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    g_launch->error = std::make_exception_ptr(std::runtime_error(location() + ": " + e.what()));
  } catch (...) {
    g_launch->error = std::current_exception();
  }
}

// Fiber -> scheduler. `exiting`: the fiber never resumes (lets ASan drop its fake stack).
void yield_to_scheduler(bool exiting) {
  Launch& l = *g_launch;
#if defined(SG_SIMT_ASAN)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fake_stack, l.scheduler_stack_bottom, l.scheduler_stack_size);
#else
  (void)exiting;
#endif
  context_switch(current().context, l.scheduler);
#if defined(SG_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
}

// Scheduler -> fiber i.
void resume(unsigned i) {
  Launch& l = *g_launch;
  l.running = i;
  threadIdx = l.fibers[i].index;
#if defined(SG_SIMT_ASAN)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, g_stacks.stack(i), kStackBytes);
#endif
  context_switch(l.scheduler, l.fibers[i].context);
#if defined(SG_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
}

// Throws if [offset, offset + bytes) of shared memory overlaps what a wgmma op in flight reads.
void check_not_read_by_wgmma(uint32_t offset, uint32_t bytes, const char* what) {
  const std::vector<WgmmaRead>& reads = g_launch->wgmma_reads;
  for (size_t i = g_launch->first_live_read; i < reads.size(); ++i) {
    const WgmmaRead& read = reads[i];
    if (read.holders == 0 || offset >= read.end || offset + bytes <= read.begin) continue;
    fail(std::string(what) + " writes shared-memory bytes [" + std::to_string(offset) + ", " +
         std::to_string(offset + bytes) + ") while a wgmma.mma_async in flight reads [" + std::to_string(read.begin) +
         ", " + std::to_string(read.end) + ") (every thread of its warpgroup must pass wgmma.wait_group, and a "
         "barrier, first)");
  }
}

// Throws if [offset, offset + bytes) of shared memory overlaps a live mbarrier object.
void check_not_mbarrier(uint32_t offset, uint32_t bytes, const char* what) {
  for (const auto& [at, bar] : g_launch->mbarriers) {
    (void)bar;
    if (offset < at + 8 && at < offset + bytes)
      fail(std::string(what) + " writes shared-memory bytes [" + std::to_string(offset) + ", " +
           std::to_string(offset + bytes) + "), which hold the mbarrier at offset " + std::to_string(at));
  }
}

// A phase of `bar` completes once every expected arrival came and its transactions are done.
void complete_phase_if_done(Mbarrier& bar) {
  if (bar.pending == 0 && bar.tx == 0) {
    ++bar.phase;
    bar.pending = bar.expected;
  }
}

// Lands the TMA copies that signal `bar`: their bytes, off its transaction count.
void land_bulk_copies(Mbarrier& bar) {
  Launch& l = *g_launch;
  for (const PendingBulkCopy& copy : bar.copies) {
    std::memcpy(l.smem.get() + copy.dst, copy.bytes.data(), copy.bytes.size());
    for (uint32_t chunk = copy.dst / 16; chunk < (copy.dst + copy.bytes.size()) / 16; ++chunk)
      l.unfenced_writer[chunk] = -1;  // written by the async proxy: wgmma needs no fence for it
    bar.tx -= static_cast<int64_t>(copy.bytes.size());
  }
  bar.copies.clear();
  complete_phase_if_done(bar);
}

// Whether the phase thread f waits for (at_mbarrier) has completed, once the copies signalling
// its mbarrier have landed.
bool mbarrier_wait_done(const Fiber& f) {
  Mbarrier& bar = g_launch->mbarriers.at(f.wait_bar);
  land_bulk_copies(bar);
  return (bar.phase & 1) != f.wait_parity;
}

// Lands all but the newest `pending` committed copy groups of thread f: their bytes, and f as the
// unfenced writer of their chunks. (A copy cannot land in bytes a wgmma in flight reads: it was
// either in flight when the wgmma was issued, which wgmma_read_shared refuses, or issued after
// it, which cp_async_16 refuses.)
void land_copies(Fiber& f, size_t pending) {
  Launch& l = *g_launch;
  f.copies.wait(pending, [&](const PendingCopy& c) {
    const auto offset = static_cast<uint32_t>(c.dst - l.smem.get());
    std::memcpy(c.dst, c.bytes, sizeof c.bytes);
    l.unfenced_writer[offset / 16] = static_cast<int>(f.linear);
    f.unfenced_chunks.push_back(offset / 16);
  });
}

// The hardware completes outstanding cp.async copies even if the thread never waits.
void retire_all_copies(Fiber& f) {
  f.copies.commit();
  land_copies(f, 0);
}

const char* state_name(const Fiber& f) {
  switch (f.state) {
    case ThreadState::ready: return "running";
    case ThreadState::at_barrier: return "__syncthreads";
    case ThreadState::at_collective: return f.op_name;
    case ThreadState::at_mbarrier: return "mbarrier.try_wait.parity";
    case ThreadState::exited: return "exit";
  }
  return "?";
}

// A thread leaves the kernel: nobody may be waiting for it.
void on_thread_exit(Fiber& f) {
  Launch& l = *g_launch;
  ++l.exited;
  const unsigned warp_base = f.linear / kWarpSize * kWarpSize;
  for (unsigned i = warp_base; i < warp_base + kWarpSize && i < l.threads; ++i) {
    if (l.fibers[i].state == ThreadState::at_collective)
      fail("thread exited while lane " + std::to_string(i - warp_base) + " of its warp waits at " +
           l.fibers[i].op_name + " (a warp collective needs all 32 lanes)");
  }
  if (!f.wgmma_results.empty())
    fail("thread exited with wgmma.mma_async results in flight (no wgmma.wait_group retired them)");
  if (l.waiting_at_barrier > 0)
    fail("thread exited while " + std::to_string(l.waiting_at_barrier) +
         " threads wait at __syncthreads (the barrier is never reached by every thread of the block)");
}

void fiber_main() {
#if defined(SG_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &g_launch->scheduler_stack_bottom, &g_launch->scheduler_stack_size);
#endif
  Fiber& f = current();
  try {
    g_launch->body(g_launch->body_context);
    retire_all_copies(f);
    on_thread_exit(f);
  } catch (...) {
    record_error(std::current_exception());
  }
  f.state = ThreadState::exited;
  yield_to_scheduler(true);
  std::abort();  // the scheduler never resumes an exited fiber
}

std::string deadlock_report() {
  const Launch& l = *g_launch;
  std::string states;
  unsigned shown = 0;
  for (const Fiber& f : l.fibers) {
    if (f.state == ThreadState::exited) continue;
    if (shown++ == 8) {
      states += ", ...";
      break;
    }
    states += (shown > 1 ? ", " : "") + std::string("thread ") + std::to_string(f.linear) + " at " + state_name(f);
  }
  return kernel_text() + ", block " + dim_text(blockIdx.x, blockIdx.y, blockIdx.z) +
         ": deadlock, no thread can proceed (" + states + ")";
}

void run_block() {
  Launch& l = *g_launch;
  // Fresh, poisoned shared memory: see emulator.h.
  l.smem.reset(static_cast<char*>(::operator new[](l.smem_bytes, std::align_val_t(128))));
  std::memset(l.smem.get(), 0xFF, l.smem_bytes);
  l.wgmma_reads.clear();
  l.first_live_read = 0;
  l.unfenced_writer.assign((l.smem_bytes + 15) / 16, -1);
  l.mbarriers.clear();
  l.barrier_generation = 0;
  l.waiting_at_barrier = 0;
  l.exited = 0;
  for (unsigned i = 0; i < l.threads; ++i) {
    Fiber& f = l.fibers[i];
    f.state = ThreadState::ready;
    f.linear = i;
    f.index = UInt3{i % l.block.x, i / l.block.x % l.block.y, i / (l.block.x * l.block.y)};
    f.op_name = nullptr;
    f.copies.clear();
    f.dependency_waited = false;
    f.wgmma_results.clear();
    f.wgmma_fenced = false;
    f.unfenced_chunks.clear();
#if defined(SG_SIMT_ASAN)
    // A reused stack still carries the poisoned shadow of the frames its last fiber abandoned.
    ASAN_UNPOISON_MEMORY_REGION(g_stacks.stack(i), kStackBytes);
#endif
    context_init(f.context, g_stacks.stack(i), kStackBytes, &fiber_main);
  }
  // Always the lowest-numbered thread that can run: low warps run ahead as far as the kernel's
  // synchronisation lets them, which is where a missing wait shows (e.g. a stage refilled before
  // a higher warp read it: it reads the refill's poison).
  while (l.exited < l.threads) {
    unsigned i = 0;
    for (; i < l.threads; ++i) {
      Fiber& f = l.fibers[i];
      if (f.state == ThreadState::at_mbarrier && mbarrier_wait_done(f)) f.state = ThreadState::ready;
      if (f.state == ThreadState::ready) break;
    }
    if (i == l.threads) throw std::runtime_error(deadlock_report());
    resume(i);
    if (l.error) std::rethrow_exception(l.error);
  }
  for (const auto& [at, bar] : l.mbarriers)
    if (!bar.copies.empty())
      throw std::runtime_error(kernel_text() + ", block " + dim_text(blockIdx.x, blockIdx.y, blockIdx.z) +
                               ": the block exited with TMA copies in flight that signal the mbarrier at offset " +
                               std::to_string(at) + " (no thread waited for them)");
}

void check_launch_configuration(const Launch& l) {
  auto reject = [&](const std::string& why) {
    throw std::runtime_error(kernel_text() + ": invalid launch configuration: " + why);
  };
  if (l.grid.x == 0 || l.grid.y == 0 || l.grid.z == 0 || l.block.x == 0 || l.block.y == 0 || l.block.z == 0)
    reject("grid " + dim_text(l.grid.x, l.grid.y, l.grid.z) + " and block " +
           dim_text(l.block.x, l.block.y, l.block.z) + " must have every dimension >= 1");
  if (l.grid.y > 65535 || l.grid.z > 65535) reject("gridDim.y and gridDim.z must be <= 65535");
  if (l.block.z > 64) reject("blockDim.z must be <= 64");
  if (static_cast<uint64_t>(l.block.x) * l.block.y * l.block.z > kMaxThreadsPerBlock)
    reject("a block has more than " + std::to_string(kMaxThreadsPerBlock) + " threads");
  if (l.smem_bytes > kMaxSharedBytes)
    reject(std::to_string(l.smem_bytes) + " bytes of dynamic shared memory exceed sm_80's " +
           std::to_string(kMaxSharedBytes) + "-byte per-block limit");
}

}  // namespace

// ---- public API ------------------------------------------------------------------------------
void fail(const std::string& message) { throw std::runtime_error(message); }

ReadableBuffers::ReadableBuffers(std::initializer_list<ReadableBuffer> buffers)
    : ReadableBuffers(std::vector<ReadableBuffer>(buffers)) {}

ReadableBuffers::ReadableBuffers(const std::vector<ReadableBuffer>& buffers) {
  if (!readable_buffers.empty()) throw std::logic_error("emu::ReadableBuffers: one declaration at a time");
  readable_buffers = buffers;
}

ReadableBuffers::~ReadableBuffers() { readable_buffers.clear(); }

std::string kernel_name_from_launch_text(const char* launch_text) {
  std::string text(launch_text);
  int depth = 0;
  size_t end = 0;
  for (; end < text.size(); ++end) {
    const char c = text[end];
    if (c == '<' || c == '(' || c == '[') ++depth;
    if (c == '>' || c == ')' || c == ']') --depth;
    if (c == ',' && depth == 0) break;
  }
  const size_t first = text.find_first_not_of(" \t\n");
  const size_t last = text.find_last_not_of(" \t\n", end == 0 ? 0 : end - 1);
  return first == std::string::npos || last < first ? text : text.substr(first, last - first + 1);
}

void run_grid(const std::string& kernel_name, Dim3 grid, Dim3 block, size_t smem_bytes, ThreadBody body,
              void* context, bool dependent) {
  std::lock_guard<std::mutex> serialise(g_launch_mutex);
  Launch l;
  l.kernel = kernel_name;
  l.body = body;
  l.body_context = context;
  l.grid = grid;
  l.block = block;
  l.smem_bytes = smem_bytes;
  l.dependent = dependent;
  g_launch = &l;
  struct ClearOnExit {
    ~ClearOnExit() { g_launch = nullptr; }
  } clear_on_exit;
  check_launch_configuration(l);
  l.threads = block.x * block.y * block.z;
  l.fibers.resize(l.threads);
  g_stacks.reserve(l.threads);
  gridDim = grid;
  blockDim = block;
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order;
  if (g_block_order_seed != 0) {
    order.resize(blocks);
    std::iota(order.begin(), order.end(), uint64_t(0));
    std::mt19937_64 rng(g_block_order_seed);
    for (uint64_t i = blocks; i > 1; --i) std::swap(order[i - 1], order[rng() % i]);  // Fisher-Yates
  }
  for (uint64_t i = 0; i < blocks; ++i) {
    const uint64_t b = order.empty() ? i : order[i];
    blockIdx = UInt3{unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / grid.x / grid.y)};
    run_block();
  }
}

void set_block_order(uint64_t seed) {
  std::lock_guard<std::mutex> serialise(g_launch_mutex);
  g_block_order_seed = seed;
}

uint64_t relaxed_load_u64(const uint64_t* address) {
  check_dependency_waited("ld.relaxed.gpu");
  const uint64_t now = *address;
  if (!g_stale_relaxed_loads) return now;
  return g_launch->first_relaxed_loads.emplace(address, now).first->second;
}

void set_stale_relaxed_loads(bool stale) {
  std::lock_guard<std::mutex> serialise(g_launch_mutex);
  g_stale_relaxed_loads = stale;
}

char* shared_memory() { return g_launch->smem.get(); }
size_t shared_memory_bytes() { return g_launch->smem_bytes; }

void check_shared_range(const void* address, size_t bytes, size_t alignment, const char* what) {
  const auto base = reinterpret_cast<uintptr_t>(g_launch->smem.get());
  const auto a = reinterpret_cast<uintptr_t>(address);
  const size_t size = g_launch->smem_bytes;
  if (a < base || a - base > size || size - (a - base) < bytes) {
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "%s: shared-memory access of %zu bytes at %p is out of range (block's dynamic shared memory is "
                  "%zu bytes at %p; offset %lld)",
                  what, bytes, address, size, reinterpret_cast<void*>(base),
                  static_cast<long long>(a) - static_cast<long long>(base));
    fail(buf);
  }
  if ((a - base) % alignment != 0)
    fail(std::string(what) + ": shared-memory address at offset " + std::to_string(a - base) + " is not " +
         std::to_string(alignment) + "-byte aligned");
}

void syncthreads() {
  Launch& l = *g_launch;
  Fiber& f = current();
  if (l.exited > 0)
    fail("__syncthreads reached after " + std::to_string(l.exited) +
         " threads of the block exited (the barrier is never reached by every thread of the block)");
  const unsigned warp_base = f.linear / kWarpSize * kWarpSize;
  for (unsigned i = warp_base; i < warp_base + kWarpSize && i < l.threads; ++i) {
    if (l.fibers[i].state == ThreadState::at_collective)
      fail("__syncthreads while lane " + std::to_string(i - warp_base) + " of the same warp waits at " +
           l.fibers[i].op_name + " (divergent warp)");
  }
  f.state = ThreadState::at_barrier;
  if (++l.waiting_at_barrier == l.threads) {
    for (Fiber& other : l.fibers) other.state = ThreadState::ready;
    l.waiting_at_barrier = 0;
    ++l.barrier_generation;
    return;
  }
  yield_to_scheduler(false);
}

unsigned linear_thread_index() { return current().linear; }
unsigned lane_id() { return current().linear % kWarpSize; }

namespace {

// One collective of the running thread's group: the kGroup threads (32: a warp, 128: a warpgroup
// of 4 consecutive warps) with linear indices [linear / kGroup * kGroup, + kGroup). Parks the
// thread until the whole group arrived at the same instruction; the last one to arrive runs
// compute(inputs, outputs) for all of them and releases them.
template <unsigned kGroup, typename Compute>
void group_collective(const char* name, const void* input, void* output, Compute compute) {
  Launch& l = *g_launch;
  Fiber& f = current();
  const char* group_name = kGroup == kWarpSize ? "warp" : "warpgroup";
  if (l.threads % kGroup != 0)
    fail(std::string(name) + " in a block of " + std::to_string(l.threads) + " threads: " + group_name +
         " collectives need a block size that is a multiple of " + std::to_string(kGroup));
  const unsigned group_base = f.linear / kGroup * kGroup;
  unsigned arrived = 1;
  for (unsigned i = group_base; i < group_base + kGroup; ++i) {
    const Fiber& other = l.fibers[i];
    if (&other == &f) continue;
    const std::string thread = (kGroup == kWarpSize ? "lane " : "thread ") + std::to_string(i - group_base);
    switch (other.state) {
      case ThreadState::exited:
        fail(std::string(name) + " needs all " + std::to_string(kGroup) + " threads of its " + group_name + ", but " +
             thread + " of this " + group_name + " has exited");
      case ThreadState::at_barrier:
        fail(std::string(name) + " while " + thread + " of the same " + group_name +
             " waits at __syncthreads (divergent " + group_name + ")");
      case ThreadState::at_collective:
        if (std::strcmp(other.op_name, name) == 0) {
          ++arrived;
          break;
        }
        // Another warp of a warpgroup may still be at one of its own warp collectives on its way.
        if (kGroup == kWarpSize || other.op_group == kGroup || i / kWarpSize == f.linear / kWarpSize)
          fail(std::string(kGroup == kWarpSize ? "lanes of one warp" : "threads of one warpgroup") +
               " at different collectives: this " + (kGroup == kWarpSize ? "lane" : "thread") + " at " + name + ", " +
               thread + " at " + other.op_name);
        break;
      case ThreadState::ready:
      case ThreadState::at_mbarrier:  // will come on to this collective once its phase completes
        break;
    }
  }
  f.op_name = name;
  f.op_group = kGroup;
  f.input = input;
  f.output = output;
  f.state = ThreadState::at_collective;
  if (arrived < kGroup) {
    yield_to_scheduler(false);
    return;
  }
  const void* inputs[kGroup];
  void* outputs[kGroup];
  for (unsigned i = 0; i < kGroup; ++i) {
    inputs[i] = l.fibers[group_base + i].input;
    outputs[i] = l.fibers[group_base + i].output;
  }
  compute(inputs, outputs);
  for (unsigned i = group_base; i < group_base + kGroup; ++i) {
    l.fibers[i].state = ThreadState::ready;
    l.fibers[i].op_name = nullptr;
  }
}

}  // namespace

void warp_collective(const WarpOp& op, const void* input, void* output) {
  group_collective<kWarpSize>(op.name, input, output, op.compute);
}

void warpgroup_collective(const WarpgroupOp& op, const void* input, void* output) {
  group_collective<kWarpgroupSize>(op.name, input, output, op.compute);
}

uint32_t shared_window_address(const void* address) {
  check_shared_range(address, 0, 1, "cvta.to.shared");
  return static_cast<uint32_t>(static_cast<const char*>(address) - g_launch->smem.get());
}

void wgmma_fence() { current().wgmma_fenced = true; }

const void* wgmma_accumulator_input(const void* d, const char* what) {
  Fiber& f = current();
  if (!f.wgmma_fenced)
    fail(std::string(what) + " without a wgmma.fence since the thread's last wgmma.wait_group or ldmatrix: the "
         "registers it reads (accumulators, A fragment, metadata) must be fenced after other instructions wrote them");
  const void* newest = d;
  f.wgmma_results.for_each_pending([&](const PendingAccumulator& result) {
    if (result.d == d) newest = result.bytes.data();
  });
  return newest;
}

size_t wgmma_read_shared(uint32_t begin, uint32_t end, const char* what) {
  Launch& l = *g_launch;
  for (const Fiber& f : l.fibers)
    f.copies.for_each_pending([&](const PendingCopy& c) {
      const auto offset = static_cast<uint32_t>(c.dst - l.smem.get());
      if (offset < end && offset + sizeof c.bytes > begin)
        fail(std::string(what) + " reads shared-memory bytes [" + std::to_string(offset) + ", " +
             std::to_string(offset + sizeof c.bytes) + ") that a cp.async of thread " + std::to_string(f.linear) +
             " still in flight writes (it must be waited for, fenced and published by a barrier first)");
    });
  for (const auto& [at, bar] : l.mbarriers)
    for (const PendingBulkCopy& copy : bar.copies)
      if (copy.dst < end && copy.dst + copy.bytes.size() > begin)
        fail(std::string(what) + " reads shared-memory bytes [" + std::to_string(copy.dst) + ", " +
             std::to_string(copy.dst + copy.bytes.size()) + ") that a TMA copy still in flight writes (wait on "
             "the mbarrier at offset " + std::to_string(at) + " first)");
  for (uint32_t chunk = begin / 16; chunk < (end + 15) / 16; ++chunk) {
    const int writer = l.unfenced_writer[chunk];
    if (writer >= 0)
      fail(std::string(what) + " reads shared-memory bytes [" + std::to_string(16 * chunk) + ", " +
           std::to_string(16 * chunk + 16) + ") that thread " + std::to_string(writer) + " wrote (cp.async or "
           "st.shared) and has not fenced to the async proxy (fence.proxy.async.shared::cta after its "
           "cp.async.wait_group or store, before the barrier)");
  }
  l.wgmma_reads.push_back(WgmmaRead{begin, end, kWarpgroupSize});
  return l.wgmma_reads.size() - 1;
}

void wgmma_issue(void* d, const void* result, size_t bytes, size_t read, std::vector<WgmmaRegister> registers) {
  const auto* begin = static_cast<const unsigned char*>(result);
  current().wgmma_results.issue(
      PendingAccumulator{d, std::vector<unsigned char>(begin, begin + bytes), read, std::move(registers)});
  // In flight: reading the registers now is undefined. A pattern no result is likely to hold
  // (a NaN as f32, 2142951341 as s32).
  for (size_t i = 0; i + 4 <= bytes; i += 4) std::memcpy(static_cast<char*>(d) + i, &kInFlightPoison, 4);
}

void wgmma_operands_written() { current().wgmma_fenced = false; }

void fence_proxy_async() {
  Fiber& f = current();
  for (const uint32_t chunk : f.unfenced_chunks)
    if (g_launch->unfenced_writer[chunk] == static_cast<int>(f.linear)) g_launch->unfenced_writer[chunk] = -1;
  f.unfenced_chunks.clear();
}

void st_shared_16(void* dst, const void* bytes) {
  check_shared_range(dst, 16, 16, "st.shared.v4.b32");
  Launch& l = *g_launch;
  const auto offset = static_cast<uint32_t>(static_cast<char*>(dst) - l.smem.get());
  check_not_read_by_wgmma(offset, 16, "st.shared.v4.b32");
  check_not_mbarrier(offset, 16, "st.shared.v4.b32");
  std::memcpy(dst, bytes, 16);
  Fiber& f = current();
  l.unfenced_writer[offset / 16] = static_cast<int>(f.linear);
  f.unfenced_chunks.push_back(offset / 16);
}

void wgmma_commit() { current().wgmma_results.commit(); }

void wgmma_wait(int pending) {
  Fiber& f = current();
  Launch& l = *g_launch;
  f.wgmma_results.wait(static_cast<size_t>(pending), [&](const PendingAccumulator& result) {
    for (const WgmmaRegister& reg : result.registers)
      if (*reg.at != reg.value)
        fail("wgmma.wait_group: a register that a wgmma of thread " + std::to_string(f.linear) + " reads (its "
             "metadata word or A fragment) went from " + std::to_string(reg.value) + " to " + std::to_string(*reg.at) +
             " while the wgmma was in flight; the hardware reads it until the op retires");
    std::memcpy(result.d, result.bytes.data(), result.bytes.size());
    --l.wgmma_reads[result.read].holders;
  });
  while (l.first_live_read < l.wgmma_reads.size() && l.wgmma_reads[l.first_live_read].holders == 0)
    ++l.first_live_read;
  f.wgmma_fenced = false;
}

void cp_async_16(void* dst, const void* src, bool pred) {
  check_dependency_waited("cp.async.cg.shared.global");
  check_shared_range(dst, 16, 16, "cp.async.cg.shared.global (destination)");
  check_not_read_by_wgmma(static_cast<uint32_t>(static_cast<char*>(dst) - g_launch->smem.get()), 16,
                          "cp.async.cg.shared.global");
  check_not_mbarrier(static_cast<uint32_t>(static_cast<char*>(dst) - g_launch->smem.get()), 16,
                     "cp.async.cg.shared.global");
  PendingCopy copy;
  copy.dst = static_cast<char*>(dst);
  if (pred) {
    if (reinterpret_cast<uintptr_t>(src) % 16 != 0)
      fail("cp.async.cg.shared.global: global source address is not 16-byte aligned");
    check_readable(src, 16, "cp.async.cg.shared.global");
    std::memcpy(copy.bytes, src, sizeof copy.bytes);
  } else {
    std::memset(copy.bytes, 0, sizeof copy.bytes);
  }
  current().copies.issue(copy);
}

void cp_async_commit() { current().copies.commit(); }

void cp_async_wait(int pending) { land_copies(current(), static_cast<size_t>(pending)); }

void grid_dependency_wait() { current().dependency_waited = true; }

void check_dependency_waited(const char* what) {
  if (g_launch->dependent && !current().dependency_waited)
    fail(std::string(what) + " before griddepcontrol.wait in a dependent launch: the kernel before it on the "
         "stream may still be writing what it accesses");
}

void prefetch_l2(const void* src) { check_readable(src, 1, "prefetch.global.L2"); }

namespace {

// The mbarrier at `bar` for instruction `what`: initialised, and published to this thread.
Mbarrier& find_mbarrier(void* bar, const char* what) {
  check_shared_range(bar, 8, 8, what);
  Launch& l = *g_launch;
  const auto offset = static_cast<uint32_t>(static_cast<char*>(bar) - l.smem.get());
  const auto found = l.mbarriers.find(offset);
  if (found == l.mbarriers.end())
    fail(std::string(what) + " on shared-memory offset " + std::to_string(offset) +
         ", where no mbarrier was initialised");
  Mbarrier& m = found->second;
  if (current().linear != m.init_thread && l.barrier_generation == m.init_generation)
    fail(std::string(what) + " on the mbarrier at offset " + std::to_string(offset) + " that thread " +
         std::to_string(m.init_thread) + " initialised with no __syncthreads since (the init is not yet visible)");
  return m;
}

}  // namespace

void mbarrier_init(void* bar, unsigned arrivals) {
  check_shared_range(bar, 8, 8, "mbarrier.init");
  if (arrivals == 0 || arrivals > (1u << 20) - 1) fail("mbarrier.init: arrival count must be 1 .. 2^20 - 1");
  Launch& l = *g_launch;
  const auto offset = static_cast<uint32_t>(static_cast<char*>(bar) - l.smem.get());
  check_not_read_by_wgmma(offset, 8, "mbarrier.init");
  const auto existing = l.mbarriers.find(offset);
  if (existing != l.mbarriers.end() && !existing->second.copies.empty())
    fail("mbarrier.init on the mbarrier at offset " + std::to_string(offset) + " while TMA copies signal it");
  for (const auto& [at, other] : l.mbarriers) {
    (void)other;
    if (at != offset && offset < at + 8 && at < offset + 8) fail("mbarrier.init overlaps the mbarrier at offset " +
                                                                 std::to_string(at));
  }
  Mbarrier m;
  m.expected = m.pending = arrivals;
  m.init_thread = current().linear;
  m.init_generation = l.barrier_generation;
  l.mbarriers[offset] = std::move(m);
  std::memset(bar, 0, 8);  // an opaque state word on the device; nothing may read it as data
}

void mbarrier_arrive(void* bar, uint32_t tx_bytes) {
  Mbarrier& m = find_mbarrier(bar, tx_bytes > 0 ? "mbarrier.arrive.expect_tx" : "mbarrier.arrive");
  if (m.pending == 0) fail("mbarrier.arrive: more arrivals than the phase expects");
  m.tx += tx_bytes;
  --m.pending;
  complete_phase_if_done(m);
}

void mbarrier_wait_parity(void* bar, unsigned parity) {
  Mbarrier& m = find_mbarrier(bar, "mbarrier.try_wait.parity");
  Fiber& f = current();
  f.wait_bar = static_cast<uint32_t>(static_cast<char*>(bar) - g_launch->smem.get());
  f.wait_parity = parity & 1;
  land_bulk_copies(m);
  if ((m.phase & 1) != f.wait_parity) return;
  f.state = ThreadState::at_mbarrier;
  yield_to_scheduler(false);  // resumed once mbarrier_wait_done(f)
}

namespace {

// Throws unless `map` keeps cuTensorMapEncodeTiled's rules for what the kernels use; returns the
// bytes of one box.
uint64_t checked_box_bytes(const TensorMap2d& map, const char* what) {
  const uint32_t eb = map.element_bytes, span = map.swizzle_bytes;
  const uint64_t row_bytes = uint64_t(map.box[0]) * eb;
  if ((eb != 1 && eb != 2 && eb != 4 && eb != 8) || map.box[0] == 0 || map.box[1] == 0 || map.box[0] > 256 ||
      map.box[1] > 256 || row_bytes % 16 != 0 || map.row_stride % 16 != 0 ||
      reinterpret_cast<uintptr_t>(map.base) % 16 != 0 || map.dims[0] == 0 || map.dims[1] == 0)
    fail(std::string(what) + ": invalid tensor map (element bytes 1/2/4/8, box 1 .. 256 with 16-byte rows, "
         "16-byte aligned base and row stride, non-empty tensor)");
  if (span != 0 && span != 32 && span != 64 && span != 128)
    fail(std::string(what) + ": swizzle must be 0, 32, 64 or 128 bytes, got " + std::to_string(span));
  if (span != 0 && row_bytes != span)
    fail(std::string(what) + ": the model covers swizzled boxes whose rows are one swizzle span (" +
         std::to_string(span) + " bytes), not " + std::to_string(row_bytes));
  return row_bytes * map.box[1];
}

// Calls visit(r, first, last, source) for each row r of the box of (checked) `map` at (c0, c1)
// with elements [first, last) inside the tensor (source: the global address of element first),
// once their bytes passed the launch's ReadableBuffers.
template <typename Visit>
void visit_box_rows(const TensorMap2d& map, int32_t c0, int32_t c1, const char* what, Visit visit) {
  const uint32_t eb = map.element_bytes;
  // The box's first element along the contiguous dimension must sit a whole 16 bytes into its rows:
  // on an H200 a box at byte 40 stopped the copy with an illegal instruction (bench/results
  // 2026-11-27-H200-run19), as tilelang's issue 2527 saw for the store on an H100.
  if ((int64_t(c0) * eb) % 16 != 0)
    fail(std::string(what) + ": the box starts " + std::to_string(int64_t(c0) * eb) + " bytes into its rows (c0 = " +
         std::to_string(c0) + "); the hardware takes only whole 16 bytes");
  const auto* base = static_cast<const unsigned char*>(map.base);
  for (uint32_t r = 0; r < map.box[1]; ++r) {
    const int64_t row = int64_t(c1) + r;
    const int64_t first = std::max<int64_t>(c0, 0);
    const int64_t last = std::min<int64_t>(int64_t(c0) + map.box[0], int64_t(map.dims[0]));
    if (row < 0 || row >= int64_t(map.dims[1]) || first >= last) continue;  // zeros
    const unsigned char* source = base + uint64_t(row) * map.row_stride + uint64_t(first) * eb;
    check_readable(source, size_t(last - first) * eb, what);
    visit(r, first, last, source);
  }
}

}  // namespace

void bulk_tensor_load_2d(void* dst, const TensorMap2d& map, int32_t c0, int32_t c1, void* bar) {
  const char* what = "cp.async.bulk.tensor.2d";
  check_dependency_waited(what);
  const uint64_t bytes = checked_box_bytes(map, what);
  const uint32_t span = map.swizzle_bytes;
  check_shared_range(dst, bytes, span != 0 ? 8 * span : 128, what);
  Launch& l = *g_launch;
  const auto offset = static_cast<uint32_t>(static_cast<char*>(dst) - l.smem.get());
  check_not_read_by_wgmma(offset, static_cast<uint32_t>(bytes), what);
  check_not_mbarrier(offset, static_cast<uint32_t>(bytes), what);
  Mbarrier& m = find_mbarrier(bar, what);
  int64_t unclaimed = m.tx;  // announced bytes no copy in flight accounts for yet
  for (const PendingBulkCopy& copy : m.copies) unclaimed -= static_cast<int64_t>(copy.bytes.size());
  if (unclaimed < static_cast<int64_t>(bytes))
    fail(std::string(what) + ": a copy of " + std::to_string(bytes) + " bytes onto an mbarrier whose current phase "
         "has " + std::to_string(std::max<int64_t>(unclaimed, 0)) + " announced bytes left (mbarrier.arrive.expect_tx "
         "must announce them first, or the phase may complete before the copy lands)");
  const uint32_t eb = map.element_bytes;
  const uint64_t row_bytes = uint64_t(map.box[0]) * eb;
  const uint32_t swizzle_mask = span != 0 ? span / 16 - 1 : 0;
  std::vector<unsigned char> box(bytes, 0);
  visit_box_rows(map, c0, c1, what, [&](uint32_t r, int64_t first, int64_t last, const unsigned char* source) {
    for (int64_t col = first; col < last; ++col) {
      // Where the element lands unswizzled; the swizzle moves its 16-byte chunk within 8 spans.
      const uint64_t linear = offset + r * row_bytes + uint64_t(col - c0) * eb;
      const uint64_t swizzled = linear ^ (((linear >> 7) & swizzle_mask) << 4);
      std::memcpy(&box[swizzled - offset], source + (col - first) * eb, eb);
    }
  });
  std::memset(dst, 0xFF, bytes);  // in flight: undefined until it lands
  m.copies.push_back(PendingBulkCopy{offset, std::move(box)});
}

void bulk_tensor_prefetch_2d(const TensorMap2d& map, int32_t c0, int32_t c1) {
  const char* what = "cp.async.bulk.prefetch.tensor.2d.L2";
  checked_box_bytes(map, what);
  visit_box_rows(map, c0, c1, what, [](uint32_t, int64_t, int64_t, const unsigned char*) {});
}

}  // namespace emu
}  // namespace sparsegemm
