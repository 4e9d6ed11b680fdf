"""The pretrain config: the same sections, presets and ``--section.key=value`` overrides as
:mod:`fastxmc.train.config`, whose parsing, override and serialisation helpers it reuses.

Sections: ``data`` (:class:`fastxmc.data.config.DataConfig`), ``model`` (the
:class:`fastxmc.models.dual_encoder.DualEncoderConfig` fields that do not come from the data:
resolution from ``data.resolution``, ``text_dim`` from the loader), ``optim``, ``loss``, ``run``.
``run.batch_size`` is the batch of one step on one process; ``run.steps`` counts optimizer steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fastxmc.data.config import DataConfig
from fastxmc.models.dual_encoder import DualEncoderConfig
from fastxmc.train.config import (ConfigFamily, _is_int, _require, _set, config_to_dict,
                                  write_config)

__all__ = ["PretrainConfig", "PRESETS", "PRETRAIN_CONFIGS", "build_config", "read_config",
           "write_config", "config_to_dict", "dual_encoder_config", "config_for", "USAGE"]


@dataclass
class EncoderConfig:
    """Both towers (see :class:`~fastxmc.models.dual_encoder.DualEncoderConfig`)."""
    embed_dim: int = 256
    width: int = 32
    region_size: int = 16               # capped at resolution / 2 by dual_encoder_config
    text_layers: int = 0                # 0: projections of the frozen embeddings; > 0: a transformer
    text_heads: int = 4
    dropout: float = 0.0


@dataclass
class PretrainOptimConfig:
    impl: Literal["torch", "apex"] = "torch"   # as fastxmc.train (fused Adam / apex FusedAdam)
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class PretrainLossConfig:
    """DAMSM-style terms (docs/design.md, "Label-guided extension"); a weight of 0 switches a term off."""
    temperature: float = 0.1            # C(global image feature, sentence) = 2 * info_nce
    sentence_weight: float = 1.0
    word_weight: float = 1.0            # region_word_loss(regions, words)
    word_gamma1: float = 5.0
    word_gamma2: float = 5.0
    word_gamma3: float = 50.0
    global_negatives: bool = False      # negatives from every rank under torchrun
    supcon: bool = False                # label-guided terms over two captions per image
    supcon_text_weight: float = 1.0     # SupCon over [s_a; s_b] (Ye et al.: weight 1 in pretraining)
    supcon_image_weight: float = 1.0    # SupCon over the global image features
    supcon_temperature: float = 0.5


@dataclass
class PretrainRunConfig:
    out: str = "runs/dual"
    steps: int = 1000
    seed: int = 0
    batch_size: int = 64
    log_every: int = 10
    checkpoint_every: int = 250         # 0: only at the end
    keep_checkpoints: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # The image tower's layout, as the training engine's run.memory_format (auto: channels_last on
    # CPU, contiguous on CUDA); dual_encoder.pt holds values and loads into either.
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    threads: int = 0
    tensorboard: bool = True
    quiet: bool = False


@dataclass
class PretrainConfig:
    preset: str = "shapes"
    data: DataConfig = field(default_factory=DataConfig)
    model: EncoderConfig = field(default_factory=EncoderConfig)
    optim: PretrainOptimConfig = field(default_factory=PretrainOptimConfig)
    loss: PretrainLossConfig = field(default_factory=PretrainLossConfig)
    run: PretrainRunConfig = field(default_factory=PretrainRunConfig)


def dual_encoder_config(cfg: PretrainConfig, text_dim: int) -> DualEncoderConfig:
    """The :class:`DualEncoderConfig` of a run, given the loader's text width."""
    m, res = cfg.model, cfg.data.resolution
    return DualEncoderConfig(resolution=res, text_dim=text_dim, embed_dim=m.embed_dim, width=m.width,
                             region_size=min(m.region_size, res // 2), text_layers=m.text_layers,
                             text_heads=m.text_heads, max_tokens=cfg.data.resolved_max_tokens(),
                             dropout=m.dropout)


# ---------------------------------------------------------------- presets
def preset_shapes() -> PretrainConfig:
    """The shapes dataset as the train preset has it (32px, one object, gradient backgrounds, objects
    1.3x larger)."""
    cfg = PretrainConfig(preset="shapes")
    # The train preset's data; no flips: the captions name left and right.
    _set(cfg.data, resolution=32, shapes_train=5000, flip=False, shapes_max_objects=1,
         shapes_backgrounds="gradient", shapes_object_scale=1.3)
    return cfg


def preset_tiny() -> PretrainConfig:
    """Smoke tests: the tiny train preset's data (32px), narrow towers, a few steps."""
    cfg = PretrainConfig(preset="tiny")
    _set(cfg.data, resolution=32, shapes_train=256, shapes_val=32, workers=0)
    _set(cfg.model, embed_dim=32, width=8, region_size=8)
    _set(cfg.run, out="runs/dual-tiny", steps=4, batch_size=16, log_every=1, checkpoint_every=0,
         threads=1)
    return cfg


def _paper(preset: str, dataset: str, resolution: int) -> PretrainConfig:
    cfg = PretrainConfig(preset=preset)
    _set(cfg.data, dataset=dataset, resolution=resolution, text_encoder="bert-base-uncased")
    _set(cfg.model, width=64)
    _set(cfg.run, out=f"runs/dual-{preset}", steps=50_000, batch_size=1024, log_every=50,
         checkpoint_every=2000)
    return cfg


PRESETS = {"shapes": preset_shapes, "tiny": preset_tiny,
           "coco128": lambda: _paper("coco128", "coco", 128),
           "coco256": lambda: _paper("coco256", "coco", 256),
           "cub": lambda: _paper("cub", "cub", 128)}


# ---------------------------------------------------------------- validation and building
def _positive_int(value) -> bool:
    return _is_int(value) and value >= 1


def validate(cfg: PretrainConfig) -> PretrainConfig:
    """Check every section; errors name the key. Returns ``cfg``."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {cfg.preset!r}")
    cfg.data.validate()
    r, loss = cfg.run, cfg.loss
    for key in ("steps", "batch_size", "log_every", "keep_checkpoints"):
        _require(_positive_int(getattr(r, key)), f"run.{key}", "a positive int", getattr(r, key))
    for key in ("checkpoint_every", "threads", "seed"):
        value = getattr(r, key)
        _require(isinstance(value, int) and value >= 0, f"run.{key}", "an int >= 0", value)
    for key in ("temperature", "supcon_temperature", "word_gamma1", "word_gamma2", "word_gamma3"):
        value = getattr(loss, key)
        _require(isinstance(value, (int, float)) and value > 0, f"loss.{key}", "a positive number", value)
    for key in ("sentence_weight", "word_weight", "supcon_text_weight", "supcon_image_weight"):
        value = getattr(loss, key)
        _require(isinstance(value, (int, float)) and value >= 0, f"loss.{key}", "a number >= 0", value)
    _require(cfg.optim.lr > 0, "optim.lr", "a positive number", cfg.optim.lr)
    _require(len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas",
             "two numbers in [0, 1)", cfg.optim.betas)
    if loss.supcon and not cfg.data.two_captions:
        raise ValueError("loss.supcon needs data.two_captions=true (the two caption branches)")
    dual_encoder_config(cfg, text_dim=1)   # architecture checks (region_size, heads, ...)
    return cfg


PRETRAIN_CONFIGS = ConfigFamily("pretrain", PretrainConfig, PRESETS, validate)
# The module-level API (the family's other methods: PRETRAIN_CONFIGS.<name>).
preset_config, build_config = PRETRAIN_CONFIGS.preset_config, PRETRAIN_CONFIGS.build_config
read_config, config_for = PRETRAIN_CONFIGS.read_config, PRETRAIN_CONFIGS.config_for


USAGE = """usage: python -m fastxmc.pretrain [--preset NAME] [--dataset D] [--data PATH] [--out DIR]
                               [--steps N] [--seed S] [--batch-size B] [--device auto|cpu|cuda]
                               [--supcon] [--global-negatives] [--quiet] [--resume]
                               [--section.key=value ...]

Pretrain the dual encoder (image CNN + text head over the frozen token embeddings) with the
sentence contrastive loss and the region-word loss (and, with --supcon, the label-guided terms).
Writes DIR/config.json, DIR/metrics.jsonl, DIR/checkpoints/ (for --resume) and DIR/dual_encoder.pt
(the model python -m fastxmc.eval --dual takes).

  --preset NAME         shapes (default), tiny, coco128, coco256, cub
  --dataset D / --data PATH / --out DIR / --steps N / --seed S / --batch-size B / --device D
                        (= --data.dataset, --data.path, --run.out, --run.steps, --run.seed,
                           --run.batch_size, --run.device)
  --supcon              label-guided SupCon terms (= --loss.supcon=true)
  --global-negatives    contrastive negatives from every rank (= --loss.global_negatives=true)
  --quiet               no progress output (= --run.quiet=true)
  --resume              continue the run in --out from its newest valid checkpoint
  --debug               show the full traceback of a failure (also FASTXMC_DEBUG=1)
  --section.key=value   any config field; sections: data, model, optim, loss, run

Multi-GPU: torchrun --nproc_per_node=N -m fastxmc.pretrain ...
"""
