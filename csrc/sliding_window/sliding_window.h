// Sliding-window stitching: accumulate a batch of predicted windows into a full-volume
// accumulator with the blending weight applied on the fly, build the normalising weight map of a
// tiling, and divide by it at the end. 2D volumes are 3D with a depth of 1.
//
// Accumulator a[b, c, z, y, x] at acc + b*a_sb + c*a_sc + z*a_s[0] + y*a_s[1] + x*a_s[2].
// Window n of the batch: prediction p[n, c, i, j, k] (pred + n*p_sn + c*p_sc + ...), of spatial size
// win[0..2], added at batch index starts[4n] and offset (starts[4n+1], starts[4n+2], starts[4n+3]):
//   a[b, c, z0+i, y0+j, x0+k] = a + r(p * r(w[i, j, k]))   (r: rounding to the accumulator type)
// Weights: wmode 0: w = 1; 1: separable w = max(r32(r32(g0[i] g1[j]) g2[k]), wmin) (MONAI's Gaussian
// importance map, same float32 operations); 2: a full float32 map wmap[i, j, k] (contiguous).
// pred == nullptr adds the weight alone (the normalising map; C must be 1).
// Windows are added one after the other (they may overlap), so the result is deterministic.
#pragma once
#include <cstdint>

namespace fastmed {

struct SWAccParams {
  int64_t N, C;
  void* acc; int acc_dtype; int64_t a_sb, a_sc, a_s[3]; int64_t a_size[3];
  const void* pred; int pred_dtype; int64_t p_sn, p_sc, p_s[3]; int64_t win[3];
  const int64_t* starts;  // N x 4: batch index, z0, y0, x0
  int wmode; const float* g0; const float* g1; const float* g2; float wmin; const float* wmap;
  // optional, N x 6: per window the half-open window-local range [lo, hi) along each dim of the
  // voxels no earlier window touched; there the sum is written instead of added (so the
  // accumulator needs no zero fill and those voxels are not read)
  const int64_t* fresh;
  // sw_stitch only (the fused batch pass, CPU): the windows lie on a grid (per dim the sorted starts
  // grid[0 .. grid_n[0]), then grid_n[1] along y, then grid_n[2] along x) and are taken in C order
  // of it; widx[n] is window n's place in that order within its image, and the batch holds
  // consecutive places. Optional count (acc dtype, spatial strides n_s): where no later window
  // touches a voxel, the sum is divided by count there (MONAI's final normalisation, same rounding).
  const int64_t* widx; const int64_t* grid; int64_t grid_n[3];
  const void* count; int64_t n_s[3];
  int num_threads;
  void* stream;
};

// dst[b, c, s] = acc[b, c, s] / count[s]   (count broadcast over b and c, in the accumulator dtype)
// softmax != 0: dst[b, :, s] = softmax over c of those quotients (computed in float / double, one
// pass over the accumulator; dst may be acc)
struct SWNormParams {
  int64_t B, C, size[3];
  int softmax;
  const void* acc; int acc_dtype; int64_t a_sb, a_sc, a_s[3];
  const void* count; int64_t n_s[3];  // same dtype as acc
  void* dst; int dst_dtype; int64_t d_sb, d_sc, d_s[3];
  int num_threads;
  void* stream;
};

// dst[b, 0, s] = argmax_c r(acc[b, c, s] / count[s]) (first maximum; NaN counts as the largest, as
// torch.argmax); dst is an integer tensor of dst_esize bytes per element (1: uint8, 2, 4, 8: signed)
struct SWArgmaxParams {
  int64_t B, C, size[3];
  const void* acc; int acc_dtype; int64_t a_sb, a_sc, a_s[3];
  const void* count; int64_t n_s[3];  // same dtype as acc
  void* dst; int dst_esize; int64_t d_sb, d_s[3];
  int num_threads;
  void* stream;
};

// dst[n, c, i, j, k] = src[starts[4n], c, starts[4n+1] + i, starts[4n+2] + j, starts[4n+3] + k]:
// a batch of windows gathered from the (padded) volume in one pass; elements of esize bytes are
// copied bit for bit. Every window lies inside src (checked in Python); dst is contiguous.
struct SWGatherParams {
  int64_t N, C;
  const void* src; int esize; int64_t s_sb, s_sc, s_s[3];
  void* dst; int64_t win[3];
  const int64_t* starts;
  int num_threads;
  void* stream;
};

int sw_gather_cpu(const SWGatherParams& p);
int sw_gather_cuda(const SWGatherParams& p);
int sw_accumulate_cpu(const SWAccParams& p);
// the batch in one pass: per voxel, the windows of the batch containing it are added in order to
// the accumulator (read once unless no earlier window touched it, written once), then divided by
// count where no later window touches it. Same numbers as sw_accumulate + sw_normalize.
int sw_stitch_cpu(const SWAccParams& p);
int sw_argmax_cpu(const SWArgmaxParams& p);
int sw_normalize_cpu(const SWNormParams& p);
int sw_accumulate_cuda(const SWAccParams& p);
int sw_normalize_cuda(const SWNormParams& p);

}  // namespace fastmed
