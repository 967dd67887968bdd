// fastmed._C: the CPU kernels. Unpacks parameters, releases the GIL, calls the kernel and turns
// an error code into an exception naming the op. No logic lives here.
#include <pybind11/pybind11.h>
#include "common/params_binding.h"
#include "common/sw_params_binding.h"
#include "common/resample_params_binding.h"
#include "resample/resample.h"
#include "common/norm_act_params_binding.h"
#include "norm_act/norm_act.h"
#include "dice_ce/dice_ce.h"
#include "sliding_window/sliding_window.h"
#include "common/upconv_params_binding.h"
#include "upconv/upconv.h"

namespace py = pybind11;
using namespace fastmed;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastmed CPU kernels (C++/OpenMP)";
  bind_dice_ce_params(m);
  m.def("dice_ce_workspace_size", &dice_ce_workspace_size, "workspace doubles for dice_ce_fwd (CPU)");
  m.def("dice_ce_fwd", [](const DiceCEParams& p) {
    int s;
    {
      py::gil_scoped_release nogil;
      s = dice_ce_fwd_cpu(p);
    }
    check_status(s, "dice_ce_fwd");
  });
  m.def("dice_ce_bwd", [](const DiceCEParams& p) {
    int s;
    {
      py::gil_scoped_release nogil;
      s = dice_ce_bwd_cpu(p);
    }
    check_status(s, "dice_ce_bwd");
  });
  bind_norm_act_params(m);
  m.def("norm_act_fwd", [](const NormActParams& p) {
    int s;
    {
      py::gil_scoped_release nogil;
      s = norm_act_fwd_cpu(p);
    }
    check_status(s, "norm_act_fwd");
  });
  m.def("norm_act_bwd", [](const NormActParams& p) {
    int s;
    {
      py::gil_scoped_release nogil;
      s = norm_act_bwd_cpu(p);
    }
    check_status(s, "norm_act_bwd");
  });
  bind_resample_params(m);
  m.def("resample", [](const ResampleParams& p) {
    int s;
    {
      py::gil_scoped_release nogil;
      s = resample_cpu(p);
    }
    check_status(s, "resample");
  });
  m.def("spline_prefilter", [](const SplineFilterParams& p) {
    int s;
    {
      py::gil_scoped_release nogil;
      s = spline_prefilter_cpu(p);
    }
    check_status(s, "spline_prefilter");
  });
  bind_sw_params(m);
  m.def("sw_gather", [](const SWGatherParams& p) {
    int s;
    {
      py::gil_scoped_release nogil;
      s = sw_gather_cpu(p);
    }
    check_status(s, "sw_gather");
  });
  m.def("sw_accumulate", [](const SWAccParams& p) {
    int s;
    {
      py::gil_scoped_release nogil;
      s = sw_accumulate_cpu(p);
    }
    check_status(s, "sw_accumulate");
  });
  m.def("sw_stitch", [](const SWAccParams& p) {
    int s;
    {
      py::gil_scoped_release nogil;
      s = sw_stitch_cpu(p);
    }
    check_status(s, "sw_stitch");
  });
  m.def("sw_normalize", [](const SWNormParams& p) {
    int s;
    {
      py::gil_scoped_release nogil;
      s = sw_normalize_cpu(p);
    }
    check_status(s, "sw_normalize");
  });
  m.def("sw_argmax", [](const SWArgmaxParams& p) {
    int s;
    {
      py::gil_scoped_release nogil;
      s = sw_argmax_cpu(p);
    }
    check_status(s, "sw_argmax");
  });
  bind_upconv_params(m);
  m.def("upconv", [](const UpConvParams& p) {
    int s;
    {
      py::gil_scoped_release nogil;
      s = upconv_cpu(p);
    }
    check_status(s, "upconv");
  });
  m.def("advise_huge_pages", [](uintptr_t ptr, size_t bytes) { prefer_huge_pages((void*)ptr, bytes); },
        "madvise(MADV_HUGEPAGE) on a fresh buffer about to be filled (advisory)");
  m.def("build_info", []() {
    py::dict d;
    d["isa"] = dice_ce_cpu_isa();
#ifdef _OPENMP
    d["openmp"] = _OPENMP;
#else
    d["openmp"] = py::none();
#endif
#if defined(__clang__)
    d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = std::string("gcc ") + __VERSION__;
#else
    d["compiler"] = "unknown";
#endif
    return d;
  });
}
