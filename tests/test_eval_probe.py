"""The D probe (fastxmc.eval.probe): counterfactual captions, its scoring on known score functions,
and the score of a real D against a direct computation with D's forward."""
import random
import zlib

import pytest
import torch
import torch.nn.functional as F

from fastxmc.data.shapes import named_attributes
from fastxmc.eval import probe
from fastxmc.train.checkpoint import load_run
from tests.conftest import train_tiny_gan

OBJECTS = [{"shape": s, "color": c, "size": z, "position": p}
           for s, c, z, p in [("circle", "red", "small", "top"), ("star", "blue", "large", "center"),
                              ("cross", "pink", "small", "bottom left"),
                              ("square", "green", "large", "right")]]


def test_counterfactual_changes_one_attribute_to_another_value():
    rng = random.Random(0)
    for obj in OBJECTS:
        for attribute, values in probe.PROBE_ATTRIBUTES.items():
            changed = probe.counterfactual(obj, attribute, rng)
            assert changed[attribute] in values and changed[attribute] != obj[attribute]
            assert {k: v for k, v in changed.items() if k != attribute} == \
                {k: v for k, v in obj.items() if k != attribute}
            caption = probe.describe_object(changed)
            assert named_attributes(caption) == {"shape", "color", "size", "position"}


def _colour_only_score(captions):
    """A scorer that sees only whether each caption names its image's true colour."""
    return torch.tensor([float(f" {o['color']} " in c) for o, c in zip(OBJECTS, captions)])


def test_a_colour_only_scorer_wins_on_colour_and_is_at_chance_elsewhere():
    result = probe.caption_probe(_colour_only_score, OBJECTS, seed=0)
    assert result["true_score"] == 1.0
    assert result["color"] == {"accuracy": 1.0, "gap": 1.0}
    for attribute in ("shape", "size", "position"):     # ties count one half
        assert result[attribute] == {"accuracy": 0.5, "gap": 0.0}


def test_a_scorer_preferring_wrong_captions_scores_zero_and_the_seed_fixes_the_draws():
    inverted = lambda captions: -_colour_only_score(captions)  # noqa: E731
    assert probe.caption_probe(inverted, OBJECTS, seed=0)["color"]["accuracy"] == 0.0
    seen = []
    recording = lambda captions: seen.append(captions) or torch.zeros(len(captions))  # noqa: E731
    probe.caption_probe(recording, OBJECTS, seed=5)
    first, seen[:] = list(seen), []
    probe.caption_probe(recording, OBJECTS, seed=5)
    assert seen == first and len(first) == 5


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("probe")
    train_tiny_gan(base / "gan", base / "cache")
    return base


def _encoder(dim):
    """A stand-in text encoder: a fixed random embedding per caption (no transformer needed)."""
    def encode(captions):
        rows = [torch.randn(dim, generator=torch.Generator().manual_seed(zlib.crc32(c.encode())))
                for c in captions]
        sentence = torch.stack(rows)
        return sentence, sentence[:, None, :].repeat(1, 3, 1), torch.ones(len(captions), 3, dtype=torch.bool)
    return encode


def test_discriminator_score_is_the_cosine_of_ds_own_outputs(tiny_run):
    run = load_run(tiny_run / "gan", discriminator=True)
    assert run.D is not None and not run.D.training
    images = torch.rand(5, 3, run.D.resolution, run.D.resolution)
    encode = _encoder(run.text_dim)
    captions = [probe.describe_object(o) for o in OBJECTS] + ["a large red star in the center"]
    scores = probe.DiscriminatorScore(run.D, images, encode, batch_size=2)(captions)
    with torch.no_grad():
        out = run.D(images, encode(captions)[0])
    expected = F.cosine_similarity(out.features, out.sentence, dim=1)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_probe_of_a_run_reports_both_image_sets(tiny_run, monkeypatch):
    monkeypatch.setenv("FASTXMC_CACHE", str(tiny_run / "cache"))
    run = load_run(tiny_run / "gan", discriminator=True)
    (val,) = [p / "val" for p in (tiny_run / "cache" / "shapes").iterdir() if (p / "val").is_dir()]
    result = probe.probe_discriminator(run, val, _encoder(run.text_dim), n=6, seed=1, batch_size=4)
    assert result["n"] == 6
    assert result == probe.probe_discriminator(run, val, _encoder(run.text_dim), n=6, seed=1,
                                               batch_size=4)
    for side in ("real", "generated"):
        assert all(0 <= result[side][a]["accuracy"] <= 1 for a in probe.PROBE_ATTRIBUTES)
    with pytest.raises(ValueError, match="needs the run's discriminator"):
        probe.probe_discriminator(load_run(tiny_run / "gan"), val, _encoder(run.text_dim), n=6, seed=1)


def test_dual_encoder_score_is_its_similarity(tiny_run):
    from fastxmc.models.dual_encoder import DualEncoder, DualEncoderConfig
    torch.manual_seed(3)
    dual = DualEncoder(DualEncoderConfig(resolution=16, text_dim=12, width=4, embed_dim=8, region_size=8)).eval()
    images, encode = torch.rand(5, 3, 32, 32), _encoder(12)
    captions = [probe.describe_object(o) for o in OBJECTS] + ["a large red star in the center"]
    scores = probe.DualEncoderScore(dual, images, encode, batch_size=2)(captions)
    small = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        expected = dual.similarity(small, *encode(captions)).diagonal()
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_probe_with_a_dual_encoder_adds_its_table(tiny_run, monkeypatch):
    from fastxmc.models.dual_encoder import DualEncoder, DualEncoderConfig
    monkeypatch.setenv("FASTXMC_CACHE", str(tiny_run / "cache"))
    run = load_run(tiny_run / "gan", discriminator=True)
    (val,) = [p / "val" for p in (tiny_run / "cache" / "shapes").iterdir() if (p / "val").is_dir()]
    dual = DualEncoder(DualEncoderConfig(resolution=16, text_dim=run.text_dim, width=4, embed_dim=8,
                                         region_size=8)).eval()
    plain = probe.probe_discriminator(run, val, _encoder(run.text_dim), n=6, seed=1, batch_size=4)
    result = probe.probe_discriminator(run, val, _encoder(run.text_dim), n=6, seed=1, batch_size=4, dual=dual)
    assert {k: v for k, v in result.items() if k != "dual"} == plain      # D's numbers unchanged
    for side in ("real", "generated"):
        assert all(0 <= result["dual"][side][a]["accuracy"] <= 1 for a in probe.PROBE_ATTRIBUTES)
    from fastxmc.eval.run import probe_report_lines
    lines = probe_report_lines(result)
    assert sum(line.startswith("| shape |") for line in lines) == 2 and any("dual encoder" in x for x in lines)
