#!/usr/bin/env bash
# The C kernels beyond this machine's gcc on x86-64:
#   1. built with clang, warnings as errors (-Wall -Wextra -Werror), and the kernel tests run against
#      that build (in a scratch copy of the package: tests/scratch_build.sh);
#   2. cross-compiled with clang for arm64 (aarch64-linux-gnu: the portable micro-kernel, no x86
#      intrinsics, the aarch64 spin hint) and tests/threads_stress.c run there under qemu-aarch64:
#      every transpose against the triple loop, teams of 1-4 threads, two callers at once, attention,
#      a forked child.
# macOS cannot run here; clang on arm64 Linux is the nearest check of "builds with clang on arm64".
# Needs clang, and for part 2 Debian's gcc-aarch64-linux-gnu (the arm64 C library and start files)
# and qemu-user; without them part 2 is skipped with a message, or fails if LLAMA3NP_REQUIRE_ARM64=1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
source "$ROOT/tests/scratch_build.sh"

CC=clang LDSHARED="clang -shared" LLAMA3NP_CFLAGS="-Wextra -Werror" scratch_build
scratch_check_import "clang build:"
(cd "$WORK" && PYTHONPATH="$WORK" "$PYTHON" -m pytest tests/test_kernels.py tests/test_decode_kernels.py tests/test_attention_mask_kernels.py tests/test_elementwise_kernels.py -q -p no:cacheprovider)
echo "portability.sh: clang build (-Wall -Wextra -Werror) passes the kernel tests"

SYSROOT=/usr/aarch64-linux-gnu
if ! command -v qemu-aarch64 >/dev/null || [ ! -d "$SYSROOT" ]; then
    echo "portability.sh: qemu-aarch64 or $SYSROOT missing, arm64 part NOT run"
    [ "${LLAMA3NP_REQUIRE_ARM64:-0}" = 1 ] && exit 1
    exit 0
fi
clang --target=aarch64-linux-gnu -O2 -Wall -Wextra -Werror -pthread -I"$ROOT/csrc" \
    "$ROOT/tests/threads_stress.c" "${KERNEL_SOURCES[@]}" -lm -o "$WORK/stress_arm64"
# e_machine of the ELF header (bytes 18-19) is 183 for aarch64
"$PYTHON" -c "import sys; h = open(sys.argv[1], 'rb').read(20); assert int.from_bytes(h[18:20], 'little') == 183" \
    "$WORK/stress_arm64" || { echo "portability.sh: not an arm64 binary"; exit 1; }
qemu-aarch64 -L "$SYSROOT" "$WORK/stress_arm64"
echo "portability.sh: arm64 build (clang) passes tests/threads_stress.c under qemu-aarch64"
