"""The peers' own implementations as oracles, where their conventions coincide with ours."""
import pytest
import torch
import torch.nn.functional as F

from fastxmc.losses import info_nce, supcon
from tests.conftest import CPU_BACKENDS


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_open_clip_clip_loss(backend):
    from open_clip.loss import ClipLoss

    img = F.normalize(torch.randn(24, 16), dim=1).requires_grad_()
    txt = F.normalize(torch.randn(24, 16), dim=1).requires_grad_()
    logit_scale = torch.tensor(14.0, requires_grad=True)
    want = ClipLoss()(img, txt, logit_scale)
    want_grads = torch.autograd.grad(want, (img, txt, logit_scale))
    got = info_nce(img, txt, logit_scale.reciprocal(), normalize=False, impl=backend)
    got_grads = torch.autograd.grad(got, (img, txt, logit_scale))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pytorch_metric_learning_supcon(backend):
    from pytorch_metric_learning.losses import SupConLoss

    # PML normalizes embeddings (cosine similarity) and averages over anchors with positives.
    x = torch.randn(40, 12, requires_grad=True)
    labels = torch.randint(0, 6, (40,))
    want = SupConLoss(temperature=0.1)(x, labels)
    want_grad, = torch.autograd.grad(want, x)
    got = supcon(x, labels, 0.1, impl=backend)
    got_grad, = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pytorch_metric_learning_ntxent_on_pairs(backend):
    from pytorch_metric_learning.losses import NTXentLoss

    # NT-Xent's denominator holds the positive plus the negatives only; with exactly two samples
    # per class (two views) that is SupCon's denominator, so the two losses coincide.
    x = torch.randn(30, 8, requires_grad=True)
    labels = torch.arange(15).repeat(2)
    want = NTXentLoss(temperature=0.5)(x, labels)
    got = supcon(x, labels, 0.5, impl=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0],
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_label_guided_info_nce_is_cross_modal_supcon(backend):
    # With labels, info_nce's a->b direction is SupCon across modalities without self exclusion:
    # PML's SupConLoss on (anchors = a, references = b) has exactly that form.
    from pytorch_metric_learning.losses import SupConLoss

    a, b = torch.randn(20, 6), torch.randn(25, 6)
    la, lb = torch.randint(0, 4, (20,)), torch.randint(0, 4, (25,))
    want = SupConLoss(temperature=0.2)(a, la, ref_emb=b, ref_labels=lb)
    got = info_nce(a, b, 0.2, labels=la, labels_b=lb, symmetric=False, impl=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_supcon_single_label_batch_differs_from_pytorch_metric_learning(backend):
    # A documented convention difference (docs/losses.md): when every sample shares one label there
    # are positives but no negatives. PML counts such a batch as having no valid pairs and returns 0
    # (its own test_with_no_valid_pairs case: 2-D points at 0, 10 and 20 degrees, labels 0, 0, 0,
    # temperature 0.1); fastxmc's supcon keeps every anchor with a positive and gives 0.710.
    import math

    from pytorch_metric_learning.losses import SupConLoss

    angles = (0.0, 10.0, 20.0)
    x = torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles])
    labels = torch.zeros(3, dtype=torch.long)
    assert SupConLoss(temperature=0.1)(x, labels).item() == 0.0
    got = supcon(x, labels, 0.1, impl=backend)
    torch.testing.assert_close(got, torch.tensor(0.70997), rtol=0, atol=5e-5)
