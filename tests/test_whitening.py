"""SentenceWhitening (fastxmc.models.whitening): the fitted map, its errors, and its use by G and D."""
import pytest
import torch

from fastxmc.models import Discriminator, Generator
from fastxmc.models.whitening import SentenceWhitening

DIM = 6


def _anisotropic(n=500, seed=0):
    """Sentences sharing one big common direction, with a few percent of variance in others."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.1, 0.03])
    basis, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen))
    return (torch.randn(n, DIM, generator=gen) * scales) @ basis.T + 5.0


def test_fit_whitens_within_the_shrinkage_and_keeps_the_total_variance():
    s = _anisotropic().double()
    w = SentenceWhitening(DIM).double().fit(s, shrinkage=1e-9)
    out = w(s)
    torch.testing.assert_close(out.mean(0), torch.zeros(DIM, dtype=torch.float64), atol=1e-9, rtol=0)
    cov = torch.cov(out.T)
    # identity covariance up to one scale factor, which keeps E||s - mean||^2
    scale = torch.trace(torch.cov(s.T)) / DIM
    torch.testing.assert_close(cov, torch.eye(DIM, dtype=torch.float64) * scale, atol=1e-4 * scale, rtol=0)
    # ZCA: symmetric, so the whitened vectors stay as close as possible to the centred ones
    torch.testing.assert_close(w.matrix, w.matrix.T)


def test_shrinkage_bounds_the_gain_of_directions_the_data_hardly_varies_in():
    s = _anisotropic().double()
    gains = []
    for shrinkage in (1e-9, 1e-2, 1.0):
        w = SentenceWhitening(DIM).double().fit(s, shrinkage=shrinkage)
        evals = torch.linalg.eigvalsh(torch.cov(w(s).T))
        gains.append((evals[-1] / evals[0]).item())   # condition number after the map
    assert gains[0] < 1.01 and gains[0] < gains[1] < gains[2]


def test_identity_before_fit_and_the_state_travels_in_state_dict():
    w = SentenceWhitening(DIM)
    x = torch.randn(3, DIM)
    torch.testing.assert_close(w(x), x)
    w.fit(_anisotropic())
    other = SentenceWhitening(DIM)
    other.load_state_dict(w.state_dict())
    torch.testing.assert_close(other(x), w(x))
    assert sum(p.numel() for p in w.parameters()) == 0    # buffers only: nothing trains


def test_fit_errors_name_the_argument():
    w = SentenceWhitening(DIM)
    with pytest.raises(ValueError, match=r"sentences must have shape \(N, 6\), got \(4, 5\)"):
        w.fit(torch.randn(4, 5))
    with pytest.raises(ValueError, match="at least 2 sentences"):
        w.fit(torch.randn(1, DIM))
    with pytest.raises(ValueError, match="shrinkage must be positive"):
        w.fit(torch.randn(4, DIM), shrinkage=0.0)


def test_generator_and_discriminator_read_the_whitened_sentence():
    text_dim, s = DIM, _anisotropic(8)
    words, mask = torch.randn(8, 4, text_dim), torch.ones(8, 4, dtype=torch.bool)
    z = torch.randn(8, 16)
    torch.manual_seed(0)
    G = Generator(32, text_dim, z_dim=16, width=4, whiten_sentence=True).eval()
    D = Discriminator(32, text_dim, width=4, whiten_sentence=True).eval()
    torch.manual_seed(0)
    G_plain = Generator(32, text_dim, z_dim=16, width=4).eval()
    D_plain = Discriminator(32, text_dim, width=4).eval()
    # unfitted: the identity, so the same networks as without the option
    torch.testing.assert_close(G(z, s, words, mask), G_plain(z, s, words, mask))
    for net in (G, D):
        net.whitening.fit(_anisotropic(seed=1))
    fitted = G.whitening(s)
    torch.testing.assert_close(G(z, s, words, mask), G_plain(z, fitted, words, mask))
    images = G(z, s, words, mask).detach()
    torch.testing.assert_close(D(images, s).sentence, D_plain.sentence_proj(fitted))
