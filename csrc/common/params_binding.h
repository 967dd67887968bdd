// Shared pybind11 glue for DiceCEParams: pointers travel as Python ints (tensor.data_ptr()).
#pragma once
#include <pybind11/pybind11.h>
#include <cstdint>
#include <stdexcept>
#include <string>
#include "common.h"
#include "../dice_ce/dice_ce.h"

namespace fastmed {
namespace py = pybind11;

#define FM_PTR_FIELD(cls, name, type)                                                               \
  cls.def_property(                                                                                 \
      #name, [](const DiceCEParams& p) { return (uintptr_t)p.name; },                               \
      [](DiceCEParams& p, uintptr_t v) { p.name = reinterpret_cast<type>(v); })

inline void bind_dice_ce_params(py::module_& m) {
  py::class_<DiceCEParams> c(m, "DiceCEParams");
  c.def(py::init([]() { DiceCEParams p{}; return p; }));
#define FM_FIELD(name) c.def_readwrite(#name, &DiceCEParams::name)
  FM_FIELD(B); FM_FIELD(C); FM_FIELD(S);
  FM_FIELD(x_dtype); FM_FIELD(x_sb); FM_FIELD(x_sc); FM_FIELD(x_ss);
  FM_FIELD(t_dtype); FM_FIELD(label_map); FM_FIELD(t_sb); FM_FIELD(t_sc); FM_FIELD(t_ss);
  FM_FIELD(m_sb); FM_FIELD(m_ss);
  FM_FIELD(act); FM_FIELD(ce); FM_FIELD(dice); FM_FIELD(squared); FM_FIELD(soft);
  FM_FIELD(has_ignore); FM_FIELD(ignore_index);
  FM_FIELD(dx_sb); FM_FIELD(dx_sc); FM_FIELD(dx_ss);
  FM_FIELD(num_threads); FM_FIELD(force_generic); FM_FIELD(skip_ce_smooth);
#undef FM_FIELD
  FM_PTR_FIELD(c, x, const void*);
  FM_PTR_FIELD(c, t, const void*);
  FM_PTR_FIELD(c, mask, const float*);
  FM_PTR_FIELD(c, ce_weight, const float*);
  FM_PTR_FIELD(c, stats, double*);
  FM_PTR_FIELD(c, ce_out, double*);
  FM_PTR_FIELD(c, workspace, double*);
  FM_PTR_FIELD(c, bad, int64_t*);
  FM_PTR_FIELD(c, grad_stats, const double*);
  FM_PTR_FIELD(c, grad_ce, const double*);
  FM_PTR_FIELD(c, dx, void*);
  FM_PTR_FIELD(c, stream, void*);
}

inline void check_status(int status, const char* op) {
  if (status != kOk) throw std::runtime_error(std::string("fastmed::") + op + ": " + status_message(status));
}

}  // namespace fastmed
