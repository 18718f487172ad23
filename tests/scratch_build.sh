# Sourced by tests/sanitize.sh and tests/portability.sh (needs ROOT, PYTHON and WORK set): a scratch
# copy of the package in $WORK whose C kernels are built with other flags or another compiler, never
# touching llama3np/ (other processes may be using the normal build).

KERNEL_SOURCES=("$ROOT"/csrc/*.c)  # every .c file in csrc/, as csrc/build_kernels.py builds

# Copy the package into $WORK and build its kernels there; CC, LDSHARED, LLAMA3NP_CFLAGS and
# LLAMA3NP_LDFLAGS in the environment choose the compiler and flags.
scratch_build() {
    cp -r "$ROOT/llama3np" "$ROOT/tests" "$ROOT/pytest.ini" "$ROOT/csrc" "$ROOT/setup.py" "$ROOT/pyproject.toml" "$WORK/"
    rm -f "$WORK"/llama3np/_kernels*.so
    "$PYTHON" "$WORK/csrc/build_kernels.py" --out "$WORK/llama3np" --tmp "$WORK/build" >/dev/null
}

# Fail unless Python in $WORK imports the scratch build (not an installed one); prints its path.
scratch_check_import() {
    (cd "$WORK" && PYTHONPATH="$WORK" "$PYTHON" -c "
import os, llama3np._kernels as ext, llama3np.kernels as kn
assert kn.available() and ext.__file__.startswith(os.environ['PYTHONPATH']), ext.__file__
print('$1', ext.__file__)")
}
