"""The shapes attribute classifier: accuracy on real images, caching, scoring and validation."""
import json

import pytest
import torch

from fastxmc.data.folder import DataWarning
from fastxmc.data.shapes import ShapesConfig, config_hash, ensure_shapes_dataset, read_attributes
from fastxmc.eval import attributes as attr
from fastxmc.eval.attributes import (ATTRIBUTE_VALUES, AttributeAccuracy, AttributeClassifier,
                                     AttributeClassifierConfig, attribute_accuracy, encode_targets,
                                     ensure_attribute_classifier, is_single_object, load_split,
                                     train_attribute_classifier)

DATA = ShapesConfig(n_train=1200, n_val=200, max_objects=1)
CLASSIFIER = AttributeClassifierConfig(epochs=10, width=16, batch_size=64)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def classifier(cache):
    # One intra-op thread: on the shared 2-core machines, OpenMP spin-waiting under
    # oversubscription made this training several times slower with two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ensure_attribute_classifier(DATA, CLASSIFIER, cache_dir=cache, progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def val_set(cache):
    root = ensure_shapes_dataset(DATA, cache, progress=False)
    images, _ = load_split(root, "val")
    return images, read_attributes(root / "val")


def test_classifier_is_accurate_on_real_val_images(classifier):
    report = classifier.report
    assert report["n"] == 200
    # Well above chance (the most frequent value: about 1/6, 1/8, 1/2, 1/9) on held-out images.
    assert report["color"]["accuracy"] > 0.9 and report["color"]["chance"] < 0.25
    assert report["position"]["accuracy"] > 0.9
    assert report["size"]["accuracy"] > 0.8
    assert report["shape"]["accuracy"] > report["shape"]["chance"] + 0.25
    assert report["all"]["accuracy"] > 10 * report["all"]["chance"]


def test_scores_on_real_images_match_the_report_and_drop_for_wrong_targets(classifier, val_set):
    images, records = val_set
    result = attribute_accuracy(images.float() / 255, records, classifier)
    assert result["n"] == 200
    for name in (*ATTRIBUTE_VALUES, "all"):
        assert result[name]["accuracy"] == pytest.approx(classifier.report[name]["accuracy"])
        assert result[name]["real_val_accuracy"] == classifier.report[name]["accuracy"]
        assert result[name]["chance"] == classifier.report[name]["chance"]
    # Targets of other images: about chance level.
    shuffled = [records[(i + 7) % len(records)] for i in range(len(records))]
    wrong = attribute_accuracy(images, shuffled, classifier)
    assert wrong["color"]["accuracy"] < 0.35 and wrong["position"]["accuracy"] < 0.3


def test_streaming_accumulation_and_resized_inputs(classifier, val_set):
    images, records = val_set
    meter = AttributeAccuracy(classifier)
    meter.update(images[:50], records[:50])
    meter.update(images[50:], records[50:])
    assert meter.compute() == attribute_accuracy(images, records, classifier)
    # Generated images at twice the resolution are resized to the classifier's.
    big = torch.nn.functional.interpolate(images.float() / 255, scale_factor=2, mode="nearest")
    agree = (classifier.predict(big)["color"] == classifier.predict(images)["color"]).double().mean()
    assert agree > 0.95


def test_named_accuracy_scores_only_the_rows_whose_caption_names_the_attribute(classifier, val_set):
    images, records = val_set
    images, records = images[:40], records[:40]
    predicted = classifier.predict(images)
    targets = attr.encode_targets(records)
    # Rows 0-19 name the position, rows 20-39 do not; no row names the size.
    named = [{"shape", "color", "position"}] * 20 + [{"shape", "color"}] * 20
    meter = AttributeAccuracy(classifier)
    meter.update(images[:25], records[:25], named[:25])
    meter.update(images[25:], records[25:], named[25:])
    result = meter.compute()
    plain = attribute_accuracy(images, records, classifier)
    for name in ATTRIBUTE_VALUES:
        assert result[name]["accuracy"] == plain[name]["accuracy"]
    expected = float((predicted["position"][:20] == targets["position"][:20]).double().mean())
    assert result["position"]["named_accuracy"] == expected and result["position"]["named_n"] == 20
    assert result["color"]["named_n"] == 40 and result["color"]["named_accuracy"] == plain["color"]["accuracy"]
    assert result["size"]["named_n"] == 0 and result["size"]["named_accuracy"] is None
    with pytest.raises(ValueError, match="one set of attribute names per row"):
        meter.update(images[:2], records[:2], named[:1])
    with pytest.raises(ValueError, match="with every update"):
        meter.update(images[:2], records[:2])


def test_the_classifier_is_cached_by_dataset_and_config(classifier, cache, monkeypatch):
    files = list((cache / "attributes").glob("*.pt"))
    assert [f.name[:16] for f in files] == [config_hash(DATA)[:16]]

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")
    monkeypatch.setattr(attr, "train_attribute_classifier", no_training)
    again = ensure_attribute_classifier(DATA, CLASSIFIER, cache_dir=cache, progress=False)
    assert again.report == classifier.report
    for key, value in classifier.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)
    # The dataset root works as well, and $FASTXMC_CACHE is the default cache.
    monkeypatch.setenv("FASTXMC_CACHE", str(cache))
    root = ensure_shapes_dataset(DATA, cache, progress=False)
    assert ensure_attribute_classifier(root, CLASSIFIER, progress=False).report == classifier.report
    # Another classifier config is another cache entry.
    with pytest.raises(AssertionError, match="trained again"):
        ensure_attribute_classifier(DATA, AttributeClassifierConfig(epochs=11, width=16), cache_dir=cache)
    # An unreadable cache file is retrained (and would be overwritten), never trusted.
    junk = cache / "junk-cache"
    (junk / "attributes").mkdir(parents=True)
    (junk / "attributes" / files[0].name).write_bytes(b"truncated")
    with pytest.raises(AssertionError, match="trained again"), \
            pytest.warns(DataWarning, match="is damaged .*rebuilding it"):
        ensure_attribute_classifier(root, CLASSIFIER, cache_dir=junk)


def test_training_is_deterministic(cache):
    root = ensure_shapes_dataset(DATA, cache, progress=False)
    cfg = AttributeClassifierConfig(epochs=1, width=8, batch_size=64, max_train=128)
    a, report_a = train_attribute_classifier(root, cfg, progress=False)
    b, report_b = train_attribute_classifier(root, cfg, progress=False)
    assert report_a == report_b
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0)


def test_targets_and_chance_by_hand():
    flat = [{"shape": "star", "color": "red", "size": "small", "position": "top"},
            {"shape": "star", "color": "blue", "size": "large", "position": "top"},
            {"objects": [{"shape": "circle", "color": "red", "size": "small", "position": "center"}]}]
    targets = encode_targets(flat)
    assert targets["shape"].tolist() == [4, 4, 0]
    assert targets["color"].tolist() == [0, 5, 0]
    assert targets["position"].tolist() == [1, 1, 4]
    chance = attr._chance(targets)
    assert chance == {"shape": 2 / 3, "color": 2 / 3, "size": 2 / 3, "position": 2 / 3, "all": 1 / 3}


def test_bad_targets_and_inputs_are_rejected(classifier):
    two = {"objects": [{"shape": "star", "color": "red", "size": "small", "position": "top"}] * 2}
    assert not is_single_object(two)
    with pytest.raises(ValueError, match="2 objects"):
        encode_targets([two])
    with pytest.raises(ValueError, match="color"):
        encode_targets([{"shape": "star", "color": "magenta", "size": "small", "position": "top"}])
    with pytest.raises(TypeError, match="dict"):
        encode_targets(["red star"])
    with pytest.raises(ValueError, match="one row per target"):
        attribute_accuracy(torch.rand(3, 3, 64, 64), [two["objects"][0]] * 2, classifier)
    with pytest.raises(ValueError, match="images"):
        classifier(torch.rand(2, 64, 64))
    with pytest.raises(ValueError, match="width"):
        AttributeClassifierConfig(width=0)
    with pytest.raises(ValueError, match="resolution"):
        AttributeClassifier(resolution=8)


def test_load_split_keeps_single_object_images_only(tmp_path):
    root = ensure_shapes_dataset(ShapesConfig(n_train=30, n_val=4, two_object_prob=0.5), tmp_path,
                                 progress=False)
    records = read_attributes(root / "train")
    images, targets = load_split(root, "train")
    singles = [r for r in records if len(r["objects"]) == 1]
    assert 0 < len(singles) < len(records)
    assert images.shape == (len(singles), 3, 64, 64) and images.dtype == torch.uint8
    assert targets["shape"].tolist() == encode_targets(singles)["shape"].tolist()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        ensure_attribute_classifier(tmp_path / "nowhere")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "meta.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a complete shapes dataset"):
        ensure_attribute_classifier(tmp_path / "fake")
