// SIMT emulator: runs the CUDA kernel sources of csrc/cuda on the CPU (tests only, DESIGN.md
// "Verification without a GPU"). Kernel code never calls this header directly: it goes through
// cuda/arch/portability.cuh and cuda/arch/warp_ops.cuh, whose host branches forward here.
//
// Execution model
// - A launch runs its blocks one after another on the calling OS thread, in increasing linear
//   block index (x fastest) unless set_block_order asks for a shuffled order: the hardware
//   promises no order, so tests run kernels whose blocks cooperate under several. Inside a block every
//   CUDA thread is a fiber with its own stack; the lowest-numbered thread that can run runs, and
//   fibers switch only at __syncthreads, warp collectives, mbarrier waits and exit, so
//   everything between two such points is atomic (no data race can be observed, and none is
//   reported: use compute-sanitizer racecheck). Low warps thus run ahead of high ones as far as
//   the kernel's synchronisation allows, the order that exposes a missing wait.
// - Warps are formed from the linear thread index x + y*Dx + z*Dx*Dy, as on the hardware.
// - __syncthreads releases once every thread of the block waits there; a thread that exits while
//   others wait (or waits after another exited) is an error, as is any other deadlock.
// - Warp collectives (shuffles, ballot, ldmatrix, mma.sp) wait until all 32 lanes arrive, then
//   compute every lane's result at once. Lanes of one warp at different collectives, or with
//   different qualifiers, are an error; so is a block size that is not a multiple of 32.
//   Warpgroup collectives (wgmma: 4 consecutive warps from a warp index divisible by 4) likewise
//   wait for all 128 threads; meanwhile other warps of the warpgroup may still pass their own
//   warp collectives. wgmma's asynchronous results are modelled below (wgmma_issue).
// - Dynamic shared memory is allocated per block with exactly the launch's byte count (so
//   AddressSanitizer sees overruns) and filled with 0xFF bytes (NaN for f16/bf16/f32), because
//   real shared memory starts with stale contents.
// - cp.async copies read global memory at issue but land in shared memory only when a
//   cp.async.wait_group retires their group (or at thread exit), so a missing wait shows up as
//   0xFF poison in what the kernel reads. Their sources must lie in the buffers the launch
//   declared readable (ReadableBuffers, below), so that a copy past the end of an operand fails.
// Under AddressSanitizer (build with -fsanitize=address; from Python preload libasan and
// libstdc++) fiber switches are annotated, so global and shared-memory overruns are reported.
// Every error is a std::runtime_error naming the kernel, the block and the thread or warp; errors
// raised inside a fiber are carried to the launching thread and rethrown there. Launches are
// serialised by a mutex: the emulator is not reentrant.
#pragma once
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace sparsegemm {
namespace emu {

struct UInt3 {
  unsigned x = 0, y = 0, z = 0;
};

struct Dim3 {
  unsigned x, y, z;
  constexpr Dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// CUDA's built-in variables for the fiber that is running. The scheduler rewrites them at every
// switch; launches are serialised, so plain globals suffice.
extern UInt3 threadIdx;
extern UInt3 blockIdx;
extern Dim3 blockDim;
extern Dim3 gridDim;

// Runs `body(context)` once per thread of every block of the grid (see the execution model).
// `kernel_name` appears in error messages; `smem_bytes` is the dynamic shared memory per block.
using ThreadBody = void (*)(void* context);
void run_grid(const std::string& kernel_name, Dim3 grid, Dim3 block, size_t smem_bytes, ThreadBody body,
              void* context, bool dependent);

// Order of the blocks of every later launch: seed 0 = increasing linear block index (the
// default); any other seed = a fixed pseudo-random permutation of the grid drawn from it.
void set_block_order(uint64_t seed);

// ld.relaxed.gpu of a 64-bit global word (warp_ops.cuh load_relaxed_gpu). Blocks run one after
// another, so a plain read would always see the other blocks' atomics; on the hardware a relaxed
// load with nothing ordering it may return an older value of the word. With stale loads on
// (set_stale_relaxed_loads, for every later launch), each such load returns the value the launch
// first read at that address, so that code after a stale read (a failed compare-and-swap and its
// retry) runs here too.
uint64_t relaxed_load_u64(const uint64_t* address);
void set_stale_relaxed_loads(bool stale);

// The kernel's name from the text of an sg_launch argument list ("gemm<Cfg>, grid, ..." -> "gemm<Cfg>").
std::string kernel_name_from_launch_text(const char* launch_text);

// Host form of `kernel<<<grid, block, smem_bytes>>>(args...)`: arguments are converted to the
// kernel's parameter types once, as a real launch copies them into the parameter buffer.
// `dependent`: a programmatic dependent launch (see grid_dependency_wait).
template <typename... KernelParams, typename... Args>
void launch(const char* launch_text, bool dependent, void (*kernel)(KernelParams...), Dim3 grid, Dim3 block,
            size_t smem_bytes, Args&&... args) {
  static_assert(sizeof...(KernelParams) == sizeof...(Args), "sg_launch: argument count differs from the kernel's");
  struct Bound {
    void (*kernel)(KernelParams...);
    std::tuple<std::decay_t<KernelParams>...> params;
  };
  Bound bound{kernel, std::tuple<std::decay_t<KernelParams>...>(std::forward<Args>(args)...)};
  run_grid(kernel_name_from_launch_text(launch_text), grid, block, smem_bytes,
           [](void* context) {
             auto* b = static_cast<Bound*>(context);
             std::apply(b->kernel, b->params);
           },
           &bound, dependent);
}

// ---- what the running thread may call -----------------------------------------------------

// This block's dynamic shared memory and its size in bytes.
char* shared_memory();
size_t shared_memory_bytes();

// Throws unless [address, address + bytes) lies in this block's shared memory and `address` is a
// multiple of `alignment`. `what` names the instruction for the message.
void check_shared_range(const void* address, size_t bytes, size_t alignment, const char* what);

void syncthreads();

// Linear index of the running thread in its block, and its lane in its warp.
unsigned linear_thread_index();
unsigned lane_id();

// One warp-collective instruction: once all 32 lanes of a warp called warp_collective with the
// same op, `compute` runs once with every lane's input and output (indexed by lane). Ops are
// compared by name, so a name must spell out every qualifier (shape, selector, .trans, ...).
struct WarpOp {
  const char* name;
  void (*compute)(const void* const lane_inputs[32], void* const lane_outputs[32]);
};
void warp_collective(const WarpOp& op, const void* input, void* output);

// The same for a warpgroup (PTX wgmma): the 128 threads of 4 consecutive warps starting at a
// warp index divisible by 4 must all arrive at the same op; `compute` gets their inputs and
// outputs indexed by thread (warp w of the warpgroup: threads 32w .. 32w + 31).
struct WarpgroupOp {
  const char* name;
  void (*compute)(const void* const thread_inputs[128], void* const thread_outputs[128]);
};
void warpgroup_collective(const WarpgroupOp& op, const void* input, void* output);

// The shared-state-space address of a pointer into this block's dynamic shared memory (PTX
// cvta.to.shared): its offset here, as if the dynamic shared memory started at address 0 (on the
// device it starts at an address the kernel aligns for wgmma's swizzles, cuda/arch/warp_ops.cuh).
uint32_t shared_window_address(const void* address);

// wgmma.mma_async model. The instruction runs asynchronously on the device: its accumulator
// registers are undefined until a wgmma.wait_group retires its group. Here a thread's wgmma
// (warp_models.h) computes its result at issue from wgmma_accumulator_input(d) - the newest
// result still in flight for the same accumulators `d` (wgmma ops into the same registers run in
// issue order), else d's current bits - and hands it to wgmma_issue, which keeps it pending and
// poisons d (0x7FBADBAD words: NaN as f32, no plausible s32 sum), so a read before the wait shows
// up in the results.
// wgmma_commit closes the thread's group, wgmma_wait(N) writes back all but the newest N groups.
// A wgmma without a wgmma_fence since the thread's last wgmma_wait or ldmatrix
// (wgmma_operands_written; its other register writes are invisible here), or since its start, is
// an error: PTX wants the registers a wgmma reads fenced after other instructions wrote them. So
// is a thread exiting with results in flight. `what` names the instruction for messages.
// The other registers a wgmma reads (its metadata word, the A fragment of the register form) are
// read while it is in flight too (an H200 read metadata words loaded after the issue:
// bench/results/2026-11-27-H200-run19): wgmma_issue takes their addresses and values at issue, and
// wgmma_wait fails where one changed before the op retired.
// Shared memory: the warpgroup op declares the span [begin, end) (offsets) of the bytes it reads
// with wgmma_read_shared, which fails if any thread's cp.async into the span is still in flight
// (not yet waited for: it may land while the wgmma reads), or landed (or a st_shared_16 wrote
// there) and its thread has not run fence_proxy_async since (PTX: generic-proxy writes need an
// async-proxy fence before wgmma reads them), and returns the read's id for wgmma_issue; until
// every thread of the warpgroup retired the op, a cp.async or store into the span is an error.
const void* wgmma_accumulator_input(const void* d, const char* what);
size_t wgmma_read_shared(uint32_t begin, uint32_t end, const char* what);
struct WgmmaRegister {
  const uint32_t* at;
  uint32_t value;  // at issue
};
void wgmma_issue(void* d, const void* result, size_t bytes, size_t read, std::vector<WgmmaRegister> registers);
void wgmma_fence();
void wgmma_operands_written();
void wgmma_commit();
void wgmma_wait(int pending);
// fence.proxy.async.shared::cta: the running thread's landed cp.async writes and its shared
// stores (st_shared_16) are fenced.
void fence_proxy_async();

// A 16-byte shared-memory store (st.shared.v4.b32) of `bytes` to 16-byte aligned `dst`: written at
// once, and like a landed cp.async an unfenced write of this thread for wgmma_read_shared; an error
// into bytes a wgmma in flight reads.
void st_shared_16(void* dst, const void* bytes);

// cp.async model (see the execution model): 16 bytes from global `src` (not read when !pred:
// zeros instead) to shared `dst`, deferred until its commit group is waited for.
void cp_async_16(void* dst, const void* src, bool pred);
void cp_async_commit();
// Completes all but the newest `pending` committed groups (cp.async.wait_group semantics).
void cp_async_wait(int pending);

// mbarrier (PTX ISA "mbarrier", sm_80; transaction counts sm_90): an 8-byte object in shared memory
// with an expected arrival count, a pending arrival count, a transaction byte count and a phase.
// A phase completes once every expected arrival came and the transaction count is back at 0; the
// pending count then starts over for the next phase. Here the state lives beside shared memory,
// keyed by the object's offset: a cp.async, store or TMA copy into a live mbarrier's 8 bytes is an
// error, and so is a thread other than the initialising one using it before a __syncthreads that
// follows mbarrier_init (the init is a plain store on the device).
void mbarrier_init(void* bar, unsigned arrivals);
// mbarrier.arrive (tx_bytes 0) or mbarrier.arrive.expect_tx (tx_bytes more expected first).
void mbarrier_arrive(void* bar, uint32_t tx_bytes);
// A loop of mbarrier.try_wait.parity: returns once the phase of parity `parity` has completed,
// i.e. the current phase's parity differs (so parity 1 passes at once on a fresh mbarrier). The
// thread is parked meanwhile, a switch point like __syncthreads; if no thread can move, that is a
// deadlock. Before each check the TMA copies signalling this mbarrier land (bulk_tensor_load_2d).
void mbarrier_wait_parity(void* bar, unsigned parity);

// A 2D tensor map (the emulator's CUtensorMap, cuTensorMapEncodeTiled's arguments): dims[0]
// elements of element_bytes along the contiguous dimension, dims[1] rows row_stride bytes apart;
// a copy moves a box of box[0] x box[1] elements; swizzle_bytes 0 (none), 32, 64 or 128.
struct TensorMap2d {
  const void* base = nullptr;
  uint32_t element_bytes = 0;
  uint64_t dims[2] = {0, 0};
  uint64_t row_stride = 0;
  uint32_t box[2] = {0, 0};
  uint32_t swizzle_bytes = 0;
};
// cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes: the box whose
// first element is (c0, c1) to shared `dst` (128-byte aligned; 8 swizzle spans aligned when
// swizzled), box row r at dst + r * box[0] * element_bytes, each 16-byte chunk moved within its
// span by the swizzle: address bits [4, 4 + log2(swizzle_bytes / 16)) XOR bits [7, ...) (the
// CU_TENSOR_MAP_SWIZZLE_* patterns, CUTLASS Swizzle<b, 4, 3>). Elements outside the tensor are
// zeros. The source is read at issue (inside the launch's ReadableBuffers); the destination holds
// 0xFF bytes until the copy lands, which is when a thread waits on `bar` (mbarrier_wait_parity):
// the copy then takes its box bytes off the transaction count, so a read before that wait, or a
// rewrite of a stage that a slower thread still reads, shows up as poison. A copy whose bytes the
// mbarrier's current phase has not announced (mbarrier_arrive with tx_bytes, before the copy: the
// order PTX programs use; the device allows the reverse) and a block ending with a copy in flight
// are errors.
void bulk_tensor_load_2d(void* dst, const TensorMap2d& map, int32_t c0, int32_t c1, void* bar);
// cp.async.bulk.prefetch.tensor.2d.L2.global.tile: no effect on results; the box's bytes inside
// the tensor must lie in the launch's ReadableBuffers, as bulk_tensor_load_2d's.
void bulk_tensor_prefetch_2d(const TensorMap2d& map, int32_t c0, int32_t c1);

// Programmatic dependent launch (PTX griddepcontrol, sm_90): a dependent launch may start while
// the kernel before it on the stream still runs, so its threads must not read what that kernel
// writes until griddepcontrol.wait returns. Launches here run one after another, so the wait has
// nothing to wait for; it records that this thread waited, and in a dependent launch a global
// access the emulator sees (cp.async, ld.global.cg, atomics: check_dependency_waited) before it
// is an error. Before the wait the kernels may only prefetch weights into L2, which cannot
// observe a stale value; their plain C++ loads and stores are not seen here.
void grid_dependency_wait();
// Throws when the running thread of a dependent launch has not called grid_dependency_wait;
// `what` names the access for the message.
void check_dependency_waited(const char* what);
// prefetch.global.L2 of the line holding `src`: no effect on results, but the address must lie
// in a buffer the launch may read (ReadableBuffers, below), as a cp.async source must.
void prefetch_l2(const void* src);

// Global buffers the launches that follow may read through cp.async (the host side of a launch
// declares them: the GEMM's Wc, kernel metadata and X). While a ReadableBuffers lives on this OS
// thread, a cp.async whose 16 source bytes do not lie inside one of them is an error naming the
// buffers: a kernel must never read past a buffer, the GPU would read a neighbour's data or fault
// (compute-sanitizer memcheck finds it there; the emulator's other global accesses are plain C++
// and unchecked). Not nestable; without one, cp.async sources are not checked.
struct ReadableBuffer {
  const void* begin;
  size_t bytes;
  const char* name;
};
class ReadableBuffers {
 public:
  ReadableBuffers(std::initializer_list<ReadableBuffer> buffers);
  explicit ReadableBuffers(const std::vector<ReadableBuffer>& buffers);
  ~ReadableBuffers();
  ReadableBuffers(const ReadableBuffers&) = delete;
  ReadableBuffers& operator=(const ReadableBuffers&) = delete;
};

// Throws std::runtime_error(message); for instruction models that find illegal operands.
[[noreturn]] void fail(const std::string& message);

}  // namespace emu
}  // namespace sparsegemm
