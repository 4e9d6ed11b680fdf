"""The ablation's report: a markdown table with the target's verdict, a sample figure (every variant
on the same captions and noise) and loss curves. See :mod:`fastxmc.experiments.ablation`."""
from __future__ import annotations

import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from fastxmc.atomic import atomic_write, atomic_write_text
from fastxmc.experiments.ablation import (ATTRIBUTES, BASELINE, FIGURE_CAPTIONS, FULL, VARIANTS,
                                          AblationOptions, machine_description, run_dir, train_config)
from fastxmc.train.logging import read_metrics

CURVES = (("d_hinge", "D hinge loss"), ("g_adv", "G adversarial loss -D(G(z))"),
          ("g_sentence", "G sentence contrastive (computed when on)"),
          ("g_word", "G region-word contrastive (computed when on)"))


# ---------------------------------------------------------------- numbers
def attribute_mean(metrics: dict, key: str = "accuracy") -> float | None:
    attrs = metrics.get("attributes")
    if not attrs:
        return None
    return float(np.mean([attrs[a][key] for a in ATTRIBUTES]))


def headline(metrics: dict) -> dict:
    """FID_dual (lower is better), R-precision and mean attribute accuracy (higher is better)."""
    return {"fid_dual": metrics.get("fid_dual"),
            "r_precision": (metrics.get("r_precision") or {}).get("mean"),
            "attribute_accuracy": attribute_mean(metrics)}


def verdicts(results: dict) -> list:
    """(metric, baseline, full, passed) rows of the target: full beats the baseline on each."""
    if BASELINE not in results or FULL not in results:
        return []
    base, full = headline(results[BASELINE]), headline(results[FULL])
    rows = []
    for name, lower_is_better in (("r_precision", False), ("attribute_accuracy", False),
                                  ("fid_dual", True)):
        b, f = base[name], full[name]
        passed = None if b is None or f is None else (f < b if lower_is_better else f > b)
        rows.append((name, b, f, passed))
    return rows


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# ---------------------------------------------------------------- markdown
def settings_lines(opts: AblationOptions, timings: dict) -> list:
    cfg = train_config(opts, FULL)
    d, m, r, o = cfg.data, cfg.model, cfg.run, cfg.optim
    overrides = " ".join(f"--{k}={v}" for k, v in opts.overrides) or "none"
    phases = ", ".join(f"{k} {v / 60:.1f}" for k, v in timings["phases"].items()) or "n/a"
    total = f" ({sum(timings['phases'].values()) / 60:.1f} min in all)" if timings["phases"] else ""
    runs = ", ".join(f"{k} {v / 60:.1f}" for k, v in timings["runs"].items()) or "n/a"
    return [
        f"Preset `{opts.preset}`: {d.dataset} at {d.resolution}px ({d.shapes_train} training images), "
        f"G/D width {m.g_width}/{m.d_width}, z {m.z_dim}, {r.batch_size} images per D step, "
        f"{o.d_steps_per_g_step} D steps per G step, Adam G {o.g_lr:g} / D {o.d_lr:g}, EMA {o.ema_decay}, "
        f"**{r.steps} G steps**, seed {opts.seed}; extra overrides: {overrides}.",
        f"Machine: {machine_description()}; {opts.jobs} runs at once, {opts.threads} torch thread(s) each. "
        f"Wall clock of the phases: {phases} min{total}. Each run: {runs} min (runs overlap within a "
        f"phase; a resumed run counts only what this directory's invocations spent).",
        f"Evaluation: {opts.eval_samples} G_ema samples on validation captions per variant; FID/KID in "
        f"the feature space of the dual encoder pretrained in `{run_dir(opts, 'dual')}` (the same "
        f"data), R-precision over 100 candidates (1 true + 99 mismatched captions), attribute "
        f"accuracy by the cached shapes classifier on single-object captions.",
    ]


def table_lines(opts: AblationOptions, results: dict) -> list:
    lines = ["| variant | what it adds | FID_dual ↓ | KID_dual ↓ | R-precision ↑ | attributes ↑ (mean) | "
             + " | ".join(ATTRIBUTES) + " | position, named |",
             "|---|---|---|---|---|---|" + "---|" * (len(ATTRIBUTES) + 1)]
    for variant in opts.variants:
        m = results[variant]
        rp, kid, attrs = m.get("r_precision") or {}, m.get("kid_dual") or {}, m.get("attributes") or {}
        cells = [variant, VARIANTS[variant][0], _num(m.get("fid_dual"), 2),
                 f"{_num(kid.get('mean'), 4)} ± {_num(kid.get('std'), 4)}",
                 f"{_num(rp.get('mean'))} ± {_num(rp.get('std'))}", _num(attribute_mean(m))]
        cells += [_num(attrs[a]["accuracy"]) if a in attrs else "n/a" for a in ATTRIBUTES]
        cells.append(_num((attrs.get("position") or {}).get("named_accuracy")))
        lines.append("| " + " | ".join(cells) + " |")
    any_metrics = next(iter(results.values()))
    if any_metrics.get("attributes"):
        attrs = any_metrics["attributes"]
        for label, key in (("real validation images", "real_val_accuracy"), ("chance", "chance")):
            cells = [label, "", "", "", "", _num(attribute_mean(any_metrics, key))]
            cells += [_num(attrs[a][key]) for a in ATTRIBUTES] + [""]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "*position, named*: position accuracy on the captions that name a position only "
              "(the others leave it to chance)."]
    return lines


def above_chance_lines(opts: AblationOptions, results: dict, factor: float = 1.25) -> list:
    """Which attributes each variant's samples get clearly right (accuracy > ``factor`` x chance):
    the verdict compares means, this says what the means are made of."""
    lines = []
    for variant in opts.variants:
        attrs = results[variant].get("attributes")
        if not attrs:
            return []
        good = [f"{a} ({attrs[a]['accuracy']:.3f} vs {attrs[a]['chance']:.3f})" for a in ATTRIBUTES
                if attrs[a]["accuracy"] > factor * attrs[a]["chance"]]
        lines.append(f"- `{variant}`: {', '.join(good) if good else 'none'}")
    return [f"Attributes the samples get clearly right (accuracy above {factor} x chance):", "", *lines]


def probe_lines(opts: AblationOptions, results: dict) -> list:
    """The D probe per variant (``fastxmc.eval``'s ``d_probe``): on real images, does D rank an
    image's description above the same description with one attribute changed; on the samples?"""
    if not all(results[v].get("d_probe") for v in opts.variants):
        return []
    lines = ["D probe (how often D scores an image's description above the same description with one "
             "attribute changed; 0.5 = blind to it), real images / G_ema samples:", "",
             "| variant | " + " | ".join(ATTRIBUTES) + " |", "|---|" + "---|" * len(ATTRIBUTES)]
    for variant in opts.variants:
        probe = results[variant]["d_probe"]
        cells = [f"{probe['real'][a]['accuracy']:.2f} / {probe['generated'][a]['accuracy']:.2f}"
                 for a in ATTRIBUTES]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def verdict_lines(results: dict) -> list:
    rows = verdicts(results)
    if not rows:
        return [f"(The target compares `{FULL}` with `{BASELINE}`; run both to check it.)"]
    lines = [f"Target: `{FULL}` beats `{BASELINE}` on R-precision, attribute accuracy and FID_dual.", "",
             f"| metric | {BASELINE} | {FULL} | verdict |", "|---|---|---|---|"]
    for name, b, f, passed in rows:
        verdict = "n/a" if passed is None else ("PASS" if passed else "FAIL")
        lines.append(f"| {name} | {_num(b)} | {_num(f)} | {verdict} |")
    return lines


def write_report(opts: AblationOptions, results: dict, timings: dict) -> Path:
    """Write the markdown report and its two figures next to it; returns the report's path."""
    report = Path(opts.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    samples_png = report.with_name(report.stem + ".png")
    losses_png = report.with_name(report.stem + "_losses.png")
    sample_figure(opts, samples_png)
    loss_figure(opts, losses_png)
    lines = ["# Contrastive-loss ablation on the shapes dataset", "",
             f"Written by `python -m fastxmc.experiments ablation` on {time.strftime('%Y-%m-%d')}.", "",
             *[line for s in settings_lines(opts, timings) for line in (s, "")],
             *table_lines(opts, results), "", *verdict_lines(results), "",
             *above_chance_lines(opts, results), "", *probe_lines(opts, results), "",
             f"## Samples (G_ema after the last step, the same captions and noise for every variant)", "",
             f"![samples]({samples_png.name})", "", "## Loss curves", "", f"![losses]({losses_png.name})", ""]
    atomic_write_text("\n".join(lines), report)
    return report


# ---------------------------------------------------------------- figures
@torch.no_grad()
def variant_samples(opts: AblationOptions, variant: str, captions, z_seed: int) -> torch.Tensor:
    """G_ema images (N, 3, H, W) of ``variant`` for ``captions``, one fixed noise vector each."""
    from fastxmc.sample import encode
    from fastxmc.train.checkpoint import load_run

    run = load_run(run_dir(opts, variant))
    sentence, words, mask = encode(run.config, list(captions))
    z = torch.randn(len(captions), run.config.model.z_dim, generator=torch.Generator().manual_seed(z_seed))
    return run.G_ema(z, sentence, words, mask).clamp(0, 1)


def sample_figure(opts: AblationOptions, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(opts.variants), len(FIGURE_CAPTIONS)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows + 0.8), squeeze=False)
    for r, variant in enumerate(opts.variants):
        images = variant_samples(opts, variant, FIGURE_CAPTIONS, opts.seed)
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(images[c].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title("\n".join(textwrap.wrap(FIGURE_CAPTIONS[c], 18)), fontsize=7)
            if c == 0:
                ax.set_ylabel(variant, fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window:
        return values
    return np.convolve(values, np.ones(window) / window, mode="valid")


def loss_figure(opts: AblationOptions, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.2), squeeze=False)
    for index, variant in enumerate(opts.variants):  # one colour per variant in every panel
        records = read_metrics(run_dir(opts, variant))
        for ax, (key, title) in zip(axes[0], CURVES):
            points = [(r["step"], r[key]) for r in records if key in r]
            if not points:
                continue
            steps, values = map(np.asarray, zip(*points))
            window = max(1, len(values) // 25)
            ax.plot(steps[window - 1:], _smooth(values, window), label=variant, linewidth=1,
                    color=f"C{index}")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("G step", fontsize=8)
    for ax in axes[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _save_figure(fig, path: Path) -> None:
    """``fig`` as a PNG at ``path``, atomically; the format is given, since the temporary name's
    suffix is not ``.png``."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
