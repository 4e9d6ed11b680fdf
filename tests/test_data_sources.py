"""Dataset readers (COCO, CUB, Localized Narratives, folder, shapes) and the bad-data handling,
on miniature datasets written here."""
import io
import json
import os
import pickle
import warnings

import numpy as np
import pytest
from PIL import Image

from fastxmc.data import sources
from fastxmc.data.config import DataConfig
from fastxmc.data.cub import crop_box
from fastxmc.data.folder import DatasetFormatError, write_records
from fastxmc.data.sources import DataWarning, UnreadableImageError, image_problem, load_split, read_split


def _image(path, size=(20, 16), seed=0, fmt=None):
    """A random RGB image file (PNG or JPEG by suffix); returns its bytes."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buf, format=fmt or ("JPEG" if path.suffix == ".jpg" else "PNG"))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _cfg(tmp_path, **kw):
    return DataConfig(cache_dir=str(tmp_path / "cache"), workers=1, **kw)


# ---------------------------------------------------------------------------------------------
# COCO


def _coco(root, with_instances=True):
    (root / "annotations").mkdir(parents=True)
    for i, name in enumerate(["COCO_train2014_000000000009.jpg", "COCO_train2014_000000000025.jpg",
                              "COCO_train2014_000000000030.jpg"]):
        _image(root / "train2014" / name, seed=i)
    caps = {"images": [{"id": 25, "file_name": "COCO_train2014_000000000025.jpg"},
                       {"id": 9, "file_name": "COCO_train2014_000000000009.jpg"},
                       {"id": 30, "file_name": "COCO_train2014_000000000030.jpg"}],
            "annotations": [{"id": 5, "image_id": 9, "caption": " A dog on a sofa.\n"},
                            {"id": 2, "image_id": 9, "caption": "A sleeping dog"},
                            {"id": 7, "image_id": 25, "caption": "Two giraffes."}]}   # image 30: none
    (root / "annotations" / "captions_train2014.json").write_text(json.dumps(caps))
    if with_instances:
        inst = {"images": caps["images"],
                "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"},
                               {"id": 25, "name": "giraffe"}, {"id": 62, "name": "chair"}],
                # image 9: dog total 30+40 = 70 > chair 50 > person 10; image 25: none
                "annotations": [{"id": 1, "image_id": 9, "category_id": 62, "area": 50.0},
                                {"id": 2, "image_id": 9, "category_id": 18, "area": 30.0},
                                {"id": 3, "image_id": 9, "category_id": 1, "area": 10.0},
                                {"id": 4, "image_id": 9, "category_id": 18, "area": 40.0}]}
        (root / "annotations" / "instances_train2014.json").write_text(json.dumps(inst))


def test_coco_captions_labels_and_records_cache(tmp_path, monkeypatch):
    root = tmp_path / "coco"
    _coco(root)
    cfg = _cfg(tmp_path, dataset="coco", path=str(root))
    with pytest.warns(DataWarning, match="1 images without captions"):
        data = read_split(cfg, "train")
    assert [r.extra["coco_id"] for r in data.records] == [9, 25]
    assert data.records[0].captions == ["A sleeping dog", "A dog on a sofa."]   # annotation id order
    assert data.records[0].path == root / "train2014" / "COCO_train2014_000000000009.jpg"
    # categories numbered in id order: person 0, dog 1, giraffe 2, chair 3; labels by area
    assert data.label_names == ["person", "dog", "giraffe", "chair"]
    assert data.records[0].labels == [1, 3, 0] and data.records[1].labels == []
    assert data.primary_labels().tolist() == [1, -1] and data.num_classes == 4
    # parsed once: a second read comes from the cache (and repeats the warning)
    monkeypatch.setattr("fastxmc.data.coco.read_coco", lambda *a: pytest.fail("cache not used"))
    with pytest.warns(DataWarning, match="without captions"):
        again = read_split(cfg, "train")
    assert [(r.image, r.captions, r.labels) for r in again.records] == \
           [(r.image, r.captions, r.labels) for r in data.records]
    monkeypatch.undo()
    # editing an annotation file invalidates the cache
    ann = root / "annotations" / "captions_train2014.json"
    caps = json.loads(ann.read_text())
    caps["annotations"].append({"id": 9, "image_id": 30, "caption": "a cat"})
    ann.write_text(json.dumps(caps))
    assert len(read_split(cfg, "train").records) == 3


def test_coco_without_instances_has_no_labels(tmp_path):
    root = tmp_path / "coco"
    _coco(root, with_instances=False)
    with pytest.warns(DataWarning):
        data = read_split(_cfg(tmp_path, dataset="coco", path=str(root)), "train")
    assert data.label_names is None and all(r.labels is None for r in data.records)
    assert data.primary_labels().tolist() == [-1, -1] and data.num_classes == 0


def test_coco_missing_files_name_the_path(tmp_path):
    root = tmp_path / "coco"
    _coco(root)
    cfg = _cfg(tmp_path, dataset="coco", path=str(root))
    with pytest.raises(FileNotFoundError, match="captions_val2014.json"):
        read_split(cfg, "val")
    os.rename(root / "train2014", root / "elsewhere")
    with pytest.raises(FileNotFoundError, match=str(root / "train2014")):
        read_split(cfg, "train")
    os.rename(root / "elsewhere", root / "train2014")
    (root / "annotations" / "captions_train2014.json").write_text("{not json")
    with pytest.raises(DatasetFormatError, match="captions_train2014.json"):
        read_split(cfg, "train")


# ---------------------------------------------------------------------------------------------
# CUB


def _cub(root, pickles=True):
    keys = ["001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111",
            "001.Black_footed_Albatross/Black_Footed_Albatross_0002_55",
            "017.Cardinal/Cardinal_0003_17477"]
    cub = root / "CUB_200_2011"
    for i, key in enumerate(keys):
        _image(cub / "images" / f"{key}.jpg", size=(60, 40), seed=i)
        text = root / "text" / f"{key}.txt"
        text.parent.mkdir(parents=True, exist_ok=True)
        text.write_bytes(f"this bird {i} has a black beak\n\nit is small \ufffd\ufffdand round\n".encode())
    (cub / "images.txt").write_text("".join(f"{i + 1} {k}.jpg\n" for i, k in enumerate(keys)))
    (cub / "bounding_boxes.txt").write_text("1 10.0 5.0 20.0 12.0\n2 0.0 0.0 60.0 40.0\n"
                                            "3 50.0 30.0 8.0 9.0\n")
    (cub / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n")
    (cub / "classes.txt").write_text("1 001.Black_footed_Albatross\n17 017.Cardinal\n")
    if pickles:
        for split, names in (("train", [keys[0], keys[2]]), ("test", [keys[1]])):
            (root / split).mkdir(parents=True, exist_ok=True)
            (root / split / "filenames.pickle").write_bytes(pickle.dumps(names, protocol=2))
    return keys


def test_cub_split_captions_labels_and_bbox_crop(tmp_path):
    root = tmp_path / "birds"
    keys = _cub(root)
    data = read_split(_cfg(tmp_path, dataset="cub", path=str(root), cub_bbox_crop=True), "train")
    assert [r.image for r in data.records] == [f"CUB_200_2011/images/{keys[0]}.jpg",
                                               f"CUB_200_2011/images/{keys[2]}.jpg"]
    assert data.records[0].captions == ["this bird 0 has a black beak", "it is small  and round"]
    assert [r.labels for r in data.records] == [[0], [16]]
    assert data.label_names[0] == "Black footed Albatross" and data.label_names[16] == "Cardinal"
    assert len(data.label_names) == 200
    # AttnGAN: r = int(0.75 * max(w, h)), centre int((2x + w) / 2): box 1 (10, 5, 20, 12) -> r 15,
    # centre (20, 11) -> [5, 0 (clipped), 35, 26]; box 3 (50, 30, 8, 9) -> r 6, centre (54, 34)
    assert data.records[0].extra["crop"] == [5, 0, 35, 26]
    assert data.records[1].extra["crop"] == [48, 28, 60, 40]
    assert crop_box([0, 0, 60, 40]) == [0, 0, 75, 65]
    val = read_split(_cfg(tmp_path, dataset="cub", path=str(root)), "val")
    assert [r.image for r in val.records] == [f"CUB_200_2011/images/{keys[1]}.jpg"]
    assert "crop" not in val.records[0].extra


def test_cub_falls_back_to_official_split_and_rejects_bad_pickles(tmp_path):
    root = tmp_path / "birds"
    keys = _cub(root, pickles=False)
    cfg = _cfg(tmp_path, dataset="cub", path=str(root))
    assert [r.image for r in read_split(cfg, "val").records] == [f"CUB_200_2011/images/{keys[1]}.jpg"]
    (root / "train").mkdir()
    (root / "train" / "filenames.pickle").write_bytes(pickle.dumps([os.getcwd, "x"]))   # names a function
    with pytest.raises(DatasetFormatError, match="filenames.pickle"):
        read_split(cfg, "train")
    (root / "train" / "filenames.pickle").write_bytes(pickle.dumps(["001.Black_footed_Albatross/nope"]))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_split(cfg, "train")
    os.remove(root / "CUB_200_2011" / "train_test_split.txt")
    with pytest.raises(FileNotFoundError, match="train_test_split.txt"):
        read_split(cfg, "val")


# ---------------------------------------------------------------------------------------------
# Localized Narratives


def _ln_line(image_id, caption, dataset_id="mscoco_train2017"):
    return json.dumps({"dataset_id": dataset_id, "image_id": image_id, "annotator_id": 3, "caption": caption,
                       "timed_caption": [], "traces": [], "voice_recording": "x.ogg"})


def test_ln_coco_groups_narratives_and_takes_coco_labels(tmp_path):
    root = tmp_path / "ln"
    for i, image_id in enumerate([137576, 42]):
        _image(root / "train2017" / f"{image_id:012d}.jpg", seed=i)
    (root / "coco_train_localized_narratives-00000-of-00002.jsonl").write_text(
        _ln_line("137576", "In this image there are cows.") + "\n" + _ln_line("42", "A red bus.") + "\n")
    (root / "coco_train_localized_narratives-00001-of-00002.jsonl").write_text(
        _ln_line("137576", "Cows eating grass.") + "\n\n")
    (root / "coco_val_localized_narratives.jsonl").write_text(_ln_line("1", "x", "mscoco_val2017") + "\n")
    cfg = _cfg(tmp_path, dataset="ln", path=str(root))
    data = read_split(cfg, "train")
    assert [r.image for r in data.records] == ["train2017/000000137576.jpg", "train2017/000000000042.jpg"]
    assert data.records[0].captions == ["In this image there are cows.", "Cows eating grass."]
    assert data.label_names is None and data.records[0].labels is None
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps({
        "images": [], "categories": [{"id": 21, "name": "cow"}, {"id": 6, "name": "bus"}],
        "annotations": [{"id": 1, "image_id": 137576, "category_id": 21, "area": 9.0}]}))
    data = read_split(cfg, "train")
    assert data.label_names == ["bus", "cow"]
    assert [r.labels for r in data.records] == [[1], []]
    with pytest.raises(FileNotFoundError, match=str(root / "val2017")):
        read_split(cfg, "val")


def test_ln_open_images_and_errors(tmp_path):
    root = tmp_path / "ln"
    _image(root / "validation" / "0000aa810854ddb4.jpg")
    (root / "open_images_validation_localized_narratives.jsonl").write_text(
        _ln_line("0000aa810854ddb4", "A tree.", "open_images") + "\n")
    cfg = _cfg(tmp_path, dataset="ln", path=str(root), ln_source="open_images")
    data = read_split(cfg, "val")
    assert [r.image for r in data.records] == ["validation/0000aa810854ddb4.jpg"]
    assert data.records[0].labels is None
    with pytest.raises(FileNotFoundError, match="no Localized Narratives files.*train"):
        read_split(cfg, "train")
    (root / "open_images_train_localized_narratives.jsonl").write_text('{"image_id": "a"}\n')
    with pytest.raises(DatasetFormatError, match=r"train_localized_narratives.jsonl:1: .*'caption'"):
        read_split(cfg, "train")


# ---------------------------------------------------------------------------------------------
# folder and shapes through read_split


def test_folder_split_layouts(tmp_path):
    root = tmp_path / "ds"
    _image(root / "images" / "a.png")
    write_records(root, [{"image": "images/a.png", "captions": ["a thing"], "labels": [2, 5]}])
    cfg = _cfg(tmp_path, dataset="folder", path=str(root))
    data = read_split(cfg, "train")
    assert data.root == root and data.records[0].labels == [2, 5] and data.num_classes == 6
    with pytest.raises(FileNotFoundError, match=str(root / "val")):
        read_split(cfg, "val")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_split(_cfg(tmp_path, dataset="folder", path=str(tmp_path / "nope")), "train")
    with pytest.raises(ValueError, match="path is required"):
        DataConfig(dataset="folder")
    with pytest.raises(ValueError, match="split"):
        read_split(cfg, "test")


def test_shapes_split_is_generated_in_the_cache(tmp_path):
    cfg = _cfg(tmp_path, resolution=32, shapes_train=6, shapes_val=0)
    data = read_split(cfg, "train")
    assert len(data.records) == 6 and data.num_classes == 48 and data.label_names[0] == "red circle"
    assert str(data.root).startswith(str(tmp_path / "cache" / "shapes"))
    with pytest.raises(FileNotFoundError, match="no 'val' split .*shapes_val = 0"):
        read_split(cfg, "val")


# ---------------------------------------------------------------------------------------------
# Bad data


def _bad_folder(tmp_path):
    """A folder dataset: 3 good images, a truncated PNG and JPEG, a non-image and a missing file."""
    root = tmp_path / "bad"
    recs = []
    for i in range(3):
        _image(root / "images" / f"good{i}.png", seed=i)
        recs.append({"image": f"images/good{i}.png", "captions": [f"good {i}"]})
    png = _image(root / "images" / "trunc.png", size=(64, 64), seed=7)
    (root / "images" / "trunc.png").write_bytes(png[: len(png) // 2])
    jpg = _image(root / "images" / "trunc.jpg", size=(64, 64), seed=8)
    (root / "images" / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "images" / "text.png").write_text("not an image")
    for name in ("trunc.png", "trunc.jpg", "text.png"):
        recs.append({"image": f"images/{name}", "captions": [name]})
    _image(root / "images" / "gone.png")
    recs.append({"image": "images/gone.png", "captions": ["gone"]})
    write_records(root, recs)
    os.remove(root / "images" / "gone.png")
    return root


def test_image_problem_finds_truncated_and_non_images(tmp_path):
    root = _bad_folder(tmp_path)
    assert image_problem(root / "images" / "good0.png") is None
    for name in ("trunc.png", "trunc.jpg", "text.png"):
        assert image_problem(root / "images" / name), name
    assert image_problem(root / "images" / "gone.png") == "file not found"


def test_unreadable_images_are_skipped_with_warnings_and_the_check_is_cached(tmp_path, monkeypatch):
    root = _bad_folder(tmp_path)
    cfg = _cfg(tmp_path, dataset="folder", path=str(root))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_split(cfg, "train", progress=False)
    messages = [str(w.message) for w in caught if w.category is DataWarning]
    for name in ("trunc.png", "trunc.jpg", "text.png", "gone.png"):
        assert sum(str(root / "images" / name) in m for m in messages) == 1, (name, messages)
    assert [r.image for r in data.records] == [f"images/good{i}.png" for i in range(3)]
    assert sorted(os.path.basename(p) for p, _ in data.skipped) == ["gone.png", "text.png", "trunc.jpg",
                                                                     "trunc.png"]
    # the decode check ran once: now it is read from the cache
    monkeypatch.setattr(sources, "image_problem", lambda p: pytest.fail("image check not cached"))
    with pytest.warns(DataWarning):
        assert len(load_split(cfg, "train", progress=False).records) == 3
    # a changed file is checked again
    _image(root / "images" / "trunc.png", seed=9)
    monkeypatch.undo()
    with pytest.warns(DataWarning):
        assert len(load_split(cfg, "train", progress=False).records) == 4


def test_strict_data_and_all_bad_and_missing_image_folder(tmp_path):
    root = _bad_folder(tmp_path)
    with pytest.raises(UnreadableImageError, match="trunc.png") as info:
        load_split(_cfg(tmp_path, dataset="folder", path=str(root), strict=True), "train", progress=False)
    assert "4 unreadable image(s)" in str(info.value)
    for i in range(3):
        os.remove(root / "images" / f"good{i}.png")
    with pytest.warns(DataWarning), pytest.raises(DatasetFormatError, match="all 7 images .* are unreadable"):
        load_split(_cfg(tmp_path, dataset="folder", path=str(root)), "train", progress=False)
    other = tmp_path / "other"
    _image(other / "pics" / "a.png")
    write_records(other, [{"image": "pics/a.png", "captions": ["a"]}])
    os.remove(other / "pics" / "a.png")
    os.rmdir(other / "pics")
    with pytest.raises(FileNotFoundError, match=str(other / "pics")):
        load_split(_cfg(tmp_path, dataset="folder", path=str(other)), "train", progress=False)


def test_many_unreadable_images_are_summarised_and_checked_in_parallel(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_PARALLEL_CHECK_MIN", 4)
    monkeypatch.setattr(sources, "_WARN_EACH", 2)
    root = tmp_path / "many"
    recs = []
    for i in range(8):
        path = root / f"{i}.png"
        data = _image(path, seed=i)
        if i % 2:
            path.write_bytes(data[:40])
        recs.append({"image": f"{i}.png", "captions": ["x"]})
    write_records(root, recs)
    cfg = DataConfig(dataset="folder", path=str(root), cache_dir=str(tmp_path / "cache"), workers=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_split(cfg, "train", progress=False)
    messages = [str(w.message) for w in caught if w.category is DataWarning]
    assert len(messages) == 3 and "2 more unreadable images" in messages[-1]
    listing = messages[-1].split("listed in ")[1].rstrip(")")
    assert sorted(json.load(open(listing))["bad"]) == ["1", "3", "5", "7"]
    assert [r.image for r in data.records] == ["0.png", "2.png", "4.png", "6.png"]
