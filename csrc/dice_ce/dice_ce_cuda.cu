// CUDA kernels for the fused Dice + cross-entropy statistics (forward) and the logits' gradient
// (backward). Semantics follow the generic path of dice_ce_cpu.cpp exactly; see dice_ce.h for the
// definition of every output.
//
// Forward, stage 1 (dice_ce_fwd_kernel). Work item = (batch item b, chunk of T tiles of 256 voxels),
// T chosen from (B, C, S) only, never from the device, so the grid and every reduction order are
// fixed and the results bit-identical run to run. One block (256 threads) per work item (a
// grid-stride loop when there are more items than the fixed grid cap). Per tile:
//   phase A, one thread per voxel: mask, label (validity, ignore, bad count), and where softmax is
//     needed one sweep over the classes with an online log-sum-exp (max and sum of exponentials),
//     which also gives the per-voxel softmax cross-entropy terms (accumulated per thread in double);
//     the voxel's m, label, max and 1/sum go to shared memory;
//   phase B, one warp per (class, voxel group) "item": lanes sweep voxels of one class (coalesced
//     over s when x_ss == 1) and sum the four Dice terms (and the BCE term) in registers; the warp
//     then reduces them with shuffles, in a fixed order, into a per-block double accumulator owned
//     by that warp alone (shared memory, or the block's workspace slot when C is very large).
//     For small C, G > 1 warps share a class, each taking every G-th group of 32 voxels; when every
//     warp owns at most one item the registers persist across tiles and are flushed every 16 tiles.
// The block then writes its partial (4*C*G Dice sums, 4 CE sums) to the workspace; integer label
// errors go to *p.bad with one integer atomicAdd per block (integer addition is exact).
// Forward, stage 2 (dice_ce_final_kernel): sums the partials of every (b, output) over blocks and
// groups in a fixed order (8 fixed strided lanes, then lanes added in order) into stats and ce_out.
//
// Backward (dice_ce_bwd_kernel): one thread per voxel; sweeps over the classes for max / sum of
// exponentials (and, for softmax Dice without squared/soft, the Jacobian dot product, online), a
// second sweep for the dot product in the squared/soft softmax case, and a final sweep that writes
// dx for every class. Every dx element is computed independently, so it is deterministic.
//
// All element offsets are int64 (b*x_sb + c*x_sc + s*x_ss). fp16/bf16/fp32 logits are computed in
// fp32, fp64 logits in fp64; partial and final sums are double. No floating-point atomics.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "../common/common.h"
#include "dice_ce.h"

namespace fastmed {

// Message of the last CUDA error seen by these kernels on this host thread (for the bindings).
namespace {
thread_local cudaError_t g_last_cuda_error = cudaSuccess;
}

const char* dice_ce_cuda_last_error() { return cudaGetErrorString(g_last_cuda_error); }
// the other ops' launches record their errors here too (one message for the bindings)
void cuda_record_error(cudaError_t e) { g_last_cuda_error = e; }

namespace {

constexpr int kThreads = 256;            // threads per block (forward stage 1 and backward)
constexpr int kWarps = kThreads / 32;    // 8
constexpr int kTile = kThreads;          // voxels per tile: one per thread in phase A
constexpr int64_t kTargetBlocks = 4096;  // work items aimed for (enough to fill any current GPU)
constexpr int64_t kMaxTilesPerBlock = 256;
constexpr int64_t kMaxGrid = 1 << 20;    // fixed cap on the grid; larger work is grid-strided
constexpr int kPersistFlush = 16;        // persistent per-lane Dice sums are flushed every 16 tiles
constexpr int64_t kSmemAccDoubles = 2048;  // per-block Dice accumulators in shared memory up to 16 KiB

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Number of warps that share one class in phase B (1, 2, 4 or 8); a function of C only.
// Cost model per tile and warp: items per warp x (voxel groups per item + 2 for a warp reduction
// unless the sums can stay in registers across tiles).
int64_t class_groups(int64_t C) {
  int64_t best = 1, best_cost = -1;
  for (int64_t G = 1; G <= kWarps; G *= 2) {
    const int64_t items = C * G;
    const bool persist = items <= kWarps;
    const int64_t cost = ceil_div(items, kWarps) * (kWarps / G + (persist ? 0 : 2));
    if (best_cost < 0 || cost < best_cost) {
      best = G;
      best_cost = cost;
    }
  }
  return best;
}

struct Layout {
  int64_t ntiles;  // tiles of kTile voxels per batch item
  int64_t T;       // tiles per work item
  int64_t nblk;    // work items per batch item
  int64_t G;       // warps per class in phase B
  int64_t P;       // doubles per work-item partial: 4*C*G Dice sums + 4 CE sums
};

Layout make_layout(int64_t B, int64_t C, int64_t S) {
  Layout L;
  L.ntiles = S > 0 ? ceil_div(S, kTile) : 0;
  const int64_t all = B > 0 ? B * L.ntiles : 0;
  int64_t T = all > 0 ? ceil_div(all, kTargetBlocks) : 1;
  T = T < 1 ? 1 : (T > kMaxTilesPerBlock ? kMaxTilesPerBlock : T);
  L.T = T;
  L.nblk = L.ntiles > 0 ? ceil_div(L.ntiles, T) : 0;
  L.G = class_groups(C > 0 ? C : 1);
  L.P = 4 * (C > 0 ? C : 1) * L.G + 4;
  return L;
}

// ------------------------------------------------------------------------------------------------
// element access and math

template <typename T> struct Io;
template <> struct Io<float> {
  using F = float;
  static __device__ __forceinline__ float ld(const float* p) { return *p; }
  static __device__ __forceinline__ void st(float* p, float v) { *p = v; }
};
template <> struct Io<double> {
  using F = double;
  static __device__ __forceinline__ double ld(const double* p) { return *p; }
  static __device__ __forceinline__ void st(double* p, double v) { *p = v; }
};
template <> struct Io<__half> {
  using F = float;
  static __device__ __forceinline__ float ld(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void st(__half* p, float v) { *p = __float2half_rn(v); }
};
template <> struct Io<__nv_bfloat16> {
  using F = float;
  static __device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
};

__device__ __forceinline__ float d_exp(float x) { return expf(x); }
__device__ __forceinline__ double d_exp(double x) { return exp(x); }
__device__ __forceinline__ float d_log(float x) { return logf(x); }
__device__ __forceinline__ double d_log(double x) { return log(x); }
__device__ __forceinline__ float d_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double d_log1p(double x) { return log1p(x); }

template <typename F> __device__ __forceinline__ F d_abs(F v) { return v < F(0) ? -v : v; }
template <typename F> __device__ __forceinline__ F d_sign(F v) {
  return v > F(0) ? F(1) : (v < F(0) ? F(-1) : F(0));
}
template <typename F> __device__ __forceinline__ F d_sigmoid(F x) { return F(1) / (F(1) + d_exp(-x)); }
template <typename F> __device__ __forceinline__ F d_softplus(F x) {  // log(1 + e^x)
  const F ax = x < F(0) ? -x : x;
  const F mx = x > F(0) ? x : F(0);
  const F out = mx + d_log1p(d_exp(-ax));
  return x != x ? x : out;
}

// A dense-target value (any dtype of common.h), converted as the CPU kernel's cvt_in does.
template <typename F>
__device__ __forceinline__ F load_val(const void* base, int dtype, int64_t off) {
  switch (dtype) {
    case kF32: return (F)((const float*)base)[off];
    case kF64: return (F)((const double*)base)[off];
    case kF16: return (F)__half2float(((const __half*)base)[off]);
    case kBF16: return (F)__bfloat162float(((const __nv_bfloat16*)base)[off]);
    case kU8: return (F)((const uint8_t*)base)[off];
    case kI8: return (F)((const int8_t*)base)[off];
    case kI16: return (F)((const int16_t*)base)[off];
    case kI32: return (F)((const int32_t*)base)[off];
    case kI64: return (F)((const int64_t*)base)[off];
    default: return F(0);
  }
}

// A label, converted to int64 as torch's .long() (truncation; non-finite floats are invalid), then
// checked: lab = the class in [0, C), or -1 when ignored or invalid; returns 1 when the label is
// invalid and not ignore_index (counted into *p.bad), else 0. Same rules as load_labels_t (CPU).
__device__ __forceinline__ int load_label(const DiceCEParams& p, int64_t off, int& lab) {
  int64_t v = -1;
  bool finite = true;
  switch (p.t_dtype) {
    case kU8: v = (int64_t)((const uint8_t*)p.t)[off]; break;
    case kI8: v = (int64_t)((const int8_t*)p.t)[off]; break;
    case kI16: v = (int64_t)((const int16_t*)p.t)[off]; break;
    case kI32: v = (int64_t)((const int32_t*)p.t)[off]; break;
    case kI64: v = ((const int64_t*)p.t)[off]; break;
    case kF32: {
      const float r = ((const float*)p.t)[off];
      finite = r == r && r < (float)9.2e18 && r > (float)-9.2e18;
      v = finite ? (int64_t)r : -1;
      break;
    }
    case kF64: {
      const double r = ((const double*)p.t)[off];
      finite = r == r && r < 9.2e18 && r > -9.2e18;
      v = finite ? (int64_t)r : -1;
      break;
    }
    default: finite = false; break;
  }
  const bool ign = p.has_ignore != 0 && finite && v == p.ignore_index;
  const bool ok = finite && v >= 0 && v < p.C && !ign;
  lab = ok ? (int)v : -1;
  return (!ign && !ok) ? 1 : 0;
}

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Online log-sum-exp step: (mx, z) hold the running max and sum of exp(x - mx); `aux` is a second
// sum of exp(x - mx) * d rescaled alongside z. The first class initialises the state.
template <typename F>
__device__ __forceinline__ void lse_step(bool first, F xc, F d, F& mx, F& z, F& aux) {
  if (first) {
    mx = xc;
    z = F(1);
    aux = d;
  } else {
    const bool up = xc > mx;
    const F e = d_exp(up ? mx - xc : xc - mx);
    z = up ? z * e + F(1) : z + e;
    aux = up ? aux * e + d : aux + e * d;
    mx = up ? xc : mx;
  }
}

// The CPU kernel takes the exact max first, then sums exp(x - max): an infinite max (any +inf
// logit, or every logit -inf) gives exp(inf - inf) = NaN in the sum; NaN logits give NaN. The
// online form gets the finite cases identical and needs this fix-up for the infinite ones.
template <typename F>
__device__ __forceinline__ F lse_fix(F mx, F z) {
  return (mx == mx && d_abs(mx) < F(INFINITY)) ? z : F(NAN);
}

template <typename F>
__device__ __forceinline__ F weight_sum(const DiceCEParams& p) {
  F w = F(0);
  for (int64_t c = 0; c < p.C; ++c) w += p.ce_weight ? (F)p.ce_weight[c] : F(1);
  return w;
}

// ------------------------------------------------------------------------------------------------
// forward, stage 1

template <typename T>
__global__ void __launch_bounds__(kThreads)
dice_ce_fwd_kernel(const DiceCEParams p, int64_t T_tiles, int64_t nblk, int64_t G, int acc_in_smem) {
  using F = typename Io<T>::F;
  __shared__ F s_m[kTile];
  __shared__ F s_mx[kTile];
  __shared__ F s_iz[kTile];
  __shared__ int s_lab[kTile];
  __shared__ double s_red[kWarps][5];
  __shared__ long long s_bad[kWarps];
  __shared__ F s_wsum;
  extern __shared__ __align__(16) unsigned char s_dyn[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t C = p.C, S = p.S;
  const bool ce_sm = p.ce == kCeSoftmax, ce_bce = p.ce == kCeBce;
  const bool need_sm = p.act == kActSoftmax || ce_sm;
  const bool dice = p.dice != 0, sq = p.squared != 0, soft = p.soft != 0;
  const bool label_map = p.label_map != 0;
  const bool phase_b = dice || ce_bce;
  const int64_t nitems = C * G;
  const bool persist = nitems <= kWarps;  // every warp owns at most one item (item index = warp)
  const int64_t P = 4 * C * G + 4;
  const int64_t nwork = p.B * nblk;
  const T* xbase = (const T*)p.x;

  if (tid == 0) s_wsum = ce_sm ? weight_sum<F>(p) : F(0);
  __syncthreads();
  const F Wsum = s_wsum;

  for (int64_t work = blockIdx.x; work < nwork; work += gridDim.x) {
    const int64_t b = work / nblk, blk = work % nblk;
    double* part = p.workspace + work * P;
    double* acc = acc_in_smem ? reinterpret_cast<double*>(s_dyn) : part;
    for (int64_t i = tid; i < 4 * nitems; i += kThreads) acc[i] = 0.0;
    __syncthreads();

    const int64_t s_begin = blk * T_tiles * kTile;
    const int64_t s_end = (S - s_begin) < T_tiles * kTile ? S : s_begin + T_tiles * kTile;
    const T* xb = xbase + b * p.x_sb;
    double ceA = 0.0, ceSm = 0.0, ceWt = 0.0, ceCnt = 0.0, bceA = 0.0;
    long long bad = 0;
    F r0 = F(0), r1 = F(0), r2 = F(0), r3 = F(0);  // persistent Dice sums (persist mode)
    int tcount = 0;

    for (int64_t s0 = s_begin; s0 < s_end; s0 += kTile, ++tcount) {
      // ---- phase A: one thread per voxel
      {
        const int64_t s = s0 + tid;
        F m = F(0), mx = F(0), iz = F(0);
        int lab = -1;
        if (s < s_end) {
          m = p.mask ? (F)p.mask[b * p.m_sb + s * p.m_ss] : F(1);
          if (label_map) {
            bad += load_label(p, b * p.t_sb + s * p.t_ss, lab);
            m *= lab >= 0 ? F(1) : F(0);
          }
          if (need_sm) {
            const T* xv = xb + s * p.x_ss;
            F z = F(1), unused = F(0);
            F wx = F(0), xt = F(0), wy = F(0), wyx = F(0);
            for (int64_t c = 0; c < C; ++c) {
              const F xc = Io<T>::ld(xv + c * p.x_sc);
              lse_step<F>(c == 0, xc, F(0), mx, z, unused);
              if (ce_sm) {
                const F wc = p.ce_weight ? (F)p.ce_weight[c] : F(1);
                wx += wc * xc;
                if (label_map) {
                  xt = (c == (int64_t)lab) ? xc : xt;
                } else {
                  const F yc = load_val<F>(p.t, p.t_dtype, b * p.t_sb + c * p.t_sc + s * p.t_ss);
                  wy += wc * yc;
                  wyx += wc * yc * xc;
                }
              }
            }
            z = lse_fix(mx, z);
            iz = F(1) / z;
            if (ce_sm) {
              const F lse = mx + d_log(z);
              if (label_map) {
                if (lab >= 0) {  // ignored or invalid voxels are skipped (m is 0 there too)
                  const F wt_k = m * (p.ce_weight ? (F)p.ce_weight[lab] : F(1));
                  ceA += (double)(wt_k * (lse - xt));
                  ceSm += (double)(m * (Wsum * lse - wx));
                  ceWt += (double)wt_k;
                  ceCnt += (double)m;
                }
              } else {
                ceA += (double)(m * (lse * wy - wyx));
                ceSm += (double)(m * (Wsum * lse - wx));
                ceWt += (double)(m * wy);
                ceCnt += (double)m;
              }
            }
          }
          if (ce_bce) ceCnt += (double)m;  // times C at the end
        }
        s_m[tid] = m;
        s_lab[tid] = lab;
        s_mx[tid] = mx;
        s_iz[tid] = iz;
      }
      __syncthreads();

      // ---- phase B: warps over (class, voxel group) items, lanes over voxels
      if (phase_b) {
        for (int64_t it = warp; it < nitems; it += kWarps) {
          const int64_t c = it % C;
          const int g = (int)(it / C);
          const F wc = (ce_bce && p.ce_weight) ? (F)p.ce_weight[c] : F(1);
          const T* xc = xb + c * p.x_sc;
          F sI = F(0), sP = F(0), sG = F(0), sD = F(0), lb = F(0);
#pragma unroll 4
          for (int j = g; j < kWarps; j += (int)G) {
            const int v = j * 32 + lane;
            const int64_t s = s0 + v;
            if (s >= s_end) continue;
            const F xv = Io<T>::ld(xc + s * p.x_ss);
            const F m = s_m[v];
            const bool hit = label_map && (int64_t)s_lab[v] == c;
            const F y = label_map ? (hit ? F(1) : F(0))
                                  : load_val<F>(p.t, p.t_dtype, b * p.t_sb + c * p.t_sc + s * p.t_ss);
            if (dice) {
              F q;
              if (p.act == kActSoftmax) q = d_exp(xv - s_mx[v]) * s_iz[v];
              else if (p.act == kActSigmoid) q = d_sigmoid(xv);
              else q = xv;
              const F qm = q * m;
              const F ym = label_map ? (hit ? m : F(0)) : y * m;
              sI += qm * ym;
              sP += sq ? qm * qm : (soft ? d_abs(qm) : qm);
              sG += sq ? ym * ym : ((soft && !label_map) ? d_abs(ym) : ym);
              sD += soft ? d_abs(qm - ym) : F(0);
            }
            if (ce_bce) lb += m * (wc * y * d_softplus(-xv) + (F(1) - y) * d_softplus(xv));
          }
          bceA += (double)lb;
          if (dice) {
            if (persist) {
              r0 += sI; r1 += sP; r2 += sG; r3 += sD;
            } else {
              sI = warp_sum(sI); sP = warp_sum(sP); sG = warp_sum(sG); sD = warp_sum(sD);
              if (lane == 0) {
                double* a = acc + it * 4;
                a[0] += (double)sI; a[1] += (double)sP; a[2] += (double)sG; a[3] += (double)sD;
              }
            }
          }
        }
        if (dice && persist && (tcount + 1) % kPersistFlush == 0 && warp < nitems) {
          r0 = warp_sum(r0); r1 = warp_sum(r1); r2 = warp_sum(r2); r3 = warp_sum(r3);
          if (lane == 0) {
            double* a = acc + warp * 4;
            a[0] += (double)r0; a[1] += (double)r1; a[2] += (double)r2; a[3] += (double)r3;
          }
          r0 = r1 = r2 = r3 = F(0);
        }
      }
      __syncthreads();  // phase A of the next tile overwrites the shared voxel data
    }

    if (phase_b && dice && persist && warp < nitems) {  // flush what is left since the last flush
      r0 = warp_sum(r0); r1 = warp_sum(r1); r2 = warp_sum(r2); r3 = warp_sum(r3);
      if (lane == 0) {
        double* a = acc + warp * 4;
        a[0] += (double)r0; a[1] += (double)r1; a[2] += (double)r2; a[3] += (double)r3;
      }
    }

    // per-thread CE sums and label errors: warps, then warps in order
    ceA = warp_sum(ceA); ceSm = warp_sum(ceSm); ceWt = warp_sum(ceWt); ceCnt = warp_sum(ceCnt);
    bceA = warp_sum(bceA);
    bad = warp_sum(bad);
    if (lane == 0) {
      s_red[warp][0] = ceA; s_red[warp][1] = ceSm; s_red[warp][2] = ceWt; s_red[warp][3] = ceCnt;
      s_red[warp][4] = bceA;
      s_bad[warp] = bad;
    }
    __syncthreads();
    if (tid == 0) {
      double v[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
      long long nb = 0;
      for (int w = 0; w < kWarps; ++w) {
        for (int k = 0; k < 5; ++k) v[k] += s_red[w][k];
        nb += s_bad[w];
      }
      double* ce = part + 4 * C * G;
      if (ce_sm) {
        ce[0] = v[0]; ce[1] = v[1]; ce[2] = v[2]; ce[3] = v[3];
      } else if (ce_bce) {
        ce[0] = v[4]; ce[1] = 0.0; ce[2] = 0.0; ce[3] = (double)C * v[3];
      } else {
        ce[0] = 0.0; ce[1] = 0.0; ce[2] = 0.0; ce[3] = 0.0;
      }
      if (nb > 0) atomicAdd(reinterpret_cast<unsigned long long*>(p.bad), (unsigned long long)nb);
    }
    if (acc_in_smem) {
      for (int64_t i = tid; i < 4 * nitems; i += kThreads) part[i] = acc[i];
    }
    __syncthreads();  // the next work item reuses acc and s_red
  }
}

// ------------------------------------------------------------------------------------------------
// forward, stage 2: stats[b][o] = sum over blocks, then groups, of the partials (fixed order)

__global__ void __launch_bounds__(256)
dice_ce_final_kernel(const double* ws, double* stats, double* ce_out, int64_t B, int64_t C, int64_t nblk,
                     int64_t G) {
  __shared__ double red[8][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t n_stat = 4 * C;
  const int64_t nout = n_stat + 4;
  const int64_t nx = (nout + 31) / 32;
  const int64_t P = 4 * C * G + 4;
  const int64_t total = B * nx;
  for (int64_t w = blockIdx.x; w < total; w += gridDim.x) {
    const int64_t b = w / nx;
    const int64_t o = (w % nx) * 32 + tx;
    double s = 0.0;
    if (o < nout) {
      const bool is_stat = o < n_stat;
      const int64_t off = is_stat ? o : n_stat * G + (o - n_stat);
      const int64_t ng = is_stat ? G : 1;
      for (int64_t blk = ty; blk < nblk; blk += 8) {
        const double* part = ws + (b * nblk + blk) * P + off;
        for (int64_t g = 0; g < ng; ++g) s += part[g * n_stat];
      }
    }
    red[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && o < nout) {
      double t = red[0][tx];
      for (int k = 1; k < 8; ++k) t += red[k][tx];
      if (o < n_stat) stats[b * n_stat + o] = t;
      else ce_out[b * 4 + (o - n_stat)] = t;
    }
    __syncthreads();
  }
}

// ------------------------------------------------------------------------------------------------
// backward: one thread per voxel

template <typename T>
__global__ void __launch_bounds__(kThreads) dice_ce_bwd_kernel(const DiceCEParams p, int64_t ntiles) {
  using F = typename Io<T>::F;
  __shared__ F s_wsum;
  const int tid = threadIdx.x;
  const int64_t C = p.C, S = p.S;
  const bool ce_sm = p.ce == kCeSoftmax, ce_bce = p.ce == kCeBce;
  const bool need_sm = p.act == kActSoftmax || ce_sm;
  const bool dice = p.dice != 0, sq = p.squared != 0, soft = p.soft != 0;
  const bool label_map = p.label_map != 0;
  const bool sm_dice = dice && p.act == kActSoftmax;
  // softmax Dice whose per-class gradient does not depend on q: the Jacobian's dot product
  // sum_c q_c g_c can be summed online in the log-sum-exp sweep
  const bool lin = sm_dice && !sq && !soft;
  const float* w = p.ce_weight;

  if (tid == 0) s_wsum = ce_sm ? weight_sum<F>(p) : F(0);
  __syncthreads();
  const F Wsum = s_wsum;

  const int64_t nwork = p.B * ntiles;
  for (int64_t work = blockIdx.x; work < nwork; work += gridDim.x) {
    const int64_t b = work / ntiles;
    const int64_t s = (work % ntiles) * kTile + tid;
    if (s >= S) continue;
    const T* xv = (const T*)p.x + b * p.x_sb + s * p.x_ss;
    T* dv = (T*)p.dx + b * p.dx_sb + s * p.dx_ss;
    const double* gs = p.grad_stats + b * C * 4;
    const F gA = p.ce != kCeNone ? (F)p.grad_ce[b * 4 + 0] : F(0);
    const F gSm = p.ce != kCeNone ? (F)p.grad_ce[b * 4 + 1] : F(0);
    const int64_t toff = b * p.t_sb + s * p.t_ss;

    F m = p.mask ? (F)p.mask[b * p.m_sb + s * p.m_ss] : F(1);
    int lab = -1;
    if (label_map) {
      (void)load_label(p, toff, lab);
      m *= lab >= 0 ? F(1) : F(0);
    }

    // sweep 1: max and sum of exponentials; the online dot product (lin); sum_c w_c y_c (dense CE)
    F mx = F(0), z = F(1), ed = F(0), wy = F(0);
    if (need_sm) {
      for (int64_t c = 0; c < C; ++c) {
        const F xc = Io<T>::ld(xv + c * p.x_sc);
        F yc = F(0);
        if (!label_map && (lin || ce_sm)) yc = load_val<F>(p.t, p.t_dtype, toff + c * p.t_sc);
        F d = F(0);
        if (lin) {
          const F gI = (F)gs[4 * c + 0], gP = (F)gs[4 * c + 1];
          const F ym = label_map ? ((int64_t)lab == c ? m : F(0)) : yc * m;
          d = (gI * ym + gP) * m;
        }
        lse_step<F>(c == 0, xc, d, mx, z, ed);
        if (ce_sm && !label_map) wy += (w ? (F)w[c] : F(1)) * yc;
      }
      z = lse_fix(mx, z);
    }
    const F iz = F(1) / z;

    // sweep 2 (softmax Dice, squared or soft): dot = sum_c q_c g_c
    F dot = F(0);
    if (lin) {
      dot = ed * iz;
    } else if (sm_dice) {
      for (int64_t c = 0; c < C; ++c) {
        const F xc = Io<T>::ld(xv + c * p.x_sc);
        const F q = d_exp(xc - mx) * iz;
        const F gI = (F)gs[4 * c + 0], gP = (F)gs[4 * c + 1], gD = (F)gs[4 * c + 3];
        const F qm = q * m;
        const F ym = label_map ? ((int64_t)lab == c ? m : F(0))
                               : load_val<F>(p.t, p.t_dtype, toff + c * p.t_sc) * m;
        F dp = gI * ym + gP * (sq ? F(2) * qm : (soft ? d_sign(qm) : F(1)));
        dp += soft ? gD * d_sign(qm - ym) : F(0);
        dot += q * (dp * m);
      }
    }

    // sweep 3: dx for every class
    const F coef = (ce_sm && label_map && lab >= 0) ? m * gA * (w ? (F)w[lab] : F(1)) : F(0);
    const F val = m * gSm;
    for (int64_t c = 0; c < C; ++c) {
      const F xc = Io<T>::ld(xv + c * p.x_sc);
      const bool hit = label_map && (int64_t)lab == c;
      const F y = label_map ? (hit ? F(1) : F(0)) : load_val<F>(p.t, p.t_dtype, toff + c * p.t_sc);
      const F psm = need_sm ? d_exp(xc - mx) * iz : F(0);
      F g = F(0);
      if (dice) {
        F q;
        if (p.act == kActSoftmax) q = psm;
        else if (p.act == kActSigmoid) q = d_sigmoid(xc);
        else q = xc;
        const F gI = (F)gs[4 * c + 0], gP = (F)gs[4 * c + 1], gD = (F)gs[4 * c + 3];
        const F qm = q * m;
        const F ym = label_map ? (hit ? m : F(0)) : y * m;
        F dp = gI * ym + gP * (sq ? F(2) * qm : (soft ? d_sign(qm) : F(1)));
        dp += soft ? gD * d_sign(qm - ym) : F(0);
        g = dp * m;
        if (p.act == kActSoftmax) g = q * (g - dot);
        else if (p.act == kActSigmoid) g = g * q * (F(1) - q);
      }
      if (ce_sm) {
        const F wc = w ? (F)w[c] : F(1);
        if (label_map) {
          const F onehot = hit ? F(1) : F(0);
          g += coef * (psm - onehot) + val * (Wsum * psm - wc);
        } else {
          g += m * (gA * (psm * wy - wc * y) + gSm * (Wsum * psm - wc));
        }
      } else if (ce_bce) {
        const F wc = w ? (F)w[c] : F(1);
        const F sg = d_sigmoid(xc);
        g += m * gA * (wc * y * (sg - F(1)) + (F(1) - y) * sg);
      }
      Io<T>::st(dv + c * p.dx_sc, g);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// host side

// Runs the kernels on the device that owns `ptr` (PyTorch's current device may be another one),
// and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(const void* ptr) {
    if (!ptr) return;
    cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, ptr) != cudaSuccess) {
      (void)cudaGetLastError();
      return;
    }
    if (a.type != cudaMemoryTypeDevice && a.type != cudaMemoryTypeManaged) return;
    int cur = -1;
    if (cudaGetDevice(&cur) != cudaSuccess) {
      (void)cudaGetLastError();
      return;
    }
    if (cur != a.device) {
      if (cudaSetDevice(a.device) == cudaSuccess) prev_ = cur;
      else (void)cudaGetLastError();
    }
  }
  ~DeviceGuard() {
    if (prev_ >= 0) (void)cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
};

int launch_status() {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    g_last_cuda_error = e;
    return kCudaError;
  }
  return kOk;
}

bool valid_dtype(int d) { return d >= kF32 && d <= kI64; }

int check_params(const DiceCEParams& p) {
  if (p.B < 0 || p.S < 0 || p.C < 1 || p.C > (int64_t)INT32_MAX) return kBadArgument;
  if (p.act < kActNone || p.act > kActSoftmax || p.ce < kCeNone || p.ce > kCeBce) return kBadArgument;
  if (!(p.x_dtype == kF32 || p.x_dtype == kF16 || p.x_dtype == kBF16 || p.x_dtype == kF64)) return kBadDtype;
  if (!valid_dtype(p.t_dtype)) return kBadDtype;
  return kOk;
}

template <typename T>
int fwd_launch(const DiceCEParams& p) {
  const Layout L = make_layout(p.B, p.C, p.S);
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  if (L.nblk > 0) {
    const int64_t nwork = p.B * L.nblk;
    const int grid = (int)(nwork < kMaxGrid ? nwork : kMaxGrid);
    const int64_t acc_doubles = 4 * p.C * L.G;
    const int acc_in_smem = acc_doubles <= kSmemAccDoubles ? 1 : 0;
    const size_t dyn = acc_in_smem ? (size_t)acc_doubles * sizeof(double) : 0;
    dice_ce_fwd_kernel<T><<<grid, kThreads, dyn, stream>>>(p, L.T, L.nblk, L.G, acc_in_smem);
    const int st = launch_status();
    if (st != kOk) return st;
  }
  const int64_t nx = (4 * p.C + 4 + 31) / 32;
  const int64_t total = p.B * nx;
  const int grid = (int)(total < kMaxGrid ? total : kMaxGrid);
  dice_ce_final_kernel<<<grid, dim3(32, 8), 0, stream>>>(p.workspace, p.stats, p.ce_out, p.B, p.C, L.nblk, L.G);
  return launch_status();
}

template <typename T>
int bwd_launch(const DiceCEParams& p) {
  const int64_t ntiles = ceil_div(p.S, kTile);
  const int64_t nwork = p.B * ntiles;
  const int grid = (int)(nwork < kMaxGrid ? nwork : kMaxGrid);
  dice_ce_bwd_kernel<T><<<grid, kThreads, 0, static_cast<cudaStream_t>(p.stream)>>>(p, ntiles);
  return launch_status();
}

}  // namespace

int64_t dice_ce_cuda_workspace_size(int64_t B, int64_t C, int64_t S) {
  if (B <= 0 || S <= 0 || C <= 0) return 0;
  const Layout L = make_layout(B, C, S);
  return B * L.nblk * L.P;
}

int dice_ce_fwd_cuda(const DiceCEParams& p) {
  const int st = check_params(p);
  if (st != kOk) return st;
  if (p.B == 0) return kOk;
  DeviceGuard guard(p.stats);
  switch (p.x_dtype) {
    case kF32: return fwd_launch<float>(p);
    case kF64: return fwd_launch<double>(p);
    case kF16: return fwd_launch<__half>(p);
    case kBF16: return fwd_launch<__nv_bfloat16>(p);
    default: return kBadDtype;
  }
}

int dice_ce_bwd_cuda(const DiceCEParams& p) {
  const int st = check_params(p);
  if (st != kOk) return st;
  if (p.B == 0 || p.S == 0) return kOk;
  DeviceGuard guard(p.dx);
  switch (p.x_dtype) {
    case kF32: return bwd_launch<float>(p);
    case kF64: return bwd_launch<double>(p);
    case kF16: return bwd_launch<__half>(p);
    case kBF16: return bwd_launch<__nv_bfloat16>(p);
    default: return kBadDtype;
  }
}

}  // namespace fastmed
