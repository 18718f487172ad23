"""`llama3np doctor` (llama3np/doctor.py) and where the backend sends matrix products.

What must hold:
- doctor prints the CPU, the micro-kernel in use and those the CPU can run, the backend, where matmul
  and attention go, the threads; with timing, one GEMM and one attention line, C beside NumPy;
  a bad argument is one line on stderr and exit code 2;
- on an instruction set without a tuned micro-kernel ('portable'), backend.matmul is NumPy's product
  (bit for bit), while the attention stays on the fused C kernel; with a tuned one, products go to C;
- the instruction sets offered are the ones this CPU runs (no 'neon' on x86-64, no AVX on arm64);
- the FMA peak (kernels.fma_peak, the hardware's ceiling doctor and bench_train print) does the work it
  counts: its chains' results are the recurrence's own on every thread, and bad arguments are refused;
- the micro-kernel timed alone (kernels.microkernel_rate, beside the peak in doctor and bench_gemm) is
  timed on every instruction set and refuses bad arguments (that it computes C += A @ B on every call,
  for the FLOPs it counts, is tests/test_kernels.py's, run under the sanitizers and on arm64 too).
"""
import platform

import numpy as np
import pytest

from llama3np import backend, doctor, kernels

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"C kernels not built ({kernels.import_error})")


def test_doctor_prints_what_runs_where(capsys):
    assert doctor.main(["doctor", "--no-timing"]) == 0
    out = capsys.readouterr().out
    for field in ("cpu:", "backend:", "matmul:", "attention:", "numpy:", "environment:"):
        assert field in out, out
    if kernels.available():
        assert f"micro-kernel {kernels.isa()}" in out and f"threads:     {kernels.get_num_threads()}" in out
    assert "timing" not in out


@needs_kernels
def test_doctor_times_a_gemm_and_an_attention_against_numpy(capsys):
    assert doctor.main(["doctor", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "x NumPy" in line]
    assert len(lines) == 2 and "GEMM" in lines[0] and "attention" in lines[1], lines
    assert all("GFLOP/s" in line for line in lines)
    assert f"FMA peak ({kernels.isa()}" in out or kernels.isa() == "portable", out
    assert f"micro-kernel alone ({kernels.isa()}" in out or kernels.isa() == "portable", out


def test_doctor_refuses_a_bad_repeat_in_one_line(capsys):
    assert doctor.main(["doctor", "--repeat", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--repeat" in err[0]


@needs_kernels
def test_without_a_tuned_micro_kernel_matmul_goes_to_numpy_and_attention_stays_in_c():
    backend.set_backend("c")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((70, 50)).astype(np.float32)
    b = rng.standard_normal((50, 40)).astype(np.float32)
    kernels.set_isa("portable")
    assert not kernels.tuned_matmul()
    np.testing.assert_array_equal(backend.matmul(a, b), a @ b)
    assert "NumPy" in backend.routes()["matmul"] and "C" in backend.routes()["attention"]
    q = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    k = rng.standard_normal((1, 1, 5, 8)).astype(np.float32)
    np.testing.assert_array_equal(backend.attention_forward(q, k, k)[0], kernels.attention_forward(q, k, k)[0])
    tuned = [name for name in kernels.available_isas() if name != "portable"]
    for name in tuned:  # every SIMD kernel this CPU runs: products go to C
        kernels.set_isa(name)
        assert kernels.tuned_matmul() and backend.routes()["matmul"] == f"C, {name} micro-kernel"
        np.testing.assert_array_equal(backend.matmul(a, b), kernels.matmul(a, b))


@needs_kernels
def test_the_instruction_sets_offered_are_this_cpus():
    isas = kernels.available_isas()
    assert isas[0] == "portable" and kernels.set_isa(None) == isas[-1]
    if platform.machine() in ("x86_64", "AMD64"):
        assert "neon" not in isas
        with pytest.raises(ValueError, match="cannot run 'neon'"):
            kernels.set_isa("neon")
    elif platform.machine() in ("aarch64", "arm64"):
        assert isas == ["portable", "neon"]


# lanes x chains of each instruction set's FMA burst (csrc/peak.c); chain i starts at i + 1
FMA_CHAINS = {"avx2": (8, 12), "avx512": (16, 16), "neon": (4, 16)}


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
def test_the_fma_peak_does_the_work_it_counts(threads):
    """fma_burst reports 2 x lanes x chains x iters x threads operations: its result must be what that
    many steps of x = x * b + c give (a compiler that merged or dropped chains would change it)."""
    for name in kernels.available_isas():
        isa = kernels.ISAS.index(name)
        result = kernels.ffi.new("float *")
        if name == "portable":
            assert kernels.lib.fma_burst(isa, 100, threads, result) == 0
            assert kernels.fma_peak(seconds=0.01, isa_name=name) is None
            continue
        lanes, chains = FMA_CHAINS[name]
        iters = 1000
        assert kernels.lib.fma_burst(isa, iters, threads, result) == 2 * lanes * chains * iters * threads
        x = np.arange(1, chains + 1, dtype=np.float32)
        for _ in range(iters):  # float64 holds x * b exactly: one rounding, as the FMA's (up to a rare tie)
            x = (x.astype(np.float64) * np.float32(0.999999) + np.float32(1e-7)).astype(np.float32)
        np.testing.assert_allclose(result[0], threads * float(np.sum(x, dtype=np.float64)), rtol=1e-5)
        assert kernels.fma_peak(seconds=0.01, threads=threads, isa_name=name) > 0


@needs_kernels
@pytest.mark.parametrize("kwargs, match", [
    (dict(seconds=0), "seconds"), (dict(seconds=float("nan")), "seconds"), (dict(seconds=True), "seconds"),
    (dict(seconds="1"), "seconds"), (dict(threads=0), "threads"), (dict(threads=65), "threads"),
    (dict(threads=1.5), "threads"), (dict(isa_name="sse9"), "unknown instruction set"),
])
def test_the_fma_peak_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kernels.fma_peak(**kwargs)


@needs_kernels
def test_the_fma_peak_takes_numpy_numbers():
    peak = kernels.fma_peak(seconds=np.float32(0.01), threads=np.int64(1))
    assert peak is None if kernels.isa() == "portable" else peak > 0


@needs_kernels
def test_the_fma_peak_refuses_an_instruction_set_this_cpu_cannot_run():
    missing = [name for name in kernels.ISAS if name not in kernels.available_isas()]
    assert missing  # no CPU runs both neon and avx2
    with pytest.raises(ValueError, match="cannot run"):
        kernels.fma_peak(seconds=0.01, isa_name=missing[0])


@needs_kernels
def test_the_micro_kernel_rate_is_timed_on_every_instruction_set():
    for name in kernels.available_isas():
        rate = kernels.microkernel_rate(seconds=0.01, isa_name=name, kc=np.int64(32))
        assert 0 < rate < 1e5, (name, rate)  # GFLOP/s: finite and real, nowhere near a petaflop
    a = np.ones((6, 4), np.float32)
    assert kernels.lib.microkernel_burst(kernels.ISAS.index("portable"), 0, 1, kernels._ptr(a), kernels._ptr(a),
                                         kernels._ptr(a)) == 0  # kc < 1: nothing done, nothing read


@needs_kernels
@pytest.mark.parametrize("kwargs, match", [
    (dict(seconds=0), "seconds"), (dict(seconds=-1.0), "seconds"), (dict(kc=0), "kc"), (dict(kc=4097), "kc"),
    (dict(kc=2.5), "kc"), (dict(kc=True), "kc"), (dict(isa_name="sse9"), "unknown instruction set"),
])
def test_the_micro_kernel_rate_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kernels.microkernel_rate(**kwargs)
    if "isa_name" in kwargs:
        with pytest.raises(ValueError, match=match):
            kernels.microkernel_shape(kwargs["isa_name"])
