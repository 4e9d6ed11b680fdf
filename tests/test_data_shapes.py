"""The embedded shapes dataset (fastxmc.data.shapes) and the folder format (fastxmc.data.folder)."""
import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from fastxmc.data import shapes
from fastxmc.data.folder import DatasetFormatError, Record, read_records, write_records
from fastxmc.data.shapes import ShapesConfig, generate_sample, sample_rng

TINY = ShapesConfig(resolution=32, n_train=12, n_val=4, seed=3)


def _tree(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


# ---------------------------------------------------------------------------------------------
# Generator


def test_same_seed_same_samples_different_seed_differs():
    cfg = ShapesConfig(resolution=48, seed=7)
    a = [generate_sample(sample_rng(cfg, "train", i), cfg) for i in range(6)]
    b = [generate_sample(sample_rng(cfg, "train", i), cfg) for i in range(6)]
    for x, y in zip(a, b):
        assert x.image.dtype == np.uint8 and x.image.shape == (48, 48, 3)
        assert x.image.tobytes() == y.image.tobytes()
        assert x.captions == y.captions and x.label == y.label and x.attributes == y.attributes
    other = ShapesConfig(resolution=48, seed=8)
    c = [generate_sample(sample_rng(other, "train", i), other) for i in range(6)]
    assert all(x.image.tobytes() != z.image.tobytes() for x, z in zip(a, c))
    val = [generate_sample(sample_rng(cfg, "val", i), cfg) for i in range(6)]
    assert all(x.image.tobytes() != v.image.tobytes() for x, v in zip(a, val))


def test_captions_varied_and_name_primary_object():
    cfg = ShapesConfig(n_captions=5)
    n_two = 0
    for i in range(150):
        s = generate_sample(sample_rng(cfg, "train", i), cfg)
        assert len(s.captions) == 5 and len(set(s.captions)) == 5
        objs = s.attributes["objects"]
        n_two += len(objs) == 2
        for c in s.captions:
            words = c.replace(",", " ").replace(":", " ").split()
            assert objs[0]["shape"] in words and objs[0]["color"] in words, c
            if len(objs) == 2:   # two-object captions name both objects
                assert objs[1]["shape"] in words and objs[1]["color"] in words, c
            assert len(c.split()) <= 15, c
            assert c == c.lower() and c.strip() == c
    assert 40 < n_two < 110
    # background colour words never clash with object colour words
    assert not set(shapes.BACKGROUND_COLORS) & set(shapes.COLORS)


def test_labels_follow_attributes():
    assert shapes.NUM_CLASSES == len(shapes.LABEL_NAMES) == len(shapes.SHAPES) * len(shapes.COLORS)
    cfg = ShapesConfig(resolution=32)
    seen = set()
    for i in range(200):
        s = generate_sample(sample_rng(cfg, "train", i), cfg)
        o = s.attributes["objects"][0]
        assert s.label == s.attributes["label"] == shapes.label_of(o["shape"], o["color"])
        assert shapes.LABEL_NAMES[s.label] == f"{o['color']} {o['shape']}"
        assert o["position"] == shapes.POSITIONS[o["row"] * 3 + o["col"]]
        seen.add(s.label)
    assert len(seen) > 30


def test_label_attribute_decodes_the_label():
    labels = [shapes.label_of(s, c) for s in shapes.SHAPES for c in shapes.COLORS] + [-1]
    colors = shapes.label_attribute(labels, "color")
    kinds = shapes.label_attribute(labels, "shape")
    for label, color, kind in zip(labels[:-1], colors, kinds):
        assert shapes.LABEL_NAMES[label] == f"{shapes.COLORS[color]} {shapes.SHAPES[kind]}"
    assert colors[-1] == kinds[-1] == -1                      # unlabelled stays unlabelled
    with pytest.raises(ValueError, match="attribute must be 'shape' or 'color', got 'size'"):
        shapes.label_attribute(labels, "size")
    with pytest.raises(ValueError, match=r"labels must be shapes class ids in \[0, 48\)"):
        shapes.label_attribute([48], "color")


def test_objects_are_drawn_where_and_in_the_colour_the_attributes_say():
    cfg = ShapesConfig(resolution=64, max_objects=1)
    for i in range(30):
        s = generate_sample(sample_rng(cfg, "train", i), cfg)
        o = s.attributes["objects"][0]
        x, y = (int(v * 64) for v in o["center"])
        if o["shape"] in ("star", "cross", "triangle"):
            y += 2 if o["shape"] == "triangle" else 0
        px = s.image[y, x].astype(int)
        assert np.abs(px - np.array(shapes.COLOR_RGB[o["color"]])).max() <= 12, (i, o, px)


def test_config_validation():
    with pytest.raises(ValueError, match="max_objects"):
        ShapesConfig(max_objects=3)
    with pytest.raises(ValueError, match="resolution"):
        ShapesConfig(resolution=4)


# ---------------------------------------------------------------------------------------------
# On disk


def test_write_dataset_layout_determinism_and_idempotence(tmp_path, capsys):
    root = shapes.write_shapes_dataset(tmp_path / "a", TINY, progress=False)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["complete"] and meta["splits"] == {"train": {"folder": "train", "n": 12},
                                                   "val": {"folder": "val", "n": 4}}
    assert meta["label_names"] == list(shapes.LABEL_NAMES) and meta["config"]["seed"] == 3
    train = read_records(root / "train")
    val = read_records(root / "val")
    assert len(train) == 12 and len(val) == 4
    attrs = shapes.read_attributes(root / "train")
    for rec, at in zip(train, attrs):
        assert rec.image == at["image"] and rec.labels == [at["label"]] and len(rec.captions) == 5
    # the files hold exactly what the generator draws
    s = generate_sample(sample_rng(TINY, "val", 2), TINY)
    assert np.array_equal(np.asarray(Image.open(val[2].path)), s.image)
    assert val[2].captions == s.captions
    # same config elsewhere -> byte-identical tree
    other = shapes.write_shapes_dataset(tmp_path / "b", TINY, progress=False)
    assert _tree(root) == _tree(other)
    # idempotent: a second call returns at once and touches nothing
    mtime = (root / "meta.json").stat().st_mtime_ns
    assert shapes.write_shapes_dataset(root, TINY) == root
    assert (root / "meta.json").stat().st_mtime_ns == mtime
    assert capsys.readouterr().err == ""
    # a different config does not silently reuse or clobber it
    with pytest.raises(FileExistsError, match="overwrite"):
        shapes.write_shapes_dataset(root, ShapesConfig(resolution=32, n_train=12, n_val=4, seed=4),
                                    progress=False)
    new = ShapesConfig(resolution=32, n_train=5, n_val=0, seed=4)
    shapes.write_shapes_dataset(root, new, progress=False, overwrite=True)
    assert shapes.is_complete(root, new) and not (root / "val").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_interrupted_write_leaves_nothing_and_stale_temp_is_cleaned(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    real = shapes.generate_sample
    calls = {"n": 0}

    def boom(rng, cfg):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(rng, cfg)

    monkeypatch.setattr(shapes, "generate_sample", boom)
    with pytest.raises(KeyboardInterrupt):
        shapes.write_shapes_dataset(root, TINY, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(shapes, "generate_sample", real)
    # a temp dir left by a killed process (dead pid), even one that looks complete, is not used
    stale = tmp_path / ".ds.tmp-4194999-deadbeef"
    shapes.write_shapes_dataset(tmp_path / "elsewhere", TINY, progress=False)
    os.replace(tmp_path / "elsewhere", stale)
    assert not shapes.is_complete(root, TINY)
    shapes.write_shapes_dataset(root, TINY, progress=True)
    assert shapes.is_complete(root, TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    # a meta.json without the completion mark is not a dataset
    meta = json.loads((root / "meta.json").read_text())
    meta["complete"] = False
    (root / "meta.json").write_text(json.dumps(meta))
    assert not shapes.is_complete(root, TINY)


def test_ensure_uses_cache_dir_keyed_by_config(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTXMC_CACHE", str(tmp_path / "cache"))
    assert shapes.default_cache_dir() == tmp_path / "cache"
    cfg = ShapesConfig(resolution=32, n_train=3, n_val=2)
    root = shapes.ensure_shapes_dataset(cfg, progress=False)
    assert root == tmp_path / "cache" / "shapes" / shapes.config_hash(cfg)[:16]
    assert shapes.ensure_shapes_dataset(cfg, progress=False) == root
    assert shapes.config_hash(cfg) != shapes.config_hash(ShapesConfig(resolution=32, n_train=3, n_val=1))


# ---------------------------------------------------------------------------------------------
# Folder format


def _folder(tmp_path, lines, images=("a.png",)):
    d = tmp_path / "ds"
    (d / "images").mkdir(parents=True)
    for name in images:
        (d / "images" / name).write_bytes(b"x")
    (d / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_folder_round_trip(tmp_path):
    d = tmp_path / "ds"
    (d / "images").mkdir(parents=True)
    for n in ("a.png", "b.png"):
        (d / "images" / n).write_bytes(b"x")
    recs = [Record("images/a.png", ["a red circle", "a circle, red"], [3]),
            {"image": "images/b.png", "captions": ["une étoile"], "source": "x"}]
    write_records(d, recs)
    out = read_records(d)
    assert [r.image for r in out] == ["images/a.png", "images/b.png"]
    assert out[0].captions == ["a red circle", "a circle, red"] and out[0].labels == [3]
    assert out[1].labels is None and out[1].captions == ["une étoile"] and out[1].extra == {"source": "x"}
    assert out[0].path == (d / "images" / "a.png").absolute()
    assert not any(p.name.startswith(".") for p in d.iterdir())


@pytest.mark.parametrize("lines, exc, match", [
    (['{"image": "images/a.png", "captions": ["ok"]}', '{"image": "images/a.png", "captions": ['],
     DatasetFormatError, r"captions.jsonl:2: malformed JSON"),
    (['{"image": "images/a.png"}'], DatasetFormatError, r":1: entry has no 'captions'"),
    (['{"image": "images/a.png", "captions": []}'], DatasetFormatError,
     r":1: 'captions' must be a non-empty"),
    (['{"image": "images/a.png", "captions": "one"}'], DatasetFormatError, "one string"),
    (['{"captions": ["x"]}'], DatasetFormatError, "no 'image'"),
    (['{"image": "../outside.png", "captions": ["x"]}'], DatasetFormatError, "escapes the dataset folder"),
    (['{"image": "images/../../x.png", "captions": ["x"]}'], DatasetFormatError, "escapes the dataset"),
    (['{"image": "/etc/passwd", "captions": ["x"]}'], DatasetFormatError, "must be relative"),
    (['', '{"image": "images/missing.png", "captions": ["x"]}'], FileNotFoundError,
     r":2: image 'images/missing.png' not found"),
    (['{"image": "images/a.png", "captions": ["x"], "labels": 3}'], DatasetFormatError, "list of integers"),
    (['[1, 2]'], DatasetFormatError, "expected a JSON object"),
    ([''], DatasetFormatError, "empty dataset"),
])
def test_folder_errors_name_path_and_line(tmp_path, lines, exc, match):
    d = _folder(tmp_path, lines)
    with pytest.raises(exc, match=match) as info:
        read_records(d)
    assert str(d) in str(info.value)


def test_folder_missing_folder_or_annotations(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        read_records(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="captions.jsonl"):
        read_records(tmp_path / "empty")
    # missing images are only checked on request
    d = _folder(tmp_path, ['{"image": "images/gone.png", "captions": ["x"]}'])
    assert read_records(d, check_images=False)[0].image == "images/gone.png"


def test_write_records_rejects_bad_records(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(DatasetFormatError, match="empty dataset"):
        write_records(tmp_path, [])
    with pytest.raises(DatasetFormatError, match="no 'captions'"):
        write_records(tmp_path, [{"image": "a.png"}])
    with pytest.raises(FileNotFoundError, match="b.png"):
        write_records(tmp_path, [Record("b.png", ["x"])])
    assert not (tmp_path / "captions.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_background_kinds_and_single_objects_are_configurable():
    cfg = ShapesConfig(resolution=32, n_train=40, n_val=0, seed=5, max_objects=1, backgrounds=("gradient",))
    samples = [generate_sample(sample_rng(cfg, "train", i), cfg) for i in range(40)]
    assert {s.attributes["background"]["kind"] for s in samples} == {"gradient"}
    assert all(len(s.attributes["objects"]) == 1 for s in samples)
    # Every kind (the default) keeps the cache key datasets had before the option existed.
    default = ShapesConfig(resolution=32, n_train=40, n_val=0, seed=5)
    assert default.backgrounds == shapes.BACKGROUND_KINDS
    fields = dataclasses.asdict(default)
    del fields["backgrounds"], fields["object_scale"]
    before = json.dumps({"generator_version": shapes.GENERATOR_VERSION, **fields}, sort_keys=True)
    assert shapes.config_hash(default) == hashlib.sha256(before.encode()).hexdigest()
    assert shapes.config_hash(default) != shapes.config_hash(cfg)
    assert shapes.config_hash(ShapesConfig(resolution=32, n_train=40, n_val=0, seed=5,
                                           backgrounds=("gradient", "stripes"))) != shapes.config_hash(cfg)
    for bad in ((), ("gradient", "gradient"), ("plaid",)):
        with pytest.raises(ValueError, match="backgrounds must be distinct kinds"):
            ShapesConfig(backgrounds=bad)


def test_object_scale_enlarges_the_objects_and_keeps_everything_else():
    base = ShapesConfig(resolution=32, n_train=20, n_val=0, seed=2, max_objects=1)
    big = dataclasses.replace(base, object_scale=1.3)
    for i in range(20):
        a, b = (generate_sample(sample_rng(c, "train", i), c) for c in (base, big))
        # the same draws: captions, labels and positions are unchanged, only the drawing grows
        assert a.captions == b.captions and a.label == b.label
        oa, ob = a.attributes["objects"][0], b.attributes["objects"][0]
        assert oa["center"] == ob["center"] and oa["size"] == ob["size"]
        assert ob["half_size"] == pytest.approx(oa["half_size"] * 1.3, abs=1e-4)
        rgb = np.array(shapes.COLOR_RGB[oa["color"]], np.int16)
        covered = [(np.abs(np.asarray(s.image, np.int16) - rgb).max(axis=2) <= 12).sum() for s in (a, b)]
        assert covered[1] > 1.3 * covered[0] > 0  # painted area grows about with the scale squared
    # 1.0 keeps the cache key datasets had before the option; another scale is another dataset
    fields = dataclasses.asdict(base)
    del fields["object_scale"], fields["backgrounds"]  # both at their defaults
    before = json.dumps({"generator_version": shapes.GENERATOR_VERSION, **fields}, sort_keys=True)
    assert shapes.config_hash(base) == hashlib.sha256(before.encode()).hexdigest()
    assert shapes.config_hash(big) != shapes.config_hash(base)
    for bad in (0.2, 2.0):
        with pytest.raises(ValueError, match="object_scale must be in"):
            dataclasses.replace(base, object_scale=bad)


def test_named_positions_read_the_longest_phrase():
    named = shapes.named_positions
    assert named("a small red circle at the top left") == {"top left"}
    assert named("a red circle at the top") == {"top"}
    assert named("a blue star at the top center") == {"top"}
    assert named("a green square in the top left corner") == {"top left"}
    assert named("a cyan cross at the top, a red star on the right") == {"top", "right"}
    assert named("a red square above a blue circle") == frozenset()
    # Two-object captions: the positions named are exactly those of the objects whose phrase the
    # generator wrote, never a shorter phrase's position inside a longer one.
    cfg = ShapesConfig(resolution=32, n_train=60, n_val=0, max_objects=2, two_object_prob=1.0)
    for i in range(60):
        objects = generate_sample(sample_rng(cfg, "train", i), cfg).attributes["objects"]
        for caption in generate_sample(sample_rng(cfg, "train", i), cfg).captions:
            assert named(caption) <= {o["position"] for o in objects}, caption


def test_named_attributes_follow_the_caption_words():
    named = shapes.named_attributes
    assert named("a small red circle at the top left") == {"shape", "color", "size", "position"}
    assert named("a picture of a big cyan triangle") == {"shape", "color", "size"}
    assert named("in the middle, a green star") == {"shape", "color", "position"}
    assert named("a pink diamond, by itself, near the bottom") == {"shape", "color", "position"}
    assert named("a square colored yellow on a brown gradient background") == {"shape", "color"}
    assert named("a starry sky") == {"shape", "color"}  # "starry" is not "small"/"large"/a position
    # Every single-object caption the generator writes: size and position are named exactly when
    # the object's own size / position words appear.
    cfg = ShapesConfig(resolution=32, n_train=40, n_val=0, max_objects=1)
    for i in range(40):
        sample = generate_sample(sample_rng(cfg, "train", i), cfg)
        obj = sample.attributes["objects"][0]
        for caption in sample.captions:
            got = named(caption)
            assert ("position" in got) == any(p in caption for p in shapes._POS_WORDS[obj["position"]])
            assert ("size" in got) == any(f"{w} " in caption for w in shapes._SIZE_WORDS[obj["size"]])

