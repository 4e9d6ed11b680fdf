"""Damaged and failed cache writes: the caption cache, the shapes dataset, the parsed-annotation and
image-check JSON files, the evaluation caches, and the files written beside them.

A damaged cache file is reported in one warning line naming it and why, then rebuilt, and what is
read afterwards is bit-equal to a fresh cache. A write that fails (ENOSPC injected into the writer)
raises FileWriteError naming the path, leaves no temporary and leaves the previous file as it was.
"""
import dataclasses
import errno
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fastxmc.atomic import TEMP_MARK, FileWriteError, state_digest
from fastxmc.data import shapes, sources, text
from fastxmc.data.config import DataConfig
from fastxmc.data.folder import DataWarning, Record, write_records
from fastxmc.data.loader import build_loader
from fastxmc.data.shapes import ShapesConfig
from fastxmc.data.text import FrozenTextEncoder, open_caption_cache

CAPTIONS = ["a red circle", "a small blue star at the top left", "a green square", "a yellow triangle"]
OTHER_CAPTIONS = ["a pink cross", "a large cyan diamond on the right"]
TINY = ShapesConfig(resolution=32, n_train=12, n_val=4, seed=3)


@pytest.fixture(scope="module")
def encoder():
    return FrozenTextEncoder("minilm", device="cpu")


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _damage_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, DataWarning)]


def _assert_one_line_naming(messages: list[str], path: Path) -> None:
    assert len(messages) == 1, messages
    assert "\n" not in messages[0] and f"cache {path} is damaged (" in messages[0], messages[0]
    assert "rebuilding" in messages[0]


def _temporaries(folder: Path) -> list[str]:
    return [p.name for p in Path(folder).rglob("*") if TEMP_MARK in p.name]


def _tree(root: Path) -> dict:
    """{relative path: bytes} of every file under root."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _arrays(cache) -> list[np.ndarray]:
    return [np.array(a) for a in (cache.words, cache.mask, cache.sentence)]


# ---------------------------------------------------------------------------------------------
# Damage helpers: each leaves a file as a crash, a full disk or a bad copy could


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _garble(path: Path) -> None:
    """Same size, other bytes (what only a digest finds)."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data)):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _cut_lines(path: Path) -> None:
    """Whole lines missing at the end: still valid JSON lines."""
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: len(lines) // 2]))


# ---------------------------------------------------------------------------------------------
# Caption-embedding cache


@pytest.mark.parametrize("name, damage", [("words.npy", _truncate), ("sentence.npy", _truncate),
                                          ("mask.npy", _garble), ("words.npy", _garble),
                                          ("strings.json", _truncate), ("meta.json", _truncate)])
def test_damaged_caption_cache_file_is_reported_once_and_rebuilt_bit_equal(encoder, tmp_path, name, damage):
    fresh = _arrays(open_caption_cache(CAPTIONS, encoder, 12, tmp_path / "fresh", progress=False))
    cache = open_caption_cache(CAPTIONS, encoder, 12, tmp_path / "cache", progress=False)
    damage(cache.directory / name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = open_caption_cache(CAPTIONS, encoder, 12, tmp_path / "cache", progress=False)
    _assert_one_line_naming(_damage_warnings(caught), cache.directory / name)
    assert again.directory == cache.directory and again.strings == sorted(CAPTIONS)
    for got, want in zip(_arrays(again), fresh):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert _temporaries(tmp_path) == []
    # the rebuilt cache opens cleanly
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        open_caption_cache(CAPTIONS, encoder, 12, tmp_path / "cache", progress=False)


def test_full_disk_while_writing_the_caption_cache(encoder, tmp_path, monkeypatch):
    old = open_caption_cache(CAPTIONS, encoder, 12, tmp_path, progress=False)
    before = _tree(old.directory)
    # the array files are allocated before they are written through a memory map: a full disk
    # fails there with ENOSPC (a write into a sparse mapping would die of SIGBUS instead)
    monkeypatch.setattr(text.os, "posix_fallocate", _no_space, raising=False)
    with pytest.raises(FileWriteError) as info:
        open_caption_cache(OTHER_CAPTIONS, encoder, 12, tmp_path, progress=False)
    message = str(info.value)
    new_dir = info.value.path
    assert new_dir.parent == tmp_path / "text" and not new_dir.exists()
    assert "\n" not in message and str(new_dir) in message and "No space left on device" in message
    assert "free there" in message and info.value.disk_full
    assert sorted(p.name for p in (tmp_path / "text").iterdir()) == [old.directory.name]   # no temporary
    assert _tree(old.directory) == before
    monkeypatch.undo()
    assert np.array_equal(_arrays(open_caption_cache(CAPTIONS, encoder, 12, tmp_path, progress=False))[0],
                          _arrays(old)[0])


def test_full_disk_while_rebuilding_a_damaged_caption_cache_leaves_it_as_it_was(encoder, tmp_path,
                                                                                 monkeypatch):
    cache = open_caption_cache(CAPTIONS, encoder, 12, tmp_path, progress=False)
    _truncate(cache.directory / "words.npy")
    before = _tree(cache.directory)
    monkeypatch.setattr(text.os, "posix_fallocate", _no_space, raising=False)
    with pytest.warns(DataWarning, match="words.npy is damaged"), pytest.raises(FileWriteError,
                                                                                 match="No space left"):
        open_caption_cache(CAPTIONS, encoder, 12, tmp_path, progress=False)
    assert _tree(cache.directory) == before and _temporaries(tmp_path) == []


def test_a_killed_caption_build_leaves_a_temporary_that_the_next_build_removes(encoder, tmp_path):
    cache = open_caption_cache(CAPTIONS, encoder, 12, tmp_path, progress=False)
    abandoned = cache.directory.with_name(f".{cache.directory.name}{TEMP_MARK}4194999-deadbeef")
    os.replace(cache.directory, abandoned)          # as if its builder died before the rename
    open_caption_cache(CAPTIONS, encoder, 12, tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "text").iterdir()) == [cache.directory.name]


def test_caption_cache_digests_are_checked_once_per_process_unless_a_file_changes(encoder, tmp_path,
                                                                                 monkeypatch):
    cache = open_caption_cache(CAPTIONS, encoder, 12, tmp_path, progress=False)
    hashed = []
    real = text.file_sha256
    monkeypatch.setattr(text, "file_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    open_caption_cache(CAPTIONS, encoder, 12, tmp_path, progress=False)
    assert hashed == []                              # verified when written, in this process
    text._VERIFIED.clear()                           # as in a new process
    open_caption_cache(CAPTIONS, encoder, 12, tmp_path, progress=False)
    assert sorted(hashed) == ["mask.npy", "sentence.npy", "words.npy"]
    open_caption_cache(CAPTIONS, encoder, 12, tmp_path, progress=False)
    assert len(hashed) == 3
    assert cache.meta["files"]["words.npy"]["bytes"] == (cache.directory / "words.npy").stat().st_size


# ---------------------------------------------------------------------------------------------
# Shapes dataset


@pytest.mark.parametrize("name, damage", [
    ("train/images/000003.png", _truncate), ("val/images/000001.png", _garble),
    ("train/captions.jsonl", _cut_lines), ("train/captions.jsonl", _garble),
    ("val/attributes.jsonl", _truncate), ("meta.json", _truncate), ("manifest.json", _truncate)])
def test_damaged_shapes_dataset_file_is_reported_once_and_regenerated_byte_equal(tmp_path, name, damage):
    fresh = _tree(shapes.ensure_shapes_dataset(TINY, tmp_path / "fresh", progress=False))
    root = shapes.ensure_shapes_dataset(TINY, tmp_path / "cache", progress=False)
    damage(root / name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert shapes.ensure_shapes_dataset(TINY, tmp_path / "cache", progress=False) == root
    _assert_one_line_naming(_damage_warnings(caught), root / name)
    assert _tree(root) == fresh and _temporaries(tmp_path) == []


def test_damaged_dataset_at_a_given_path_is_regenerated_but_an_unreadable_meta_is_not_overwritten(tmp_path):
    root = shapes.write_shapes_dataset(tmp_path / "ds", TINY, progress=False)
    fresh = _tree(root)
    _truncate(root / "train" / "images" / "000000.png")     # meta.json says it is this config's
    with pytest.warns(DataWarning, match="000000.png is damaged"):
        shapes.write_shapes_dataset(root, TINY, progress=False)
    assert _tree(root) == fresh
    # without a readable meta.json nothing says the folder was generated: it is left to the user
    _truncate(root / "meta.json")
    with pytest.raises(FileExistsError, match=r"meta.json is unreadable .*pass overwrite=True"):
        shapes.write_shapes_dataset(root, TINY, progress=False)
    assert (root / "train" / "captions.jsonl").is_file()


def test_a_run_over_a_damaged_shapes_cache_reads_what_a_fresh_cache_gives(tmp_path):
    def batches(cache_dir):
        cfg = DataConfig(resolution=32, shapes_train=10, shapes_val=2, cache_dir=str(cache_dir), workers=0,
                         backend="torch")
        loader = build_loader(cfg, batch_size=5, seed=0, progress=False)
        return loader.num_samples, [{k: v.clone() for k, v in b.items()} for b in loader]

    n_fresh, fresh = batches(tmp_path / "fresh")
    batches(tmp_path / "cache")
    root = next((tmp_path / "cache" / "shapes").iterdir())
    _truncate(root / "train" / "images" / "000004.png")
    _cut_lines(root / "train" / "captions.jsonl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        n, got = batches(tmp_path / "cache")
    _assert_one_line_naming(_damage_warnings(caught), root / "train" / "captions.jsonl")
    assert n == n_fresh == 10 and len(got) == len(fresh)
    for a, b in zip(got, fresh):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_disk_while_writing_the_shapes_dataset(tmp_path, monkeypatch):
    root = shapes.write_shapes_dataset(tmp_path / "ds", TINY, progress=False)
    before = _tree(root)

    def partial_then_full(folder, records, **kwargs):
        (Path(folder) / "captions.jsonl").write_text('{"image": "images/0')
        _no_space()
    monkeypatch.setattr(shapes, "write_records", partial_then_full)
    other = ShapesConfig(resolution=32, n_train=5, n_val=0, seed=4)
    with pytest.raises(FileWriteError) as info:
        shapes.write_shapes_dataset(root, other, progress=False, overwrite=True)
    message = str(info.value)
    assert "\n" not in message and f"could not write {root}: No space left on device" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]       # no temporary
    assert _tree(root) == before and shapes.is_complete(root, TINY)
    with pytest.raises(FileWriteError, match="No space left"):
        shapes.ensure_shapes_dataset(other, tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache" / "shapes").iterdir()) == []


def test_shapes_cli_reports_a_write_failure_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shapes, "write_records", _no_space)
    assert shapes.main(["--out", str(tmp_path / "ds"), "--resolution", "32", "--n-train", "2",
                        "--n-val", "0"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]     # after the progress lines
    assert last.startswith("python -m fastxmc.data.shapes: error: could not write ")
    assert f"could not write {tmp_path / 'ds'}: No space left on device" in last
    assert list(tmp_path.iterdir()) == []


def test_datasets_written_without_a_manifest_are_checked_against_their_content_digest(tmp_path):
    root = shapes.write_shapes_dataset(tmp_path / "ds", TINY, progress=False)
    fresh = _tree(root)
    meta = json.loads((root / "meta.json").read_text())
    del meta["manifest_sha256"]
    (root / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    (root / "manifest.json").unlink()
    assert shapes.write_shapes_dataset(root, TINY, progress=False) == root     # intact: kept
    assert not (root / "manifest.json").exists()
    _garble(root / "val" / "images" / "000002.png")
    shapes._VERIFIED.clear()                                                   # as in a new process
    with pytest.warns(DataWarning, match=r"content_sha256 in meta.json\); rebuilding the shapes dataset"):
        shapes.write_shapes_dataset(root, TINY, progress=False)
    assert _tree(root) == fresh


# ---------------------------------------------------------------------------------------------
# Parsed-annotation and image-check caches (JSON)


def _image(folder: Path) -> Path:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 10, 10)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"not a png")
    return folder


def test_damaged_image_check_cache_is_reported_once_and_recomputed(tmp_path):
    folder = _image(tmp_path / "images")
    paths = [folder / "a.png", folder / "b.png"]
    bad, listing = sources.find_unreadable(paths, cache_dir=tmp_path / "c", progress=False)
    assert list(bad) == [1]
    for damage in (_truncate, lambda p: p.write_text('{"bad": [1]}')):
        damage(listing)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again, _ = sources.find_unreadable(paths, cache_dir=tmp_path / "c", progress=False)
        _assert_one_line_naming(_damage_warnings(caught), listing)
        assert again == bad
        assert sources.find_unreadable(paths, cache_dir=tmp_path / "c", progress=False)[0] == bad


def test_damaged_records_cache_is_reported_once_and_rebuilt(tmp_path):
    folder = _image(tmp_path / "images")
    cfg = DataConfig(dataset="folder", path=str(folder), cache_dir=str(tmp_path / "c"))
    built = []

    def build():
        built.append(1)
        record = Record("a.png", ["a red square", "red"], [2], folder / "a.png", {"crop": [0, 0, 2, 2]})
        return [record], ["x"]
    files = [folder / "a.png"]
    first = sources._cached_records(cfg, "train", files, {}, build)
    path = next((tmp_path / "c" / "records").iterdir())
    for damage in (_truncate, lambda p: p.write_text('{"records": []}')):
        damage(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again = sources._cached_records(cfg, "train", files, {}, build)
        _assert_one_line_naming(_damage_warnings(caught), path)
        assert again == first
    assert len(built) == 3
    assert sources._cached_records(cfg, "train", files, {}, build) == first and len(built) == 3


def test_full_disk_while_writing_a_json_cache_leaves_the_previous_file(tmp_path, monkeypatch):
    folder = _image(tmp_path / "images")
    paths = [folder / "a.png"]
    _, listing = sources.find_unreadable(paths, cache_dir=tmp_path / "c", progress=False)
    listing.write_text('{"bad": ')                     # damaged: it is recomputed and rewritten
    before = listing.read_bytes()

    def half_then_full(self, data, *args, **kwargs):
        with open(self, "w") as f:
            f.write(data[: len(data) // 2])
        _no_space()
    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.warns(DataWarning), pytest.raises(FileWriteError) as info:
        sources.find_unreadable(paths, cache_dir=tmp_path / "c", progress=False)
    assert f"could not write {listing}: No space left on device" in str(info.value)
    assert listing.read_bytes() == before and _temporaries(tmp_path) == []


def test_full_disk_while_writing_captions_jsonl_leaves_the_users_file(tmp_path, monkeypatch):
    folder = _image(tmp_path / "ds")
    write_records(folder, [Record("a.png", ["mine"])])
    before = (folder / "captions.jsonl").read_bytes()

    def half_then_full(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        _no_space()
    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    with pytest.raises(FileWriteError, match=f"could not write {folder / 'captions.jsonl'}: No space left"):
        write_records(folder, [Record("a.png", ["another caption"])])
    assert (folder / "captions.jsonl").read_bytes() == before and _temporaries(folder) == []


# ---------------------------------------------------------------------------------------------
# Evaluation caches and the ablation report's figure


def test_damaged_real_stats_cache_is_reported_and_recomputed(tmp_path):
    from fastxmc.eval import run
    from fastxmc.eval.metrics import FeatureStats
    stats = FeatureStats(keep=0)
    stats.update(torch.randn(6, 3, dtype=torch.float64))
    payload = {"format": run.STATS_FORMAT, "stats": {"dual": stats.state_dict()}}
    payload["digest"] = state_digest(payload)
    path = tmp_path / "real.pt"
    torch.save(payload, path)
    assert torch.equal(run._load_real_stats(path)["dual"].state_dict()["mean"], stats.state_dict()["mean"])
    payload["stats"]["dual"]["mean"] = payload["stats"]["dual"]["mean"] + 1e-9   # one value changed
    torch.save(payload, path)
    for content in (None, path.read_bytes()[:100]):
        if content is not None:
            path.write_bytes(content)                                        # truncated
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert run._load_real_stats(path) is None
        _assert_one_line_naming(_damage_warnings(caught), path)


def test_damaged_attribute_classifier_cache_is_reported_and_retrained(tmp_path):
    from fastxmc.eval import attributes as attr
    cfg = attr.AttributeClassifierConfig(width=4)
    model = attr.AttributeClassifier(32, cfg.width)
    payload = {"format": attr.CACHE_FORMAT, "classifier_config": dataclasses.asdict(cfg), "resolution": 32,
               "state_dict": model.state_dict(), "report": {"accuracy": 0.5}}
    payload["digest"] = state_digest(payload)
    path = tmp_path / "classifier.pt"
    torch.save(payload, path)
    assert attr._load_cached(path, cfg).report == {"accuracy": 0.5}
    payload["report"] = {"accuracy": 0.75}
    torch.save(payload, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert attr._load_cached(path, cfg) is None
    _assert_one_line_naming(_damage_warnings(caught), path)


def test_report_figure_is_written_atomically(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from fastxmc.experiments import report
    fig = plt.figure(figsize=(1, 1))
    path = tmp_path / "losses.png"
    report._save_figure(fig, path)
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")

    def full(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG partial")
        _no_space()
    monkeypatch.setattr(type(fig), "savefig", full)
    with pytest.raises(FileWriteError, match=f"could not write {path}: No space left"):
        report._save_figure(fig, path)
    plt.close(fig)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["losses.png"]
