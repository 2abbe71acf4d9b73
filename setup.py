"""Build of the Cython extensions: shmkv._core (ext/_core.pyx over the C core in ext/core/) and
shmkv.lsm._accel (ext/_lsm.pyx, the spill tier's hot loops).

SHMKV_DEBUG=1 builds with Cython annotation and line tracing, -O0 -g and C asserts on.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("SHMKV_DEBUG") == "1"
CORE = ["hash.c", "lock.c", "segment.c", "slab.c", "lru.c", "table.c", "verify.c", "repair.c", "btree.c"]

flags = ["-std=gnu11", "-Wall", "-Wno-unused-function"]
flags += ["-O0", "-g"] if DEBUG else ["-O2", "-DNDEBUG"]
macros = [("CYTHON_TRACE", "1")] if DEBUG else []

ext = Extension(
    "shmkv._core",
    sources=["ext/_core.pyx"] + [f"ext/core/{f}" for f in CORE],
    include_dirs=["ext", "ext/core"],
    depends=["ext/core/core.h", "ext/core/layout.h", "ext/core/btree.h", "ext/core/robust_mutex.h",
             "ext/includes/core.pxd"],
    extra_compile_args=flags,
    define_macros=macros,
    libraries=["pthread"],
)

accel = Extension(
    "shmkv.lsm._accel",
    sources=["ext/_lsm.pyx"],
    include_dirs=["ext"],
    depends=["ext/lsm/accel.h", "ext/lsm/group_commit.h", "ext/core/robust_mutex.h", "ext/includes/posix.pxd"]
    + [f"ext/lsm/{f}" for f in sorted(os.listdir("ext/lsm")) if f.endswith(".pxi")],
    extra_compile_args=flags,
    define_macros=macros,
)

setup(
    ext_modules=cythonize(
        [ext, accel],
        include_path=["ext"],
        annotate=DEBUG,
        compiler_directives={"language_level": 3, "linetrace": DEBUG},
    )
)
