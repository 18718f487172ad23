#!/usr/bin/env bash
# Run the kernel tests against a build of the C kernels with AddressSanitizer and
# UndefinedBehaviorSanitizer: any out-of-bounds read or write, use after free or undefined behaviour in
# csrc/ aborts the run with a report. Exit status 0 means zero reports.
#
# The sanitized library goes into a scratch copy of the package, never into llama3np/ (other
# processes may be using the normal one). Python itself is not instrumented, so libasan is preloaded;
# leak detection is off because the interpreter never frees some of its memory.
#
#   tests/sanitize.sh                 # tests/test_kernels.py and tests/test_decode_kernels.py
#   tests/sanitize.sh -k attention    # extra arguments go to pytest
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
CC="${CC:-gcc}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

cp -r "$ROOT/llama3np" "$ROOT/tests" "$ROOT/pytest.ini" "$ROOT/csrc" "$WORK/"
cp "$ROOT/setup.py" "$ROOT/pyproject.toml" "$WORK/"
rm -f "$WORK"/llama3np/_kernels*.so

SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
LLAMA3NP_CFLAGS="$SAN -O1 -g" LLAMA3NP_LDFLAGS="$SAN" \
    "$PYTHON" "$WORK/csrc/build_kernels.py" --out "$WORK/llama3np" --tmp "$WORK/build" >/dev/null

cd "$WORK"
export LD_PRELOAD="$("$CC" -print-file-name=libasan.so) $("$CC" -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export PYTHONPATH="$WORK"
# check that the instrumented library is the one imported, and that it does catch an overflow
"$PYTHON" - <<'PY'
import numpy as np, subprocess, sys
import os
import llama3np._kernels as ext
import llama3np.kernels as kn
assert kn.available() and ext.__file__.startswith(os.environ["PYTHONPATH"]), ext.__file__
print("sanitized build:", ext.__file__)
# a deliberate out-of-bounds read (calling C directly, past the Python checks) must be reported
code = ("import numpy as np; from llama3np._kernels import ffi, lib; a = np.ones((4, 4), np.float32); "
        "c = np.empty((4, 4), np.float32); p = lambda x: ffi.cast('float *', x.ctypes.data); "
        "lib.sgemm(0, 0, 4, 4, 4, p(a), 400, p(a), 4, p(c), 4, 0)")
r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
assert r.returncode != 0 and "AddressSanitizer" in r.stderr, "the sanitizer did not catch a planted overflow"
print("planted overflow caught: AddressSanitizer is active")
PY
"$PYTHON" -m pytest tests/test_kernels.py tests/test_decode_kernels.py -q -p no:cacheprovider "$@"
echo "sanitize.sh: no AddressSanitizer / UBSan reports"
