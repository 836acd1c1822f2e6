// Registration hooks: each csrc/*.cpp source exposes one `register_*` function that
// adds its functions to the `longctx._C` module; module.cpp calls them all.
#pragma once
#include <pybind11/pybind11.h>

namespace longctx {
void register_sparse_attention(pybind11::module_& m);
void register_index(pybind11::module_& m);
void register_hip(pybind11::module_& m);
void register_shadowkv(pybind11::module_& m);
}  // namespace longctx
