"""loss.text_negatives: captions of other images as extra negatives of the sentence terms."""
import math

import numpy as np
import pytest
import torch

from conftest import full_and_resumed_runs
from fastxmc.train import loop
from fastxmc.train.config import LossConfig, build_config
from fastxmc.train.distributed import DistEnv
from fastxmc.train.logging import read_metrics
from fastxmc.train.losses import DOut, Text, Views, XMCLossSet, pair_labels
from fastxmc.train.negatives import CaptionNegatives, build_negatives

B, F, R, E, T, K = 3, 4, 5, 6, 4, 5


pytestmark = pytest.mark.usefixtures("one_thread_data_cache")


def tiny(out, *overrides):
    return build_config("tiny", [("run.out", str(out)), ("run.quiet", "true"),
                                 ("run.tensorboard", "false"), *overrides])


# ---------------------------------------------------------------- the loss, against a loop reference
def _cos(u, v):
    return float(u @ v / (u.norm() * v.norm()))


def ref_sentence(features, sentences, negatives, labels=None, neg_labels=None, t=0.1):
    """Rows: each image against the batch's captions and the K extra ones; columns: each caption
    against the batch's images only. Positives: the diagonal, or equal labels. Summed directions."""
    n = features.shape[0]
    cands = list(sentences) + list(negatives)
    cand_labels = None if labels is None else list(labels) + list(neg_labels)

    def positive(i, j, col_labels):
        return i == j if labels is None else int(labels[i]) == int(col_labels[j])

    rows = []
    for i in range(n):
        s = [_cos(features[i], c) / t for c in cands]
        ps = [j for j in range(len(cands)) if positive(i, j, cand_labels)]
        lse = math.log(sum(math.exp(x) for x in s))
        rows.append(sum(lse - s[p] for p in ps) / len(ps))
    cols = []
    for j in range(n):
        s = [_cos(sentences[j], features[i]) / t for i in range(n)]
        ps = [i for i in range(n) if positive(j, i, labels)]
        lse = math.log(sum(math.exp(x) for x in s))
        cols.append(sum(lse - s[p] for p in ps) / len(ps))
    return sum(rows) / n + sum(cols) / n


def _dout(n=B):
    return DOut(torch.randn(n, dtype=torch.float64), torch.randn(n, F, dtype=torch.float64),
                torch.randn(n, R, E, dtype=torch.float64), torch.randn(n, F, dtype=torch.float64))


def _text(n=B):
    return Text(torch.randn(n, E, dtype=torch.float64), torch.randn(n, T, E, dtype=torch.float64),
                torch.ones(n, T, dtype=torch.bool))


def test_sentence_terms_rank_the_extra_captions_in_the_image_to_text_direction():
    torch.manual_seed(0)
    real, fake = _dout(), _dout()
    negatives = torch.randn(K, F, dtype=torch.float64, requires_grad=True)
    v = Views(real, [fake], [_text()], None, None, negatives, torch.arange(K))
    losses = XMCLossSet(LossConfig())
    d, g = losses.discriminator_terms(v), losses.generator_terms(v)
    assert d["d_sentence"].item() == pytest.approx(
        ref_sentence(real.features, real.sentence, negatives.detach()), rel=1e-9)
    assert g["g_sentence"].item() == pytest.approx(
        ref_sentence(fake.features, fake.sentence, negatives.detach()), rel=1e-9)
    d["d_sentence"].backward()
    assert negatives.grad.abs().sum() > 0   # D's projection of them learns
    # Without negatives the term is XMC-GAN's C: the extra captions are all it adds.
    plain = losses.discriminator_terms(Views(real, [fake], [_text()], None))["d_sentence"]
    assert plain.item() == pytest.approx(ref_sentence(real.features, real.sentence, []), rel=1e-9)
    assert d["d_sentence"].item() > plain.item()


def test_label_guided_sentence_terms_with_two_branches_and_negatives():
    torch.manual_seed(1)
    real, fake_a, fake_b = _dout(), _dout(), _dout()
    labels = pair_labels(torch.tensor([7, -1, 7]))
    neg_labels = torch.tensor([3, 4, 3, -(1 << 40), -(1 << 40) - 1])
    negatives = torch.randn(K, F, dtype=torch.float64)
    cfg = LossConfig(supcon=True)
    v = Views(real, [fake_a, fake_b], [_text(), _text()], labels, None, negatives, neg_labels)
    losses = XMCLossSet(cfg)
    d, g = losses.discriminator_terms(v), losses.generator_terms(v)
    assert d["d_sentence"].item() == pytest.approx(
        ref_sentence(real.features, real.sentence, negatives, labels, neg_labels), rel=1e-9)
    both = torch.cat([labels, labels])
    assert g["g_sentence"].item() == pytest.approx(ref_sentence(
        torch.cat([fake_a.features, fake_b.features]), torch.cat([fake_a.sentence, fake_b.sentence]),
        negatives, both, neg_labels), rel=1e-9)


# ---------------------------------------------------------------- the draws
@pytest.fixture(scope="module")
def loader(tmp_path_factory):
    """The tiny preset's training loader (its shapes data in the session's cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTXMC_CACHE", str(tmp_path_factory.getbasetemp() / "fastxmc-cache"))
        cfg = tiny(tmp_path_factory.mktemp("run"))
        return loop.make_loader(cfg, DistEnv(0, 1, 0, torch.device("cpu")), progress=False)


def _flat_to_string(loader, flat):
    owners, offsets = loader.caption_owners(), loader.caption_offsets()
    return [loader.data.records[owners[f]].captions[f - offsets[owners[f]]] for f in flat]


def test_draws_avoid_the_batch_images_and_labels_and_are_cached_embeddings(loader):
    batch = next(iter(loader))
    neg = CaptionNegatives(loader, 64, seed=3)
    index, labels = batch["index"].numpy(), batch["label"].numpy()
    allowed = neg.allowed(index, labels)
    assert allowed.size > 0
    owners = loader.caption_owners()[allowed]
    assert not np.isin(owners, index).any()
    assert not np.isin(loader.primary_labels()[owners], labels[labels >= 0]).any()
    # and everything else is allowed
    excluded = np.setdiff1d(np.arange(loader.caption_offsets()[-1]), allowed)
    ex_owners = loader.caption_owners()[excluded]
    assert (np.isin(ex_owners, index) | np.isin(loader.primary_labels()[ex_owners], labels)).all()

    sentences, ids = neg.draw(batch["index"], batch["caption"], batch["label"])
    assert sentences.shape == (64, loader.text_dim) and sentences.dtype == torch.float32
    assert not np.isin(ids.numpy(), labels).any()
    flat = allowed[neg.rng(index, batch["caption"].numpy()).integers(allowed.size, size=64)]
    expected, _, _ = loader.encode_captions(_flat_to_string(loader, flat))
    torch.testing.assert_close(sentences, expected)


def test_draws_depend_on_seed_rank_and_batch_only(loader):
    it = iter(loader)
    first, second = next(it), next(it)
    args = lambda b: (b["index"], b["caption"], b["label"])  # noqa: E731
    a = CaptionNegatives(loader, 16, seed=0).draw(*args(first))[0]
    assert torch.equal(a, CaptionNegatives(loader, 16, seed=0).draw(*args(first))[0])
    assert not torch.equal(a, CaptionNegatives(loader, 16, seed=1).draw(*args(first))[0])
    assert not torch.equal(a, CaptionNegatives(loader, 16, seed=0, rank=1).draw(*args(first))[0])
    assert not torch.equal(a, CaptionNegatives(loader, 16, seed=0).draw(*args(second))[0])


def test_unlabelled_draws_get_unique_ids_below_the_batch_ids(loader, monkeypatch):
    monkeypatch.setattr(type(loader), "primary_labels",
                        lambda self: np.full(self.num_samples, -1, np.int64))
    batch = next(iter(loader))
    _, ids = CaptionNegatives(loader, 8, seed=0).draw(batch["index"], batch["caption"],
                                                      torch.full_like(batch["label"], -1))
    assert len(set(ids.tolist())) == 8
    assert ids.max() < pair_labels(torch.full((10**6,), -1)).min()


def test_nothing_to_draw_and_bad_counts_are_errors(loader):
    neg = CaptionNegatives(loader, 4, seed=0)
    everyone = torch.arange(loader.num_samples)
    with pytest.raises(ValueError, match="loss.text_negatives: every caption"):
        neg.draw(everyone, torch.zeros_like(everyone), torch.full_like(everyone, -1))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="loss.text_negatives must be an int > 0"):
            CaptionNegatives(loader, bad, seed=0)
    assert build_negatives(LossConfig(), loader, seed=0) is None


# ---------------------------------------------------------------- config and runs
def test_config_errors_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="loss.text_negatives"):
        tiny(tmp_path, ("loss.text_negatives", "-2"))
    with pytest.raises(ValueError, match="loss.sentence_weight=0 switches off"):
        tiny(tmp_path, ("loss.text_negatives", "8"), ("loss.sentence_weight", "0"))


def test_run_with_negatives_starts_near_chance_and_resumes_exactly(tmp_path):
    """The tiny preset (2 D steps per G step: the D-only step draws too), 64 negatives: at the
    start the sentence terms sit near chance, log(B + K) + log(B); resuming repeats the draws."""
    full, _, a, b = full_and_resumed_runs(tmp_path, ("loss.text_negatives", "64"))
    assert a[0]["d_sentence"] == pytest.approx(math.log(8 + 64) + math.log(8), abs=1.0)
    for ra, rb in zip(a, b):
        for key in ("loss_d", "loss_g", "d_sentence", "g_sentence"):
            assert ra[key] == rb[key], (ra["step"], key)
    assert full.step == 4
