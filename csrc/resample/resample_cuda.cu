// Resampling through a voxel-to-voxel affine and the cubic B-spline prefilter on CUDA (contract:
// resample.h; float64 oracle: resample_reference / spline_prefilter_reference in
// fastmed/ops/resample.py).
//
// resample: one thread per output voxel (b, z, y, x), grid-stride over a 64-bit index. The thread
// evaluates the input coordinate T_b @ (z, y, x, 1) in double, builds the taps of each dim once
// (element offset after padding, weight, validity) and reuses them for every channel (values,
// argmax) or every label (labels). Kernels are templated on the compute type V, the source type S,
// the most taps of any dim (1, 2 or 4: tap loops are fully unrolled and predicated, so the tap arrays
// stay in registers) and the output mode; the destination type is a warp-uniform runtime switch at
// the one store per output. Weights and sums follow resample_reference term by term (weights of
// the same formulas, ((w0 w1) w2) v added one tap at a time, a zeros-padding tap outside the input
// adding w * cval without reading memory); in double every operation is rounded separately, so
// compute_f64 reproduces the reference's numbers and its decisions at exact ties (a label indicator
// of exactly 0.5 from a scale of 1/2, equal channels in argmax).
//
// spline_prefilter: one thread per line; causal then anticausal first-order recursion with pole
// z = sqrt(3) - 2 and gain 6, arithmetic in double whatever the storage type. The causal initial
// value is the exact infinite sum over the symmetric extension: a full period (2n - 2 for the
// whole-sample mirror, 2n for the half-sample reflect) divided by 1 - z^period for lines shorter than
// kHorizon, else the first kHorizon terms (|z|^kHorizon < 1e-17). The anticausal initial value
// follows from the symmetry of the coefficients.
//
// The per-voxel and per-line functions are __host__ __device__, and the type dispatch is separate
// from the launch, so the same code can be run on the host.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../common/common.h"
#include "resample.h"

namespace fastmed {
void cuda_record_error(cudaError_t e);  // dice_ce_cuda.cu: the message the bindings report

namespace {

#define RS_HD __host__ __device__ __forceinline__
// unroll hints for the device pass only (the host pass of __host__ __device__ code would warn)
#ifdef __CUDA_ARCH__
#define RS_UNROLL _Pragma("unroll")
#define RS_UNROLL_NONE _Pragma("unroll 1")
#else
#define RS_UNROLL
#define RS_UNROLL_NONE
#endif

constexpr int kBlock = 256;

// ------------------------------------------------------------------------------------------------
// element access

struct F16 { uint16_t bits; };
struct BF16 { uint16_t bits; };

template <typename S> struct Src {
  template <typename V> static RS_HD V load(const S* p) { return (V)*p; }
};
template <> struct Src<F16> {
  template <typename V> static RS_HD V load(const F16* p) {
#ifdef __CUDA_ARCH__
    return (V)__half2float(__ushort_as_half(p->bits));
#else
    return (V)half_bits_to_float(p->bits);
#endif
  }
};
template <> struct Src<BF16> {
  template <typename V> static RS_HD V load(const BF16* p) {
#ifdef __CUDA_ARCH__
    return (V)__bfloat162float(__ushort_as_bfloat16(p->bits));
#else
    return (V)bf16_bits_to_float(p->bits);
#endif
  }
};

// an integer value into an integer dst, saturated to its range
RS_HD void store_int(void* dst, int64_t off, int dt, int64_t v) {
  switch (dt) {
    case kU8: ((uint8_t*)dst)[off] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v); break;
    case kI8: ((int8_t*)dst)[off] = (int8_t)(v < -128 ? -128 : v > 127 ? 127 : v); break;
    case kI16: ((int16_t*)dst)[off] = (int16_t)(v < -32768 ? -32768 : v > 32767 ? 32767 : v); break;
    case kI32:
      ((int32_t*)dst)[off] = (int32_t)(v < INT32_MIN ? (int64_t)INT32_MIN : v > INT32_MAX ? (int64_t)INT32_MAX : v);
      break;
    default: ((int64_t*)dst)[off] = v; break;
  }
}

// a real value into any dst: floats round to nearest even, integers round half to even and saturate
// (NaN gives 0)
template <typename V>
RS_HD void store_real(void* dst, int64_t off, int dt, V v) {
  switch (dt) {
    case kF32: ((float*)dst)[off] = (float)v; return;
    case kF64: ((double*)dst)[off] = (double)v; return;
#ifdef __CUDA_ARCH__
    case kF16: ((__half*)dst)[off] = __float2half_rn((float)v); return;
    case kBF16: ((__nv_bfloat16*)dst)[off] = __float2bfloat16_rn((float)v); return;
#else
    case kF16: ((uint16_t*)dst)[off] = float_to_half_bits((float)v); return;
    case kBF16: ((uint16_t*)dst)[off] = float_to_bf16_bits((float)v); return;
#endif
    default: break;
  }
  const double d = (double)v;
  if (d != d) {
    store_int(dst, off, dt, 0);
    return;
  }
  const double r = rint(d);
  // beyond the int64 range saturate here (the cast would be undefined); narrower types in store_int
  if (r >= 9223372036854775808.0) store_int(dst, off, dt, INT64_MAX);
  else if (r < -9223372036854775808.0) store_int(dst, off, dt, INT64_MIN);
  else store_int(dst, off, dt, (int64_t)r);
}

// ------------------------------------------------------------------------------------------------
// arithmetic: in double every product and sum is rounded on its own (no fma contraction), in the
// reference's order, so that compute_f64 reproduces resample_reference's float64 numbers (and its
// decisions at exact ties: a label's indicator at exactly 0.5, an argmax between equal channels);
// float arithmetic is left free to contract.

RS_HD float mul_rn(float a, float b) { return a * b; }
RS_HD float add_rn(float a, float b) { return a + b; }
RS_HD float sub_rn(float a, float b) { return a - b; }
#ifdef __CUDA_ARCH__
RS_HD double mul_rn(double a, double b) { return __dmul_rn(a, b); }
RS_HD double add_rn(double a, double b) { return __dadd_rn(a, b); }
RS_HD double sub_rn(double a, double b) { return __dsub_rn(a, b); }
#else
RS_HD double mul_rn(double a, double b) { return a * b; }
RS_HD double add_rn(double a, double b) { return a + b; }
RS_HD double sub_rn(double a, double b) { return a - b; }
#endif

// ------------------------------------------------------------------------------------------------
// taps

RS_HD int taps_of(int order) { return order == 0 ? 1 : order == 1 ? 2 : 4; }

// index inside [0, n) of tap i under a border / reflect / mirror padding
RS_HD int64_t pad_index(int64_t i, int64_t n, int pad) {
  if (i >= 0 && i < n) return i;
  if (pad == kPadBorder) return i < 0 ? 0 : n - 1;
  if (pad == kPadReflect) {  // half-sample symmetric, period 2n
    const int64_t P = 2 * n;
    int64_t m = i % P;
    if (m < 0) m += P;
    return m >= n ? P - 1 - m : m;
  }
  if (n == 1) return 0;  // whole-sample symmetric, period 2n - 2
  const int64_t P = 2 * n - 2;
  int64_t m = i % P;
  if (m < 0) m += P;
  return m >= n ? P - m : m;
}

// cubic B-spline at distance a >= 0, written as resample_reference's _bspline3
template <typename V>
RS_HD V bspline3(V a) {
  if (a < (V)1) return add_rn(sub_rn((V)(2.0 / 3.0), mul_rn(a, a)), mul_rn(mul_rn(a, a), a) / (V)2);
  if (a < (V)2) {
    const V u = sub_rn((V)2, a);
    return mul_rn(mul_rn(u, u), u) / (V)6;
  }
  return (V)0;
}

// Taps of one dim: tap k < m has element offset off[k] (index after padding, times the stride) and
// weight w[k]; valid[k] is false for a tap outside [0, n) under zeros padding (it stands for cval and
// is never read).
template <typename V, int T>
struct Taps {
  int64_t off[T];
  V w[T];
  bool valid[T];
  int m;
};

template <typename V, int T>
RS_HD void make_taps(double c, int order, int64_t n, int64_t stride, int pad, int half_up, Taps<V, T>& tp) {
  int64_t i0;
  double f = 0.0;
  if (order == 0) {
    c = fold_coord(c, n, pad == kPadConstantMirror ? kPadMirror : pad);
    i0 = (int64_t)(half_up ? floor(c + 0.5) : rint(c));
    tp.m = 1;
  } else {
    f = floor(c);
    i0 = (int64_t)f;
    tp.m = order == 1 ? 2 : 4;
    if (order == 3) i0 -= 1;
  }
  const V t = (V)(c - f);  // exact in double
RS_UNROLL
  for (int k = 0; k < T; ++k) {
    tp.off[k] = 0;
    tp.w[k] = (V)0;
    tp.valid[k] = false;
    if (k < tp.m) {
      const int64_t i = i0 + k;
      if (order == 0) tp.w[k] = (V)1;
      else if (order == 1) tp.w[k] = k == 0 ? sub_rn((V)1, t) : t;
      else tp.w[k] = bspline3<V>((V)fabs(c - (f + (double)(k - 1))));  // |c - tap|, as the reference
      if (pad == kPadZeros && (i < 0 || i >= n)) continue;
      tp.off[k] = pad_index(i, n, pad) * stride;
      tp.valid[k] = true;
    }
  }
}

// a[i] for a runtime i < T through selects (a dynamic index would put the array in local memory)
template <int T, typename E>
RS_HD E pick(const E (&a)[T], int i) {
  E v = a[0];
RS_UNROLL
  for (int k = 1; k < T; ++k) v = i == k ? a[k] : v;
  return v;
}

// ------------------------------------------------------------------------------------------------
// one output voxel

template <typename V_, typename S_, int T_, int MODE_>
struct Kind {
  using V = V_;
  using S = S_;
  static constexpr int T = T_;
  static constexpr int MODE = MODE_;
};

// sum over the taps (dim 0 outermost) of ((w0 w1) w2) v, v = f(offset) for a valid tap and `out`
// otherwise, accumulated one term at a time from 0, exactly as the reference
template <typename V, int T, typename F>
RS_HD V tap_sum(const Taps<V, T>& a, const Taps<V, T>& b, const Taps<V, T>& c, V out, F f) {
  V acc = (V)0;
RS_UNROLL
  for (int i = 0; i < T; ++i) {
    if (i >= a.m) continue;
RS_UNROLL
    for (int j = 0; j < T; ++j) {
      if (j >= b.m) continue;
      const V wij = mul_rn(a.w[i], b.w[j]);
      const bool vij = a.valid[i] && b.valid[j];
      const int64_t oij = a.off[i] + b.off[j];
RS_UNROLL
      for (int k = 0; k < T; ++k) {
        if (k >= c.m) continue;
        const V v = vij && c.valid[k] ? f(oij + c.off[k]) : out;
        acc = add_rn(acc, mul_rn(mul_rn(wij, c.w[k]), v));
      }
    }
  }
  return acc;
}

template <typename V, typename S, int T, int MODE>
RS_HD void resample_voxel(const ResampleParams& p, int64_t e) {
  int64_t r = e;
  const int64_t x = r % p.out_size[2];
  r /= p.out_size[2];
  const int64_t y = r % p.out_size[1];
  r /= p.out_size[1];
  const int64_t z = r % p.out_size[0];
  const int64_t b = r / p.out_size[0];

  const double* th = p.theta + b * p.theta_sb;
  const double zo = add_rn((double)z, p.index_offset), yo = add_rn((double)y, p.index_offset);
  const double xo = add_rn((double)x, p.index_offset);
  double c[3];
RS_UNROLL
  for (int d = 0; d < 3; ++d) {
    // ((t0 z + t1 y) + t2 x) + t3, every product and sum rounded on its own: the CPU kernel's order
    // (built with -ffp-contract=off), so both pick the same voxel at exact ties
    const double v = add_rn(add_rn(add_rn(mul_rn(th[4 * d], zo), mul_rn(th[4 * d + 1], yo)),
                                   mul_rn(th[4 * d + 2], xo)), th[4 * d + 3]);
    c[d] = fmin(fmax(v, -4.0e15), 4.0e15);  // keeps floor(c) + 2 an int64 for any finite theta
  }
  const int64_t doff = b * p.d_sb + z * p.d_s[0] + y * p.d_s[1] + x * p.d_s[2];

  int pad = p.padding;
  if (pad == kPadConstantMirror) {
    bool inside = true;
RS_UNROLL
    for (int d = 0; d < 3; ++d) inside = inside && c[d] >= 0.0 && c[d] <= (double)(p.in_size[d] - 1);
    if (!inside) {
      if constexpr (MODE == kOutValues) {
        for (int64_t ch = 0; ch < p.C; ++ch) store_real<V>(p.dst, doff + ch * p.d_sc, p.dst_dtype, (V)p.cval);
      } else if constexpr (MODE == kOutArgmax) {
        store_int(p.dst, doff, p.dst_dtype, 0);  // every channel is cval: the first wins
      } else {
        store_real<double>(p.dst, doff, p.dst_dtype, p.cval);
      }
      return;
    }
    pad = kPadMirror;
  }

  Taps<V, T> t0, t1, t2;
  make_taps<V, T>(c[0], p.order[0], p.in_size[0], p.s_s[0], pad, p.nearest_half_up, t0);
  make_taps<V, T>(c[1], p.order[1], p.in_size[1], p.s_s[1], pad, p.nearest_half_up, t1);
  make_taps<V, T>(c[2], p.order[2], p.in_size[2], p.s_s[2], pad, p.nearest_half_up, t2);

  const S* src = (const S*)p.src + b * p.s_sb;
  if constexpr (MODE == kOutValues || MODE == kOutArgmax) {
    const V cv = (V)p.cval;
    V best = (V)0;
    int64_t best_c = 0;
    for (int64_t ch = 0; ch < p.C; ++ch) {
      const S* sp = src + ch * p.s_sc;
      const V v = tap_sum<V, T>(t0, t1, t2, cv, [sp](int64_t o) { return Src<S>::template load<V>(sp + o); });
      if constexpr (MODE == kOutValues) {
        store_real<V>(p.dst, doff + ch * p.d_sc, p.dst_dtype, v);
      } else if (ch == 0 || (!(best != best) && (v != v || v > best))) {  // first maximum; NaN wins
        best = v;
        best_c = ch;
      }
    }
    if constexpr (MODE == kOutArgmax) store_int(p.dst, doff, p.dst_dtype, best_c);
  } else {
    // label map: one indicator sum per label (an indicator of 1 adds the tap's weight, 0 adds 0)
    const double cvd = p.cval;
    const bool cval_int = cvd == floor(cvd) && cvd >= -9223372036854775808.0 && cvd < 9223372036854775808.0;
    const int64_t cvi = cval_int ? (int64_t)cvd : 0;
    bool found = false;
    int64_t result = 0;
    if constexpr (T <= 2) {
      // at most 8 taps: their values are read once and kept in registers
      S val[T][T][T];
RS_UNROLL
      for (int i = 0; i < T; ++i)
RS_UNROLL
        for (int j = 0; j < T; ++j)
RS_UNROLL
          for (int k = 0; k < T; ++k) {
            const bool used = i < t0.m && j < t1.m && k < t2.m && t0.valid[i] && t1.valid[j] && t2.valid[k];
            val[i][j][k] = used ? src[t0.off[i] + t1.off[j] + t2.off[k]] : (S)0;
          }
      for (int64_t li = 0; li < p.nlabels; ++li) {
        const int64_t l = p.labels[li];
        const bool lc = cval_int && cvi == l;
        V acc = (V)0;
RS_UNROLL
        for (int i = 0; i < T; ++i) {
          if (i >= t0.m) continue;
RS_UNROLL
          for (int j = 0; j < T; ++j) {
            if (j >= t1.m) continue;
            const V wij = mul_rn(t0.w[i], t1.w[j]);
RS_UNROLL
            for (int k = 0; k < T; ++k) {
              if (k >= t2.m) continue;
              const bool ind = t0.valid[i] && t1.valid[j] && t2.valid[k] ? (int64_t)val[i][j][k] == l : lc;
              if (ind) acc = add_rn(acc, mul_rn(wij, t2.w[k]));
            }
          }
        }
        if (acc >= (V)0.5) {
          found = true;
          result = l;
        }
      }
    } else {
      // cubic: the dim-0 taps are a rolled loop, so that the compiler cannot hoist all 64 loads out
      // of the label loop into registers (16 values live at a time instead)
      for (int64_t li = 0; li < p.nlabels; ++li) {
        const int64_t l = p.labels[li];
        const bool lc = cval_int && cvi == l;
        V acc = (V)0;
RS_UNROLL_NONE
        for (int i = 0; i < t0.m; ++i) {
          const int64_t oi = pick<T>(t0.off, i);
          const V wi = pick<T>(t0.w, i);
          const bool vi = pick<T>(t0.valid, i);
RS_UNROLL
          for (int j = 0; j < T; ++j) {
            if (j >= t1.m) continue;
            const V wij = mul_rn(wi, t1.w[j]);
RS_UNROLL
            for (int k = 0; k < T; ++k) {
              if (k >= t2.m) continue;
              const bool ind = vi && t1.valid[j] && t2.valid[k] ? (int64_t)src[oi + t1.off[j] + t2.off[k]] == l : lc;
              if (ind) acc = add_rn(acc, mul_rn(wij, t2.w[k]));
            }
          }
        }
        if (acc >= (V)0.5) {
          found = true;
          result = l;
        }
      }
    }
    if (found) store_int(p.dst, doff, p.dst_dtype, result);
    else store_real<double>(p.dst, doff, p.dst_dtype, p.cval);
  }
}

// ------------------------------------------------------------------------------------------------
// one line of the prefilter

constexpr int kHorizon = 30;  // |sqrt(3) - 2|^30 ~ 7e-18

template <typename T>
RS_HD double ld_real(const T* x) { return (double)*x; }

// the line x[0], x[s], ..., x[(n - 1) s], n >= 2
template <typename T>
RS_HD void prefilter_line(T* x, int64_t n, int64_t s, bool mirror) {
  const double z = -0.26794919243112270;  // sqrt(3) - 2
  const double gain = 6.0;                // (1 - z)(1 - 1/z)
  // causal initial value: sum_{j >= 0} z^j xe[-j] over the symmetric extension xe of the line
  double c0;
  if (mirror) {  // xe[-j] = xe[j], period 2n - 2
    double sum = 0.0, zj = 1.0;
    if (n >= kHorizon) {
      for (int64_t j = 0; j < kHorizon; ++j, zj *= z) sum += zj * ld_real(x + j * s);
    } else {
      const int64_t P = 2 * n - 2;
      for (int64_t j = 0; j < P; ++j, zj *= z) sum += zj * ld_real(x + (j < n ? j : P - j) * s);
      sum /= 1.0 - zj;
    }
    c0 = sum;
  } else {  // half-sample: xe[-1 - j] = x[j] for j < n, period 2n
    double sum = 0.0, zj = 1.0;
    if (n >= kHorizon) {
      for (int64_t j = 0; j < kHorizon; ++j, zj *= z) sum += zj * ld_real(x + j * s);
    } else {
      const int64_t P = 2 * n;
      for (int64_t j = 0; j < P; ++j, zj *= z) sum += zj * ld_real(x + (j < n ? j : P - 1 - j) * s);
      sum /= 1.0 - zj;
    }
    c0 = ld_real(x) + z * sum;
  }
  // causal pass (stored in place); the last two values stay in double
  double cp = gain * c0, cprev = 0.0;
  x[0] = (T)cp;
  for (int64_t k = 1; k < n; ++k) {
    cprev = cp;
    cp = gain * ld_real(x + k * s) + z * cp;
    x[k * s] = (T)cp;
  }
  // anticausal: c[k] = z (c[k + 1] - c+[k]); the coefficients share the data's symmetry, which fixes
  // c[n - 1] (mirror: c[n] = c[n - 2]; reflect: c[n] = c[n - 1])
  double c = mirror ? z / (z * z - 1.0) * (cp + z * cprev) : z / (z - 1.0) * cp;
  x[(n - 1) * s] = (T)c;
  c = z * (c - cprev);
  x[(n - 2) * s] = (T)c;
  for (int64_t k = n - 3; k >= 0; --k) {
    c = z * (c - ld_real(x + k * s));
    x[k * s] = (T)c;
  }
}

// line e of the prefilter: e = (l, coordinate along `outer`, coordinate along `inner`), inner being
// the other dim with the smaller stride so that neighbouring threads touch neighbouring elements
template <typename T>
RS_HD void prefilter_thread(const SplineFilterParams& p, int inner, int outer, int64_t e) {
  const int64_t i_in = e % p.size[inner];
  const int64_t r = e / p.size[inner];
  const int64_t i_out = r % p.size[outer];
  const int64_t l = r / p.size[outer];
  T* x = (T*)p.data + l * p.l_s + i_out * p.s[outer] + i_in * p.s[inner];
  prefilter_line<T>(x, p.size[p.dim], p.s[p.dim], p.boundary == kPadMirror);
}

// ------------------------------------------------------------------------------------------------
// argument checks and type dispatch (f is called with a Kind<V, S, T, MODE>)

bool is_int_dtype(int dt) { return dt == kU8 || dt == kI8 || dt == kI16 || dt == kI32 || dt == kI64; }
bool is_real_dtype(int dt) { return dt == kF32 || dt == kF64 || dt == kF16 || dt == kBF16; }

int64_t resample_total(const ResampleParams& p) { return p.B * p.out_size[0] * p.out_size[1] * p.out_size[2]; }

int check_resample(const ResampleParams& p) {
  if (p.B < 0 || p.C < 1 || p.theta_sb < 0 || p.nlabels < 0) return kBadArgument;
  for (int d = 0; d < 3; ++d) {
    if (p.in_size[d] < 1 || p.out_size[d] < 0) return kBadArgument;
    if (p.order[d] != 0 && p.order[d] != 1 && p.order[d] != 3) return kBadArgument;
  }
  if (p.padding < kPadZeros || p.padding > kPadConstantMirror) return kBadArgument;
  if (p.out_mode < kOutValues || p.out_mode > kOutLabels) return kBadArgument;
  const int sd = p.src_dtype;
  if (sd == kI64 || !(is_int_dtype(sd) || is_real_dtype(sd))) return kBadDtype;
  if (p.out_mode == kOutValues) {
    if (!is_int_dtype(p.dst_dtype) && !is_real_dtype(p.dst_dtype)) return kBadDtype;
  } else if (!is_int_dtype(p.dst_dtype)) {
    return kBadDtype;
  }
  if (p.out_mode == kOutLabels) {
    if (!is_int_dtype(sd)) return kBadDtype;
    if (p.C != 1) return kBadArgument;
    if (p.nlabels > 0 && !p.labels) return kBadArgument;
  }
  if (resample_total(p) > 0 && (!p.src || !p.dst || !p.theta)) return kBadArgument;
  return kOk;
}

template <typename V, typename S, int T, typename F>
int dispatch_mode(const ResampleParams& p, F& f) {
  switch (p.out_mode) {
    case kOutValues: return f(Kind<V, S, T, kOutValues>{});
    case kOutArgmax: return f(Kind<V, S, T, kOutArgmax>{});
    default:
      if constexpr (std::is_integral<S>::value) return f(Kind<V, S, T, kOutLabels>{});
      else return kBadDtype;
  }
}

template <typename V, typename S, typename F>
int dispatch_taps(const ResampleParams& p, F& f) {
  int T = 1;
  for (int d = 0; d < 3; ++d) T = taps_of(p.order[d]) > T ? taps_of(p.order[d]) : T;
  switch (T) {
    case 1: return dispatch_mode<V, S, 1>(p, f);
    case 2: return dispatch_mode<V, S, 2>(p, f);
    default: return dispatch_mode<V, S, 4>(p, f);
  }
}

template <typename V, typename F>
int dispatch_src(const ResampleParams& p, F& f) {
  switch (p.src_dtype) {
    case kU8: return dispatch_taps<V, uint8_t>(p, f);
    case kI8: return dispatch_taps<V, int8_t>(p, f);
    case kI16: return dispatch_taps<V, int16_t>(p, f);
    case kI32: return dispatch_taps<V, int32_t>(p, f);
    case kF16: return dispatch_taps<V, F16>(p, f);
    case kBF16: return dispatch_taps<V, BF16>(p, f);
    case kF32: return dispatch_taps<V, float>(p, f);
    case kF64: return dispatch_taps<V, double>(p, f);
    default: return kBadDtype;
  }
}

// checks p, then calls f(Kind<...>{}) unless there is nothing to compute
template <typename F>
int dispatch_resample(const ResampleParams& p, F&& f) {
  const int st = check_resample(p);
  if (st != kOk || resample_total(p) == 0) return st;
  return p.compute_f64 ? dispatch_src<double>(p, f) : dispatch_src<float>(p, f);
}

int check_prefilter(const SplineFilterParams& p, int* inner, int* outer) {
  if (p.dim < 0 || p.dim > 2 || p.lines < 0) return kBadArgument;
  if (p.boundary != kPadMirror && p.boundary != kPadReflect) return kBadArgument;
  for (int d = 0; d < 3; ++d)
    if (p.size[d] < 0) return kBadArgument;
  if (p.dtype != kF32 && p.dtype != kF64) return kBadDtype;
  const int a = p.dim == 0 ? 1 : 0, b = p.dim == 2 ? 1 : 2;
  const bool a_inner = (p.s[a] < 0 ? -p.s[a] : p.s[a]) < (p.s[b] < 0 ? -p.s[b] : p.s[b]);
  *inner = a_inner ? a : b;
  *outer = a_inner ? b : a;
  return kOk;
}

int64_t prefilter_total(const SplineFilterParams& p, int inner, int outer) {
  return p.size[p.dim] < 2 ? 0 : p.lines * p.size[inner] * p.size[outer];
}

// ------------------------------------------------------------------------------------------------
// kernels and launches

template <typename V, typename S, int T, int MODE>
__global__ void __launch_bounds__(kBlock) resample_kernel(const ResampleParams p, int64_t total) {
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x)
    resample_voxel<V, S, T, MODE>(p, e);
}

template <typename T>
__global__ void __launch_bounds__(kBlock) prefilter_kernel(const SplineFilterParams p, int inner, int outer,
                                                           int64_t total) {
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x)
    prefilter_thread<T>(p, inner, outer, e);
}

int grid_for(int64_t total) {
  const int64_t blocks = (total + kBlock - 1) / kBlock;
  return (int)(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

int launch_status() {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    cuda_record_error(e);
    return kCudaError;
  }
  return kOk;
}

}  // namespace

int resample_cuda(const ResampleParams& p) {
  const int64_t total = resample_total(p);
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  return dispatch_resample(p, [&](auto kind) -> int {
    using K = decltype(kind);
    resample_kernel<typename K::V, typename K::S, K::T, K::MODE><<<grid_for(total), kBlock, 0, stream>>>(p, total);
    return launch_status();
  });
}

int spline_prefilter_cuda(const SplineFilterParams& p) {
  int inner = 0, outer = 0;
  const int st = check_prefilter(p, &inner, &outer);
  if (st != kOk) return st;
  const int64_t total = prefilter_total(p, inner, outer);
  if (total == 0) return kOk;  // no lines, or lines of length 1 (unchanged)
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  if (p.dtype == kF32) prefilter_kernel<float><<<grid_for(total), kBlock, 0, stream>>>(p, inner, outer, total);
  else prefilter_kernel<double><<<grid_for(total), kBlock, 0, stream>>>(p, inner, outer, total);
  return launch_status();
}

}  // namespace fastmed
