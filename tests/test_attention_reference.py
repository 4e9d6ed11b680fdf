"""The oracles of the attention/modulation ops against independent per-pair loops written from the
XMC-GAN reference code's formulas (so the oracle every backend is tested against is itself checked)."""
import pytest
import torch
import torch.nn.functional as F

from fastxmc.losses import region_word_loss
from fastxmc.ops import modulated_batch_norm, word_attention


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _pair_similarity(regions_i, words_j, g1, g2):
    r = _unit(regions_i)
    attn = torch.softmax(g1 * _unit(words_j) @ r.T, dim=1)       # over regions
    context = attn @ r
    return torch.logsumexp(g2 * F.cosine_similarity(words_j, context, dim=-1), 0) / g2


def _loop_region_word_loss(regions, words, mask, g1=5.0, g2=5.0, g3=50.0):
    b = regions.shape[0]
    s = torch.stack([torch.stack([_pair_similarity(regions[i], words[j][mask[j]], g1, g2)
                                  for j in range(b)]) for i in range(b)])
    target = torch.arange(b)
    return F.cross_entropy(g3 * s, target) + F.cross_entropy(g3 * s.T, target)


@pytest.mark.parametrize("gammas", [(5.0, 5.0, 50.0), (2.0, 7.0, 10.0)])
def test_region_word_reference_matches_pairwise_loop(gammas):
    torch.manual_seed(0)
    regions = torch.randn(4, 6, 8, dtype=torch.float64)
    words = torch.randn(4, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 1]]).bool()
    g1, g2, g3 = gammas
    got = region_word_loss(regions, words, mask, gamma1=g1, gamma2=g2, gamma3=g3, impl="reference")
    torch.testing.assert_close(got, _loop_region_word_loss(regions, words, mask, g1, g2, g3))


def test_region_word_padding_values_do_not_matter():
    torch.manual_seed(1)
    regions, words = torch.randn(3, 4, 8), torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).bool()
    changed = words.clone()
    changed[~mask] = 100 * torch.randn(int((~mask).sum()), 8)
    zeros = words.masked_fill(~mask[..., None], 0.0)
    base = region_word_loss(regions, words, mask, impl="reference")
    torch.testing.assert_close(region_word_loss(regions, changed, mask, impl="reference"), base)
    torch.testing.assert_close(region_word_loss(regions, zeros, mask, impl="reference"), base)


def test_word_attention_reference_matches_loop():
    torch.manual_seed(2)
    queries, words = torch.randn(2, 7, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    got = word_attention(queries, words, mask, rho=15.0, impl="reference")
    for b in range(2):
        w = _unit(words[b][mask[b]])
        expected = torch.softmax(15.0 * _unit(queries[b]) @ w.T, dim=1) @ w   # over words
        torch.testing.assert_close(got[b], expected)


@pytest.mark.parametrize("per_pixel", [False, True])
def test_modulated_bn_reference_matches_formula(per_pixel):
    torch.manual_seed(3)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    shape = x.shape if per_pixel else x.shape[:2]
    gamma, beta = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    got = modulated_batch_norm(x, gamma, beta, mean, var, relu=True, impl="reference")
    mu = x.mean(dim=(0, 2, 3), keepdim=True)
    biased = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    g = gamma if per_pixel else gamma[:, :, None, None]
    b = beta if per_pixel else beta[:, :, None, None]
    torch.testing.assert_close(got, torch.relu((x - mu) / torch.sqrt(biased + 1e-5) * (1 + g) + b))
    torch.testing.assert_close(mean, 0.1 * mu.flatten())
    torch.testing.assert_close(var, 0.9 + 0.1 * x.var(dim=(0, 2, 3), unbiased=True))


def test_all_padding_caption_is_a_clear_error():
    regions, words = torch.randn(2, 4, 8), torch.randn(2, 3, 8)
    mask = torch.tensor([[1, 0, 0], [0, 0, 0]]).bool()
    with pytest.raises(ValueError, match=r"word_mask: captions \[1\]"):
        region_word_loss(regions, words, mask)
    with pytest.raises(ValueError, match="word_mask"):
        word_attention(torch.randn(2, 5, 8), words, mask)
