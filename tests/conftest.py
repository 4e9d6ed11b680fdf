"""Test setup: Triton kernels run in the interpreter on CPU tensors (must be set before import)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastxmc import _extension  # noqa: E402

# Backends that run on this machine's CPU tensors. The fused "cpu" backend needs the extension,
# which `make test` always builds: a missing build stops the session instead of skipping tests.
CPU_BACKENDS = ["reference", "torch", "cpu", "triton"]
FUSED_CPU_BACKENDS = ["torch", "cpu", "triton"]
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                                  reason="needs a CUDA GPU (none on this machine)")


def pytest_sessionstart(session):
    if not _extension.extension_loaded():
        raise pytest.UsageError(f"fastxmc extension missing: {_extension.extension_error()}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
