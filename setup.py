"""Build of the Cython extensions: shmkv._core (ext/_core.pyx over the C core in ext/core/) and
shmkv.lsm._accel (ext/_lsm.pyx, the spill tier's hot loops).

Also the request path of the cluster (shmkv/cluster/_compiled.py, COMPILED): plain Python
modules compiled by Cython as they are, for a daemon and a client that spend most of their CPU
in the interpreter; SHMKV_PURE_PYTHON=1 builds (and imports) the sources only.

SHMKV_DEBUG=1 builds with Cython annotation and line tracing, -O0 -g and C asserts on.
"""
import ast
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
             "ext/includes/core.pxd", "ext/includes/posix.pxd"],
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


def compiled_cluster_modules() -> list:
    """shmkv/cluster/_compiled.py's COMPILED, read without importing the package (its
    dependencies need not be installed yet when this runs)."""
    tree = ast.parse(open("shmkv/cluster/_compiled.py").read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "COMPILED" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise SystemExit("shmkv/cluster/_compiled.py defines no COMPILED")


PURE = os.environ.get("SHMKV_PURE_PYTHON", "") not in ("", "0")
cluster = [] if PURE else [
    Extension(f"shmkv.cluster.{name}", [f"shmkv/cluster/{name}.py"], extra_compile_args=["-O2"])
    for name in compiled_cluster_modules()
]

setup(
    # one compiler per core: the cluster modules are ~20 C files of 0.5-2 MB
    options={"build_ext": {"parallel": os.cpu_count() or 1}},
    ext_modules=cythonize(
        [ext, accel],
        include_path=["ext"],
        annotate=DEBUG,
        compiler_directives={"language_level": 3, "linetrace": DEBUG},
    )
    # Pure-Python mode: annotations stay annotations (not C types: an `int` hint must not
    # refuse a bool or an int subclass), functions keep their Python signatures; the
    # generated C goes to build/, not beside the sources.
    + cythonize(
        cluster,
        build_dir="build/cython",
        compiler_directives={"language_level": 3, "annotation_typing": False, "binding": True},
        quiet=True,
    ),
)
