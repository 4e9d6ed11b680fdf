"""The evaluation procedure of ``python -m fastxmc.eval --run DIR``.

G_ema of the run's latest checkpoint draws ``num_samples`` images for the captions of the validation
split (its loader with the run's data config, not shuffled, one caption per image; epochs repeat
when ``num_samples`` exceeds the split, each with new caption draws) from noise seeded by ``seed``.
Written to ``DIR/eval/metrics.json`` and ``DIR/eval/report.md``:

- ``fid_dual`` / ``kid_dual``: in the space of the dual encoder's pooled image feature
  (``ImageEncoding.pooled``), against the real validation images (all, or the first ``num_real``);
- ``fid_inception`` / ``kid_inception`` / ``inception_score``: with a local InceptionV3 weights file;
- ``r_precision``: each generated image's global dual feature ranked against its caption and 99
  mismatched captions of other source images (AttnGAN / DM-GAN), mean and std over 10 folds;
- ``prdc_dual`` / ``prdc_inception``: precision and recall (k = 3), density and coverage (k = 5)
  (:func:`fastxmc.eval.diversity.prdc`) of the generated images' features against the real
  images' (the rows kept for KID: the first ``num_samples`` of each set), with ``real_halves``,
  the same metrics of the even against the odd real rows: what two real samples score at that size.
  Present when both sets have more rows than the larger k;
- ``spread`` (``spread_captions`` > 0): for ``spread_captions`` validation captions (the first
  caption of images drawn at random, seeded), ``z_spread``, the mean per-caption spread of G_ema's
  samples across ``spread_z`` noise vectors, and ``real_spread``, the same statistic over real
  images of one label (or of one caption, on data without labels), in pixels and in every
  extractor's feature space, with their ratio (:mod:`fastxmc.eval.diversity`);
- ``attributes`` (shapes only): :class:`~fastxmc.eval.attributes.AttributeAccuracy` on the samples
  of single-object validation records, beside the classifier's real-val accuracy and chance;
- ``d_probe`` (shapes only, ``probe_samples`` > 0): :mod:`fastxmc.eval.probe`, whether the run's D
  prefers true descriptions over ones with one attribute changed, on real images and on samples;
  with a dual encoder, the same probe of its score under ``d_probe["dual"]``.

Real-image statistics are cached under ``<cache>/eval/`` keyed by the data config, the extractor
file's sha256 and the evaluation settings. Everything is deterministic for a given seed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm.auto import tqdm

from fastxmc.atomic import atomic_torch_save, atomic_write_text, state_digest
from fastxmc.data.folder import DamagedCacheError, warn_rebuilding
from fastxmc.data.loader import build_loader, load_image
from fastxmc.data.shapes import named_attributes, read_attributes
from fastxmc.eval.attributes import AttributeAccuracy, ensure_attribute_classifier, is_single_object
from fastxmc.eval.diversity import (K_DENSITY, K_PRECISION, SpreadMeter, prdc, real_spread_groups,
                                    z_spread)
from fastxmc.eval.inception import load_inception
from fastxmc.eval.metrics import (FeatureStats, fid_from_stats, inception_score,
                                  kernel_inception_distance, r_precision)
from fastxmc.eval.probe import PROBE_ATTRIBUTES, probe_discriminator
from fastxmc.models.dual_encoder import DUAL_ENCODER_FILE, DualEncoder
from fastxmc.train.checkpoint import load_run

EVAL_DIR = "eval"
STATS_FORMAT = "fastxmc-eval-real-stats-v1"


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate and how (the command line's options)."""
    run_dir: str
    dual: str | None = None          # a pretrain run dir or its dual_encoder.pt
    inception: str | None = None     # a local InceptionV3 weights file
    num_samples: int = 2048
    num_real: int = 0                # real validation images for the statistics (0: all of them)
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    checkpoint: str | None = None    # default: the run's latest
    num_mismatched: int = 99
    folds: int = 10
    kid_subsets: int = 100
    kid_subset_size: int = 1000      # capped at the smaller sample count
    probe_samples: int = 256         # shapes: images of the D probe (0: no probe)
    k_precision: int = K_PRECISION   # k of precision / recall
    k_density: int = K_DENSITY       # k of density / coverage
    spread_captions: int = 32        # captions of the per-caption spread (0: no spread)
    spread_z: int = 16               # noise vectors per caption (and real images per group)
    progress: bool = True

    def __post_init__(self):
        for name in ("num_samples", "batch_size", "num_mismatched", "folds", "kid_subsets",
                     "k_precision", "k_density"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.kid_subset_size < 2 or self.num_samples < 2:
            raise ValueError(f"num_samples and kid_subset_size must be >= 2, got {self.num_samples} "
                             f"and {self.kid_subset_size}")
        if isinstance(self.num_real, bool) or not isinstance(self.num_real, int) or self.num_real < 0 \
                or self.num_real == 1:
            raise ValueError(f"num_real must be 0 (all) or an int >= 2, got {self.num_real!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if isinstance(self.probe_samples, bool) or not isinstance(self.probe_samples, int) \
                or self.probe_samples < 0:
            raise ValueError(f"probe_samples must be an int >= 0 (0: no probe), got "
                             f"{self.probe_samples!r}")
        if isinstance(self.spread_captions, bool) or not isinstance(self.spread_captions, int) \
                or self.spread_captions < 0:
            raise ValueError(f"spread_captions must be an int >= 0 (0: no spread), got "
                             f"{self.spread_captions!r}")
        if isinstance(self.spread_z, bool) or not isinstance(self.spread_z, int) or self.spread_z < 2:
            raise ValueError(f"spread_z must be an int >= 2, got {self.spread_z!r}")


# ---------------------------------------------------------------- extractors
def pretrain_hint(data_cfg) -> str:
    if data_cfg.dataset == "shapes":
        return "python -m fastxmc.pretrain --out runs/dual"
    return f"python -m fastxmc.pretrain --dataset {data_cfg.dataset} --data {data_cfg.path} --out runs/dual"


def resolve_dual_path(dual, data_cfg) -> Path:
    """The dual_encoder.pt of ``dual`` (a pretrain run dir or the file); clear errors otherwise."""
    if dual is None:
        raise FileNotFoundError(
            f"no dual encoder given: R-precision and fid_dual need one (and FID needs it unless "
            f"--inception PATH is given). Pretrain one with `{pretrain_hint(data_cfg)}`, then pass "
            f"--dual runs/dual")
    path = Path(dual)
    if path.is_dir():
        path = path / DUAL_ENCODER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"--dual {dual}: no {DUAL_ENCODER_FILE} in that directory; "
                                    f"pretrain one with `{pretrain_hint(data_cfg)}`")
    elif not path.is_file():
        raise FileNotFoundError(f"--dual {dual}: no such file or directory; pretrain a dual encoder "
                                f"with `{pretrain_hint(data_cfg)}`")
    return path


def file_digest(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Extractors:
    """The feature extractors of one evaluation (either may be None, not both)."""
    dual: DualEncoder | None
    inception: object | None
    dual_path: Path | None
    inception_path: Path | None

    def names(self) -> list:
        return [n for n, m in (("dual", self.dual), ("inception", self.inception)) if m is not None]

    def fingerprint(self) -> dict:
        return {name: file_digest(getattr(self, f"{name}_path")) for name in self.names()}

    def feature_functions(self) -> dict:
        """{name: images (B, 3, H, W) in [0, 1] -> (B, D) float features}: the FID feature of
        each extractor (the dual encoder's pooled feature, Inception's pool3)."""
        fns = {}
        if self.dual is not None:
            fns["dual"] = lambda images: dual_features(self.dual, images)
        if self.inception is not None:
            fns["inception"] = lambda images: self.inception(images).features
        return fns


def dual_features(dual: DualEncoder, images: torch.Tensor) -> torch.Tensor:
    """(B, C) float: the dual encoder's pooled image feature, the ``fid_dual`` space."""
    return dual.encode_image(dual.at_resolution(images)).pooled.float()


def load_extractors(opts: EvalOptions, data_cfg, text_dim: int) -> Extractors:
    if opts.inception is not None:
        inception_path = Path(opts.inception)
        inception = load_inception(inception_path, device=opts.device)
    else:
        inception_path = inception = None
    dual = dual_path = None
    if opts.dual is not None or inception is None:
        dual_path = resolve_dual_path(opts.dual, data_cfg)
        dual = DualEncoder.load(dual_path, map_location=opts.device).requires_grad_(False)
        if dual.config.text_dim != text_dim:
            raise ValueError(f"--dual {dual_path} was pretrained on {dual.config.text_dim}-d text "
                             f"embeddings, the run's text encoder gives {text_dim}-d ones")
    return Extractors(dual, inception, dual_path, inception_path)


# ---------------------------------------------------------------- feature accumulation
class ImageFeatures:
    """Streaming statistics of one image set for every extractor (+ Inception probabilities)."""

    def __init__(self, extractors: Extractors, keep: int):
        self.extractors = extractors
        self.stats = {name: FeatureStats(keep=keep) for name in extractors.names()}
        self.probabilities = []

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> None:
        ex = self.extractors
        if ex.dual is not None:
            self.stats["dual"].update(dual_features(ex.dual, images).cpu())
        if ex.inception is not None:
            out = ex.inception(images)
            self.stats["inception"].update(out.features.cpu())
            self.probabilities.append(out.logits.softmax(-1).double().cpu())


def real_stats_path(data_cfg, extractors: Extractors, keep: int, num_real: int) -> Path:
    key = json.dumps({"format": STATS_FORMAT, "data": data_cfg.to_dict(), "keep": keep,
                      "num_real": num_real,
                      "extractors": extractors.fingerprint()}, sort_keys=True)
    name = hashlib.sha256(key.encode()).hexdigest()[:24]
    return data_cfg.resolved_cache_dir() / EVAL_DIR / f"real-{name}.pt"


def real_stats(loader, extractors: Extractors, keep: int, num_real: int, device, progress: bool) -> dict:
    """{extractor name: FeatureStats} of the first ``num_real`` real validation images (0: all of
    them), cached."""
    path = real_stats_path(loader.cfg, extractors, keep, num_real)
    cached = _load_real_stats(path)
    if cached is not None:
        return cached
    features = ImageFeatures(extractors, keep)
    total = min(num_real, loader.num_samples) if num_real else loader.num_samples  # each image once
    batches = caption_batches(loader, total)
    for batch in tqdm(batches, desc="real images", total=math.ceil(total / loader.batch_size),
                      disable=not progress):
        features.update(batch["image"].to(device))
    payload = {"format": STATS_FORMAT, "stats": {n: s.state_dict() for n, s in features.stats.items()}}
    payload["digest"] = state_digest(payload)
    atomic_torch_save(payload, path)
    return features.stats


def _load_real_stats(path: Path) -> dict | None:
    """The statistics cached at ``path``; None when there are none yet or they are of another
    format. A file that does not load, or whose content differs from the digest stored with it
    (torch.load does not notice every damaged byte), is reported in one warning line and None is
    returned, so the statistics are computed again and the file replaced."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != STATS_FORMAT:
            return None
        intact = "digest" not in payload or state_digest(payload) == payload["digest"]
        stats = {name: FeatureStats.from_state_dict(s) for name, s in payload["stats"].items()}
    except Exception as err:  # noqa: BLE001 - a truncated file raises anything from the unpickler
        why = "does not load: " + (str(err).strip().splitlines() or [type(err).__name__])[0]
        warn_rebuilding(DamagedCacheError(path, why), "it")
        return None
    if not intact:
        warn_rebuilding(DamagedCacheError(path, "its content differs from the digest stored with it"), "it")
        return None
    return stats


# ---------------------------------------------------------------- generated samples
def val_loader(data_cfg, opts: EvalOptions, device):
    """The validation split in a fixed order, one caption per image, no flips."""
    data = dataclasses.replace(data_cfg, two_captions=False, flip=False)
    return build_loader(data, split="val", batch_size=opts.batch_size, shuffle=False, drop_last=False,
                        seed=opts.seed, device=device, progress=opts.progress)


def caption_batches(loader, n: int):
    """Batches of the loader, over as many epochs as needed, until ``n`` rows (the last one cut)."""
    done = 0
    while done < n:
        for batch in loader:
            take = min(batch["image"].shape[0], n - done)
            yield {k: v[:take] for k, v in batch.items()}
            done += take
            if done >= n:
                return


class AttributeTargets:
    """The attribute records of the shapes validation images, looked up by the loader's index."""

    def __init__(self, loader, cache_dir, progress: bool):
        folder = Path(loader.data.root) / "val"
        by_name = {Path(r["image"]).name: r for r in read_attributes(folder)}
        self.records = [by_name[Path(r.path).name] for r in loader.data.records]
        self.captions = [r.captions for r in loader.data.records]
        self.scored = 0
        self.meter = AttributeAccuracy(ensure_attribute_classifier(loader.data.root, cache_dir=cache_dir,
                                                                   progress=progress))

    def update(self, images: torch.Tensor, index: torch.Tensor, caption: torch.Tensor) -> None:
        """Score the single-object rows; ``caption`` (the loader's caption index per row) tells
        which attributes each row's caption names."""
        index, caption = index.tolist(), caption.tolist()
        records = [self.records[i] for i in index]
        keep = [i for i, r in enumerate(records) if is_single_object(r)]
        if keep:
            named = [named_attributes(self.captions[index[i]][caption[i]]) for i in keep]
            self.meter.update(images[keep].cpu(), [records[i] for i in keep], named)
            self.scored += len(keep)


@torch.no_grad()
def generated_features(run, loader, extractors: Extractors, opts: EvalOptions, attributes) -> tuple:
    """G_ema on ``opts.num_samples`` validation captions: (ImageFeatures, R-precision inputs)."""
    features = ImageFeatures(extractors, keep=opts.num_samples)
    z_gen = torch.Generator().manual_seed(opts.seed)
    image_emb, text_emb, groups = [], [], []
    bar = tqdm(total=opts.num_samples, desc="generated images", unit="img", disable=not opts.progress)
    for batch in caption_batches(loader, opts.num_samples):
        z = torch.randn(batch["image"].shape[0], run.config.model.z_dim, generator=z_gen)
        fakes = run.G_ema(z.to(opts.device), batch["sentence"], batch["words"], batch["word_mask"])
        fakes = fakes.float().clamp(0, 1)
        features.update(fakes)
        if extractors.dual is not None:
            dual = extractors.dual
            image_emb.append(dual.encode_image(dual.at_resolution(fakes))
                             .global_feature.float().cpu())
            text_emb.append(dual.encode_text(batch["sentence"], batch["words"], batch["word_mask"])
                            .sentence.float().cpu())
            groups.append(batch["index"].cpu())
        if attributes is not None:
            attributes.update(fakes, batch["index"].cpu(), batch["caption"].cpu())
        bar.update(fakes.shape[0])
    bar.close()
    return features, (image_emb, text_emb, groups)


# ---------------------------------------------------------------- metrics
def distance_metrics(name: str, fake: FeatureStats, real: FeatureStats, opts: EvalOptions) -> dict:
    subset = min(opts.kid_subset_size, fake.num, real.num)
    kid_mean, kid_std = kernel_inception_distance(fake.kept(), real.kept(), subsets=opts.kid_subsets,
                                                  subset_size=subset, seed=opts.seed)
    return {f"fid_{name}": fid_from_stats(fake, real),
            f"kid_{name}": {"mean": kid_mean, "std": kid_std, "subset_size": subset,
                            "subsets": opts.kid_subsets}}


def manifold_metrics(name: str, fake: FeatureStats, real: FeatureStats, opts: EvalOptions) -> dict:
    """``{"prdc_<name>": ...}``: :func:`~fastxmc.eval.diversity.prdc` of the kept rows, with
    ``real_halves`` (even against odd real rows; left out when a half is too small); empty when a
    set has too few rows for the k."""
    x, y = real.kept(), fake.kept()
    k_max = max(opts.k_precision, opts.k_density)
    if x.shape[0] <= k_max or y.shape[0] <= opts.k_precision:
        return {}
    ks = {"k_pr": opts.k_precision, "k_dc": opts.k_density}
    result = prdc(x, y, **ks)
    if x.shape[0] // 2 > k_max:
        halves = prdc(x[0::2], x[1::2], **ks)
        result["real_halves"] = {key: halves[key] for key in
                                 ("precision", "recall", "density", "coverage", "n_real", "n_fake")}
    return {f"prdc_{name}": result}


def load_real_images(loader, indices) -> torch.Tensor:
    """(len(indices), 3, H, W) float32 in [0, 1] on the loader's device: validation images by
    index, decoded, cropped and resized as the loader does, never flipped."""
    records = loader.data.records
    pixels = np.stack([load_image(records[i].path, records[i].extra.get("crop"), loader.cfg.resolution,
                                  False) for i in indices])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255)
    return images.contiguous().to(loader.device)


@torch.no_grad()
def spread_metric(run, loader, extractors: Extractors, opts: EvalOptions) -> dict:
    """The per-caption spread of G_ema and of real images (see the module docstring and
    :func:`~fastxmc.eval.diversity.real_spread_groups`): ``spread_captions`` * ``spread_z``
    generated images and at most as many real ones."""
    records = loader.data.records
    count = min(opts.spread_captions, len(records))
    picks = torch.randperm(len(records), generator=torch.Generator().manual_seed(opts.seed))[:count]
    picks = picks.tolist()
    sentence, words, mask = loader.encode_captions([records[p].captions[0] for p in picks])
    features = extractors.feature_functions()
    fake = z_spread(run.G_ema, SimpleNamespace(sentence=sentence, words=words, word_mask=mask),
                    opts.spread_z, seed=opts.seed, batch_size=opts.batch_size, features=features)
    grouping, groups = real_spread_groups(loader.primary_labels(), [r.captions for r in records],
                                          picks, opts.spread_z, seed=opts.seed)
    meter = SpreadMeter(features)
    for members in groups:
        if members is not None:
            meter.update(load_real_images(loader, members.tolist()))
    real = meter.compute()
    groups_used = real.pop("groups")
    ratio = {name: (fake[name] / real[name] if real[name] else None) for name in fake}
    return {"grouping": grouping, "n_captions": count, "n_z": opts.spread_z,
            "real_groups": groups_used, "z_spread": fake, "real_spread": real, "ratio": ratio}


def r_precision_metric(inputs: tuple, opts: EvalOptions) -> dict:
    image_emb, text_emb, groups = (torch.cat(part) for part in inputs)
    result = r_precision(image_emb, text_emb, groups=groups, num_mismatched=opts.num_mismatched,
                         folds=min(opts.folds, image_emb.shape[0]), seed=opts.seed)
    return {**result, "num_mismatched": opts.num_mismatched}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    return device


def evaluate(opts: EvalOptions) -> dict:
    """Run the evaluation of ``opts.run_dir``; write ``DIR/eval/metrics.json`` and ``report.md``.
    Returns the metrics dict."""
    opts = dataclasses.replace(opts, device=resolve_device(opts.device))
    run = load_run(opts.run_dir, device=opts.device, checkpoint=opts.checkpoint)
    data_cfg = run.config.data
    extractors = load_extractors(opts, data_cfg, run.text_dim)
    loader = val_loader(data_cfg, opts, opts.device)
    attributes = None
    if data_cfg.dataset == "shapes":
        attributes = AttributeTargets(loader, data_cfg.resolved_cache_dir(), opts.progress)
    real = real_stats(val_loader(data_cfg, opts, opts.device), extractors, opts.num_samples,
                      opts.num_real, opts.device, opts.progress)
    fake, rp_inputs = generated_features(run, loader, extractors, opts, attributes)
    metrics = {"run": str(opts.run_dir), "checkpoint": str(run.path), "step": run.step,
               "num_samples": opts.num_samples, "num_real": next(iter(real.values())).num,
               "seed": opts.seed,
               "extractors": {n: str(getattr(extractors, f"{n}_path")) for n in extractors.names()}}
    for name in extractors.names():
        metrics.update(distance_metrics(name, fake.stats[name], real[name], opts))
        metrics.update(manifold_metrics(name, fake.stats[name], real[name], opts))
    if extractors.inception is not None:
        mean, std = inception_score(torch.cat(fake.probabilities), splits=min(10, opts.num_samples))
        metrics["inception_score"] = {"mean": mean, "std": std, "splits": min(10, opts.num_samples)}
    if extractors.dual is not None:
        metrics["r_precision"] = r_precision_metric(rp_inputs, opts)
    if attributes is not None and attributes.scored:
        metrics["attributes"] = attributes.meter.compute()
    if opts.spread_captions:
        metrics["spread"] = spread_metric(run, loader, extractors, opts)
    if data_cfg.dataset == "shapes" and opts.probe_samples:
        metrics["d_probe"] = discriminator_probe(opts, run, loader, extractors.dual)
    write_outputs(Path(opts.run_dir), metrics)
    return metrics


def discriminator_probe(opts: EvalOptions, run, loader, dual=None) -> dict:
    """:func:`~fastxmc.eval.probe.probe_discriminator` of the evaluated checkpoint (D loaded now),
    and of the dual encoder when there is one."""
    from fastxmc.sample import caption_encoder

    with_d = load_run(opts.run_dir, device=opts.device, checkpoint=run.path, discriminator=True)
    return probe_discriminator(with_d, Path(loader.data.root) / "val", caption_encoder(run.config),
                               n=opts.probe_samples, seed=opts.seed, batch_size=opts.batch_size,
                               dual=dual)


# ---------------------------------------------------------------- outputs
def _number(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def report_lines(metrics: dict) -> list:
    """The markdown report of a metrics dict."""
    lines = [f"# Evaluation of {metrics['run']}", "",
             f"Checkpoint `{metrics['checkpoint']}` (step {metrics['step']}); {metrics['num_samples']} "
             f"generated images vs {metrics['num_real']} real validation images; seed {metrics['seed']}.",
             "", "| metric | value |", "|---|---|"]
    for name in ("dual", "inception"):
        if f"fid_{name}" in metrics:
            kid = metrics[f"kid_{name}"]
            lines.append(f"| fid_{name} | {_number(metrics[f'fid_{name}'])} |")
            lines.append(f"| kid_{name} | {_number(kid['mean'])} ± {_number(kid['std'])} |")
    for name in ("inception_score", "r_precision"):
        if name in metrics:
            lines.append(f"| {name} | {_number(metrics[name]['mean'])} ± {_number(metrics[name]['std'])} |")
    lines += diversity_report_lines(metrics)
    if "attributes" in metrics:
        attrs = metrics["attributes"]
        lines += ["", f"Attribute accuracy on {attrs['n']} single-object captions (\"named\": only the "
                  "captions that name the attribute):", "",
                  "| attribute | generated | generated, named (n) | real val | chance |",
                  "|---|---|---|---|---|"]
        for key, row in attrs.items():
            if key != "n":
                named = (f"{_number(row['named_accuracy'])} ({row['named_n']})"
                         if row.get("named_n") else "n/a")
                lines.append(f"| {key} | {_number(row['accuracy'])} | {named} "
                             f"| {_number(row['real_val_accuracy'])} | {_number(row['chance'])} |")
    if "d_probe" in metrics:
        lines += probe_report_lines(metrics["d_probe"])
    extractors = ", ".join(f"{k}: `{v}`" for k, v in metrics["extractors"].items())
    lines += ["", f"Feature extractors: {extractors}.", ""]
    return lines


def diversity_report_lines(metrics: dict) -> list:
    """The tables of ``prdc_<name>`` and ``spread`` (none when neither was measured)."""
    lines = []
    spaces = [name for name in ("dual", "inception") if f"prdc_{name}" in metrics]
    if spaces:
        first = metrics[f"prdc_{spaces[0]}"]
        lines += ["", f"Precision / recall (k = {first['k_pr']}) and density / coverage (k = "
                  f"{first['k_dc']}) of the generated images' features against the real ones. "
                  "\"real halves\": the same metrics of one half of the real images against the "
                  "other, what a generator of the data distribution would score at that size. "
                  "Samples that ignore z have recall and coverage far below it.", "",
                  "| features | precision | recall | density | coverage |", "|---|---|---|---|---|"]
        for name in spaces:
            row = metrics[f"prdc_{name}"]
            rows = [(f"{name} ({row['n_fake']} vs {row['n_real']})", row)]
            if "real_halves" in row:
                halves = row["real_halves"]
                rows.append((f"{name}, real halves ({halves['n_fake']} vs {halves['n_real']})", halves))
            for label, values in rows:
                cells = " | ".join(_number(values[key])
                                   for key in ("precision", "recall", "density", "coverage"))
                lines.append(f"| {label} | {cells} |")
    if "spread" in metrics:
        spread = metrics["spread"]
        group = ("real images of one label" if spread["grouping"] == "label"
                 else "real images that share the caption")
        lines += ["", f"Per-caption spread (the mean per-element std): z_spread across "
                  f"{spread['n_z']} noise vectors of G_ema's samples of {spread['n_captions']} "
                  f"captions; real_spread across {group} ({spread['real_groups']} groups of at most "
                  f"{spread['n_z']}). A ratio near 0: G ignores z.", "",
                  "| space | z_spread | real_spread | ratio |", "|---|---|---|---|"]
        for name, value in spread["z_spread"].items():
            lines.append(f"| {name} | {_number(value)} | {_number(spread['real_spread'][name])} "
                         f"| {_number(spread['ratio'][name])} |")
    return lines


def probe_report_lines(probe: dict) -> list:
    """The D probe's table: accuracy (mean score gap) per attribute, real images and samples."""
    lines = ["", f"D probe on {probe['n']} single-object images: how often D scores the image's "
             "description above the same description with one attribute changed (0.5: blind to "
             "it); the mean cosine gap in brackets.", "",
             "| attribute | real images | generated |", "|---|---|---|"]
    lines += _probe_rows(probe)
    if "dual" in probe:
        lines += ["", "The same probe of the dual encoder's image-text cosine (the R-precision "
                  "instrument): an attribute it cannot tell on real images is one R-precision cannot "
                  "reward.", "", "| attribute | real images | generated |", "|---|---|---|"]
        lines += _probe_rows(probe["dual"])
    return lines


def _probe_rows(probe: dict) -> list:
    rows = []
    for attribute in PROBE_ATTRIBUTES:
        cells = [f"{probe[side][attribute]['accuracy']:.3f} ({probe[side][attribute]['gap']:+.3f})"
                 for side in ("real", "generated")]
        rows.append(f"| {attribute} | {cells[0]} | {cells[1]} |")
    return rows


def write_outputs(run_dir: Path, metrics: dict) -> Path:
    """``DIR/eval/metrics.json`` and ``DIR/eval/report.md`` (each written atomically)."""
    out = run_dir / EVAL_DIR
    atomic_write_text(json.dumps(metrics, indent=2) + "\n", out / "metrics.json")
    atomic_write_text("\n".join(report_lines(metrics)), out / "report.md")
    return out
