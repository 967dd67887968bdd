// fastmed._C_cuda: the CUDA kernels. Unpacks parameters, releases the GIL, calls the kernel and turns
// an error code into an exception naming the op. No logic lives here. The module must import (and
// build_info / device_count must answer) on a machine without a GPU or a CUDA driver.
#include <pybind11/pybind11.h>
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#include "common/params_binding.h"
#include "common/sw_params_binding.h"
#include "common/resample_params_binding.h"
#include "sliding_window/sliding_window.h"
#include "dice_ce/dice_ce.h"
#include "resample/resample.h"

#ifndef FASTMED_CUDA_VERSION
#define FASTMED_CUDA_VERSION "unknown"
#endif
#ifndef FASTMED_CUDA_ARCHS
#define FASTMED_CUDA_ARCHS "unknown"
#endif

namespace fastmed {
// dice_ce_cuda.cu: message of the last CUDA error its launches saw on this thread.
const char* dice_ce_cuda_last_error();
}  // namespace fastmed

namespace py = pybind11;
using namespace fastmed;

namespace {

void check_cuda_status(int status, const char* op) {
  if (status == kCudaError) {
    throw std::runtime_error(std::string("fastmed::") + op + ": " + status_message(status) + " (" +
                             dice_ce_cuda_last_error() + ")");
  }
  check_status(status, op);
}

// pybind11 registers a C++ type once per process, and fastmed._C (always built, always imported
// first by fastmed._ext) registers DiceCEParams through the same bind_dice_ce_params. Binding it
// again here would make this module's import fail ("type already registered"), so reuse that class:
// one field list (params_binding.h) for both modules, whatever the import order.
template <typename T>
bool reuse_type(py::module_& m, const char* name) {
  auto* ti = py::detail::get_type_info(typeid(T));
  if (!ti) return false;
  m.attr(name) = py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(ti->type));
  return true;
}

void bind_params_shared(py::module_& m) {
  if (py::detail::get_type_info(typeid(DiceCEParams)) == nullptr) {
    try {
      py::module_::import("fastmed._C");
    } catch (py::error_already_set&) {
      // no CPU module: register the classes here instead
    }
  }
  if (!reuse_type<DiceCEParams>(m, "DiceCEParams")) bind_dice_ce_params(m);
  if (reuse_type<SWAccParams>(m, "SWAccParams")) {
    reuse_type<SWNormParams>(m, "SWNormParams");
    reuse_type<SWArgmaxParams>(m, "SWArgmaxParams");
    reuse_type<SWGatherParams>(m, "SWGatherParams");
  }
  else bind_sw_params(m);
  if (reuse_type<ResampleParams>(m, "ResampleParams")) reuse_type<SplineFilterParams>(m, "SplineFilterParams");
  else bind_resample_params(m);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fastmed CUDA kernels";
  bind_params_shared(m);
  m.def("dice_ce_workspace_size", &dice_ce_cuda_workspace_size, "workspace doubles for dice_ce_fwd (CUDA)");
  m.def("dice_ce_fwd", [](const DiceCEParams& p) {
    int s;
    {
      py::gil_scoped_release nogil;
      s = dice_ce_fwd_cuda(p);
    }
    check_cuda_status(s, "dice_ce_fwd");
  });
  m.def("dice_ce_bwd", [](const DiceCEParams& p) {
    int s;
    {
      py::gil_scoped_release nogil;
      s = dice_ce_bwd_cuda(p);
    }
    check_cuda_status(s, "dice_ce_bwd");
  });
  m.def("sw_gather", [](const SWGatherParams& p) {
    int s;
    {
      py::gil_scoped_release nogil;
      s = sw_gather_cuda(p);
    }
    check_cuda_status(s, "sw_gather");
  });
  m.def("sw_accumulate", [](const SWAccParams& p) {
    int s;
    {
      py::gil_scoped_release nogil;
      s = sw_accumulate_cuda(p);
    }
    check_cuda_status(s, "sw_accumulate");
  });
  m.def("sw_normalize", [](const SWNormParams& p) {
    int s;
    {
      py::gil_scoped_release nogil;
      s = sw_normalize_cuda(p);
    }
    check_cuda_status(s, "sw_normalize");
  });
  m.def("resample", [](const ResampleParams& p) {
    int s;
    {
      py::gil_scoped_release nogil;
      s = resample_cuda(p);
    }
    check_cuda_status(s, "resample");
  });
  m.def("spline_prefilter", [](const SplineFilterParams& p) {
    int s;
    {
      py::gil_scoped_release nogil;
      s = spline_prefilter_cuda(p);
    }
    check_cuda_status(s, "spline_prefilter");
  });
  m.def("build_info", []() {
    py::dict d;
    int rt = 0;
    if (cudaRuntimeGetVersion(&rt) != cudaSuccess) {
      rt = 0;
      (void)cudaGetLastError();
    }
    int drv = 0;
    if (cudaDriverGetVersion(&drv) != cudaSuccess) {
      drv = 0;
      (void)cudaGetLastError();
    }
    d["cuda_runtime_version"] = rt;
    d["cuda_driver_version"] = drv;
    d["compiled_cuda_version"] = FASTMED_CUDA_VERSION;
    d["archs"] = FASTMED_CUDA_ARCHS;
    return d;
  });
  m.def("device_count", []() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      (void)cudaGetLastError();  // no driver or no device: not an error for the caller
      n = 0;
    }
    return n;
  });
}
