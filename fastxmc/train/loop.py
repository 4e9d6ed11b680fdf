"""The training loop of ``python -m fastxmc.train`` (XMC-GAN, docs/design.md, "Losses" and "Training recipe").

One training step is one G step, as in the reference code's ``train_step``:

1. **data**: ``optim.d_steps_per_g_step`` batches of ``run.batch_size`` per process.
2. **D-only steps** (every batch but the last): G, in training mode but without gradients, makes
   the fakes (its BN running statistics are restored afterwards: the reference discards G's state
   in ``train_d``); one D forward on ``concat(real, fake)``; ``L_D``; an Adam step of D.
3. **joint step** (the last batch): G makes the fakes with gradients; ONE D forward on
   ``concat(real, fake)`` gives both ``L_D`` and ``L_G`` (the reference's ``train_g_d``: "the
   second D step shares its forward pass with the G step"). Both gradients are taken at the same
   parameters: ``L_D.backward(inputs=D's parameters, retain_graph=True)`` then
   ``L_G.backward(inputs=G's parameters)``, so D's loss never reaches G and G's never reaches D;
   then both Adam steps.
4. **EMA**: G_ema <- 0.999 G_ema + 0.001 G, BN buffers copied from G.
5. **bookkeeping**: a non-finite loss stops the run (before the joint step's update, the last good
   checkpoint stays); metrics, sample grids and checkpoints at their intervals; SIGINT/SIGTERM finish
   the current step, write a checkpoint and end the run.

With ``loss.supcon`` the batch carries two captions per image; G runs once on both (the same z,
concatenated along the batch) and D once on ``concat(real, fake_a, fake_b)``.

Under torchrun, G and D are separate DDP modules. D sees exactly one forward per backward that
reaches its parameters; G's DDP forward runs only in the joint step (the D-only steps call the
unwrapped G under ``no_grad``). Decisions that must agree (stop, non-finite) are all-reduced.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from fastxmc.atomic import FileWriteError
from fastxmc.data.loader import build_loader
from fastxmc.models import Discriminator, Generator
from fastxmc.train import checkpoint as ckpt
from fastxmc.train.class_targets import ClassTargets, head_sizes
from fastxmc.train.config import (TrainConfig, config_to_dict, discriminator_kwargs,
                                  generator_kwargs, warmup_terms, write_config)
from fastxmc.train.counterfactual import build_counterfactual_term
from fastxmc.train.negatives import CaptionNegatives, build_negatives
from fastxmc.train.distributed import (DistEnv, any_rank, barrier, gather_objects, init_distributed,
                                       parameter_fingerprint, peer_lost_error, shutdown, unwrap,
                                       wrap)
from fastxmc.train.ema import ema_decay_at, make_ema, recompute_bn_statistics, update_ema
from fastxmc.train.logging import RunLogger, truncate_metrics
from fastxmc.train.losses import (FrozenClassifier, FrozenDualEncoder, Text, Views, XMCLossSet, chunk_output,
                                  pair_labels)
from fastxmc.train import samples as grids


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the run stopped without updating or checkpointing."""


class RunResult(NamedTuple):
    run_dir: Path
    step: int            # the last completed G step
    status: str          # "completed" or "interrupted"
    checkpoint: Path | None
    signal: int | None   # the signal that stopped the run


@dataclass
class Nets:
    """The networks and optimizers; ``G``/``D`` may be DDP wrappers, ``g``/``d`` never are."""
    G: nn.Module
    D: nn.Module
    G_ema: nn.Module
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer

    @property
    def g(self) -> nn.Module:
        return unwrap(self.G)

    @property
    def d(self) -> nn.Module:
        return unwrap(self.D)


@dataclass
class Run:
    """Everything one step needs besides its batches."""
    cfg: TrainConfig
    env: DistEnv
    run_dir: Path
    loader: object
    nets: Nets
    losses: XMCLossSet
    z_gen: torch.Generator
    autocast: object        # a zero-argument context-manager factory
    text_dim: int
    negatives: CaptionNegatives | None = None  # loss.text_negatives
    class_targets: ClassTargets | None = None   # loss.class_weight


# ---------------------------------------------------------------- setup helpers
def seed_everything(seed: int) -> None:
    """The global RNGs (model initialisation; identical on every rank)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def noise_seed(seed: int, rank: int) -> int:
    """Seed of the generator that draws z: different per rank, fixed per (seed, rank)."""
    return (seed * 1_000_003 + 7_919 * (rank + 1)) % 2**63


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX tiles or AVX512-BF16): oneDNN then runs bf16
    convolutions and matmuls about twice as fast as fp32; elsewhere bf16 is emulated and slower."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_factory(precision: str, device: torch.device):
    """The context-manager factory of ``run.precision``: ``auto`` is bf16 autocast on CUDA and fp32
    (nothing) on CPU; ``bf16`` is bf16 autocast on either device (on CPU: worth it only with native
    bf16, see :func:`cpu_has_native_bf16`); ``fp32`` is nothing."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext
    if precision != "bf16":
        raise ValueError(f"run.precision must be auto, fp32 or bf16, got {precision!r}")
    if device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("run.precision=bf16 on a CPU without AMX or AVX512-BF16: bf16 is emulated "
                      "there and slower than fp32", RuntimeWarning, stacklevel=2)
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def network_memory_format(memory_format: str, device: torch.device) -> torch.memory_format:
    """The ``torch.memory_format`` of ``run.memory_format`` on ``device`` (see RunConfig)."""
    if memory_format == "auto":
        memory_format = "channels_last" if device.type == "cpu" else "contiguous"
    formats = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    if memory_format not in formats:
        raise ValueError(f"run.memory_format must be auto, channels_last or contiguous, "
                         f"got {memory_format!r}")
    return formats[memory_format]


def make_optimizer(params, lr: float, optim_cfg, device: torch.device) -> torch.optim.Optimizer:
    """Adam with the config's betas: PyTorch's fused implementation, or apex's FusedAdam."""
    params = list(params)
    if optim_cfg.impl == "torch":
        return torch.optim.Adam(params, lr=lr, betas=tuple(optim_cfg.betas), fused=True)
    try:
        from apex.optimizers import FusedAdam
    except ImportError as err:
        raise ImportError(
            f"optim.impl=apex needs NVIDIA apex built from source with its CUDA extensions "
            f"(https://github.com/NVIDIA/apex; the PyPI package named 'apex' is unrelated); "
            f"importing apex.optimizers failed: {err}. Use --optim torch (PyTorch's fused Adam)."
        ) from err
    if device.type != "cuda":
        raise ValueError("optim.impl=apex (FusedAdam) runs on CUDA only; use --optim torch on CPU")
    return FusedAdam(params, lr=lr, betas=tuple(optim_cfg.betas), adam_w_mode=False, weight_decay=0.0)


def build_networks(cfg: TrainConfig, text_dim: int, device: torch.device,
                   sentences: torch.Tensor | None = None, num_classes: int = 0) -> Nets:
    """G, D, G_ema and both optimizers (unwrapped; see :func:`wrap_networks`). With
    ``model.whiten_sentences``, G's and D's whitening is fitted to ``sentences`` (the training
    captions' embeddings) before G_ema is copied from G. ``num_classes`` > 0 gives D its class head
    (``loss.class_weight``; see :func:`d_classes`)."""
    # The layout is set before the EMA copy and the optimizers: their tensors take the weights'.
    memory_format = network_memory_format(cfg.run.memory_format, device)
    G = Generator(text_dim=text_dim, **generator_kwargs(cfg)).to(device, memory_format=memory_format)
    D = Discriminator(text_dim=text_dim, num_classes=num_classes,
                      **discriminator_kwargs(cfg)).to(device, memory_format=memory_format)
    if cfg.model.whiten_sentences:
        if sentences is None:
            raise ValueError("model.whiten_sentences needs the training captions' sentence embeddings")
        for net in (G, D):
            net.whitening.fit(sentences.to(device))
    return Nets(G, D, make_ema(G),
                make_optimizer(G.parameters(), cfg.optim.g_lr, cfg.optim, device),
                make_optimizer(D.parameters(), cfg.optim.d_lr, cfg.optim, device))


def d_classes(cfg: TrainConfig, loader) -> int:
    """The size of D's class head with ``loss.class_weight`` (else 0): the data's class count, or
    the summed value counts of the shapes attributes ``loss.class_target`` names."""
    if not cfg.loss.class_weight:
        return 0
    if not loader.num_classes:
        raise ValueError(f"loss.class_weight > 0 needs class labels, and the {cfg.data.dataset} "
                         "training data has none (labels in captions.jsonl, COCO instances, CUB "
                         "species)")
    return sum(head_sizes(cfg.loss.class_target, loader.num_classes))


def build_class_targets(cfg: TrainConfig, loader, device) -> ClassTargets | None:
    """The class head's targets (``loss.class_weight``; None without it)."""
    if not cfg.loss.class_weight:
        return None
    return ClassTargets.for_loader(cfg.loss.class_target, loader, device)


def wrap_networks(nets: Nets, cfg: TrainConfig, env: DistEnv) -> None:
    nets.G = wrap(nets.G, env)
    # Without the word loss D's region head gets no gradient, which DDP must be told.
    nets.D = wrap(nets.D, env, find_unused_parameters=cfg.loss.word_weight == 0)


def build_losses(cfg: TrainConfig, env: DistEnv, autocast, loader=None) -> XMCLossSet:
    """The loss set; ``loader`` (the training split's) is needed by the counterfactual term only."""
    classifier = None
    if cfg.loss.image_classifier_weights is not None and cfg.loss.classifier_weight != 0:
        classifier = FrozenClassifier(cfg.loss.image_classifier,
                                      cfg.loss.image_classifier_weights).to(env.device)
    dual = counterfactual = None
    if cfg.loss.dual_weight != 0 or cfg.loss.counterfactual_weight != 0:
        dual = FrozenDualEncoder(cfg.loss.dual_encoder).to(env.device)
    if cfg.loss.counterfactual_weight != 0:
        counterfactual = build_counterfactual_term(cfg.loss, loader, dual).to(env.device)
    group = env.group if cfg.loss.global_negatives else None
    return XMCLossSet(cfg.loss, group=group, classifier=classifier, dual=dual,
                      counterfactual=counterfactual, autocast=autocast)


def make_loader(cfg: TrainConfig, env: DistEnv, progress: bool):
    return build_loader(cfg.data, split="train", batch_size=cfg.run.batch_size, rank=env.rank,
                        world_size=env.world_size, seed=cfg.run.seed, device=env.device,
                        progress=progress)


def build_sample_set(cfg: TrainConfig, progress: bool, n: int | None = None,
                     z_seed: int | None = None) -> grids.SampleSet:
    """``n`` fixed captions (first samples of the val split, else of train; default
    ``run.num_samples``) and fixed z (drawn from ``z_seed``, default the run's seed).

    Built on every rank (the loader synchronises ranks while it builds its caches)."""
    data = dataclasses.replace(cfg.data, two_captions=False, flip=False, workers=0)
    n = cfg.run.num_samples if n is None else n
    z_seed = cfg.run.seed if z_seed is None else z_seed
    for split in ("val", "train"):
        try:
            loader = build_loader(data, split=split, batch_size=min(n, 256), shuffle=False,
                                  drop_last=False, seed=cfg.run.seed, progress=progress)
        except FileNotFoundError:
            continue
        return grids.sample_set_from_loader(loader, n, cfg.model.z_dim, z_seed)
    raise FileNotFoundError(f"no val or train split found for the sample grid of {cfg.data.dataset}")


def build_statistics_set(cfg: TrainConfig, progress: bool) -> grids.SampleSet | None:
    """The fixed inputs of G_ema's standing BN statistics (``optim.ema_bn_batches`` batches of
    ``run.batch_size``), or None when G_ema keeps the live G's statistics."""
    batches = cfg.optim.ema_bn_batches
    if batches == 0:
        return None
    return build_sample_set(cfg, progress, n=batches * cfg.run.batch_size, z_seed=cfg.run.seed + 1)


def refresh_ema_statistics(run: Run, stats: grids.SampleSet | None) -> None:
    """Recompute G_ema's BN statistics over ``stats`` (every rank: they stay identical)."""
    if stats is None:
        return
    size, device = run.cfg.run.batch_size, run.env.device
    parts = [(stats.z[i:i + size].to(device), stats.sentence[i:i + size].to(device),
              stats.words[i:i + size].to(device), stats.word_mask[i:i + size].to(device))
             for i in range(0, len(stats.captions), size)]
    recompute_bn_statistics(run.nets.G_ema, parts)


def prepare_run_dir(cfg, env: DistEnv, resume_step: int | None) -> Path:
    """Create the run dir (rank 0); refuse to overwrite a run; on resume, cut metrics.jsonl back
    to the checkpoint's step."""
    run_dir = Path(cfg.run.out)
    if resume_step is None and ckpt.list_checkpoints(run_dir):
        raise FileExistsError(f"{run_dir} already holds a run ({ckpt.CHECKPOINT_DIR}/); continue it "
                              "with --resume or choose another --out")
    if env.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise FileWriteError(run_dir, err) from err
        if resume_step is not None:
            truncate_metrics(run_dir, resume_step)
    barrier(env)
    return run_dir


def write_run_config(cfg, env: DistEnv, run_dir: Path, loader) -> None:
    """``DIR/config.json`` (rank 0): the resolved config, usable with ``--resume``, plus what was
    decided at start-up under ``resolved`` (the data backend and why)."""
    if env.is_main:
        write_config(cfg, run_dir / "config.json",
                     resolved={"data_backend": loader.backend,
                               "data_backend_reason": loader.backend_reason,
                               "world_size": env.world_size, "device": str(env.device)})


def log_to_stderr(env: DistEnv):
    """A one-line reporter for start-up messages (rank 0 only; the logger does not exist yet)."""
    if not env.is_main:
        return lambda message: None
    return lambda message: print(f"fastxmc: {message}", file=sys.stderr, flush=True)


def load_resume_state(cfg, env: DistEnv, required=ckpt.TRAIN_KEYS) -> dict:
    """The newest valid checkpoint of ``cfg.run.out`` (every rank reads it; rank 0 sets a damaged
    newer one aside); the ranks must agree on which."""
    try:
        path, state = ckpt.newest_valid_checkpoint(cfg.run.out, required=required,
                                                   rename_bad=env.is_main, warn=log_to_stderr(env))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--resume: {err}") from None
    steps = gather_objects(int(state["step"]), env)
    if len(set(steps)) > 1:
        raise RuntimeError(f"--resume: the ranks found different checkpoints (steps {steps}); is "
                           f"{cfg.run.out} on a filesystem every node sees the same way?")
    log_to_stderr(env)(f"resuming from {path} (step {state['step']})")
    return state


def restore_state(state: dict, run: Run) -> int:
    """Load a checkpoint into the (unwrapped) networks, optimizers, loader and RNGs; returns its step."""
    nets = run.nets
    nets.g.load_state_dict(state["G"])
    nets.d.load_state_dict(state["D"])
    nets.G_ema.load_state_dict(state["G_ema"])
    nets.opt_G.load_state_dict(state["opt_G"])
    nets.opt_D.load_state_dict(state["opt_D"])
    run.loader.load_state_dict(state["data"])
    ckpt.restore_rng(state["rng"])
    z_states = state["rng"]["z"]
    if len(z_states) != run.env.world_size:
        raise ValueError(f"the checkpoint was written by {len(z_states)} processes, this run has "
                         f"{run.env.world_size}; resume with the same number")
    run.z_gen.set_state(z_states[run.env.rank])
    return int(state["step"])


def checkpoint_state(run: Run, step: int) -> dict:
    """The checkpoint dict (see :mod:`fastxmc.train.checkpoint`). Collective: call on every rank."""
    nets = run.nets
    z_states = gather_objects(run.z_gen.get_state(), run.env)
    return {"step": step, "G": nets.g.state_dict(), "D": nets.d.state_dict(),
            "G_ema": nets.G_ema.state_dict(), "opt_G": nets.opt_G.state_dict(),
            "opt_D": nets.opt_D.state_dict(), "data": run.loader.state_dict(),
            "rng": {**ckpt.capture_rng(), "z": z_states}, "config": config_to_dict(run.cfg),
            "text_dim": run.text_dim, "world_size": run.env.world_size,
            "d_classes": nets.d.num_classes}


def save(run: Run, step: int) -> Path | None:
    state = checkpoint_state(run, step)
    path = ckpt.save_checkpoint(state, run.run_dir, run.cfg.run.keep_checkpoints) if run.env.is_main else None
    barrier(run.env)
    return path


# ---------------------------------------------------------------- one step
def batch_stream(loader):
    """Batches forever: one ``iter(loader)`` per epoch (the loader resumes mid-epoch)."""
    while True:
        yield from loader


def fetch(stream, count: int) -> tuple:
    """``count`` batches and the seconds spent waiting for them."""
    start = time.perf_counter()
    batches = [next(stream) for _ in range(count)]
    return batches, time.perf_counter() - start


def texts_of(batch: dict, two: bool) -> list:
    texts = [Text(batch["sentence"], batch["words"], batch["word_mask"])]
    if two:
        texts.append(Text(batch["sentence_b"], batch["words_b"], batch["word_mask_b"]))
    return texts


def generate(G: nn.Module, z: torch.Tensor, texts: list) -> torch.Tensor:
    """One G call for every caption branch, the same z for each: (branches * B, 3, H, W)."""
    if len(texts) == 1:
        return G(z, *texts[0])
    return G(z.repeat(len(texts), 1), *(torch.cat(parts) for parts in zip(*texts)))


def discriminate(D: nn.Module, real: torch.Tensor, fakes: torch.Tensor, texts: list, labels,
                 real_grad: bool = False, negatives=None, class_labels=None, fake_class_labels=None):
    """One D call on concat(real, fakes of every branch), each image with its own sentence;
    ``real_grad`` tracks the real images for the R1 penalty; ``negatives``, ``(sentences (K, E),
    label ids (K,))`` of other images' captions, go through D's sentence projection;
    ``class_labels`` and ``fake_class_labels`` (the class head's targets of the real images and of
    each branch's fakes, :func:`class_inputs`) are passed on for D's class head. ``fakes=None``:
    real images only (``Views.fakes`` is empty)."""
    if real_grad:
        real = real.detach().requires_grad_(True)
    if fakes is None:   # real images only (the warm-up)
        images, sentences = real, texts[0].sentence
    else:
        images = torch.cat([real, fakes.to(real.dtype)])
        sentences = torch.cat([texts[0].sentence] + [t.sentence for t in texts])
    out = D(images, sentences)
    chunks = chunk_output(out, len(sentences) // len(real))
    extra = extra_labels = None
    if negatives is not None:
        # outside D's forward (a DDP wrapper sees the shared Linear's summed gradient all the same)
        extra, extra_labels = unwrap(D).project_sentence(negatives[0]).float(), negatives[1]
    return Views(chunks[0], chunks[1:], texts, labels, real if real_grad else None, extra, extra_labels,
                 class_labels, fake_class_labels)


def class_inputs(run: Run, batch: dict, two: bool) -> dict:
    """``discriminate``'s class-head targets of a batch (none without ``loss.class_weight``): the
    real images', and the fakes' of each caption branch (``two``: with branch b)."""
    targets = run.class_targets
    if targets is None:
        return {}
    keys = ("caption", "caption_b") if two else ("caption",)
    return {"class_labels": targets.real(batch),
            "fake_class_labels": [targets.fake(batch, key) for key in keys]}


@contextlib.contextmanager
def buffers_restored(module: nn.Module):
    """Run a forward whose buffer updates (BN running statistics) are discarded."""
    saved = [b.detach().clone() for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(module.buffers(), saved):
                buffer.copy_(value)


def step_inputs(run: Run, batch: dict):
    """(texts, labels, z, negatives) of a batch: labels only for the label-guided terms, negatives
    only with loss.text_negatives."""
    two = run.cfg.loss.supcon
    labels = None
    if two:
        labels = pair_labels(batch["label"], offset=run.env.rank * run.cfg.run.batch_size)
    z = torch.randn(batch["image"].shape[0], run.cfg.model.z_dim, device=run.env.device,
                    generator=run.z_gen)
    negatives = None
    if run.negatives is not None:
        negatives = run.negatives.draw(batch["index"], batch["caption"], batch["label"])
    return texts_of(batch, two), labels, z, negatives


def discriminator_step(run: Run, batch: dict) -> torch.Tensor:
    """A D-only step; returns its (detached) weighted loss."""
    nets = run.nets
    texts, labels, z, negatives = step_inputs(run, batch)
    with torch.no_grad(), buffers_restored(nets.g), run.autocast():
        fakes = generate(nets.g, z, texts)
    with run.autocast():
        views = discriminate(nets.D, batch["image"], fakes, texts, labels,
                             run.losses.active("d_r1"), negatives, **class_inputs(run, batch, len(texts) > 1))
    loss = run.losses.total(run.losses.discriminator_terms(views))
    nets.opt_D.zero_grad(set_to_none=True)
    loss.backward()
    nets.opt_D.step()
    return loss.detach()


def warmup_step(run: Run, batch: dict) -> dict:
    """One supervised step of D alone on a batch of real images: the real-image terms that
    ``optim.d_warmup_terms`` names (:meth:`XMCLossSet.real_image_terms`); returns them, detached."""
    texts = texts_of(batch, two=False)
    negatives = None
    if run.negatives is not None:
        negatives = run.negatives.draw(batch["index"], batch["caption"], batch["label"])
    with run.autocast():
        views = discriminate(run.nets.D, batch["image"], None, texts, None, negatives=negatives,
                             **class_inputs(run, batch, two=False))
    terms = run.losses.real_image_terms(views, warmup_terms(run.cfg))
    # D's realness logit (and, with a subset of the terms, other heads) gets no gradient here; the
    # zero-weighted sum of every output keeps all parameters in the graph, as a DDP-wrapped D
    # requires of each backward.
    untouched = sum(output.sum() for output in views.real if output is not None)
    loss = run.losses.total(terms) + 0.0 * untouched
    run.nets.opt_D.zero_grad(set_to_none=True)
    loss.backward()
    run.nets.opt_D.step()
    return {name: value.detach() for name, value in terms.items()}


def warm_up_discriminator(run: Run, stream, logger: RunLogger) -> None:
    """``optim.d_warmup_steps`` :func:`warmup_step` s before the first G step of a fresh run, with
    the term means printed ten times; the batches come from the training stream (a checkpoint's data
    position counts them). A non-finite term stops the run (no checkpoint has been written yet)."""
    total = run.cfg.optim.d_warmup_steps
    every = max(1, total // 10)
    names = warmup_terms(run.cfg)
    logger.message(f"D warm-up: {total} steps on real images ({', '.join(names)})")
    start, sums, count = time.perf_counter(), {}, 0
    for k in range(1, total + 1):
        for name, value in warmup_step(run, next(stream)).items():
            sums[name] = sums.get(name, 0.0) + value
        count += 1
        if k % every == 0 or k == total:
            means = {name: float(value) / count for name, value in sums.items()}
            bad = [name for name, value in means.items() if not np.isfinite(value)]
            if bad:
                raise NonFiniteLossError(f"non-finite loss in D's warm-up step {k}: {', '.join(bad)}")
            shown = " ".join(f"{name} {value:.3f}" for name, value in means.items())
            logger.message(f"D warm-up {k}/{total}: {shown} ({time.perf_counter() - start:.0f} s)")
            sums, count = {}, 0


class JointForward(NamedTuple):
    d_terms: dict
    g_terms: dict
    loss_d: torch.Tensor
    loss_g: torch.Tensor


def joint_forward(run: Run, batch: dict) -> JointForward:
    """G with gradients, one shared D forward, both loss sets."""
    texts, labels, z, negatives = step_inputs(run, batch)
    with run.autocast():
        fakes = generate(run.nets.G, z, texts)
        views = discriminate(run.nets.D, batch["image"], fakes, texts, labels,
                             run.losses.active("d_r1"), negatives, **class_inputs(run, batch, len(texts) > 1))
    d_terms = run.losses.discriminator_terms(views)
    captions = [batch["caption"]] + ([batch["caption_b"]] if len(texts) > 1 else [])
    g_terms = run.losses.generator_terms(views, batch["image"], list(fakes.chunk(len(texts))),
                                         samples=(batch["index"], captions))
    return JointForward(d_terms, g_terms, run.losses.total(d_terms), run.losses.total(g_terms))


def d_lr_at(optim_cfg, step: int) -> float:
    """D's learning rate at G step ``step``: ``optim.d_lr``, ramped up linearly over the first
    ``optim.d_lr_ramp_steps`` steps (a function of the step alone, so ``--resume`` stays exact)."""
    ramp = optim_cfg.d_lr_ramp_steps
    return optim_cfg.d_lr * (min(1.0, step / ramp) if ramp else 1.0)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def joint_update(run: Run, fw: JointForward, step: int) -> None:
    """Both gradients at the current parameters, then both Adam steps and the EMA (G step ``step``)."""
    nets = run.nets
    nets.opt_D.zero_grad(set_to_none=True)
    nets.opt_G.zero_grad(set_to_none=True)
    fw.loss_d.backward(inputs=list(nets.d.parameters()), retain_graph=True)
    fw.loss_g.backward(inputs=list(nets.g.parameters()))
    nets.opt_D.step()
    nets.opt_G.step()
    o = run.cfg.optim
    update_ema(nets.G_ema, nets.g, ema_decay_at(o.ema_decay, step, o.ema_warmup))


def non_finite_terms(fw: JointForward, d_only: list) -> list:
    """Names of the non-finite terms (one host sync when all are finite)."""
    named = {**{f"loss_d[D-only step {i + 1}]": v for i, v in enumerate(d_only)},
             **fw.d_terms, **fw.g_terms}
    values = torch.stack([v.detach().float().reshape(()) for v in named.values()])
    if bool(torch.isfinite(values).all()):
        return []
    return [name for name, v in zip(named, values.tolist()) if not np.isfinite(v)]


# ---------------------------------------------------------------- bookkeeping
class Meter:
    """Throughput and data-wait time since the last logged step."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.wait = time.perf_counter(), 0, 0.0

    def add(self, wait: float) -> None:
        self.steps += 1
        self.wait += wait

    def values(self, images_per_step: int) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        steps = max(self.steps, 1)
        return {"images_per_s": self.steps * images_per_step / elapsed,
                "data_wait_s": self.wait / steps, "step_time_s": elapsed / steps}


def step_metrics(fw: JointForward) -> dict:
    values = {"loss_d": fw.loss_d, "loss_g": fw.loss_g, **fw.d_terms, **fw.g_terms}
    return {k: float(v.detach()) for k, v in values.items()}


class StopSignal:
    """SIGINT/SIGTERM request a clean stop at the end of the current step (a second SIGINT
    interrupts at once)."""

    def __init__(self):
        self.received, self._previous = None, {}

    def install(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def restore(self, keep_sigterm: bool = False) -> None:
        for sig, handler in self._previous.items():
            if not (keep_sigterm and sig == signal.SIGTERM):
                signal.signal(sig, handler)
        self._previous = {}


SPREAD_Z = 8  # noise vectors per sample caption for the logged spread (16 captions: 128 G rows)


def write_samples(run: Run, samples: grids.SampleSet, logger: RunLogger, step: int) -> None:
    """The sample grid of G_ema, and how much its samples of one caption vary with z (pixel std,
    0 when G ignores its noise): a collapse shows in the log long before an evaluation."""
    if not run.env.is_main:
        return
    grid = grids.sample_grid(run.nets.G_ema, samples, run.cfg.run.sample_columns)
    grids.write_grid(grid, grids.grid_path(run.run_dir, step))
    logger.log_image("samples", grids.grid_array(grid), step)
    from fastxmc.eval.diversity import z_spread  # the evaluation package loads on first use
    with torch.no_grad():
        spread = z_spread(run.nets.G_ema, samples, SPREAD_Z, seed=run.cfg.run.seed)["pixels"]
    logger.log_scalar("samples/z_spread_pixels", spread, step)
    if not run.cfg.run.quiet:
        logger.message(f"step {step}: sample grid written; spread across z {spread:.4f} (pixel "
                       f"std per caption, {SPREAD_Z} noise vectors; 0 means G ignores z)")


def check_ranks_agree(run: Run) -> None:
    """Every rank must end with the same G and D parameters (DDP keeps them in lockstep)."""
    if not run.env.distributed:
        return
    prints = gather_objects([parameter_fingerprint(run.nets.g), parameter_fingerprint(run.nets.d)],
                            run.env)
    if any(p != prints[0] for p in prints[1:]):
        raise RuntimeError("ranks ended with different G/D parameters: DDP lost synchronisation")


def due(step: int, every: int, last: bool) -> bool:
    return last or (every > 0 and step % every == 0)


# ---------------------------------------------------------------- the loop
def train(cfg: TrainConfig, *, resume: bool = False) -> RunResult:
    """Train (or, with ``resume``, continue) the run of ``cfg`` in ``cfg.run.out``; under torchrun
    every process calls this."""
    env = init_distributed(cfg.run.device)
    threads = torch.get_num_threads()
    try:
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        return training_loop(cfg, env, resume)
    except RuntimeError as err:
        lost = peer_lost_error(env, err)
        if lost is None:
            raise
        raise lost from err
    finally:
        torch.set_num_threads(threads)
        shutdown(env)


def training_loop(cfg: TrainConfig, env: DistEnv, resume: bool) -> RunResult:
    # ---- setup: run dir, data, networks, losses, outputs
    r = cfg.run
    autocast = autocast_factory(r.precision, env.device)
    state = load_resume_state(cfg, env) if resume else None
    run_dir = prepare_run_dir(cfg, env, None if state is None else int(state["step"]))
    seed_everything(r.seed)
    progress = env.is_main and not r.quiet
    loader = make_loader(cfg, env, progress)
    write_run_config(cfg, env, run_dir, loader)
    sentences = loader.sentence_embeddings() if cfg.model.whiten_sentences else None
    nets = build_networks(cfg, loader.text_dim, env.device, sentences, d_classes(cfg, loader))
    z_gen = torch.Generator(device=env.device).manual_seed(noise_seed(r.seed, env.rank))
    run = Run(cfg, env, run_dir, loader, nets, build_losses(cfg, env, autocast, loader), z_gen, autocast,
              loader.text_dim, build_negatives(cfg.loss, loader, seed=r.seed, rank=env.rank),
              build_class_targets(cfg, loader, env.device))
    samples = build_sample_set(cfg, progress)
    statistics_set = build_statistics_set(cfg, progress)
    start = restore_state(state, run) if state is not None else 0
    del state
    wrap_networks(nets, cfg, env)
    if env.is_main:
        grids.write_captions(run_dir, samples)
    logger = RunLogger(run_dir, enabled=env.is_main, total_steps=r.steps, start_step=start,
                       tensorboard=r.tensorboard, quiet=r.quiet)
    logger.message(f"fastxmc.train: {cfg.preset} preset, {cfg.data.dataset} data "
                   f"({loader.num_samples} images, text_dim {loader.text_dim}), {env.world_size} "
                   f"process(es) on {env.device}, steps {start + 1}..{r.steps} -> {run_dir}")
    d_steps = cfg.optim.d_steps_per_g_step
    images_per_step = r.batch_size * d_steps * env.world_size  # real images, all ranks
    stream, meter, stop = batch_stream(loader), Meter(), StopSignal().install()
    step, status, last_ckpt = start, "completed", None
    nets.G.train()
    nets.D.train()
    try:
        if start == 0 and cfg.optim.d_warmup_steps:
            warm_up_discriminator(run, stream, logger)
            logger.restart_clock()
        for step in range(start + 1, r.steps + 1):
            # ---- data
            batches, wait = fetch(stream, d_steps)
            meter.add(wait)
            # ---- D-only steps, then the joint D + G step on the last batch
            if cfg.optim.d_lr_ramp_steps:
                set_lr(nets.opt_D, d_lr_at(cfg.optim, step))
            d_only = [discriminator_step(run, batch) for batch in batches[:-1]]
            fw = joint_forward(run, batches[-1])
            bad = non_finite_terms(fw, d_only)
            bad_anywhere, stop_now = any_rank([bool(bad), stop.received is not None], env)
            if bad_anywhere:
                where = ", ".join(bad) if bad else "a term on another rank"
                raise NonFiniteLossError(
                    f"non-finite loss at step {step}: {where}. The run stopped without updating; "
                    f"{ckpt.last_good_checkpoint(run_dir)}")
            joint_update(run, fw, step)
            # ---- metrics, samples, checkpoints
            last = step == r.steps or stop_now
            if due(step, r.log_every, last):
                values = step_metrics(fw)
                if cfg.optim.d_lr_ramp_steps:
                    values["d_lr"] = d_lr_at(cfg.optim, step)
                logger.log_metrics(step, {**values, **meter.values(images_per_step)})
                shown = {k: values[k] for k in ("loss_d", "loss_g")}
                logger.advance(step, shown)
                logger.print_progress(step, shown)
                meter.reset()
            else:
                logger.advance(step)
            sample_now, save_now = due(step, r.sample_every, last), due(step, r.checkpoint_every, last)
            if sample_now or save_now:
                refresh_ema_statistics(run, statistics_set)
            if sample_now:
                write_samples(run, samples, logger, step)
            if save_now:
                last_ckpt = save(run, step)
            if stop_now:
                status = "interrupted"
                logger.message(f"stopped by a signal after step {step}; checkpoint {last_ckpt}; "
                               "continue with --resume")
                break
        if start >= r.steps:
            logger.message(f"nothing to do: the run is at step {start} >= run.steps={r.steps}")
        check_ranks_agree(run)
    finally:
        # Unwinding from a failure of a torchrun job: torchrun is about to SIGTERM this process;
        # keep catching it so the one-line report of what failed gets out.
        stop.restore(keep_sigterm=env.distributed and sys.exc_info()[0] is not None)
        logger.close()
    return RunResult(run_dir, step, status, last_ckpt, stop.received)
