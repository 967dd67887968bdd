// pybind11 glue for the resampling parameter structs (pointers as Python ints, 3-vectors as tuples).
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <array>
#include <cstdint>
#include "../resample/resample.h"

namespace fastmed {
namespace py = pybind11;

#define FM_RS_PTR(cls, T, name, type)                                                               \
  cls.def_property(                                                                                 \
      #name, [](const T& p) { return (uintptr_t)p.name; },                                          \
      [](T& p, uintptr_t v) { p.name = reinterpret_cast<type>(v); })
#define FM_RS_VEC3(cls, T, name, E)                                                                 \
  cls.def_property(                                                                                 \
      #name, [](const T& p) { return std::array<E, 3>{p.name[0], p.name[1], p.name[2]}; },          \
      [](T& p, std::array<E, 3> v) { for (int i = 0; i < 3; ++i) p.name[i] = v[i]; })

inline void bind_resample_params(py::module_& m) {
  py::class_<ResampleParams> r(m, "ResampleParams");
  r.def(py::init([]() { ResampleParams p{}; return p; }));
  r.def_readwrite("B", &ResampleParams::B).def_readwrite("C", &ResampleParams::C);
  r.def_readwrite("src_dtype", &ResampleParams::src_dtype).def_readwrite("s_sb", &ResampleParams::s_sb);
  r.def_readwrite("s_sc", &ResampleParams::s_sc).def_readwrite("dst_dtype", &ResampleParams::dst_dtype);
  r.def_readwrite("d_sb", &ResampleParams::d_sb).def_readwrite("d_sc", &ResampleParams::d_sc);
  r.def_readwrite("theta_sb", &ResampleParams::theta_sb).def_readwrite("padding", &ResampleParams::padding);
  r.def_readwrite("nearest_half_up", &ResampleParams::nearest_half_up).def_readwrite("cval", &ResampleParams::cval);
  r.def_readwrite("index_offset", &ResampleParams::index_offset);
  r.def_readwrite("compute_f64", &ResampleParams::compute_f64).def_readwrite("out_mode", &ResampleParams::out_mode);
  r.def_readwrite("nlabels", &ResampleParams::nlabels).def_readwrite("num_threads", &ResampleParams::num_threads);
  FM_RS_VEC3(r, ResampleParams, s_s, int64_t); FM_RS_VEC3(r, ResampleParams, in_size, int64_t);
  FM_RS_VEC3(r, ResampleParams, d_s, int64_t); FM_RS_VEC3(r, ResampleParams, out_size, int64_t);
  FM_RS_VEC3(r, ResampleParams, order, int);
  FM_RS_PTR(r, ResampleParams, src, const void*); FM_RS_PTR(r, ResampleParams, dst, void*);
  FM_RS_PTR(r, ResampleParams, theta, const double*); FM_RS_PTR(r, ResampleParams, labels, const int64_t*);
  FM_RS_PTR(r, ResampleParams, stream, void*);

  py::class_<SplineFilterParams> f(m, "SplineFilterParams");
  f.def(py::init([]() { SplineFilterParams p{}; return p; }));
  f.def_readwrite("dtype", &SplineFilterParams::dtype).def_readwrite("lines", &SplineFilterParams::lines);
  f.def_readwrite("l_s", &SplineFilterParams::l_s).def_readwrite("dim", &SplineFilterParams::dim);
  f.def_readwrite("boundary", &SplineFilterParams::boundary);
  f.def_readwrite("num_threads", &SplineFilterParams::num_threads);
  FM_RS_VEC3(f, SplineFilterParams, size, int64_t); FM_RS_VEC3(f, SplineFilterParams, s, int64_t);
  FM_RS_PTR(f, SplineFilterParams, data, void*); FM_RS_PTR(f, SplineFilterParams, stream, void*);
}
#undef FM_RS_PTR
#undef FM_RS_VEC3

}  // namespace fastmed
