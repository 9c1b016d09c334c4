"""Builds the C++ kernel library ternvlm._kernels (kernels/*.cc); metadata lives in pyproject.toml.

The library is an ordinary extension module so ``pip install [-e] .`` compiles it; Python code
loads it with ctypes through ternvlm.runtime.kernels. AVX2 code is selected at run time, so no
-march flag: the same build runs on any x86-64 (and compiles scalar-only elsewhere).
"""

import sys
from glob import glob

from setuptools import Extension, setup

if sys.platform == "win32":
    compile_args, link_args = ["/O2", "/std:c++17"], []
else:
    compile_args = ["-O3", "-std=c++17", "-fvisibility=hidden", "-ffp-contract=off", "-pthread"]
    link_args = ["-pthread"]

setup(
    ext_modules=[
        Extension(
            "ternvlm._kernels",
            sources=sorted(glob("kernels/*.cc")),
            depends=sorted(glob("kernels/*.h")),
            include_dirs=["kernels"],
            language="c++",
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
    ]
)
