// Sliding-window stitching on CUDA: one launch per window (windows may overlap, so they are added
// in order on the stream), one thread per (channel, voxel) of the window; normalisation is one
// elementwise pass. Products and sums are rounded separately (__fmul_rn / __fadd_rn) to match
// PyTorch's eager `buffer *= w; out[idx] += buffer` exactly.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/common.h"
#include "sliding_window.h"

namespace fastmed {
void cuda_record_error(cudaError_t e);

namespace {

template <typename T> struct Val { using type = float; };
template <> struct Val<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Val<T>::type ld(const T* p) { return *p; }
template <> __device__ __forceinline__ float ld<__half>(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <typename T> __device__ __forceinline__ void st(T* p, typename Val<T>::type v) { *p = (T)v; }
template <> __device__ __forceinline__ void st<__half>(__half* p, float v) { *p = __float2half_rn(v); }
template <> __device__ __forceinline__ void st<__nv_bfloat16>(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
template <typename T> __device__ __forceinline__ typename Val<T>::type rnd(typename Val<T>::type v) { return v; }
template <> __device__ __forceinline__ float rnd<__half>(float v) { return __half2float(__float2half_rn(v)); }
template <> __device__ __forceinline__ float rnd<__nv_bfloat16>(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

template <typename A, typename P>
__global__ void accumulate_window(SWAccParams p, int64_t n) {
  using V = typename Val<A>::type;
  const int64_t vox = p.win[0] * p.win[1] * p.win[2];
  const int64_t C = p.pred ? p.C : 1;
  const int64_t total = C * vox;
  const int64_t* s = p.starts + 4 * n;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    int64_t t = e;
    const int64_t k = t % p.win[2]; t /= p.win[2];
    const int64_t j = t % p.win[1]; t /= p.win[1];
    const int64_t i = t % p.win[0];
    const int64_t c = t / p.win[0];
    float wf = 1.0f;
    if (p.wmode == 1) {
      wf = __fmul_rn(__fmul_rn(p.g0[i], p.g1[j]), p.g2[k]);
      wf = wf < p.wmin ? p.wmin : wf;
    } else if (p.wmode == 2) {
      wf = p.wmap[(i * p.win[1] + j) * p.win[2] + k];
    }
    const V w = rnd<A>((V)wf);
    A* o = (A*)p.acc + s[0] * p.a_sb + c * p.a_sc + (s[1] + i) * p.a_s[0] + (s[2] + j) * p.a_s[1] + (s[3] + k) * p.a_s[2];
    V add = w;
    if (p.pred) {
      const P* q = (const P*)p.pred + n * p.p_sn + c * p.p_sc + i * p.p_s[0] + j * p.p_s[1] + k * p.p_s[2];
      add = rnd<A>(mul_rn((V)ld<P>(q), w));
    }
    const int64_t* fr = p.fresh ? p.fresh + 6 * n : nullptr;
    const bool first = fr && i >= fr[0] && i < fr[1] && j >= fr[2] && j < fr[3] && k >= fr[4] && k < fr[5];
    st<A>(o, first ? add : rnd<A>(add_rn(ld<A>(o), add)));
  }
}

template <typename A, typename D>
__global__ void normalize_kernel(SWNormParams p) {
  using V = typename Val<A>::type;
  const int64_t total = p.B * p.C * p.size[0] * p.size[1] * p.size[2];
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    int64_t t = e;
    const int64_t k = t % p.size[2]; t /= p.size[2];
    const int64_t j = t % p.size[1]; t /= p.size[1];
    const int64_t i = t % p.size[0]; t /= p.size[0];
    const int64_t c = t % p.C, b = t / p.C;
    const A* a = (const A*)p.acc + b * p.a_sb + c * p.a_sc + i * p.a_s[0] + j * p.a_s[1] + k * p.a_s[2];
    const A* n = (const A*)p.count + i * p.n_s[0] + j * p.n_s[1] + k * p.n_s[2];
    D* d = (D*)p.dst + b * p.d_sb + c * p.d_sc + i * p.d_s[0] + j * p.d_s[1] + k * p.d_s[2];
    const V v = rnd<A>(ld<A>(a) / ld<A>(n));
    st<D>(d, (typename Val<D>::type)v);
  }
}

// softmax over channels of acc / count, one thread per (b, voxel); dst may be acc (each thread
// reads its voxel's channels before writing them). exp(x - max) / sum, three passes over C.
template <typename A, typename D>
__global__ void normalize_softmax_kernel(SWNormParams p) {
  using V = typename Val<A>::type;
  const int64_t total = p.B * p.size[0] * p.size[1] * p.size[2];
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    int64_t t = e;
    const int64_t k = t % p.size[2]; t /= p.size[2];
    const int64_t j = t % p.size[1]; t /= p.size[1];
    const int64_t i = t % p.size[0];
    const int64_t b = t / p.size[0];
    const A* a = (const A*)p.acc + b * p.a_sb + i * p.a_s[0] + j * p.a_s[1] + k * p.a_s[2];
    const V cnt = ld<A>((const A*)p.count + i * p.n_s[0] + j * p.n_s[1] + k * p.n_s[2]);
    V mx = rnd<A>(ld<A>(a) / cnt);
    for (int64_t c = 1; c < p.C; ++c) mx = fmax(mx, rnd<A>(ld<A>(a + c * p.a_sc) / cnt));
    V sum = 0;
    for (int64_t c = 0; c < p.C; ++c) sum += exp(rnd<A>(ld<A>(a + c * p.a_sc) / cnt) - mx);
    D* d = (D*)p.dst + b * p.d_sb + i * p.d_s[0] + j * p.d_s[1] + k * p.d_s[2];
    for (int64_t c = 0; c < p.C; ++c) {
      const V v = exp(rnd<A>(ld<A>(a + c * p.a_sc) / cnt) - mx) / sum;
      st<D>(d + c * p.d_sc, (typename Val<D>::type)v);
    }
  }
}

template <typename E>
__global__ void gather_kernel(SWGatherParams p) {
  const int64_t total = p.N * p.C * p.win[0] * p.win[1] * p.win[2];
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    int64_t t = e;
    const int64_t k = t % p.win[2]; t /= p.win[2];
    const int64_t j = t % p.win[1]; t /= p.win[1];
    const int64_t i = t % p.win[0]; t /= p.win[0];
    const int64_t c = t % p.C, n = t / p.C;
    const int64_t* s = p.starts + 4 * n;
    const E* src = (const E*)p.src + s[0] * p.s_sb + c * p.s_sc + (s[1] + i) * p.s_s[0] + (s[2] + j) * p.s_s[1] +
                   (s[3] + k) * p.s_s[2];
    ((E*)p.dst)[e] = *src;
  }
}

int grid_for(int64_t total) {
  const int64_t blocks = (total + 255) / 256;
  return (int)(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

int status() {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    cuda_record_error(e);
    return kCudaError;
  }
  return kOk;
}

template <typename A, typename P>
int accumulate_all(const SWAccParams& p) {
  const int64_t total = (p.pred ? p.C : 1) * p.win[0] * p.win[1] * p.win[2];
  if (total == 0) return kOk;
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  for (int64_t n = 0; n < p.N; ++n) {
    accumulate_window<A, P><<<grid_for(total), 256, 0, stream>>>(p, n);
    const int st = status();
    if (st != kOk) return st;
  }
  return kOk;
}

template <typename A>
int accumulate_pred(const SWAccParams& p) {
  if (!p.pred) return accumulate_all<A, A>(p);
  switch (p.pred_dtype) {
    case kF32: return accumulate_all<A, float>(p);
    case kF64: return accumulate_all<A, double>(p);
    case kF16: return accumulate_all<A, __half>(p);
    case kBF16: return accumulate_all<A, __nv_bfloat16>(p);
    default: return kBadDtype;
  }
}

template <typename A, typename D>
int normalize_all(const SWNormParams& p) {
  const int64_t total = p.B * p.C * p.size[0] * p.size[1] * p.size[2];
  if (total == 0) return kOk;
  if (p.softmax) {
    normalize_softmax_kernel<A, D><<<grid_for(total / p.C), 256, 0, static_cast<cudaStream_t>(p.stream)>>>(p);
    return status();
  }
  normalize_kernel<A, D><<<grid_for(total), 256, 0, static_cast<cudaStream_t>(p.stream)>>>(p);
  return status();
}

template <typename A>
int normalize_dst(const SWNormParams& p) {
  switch (p.dst_dtype) {
    case kF32: return normalize_all<A, float>(p);
    case kF64: return normalize_all<A, double>(p);
    case kF16: return normalize_all<A, __half>(p);
    case kBF16: return normalize_all<A, __nv_bfloat16>(p);
    default: return kBadDtype;
  }
}

}  // namespace

int sw_gather_cuda(const SWGatherParams& p) {
  if (p.N < 0 || p.C < 1) return kBadArgument;
  const int64_t total = p.N * p.C * p.win[0] * p.win[1] * p.win[2];
  if (total == 0) return kOk;
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  switch (p.esize) {
    case 1: gather_kernel<uint8_t><<<grid_for(total), 256, 0, stream>>>(p); break;
    case 2: gather_kernel<uint16_t><<<grid_for(total), 256, 0, stream>>>(p); break;
    case 4: gather_kernel<uint32_t><<<grid_for(total), 256, 0, stream>>>(p); break;
    case 8: gather_kernel<uint64_t><<<grid_for(total), 256, 0, stream>>>(p); break;
    default: return kBadArgument;
  }
  return status();
}

int sw_accumulate_cuda(const SWAccParams& p) {
  if (p.N < 0 || p.C < 1 || p.win[0] < 0 || p.win[1] < 0 || p.win[2] < 0) return kBadArgument;
  switch (p.acc_dtype) {
    case kF32: return accumulate_pred<float>(p);
    case kF64: return accumulate_pred<double>(p);
    case kF16: return accumulate_pred<__half>(p);
    case kBF16: return accumulate_pred<__nv_bfloat16>(p);
    default: return kBadDtype;
  }
}

int sw_normalize_cuda(const SWNormParams& p) {
  switch (p.acc_dtype) {
    case kF32: return normalize_dst<float>(p);
    case kF64: return normalize_dst<double>(p);
    case kF16: return normalize_dst<__half>(p);
    case kBF16: return normalize_dst<__nv_bfloat16>(p);
    default: return kBadDtype;
  }
}

}  // namespace fastmed
