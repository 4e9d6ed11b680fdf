"""End-to-end tiny runs: outputs, resume equality, signals, non-finite losses, DDP, sampling."""
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_gradients_close, full_and_resumed_runs

from fastxmc.train import checkpoint as ckpt
from fastxmc.train import loop
from fastxmc.train.config import build_config
from fastxmc.train.distributed import DistEnv
from fastxmc.train.logging import read_metrics
from fastxmc.train.losses import XMCLossSet

ROOT = Path(__file__).resolve().parents[1]
LOSS_KEYS = ("loss_d", "loss_g", "d_hinge", "d_sentence", "d_word", "g_adv", "g_sentence", "g_word",
             "g_image")


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    """One data cache (shapes images, caption embeddings) per test session, never the user's."""
    path = tmp_path_factory.getbasetemp() / "fastxmc-cache"
    monkeypatch.setenv("FASTXMC_CACHE", str(path))
    return path


def tiny(out, *overrides):
    return build_config("tiny", [("run.out", str(out)), ("run.quiet", "true"),
                                 ("run.tensorboard", "false"), *overrides])


def subprocess_env(cache_dir) -> dict:
    return {**os.environ, "FASTXMC_CACHE": str(cache_dir), "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1"}


def test_tiny_run_writes_every_output(tmp_path):
    out = tmp_path / "run"
    cfg = tiny(out, ("run.steps", "3"), ("run.sample_every", "2"), ("run.checkpoint_every", "2"),
               ("run.keep_checkpoints", "1"), ("run.tensorboard", "true"))
    result = loop.train(cfg)
    assert result.status == "completed" and result.step == 3
    assert (out / "config.json").is_file()
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in LOSS_KEYS + ("images_per_s", "data_wait_s", "step_time_s"):
        assert isinstance(records[-1][key], float), key
    assert records[0]["d_sentence"] == pytest.approx(2 * np.log(8), abs=1.0)  # ~chance at the start
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "captions.json", "step-000002.png", "step-000003.png"]
    grid = Image.open(out / "samples" / "step-000003.png")
    assert grid.size[0] > 4 * 128  # 4 columns of enlarged 32-px images
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["ckpt-00000003.pt"]
    state = ckpt.load_checkpoint(result.checkpoint)
    assert {"G", "D", "G_ema", "opt_G", "opt_D", "step", "data", "rng", "config", "text_dim"} <= set(state)
    assert state["step"] == 3 and state["config"]["preset"] == "tiny"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert "train/loss_d" in events.Tags()["scalars"] and "samples" in events.Tags()["images"]


def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path):
    full, resumed, a, b = full_and_resumed_runs(tmp_path)
    assert resumed.step == 4
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in LOSS_KEYS:
            assert ra[key] == rb[key], (ra["step"], key)
    sa, sb = ckpt.load_checkpoint(full.checkpoint), ckpt.load_checkpoint(resumed.checkpoint)
    for name in ("G", "D", "G_ema"):
        for key in sa[name]:
            assert torch.equal(sa[name][key], sb[name][key]), (name, key)


def test_a_run_is_not_overwritten(tmp_path):
    loop.train(tiny(tmp_path, ("run.steps", "1")))
    with pytest.raises(FileExistsError, match="continue it with --resume"):
        loop.train(tiny(tmp_path, ("run.steps", "2")))
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint"):
        loop.train(tiny(tmp_path / "empty", ("run.steps", "2")), resume=True)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original, calls = XMCLossSet.generator_terms, []

    def poisoned(self, views, *args, **kwargs):
        terms = original(self, views, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            terms["g_word"] = terms["g_word"] * float("nan")
        return terms

    monkeypatch.setattr(XMCLossSet, "generator_terms", poisoned)
    cfg = tiny(tmp_path, ("run.steps", "4"), ("run.checkpoint_every", "2"))
    with pytest.raises(loop.NonFiniteLossError, match=r"non-finite loss at step 3: g_word") as err:
        loop.train(cfg)
    assert "ckpt-00000002.pt" in str(err.value)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000002.pt"]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def _manual_run(cfg, cache, num_classes: int = 0) -> loop.Run:
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    loader = loop.make_loader(cfg, env, progress=False)
    nets = loop.build_networks(cfg, loader.text_dim, env.device, num_classes=num_classes)
    losses = loop.build_losses(cfg, env, loop.autocast_factory("fp32", env.device))
    return loop.Run(cfg, env, Path(cfg.run.out), loader, nets, losses,
                    torch.Generator().manual_seed(0), loop.autocast_factory("fp32", env.device),
                    loader.text_dim, class_targets=loop.build_class_targets(cfg, loader, env.device))


R1_ON = [(), (("loss.r1_gamma", "1.0"),)]


@pytest.mark.parametrize("overrides", R1_ON, ids=["plain", "r1"])
def test_joint_step_keeps_the_two_gradients_apart(tmp_path, cache, overrides):
    run = _manual_run(tiny(tmp_path, *overrides), cache)
    batch = next(iter(run.loader))
    fw = loop.joint_forward(run, batch)
    d_params, g_params = list(run.nets.d.parameters()), list(run.nets.g.parameters())
    want_d = torch.autograd.grad(fw.loss_d, d_params, retain_graph=True)
    want_g = torch.autograd.grad(fw.loss_g, g_params, retain_graph=True)
    before = [p.detach().clone() for p in d_params]
    loop.joint_update(run, fw, 1)
    for p, g in zip(d_params, want_d):
        torch.testing.assert_close(p.grad, g)  # L_G did not leak into D's gradients
    for p, g in zip(g_params, want_g):
        torch.testing.assert_close(p.grad, g)  # L_D did not leak into G's gradients
    assert any(not torch.equal(p, b) for p, b in zip(d_params, before))
    assert ("d_r1" in fw.d_terms) == bool(overrides) and torch.isfinite(fw.loss_d)


@pytest.mark.parametrize("overrides", R1_ON, ids=["plain", "r1"])
def test_d_only_step_leaves_g_untouched(tmp_path, cache, overrides):
    run = _manual_run(tiny(tmp_path, *overrides), cache)
    g_state = {k: v.clone() for k, v in run.nets.g.state_dict().items()}
    d_before = [p.detach().clone() for p in run.nets.d.parameters()]
    loss = loop.discriminator_step(run, next(iter(run.loader)))
    assert torch.isfinite(loss)
    for key, value in run.nets.g.state_dict().items():
        assert torch.equal(value, g_state[key]), key  # parameters and BN statistics
    assert any(not torch.equal(p, b) for p, b in zip(run.nets.d.parameters(), d_before))


def test_warmup_trains_d_on_real_images_only(tmp_path, cache):
    """optim.d_warmup_steps: D alone, on its real-image terms; G, the noise stream and D's realness
    head (no gradient: the hinge is not part of the warm-up) stay as they were, and the training
    stream moves on by one batch per step."""
    cfg = tiny(tmp_path, ("optim.d_warmup_steps", "3"), ("loss.class_weight", "1"),
               ("loss.class_target", "shape"))
    run = _manual_run(cfg, cache, num_classes=6)
    env, loader, nets, z_gen = run.env, run.loader, run.nets, run.z_gen
    g_state = {k: v.clone() for k, v in nets.g.state_dict().items()}
    d_params = {k: v.detach().clone() for k, v in nets.d.named_parameters()}
    z_state = z_gen.get_state()
    stream = loop.batch_stream(loader)
    batch = next(loop.batch_stream(loop.make_loader(cfg, env, progress=False)))
    terms = loop.warmup_step(run, batch)
    assert sorted(terms) == ["d_class", "d_sentence", "d_word"]
    assert terms["d_class"].item() == pytest.approx(np.log(6), abs=0.5)

    class Messages:
        lines = []

        def message(self, text):
            self.lines.append(text)

    loop.warm_up_discriminator(run, stream, Messages())
    assert Messages.lines[0] == "D warm-up: 3 steps on real images (d_sentence, d_word, d_class)"
    assert Messages.lines[-1].startswith("D warm-up 3/3: d_sentence ")
    assert all(torch.equal(v, g_state[k]) for k, v in nets.g.state_dict().items())
    assert torch.equal(z_gen.get_state(), z_state)
    changed = {k for k, v in nets.d.named_parameters() if not torch.equal(v, d_params[k])}
    assert any(k.startswith("classifier") for k in changed) and any("sentence" in k for k in changed)
    assert not any(k.startswith("head.") for k in changed), changed   # the realness head
    assert nets.opt_D.state_dict()["state"][0]["step"].item() == 4
    assert loader.state_dict() != loop.make_loader(cfg, env, progress=False).state_dict()


def test_class_only_warmup_leaves_the_contrastive_heads_alone(tmp_path, cache):
    """optim.d_warmup_terms=class: only the class term is trained; D's sentence projection, word
    conv and realness head keep their initial weights."""
    cfg = tiny(tmp_path, ("optim.d_warmup_steps", "2"), ("optim.d_warmup_terms", "class"),
               ("loss.class_weight", "1"))
    run = _manual_run(cfg, cache, num_classes=48)
    before = {k: v.detach().clone() for k, v in run.nets.d.named_parameters()}
    terms = loop.warmup_step(run, next(iter(run.loader)))
    assert list(terms) == ["d_class"]
    changed = {k.split(".")[0] for k, v in run.nets.d.named_parameters() if not torch.equal(v, before[k])}
    assert {"classifier", "blocks"} <= changed
    assert not changed & {"head", "sentence_proj", "region_proj"}, changed


def test_warmup_run_resumes_exactly(tmp_path):
    """The warm-up runs once, before step 1 of a fresh run; a resumed run continues from the
    checkpoint (whose data position counts the warm-up's batches) with the losses of an
    uninterrupted one."""
    _, _, a, b = full_and_resumed_runs(tmp_path, ("optim.d_warmup_steps", "3"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in LOSS_KEYS:
            assert ra[key] == rb[key], (ra["step"], key)
    loop.train(tiny(tmp_path / "cold", ("run.steps", "1")))
    assert read_metrics(tmp_path / "cold")[0]["d_sentence"] != a[0]["d_sentence"]


def test_d_lr_ramp_is_linear_logged_and_resumes_exactly(tmp_path):
    """optim.d_lr_ramp_steps=N: D's lr is d_lr * step / N up to step N, then d_lr; D's optimizer
    runs at it, it is logged as d_lr, and a run resumed inside the ramp has the same losses."""
    cfg = build_config("tiny", [("optim.d_lr_ramp_steps", "3")])
    d_lr = cfg.optim.d_lr
    assert [loop.d_lr_at(cfg.optim, k) for k in (1, 2, 3, 4)] == pytest.approx([d_lr / 3, 2 * d_lr / 3, d_lr, d_lr])
    assert loop.d_lr_at(build_config("tiny").optim, 1) == d_lr
    full, _, a, b = full_and_resumed_runs(tmp_path, ("optim.d_lr_ramp_steps", "3"))
    assert [r["d_lr"] for r in a] == pytest.approx([d_lr / 3, 2 * d_lr / 3, d_lr, d_lr])
    for ra, rb in zip(a, b):
        for key in LOSS_KEYS:
            assert ra[key] == rb[key], (ra["step"], key)
    first = ckpt.load_checkpoint(tmp_path / "part" / "checkpoints" / "ckpt-00000002.pt")
    assert first["opt_D"]["param_groups"][0]["lr"] == pytest.approx(2 * d_lr / 3)
    with pytest.raises(ValueError, match="optim.d_lr_ramp_steps must be an int >= 0"):
        build_config("tiny", [("optim.d_lr_ramp_steps", "-2")])


def test_optimizers_and_precision_options():
    cfg = build_config("tiny")
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = loop.make_optimizer(params, 1e-3, cfg.optim, torch.device("cpu"))
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["fused"] is True
    assert opt.defaults["betas"] == (0.5, 0.999)
    apex = build_config("tiny", [("optim.impl", "apex")]).optim
    if importlib.util.find_spec("apex") is None:
        with pytest.raises(ImportError, match="optim.impl=apex needs NVIDIA apex"):
            loop.make_optimizer(params, 1e-3, apex, torch.device("cpu"))
    else:
        with pytest.raises(ValueError, match="runs on CUDA only"):
            loop.make_optimizer(params, 1e-3, apex, torch.device("cpu"))
    assert loop.autocast_factory("auto", torch.device("cpu")) is contextlib.nullcontext
    assert loop.autocast_factory("fp32", torch.device("cpu")) is contextlib.nullcontext
    with pytest.raises(ValueError, match="run.precision must be auto, fp32 or bf16"):
        loop.autocast_factory("fp16", torch.device("cpu"))


def test_bf16_autocast_on_cpu(monkeypatch):
    """run.precision=bf16 autocasts on CPU too (oneDNN's bf16 convolutions with AMX), with a warning
    where the CPU would only emulate bf16."""
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    conv = torch.nn.Conv2d(3, 4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        autocast = loop.autocast_factory("bf16", torch.device("cpu"))
    with autocast():
        assert conv(torch.rand(1, 3, 8, 8)).dtype == torch.bfloat16
    assert conv(torch.rand(1, 3, 8, 8)).dtype == torch.float32
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="without AMX or AVX512-BF16"):
        loop.autocast_factory("bf16", torch.device("cpu"))


@pytest.mark.filterwarnings("ignore:run.precision=bf16 on a CPU without:RuntimeWarning")
def test_bf16_cpu_run_trains_and_stays_near_fp32(tmp_path):
    """A tiny run under CPU bf16 autocast: finite losses, the precision recorded, and its first
    step's losses within bf16's rounding of the fp32 run's (same seed, same batches)."""
    losses = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        loop.train(tiny(out, ("run.steps", "2"), ("run.precision", precision)))
        losses[precision] = read_metrics(out)[0]
        assert json.loads((out / "config.json").read_text())["run"]["precision"] == precision
    for key in ("loss_d", "loss_g"):
        assert np.isfinite(losses["bf16"][key])
        assert losses["bf16"][key] == pytest.approx(losses["fp32"][key], rel=0.05)
    assert losses["bf16"]["loss_d"] != losses["fp32"]["loss_d"]  # autocast did change the arithmetic


def test_memory_format_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loop.network_memory_format("auto", cpu) is torch.channels_last
    assert loop.network_memory_format("auto", cuda) is torch.contiguous_format
    assert loop.network_memory_format("contiguous", cpu) is torch.contiguous_format
    assert loop.network_memory_format("channels_last", cuda) is torch.channels_last
    with pytest.raises(ValueError, match="run.memory_format must be auto, channels_last or "
                                         "contiguous, got 'nhwc'"):
        loop.network_memory_format("nhwc", cpu)


def _spatial_weights(module) -> list:
    """The effective weights of the convolutions whose kernels are larger than 1x1 (a 1x1 kernel is
    stored the same way in both layouts)."""
    return [m.weight for m in module.modules()
            if isinstance(m, torch.nn.Conv2d) and m.weight[0, 0].numel() > 1]


def test_channels_last_networks_train_like_contiguous_ones(tmp_path, cache):
    """run.memory_format only changes the layout: the same initial values, G/D/G_ema weights and
    Adam's state in the chosen layout, and the same losses and gradients of a joint step within
    fp32 rounding (oneDNN sums in another order)."""
    runs = {}
    for fmt in ("channels_last", "contiguous"):
        torch.manual_seed(0)
        runs[fmt] = _manual_run(tiny(tmp_path / fmt, ("run.memory_format", fmt)), cache)
    last, plain = runs["channels_last"].nets, runs["contiguous"].nets
    for name in ("g", "d", "G_ema"):
        weights = _spatial_weights(getattr(last, name))
        assert weights and all(w.is_contiguous(memory_format=torch.channels_last)
                               and not w.is_contiguous() for w in weights), name
        assert all(w.is_contiguous() for w in _spatial_weights(getattr(plain, name))), name
    for (key, a), b in zip(last.g.state_dict().items(), plain.g.state_dict().values()):
        assert torch.equal(a, b), key
    batch = next(iter(runs["contiguous"].loader))
    forwards = {fmt: loop.joint_forward(run, batch) for fmt, run in runs.items()}
    fw_last, fw_plain = forwards["channels_last"], forwards["contiguous"]
    torch.testing.assert_close(fw_last.loss_d, fw_plain.loss_d, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fw_last.loss_g, fw_plain.loss_g, rtol=1e-5, atol=1e-5)
    for fmt, run in runs.items():
        loop.joint_update(run, forwards[fmt], 1)
    # Other oneDNN kernels sum the same terms in another order (see assert_gradients_close; D's
    # weight gradients sum over batch x positions). D has no normalisation layer, so none of its
    # gradients is zero by construction.
    assert_gradients_close({n: p.grad for n, p in last.d.named_parameters()},
                           {n: p.grad for n, p in plain.d.named_parameters()})
    assert all(last.opt_G.state[w]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
               for w in _spatial_weights(last.g))  # G has no spectral norm: weights are parameters


def test_channels_last_checkpoint_samples_and_resumes_contiguous(tmp_path):
    """Checkpoints hold values: a channels_last run's checkpoint loads into contiguous networks
    (fastxmc.sample, evaluation) and resumes a contiguous run."""
    out = tmp_path / "run"
    loop.train(tiny(out, ("run.steps", "2"), ("run.memory_format", "channels_last")))
    loaded = ckpt.load_run(out)
    assert all(w.is_contiguous() for w in _spatial_weights(loaded.G_ema))
    result = loop.train(tiny(out, ("run.steps", "3"), ("run.memory_format", "contiguous")),
                        resume=True)
    assert result.step == 3 and np.isfinite(read_metrics(out)[-1]["loss_g"])


def test_supcon_run_logs_its_terms(tmp_path):
    loop.train(tiny(tmp_path, ("run.steps", "2"), ("loss.supcon", "true")))
    record = read_metrics(tmp_path)[-1]
    assert np.isfinite(record["d_supcon_text"]) and np.isfinite(record["g_supcon_image"])


def test_dual_term_run_logs_it_with_supcon(tmp_path):
    """--loss.dual_weight with a pretrained dual encoder (here an untrained one of the data's text
    width, saved as fastxmc.pretrain does), across both caption branches of --loss.supcon."""
    from fastxmc.models.dual_encoder import DualEncoder, DualEncoderConfig
    torch.manual_seed(0)
    DualEncoder(DualEncoderConfig(resolution=16, text_dim=384, width=4, embed_dim=8,
                                  region_size=8)).save(tmp_path / "dual" / "dual_encoder.pt")
    loop.train(tiny(tmp_path / "run", ("run.steps", "2"), ("loss.supcon", "true"),
                    ("loss.dual_weight", "0.5"), ("loss.dual_encoder", str(tmp_path / "dual"))))
    record = read_metrics(tmp_path / "run")[-1]
    assert np.isfinite(record["g_dual"]) and record["g_dual"] > 0


def test_counterfactual_term_run_logs_it_with_supcon(tmp_path):
    """--loss.counterfactual_weight on the tiny preset's shapes data (the grid's descriptions
    encoded by the data's text encoder), across both caption branches, beside the dual term."""
    from fastxmc.models.dual_encoder import DualEncoder, DualEncoderConfig
    torch.manual_seed(0)
    DualEncoder(DualEncoderConfig(resolution=16, text_dim=384, width=4, embed_dim=8,
                                  region_size=8)).save(tmp_path / "dual" / "dual_encoder.pt")
    loop.train(tiny(tmp_path / "run", ("run.steps", "2"), ("loss.supcon", "true"),
                    ("loss.counterfactual_weight", "1"), ("loss.dual_encoder", str(tmp_path / "dual")),
                    ("loss.counterfactual_attributes", "shape+position")))
    record = read_metrics(tmp_path / "run")[-1]
    assert "g_dual" not in record
    assert np.isfinite(record["g_counterfactual"]) and record["g_counterfactual"] > 0


def test_class_head_run_logs_its_terms_and_reloads(tmp_path):
    """--loss.class_weight: D gets a 48-way head (the shapes labels), both terms start near
    log(48), and load_run rebuilds D with the head from the checkpoint."""
    out = tmp_path / "run"
    loop.train(tiny(out, ("run.steps", "2"), ("loss.class_weight", "1"), ("run.checkpoint_every", "2")))
    first = read_metrics(out)[0]
    for key in ("d_class", "g_class"):
        assert first[key] == pytest.approx(np.log(48), abs=0.5), key
    loaded = ckpt.load_run(out, discriminator=True)
    assert loaded.D.num_classes == 48
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))
    assert all(torch.equal(v, loaded.D.state_dict()[k]) for k, v in state["D"].items())


@pytest.mark.parametrize("target, sizes", [("shape", (6,)), ("color", (8,)), ("shape+position", (6, 9))])
def test_class_head_on_shapes_attributes(tmp_path, target, sizes):
    """loss.class_target: the head has one block per attribute; both terms start near the sum of
    log(block size), and the head reloads."""
    cfg = tiny(tmp_path / "run", ("run.steps", "2"), ("loss.class_weight", "1"),
               ("loss.class_target", target))
    loop.train(cfg)
    first = read_metrics(tmp_path / "run")[0]
    for key in ("d_class", "g_class"):
        assert first[key] == pytest.approx(sum(np.log(sizes)), abs=0.5), key
    assert ckpt.load_run(tmp_path / "run", discriminator=True).D.num_classes == sum(sizes)


def test_class_targets_read_the_primary_object_and_its_caption(tmp_path):
    """Real images' targets are the primary object's shape, colour and cell (the shape and colour
    agree with the label's encoding, label = shape * 8 + colour); a fake's position is its image's
    cell where its caption names that cell, and -1 where the caption names no position of it."""
    from fastxmc.data.shapes import POSITIONS, named_positions
    cfg = tiny(tmp_path, ("loss.class_weight", "1"), ("loss.class_target", "color+position+shape"))
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    loader = loop.make_loader(cfg, env, progress=False)
    targets = loop.build_class_targets(cfg, loader, env.device)
    assert targets.attributes == ("shape", "color", "position")
    seen_named = seen_unnamed = 0
    for batch, _ in zip(loader, range(4)):
        real, fake = targets.real(batch), targets.fake(batch)
        assert real[:, 0].tolist() == (batch["label"] // 8).tolist()
        assert real[:, 1].tolist() == (batch["label"] % 8).tolist()
        assert torch.equal(fake[:, :2], real[:, :2])
        for row, want, caption in zip(fake, real, loader.captions(batch["index"], batch["caption"])):
            named = POSITIONS[int(want[2])] in named_positions(caption)
            # every caption phrase of a position is the primary object's (the templates never
            # name the second object's position alone), so the table's cell must be among them
            assert named == bool(named_positions(caption)), caption
            assert int(row[2]) == (int(want[2]) if named else -1), caption
            seen_named, seen_unnamed = seen_named + named, seen_unnamed + (not named)
    assert seen_named and seen_unnamed
    assert loop.build_class_targets(tiny(tmp_path), loader, env.device) is None
    labels = loop.ClassTargets.for_loader("label", loader, env.device)
    assert torch.equal(labels.fake(batch), batch["label"])


def test_class_head_needs_labels(tmp_path):
    class Unlabelled:
        num_classes = 0
    cfg = tiny(tmp_path, ("loss.class_weight", "1"))
    with pytest.raises(ValueError, match="loss.class_weight > 0 needs class labels"):
        loop.d_classes(cfg, Unlabelled())
    assert loop.d_classes(tiny(tmp_path), Unlabelled()) == 0


def test_reference_backends_give_the_same_losses(tmp_path, monkeypatch):
    """Convergence check: twenty training steps with the default (fused) backends and with
    FASTXMC_IMPL=reference follow the same loss curve, as closely as rounding lets two runs.

    A GAN trained with Adam amplifies rounding: Adam's nearly sign-like updates turn rounding
    differences in near-zero gradients into lr-sized parameter differences, and later steps compound
    them. No bound from the arithmetic is of use (to first order, |grad|_1 times twice Adam's
    largest steps: ~4 after 20 steps at lr 1e-5, for losses of ~13), and how far two runs drift
    depends on the machine. So the test measures the drift that rounding alone causes here, with a
    third run: the fused backends in the contiguous layout, the same arithmetic summed in another
    order (see test_channels_last_networks_train_like_contiguous_ones). The reference backends also
    differ from the fused ones only in rounding, so up to each step their curve must stay within 10x
    the drift of that control so far, plus 1e-5 (1 + |loss|) for the rounding of one forward; a
    kernel that computes something else drifts away steadily. The small lr keeps the drift small (a
    few 1e-5 after 20 steps) while the losses still move."""
    steps = [("run.steps", "20"), ("optim.g_lr", "1e-5"), ("optim.d_lr", "1e-5")]
    loop.train(tiny(tmp_path / "fused", *steps))
    loop.train(tiny(tmp_path / "control", *steps, ("run.memory_format", "contiguous")))
    monkeypatch.setenv("FASTXMC_IMPL", "reference")
    loop.train(tiny(tmp_path / "reference", *steps))
    fused, control, ref = (read_metrics(tmp_path / run) for run in ("fused", "control", "reference"))
    assert len(fused) == len(control) == len(ref) == 20
    for key in LOSS_KEYS:
        f, c, r = (np.array([record[key] for record in run]) for run in (fused, control, ref))
        drift = np.maximum.accumulate(np.abs(f - c))
        allowed = 10 * drift + 1e-5 * (1 + np.abs(r))
        worst = int(np.argmax(np.abs(f - r) - allowed))
        assert abs(f[worst] - r[worst]) <= allowed[worst], \
            (key, worst + 1, f[worst], r[worst], "rounding drift", drift[worst])
    assert abs(fused[-1]["d_hinge"] - fused[0]["d_hinge"]) > 0.05  # training did move


def _wait_for_metrics(path: Path, proc, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and path.read_text().strip():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.communicate()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no metrics were logged in time")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, cache, sig):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastxmc.train", "--preset", "tiny", "--steps", "500", "--out",
         str(out), "--log-every", "1", "--run.tensorboard=false"],
        cwd=ROOT, env=subprocess_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_metrics(out / "metrics.jsonl", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err
    assert "stopped by a signal" in err and "Traceback" not in err
    last = read_metrics(out)[-1]["step"]
    assert last < 500
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))
    assert state["step"] == last


def test_sample_cli_on_a_trained_run(tmp_path):
    loop.train(tiny(tmp_path / "run", ("run.steps", "1")))
    from fastxmc.sample import main
    png = tmp_path / "grid.png"
    assert main(["--run", str(tmp_path / "run"), "--caption", "a small red circle at the top",
                 "--caption", "a blue square", "--n", "3", "--out", str(png)]) == 0
    grid = Image.open(png)
    assert grid.size[0] == 3 * (128 + 4) + 4  # 3 samples per caption, one row per caption
    assert grid.size[1] > 2 * 128


def test_torchrun_two_processes(tmp_path, cache):
    """2 gloo ranks, label-guided terms with global negatives and each rank's own caption negatives
    (whose gradient reaches D's sentence projection outside D's DDP forward): the run ends only if
    both ranks hold identical G and D parameters (checked by the loop); rank 0 alone writes the run
    directory."""
    out = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "fastxmc.train", "--preset",
         "tiny", "--steps", "3", "--out", str(out), "--global-negatives", "--supcon",
         "--run.tensorboard=false", "--loss.text_negatives=32", "--optim.d_warmup_steps=2",
         "--optim.d_warmup_terms=sentence",
         "--quiet"],
        cwd=ROOT, env=subprocess_env(cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3] and "g_supcon_image" in records[-1]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))
    assert state["world_size"] == 2 and len(state["rng"]["z"]) == 2
    assert not torch.equal(state["rng"]["z"][0], state["rng"]["z"][1])  # each rank its own noise


def test_standing_statistics_and_ema_warmup_in_a_run(tmp_path):
    """optim.ema_bn_batches: the checkpoint's G_ema statistics are recomputed (no longer the live
    G's copy) and equal a direct recomputation; optim.ema_warmup: G_ema follows G early."""
    from fastxmc.models import Generator
    from fastxmc.train.config import generator_kwargs
    from fastxmc.train.ema import recompute_bn_statistics

    base = ("run.steps", "2"), ("optim.ema_warmup", "true")
    plain = loop.train(tiny(tmp_path / "plain", *base))
    standing = loop.train(tiny(tmp_path / "standing", *base, ("optim.ema_bn_batches", "2")))
    a, b = (ckpt.load_checkpoint(r.checkpoint) for r in (plain, standing))
    for key in a["G"]:  # the statistics never feed back into training
        torch.testing.assert_close(a["G"][key], b["G"][key])
    stat_keys = [k for k in a["G_ema"] if k.endswith("running_mean")]
    assert stat_keys and all(torch.equal(a["G_ema"][k], a["G"][k]) for k in stat_keys)  # copied
    assert not any(torch.equal(b["G_ema"][k], b["G"][k]) for k in stat_keys)           # recomputed
    cfg = tiny(tmp_path / "standing", *base, ("optim.ema_bn_batches", "2"))
    stats = loop.build_statistics_set(cfg, progress=False)
    g = Generator(text_dim=b["text_dim"], **generator_kwargs(cfg))
    g.load_state_dict(b["G_ema"])
    size = cfg.run.batch_size
    recompute_bn_statistics(g, [(stats.z[i:i + size], stats.sentence[i:i + size], stats.words[i:i + size],
                                 stats.word_mask[i:i + size]) for i in range(0, 2 * size, size)])
    for k in stat_keys:
        torch.testing.assert_close(g.state_dict()[k], b["G_ema"][k])
    # With warm-up the decays of steps 1 and 2 are 2/11 and 3/12: G_ema sits far closer to G than at 0.995.
    distance = lambda s: sum((s["G_ema"][k] - s["G"][k]).abs().sum() for k in s["G"] if "running" not in k)  # noqa: E731
    cold = ckpt.load_checkpoint(loop.train(tiny(tmp_path / "cold", ("run.steps", "2"))).checkpoint)
    assert distance(a) < distance(cold)


def test_whitening_is_fitted_to_the_training_captions_and_checkpointed(tmp_path, cache):
    from fastxmc.models.whitening import SentenceWhitening

    cfg = tiny(tmp_path, ("run.steps", "1"), ("model.whiten_sentences", "true"))
    state = ckpt.load_checkpoint(loop.train(cfg).checkpoint)
    loader = loop.make_loader(cfg, DistEnv(0, 1, 0, torch.device("cpu")), progress=False)
    sentences = loader.sentence_embeddings()
    assert sentences.shape == (loader.stats["distinct_captions"], loader.text_dim)
    want = SentenceWhitening(loader.text_dim).fit(sentences).state_dict()
    for net in ("G", "G_ema", "D"):
        for key in ("mean", "matrix"):
            torch.testing.assert_close(state[net][f"whitening.{key}"], want[key])
    assert not torch.equal(want["matrix"], torch.eye(loader.text_dim))
    with pytest.raises(ValueError, match="needs the training captions"):
        loop.build_networks(cfg, loader.text_dim, torch.device("cpu"))


def test_sample_time_reports_the_spread_across_z(tmp_path, capsys):
    """Each sample grid comes with G_ema's per-caption pixel spread across noise vectors (in the
    log and TensorBoard); the spread draws its own noise, so the losses stay those of a run
    without sample grids."""
    with_grids = loop.train(tiny(tmp_path / "grids", ("run.steps", "3"), ("run.sample_every", "1"),
                                 ("run.quiet", "false")))
    lines = [line for line in capsys.readouterr().err.splitlines() if "spread across z" in line]
    assert len(lines) == 3 and all(float(line.split("spread across z ")[1].split()[0]) > 0
                                   for line in lines), lines
    plain = loop.train(tiny(tmp_path / "plain", ("run.steps", "3")))
    for a, b in zip(read_metrics(with_grids.run_dir), read_metrics(plain.run_dir)):
        assert all(a[key] == b[key] for key in LOSS_KEYS), a["step"]
