"""The Triton similarity-LSE kernels beyond the oracle sweep of test_similarity_lse.py: the opt-in
atomic variant's contract."""
import warnings

import pytest
import torch

from fastxmc.ops.infonce import registry, request_for, similarity_lse


def _loss_and_grads(backend, a, b, scale):
    row, col = similarity_lse(a, b, scale, backend=backend)
    return torch.autograd.grad(row.sum() + col.sum(), (a, b, scale))


def _leaves(n, m, d, dtype=torch.float32):
    a = torch.randn(n, d, dtype=dtype, requires_grad=True)
    b = torch.randn(m, d, dtype=dtype, requires_grad=True)
    return a, b, torch.tensor(1.3, requires_grad=True)


def test_atomic_variant_is_never_chosen_automatically():
    for order in registry.priority.values():
        assert "triton-atomic" not in order
    assert registry.select(request_for(torch.device("cpu"), torch.float32),
                           impl="triton-atomic") == "triton-atomic"


def test_atomic_backward_alerts_under_deterministic_algorithms():
    a, b, scale = _leaves(9, 7, 4)
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="triton-atomic.*not deterministic"):
            _loss_and_grads("triton-atomic", a, b, scale)
        _loss_and_grads("triton", a, b, scale)   # the default kernels have no atomics
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="not deterministic"):
            _loss_and_grads("triton-atomic", a, b, scale)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _loss_and_grads("triton-atomic", a, b, scale)
