"""The dual-encoder pretraining loop of ``python -m fastxmc.pretrain`` (docs/design.md, "Label-guided extension").

One step: a batch of (image, caption) pairs; ONE forward of the dual encoder (the image tower on the
B images, the text tower on the B captions, or on the 2B captions of both branches with
``loss.supcon``); the weighted loss terms of :func:`loss_terms`; one Adam step.

Run-directory conventions are those of ``python -m fastxmc.train`` (whose helpers this module
imports): ``config.json``, ``metrics.jsonl`` (+ TensorBoard), atomic ``checkpoints/ckpt-<step>.pt``
(keys ``step``, ``model``, ``opt``, ``data``, ``rng``, ``config``, ``text_dim``, ``world_size``) for
``--resume``, a progress bar, SIGINT/SIGTERM ending the run after a checkpoint, torchrun (DDP).
The trained model is also written with :meth:`DualEncoder.save` to ``DIR/dual_encoder.pt`` at every
checkpoint: the file ``python -m fastxmc.eval --dual`` reads.
"""
from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from fastxmc.data.loader import build_loader
from fastxmc.losses import info_nce, region_word_loss, supcon
from fastxmc.models.dual_encoder import DUAL_ENCODER_FILE as MODEL_FILE, DualEncoder
from fastxmc.pretrain.config import PretrainConfig, config_to_dict, dual_encoder_config
from fastxmc.train import checkpoint as ckpt
from fastxmc.train.distributed import (DistEnv, any_rank, barrier, init_distributed, peer_lost_error,
                                       shutdown, unwrap, wrap)
from fastxmc.train.logging import RunLogger
from fastxmc.train.loop import (Meter, NonFiniteLossError, StopSignal, autocast_factory, batch_stream,
                                due, fetch, load_resume_state, make_optimizer, network_memory_format,
                                prepare_run_dir, seed_everything, write_run_config)
from fastxmc.train.losses import pair_labels


class PretrainResult(NamedTuple):
    run_dir: Path
    step: int                 # the last completed step
    status: str               # "completed" or "interrupted"
    checkpoint: Path | None
    model_path: Path | None   # DIR/dual_encoder.pt
    signal: int | None


@dataclass
class PretrainRun:
    cfg: PretrainConfig
    env: DistEnv
    run_dir: Path
    loader: object
    model: nn.Module          # possibly DDP-wrapped; ``encoder`` never is
    opt: torch.optim.Optimizer
    autocast: object
    text_dim: int

    @property
    def encoder(self) -> DualEncoder:
        return unwrap(self.model)


# ---------------------------------------------------------------- the loss
def sentence_term(global_feature, sentences: list, temperature: float, labels, group) -> torch.Tensor:
    """XMC-GAN's C(image, sentence) = 2 * info_nce, averaged over the caption branches."""
    return torch.stack([2 * info_nce(global_feature, s, temperature, labels=labels, group=group)
                        for s in sentences]).mean()


def word_term(regions, words: list, masks: list, loss_cfg) -> torch.Tensor:
    """The region-word loss against every branch's projected words, averaged over the branches."""
    return torch.stack([region_word_loss(regions, w, m, gamma1=loss_cfg.word_gamma1,
                                         gamma2=loss_cfg.word_gamma2, gamma3=loss_cfg.word_gamma3)
                        for w, m in zip(words, masks)]).mean()


def step_terms(loss_cfg, image, text, masks: list, labels, group) -> dict:
    """Unweighted loss terms of one batch; a term whose weight is 0 is not computed.

    image: ImageEncoding of B images (fp32); text: TextEncoding of ``len(masks) * B`` captions,
    branch-major (branch k = rows k*B..(k+1)*B-1); masks: the (B, T) word masks of each branch;
    labels (B,) label-guided ids (``loss.supcon``) or None.
    """
    branches = len(masks)
    sentences, words = text.sentence.chunk(branches), text.words.chunk(branches)
    terms = {}
    if loss_cfg.sentence_weight:
        terms["sentence"] = sentence_term(image.global_feature, sentences, loss_cfg.temperature,
                                          labels, group)
    if loss_cfg.word_weight:
        terms["word"] = word_term(image.regions, words, masks, loss_cfg)
    if loss_cfg.supcon and loss_cfg.supcon_text_weight:
        terms["supcon_text"] = supcon(text.sentence, labels.repeat(branches),
                                      loss_cfg.supcon_temperature, group=group)
    if loss_cfg.supcon and loss_cfg.supcon_image_weight:
        terms["supcon_image"] = supcon(image.global_feature, labels, loss_cfg.supcon_temperature,
                                       group=group)
    return terms


WEIGHTS = {"sentence": "sentence_weight", "word": "word_weight", "supcon_text": "supcon_text_weight",
           "supcon_image": "supcon_image_weight"}


def total_loss(loss_cfg, terms: dict) -> torch.Tensor:
    return sum(getattr(loss_cfg, WEIGHTS[name]) * value for name, value in terms.items())


# ---------------------------------------------------------------- one step
def batch_texts(batch: dict, two: bool) -> tuple:
    """(sentence (kB, E), words (kB, T, E), word_mask (kB, T), masks: list of k (B, T)) for the
    k = 1 or 2 caption branches, branch-major."""
    keys = [("sentence", "words", "word_mask")]
    if two:
        keys.append(("sentence_b", "words_b", "word_mask_b"))
    parts = [[batch[k] for k in names] for names in keys]
    masks = [p[2] for p in parts]
    return (*(torch.cat(column) for column in zip(*parts)), masks)


def forward_terms(run: PretrainRun, batch: dict) -> dict:
    """One dual-encoder forward on the batch and the unweighted loss terms (fp32)."""
    loss_cfg = run.cfg.loss
    sentence, words, mask, masks = batch_texts(batch, loss_cfg.supcon)
    labels = None
    if loss_cfg.supcon:
        labels = pair_labels(batch["label"], offset=run.env.rank * run.cfg.run.batch_size)
    with run.autocast():
        image, text = run.model(batch["image"], sentence, words, mask)
    image = type(image)(*(t.float() for t in image))
    text = type(text)(*(t.float() for t in text))
    group = run.env.group if loss_cfg.global_negatives else None
    return step_terms(loss_cfg, image, text, masks, labels, group)


def check_finite(run: PretrainRun, terms: dict, stop_requested: bool, step: int) -> bool:
    """Raise on a non-finite term on any rank (before the update); returns whether to stop now."""
    values = torch.stack([v.detach().reshape(()) for v in terms.values()])
    bad, stop_now = any_rank([not bool(torch.isfinite(values).all()), stop_requested], run.env)
    if bad:
        names = [n for n, v in zip(terms, values.tolist()) if v != v or abs(v) == float("inf")]
        raise NonFiniteLossError(
            f"non-finite loss at step {step}: {', '.join(names) or 'a term on another rank'}. The run "
            f"stopped without updating; {ckpt.last_good_checkpoint(run.run_dir)}")
    return stop_now


def update(run: PretrainRun, terms: dict) -> torch.Tensor:
    loss = total_loss(run.cfg.loss, terms)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    return loss.detach()


# ---------------------------------------------------------------- setup, checkpoints
def build_run(cfg: PretrainConfig, env: DistEnv, run_dir: Path, progress: bool) -> PretrainRun:
    loader = build_loader(cfg.data, split="train", batch_size=cfg.run.batch_size, rank=env.rank,
                          world_size=env.world_size, seed=cfg.run.seed, device=env.device,
                          progress=progress)
    model = DualEncoder(dual_encoder_config(cfg, loader.text_dim)).to(
        env.device, memory_format=network_memory_format(cfg.run.memory_format, env.device))
    opt = make_optimizer(model.parameters(), cfg.optim.lr, cfg.optim, env.device)
    return PretrainRun(cfg, env, run_dir, loader, model, opt,
                       autocast_factory(cfg.run.precision, env.device), loader.text_dim)


def restore_state(state: dict, run: PretrainRun) -> int:
    if state.get("world_size", 1) != run.env.world_size:
        raise ValueError(f"the checkpoint was written by {state.get('world_size')} processes, this run "
                         f"has {run.env.world_size}; resume with the same number")
    run.encoder.load_state_dict(state["model"])
    run.opt.load_state_dict(state["opt"])
    run.loader.load_state_dict(state["data"])
    ckpt.restore_rng(state["rng"])
    return int(state["step"])


def save(run: PretrainRun, step: int) -> Path | None:
    """The resume checkpoint and ``DIR/dual_encoder.pt`` (rank 0; every rank waits)."""
    path = None
    if run.env.is_main:
        state = {"step": step, "model": run.encoder.state_dict(), "opt": run.opt.state_dict(),
                 "data": run.loader.state_dict(), "rng": ckpt.capture_rng(),
                 "config": config_to_dict(run.cfg), "text_dim": run.text_dim,
                 "world_size": run.env.world_size}
        path = ckpt.save_checkpoint(state, run.run_dir, run.cfg.run.keep_checkpoints)
        run.encoder.save(run.run_dir / MODEL_FILE)
    barrier(run.env)
    return path


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def log_step(logger: RunLogger, meter: Meter, run: PretrainRun, step: int, loss, terms: dict) -> None:
    values = {"loss": float(loss), **{k: float(v.detach()) for k, v in terms.items()}}
    rates = meter.values(run.cfg.run.batch_size * run.env.world_size)
    rates["samples_per_s"] = rates.pop("images_per_s")
    rates["peak_rss_mb"] = peak_rss_mb()
    if run.env.device.type == "cuda":
        rates["peak_cuda_mb"] = torch.cuda.max_memory_allocated(run.env.device) / 2**20
    logger.log_metrics(step, {**values, **rates})
    logger.advance(step, {"loss": values["loss"]})
    logger.print_progress(step, {"loss": values["loss"]})
    meter.reset()


# ---------------------------------------------------------------- the loop
def pretrain(cfg: PretrainConfig, *, resume: bool = False) -> PretrainResult:
    """Pretrain (or, with ``resume``, continue) the dual encoder of ``cfg`` in ``cfg.run.out``;
    under torchrun every process calls this."""
    env = init_distributed(cfg.run.device)
    threads = torch.get_num_threads()
    try:
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        return pretrain_loop(cfg, env, resume)
    except RuntimeError as err:
        lost = peer_lost_error(env, err)
        if lost is None:
            raise
        raise lost from err
    finally:
        torch.set_num_threads(threads)
        shutdown(env)


def pretrain_loop(cfg: PretrainConfig, env: DistEnv, resume: bool) -> PretrainResult:
    r = cfg.run
    state = load_resume_state(cfg, env, ckpt.PRETRAIN_KEYS) if resume else None
    run_dir = prepare_run_dir(cfg, env, None if state is None else int(state["step"]))
    seed_everything(r.seed)
    run = build_run(cfg, env, run_dir, progress=env.is_main and not r.quiet)
    write_run_config(cfg, env, run_dir, run.loader)
    start = restore_state(state, run) if state is not None else 0
    del state
    run.model = wrap(run.model, env, find_unused_parameters=not (cfg.loss.word_weight and
                                                                 cfg.loss.sentence_weight))
    logger = RunLogger(run_dir, enabled=env.is_main, total_steps=r.steps, start_step=start,
                       tensorboard=r.tensorboard, quiet=r.quiet)
    logger.message(f"fastxmc.pretrain: {cfg.preset} preset, {cfg.data.dataset} data "
                   f"({run.loader.num_samples} images, text_dim {run.text_dim}), batch {r.batch_size} "
                   f"x {env.world_size} process(es) on {env.device}, steps {start + 1}..{r.steps} "
                   f"-> {run_dir}")
    stream, meter, stop = batch_stream(run.loader), Meter(), StopSignal().install()
    step, status, last_ckpt = start, "completed", None
    run.model.train()
    try:
        for step in range(start + 1, r.steps + 1):
            (batch,), wait = fetch(stream, 1)
            meter.add(wait)
            terms = forward_terms(run, batch)
            stop_now = check_finite(run, terms, stop.received is not None, step)
            loss = update(run, terms)
            last = step == r.steps or stop_now
            if due(step, r.log_every, last):
                log_step(logger, meter, run, step, loss, terms)
            else:
                logger.advance(step)
            if due(step, r.checkpoint_every, last):
                last_ckpt = save(run, step)
            if stop_now:
                status = "interrupted"
                logger.message(f"stopped by a signal after step {step}; checkpoint {last_ckpt}; "
                               "continue with --resume")
                break
        if start >= r.steps:
            logger.message(f"nothing to do: the run is at step {start} >= run.steps={r.steps}")
    finally:
        # Unwinding from a failure of a torchrun job: torchrun is about to SIGTERM this process;
        # keep catching it so the one-line report of what failed gets out.
        stop.restore(keep_sigterm=env.distributed and sys.exc_info()[0] is not None)
        logger.close()
    model_path = run_dir / MODEL_FILE
    return PretrainResult(run_dir, step, status, last_ckpt, model_path if model_path.is_file() else None,
                          stop.received)
