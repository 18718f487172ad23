"""Shared test setup: hypothesis profiles and the optional reference packages.

Profiles: `ci` is derandomised (the same examples on every run) with no deadline, so a loaded
2-core CI machine never fails a test for being slow; `dev` explores new examples each run.
CI (CI=true) uses `ci`; set HYPOTHESIS_PROFILE to choose.
"""
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=25, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
settings.register_profile(
    "dev", deadline=None, max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="session")
def torch():
    """PyTorch, or a skip with the reason: it is a test reference only (the `[ref]` extra)."""
    return pytest.importorskip("torch", reason="PyTorch is a reference only: pip install -e '.[ref]'")


@pytest.fixture(scope="session")
def transformers():
    pytest.importorskip("torch", reason="transformers needs PyTorch: pip install -e '.[ref]'")
    return pytest.importorskip("transformers", reason="transformers is a reference only: pip install -e '.[ref]'")


@pytest.fixture(autouse=True)
def _restore_kernel_settings():
    """A test may force an ISA, a thread count or a backend: every test starts from the same settings,
    so no test's result depends on the ones that ran before it in the same process."""
    from llama3np import backend, kernels

    saved = (kernels.isa(), kernels.get_num_threads()) if kernels.available() else None
    be = backend.get_backend()
    yield
    if saved is not None:
        kernels.set_isa(saved[0])
        kernels.set_num_threads(saved[1])
    backend.set_backend(be)
