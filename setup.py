"""Build script for the C++ extension ``longctx._C`` (C++17 + OpenMP, pybind11, no torch headers).

All metadata lives in ``pyproject.toml``; this file only declares the extension.
"""
import glob
import os
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


def _openmp_flags():
    if sys.platform == "darwin":
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


compile_omp, link_omp = _openmp_flags()
extra_compile = ["-O3", *compile_omp]
if os.environ.get("LONGCTX_NATIVE", "1") == "1" and sys.platform.startswith("linux"):
    extra_compile.append("-march=native")

ext_modules = [
    Pybind11Extension(
        "longctx._C",
        sorted(glob.glob("csrc/*.cpp")),
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=extra_compile,
        extra_link_args=link_omp,
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
