// Kernel == stride transposed convolution on the CPU (see upconv.h). OpenMP over input rows
// (n, d, h). Planar data: for each row, every (kd, kh) and block of output channels, a
// register-blocked micro-kernel keeps R vectors of input columns x COB channels x kW taps as
// accumulators and walks the input channels once, so an output row is written once and never read.
// Channels last: see run_cl. Compiled once per instruction set (FM_ISA, as the other CPU kernels);
// the dispatcher picks one.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../common/common.h"
#include "upconv.h"

namespace fastmed {
namespace FM_CAT(isa_, FM_ISA) {
namespace {

#if defined(__AVX512F__)
constexpr int VL = 16;
constexpr int NREG = 32;
#elif defined(__AVX__)
constexpr int VL = 8;
constexpr int NREG = 16;
#else
constexpr int VL = 4;
constexpr int NREG = 16;
#endif
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef int vi __attribute__((vector_size(VL * sizeof(float))));

inline vf loadu(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(vf));
  return v;
}
inline void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }
// streaming (non-temporal) store where the address allows: a large output is not read back soon
// enough to stay in cache, and skipping the read-for-ownership saved ~25% (20 vs 27 ms, 113 MB)
inline void store_out(float* p, vf v, bool stream) {
#if defined(__AVX512F__)
  if (stream && ((uintptr_t)p & 63) == 0) {
    _mm512_stream_ps(p, (__m512)v);
    return;
  }
#else
  (void)stream;
#endif
  storeu(p, v);
}
inline vf splat(float s) { return vf{} + s; }

// (a0 b0 a1 b1 ...) halves: the kW = 2 output columns of VL input columns
#if defined(__AVX512F__)
constexpr vi kLo = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
constexpr vi kHi = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
#elif defined(__AVX__)
constexpr vi kLo = {0, 8, 1, 9, 2, 10, 3, 11};
constexpr vi kHi = {4, 12, 5, 13, 6, 14, 7, 15};
#else
constexpr vi kLo = {0, 4, 1, 5};
constexpr vi kHi = {2, 6, 3, 7};
#endif

// Accumulates R*VL input columns x COB output channels x KW taps over all input channels.
// xb: input channel 0 at the first column, xcs apart; wb: packed weights (ci, co, kw) of this
// (kd, kh) at the block's first channel, wcs apart per ci; out[c]: where channel c's KW*R*VL outputs go.
template <int KW, int COB, int R>
inline void micro(const float* xb, int64_t xcs, int64_t Cin, const float* wb, int64_t wcs, const float* bias,
                  float* const* out, int cvalid, bool stream) {
  vf acc[R][COB][KW];
  for (int c = 0; c < COB; ++c) {
    const vf b = splat(bias[c]);
    for (int r = 0; r < R; ++r)
      for (int k = 0; k < KW; ++k) acc[r][c][k] = b;
  }
  for (int64_t ci = 0; ci < Cin; ++ci) {
    const float* xr = xb + ci * xcs;
    const float* wr = wb + ci * wcs;
    vf xv[R];
    for (int r = 0; r < R; ++r) xv[r] = loadu(xr + r * VL);
    for (int c = 0; c < COB; ++c)
      for (int k = 0; k < KW; ++k) {
        const vf w = splat(wr[c * KW + k]);
        for (int r = 0; r < R; ++r) acc[r][c][k] += xv[r] * w;
      }
  }
  for (int c = 0; c < COB; ++c) {
    if (c >= cvalid) break;
    float* o = out[c];
    for (int r = 0; r < R; ++r) {
      if constexpr (KW == 1) {
        store_out(o + r * VL, acc[r][c][0], stream);
      } else {
        store_out(o + (2 * r) * VL, __builtin_shuffle(acc[r][c][0], acc[r][c][KW - 1], kLo), stream);
        store_out(o + (2 * r + 1) * VL, __builtin_shuffle(acc[r][c][0], acc[r][c][KW - 1], kHi), stream);
      }
    }
  }
}

template <int KW>
void run(const UpConvParams& p) {
  constexpr int R = 3;
  constexpr int COB = (NREG >= 32 ? 24 : 12) / (R * KW);
  constexpr int64_t G = (int64_t)R * VL;  // input columns per micro-kernel call
  const int64_t Cin = p.Cin, Cout = p.Cout, D = p.D, H = p.H, W = p.W, kD = p.kD, kH = p.kH;
  const int64_t Ho = H * kH, Wo = W * KW, So = D * kD * Ho * Wo;
  const int64_t CoutP = (Cout + COB - 1) / COB * COB;
  // weights packed as (kd, kh, ci, co, kw) with co padded to a multiple of COB (zeros), bias likewise
  std::vector<float> wp((size_t)(kD * kH * Cin * CoutP * KW), 0.f), bp((size_t)CoutP, 0.f);
  const float* w = (const float*)p.weight;
  for (int64_t ci = 0; ci < Cin; ++ci)
    for (int64_t co = 0; co < Cout; ++co)
      for (int64_t kd = 0; kd < kD; ++kd)
        for (int64_t kh = 0; kh < kH; ++kh)
          for (int64_t kw = 0; kw < KW; ++kw)
            wp[(size_t)((((kd * kH + kh) * Cin + ci) * CoutP + co) * KW + kw)] =
                w[(((ci * Cout + co) * kD + kd) * kH + kh) * KW + kw];
  if (p.bias)
    for (int64_t co = 0; co < Cout; ++co) bp[(size_t)co] = ((const float*)p.bias)[co];
  const int64_t Wmain = W / G * G, tail = W - Wmain;
  const float* x = (const float*)p.x;
  float* y = (float*)p.y;
  const int64_t rows = p.N * D * H;
  const bool stream = (double)p.N * (double)Cout * (double)So * sizeof(float) > 16e6;  // > 16 MB out
#pragma omp parallel num_threads(std::max(1, p.num_threads))
  {
    // the last columns of a row, zero-padded to G (input) and their outputs (G * KW per channel)
    std::vector<float> xt(tail ? (size_t)(Cin * G) : 0), ot(tail ? (size_t)(COB * G * KW) : 0);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t n = row / (D * H), d = (row / H) % D, h = row % H;
      const float* xrow = x + ((n * Cin * D + d) * H + h) * W;  // channel ci at + ci * D*H*W
      const int64_t xcs = D * H * W;
      if (tail) {
        for (int64_t ci = 0; ci < Cin; ++ci) {
          float* t = xt.data() + ci * G;
          std::memcpy(t, xrow + ci * xcs + Wmain, (size_t)tail * sizeof(float));
          std::memset(t + tail, 0, (size_t)(G - tail) * sizeof(float));
        }
      }
      for (int64_t kd = 0; kd < kD; ++kd)
        for (int64_t kh = 0; kh < kH; ++kh) {
          const float* wk = wp.data() + (kd * kH + kh) * Cin * CoutP * KW;
          float* obase = y + n * p.y_batch_stride + ((d * kD + kd) * Ho + (h * kH + kh)) * Wo;
          for (int64_t co0 = 0; co0 < CoutP; co0 += COB) {
            const int cvalid = (int)std::min<int64_t>(COB, Cout - co0);
            float* out[COB];
            for (int64_t g = 0; g < Wmain; g += G) {
              for (int c = 0; c < COB; ++c) out[c] = obase + (co0 + std::min(c, cvalid - 1)) * So + g * KW;
              micro<KW, COB, R>(xrow + g, xcs, Cin, wk + co0 * KW, CoutP * KW, bp.data() + co0, out, cvalid, stream);
            }
            if (tail) {
              for (int c = 0; c < COB; ++c) out[c] = ot.data() + c * G * KW;
              micro<KW, COB, R>(xt.data(), G, Cin, wk + co0 * KW, CoutP * KW, bp.data() + co0, out, cvalid, false);
              for (int c = 0; c < cvalid; ++c)
                std::memcpy(obase + (co0 + c) * So + Wmain * KW, out[c], (size_t)(tail * KW) * sizeof(float));
            }
          }
        }
    }
#if defined(__AVX512F__)
    if (stream) _mm_sfence();  // streaming stores visible before the threads join
#endif
  }
}


// ---- channels last (NDHWC) ----------------------------------------------------------------------
// A GEMM: input voxels (rows, Cin contiguous) times the weights packed as (ci, tap, co) with co
// padded per tap to CoP (a multiple of VL, zeros), J = taps * CoP columns. Each micro-kernel call
// keeps R voxels x NV column vectors as accumulators and walks the input channels once; every
// column vector is VL output channels of one tap, stored to its output voxel (VL or fewer floats).

// acc[r][v] over all Cin of R voxels (xv: voxel r's channels at xv + r * Cin) and NV vectors of
// packed weights (wb, J apart per ci; bb: the bias of those columns); out[r * NV + v]: the
// destination, valid[v]: the floats to store there (VL: a whole vector).
template <int R, int NV>
inline void micro_cl(const float* xv, int64_t Cin, const float* wb, int64_t J, const float* bb, float* const* out,
                     const int* valid, bool stream) {
  vf acc[R][NV];
  for (int v = 0; v < NV; ++v) {
    const vf b = loadu(bb + v * VL);
    for (int r = 0; r < R; ++r) acc[r][v] = b;
  }
  for (int64_t ci = 0; ci < Cin; ++ci) {
    vf xs[R];
    for (int r = 0; r < R; ++r) xs[r] = splat(xv[r * Cin + ci]);
    const float* wr = wb + ci * J;
    for (int v = 0; v < NV; ++v) {
      const vf w = loadu(wr + v * VL);
      for (int r = 0; r < R; ++r) acc[r][v] += xs[r] * w;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      float* o = out[r * NV + v];
      if (valid[v] == VL) {
        store_out(o, acc[r][v], stream);
      } else {
        float t[VL];
        storeu(t, acc[r][v]);
        std::memcpy(o, t, (size_t)valid[v] * sizeof(float));
      }
    }
}

// the column vectors [v0, v0 + NV) of R voxels starting at input column w of a row
template <int R, int NV>
inline void tile_cl(const float* xrow, int64_t w, int64_t Cin, const float* wp, int64_t J, const float* bp,
                    float* orow, int64_t kW, int64_t yvs, const int64_t* col_off, const int* col_valid, int64_t v0,
                    bool stream) {
  float* out[R * NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) out[r * NV + v] = orow + (w + r) * kW * yvs + col_off[v0 + v];
  micro_cl<R, NV>(xrow + w * Cin, Cin, wp + v0 * VL, J, bp + v0 * VL, out, col_valid + v0, stream);
}

// all voxels of a row (groups of R, then one by one) for the column vectors [v0, v0 + NV)
template <int NV>
inline void cols_cl(const float* xrow, int64_t W, int64_t Cin, const float* wp, int64_t J, const float* bp,
                    float* orow, int64_t kW, int64_t yvs, const int64_t* col_off, const int* col_valid, int64_t v0,
                    bool stream) {
  constexpr int R = 3;
  int64_t w = 0;
  for (; w + R <= W; w += R)
    tile_cl<R, NV>(xrow, w, Cin, wp, J, bp, orow, kW, yvs, col_off, col_valid, v0, stream);
  for (; w < W; ++w) tile_cl<1, NV>(xrow, w, Cin, wp, J, bp, orow, kW, yvs, col_off, col_valid, v0, stream);
}

void run_cl(const UpConvParams& p) {
  constexpr int NV = NREG >= 32 ? 8 : 4;  // 3 x NV accumulators, 3 broadcasts and a weight in registers
  const int64_t Cin = p.Cin, Cout = p.Cout, D = p.D, H = p.H, W = p.W, kD = p.kD, kH = p.kH, kW = p.kW;
  const int64_t taps = kD * kH * kW, CoP = (Cout + VL - 1) / VL * VL, J = taps * CoP, JV = J / VL;
  const int64_t Ho = H * kH, Wo = W * kW, yvs = p.y_voxel_stride;
  // weights (ci, co, kd, kh, kw) packed as (ci, tap, co padded); bias per column
  std::vector<float> wp((size_t)(Cin * J), 0.f), bp((size_t)J, 0.f);
  const float* wsrc = (const float*)p.weight;
  for (int64_t ci = 0; ci < Cin; ++ci)
    for (int64_t co = 0; co < Cout; ++co)
      for (int64_t t = 0; t < taps; ++t) wp[(size_t)(ci * J + t * CoP + co)] = wsrc[(ci * Cout + co) * taps + t];
  if (p.bias)
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t co = 0; co < Cout; ++co) bp[(size_t)(t * CoP + co)] = ((const float*)p.bias)[co];
  // column vector -> offset of its output (voxel of its tap, first channel) from the row's base
  // output voxel, and how many of its floats are real channels
  std::vector<int64_t> col_off((size_t)JV);
  std::vector<int> col_valid((size_t)JV);
  for (int64_t v = 0; v < JV; ++v) {
    const int64_t t = v * VL / CoP, co0 = v * VL % CoP;
    const int64_t kd = t / (kH * kW), kh = (t / kW) % kH, kw = t % kW;
    col_off[(size_t)v] = ((kd * Ho + kh) * Wo + kw) * yvs + co0;
    col_valid[(size_t)v] = (int)std::min<int64_t>(VL, Cout - co0);
  }
  const float* x = (const float*)p.x;
  float* y = (float*)p.y;
  const float* skip = (const float*)p.skip;
  const int64_t rows = p.N * D * H;
  const bool stream = (double)p.N * (double)(D * kD * Ho * Wo) * (double)yvs * sizeof(float) > 16e6;
#pragma omp parallel num_threads(std::max(1, p.num_threads))
  {
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t n = row / (D * H), d = (row / H) % D, h = row % H;
      const float* xrow = x + row * W * Cin;
      float* orow = y + n * p.y_batch_stride + ((d * kD) * Ho + h * kH) * Wo * yvs;
      if (skip) {  // the skip's part of this row's output rows, while their pages are at hand
        const int64_t Cs = p.skip_channels;
        for (int64_t kd = 0; kd < kD; ++kd)
          for (int64_t kh = 0; kh < kH; ++kh) {
            const int64_t vo = ((d * kD + kd) * Ho + h * kH + kh) * Wo;  // first voxel of the output row
            const float* src = skip + (n * D * kD * Ho * Wo + vo) * Cs;
            float* dst = y + n * p.y_batch_stride + vo * yvs + p.skip_y_offset;
            for (int64_t v = 0; v < Wo; ++v) std::memcpy(dst + v * yvs, src + v * Cs, (size_t)Cs * sizeof(float));
          }
      }
      int64_t v0 = 0;
      for (; v0 + NV <= JV; v0 += NV)
        cols_cl<NV>(xrow, W, Cin, wp.data(), J, bp.data(), orow, kW, yvs, col_off.data(), col_valid.data(), v0,
                    stream);
      for (; v0 < JV; ++v0)
        cols_cl<1>(xrow, W, Cin, wp.data(), J, bp.data(), orow, kW, yvs, col_off.data(), col_valid.data(), v0,
                   stream);
    }
#if defined(__AVX512F__)
    if (stream) _mm_sfence();  // streaming stores visible before the threads join
#endif
  }
}

}  // namespace

int upconv(const UpConvParams& p) {
  if (p.dtype != kF32) return kBadDtype;
  if (p.N < 0 || p.Cin < 1 || p.Cout < 1 || p.D < 0 || p.H < 0 || p.W < 0 || p.kD < 1 || p.kH < 1 || p.kW < 1)
    return kBadArgument;
  if (p.channels_last && p.y_voxel_stride < p.Cout) return kBadArgument;
  if (p.N == 0 || p.D == 0 || p.H == 0 || p.W == 0) return kOk;
  if (p.channels_last) run_cl(p);
  else if (p.kW == 1) run<1>(p);
  else if (p.kW == 2) run<2>(p);
  else return kBadArgument;
  return kOk;
}

}  // namespace FM_CAT(isa_, FM_ISA)
}  // namespace fastmed
