// Fused instance norm + activation on the CPU: OpenMP over (n, c) planes, `omp simd` inner loops.
// Forward reads a plane twice (sum, then squared deviations: exact two-pass variance) and writes it
// once; backward reads x and dy twice and writes dx once. PyTorch's eager InstanceNorm3d +
// LeakyReLU makes more passes and an intermediate tensor.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../common/common.h"
#include "norm_act.h"

namespace fastmed {
namespace {

template <typename T>
inline T act_of(T z, int act, T slope) {
  if (act == 0) return z;
  return z > 0 ? z : (act == 1 ? (T)0 : z * slope);
}

template <typename T>
void forward(const NormActParams& p) {
  const int64_t planes = p.N * p.C;
  const int64_t S = p.S;
  const T slope = (T)p.slope;
#pragma omp parallel for num_threads(std::max(1, p.num_threads)) schedule(static)
  for (int64_t pl = 0; pl < planes; ++pl) {
    const int64_t c = pl % p.C;
    const T* x = (const T*)p.x + pl * S;
    T* y = (T*)p.y + pl * S;
    double s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < S; ++i) s += (double)x[i];
    const double mean = s / (double)S;
    double ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < S; ++i) {
      const double d = (double)x[i] - mean;
      ss += d * d;
    }
    const double rstd = 1.0 / std::sqrt(ss / (double)S + p.eps);
    p.mean[pl] = mean;
    p.rstd[pl] = rstd;
    const double w = p.weight ? (double)((const T*)p.weight)[c] : 1.0;
    const double b = p.bias ? (double)((const T*)p.bias)[c] : 0.0;
    // y = act(x * a + (b - mean * a)) with a = rstd * w, the coefficients rounded once from float64:
    // the same arithmetic as PyTorch's CPU instance norm (batch norm's x * alpha + beta), so fused
    // and eager networks round alike. Computing (x - mean) * a + b instead is as accurate per plane,
    // but in a whole DynUNet it moved float32 gradients 1% away from float64 (eager: 0.02%).
    const T a = (T)(rstd * w), bb = (T)(b - mean * rstd * w);
    const int act = p.act;
#pragma omp simd
    for (int64_t i = 0; i < S; ++i) y[i] = act_of<T>(x[i] * a + bb, act, slope);
  }
}

template <typename T>
void backward(const NormActParams& p) {
  const int64_t planes = p.N * p.C;
  const int64_t S = p.S;
  const T slope = (T)p.slope;
  const int act = p.act;
#pragma omp parallel for num_threads(std::max(1, p.num_threads)) schedule(static)
  for (int64_t pl = 0; pl < planes; ++pl) {
    const int64_t c = pl % p.C;
    const T* x = (const T*)p.x + pl * S;
    const T* dy = (const T*)p.dy + pl * S;
    T* dx = (T*)p.dx + pl * S;
    const double mean = p.mean[pl], rstd = p.rstd[pl];
    const double w = p.weight ? (double)((const T*)p.weight)[c] : 1.0;
    const double b = p.bias ? (double)((const T*)p.bias)[c] : 0.0;
    const T a = (T)(rstd * w), bb = (T)(b - mean * rstd * w);
    const T m = (T)mean, r = (T)rstd;  // xhat = (x - m) * r
    // pass 1: sum dz and sum dz * xhat (z recomputed exactly as in the forward)
    double sdz = 0, sdzx = 0;
#pragma omp simd reduction(+ : sdz, sdzx)
    for (int64_t i = 0; i < S; ++i) {
      const T z = x[i] * a + bb;
      const T g = act == 0 || z > 0 ? dy[i] : (act == 1 ? (T)0 : dy[i] * slope);
      sdz += (double)g;
      sdzx += (double)g * (double)((x[i] - m) * r);
    }
    p.dbias[pl] = sdz;
    p.dweight[pl] = sdzx;
    // pass 2: dx = rstd w (dz - mean(dz) - xhat mean(dz xhat))
    const T c0 = (T)(rstd * w), c1 = (T)(sdz / (double)S), c2 = (T)(sdzx / (double)S);
#pragma omp simd
    for (int64_t i = 0; i < S; ++i) {
      const T z = x[i] * a + bb;
      const T g = act == 0 || z > 0 ? dy[i] : (act == 1 ? (T)0 : dy[i] * slope);
      dx[i] = c0 * (g - c1 - (x[i] - m) * r * c2);
    }
  }
}

}  // namespace

int norm_act_fwd_cpu(const NormActParams& p) {
  if (p.N < 0 || p.C < 1 || p.S < 1 || p.act < 0 || p.act > 2) return kBadArgument;
  if (p.dtype == kF32) forward<float>(p);
  else if (p.dtype == kF64) forward<double>(p);
  else return kBadDtype;
  return kOk;
}

int norm_act_bwd_cpu(const NormActParams& p) {
  if (p.N < 0 || p.C < 1 || p.S < 1 || p.act < 0 || p.act > 2) return kBadArgument;
  if (p.dtype == kF32) backward<float>(p);
  else if (p.dtype == kF64) backward<double>(p);
  else return kBadDtype;
  return kOk;
}

}  // namespace fastmed
