"""The one compiled part of deltakit: the fused merge kernels (deltakit/engine/_fused.c, loaded through ctypes).

``optional``: without a C compiler the install goes on and deltakit runs the same arithmetic as torch operations
(deltakit/engine/fused.py)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("deltakit.engine._fused", ["deltakit/engine/_fused.c"], optional=True,
                             extra_compile_args=["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp-simd"], libraries=["m"])])
