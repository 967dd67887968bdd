// Sliding-window stitching on the CPU (OpenMP over rows of a window, windows in order).
// Compiled with -ffp-contract=off: p * w and the addition are rounded separately, as PyTorch's
// `buffer *= w; out[idx] += buffer` rounds them, so results match MONAI's bit for bit.
#include <algorithm>
#include <cstdint>

#include "../common/common.h"
#include "sliding_window.h"

namespace fastmed {
namespace {

struct half_t { uint16_t v; };
struct bf16_t { uint16_t v; };

// value type V of an element type T (float for float32/16/bf16, double for float64)
template <typename T> struct Val { using type = float; };
template <> struct Val<double> { using type = double; };

template <typename T> inline typename Val<T>::type ld(const T* p) { return *p; }
template <> inline float ld<half_t>(const half_t* p) { return half_bits_to_float(p->v); }
template <> inline float ld<bf16_t>(const bf16_t* p) { return bf16_bits_to_float(p->v); }
template <typename T> inline void st(T* p, typename Val<T>::type v) { *p = (T)v; }
template <> inline void st<half_t>(half_t* p, float v) { p->v = float_to_half_bits(v); }
template <> inline void st<bf16_t>(bf16_t* p, float v) { p->v = float_to_bf16_bits(v); }
// round a value to T's precision
template <typename T> inline typename Val<T>::type rnd(typename Val<T>::type v) { return v; }
template <> inline float rnd<half_t>(float v) { return half_bits_to_float(float_to_half_bits(v)); }
template <> inline float rnd<bf16_t>(float v) { return bf16_bits_to_float(float_to_bf16_bits(v)); }

// weight of window voxel (i, j, k), rounded to the accumulator's precision (gij = g0[i] * g1[j])
template <typename A>
inline typename Val<A>::type weight_at(const SWAccParams& p, float gij, const float* mrow, int64_t k) {
  using V = typename Val<A>::type;
  if (p.wmode == 1) {
    const float v = gij * p.g2[k];
    return rnd<A>((V)(v < p.wmin ? p.wmin : v));
  }
  if (p.wmode == 2) return rnd<A>((V)mrow[k]);
  return (V)1;
}

// One task per (channel, window plane i): its rows j are nearly contiguous in both the prediction
// and the accumulator, so every thread streams through memory.
template <typename A, typename P>
void accumulate(const SWAccParams& p) {
  using V = typename Val<A>::type;
  const int64_t nk = p.win[2];
  const int64_t C = p.pred ? p.C : 1;
  const int64_t tasks = C * p.win[0];
  const bool unit = p.a_s[2] == 1 && p.p_s[2] == 1;
#pragma omp parallel num_threads(std::max(1, p.num_threads))
  for (int64_t n = 0; n < p.N; ++n) {  // windows in order: they may overlap
    const int64_t* s = p.starts + 4 * n;
    A* base = (A*)p.acc + s[0] * p.a_sb + s[1] * p.a_s[0] + s[2] * p.a_s[1] + s[3] * p.a_s[2];
    const P* pbase = p.pred ? (const P*)p.pred + n * p.p_sn : nullptr;
    const int64_t* fr = p.fresh ? p.fresh + 6 * n : nullptr;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t c = t / p.win[0], i = t % p.win[0];
      for (int64_t j = 0; j < p.win[1]; ++j) {
        const float gij = p.wmode == 1 ? p.g0[i] * p.g1[j] : 0.0f;
        const float* mrow = p.wmode == 2 ? p.wmap + (i * p.win[1] + j) * nk : nullptr;
        A* o = base + c * p.a_sc + i * p.a_s[0] + j * p.a_s[1];
        if (!pbase) {
          for (int64_t k = 0; k < nk; ++k)
            st<A>(o + k * p.a_s[2], rnd<A>(ld<A>(o + k * p.a_s[2]) + weight_at<A>(p, gij, mrow, k)));
          continue;
        }
        const P* q = pbase + c * p.p_sc + i * p.p_s[0] + j * p.p_s[1];
        // k in [f0, f1) is written (first touch), the rest added
        int64_t f0 = nk, f1 = nk;
        if (fr && i >= fr[0] && i < fr[1] && j >= fr[2] && j < fr[3]) { f0 = fr[4]; f1 = fr[5]; }
        auto run = [&](int64_t k0, int64_t k1, bool write) {
          if (unit && p.wmode == 1) {
            const float* g2 = p.g2;
            const float wmin = p.wmin;
            if (write) {
#pragma omp simd
              for (int64_t k = k0; k < k1; ++k) {
                const float v = gij * g2[k];
                st<A>(o + k, rnd<A>((V)ld<P>(q + k) * rnd<A>((V)(v < wmin ? wmin : v))));
              }
            } else {
#pragma omp simd
              for (int64_t k = k0; k < k1; ++k) {
                const float v = gij * g2[k];
                const V prod = rnd<A>((V)ld<P>(q + k) * rnd<A>((V)(v < wmin ? wmin : v)));
                st<A>(o + k, rnd<A>(ld<A>(o + k) + prod));
              }
            }
          } else {
            for (int64_t k = k0; k < k1; ++k) {
              const V prod = rnd<A>((V)ld<P>(q + k * p.p_s[2]) * weight_at<A>(p, gij, mrow, k));
              A* ok = o + k * p.a_s[2];
              st<A>(ok, write ? prod : rnd<A>(ld<A>(ok) + prod));
            }
          }
        };
        run(0, f0, false);
        run(f0, f1, true);
        run(f1, nk, false);
      }
    }  // implicit barrier: the next window may overlap this one
  }
}

template <typename A>
int accumulate_pred(const SWAccParams& p) {
  if (!p.pred) { accumulate<A, A>(p); return kOk; }
  switch (p.pred_dtype) {
    case kF32: accumulate<A, float>(p); return kOk;
    case kF64: accumulate<A, double>(p); return kOk;
    case kF16: accumulate<A, half_t>(p); return kOk;
    case kBF16: accumulate<A, bf16_t>(p); return kOk;
    default: return kBadDtype;
  }
}

template <typename A, typename D>
void normalize(const SWNormParams& p) {
  using V = typename Val<A>::type;
  const int64_t rows = p.B * p.C * p.size[0] * p.size[1];
  const int64_t nk = p.size[2];
#pragma omp parallel for num_threads(std::max(1, p.num_threads)) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    int64_t t = r;
    const int64_t j = t % p.size[1]; t /= p.size[1];
    const int64_t i = t % p.size[0]; t /= p.size[0];
    const int64_t c = t % p.C, b = t / p.C;
    const A* a = (const A*)p.acc + b * p.a_sb + c * p.a_sc + i * p.a_s[0] + j * p.a_s[1];
    const A* n = (const A*)p.count + i * p.n_s[0] + j * p.n_s[1];
    D* d = (D*)p.dst + b * p.d_sb + c * p.d_sc + i * p.d_s[0] + j * p.d_s[1];
    for (int64_t k = 0; k < nk; ++k) {
      const V v = rnd<A>(ld<A>(a + k * p.a_s[2]) / ld<A>(n + k * p.n_s[2]));
      st<D>(d + k * p.d_s[2], (typename Val<D>::type)v);
    }
  }
}

template <typename A>
int normalize_dst(const SWNormParams& p) {
  switch (p.dst_dtype) {
    case kF32: normalize<A, float>(p); return kOk;
    case kF64: normalize<A, double>(p); return kOk;
    case kF16: normalize<A, half_t>(p); return kOk;
    case kBF16: normalize<A, bf16_t>(p); return kOk;
    default: return kBadDtype;
  }
}

}  // namespace

int sw_accumulate_cpu(const SWAccParams& p) {
  if (p.N < 0 || p.C < 1 || p.win[0] < 0 || p.win[1] < 0 || p.win[2] < 0) return kBadArgument;
  switch (p.acc_dtype) {
    case kF32: return accumulate_pred<float>(p);
    case kF64: return accumulate_pred<double>(p);
    case kF16: return accumulate_pred<half_t>(p);
    case kBF16: return accumulate_pred<bf16_t>(p);
    default: return kBadDtype;
  }
}

int sw_normalize_cpu(const SWNormParams& p) {
  switch (p.acc_dtype) {
    case kF32: return normalize_dst<float>(p);
    case kF64: return normalize_dst<double>(p);
    case kF16: return normalize_dst<half_t>(p);
    case kBF16: return normalize_dst<bf16_t>(p);
    default: return kBadDtype;
  }
}

}  // namespace fastmed
