"""info_nce / supcon of every backend against the materialized reference and fp64."""
import pytest
import torch

from fastxmc.losses import InfoNCELoss, SupConLoss, info_nce, supcon
from fastxmc.reference.infonce import info_nce_reference, supcon_reference
from tests.conftest import CPU_BACKENDS


def _leaf(x, dtype=None):
    return x.detach().to(dtype or x.dtype).requires_grad_()


def _grads(loss_fn, *tensors):
    leaves = [_leaf(t) for t in tensors]
    loss = loss_fn(*leaves)
    return [loss.detach()] + list(torch.autograd.grad(loss, leaves))


def _assert_all_close(got, want, tol, names):
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


# Cases: (N, M, kwargs builder). Labels with a class that has no partner in the other set, so some
# anchors have no positive; targets with N != M and columns that are nobody's target.
def _case(name, n, m):
    if name == "diagonal":
        return {}
    if name == "targets":
        return {"targets": torch.randint(0, m, (n,))}
    if name == "labels":
        return {"labels": torch.randint(0, 3, (n,))}
    if name == "labels_ab":
        return {"labels": torch.randint(0, 4, (n,)), "labels_b": torch.randint(1, 5, (m,))}
    raise AssertionError(name)


CASES = [("diagonal", 1, 1), ("diagonal", 37, 37), ("targets", 1, 5), ("targets", 23, 9),
         ("labels", 1, 1), ("labels", 29, 29), ("labels_ab", 17, 40)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case,n,m", CASES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_info_nce_matches_fp64(backend, case, n, m, symmetric):
    a, b = torch.randn(n, 12), torch.randn(m, 12)
    t = torch.tensor(0.3)
    kw = _case(case, n, m)

    def run(impl):
        return lambda a, b, t: info_nce(a, b, t, symmetric=symmetric, impl=impl, **kw)

    want = _grads(lambda a, b, t: info_nce_reference(a, b, t, symmetric=symmetric, **kw),
                  a.double(), b.double(), t.double())
    got = _grads(run(backend), a, b, t)
    _assert_all_close(got, want, 3e-5, ["loss", "grad_a", "grad_b", "grad_temperature"])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(backend, reduction):
    a, b = torch.randn(19, 6), torch.randn(19, 6)
    labels = torch.tensor([0, 1, 2, 3] * 4 + [7, 8, 9])  # the last three have no positive but themselves
    kw = dict(labels=labels, symmetric=False, reduction=reduction)
    want = info_nce_reference(a.double(), b.double(), 0.2, **kw)
    got = info_nce(a, b, 0.2, impl=backend, **kw)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    base_a, base_b = torch.randn(12, 40), torch.randn(40, 12)
    a, b = base_a[::2, ::3], base_b.T[::2, ::3]  # strided rows and columns, transposed storage
    assert not a.is_contiguous() and not b.is_contiguous()
    want = _grads(lambda a, b: info_nce_reference(a, b, 0.1), a.double(), b.double())
    got = _grads(lambda a, b: info_nce(a, b, 0.1, impl=backend), a, b)
    _assert_all_close(got, want, 3e-5, ["loss", "grad_a", "grad_b"])


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_bounded_by_reference(backend, dtype):
    # flash-attn's rule: |fused - ref_fp64| <= 2 |ref_lowprec - ref_fp64| + floor, for every output.
    a, b = torch.randn(33, 24), torch.randn(33, 24)
    labels = torch.randint(0, 5, (33,))
    t = torch.tensor(0.25)
    exact = _grads(lambda a, b, t: info_nce_reference(a, b, t, labels=labels), a.double(),
                   b.double(), t.double())
    low_ref = _grads(lambda a, b, t: info_nce_reference(a, b, t, labels=labels), a.to(dtype),
                     b.to(dtype), t)
    fused = _grads(lambda a, b, t: info_nce(a, b, t, labels=labels, impl=backend), a.to(dtype),
                   b.to(dtype), t)
    for name, f, r, e in zip(["loss", "grad_a", "grad_b", "grad_t"], fused, low_ref, exact):
        assert f.dtype == r.dtype, name
        bound = 2 * (r.double() - e).abs() + 1e-2 * e.abs().max() + 1e-6
        err = (f.double() - e).abs()
        assert bool((err <= bound).all()), f"{name}: max excess {(err - bound).max():.3g}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,classes", [(1, 1), (2, 1), (31, 4), (40, 25)])
def test_supcon_matches_fp64(backend, n, classes):
    f = torch.randn(n, 10)
    labels = torch.randint(0, classes, (n,))
    t = torch.tensor(0.1)
    want = _grads(lambda f, t: supcon_reference(f, labels, t), f.double(), t.double())
    got = _grads(lambda f, t: supcon(f, labels, t, impl=backend), f, t)
    _assert_all_close(got, want, 3e-5, ["loss", "grad_features", "grad_temperature"])


def test_supcon_without_any_positive_is_zero_with_zero_gradient():
    f = torch.randn(4, 3, requires_grad=True)
    loss = supcon(f, torch.arange(4), impl="cpu")
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(f.grad) == 0


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_fp64_gradcheck_of_losses(backend):
    a = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    assert torch.autograd.gradcheck(lambda a, b, t: info_nce(a, b, t, labels=labels, impl=backend),
                                    (a, b, t))
    assert torch.autograd.gradcheck(lambda a, t: supcon(a, labels, t, impl=backend), (a, t))


def test_normalize_false_uses_raw_dot_products():
    a, b = torch.randn(9, 4), torch.randn(9, 4)
    want = info_nce_reference(a, b, 2.0, normalize=False)
    torch.testing.assert_close(info_nce(a, b, 2.0, normalize=False, impl="cpu"), want)


def test_modules_with_learnable_scale():
    a, b = torch.randn(16, 8), torch.randn(16, 8)
    loss_fn = InfoNCELoss(temperature=0.07, learnable=True)
    loss = loss_fn(a, b)
    loss.backward()
    assert loss_fn.logit_scale.grad is not None and loss_fn.logit_scale.grad.abs() > 0
    torch.testing.assert_close(loss.detach(), info_nce_reference(a, b, 0.07), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        loss_fn.logit_scale.fill_(10.0)  # exp(10) > 100: clamped like CLIP
    assert float(loss_fn.temperature().detach()) == pytest.approx(0.01)
    labels = torch.randint(0, 3, (16,))
    torch.testing.assert_close(SupConLoss(0.2)(a, labels), supcon_reference(a, labels, 0.2))


def test_environment_variable_forces_backend(monkeypatch):
    from fastxmc.ops.registry import BackendUnavailableError

    monkeypatch.setenv("FASTXMC_IMPL", "cuda")
    with pytest.raises(BackendUnavailableError, match="FASTXMC_IMPL='cuda'.*not cuda"):
        info_nce(torch.randn(3, 2), torch.randn(3, 2))
    monkeypatch.setenv("FASTXMC_IMPL", "torch")
    info_nce(torch.randn(3, 2), torch.randn(3, 2))


def test_automatic_choice_on_cpu_takes_the_reference_only_for_small_local_calls(monkeypatch):
    """Below SMALL_CPU_LOGITS the materialized reference is faster than the C++ kernels (which
    recompute the GEMM in the backward); above it, or when forced, the kernels run."""
    from fastxmc.losses import infonce as losses_infonce
    from fastxmc.ops import infonce as ops_infonce
    from fastxmc.ops.registry import IMPL_ENV

    monkeypatch.delenv(IMPL_ENV, raising=False)
    cpu, limit = torch.device("cpu"), ops_infonce.SMALL_CPU_LOGITS
    select = ops_infonce.registry.select
    assert select(ops_infonce.request_for(cpu, torch.float32, limit)) == "reference"
    assert select(ops_infonce.request_for(cpu, torch.float32, limit + 1)) == "cpu"
    assert select(ops_infonce.request_for(cpu, torch.float32, None)) == "cpu"   # global negatives
    assert select(ops_infonce.request_for(cpu, torch.float32, 16), impl="cpu") == "cpu"
    monkeypatch.setenv(IMPL_ENV, "torch")
    assert select(ops_infonce.request_for(cpu, torch.float32, 16)) == "torch"
    monkeypatch.delenv(IMPL_ENV)
    # The losses pass their local N x M: record what each call asked for.
    seen = []
    real = losses_infonce._choose_backend

    def spy(device, dtype, impl, logits=None):
        seen.append(logits)
        return real(device, dtype, impl, logits)
    monkeypatch.setattr(losses_infonce, "_choose_backend", spy)
    a, b = torch.randn(6, 4), torch.randn(5, 4)
    torch.testing.assert_close(info_nce(a, b, 0.1, targets=torch.arange(6) % 5),
                               info_nce(a, b, 0.1, targets=torch.arange(6) % 5, impl="cpu"))
    supcon(a, torch.tensor([0, 1, 0, 1, 2, 2]))
    assert seen == [30, 30, 36]
