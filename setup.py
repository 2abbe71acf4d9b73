"""Build of the Cython extension shmkv._core (ext/_core.pyx over the C core in ext/core/).

SHMKV_DEBUG=1 builds with Cython annotation and line tracing, -O0 -g and C asserts on.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("SHMKV_DEBUG") == "1"
CORE = ["hash.c", "lock.c", "segment.c", "slab.c", "lru.c", "table.c", "verify.c"]

flags = ["-std=gnu11", "-Wall", "-Wno-unused-function"]
flags += ["-O0", "-g"] if DEBUG else ["-O2", "-DNDEBUG"]
macros = [("CYTHON_TRACE", "1")] if DEBUG else []

ext = Extension(
    "shmkv._core",
    sources=["ext/_core.pyx"] + [f"ext/core/{f}" for f in CORE],
    include_dirs=["ext", "ext/core"],
    depends=["ext/core/core.h", "ext/core/layout.h", "ext/includes/core.pxd", "ext/_core.pxd"],
    extra_compile_args=flags,
    define_macros=macros,
    libraries=["pthread"],
)

setup(
    ext_modules=cythonize(
        [ext],
        include_path=["ext"],
        annotate=DEBUG,
        compiler_directives={"language_level": 3, "linetrace": DEBUG},
    )
)
