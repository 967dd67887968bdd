// fastmed common definitions shared by the CPU and CUDA kernels.
// No torch headers here: kernels see raw pointers, sizes and strides only.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__CUDACC__)
#define FM_HD __host__ __device__ __forceinline__
#else
#define FM_HD inline __attribute__((always_inline))
#endif

#if defined(__linux__) && !defined(__CUDACC__)
#include <sys/mman.h>
#endif

// CPU kernel files are compiled once per instruction set with FM_ISA = base / avx2 / avx512, each
// build in its own namespace fastmed::FM_CAT(isa_, FM_ISA); the dispatcher picks one at run time.
#ifndef FM_ISA
#define FM_ISA base
#endif
#define FM_CAT2(a, b) a##b
#define FM_CAT(a, b) FM_CAT2(a, b)

namespace fastmed {

// Ask Linux for transparent huge pages on a freshly allocated output that a kernel is about to fill
// completely, only when FASTMED_HUGE_PAGES=1 is set (read at each call). Opt-in: where huge pages
// are already at hand, first-touch faults of a 100 MB buffer drop from ~25 ms (4 KiB pages, 2-core
// VM) to ~6 ms; but a huge page the VM's host has not yet backed costs far more, and in a fresh
// process on our 2-core VM a whole 192x192x160 sliding-window inference took 714-816 ms with the
// advice against 393-421 ms without it (steady state: no better). Advisory only.
inline void prefer_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && !defined(__CUDACC__) && defined(MADV_HUGEPAGE)
  const char* flag = std::getenv("FASTMED_HUGE_PAGES");
  if (flag == nullptr || flag[0] != '1') return;
  const uintptr_t huge = (uintptr_t)1 << 21;
  if (bytes < 2 * huge) return;
  uintptr_t a = ((uintptr_t)p + huge - 1) & ~(huge - 1);
  uintptr_t e = ((uintptr_t)p + bytes) & ~(huge - 1);
  if (e > a) (void)madvise((void*)a, e - a, MADV_HUGEPAGE);
#else
  (void)p; (void)bytes;
#endif
}

// Element types, numbered the same way in fastmed/_ext.py (DTYPE_CODES).
enum DType : int {
  kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3,
  kU8 = 4, kI8 = 5, kI16 = 6, kI32 = 7, kI64 = 8,
};

// Error codes returned by kernels; the bindings turn them into exceptions naming the op.
enum Status : int {
  kOk = 0,
  kBadDtype = 1,
  kBadArgument = 2,
  kCudaError = 3,
};

inline const char* status_message(int s) {
  switch (s) {
    case kOk: return "ok";
    case kBadDtype: return "unsupported dtype combination";
    case kBadArgument: return "invalid argument";
    case kCudaError: return "CUDA error";
    default: return "unknown error";
  }
}

// Bit-exact IEEE half / bfloat16 <-> float conversions (round to nearest even),
// written without any compiler extension so the same code serves every ISA build.
FM_HD float half_bits_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {
    // subnormal half: value = man * 2^-24, exact in float
    float f = (float)man * 5.9604644775390625e-8f;
    uint32_t fb;
    std::memcpy(&fb, &f, 4);
    bits = sign | fb;
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

FM_HD uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) {  // inf or nan
    return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  }
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (ax < 0x38800000u) {
    // result is subnormal (or zero): round(|f| * 2^24) to nearest even, in float
    float af;
    std::memcpy(&af, &ax, 4);
    float scaled = af * 16777216.0f;  // exact (power of two)
    // round half to even without rint(): add and subtract 2^23
    float r = (scaled + 8388608.0f) - 8388608.0f;
    return (uint16_t)(sign | (uint32_t)r);
  }
  uint32_t mant_odd = (ax >> 13) & 1u;
  ax += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round to nearest even
  return (uint16_t)(sign | (ax >> 13));
}

FM_HD float bf16_bits_to_float(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

FM_HD uint16_t float_to_bf16_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);  // quiet nan
  uint32_t lsb = (x >> 16) & 1u;
  x += 0x7fffu + lsb;
  return (uint16_t)(x >> 16);
}

}  // namespace fastmed
