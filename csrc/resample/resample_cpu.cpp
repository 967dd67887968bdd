// Resampling on the CPU (OpenMP over output rows). The input coordinate of every output voxel is
// computed from the 3 x 4 voxel-to-voxel affine inside the loop; no grid exists in memory.
//
// Two paths:
//  * row path, when the input (z, y) of an output row does not depend on x and the input x depends
//    on the output x only (every axis-aligned resampling, and rotations in the z-y plane): the x taps
//    are computed once per call; per output row the Tz x Ty input rows are blended into one row
//    (contiguous, vectorised), and the x interpolation gathers from that row, which is in L1;
//  * general path, any affine: per output voxel, per dim taps, all channels share them.
// Both compute the same sums; they differ only in the order of float additions.
// Compiled once per instruction set (FM_ISA, as dice_ce_cpu.cpp); the dispatcher picks one.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/common.h"
#include "resample.h"
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastmed {
namespace FM_CAT(isa_, FM_ISA) {
namespace {

struct half_t { uint16_t v; };
struct bf16_t { uint16_t v; };

template <typename S, typename T> inline T load(const S* p) { return (T)*p; }
template <> inline float load<half_t, float>(const half_t* p) { return half_bits_to_float(p->v); }
template <> inline double load<half_t, double>(const half_t* p) { return half_bits_to_float(p->v); }
template <> inline float load<bf16_t, float>(const bf16_t* p) { return bf16_bits_to_float(p->v); }
template <> inline double load<bf16_t, double>(const bf16_t* p) { return bf16_bits_to_float(p->v); }

// ---- taps -------------------------------------------------------------------------------------

// index of tap i in [0, n) under the padding (for kPadZeros returns -1 when outside)
inline int64_t extend(int64_t i, int64_t n, int pad) {
  if (i >= 0 && i < n) return i;
  switch (pad) {
    case kPadZeros: return -1;
    case kPadBorder: return i < 0 ? 0 : n - 1;
    case kPadReflect: {  // half-sample symmetric, period 2n
      int64_t m = i % (2 * n);
      if (m < 0) m += 2 * n;
      return m >= n ? 2 * n - 1 - m : m;
    }
    default: {  // whole-sample symmetric, period 2n - 2
      if (n == 1) return 0;
      const int64_t per = 2 * n - 2;
      int64_t m = i % per;
      if (m < 0) m += per;
      return m >= n ? per - m : m;
    }
  }
}

template <typename T>
inline T bspline3(T t) {
  const T a = std::fabs(t);
  if (a < 1) return (T)(2.0 / 3.0) - a * a + a * a * a / 2;
  if (a < 2) { const T b = 2 - a; return b * b * b / 6; }
  return 0;
}

// Taps of coordinate c along a dim of size n: up to 4 (index or -1 = cval, weight). The coordinate
// stays in double (as on CUDA and in the reference): which voxels are picked never depends on the
// compute precision; only the fraction t is rounded to T.
template <typename T>
inline int taps(double c, int order, int64_t n, int pad, bool half_up, int64_t* idx, T* w) {
  c = c < -1e15 ? -1e15 : c > 1e15 ? 1e15 : c;  // far outside either way; keeps int64 exact (NaN: below)
  if (c != c) c = -1e15;
  const int epad = pad == kPadConstantMirror ? kPadMirror : pad;
  if (order == 0) {
    c = fold_coord(c, n, epad);
    const double r = half_up ? std::floor(c + 0.5) : std::nearbyint(c);
    idx[0] = extend((int64_t)r, n, epad);
    w[0] = 1;
    return 1;
  }
  const double f = std::floor(c);
  const int64_t i0 = (int64_t)f;
  const T t = (T)(c - f);
  if (order == 1) {
    idx[0] = extend(i0, n, epad); w[0] = 1 - t;
    idx[1] = extend(i0 + 1, n, epad); w[1] = t;
    return 2;
  }
  const T u = 1 - t;
  w[0] = u * u * u / 6;
  w[1] = (T)(2.0 / 3.0) - t * t + t * t * t / 2;
  w[2] = (T)(2.0 / 3.0) - u * u + u * u * u / 2;
  w[3] = t * t * t / 6;
  for (int k = 0; k < 4; ++k) idx[k] = extend(i0 - 1 + k, n, epad);
  return 4;
}

inline bool outside(double c, int64_t n) { return !(c >= 0 && c <= (double)(n - 1)); }

// ---- stores -----------------------------------------------------------------------------------

template <typename D, typename T>
inline D to_int(T v) {
  if (std::isnan(v)) return 0;
  const T r = std::nearbyint(v);
  constexpr T lo = (T)std::numeric_limits<D>::lowest(), hi = (T)std::numeric_limits<D>::max();
  if (r <= lo) return std::numeric_limits<D>::lowest();
  if (r >= hi) return std::numeric_limits<D>::max();
  return (D)r;
}

template <typename T>
void store_row(void* dst, int dtype, int64_t stride, const T* v, int64_t n) {
  switch (dtype) {
    case kF32: { float* d = (float*)dst; for (int64_t i = 0; i < n; ++i) d[i * stride] = (float)v[i]; break; }
    case kF64: { double* d = (double*)dst; for (int64_t i = 0; i < n; ++i) d[i * stride] = (double)v[i]; break; }
    case kF16: { uint16_t* d = (uint16_t*)dst; for (int64_t i = 0; i < n; ++i) d[i * stride] = float_to_half_bits((float)v[i]); break; }
    case kBF16: { uint16_t* d = (uint16_t*)dst; for (int64_t i = 0; i < n; ++i) d[i * stride] = float_to_bf16_bits((float)v[i]); break; }
    case kU8: { uint8_t* d = (uint8_t*)dst; for (int64_t i = 0; i < n; ++i) d[i * stride] = to_int<uint8_t>(v[i]); break; }
    case kI8: { int8_t* d = (int8_t*)dst; for (int64_t i = 0; i < n; ++i) d[i * stride] = to_int<int8_t>(v[i]); break; }
    case kI16: { int16_t* d = (int16_t*)dst; for (int64_t i = 0; i < n; ++i) d[i * stride] = to_int<int16_t>(v[i]); break; }
    case kI32: { int32_t* d = (int32_t*)dst; for (int64_t i = 0; i < n; ++i) d[i * stride] = to_int<int32_t>(v[i]); break; }
    case kI64: { int64_t* d = (int64_t*)dst; for (int64_t i = 0; i < n; ++i) d[i * stride] = to_int<int64_t>(v[i]); break; }
    default: break;
  }
}

// integer label rows (argmax / labels): values already integral
void store_labels(void* dst, int dtype, int64_t stride, const int64_t* v, int64_t n) {
  switch (dtype) {
    case kU8: { uint8_t* d = (uint8_t*)dst; for (int64_t i = 0; i < n; ++i) d[i * stride] = (uint8_t)v[i]; break; }
    case kI8: { int8_t* d = (int8_t*)dst; for (int64_t i = 0; i < n; ++i) d[i * stride] = (int8_t)v[i]; break; }
    case kI16: { int16_t* d = (int16_t*)dst; for (int64_t i = 0; i < n; ++i) d[i * stride] = (int16_t)v[i]; break; }
    case kI32: { int32_t* d = (int32_t*)dst; for (int64_t i = 0; i < n; ++i) d[i * stride] = (int32_t)v[i]; break; }
    case kI64: { int64_t* d = (int64_t*)dst; for (int64_t i = 0; i < n; ++i) d[i * stride] = v[i]; break; }
    default: break;
  }
}

inline bool is_int_dtype(int d) { return d == kU8 || d == kI8 || d == kI16 || d == kI32 || d == kI64; }

// argmax with torch's rules: first maximum, NaN is the largest
template <typename T>
inline void argmax_update(T v, int64_t c, T& best, int64_t& arg) {
  if (std::isnan(best)) return;
  if (std::isnan(v) || v > best) { best = v; arg = c; }
}

// ---- general path -----------------------------------------------------------------------------

template <typename S, typename T>
void general(const ResampleParams& p) {
  const int64_t nz = p.out_size[0], ny = p.out_size[1], nx = p.out_size[2];
  const int64_t rows = p.B * nz * ny;
  const int oc = p.out_mode == kOutValues ? (int)p.C : 1;
#pragma omp parallel num_threads(std::max(1, p.num_threads))
  {
    std::vector<T> vals((size_t)(oc * nx));
    std::vector<int64_t> lab((size_t)nx);
    std::vector<T> chan((size_t)p.C);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t y = r % ny, z = (r / ny) % nz, b = r / (ny * nz);
      const double* th = p.theta + b * p.theta_sb;
      const S* sb = (const S*)p.src + b * p.s_sb;
      for (int64_t x = 0; x < nx; ++x) {
        double c[3];
        for (int d = 0; d < 3; ++d)
          c[d] = th[4 * d] * ((double)z + p.index_offset) + th[4 * d + 1] * ((double)y + p.index_offset) +
                 th[4 * d + 2] * ((double)x + p.index_offset) + th[4 * d + 3];
        bool out_pt = false;
        if (p.padding == kPadConstantMirror)
          for (int d = 0; d < 3; ++d) out_pt |= outside(c[d], p.in_size[d]);
        int64_t ti[3][4];
        T tw[3][4];
        int nt[3];
        for (int d = 0; d < 3; ++d) nt[d] = taps<T>(c[d], p.order[d], p.in_size[d], p.padding, p.nearest_half_up, ti[d], tw[d]);
        const T cval = (T)p.cval;
        if (p.out_mode == kOutLabels) {
          int64_t res = (int64_t)p.cval;
          for (int64_t l = 0; l < p.nlabels; ++l) {
            const int64_t lv = p.labels[l];
            const T ind_c = (T)(p.cval == (double)lv ? 1 : 0);
            T acc = 0;
            if (out_pt) acc = ind_c;
            else
              for (int i = 0; i < nt[0]; ++i)
                for (int j = 0; j < nt[1]; ++j)
                  for (int k = 0; k < nt[2]; ++k) {
                    const T w = tw[0][i] * tw[1][j] * tw[2][k];
                    T v = ind_c;
                    if (ti[0][i] >= 0 && ti[1][j] >= 0 && ti[2][k] >= 0) {
                      const S* q = sb + ti[0][i] * p.s_s[0] + ti[1][j] * p.s_s[1] + ti[2][k] * p.s_s[2];
                      if constexpr (std::is_integral<S>::value) v = (int64_t)*q == lv ? 1 : 0;
                      else v = (T)0;  // float label maps never reach here (kBadDtype)
                    }
                    acc += w * v;
                  }
            if (acc >= (T)0.5) res = lv;
          }
          lab[x] = res;
          continue;
        }
        for (int64_t ch = 0; ch < p.C; ++ch) chan[ch] = 0;
        if (out_pt) {
          for (int64_t ch = 0; ch < p.C; ++ch) chan[ch] = cval;
        } else {
          for (int i = 0; i < nt[0]; ++i)
            for (int j = 0; j < nt[1]; ++j) {
              const T wij = tw[0][i] * tw[1][j];
              for (int k = 0; k < nt[2]; ++k) {
                const T w = wij * tw[2][k];
                if (ti[0][i] < 0 || ti[1][j] < 0 || ti[2][k] < 0) {
                  for (int64_t ch = 0; ch < p.C; ++ch) chan[ch] += w * cval;
                  continue;
                }
                const S* q = sb + ti[0][i] * p.s_s[0] + ti[1][j] * p.s_s[1] + ti[2][k] * p.s_s[2];
                for (int64_t ch = 0; ch < p.C; ++ch) chan[ch] += w * load<S, T>(q + ch * p.s_sc);
              }
            }
        }
        if (p.out_mode == kOutArgmax) {
          T best = chan[0];
          int64_t arg = 0;
          for (int64_t ch = 1; ch < p.C; ++ch) argmax_update(chan[ch], ch, best, arg);
          lab[x] = arg;
        } else {
          for (int64_t ch = 0; ch < p.C; ++ch) vals[ch * nx + x] = chan[ch];
        }
      }
      char* db = (char*)p.dst;
      const int64_t es = p.dst_dtype == kF64 || p.dst_dtype == kI64 ? 8 : p.dst_dtype == kI32 || p.dst_dtype == kF32 ? 4
                         : p.dst_dtype == kU8 || p.dst_dtype == kI8 ? 1 : 2;
      const int64_t off = b * p.d_sb + z * p.d_s[0] + y * p.d_s[1];
      if (p.out_mode == kOutValues) {
        for (int64_t ch = 0; ch < p.C; ++ch)
          store_row<T>(db + (off + ch * p.d_sc) * es, p.dst_dtype, p.d_s[2], vals.data() + ch * nx, nx);
      } else {
        store_labels(db + off * es, p.dst_dtype, p.d_s[2], lab.data(), nx);
      }
    }
  }
}

// ---- row path ---------------------------------------------------------------------------------

inline bool row_separable(const ResampleParams& p) {
  const int64_t nb = p.theta_sb ? p.B : 1;
  for (int64_t b = 0; b < nb; ++b) {
    const double* th = p.theta + b * p.theta_sb;
    if (th[2] != 0.0 || th[6] != 0.0 || th[8] != 0.0 || th[9] != 0.0) return false;
  }
  // 32-bit x taps, block starts tagged with kWide = 2^30: rows shorter than 2^30 - 64
  return p.out_mode != kOutLabels && p.in_size[2] < ((int64_t)1 << 30) - 64;
}

// Vector width of this build for the x interpolation (floats per register). XB entries >= kWide
// mark AVX-512 blocks whose span needs two registers (the start is XB - kWide).
constexpr int32_t kWide = 1 << 30;
#if defined(__AVX512F__)
constexpr int kVW = 16;
#elif defined(__AVX2__)
constexpr int kVW = 8;
#else
constexpr int kVW = 1;
#endif
constexpr int kSpanMax = kVW == 16 ? 32 : kVW;  // AVX-512 permutes across two registers

// v[x] = sum_k w_k[x] * bl[i_k[x]] + cconst (the weights of a voxel sum to 1). Block b of kVW
// voxels whose taps all fall in bl[XB[b], XB[b] + kVW) (XB[b] >= 0: upsampling and mild
// downsampling) reads that span with one load and picks the taps with register permutes (relative
// indices XR); other blocks gather. bl has kVW floats of slack past its end.
template <typename T, int K>
inline void x_interp(const T* bl, const int32_t* XI, const int32_t* XB, const int32_t* XR, const T* XW, int64_t nx,
                     T cconst, T* v) {
  int64_t x0 = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value) {
#if defined(__AVX512F__)
    const __m512 cc = _mm512_set1_ps(cconst);
    for (; x0 + 16 <= nx; x0 += 16) {
      __m512 acc = _mm512_setzero_ps();
      const int32_t base = XB[x0 / 16];
      if (base >= 0 && base < kWide) {
        const __m512 span = _mm512_loadu_ps(bl + base);
        for (int k = 0; k < K; ++k) {
          const __m512i id = _mm512_loadu_si512((const void*)(XR + k * nx + x0));
          acc = _mm512_fmadd_ps(_mm512_loadu_ps(XW + k * nx + x0), _mm512_permutexvar_ps(id, span), acc);
        }
      } else if (base >= kWide) {  // taps span 16..31 floats (downsampling up to ~1.9x): two registers
        const __m512 lo16 = _mm512_loadu_ps(bl + base - kWide), hi16 = _mm512_loadu_ps(bl + base - kWide + 16);
        for (int k = 0; k < K; ++k) {
          const __m512i id = _mm512_loadu_si512((const void*)(XR + k * nx + x0));
          acc = _mm512_fmadd_ps(_mm512_loadu_ps(XW + k * nx + x0), _mm512_permutex2var_ps(lo16, id, hi16), acc);
        }
      } else {
        for (int k = 0; k < K; ++k) {
          const __m512i id = _mm512_loadu_si512((const void*)(XI + k * nx + x0));
          acc = _mm512_fmadd_ps(_mm512_loadu_ps(XW + k * nx + x0), _mm512_i32gather_ps(id, bl, 4), acc);
        }
      }
      _mm512_storeu_ps(v + x0, _mm512_add_ps(acc, cc));
    }
#else
    const __m256 cc = _mm256_set1_ps(cconst);
    for (; x0 + 8 <= nx; x0 += 8) {
      __m256 acc = _mm256_setzero_ps();
      const int32_t base = XB[x0 / 8];
      if (base >= 0) {
        const __m256 span = _mm256_loadu_ps(bl + base);
        for (int k = 0; k < K; ++k) {
          const __m256i id = _mm256_loadu_si256((const __m256i*)(XR + k * nx + x0));
          acc = _mm256_fmadd_ps(_mm256_loadu_ps(XW + k * nx + x0), _mm256_permutevar8x32_ps(span, id), acc);
        }
      } else {
        for (int k = 0; k < K; ++k) {
          const __m256i id = _mm256_loadu_si256((const __m256i*)(XI + k * nx + x0));
          acc = _mm256_fmadd_ps(_mm256_loadu_ps(XW + k * nx + x0), _mm256_i32gather_ps(bl, id, 4), acc);
        }
      }
      _mm256_storeu_ps(v + x0, _mm256_add_ps(acc, cc));
    }
#endif
  }
#endif
  (void)XB; (void)XR;
#pragma omp simd
  for (int64_t x = x0; x < nx; ++x) {
    T s = 0;
    for (int k = 0; k < K; ++k) s += XW[k * nx + x] * bl[XI[k * nx + x]];
    v[x] = s + cconst;
  }
}

template <typename S, typename T>
void rows(const ResampleParams& p) {
  const int64_t nz = p.out_size[0], ny = p.out_size[1], nx = p.out_size[2];
  const int64_t inx = p.in_size[2];
  const int64_t nb = p.theta_sb ? p.B : 1;
  // work: tiles of kTile consecutive output rows of one (b, z)
  constexpr int64_t kTile = 8;
  const int64_t ytiles = (ny + kTile - 1) / kTile;
  const int64_t ntasks = p.B * nz * ytiles;
  const T cval = (T)p.cval;
  const bool cmirror = p.padding == kPadConstantMirror;
  // x taps per batch entry: tap k of voxel x at [k * nx + x]
  const int kx = p.order[2] == 0 ? 1 : p.order[2] == 1 ? 2 : 4;
  std::vector<int32_t> xi((size_t)(nb * kx * nx));  // 32-bit: the row path needs in_size[2] < 2^31
  std::vector<T> xw((size_t)(nb * kx * nx));
  std::vector<uint8_t> xout((size_t)(nb * nx));
  std::vector<int64_t> xlo((size_t)nb, inx), xhi((size_t)nb, -1);
  std::vector<uint8_t> xvalid((size_t)nb, 1);
  for (int64_t b = 0; b < nb; ++b) {
    const double* th = p.theta + b * p.theta_sb;
    for (int64_t x = 0; x < nx; ++x) {
      const double c = th[10] * ((double)x + p.index_offset) + th[11];
      int64_t ti[4];
      T tw[4];
      taps<T>(c, p.order[2], inx, p.padding, p.nearest_half_up, ti, tw);
      xout[b * nx + x] = cmirror && outside(c, inx);
      if (xout[b * nx + x]) xvalid[b] = 0;
      for (int k = 0; k < kx; ++k) {
        xi[(b * kx + k) * nx + x] = (int32_t)ti[k];
        xw[(b * kx + k) * nx + x] = tw[k];
        if (ti[k] < 0) xvalid[b] = 0;
        if (ti[k] >= 0) { xlo[b] = std::min(xlo[b], ti[k]); xhi[b] = std::max(xhi[b], ti[k]); }
      }
    }
  }
  // per block of kVW voxels: the start of the input span holding all its taps (or -1)
  const int64_t nblk = nx / kVW;
  std::vector<int32_t> xb((size_t)(nb * nblk + 1), -1), xr((size_t)(nb * kx * nx), 0);
  for (int64_t b = 0; b < nb && kVW > 1; ++b) {
    if (!xvalid[b]) continue;
    for (int64_t blk = 0; blk < nblk; ++blk) {
      int32_t lo = INT32_MAX, hi = INT32_MIN;
      for (int k = 0; k < kx; ++k)
        for (int64_t x = blk * kVW; x < (blk + 1) * kVW; ++x) {
          lo = std::min(lo, xi[(b * kx + k) * nx + x]);
          hi = std::max(hi, xi[(b * kx + k) * nx + x]);
        }
      if (hi - lo >= kSpanMax) continue;
      xb[b * nblk + blk] = hi - lo < kVW ? lo : lo + kWide;
      for (int k = 0; k < kx; ++k)
        for (int64_t x = blk * kVW; x < (blk + 1) * kVW; ++x)
          xr[(b * kx + k) * nx + x] = xi[(b * kx + k) * nx + x] - lo;
    }
  }
#pragma omp parallel num_threads(std::max(1, p.num_threads))
  {
    std::vector<T> blend((size_t)(inx + kSpanMax));  // one channel's blended row; slack for span loads
    std::vector<T> vals((size_t)(kTile * nx));
    std::vector<int64_t> lab((size_t)(kTile * nx));
    std::vector<T> best((size_t)(kTile * nx));
    char* db = (char*)p.dst;
    const int64_t es = p.dst_dtype == kF64 || p.dst_dtype == kI64 ? 8 : p.dst_dtype == kI32 || p.dst_dtype == kF32 ? 4
                       : p.dst_dtype == kU8 || p.dst_dtype == kI8 ? 1 : 2;
    // values of dst's own type with unit stride are written in place (no row buffer, no second pass)
    const bool direct = p.out_mode == kOutValues && p.d_s[2] == 1 &&
                        ((std::is_same<T, float>::value && p.dst_dtype == kF32) ||
                         (std::is_same<T, double>::value && p.dst_dtype == kF64));
#pragma omp for schedule(static)
    for (int64_t task = 0; task < ntasks; ++task) {
      const int64_t yt = task % ytiles, z = (task / ytiles) % nz, b = task / (ytiles * nz);
      const int64_t y0 = yt * kTile, y1 = std::min(ny, y0 + kTile);
      const int64_t bt = p.theta_sb ? b : 0;
      const double* th = p.theta + b * p.theta_sb;
      const int32_t* XI = xi.data() + bt * kx * nx;
      const int32_t* XR = xr.data() + bt * kx * nx;
      const int32_t* XB = xb.data() + bt * nblk;
      const T* XW = xw.data() + bt * kx * nx;
      const uint8_t* XO = xout.data() + bt * nx;
      const int64_t lo = xlo[bt], hi = xhi[bt];
      // channels outermost: each channel streams through its own rows of the tile (many channels
      // interleaved row by row would be more streams than the prefetchers follow)
      for (int64_t ch = 0; ch < p.C; ++ch) {
        for (int64_t y = y0; y < y1; ++y) {
          const double zo = (double)z + p.index_offset, yo = (double)y + p.index_offset;
          const double cz = th[0] * zo + th[1] * yo + th[3];
          const double cy = th[4] * zo + th[5] * yo + th[7];
          int64_t zi[4], yi[4];
          T zw[4], yw[4];
          const int tz = taps<T>(cz, p.order[0], p.in_size[0], p.padding, p.nearest_half_up, zi, zw);
          const int ty = taps<T>(cy, p.order[1], p.in_size[1], p.padding, p.nearest_half_up, yi, yw);
          const bool row_out = cmirror && (outside(cz, p.in_size[0]) || outside(cy, p.in_size[1]));
          // blend[x'] = sum over valid rows of w_r * src[b, ch, z_r, y_r, x'] (+ cval * weight of invalid rows)
          T cconst = 0;
          T* o = blend.data();
          if (!row_out && hi >= lo) {
            bool first = true;
            for (int i = 0; i < tz; ++i)
              for (int j = 0; j < ty; ++j) {
                const T w = zw[i] * yw[j];
                if (zi[i] < 0 || yi[j] < 0) { cconst += w * cval; continue; }
                const S* q = (const S*)p.src + b * p.s_sb + ch * p.s_sc + zi[i] * p.s_s[0] + yi[j] * p.s_s[1];
                if (p.s_s[2] == 1) {
                  if (first) {
#pragma omp simd
                    for (int64_t k = lo; k <= hi; ++k) o[k] = w * load<S, T>(q + k);
                  } else {
#pragma omp simd
                    for (int64_t k = lo; k <= hi; ++k) o[k] += w * load<S, T>(q + k);
                  }
                } else {
                  for (int64_t k = lo; k <= hi; ++k) o[k] = (first ? 0 : o[k]) + w * load<S, T>(q + k * p.s_s[2]);
                }
                first = false;
              }
            if (first) std::fill(o + lo, o + hi + 1, (T)0);  // every row outside: cconst holds the value
          }
          const int64_t off = b * p.d_sb + z * p.d_s[0] + y * p.d_s[1];
          const int64_t ry = y - y0;
          T* v = direct ? (T*)(db + (off + ch * p.d_sc) * es) : vals.data() + ry * nx;
          if (row_out) {
            for (int64_t x = 0; x < nx; ++x) v[x] = cval;
          } else if (xvalid[bt]) {  // every x tap inside
            switch (kx) {
              case 1: x_interp<T, 1>(o, XI, XB, XR, XW, nx, cconst, v); break;
              case 2: x_interp<T, 2>(o, XI, XB, XR, XW, nx, cconst, v); break;
              default: x_interp<T, 4>(o, XI, XB, XR, XW, nx, cconst, v); break;
            }
          } else {
            for (int64_t x = 0; x < nx; ++x) {
              T acc = 0;
              for (int k = 0; k < kx; ++k) {
                const int64_t ii = XI[k * nx + x];
                acc += XW[k * nx + x] * (ii >= 0 ? o[ii] + cconst : cval);
              }
              v[x] = XO[x] ? cval : acc;
            }
          }
          if (p.out_mode == kOutArgmax) {
            T* bp = best.data() + ry * nx;
            int64_t* lp = lab.data() + ry * nx;
            if (ch == 0) {
              for (int64_t x = 0; x < nx; ++x) { bp[x] = v[x]; lp[x] = 0; }
            } else {  // first maximum wins, NaN counts as the largest (as torch.argmax)
#pragma omp simd
              for (int64_t x = 0; x < nx; ++x) {
                const T cur = bp[x], val = v[x];
                const bool take = val > cur || (val != val && cur == cur);
                bp[x] = take ? val : cur;
                lp[x] = take ? ch : lp[x];
              }
            }
          } else if (!direct) {
            store_row<T>(db + (off + ch * p.d_sc) * es, p.dst_dtype, p.d_s[2], v, nx);
          }
        }
      }
      if (p.out_mode == kOutArgmax)
        for (int64_t y = y0; y < y1; ++y)
          store_labels(db + (b * p.d_sb + z * p.d_s[0] + y * p.d_s[1]) * es, p.dst_dtype, p.d_s[2],
                       lab.data() + (y - y0) * nx, nx);
    }
  }
}

template <typename S, typename T>
void run(const ResampleParams& p) {
  if (row_separable(p)) rows<S, T>(p);
  else general<S, T>(p);
}

template <typename T>
int dispatch_src(const ResampleParams& p) {
  switch (p.src_dtype) {
    case kF32: run<float, T>(p); return kOk;
    case kF64: run<double, T>(p); return kOk;
    case kF16: run<half_t, T>(p); return kOk;
    case kBF16: run<bf16_t, T>(p); return kOk;
    case kU8: run<uint8_t, T>(p); return kOk;
    case kI8: run<int8_t, T>(p); return kOk;
    case kI16: run<int16_t, T>(p); return kOk;
    case kI32: run<int32_t, T>(p); return kOk;
    default: return kBadDtype;
  }
}

// ---- cubic B-spline prefilter -----------------------------------------------------------------

// causal initial value: sum_{k>=0} z^k c[ext(-k)], exact (periodic sum) for short lines
template <typename T>
double causal_init(const T* x, int64_t st, int64_t n, int boundary, double z) {
  const int64_t period = boundary == kPadReflect ? 2 * n : 2 * n - 2;
  const int64_t horizon = 40;  // |z|^40 < 1e-22
  const bool exact = period <= horizon;
  const int64_t K = exact ? period : horizon;
  double s = 0, zk = 1;
  for (int64_t k = 0; k < K; ++k) {
    s += zk * (double)x[extend(-k, n, boundary) * st];
    zk *= z;
  }
  return exact ? s / (1 - zk) : s;
}

template <typename T>
void filter_line(T* x, int64_t st, int64_t n, int boundary) {
  const double z = std::sqrt(3.0) - 2.0;
  const T zt = (T)z;
  for (int64_t i = 0; i < n; ++i) x[i * st] *= (T)6;
  x[0] = (T)causal_init(x, st, n, boundary, z);
  for (int64_t i = 1; i < n; ++i) x[i * st] += zt * x[(i - 1) * st];
  double last;
  if (boundary == kPadReflect) last = z / (z - 1) * (double)x[(n - 1) * st];
  else last = z / (z * z - 1) * ((double)x[(n - 1) * st] + z * (double)x[(n - 2) * st]);
  x[(n - 1) * st] = (T)last;
  for (int64_t i = n - 2; i >= 0; --i) x[i * st] = zt * (x[(i + 1) * st] - x[i * st]);
}

template <typename T>
void prefilter(const SplineFilterParams& p) {
  const int d = p.dim;
  const int64_t n = p.size[d], st = p.s[d];
  const int a = d == 0 ? 1 : 0, bdim = d == 2 ? 1 : 2;  // the two other dims
  const int64_t total = p.lines * p.size[a] * p.size[bdim];
#pragma omp parallel for num_threads(std::max(1, p.num_threads)) schedule(static)
  for (int64_t t = 0; t < total; ++t) {
    const int64_t j = t % p.size[bdim], i = (t / p.size[bdim]) % p.size[a], l = t / (p.size[bdim] * p.size[a]);
    T* x = (T*)p.data + l * p.l_s + i * p.s[a] + j * p.s[bdim];
    filter_line<T>(x, st, n, p.boundary);
  }
}

}  // namespace

int resample(const ResampleParams& p) {
  if (p.B < 0 || p.C < 1 || (p.out_mode == kOutLabels && (p.C != 1 || !p.labels))) return kBadArgument;
  for (int d = 0; d < 3; ++d)
    if (p.in_size[d] < 1 || (p.order[d] != 0 && p.order[d] != 1 && p.order[d] != 3)) return kBadArgument;
  if (p.out_mode != kOutValues && !is_int_dtype(p.dst_dtype)) return kBadDtype;
  if (p.out_mode == kOutLabels && (p.src_dtype == kF32 || p.src_dtype == kF64 || p.src_dtype == kF16 || p.src_dtype == kBF16))
    return kBadDtype;
  return p.compute_f64 ? dispatch_src<double>(p) : dispatch_src<float>(p);
}

int spline_prefilter(const SplineFilterParams& p) {
  if (p.dim < 0 || p.dim > 2 || p.size[p.dim] < 2) return kBadArgument;
  if (p.boundary != kPadMirror && p.boundary != kPadReflect) return kBadArgument;
  if (p.dtype == kF32) prefilter<float>(p);
  else if (p.dtype == kF64) prefilter<double>(p);
  else return kBadDtype;
  return kOk;
}

}  // namespace isa_*
}  // namespace fastmed
