// Transposed convolution whose kernel equals its stride (the upsampling of U-Net decoders: DynUNet's
// and nnU-Net's ConvTranspose3d(k=2, s=2), or (1, 2, 2) on anisotropic data), on planar (N, C, D,
// H, W) float32 data. Such a convolution has no overlap: output voxel (kd + d*kD, kh + h*kH,
// kw + w*kW) of channel co is
//     y = bias[co] + sum_ci x[ci, d, h, w] * weight[ci, co, kd, kh, kw]
// (ci summed in order, one fused multiply-add each). 2D is D = kD = 1.
// y may be a channel slice of a larger tensor (the buffer of a skip connection's concatenation):
// its batch stride is y_batch_stride; within a sample, channel co starts at co * Do*Ho*Wo.
// PyTorch computes the planar case in channels last and then transposes the whole output (on our
// 2-core CPU the copy took longer than the convolution).
#pragma once
#include <cstdint>

namespace fastmed {

struct UpConvParams {
  int64_t N, Cin, Cout, D, H, W;  // input sizes
  int64_t kD, kH, kW;             // kernel = stride
  int dtype;                      // kF32 only
  const void* x;                  // (N, Cin, D, H, W) contiguous
  const void* weight;             // (Cin, Cout, kD, kH, kW) contiguous
  const void* bias;               // (Cout) or null
  void* y;                        // (N, Cout, D*kD, H*kH, W*kW), batch stride y_batch_stride
  int64_t y_batch_stride;
  int num_threads;
};

int upconv_cpu(const UpConvParams& p);

}  // namespace fastmed
