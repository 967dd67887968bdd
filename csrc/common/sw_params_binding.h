// pybind11 glue for the sliding-window parameter structs: pointers travel as Python ints
// (tensor.data_ptr()), 3-vectors as tuples.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <array>
#include <cstdint>
#include "../sliding_window/sliding_window.h"

namespace fastmed {
namespace py = pybind11;

#define FM_SW_PTR(cls, T, name, type)                                                               \
  cls.def_property(                                                                                 \
      #name, [](const T& p) { return (uintptr_t)p.name; },                                          \
      [](T& p, uintptr_t v) { p.name = reinterpret_cast<type>(v); })
#define FM_SW_VEC3(cls, T, name)                                                                    \
  cls.def_property(                                                                                 \
      #name, [](const T& p) { return std::array<int64_t, 3>{p.name[0], p.name[1], p.name[2]}; },    \
      [](T& p, std::array<int64_t, 3> v) { for (int i = 0; i < 3; ++i) p.name[i] = v[i]; })

inline void bind_sw_params(py::module_& m) {
  py::class_<SWGatherParams> w(m, "SWGatherParams");
  w.def(py::init([]() { SWGatherParams p{}; return p; }));
  w.def_readwrite("N", &SWGatherParams::N).def_readwrite("C", &SWGatherParams::C);
  w.def_readwrite("esize", &SWGatherParams::esize).def_readwrite("s_sb", &SWGatherParams::s_sb);
  w.def_readwrite("s_sc", &SWGatherParams::s_sc).def_readwrite("num_threads", &SWGatherParams::num_threads);
  FM_SW_VEC3(w, SWGatherParams, s_s); FM_SW_VEC3(w, SWGatherParams, win);
  FM_SW_PTR(w, SWGatherParams, src, const void*); FM_SW_PTR(w, SWGatherParams, dst, void*);
  FM_SW_PTR(w, SWGatherParams, starts, const int64_t*); FM_SW_PTR(w, SWGatherParams, stream, void*);

  py::class_<SWAccParams> a(m, "SWAccParams");
  a.def(py::init([]() { SWAccParams p{}; return p; }));
  a.def_readwrite("N", &SWAccParams::N).def_readwrite("C", &SWAccParams::C);
  a.def_readwrite("acc_dtype", &SWAccParams::acc_dtype).def_readwrite("a_sb", &SWAccParams::a_sb);
  a.def_readwrite("a_sc", &SWAccParams::a_sc).def_readwrite("pred_dtype", &SWAccParams::pred_dtype);
  a.def_readwrite("p_sn", &SWAccParams::p_sn).def_readwrite("p_sc", &SWAccParams::p_sc);
  a.def_readwrite("wmode", &SWAccParams::wmode).def_readwrite("wmin", &SWAccParams::wmin);
  a.def_readwrite("num_threads", &SWAccParams::num_threads);
  FM_SW_VEC3(a, SWAccParams, a_s); FM_SW_VEC3(a, SWAccParams, a_size);
  FM_SW_VEC3(a, SWAccParams, p_s); FM_SW_VEC3(a, SWAccParams, win);
  FM_SW_PTR(a, SWAccParams, acc, void*); FM_SW_PTR(a, SWAccParams, pred, const void*);
  FM_SW_PTR(a, SWAccParams, starts, const int64_t*);
  FM_SW_PTR(a, SWAccParams, fresh, const int64_t*);
  FM_SW_PTR(a, SWAccParams, g0, const float*); FM_SW_PTR(a, SWAccParams, g1, const float*);
  FM_SW_PTR(a, SWAccParams, g2, const float*); FM_SW_PTR(a, SWAccParams, wmap, const float*);
  FM_SW_PTR(a, SWAccParams, stream, void*);
  FM_SW_PTR(a, SWAccParams, widx, const int64_t*); FM_SW_PTR(a, SWAccParams, grid, const int64_t*);
  FM_SW_PTR(a, SWAccParams, count, const void*);
  FM_SW_VEC3(a, SWAccParams, grid_n); FM_SW_VEC3(a, SWAccParams, n_s);

  py::class_<SWNormParams> n(m, "SWNormParams");
  n.def(py::init([]() { SWNormParams p{}; return p; }));
  n.def_readwrite("B", &SWNormParams::B).def_readwrite("C", &SWNormParams::C);
  n.def_readwrite("acc_dtype", &SWNormParams::acc_dtype).def_readwrite("a_sb", &SWNormParams::a_sb);
  n.def_readwrite("a_sc", &SWNormParams::a_sc).def_readwrite("dst_dtype", &SWNormParams::dst_dtype);
  n.def_readwrite("d_sb", &SWNormParams::d_sb).def_readwrite("d_sc", &SWNormParams::d_sc);
  n.def_readwrite("num_threads", &SWNormParams::num_threads).def_readwrite("softmax", &SWNormParams::softmax);
  FM_SW_VEC3(n, SWNormParams, size); FM_SW_VEC3(n, SWNormParams, a_s);
  FM_SW_VEC3(n, SWNormParams, n_s); FM_SW_VEC3(n, SWNormParams, d_s);
  FM_SW_PTR(n, SWNormParams, acc, const void*); FM_SW_PTR(n, SWNormParams, count, const void*);
  FM_SW_PTR(n, SWNormParams, dst, void*); FM_SW_PTR(n, SWNormParams, stream, void*);

  py::class_<SWArgmaxParams> g(m, "SWArgmaxParams");
  g.def(py::init([]() { SWArgmaxParams p{}; return p; }));
  g.def_readwrite("B", &SWArgmaxParams::B).def_readwrite("C", &SWArgmaxParams::C);
  g.def_readwrite("acc_dtype", &SWArgmaxParams::acc_dtype).def_readwrite("a_sb", &SWArgmaxParams::a_sb);
  g.def_readwrite("a_sc", &SWArgmaxParams::a_sc).def_readwrite("dst_esize", &SWArgmaxParams::dst_esize);
  g.def_readwrite("d_sb", &SWArgmaxParams::d_sb).def_readwrite("num_threads", &SWArgmaxParams::num_threads);
  FM_SW_VEC3(g, SWArgmaxParams, size); FM_SW_VEC3(g, SWArgmaxParams, a_s);
  FM_SW_VEC3(g, SWArgmaxParams, n_s); FM_SW_VEC3(g, SWArgmaxParams, d_s);
  FM_SW_PTR(g, SWArgmaxParams, acc, const void*); FM_SW_PTR(g, SWArgmaxParams, count, const void*);
  FM_SW_PTR(g, SWArgmaxParams, dst, void*); FM_SW_PTR(g, SWArgmaxParams, stream, void*);
}
#undef FM_SW_PTR
#undef FM_SW_VEC3

}  // namespace fastmed
