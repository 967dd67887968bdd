// CPU (OpenMP) kernels for the fused Dice + cross-entropy statistics and gradient.
//
// This file is compiled once per instruction set (FM_ISA = base, avx2, avx512); the dispatcher in
// dice_ce_cpu_dispatch.cpp picks one at run time. Work is split into tasks of kDiceBlockVoxels
// voxels of one batch item; each task walks its voxels in tiles of K voxels: a tile of C x K logits
// is converted to float (or double) once, then every step (softmax, statistics, CE, gradient) runs
// as `omp simd` loops over the tile. Per-task partial sums are added in double in a fixed order, so
// the result does not depend on the number of threads or on scheduling.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>
#include <type_traits>

#include "../common/common.h"
#include "../common/fast_math.h"
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include "dice_ce.h"

namespace fastmed {
namespace FM_CAT(isa_, FM_ISA) {
namespace {

struct half_t { uint16_t v; };
struct bf16_t { uint16_t v; };

template <typename T, typename F> inline F cvt_in(T v) { return (F)v; }
template <> inline float cvt_in<half_t, float>(half_t v) { return half_bits_to_float(v.v); }
template <> inline float cvt_in<bf16_t, float>(bf16_t v) { return bf16_bits_to_float(v.v); }
template <> inline double cvt_in<half_t, double>(half_t v) { return half_bits_to_float(v.v); }
template <> inline double cvt_in<bf16_t, double>(bf16_t v) { return bf16_bits_to_float(v.v); }

template <typename T, typename F> inline T cvt_out(F v) { return (T)v; }
template <> inline half_t cvt_out<half_t, float>(float v) { return half_t{float_to_half_bits(v)}; }
template <> inline bf16_t cvt_out<bf16_t, float>(float v) { return bf16_t{float_to_bf16_bits(v)}; }
template <> inline half_t cvt_out<half_t, double>(double v) { return half_t{float_to_half_bits((float)v)}; }
template <> inline bf16_t cvt_out<bf16_t, double>(double v) { return bf16_t{float_to_bf16_bits((float)v)}; }

// out[r*ld + k] = base[r*rs + k*cs] for r < rows, k < n
template <typename T, typename F>
void gather_tile(const T* base, int64_t rows, int64_t rs, int64_t cs, int n, F* out, int ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = base + r * rs;
    F* dst = out + r * ld;
    if (cs == 1) {
#pragma omp simd
      for (int k = 0; k < n; ++k) dst[k] = cvt_in<T, F>(src[k]);
    } else {
      for (int k = 0; k < n; ++k) dst[k] = cvt_in<T, F>(src[(int64_t)k * cs]);
    }
  }
}

template <typename T, typename F>
void scatter_tile(T* base, int64_t rows, int64_t rs, int64_t cs, int n, const F* in, int ld) {
  for (int64_t r = 0; r < rows; ++r) {
    T* dst = base + r * rs;
    const F* src = in + r * ld;
    if (cs == 1) {
#pragma omp simd
      for (int k = 0; k < n; ++k) dst[k] = cvt_out<T, F>(src[k]);
    } else {
      for (int k = 0; k < n; ++k) dst[(int64_t)k * cs] = cvt_out<T, F>(src[k]);
    }
  }
}

template <typename F>
void gather_any(const void* base, int dtype, int64_t off, int64_t rows, int64_t rs, int64_t cs, int n,
                F* out, int ld) {
  switch (dtype) {
    case kF32: gather_tile((const float*)base + off, rows, rs, cs, n, out, ld); break;
    case kF64: gather_tile((const double*)base + off, rows, rs, cs, n, out, ld); break;
    case kF16: gather_tile((const half_t*)base + off, rows, rs, cs, n, out, ld); break;
    case kBF16: gather_tile((const bf16_t*)base + off, rows, rs, cs, n, out, ld); break;
    case kU8: gather_tile((const uint8_t*)base + off, rows, rs, cs, n, out, ld); break;
    case kI8: gather_tile((const int8_t*)base + off, rows, rs, cs, n, out, ld); break;
    case kI16: gather_tile((const int16_t*)base + off, rows, rs, cs, n, out, ld); break;
    case kI32: gather_tile((const int32_t*)base + off, rows, rs, cs, n, out, ld); break;
    case kI64: gather_tile((const int64_t*)base + off, rows, rs, cs, n, out, ld); break;
    default: break;
  }
}

template <typename F>
void scatter_any(void* base, int dtype, int64_t off, int64_t rows, int64_t rs, int64_t cs, int n, const F* in,
                 int ld) {
  switch (dtype) {
    case kF32: scatter_tile((float*)base + off, rows, rs, cs, n, in, ld); break;
    case kF64: scatter_tile((double*)base + off, rows, rs, cs, n, in, ld); break;
    case kF16: scatter_tile((half_t*)base + off, rows, rs, cs, n, in, ld); break;
    case kBF16: scatter_tile((bf16_t*)base + off, rows, rs, cs, n, in, ld); break;
    default: break;
  }
}

// Labels: converted to int64 exactly as torch's .long() would (truncation), then checked.
template <typename T>
int64_t load_labels_t(const T* src, int64_t cs, int n, int64_t C, bool has_ignore, int64_t ignore, int32_t* lab,
                      float* valid) {
  int64_t bad = 0;
  auto one = [&](T raw, int k) -> int64_t {
    int64_t v;
    bool finite = true;
    if constexpr (std::is_floating_point<T>::value) {
      finite = raw == raw && raw < (T)9.2e18 && raw > (T)-9.2e18;
      v = finite ? (int64_t)raw : -1;
    } else {
      v = (int64_t)raw;
    }
    const bool ign = has_ignore && finite && v == ignore;
    const bool ok = finite && v >= 0 && v < C && !ign;
    lab[k] = ok ? (int32_t)v : -1;
    valid[k] = ok ? 1.0f : 0.0f;
    return (!ign && !ok) ? 1 : 0;
  };
  if (cs == 1) {
#pragma omp simd reduction(+ : bad)
    for (int k = 0; k < n; ++k) bad += one(src[k], k);
  } else {
    for (int k = 0; k < n; ++k) bad += one(src[(int64_t)k * cs], k);
  }
  return bad;
}

int64_t load_labels(const DiceCEParams& p, int64_t off, int n, int32_t* lab, float* valid) {
  const bool hi = p.has_ignore != 0;
  switch (p.t_dtype) {
    case kU8: return load_labels_t((const uint8_t*)p.t + off, p.t_ss, n, p.C, hi, p.ignore_index, lab, valid);
    case kI8: return load_labels_t((const int8_t*)p.t + off, p.t_ss, n, p.C, hi, p.ignore_index, lab, valid);
    case kI16: return load_labels_t((const int16_t*)p.t + off, p.t_ss, n, p.C, hi, p.ignore_index, lab, valid);
    case kI32: return load_labels_t((const int32_t*)p.t + off, p.t_ss, n, p.C, hi, p.ignore_index, lab, valid);
    case kI64: return load_labels_t((const int64_t*)p.t + off, p.t_ss, n, p.C, hi, p.ignore_index, lab, valid);
    case kF32: return load_labels_t((const float*)p.t + off, p.t_ss, n, p.C, hi, p.ignore_index, lab, valid);
    case kF64: return load_labels_t((const double*)p.t + off, p.t_ss, n, p.C, hi, p.ignore_index, lab, valid);
    default: return n;
  }
}

template <typename F>
struct Scratch {
  int K;
  std::vector<F> x, pr, q, y, g;  // C x K tiles
  std::vector<F> mx, z, m, t0, t1, t2;  // K
  std::vector<int32_t> lab;
  std::vector<float> valid;
  std::vector<F> hist;    // 2 x C per-tile histogram (fast path)
  const F* xp = nullptr;  // logits tile: sc.x, or the input itself when no conversion is needed
  int64_t xld = 0;        // its row (class) stride
  Scratch(int64_t C, int K_, bool dense) : K(K_) {
    x.resize(C * K); pr.resize(C * K); q.resize(C * K); g.resize(C * K);
    y.resize(std::max<int64_t>(C, 4) * K);  // dense target, or K-sized scratch rows on the fast path
    (void)dense;
    mx.resize(K); z.resize(K); m.resize(K); t0.resize(K); t1.resize(K); t2.resize(K);
    lab.resize(K); valid.resize(K); hist.assign(2 * C, F(0));
  }
};

// Software prefetch (into L2) of the next tile's labels; the logits rows are prefetched per
// 16-voxel group in group_max.
inline void prefetch_labels(const DiceCEParams& p, int64_t b, int64_t s_next, int K) {
  static const int esz[] = {4, 2, 2, 8, 1, 1, 2, 4, 8};
  const int64_t left = p.S - s_next;
  if (left <= 0 || p.t_ss != 1 || p.t_dtype < 0 || p.t_dtype > 8) return;
  const int e = esz[p.t_dtype];
  const char* a = (const char*)p.t + (b * p.t_sb + s_next) * e;
  const int64_t bytes = std::min<int64_t>(K, left) * e;
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(a + off, 0, 2);
}

// Tile width: the C x K float tiles stay in L1/L2; depends on C only (determinism).
inline int tile_width(int64_t C) {
  int64_t k = 16384 / std::max<int64_t>(C, 1);
  k = (k / 16) * 16;
  return (int)std::min<int64_t>(std::max<int64_t>(k, 64), 512);
}

// Load one tile: logits, labels or dense target, mask; then activations.
// Returns the number of invalid labels in the tile.
template <typename F>
int64_t load_tile(const DiceCEParams& p, int64_t b, int64_t s0, int n, Scratch<F>& sc, bool need_sm) {
  const int64_t C = p.C;
  const int K = sc.K;
  const int own = std::is_same<F, double>::value ? kF64 : kF32;
  if (p.x_dtype == own && p.x_ss == 1) {  // read in place: no copy
    sc.xp = (const F*)p.x + b * p.x_sb + s0;
    sc.xld = p.x_sc;
  } else {
    gather_any<F>(p.x, p.x_dtype, b * p.x_sb + s0 * p.x_ss, C, p.x_sc, p.x_ss, n, sc.x.data(), K);
    sc.xp = sc.x.data();
    sc.xld = K;
  }
  const int64_t xld = sc.xld;
  F* m = sc.m.data();
  if (p.mask) {
    const float* mp = p.mask + b * p.m_sb + s0 * p.m_ss;
    for (int k = 0; k < n; ++k) m[k] = (F)mp[(int64_t)k * p.m_ss];
  } else {
    for (int k = 0; k < n; ++k) m[k] = F(1);
  }
  int64_t bad = 0;
  if (p.label_map) {
    bad = load_labels(p, b * p.t_sb + s0 * p.t_ss, n, sc.lab.data(), sc.valid.data());
    const float* v = sc.valid.data();
#pragma omp simd
    for (int k = 0; k < n; ++k) m[k] *= (F)v[k];
  } else {
    gather_any<F>(p.t, p.t_dtype, b * p.t_sb + s0 * p.t_ss, C, p.t_sc, p.t_ss, n, sc.y.data(), K);
  }
  const F* x = sc.xp;
  if (need_sm) {
    F* mx = sc.mx.data();
    F* z = sc.z.data();
    F* pr = sc.pr.data();
    for (int k = 0; k < n; ++k) mx[k] = x[k];
    for (int64_t c = 1; c < C; ++c) {
      const F* xc = x + c * xld;
#pragma omp simd
      for (int k = 0; k < n; ++k) mx[k] = xc[k] > mx[k] ? xc[k] : mx[k];
    }
    for (int k = 0; k < n; ++k) z[k] = F(0);
    for (int64_t c = 0; c < C; ++c) {
      const F* xc = x + c * xld;
      F* pc = pr + c * K;
#pragma omp simd
      for (int k = 0; k < n; ++k) {
        F e = fm_exp(xc[k] - mx[k]);
        pc[k] = e;
        z[k] += e;
      }
    }
    F* inv = sc.t0.data();
#pragma omp simd
    for (int k = 0; k < n; ++k) inv[k] = F(1) / z[k];
    for (int64_t c = 0; c < C; ++c) {
      F* pc = pr + c * K;
#pragma omp simd
      for (int k = 0; k < n; ++k) pc[k] *= inv[k];
    }
  }
  if (p.dice && p.act == kActSigmoid) {
    F* q = sc.q.data();
    for (int64_t c = 0; c < C; ++c) {
      const F* xc = x + c * xld;
      F* qc = q + c * K;
#pragma omp simd
      for (int k = 0; k < n; ++k) qc[k] = fm_sigmoid(xc[k]);
    }
  }
  return bad;
}

template <typename F>
const F* dice_probs(const DiceCEParams& p, const Scratch<F>& sc, int64_t& ld) {
  ld = sc.K;
  if (p.act == kActSoftmax) return sc.pr.data();
  if (p.act == kActSigmoid) return sc.q.data();
  ld = sc.xld;
  return sc.xp;
}

template <typename F>
inline F fm_abs(F v) { return v < F(0) ? -v : v; }
template <typename F>
inline F fm_sign(F v) { return v > F(0) ? F(1) : (v < F(0) ? F(-1) : F(0)); }

// ----------------------------------------------------------------------------------------------
// forward
template <typename F>
void fwd_task(const DiceCEParams& p, int64_t b, int64_t blk, Scratch<F>& sc, double* part, int64_t& bad) {
  const int64_t C = p.C;
  const int K = sc.K;
  const bool need_sm = p.act == kActSoftmax || p.ce == kCeSoftmax;
  const bool sq = p.squared != 0, soft = p.soft != 0;
  const int64_t s_begin = blk * kDiceBlockVoxels;
  const int64_t s_end = std::min(p.S, s_begin + kDiceBlockVoxels);
  for (int64_t i = 0; i < 4 * C + 4; ++i) part[i] = 0.0;
  double* ce = part + 4 * C;
  F Wsum = F(0);
  for (int64_t c = 0; c < C; ++c) Wsum += p.ce_weight ? (F)p.ce_weight[c] : F(1);

  for (int64_t s0 = s_begin; s0 < s_end; s0 += K) {
    const int n = (int)std::min<int64_t>(K, s_end - s0);
    bad += load_tile(p, b, s0, n, sc, need_sm);
    const F* x = sc.xp;
    const int64_t xld = sc.xld;
    const F* m = sc.m.data();
    const int32_t* lab = sc.lab.data();
    if (p.dice) {
      int64_t qld;
      const F* q = dice_probs(p, sc, qld);
      for (int64_t c = 0; c < C; ++c) {
        const F* qc = q + c * qld;
        F sI = 0, sP = 0, sG = 0, sD = 0;
        if (p.label_map) {
          const int32_t cc = (int32_t)c;
#pragma omp simd reduction(+ : sI, sP, sG, sD)
          for (int k = 0; k < n; ++k) {
            F qm = qc[k] * m[k];
            F ym = lab[k] == cc ? m[k] : F(0);
            sI += qm * ym;
            sP += sq ? qm * qm : (soft ? fm_abs(qm) : qm);
            sG += sq ? ym * ym : ym;  // ym = m or 0 (m < 1 only for a user mask)
            sD += soft ? fm_abs(qm - ym) : F(0);
          }
        } else {
          const F* yc = sc.y.data() + c * K;
#pragma omp simd reduction(+ : sI, sP, sG, sD)
          for (int k = 0; k < n; ++k) {
            F qm = qc[k] * m[k];
            F ym = yc[k] * m[k];
            sI += qm * ym;
            sP += sq ? qm * qm : (soft ? fm_abs(qm) : qm);
            sG += sq ? ym * ym : (soft ? fm_abs(ym) : ym);
            sD += soft ? fm_abs(qm - ym) : F(0);
          }
        }
        part[4 * c + 0] += (double)sI;
        part[4 * c + 1] += (double)sP;
        part[4 * c + 2] += (double)sG;
        part[4 * c + 3] += (double)sD;
      }
    }
    if (p.ce == kCeSoftmax) {
      F* lse = sc.t0.data();
      F* wx = sc.t1.data();
      const F* mx = sc.mx.data();
      const F* z = sc.z.data();
#pragma omp simd
      for (int k = 0; k < n; ++k) { lse[k] = mx[k] + fm_log(z[k]); wx[k] = F(0); }
      for (int64_t c = 0; c < C; ++c) {
        const F* xc = x + c * xld;
        const F wc = p.ce_weight ? (F)p.ce_weight[c] : F(1);
#pragma omp simd
        for (int k = 0; k < n; ++k) wx[k] += wc * xc[k];
      }
      F a = 0, sm = 0, wt = 0, cnt = 0;
      if (p.label_map) {
        for (int k = 0; k < n; ++k) {
          const int32_t t = lab[k];
          if (t < 0) continue;  // ignored (or invalid) voxel: m[k] is 0 too
          const F wt_k = m[k] * (p.ce_weight ? (F)p.ce_weight[t] : F(1));
          a += wt_k * (lse[k] - x[(int64_t)t * xld + k]);
          sm += m[k] * (Wsum * lse[k] - wx[k]);
          wt += wt_k;
          cnt += m[k];
        }
      } else {
        F* wy = sc.t2.data();
        F* wyx = sc.z.data();  // z no longer needed
        for (int k = 0; k < n; ++k) { wy[k] = F(0); wyx[k] = F(0); }
        for (int64_t c = 0; c < C; ++c) {
          const F* xc = x + c * xld;
          const F* yc = sc.y.data() + c * K;
          const F wc = p.ce_weight ? (F)p.ce_weight[c] : F(1);
#pragma omp simd
          for (int k = 0; k < n; ++k) { wy[k] += wc * yc[k]; wyx[k] += wc * yc[k] * xc[k]; }
        }
#pragma omp simd reduction(+ : a, sm, wt, cnt)
        for (int k = 0; k < n; ++k) {
          a += m[k] * (lse[k] * wy[k] - wyx[k]);
          sm += m[k] * (Wsum * lse[k] - wx[k]);
          wt += m[k] * wy[k];
          cnt += m[k];
        }
      }
      ce[0] += (double)a; ce[1] += (double)sm; ce[2] += (double)wt; ce[3] += (double)cnt;
    } else if (p.ce == kCeBce) {
      F a = 0, cnt = 0;
      for (int64_t c = 0; c < C; ++c) {
        const F* xc = x + c * xld;
        const F wc = p.ce_weight ? (F)p.ce_weight[c] : F(1);
        const int32_t cc = (int32_t)c;
        if (p.label_map) {
#pragma omp simd reduction(+ : a, cnt)
          for (int k = 0; k < n; ++k) {
            F y = lab[k] == cc ? F(1) : F(0);
            a += m[k] * (wc * y * fm_softplus(-xc[k]) + (F(1) - y) * fm_softplus(xc[k]));
            cnt += m[k];
          }
        } else {
          const F* yc = sc.y.data() + c * K;
#pragma omp simd reduction(+ : a, cnt)
          for (int k = 0; k < n; ++k) {
            a += m[k] * (wc * yc[k] * fm_softplus(-xc[k]) + (F(1) - yc[k]) * fm_softplus(xc[k]));
            cnt += m[k];
          }
        }
      }
      ce[0] += (double)a; ce[3] += (double)cnt;
    }
  }
}

// ----------------------------------------------------------------------------------------------
// backward
template <typename F>
void bwd_task(const DiceCEParams& p, int64_t b, int64_t blk, Scratch<F>& sc) {
  const int64_t C = p.C;
  const int K = sc.K;
  const bool need_sm = p.act == kActSoftmax || p.ce == kCeSoftmax;
  const bool sq = p.squared != 0, soft = p.soft != 0;
  const int64_t s_begin = blk * kDiceBlockVoxels;
  const int64_t s_end = std::min(p.S, s_begin + kDiceBlockVoxels);
  const double* gs = p.grad_stats + b * C * 4;
  const F gA = p.ce != kCeNone ? (F)p.grad_ce[b * 4 + 0] : F(0);
  const F gSm = p.ce != kCeNone ? (F)p.grad_ce[b * 4 + 1] : F(0);
  F Wsum = F(0);
  for (int64_t c = 0; c < C; ++c) Wsum += p.ce_weight ? (F)p.ce_weight[c] : F(1);

  for (int64_t s0 = s_begin; s0 < s_end; s0 += K) {
    const int n = (int)std::min<int64_t>(K, s_end - s0);
    int64_t bad_unused = load_tile(p, b, s0, n, sc, need_sm);
    (void)bad_unused;
    const F* x = sc.xp;
    const int64_t xld = sc.xld;
    const F* m = sc.m.data();
    const int32_t* lab = sc.lab.data();
    F* g = sc.g.data();
    // 1. gradient w.r.t. the Dice probabilities, chained through the activation
    if (p.dice) {
      int64_t qld;
      const F* q = dice_probs(p, sc, qld);
      for (int64_t c = 0; c < C; ++c) {
        const F gI = (F)gs[4 * c + 0], gP = (F)gs[4 * c + 1], gD = (F)gs[4 * c + 3];
        const F* qc = q + c * qld;
        F* gc = g + c * K;
        const int32_t cc = (int32_t)c;
        const F* yc = p.label_map ? nullptr : sc.y.data() + c * K;
#pragma omp simd
        for (int k = 0; k < n; ++k) {
          F qm = qc[k] * m[k];
          F ym = yc ? yc[k] * m[k] : (lab[k] == cc ? m[k] : F(0));
          F dp = gI * ym + gP * (sq ? F(2) * qm : (soft ? fm_sign(qm) : F(1)));
          dp += soft ? gD * fm_sign(qm - ym) : F(0);
          gc[k] = dp * m[k];
        }
      }
      if (p.act == kActSoftmax) {
        F* dot = sc.t1.data();
        for (int k = 0; k < n; ++k) dot[k] = F(0);
        for (int64_t c = 0; c < C; ++c) {
          const F* qc = q + c * qld;
          const F* gc = g + c * K;
#pragma omp simd
          for (int k = 0; k < n; ++k) dot[k] += qc[k] * gc[k];
        }
        for (int64_t c = 0; c < C; ++c) {
          const F* qc = q + c * qld;
          F* gc = g + c * K;
#pragma omp simd
          for (int k = 0; k < n; ++k) gc[k] = qc[k] * (gc[k] - dot[k]);
        }
      } else if (p.act == kActSigmoid) {
        for (int64_t c = 0; c < C; ++c) {
          const F* qc = q + c * qld;
          F* gc = g + c * K;
#pragma omp simd
          for (int k = 0; k < n; ++k) gc[k] = gc[k] * qc[k] * (F(1) - qc[k]);
        }
      }
    } else {
      for (int64_t i = 0; i < C * K; ++i) g[i] = F(0);
    }
    // 2. cross-entropy gradient w.r.t. the logits
    if (p.ce == kCeSoftmax) {
      const F* pr = sc.pr.data();
      if (p.label_map) {
        F* coef = sc.t0.data();  // gA * w_t for valid voxels
        F* val = sc.t2.data();   // gSm for valid voxels
        for (int k = 0; k < n; ++k) {
          const int32_t t = lab[k];
          coef[k] = t >= 0 ? m[k] * gA * (p.ce_weight ? (F)p.ce_weight[t] : F(1)) : F(0);
          val[k] = m[k] * gSm;  // m is 0 for ignored voxels
        }
        for (int64_t c = 0; c < C; ++c) {
          const F* pc = pr + c * K;
          F* gc = g + c * K;
          const F wc = p.ce_weight ? (F)p.ce_weight[c] : F(1);
          const int32_t cc = (int32_t)c;
#pragma omp simd
          for (int k = 0; k < n; ++k) {
            F onehot = lab[k] == cc ? F(1) : F(0);
            gc[k] += coef[k] * (pc[k] - onehot) + val[k] * (Wsum * pc[k] - wc);
          }
        }
      } else {
        F* wy = sc.t2.data();
        for (int k = 0; k < n; ++k) wy[k] = F(0);
        for (int64_t c = 0; c < C; ++c) {
          const F* yc = sc.y.data() + c * K;
          const F wc = p.ce_weight ? (F)p.ce_weight[c] : F(1);
#pragma omp simd
          for (int k = 0; k < n; ++k) wy[k] += wc * yc[k];
        }
        for (int64_t c = 0; c < C; ++c) {
          const F* pc = pr + c * K;
          const F* yc = sc.y.data() + c * K;
          F* gc = g + c * K;
          const F wc = p.ce_weight ? (F)p.ce_weight[c] : F(1);
#pragma omp simd
          for (int k = 0; k < n; ++k)
            gc[k] += m[k] * (gA * (pc[k] * wy[k] - wc * yc[k]) + gSm * (Wsum * pc[k] - wc));
        }
      }
    } else if (p.ce == kCeBce) {
      for (int64_t c = 0; c < C; ++c) {
        const F* xc = x + c * xld;
        F* gc = g + c * K;
        const F wc = p.ce_weight ? (F)p.ce_weight[c] : F(1);
        const int32_t cc = (int32_t)c;
        const F* yc = p.label_map ? nullptr : sc.y.data() + c * K;
#pragma omp simd
        for (int k = 0; k < n; ++k) {
          F y = yc ? yc[k] : (lab[k] == cc ? F(1) : F(0));
          F sg = fm_sigmoid(xc[k]);
          gc[k] += m[k] * gA * (wc * y * (sg - F(1)) + (F(1) - y) * sg);
        }
      }
    }
    scatter_any<F>(p.dx, p.x_dtype, b * p.dx_sb + s0 * p.dx_ss, C, p.dx_sc, p.dx_ss, n, g, K);
  }
}

inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// ----------------------------------------------------------------------------------------------
// Fast path for the common case: float logits, an integer label map, softmax Dice with plain sums,
// optional softmax CE. Everything else (and float64, used for tests and gradcheck) takes the
// general tile kernels above.
inline bool fast_path(const DiceCEParams& p, bool is_float) {
  return is_float && p.label_map && (p.act == kActSoftmax || !p.dice) && !p.squared && !p.soft &&
         (p.ce == kCeNone || p.ce == kCeSoftmax);
}

// ----------------------------------------------------------------------------------------------
// Register-blocked fast path (float logits): 16 voxels at a time through all classes, with the
// per-voxel max, normaliser and running sums in vector registers. Each logit is read twice from
// L1/L2 (max, then exp) and the gradient written once; no per-class scratch row round trips.
typedef fm_vf16 vf16;
typedef fm_vi16 vi16;
constexpr int kV = 16;

inline vf16 vld(const float* p) { vf16 v; std::memcpy(&v, p, sizeof v); return v; }
inline vi16 vldi(const int32_t* p) { vi16 v; std::memcpy(&v, p, sizeof v); return v; }
inline void vst(float* p, vf16 v) { std::memcpy(p, &v, sizeof v); }
inline vf16 vsplat(float a) { return vf16{} + a; }
inline double vsum(vf16 v) {  // fixed order
  double s = 0.0;
  for (int i = 0; i < kV; ++i) s += (double)v[i];
  return s;
}

// vector forms of fm_exp_nonpos and fm_log (same constants, same special cases)
inline vf16 vexp_nonpos(vf16 x) {
  vf16 xc = x < -87.33f ? vsplat(-87.33f) : x;
  xc = xc > 0.0f ? vsplat(0.0f) : xc;
  return fm_exp_clamped(xc);
}

// e^(x - mx) for x <= mx: on AVX-512, 2^t with t = (x - mx) log2(e) split as n + f by a rounding
// instruction, a degree-6 minimax polynomial for 2^f on [-1/2, 1/2] (relative error 1e-7, the
// float rounding) and a scalef for 2^n, which also handles underflow. t is clamped to [-200, 0]
// (an ignored voxel's x_t may exceed the max); max/min keep a NaN t as NaN.
inline vf16 vexp_sub(vf16 x, vf16 mx) {
#if defined(__AVX512F__)
  __m512 t = _mm512_mul_ps((__m512)(x - mx), _mm512_set1_ps(1.44269504088896341f));
  t = _mm512_max_ps(_mm512_set1_ps(-200.0f), t);
  t = _mm512_min_ps(_mm512_set1_ps(0.0f), t);
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 q = _mm512_set1_ps(1.534572074888274e-4f);
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(1.3399902964010835e-3f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(9.618489071726799e-3f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(5.550329014658928e-2f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(2.4022646248340607e-1f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(6.931471824645996e-1f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(1.0f));
  return (vf16)_mm512_scalef_ps(q, n);
#else
  return vexp_nonpos(x - mx);
#endif
}

inline vf16 vlog(vf16 z) {
  const vi16 bits = (vi16)z;
  vi16 e = ((bits >> 23) & 0xff) - 127;
  vf16 m = (vf16)((bits & 0x007fffff) | 0x3f800000);
  const vi16 big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = e - big;  // big is -1 where true
  const vf16 f = m - 1.0f;
  const vf16 s = f / (f + 2.0f);
  const vf16 s2 = s * s;
  vf16 poly = vsplat(0.222222222f);
  poly = poly * s2 + 0.285714286f;
  poly = poly * s2 + 0.4f;
  poly = poly * s2 + 0.666666667f;
  poly = poly * s2 + 2.0f;
  const vf16 ef = __builtin_convertvector(e, vf16);
  vf16 out = ef * 0.693145751953125f + (ef * 1.428606765330187e-06f + s * poly);
  out = z == 0.0f ? vsplat(-INFINITY) : out;
  out = z < INFINITY ? out : z;
  return out;
}

// Store 16 gradient values that will not be read again: bypass the cache when the row is aligned.
inline void vst_stream(float* dst, vf16 v) {
#if defined(__AVX512F__)
  if (((uintptr_t)dst & 63) == 0) { _mm512_stream_ps(dst, (__m512)v); return; }
#elif defined(__AVX__)
  if (((uintptr_t)dst & 31) == 0) {
    __m256 lo, hi;
    std::memcpy(&lo, &v, 32);
    std::memcpy(&hi, (const char*)&v + 32, 32);
    _mm256_stream_ps(dst, lo);
    _mm256_stream_ps(dst + 8, hi);
    return;
  }
#endif
  vst(dst, v);
}

// The 16-voxel group starting at k0 of the current tile: logits rows (or a zero-padded copy when
// fewer than 16 voxels are left), labels and mask (padded with -1 / 0 by pad_tile_tail).
struct Group {
  const float* x;
  int64_t ld;
};

inline Group group_at(const float* x, int64_t xld, int64_t C, int k0, int n, float* pad) {
  if (k0 + kV <= n) return {x + k0, xld};
  const int r = n - k0;
  for (int64_t c = 0; c < C; ++c) {
    for (int i = 0; i < kV; ++i) pad[c * kV + i] = i < r ? x[c * xld + k0 + i] : 0.0f;
  }
  return {pad, kV};
}

inline void pad_tile_tail(Scratch<float>& sc, int n) {
  const int end = (n + kV - 1) / kV * kV;
  for (int k = n; k < end; ++k) { sc.lab[k] = -1; sc.m[k] = 0.0f; }
}

// max over classes (and sum_c w_c x_c when label smoothing needs it); prefetches the same cache
// line of the next tile in every row
inline vf16 group_max(const Group& g, int64_t C, bool prefetch, int64_t pf_off, bool want_wx, const float* w,
                      vf16& wx) {
  vf16 mx = vld(g.x);
  if (want_wx) wx = vld(g.x) * (w ? w[0] : 1.0f);
  if (prefetch) __builtin_prefetch(g.x + pf_off, 0, 2);
  for (int64_t c = 1; c < C; ++c) {
    const vf16 v = vld(g.x + c * g.ld);
    mx = v > mx ? v : mx;
    if (want_wx) wx += v * (w ? w[c] : 1.0f);
    if (prefetch) __builtin_prefetch(g.x + c * g.ld + pf_off, 0, 2);
  }
  return mx;
}

// per lane: x of the labelled class (0 where the label is invalid or ignored) and a per-class
// table value (t_val[label], or `dflt`)
inline vf16 group_xt(const Group& g, const int32_t* lab) {
  alignas(64) float xt[kV];
  for (int i = 0; i < kV; ++i) xt[i] = lab[i] >= 0 ? g.x[(int64_t)lab[i] * g.ld + i] : 0.0f;
  return vld(xt);
}
inline vf16 group_lookup(const float* table, const int32_t* lab, float dflt) {
  alignas(64) float v[kV];
  for (int i = 0; i < kV; ++i) v[i] = (table && lab[i] >= 0) ? table[lab[i]] : dflt;
  return vld(v);
}

void fwd_task_blocked(const DiceCEParams& p, int64_t b, int64_t blk, Scratch<float>& sc, double* part,
                      int64_t& bad) {
  const int64_t C = p.C;
  const int K = sc.K;
  const int64_t s_begin = blk * kDiceBlockVoxels;
  const int64_t s_end = std::min(p.S, s_begin + kDiceBlockVoxels);
  for (int64_t i = 0; i < 4 * C + 4; ++i) part[i] = 0.0;
  double* ce = part + 4 * C;
  const bool do_ce = p.ce == kCeSoftmax;
  const bool need_wx = do_ce && !p.skip_ce_smooth;
  const float* w = do_ce ? p.ce_weight : nullptr;
  float Wsum = 0.0f;
  for (int64_t c = 0; c < C; ++c) Wsum += w ? w[c] : 1.0f;
  float* ebuf = sc.q.data();  // C x 16
  float* acc = sc.g.data();   // C x 16 running sums of p * m
  float* pad = sc.pr.data();  // C x 16
  for (int64_t s0 = s_begin; s0 < s_end; s0 += K) {
    const int n = (int)std::min<int64_t>(K, s_end - s0);
    bad += load_tile(p, b, s0, n, sc, false);
    pad_tile_tail(sc, n);
    const bool inplace = sc.xp != sc.x.data();
    const bool prefetch = inplace && s0 + K < p.S;
    prefetch_labels(p, b, s0 + K, K);
    if (p.dice) for (int64_t i = 0; i < C * kV; ++i) acc[i] = 0.0f;
    vf16 a_acc{}, sm_acc{}, wt_acc{}, cnt_acc{};
    float* hist = sc.hist.data();
    for (int k0 = 0; k0 < n; k0 += kV) {
      const Group g = group_at(sc.xp, sc.xld, C, k0, n, pad);
      const int32_t* lab = sc.lab.data() + k0;
      const vf16 mv = vld(sc.m.data() + k0);
      vf16 wx{};
      const vf16 mx = group_max(g, C, prefetch && k0 + kV <= n, K, need_wx, w, wx);
      const vf16 xt = group_xt(g, lab);
      vf16 z{};
      for (int64_t c = 0; c < C; ++c) {
        const vf16 e = vexp_sub(vld(g.x + c * g.ld), mx);
        z += e;
        vst(ebuf + c * kV, e);
      }
      const vf16 em = mv / z;
      if (p.dice) {
        for (int64_t c = 0; c < C; ++c) vst(acc + c * kV, vld(acc + c * kV) + vld(ebuf + c * kV) * em);
        const vf16 pi = vexp_sub(xt, mx) * em * mv;
        const vf16 mm = mv * mv;
        for (int i = 0; i < kV; ++i) {
          const int32_t t = lab[i];
          if (t < 0) continue;
          hist[2 * t + 0] += pi[i];
          hist[2 * t + 1] += mm[i];
        }
      }
      if (do_ce) {
        const vf16 lse = mx + vlog(z);
        const vf16 mw = w ? mv * group_lookup(w, lab, 0.0f) : mv;
        // an ignored voxel adds nothing, whatever its logits (m = 0 times an infinite sum
        // would be NaN; PyTorch's ignore_index skips the voxel)
        const vi16 labelled = vldi(lab) >= 0;
        a_acc += labelled ? mw * (lse - xt) : vf16{};
        if (need_wx) sm_acc += labelled ? mv * (lse * Wsum - wx) : vf16{};
        wt_acc += mw;
        cnt_acc += mv;
      }
    }
    if (do_ce) {
      ce[0] += vsum(a_acc); ce[1] += vsum(sm_acc); ce[2] += vsum(wt_acc); ce[3] += vsum(cnt_acc);
    }
    if (p.dice) {
      for (int64_t c = 0; c < C; ++c) {
        part[4 * c + 1] += vsum(vld(acc + c * kV));
        part[4 * c + 0] += (double)hist[2 * c + 0];
        part[4 * c + 2] += (double)hist[2 * c + 1];
        hist[2 * c + 0] = 0.0f;
        hist[2 * c + 1] = 0.0f;
      }
    }
  }
}

void bwd_task_blocked(const DiceCEParams& p, int64_t b, int64_t blk, Scratch<float>& sc) {
  const int64_t C = p.C;
  const int K = sc.K;
  const int64_t s_begin = blk * kDiceBlockVoxels;
  const int64_t s_end = std::min(p.S, s_begin + kDiceBlockVoxels);
  const double* gs = p.grad_stats + b * C * 4;
  const bool do_ce = p.ce == kCeSoftmax;
  const float gA = do_ce ? (float)p.grad_ce[b * 4 + 0] : 0.0f;
  const float gSm = do_ce ? (float)p.grad_ce[b * 4 + 1] : 0.0f;
  const float* w = do_ce ? p.ce_weight : nullptr;
  float Wsum = 0.0f;
  for (int64_t c = 0; c < C; ++c) Wsum += w ? w[c] : 1.0f;
  std::vector<float> gI(C), gP(C);
  for (int64_t c = 0; c < C; ++c) {
    gI[c] = p.dice ? (float)gs[4 * c + 0] : 0.0f;
    gP[c] = p.dice ? (float)gs[4 * c + 1] : 0.0f;
  }
  const bool direct = p.x_dtype == kF32 && p.dx_ss == 1;
  float* ebuf = sc.q.data();
  float* pad = sc.pr.data();
  for (int64_t s0 = s_begin; s0 < s_end; s0 += K) {
    const int n = (int)std::min<int64_t>(K, s_end - s0);
    load_tile(p, b, s0, n, sc, false);
    pad_tile_tail(sc, n);
    const bool inplace = sc.xp != sc.x.data();
    const bool prefetch = inplace && s0 + K < p.S;
    prefetch_labels(p, b, s0 + K, K);
    float* dst0 = direct ? (float*)p.dx + b * p.dx_sb + s0 : nullptr;
    const int64_t dld = direct ? p.dx_sc : K;
    if (!direct) dst0 = sc.g.data();
    for (int k0 = 0; k0 < n; k0 += kV) {
      const Group g = group_at(sc.xp, sc.xld, C, k0, n, pad);
      const int32_t* lab = sc.lab.data() + k0;
      const vi16 labv = vldi(lab);
      const vf16 mv = vld(sc.m.data() + k0);
      vf16 unused{};
      const vf16 mx = group_max(g, C, prefetch && k0 + kV <= n, K, false, nullptr, unused);
      const vf16 xt = group_xt(g, lab);
      vf16 z{}, sgp{};
      for (int64_t c = 0; c < C; ++c) {
        const vf16 e = vexp_sub(vld(g.x + c * g.ld), mx);
        z += e;
        sgp += e * gP[c];
        vst(ebuf + c * kV, e);
      }
      // dx_c = e_c (u gP_c + v) - val w_c, plus for the labelled class p_t m^2 gI_t - coef, with
      // p = e / z, u = m / z, v = (coef + val W - dot) / z, dot = sum_c p_c (dDice/dp_c),
      // coef = m gA w_t, val = m gSm
      const vf16 iv = 1.0f / z;
      const vf16 pt = vexp_sub(xt, mx) * iv;
      const vf16 git = group_lookup(gI.data(), lab, 0.0f);
      const vf16 wt = group_lookup(w, lab, 1.0f);
      const vf16 dot = mv * (git * mv * pt + iv * sgp);
      const vf16 coef = mv * gA * wt;
      const vf16 val = mv * gSm;
      const vf16 u = iv * mv;
      const vf16 v = iv * (coef + val * Wsum - dot);
      const vf16 fix = pt * mv * mv * git - coef;
      const bool full = k0 + kV <= n;
      for (int64_t c = 0; c < C; ++c) {
        vf16 out = vld(ebuf + c * kV) * (u * gP[c] + v);
        if (gSm != 0.0f) out -= val * (w ? w[c] : 1.0f);
        out = labv == (int32_t)c ? out + fix : out;
        float* d = dst0 + c * dld + k0;
        if (!full) {
          for (int i = 0; i < n - k0; ++i) d[i] = out[i];
        } else if (direct) {
          vst_stream(d, out);
        } else {
          vst(d, out);
        }
      }
    }
    if (!direct) scatter_any<float>(p.dx, p.x_dtype, b * p.dx_sb + s0 * p.dx_ss, C, p.dx_sc, p.dx_ss, n, sc.g.data(), K);
  }
  stream_fence();
}

template <typename F>
int fwd_impl(const DiceCEParams& p) {
  const int64_t nblk = dice_ce_num_blocks(p.S);
  const int64_t ntask = p.B * nblk;
  const int64_t P = 4 * p.C + 4;
  const int K = tile_width(p.C);
  int64_t bad = 0;
  const bool fast = fast_path(p, std::is_same<F, float>::value) && !p.force_generic;
#pragma omp parallel num_threads(std::max(1, p.num_threads)) reduction(+ : bad)
  {
    Scratch<F> sc(p.C, K, !p.label_map);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < ntask; ++task) {
      const int64_t b = task / nblk, blk = task % nblk;
      if constexpr (std::is_same<F, float>::value) {
        if (fast) {
          fwd_task_blocked(p, b, blk, sc, p.workspace + task * P, bad);
          continue;
        }
      }
      fwd_task<F>(p, b, blk, sc, p.workspace + task * P, bad);
    }
  }
  // fixed-order reduction over blocks
  for (int64_t b = 0; b < p.B; ++b) {
    double* st = p.stats + b * p.C * 4;
    double* ce = p.ce_out + b * 4;
    for (int64_t i = 0; i < 4 * p.C; ++i) st[i] = 0.0;
    for (int64_t i = 0; i < 4; ++i) ce[i] = 0.0;
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const double* part = p.workspace + (b * nblk + blk) * P;
      for (int64_t i = 0; i < 4 * p.C; ++i) st[i] += part[i];
      for (int64_t i = 0; i < 4; ++i) ce[i] += part[4 * p.C + i];
    }
  }
  *p.bad = bad;
  return kOk;
}

template <typename F>
int bwd_impl(const DiceCEParams& p) {
  const int64_t nblk = dice_ce_num_blocks(p.S);
  const int64_t ntask = p.B * nblk;
  const int K = tile_width(p.C);
  const bool fast = fast_path(p, std::is_same<F, float>::value) && !p.force_generic;
#pragma omp parallel num_threads(std::max(1, p.num_threads))
  {
    Scratch<F> sc(p.C, K, !p.label_map);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < ntask; ++task) {
      if constexpr (std::is_same<F, float>::value) {
        if (fast) {
          bwd_task_blocked(p, task / nblk, task % nblk, sc);
          continue;
        }
      }
      bwd_task<F>(p, task / nblk, task % nblk, sc);
    }
  }
  return kOk;
}

}  // namespace

int dice_ce_fwd(const DiceCEParams& p) {
  if (p.x_dtype == kF64) return fwd_impl<double>(p);
  if (p.x_dtype == kF32 || p.x_dtype == kF16 || p.x_dtype == kBF16) return fwd_impl<float>(p);
  return kBadDtype;
}

int dice_ce_bwd(const DiceCEParams& p) {
  if (p.dx_ss == 1 || p.dx_sc == 1) {  // dense output (contiguous or channels-last): fill it with huge pages
    const size_t esize = p.x_dtype == kF64 ? 8 : (p.x_dtype == kF32 ? 4 : 2);
    prefer_huge_pages(p.dx, (size_t)(p.B * p.C * p.S) * esize);
  }
  if (p.x_dtype == kF64) return bwd_impl<double>(p);
  if (p.x_dtype == kF32 || p.x_dtype == kF16 || p.x_dtype == kBF16) return bwd_impl<float>(p);
  return kBadDtype;
}

}  // namespace isa_*
}  // namespace fastmed
