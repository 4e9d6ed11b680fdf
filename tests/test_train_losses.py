"""The XMC-GAN loss set wired to D's outputs, against hand-computed values and loop references."""
import math

import pytest
import torch
from torch import nn

from fastxmc.train.config import LossConfig
from fastxmc.models import DiscriminatorOutput
from fastxmc.train.losses import (DOut, FrozenClassifier, Text, Views, XMCLossSet, chunk_output,
                                  class_loss, contrastive_loss, hinge_d, hinge_g, pair_labels,
                                  r1_penalty)

B, F, R, E, T = 3, 4, 5, 6, 4


@pytest.fixture(autouse=True)
def _float64():
    """Random inputs in fp64, so the comparisons with the loop references are tight."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# ---------------------------------------------------------------- independent references (loops)
def _unit(v):
    return v / v.norm()


def ref_contrastive(a, b, t=0.1, labels=None):
    """XMC-GAN C(A, B): rows + columns, each direction averaged over its anchors; positives are the
    diagonal, or every equal-label pair."""
    n = a.shape[0]
    s = [[float(_unit(a[i]) @ _unit(b[j])) / t for j in range(n)] for i in range(n)]
    pos = [[(i == j) if labels is None else (int(labels[i]) == int(labels[j])) for j in range(n)]
           for i in range(n)]

    def direction(mat, positive):
        losses = []
        for i in range(n):
            ps = [j for j in range(n) if positive[i][j]]
            if ps:
                lse = math.log(sum(math.exp(x) for x in mat[i]))
                losses.append(sum(lse - mat[i][p] for p in ps) / len(ps))
        return sum(losses) / len(losses)

    transpose = lambda m: [list(r) for r in zip(*m)]  # noqa: E731
    return direction(s, pos) + direction(transpose(s), transpose(pos))


def ref_supcon(x, labels, t):
    n = x.shape[0]
    s = [[float(_unit(x[i]) @ _unit(x[j])) / t for j in range(n)] for i in range(n)]
    losses = []
    for i in range(n):
        ps = [p for p in range(n) if p != i and int(labels[p]) == int(labels[i])]
        if ps:
            lse = math.log(sum(math.exp(s[i][j]) for j in range(n) if j != i))
            losses.append(sum(lse - s[i][p] for p in ps) / len(ps))
    return sum(losses) / len(losses)


def ref_word_loss(regions, words, mask, g1=5.0, g2=5.0, g3=50.0):
    """AttnGAN/XMC-GAN word loss by loops: attention over regions per word, S(i, j), CE rows + cols."""
    n = regions.shape[0]
    logits = torch.zeros(n, n)
    for i in range(n):
        r = torch.stack([_unit(v) for v in regions[i]])                      # (R, d)
        for j in range(n):
            scores = []
            for t in range(words.shape[1]):
                if not mask[j, t]:
                    continue
                w = _unit(words[j, t])
                attn = torch.softmax(g1 * (r @ w), dim=0)                    # over regions
                context = (attn[:, None] * r).sum(0)
                scores.append(g2 * float(w @ _unit(context)))
            logits[i, j] = g3 * math.log(sum(math.exp(x) for x in scores)) / g2
    target = torch.arange(n)
    ce = torch.nn.functional.cross_entropy
    return float(ce(logits, target) + ce(logits.T, target))


# ---------------------------------------------------------------- hand-computed values
def test_contrastive_loss_sums_the_two_directions():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # S = [[10, 0], [0, 10]]: each direction is log(1 + e^-10); XMC-GAN sums the two.
    assert contrastive_loss(a, a.clone()).item() == pytest.approx(2 * math.log1p(math.exp(-10)), rel=1e-9)
    x, y = torch.randn(5, 3), torch.randn(5, 3)
    assert contrastive_loss(x, y).item() == pytest.approx(ref_contrastive(x, y), rel=1e-9)


def test_contrastive_loss_with_labels():
    x, y = torch.randn(6, 3), torch.randn(6, 3)
    labels = torch.tensor([0, 1, 0, 2, 1, -5])
    assert contrastive_loss(x, y, labels=labels).item() == pytest.approx(
        ref_contrastive(x, y, labels=labels), rel=1e-9)


def test_hinge_losses_by_hand():
    real, fake = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([-2.0, 0.5, 0.0])
    # relu(1 - real) = [0.5, 0, 2] -> 5/6; relu(1 + fake) = [0, 1.5, 1] -> 5/6
    assert hinge_d(real, fake).item() == pytest.approx(5 / 3)
    assert hinge_g(fake).item() == pytest.approx(0.5)


def test_pair_labels_give_unlabelled_samples_their_own_id():
    out = pair_labels(torch.tensor([3, -1, 0, -1]), offset=10)
    assert out.tolist() == [3, -12, 0, -14]
    with pytest.raises(TypeError, match="int64"):
        pair_labels(torch.tensor([1.0]))


def test_chunk_output_splits_every_field_in_fp32():
    out = DOut(torch.arange(6.0).bfloat16(), torch.ones(6, 2), torch.ones(6, 3, 4), torch.ones(6, 2))
    real, fake_a, fake_b = chunk_output(out, 3)
    assert fake_a.logits.tolist() == [2.0, 3.0] and fake_b.regions.shape == (2, 3, 4)
    assert real.logits.dtype == torch.float32


# ---------------------------------------------------------------- the wiring
def _dout(n=B):
    return DOut(torch.randn(n), torch.randn(n, F), torch.randn(n, R, E), torch.randn(n, F))


def _text(n=B):
    mask = torch.tensor([[True, True, False, False], [True, True, True, True], [True, False, False, False]])
    return Text(torch.randn(n, E), torch.randn(n, T, E), mask[:n])


def test_standard_terms_match_the_references():
    real, fake, text = _dout(), _dout(), _text()
    losses = XMCLossSet(LossConfig())
    v = Views(real, [fake], [text], None)
    d, g = losses.discriminator_terms(v), losses.generator_terms(v)
    assert set(d) == {"d_hinge", "d_sentence", "d_word"}
    assert set(g) == {"g_adv", "g_sentence", "g_word", "g_image"}
    assert d["d_hinge"].item() == pytest.approx(hinge_d(real.logits, fake.logits).item())
    assert d["d_sentence"].item() == pytest.approx(ref_contrastive(real.features, real.sentence), rel=1e-7)
    assert d["d_word"].item() == pytest.approx(
        ref_word_loss(real.regions, text.words, text.word_mask), rel=1e-6)
    assert g["g_adv"].item() == pytest.approx(-fake.logits.mean().item())
    assert g["g_sentence"].item() == pytest.approx(ref_contrastive(fake.features, fake.sentence), rel=1e-7)
    assert g["g_word"].item() == pytest.approx(
        ref_word_loss(fake.regions, text.words, text.word_mask), rel=1e-6)
    assert g["g_image"].item() == pytest.approx(ref_contrastive(fake.features, real.features), rel=1e-7)


def test_weights_scale_terms_and_zero_switches_them_off():
    cfg = LossConfig(sentence_weight=0.5, word_weight=2.0, image_weight=0.0)
    losses = XMCLossSet(cfg)
    v = Views(_dout(), [_dout()], [_text()], None)
    g = losses.generator_terms(v)
    assert "g_image" not in g and not losses.active("g_image")
    expected = g["g_adv"] + 0.5 * g["g_sentence"] + 2.0 * g["g_word"]
    assert losses.total(g).item() == pytest.approx(expected.item())
    off = XMCLossSet(LossConfig(sentence_weight=0, word_weight=0))
    assert set(off.discriminator_terms(v)) == {"d_hinge"}


def test_classifier_term_uses_the_classifier_logits():
    torch.manual_seed(1)
    f = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    real_img, fake_img = torch.rand(B, 3, 4, 4), torch.rand(B, 3, 4, 4)
    losses = XMCLossSet(LossConfig(classifier_weight=0.5), classifier=f)
    g = losses.generator_terms(Views(_dout(), [_dout()], [_text()], None), real_img, [fake_img])
    with torch.no_grad():
        expected = ref_contrastive(f(real_img), f(fake_img))
    assert g["g_classifier"].item() == pytest.approx(expected, rel=1e-7)
    assert losses.weights["g_classifier"] == 0.5


def test_label_guided_terms_with_two_caption_branches():
    torch.manual_seed(2)
    real, fake_a, fake_b = _dout(), _dout(), _dout()
    text_a, text_b = _text(), _text()
    labels = pair_labels(torch.tensor([7, -1, 7]))
    cfg = LossConfig(supcon=True, supcon_image_weight=0.3, supcon_text_weight=0.4, supcon_temperature=0.5)
    losses = XMCLossSet(cfg)
    v = Views(real, [fake_a, fake_b], [text_a, text_b], labels)
    d, g = losses.discriminator_terms(v), losses.generator_terms(v)
    both = torch.cat([labels, labels])
    fakes_logits = torch.cat([fake_a.logits, fake_b.logits])
    assert d["d_hinge"].item() == pytest.approx(hinge_d(real.logits, fakes_logits).item())
    assert d["d_sentence"].item() == pytest.approx(
        ref_contrastive(real.features, real.sentence, labels=labels), rel=1e-7)
    assert d["d_supcon_text"].item() == pytest.approx(
        ref_supcon(torch.cat([real.sentence, fake_b.sentence]), both, 0.5), rel=1e-7)
    assert g["g_adv"].item() == pytest.approx(-fakes_logits.mean().item())
    assert g["g_sentence"].item() == pytest.approx(ref_contrastive(
        torch.cat([fake_a.features, fake_b.features]), torch.cat([fake_a.sentence, fake_b.sentence]),
        labels=both), rel=1e-7)
    word = (ref_word_loss(fake_a.regions, text_a.words, text_a.word_mask)
            + ref_word_loss(fake_b.regions, text_b.words, text_b.word_mask)) / 2
    assert g["g_word"].item() == pytest.approx(word, rel=1e-6)
    image = (ref_contrastive(fake_a.features, real.features)
             + ref_contrastive(fake_b.features, real.features)) / 2
    assert g["g_image"].item() == pytest.approx(image, rel=1e-7)
    assert g["g_supcon_image"].item() == pytest.approx(
        ref_supcon(torch.cat([fake_a.features, fake_b.features]), both, 0.5), rel=1e-7)
    assert losses.total(d).item() == pytest.approx(
        (d["d_hinge"] + d["d_sentence"] + d["d_word"] + 0.4 * d["d_supcon_text"]).item())
    assert losses.weights["g_supcon_image"] == 0.3


def test_class_terms_are_cross_entropies_over_the_labelled_rows():
    """loss.class_weight: D's class head on real images, G's fakes (each branch) against the
    batch's primary labels; rows without a label (-1) are left out."""
    torch.manual_seed(3)
    C = 4
    with_classes = lambda: _dout()._replace(classes=torch.randn(B, C))  # noqa: E731
    real, fake_a, fake_b = with_classes(), with_classes(), with_classes()
    labels = torch.tensor([2, -1, 0])
    losses = XMCLossSet(LossConfig(class_weight=0.5))
    v = Views(real, [fake_a, fake_b], [_text(), _text()], None, class_labels=labels)
    d, g = losses.discriminator_terms(v), losses.generator_terms(v)

    def ce(logits):   # by hand, rows 0 and 2
        rows = [(0, 2), (2, 0)]
        return sum(torch.logsumexp(logits[i], 0) - logits[i, c] for i, c in rows).item() / 2

    assert d["d_class"].item() == pytest.approx(ce(real.classes), rel=1e-9)
    assert g["g_class"].item() == pytest.approx((ce(fake_a.classes) + ce(fake_b.classes)) / 2, rel=1e-9)
    assert losses.weights["d_class"] == losses.weights["g_class"] == 0.5
    none = class_loss(real.classes.requires_grad_(), torch.full((B,), -1))
    assert none.item() == 0.0 and none.requires_grad
    assert "d_class" not in XMCLossSet(LossConfig()).discriminator_terms(v)
    with pytest.raises(ValueError, match="loss.class_weight needs D's class logits"):
        losses.discriminator_terms(Views(_dout(), [_dout()], [_text()], None, class_labels=labels))


def test_attribute_class_terms_sum_one_cross_entropy_per_block():
    """loss.class_target=shape+position: the head's logits are a 6-way and a 9-way block; each
    term is the sum of the blocks' cross-entropies, and each branch's fakes have their own targets
    (a -1 position where the branch's caption names none)."""
    torch.manual_seed(5)
    with_classes = lambda: _dout()._replace(classes=torch.randn(B, 15))  # noqa: E731
    real, fake_a, fake_b = with_classes(), with_classes(), with_classes()
    real_y = torch.tensor([[0, 8], [5, 0], [2, 4]])
    fake_y = [torch.tensor([[0, -1], [5, 0], [2, -1]]), torch.tensor([[0, 8], [5, -1], [2, 4]])]
    losses = XMCLossSet(LossConfig(class_weight=1.0, class_target="position+shape"))
    assert losses.class_sizes == (6, 9)
    v = Views(real, [fake_a, fake_b], [_text(), _text()], None, class_labels=real_y,
              fake_class_labels=fake_y)

    def ce(logits, y):   # by hand, each block over its rows with a target
        total = 0.0
        for k, (lo, hi) in enumerate(((0, 6), (6, 15))):
            rows = [i for i in range(B) if y[i, k] >= 0]
            total += sum(torch.logsumexp(logits[i, lo:hi], 0) - logits[i, lo + y[i, k]] for i in rows) / len(rows)
        return float(total)

    d, g = losses.discriminator_terms(v), losses.generator_terms(v)
    assert d["d_class"].item() == pytest.approx(ce(real.classes, real_y), rel=1e-6)
    want = (ce(fake_a.classes, fake_y[0]) + ce(fake_b.classes, fake_y[1])) / 2
    assert g["g_class"].item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match=r"do not match the blocks \(6, 9\)"):
        class_loss(real.classes, real_y[:, 0], (6, 9))


def test_chunk_output_carries_the_class_logits():
    out = DiscriminatorOutput(torch.randn(4), torch.randn(4, F), torch.randn(4, R, E), torch.randn(4, F),
                              torch.randn(4, 3))
    first, second = chunk_output(out, 2)
    assert torch.equal(second.classes, out.classes[2:].float())
    assert chunk_output(DiscriminatorOutput(*out[:4]), 2)[0].classes is None


def test_r1_penalty_is_the_squared_input_gradient_of_the_real_logits():
    """D(x) = sum(w * x^2) has grad 2 w x; the penalty is the batch mean of its squared norm, and
    its own gradient reaches w (create_graph)."""
    torch.manual_seed(4)
    w = torch.randn(3, 2, 2, requires_grad=True)
    x = torch.randn(B, 3, 2, 2, requires_grad=True)
    logits = (w * x * x).sum(dim=(1, 2, 3))
    penalty = r1_penalty(logits, x)
    expected = sum(float(((2 * w * x[i]) ** 2).sum().detach()) for i in range(B)) / B
    assert penalty.item() == pytest.approx(expected, rel=1e-10)
    (dw,) = torch.autograd.grad(penalty, w)
    torch.testing.assert_close(dw, (8 * w * x.detach() ** 2).sum(0) / B)
    with pytest.raises(ValueError, match="real_images must require grad"):
        r1_penalty(logits, x.detach())


def test_r1_term_is_weighted_gamma_over_two_and_off_by_default():
    torch.manual_seed(5)
    images = torch.randn(B, 2, requires_grad=True)
    real = _dout()._replace(logits=(images ** 2).sum(1))
    v = Views(real, [_dout()], [_text()], None, images)
    assert "d_r1" not in XMCLossSet(LossConfig()).discriminator_terms(v)
    losses = XMCLossSet(LossConfig(r1_gamma=3.0))
    d = losses.discriminator_terms(v)
    assert losses.weights["d_r1"] == 1.5
    assert d["d_r1"].item() == pytest.approx(float((2 * images.detach()).pow(2).sum(1).mean()))
    assert losses.total(d).item() == pytest.approx(
        (d["d_hinge"] + d["d_sentence"] + d["d_word"] + 1.5 * d["d_r1"]).item())


# ---------------------------------------------------------------- the frozen ImageNet classifier
def test_classifier_weights_file_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="loss.image_classifier_weights: no file at"):
        FrozenClassifier("resnet50", str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="must be one of"):
        FrozenClassifier("alexnet", str(tmp_path / "missing.pth"))


def test_classifier_rejects_a_wrong_state_dict(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="is not a torchvision resnet50 state_dict"):
        FrozenClassifier("resnet50", str(tmp_path / "bad.pth"))


def test_classifier_loads_resnet50_and_is_frozen(tmp_path):
    import torchvision
    torch.set_default_dtype(torch.float32)
    try:
        torch.manual_seed(3)
        net = torchvision.models.resnet50(weights=None).eval()
        torch.save(net.state_dict(), tmp_path / "r50.pth")
        clf = FrozenClassifier("resnet50", str(tmp_path / "r50.pth")).train()
        images = torch.rand(2, 3, 16, 16)
        x = torch.nn.functional.interpolate(images, size=(224, 224), mode="bilinear", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        with torch.no_grad():
            expected = net((x - mean) / std)
            got = clf(images)
        assert not clf.training and not any(p.requires_grad for p in clf.parameters())
        torch.testing.assert_close(got, expected)
    finally:
        torch.set_default_dtype(torch.float64)


def test_classifier_dual_is_the_pretrained_image_tower(tmp_path):
    from fastxmc.models.dual_encoder import DualEncoder, DualEncoderConfig
    torch.set_default_dtype(torch.float32)
    try:
        torch.manual_seed(4)
        dual = DualEncoder(DualEncoderConfig(resolution=16, width=4, embed_dim=8, region_size=8)).eval()
        dual.save(tmp_path / "run" / "dual_encoder.pt")
        images = torch.rand(2, 3, 32, 32)
        small = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
        with torch.no_grad():
            expected = dual.encode_image(small).global_feature
        for where in (tmp_path / "run", tmp_path / "run" / "dual_encoder.pt"):   # the run dir or the file
            f = FrozenClassifier("dual", str(where)).train()
            assert not f.training and not any(p.requires_grad for p in f.parameters())
            with torch.no_grad():
                torch.testing.assert_close(f(images), expected)
                torch.testing.assert_close(f(small), expected)                   # no resize at 16px
    finally:
        torch.set_default_dtype(torch.float64)


def test_classifier_dual_needs_a_pretrained_encoder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dual encoder at .*fastxmc.pretrain"):
        FrozenClassifier("dual", str(tmp_path))


def test_dual_term_scores_fakes_against_their_captions_in_the_frozen_encoder(tmp_path):
    """loss.dual_weight: C(E_img(fake), E_txt(caption)) with a pretrained dual encoder E, summed over
    both directions like the other terms, label-guided with loss.supcon; only the images get a
    gradient."""
    from fastxmc.models.dual_encoder import DualEncoder, DualEncoderConfig
    from fastxmc.train.losses import FrozenDualEncoder
    torch.set_default_dtype(torch.float32)
    try:
        torch.manual_seed(5)
        dual = DualEncoder(DualEncoderConfig(resolution=16, text_dim=E, width=4, embed_dim=8,
                                             region_size=8)).eval()
        dual.save(tmp_path / "run" / "dual_encoder.pt")
        frozen = FrozenDualEncoder(str(tmp_path / "run")).train()
        assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
        texts = [_text(), _text()]
        fakes = [torch.rand(B, 3, 32, 32, requires_grad=True) for _ in texts]
        labels = torch.tensor([0, 1, 0])
        cfg = LossConfig(dual_weight=2.0, dual_encoder=str(tmp_path / "run"))
        losses = XMCLossSet(cfg, dual=frozen)
        v = Views(_dout(), [_dout(), _dout()], texts, labels)
        g = losses.generator_terms(v, torch.rand(B, 3, 32, 32), fakes)
        assert losses.weights["g_dual"] == 2.0
        with torch.no_grad():
            small = [torch.nn.functional.interpolate(f, size=(16, 16), mode="bilinear", align_corners=False)
                     for f in fakes]
            images = torch.cat([dual.encode_image(s).global_feature for s in small])
            sentences = torch.cat([dual.encode_text(*t).sentence for t in texts])
        expected = ref_contrastive(images.double(), sentences.double(), labels=labels.repeat(2).tolist())
        assert g["g_dual"].item() == pytest.approx(expected, rel=1e-5)
        grads = torch.autograd.grad(g["g_dual"], fakes)
        assert all(gr.abs().sum() > 0 for gr in grads)
        assert all(p.grad is None for p in frozen.parameters())
        # off by default: no term, no encoder needed
        assert "g_dual" not in XMCLossSet(LossConfig()).generator_terms(v, None, fakes)
    finally:
        torch.set_default_dtype(torch.float64)


def test_dual_term_needs_a_pretrained_encoder(tmp_path):
    from fastxmc.train.config import TrainConfig, validate
    from fastxmc.train.losses import FrozenDualEncoder
    with pytest.raises(FileNotFoundError, match="loss.dual_encoder: no dual encoder at .*fastxmc.pretrain"):
        FrozenDualEncoder(str(tmp_path))
    cfg = TrainConfig()
    cfg.loss.dual_weight = 1.0
    with pytest.raises(ValueError, match="loss.dual_weight > 0 needs loss.dual_encoder"):
        validate(cfg)


def test_real_image_terms_are_ds_terms_that_need_no_fakes():
    """The warm-up's loss (optim.d_warmup_steps): D's sentence, word and class terms, with the
    values discriminator_terms gives them, computed from real images alone."""
    torch.manual_seed(4)
    real, fake = _dout()._replace(classes=torch.randn(B, 4)), _dout()._replace(classes=torch.randn(B, 4))
    labels = torch.tensor([1, 3, -1])
    losses = XMCLossSet(LossConfig(class_weight=0.5))
    v = Views(real, [fake], [_text()], None, class_labels=labels)
    d, r = losses.discriminator_terms(v), losses.real_image_terms(v._replace(fakes=[]))
    assert sorted(r) == ["d_class", "d_sentence", "d_word"] and sorted(d) == sorted([*r, "d_hinge"])
    for name, value in r.items():
        assert torch.equal(value, d[name]), name
    assert sorted(XMCLossSet(LossConfig(word_weight=0)).real_image_terms(v)) == ["d_sentence"]


def test_g_class_weight_sets_gs_class_term_alone():
    """loss.g_class_weight: G's weight on its class term (None: loss.class_weight; 0: not computed)."""
    real = _dout()._replace(classes=torch.randn(B, 4))
    v = Views(real, [_dout()._replace(classes=torch.randn(B, 4))], [_text()], None,
              class_labels=torch.tensor([0, 1, 2]))
    apart = XMCLossSet(LossConfig(class_weight=0.5, g_class_weight=0.1))
    assert apart.weights["d_class"] == 0.5 and apart.weights["g_class"] == 0.1
    headless = XMCLossSet(LossConfig(class_weight=0.0, g_class_weight=1.0))  # no head: no G term
    assert "g_class" not in headless.weights and "d_class" not in headless.weights
    off = XMCLossSet(LossConfig(class_weight=0.5, g_class_weight=0.0))
    assert "g_class" not in off.generator_terms(v) and "d_class" in off.discriminator_terms(v)
