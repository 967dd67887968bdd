// Branch-free float exp / log / log1p that GCC and Clang vectorise under `omp simd` on any ISA
// (glibc's vector math needs -ffast-math, which would break NaN propagation). Relative error is
// a few ulp; NaN propagates; results are deterministic for a given build.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include "common.h"

namespace fastmed {

FM_HD float fm_bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
FM_HD uint32_t fm_float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// 2^n for an integral float n in [-126, 127], from its exponent bits
FM_HD float fm_pow2i(float n) { return fm_bits_to_float((uint32_t)((int32_t)n + 127) << 23); }
#if !defined(__CUDACC__)
// 16 floats as one GCC vector (the CPU kernels' register blocks); the same formulas apply lane-wise
typedef float fm_vf16 __attribute__((vector_size(64)));
typedef int32_t fm_vi16 __attribute__((vector_size(64)));
inline fm_vf16 fm_pow2i(fm_vf16 n) { return (fm_vf16)((__builtin_convertvector(n, fm_vi16) + 127) << 23); }
#endif

// e^xc for xc in [-87.33, 88.72] (or NaN, which propagates): n = round(xc / ln 2) with the
// 1.5 * 2^23 trick (no libm call, vectorises everywhere), Cody-Waite reduction r = xc - n ln 2,
// |r| <= 0.347, and the Taylor series of e^r to r^7. V is float or fm_vf16.
template <typename V>
FM_HD V fm_exp_clamped(V xc) {
  const V n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  V r = xc - n * 0.693145751953125f;  // ln2 high part (exact product)
  r = r - n * 1.428606765330187e-06f;  // ln2 low part
  V p = r * 1.98412698e-4f + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * fm_pow2i(n);
}

// e^x. Underflows to 0 below -87.33 (just above FLT_MIN), overflows to inf above 88.72.
FM_HD float fm_exp(float x) {
  float xc = x < -87.33f ? -87.33f : x;
  xc = xc > 88.72f ? 88.72f : xc;
  float out = fm_exp_clamped(xc);
  out = x < -87.33f ? 0.0f : out;
  out = x > 88.72f ? INFINITY : out;
  out = x != x ? x : out;
  return out;
}

// e^x for x <= 0 (softmax numerators after subtracting the max): x > 0 is taken as 0, and below
// -87.33 it returns about 1e-38 instead of 0. NaN propagates through the polynomial.
FM_HD float fm_exp_nonpos(float x) {
  float xc = x < -87.33f ? -87.33f : x;
  xc = xc > 0.0f ? 0.0f : xc;
  return fm_exp_clamped(xc);
}

// natural log for positive normal z; inf -> inf, nan -> nan, 0 -> -inf
FM_HD float fm_log(float z) {
  uint32_t bits = fm_float_to_bits(z);
  int32_t e = (int32_t)((bits >> 23) & 0xffu) - 127;
  float m = fm_bits_to_float((bits & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  float f = m - 1.0f;
  float s = f / (2.0f + f);  // log(m) = 2 atanh(s), |s| <= 0.1716
  float s2 = s * s;
  float poly = 0.222222222f;
  poly = poly * s2 + 0.285714286f;
  poly = poly * s2 + 0.4f;
  poly = poly * s2 + 0.666666667f;
  poly = poly * s2 + 2.0f;
  float ef = (float)e;
  float out = ef * 0.693145751953125f + (ef * 1.428606765330187e-06f + s * poly);
  out = z == 0.0f ? -INFINITY : out;
  out = (z < INFINITY) ? out : z;  // inf and nan pass through
  return out;
}

// log(1 + u) for u >= 0, accurate for tiny u
FM_HD float fm_log1p(float u) {
  float v = 1.0f + u;
  float d = v - 1.0f;
  float l = fm_log(v);
  return d == 0.0f ? u : l * (u / d);
}

FM_HD float fm_softplus(float x) {  // log(1 + e^x)
  float ax = x < 0.0f ? -x : x;
  float mx = x > 0.0f ? x : 0.0f;
  float out = mx + fm_log1p(fm_exp(-ax));
  return x != x ? x : out;
}

FM_HD float fm_sigmoid(float x) { return 1.0f / (1.0f + fm_exp(-x)); }

// double versions for the float64 path (tests, gradcheck): libm is fine there
FM_HD double fm_exp(double x) { return std::exp(x); }
FM_HD double fm_exp_nonpos(double x) { return std::exp(x); }
FM_HD double fm_log(double x) { return std::log(x); }
FM_HD double fm_softplus(double x) {
  double ax = x < 0.0 ? -x : x;
  double mx = x > 0.0 ? x : 0.0;
  return x != x ? x : mx + std::log1p(std::exp(-ax));
}
FM_HD double fm_sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

}  // namespace fastmed
