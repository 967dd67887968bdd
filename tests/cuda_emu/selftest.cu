// Kernels that check fmemu itself (tests/test_cuda_emulated.py::test_fmemu_*): what it must report as
// an error, and the values its shuffles, barriers, shared memory and indices must give. Built by
// build.py into the module _fmemu_selftest, with the same rewriting as fastmed's kernels.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace py = pybind11;

namespace {

std::tuple<int, std::string> last_error() {
  const cudaError_t e = cudaGetLastError();
  return {(int)e, e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e))};
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 10) return;  // these threads never reach the barrier
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void shuffle_kernel(int* out, int mask, int width, int early_exit) {
  const int lane = threadIdx.x & 31;
  if (lane < early_exit) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, mask, width);
}

__global__ void block_sum_kernel(const double* in, double* out, int n) {
  __shared__ double part[256];
  const int t = threadIdx.y * blockDim.x + threadIdx.x;  // 2D block
  double s = 0.0;
  for (int i = blockIdx.x * 256 + t; i < n; i += gridDim.x * 256) s += in[i];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if ((t & 31) == 0) part[t >> 5] = s;
  __syncthreads();
  if (t == 0) {
    double b = 0.0;
    for (int w = 0; w < 8; ++w) b += part[w];
    out[blockIdx.x] = b;
  }
}

__global__ void unwritten_shared_kernel(double* out) {
  __shared__ double sh[64];
  // block 0 writes every element, block 1 all but sh[5]: block 1 must not see block 0's value
  if (blockIdx.x == 0 || threadIdx.x != 5) sh[threadIdx.x] = threadIdx.x;
  __syncthreads();
  if (blockIdx.x == 1) out[threadIdx.x] = sh[threadIdx.x];
}

__global__ void dynamic_shared_kernel(float* out) {
  extern __shared__ __align__(16) unsigned char buf[];
  float* f = reinterpret_cast<float*>(buf);
  f[threadIdx.x] = (float)(blockIdx.x * 100 + threadIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = f[blockDim.x - 1 - threadIdx.x];
}

__global__ void big_static_shared_kernel(float* out, int n) {
  __shared__ float big[10000];  // 40000 bytes: over 48 KiB with 9 KiB of dynamic shared memory
  extern __shared__ __align__(16) unsigned char dyn[];
  big[threadIdx.x] = (float)n;
  dyn[threadIdx.x] = 1;
  __syncthreads();
  out[threadIdx.x] = big[threadIdx.x] + dyn[threadIdx.x];
}

// For the FMEMU_TSAN build: what ThreadSanitizer must report (modes 0, 2, 4, 5) and must not (1, 3, 6).
__global__ void race_kernel(unsigned long long* counter, float* out, int mode) {
  __shared__ float sh[64];
  const int t = threadIdx.x;
  switch (mode) {
    case 0: *counter += 1; break;              // a missing atomic: every thread of both blocks
    case 1: atomicAdd(counter, 1ull); break;   // the same with the atomic
    case 2:
    case 3:
      sh[t] = (float)t;
      if (mode == 3) __syncthreads();          // mode 2: a neighbour's element read without the barrier
      out[blockIdx.x * blockDim.x + t] = sh[(t + 1) % blockDim.x];
      break;
    case 4: out[t] = (float)blockIdx.x; break; // two blocks write one element
    case 5:                                    // a value passed by a shuffle orders no memory
      if (t == 0) sh[0] = 1.0f;
      __shfl_xor_sync(0xffffffffu, t, 1);
      out[blockIdx.x * blockDim.x + t] = sh[0];
      break;
    case 6:                                    // reuse of shared memory across barriers, as reductions do
      for (int r = 0; r < 3; ++r) {
        sh[t] = (float)(t + r);
        __syncthreads();
        out[blockIdx.x * blockDim.x + t] += sh[(t + 1) % blockDim.x];
        __syncthreads();
      }
      break;
  }
}

__global__ void index_kernel(int64_t* out) {
  const int64_t b = ((int64_t)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const int64_t t = ((int64_t)threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  const int64_t nt = (int64_t)blockDim.x * blockDim.y * blockDim.z;
  out[b * nt + t] += 1 + b * 1000 + t;
}

}  // namespace

PYBIND11_MODULE(_fmemu_selftest, m) {
  m.def("divergent_barrier", []() {
    std::vector<int> out(64, 0);
    divergent_barrier_kernel<<<1, 64>>>(out.data());
    return last_error();
  });
  m.def("shuffle", [](int nthreads, int mask, int width, int early_exit) {
    std::vector<int> out(nthreads, -1);
    shuffle_kernel<<<1, nthreads>>>(out.data(), mask, width, early_exit);
    return std::make_tuple(out, last_error());
  });
  m.def("block_sum", [](std::vector<double> in, int grid) {
    std::vector<double> out(grid, 0.0);
    block_sum_kernel<<<grid, dim3(32, 8)>>>(in.data(), out.data(), (int)in.size());
    return std::make_tuple(out, last_error());
  });
  m.def("unwritten_shared", []() {
    std::vector<double> out(64, 0.0);
    unwritten_shared_kernel<<<2, 64>>>(out.data());
    return out;
  });
  m.def("dynamic_shared", [](int grid, int block, int bytes) {
    std::vector<float> out((size_t)grid * block, -1.0f);
    dynamic_shared_kernel<<<grid, block, bytes>>>(out.data());
    return std::make_tuple(out, last_error());
  });
  m.def("big_static_shared", [](int dynamic_bytes) {
    std::vector<float> out(32, 0.0f);
    big_static_shared_kernel<<<1, 32, dynamic_bytes>>>(out.data(), 2);
    return std::make_tuple(out, last_error());
  });
  m.def("race", [](int mode) {
    unsigned long long counter = 0;
    std::vector<float> out(128, 0.0f);
    race_kernel<<<2, 64>>>(&counter, out.data(), mode);
    return std::make_tuple(counter, out, last_error());
  });
  m.def("indices", [](std::vector<unsigned> g, std::vector<unsigned> b) {
    std::vector<int64_t> out((size_t)g[0] * g[1] * g[2] * b[0] * b[1] * b[2], 0);
    index_kernel<<<dim3(g[0], g[1], g[2]), dim3(b[0], b[1], b[2])>>>(out.data());
    return std::make_tuple(out, last_error());
  });
}
