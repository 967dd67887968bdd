// Sliding-window stitching on the CPU (OpenMP over rows of a window, windows in order).
// Compiled with -ffp-contract=off: p * w and the addition are rounded separately, as PyTorch's
// `buffer *= w; out[idx] += buffer` rounds them, so results match MONAI's bit for bit.
// Compiled once per instruction set (FM_ISA, as dice_ce_cpu.cpp); the dispatcher picks one.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <type_traits>

#include "../common/common.h"
#include "sliding_window.h"

namespace fastmed {
namespace FM_CAT(isa_, FM_ISA) {
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

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FM_HAVE_F16C_PATH 1
// float16 accumulators with F16C conversions, 8 voxels at a time (the portable bit-exact
// conversions above are ~20x slower). Same roundings: weight, product and sum each rounded to fp16.
template <bool PredHalf, bool Write>
__attribute__((target("avx,f16c"))) void half_row(const void* qv, uint16_t* o, const float* g2, float gij,
                                                 float wmin, int64_t k0, int64_t k1) {
  const __m256 vg = _mm256_set1_ps(gij), vmin = _mm256_set1_ps(wmin);
  const uint16_t* qh = (const uint16_t*)qv;
  const float* qf = (const float*)qv;
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) {
    __m256 w = _mm256_mul_ps(vg, _mm256_loadu_ps(g2 + k));
    w = _mm256_max_ps(w, vmin);
    w = _mm256_cvtph_ps(_mm256_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m256 q = PredHalf ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(qh + k))) : _mm256_loadu_ps(qf + k);
    __m256 t = _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_mul_ps(q, w), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    if (!Write) t = _mm256_add_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(o + k))), t);
    _mm_storeu_si128((__m128i*)(o + k), _mm256_cvtps_ph(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; k < k1; ++k) {  // tail: the portable conversions (same results)
    const float v = gij * g2[k];
    const float w = half_bits_to_float(float_to_half_bits(v < wmin ? wmin : v));
    const float q = PredHalf ? half_bits_to_float(qh[k]) : qf[k];
    const float t = half_bits_to_float(float_to_half_bits(q * w));
    o[k] = float_to_half_bits(Write ? t : half_bits_to_float(o[k]) + t);
  }
}
__attribute__((target("avx,f16c"))) inline void half_to_float_row(const uint16_t* src, int64_t n, float* dst) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + k))));
  for (; k < n; ++k) dst[k] = half_bits_to_float(src[k]);
}
inline bool have_f16c() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  }();
  return ok;
}
#endif

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
#if defined(FM_HAVE_F16C_PATH)
          if constexpr (std::is_same<A, half_t>::value && (std::is_same<P, half_t>::value || std::is_same<P, float>::value)) {
            if (unit && p.wmode == 1 && have_f16c()) {
              constexpr bool ph = std::is_same<P, half_t>::value;
              uint16_t* oh = (uint16_t*)o;
              if (write) half_row<ph, true>(q, oh, p.g2, gij, p.wmin, k0, k1);
              else half_row<ph, false>(q, oh, p.g2, gij, p.wmin, k0, k1);
              return;
            }
          }
#endif
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

// softmax over channels of acc / count: all C channels of a row are read into a float buffer
// first, so dst may be acc itself
template <typename A, typename D>
void normalize_softmax(const SWNormParams& p) {
  using V = typename Val<A>::type;
  const int64_t rows = p.B * p.size[0] * p.size[1];
  const int64_t nk = p.size[2];
#pragma omp parallel num_threads(std::max(1, p.num_threads))
  {
    std::vector<V> buf((size_t)(p.C * nk)), mx((size_t)nk), sum((size_t)nk);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      int64_t t = r;
      const int64_t j = t % p.size[1]; t /= p.size[1];
      const int64_t i = t % p.size[0];
      const int64_t b = t / p.size[0];
      const A* n = (const A*)p.count + i * p.n_s[0] + j * p.n_s[1];
      for (int64_t c = 0; c < p.C; ++c) {
        const A* a = (const A*)p.acc + b * p.a_sb + c * p.a_sc + i * p.a_s[0] + j * p.a_s[1];
        V* v = buf.data() + c * nk;
        for (int64_t k = 0; k < nk; ++k) {
          v[k] = rnd<A>(ld<A>(a + k * p.a_s[2]) / ld<A>(n + k * p.n_s[2]));
          mx[k] = c == 0 ? v[k] : std::max(mx[k], v[k]);
        }
      }
      std::fill(sum.begin(), sum.end(), (V)0);
      for (int64_t c = 0; c < p.C; ++c) {
        V* v = buf.data() + c * nk;
        for (int64_t k = 0; k < nk; ++k) { v[k] = std::exp(v[k] - mx[k]); sum[k] += v[k]; }
      }
      for (int64_t c = 0; c < p.C; ++c) {
        const V* v = buf.data() + c * nk;
        D* d = (D*)p.dst + b * p.d_sb + c * p.d_sc + i * p.d_s[0] + j * p.d_s[1];
        for (int64_t k = 0; k < nk; ++k) st<D>(d + k * p.d_s[2], (typename Val<D>::type)(v[k] / sum[k]));
      }
    }
  }
}

template <typename A>
int normalize_dst(const SWNormParams& p) {
  if (p.softmax) {
    switch (p.dst_dtype) {
      case kF32: normalize_softmax<A, float>(p); return kOk;
      case kF64: normalize_softmax<A, double>(p); return kOk;
      case kF16: normalize_softmax<A, half_t>(p); return kOk;
      case kBF16: normalize_softmax<A, bf16_t>(p); return kOk;
      default: return kBadDtype;
    }
  }
  switch (p.dst_dtype) {
    case kF32: normalize<A, float>(p); return kOk;
    case kF64: normalize<A, double>(p); return kOk;
    case kF16: normalize<A, half_t>(p); return kOk;
    case kBF16: normalize<A, bf16_t>(p); return kOk;
    default: return kBadDtype;
  }
}

// one row of an accumulator as float / double (F16C for float16 where the CPU has it)
template <typename A>
void load_row(const A* src, int64_t stride, int64_t n, typename Val<A>::type* dst) {
#if defined(FM_HAVE_F16C_PATH)
  if constexpr (std::is_same<A, half_t>::value) {
    if (stride == 1 && have_f16c()) {
      half_to_float_row((const uint16_t*)src, n, dst);
      return;
    }
  }
#endif
  for (int64_t k = 0; k < n; ++k) dst[k] = ld<A>(src + k * stride);
}

// float16 / bfloat16 accumulators are compared in float32 after the division (argmax of the
// exact quotient; torch would round it to the accumulator's precision first, which can only turn a
// near-tie into a tie)
template <typename A>
void argmax_labels(const SWArgmaxParams& p) {
  using V = typename Val<A>::type;
  const int64_t rows = p.B * p.size[0] * p.size[1];
  const int64_t nk = p.size[2];
#pragma omp parallel num_threads(std::max(1, p.num_threads))
  {
    std::vector<V> best(nk), row(nk), cnt(nk);
    std::vector<int32_t> arg(nk);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      int64_t t = r;
      const int64_t j = t % p.size[1]; t /= p.size[1];
      const int64_t i = t % p.size[0];
      const int64_t b = t / p.size[0];
      load_row<A>((const A*)p.count + i * p.n_s[0] + j * p.n_s[1], p.n_s[2], nk, cnt.data());
      // class by class over the row (contiguous reads); first maximum wins, NaN counts as largest
      for (int64_t c = 0; c < p.C; ++c) {
        load_row<A>((const A*)p.acc + b * p.a_sb + c * p.a_sc + i * p.a_s[0] + j * p.a_s[1], p.a_s[2], nk, row.data());
        V* bp = best.data();
        int32_t* ap = arg.data();
        const V* rp = row.data();
        const V* np = cnt.data();
        if (c == 0) {
          for (int64_t k = 0; k < nk; ++k) { bp[k] = rp[k] / np[k]; ap[k] = 0; }
          continue;
        }
        const int32_t cc = (int32_t)c;
#pragma omp simd
        for (int64_t k = 0; k < nk; ++k) {
          const V v = rp[k] / np[k];
          const V cur = bp[k];
          const bool take = v > cur || (v != v && cur == cur);
          bp[k] = take ? v : cur;
          ap[k] = take ? cc : ap[k];
        }
      }
      char* d = (char*)p.dst + (b * p.d_sb + i * p.d_s[0] + j * p.d_s[1]) * p.dst_esize;
      for (int64_t k = 0; k < nk; ++k) {
        char* e = d + k * p.d_s[2] * p.dst_esize;
        if (p.dst_esize == 1) *(uint8_t*)e = (uint8_t)arg[k];
        else if (p.dst_esize == 2) *(int16_t*)e = (int16_t)arg[k];
        else if (p.dst_esize == 4) *(int32_t*)e = arg[k];
        else *(int64_t*)e = arg[k];
      }
    }
  }
}

// ---- the fused batch pass (sw_stitch) ----------------------------------------------------------
// Along each dim the batch's extent splits into intervals on which the set of batch windows
// containing a voxel, and the first and last grid window containing it, are constant. Per row of
// the accumulator and per x interval, the contributions of the covering windows are summed in
// window order in a small buffer (in the accumulator's rounding), and the row is written once.
struct SWInterval {
  int64_t a, b;     // [a, b) in accumulator coordinates
  uint64_t mask;    // bit m: batch window n0 + m contains it
  int64_t gfirst, glast;  // first / last grid index (along this dim) of a window containing it
};

inline void stitch_intervals(const SWAccParams& p, int d, int64_t n0, int64_t n1, std::vector<SWInterval>& out) {
  const int64_t w = p.win[d];
  const int64_t* g = p.grid + (d == 0 ? 0 : d == 1 ? p.grid_n[0] : p.grid_n[0] + p.grid_n[1]);
  const int64_t gn = p.grid_n[d];
  int64_t lo = INT64_MAX, hi = INT64_MIN;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t s = p.starts[4 * n + 1 + d];
    lo = std::min(lo, s);
    hi = std::max(hi, s + w);
  }
  std::vector<int64_t> br{lo, hi};
  for (int64_t j = 0; j < gn; ++j)
    for (int64_t v : {g[j], g[j] + w})
      if (v > lo && v < hi) br.push_back(v);
  std::sort(br.begin(), br.end());
  br.erase(std::unique(br.begin(), br.end()), br.end());
  out.clear();
  for (size_t t = 0; t + 1 < br.size(); ++t) {
    const int64_t a = br[t];
    SWInterval iv{a, br[t + 1], 0, -1, -1};
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t s = p.starts[4 * n + 1 + d];
      if (s <= a && a < s + w) iv.mask |= uint64_t(1) << (n - n0);
    }
    for (int64_t j = 0; j < gn; ++j) {
      if (g[j] <= a && a < g[j] + w) {
        if (iv.gfirst < 0) iv.gfirst = j;
        iv.glast = j;
      }
    }
    out.push_back(iv);
  }
}

// contribution r(p * r(w)) of one window at x offsets [0, n) of a row (Gaussian weights, unit stride)
template <typename A, typename P>
struct GaussRow {
  const P* q; const float* g2; float gij;
};

// one or two windows over a segment, straight in memory: out = [out +] w1 p1 [+ w2 p2] [/ count]
template <typename A, typename P, int NW, bool Fresh, bool Last>
inline void seg_direct(A* o, const GaussRow<A, P>* wr, float wmin, const A* cn, int64_t n) {
  using V = typename Val<A>::type;
  const P* q0 = wr[0].q; const float* h0 = wr[0].g2; const float a0 = wr[0].gij;
  const P* q1 = NW > 1 ? wr[1].q : nullptr; const float* h1 = NW > 1 ? wr[1].g2 : nullptr;
  const float a1 = NW > 1 ? wr[1].gij : 0.0f;
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const float v0 = a0 * h0[k];
    V s = rnd<A>((V)ld<P>(q0 + k) * rnd<A>((V)(v0 < wmin ? wmin : v0)));
    if (!Fresh) s = rnd<A>(ld<A>(o + k) + s);
    if (NW > 1) {
      const float v1 = a1 * h1[k];
      s = rnd<A>(s + rnd<A>((V)ld<P>(q1 + k) * rnd<A>((V)(v1 < wmin ? wmin : v1))));
    }
    if (Last) s = rnd<A>(s / ld<A>(cn + k));
    st<A>(o + k, s);
  }
}

template <typename A, typename P, int NW>
inline void seg_dispatch(bool fresh, bool last, A* o, const GaussRow<A, P>* wr, float wmin, const A* cn, int64_t n) {
  if (fresh) {
    if (last) seg_direct<A, P, NW, true, true>(o, wr, wmin, cn, n);
    else seg_direct<A, P, NW, true, false>(o, wr, wmin, cn, n);
  } else {
    if (last) seg_direct<A, P, NW, false, true>(o, wr, wmin, cn, n);
    else seg_direct<A, P, NW, false, false>(o, wr, wmin, cn, n);
  }
}

template <typename A, typename P>
void stitch(const SWAccParams& p) {
  using V = typename Val<A>::type;
  constexpr int64_t kChunk = 256;
  const int64_t C = p.C;
  // fast path: unit x strides, Gaussian (separable) weights, contiguous count rows
  const bool fast = p.a_s[2] == 1 && p.p_s[2] == 1 && p.wmode == 1 && (!p.count || p.n_s[2] == 1);
  // groups of consecutive windows of one image
  struct Group { int64_t n0, n1; std::vector<SWInterval> iv[3]; int64_t ntask; };
  std::vector<Group> groups;
  for (int64_t n = 0; n < p.N;) {
    int64_t e = n + 1;
    while (e < p.N && p.starts[4 * e] == p.starts[4 * n]) ++e;
    Group gr{n, e, {}, 0};
    for (int d = 0; d < 3; ++d) stitch_intervals(p, d, n, e, gr.iv[d]);
    gr.ntask = C * (gr.iv[0].back().b - gr.iv[0].front().a);
    groups.push_back(std::move(gr));
    n = e;
  }
  int64_t ntask = 0;
  for (auto& gr : groups) ntask += gr.ntask;
  struct Seg { int64_t a, b; uint64_t mask; bool fresh, last; };
#pragma omp parallel num_threads(std::max(1, p.num_threads))
  {
    alignas(64) V tmp[kChunk];
    std::vector<Seg> segs;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < ntask; ++t) {
      int64_t r = t;
      size_t gi = 0;
      while (r >= groups[gi].ntask) r -= groups[gi++].ntask;
      const Group& gr = groups[gi];
      const int64_t nz = gr.iv[0].back().b - gr.iv[0].front().a;
      const int64_t c = r / nz, z = gr.iv[0].front().a + r % nz;
      const SWInterval* iz = gr.iv[0].data();
      while (z >= iz->b) ++iz;
      const int64_t b = p.starts[4 * gr.n0];
      const int64_t wfirst = p.widx[gr.n0], wlast = p.widx[gr.n1 - 1];
      A* arow_z = (A*)p.acc + b * p.a_sb + c * p.a_sc + z * p.a_s[0];
      for (const SWInterval& iy : gr.iv[1]) {
        const uint64_t mzy = iz->mask & iy.mask;
        if (!mzy) continue;
        // the x segments of this (z, y) cell: covering windows, first and last touches
        segs.clear();
        for (const SWInterval& ix : gr.iv[2]) {
          const uint64_t mask = mzy & ix.mask;
          if (!mask) continue;
          const int64_t gf = (iz->gfirst * p.grid_n[1] + iy.gfirst) * p.grid_n[2] + ix.gfirst;
          const int64_t gl = (iz->glast * p.grid_n[1] + iy.glast) * p.grid_n[2] + ix.glast;
          segs.push_back(Seg{ix.a, ix.b, mask, gf >= wfirst, p.count != nullptr && gl <= wlast});
        }
        for (int64_t y = iy.a; y < iy.b; ++y) {
          A* arow = arow_z + y * p.a_s[1];
          const A* crow = p.count ? (const A*)p.count + z * p.n_s[0] + y * p.n_s[1] : nullptr;
          for (const Seg& sg : segs) {
            const int nw = __builtin_popcountll(sg.mask);
            if (fast && nw <= 2) {
              GaussRow<A, P> wr[2];
              int w = 0;
              for (uint64_t m = sg.mask; m; m &= m - 1, ++w) {
                const int64_t n = gr.n0 + __builtin_ctzll(m);
                const int64_t* s = p.starts + 4 * n;
                const int64_t i = z - s[1], j = y - s[2], k0 = sg.a - s[3];
                wr[w].q = (const P*)p.pred + n * p.p_sn + c * p.p_sc + i * p.p_s[0] + j * p.p_s[1] + k0;
                wr[w].g2 = p.g2 + k0;
                wr[w].gij = p.g0[i] * p.g1[j];
              }
              A* o = arow + sg.a;
              const A* cn = crow ? crow + sg.a : nullptr;
              if (nw == 1) seg_dispatch<A, P, 1>(sg.fresh, sg.last, o, wr, p.wmin, cn, sg.b - sg.a);
              else seg_dispatch<A, P, 2>(sg.fresh, sg.last, o, wr, p.wmin, cn, sg.b - sg.a);
              continue;
            }
            // any number of windows, any strides and weights: summed in a buffer, in order
            for (int64_t x0 = sg.a; x0 < sg.b; x0 += kChunk) {
              const int64_t nk = std::min(kChunk, sg.b - x0);
              A* o = arow + x0 * p.a_s[2];
              if (!sg.fresh)
                for (int64_t k = 0; k < nk; ++k) tmp[k] = ld<A>(o + k * p.a_s[2]);
              bool first = sg.fresh;
              for (uint64_t m = sg.mask; m; m &= m - 1) {
                const int64_t n = gr.n0 + __builtin_ctzll(m);
                const int64_t* s = p.starts + 4 * n;
                const int64_t i = z - s[1], j = y - s[2], k0 = x0 - s[3];
                const P* q = (const P*)p.pred + n * p.p_sn + c * p.p_sc + i * p.p_s[0] + j * p.p_s[1] + k0 * p.p_s[2];
                const float gij = p.wmode == 1 ? p.g0[i] * p.g1[j] : 0.0f;
                const float* mrow = p.wmode == 2 ? p.wmap + (i * p.win[1] + j) * p.win[2] : nullptr;
                for (int64_t k = 0; k < nk; ++k) {
                  const V prod = rnd<A>((V)ld<P>(q + k * p.p_s[2]) * weight_at<A>(p, gij, mrow, k0 + k));
                  tmp[k] = first ? prod : rnd<A>(tmp[k] + prod);
                }
                first = false;
              }
              if (sg.last) {
                const A* cn = crow + x0 * p.n_s[2];
                for (int64_t k = 0; k < nk; ++k) st<A>(o + k * p.a_s[2], rnd<A>(tmp[k] / ld<A>(cn + k * p.n_s[2])));
              } else {
                for (int64_t k = 0; k < nk; ++k) st<A>(o + k * p.a_s[2], tmp[k]);
              }
            }
          }
        }
      }
    }
  }
}

template <typename A>
int stitch_pred(const SWAccParams& p) {
  switch (p.pred_dtype) {
    case kF32: stitch<A, float>(p); return kOk;
    case kF64: stitch<A, double>(p); return kOk;
    case kF16: stitch<A, half_t>(p); return kOk;
    case kBF16: stitch<A, bf16_t>(p); return kOk;
    default: return kBadDtype;
  }
}

}  // namespace

int sw_argmax(const SWArgmaxParams& p) {
  switch (p.acc_dtype) {
    case kF32: argmax_labels<float>(p); return kOk;
    case kF64: argmax_labels<double>(p); return kOk;
    case kF16: argmax_labels<half_t>(p); return kOk;
    case kBF16: argmax_labels<bf16_t>(p); return kOk;
    default: return kBadDtype;
  }
}

int sw_gather(const SWGatherParams& p) {
  if (p.N < 0 || p.C < 1 || (p.esize != 1 && p.esize != 2 && p.esize != 4 && p.esize != 8)) return kBadArgument;
  const int64_t rows = p.N * p.C * p.win[0] * p.win[1];
  const int64_t nk = p.win[2];
  const int64_t es = p.esize;
#pragma omp parallel for num_threads(std::max(1, p.num_threads)) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    int64_t t = r;
    const int64_t j = t % p.win[1]; t /= p.win[1];
    const int64_t i = t % p.win[0]; t /= p.win[0];
    const int64_t c = t % p.C, n = t / p.C;
    const int64_t* s = p.starts + 4 * n;
    const char* src = (const char*)p.src +
                      (s[0] * p.s_sb + c * p.s_sc + (s[1] + i) * p.s_s[0] + (s[2] + j) * p.s_s[1] + s[3] * p.s_s[2]) * es;
    char* dst = (char*)p.dst + r * nk * es;
    if (p.s_s[2] == 1) {
      std::memcpy(dst, src, (size_t)(nk * es));
    } else {
      for (int64_t k = 0; k < nk; ++k) std::memcpy(dst + k * es, src + k * p.s_s[2] * es, (size_t)es);
    }
  }
  return kOk;
}

int sw_accumulate(const SWAccParams& p) {
  if (p.N < 0 || p.C < 1 || p.win[0] < 0 || p.win[1] < 0 || p.win[2] < 0) return kBadArgument;
  switch (p.acc_dtype) {
    case kF32: return accumulate_pred<float>(p);
    case kF64: return accumulate_pred<double>(p);
    case kF16: return accumulate_pred<half_t>(p);
    case kBF16: return accumulate_pred<bf16_t>(p);
    default: return kBadDtype;
  }
}

int sw_stitch(const SWAccParams& p) {
  if (p.N < 1 || p.N > 64 || p.C < 1 || !p.pred || !p.widx || !p.grid) return kBadArgument;
  for (int d = 0; d < 3; ++d)
    if (p.win[d] < 1 || p.grid_n[d] < 1) return kBadArgument;
  switch (p.acc_dtype) {
    case kF32: return stitch_pred<float>(p);
    case kF64: return stitch_pred<double>(p);
    case kF16: return stitch_pred<half_t>(p);
    case kBF16: return stitch_pred<bf16_t>(p);
    default: return kBadDtype;
  }
}

int sw_normalize(const SWNormParams& p) {
  switch (p.acc_dtype) {
    case kF32: return normalize_dst<float>(p);
    case kF64: return normalize_dst<double>(p);
    case kF16: return normalize_dst<half_t>(p);
    case kBF16: return normalize_dst<bf16_t>(p);
    default: return kBadDtype;
  }
}

}  // namespace isa_*
}  // namespace fastmed
