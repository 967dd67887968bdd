// pybind11 glue for UpConvParams (pointers as Python ints).
#pragma once
#include <pybind11/pybind11.h>
#include <cstdint>
#include "../upconv/upconv.h"

namespace fastmed {
namespace py = pybind11;

#define FM_UC_PTR(cls, name, type)                                                                  \
  cls.def_property(                                                                                 \
      #name, [](const UpConvParams& p) { return (uintptr_t)p.name; },                               \
      [](UpConvParams& p, uintptr_t v) { p.name = reinterpret_cast<type>(v); })

inline void bind_upconv_params(py::module_& m) {
  py::class_<UpConvParams> c(m, "UpConvParams");
  c.def(py::init([]() { UpConvParams p{}; return p; }));
  c.def_readwrite("N", &UpConvParams::N).def_readwrite("Cin", &UpConvParams::Cin);
  c.def_readwrite("Cout", &UpConvParams::Cout).def_readwrite("D", &UpConvParams::D);
  c.def_readwrite("H", &UpConvParams::H).def_readwrite("W", &UpConvParams::W);
  c.def_readwrite("kD", &UpConvParams::kD).def_readwrite("kH", &UpConvParams::kH);
  c.def_readwrite("kW", &UpConvParams::kW).def_readwrite("dtype", &UpConvParams::dtype);
  c.def_readwrite("y_batch_stride", &UpConvParams::y_batch_stride);
  c.def_readwrite("y_voxel_stride", &UpConvParams::y_voxel_stride);
  c.def_readwrite("channels_last", &UpConvParams::channels_last);
  c.def_readwrite("skip_channels", &UpConvParams::skip_channels);
  c.def_readwrite("skip_y_offset", &UpConvParams::skip_y_offset);
  c.def_readwrite("num_threads", &UpConvParams::num_threads);
  FM_UC_PTR(c, x, const void*); FM_UC_PTR(c, weight, const void*); FM_UC_PTR(c, bias, const void*);
  FM_UC_PTR(c, y, void*); FM_UC_PTR(c, skip, const void*);
}
#undef FM_UC_PTR

}  // namespace fastmed
