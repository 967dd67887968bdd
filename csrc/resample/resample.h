// Resampling through a voxel-to-voxel affine evaluated inside the kernel: no sampling grid exists in
// memory. 2D volumes are 3D with a depth of 1.
//
// Output voxel (z, y, x) of batch entry b reads the input at the continuous voxel coordinate
//   (cz, cy, cx) = T_b @ (z, y, x, 1)        (T_b: 3 x 4 doubles at theta + b * theta_sb)
// and interpolates along each dim d with order[d]: 0 nearest, 1 linear, 3 cubic B-spline (the input
// then holds B-spline coefficients: see spline_prefilter). Taps outside [0, n) follow `padding`:
//   kPadZeros   the tap is cval (grid_sample "zeros", scipy "grid-constant")
//   kPadBorder  clamp the index (grid_sample "border", scipy "nearest")
//   kPadReflect half-sample symmetric: ... b a | a b c | c b ... (grid_sample "reflection" with
//               align_corners=False, scipy "reflect")
//   kPadMirror  whole-sample symmetric: ... c b | a b c | b a ... (grid_sample "reflection" with
//               align_corners=True, scipy "mirror")
//   kPadConstantMirror  scipy "constant": a point outside [0, n - 1] along any dim is cval, the taps
//               of a point inside use the whole-sample mirror
// Nearest rounds half to even (torch) or, with nearest_half_up, floor(c + 0.5) (scipy).
//
// out_mode:
//   kOutValues  dst[b, c, z, y, x] = the interpolated value (cast to dst_dtype; integer dst rounds
//               half to even and saturates)
//   kOutArgmax  dst[b, 0, z, y, x] = argmax over c of the interpolated values (first maximum; NaN
//               wins, as torch.argmax), dst an integer type: logits to labels in one pass
//   kOutLabels  src is an integer label map (C = 1); for each label l of labels[0..nlabels) in
//               order, the indicator (src == l) is interpolated; dst is the last label whose
//               interpolated indicator is >= 0.5, or `cval` (cast) when none is (nnU-Net's
//               resize_segmentation without a one-hot tensor)
// Arithmetic in float (double when compute_f64); 64-bit index arithmetic throughout.
#pragma once
#include <cmath>
#include <cstdint>

namespace fastmed {

enum ResamplePad : int { kPadZeros = 0, kPadBorder = 1, kPadReflect = 2, kPadMirror = 3, kPadConstantMirror = 4 };
enum ResampleOut : int { kOutValues = 0, kOutArgmax = 1, kOutLabels = 2 };

struct ResampleParams {
  int64_t B, C;
  const void* src; int src_dtype; int64_t s_sb, s_sc, s_s[3]; int64_t in_size[3];
  void* dst; int dst_dtype; int64_t d_sb, d_sc, d_s[3]; int64_t out_size[3];
  const double* theta; int64_t theta_sb;  // 12 doubles per batch entry; theta_sb = 0 shares one
  int order[3];
  int padding;
  int nearest_half_up;
  double cval;
  int compute_f64;
  int out_mode;
  const int64_t* labels; int64_t nlabels;
  int num_threads;
  void* stream;
  // added to every output index before theta applies: 0, or 0.5 for scipy's zoom(grid_mode=True) /
  // skimage / nnU-Net convention (i + 0.5) * scale - 0.5, whose rounding a folded offset would not keep
  double index_offset = 0.0;
};

// In-place cubic B-spline prefilter along one dim (0, 1, 2 of the spatial dims) of a float32 or
// float64 tensor: turns samples into B-spline coefficients (pole sqrt(3) - 2, gain 6). Boundary:
// kPadMirror (whole-sample, scipy "mirror"/"constant") or kPadReflect (half-sample, scipy
// "reflect"). The lines are x[l, ...] with l over `lines` leading entries of stride l_s.
struct SplineFilterParams {
  void* data; int dtype; int64_t lines, l_s; int64_t size[3], s[3];
  int dim;
  int boundary;
  int num_threads;
  void* stream;
};

#if defined(__CUDACC__)
#define FM_RS_FOLD_HD __host__ __device__ inline
#else
#define FM_RS_FOLD_HD inline
#endif

// Nearest interpolation under a reflecting padding: the coordinate c of a point outside the input
// folded into it (kPadReflect about -0.5 and n - 0.5, kPadMirror about 0 and n - 1), as scipy and
// grid_sample fold it before rounding. Rounding first and folding the index would send a point
// exactly half-way between two voxels outside the input to the other one (rounding's tie rule
// flips under a reflection). Points inside are returned unchanged; exact for half-integers. Checked
// against scipy's order-0 modes and grid_sample's nearest "reflection" at every half-integer.
FM_RS_FOLD_HD double fold_coord(double c, int64_t n, int pad) {
  if (pad == kPadReflect) {
    if (c >= -0.5 && c <= (double)n - 0.5) return c;
    const double P = 2.0 * (double)n;
    double m = fmod(c + 0.5, P);
    if (m < 0) m += P;
    if (m > (double)n) m = P - m;
    return m - 0.5;
  }
  if (pad == kPadMirror) {
    if (c >= 0 && c <= (double)(n - 1)) return c;
    if (n == 1) return 0.0;
    const double P = 2.0 * (double)(n - 1);
    double m = fmod(c, P);
    if (m < 0) {
      m += P;
      if (m > (double)(n - 1)) m = P - m;
    } else if (m >= (double)n) {  // above the input, scipy folds from n on: (n - 1, n) stays and
      m = P - m;                  // rounds to n - 1, or to n (which the index padding mirrors)
    }
    return m;
  }
  return c;
}

int resample_cpu(const ResampleParams& p);
int spline_prefilter_cpu(const SplineFilterParams& p);
int resample_cuda(const ResampleParams& p);
int spline_prefilter_cuda(const SplineFilterParams& p);

}  // namespace fastmed
