"""XMC-GAN's loss set, wired to D's outputs, plus the label-guided SupCon extension.

Conventions (docs/design.md, "Losses" and "Label-guided extension"):

* ``C(A, B)`` is XMC-GAN's contrastive loss: L2-normalised rows, logits ``A B^T / 0.1``, cross-entropy
  with the diagonal as targets in the row **and** the column direction, **summed** (each direction
  averaged over the batch). :func:`fastxmc.losses.info_nce` averages the directions, so
  ``C = 2 * info_nce(A, B, 0.1)``. With labels, every pair of equal labels is a positive.
* D (learns its contrastive heads from real images only):
  ``L_D = hinge_D + w_s C(p_real, e) + w_w W(regions_real, words)``.
* G: ``L_G = -mean D(fake) + w_s C(p_fake, e) + w_w W(regions_fake, words) + w_i C(p_fake, p_real)
  + w_c C(f(real), f(fake))``, with ``p`` D's global features, ``e`` D's sentence projection,
  ``W`` :func:`fastxmc.losses.region_word_loss` against the raw word embeddings and ``f`` a frozen
  ImageNet classifier (only when a weights file is given).
* Ours, off by default: ``+ w_dual C(E_img(fake), E_txt(caption))`` (``loss.dual_weight``), AttnGAN's
  DAMSM sentence term: a frozen dual encoder ``E`` from ``python -m fastxmc.pretrain`` on the same
  data scores G's fakes against their captions. Pretrained over large batches, ``E`` tells apart what
  D's small-batch contrastive heads never have to (on the shapes data: the shape).
* Ours, off by default: ``+ w_cf CF(E_img(fake), obj)`` (``loss.counterfactual_weight``, shapes
  dataset): each fake against its object's one-wording description and the same description with one
  named attribute changed, in the same frozen encoder (:mod:`fastxmc.train.counterfactual`).
* Ours, off by default: ``loss.text_negatives=K`` adds K captions of other images of the split to
  the image->text direction of both sentence terms (:mod:`fastxmc.train.negatives`), so that D's
  sentence head must read what tells an image's caption from the whole split's, not only from the
  batch's 16 (on the shapes data: the shape; measured at 2500 steps, D still did not learn it).
* Ours, off by default: ``loss.class_weight=W`` adds AC-GAN's label head: ``W CE(D_cls(real), y)``
  to D's loss and ``W CE(D_cls(fake), y)`` (mean over branches) to G's, ``y`` the image's primary
  label; rows without a label are left out (:func:`class_loss`). ``loss.g_class_weight`` sets
  G's weight alone (0: G's term is not computed). ``loss.class_target`` (shapes data) swaps the
  label for attributes of the primary object, one cross-entropy each
  (:mod:`fastxmc.train.class_targets`; a fake's position only where its caption names one).
* Label-guided extension (``loss.supcon``): every sample carries two captions (branches a and b); G
  runs on both with the same z. Labels of -1 (none) become one unique id per sample, shared by its two
  branches, so such a sample's only positives are its own pairs. Then

  - the sentence terms become label-guided: D's ``C_lab(p_real, e_a)`` and G's
    ``C_lab([p_fa; p_fb], [e_a; e_b])`` over both branches (inter-modal positives = equal labels);
  - D: ``+ w_text * SupCon([e_a; e_b])`` (its sentence projection clusters by label);
  - G: the word, image and classifier terms are the mean of the two branches, and
    ``+ w_image_supcon * SupCon([p_fa; p_fb])``. SupCon terms use ``loss.supcon_temperature``
    (0.5, the NT-Xent temperature of Ye et al. 2021; weights 0.2 as in their GAN phase).

Every term is returned unweighted in a dict (for logging); a term whose weight is 0 is not computed.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastxmc.losses import info_nce, region_word_loss, supcon
from fastxmc.train.class_targets import attribute_blocks

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# "dual": the image tower of a dual encoder pretrained by ``python -m fastxmc.pretrain`` on the same
# data, the image-text representation of the two-phase recipe (docs/design.md, "Label-guided extension"); for data where
# no ImageNet weights can be had, or where an ImageNet classifier's features say little (shapes).
CLASSIFIER_ARCHS = ("resnet50", "vgg19", "dual")
# D's terms that need no fakes (XMCLossSet.real_image_terms), in their logging order.
REAL_IMAGE_TERMS = ("d_sentence", "d_word", "d_class")


class Text(NamedTuple):
    """One caption per sample: sentence (B, E), words (B, T, E), word_mask (B, T) bool."""
    sentence: torch.Tensor
    words: torch.Tensor
    word_mask: torch.Tensor


class DOut(NamedTuple):
    """D's outputs for one chunk of the batch, in fp32 (see ``fastxmc.models.DiscriminatorOutput``)."""
    logits: torch.Tensor      # (B,)
    features: torch.Tensor    # (B, F) global feature p
    regions: torch.Tensor     # (B, R, E) region features
    sentence: torch.Tensor    # (B, F) sentence projection e
    classes: torch.Tensor | None = None  # (B, C) auxiliary class logits (loss.class_weight)


class Views(NamedTuple):
    """What the losses see of one step: D on the real images and on each caption branch's fakes.

    ``texts[k]`` is the caption of branch k (``texts[0]`` also belongs to the real images);
    ``labels`` (B,) are the label-guided ids (None without ``loss.supcon``)."""
    real: DOut
    fakes: list
    texts: list
    labels: torch.Tensor | None
    real_images: torch.Tensor | None = None  # D's real input, requires_grad for the R1 term
    # loss.text_negatives: D's sentence projection (K, F) of captions of other images, and their
    # label ids (K,) (see fastxmc.train.negatives); extra negatives of the sentence terms
    negatives: torch.Tensor | None = None
    negative_labels: torch.Tensor | None = None
    # loss.class_weight: the class head's targets of the real images, (B,) labels or (B, A)
    # attributes (fastxmc.train.class_targets), -1 where there is none; and of each branch's fakes
    # (None: the same as the real images')
    class_labels: torch.Tensor | None = None
    fake_class_labels: list | None = None


def chunk_output(out, chunks: int) -> list:
    """Split D's output (a NamedTuple with fields logits, features, regions, sentence and
    optionally classes, all batch-first) into ``chunks`` equal batch chunks, cast to fp32."""
    fields = [out.logits, out.features, out.regions, out.sentence]
    classes = getattr(out, "classes", None)
    if classes is not None:
        fields.append(classes)
    parts = [f.float().chunk(chunks) for f in fields]
    return [DOut(*chunk) for chunk in zip(*parts)]


def class_loss(logits: torch.Tensor, labels: torch.Tensor, sizes: tuple | None = None) -> torch.Tensor:
    """Cross-entropy of class ``logits`` (B, C) against ``labels`` (B,), over the rows with a label
    (>= 0); 0 (with a gradient path) when no row has one. With ``sizes`` (block widths summing to
    C) and ``labels`` (B, len(sizes)): the sum of each block's cross-entropy against its column."""
    if sizes is not None:
        if labels.dim() != 2 or labels.shape[1] != len(sizes) or logits.shape[-1] != sum(sizes):
            raise ValueError(f"class_loss: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
                             f"do not match the blocks {tuple(sizes)}")
        blocks = logits.split(list(sizes), dim=-1)
        return sum(class_loss(block, labels[:, k]) for k, block in enumerate(blocks))
    has = labels >= 0
    if not bool(has.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[has], labels[has])


def contrastive_loss(a, b, temperature: float = 0.1, *, labels=None, group=None):
    """XMC-GAN's C(A, B): the row and column cross-entropies **summed** (= 2 x ``info_nce``)."""
    return 2.0 * info_nce(a, b, temperature, labels=labels, group=group)


def hinge_d(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))``."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ||d D(x) / d x||^2 on real images (Mescheder et al. 2018), with the
    graph kept so the penalty itself is differentiated into D's parameters."""
    if not real_images.requires_grad:
        raise ValueError("real_images must require grad (set it before D's forward) for the R1 term")
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    grad = grad.to(torch.promote_types(grad.dtype, torch.float32))  # bf16 under autocast -> fp32
    return grad.pow(2).flatten(1).sum(1).mean()


def hinge_g(fake_logits: torch.Tensor) -> torch.Tensor:
    """``-mean(D(fake))``."""
    return -fake_logits.mean()


def pair_labels(labels: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Labels for the label-guided terms: -1 (no label) becomes a unique negative id per sample.

    ``offset`` (this rank's first global row) keeps the ids unique across ranks under
    ``group=``. Real labels are >= 0, so the new ids never collide with them."""
    if labels.dtype != torch.int64 or labels.dim() != 1:
        raise TypeError(f"labels must be a 1-D int64 tensor, got {labels.dtype} {tuple(labels.shape)}")
    own = -(1 + offset + torch.arange(labels.shape[0], device=labels.device))
    return torch.where(labels < 0, own, labels)


class FrozenClassifier(nn.Module):
    """A frozen image network ``f`` for the image loss ``C(f(real), f(fake))``.

    ``resnet50`` / ``vgg19``: a torchvision state_dict; its 1000-way logits, images in [0, 1]
    resized to 224 and ImageNet-normalised (the reference code). ``dual``: a dual encoder written by
    ``python -m fastxmc.pretrain`` (its ``dual_encoder.pt`` or the run directory); its image tower's
    global feature, images resized to the resolution it was trained at."""

    def __init__(self, arch: str, weights_path: str):
        super().__init__()
        self.dual = arch == "dual"
        if self.dual:   # the tower maps [0, 1] itself: no normalisation
            self.net, self.size = _load_dual_tower(weights_path)
        else:
            self.net, self.size = _load_classifier(arch, weights_path), 224
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.net.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        # Always in eval mode: its BN statistics are part of the frozen model.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.dual:
            return self.net(x).global_feature.float()
        return self.net((x - self.mean) / self.std).float()


class FrozenDualEncoder(nn.Module):
    """A dual encoder written by ``python -m fastxmc.pretrain`` (its ``dual_encoder.pt`` or the run
    directory), frozen and always in eval mode: :meth:`encode_image` (images resized to the
    resolution it was trained at) and :meth:`encode_sentence`, both fp32. Gradients flow to the
    images only (the DAMSM-style and counterfactual terms)."""

    def __init__(self, path: str, option: str = "loss.dual_encoder"):
        super().__init__()
        self.model = _load_dual(path, option)
        self.model.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, E) fp32 global image features of images (B, 3, H, W) in [0, 1] at any resolution."""
        return self.model.encode_image(self.model.at_resolution(images, antialias=False)).global_feature.float()

    def encode_sentence(self, sentence, words, word_mask) -> torch.Tensor:
        """(B, E) fp32 sentence features of cached frozen token embeddings (the data's)."""
        return self.model.encode_text(sentence, words, word_mask).sentence.float()


def jittered(images: torch.Tensor, max_shift: int, noise: float) -> torch.Tensor:
    """``images`` (B, 3, H, W) each shifted by its own random whole-pixel offset in
    [-max_shift, max_shift]^2 (edges repeated) plus Gaussian noise of std ``noise``: a view for a
    frozen encoder that G cannot satisfy with a fixed pixel pattern (``loss.dual_views``). Draws
    from the global RNG, which checkpoints carry. Differentiable in ``images``."""
    b, _, h, w = images.shape
    shift = torch.randint(-max_shift, max_shift + 1, (b, 2), device=images.device).to(images.dtype)
    theta = torch.zeros(b, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2], theta[:, 1, 2] = 2.0 * shift[:, 0] / w, 2.0 * shift[:, 1] / h
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    moved = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return moved + noise * torch.randn_like(moved)


def _load_classifier(arch: str, weights_path: str) -> nn.Module:
    import torchvision

    if arch not in CLASSIFIER_ARCHS:
        raise ValueError(f"loss.image_classifier must be one of {CLASSIFIER_ARCHS}, got {arch!r}")
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"loss.image_classifier_weights: no file at {path}. Pass a torchvision {arch} "
            "state_dict saved with torch.save (e.g. the official resnet50-0676ba61.pth); weights "
            "cannot be downloaded at run time")
    net = getattr(torchvision.models, arch)(weights=None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path} is not a torchvision {arch} state_dict: {err}") from None
    return net


def _load_dual_tower(weights_path: str) -> tuple:
    """(image tower, its resolution) of a dual encoder file or pretrain run directory."""
    dual = _load_dual(weights_path, "loss.image_classifier_weights")
    return dual.image_encoder, dual.config.resolution


def _load_dual(weights_path: str, option: str):
    """The DualEncoder of a dual encoder file or pretrain run directory; errors name ``option``."""
    from fastxmc.models.dual_encoder import DUAL_ENCODER_FILE, DualEncoder

    path = Path(weights_path).expanduser()
    if path.is_dir():
        path = path / DUAL_ENCODER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{option}: no dual encoder at {path}. Pass the {DUAL_ENCODER_FILE} "
            "(or the run directory) written by `python -m fastxmc.pretrain` on the same data")
    return DualEncoder.load(path)


class XMCLossSet:
    """The weighted XMC-GAN terms of D and G for one step (see the module docstring).

    Args:
        cfg: the ``loss`` section of the train config (weights, temperatures, supcon options).
        group: a process group for global negatives in the InfoNCE/SupCon terms (None: local).
        classifier: a :class:`FrozenClassifier` for the classifier image term, or None.
        dual: a :class:`FrozenDualEncoder` for the DAMSM-style term (``loss.dual_weight``) and the
            counterfactual term, or None.
        counterfactual: a :class:`~fastxmc.train.counterfactual.CounterfactualTerm` in ``dual``'s
            space (``loss.counterfactual_weight``), or None.
        autocast: context-manager factory the classifier runs under (bf16 autocast on GPUs).
    """

    def __init__(self, cfg, *, group=None, classifier: nn.Module | None = None,
                 dual: nn.Module | None = None, counterfactual=None, autocast=contextlib.nullcontext):
        self.cfg, self.group, self.classifier, self.autocast = cfg, group, classifier, autocast
        self.dual, self.counterfactual = dual, counterfactual
        if counterfactual is not None and dual is None:
            raise ValueError("the counterfactual term needs the dual encoder it was built with (dual=)")
        self.weights = {"d_hinge": 1.0, "d_sentence": cfg.sentence_weight,
                        "d_word": cfg.word_weight, "g_adv": 1.0, "g_sentence": cfg.sentence_weight,
                        "g_word": cfg.word_weight, "g_image": cfg.image_weight}
        if cfg.r1_gamma:
            self.weights["d_r1"] = cfg.r1_gamma / 2.0
        # the class head's logit blocks with attribute targets; None: one block (labels)
        self.class_sizes = attribute_blocks(cfg.class_target) if cfg.class_weight else None
        if cfg.class_weight:
            self.weights["d_class"] = cfg.class_weight
            g_weight = cfg.class_weight if cfg.g_class_weight is None else cfg.g_class_weight
            if g_weight:
                self.weights["g_class"] = g_weight
        if classifier is not None:
            self.weights["g_classifier"] = cfg.classifier_weight
        if dual is not None:
            self.weights["g_dual"] = cfg.dual_weight
        if counterfactual is not None:
            self.weights["g_counterfactual"] = cfg.counterfactual_weight
        if cfg.supcon:
            self.weights["d_supcon_text"] = cfg.supcon_text_weight
            self.weights["g_supcon_image"] = cfg.supcon_image_weight

    def active(self, name: str) -> bool:
        return self.weights.get(name, 0.0) != 0.0

    def total(self, terms: dict) -> torch.Tensor:
        """Weighted sum of the terms: the loss that is backpropagated."""
        return sum(self.weights[name] * value for name, value in terms.items())

    # ------------------------------------------------------------------ D
    def discriminator_terms(self, v: Views) -> dict:
        fake_logits = torch.cat([f.logits for f in v.fakes])
        terms = {"d_hinge": hinge_d(v.real.logits, fake_logits), **self.real_image_terms(v)}
        if self.active("d_supcon_text"):
            sentences = torch.cat([v.real.sentence] + [f.sentence for f in v.fakes[1:]])
            terms["d_supcon_text"] = self._supcon(sentences, v.labels, len(v.fakes))
        if self.active("d_r1"):
            terms["d_r1"] = r1_penalty(v.real.logits, v.real_images)
        return terms

    def real_image_terms(self, v: Views, names=REAL_IMAGE_TERMS) -> dict:
        """D's terms that read real images and their captions only (sentence, word, class), those
        of ``names`` that are active: its whole loss in the supervised warm-up
        (``optim.d_warmup_steps``), where ``v.fakes`` is empty."""
        terms = {}
        if "d_sentence" in names and self.active("d_sentence"):
            terms["d_sentence"] = self._sentence(v.real.features, v.real.sentence, v.labels, v)
        if "d_word" in names and self.active("d_word"):
            terms["d_word"] = self._word(v.real.regions, v.texts[0])
        if "d_class" in names and self.active("d_class"):
            terms["d_class"] = class_loss(v.real.classes, self._class_labels(v), self.class_sizes)
        return terms

    # ------------------------------------------------------------------ G
    def generator_terms(self, v: Views, real_images=None, fake_images=None, samples=None) -> dict:
        """``real_images`` (B, 3, H, W) and ``fake_images`` (a list, one per branch) are needed
        only by the classifier, dual and counterfactual terms; ``samples``, the batch's ``(index,
        [caption index of each branch])``, only by the counterfactual term."""
        branches = len(v.fakes)
        terms = {"g_adv": hinge_g(torch.cat([f.logits for f in v.fakes]))}
        if self.active("g_sentence"):
            terms["g_sentence"] = self._sentence(torch.cat([f.features for f in v.fakes]),
                                                 torch.cat([f.sentence for f in v.fakes]),
                                                 None if v.labels is None else v.labels.repeat(branches),
                                                 v)
        if self.active("g_word"):
            terms["g_word"] = _mean([self._word(f.regions, t) for f, t in zip(v.fakes, v.texts)])
        if self.active("g_image"):
            terms["g_image"] = _mean([self._c(f.features, v.real.features) for f in v.fakes])
        if self.active("g_classifier"):
            with self.autocast():
                real_logits = self.classifier(real_images)
                fake_logits = [self.classifier(img) for img in fake_images]
            terms["g_classifier"] = _mean([self._c(real_logits, f) for f in fake_logits])
        if self.active("g_dual") or self.active("g_counterfactual"):
            with self.autocast():   # [view][branch] (B, E)
                dual_images = [[self.dual.encode_image(img) for img in views]
                               for views in self._dual_views(fake_images)]
        if self.active("g_dual"):
            with self.autocast():
                sentences = torch.cat([self.dual.encode_sentence(*t) for t in v.texts])
            labels = None if v.labels is None else v.labels.repeat(branches)
            terms["g_dual"] = _mean([self._c(torch.cat(view), sentences, labels) for view in dual_images])
        if self.active("g_counterfactual"):
            if samples is None:
                raise ValueError("the counterfactual term needs the batch's samples: (index, [caption "
                                 "index per branch])")
            index, captions = samples
            terms["g_counterfactual"] = _mean([self.counterfactual(f, index, c) for view in dual_images
                                               for f, c in zip(view, captions)])
        if self.active("g_supcon_image"):
            terms["g_supcon_image"] = self._supcon(torch.cat([f.features for f in v.fakes]),
                                                   v.labels, branches)
        if self.active("g_class"):
            labels = v.fake_class_labels or [self._class_labels(v)] * len(v.fakes)
            terms["g_class"] = _mean([class_loss(f.classes, y, self.class_sizes)
                                      for f, y in zip(v.fakes, labels)])
        return terms

    # ------------------------------------------------------------------ helpers
    def _dual_views(self, fake_images: list) -> list:
        """What the frozen dual encoder scores: the fakes themselves, or ``loss.dual_views``
        jittered copies of them (each a list over branches)."""
        c = self.cfg
        if not c.dual_views:
            return [fake_images]
        return [[jittered(img, c.dual_shift, c.dual_noise) for img in fake_images]
                for _ in range(c.dual_views)]

    def _c(self, a, b, labels=None):
        return contrastive_loss(a, b, self.cfg.temperature, labels=labels, group=self.group)

    def _sentence(self, features, sentences, labels, v: Views):
        """The sentence term ``C(features, sentences)``; with ``v.negatives`` (loss.text_negatives)
        its image->text direction also ranks them (the text->image direction is unchanged)."""
        if v.negatives is None:
            return self._c(features, sentences, labels)
        t, group = self.cfg.temperature, self.group
        candidates = torch.cat([sentences, v.negatives.to(sentences.dtype)])
        if labels is None:
            targets = torch.arange(features.shape[0], device=features.device)
            rows = info_nce(features, candidates, t, targets=targets, symmetric=False, group=group)
            cols = info_nce(sentences, features, t, symmetric=False, group=group)
        else:
            rows = info_nce(features, candidates, t, labels=labels,
                            labels_b=torch.cat([labels, v.negative_labels]), symmetric=False,
                            group=group)
            cols = info_nce(sentences, features, t, labels=labels, symmetric=False, group=group)
        return rows + cols   # summed directions, as C

    @staticmethod
    def _class_labels(v: Views) -> torch.Tensor:
        if v.class_labels is None or v.real.classes is None:
            raise ValueError("loss.class_weight needs D's class logits (Discriminator(num_classes=)) "
                             "and the batch's labels (Views.class_labels)")
        return v.class_labels

    def _word(self, regions, text: Text):
        c = self.cfg
        return region_word_loss(regions, text.words.to(regions.dtype), text.word_mask,
                                gamma1=c.word_gamma1, gamma2=c.word_gamma2, gamma3=c.word_gamma3)

    def _supcon(self, features, labels, branches: int):
        return supcon(features, labels.repeat(branches), self.cfg.supcon_temperature,
                      group=self.group)


def _mean(values: list) -> torch.Tensor:
    return values[0] if len(values) == 1 else torch.stack(values).mean()
