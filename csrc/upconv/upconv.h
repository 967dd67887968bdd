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
// channels_last: x is (N, D, H, W, Cin) in memory (NDHWC, dense) and y's channel co of output voxel
// v is at y + n * y_batch_stride + v * y_voxel_stride + co: a channel slice of a channels-last
// concatenation buffer (y_voxel_stride its channel count), so the decoder's "upsample, then
// concatenate with the skip" writes the upsampled channels in place (PyTorch: the transposed
// convolution's own output, then torch.cat reads it back and writes it again).
#pragma once
#include <cstdint>

namespace fastmed {

struct UpConvParams {
  int64_t N, Cin, Cout, D, H, W;  // input sizes
  int64_t kD, kH, kW;             // kernel = stride
  int dtype;                      // kF32 only
  int channels_last;              // 0: planar x and y; 1: NDHWC x, y as described above
  const void* x;                  // (N, Cin, D, H, W) contiguous (channels_last: NDHWC dense)
  const void* weight;             // (Cin, Cout, kD, kH, kW) contiguous
  const void* bias;               // (Cout) or null
  void* y;                        // (N, Cout, D*kD, H*kH, W*kW), batch stride y_batch_stride
  int64_t y_batch_stride;
  int64_t y_voxel_stride;         // channels_last only: elements between output voxels (>= Cout)
  // channels_last only, optional: the skip (N, Do, Ho, Wo, skip_channels) dense, copied into y's
  // voxels at skip_y_offset elements from each output voxel's channel 0 of the upsampled part
  // (negative: before it), row by row with the outputs (one pass over the concatenation)
  const void* skip;
  int64_t skip_channels, skip_y_offset;
  int num_threads;
};

int upconv_cpu(const UpConvParams& p);

}  // namespace fastmed
