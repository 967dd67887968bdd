// Fused instance norm + activation on the CPU: OpenMP over (n, c) planes, `omp simd` inner loops.
// Forward reads a plane twice (sum, then squared deviations: exact two-pass variance) and writes it
// once; backward reads x and dy twice and writes dx once. PyTorch's eager InstanceNorm3d +
// LeakyReLU makes more passes and an intermediate tensor.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../common/common.h"
#include "norm_act.h"

namespace fastmed {
namespace {

template <typename T>
inline T act_of(T z, int act, T slope) {
  if (act == 0) return z;
  // written so that NaN passes through (z <= 0 is false for it), as torch.relu / leaky_relu do
  return z <= 0 ? (act == 1 ? (T)0 : z * slope) : z;
}

// the activation's backward as eager PyTorch's: ReLU's tests its output (z <= 0 blocks, so a NaN
// passes the gradient), LeakyReLU's and PReLU's their input (z > 0 passes, a NaN takes the slope)
template <typename T>
inline T act_grad(T z, T dy, int act, T slope) {
  if (act == 0) return dy;
  if (act == 1) return z <= 0 ? (T)0 : dy;
  return z > 0 ? dy : dy * slope;
}

// the negative slope of channel c: LeakyReLU's one, or PReLU's weight (act 3 then runs as act 2)
template <typename T>
inline T slope_of(const NormActParams& p, int64_t c) {
  if (p.act != 3) return (T)p.slope;
  return ((const T*)p.prelu)[p.prelu_n == 1 ? 0 : c];
}

template <typename T>
std::vector<T> slopes_of(const NormActParams& p) {
  std::vector<T> sl((size_t)p.C);
  for (int64_t c = 0; c < p.C; ++c) sl[c] = slope_of<T>(p, c);
  return sl;
}

// ---- statistics shared by several planes (group norm, batch norm) ----------------------------------
// plane pl = n * C + c belongs to set: group norm n * G + c / (C / G); batch norm c
inline int64_t set_of(const NormActParams& p, int64_t pl) {
  const int64_t c = pl % p.C;
  if (p.kind == 1) return (pl / p.C) * p.groups + c / (p.C / p.groups);
  return c;
}

inline int64_t num_sets(const NormActParams& p) { return p.kind == 1 ? p.N * p.groups : p.C; }

// per-plane means and squared deviations (S voxels each) -> each plane's set mean and rstd in
// p.mean / p.rstd: the exact merge M2 = sum(M2_k + S (m_k - m)^2), planes in order (deterministic)
void merge_sets(const NormActParams& p, const std::vector<double>& pmean, const std::vector<double>& pm2) {
  const int64_t planes = p.N * p.C, ns = num_sets(p);
  std::vector<double> tot((size_t)ns, 0.0), cnt((size_t)ns, 0.0), m2((size_t)ns, 0.0);
  for (int64_t pl = 0; pl < planes; ++pl) {
    const int64_t k = set_of(p, pl);
    tot[k] += pmean[pl] * (double)p.S;
    cnt[k] += (double)p.S;
  }
  for (int64_t k = 0; k < ns; ++k) tot[k] /= cnt[k];  // the set's mean
  for (int64_t pl = 0; pl < planes; ++pl) {
    const int64_t k = set_of(p, pl);
    const double d = pmean[pl] - tot[k];
    m2[k] += pm2[pl] + (double)p.S * d * d;
  }
  for (int64_t pl = 0; pl < planes; ++pl) {
    const int64_t k = set_of(p, pl);
    p.mean[pl] = tot[k];
    p.rstd[pl] = 1.0 / std::sqrt(m2[k] / cnt[k] + p.eps);
  }
}

// the backward's per-plane coefficients of dx = c0 dz - c1 - xhat c2 from the per-plane sums in
// p.dbias (dz) and p.dweight (dz xhat): c0 = rstd w, c1 = rstd mean_set(w dz), c2 = rstd mean_set(w dz xhat)
template <typename T>
void set_coefficients(const NormActParams& p, std::vector<T>& c0, std::vector<T>& c1, std::vector<T>& c2) {
  const int64_t planes = p.N * p.C, ns = num_sets(p);
  std::vector<double> s1((size_t)ns, 0.0), s2((size_t)ns, 0.0), cnt((size_t)ns, 0.0);
  auto wt = [&](int64_t c) { return p.weight ? (double)((const T*)p.weight)[c] : 1.0; };
  if (p.kind != 3) {
    for (int64_t pl = 0; pl < planes; ++pl) {
      const int64_t k = set_of(p, pl);
      const double w = wt(pl % p.C);
      s1[k] += w * p.dbias[pl];
      s2[k] += w * p.dweight[pl];
      cnt[k] += (double)p.S;
    }
  }
  c0.resize((size_t)planes), c1.resize((size_t)planes), c2.resize((size_t)planes);
  for (int64_t pl = 0; pl < planes; ++pl) {
    const double r = p.rstd[pl];
    c0[pl] = (T)(r * wt(pl % p.C));
    if (p.kind == 3) {  // fixed statistics: no gradient through them
      c1[pl] = c2[pl] = (T)0;
    } else {
      const int64_t k = set_of(p, pl);
      c1[pl] = (T)(r * s1[k] / cnt[k]);
      c2[pl] = (T)(r * s2[k] / cnt[k]);
    }
  }
}

// one plane's mean and sum of squared deviations (exact two-pass, in double)
template <typename T>
inline void plane_stats(const T* x, int64_t S, double& mean, double& m2) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < S; ++i) s += (double)x[i];
  mean = s / (double)S;
  double ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < S; ++i) {
    const double d = (double)x[i] - mean;
    ss += d * d;
  }
  m2 = ss;
}

// one plane's elementwise coefficients: z = (x - s) * a + beta with a = rstd * w and
// beta = b - (mean - s) * a, each rounded once from float64. The shift s is 0 (PyTorch CPU's
// arithmetic, x * a + (b - mean * a): fused and eager networks round alike, and flip the same
// activation kinks) unless the plane's mean is far from 0 against its spread (|mean| * rstd above
// kShiftAbove), where that loses |mean| * rstd * 2^-24 of the output (0.03 on a constant plane of
// 1000): there s is the mean rounded to T, so x - s is exact near the mean and z keeps its precision.
// The same rule in norm_act_triton.py (_shift_of, _fwd_finalize_kernel).
constexpr double kShiftAbove = 8.0;

template <typename T>
struct Coef {
  // m = (T)mean, r = (T)rstd: the backward's xhat = (x - m) * r + xc, where xc = (m - mean) * rstd
  // corrects for the mean's rounding on the planes that are shifted (else 0: eager's bits)
  T a, beta, s, m, r, xc;
};

template <typename T>
inline Coef<T> coef_of(const NormActParams& p, int64_t c, double mean, double rstd) {
  const double w = p.weight ? (double)((const T*)p.weight)[c] : 1.0;
  const double b = p.bias ? (double)((const T*)p.bias)[c] : 0.0;
  Coef<T> k;
  k.m = (T)mean;
  k.s = std::fabs(mean) * rstd > kShiftAbove ? k.m : (T)0;
  k.a = (T)(rstd * w);
  k.beta = (T)(b - (mean - (double)k.s) * rstd * w);
  k.r = (T)rstd;
  k.xc = k.s != (T)0 ? (T)(((double)k.m - mean) * rstd) : (T)0;
  return k;
}

// z and xhat of one element; SH: the plane is shifted (k.s != 0). Unshifted planes run the loops
// without the subtraction and the correction (eager's bits, and no extra work per element).
template <bool SH, typename T>
inline T z_of(T x, const Coef<T>& k) {
  if constexpr (SH) return (x - k.s) * k.a + k.beta;
  else return x * k.a + k.beta;
}

template <bool SH, typename T>
inline T xhat_of(T x, const Coef<T>& k) {
  if constexpr (SH) return (x - k.m) * k.r + k.xc;
  else return (x - k.m) * k.r;
}

// f(std::true_type) for a shifted plane, f(std::false_type) otherwise
template <typename T, typename F>
inline void with_shift(const Coef<T>& k, F&& f) {
  if (k.s != (T)0) f(std::true_type{});
  else f(std::false_type{});
}

template <typename T>
inline void apply_plane(const NormActParams& p, int64_t pl, double mean, double rstd) {
  const int64_t c = pl % p.C, S = p.S;
  const T* x = (const T*)p.x + pl * S;
  T* y = (T*)p.y + pl * S;
  const Coef<T> k = coef_of<T>(p, c, mean, rstd);
  const T a = k.a, bb = k.beta, sh = k.s;
  const int act = p.act == 3 ? 2 : p.act;
  const T slope = slope_of<T>(p, c);
  if (sh != (T)0) {
#pragma omp simd
    for (int64_t i = 0; i < S; ++i) y[i] = act_of<T>((x[i] - sh) * a + bb, act, slope);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < S; ++i) y[i] = act_of<T>(x[i] * a + bb, act, slope);
  }
}

// planar instance norm: statistics and elementwise pass plane by plane (the plane still in cache)
template <typename T>
void forward(const NormActParams& p) {
  const int64_t planes = p.N * p.C;
#pragma omp parallel for num_threads(std::max(1, p.num_threads)) schedule(static)
  for (int64_t pl = 0; pl < planes; ++pl) {
    double mean, m2;
    plane_stats<T>((const T*)p.x + pl * p.S, p.S, mean, m2);
    const double rstd = 1.0 / std::sqrt(m2 / (double)p.S + p.eps);
    p.mean[pl] = mean;
    p.rstd[pl] = rstd;
    apply_plane<T>(p, pl, mean, rstd);
  }
}

// planar, statistics per set (kind 1-3): per-plane statistics, merged, then the elementwise pass
template <typename T>
void forward_sets(const NormActParams& p) {
  const int64_t planes = p.N * p.C;
  const int nt = std::max(1, p.num_threads);
  if (p.kind != 3) {
    std::vector<double> pmean((size_t)planes), pm2((size_t)planes);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t pl = 0; pl < planes; ++pl) plane_stats<T>((const T*)p.x + pl * p.S, p.S, pmean[pl], pm2[pl]);
    merge_sets(p, pmean, pm2);
  }
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t pl = 0; pl < planes; ++pl) apply_plane<T>(p, pl, p.mean[pl], p.rstd[pl]);
}

// planar backward, statistics per set: per-plane sums, set coefficients, then dx
template <typename T>
void backward_sets(const NormActParams& p) {
  const int64_t planes = p.N * p.C, S = p.S;
  const int nt = std::max(1, p.num_threads);
  const int act = p.act == 3 ? 2 : p.act;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t pl = 0; pl < planes; ++pl) {
    const T* x = (const T*)p.x + pl * S;
    const T* dy = (const T*)p.dy + pl * S;
    const Coef<T> k = coef_of<T>(p, pl % p.C, p.mean[pl], p.rstd[pl]);
    const T slope = slope_of<T>(p, pl % p.C);
    double sdz = 0, sdzx = 0, sdp = 0;
    with_shift(k, [&](auto sh) {
      constexpr bool SH = decltype(sh)::value;
#pragma omp simd reduction(+ : sdz, sdzx, sdp)
      for (int64_t i = 0; i < S; ++i) {
        const T z = z_of<SH>(x[i], k);
        const T g = act_grad<T>(z, dy[i], act, slope);
        sdz += (double)g;
        sdzx += (double)g * (double)xhat_of<SH>(x[i], k);
        sdp += z > 0 ? 0.0 : (double)dy[i] * (double)z;
      }
    });
    p.dbias[pl] = sdz;
    p.dweight[pl] = sdzx;
    if (p.act == 3) p.dprelu[pl] = sdp;
  }
  std::vector<T> c0, c1, c2;
  set_coefficients<T>(p, c0, c1, c2);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t pl = 0; pl < planes; ++pl) {
    const T* x = (const T*)p.x + pl * S;
    const T* dy = (const T*)p.dy + pl * S;
    T* dx = (T*)p.dx + pl * S;
    const Coef<T> k = coef_of<T>(p, pl % p.C, p.mean[pl], p.rstd[pl]);
    const T slope = slope_of<T>(p, pl % p.C);
    const T k0 = c0[pl], k1 = c1[pl], k2 = c2[pl];
    const bool fixed = p.kind == 3;  // fixed statistics: dx = k0 g alone (an infinite x's xhat times
                                     // a zero k2 would be NaN)
    with_shift(k, [&](auto sh) {
      constexpr bool SH = decltype(sh)::value;
      if (fixed) {
#pragma omp simd
        for (int64_t i = 0; i < S; ++i) dx[i] = k0 * act_grad<T>(z_of<SH>(x[i], k), dy[i], act, slope);
      } else {
#pragma omp simd
        for (int64_t i = 0; i < S; ++i) {
          const T g = act_grad<T>(z_of<SH>(x[i], k), dy[i], act, slope);
          dx[i] = k0 * g - k1 - xhat_of<SH>(x[i], k) * k2;
        }
      }
    });
  }
}

template <typename T>
void backward(const NormActParams& p) {
  const int64_t planes = p.N * p.C;
  const int64_t S = p.S;
  const int act = p.act == 3 ? 2 : p.act;
#pragma omp parallel for num_threads(std::max(1, p.num_threads)) schedule(static)
  for (int64_t pl = 0; pl < planes; ++pl) {
    const int64_t c = pl % p.C;
    const T slope = slope_of<T>(p, c);
    const T* x = (const T*)p.x + pl * S;
    const T* dy = (const T*)p.dy + pl * S;
    T* dx = (T*)p.dx + pl * S;
    const double rstd = p.rstd[pl];
    const double w = p.weight ? (double)((const T*)p.weight)[c] : 1.0;
    const Coef<T> k = coef_of<T>(p, c, p.mean[pl], rstd);
    // pass 1: sum dz and sum dz * xhat (z recomputed exactly as in the forward)
    double sdz = 0, sdzx = 0;
    with_shift(k, [&](auto sh) {
      constexpr bool SH = decltype(sh)::value;
#pragma omp simd reduction(+ : sdz, sdzx)
      for (int64_t i = 0; i < S; ++i) {
        const T g = act_grad<T>(z_of<SH>(x[i], k), dy[i], act, slope);
        sdz += (double)g;
        sdzx += (double)g * (double)xhat_of<SH>(x[i], k);
      }
    });
    p.dbias[pl] = sdz;
    p.dweight[pl] = sdzx;
    if (p.act == 3) {  // PReLU's weight: sum of dy * z where z <= 0
      double sdp = 0;
      with_shift(k, [&](auto sh) {
        constexpr bool SH = decltype(sh)::value;
#pragma omp simd reduction(+ : sdp)
        for (int64_t i = 0; i < S; ++i) {
          const T z = z_of<SH>(x[i], k);
          sdp += z > 0 ? 0.0 : (double)dy[i] * (double)z;
        }
      });
      p.dprelu[pl] = sdp;
    }
    // pass 2: dx = rstd w (dz - mean(dz) - xhat mean(dz xhat))
    const T c0 = (T)(rstd * w), c1 = (T)(sdz / (double)S), c2 = (T)(sdzx / (double)S);
    with_shift(k, [&](auto sh) {
      constexpr bool SH = decltype(sh)::value;
#pragma omp simd
      for (int64_t i = 0; i < S; ++i) {
        const T g = act_grad<T>(z_of<SH>(x[i], k), dy[i], act, slope);
        dx[i] = c0 * (g - c1 - xhat_of<SH>(x[i], k) * c2);
      }
    });
  }
}

// ---- channels last: (N, S, C) ------------------------------------------------------------------
constexpr int64_t kRows = 512;  // spatial positions per reduction block

// per (n, c): sum over s of f(s, c), by blocks of kRows positions added in block order
template <typename F>
void cl_reduce(const NormActParams& p, int nacc, F&& f, std::vector<double>& out) {
  const int64_t N = p.N, C = p.C, S = p.S, nb = (S + kRows - 1) / kRows;
  std::vector<double> part((size_t)(N * nb * nacc * C), 0.0);
#pragma omp parallel for num_threads(std::max(1, p.num_threads)) schedule(static)
  for (int64_t t = 0; t < N * nb; ++t) {
    const int64_t n = t / nb, blk = t % nb;
    double* acc = part.data() + t * nacc * C;
    const int64_t s1 = std::min(S, (blk + 1) * kRows);
    for (int64_t s = blk * kRows; s < s1; ++s) f(n, s, acc);
  }
  out.assign((size_t)(N * nacc * C), 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t blk = 0; blk < nb; ++blk) {
      const double* a = part.data() + (n * nb + blk) * nacc * C;
      double* o = out.data() + n * nacc * C;
      for (int64_t k = 0; k < nacc * C; ++k) o[k] += a[k];
    }
}

template <typename T>
void apply_cl(const NormActParams& p);

template <typename T>
void forward_cl(const NormActParams& p) {
  const int64_t N = p.N, C = p.C, S = p.S;
  const T* x = (const T*)p.x;
  if (p.kind == 3) {  // given statistics: the elementwise pass only
    apply_cl<T>(p);
    return;
  }
  std::vector<double> sums;
  cl_reduce(p, 1, [&](int64_t n, int64_t s, double* acc) {
    const T* r = x + (n * S + s) * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += (double)r[c];
  }, sums);
  std::vector<double> mean((size_t)(N * C));
  for (int64_t k = 0; k < N * C; ++k) mean[k] = sums[k] / (double)S;
  std::vector<double> sq;
  cl_reduce(p, 1, [&](int64_t n, int64_t s, double* acc) {
    const T* r = x + (n * S + s) * C;
    const double* m = mean.data() + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const double d = (double)r[c] - m[c];
      acc[c] += d * d;
    }
  }, sq);
  if (p.kind != 0) {
    merge_sets(p, mean, sq);
  } else {
    for (int64_t k = 0; k < N * C; ++k) {
      p.mean[k] = mean[k];
      p.rstd[k] = 1.0 / std::sqrt(sq[k] / (double)S + p.eps);
    }
  }
  apply_cl<T>(p);
}

// channels last: y = act((x - s) * a + beta) with each plane's coefficients (coef_of) from p.mean / p.rstd
template <typename T>
void apply_cl(const NormActParams& p) {
  const int64_t N = p.N, C = p.C, S = p.S;
  const T* x = (const T*)p.x;
  std::vector<T> a((size_t)(N * C)), bb((size_t)(N * C)), sh((size_t)(N * C));
  for (int64_t k = 0; k < N * C; ++k) {
    const Coef<T> cf = coef_of<T>(p, k % C, p.mean[k], p.rstd[k]);
    a[k] = cf.a, bb[k] = cf.beta, sh[k] = cf.s;
  }
  T* y = (T*)p.y;
  const std::vector<T> sl = slopes_of<T>(p);
  const T* slope = sl.data();
  const int act = p.act == 3 ? 2 : p.act;
#pragma omp parallel for num_threads(std::max(1, p.num_threads)) schedule(static)
  for (int64_t t = 0; t < N * S; ++t) {
    const int64_t n = t / S;
    const T* r = x + t * C;
    T* o = y + t * C;
    const T* an = a.data() + n * C;
    const T* bn = bb.data() + n * C;
    const T* sn = sh.data() + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] = act_of<T>((r[c] - sn[c]) * an[c] + bn[c], act, slope[c]);
  }
}

template <typename T>
void backward_cl(const NormActParams& p) {
  const int64_t N = p.N, C = p.C, S = p.S;
  const T* x = (const T*)p.x;
  const T* dy = (const T*)p.dy;
  const std::vector<T> sl = slopes_of<T>(p);
  const T* slope = sl.data();
  const int act = p.act == 3 ? 2 : p.act;
  const bool prelu = p.act == 3;
  const size_t NC = (size_t)(N * C);
  std::vector<T> a(NC), bb(NC), sh(NC), m(NC), r(NC), xc(NC);
  for (int64_t k = 0; k < N * C; ++k) {
    const Coef<T> cf = coef_of<T>(p, k % C, p.mean[k], p.rstd[k]);
    a[k] = cf.a, bb[k] = cf.beta, sh[k] = cf.s, m[k] = cf.m, r[k] = cf.r, xc[k] = cf.xc;
  }
  // per n: C sums of g, C sums of g * xhat, and (PReLU) C sums of dy * z over z <= 0
  const int nacc = prelu ? 3 : 2;
  std::vector<double> sums;
  cl_reduce(p, nacc, [&](int64_t n, int64_t s, double* acc) {
    const T* xr = x + (n * S + s) * C;
    const T* dr = dy + (n * S + s) * C;
    const T *an = a.data() + n * C, *bn = bb.data() + n * C, *mn = m.data() + n * C, *rn = r.data() + n * C;
    const T *sn = sh.data() + n * C, *xn = xc.data() + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T z = (xr[c] - sn[c]) * an[c] + bn[c];
      const T g = act_grad<T>(z, dr[c], act, slope[c]);
      acc[c] += (double)g;
      acc[C + c] += (double)g * (double)((xr[c] - mn[c]) * rn[c] + xn[c]);
    }
    if (prelu) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T z = (xr[c] - sn[c]) * an[c] + bn[c];
        acc[2 * C + c] += z > 0 ? 0.0 : (double)dr[c] * (double)z;
      }
    }
  }, sums);
  std::vector<T> c0((size_t)(N * C)), c1((size_t)(N * C)), c2((size_t)(N * C));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t k = n * C + c;
      const double w = p.weight ? (double)((const T*)p.weight)[c] : 1.0;
      const double sdz = sums[n * nacc * C + c], sdzx = sums[n * nacc * C + C + c];
      p.dbias[k] = sdz;
      p.dweight[k] = sdzx;
      if (prelu) p.dprelu[k] = sums[n * nacc * C + 2 * C + c];
      c0[k] = (T)(p.rstd[k] * w);
      c1[k] = (T)(sdz / (double)S);
      c2[k] = (T)(sdzx / (double)S);
    }
  const bool sets = p.kind != 0;  // dx = c0 g - c1 - xhat c2 (set coefficients) instead
  const bool fixed = p.kind == 3;  // given statistics: dx = c0 g (no NaN from an infinite x's xhat)
  if (sets) set_coefficients<T>(p, c0, c1, c2);
  T* dx = (T*)p.dx;
  // the three forms of dx as separate loops (MODE 0: instance norm, 1: set coefficients, 2: fixed)
  auto dx_pass = [&](auto mode) {
    constexpr int MODE = decltype(mode)::value;
#pragma omp parallel for num_threads(std::max(1, p.num_threads)) schedule(static)
    for (int64_t t = 0; t < N * S; ++t) {
      const int64_t n = t / S;
      const T* xr = x + t * C;
      const T* dr = dy + t * C;
      T* o = dx + t * C;
      const T *an = a.data() + n * C, *bn = bb.data() + n * C, *mn = m.data() + n * C, *rn = r.data() + n * C;
      const T *sn = sh.data() + n * C, *xn = xc.data() + n * C;
      const T *k0 = c0.data() + n * C, *k1 = c1.data() + n * C, *k2 = c2.data() + n * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T z = (xr[c] - sn[c]) * an[c] + bn[c];
        const T g = act_grad<T>(z, dr[c], act, slope[c]);
        if constexpr (MODE == 2) {
          o[c] = k0[c] * g;
        } else if constexpr (MODE == 1) {
          o[c] = k0[c] * g - k1[c] - ((xr[c] - mn[c]) * rn[c] + xn[c]) * k2[c];
        } else {
          o[c] = k0[c] * (g - k1[c] - ((xr[c] - mn[c]) * rn[c] + xn[c]) * k2[c]);
        }
      }
    }
  };
  if (fixed) dx_pass(std::integral_constant<int, 2>{});
  else if (sets) dx_pass(std::integral_constant<int, 1>{});
  else dx_pass(std::integral_constant<int, 0>{});
}

}  // namespace

namespace {
bool bad(const NormActParams& p, bool backward) {
  if (p.N < 0 || p.C < 1 || p.S < 1 || p.act < 0 || p.act > 3) return true;
  if (p.kind < 0 || p.kind > 3 || (p.kind == 1 && (p.groups < 1 || p.C % p.groups != 0))) return true;
  if (p.act == 3 && (!p.prelu || (p.prelu_n != 1 && p.prelu_n != p.C) || (backward && !p.dprelu))) return true;
  return false;
}
}  // namespace

int norm_act_fwd_cpu(const NormActParams& p) {
  if (bad(p, false)) return kBadArgument;
  if (p.channels_last) {
    if (p.dtype == kF32) forward_cl<float>(p);
    else if (p.dtype == kF64) forward_cl<double>(p);
    else return kBadDtype;
    return kOk;
  }
  if (p.kind != 0) {
    if (p.dtype == kF32) forward_sets<float>(p);
    else if (p.dtype == kF64) forward_sets<double>(p);
    else return kBadDtype;
    return kOk;
  }
  if (p.dtype == kF32) forward<float>(p);
  else if (p.dtype == kF64) forward<double>(p);
  else return kBadDtype;
  return kOk;
}

int norm_act_bwd_cpu(const NormActParams& p) {
  if (bad(p, true)) return kBadArgument;
  if (p.channels_last) {
    if (p.dtype == kF32) backward_cl<float>(p);
    else if (p.dtype == kF64) backward_cl<double>(p);
    else return kBadDtype;
    return kOk;
  }
  if (p.kind != 0) {
    if (p.dtype == kF32) backward_sets<float>(p);
    else if (p.dtype == kF64) backward_sets<double>(p);
    else return kBadDtype;
    return kOk;
  }
  if (p.dtype == kF32) backward<float>(p);
  else if (p.dtype == kF64) backward<double>(p);
  else return kBadDtype;
  return kOk;
}

}  // namespace fastmed
