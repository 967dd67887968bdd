// fused soft Dice + cross-entropy: per-(batch, class) statistics in one pass over logits and
// labels (forward) and the logits' gradient in one pass (backward). No one-hot tensor is built.
//
// Layout: logits x[b, c, s] at x + b*x_sb + c*x_sc + s*x_ss (element strides, spatial collapsed).
// target: a label map t[b, s] (label_map = 1; any integer or float dtype) or a dense (one-hot or
// soft) tensor y[b, c, s] (label_map = 0; float dtype). Optional voxel mask m[b, s] (float32).
//
// Statistics, per (b, c), with q = act(x), q' = q*m, y' = y*m over all voxels s:
//   stats[b][c][0] = sum q'*y'     stats[b][c][1] = sum q' (or q'^2 if squared)
//   stats[b][c][2] = sum y' (or y'^2 if squared)   stats[b][c][3] = sum |q' - y'| (if soft)
// Cross-entropy sums, per b (lse = log-sum-exp of x over c, w = ce_weight or 1):
//   softmax CE, label map (m = 0 where label == ignore_index, times the optional mask):
//     ce[b][0] = sum m w_t (lse - x_t)  ce[b][1] = sum m sum_c w_c (lse - x_c)  ce[b][2] = sum m w_t
//     ce[b][3] = sum m
//   softmax CE, dense y:  ce[b][0] = sum m * sum_c w_c y_c (lse - x_c), ce[b][1] as above times m,
//     ce[b][2] = sum m * sum_c w_c y_c, ce[b][3] = sum m
//   BCE with logits (w = pos_weight): ce[b][0] = sum m * sum_c (w_c y_c softplus(-x_c) + (1-y_c) softplus(x_c)),
//     ce[b][3] = sum m * C
#pragma once
#include <cstdint>

namespace fastmed {

enum DiceAct : int { kActNone = 0, kActSigmoid = 1, kActSoftmax = 2 };
enum CeMode : int { kCeNone = 0, kCeSoftmax = 1, kCeBce = 2 };

struct DiceCEParams {
  // sizes
  int64_t B, C, S;
  // logits
  const void* x; int x_dtype; int64_t x_sb, x_sc, x_ss;
  // target
  const void* t; int t_dtype; int label_map; int64_t t_sb, t_sc, t_ss;
  // optional mask (float32), broadcast over batch when m_sb == 0
  const float* mask; int64_t m_sb, m_ss;
  // optional per-class CE weight (softmax CE) or pos_weight (BCE), float32, C entries
  const float* ce_weight;
  int act, ce, dice, squared, soft;
  int has_ignore; int64_t ignore_index;
  // forward outputs (float64): stats B*C*4, ce B*4; workspace of dice_ce_workspace_size doubles;
  // bad: number of labels outside [0, C) that are not ignore_index (one int64)
  double* stats; double* ce_out; double* workspace; int64_t* bad;
  // backward inputs (float64): grad_stats B*C*4, grad_ce B*4; output dx with x's dtype
  const double* grad_stats; const double* grad_ce;
  void* dx; int64_t dx_sb, dx_sc, dx_ss;
  int num_threads;
  int force_generic;  // tests: skip the specialised fast path
  void* stream;  // cudaStream_t for the CUDA kernels
  int skip_ce_smooth;  // 1: ce[b][1] (only label smoothing uses it) may be left 0
};

// Voxels per task; fixed (never derived from the thread count) so results are bit-identical
// whatever the number of threads.
constexpr int64_t kDiceBlockVoxels = 32768;

inline int64_t dice_ce_num_blocks(int64_t S) { return (S + kDiceBlockVoxels - 1) / kDiceBlockVoxels; }
// workspace doubles: one partial per (b, block) of 4*C + 4 values
inline int64_t dice_ce_workspace_size(int64_t B, int64_t C, int64_t S) {
  return B * dice_ce_num_blocks(S) * (4 * C + 4);
}

// CPU kernels (dice_ce_cpu.cpp); return a Status.
int dice_ce_fwd_cpu(const DiceCEParams& p);
int dice_ce_bwd_cpu(const DiceCEParams& p);
const char* dice_ce_cpu_isa();

// CUDA kernels (dice_ce_cuda.cu)
int dice_ce_fwd_cuda(const DiceCEParams& p);
int dice_ce_bwd_cuda(const DiceCEParams& p);
int64_t dice_ce_cuda_workspace_size(int64_t B, int64_t C, int64_t S);

}  // namespace fastmed
