"""The Loader: sampling plan, batch contents, both backends giving the same batches, resume,
sharding (also under a real 2-rank gloo group), captions, bad data."""
import io
import os
import pickle
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from fastxmc.data import loader as loader_mod
from fastxmc.data.config import DataConfig
from fastxmc.data.dali import dali_available
from fastxmc.data.folder import write_records
from fastxmc.data.loader import batches_per_epoch, build_loader, epoch_plan, grouped_order, mixed_group_keys
from fastxmc.data.shapes import label_attribute, read_attributes
from fastxmc.data.sources import DataWarning, UnreadableImageError

requires_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fastxmc-cache"))


def _shapes(cache_dir, **kw):
    base = dict(resolution=32, shapes_train=40, shapes_val=8, cache_dir=cache_dir, workers=1)
    return DataConfig(**{**base, **kw})


def _all(loader, epochs=1):
    return [b for _ in range(epochs) for b in loader]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


def _png(path, size, seed):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = rng.integers(0, 256, (size[1] // 4 + 1, size[0] // 4 + 1, 3), dtype=np.uint8)
    # smooth-ish content (upsampled noise), like photographs rather than per-pixel noise
    Image.fromarray(img).resize(size, Image.BICUBIC).save(path)


# ---------------------------------------------------------------------------------------------
# The sampling plan


def test_epoch_plan_permutes_and_draws_per_sample_index():
    n_caps = np.array([5, 1, 3, 2, 5, 4, 5, 1, 2, 3, 5])
    plan = epoch_plan(n_caps, seed=3, epoch=0, batch_size=4, drop_last=False, flip=True)
    assert sorted(np.concatenate(plan.batches).tolist()) == list(range(11))
    assert [len(b) for b in plan.batches] == [4, 4, 3]
    assert ((plan.caption >= 0) & (plan.caption < n_caps)).all()
    assert ((plan.caption_b != plan.caption) == (n_caps > 1)).all()
    assert ((plan.caption_b >= 0) & (plan.caption_b < n_caps)).all()
    # draws depend on (seed, epoch, index) only: not on the batch size, the rank or the shard
    other = epoch_plan(n_caps, seed=3, epoch=0, batch_size=3, rank=1, world_size=2, flip=True)
    for key in ("caption", "caption_b", "flip"):
        np.testing.assert_array_equal(getattr(plan, key), getattr(other, key))
    nxt = epoch_plan(n_caps, seed=3, epoch=1, batch_size=4, drop_last=False, flip=True)
    assert not np.array_equal(np.concatenate(nxt.batches), np.concatenate(plan.batches))
    unshuffled = epoch_plan(n_caps, seed=3, epoch=0, batch_size=4, shuffle=False)
    assert np.concatenate(unshuffled.batches).tolist() == list(range(8))   # drop_last
    assert not epoch_plan(n_caps, seed=3, epoch=0, batch_size=4).flip.any()
    big = epoch_plan(np.full(4000, 5), seed=0, epoch=0, batch_size=4000, flip=True)
    assert 0.45 < big.flip.mean() < 0.55
    assert np.bincount(big.caption, minlength=5).min() > 700


@pytest.mark.parametrize("n, world, drop_last", [(11, 2, True), (11, 2, False), (10, 3, False), (7, 4, True)])
def test_epoch_plan_shards_ranks(n, world, drop_last):
    plans = [epoch_plan(np.ones(n, int), seed=1, epoch=2, batch_size=1, rank=r, world_size=world,
                        drop_last=drop_last) for r in range(world)]
    shares = [np.concatenate(p.batches) for p in plans]
    assert len({len(s) for s in shares}) == 1
    assert all(len(p.batches) == batches_per_epoch(n, 1, world, drop_last) for p in plans)
    everything = np.concatenate(shares)
    if drop_last:
        assert len(set(everything.tolist())) == len(everything) == n // world * world
    else:
        assert set(everything.tolist()) == set(range(n)) and len(everything) == -(-n // world) * world


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("k", [2, 4])
def test_grouped_order_keeps_same_label_runs_whole_in_every_rank(world, k):
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 7, 203)            # 7 classes and some unlabelled samples
    order = grouped_order(labels, k, np.random.default_rng([3, 1, 0]), world)
    assert sorted(order.tolist()) == list(range(203))      # a permutation: every sample once
    pure = 0
    for r in range(world):
        share = order[r::world]
        runs = share[: len(share) // k * k].reshape(-1, k)
        pure += sum(len(set(labels[run].tolist())) == 1 and labels[run[0]] >= 0 for run in runs)
    # every label fills all but fewer than k of its samples into runs of its own (the leftovers and
    # the unlabelled samples make mixed runs); the last world - 1 runs at most are not interleaved
    # per rank, so striding splits them
    expected = sum((labels == c).sum() // k for c in range(7))
    assert expected - (world - 1) <= pure <= expected
    # deterministic in the rng, and different seeds give different orders
    again = grouped_order(labels, k, np.random.default_rng([3, 1, 0]), world)
    assert np.array_equal(order, again)
    assert not np.array_equal(order, grouped_order(labels, k, np.random.default_rng([4, 1, 0]), world))


def test_label_groups_make_batches_of_same_label_runs(cache_dir):
    cfg = _shapes(cache_dir, backend="torch", workers=0, shapes_train=96, label_groups=2)
    loader = build_loader(cfg, batch_size=8, seed=1, progress=False)
    labels = loader.data.primary_labels()
    pure = total = 0
    for batch in loader:
        pairs = batch["label"].reshape(-1, 2)
        pure += int((pairs[:, 0] == pairs[:, 1]).sum())
        total += len(pairs)
    # 48 classes over 96 images: about half the samples have a same-label partner
    whole_pairs = sum((labels == c).sum() // 2 for c in np.unique(labels))
    assert pure >= min(whole_pairs, total) - 2 and pure > total // 4
    plain = build_loader(_shapes(cache_dir, backend="torch", workers=0, shapes_train=96), batch_size=8,
                         seed=1, progress=False)
    chance = sum(int((b["label"].reshape(-1, 2)[:, 0] == b["label"].reshape(-1, 2)[:, 1]).sum())
                 for b in plain)
    assert pure > chance + 10
    # resume: the state names the option, and a loader without it refuses the state
    state = loader.state_dict()
    assert state["label_groups"] == 2
    with pytest.raises(ValueError, match="label_groups was 2"):
        plain.load_state_dict(state)
    old = dict(plain.state_dict())
    del old["label_groups"]                    # a state saved before the option: groups off
    plain.load_state_dict(old)
    # errors: the groups must tile the batch, and need labels
    with pytest.raises(ValueError, match=r"data.label_groups \(3\) must divide the batch size \(8\)"):
        build_loader(_shapes(cache_dir, shapes_train=96, label_groups=3), batch_size=8, progress=False)
    with pytest.raises(ValueError, match=r"DataConfig.label_groups must be in \[0, 4096\], got -1"):
        _shapes(cache_dir, label_groups=-1)
    # an unshuffled (evaluation) loader ignores the option
    val = build_loader(_shapes(cache_dir, label_groups=3), split="val", batch_size=4, shuffle=False,
                       progress=False)
    assert [b["index"].tolist() for b in val] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_group_by_color_makes_runs_of_one_colour_and_several_shapes(cache_dir):
    cfg = _shapes(cache_dir, backend="torch", workers=0, shapes_train=96, label_groups=4, group_by="color")
    loader = build_loader(cfg, batch_size=8, seed=1, progress=False)
    runs = torch.cat([b["label"].reshape(-1, 4) for b in loader]).numpy()
    colors, kinds = label_attribute(runs, "color"), label_attribute(runs, "shape")
    one_colour = (colors == colors[:, :1]).all(1)
    # 8 colours over 96 images: all but the leftovers (< 4 per colour) form one-colour runs
    assert one_colour.sum() >= len(runs) - 8 and one_colour.sum() > len(runs) // 2
    assert np.mean([len(set(k)) > 1 for k in kinds[one_colour]]) > 0.8    # their shapes differ
    by_shape = build_loader(_shapes(cache_dir, backend="torch", workers=0, shapes_train=96, label_groups=4,
                                    group_by="shape"), batch_size=8, seed=1, progress=False)
    runs = torch.cat([b["label"].reshape(-1, 4) for b in by_shape]).numpy()
    kinds = label_attribute(runs, "shape")
    assert (kinds == kinds[:, :1]).all(1).sum() >= len(runs) - 6
    # the state names the key; a state saved before the option grouped by label
    assert loader.state_dict()["group_by"] == "color"
    with pytest.raises(ValueError, match="group_by was 'color' when saved, is 'shape' now"):
        by_shape.load_state_dict(loader.state_dict())
    by_label = build_loader(_shapes(cache_dir, backend="torch", workers=0, shapes_train=96, label_groups=4),
                            batch_size=8, seed=1, progress=False)
    old = dict(by_label.state_dict())
    del old["group_by"]
    by_label.load_state_dict(old)
    with pytest.raises(ValueError, match=r"group_by='colour': unknown key 'colour' in 'colour'; each "
                                         r"alternative is 'label' or a '\+'-joined set of shape, color"):
        _shapes(cache_dir, group_by="colour", label_groups=2)
    with pytest.raises(ValueError, match=r"group_by='size\+size': a key named twice in 'size\+size'"):
        _shapes(cache_dir, group_by="size+size", label_groups=2)
    with pytest.raises(ValueError, match=r"group_by='size\+color,color\+size' names 'color\+size' twice"):
        _shapes(cache_dir, group_by="size+color,color+size", label_groups=2)
    with pytest.raises(ValueError, match="group_by='label,': unknown key '' in ''"):
        _shapes(cache_dir, group_by="label,", label_groups=2)
    with pytest.raises(TypeError, match="DataConfig.group_by must be a non-empty string, got ''"):
        _shapes(cache_dir, group_by="", label_groups=2)
    with pytest.raises(ValueError, match="group_by='color' reads the shapes dataset's attributes; "
                                         "dataset='folder' can only group by 'label'"):
        DataConfig(dataset="folder", path="/nonexistent", group_by="color", label_groups=2)
    with pytest.raises(ValueError, match=r"group_by='shape' says what .* set data.label_groups > 0"):
        _shapes(cache_dir, group_by="shape")


def _primary_objects(loader) -> dict:
    by_image = {r["image"]: r["objects"][0] for r in read_attributes(loader.data.root / "train")}
    return {i: by_image[r.image] for i, r in enumerate(loader.data.records)}


def test_group_by_attribute_sets_makes_runs_that_differ_only_in_the_rest(cache_dir):
    cfg = _shapes(cache_dir, backend="torch", workers=0, shapes_train=240, label_groups=2,
                  group_by="color+size+position")
    loader = build_loader(cfg, batch_size=8, seed=2, progress=False)
    objects = _primary_objects(loader)
    pairs = torch.cat([b["index"].reshape(-1, 2) for b in loader]).tolist()
    same = [all(objects[i][a] == objects[j][a] for a in ("color", "size", "position")) for i, j in pairs]
    # 240 images over 8 x 2 x 9 = 144 (colour, size, position) cells: about half of them have a
    # partner; the leftovers are paired at random and almost never agree in all three
    assert 0.3 < np.mean(same) < 0.9
    shapes_differ = [objects[i]["shape"] != objects[j]["shape"] for (i, j), s in zip(pairs, same) if s]
    assert np.mean(shapes_differ) > 0.6           # 5 of 6 at random: the pair differs only in shape
    # one attribute of the attribute sets is label_attribute's key: the same order as before
    color = build_loader(_shapes(cache_dir, backend="torch", workers=0, shapes_train=240, label_groups=2,
                                 group_by="color"), batch_size=8, seed=2, progress=False)
    assert np.array_equal(color._group_keys, label_attribute(color._labels, "color"))


def test_group_by_alternatives_mixes_both_kinds_of_run_in_a_batch(cache_dir):
    cfg = _shapes(cache_dir, backend="torch", workers=0, shapes_train=240, label_groups=2,
                  group_by="label,color+size+position")
    loader = build_loader(cfg, batch_size=8, seed=2, progress=False)
    assert loader._group_keys.shape == (2, 240)
    objects = _primary_objects(loader)
    batches = [b["index"].reshape(-1, 2).tolist() for b in loader]
    same_label = [objects[i]["shape"] == objects[j]["shape"] and objects[i]["color"] == objects[j]["color"]
                  for b in batches for i, j in b]
    same_scene = [all(objects[i][a] == objects[j][a] for a in ("color", "size", "position"))
                  for b in batches for i, j in b]
    assert np.mean(same_label) > 0.3 and np.mean(same_scene) > 0.15
    assert np.mean(same_label) + np.mean(same_scene) > 0.7      # nearly every pair is one or the other
    # the alternatives are redrawn every epoch, from (seed, epoch) only
    first, again = loader.plan(0), build_loader(cfg, batch_size=8, seed=2, progress=False).plan(0)
    assert all(np.array_equal(a, b) for a, b in zip(first.batches, again.batches))
    assert not all(np.array_equal(a, b) for a, b in zip(first.batches, loader.plan(1).batches))


def test_mixed_group_keys_keeps_alternatives_apart():
    keys = np.array([[0, 0, 1, 1, -1, 0], [5, 5, 5, 5, 5, -1]])
    mixed = mixed_group_keys(keys, np.random.default_rng(0))
    choice = np.random.default_rng(0).integers(2, size=6)
    for i in range(6):
        k = keys[choice[i], i]
        assert mixed[i] == (-1 if k < 0 else k * 2 + choice[i])
    assert np.array_equal(mixed_group_keys(keys[:1], np.random.default_rng(0)), keys[0])
    assert np.array_equal(mixed_group_keys(keys[1], np.random.default_rng(0)), keys[1])


# ---------------------------------------------------------------------------------------------
# Batches


def test_batches_hold_the_files_captions_and_labels(cache_dir):
    loader = build_loader(_shapes(cache_dir, backend="torch"), batch_size=8, seed=5, progress=False)
    assert (loader.backend, len(loader), loader.num_samples, loader.text_dim) == ("torch", 5, 40, 384)
    assert loader.max_tokens == 24 and loader.num_classes == 48 and loader.stats["skipped_images"] == 0
    plan = loader.plan(0)
    seen, flipped = [], 0
    for k, batch in enumerate(loader):
        assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
        assert batch["image"].is_contiguous()
        assert batch["words"].shape == (8, 24, 384) and batch["words"].dtype == torch.float32
        assert batch["word_mask"].dtype == torch.bool and batch["sentence"].shape == (8, 384)
        idx = batch["index"].numpy()
        np.testing.assert_array_equal(idx, plan.batches[k])
        for j, i in enumerate(idx):
            rec = loader.data.records[i]
            img = np.asarray(Image.open(rec.path).convert("RGB"))
            if plan.flip[i]:
                img, flipped = img[:, ::-1], flipped + 1
            want = torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255
            assert torch.equal(batch["image"][j], want)
            assert batch["label"][j].item() == rec.labels[0]
            assert batch["caption"][j].item() == plan.caption[i]
        strings = loader.captions(batch["index"], batch["caption"])
        assert strings == [loader.data.records[i].captions[plan.caption[i]] for i in idx]
        sentence, words, mask = loader.encode_captions(strings)      # from the cache
        assert torch.equal(sentence, batch["sentence"]) and torch.equal(words, batch["words"])
        assert torch.equal(mask, batch["word_mask"])
        assert (batch["words"][~batch["word_mask"]] == 0).all()
        seen += idx.tolist()
    assert sorted(seen) == list(range(40)) and 5 < flipped < 35
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0
    val = build_loader(_shapes(cache_dir), split="val", batch_size=4, shuffle=False, progress=False)
    assert not val.plan(0).flip.any() and [b["index"].tolist() for b in val] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_two_captions_and_workers_do_not_change_batches(cache_dir):
    cfg = _shapes(cache_dir, backend="torch", two_captions=True, workers=0)
    a = _all(build_loader(cfg, batch_size=8, seed=1, progress=False), epochs=2)
    cfg.workers = 2
    _assert_same(a, _all(build_loader(cfg, batch_size=8, seed=1, progress=False), epochs=2))
    for b in a:
        assert (b["caption_b"] != b["caption"]).all()          # every shapes image has 5 captions
        assert not torch.equal(b["sentence_b"], b["sentence"]) and b["words_b"].shape == b["words"].shape


@requires_dali
def test_dali_and_torch_give_identical_batches(cache_dir):
    torch_loader = build_loader(_shapes(cache_dir, backend="torch", two_captions=True), batch_size=6,
                                seed=2, drop_last=False, progress=False)
    dali_loader = build_loader(_shapes(cache_dir, backend="dali", two_captions=True), batch_size=6,
                               seed=2, drop_last=False, progress=False)
    assert dali_loader.backend == "dali" and "requested" in dali_loader.backend_reason
    a, b = _all(torch_loader, 2), _all(dali_loader, 2)
    assert len(a) == 14 and a[6]["image"].shape[0] == 4     # the short last batch of each epoch
    _assert_same(a, b)


def _resizing_folder(root):
    sizes = [(40, 30), (20, 50), (32, 32), (64, 48), (17, 23), (90, 60)]
    recs = []
    for i, size in enumerate(sizes):
        _png(root / "img" / f"{i}.png", size, seed=i)
        recs.append({"image": f"img/{i}.png", "captions": [f"picture number {i}", f"image {i}"],
                     "labels": [i % 2]})
    write_records(root, recs)


def _cub_with_boxes(root):
    keys = [f"00{c}.Bird_{c}/Bird_{c}_{i}" for c in (1, 2) for i in range(2)]
    for i, key in enumerate(keys):
        img = root / "CUB_200_2011" / "images" / f"{key}.jpg"
        img.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.open(_png_bytes((70, 50), i)).save(buf, format="JPEG", quality=95)
        img.write_bytes(buf.getvalue())
        (root / "text" / f"{key}.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / "text" / f"{key}.txt").write_text(f"a bird {i}\nanother bird {i}\n")
    meta = root / "CUB_200_2011"
    (meta / "images.txt").write_text("".join(f"{i + 1} {k}.jpg\n" for i, k in enumerate(keys)))
    (meta / "bounding_boxes.txt").write_text("1 5 5 30 20\n2 40 20 25 25\n3 0 0 70 50\n4 60 1 12 9\n")
    (root / "train").mkdir()
    (root / "train" / "filenames.pickle").write_bytes(pickle.dumps(keys))


def _png_bytes(size, seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    small = rng.integers(0, 256, (size[1] // 4 + 1, size[0] // 4 + 1, 3), dtype=np.uint8)
    Image.fromarray(small).resize(size, Image.BICUBIC).save(buf, format="PNG")
    buf.seek(0)
    return buf


@requires_dali
@pytest.mark.parametrize("kind", ["folder", "cub"])
def test_backends_agree_within_tolerance_when_resizing_and_cropping(kind, tmp_path, cache_dir):
    root = tmp_path / kind
    if kind == "folder":
        _resizing_folder(root)
        cfg = dict(dataset="folder", path=str(root))
    else:
        _cub_with_boxes(root)
        cfg = dict(dataset="cub", path=str(root), cub_bbox_crop=True)
    loaders = [build_loader(DataConfig(resolution=32, cache_dir=cache_dir, workers=1, backend=b, **cfg),
                            batch_size=2, seed=0, progress=False) for b in ("torch", "dali")]
    for a, b in zip(*(_all(x, 2) for x in loaders)):
        for k in a:
            if k != "image":
                assert torch.equal(a[k], b[k]), k
        diff = (a["image"] - b["image"]).abs()
        assert diff.max() <= 10 / 255 and diff.mean() <= 1 / 255, (diff.max() * 255, diff.mean() * 255)
    # the torch path crops like AttnGAN: box 4 [60, 1, 12, 9]: r = 9, centre (66, 5) -> [57, 0, 75, 14],
    # clipped to the 70x50 image when decoded
    if kind == "cub":
        rec = loaders[0].data.records[3]
        assert rec.extra["crop"] == [57, 0, 75, 14]
        want = Image.open(rec.path).convert("RGB").crop((57, 0, 70, 14)).resize((32, 32), Image.BILINEAR)
        got = loader_mod.load_image(str(rec.path), rec.extra["crop"], 32, False)
        np.testing.assert_array_equal(got, np.asarray(want))


# ---------------------------------------------------------------------------------------------
# Resume, re-iteration, sharding


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=requires_dali)])
def test_resume_mid_epoch_is_exact(cache_dir, backend):
    cfg = _shapes(cache_dir, backend=backend)
    reference = _all(build_loader(cfg, batch_size=8, seed=4, progress=False), epochs=3)
    first = build_loader(cfg, batch_size=8, seed=4, progress=False)
    got = _all(first)
    it = iter(first)
    got += [next(it), next(it)]
    state = first.state_dict()
    assert (state["epoch"], state["position"]) == (1, 2)
    resumed = build_loader(cfg, batch_size=8, seed=4, progress=False)
    resumed.load_state_dict(state)
    got += _all(resumed, epochs=2)
    _assert_same(got, reference)
    with pytest.raises(ValueError, match="batch_size was 8"):
        build_loader(cfg, batch_size=4, seed=4, progress=False).load_state_dict(state)
    with pytest.raises(ValueError, match="seed was 4"):
        build_loader(cfg, batch_size=8, seed=5, progress=False).load_state_dict(state)


def test_a_left_iterator_continues_the_epoch_and_is_superseded(cache_dir):
    loader = build_loader(_shapes(cache_dir, backend="torch"), batch_size=8, seed=0, progress=False)
    plan = loader.plan(0)
    it = iter(loader)
    assert next(it)["index"].tolist() == plan.batches[0].tolist()
    rest = list(loader)                                      # the rest of epoch 0
    assert [b["index"].tolist() for b in rest] == [b.tolist() for b in plan.batches[1:]]
    with pytest.raises(RuntimeError, match="superseded"):
        next(it)
    assert next(iter(loader))["index"].tolist() == loader.plan(1).batches[0].tolist()


def test_ranks_take_disjoint_shards(cache_dir):
    cfg = _shapes(cache_dir, backend="torch", workers=0)
    ranks = [build_loader(cfg, batch_size=4, rank=r, world_size=3, seed=9, progress=False) for r in range(3)]
    assert all(len(x) == 3 for x in ranks)                  # 40 // 3 = 13 per rank -> 3 batches of 4
    for epoch in range(2):
        idx = [torch.cat([b["index"] for b in x]).tolist() for x in ranks]
        flat = sum(idx, [])
        assert len(set(flat)) == len(flat) == 36, epoch


def _rank_worker(rank, port, cache_dir, queue):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from fastxmc.data import text
        def refuse(self):
            raise AssertionError("rank 1 loaded the text encoder instead of waiting for rank 0's cache")
        if rank == 1:
            text.FrozenTextEncoder._load = refuse
        cfg = DataConfig(resolution=32, shapes_train=10, shapes_val=2, cache_dir=cache_dir, workers=0,
                         backend="torch")
        loader = build_loader(cfg, batch_size=5, rank=rank, world_size=2, seed=0, progress=False)
        queue.put((rank, [b["index"].tolist() for b in loader]))
    except BaseException as e:
        queue.put((rank, repr(e)))
    finally:
        dist.destroy_process_group()


def test_rank0_builds_caches_while_other_ranks_wait(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_worker, args=(r, port, str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all(isinstance(v, list) for v in results.values()), results
    assert len(results[0]) == len(results[1]) == 1
    assert sorted(results[0][0] + results[1][0]) == list(range(10))


# ---------------------------------------------------------------------------------------------
# Captions, backends, errors, bad data


def test_encode_captions_of_new_strings_uses_the_same_encoder(cache_dir):
    loader = build_loader(_shapes(cache_dir), batch_size=8, progress=False)
    known = loader.data.records[0].captions[0]
    new = "a purple hexagon floating over a lake"
    sentence, words, mask = loader.encode_captions([new, known])
    assert sentence.shape == (2, 384) and words.shape == (2, 24, 384) and mask.dtype == torch.bool
    direct = loader._encoder.encode([new], 24)
    assert torch.equal(words[0], torch.from_numpy(direct.words[0]).float())
    assert torch.equal(sentence[0], torch.from_numpy(direct.sentence[0]))
    row = loader._cache.row_of[known]
    assert torch.equal(words[1], torch.from_numpy(np.array(loader._cache.words[row])).float())
    with pytest.raises(TypeError, match="list of caption strings"):
        loader.encode_captions("just one string")


def test_backend_choice(monkeypatch):
    choose = loader_mod.choose_backend
    assert choose("torch", torch.device("cpu"))[0] == "torch"
    monkeypatch.setattr("fastxmc.data.dali.dali_available", lambda: True)
    for device in ("cpu", "cuda"):
        backend, reason = choose("auto", torch.device(device))
        assert backend == "dali" and reason.startswith("auto: DALI is installed")
    monkeypatch.setattr("fastxmc.data.dali.dali_available", lambda: False)
    for device in ("cpu", "cuda"):
        assert choose("auto", torch.device(device)) == ("torch", "auto: NVIDIA DALI is not installed")
    with pytest.raises(ImportError, match="DALI is not installed"):
        choose("dali", torch.device("cpu"))


def test_argument_errors(cache_dir):
    cfg = _shapes(cache_dir)
    with pytest.raises(ValueError, match="not one batch"):
        build_loader(cfg, batch_size=41, progress=False)
    with pytest.raises(ValueError, match="rank must be < world_size"):
        build_loader(cfg, batch_size=4, rank=2, world_size=2, progress=False)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        build_loader(cfg, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        DataConfig(backend="opencv")
    with pytest.raises(TypeError, match="DataConfig.flip must be a bool"):
        DataConfig(flip="yes")
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown DataConfig keys"):
        DataConfig.from_dict({"datset": "coco"})


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=requires_dali)])
def test_bad_images_are_counted_and_strict_raises(tmp_path, cache_dir, backend):
    root = tmp_path / "ds"
    _resizing_folder(root)
    data = (root / "img" / "3.png").read_bytes()
    (root / "img" / "3.png").write_bytes(data[: len(data) // 3])
    cfg = DataConfig(dataset="folder", path=str(root), resolution=32, cache_dir=cache_dir, workers=1,
                     backend=backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = build_loader(cfg, batch_size=5, progress=False)
    assert any(str(root / "img" / "3.png") in str(w.message) for w in caught if w.category is DataWarning)
    assert loader.stats["skipped_images"] == 1 and loader.num_samples == 5
    assert all(r.image != "img/3.png" for r in loader.data.records)
    seen = torch.cat([b["index"] for b in loader]).tolist()
    assert sorted(loader.data.records[i].image for i in seen) == [f"img/{i}.png" for i in (0, 1, 2, 4, 5)]
    cfg.strict = True
    with pytest.raises(UnreadableImageError, match="3.png"):
        build_loader(cfg, batch_size=5, progress=False)


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=requires_dali)])
def test_a_file_broken_after_the_check_is_an_error_naming_it(tmp_path, backend):
    paths = []
    for i in range(6):
        _png(tmp_path / f"{i}.png", (16, 16), seed=i)
        paths.append(tmp_path / f"{i}.png")
    data = paths[3].read_bytes()
    paths[3].write_bytes(data[: len(data) // 2])
    if backend == "torch":
        images = loader_mod.TorchImages(paths, None, 16, workers=0, prefetch=2, pin_memory=False)
    else:
        from fastxmc.data.dali import DaliImages
        images = DaliImages(paths, None, 16, batch_size=2, threads=1)
    plans = [(np.array([i, i + 1]), np.zeros(2, bool)) for i in (0, 2, 4)]
    batches = images.batches(plans)
    assert next(iter(batches)).shape == (2, 16, 16, 3)
    with pytest.raises(UnreadableImageError, match=str(paths[3])):
        list(batches)
