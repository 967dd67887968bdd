// Instance normalisation fused with its activation (nnU-Net's InstanceNorm + LeakyReLU), forward and
// backward, on N*C planes of S contiguous elements (NC + flattened spatial dims).
//   forward:  mean, rstd = 1 / sqrt(var + eps) per plane (biased variance, in double)
//             y = act((x - mean) * rstd * w[c] + b[c])          act: 0 none, 1 ReLU, 2 LeakyReLU(slope),
//             3 PReLU (slope prelu[c], or prelu[0] for all channels when prelu_n == 1)
//   backward: dz = dy * (z > 0 ? 1 : act slope) (z recomputed, never stored)
//             dw_part[n, c] = sum dz * xhat, db_part[n, c] = sum dz (summed over n in Python, in order)
//             PReLU: dprelu_part[n, c] = sum over z <= 0 of dy * z (torch's d prelu / d weight)
//             dx = rstd * (w dz - mean(w dz) - xhat * mean(w dz * xhat))
// Channels-last tensors (N, S, C) are reduced over fixed blocks of spatial positions whose partial
// sums are added in block order (deterministic for any thread count).
// x, y, dy, dx share the element type (float32 or float64); w, b (optional) are float32/float64 of
// the same type. Statistics and plane sums are accumulated in double.
#pragma once
#include <cstdint>

namespace fastmed {

struct NormActParams {
  int64_t N, C, S;
  int dtype;
  const void* x; void* y;
  const void* weight; const void* bias;
  double eps, slope; int act;
  const void* prelu; int64_t prelu_n;  // act 3: the PReLU weights (x's dtype), 1 or C of them
  double* dprelu;                      // act 3, backward: per-plane partial sums (N * C)
  double* mean; double* rstd;
  const void* dy; void* dx; double* dweight; double* dbias;
  // statistics: 0 instance norm (per plane), 1 group norm (per sample and group of C / groups
  // channels), 2 batch norm in training (per channel over all samples), 3 given (batch norm in eval:
  // its running statistics). mean / rstd are per plane (N * C) either way: outputs of the forward for
  // 0-2 (each plane holds its group's or channel's values), inputs for 3. The backward of 1 and 2
  // differentiates through the shared statistics, that of 3 treats them as constants:
  //   dx = rstd * (w dz - M1 - xhat * M2), M1 / M2: the means of w dz and w dz xhat over the set
  int kind; int64_t groups;
  // 0: planes of S contiguous elements (N, C, S); 1: channels last (N, S, C), each spatial position's
  // C channels contiguous (torch.channels_last / channels_last_3d); x, y, dy, dx alike
  int channels_last;
  int num_threads;
  void* stream;
};

int norm_act_fwd_cpu(const NormActParams& p);
int norm_act_bwd_cpu(const NormActParams& p);

}  // namespace fastmed
