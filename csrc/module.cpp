// The `longctx._C` extension: C++17 + OpenMP kernels for the CPU path, bound with pybind11.
#include <omp.h>

#include "bindings.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "longctx CPU kernels (C++17, OpenMP)";
  m.def("num_threads", []() { return omp_get_max_threads(); }, "OpenMP threads available to the kernels.");
  longctx::register_sparse_attention(m);
  longctx::register_index(m);
  longctx::register_hip(m);
  longctx::register_shadowkv(m);
}
