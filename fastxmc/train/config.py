"""The train config: typed dataclasses, named presets and ``--section.key=value`` overrides.

Sections: ``data`` (:class:`fastxmc.data.config.DataConfig`), ``model``, ``optim``, ``loss``, ``run``.
A config is built from a preset (:data:`PRESETS`), then the command line's shortcuts (``--steps``,
``--out``, ...) and ``--section.key=value`` overrides are applied, in that order. Overrides are parsed
by the field's type annotation (bool: true/false/1/0/yes/no; Optional: none/null; tuples:
comma-separated; Literal: one of its choices); unknown sections and keys are rejected with the
closest known name. The resolved config is written to ``DIR/config.json``.

Batch semantics: ``run.batch_size`` is the batch of ONE D step on ONE process. A training step
(one G step) consumes ``optim.d_steps_per_g_step`` such batches per process, as in the reference
code (its per-device batch is split across the D steps). ``run.steps`` counts G steps.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Union

from fastxmc.atomic import atomic_write_text
from fastxmc.data.config import DataConfig

SECTIONS = ("data", "model", "optim", "loss", "run")
RESOLVED_KEY = "resolved"  # config.json's record of start-up decisions; not a setting
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_NONE = ("none", "null")


@dataclass
class ModelConfig:
    """Networks (docs/design.md, "Generator" and "Discriminator"); resolution comes from ``data.resolution`` and the text
    width from the loader."""
    z_dim: int = 128
    g_width: int = 96                   # gf: G's base channel width
    d_width: int = 96                   # df: D's base channel width
    rho: float = 15.0                   # sharpness of G's word attention
    attention_every_block: bool = False  # recompute G's word attention per block (paper) vs once (code)
    d_coords: bool = False              # x/y coordinate input channels in D (ours; see Discriminator)
    d_saturation: bool = False          # a saturation (max - min of RGB) input channel in D (ours)
    d_spectral_norm: bool = True        # spectral norm on every D layer (paper); false: use R1 (ours)
    d_input_scale: int = 1              # 2: D reads its input enlarged 2x, with the 2x-resolution
                                        # architecture (ours; see Discriminator)
    g_text_stem: bool = False           # G's 4x4 stem reads the sentence too (ours; see Generator)
    g_coords: bool = False              # x/y coordinate channels in G's attention queries (ours)
    whiten_sentences: bool = False      # G and D read ZCA-whitened sentence embeddings (ours)


@dataclass
class OptimConfig:
    """Adam for both networks (docs/design.md, "Training recipe")."""
    impl: Literal["torch", "apex"] = "torch"  # torch: Adam(fused=True); apex: apex FusedAdam (CUDA)
    g_lr: float = 1e-4
    d_lr: float = 4e-4
    betas: tuple[float, float] = (0.5, 0.999)
    d_steps_per_g_step: int = 2         # the last D step shares its forward pass with the G step
    ema_decay: float = 0.999            # G_ema, updated after every G step
    ema_warmup: bool = False            # decay min(ema_decay, (1 + step) / (10 + step)) (TF's rule)
    # 0: G_ema keeps the live G's BN statistics (copied at every update, as the reference code).
    # N > 0: before every sample grid and checkpoint, G_ema's BN statistics are recomputed over N
    # batches of fixed captions and noise ("standing statistics"; see fastxmc.train.ema).
    ema_bn_batches: int = 0
    # Ours: N steps of D alone on real images before the first G step of a fresh run, minimising its
    # real-image terms (sentence, word, class; no hinge, no fakes), so that D reads what the captions
    # name before G has to follow it (fastxmc.train.loop.warm_up_discriminator). 0: off (paper).
    d_warmup_steps: int = 0
    # The warm-up's terms: "real" (every active one of them), or a '+'-joined subset of sentence,
    # word, class, e.g. "class": the class head alone (D's contrastive heads start with the GAN).
    d_warmup_terms: str = "real"
    # Ours: D's learning rate rises linearly over the first N G steps, d_lr * step / N, so that G
    # can catch up with a D that the warm-up made strong before both move at full speed; 0: d_lr
    # from step 1 (paper).
    d_lr_ramp_steps: int = 0


@dataclass
class LossConfig:
    """Loss weights and options (see :mod:`fastxmc.train.losses`); a weight of 0 switches a term off."""
    temperature: float = 0.1            # of every XMC-GAN contrastive term C(A, B)
    sentence_weight: float = 1.0        # C(p, e): D on real images, G on fakes
    word_weight: float = 1.0            # region-word loss: D on real images, G on fakes
    image_weight: float = 1.0           # C(p_fake, p_real) on D features (G only)
    # Ours: K captions of other images of the split join the image->text direction of both sentence
    # terms as extra negatives, through D's sentence projection (fastxmc/train/negatives.py); 0: off.
    text_negatives: int = 0
    # Ours: AC-GAN's auxiliary classifier, a label head on D's global feature: D learns the primary
    # class label of real images (d_class), G's fakes are scored against their image's label
    # (g_class), both cross-entropies weighted class_weight; needs class labels; 0: off.
    class_weight: float = 0.0
    # The weight of G's term alone (g_class); None: class_weight. 0: D learns the labels and G
    # follows them only through what D's shared features give the other terms. Without the head
    # (class_weight=0) there is no G term either, whatever this says.
    g_class_weight: float | None = None
    # What the class head predicts: "label" (the data's primary label) or, on the shapes data,
    # attributes of the primary object, '+'-joined: shape (6-way), color (8-way), position (9-way;
    # a fake's only where its caption names it). See fastxmc.train.class_targets.
    class_target: str = "label"
    classifier_weight: float = 1.0      # C(f(real), f(fake)), only with image_classifier_weights
    image_classifier: Literal["resnet50", "vgg19", "dual"] = "resnet50"
    image_classifier_weights: str | None = None  # a torchvision state_dict file; dual: a pretrain run
    word_gamma1: float = 5.0
    word_gamma2: float = 5.0
    word_gamma3: float = 50.0
    global_negatives: bool = False      # InfoNCE/SupCon negatives from every rank (reference: local)
    supcon: bool = False                # label-guided extension (two captions per image)
    supcon_image_weight: float = 0.2    # SupCon on the fake images' D features (G)
    supcon_text_weight: float = 0.2     # SupCon on D's sentence projections (D)
    supcon_temperature: float = 0.5
    r1_gamma: float = 0.0               # R1 penalty (gamma/2) E||grad_x D(x_real)||^2 on D; 0: off
    # DAMSM-style term (AttnGAN's, not XMC-GAN's): G's fakes against their captions in a frozen dual
    # encoder, C(E_img(fake), E_txt(caption)); 0: off. dual_encoder: a python -m fastxmc.pretrain run.
    dual_weight: float = 0.0
    dual_encoder: str | None = None
    # Counterfactual captions (ours; shapes dataset): each fake against its object's description and
    # the same description with one named attribute changed, in the dual encoder; 0: off
    # (fastxmc/train/counterfactual.py). attributes: '+'-joined of shape, color, size, position.
    counterfactual_weight: float = 0.0
    counterfactual_attributes: str = "shape"
    # The dual and counterfactual terms score dual_views jittered copies of each fake (a random
    # whole-pixel shift of up to dual_shift px, Gaussian noise of std dual_noise) and average:
    # G cannot lower them with a fixed pixel pattern the frozen encoder over-reads. 0: the fake itself.
    dual_views: int = 0
    dual_shift: int = 2
    dual_noise: float = 0.03


@dataclass
class RunConfig:
    """Run management: length, outputs, devices."""
    out: str = "runs/shapes"
    steps: int = 2000                   # G steps
    seed: int = 0
    batch_size: int = 8                 # per process and per D step (see the module docstring)
    log_every: int = 10
    sample_every: int = 250             # 0: only at the end
    checkpoint_every: int = 500         # 0: only at the end
    keep_checkpoints: int = 3
    num_samples: int = 16               # captions in the sample grid
    sample_columns: int = 8
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 autocast on CUDA, fp32 on CPU; bf16: autocast on either (on CPU, fast with AMX)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Layout of G's and D's 4-D weights, which conv outputs follow. auto: channels_last on CPU
    # (oneDNN then convolves NHWC activations without reordering them to its blocked layout and
    # back: bench_train_step's shapes step 654-689 ms instead of 937-941 ms on a 2-core Xeon),
    # contiguous on CUDA (NHWC unmeasured there). Checkpoints hold values, not layouts: either one resumes or samples either.
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    threads: int = 0                    # torch CPU threads (0: torch's default)
    tensorboard: bool = True
    quiet: bool = False


@dataclass
class TrainConfig:
    preset: str = "shapes"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)


def generator_kwargs(cfg: TrainConfig) -> dict:
    """Keyword arguments of :class:`fastxmc.models.Generator` besides ``text_dim``."""
    m = cfg.model
    return dict(resolution=cfg.data.resolution, z_dim=m.z_dim, width=m.g_width, rho=m.rho,
                attention_every_block=m.attention_every_block, text_stem=m.g_text_stem,
                coords=m.g_coords, whiten_sentence=m.whiten_sentences)


def discriminator_kwargs(cfg: TrainConfig) -> dict:
    return dict(resolution=cfg.data.resolution, width=cfg.model.d_width, coords=cfg.model.d_coords,
                whiten_sentence=cfg.model.whiten_sentences, saturation=cfg.model.d_saturation,
                spectral_norm=cfg.model.d_spectral_norm, input_scale=cfg.model.d_input_scale)


# ---------------------------------------------------------------- presets
def _set(obj, **values):
    """Assign fields without re-running a dataclass' __post_init__ validation (done at the end)."""
    for key, value in values.items():
        if not hasattr(obj, key):
            raise AttributeError(f"{type(obj).__name__} has no field {key!r}")
        setattr(obj, key, value)
    return obj


def preset_shapes() -> TrainConfig:
    """The default: the embedded shapes dataset with small networks, sized for 2 CPU cores.

    32px, one object per image on a gradient background (5000 training images, 25k captions keep the
    one-time caption encoding short), G/D width 16, 16 images per D step. Measured on the 2-core
    machine: 1.0 s per step on one thread (one D step), the same images/s as 64px at batch 8 (at width 16
    every stage of these networks costs about the same, so 64px only adds a stage).

    Why the rest differs from the paper's recipe at this scale (see docs/results.md): with its 2 D steps per
    G step and D's 4x larger rate, D separates real from fake beyond the hinge margin within ~150
    steps (d_hinge ~ 0). D's realness function then stops learning, G climbs D's frozen, unbounded
    logit and its mean brightness runs to white (tanh saturation holds it there). One D step and
    equal rates (Adam 2e-4 / 2e-4) keep the game balanced (d_hinge ~ 1) and each step 40% cheaper.
    D gets coordinate channels (model.d_coords) because the captions name positions.

    Positions: with the above alone D told captions' positions apart on real images but G left them
    at chance (objects settled in the corners). In a random batch of 16 the colour and shape nearly
    always identify a caption, so the contrastive terms hardly ask for position; batches of
    same-label pairs (data.label_groups=2) make every pair differ only in position and size, and G's
    stem reads the sentence (model.g_text_stem) so the layout can follow it. Objects are drawn 1.3x
    larger (data.shapes_object_scale; a small one was 5 px across). Measured at 2500 steps: position
    accuracy 0.47 (chance 0.13) instead of 0.11, R-precision 0.41 instead of 0.15. G_ema: decay
    0.995 with TF's warm-up and standing BN statistics (8 batches), since the live G's copied
    statistics don't fit G_ema in short runs.

    Shapes: the contrastive terms alone never made D read shapes (docs/results.md). D gets an
    auxiliary class head that predicts the primary object's shape and position
    (loss.class_target=shape+position; a fake's position only where its caption names one),
    weighted 10 in D's loss and 1 in G's, reads its input enlarged 2x
    (model.d_input_scale=2) and a saturation channel (model.d_saturation). A shape-only head
    made G trade the layout for shapes (every object in one corner); the position block keeps it.
    Measured at 2500 steps, seeds 0 and 1: shape 0.42 / 0.45 (chance 0.18; 0.18-0.21 before),
    position 0.84 / 0.83 (named 1.00 / 0.99; 0.47 before), R-precision 0.58 / 0.60 (0.43), about
    25% more time per step. Continued to 4000 steps (the preset's length since then; about 28 min
    in fp32 on 2 idle AMD EPYC cores at 0.41-0.42 s per step, 49 min on a slower 2-core Xeon with
    channels_last weights): shape 0.70 / 0.74, position named 1.00 / 1.00, R-precision 0.63 / 0.63."""
    cfg = TrainConfig(preset="shapes")
    # No horizontal flips: the captions name left and right.
    _set(cfg.data, resolution=32, shapes_train=5000, flip=False, shapes_max_objects=1,
         shapes_backgrounds="gradient", shapes_object_scale=1.3, label_groups=2)
    _set(cfg.model, z_dim=64, g_width=16, d_width=16, d_coords=True, g_text_stem=True,
         d_saturation=True, d_input_scale=2)
    _set(cfg.loss, class_weight=10.0, g_class_weight=1.0, class_target="shape+position")
    _set(cfg.optim, g_lr=2e-4, d_lr=2e-4, d_steps_per_g_step=1, ema_decay=0.995, ema_warmup=True,
         ema_bn_batches=8)
    _set(cfg.run, out="runs/shapes", steps=4000, batch_size=16, log_every=10, sample_every=250,
         checkpoint_every=500)
    return cfg


def preset_tiny() -> TrainConfig:
    """Smoke tests: 32px, width 8, a few hundred shapes images; a handful of steps in seconds."""
    cfg = TrainConfig(preset="tiny")
    _set(cfg.data, resolution=32, shapes_train=256, shapes_val=32, workers=0, flip=True)
    _set(cfg.model, z_dim=16, g_width=8, d_width=8)
    # One thread: these tensors are too small for intra-op parallelism to pay.
    _set(cfg.run, out="runs/tiny", steps=4, batch_size=8, log_every=1, sample_every=0,
         checkpoint_every=0, num_samples=4, sample_columns=4, threads=1)
    return cfg


def _paper(preset: str, dataset: str, resolution: int, steps: int) -> TrainConfig:
    """The reference setup: width 96, z 128, 8 images per GPU and D step (7 GPUs: 56), BERT text.

    ``data.text_encoder`` is the name of a local BERT-base directory; pass its path with
    ``--data.text_encoder=/path/to/bert-base-uncased`` (weights are never downloaded)."""
    cfg = TrainConfig(preset=preset)
    _set(cfg.data, dataset=dataset, resolution=resolution, text_encoder="bert-base-uncased")
    _set(cfg.run, out=f"runs/{preset}", steps=steps, batch_size=8, log_every=100,
         sample_every=2000, checkpoint_every=2000, num_samples=16)
    return cfg


def preset_coco128() -> TrainConfig:
    # 500 epochs of COCO-2014 train at 2 x 56 images per G step: about 370k G steps.
    return _paper("coco128", "coco", 128, 370_000)


def preset_coco256() -> TrainConfig:
    return _paper("coco256", "coco", 256, 370_000)


def preset_cub() -> TrainConfig:
    """CUB-200 birds at 128px (labels: the 200 species, for ``--supcon``)."""
    return _paper("cub", "cub", 128, 100_000)


def preset_ln_coco() -> TrainConfig:
    """Localized Narratives over COCO images, 128px, captions up to 64 tokens."""
    cfg = _paper("ln-coco", "ln", 128, 370_000)
    _set(cfg.data, ln_source="coco", max_tokens=64)
    return cfg


PRESETS = {"shapes": preset_shapes, "tiny": preset_tiny, "coco128": preset_coco128,
           "coco256": preset_coco256, "cub": preset_cub, "ln-coco": preset_ln_coco}


# ---------------------------------------------------------------- typed overrides
def _section_types(section) -> dict:
    return typing.get_type_hints(type(section))


def known_keys(cfg: TrainConfig) -> list:
    return [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(cfg, s))]


def _unknown(key: str, cfg: TrainConfig) -> ValueError:
    close = difflib.get_close_matches(key, known_keys(cfg), n=1, cutoff=0.5)
    hint = f"; did you mean --{close[0]}?" if close else f"; sections are {', '.join(SECTIONS)}"
    return ValueError(f"unknown config key --{key}{hint}")


def parse_value(text: str, annotation, key: str):
    """Parse the command-line ``text`` of ``--key`` as a value of type ``annotation``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if type(None) in args and text.strip().lower() in _NONE:
            return None
        inner = [a for a in args if a is not type(None)]
        return parse_value(text, inner[0] if len(inner) == 1 else Union[tuple(inner)], key)
    if origin is Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise ValueError(f"--{key} must be one of {list(args)}, got {text!r}")
    if origin is tuple:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != len(args):
            raise ValueError(f"--{key} takes {len(args)} comma-separated values, got {text!r}")
        return tuple(parse_value(p, a, key) for p, a in zip(parts, args))
    if annotation is bool:
        if text.strip().lower() in _TRUE + _FALSE:
            return text.strip().lower() in _TRUE
        raise ValueError(f"--{key} is a bool (true/false), got {text!r}")
    if annotation in (int, float):
        try:
            return annotation(text)
        except ValueError:
            raise ValueError(f"--{key} must be {annotation.__name__}, got {text!r}") from None
    if annotation is str:
        return text
    raise TypeError(f"--{key}: cannot parse a value of type {annotation} from the command line")


def apply_override(cfg: TrainConfig, key: str, text: str) -> None:
    """Set ``cfg.<section>.<name>`` from ``key = "section.name"`` and its command-line ``text``."""
    section_name, _, name = key.partition(".")
    if section_name not in SECTIONS:
        raise _unknown(key, cfg)
    section = getattr(cfg, section_name)
    if not name:
        first = dataclasses.fields(section)[0].name
        raise ValueError(f"--{key} is a section; set one of its keys, e.g. --{key}.{first}=...")
    hints = _section_types(section)
    if name not in hints or name not in {f.name for f in dataclasses.fields(section)}:
        raise _unknown(key, cfg)
    setattr(section, name, parse_value(text, hints[name], key))


# ---------------------------------------------------------------- validation
def _require(ok: bool, key: str, expected: str, value) -> None:
    if not ok:
        raise ValueError(f"{key} must be {expected}, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every section; errors name the key. Returns ``cfg``."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {cfg.preset!r}")
    cfg.data.validate()
    m, o, loss, r = cfg.model, cfg.optim, cfg.loss, cfg.run
    for key, value in (("model.z_dim", m.z_dim), ("model.g_width", m.g_width),
                       ("model.d_width", m.d_width), ("optim.d_steps_per_g_step", o.d_steps_per_g_step),
                       ("run.steps", r.steps), ("run.batch_size", r.batch_size),
                       ("run.log_every", r.log_every), ("run.keep_checkpoints", r.keep_checkpoints),
                       ("run.num_samples", r.num_samples), ("run.sample_columns", r.sample_columns)):
        _require(_is_int(value) and value >= 1, key, "a positive int", value)
    for key, value in (("run.sample_every", r.sample_every), ("run.checkpoint_every", r.checkpoint_every),
                       ("run.threads", r.threads), ("run.seed", r.seed)):
        _require(_is_int(value) and value >= 0, key, "an int >= 0", value)
    for key, value in (("optim.g_lr", o.g_lr), ("optim.d_lr", o.d_lr), ("model.rho", m.rho),
                       ("loss.temperature", loss.temperature),
                       ("loss.supcon_temperature", loss.supcon_temperature),
                       ("loss.word_gamma1", loss.word_gamma1), ("loss.word_gamma2", loss.word_gamma2),
                       ("loss.word_gamma3", loss.word_gamma3)):
        _require(isinstance(value, (int, float)) and value > 0, key, "a positive number", value)
    for name in ("sentence_weight", "word_weight", "image_weight", "classifier_weight",
                 "supcon_image_weight", "supcon_text_weight", "r1_gamma", "dual_weight",
                 "counterfactual_weight", "class_weight"):
        value = getattr(loss, name)
        _require(isinstance(value, (int, float)) and value >= 0, f"loss.{name}", "a number >= 0", value)
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
             "two numbers in [0, 1)", o.betas)
    _require(0 <= o.ema_decay <= 1, "optim.ema_decay", "in [0, 1]", o.ema_decay)
    _require(isinstance(o.ema_bn_batches, int) and not isinstance(o.ema_bn_batches, bool)
             and o.ema_bn_batches >= 0, "optim.ema_bn_batches", "an int >= 0", o.ema_bn_batches)
    _require(m.d_input_scale in (1, 2) and _is_int(m.d_input_scale), "model.d_input_scale",
             "1 or 2", m.d_input_scale)
    _require(m.d_input_scale == 1 or cfg.data.resolution <= 128, "model.d_input_scale",
             "1 at resolution 256 (D has no 512px architecture)", m.d_input_scale)
    if loss.g_class_weight is not None:
        _require(isinstance(loss.g_class_weight, (int, float)) and loss.g_class_weight >= 0,
                 "loss.g_class_weight", "a number >= 0 (or none: loss.class_weight)",
                 loss.g_class_weight)
    _require(_is_int(o.d_warmup_steps) and o.d_warmup_steps >= 0, "optim.d_warmup_steps",
             "an int >= 0", o.d_warmup_steps)
    _require(_is_int(o.d_lr_ramp_steps) and o.d_lr_ramp_steps >= 0, "optim.d_lr_ramp_steps",
             "an int >= 0", o.d_lr_ramp_steps)
    if o.d_warmup_steps:
        warmup_terms(cfg)
    for name in ("dual_weight", "counterfactual_weight"):    # the terms scored in a dual encoder
        if getattr(loss, name) and loss.dual_encoder is None:
            raise ValueError(f"loss.{name} > 0 needs loss.dual_encoder: the run directory (or its "
                             "dual_encoder.pt) of a `python -m fastxmc.pretrain` on the same data")
    _require(_is_int(loss.text_negatives) and loss.text_negatives >= 0, "loss.text_negatives",
             "an int >= 0", loss.text_negatives)
    if loss.text_negatives and not loss.sentence_weight:
        raise ValueError("loss.text_negatives > 0 adds negatives to the sentence terms, which "
                         "loss.sentence_weight=0 switches off")
    for key, value in (("loss.dual_views", loss.dual_views), ("loss.dual_shift", loss.dual_shift)):
        _require(_is_int(value) and value >= 0, key, "an int >= 0", value)
    _require(isinstance(loss.dual_noise, (int, float)) and loss.dual_noise >= 0, "loss.dual_noise",
             "a number >= 0", loss.dual_noise)
    if loss.counterfactual_weight:
        if cfg.data.dataset != "shapes":
            raise ValueError("loss.counterfactual_weight needs the shapes dataset (its attributes.jsonl "
                             f"describes every object), got data.dataset={cfg.data.dataset!r}")
        from fastxmc.train.counterfactual import parse_attributes
        parse_attributes(loss.counterfactual_attributes)
    from fastxmc.train.class_targets import attribute_blocks
    attribute_head = attribute_blocks(loss.class_target) is not None and loss.class_weight
    if attribute_head and cfg.data.dataset != "shapes":
        raise ValueError(f"loss.class_target={loss.class_target!r} (the shapes preset's class head) "
                         f"reads the shapes attributes; on data.dataset={cfg.data.dataset!r} pass "
                         "--loss.class_target=label (the data's labels) or --loss.class_weight=0 (no head)")
    if loss.supcon and not cfg.data.two_captions:
        raise ValueError("loss.supcon needs data.two_captions=true (the two caption branches)")
    return cfg


WARMUP_TERM_WEIGHTS = {"sentence": "sentence_weight", "word": "word_weight", "class": "class_weight"}


def warmup_terms(cfg: TrainConfig) -> tuple:
    """The loss terms of D's warm-up (``optim.d_warmup_terms``), e.g. ``("d_class",)``; errors name
    the option when a term is unknown or switched off, or when none is left."""
    text, loss = cfg.optim.d_warmup_terms, cfg.loss
    if text == "real":
        names = [n for n, weight in WARMUP_TERM_WEIGHTS.items() if getattr(loss, weight)]
        if not names:
            raise ValueError("optim.d_warmup_steps > 0 trains D on its real-image terms, and "
                             "loss.sentence_weight, loss.word_weight and loss.class_weight are all 0")
        return tuple(f"d_{n}" for n in names)
    names = [n.strip() for n in text.split("+")]
    for name in names:
        if name not in WARMUP_TERM_WEIGHTS:
            raise ValueError(f"optim.d_warmup_terms must be 'real' or a '+'-joined subset of "
                             f"{list(WARMUP_TERM_WEIGHTS)}, got {text!r}")
        if not getattr(loss, WARMUP_TERM_WEIGHTS[name]):
            raise ValueError(f"optim.d_warmup_terms names {name!r}, which "
                             f"loss.{WARMUP_TERM_WEIGHTS[name]}=0 switches off")
    return tuple(f"d_{n}" for n in WARMUP_TERM_WEIGHTS if n in names)


# ---------------------------------------------------------------- building and (de)serialising
@dataclass(frozen=True)
class ConfigFamily:
    """Presets, overrides and (de)serialisation of one config family (train here, pretrain in
    :mod:`fastxmc.pretrain.config`): dataclass configs with a ``preset`` and the :data:`SECTIONS`.

    ``make(preset=name)`` builds an empty config, ``presets`` maps names to preset factories and
    ``validate(cfg)`` checks a config and returns it; ``kind`` names the family in errors."""
    kind: str
    make: Callable
    presets: dict
    validate: Callable

    def preset_config(self, name: str):
        """A fresh config of preset ``name`` (not yet validated)."""
        if name not in self.presets:
            close = difflib.get_close_matches(name, self.presets, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown preset {name!r}; presets are {list(self.presets)}{hint}")
        return self.presets[name]()

    def apply_overrides(self, cfg, overrides):
        """Every ``(key, text)`` override in order, then validation; ``loss.supcon`` switches
        ``data.two_captions`` on (the two caption branches)."""
        for key, text in overrides:
            apply_override(cfg, key, text)
        if cfg.loss.supcon:
            cfg.data.two_captions = True
        return self.validate(cfg)

    def build_config(self, preset: str = "shapes", overrides=()):
        """The preset, then the overrides, then validation."""
        return self.apply_overrides(self.preset_config(preset), overrides)

    def config_from_dict(self, d: dict):
        """Inverse of :func:`config_to_dict` (JSON lists become the annotated tuples); unknown
        sections and keys raise; keys a saved config lacks keep their defaults."""
        unknown = sorted(set(d) - {"preset", RESOLVED_KEY, *SECTIONS})
        if unknown:
            raise ValueError(f"unknown {self.kind} config sections {unknown}; known: {list(SECTIONS)}")
        cfg = self.make(preset=d.get("preset", "shapes"))
        for section_name in SECTIONS:
            section = getattr(cfg, section_name)
            fields = {f.name for f in dataclasses.fields(section)}
            for key, value in d.get(section_name, {}).items():
                if key not in fields:
                    raise _unknown(f"{section_name}.{key}", cfg)
                setattr(section, key, tuple(value) if isinstance(value, list) else value)
        return self.validate(cfg)

    def read_config(self, path):
        return self.config_from_dict(json.loads(Path(path).read_text()))

    def config_for(self, cli):
        """The run's config from a parsed command line (:func:`parse_command_line`): the preset
        plus the overrides; with --resume, the run directory's saved config.json plus the same
        overrides (the directory is found from the preset and overrides)."""
        if not cli.resume:
            return self.build_config(cli.preset, cli.overrides)
        probe = self.preset_config(cli.preset)
        for key, text in cli.overrides:
            apply_override(probe, key, text)
        saved = Path(probe.run.out) / "config.json"
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {saved} does not exist; pass the run's --out DIR")
        return self.apply_overrides(self.read_config(saved), cli.overrides)


TRAIN_CONFIGS = ConfigFamily("train", TrainConfig, PRESETS, validate)
preset_config = TRAIN_CONFIGS.preset_config
build_config = TRAIN_CONFIGS.build_config
apply_overrides = TRAIN_CONFIGS.apply_overrides
config_from_dict = TRAIN_CONFIGS.config_from_dict
read_config = TRAIN_CONFIGS.read_config
config_for = TRAIN_CONFIGS.config_for


def config_to_dict(cfg: TrainConfig) -> dict:
    return {"preset": cfg.preset, **{s: _section_dict(getattr(cfg, s)) for s in SECTIONS}}


def _section_dict(section) -> dict:
    if isinstance(section, DataConfig):
        return section.to_dict()
    return dataclasses.asdict(section)


def write_config(cfg: TrainConfig, path, resolved: dict | None = None) -> None:
    """The config as JSON, atomically; ``resolved``: facts decided at start-up (e.g. the data
    backend and why), kept under ``"resolved"``, which reading the file back ignores."""
    payload = config_to_dict(cfg)
    if resolved:
        payload[RESOLVED_KEY] = resolved
    atomic_write_text(json.dumps(payload, indent=2) + "\n", path)


# ---------------------------------------------------------------- the command line
USAGE = """usage: python -m fastxmc.train [--preset NAME] [--dataset D] [--data PATH] [--out DIR]
                            [--steps N] [--seed S] [--log-every K] [--batch-size B]
                            [--device auto|cpu|cuda] [--optim torch|apex] [--supcon]
                            [--global-negatives] [--quiet] [--resume] [--section.key=value ...]

Train XMC-GAN. With no arguments: the embedded shapes dataset, on the CPU or the GPU.

  --preset NAME         shapes (default), tiny, coco128, coco256, cub, ln-coco
  --dataset D           shapes | folder | coco | cub | ln          (= --data.dataset)
  --data PATH           the dataset root                           (= --data.path)
  --out DIR             the run directory                          (= --run.out)
  --steps N             G steps                                    (= --run.steps)
  --seed S              (= --run.seed)     --log-every K  (= --run.log_every)
  --batch-size B        per process and D step (= --run.batch_size)
  --device D            (= --run.device)   --optim torch|apex  (= --optim.impl)
  --supcon              label-guided SupCon extension (= --loss.supcon=true)
  --global-negatives    contrastive negatives from every rank (= --loss.global_negatives=true)
  --quiet               no progress output (= --run.quiet=true)
  --resume              continue the run in --out from its newest valid checkpoint (a damaged
                        newer one is set aside as .bad), with its saved config.json plus the
                        options given here (e.g. a larger --steps)
  --debug               show the full traceback of a failure (also FASTXMC_DEBUG=1)
  --section.key=value   any config field, type-checked; sections: data, model, optim, loss, run

Shortcuts and overrides apply in command-line order, after the preset.
Multi-GPU / multi-node: torchrun [--nnodes ... --rdzv_endpoint ...] --nproc_per_node=N -m fastxmc.train ...
"""
SHORTCUTS = {"--dataset": "data.dataset", "--data": "data.path", "--out": "run.out",
             "--steps": "run.steps", "--seed": "run.seed", "--log-every": "run.log_every",
             "--batch-size": "run.batch_size", "--device": "run.device", "--optim": "optim.impl"}
FLAGS = {"--supcon": "loss.supcon", "--global-negatives": "loss.global_negatives",
         "--quiet": "run.quiet"}


@dataclass
class CommandLine:
    """A parsed command line: the preset, ``(key, text)`` overrides in order, and --resume."""
    preset: str = "shapes"
    overrides: list = field(default_factory=list)
    resume: bool = False
    help: bool = False
    debug: bool = False


def _split_option(args: list, i: int) -> tuple:
    """(name, value or None, next index) of the option at ``args[i]``."""
    name, eq, value = args[i].partition("=")
    return name, (value if eq else None), i + 1


def parse_command_line(argv) -> CommandLine:
    """Parse ``argv`` (without the program name); raises ValueError with a suggestion on errors."""
    args, cli, i = list(argv), CommandLine(), 0
    while i < len(args):
        name, value, i = _split_option(args, i)
        if name in ("-h", "--help"):
            cli.help = True
            continue
        if not name.startswith("--") or len(name) < 3:
            raise ValueError(f"unexpected argument {args[i - 1]!r}; options look like --steps 100 "
                             "or --section.key=value")
        if name == "--resume":
            cli.resume = True if value is None else parse_value(value, bool, "resume")
            continue
        if name == "--debug":
            cli.debug = True if value is None else parse_value(value, bool, "debug")
            continue
        if name in FLAGS:
            cli.overrides.append((FLAGS[name], "true" if value is None else value))
            continue
        if value is None:
            if i >= len(args):
                raise ValueError(f"{name} needs a value")
            value, i = args[i], i + 1
        if name == "--preset":
            cli.preset = value
        elif name in SHORTCUTS:
            cli.overrides.append((SHORTCUTS[name], value))
        elif "." in name:
            cli.overrides.append((name[2:], value))
        else:
            options = ["--preset", "--resume", "--debug", *SHORTCUTS, *FLAGS]
            close = difflib.get_close_matches(name, options, n=1)
            hint = f"; did you mean {close[0]}?" if close else "; see --help"
            raise ValueError(f"unknown option {name}{hint}")
    return cli
