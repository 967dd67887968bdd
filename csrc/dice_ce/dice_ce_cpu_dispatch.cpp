// Picks the best instruction-set build of the CPU kernels (dice_ce, resample, sliding window, upconv) at
// run time.
#include <cstdlib>
#include <cstring>

#include "dice_ce.h"
#include "../resample/resample.h"
#include "../sliding_window/sliding_window.h"
#include "../upconv/upconv.h"
#include "../common/common.h"

namespace fastmed {
#define FM_DECLARE_ISA(name)                       \
  namespace isa_##name {                           \
  int dice_ce_fwd(const DiceCEParams& p);          \
  int dice_ce_bwd(const DiceCEParams& p);          \
  int resample(const ResampleParams& p);           \
  int spline_prefilter(const SplineFilterParams& p); \
  int sw_gather(const SWGatherParams& p);          \
  int sw_accumulate(const SWAccParams& p);         \
  int sw_stitch(const SWAccParams& p);             \
  int sw_normalize(const SWNormParams& p);         \
  int sw_argmax(const SWArgmaxParams& p);          \
  int upconv(const UpConvParams& p);               \
  }
FM_DECLARE_ISA(base)
#if defined(FASTMED_HAVE_AVX2)
FM_DECLARE_ISA(avx2)
#endif
#if defined(FASTMED_HAVE_AVX512)
FM_DECLARE_ISA(avx512)
#endif

namespace {
enum Isa { kBase, kAvx2, kAvx512 };
Isa detect() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
#if defined(FASTMED_HAVE_AVX512)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return kAvx512;
#endif
#if defined(FASTMED_HAVE_AVX2)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
#endif
  return kBase;
}
// FASTMED_CPU_ISA=baseline|avx2|avx512 asks for a lower build (tests run every build this way); a
// build the CPU cannot run is never chosen.
Isa requested(Isa best) {
  const char* want = std::getenv("FASTMED_CPU_ISA");
  if (!want) return best;
  Isa w = best;
  if (!std::strcmp(want, "baseline") || !std::strcmp(want, "base")) w = kBase;
  else if (!std::strcmp(want, "avx2")) w = kAvx2;
  else if (!std::strcmp(want, "avx512")) w = kAvx512;
  return w < best ? w : best;
}
Isa isa() {
  static const Isa chosen = requested(detect());
  return chosen;
}
}  // namespace

const char* dice_ce_cpu_isa() {
  switch (isa()) {
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "baseline";
  }
}

int dice_ce_fwd_cpu(const DiceCEParams& p) {
  switch (isa()) {
#if defined(FASTMED_HAVE_AVX512)
    case kAvx512: return isa_avx512::dice_ce_fwd(p);
#endif
#if defined(FASTMED_HAVE_AVX2)
    case kAvx2: return isa_avx2::dice_ce_fwd(p);
#endif
    default: return isa_base::dice_ce_fwd(p);
  }
}

int dice_ce_bwd_cpu(const DiceCEParams& p) {
  switch (isa()) {
#if defined(FASTMED_HAVE_AVX512)
    case kAvx512: return isa_avx512::dice_ce_bwd(p);
#endif
#if defined(FASTMED_HAVE_AVX2)
    case kAvx2: return isa_avx2::dice_ce_bwd(p);
#endif
    default: return isa_base::dice_ce_bwd(p);
  }
}

int resample_cpu(const ResampleParams& p) {
  switch (isa()) {
#if defined(FASTMED_HAVE_AVX512)
    case kAvx512: return isa_avx512::resample(p);
#endif
#if defined(FASTMED_HAVE_AVX2)
    case kAvx2: return isa_avx2::resample(p);
#endif
    default: return isa_base::resample(p);
  }
}

int spline_prefilter_cpu(const SplineFilterParams& p) {
  switch (isa()) {
#if defined(FASTMED_HAVE_AVX512)
    case kAvx512: return isa_avx512::spline_prefilter(p);
#endif
#if defined(FASTMED_HAVE_AVX2)
    case kAvx2: return isa_avx2::spline_prefilter(p);
#endif
    default: return isa_base::spline_prefilter(p);
  }
}
int sw_gather_cpu(const SWGatherParams& p) {
  switch (isa()) {
#if defined(FASTMED_HAVE_AVX512)
    case kAvx512: return isa_avx512::sw_gather(p);
#endif
#if defined(FASTMED_HAVE_AVX2)
    case kAvx2: return isa_avx2::sw_gather(p);
#endif
    default: return isa_base::sw_gather(p);
  }
}

int sw_accumulate_cpu(const SWAccParams& p) {
  switch (isa()) {
#if defined(FASTMED_HAVE_AVX512)
    case kAvx512: return isa_avx512::sw_accumulate(p);
#endif
#if defined(FASTMED_HAVE_AVX2)
    case kAvx2: return isa_avx2::sw_accumulate(p);
#endif
    default: return isa_base::sw_accumulate(p);
  }
}

int sw_stitch_cpu(const SWAccParams& p) {
  switch (isa()) {
#if defined(FASTMED_HAVE_AVX512)
    case kAvx512: return isa_avx512::sw_stitch(p);
#endif
#if defined(FASTMED_HAVE_AVX2)
    case kAvx2: return isa_avx2::sw_stitch(p);
#endif
    default: return isa_base::sw_stitch(p);
  }
}

int sw_normalize_cpu(const SWNormParams& p) {
  switch (isa()) {
#if defined(FASTMED_HAVE_AVX512)
    case kAvx512: return isa_avx512::sw_normalize(p);
#endif
#if defined(FASTMED_HAVE_AVX2)
    case kAvx2: return isa_avx2::sw_normalize(p);
#endif
    default: return isa_base::sw_normalize(p);
  }
}

int sw_argmax_cpu(const SWArgmaxParams& p) {
  switch (isa()) {
#if defined(FASTMED_HAVE_AVX512)
    case kAvx512: return isa_avx512::sw_argmax(p);
#endif
#if defined(FASTMED_HAVE_AVX2)
    case kAvx2: return isa_avx2::sw_argmax(p);
#endif
    default: return isa_base::sw_argmax(p);
  }
}
int upconv_cpu(const UpConvParams& p) {
  switch (isa()) {
#if defined(FASTMED_HAVE_AVX512)
    case kAvx512: return isa_avx512::upconv(p);
#endif
#if defined(FASTMED_HAVE_AVX2)
    case kAvx2: return isa_avx2::upconv(p);
#endif
    default: return isa_base::upconv(p);
  }
}
}  // namespace fastmed
