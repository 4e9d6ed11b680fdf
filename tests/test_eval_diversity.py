"""fastxmc.eval.diversity: precision / recall / density / coverage on inputs with known answers,
the per-caption spread across noise, and the grouping of real images.

Tolerances for finite samples (N = M = 1000 2-D standard normals, k = 3 / 5; measured over 200
independent draws): precision and recall of two draws of one distribution average 0.979 with a
std of 0.006 (the binomial bound sqrt(p (1 - p) / M) is 0.0045; the radii add the rest), so
``>= 0.94`` is over 6 std below the mean; density (expectation exactly 1) has a std of 0.017:
``1 +- 0.1``; coverage (expectation ``expected_coverage`` = 0.969) a std of 0.008: ``+- 0.05``.
Fakes from one of two equal, far-apart modes: precision 0.975 (std 0.009), recall 0.489 (half the
within-mode recall; std 0.004), coverage 0.498 (std 0.002), density 1.00 (std 0.019).
"""
import numpy as np
import pytest
import torch
from torch import nn

from fastxmc.eval.diversity import (SpreadMeter, density_coverage, element_spread, expected_coverage,
                                    generate_across_z, kth_neighbour_distances, pairwise_distances,
                                    prdc, precision_recall, real_spread_groups, z_spread)
from fastxmc.train.samples import SampleSet


def _normal(n, d, seed, shift=0.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def _two_modes(n, seed):
    """Half the rows around (20, 0), half around the origin: two far-apart unit Gaussians."""
    x = _normal(n, 2, seed)
    x[: n // 2, 0] += 20.0
    return x


def _reference(real, fake, k_pr=3, k_dc=5):
    """Independent route: full distance matrices from torch.cdist without the matrix-product trick."""
    def radii(a, k):
        d = torch.cdist(a, a, compute_mode="donot_use_mm_for_euclid_dist")
        return d.sort(1).values[:, k]   # column 0 is the row itself

    d = torch.cdist(fake, real, compute_mode="donot_use_mm_for_euclid_dist")   # (M, N)
    r_pr, r_dc, f_pr = radii(real, k_pr), radii(real, k_dc), radii(fake, k_pr)
    return {"precision": (d <= r_pr[None]).any(1).double().mean().item(),
            "recall": (d <= f_pr[:, None]).any(0).double().mean().item(),
            "density": (d <= r_dc[None]).sum().item() / (k_dc * fake.shape[0]),
            "coverage": (d.min(0).values <= r_dc).double().mean().item()}


# ---------------------------------------------------------------------------- distances
def test_pairwise_distances_match_cdist():
    a, b = _normal(37, 5, 0), _normal(11, 5, 1, shift=3.0)
    torch.testing.assert_close(pairwise_distances(a, b), torch.cdist(a, b), rtol=1e-10, atol=1e-10)
    assert pairwise_distances(a, a).diagonal().abs().max() < 1e-6


def test_kth_neighbour_distances_counts_duplicates_and_excludes_the_row_itself():
    x = torch.tensor([[0.0], [0.0], [1.0], [3.0]])
    torch.testing.assert_close(kth_neighbour_distances(x, 1), torch.tensor([0.0, 0.0, 1.0, 2.0],
                                                                          dtype=torch.float64))
    torch.testing.assert_close(kth_neighbour_distances(x, 2, chunk_size=1),
                               torch.tensor([1.0, 1.0, 1.0, 3.0], dtype=torch.float64))


# ---------------------------------------------------------------------------- manifold metrics
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_prdc_matches_a_direct_computation_at_any_chunk_size(chunk_size):
    real, fake = _normal(300, 6, 0), _normal(220, 6, 1, shift=0.4)
    got = prdc(real, fake, chunk_size=chunk_size)
    want = _reference(real, fake)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert (got["k_pr"], got["k_dc"], got["n_real"], got["n_fake"]) == (3, 5, 300, 220)
    assert precision_recall(real, fake, chunk_size=chunk_size) == \
        {"precision": got["precision"], "recall": got["recall"]}
    assert density_coverage(real, fake, chunk_size=chunk_size) == \
        {"density": got["density"], "coverage": got["coverage"]}
    assert prdc(real.float().numpy(), fake.float().numpy())["n_fake"] == 220   # numpy, float32


def test_identical_fakes_have_zero_recall():
    real = _normal(500, 16, 0)
    # One real image, 500 times: the fakes' k-NN balls have radius 0, so they hold that image only.
    copies = prdc(real, real[:1].repeat(500, 1))
    assert copies["recall"] == 1 / 500 and copies["precision"] == 1.0
    assert copies["coverage"] < 0.05
    # The centre of the Gaussian, 500 times: no real image is recalled. It lies in many real
    # balls (density far above 1, coverage 0.15 in 16-D), which recall does not reward.
    centre = prdc(real, real.mean(0, keepdim=True).repeat(500, 1))
    assert centre["recall"] == 0.0 and centre["precision"] == 1.0 and centre["density"] > 5


def test_two_draws_of_one_distribution():
    real, fake = _normal(1000, 2, 0), _normal(1000, 2, 1)
    out = prdc(real, fake)
    assert out["precision"] >= 0.94 and out["recall"] >= 0.94
    assert out["density"] == pytest.approx(1.0, abs=0.1)
    assert out["coverage"] == pytest.approx(expected_coverage(1000, 1000), abs=0.05)
    assert expected_coverage(1000, 1000) == pytest.approx(1 - 2 ** -5, abs=2e-3)


def test_density_and_coverage_expectations_over_repeated_draws():
    """The exact expectations: density 1, coverage ``expected_coverage``; the means of 20 draws of
    N = M = 500 have stds of about 0.006 and 0.003 (per-draw stds 0.025 and 0.012)."""
    runs = [density_coverage(_normal(500, 3, 2 * s), _normal(500, 3, 2 * s + 1)) for s in range(20)]
    assert np.mean([r["density"] for r in runs]) == pytest.approx(1.0, abs=0.03)
    assert np.mean([r["coverage"] for r in runs]) == pytest.approx(expected_coverage(500, 500), abs=0.012)


def test_fakes_from_one_of_two_modes():
    real, fake = _two_modes(1000, 0), _normal(1000, 2, 1)    # fakes: the origin mode only
    out = prdc(real, fake)
    assert out["precision"] >= 0.94
    assert out["recall"] == pytest.approx(0.49, abs=0.03)
    assert out["coverage"] == pytest.approx(0.5 * expected_coverage(500, 1000), abs=0.02)
    assert out["density"] == pytest.approx(1.0, abs=0.1)
    # The other way round: fakes over both modes, reals in one: half the fakes are off-manifold.
    swapped = prdc(fake, real)
    assert swapped["precision"] == pytest.approx(0.49, abs=0.03) and swapped["recall"] >= 0.94
    assert swapped["density"] == pytest.approx(0.5, abs=0.05)


def test_manifold_metric_errors_name_the_argument():
    real, fake = _normal(10, 3, 0), _normal(10, 3, 1)
    with pytest.raises(ValueError, match="k_dc=10 needs more than 10 rows of real"):
        prdc(real, fake, k_dc=10)
    with pytest.raises(ValueError, match="k_pr=3 needs more than 3 rows of fake"):
        prdc(real, fake[:3])
    with pytest.raises(ValueError, match="k_pr must be a positive int"):
        prdc(real, fake, k_pr=0)
    with pytest.raises(ValueError, match="same width"):
        prdc(real, fake[:, :2])
    with pytest.raises(ValueError, match="real must be 2-D"):
        prdc(real[0], fake)
    with pytest.raises(ValueError, match="fake contains NaN"):
        prdc(real, fake * float("nan"))
    with pytest.raises(ValueError, match="fake has no rows"):
        density_coverage(real, fake[:0])
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        prdc(real, fake, chunk_size=0)
    with pytest.raises(TypeError, match="real must be a torch.Tensor"):
        prdc(real.tolist(), fake)


# ---------------------------------------------------------------------------- spread
def test_element_spread_is_the_mean_ddof1_std():
    groups = torch.randn(3, 5, 2, 4, 4)
    want = groups.double().std(1).flatten(1).mean(1)
    torch.testing.assert_close(element_spread(groups), want)
    assert element_spread(torch.ones(2, 4, 3, 8, 8)).abs().max() == 0
    with pytest.raises(ValueError, match="group must have shape"):
        element_spread(torch.ones(2, 1, 3))


def test_spread_meter_averages_groups_in_pixels_and_features():
    meter = SpreadMeter({"mean_rgb": lambda images: images.mean((2, 3))})
    a, b = torch.rand(4, 3, 8, 8), torch.rand(2, 3, 3, 8, 8)
    meter.update(a)                  # one group of 4
    meter.update(b)                  # two groups of 3
    out = meter.compute()
    pixels = (element_spread(a[None]).sum() + element_spread(b).sum()) / 3
    feats = (element_spread(a.mean((2, 3))[None]).sum() + element_spread(b.mean((3, 4))).sum()) / 3
    assert out["groups"] == 3
    assert out["pixels"] == pytest.approx(float(pixels)) and out["mean_rgb"] == pytest.approx(float(feats))
    assert SpreadMeter().compute() == {"pixels": None, "groups": 0}
    with pytest.raises(ValueError, match="images must have shape"):
        meter.update(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="'pixels'"):
        SpreadMeter({"pixels": lambda images: images})


class _ToyGenerator(nn.Module):
    """Images 0.5 + scale * z[:, 0] + 0.01 * sentence[:, :1], filling every pixel; z_dim 4."""
    z_dim = 4

    def __init__(self, scale):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=False)

    def forward(self, z, sentence, words, word_mask):
        value = 0.5 + self.scale * z[:, 0] + 0.01 * sentence[:, 0]
        return value[:, None, None, None].expand(-1, 3, 6, 6)


def _captions(n, dim=8, tokens=5):
    g = torch.Generator().manual_seed(1)
    return SampleSet([f"caption {i}" for i in range(n)], torch.randn(n, dim, generator=g),
                     torch.randn(n, tokens, dim, generator=g), torch.ones(n, tokens, dtype=torch.bool),
                     torch.zeros(n, 4))


def test_z_spread_is_zero_when_g_ignores_z():
    out = z_spread(_ToyGenerator(0.0), _captions(6), n_z=5, features={"f": lambda x: x.mean((2, 3))})
    assert out == {"pixels": 0.0, "f": 0.0}


def test_z_spread_measures_the_std_across_z_independently_of_the_batch():
    captions, n_z, seed = _captions(10), 8, 3
    z = torch.randn(10, n_z, 4, generator=torch.Generator().manual_seed(seed))
    want = float((0.1 * z[..., 0].double()).std(1).mean())   # every pixel is 0.5 + 0.1 z0 (+ const)
    spreads = [z_spread(_ToyGenerator(0.1), captions, n_z, seed=seed, batch_size=b,
                        features={"f": lambda x: x.mean((2, 3))}) for b in (1, 7, 64)]
    for out in spreads:
        assert out["pixels"] == pytest.approx(want, rel=1e-5)
        assert out["f"] == pytest.approx(want, rel=1e-5)
    assert z_spread(_ToyGenerator(0.1), captions, n_z, seed=seed + 1)["pixels"] != \
        pytest.approx(want, rel=1e-5)


def test_generate_across_z_shapes_and_errors():
    blocks = list(generate_across_z(_ToyGenerator(0.1), *_captions(5)[1:4], n_z=3, batch_size=7))
    assert [tuple(b.shape) for b in blocks] == [(2, 3, 3, 6, 6)] * 2 + [(1, 3, 3, 6, 6)]
    with pytest.raises(ValueError, match="n_z must be an int >= 2"):
        z_spread(_ToyGenerator(0.1), _captions(2), n_z=1)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        z_spread(_ToyGenerator(0.1), _captions(2), n_z=2, batch_size=0)


def test_z_spread_of_the_real_generator():
    from fastxmc.models import Generator

    torch.manual_seed(0)
    generator = Generator(resolution=32, text_dim=8, z_dim=4, width=4).eval()
    out = z_spread(generator, _captions(3), n_z=4, features={"f": lambda x: x.flatten(1)[:, :10]})
    assert set(out) == {"pixels", "f"} and out["pixels"] > 0 and out["f"] >= 0


# ---------------------------------------------------------------------------- real groups
def test_real_spread_groups_by_label():
    labels = np.array([0, 1, 0, 0, 2, -1, 0, 1])
    captions = [[f"c{i}"] for i in range(8)]
    grouping, groups = real_spread_groups(labels, captions, [0, 1, 4, 5, 3], size=3, seed=0)
    assert grouping == "label"
    assert len(groups[0]) == 3 and set(groups[0]) <= {0, 2, 3, 6}          # cut to size at random
    assert groups[1].tolist() == [1, 7]
    assert groups[2] is None and groups[3] is None                          # alone; no label
    assert set(groups[4]) <= {0, 2, 3, 6}
    again = real_spread_groups(labels, captions, [0, 1, 4, 5, 3], size=3, seed=0)[1]
    assert all((a is None and b is None) or (a == b).all() for a, b in zip(groups, again))


def test_real_spread_groups_by_shared_caption_without_labels():
    labels = np.full(4, -1)
    captions = [["a red circle", "x"], ["b"], ["y", "a red circle"], ["a red circle"]]
    grouping, groups = real_spread_groups(labels, captions, [0, 1, 3], size=8)
    assert grouping == "caption"
    assert groups[0].tolist() == [0, 2, 3] and groups[1] is None and groups[2].tolist() == [0, 2, 3]


def test_real_spread_groups_errors():
    with pytest.raises(ValueError, match="labels must have shape"):
        real_spread_groups(np.zeros(3), [["a"]] * 2, [0], size=2)
    with pytest.raises(ValueError, match="size must be an int >= 2"):
        real_spread_groups(np.zeros(2), [["a"]] * 2, [0], size=1)
    with pytest.raises(ValueError, match="picks must be image indices"):
        real_spread_groups(np.zeros(2), [["a"]] * 2, [2], size=2)
