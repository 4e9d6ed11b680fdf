"""fastxmc.eval.metrics on inputs with known answers and against independent references."""
import numpy as np
import pytest
import torch
from torchvision.models import inception_v3

from fastxmc.eval.inception import InceptionV3, load_inception
from fastxmc.eval.metrics import (FeatureStats, fid_from_stats, fold_mean_std, frechet_distance,
                                  inception_score, kernel_inception_distance, mmd2_unbiased,
                                  polynomial_kernel, r_precision, r_precision_from_scores,
                                  r_precision_hits, sample_mismatched)


def _random_psd(d, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def _gaussian(n, mean, cov, seed):
    return np.random.default_rng(seed).multivariate_normal(mean, cov, size=n)


def _fid_reference(mu1, s1, mu2, s2):
    """Independent route: the eigenvalues of the non-symmetric product S1 S2 (numpy.linalg.eig)."""
    eig = np.linalg.eigvals(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                 - 2 * np.sum(np.sqrt(np.clip(eig.real, 0, None))))


# ---------------------------------------------------------------------------- FeatureStats
def test_feature_stats_match_numpy_over_uneven_batches():
    x = _gaussian(503, np.full(7, 1e4), _random_psd(7, 0), seed=1)  # large common offset
    x[:1] = x[:1].astype(np.float32)             # the first batch arrives in float32
    batches = np.split(x, [1, 1, 30, 257, 258])  # includes an empty batch and single rows
    stats = FeatureStats(keep=40)
    stats.update(torch.from_numpy(batches[0]).float())
    for batch in batches[1:]:
        stats.update(torch.from_numpy(batch))
    assert stats.num == 503 and stats.dim == 7
    np.testing.assert_allclose(stats.mean().numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance().numpy(), np.cov(x, rowvar=False), rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(stats.kept().numpy(), x[:40], rtol=1e-6)


def test_feature_stats_state_dict_round_trip(tmp_path):
    stats = FeatureStats(keep=5)
    stats.update(torch.randn(20, 3))
    torch.save(stats.state_dict(), tmp_path / "s.pt")
    back = FeatureStats.from_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert back.num == 20
    torch.testing.assert_close(back.mean(), stats.mean())
    torch.testing.assert_close(back.covariance(), stats.covariance())
    torch.testing.assert_close(back.kept(), stats.kept())


def test_feature_stats_errors():
    stats = FeatureStats()
    with pytest.raises(ValueError, match="at least 1"):
        stats.mean()
    stats.update(torch.randn(4, 3))
    with pytest.raises(ValueError, match="3"):
        stats.update(torch.randn(4, 5))
    with pytest.raises(ValueError, match="2-D"):
        stats.update(torch.randn(4))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(torch.tensor([[float("nan"), 0.0, 0.0]]))
    with pytest.raises(ValueError, match="kept no rows"):
        stats.kept()
    with pytest.raises(ValueError, match="keep"):
        FeatureStats(keep=-1)


# ---------------------------------------------------------------------------- Frechet distance
def test_fid_of_identical_sets_is_zero():
    x = torch.from_numpy(_gaussian(2000, np.zeros(16), _random_psd(16, 2), seed=3))
    a, b = FeatureStats(), FeatureStats()
    a.update(x)
    b.update(x.flip(0))
    assert abs(fid_from_stats(a, b)) < 1e-8


def test_fid_of_shifted_samples_is_the_squared_shift():
    # Same samples shifted by delta: equal covariances, so the trace term vanishes exactly.
    x = torch.from_numpy(_gaussian(1000, np.zeros(10), _random_psd(10, 4), seed=5))
    delta = torch.linspace(-1, 2, 10, dtype=torch.float64)
    a, b = FeatureStats(), FeatureStats()
    a.update(x)
    b.update(x + delta)
    assert fid_from_stats(a, b) == pytest.approx(float(delta @ delta), rel=1e-9)


def test_fid_matches_the_closed_form_of_two_gaussians():
    d = 12
    mu1, mu2 = np.zeros(d), np.linspace(0, 1, d)
    s1, s2 = _random_psd(d, 6), _random_psd(d, 7, scale=2.0)
    expected = _fid_reference(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # Diagonal covariances: Tr((S1 S2)^(1/2)) = sum sqrt(d1 d2), by hand.
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    by_hand = 1.0 + d1.sum() + d2.sum() - 2 * np.sqrt(d1 * d2).sum()
    assert frechet_distance(np.zeros(3), np.diag(d1), np.array([1.0, 0, 0]), np.diag(d2)) == \
        pytest.approx(by_hand, rel=1e-12)
    # Sample statistics converge to the closed form.
    a, b = FeatureStats(), FeatureStats()
    a.update(torch.from_numpy(_gaussian(40000, mu1, s1, seed=8)))
    b.update(torch.from_numpy(_gaussian(40000, mu2, s2, seed=9)))
    assert fid_from_stats(a, b) == pytest.approx(expected, rel=0.03)


def test_fid_handles_singular_covariances():
    # Rank-deficient covariances (fewer samples than dimensions) must not give NaN.
    x, y = torch.randn(5, 32, dtype=torch.float64), torch.randn(5, 32, dtype=torch.float64)
    a, b = FeatureStats(), FeatureStats()
    a.update(x)
    b.update(y)
    value = fid_from_stats(a, b)
    reference = _fid_reference(x.mean(0).numpy(), np.cov(x.numpy(), rowvar=False),
                               y.mean(0).numpy(), np.cov(y.numpy(), rowvar=False))
    assert np.isfinite(value) and value == pytest.approx(reference, rel=1e-6)


def test_fid_validates_shapes():
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(3))
    with pytest.raises(TypeError, match="mu1"):
        frechet_distance([0.0], np.eye(1), np.zeros(1), np.eye(1))


# ---------------------------------------------------------------------------- KID
def _mmd2_by_loops(x, y, kernel):
    m = len(x)
    xx = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_on_one_full_subset_matches_loops():
    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(9, 4)), rng.normal(0.3, 1.2, size=(9, 4))
    def kernel(a, b):
        return (a @ b / 4 + 1.0) ** 3
    mean, std = kernel_inception_distance(x, y, subsets=1, subset_size=9)
    assert mean == pytest.approx(_mmd2_by_loops(x, y, kernel), rel=1e-12)
    assert std == 0.0


def test_mmd2_with_a_linear_kernel_is_the_closed_form():
    # k(a, b) = <a, b>: the unbiased estimate is an explicit function of sums of the rows.
    rng = np.random.default_rng(11)
    x, y = torch.from_numpy(rng.normal(size=(30, 5))), torch.from_numpy(rng.normal(1, 1, size=(30, 5)))
    sx, sy, m = x.sum(0), y.sum(0), 30
    expected = ((sx @ sx - (x * x).sum()) / (m * (m - 1)) + (sy @ sy - (y * y).sum()) / (m * (m - 1))
                - 2 * (sx @ sy) / m ** 2)
    k = lambda a, b: polynomial_kernel(a, b, degree=1, gamma=1.0, coef0=0.0)  # noqa: E731
    assert float(mmd2_unbiased(k(x, x), k(x, y), k(y, y))) == pytest.approx(float(expected), rel=1e-12)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(12)
    same = kernel_inception_distance(rng.normal(size=(600, 8)), rng.normal(size=(600, 8)),
                                     subsets=20, subset_size=300)
    shifted = kernel_inception_distance(rng.normal(size=(600, 8)), rng.normal(0.5, 1, size=(600, 8)),
                                        subsets=20, subset_size=300)
    assert abs(same[0]) < 3 * same[1] + 1e-3
    assert shifted[0] > 10 * max(abs(same[0]), same[1])


def test_kid_is_deterministic_for_a_seed():
    x, y = torch.randn(50, 6), torch.randn(50, 6) + 0.2
    a = kernel_inception_distance(x, y, subsets=5, subset_size=20, seed=3)
    assert a == kernel_inception_distance(x, y, subsets=5, subset_size=20, seed=3)
    assert a != kernel_inception_distance(x, y, subsets=5, subset_size=20, seed=4)


def test_kid_errors():
    with pytest.raises(ValueError, match="subset_size"):
        kernel_inception_distance(torch.randn(10, 3), torch.randn(20, 3), subset_size=11)
    with pytest.raises(ValueError, match="same width"):
        kernel_inception_distance(torch.randn(10, 3), torch.randn(10, 4), subset_size=5)


# ---------------------------------------------------------------------------- Inception Score
def test_inception_score_known_values():
    uniform = torch.full((40, 10), 0.1)
    assert inception_score(uniform, splits=4) == pytest.approx((1.0, 0.0))
    confident = torch.eye(10).repeat(4, 1)                        # every split: 10 distinct classes
    assert inception_score(confident, splits=4) == pytest.approx((10.0, 0.0))
    # By hand: a split of rows (1, 0) and (0.5, 0.5): p(y) = (0.75, 0.25);
    # KL rows: log(4/3) and 0.5 log(2/3) + 0.5 log 2  ->  IS = exp(mean).
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    by_hand = np.exp((np.log(4 / 3) + 0.5 * np.log(2 / 3) + 0.5 * np.log(2)) / 2)
    assert inception_score(p, splits=1)[0] == pytest.approx(by_hand, rel=1e-12)
    # Two splits with different scores: population std of (2, 1).
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.5, 0.5]])
    assert inception_score(two, splits=2) == pytest.approx((1.5, 0.5))


def test_inception_score_errors():
    with pytest.raises(ValueError, match="softmax"):
        inception_score(torch.randn(10, 4))
    with pytest.raises(ValueError, match="splits"):
        inception_score(torch.full((3, 2), 0.5), splits=4)


# ---------------------------------------------------------------------------- R-precision
def test_r_precision_of_a_perfect_encoder_is_one():
    features = torch.nn.functional.normalize(torch.randn(500, 64), dim=1)
    result = r_precision(features, features, folds=10, seed=0)
    assert result == {"mean": 1.0, "std": 0.0, "n": 500, "folds": 10}


def test_r_precision_of_a_random_encoder_is_one_in_a_hundred():
    g = torch.Generator().manual_seed(1)
    images, texts = torch.randn(4000, 32, generator=g), torch.randn(4000, 32, generator=g)
    result = r_precision(images, texts, seed=0)
    assert abs(result["mean"] - 0.01) < 0.005
    # Fewer candidates, higher chance level: 1 in 5.
    assert abs(r_precision(images, texts, num_mismatched=4)["mean"] - 0.2) < 0.03


def test_r_precision_counts_ties_as_misses():
    constant = torch.ones(50, 8)
    assert r_precision(constant, constant, folds=5)["mean"] == 0.0


def test_r_precision_respects_groups():
    # Captions come in pairs of the same image with identical text features: excluding each
    # other (groups) the encoder is perfect; drawn as mismatches they tie and count as misses.
    base = torch.nn.functional.normalize(torch.randn(200, 16), dim=1)
    features = base.repeat_interleave(2, dim=0)
    groups = torch.arange(200).repeat_interleave(2)
    assert r_precision(features, features, groups=groups)["mean"] == 1.0
    assert r_precision(features, features)["mean"] < 1.0


def test_sample_mismatched_is_uniform_over_other_groups():
    groups = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    idx = sample_mismatched(groups, 20000, torch.Generator().manual_seed(0))
    assert idx.shape == (10, 20000)
    assert not (groups[idx] == groups[:, None]).any()
    counts = torch.bincount(idx[0], minlength=10).double()      # row 0 may draw rows 3..9
    assert counts[:3].sum() == 0
    assert torch.allclose(counts[3:] / 20000, torch.full((7,), 1 / 7, dtype=torch.float64), atol=0.01)
    with pytest.raises(ValueError, match="no mismatched"):
        sample_mismatched(torch.zeros(5, dtype=torch.long), 3, torch.Generator())


def test_r_precision_from_scores_by_hand():
    true = torch.tensor([0.9, 0.2, 0.5, 0.5])
    mismatched = torch.tensor([[0.1, 0.3], [0.4, 0.1], [0.5, 0.2], [0.1, 0.4]])
    assert r_precision_hits(true, mismatched).tolist() == [True, False, False, True]
    result = r_precision_from_scores(true, mismatched, folds=1)
    assert result == {"mean": 0.5, "std": 0.0, "n": 4, "folds": 1}
    mean, std = fold_mean_std(torch.tensor([1.0, 1.0, 0.0, 0.0]), 2, torch.Generator().manual_seed(0))
    assert mean == 0.5 and std in (0.0, 0.5)


def test_r_precision_is_deterministic_and_validates():
    images, texts = torch.randn(300, 8), torch.randn(300, 8)
    texts[:150] = images[:150]
    a = r_precision(images, texts, seed=5)
    assert a == r_precision(images, texts, seed=5)
    assert 0.45 < a["mean"] < 0.56
    with pytest.raises(ValueError, match="same shape"):
        r_precision(images, texts[:10])
    with pytest.raises(ValueError, match="folds"):
        r_precision(images[:5], texts[:5], folds=10)
    with pytest.raises(ValueError, match="groups"):
        r_precision(images, texts, groups=torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------------------- InceptionV3 loading


def _randomised(net):
    """Random weights and non-trivial batch-norm statistics, so that every layer matters."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, buf in net.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) * 0.5 + 0.5)
    return net.eval()


@pytest.fixture(scope="module")
def inception_files(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("inception")
    tv = _randomised(inception_v3(weights=None, aux_logits=True, init_weights=False))
    torch.save(tv.state_dict(), folder / "torchvision.pth")
    tf = _randomised(inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008))
    torch.save({"state_dict": tf.state_dict()}, folder / "pt_inception-2015-12-05.pth")
    return {"torchvision": (folder / "torchvision.pth", tv),
            "tf": (folder / "pt_inception-2015-12-05.pth", tf)}


def _pool_features(net, x):
    captured = {}
    handle = net.avgpool.register_forward_hook(lambda m, i, o: captured.update(out=o.flatten(1)))
    with torch.no_grad():
        logits = net(x)
    handle.remove()
    return captured["out"], logits


def test_inception_torchvision_layout_matches_torchvision(inception_files):
    path, tv = inception_files["torchvision"]
    model = load_inception(path)
    assert isinstance(model, InceptionV3)
    assert model.variant == "torchvision" and model.num_classes == 1000
    images = torch.rand(2, 3, 299, 299)
    with torch.no_grad():
        out = model(images)
    features, logits = _pool_features(tv, images * 2 - 1)
    assert out.features.shape == (2, 2048) and out.logits.shape == (2, 1000)
    torch.testing.assert_close(out.features, features)
    torch.testing.assert_close(out.logits, logits)
    # Other sizes are resized bilinearly to 299 first.
    small = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        upsampled = torch.nn.functional.interpolate(small, size=299, mode="bilinear", align_corners=False)
        resized = model(upsampled)
        torch.testing.assert_close(model(small).features, resized.features)
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training


def test_inception_tf_layout_pools_like_the_tf_graph(inception_files):
    path, tv = inception_files["tf"]
    model = load_inception(path)
    assert model.variant == "tf" and model.num_classes == 1008
    # Pool branches of Mixed_5b: average over the valid (unpadded) neighbours only, i.e. the
    # zero-padded average rescaled by 9 / (number of valid cells).
    x = torch.randn(2, 192, 9, 9)
    with torch.no_grad():
        block_out = model.net.Mixed_5b(x)
        plain_avg = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
        valid = torch.nn.functional.avg_pool2d(torch.ones(1, 1, 9, 9), 3, 1, 1)
        expected_pool = tv.Mixed_5b.branch_pool(plain_avg / valid)
        torch.testing.assert_close(block_out[:, -32:], expected_pool)
        torch.testing.assert_close(block_out[:, :-32], tv.Mixed_5b(x)[:, :-32])
        # Mixed_7c: a max pool.
        y = torch.randn(1, 2048, 8, 8)
        expected_max = tv.Mixed_7c.branch_pool(torch.nn.functional.max_pool2d(y, 3, 1, 1))
        torch.testing.assert_close(model.net.Mixed_7c(y)[:, -192:], expected_max)
        # Logits without the fc bias (the original Inception Score code).
        out = model(torch.rand(2, 3, 299, 299))
        torch.testing.assert_close(out.logits, out.features @ tv.fc.weight.T)
        tv_features, _ = _pool_features(tv, torch.rand(2, 3, 299, 299))
    assert not torch.allclose(out.features, tv_features)


def test_inception_load_errors(tmp_path, inception_files):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_inception(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_inception(tmp_path / "junk.pth")
    torch.save({"fc.weight": torch.zeros(1000, 2048), "other": torch.zeros(1)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="partial.pth.*does not match"):
        load_inception(tmp_path / "partial.pth")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="fc.weight"):
        load_inception(tmp_path / "other.pth")
    with pytest.raises(ValueError, match="variant"):
        load_inception(inception_files["tf"][0], variant="keras")
