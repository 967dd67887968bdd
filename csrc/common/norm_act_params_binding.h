// pybind11 glue for NormActParams (pointers as Python ints).
#pragma once
#include <pybind11/pybind11.h>
#include <cstdint>
#include "../norm_act/norm_act.h"

namespace fastmed {
namespace py = pybind11;

#define FM_NA_PTR(cls, name, type)                                                                  \
  cls.def_property(                                                                                 \
      #name, [](const NormActParams& p) { return (uintptr_t)p.name; },                              \
      [](NormActParams& p, uintptr_t v) { p.name = reinterpret_cast<type>(v); })

inline void bind_norm_act_params(py::module_& m) {
  py::class_<NormActParams> c(m, "NormActParams");
  c.def(py::init([]() { NormActParams p{}; return p; }));
  c.def_readwrite("N", &NormActParams::N).def_readwrite("C", &NormActParams::C).def_readwrite("S", &NormActParams::S);
  c.def_readwrite("dtype", &NormActParams::dtype).def_readwrite("eps", &NormActParams::eps);
  c.def_readwrite("slope", &NormActParams::slope).def_readwrite("act", &NormActParams::act);
  c.def_readwrite("num_threads", &NormActParams::num_threads);
  c.def_readwrite("channels_last", &NormActParams::channels_last);
  c.def_readwrite("prelu_n", &NormActParams::prelu_n);
  c.def_readwrite("kind", &NormActParams::kind).def_readwrite("groups", &NormActParams::groups);
  FM_NA_PTR(c, prelu, const void*); FM_NA_PTR(c, dprelu, double*);
  FM_NA_PTR(c, x, const void*); FM_NA_PTR(c, y, void*); FM_NA_PTR(c, weight, const void*);
  FM_NA_PTR(c, bias, const void*); FM_NA_PTR(c, mean, double*); FM_NA_PTR(c, rstd, double*);
  FM_NA_PTR(c, dy, const void*); FM_NA_PTR(c, dx, void*); FM_NA_PTR(c, dweight, double*);
  FM_NA_PTR(c, dbias, double*); FM_NA_PTR(c, stream, void*);
}
#undef FM_NA_PTR

}  // namespace fastmed
