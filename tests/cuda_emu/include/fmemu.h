// fmemu: runs fastmed's CUDA C++ kernels on the CPU, for tests on machines without a GPU.
//
// The .cu files are compiled by the host C++ compiler with this header in place of the CUDA headers
// (tests/cuda_emu/build.py rewrites `k<<<grid, block, smem, stream>>>(args)` into a call of
// fmemu::launch). A launch runs its blocks one after the other; the threads of a block are fibers
// (ucontext) that run until they finish or wait at a barrier:
//   - __syncthreads(): every thread of the block must arrive; a thread that has exited while others
//     wait, or a warp split between a barrier and a shuffle, is reported as an error (on a GPU such
//     code hangs or is undefined);
//   - __shfl_xor_sync(0xffffffff, ...): the 32 lanes of the warp meet, then each reads its partner's
//     value (other masks, and warps of fewer than 32 threads, are reported as errors);
//   - __shared__ variables are statics (one block runs at a time; build.py registers each one) and
//     dynamic shared memory is a buffer of exactly the launch's size (AddressSanitizer sees an
//     overrun); both are filled with 0xFF bytes (NaN, -1) at the start of every block, so a read of
//     shared memory no thread of the block wrote shows;
//   - launch configurations are checked as the CUDA runtime checks them (block size, grid size, the
//     48 KiB default limit on shared memory, static and dynamic): a bad one is reported through
//     cudaGetLastError() (a static part too large: once the kernel has declared it).
// The order in which blocks, and the ready threads of a block, run can be shuffled
// (FMEMU_SCHEDULE=<seed>, read at each launch; 0 or unset: in order), so a result that depends on
// the order of blocks or of threads between two barriers shows up as a difference between two
// seeds. A thread runs uninterrupted from one barrier to the next and blocks one after the other, so
// an unsynchronised read-modify-write (a missing atomic) still gives the right sum; races are the
// FMEMU_TSAN build's (-fsanitize=thread): every thread of a block is a ThreadSanitizer fiber, ordered
// only by what orders it on a GPU (its block's __syncthreads, atomics, the end of a launch), and
// each block gets fresh shared memory, so ThreadSanitizer reports two accesses to one address from
// different threads, one a write, that nothing orders: in shared memory within a block, in global
// memory across blocks too. Fibers are reused every kFiberSets (4) blocks, so a race between blocks
// 4, 8, ... apart in the launch order can go unseen (one between blocks fewer apart cannot). Warp
// shuffles exchange values but order no memory (CUDA's model: that takes __syncwarp, which fastmed
// does not use).
// The .cu files are compiled with __CUDA_ARCH__ defined (900): their device-only branches are the
// ones that run.
// Test hooks (build.py rewrites the constants in its copy of the sources; read at each use):
// FMEMU_DICE_TARGET_BLOCKS and FMEMU_DICE_MAX_GRID replace dice_ce_cuda.cu's kTargetBlocks and kMaxGrid,
// FMEMU_GRID_CAP the 65535 * 16 cap of the other files' grids, so that small inputs reach the paths
// of huge ones (many tiles per block, grid-stride loops).
// Arithmetic is the host's: the default build has no FMA contraction (-ffp-contract=off), the
// FMEMU_FMA build fuses multiply-adds as nvcc does by default; the intrinsics that forbid contraction
// (__fmul_rn, ...) are never fused. Results equal a GPU's only to rounding (its exp, log, ...).
#pragma once

#include <ucontext.h>
#include <sys/mman.h>

#include <math.h>  // float overloads of exp, log, ... in the global namespace, as CUDA's math API has

#include <cmath>
#include <cstdint>
#include <memory>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "common/common.h"  // fastmed's bit-exact half / bfloat16 conversions

// ---- ThreadSanitizer (the FMEMU_TSAN build) -----------------------------------------------------
#if defined(FMEMU_TSAN)
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void __tsan_ignore_thread_begin(void);
void __tsan_ignore_thread_end(void);
}
#define FMEMU_NO_TSAN __attribute__((no_sanitize_thread))
#else
#define FMEMU_NO_TSAN
#endif
namespace fmemu {
// The emulator's own bookkeeping (scheduler state one fiber writes and the scheduler reads) is not
// the kernels' memory: its accesses are not recorded while one of these lives (synchronisation still is).
struct Unchecked {
#if defined(FMEMU_TSAN)
  Unchecked() { __tsan_ignore_thread_begin(); }
  ~Unchecked() { __tsan_ignore_thread_end(); }
#else
  Unchecked() {}
#endif
  Unchecked(const Unchecked&) = delete;
};
}  // namespace fmemu

// ---- qualifiers -------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static
#define __syncthreads() ::fmemu::syncthreads()

// ---- built-in variables -----------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

// ---- runtime API (the subset fastmed uses) ----------------------------------------------------
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;
enum cudaMemoryType {
  cudaMemoryTypeUnregistered = 0,
  cudaMemoryTypeHost = 1,
  cudaMemoryTypeDevice = 2,
  cudaMemoryTypeManaged = 3,
};
struct cudaPointerAttributes {
  enum cudaMemoryType type;
  int device;
  void* devicePointer;
  void* hostPointer;
};

namespace fmemu {
inline thread_local cudaError_t last_error = cudaSuccess;
inline thread_local std::string last_message;
inline thread_local int current_device = 0;

inline int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? (int64_t)std::strtoll(v, nullptr, 10) : fallback;
}

inline void set_error(cudaError_t e, const std::string& msg) {
  last_error = e;
  last_message = msg;
}
}  // namespace fmemu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = fmemu::last_error;
  fmemu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return fmemu::last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return fmemu::last_message.empty() ? "invalid argument" : fmemu::last_message.c_str();
    case cudaErrorInvalidConfiguration:
      return fmemu::last_message.empty() ? "invalid configuration argument" : fmemu::last_message.c_str();
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorLaunchFailure:
      return fmemu::last_message.empty() ? "unspecified launch failure" : fmemu::last_message.c_str();
  }
  return "unknown error";
}
inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p) {
  a->type = cudaMemoryTypeDevice;  // every pointer the emulated kernels get is "device" memory
  a->device = 0;
  a->devicePointer = const_cast<void*>(p);
  a->hostPointer = nullptr;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = fmemu::current_device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  if (d != 0) {
    fmemu::set_error(cudaErrorInvalidDevice, "invalid device ordinal");
    return cudaErrorInvalidDevice;
  }
  fmemu::current_device = d;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}

// ---- half and bfloat16 ------------------------------------------------------------------------
struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};
inline float __half2float(__half h) { return fastmed::half_bits_to_float(h.__x); }
inline __half __float2half_rn(float f) { return __half{fastmed::float_to_half_bits(f)}; }
inline __half __ushort_as_half(unsigned short s) { return __half{s}; }
inline float __bfloat162float(__nv_bfloat16 h) { return fastmed::bf16_bits_to_float(h.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{fastmed::float_to_bf16_bits(f)}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short s) { return __nv_bfloat16{s}; }

// ---- arithmetic intrinsics: never fused into an FMA, as on a GPU ------------------------------
// The default build has no contraction at all; the FMEMU_FMA build (-ffp-contract=fast -mfma) fuses
// every other multiply-add, as nvcc does by default, so an operand or result passes through an empty
// asm the compiler cannot see through.
#if defined(__x86_64__)
#define FMEMU_OPAQUE(v) asm("" : "+x"(v))
#else
#define FMEMU_OPAQUE(v) asm("" : "+r"(v))
#endif
template <typename T>
inline T fmemu_rn_mul(T a, T b) {
  FMEMU_OPAQUE(a);
  FMEMU_OPAQUE(b);
  T r = a * b;
  FMEMU_OPAQUE(r);
  return r;
}
template <typename T>
inline T fmemu_rn_add(T a, T b) {
  FMEMU_OPAQUE(a);
  FMEMU_OPAQUE(b);
  T r = a + b;
  FMEMU_OPAQUE(r);
  return r;
}
inline float __fmul_rn(float a, float b) { return fmemu_rn_mul(a, b); }
inline float __fadd_rn(float a, float b) { return fmemu_rn_add(a, b); }
inline double __dmul_rn(double a, double b) { return fmemu_rn_mul(a, b); }
inline double __dadd_rn(double a, double b) { return fmemu_rn_add(a, b); }
inline double __dsub_rn(double a, double b) { return fmemu_rn_add(a, -b); }

// ---- the block scheduler ----------------------------------------------------------------------
namespace fmemu {

enum State { kReady, kAtBarrier, kAtShuffle, kDone };

struct Thread {
  ucontext_t ctx;
  State state;
  unsigned shuffles;  // shuffles done so far (parity picks the exchange buffer)
  unsigned barriers;  // barriers passed so far (FMEMU_TSAN: parity picks the sync object)
  uint3 idx;
  void* fiber;        // FMEMU_TSAN: its ThreadSanitizer fiber
  bool entered;       // FMEMU_TSAN: run in this block yet (the first switch in synchronises)
};

constexpr size_t kStack = 128 << 10;  // per fiber, with a guard page below
constexpr size_t kGuard = 4096;
constexpr size_t kMaxDynamicShared = 48 << 10;
#if defined(FMEMU_TSAN)
constexpr bool kTsan = true;
#else
constexpr bool kTsan = false;
#endif
// FMEMU_TSAN: a block's memory, mapped afresh for every block (unmapping clears ThreadSanitizer's
// record of the previous block's accesses): 64 bytes of barrier sync objects, then shared memory
// (dynamic first, then each __shared__ variable as the threads declare it).
constexpr size_t kArenaSync = 64;
constexpr size_t kArena = kArenaSync + 2 * kMaxDynamicShared;
inline char launch_sync;  // FMEMU_TSAN: a thread releases here whenever it yields; the launch acquires
// FMEMU_TSAN: creating a ThreadSanitizer fiber costs about half a millisecond, so fibers (and their
// stacks) are kept for the process and reused: block k runs on set k % kFiberSets, and thread i of
// blocks k and k + kFiberSets are one fiber (in program order, carrying what it acquired at block k's
// barriers). Blocks fewer than kFiberSets apart never share a fiber: every race between them shows.
constexpr int kFiberSets = 4;
struct FiberSet {
  std::vector<void*> fibers;
  std::vector<char*> stacks;
};
inline FiberSet fiber_sets[kFiberSets];

struct Block {
  std::vector<Thread> threads;  // sized before any fiber starts, never while they live
  std::vector<char*> stacks;
  std::vector<uint64_t> exchange[2];
  std::unique_ptr<unsigned char[]> dynamic_shared;  // exactly the launch's size
  size_t dynamic_size = 0;
  std::vector<std::pair<void*, size_t>> shared_regions;  // the __shared__ statics seen so far
  std::vector<void*> launch_regions;  // those this launch's kernel declared
  size_t static_shared = 0;           // their bytes
  // FMEMU_TSAN: this block's memory (kArena bytes), its __shared__ variables (key: the address of
  // the static the declaration became), its fiber set and the scheduler's fiber
  unsigned char* arena = nullptr;
  size_t arena_used = 0;
  int fiber_set = 0;
  std::vector<std::pair<void*, unsigned char*>> block_regions;
  void* scheduler_fiber = nullptr;
  ucontext_t scheduler;
  int current = 0;
  int n = 0;
  bool failed = false;
  std::string error;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  uint64_t rng = 0;
};

inline thread_local Block* running = nullptr;

inline Block& block_state() {
  static thread_local Block b;
  return b;
}

inline uint64_t next_random(uint64_t& s) {  // splitmix64
  s += 0x9e3779b97f4a7c15ull;
  uint64_t z = s;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// (no Unchecked may live across the switch, but in fail(): see unmap_block)
inline void switch_to_scheduler(State s) {
  Block* bp;
  Thread* tp;
  {
    Unchecked unchecked;
    bp = running;
    tp = &bp->threads[bp->current];
    tp->state = s;
  }
  Block& b = *bp;
  Thread& t = *tp;
  asm volatile("" ::: "memory");
#if defined(FMEMU_TSAN)
  // only the end of the launch acquires launch_sync: released at every switch, so what a thread did
  // before its block was abandoned (an error) is ordered before the host's next accesses too
  __tsan_release(&launch_sync);
  __tsan_switch_to_fiber(b.scheduler_fiber, 1);  // 1: no synchronisation (a thread orders nothing)
#endif
  swapcontext(&t.ctx, &b.scheduler);
  asm volatile("" ::: "memory");
}

// A thread found an error: record it (the first one wins) and never resume this block.
inline void fail(const std::string& msg) {
  Unchecked unchecked;
  Block& b = *running;
  if (!b.failed) {
    b.failed = true;
    b.error = msg;
  }
  switch_to_scheduler(kDone);
  std::abort();  // not reached: a failed block is abandoned
}

// (not instrumented: it ends on the scheduler's fiber, which must not see its function exit)
FMEMU_NO_TSAN inline void thread_entry() {
  Block& b = *running;
  b.body(b.body_arg);
  {
    Unchecked unchecked;  // (ended before the switch: it belongs to this fiber)
    b.threads[b.current].state = kDone;
  }
#if defined(FMEMU_TSAN)
  __tsan_release(&launch_sync);  // the end of the launch orders everything the thread did
  __tsan_switch_to_fiber(b.scheduler_fiber, 1);
#endif
  // returning switches to uc_link (the scheduler)
}

inline void syncthreads() {
#if defined(FMEMU_TSAN)
  // every thread releases before any acquires (the barrier opens when all have arrived); barrier k
  // and k + 1 use different objects, so a thread past barrier k + 1 orders nothing of its own before
  // barrier k + 1 into what a slower thread acquires at barrier k
  void* sync;
  {
    Unchecked unchecked;
    Block& b = *running;
    sync = b.arena + (b.threads[b.current].barriers++ & 1);
  }
  __tsan_release(sync);
  switch_to_scheduler(kAtBarrier);
  __tsan_acquire(sync);
#else
  switch_to_scheduler(kAtBarrier);
#endif
}

inline char* stack_for(Block& b, int i) {
  while ((int)b.stacks.size() <= i) {
    void* m = mmap(nullptr, kStack + kGuard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    mprotect(m, kGuard, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
    b.stacks.push_back(static_cast<char*>(m) + kGuard);
  }
  return b.stacks[i];
}

inline std::string describe(const Block& b) {
  int ready = 0, barrier = 0, shuffle = 0, done = 0;
  for (int i = 0; i < b.n; ++i) {
    switch (b.threads[i].state) {
      case kReady: ++ready; break;
      case kAtBarrier: ++barrier; break;
      case kAtShuffle: ++shuffle; break;
      case kDone: ++done; break;
    }
  }
  char buf[160];
  std::snprintf(buf, sizeof buf, " (block (%u, %u, %u): %d threads at __syncthreads, %d at a shuffle, %d exited)",
                blockIdx.x, blockIdx.y, blockIdx.z, barrier, shuffle, done);
  return buf;
}

constexpr unsigned char kGarbage = 0xFF;  // NaN as float / double, -1 as an integer

#if defined(FMEMU_TSAN)
// The block's fresh memory, and the fibers and stacks of its set (created the first time).
inline bool map_block(Block& b, uint64_t number) {
  Unchecked unchecked;
  void* m = mmap(nullptr, kArena, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return false;
  b.arena = static_cast<unsigned char*>(m);
  std::memset(b.arena + kArenaSync, kGarbage, kArena - kArenaSync);
  b.arena_used = kArenaSync + ((b.dynamic_size + 15) & ~size_t(15));
  b.block_regions.clear();
  b.fiber_set = (int)(number % kFiberSets);
  FiberSet& fs = fiber_sets[b.fiber_set];
  while ((int)fs.fibers.size() < b.n) {
    void* st = mmap(nullptr, kStack + kGuard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (st == MAP_FAILED) return false;
    mprotect(st, kGuard, PROT_NONE);
    fs.stacks.push_back(static_cast<char*>(st) + kGuard);
    fs.fibers.push_back(__tsan_create_fiber(0));
  }
  for (int i = 0; i < b.n; ++i) {
    b.threads[i].ctx.uc_stack.ss_sp = fs.stacks[i];
    b.threads[i].fiber = fs.fibers[i];
    b.threads[i].entered = false;
  }
  return true;
}

// After a failed block its set is dropped: a fiber may have stopped inside an Unchecked (or deep in
// a kernel), so it is never run or destroyed again (ThreadSanitizer ends a fiber destroyed that way
// with a report of its own); its stacks are unmapped, which clears their record.
inline void unmap_block(Block& b, bool ok) {
  Unchecked unchecked;
  if (!ok) {
    FiberSet& fs = fiber_sets[b.fiber_set];
    for (char* st : fs.stacks) munmap(st - kGuard, kStack + kGuard);
    fs.stacks.clear();
    fs.fibers.clear();
  }
  for (int i = 0; i < b.n; ++i) b.threads[i].fiber = nullptr;
  if (b.arena != nullptr) munmap(b.arena, kArena);
  b.arena = nullptr;
}
#endif

// Runs one block to completion; false (with b.error) on a scheduling error.
inline bool run_block(Block& b, bool shuffle_order, uint64_t number) {
  Unchecked unchecked;
#if defined(FMEMU_TSAN)
  if (!map_block(b, number)) {
    b.error = "fmemu: out of memory for a block";
    return false;
  }
#else
  for (auto& r : b.shared_regions) std::memset(r.first, kGarbage, r.second);
  if (b.dynamic_size > 0) std::memset(b.dynamic_shared.get(), kGarbage, b.dynamic_size);
#endif
  for (int i = 0; i < b.n; ++i) {
    Thread& t = b.threads[i];
#if defined(FMEMU_TSAN)
    void* stack = t.ctx.uc_stack.ss_sp;
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = stack;
#else
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = stack_for(b, i);
    if (t.ctx.uc_stack.ss_sp == nullptr) {
      b.error = "fmemu: out of memory for fiber stacks";
      return false;
    }
#endif
    t.ctx.uc_stack.ss_size = kStack;
    t.ctx.uc_link = &b.scheduler;
    makecontext(&t.ctx, thread_entry, 0);
    t.state = kReady;
    t.shuffles = 0;
    t.barriers = 0;
    t.idx = uint3{(unsigned)(i % blockDim.x), (unsigned)(i / blockDim.x % blockDim.y),
                  (unsigned)(i / (blockDim.x * blockDim.y))};
  }
  std::vector<int> order(b.n);
  for (;;) {
    for (int i = 0; i < b.n; ++i) order[i] = i;
    if (shuffle_order)
      for (int i = b.n - 1; i > 0; --i) std::swap(order[i], order[next_random(b.rng) % (uint64_t)(i + 1)]);
    for (int k = 0; k < b.n; ++k) {
      const int i = order[k];
      if (b.threads[i].state != kReady) continue;
      b.current = i;
      threadIdx = b.threads[i].idx;
#if defined(FMEMU_TSAN)
      // the first switch into a thread in this block synchronises (0): it sees the block's fresh
      // memory and everything the host and earlier launches did; the scheduler has acquired nothing
      // of this launch's threads, so no block is ordered after another
      // (nothing may touch memory between the switch and swapcontext: it would count as the thread's)
      const unsigned flags = b.threads[i].entered ? 1 : 0;
      b.threads[i].entered = true;
      ucontext_t* ctx = &b.threads[i].ctx;
      __tsan_switch_to_fiber(b.threads[i].fiber, flags);
      swapcontext(&b.scheduler, ctx);
#else
      swapcontext(&b.scheduler, &b.threads[i].ctx);
#endif
      if (b.failed) return false;
    }
    // nobody is ready now: release the warps whose 32 lanes all wait at a shuffle, else the block
    // if every thread waits at __syncthreads
    int done = 0, barrier = 0, shuffle = 0;
    for (int i = 0; i < b.n; ++i) {
      done += b.threads[i].state == kDone;
      barrier += b.threads[i].state == kAtBarrier;
      shuffle += b.threads[i].state == kAtShuffle;
    }
    if (done == b.n) return true;
    if (shuffle > 0) {
      for (int w = 0; w * 32 < b.n; ++w) {
        int at = 0, lanes = 0;
        for (int i = w * 32; i < b.n && i < w * 32 + 32; ++i, ++lanes) at += b.threads[i].state == kAtShuffle;
        if (at == 0) continue;
        if (at != 32) {
          b.error = "__shfl_xor_sync(0xffffffff, ...) not reached by all 32 lanes of warp " + std::to_string(w) +
                    describe(b);
          return false;
        }
        for (int i = w * 32; i < w * 32 + 32; ++i) b.threads[i].state = kReady;
      }
      continue;
    }
    if (done > 0) {
      b.error = "__syncthreads() not reached by every thread of the block" + describe(b);
      return false;
    }
    for (int i = 0; i < b.n; ++i) b.threads[i].state = kReady;
  }
}

template <typename F>
void call_body(void* f) {
  (*static_cast<F*>(f))();
}

// The launch `kernel<<<grid, block, smem, stream>>>(args)` becomes launch([&] { kernel(args); }, grid,
// block, smem, stream); it runs synchronously (the stream is ignored: everything is ordered).
template <typename F, typename S = int>
void launch(F&& body, dim3 grid, dim3 block, size_t smem = 0, S stream = 0) {
  Unchecked unchecked;
  (void)stream;
  const uint64_t nthreads = (uint64_t)block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64) {
    set_error(cudaErrorInvalidConfiguration, "invalid configuration argument (block of " +
                                                 std::to_string(block.x) + "x" + std::to_string(block.y) + "x" +
                                                 std::to_string(block.z) + " threads)");
    return;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    set_error(cudaErrorInvalidConfiguration, "invalid configuration argument (grid of " + std::to_string(grid.x) +
                                                 "x" + std::to_string(grid.y) + "x" + std::to_string(grid.z) +
                                                 " blocks)");
    return;
  }
  if (smem > kMaxDynamicShared) {
    set_error(cudaErrorInvalidValue, "invalid argument (" + std::to_string(smem) +
                                         " bytes of dynamic shared memory, over the 48 KiB default limit)");
    return;
  }
  Block& b = block_state();
  if (running != nullptr) {
    set_error(cudaErrorLaunchFailure, "fmemu: a launch from inside a kernel");
    return;
  }
  b.n = (int)nthreads;
  b.threads.resize(b.n);
  b.exchange[0].assign(b.n, 0);
  b.exchange[1].assign(b.n, 0);
  b.dynamic_shared.reset(new unsigned char[smem > 0 ? smem : 1]);
  b.dynamic_size = smem;
  b.launch_regions.clear();
  b.static_shared = 0;
  b.failed = false;
  b.error.clear();
  b.body = &call_body<std::remove_reference_t<F>>;
  b.body_arg = static_cast<void*>(&body);
  const char* env = std::getenv("FMEMU_SCHEDULE");
  const uint64_t seed = env ? std::strtoull(env, nullptr, 10) : 0;
  b.rng = seed;
  blockDim = block;
  gridDim = grid;
  const uint64_t nblocks = (uint64_t)grid.x * grid.y * grid.z;
  std::vector<uint64_t> order;
  if (seed != 0) {
    order.resize(nblocks);
    for (uint64_t i = 0; i < nblocks; ++i) order[i] = i;
    for (uint64_t i = nblocks - 1; i > 0; --i) std::swap(order[i], order[next_random(b.rng) % (i + 1)]);
  }
#if defined(FMEMU_TSAN)
  b.scheduler_fiber = __tsan_get_current_fiber();
  for (auto& t : b.threads) t.fiber = nullptr;
#endif
  running = &b;
  for (uint64_t k = 0; k < nblocks; ++k) {
    const uint64_t i = seed != 0 ? order[k] : k;
    blockIdx = uint3{(unsigned)(i % grid.x), (unsigned)(i / grid.x % grid.y), (unsigned)(i / ((uint64_t)grid.x * grid.y))};
    const bool ok = run_block(b, seed != 0, k);
#if defined(FMEMU_TSAN)
    unmap_block(b, ok);
    if (!ok) __tsan_acquire(&launch_sync);
#endif
    if (!ok) {
      set_error(cudaErrorLaunchFailure, "fmemu: " + b.error);
      break;
    }
  }
#if defined(FMEMU_TSAN)
  __tsan_acquire(&launch_sync);  // the launch is over: the host, and later launches, see all of it
#endif
  running = nullptr;
}

inline void* dynamic_shared() {
  Unchecked unchecked;
  if (kTsan) return running->arena + kArenaSync;
  return running->dynamic_shared.get();
}

// build.py calls this after each __shared__ declaration: the first time a variable is seen it is
// filled with garbage at once (its block has started), later at the start of every block.
// It also adds up the kernel's static shared memory: with the dynamic part, at most 48 KiB.
inline void shared_region(void* p, size_t bytes) {
  Unchecked unchecked;
  Block& b = *running;
  bool counted = false;
  for (void* q : b.launch_regions) counted |= q == p;
  if (!counted) {
    b.launch_regions.push_back(p);
    b.static_shared += bytes;
    if (b.static_shared + b.dynamic_size > kMaxDynamicShared)
      fail("too much shared memory: " + std::to_string(b.static_shared) + " bytes static + " +
           std::to_string(b.dynamic_size) + " dynamic, over the 48 KiB default limit");
  }
  if (kTsan) return;
  for (auto& r : b.shared_regions)
    if (r.first == p) return;
  b.shared_regions.emplace_back(p, bytes);
  std::memset(p, kGarbage, bytes);
}

// build.py turns `__shared__ T name[N];` into `static T key[N]; auto& name = *block_shared(&key);`:
// the static itself (counted and refilled as above), or in the FMEMU_TSAN build the block's own copy
// in its fresh memory, the same for every thread of the block.
template <typename T>
T* block_shared(T* key) {
  Unchecked unchecked;
  shared_region(key, sizeof(T));
  if (!kTsan) return key;
  Block& b = *running;
  for (auto& r : b.block_regions)
    if (r.first == key) return reinterpret_cast<T*>(r.second);
  static_assert(alignof(T) <= 16, "shared memory aligned to at most 16 bytes");
  if (b.arena_used + sizeof(T) > kArena) fail("fmemu: shared memory arena exhausted");
  unsigned char* p = b.arena + b.arena_used;
  b.arena_used += (sizeof(T) + 15) & ~size_t(15);
  b.block_regions.emplace_back(key, p);
  return reinterpret_cast<T*>(p);
}

template <typename T>
T shfl_xor(unsigned mask, T v, int lane_mask, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of up to 8 bytes");
  int me;
  uint64_t* buf;
  {
    Unchecked unchecked;
    Block& b = *running;
    me = b.current;
    if (mask != 0xffffffffu) fail("only full-warp shuffle masks are emulated");
    if ((me | 31) >= b.n) fail("a shuffle in a warp of fewer than 32 threads");
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fail("shuffle width must be a power of 2 <= 32");
    buf = b.exchange[b.threads[me].shuffles++ & 1].data();
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    buf[me] = bits;
  }
  switch_to_scheduler(kAtShuffle);
  Unchecked unchecked;
  const int lane = me & 31, base = me - lane;
  int src = lane ^ lane_mask;
  // a source in a later segment of `width` lanes (or past the warp) gives the lane its own value
  if (src >= (lane / width + 1) * width || src > 31) src = lane;
  T r;
  std::memcpy(&r, &buf[base + src], sizeof(T));
  return r;
}

}  // namespace fmemu

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return fmemu::shfl_xor<T>(mask, v, lane_mask, width);
}

// atomics: one OS thread runs every fiber and no fiber switches inside, so any read-modify-write is
// atomic here; they are the compiler's atomics so that ThreadSanitizer knows them as such
template <typename T>
inline T atomicAdd(T* p, T v) {
  if constexpr (std::is_integral<T>::value) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
  } else {
    T old;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    for (;;) {
      T sum = old + v;
      if (__atomic_compare_exchange(p, &old, &sum, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return old;
    }
  }
}
