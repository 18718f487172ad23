"""Build the C kernels into the extension module `llama3np._kernels` with cffi (API mode).

setup.py uses `ffibuilder` from here during `pip install -e .`; during development run
`python csrc/build_kernels.py` to build in place (the .so lands next to llama3np/kernels.py).
Extra flags come from LLAMA3NP_CFLAGS / LLAMA3NP_LDFLAGS (tests/sanitize.sh uses them to build with
AddressSanitizer). No -ffast-math: it would change floating point for the whole Python process.
"""
import glob
import os
import shlex
import shutil
import sys
import sysconfig

from cffi import FFI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every .c file in csrc/ (tests/scratch_build.sh takes the same), relative to ROOT as setuptools wants
SOURCES = sorted("csrc/" + os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "csrc", "*.c")))
HEADER = os.path.join(ROOT, "csrc", "llama3np_kernels.h")


def _cdef():
    """The header's declarations without the preprocessor lines (cffi's parser does not take them)."""
    with open(HEADER, encoding="utf-8") as f:
        return "".join(line for line in f if not line.lstrip().startswith("#"))


def _compile_args():
    # -fopenmp-simd only honours `#pragma omp simd` (a reduction the compiler may vectorize); it links
    # no OpenMP runtime. Apple's clang refuses OpenMP options, so on macOS the pragma is just ignored.
    if sys.platform == "win32":
        args = []
    else:
        # -fno-math-errno: sqrtf need not set errno, so loops that call it vectorize (values unchanged)
        args = ["-O3", "-fno-math-errno", "-pthread", "-Wall", "-Wno-unknown-pragmas"]
        if sys.platform != "darwin":
            args.append("-fopenmp-simd")
    return args + shlex.split(os.environ.get("LLAMA3NP_CFLAGS", ""))


def _link_args():
    args = [] if sys.platform == "win32" else ["-pthread"]
    return args + shlex.split(os.environ.get("LLAMA3NP_LDFLAGS", ""))


def make_ffibuilder(absolute_paths=False):
    """The cffi builder; setuptools wants source paths relative to the project root, while
    ffibuilder.compile runs inside its temp dir and needs them absolute."""
    def path(p):
        return os.path.join(ROOT, p) if absolute_paths else p

    builder = FFI()
    builder.cdef(_cdef())
    builder.set_source(
        "llama3np._kernels",
        '#include "llama3np_kernels.h"',
        sources=[path(s) for s in SOURCES],
        include_dirs=[path("csrc")],
        extra_compile_args=_compile_args(),
        extra_link_args=_link_args(),
    )
    return builder


ffibuilder = make_ffibuilder()  # what setup.py's cffi_modules points at


def build_inplace(tmpdir=None, verbose=False, package_dir=None):
    """Compile and copy the extension into llama3np/ (or package_dir); returns its path."""
    tmpdir = tmpdir or os.path.join(ROOT, "build", "cffi")
    built = make_ffibuilder(absolute_paths=True).compile(tmpdir=tmpdir, verbose=verbose)
    package_dir = package_dir or os.path.join(ROOT, "llama3np")
    target = os.path.join(package_dir, "_kernels" + sysconfig.get_config_var("EXT_SUFFIX"))
    tmp = target + ".tmp"
    shutil.copyfile(built, tmp)
    os.replace(tmp, target)  # atomic: a running process never sees half a library
    return target


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="build llama3np._kernels in place")
    parser.add_argument("--out", help="package directory to put the extension in (default: llama3np/)")
    parser.add_argument("--tmp", help="build directory (default: build/cffi)")
    parser.add_argument("-v", "--verbose", action="store_true")
    cli = parser.parse_args()
    print(build_inplace(tmpdir=cli.tmp, verbose=cli.verbose, package_dir=cli.out))
