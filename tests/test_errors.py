"""Bad input raises ValueError/TypeError naming the argument and what was expected."""
import pytest
import torch

from fastxmc.losses import InfoNCELoss, info_nce, region_word_loss, supcon

A, B = torch.randn(4, 3), torch.randn(4, 3)


@pytest.mark.parametrize("call,error,match", [
    (lambda: info_nce(torch.randn(4), B), ValueError, "a must be 2-D"),
    (lambda: info_nce(A, torch.randn(4, 5)), ValueError, "b has 5 features"),
    (lambda: info_nce(A, torch.randn(6, 3)), ValueError, "pass targets= or labels="),
    (lambda: info_nce(A, B, targets=torch.tensor([0, 1, 2])), ValueError, r"targets must have shape \(4,\)"),
    (lambda: info_nce(A, B, targets=torch.tensor([0, 1, 2, 4])), ValueError, r"targets values must lie in \[0, 4\)"),
    (lambda: info_nce(A, B, targets=torch.tensor([0., 1, 2, 3])), TypeError, "targets must have an integer dtype"),
    (lambda: info_nce(A, B, labels=torch.tensor([0, 1])), ValueError, r"labels must have shape \(4,\)"),
    (lambda: info_nce(A, B, labels=torch.zeros(4, dtype=torch.long), labels_b=torch.zeros(3, dtype=torch.long)), ValueError, r"labels_b must have shape \(4,\)"),
    (lambda: info_nce(A, B, labels_b=torch.zeros(4, dtype=torch.long)), ValueError, "labels_b needs labels"),
    (lambda: info_nce(A, B, targets=torch.arange(4), labels=torch.arange(4)), ValueError, "either targets or labels"),
    (lambda: info_nce(A, B, 0.0), ValueError, "temperature must be positive"),
    (lambda: info_nce(A, B, -1.0), ValueError, "temperature must be positive"),
    (lambda: info_nce(A, B, torch.tensor(-0.1)), ValueError, "temperature must be positive"),
    (lambda: info_nce(A, B, "0.1"), TypeError, "temperature must be a positive float"),
    (lambda: info_nce(A, B, torch.ones(2)), ValueError, "temperature must be a scalar"),
    (lambda: info_nce(A.long(), B.long()), TypeError, "a must be float32"),
    (lambda: info_nce(A, B.double()), TypeError, "a is torch.float32 but b is torch.float64"),
    (lambda: info_nce(A, B, reduction="avg"), ValueError, "reduction must be one of"),
    (lambda: info_nce(A, B, reduction="none"), ValueError, "pass symmetric=False"),
    (lambda: info_nce(A, B, impl="fast"), ValueError, "unknown backend impl='fast'"),
    (lambda: info_nce([[1.0]], B), TypeError, "a must be a torch.Tensor"),
    (lambda: supcon(A, torch.tensor([0, 1, 1])), ValueError, r"labels must have shape \(4,\)"),
    (lambda: supcon(A, torch.tensor([0., 1, 1, 0])), TypeError, "labels must have an integer dtype"),
    (lambda: supcon(A.int(), torch.arange(4)), TypeError, "features must be float32"),
    (lambda: InfoNCELoss(temperature=0), ValueError, "temperature must be positive"),
    (lambda: info_nce(torch.randn(0, 3), torch.randn(0, 3)), ValueError, "a has no rows"),
    (lambda: info_nce(A, torch.randn(0, 3), targets=torch.zeros(4, dtype=torch.long)), ValueError, "b has no rows"),
    (lambda: info_nce(torch.randn(0, 3), B, targets=torch.zeros(0, dtype=torch.long)), ValueError, "a has no rows"),
    (lambda: info_nce(torch.randn(4, 0), torch.randn(4, 0)), ValueError, "a has no features"),
    (lambda: supcon(torch.randn(0, 3), torch.zeros(0, dtype=torch.long)), ValueError, "features has no rows"),
    (lambda: region_word_loss(torch.randn(0, 4, 3), torch.randn(0, 5, 3), torch.ones(0, 5, dtype=torch.bool)), ValueError, "regions has no images"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_forced_backend_that_cannot_run_lists_why():
    from fastxmc.ops.registry import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="impl='cuda'.*not cuda"):
        info_nce(A, B, impl="cuda")
    with pytest.raises(BackendUnavailableError, match="impl='triton'.*float64"):
        info_nce(A.double(), B.double(), impl="triton")


def test_triton_unavailable_reasons_say_what_to_do(monkeypatch):
    """The shared runtime check behind every Triton backend (fastxmc.ops.triton.runtime)."""
    from fastxmc.ops.triton import runtime

    if runtime.triton is None:  # no Triton at all: the import error is the reason on any device
        assert runtime.triton_unavailable_reason("cpu").startswith("triton is not importable")
        return
    assert runtime.INTERPRET  # tests/conftest.py sets TRITON_INTERPRET=1 before fastxmc is imported
    assert runtime.triton_unavailable_reason("cpu") is None
    monkeypatch.setattr(runtime, "INTERPRET", False)  # as if the variable came after the import
    assert "set it before importing fastxmc" in runtime.triton_unavailable_reason("cpu")
    monkeypatch.setattr(runtime, "interpret_env", lambda: False)
    assert "need a CUDA device, got 'cpu'" in runtime.triton_unavailable_reason("cpu")
    monkeypatch.setattr(runtime, "triton", None)
    monkeypatch.setattr(runtime, "TRITON_IMPORT_ERROR", "triton is not importable (ImportError: x)")
    assert runtime.triton_unavailable_reason("cpu").startswith("triton is not importable")
