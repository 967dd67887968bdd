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
// seeds. Not seen: a thread runs uninterrupted from one barrier to the next and blocks one after the
// other, so an unsynchronised read-modify-write (a missing atomic) always gives the right sum here.
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
  uint3 idx;
};

constexpr size_t kStack = 128 << 10;  // per fiber, with a guard page below
constexpr size_t kGuard = 4096;
constexpr size_t kMaxDynamicShared = 48 << 10;

struct Block {
  std::vector<Thread> threads;  // sized before any fiber starts, never while they live
  std::vector<char*> stacks;
  std::vector<uint64_t> exchange[2];
  std::unique_ptr<unsigned char[]> dynamic_shared;  // exactly the launch's size
  size_t dynamic_size = 0;
  std::vector<std::pair<void*, size_t>> shared_regions;  // the __shared__ statics seen so far
  std::vector<void*> launch_regions;  // those this launch's kernel declared
  size_t static_shared = 0;           // their bytes
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

inline void switch_to_scheduler(State s) {
  Block& b = *running;
  Thread& t = b.threads[b.current];
  t.state = s;
  asm volatile("" ::: "memory");
  swapcontext(&t.ctx, &b.scheduler);
  asm volatile("" ::: "memory");
}

// A thread found an error: record it (the first one wins) and never resume this block.
inline void fail(const std::string& msg) {
  Block& b = *running;
  if (!b.failed) {
    b.failed = true;
    b.error = msg;
  }
  switch_to_scheduler(kDone);
  std::abort();  // not reached: a failed block is abandoned
}

inline void thread_entry() {
  Block& b = *running;
  b.body(b.body_arg);
  b.threads[b.current].state = kDone;
  // returning switches to uc_link (the scheduler)
}

inline void syncthreads() { switch_to_scheduler(kAtBarrier); }

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

// Runs one block to completion; false (with b.error) on a scheduling error.
inline bool run_block(Block& b, bool shuffle_order) {
  for (auto& r : b.shared_regions) std::memset(r.first, kGarbage, r.second);
  if (b.dynamic_size > 0) std::memset(b.dynamic_shared.get(), kGarbage, b.dynamic_size);
  for (int i = 0; i < b.n; ++i) {
    Thread& t = b.threads[i];
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = stack_for(b, i);
    if (t.ctx.uc_stack.ss_sp == nullptr) {
      b.error = "fmemu: out of memory for fiber stacks";
      return false;
    }
    t.ctx.uc_stack.ss_size = kStack;
    t.ctx.uc_link = &b.scheduler;
    makecontext(&t.ctx, thread_entry, 0);
    t.state = kReady;
    t.shuffles = 0;
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
      swapcontext(&b.scheduler, &b.threads[i].ctx);
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
  running = &b;
  for (uint64_t k = 0; k < nblocks; ++k) {
    const uint64_t i = seed != 0 ? order[k] : k;
    blockIdx = uint3{(unsigned)(i % grid.x), (unsigned)(i / grid.x % grid.y), (unsigned)(i / ((uint64_t)grid.x * grid.y))};
    if (!run_block(b, seed != 0)) {
      set_error(cudaErrorLaunchFailure, "fmemu: " + b.error);
      break;
    }
  }
  running = nullptr;
}

inline void* dynamic_shared() { return running->dynamic_shared.get(); }

// build.py calls this after each __shared__ declaration: the first time a variable is seen it is
// filled with garbage at once (its block has started), later at the start of every block.
// It also adds up the kernel's static shared memory: with the dynamic part, at most 48 KiB.
inline void shared_region(void* p, size_t bytes) {
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
  for (auto& r : b.shared_regions)
    if (r.first == p) return;
  b.shared_regions.emplace_back(p, bytes);
  std::memset(p, kGarbage, bytes);
}

template <typename T>
T shfl_xor(unsigned mask, T v, int lane_mask, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of up to 8 bytes");
  Block& b = *running;
  const int me = b.current;
  if (mask != 0xffffffffu) fail("only full-warp shuffle masks are emulated");
  if ((me | 31) >= b.n) fail("a shuffle in a warp of fewer than 32 threads");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fail("shuffle width must be a power of 2 <= 32");
  Thread& t = b.threads[me];
  std::vector<uint64_t>& buf = b.exchange[t.shuffles & 1];
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  buf[me] = bits;
  switch_to_scheduler(kAtShuffle);
  const int lane = me & 31, base = me - lane;
  int src = lane ^ lane_mask;
  // a source in a later segment of `width` lanes (or past the warp) gives the lane its own value
  if (src >= (lane / width + 1) * width || src > 31) src = lane;
  T r;
  std::memcpy(&r, &buf[base + src], sizeof(T));
  ++t.shuffles;
  return r;
}

}  // namespace fmemu

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return fmemu::shfl_xor<T>(mask, v, lane_mask, width);
}

// atomics: one OS thread runs every fiber and no fiber switches inside, so plain arithmetic is atomic
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
