"""The counterfactual-caption term (loss.counterfactual_weight): grid, per-sample tables, value
against a loop reference, masking, the loss-set wiring and config errors."""
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastxmc.data.folder import Record
from fastxmc.data.shapes import ATTRIBUTE_VALUES, describe_object
from fastxmc.train.config import LossConfig, TrainConfig, validate
from fastxmc.train.counterfactual import (GRID_AXES, CounterfactualTerm, description_grid, grid_ids,
                                          object_codes, parse_attributes, sample_codes_and_named)
from fastxmc.train.losses import DOut, FrozenDualEncoder, Text, Views, XMCLossSet

GRID = int(np.prod([len(ATTRIBUTE_VALUES[a]) for a in GRID_AXES]))


def _random_object(rng: random.Random) -> dict:
    return {a: rng.choice(ATTRIBUTE_VALUES[a]) for a in GRID_AXES}


def test_grid_ids_index_the_description_of_the_object():
    grid = description_grid()
    assert len(grid) == GRID == len(set(grid))
    rng = random.Random(0)
    objects = [_random_object(rng) for _ in range(50)]
    ids = grid_ids(torch.tensor([object_codes(o) for o in objects]))
    assert [grid[i] for i in ids.tolist()] == [describe_object(o) for o in objects]


def test_parse_attributes_and_its_errors():
    assert parse_attributes("shape") == ("shape",)
    assert parse_attributes("shape + position") == ("shape", "position")
    for bad in ("", "shape+shape", "shape+texture", "shape,position"):
        with pytest.raises(ValueError, match="loss.counterfactual_attributes must be"):
            parse_attributes(bad)


def _reference(image, text, codes, named, attributes, t):
    """Loop reference: per counted (sample, attribute), CE over the attribute's values."""
    losses = []
    for i in range(image.shape[0]):
        if codes[i][0] < 0:
            continue
        for k, attribute in enumerate(attributes):
            if not named[i][k]:
                continue
            axis = GRID_AXES.index(attribute)
            logits = []
            for v in range(len(ATTRIBUTE_VALUES[attribute])):
                candidate = list(codes[i])
                candidate[axis] = v
                row = grid_ids(torch.tensor(candidate)).item()
                logits.append(F.cosine_similarity(image[i], text[row], dim=0).item() / t)
            log_z = math.log(sum(math.exp(x) for x in logits))
            losses.append(log_z - logits[codes[i][axis]])
    return sum(losses) / max(len(losses), 1)


def test_term_matches_the_loop_reference_and_leaves_out_what_does_not_count():
    torch.manual_seed(0)
    rng = random.Random(1)
    b, e, attributes = 6, 5, ("shape", "position", "size")
    text = torch.randn(GRID, e, dtype=torch.float64)
    codes = torch.tensor([object_codes(_random_object(rng)) for _ in range(b)])
    codes[2] = -1                                      # a two-object image: left out
    named = torch.rand(b, 3, len(attributes)) > 0.3    # 3 captions per sample
    named[:, :, 0] = True                              # shape is always named
    term = CounterfactualTerm(text, codes, named, attributes, temperature=0.1)
    index, caption = torch.tensor([5, 2, 0, 3]), torch.tensor([1, 0, 2, 2])
    image = torch.randn(4, e, dtype=torch.float64, requires_grad=True)
    got = term(image, index, caption)
    expected = _reference(image.detach(), text, codes[index].tolist(), named[index, caption].tolist(),
                          attributes, 0.1)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    (grad,) = torch.autograd.grad(got, image)
    assert grad[1].abs().sum() == 0 and grad[0].abs().sum() > 0   # the left-out row gets no gradient
    # nothing counts: zero, still differentiable
    nothing = CounterfactualTerm(text, codes, torch.zeros_like(named), attributes, 0.1)(image, index, caption)
    assert nothing.item() == 0.0 and nothing.requires_grad


def test_term_prefers_the_true_description():
    """With an image feature equal to its description's text feature the loss is below chance."""
    torch.manual_seed(1)
    text = torch.randn(GRID, 64)
    codes = torch.tensor([object_codes(_random_object(random.Random(i))) for i in range(8)])
    term = CounterfactualTerm(text, codes, torch.ones(8, 1, 1, dtype=torch.bool), ("shape",), 0.1)
    true = text[grid_ids(codes)]
    assert term(true, torch.arange(8), torch.zeros(8, dtype=torch.int64)).item() < 0.1
    assert term(-true, torch.arange(8), torch.zeros(8, dtype=torch.int64)).item() > math.log(6)


def test_sample_tables_from_records_and_attributes():
    obj = {"shape": "star", "color": "red", "size": "small", "position": "top"}
    records = [Record("a.png", ["a red star", "a small red star at the top"]),
               Record("b.png", ["a red star above a blue circle"])]
    attribute_records = [{"image": "b.png", "objects": [obj, {**obj, "color": "blue"}]},
                         {"image": "a.png", "objects": [obj]}]
    codes, named = sample_codes_and_named(records, attribute_records, ("shape", "size", "position"))
    assert codes[0].tolist() == object_codes(obj) and codes[1].tolist() == [-1] * 4
    assert named[0].tolist() == [[True, False, False], [True, True, True]]
    assert not named[1].any()
    with pytest.raises(ValueError, match="no record of image 'a.png'"):
        sample_codes_and_named(records, attribute_records[:1], ("shape",))


def _dout(n):
    return DOut(torch.randn(n), torch.randn(n, 4), torch.randn(n, 5, 6), torch.randn(n, 4))


def test_loss_set_scores_each_branch_in_the_frozen_encoder(tmp_path):
    from fastxmc.models.dual_encoder import DualEncoder, DualEncoderConfig
    torch.manual_seed(2)
    dual = DualEncoder(DualEncoderConfig(resolution=16, text_dim=6, width=4, embed_dim=8, region_size=8))
    dual.save(tmp_path / "dual_encoder.pt")
    frozen = FrozenDualEncoder(str(tmp_path))
    rng = random.Random(3)
    codes = torch.tensor([object_codes(_random_object(rng)) for _ in range(3)])
    term = CounterfactualTerm(torch.randn(GRID, 8), codes, torch.ones(3, 2, 1, dtype=torch.bool),
                              ("shape",), 0.1)
    cfg = LossConfig(dual_encoder=str(tmp_path), counterfactual_weight=0.5)
    losses = XMCLossSet(cfg, dual=frozen, counterfactual=term)
    assert losses.weights["g_counterfactual"] == 0.5 and not losses.active("g_dual")
    texts = [Text(torch.randn(3, 6), torch.randn(3, 4, 6), torch.ones(3, 4, dtype=torch.bool))] * 2
    fakes = [torch.rand(3, 3, 32, 32, requires_grad=True) for _ in texts]
    views = Views(_dout(3), [_dout(3), _dout(3)], texts, None)
    samples = (torch.tensor([2, 0, 1]), [torch.tensor([0, 1, 1]), torch.tensor([1, 0, 0])])
    g = losses.generator_terms(views, None, fakes, samples=samples)
    assert "g_dual" not in g
    with torch.no_grad():
        expected = [term(frozen.encode_image(f), samples[0], c) for f, c in zip(fakes, samples[1])]
    assert g["g_counterfactual"].item() == pytest.approx(sum(e.item() for e in expected) / 2, rel=1e-5)
    grads = torch.autograd.grad(g["g_counterfactual"], fakes)
    assert all(gr.abs().sum() > 0 for gr in grads) and all(p.grad is None for p in frozen.parameters())
    with pytest.raises(ValueError, match="needs the batch's samples"):
        losses.generator_terms(views, None, fakes)
    with pytest.raises(ValueError, match="needs the dual encoder"):
        XMCLossSet(cfg, counterfactual=term)


def test_config_errors_name_the_option():
    cfg = TrainConfig()
    cfg.loss.counterfactual_weight = 1.0
    with pytest.raises(ValueError, match="loss.counterfactual_weight > 0 needs loss.dual_encoder"):
        validate(cfg)
    cfg.loss.dual_encoder = "runs/dual"
    cfg.loss.counterfactual_attributes = "shape+hue"
    with pytest.raises(ValueError, match="loss.counterfactual_attributes must be"):
        validate(cfg)
    cfg.loss.counterfactual_attributes = "shape"
    cfg.data.dataset, cfg.data.path = "coco", "/data/coco"
    with pytest.raises(ValueError, match="needs the shapes dataset.*'coco'"):
        validate(cfg)
    cfg.loss.counterfactual_weight = -1.0
    cfg.data.dataset, cfg.data.path = "shapes", None
    with pytest.raises(ValueError, match="loss.counterfactual_weight"):
        validate(cfg)


def test_jittered_views_are_whole_pixel_shifts_with_repeated_edges():
    from fastxmc.train.losses import jittered
    torch.manual_seed(3)
    images = torch.rand(6, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.equal(jittered(images, 0, 0.0), images)
    moved = jittered(images, 2, 0.0)
    padded = F.pad(images.detach(), (2, 2, 2, 2), mode="replicate")
    for i in range(6):   # each view is the image read at some offset within +-2 px, edges repeated
        offsets = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.allclose(moved[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert len(offsets) >= 1
    noisy = jittered(images, 0, 0.1) - images
    assert 0.05 < noisy.std().item() < 0.15
    (grad,) = torch.autograd.grad(moved.sum(), images)
    assert grad.sum().item() == pytest.approx(images.numel())   # every output pixel reads one input


def test_dual_views_average_the_terms_over_jittered_copies(tmp_path):
    from fastxmc.models.dual_encoder import DualEncoder, DualEncoderConfig
    from fastxmc.train.losses import contrastive_loss, jittered
    torch.manual_seed(4)
    DualEncoder(DualEncoderConfig(resolution=16, text_dim=6, width=4, embed_dim=8, region_size=8)).save(
        tmp_path / "dual_encoder.pt")
    frozen = FrozenDualEncoder(str(tmp_path))
    cfg = LossConfig(dual_encoder=str(tmp_path), dual_weight=1.0, dual_views=2, dual_shift=1, dual_noise=0.05)
    losses = XMCLossSet(cfg, dual=frozen)
    texts = [Text(torch.randn(3, 6), torch.randn(3, 4, 6), torch.ones(3, 4, dtype=torch.bool))]
    fakes = [torch.rand(3, 3, 16, 16)]
    views = Views(_dout(3), [_dout(3)], texts, None)
    torch.manual_seed(5)
    got = losses.generator_terms(views, None, fakes)["g_dual"]
    torch.manual_seed(5)
    copies = [jittered(fakes[0], 1, 0.05) for _ in range(2)]
    sentence = frozen.encode_sentence(*texts[0])
    expected = sum(contrastive_loss(frozen.encode_image(c), sentence) for c in copies) / 2
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="loss.dual_views"):
        bad = TrainConfig()
        bad.loss.dual_views = -1
        validate(bad)
