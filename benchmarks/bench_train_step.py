"""Benchmark of a full XMC-GAN training step: throughput, time breakdown, fused vs reference ops,
and the data pipeline (DALI vs the torch DataLoader).

    python -m benchmarks.bench_train_step [--configs tiny,shapes,coco128]
        [--providers fused,reference[,fused-bf16,fused-contiguous,fused-channels-last]]
        [--device cpu|cuda] [--steps K] [--warmup W] [--budget S] [--loader-batches N]
        [--coco-batch B] [--coco-width W] [--tolerance 0.05] [--quick]
        [--out benchmarks/results/train_step.csv]

One step is one G step of ``python -m fastxmc.train``, built from :mod:`fastxmc.train.loop`'s own
functions (``fetch``, ``discriminator_step``, ``joint_forward``, ``non_finite_terms``,
``joint_update``): ``optim.d_steps_per_g_step`` batches, the D-only steps, the joint D + G step,
both Adam steps and the EMA. Images/s counts the real images of a step (batch x D steps), as the
training log does.

Configs (``--configs``):

- ``tiny``: the tiny preset (32px, width 8, one thread) on its shapes data.
- ``shapes``: the shapes preset as it is (32px, width 16, batch 16) on its shapes data; also run
  with the non-default data backend (``torch``) to compare the data wait in the training loop.
- ``coco128``: the coco128 preset's tensor shapes (128px, z 128, 768-d text, 17 tokens) on
  synthetic batches (no COCO here; its data wait is ~0 by construction). On CPU the paper's width
  96 is far too heavy for two shared cores: the default is batch 2 and width 32 (``--coco-batch``,
  ``--coco-width``; the note column says so). On CUDA: batch 8, width 96.

Providers: ``fused`` = the default backend of every op (whatever the registries pick here),
``reference`` = ``FASTXMC_IMPL=reference`` for the whole step (the registries read it at each
call), and, when asked for, ``fused`` with one run setting overridden: ``fused-bf16`` with
``run.precision=bf16`` (bf16 autocast also on CPU, where oneDNN runs bf16 convolutions on AMX),
``fused-contiguous`` / ``fused-channels-last`` with ``run.memory_format`` (NCHW or NHWC weights
and activations; ``auto`` is channels_last on CPU, contiguous on CUDA). Their rows are compared
with the ``fused`` run, so their ratio is the effect of the setting alone. All build their
networks from the same seed; the ``backends`` column lists each op's backend and the networks'
layout. The runs of one config (reference, fused and, for shapes, fused with the torch loader)
are warmed up, then timed round robin, one step each per round, so that the load drifts of a
shared machine hit them alike. Timed steps per run: ``--steps``, else as many as fit ``--budget``
seconds, 3 to 20, but never more than fit twice the budget (at least one): pass ``--steps`` for
slow configs.

Breakdown: every step is cut into exclusive phases that add up to the step time: ``data`` (waiting
for the batches), ``g_fwd``, ``d_fwd``, ``loss_fwd`` (the loss terms), ``loss_bwd``, ``d_bwd``,
``g_bwd``, ``optim`` (both Adam steps), ``ema``, ``other`` (z, concatenations, the non-finite
check, zero_grad). Timed from the outside: forward hooks on G and D, wrappers of the loss set, the
optimizers' step hooks, and identity autograd nodes ("markers") whose backward records when the
gradient reaches the loss, D's outputs and D's input. Op rows (``op:<name>:fwd|bwd|total``) are
the summed time of every call of ``word_attention`` and ``modulated_batch_norm`` (inside G) and of
the contrastive losses ``info_nce``, ``region_word_loss`` (and ``supcon``) per step; they overlap
the phases. An op's backward is the time between the gradient reaching its output and its inputs
(the autograd engine runs the most recently created nodes first, so this is its own backward).
On CPU the probes add no synchronisation and the same steps give throughput and breakdown; on
CUDA every probe synchronises, so throughput comes from separate uninstrumented steps.

Data loaders: images/s of ``build_loader`` alone (DALI and torch backends, the config's batch
and workers) on the tiny and shapes datasets.

Verdicts (issue 4): the data pipeline keeps the shapes preset fed (data wait <= 5% of the step time
with the default backend, on this machine's cores), and the fused backends are never slower than
the reference (step median of ``fused`` <= ``reference`` x (1 + ``--tolerance``), the allowance for
a shared, noisy machine; also per op wherever the two providers use different backends).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

import fastxmc.models.generator as generator_module
import fastxmc.models.modulation as modulation_module
import fastxmc.train.losses as losses_module
from benchmarks import common
from benchmarks import sweep as sweeps
from fastxmc.data.loader import build_loader
from fastxmc.models.discriminator import DiscriminatorOutput
from fastxmc.ops.infonce import registry as info_nce_registry
from fastxmc.ops.infonce import request_for as info_nce_request
from fastxmc.ops.modulated_bn import SMALL_CPU_VALUES as SMALL_MBN_VALUES
from fastxmc.ops.modulated_bn import registry as modulated_bn_registry
from fastxmc.ops.modulated_bn import request_for as modulated_bn_request
from fastxmc.ops.region_word import registry as region_word_registry
from fastxmc.ops.region_word import request_for as region_word_request
from fastxmc.ops.word_attention import registry as word_attention_registry
from fastxmc.ops.registry import IMPL_ENV, Request
from fastxmc.train import loop
from fastxmc.train.config import TrainConfig, build_config
from fastxmc.train.distributed import DistEnv

DEFAULT_OUT = Path("benchmarks/results/train_step.csv")
COLUMNS = ["timestamp", "run_id", "commit", "machine", "device", "torch", "python", "threads",
           "loadavg", "section", "config", "provider", "data_backend", "batch", "d_steps",
           "resolution", "g_width", "d_width", "text_dim", "tokens", "metric", "median_ms",
           "p20_ms", "p80_ms", "reps", "share", "images_per_s", "baseline", "baseline_ms",
           "ratio_to_baseline", "backends", "status", "note"]
CONFIGS = ("tiny", "shapes", "coco128")
PROVIDERS = ("fused", "reference", "fused-bf16", "fused-contiguous", "fused-channels-last")
DEFAULT_PROVIDERS = ("fused", "reference")
# Providers that are ``fused`` with run settings overridden (see the docstring); their rows are
# compared with the fused run, so their ratio is the effect of the setting alone.
PROVIDER_RUN_SETTINGS = {"fused-bf16": {"precision": "bf16"},
                         "fused-contiguous": {"memory_format": "contiguous"},
                         "fused-channels-last": {"memory_format": "channels_last"}}
LAYOUT_NAMES = {torch.channels_last: "channels_last", torch.contiguous_format: "contiguous"}
DATA_BACKENDS = ("dali", "torch")
PHASES = ("data", "g_fwd", "d_fwd", "loss_fwd", "loss_bwd", "d_bwd", "g_bwd", "optim", "ema",
          "other")
# The ops whose backends the providers switch, by the name the breakdown rows use.
OP_REGISTRIES = {"word_attention": word_attention_registry,
                 "modulated_batch_norm": modulated_bn_registry,
                 "info_nce": info_nce_registry, "region_word_loss": region_word_registry}
DATA_WAIT_TARGET = 0.05      # share of the step time (issue 4)
REGIONS = 16 * 16            # D's region map, whatever the resolution
COCO_SYNTHETIC_BATCHES = 2   # distinct synthetic batches the coco128 source cycles through


# ---------------------------------------------------------------- timeline of one step
class Timeline:
    """Exclusive phases and op times of the steps being measured.

    ``enter(phase)`` closes the current phase at now and opens ``phase``; ``end_step()`` closes the
    step. On CUDA every timestamp synchronises the device first.
    """

    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"
        self._reset()

    def _reset(self) -> None:
        self.phase, self.since = None, 0.0
        self.phases: dict = defaultdict(float)     # phase -> seconds in this step
        self.ops: dict = defaultdict(float)        # "op:<name>:fwd|bwd" -> seconds in this step
        self._op_started: dict = {}                 # token -> when its backward began

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def enter(self, phase: str) -> None:
        t = self.now()
        if self.phase is not None:
            self.phases[self.phase] += t - self.since
        self.phase, self.since = phase, t

    def end_step(self) -> tuple:
        """(phases, ops) of the step just finished (seconds); resets for the next one."""
        self.enter("other")
        phases, ops = dict(self.phases), dict(self.ops)
        self._reset()
        return phases, ops

    def op_backward_started(self, token) -> None:
        self._op_started[token] = self.now()

    def op_backward_finished(self, name: str, token) -> None:
        start = self._op_started.pop(token, None)
        if start is not None:
            self.ops[f"op:{name}:bwd"] += self.now() - start


# ---------------------------------------------------------------- autograd markers
class _Marker(torch.autograd.Function):
    """Identity on its tensors; its backward calls ``callback()`` once the gradients of all its
    outputs are ready (i.e. when the backward pass reaches this point of the graph)."""

    @staticmethod
    def forward(ctx, callback, *tensors):
        ctx.callback = callback
        ctx.set_materialize_grads(False)
        return tensors

    @staticmethod
    def backward(ctx, *grads):
        ctx.callback()
        return (None, *grads)


def mark(tensors: list, callback: Callable) -> list:
    """``tensors`` with the ones that require grad routed through one marker (others unchanged)."""
    picked = [i for i, t in enumerate(tensors)
              if isinstance(t, torch.Tensor) and t.requires_grad]
    if not picked or not torch.is_grad_enabled():
        return list(tensors)
    marked = _Marker.apply(callback, *(tensors[i] for i in picked))
    out = list(tensors)
    for i, t in zip(picked, marked):
        out[i] = t
    return out


def timed_op(name: str, fn: Callable, timeline: Timeline) -> Callable:
    """``fn`` with its forward time and its backward (between two markers) added to the timeline."""
    def wrapper(*args, **kwargs):
        token = object()
        start = timeline.now()
        args = mark(list(args), lambda: timeline.op_backward_finished(name, token))
        out = fn(*args, **kwargs)
        (out,) = mark([out], lambda: timeline.op_backward_started(token))
        timeline.ops[f"op:{name}:fwd"] += timeline.now() - start
        return out
    return wrapper


# ---------------------------------------------------------------- instrumentation
@contextlib.contextmanager
def patched(obj, name: str, value):
    """A module attribute replaced for the block."""
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


@contextlib.contextmanager
def shadowed(instance, name: str, value):
    """A method of ``instance`` shadowed by an instance attribute for the block."""
    setattr(instance, name, value)
    try:
        yield
    finally:
        delattr(instance, name)


def _phase_wrapper(fn: Callable, timeline: Timeline, phase: str) -> Callable:
    def wrapper(*args, **kwargs):
        timeline.enter(phase)
        try:
            return fn(*args, **kwargs)
        finally:
            timeline.enter("other")
    return wrapper


def _module_hooks(run: loop.Run, timeline: Timeline) -> list:
    """Forward phases of G and D, and the markers on D's input and outputs; returns the handles."""
    def enter(phase):
        return lambda *_: timeline.enter(phase)

    def d_input(module, args):
        timeline.enter("d_fwd")
        return tuple(mark(list(args[:1]), lambda: timeline.enter("g_bwd")) + list(args[1:]))

    def d_output(module, args, out):
        timeline.enter("other")
        return DiscriminatorOutput(*mark(list(out), lambda: timeline.enter("d_bwd")))

    g, d = run.nets.g, run.nets.d
    return [g.register_forward_pre_hook(enter("g_fwd")), g.register_forward_hook(enter("other")),
            d.register_forward_pre_hook(d_input), d.register_forward_hook(d_output),
            *(opt.register_step_pre_hook(enter("optim"))
              for opt in (run.nets.opt_G, run.nets.opt_D)),
            *(opt.register_step_post_hook(enter("other"))
              for opt in (run.nets.opt_G, run.nets.opt_D))]


@contextlib.contextmanager
def instrumented(run: loop.Run, timeline: Timeline):
    """Every probe of the breakdown (see the module docstring), removed on exit."""
    losses = run.losses

    losses_total = losses.total

    def marked_total(terms):
        (total,) = mark([losses_total(terms)], lambda: timeline.enter("loss_bwd"))
        return total

    ops = ((losses_module, "info_nce"), (losses_module, "region_word_loss"),
           (losses_module, "supcon"), (generator_module, "word_attention"),
           (modulation_module, "modulated_batch_norm"))
    handles = _module_hooks(run, timeline)
    with contextlib.ExitStack() as stack:
        for module, name in ops:
            stack.enter_context(patched(module, name, timed_op(name, getattr(module, name),
                                                                timeline)))
        for method in ("discriminator_terms", "generator_terms"):
            stack.enter_context(shadowed(losses, method, _phase_wrapper(
                getattr(losses, method), timeline, "loss_fwd")))
        stack.enter_context(shadowed(losses, "total", marked_total))
        stack.enter_context(patched(loop, "update_ema", _phase_wrapper(loop.update_ema, timeline,
                                                                        "ema")))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


# ---------------------------------------------------------------- one training step
class NonFiniteStep(RuntimeError):
    pass


def train_step(run: loop.Run, stream, timeline: Timeline) -> tuple:
    """One G step exactly as the training loop runs it; returns (phases, ops) in seconds."""
    timeline.enter("data")
    batches, _ = loop.fetch(stream, run.cfg.optim.d_steps_per_g_step)
    timeline.enter("other")
    d_only = [loop.discriminator_step(run, batch) for batch in batches[:-1]]
    fw = loop.joint_forward(run, batches[-1])
    bad = loop.non_finite_terms(fw, d_only)
    if bad:
        raise NonFiniteStep(f"non-finite loss terms {bad}")
    loop.joint_update(run, fw, 1)
    return timeline.end_step()


# ---------------------------------------------------------------- configs and data sources
@dataclass
class BenchConfig:
    """One benchmarked config: the train config and where its batches come from."""
    name: str
    cfg: TrainConfig
    synthetic: bool = False     # coco128-shaped random batches instead of a loader
    text_dim: int = 768         # synthetic batches only
    note: str = ""


def make_config(name: str, device: torch.device, coco_batch: Optional[int],
                coco_width: Optional[int]) -> BenchConfig:
    quiet = [("run.quiet", "true"), ("run.tensorboard", "false"), ("run.device", device.type)]
    if name in ("tiny", "shapes"):
        return BenchConfig(name, build_config(name, quiet))
    if name != "coco128":
        raise ValueError(f"--configs: unknown config {name!r}; expected one of {list(CONFIGS)}")
    on_gpu = device.type == "cuda"
    batch, width = coco_batch or (8 if on_gpu else 2), coco_width or (96 if on_gpu else 32)
    cfg = build_config("coco128", quiet + [("data.path", "synthetic"),
                                           ("run.batch_size", str(batch)),
                                           ("model.g_width", str(width)),
                                           ("model.d_width", str(width))])
    note = "synthetic coco128-shaped batches"
    if width != 96 or batch != 8:
        note += f"; batch {batch}, width {width} (paper: 8 per device, width 96)"
    return BenchConfig(name, cfg, synthetic=True, note=note)


class SyntheticBatches:
    """coco128-shaped batches: images in [0, 1], 768-d token embeddings, random caption lengths.

    Iterating yields the same few pre-built batches forever (dicts with the loader's keys)."""

    def __init__(self, cfg: TrainConfig, text_dim: int, device: torch.device, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        b, res, tokens = cfg.run.batch_size, cfg.data.resolution, cfg.data.resolved_max_tokens()
        self.text_dim, self.num_samples = text_dim, b * COCO_SYNTHETIC_BATCHES
        self._batches = [self._batch(b, res, tokens, text_dim, gen, device)
                         for _ in range(COCO_SYNTHETIC_BATCHES)]

    @staticmethod
    def _batch(b, res, tokens, text_dim, gen, device) -> dict:
        lengths = torch.randint(3, tokens + 1, (b,), generator=gen)       # [CLS] w... [SEP]
        mask = torch.arange(tokens)[None, :] < lengths[:, None]             # (B, T) bool
        words = torch.randn(b, tokens, text_dim, generator=gen) * mask[..., None]
        sentence = words.sum(1) / lengths[:, None]                          # (B, E)
        out = {"image": torch.rand(b, 3, res, res, generator=gen), "sentence": sentence,
               "words": words, "word_mask": mask, "label": torch.full((b,), -1),
               "index": torch.arange(b), "caption": torch.zeros(b, dtype=torch.int64)}
        return {k: v.to(device) for k, v in out.items()}

    def __iter__(self):
        while True:
            yield from self._batches

    def sentence_embeddings(self) -> torch.Tensor:
        """Every batch's sentences (what ``model.whiten_sentences`` is fitted to, as the loader's)."""
        return torch.cat([b["sentence"] for b in self._batches]).cpu()


def make_source(bench: BenchConfig, device: torch.device, data_backend: str):
    """The batch source of a config: its train loader (``data_backend``) or synthetic batches."""
    if bench.synthetic:
        return SyntheticBatches(bench.cfg, bench.text_dim, device)
    data = dataclasses.replace(bench.cfg.data, backend=data_backend)
    return build_loader(data, split="train", batch_size=bench.cfg.run.batch_size,
                        seed=bench.cfg.run.seed, device=device, progress=False)


def build_run(cfg: TrainConfig, source, device: torch.device) -> loop.Run:
    """The training loop's Run (networks from the config's seed, losses, z generator)."""
    loop.seed_everything(cfg.run.seed)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device)
    autocast = loop.autocast_factory(cfg.run.precision, device)
    sentences = source.sentence_embeddings() if cfg.model.whiten_sentences else None
    nets = loop.build_networks(cfg, source.text_dim, device, sentences, loop.d_classes(cfg, source))
    z_gen = torch.Generator(device=device).manual_seed(loop.noise_seed(cfg.run.seed, 0))
    run = loop.Run(cfg, env, Path(cfg.run.out), source, nets, loop.build_losses(cfg, env, autocast),
                   z_gen, autocast, source.text_dim,
                   class_targets=loop.build_class_targets(cfg, source, device))
    nets.G.train()
    nets.D.train()
    return run


# ---------------------------------------------------------------- providers
@contextlib.contextmanager
def provider_env(provider: str):
    """``reference``: FASTXMC_IMPL=reference for the block; ``fused``: the variable unset."""
    if provider not in PROVIDERS:
        raise ValueError(f"--providers: unknown provider {provider!r}; expected {list(PROVIDERS)}")
    saved = os.environ.pop(IMPL_ENV, None)     # fused and its run-setting variants: unset
    if provider == "reference":
        os.environ[IMPL_ENV] = "reference"
    try:
        yield
    finally:
        os.environ.pop(IMPL_ENV, None)
        if saved is not None:
            os.environ[IMPL_ENV] = saved


def backends_in_use(device: torch.device, batch: int) -> dict:
    """op -> the backend its registry picks now for fp32 tensors on ``device`` (the region-word
    loss for D's 16 x 16 = 256 regions, the contrastive terms for batch x batch logits)."""
    def request(op):
        if op == "region_word_loss":
            return region_word_request(device, torch.float32, REGIONS)
        if op == "info_nce":
            return info_nce_request(device, torch.float32, batch * batch)
        return Request(device, torch.float32)
    chosen = {op: registry.select(request(op)) for op, registry in OP_REGISTRIES.items()}
    # Modulated BN picks per call by x's size (SMALL_CPU_VALUES): name both choices when they differ.
    small = modulated_bn_registry.select(modulated_bn_request(device, torch.float32, 1))
    if small != chosen["modulated_batch_norm"]:
        chosen["modulated_batch_norm"] += f" ({small} up to {SMALL_MBN_VALUES} values)"
    return chosen


# ---------------------------------------------------------------- measuring one (config, provider)
@dataclass
class StepStats:
    """Per-step seconds of ``steps`` timed steps: total, phases and ops."""
    totals: list = field(default_factory=list)
    phases: dict = field(default_factory=lambda: defaultdict(list))
    ops: dict = field(default_factory=lambda: defaultdict(list))

    def add(self, phases: dict, ops: dict) -> None:
        self.totals.append(sum(phases.values()))
        for name in PHASES:
            self.phases[name].append(phases.get(name, 0.0))
        for name, seconds in ops.items():
            self.ops[name].append(seconds)

    def add_op_totals(self, steps: int) -> None:
        """Pad ops that ran in some steps only to one value per step; add ``op:<name>:total``
        (forward + backward per step)."""
        for values in self.ops.values():
            values.extend([0.0] * (steps - len(values)))
        for name in {key.split(":")[1] for key in self.ops}:
            fwd, bwd = self.ops[f"op:{name}:fwd"], self.ops.get(f"op:{name}:bwd", [0.0] * steps)
            self.ops[f"op:{name}:total"] = [f + b for f, b in zip(fwd, bwd)]


def one_step(run: loop.Run, stream, device, instrument: bool) -> tuple:
    """(phases, ops) of one training step, with or without the breakdown's probes."""
    timeline = Timeline(device)
    with instrumented(run, timeline) if instrument else contextlib.nullcontext():
        return train_step(run, stream, timeline)


@dataclass
class Contender:
    """One (provider, data backend) of a config: its run, its batches and its timed steps."""
    provider: str
    run: loop.Run
    stream: object
    data_backend: str
    backends: dict
    warmup_s: float
    breakdown: StepStats = field(default_factory=StepStats)
    throughput: StepStats = field(default_factory=StepStats)   # CUDA only (CPU: breakdown)


def prepare(bench: BenchConfig, provider: str, data_backend: str, device, warmup: int):
    """Build the run of ``provider`` (its loader, networks from the config's seed); warm it up."""
    cfg = bench.cfg
    if provider in PROVIDER_RUN_SETTINGS:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(
            cfg.run, **PROVIDER_RUN_SETTINGS[provider]))
    with provider_env(provider):
        source = make_source(bench, device, data_backend)
        run = build_run(cfg, source, device)
        stream = loop.batch_stream(source)
        begin = time.perf_counter()
        for _ in range(warmup):
            one_step(run, stream, device, instrument=False)
        backends = backends_in_use(device, bench.cfg.run.batch_size)
        backends["layout"] = LAYOUT_NAMES[loop.network_memory_format(cfg.run.memory_format, device)]
        return Contender(provider, run, stream, getattr(source, "backend", "synthetic"), backends,
                         (time.perf_counter() - begin) / warmup)


@dataclass
class RunResult:
    bench: BenchConfig
    provider: str
    data_backend: str
    backends: dict
    throughput: StepStats
    breakdown: StepStats
    warmup_s: float
    text_dim: int


def measure_config(bench: BenchConfig, plan: list, device, args) -> list:
    """Warm up every (provider, data backend) of ``plan``, then interleave their timed steps round
    robin, so that the shared machine's load drifts hit each alike. On CPU the instrumented steps
    also give the throughput; on CUDA each round adds one uninstrumented step per contender."""
    contenders = [prepare(bench, provider, backend, device, args.warmup)
                  for provider, backend in plan]
    count = args.steps or args.policy.timed_calls(max(c.warmup_s for c in contenders))
    for _ in range(count):
        for c in contenders:
            with provider_env(c.provider):
                c.breakdown.add(*one_step(c.run, c.stream, device, instrument=True))
                if device.type == "cuda":
                    c.throughput.add(*one_step(c.run, c.stream, device, instrument=False))
    results = []
    for c in contenders:
        c.breakdown.add_op_totals(count)
        throughput = c.breakdown if device.type == "cpu" else c.throughput
        results.append(RunResult(bench, c.provider, c.data_backend, c.backends, throughput,
                                 c.breakdown, c.warmup_s, c.run.text_dim))
    return results


# ---------------------------------------------------------------- data loaders alone
def loader_throughput(bench: BenchConfig, backend: str, device, batches: int) -> tuple:
    """(seconds per batch, text_dim) of ``build_loader`` alone (after two warm-up batches)."""
    source = make_source(bench, device, backend)
    stream = loop.batch_stream(source)
    for _ in range(2):
        next(stream)
    times = []
    for _ in range(batches):
        begin = time.perf_counter()
        next(stream)
        times.append(time.perf_counter() - begin)
    return times, source.text_dim


# ---------------------------------------------------------------- rows
def _ms_stats(seconds: list) -> dict:
    ms = [s * 1e3 for s in seconds]
    return dict(median_ms=common.quantile(ms, 0.5), p20_ms=common.quantile(ms, 0.2),
                p80_ms=common.quantile(ms, 0.8), reps=len(ms))


def case_columns(bench: BenchConfig, text_dim: int) -> dict:
    cfg = bench.cfg
    return dict(config=bench.name, batch=cfg.run.batch_size, d_steps=cfg.optim.d_steps_per_g_step,
                resolution=cfg.data.resolution, g_width=cfg.model.g_width,
                d_width=cfg.model.d_width, text_dim=text_dim,
                tokens=cfg.data.resolved_max_tokens())


def result_rows(res: RunResult, meta: dict) -> list:
    """The step row (throughput), one row per phase and one per op (breakdown steps)."""
    cfg = res.bench.cfg
    images = cfg.run.batch_size * cfg.optim.d_steps_per_g_step
    base = dict(meta, timestamp=common.timestamp(), loadavg=common.load_average(),
                section="train_step", provider=res.provider, data_backend=res.data_backend,
                backends=";".join(f"{k}={v}" for k, v in res.backends.items()), status="ok",
                note=res.bench.note, threads=torch.get_num_threads(),
                **case_columns(res.bench, res.text_dim))
    step = _ms_stats(res.throughput.totals)
    note = "; ".join(filter(None, [res.bench.note, f"warm-up step {res.warmup_s:.2f} s"]))
    rows = [dict(base, metric="step", images_per_s=images / (step["median_ms"] / 1e3), note=note,
                 **step)]
    total = sum(res.breakdown.totals)
    measured = list(res.breakdown.phases.items()) + sorted(res.breakdown.ops.items())
    for name, values in measured:
        rows.append(dict(base, metric=name, share=sum(values) / total, **_ms_stats(values)))
    return rows


def loader_rows(bench: BenchConfig, backend: str, measured: tuple, meta: dict) -> dict:
    times, text_dim = measured
    stats = _ms_stats(times)
    return dict(meta, timestamp=common.timestamp(), loadavg=common.load_average(),
                section="data_loader", provider=f"loader-{backend}", data_backend=backend,
                metric="batch", images_per_s=bench.cfg.run.batch_size / (stats["median_ms"] / 1e3),
                status="ok", threads=torch.get_num_threads(),
                note=f"workers={bench.cfg.data.resolved_workers()} "
                     f"prefetch={bench.cfg.data.prefetch}",
                **case_columns(bench, text_dim), **stats)


def add_baselines(rows: list, baseline_of: Callable) -> None:
    """Fill baseline / baseline_ms / ratio_to_baseline from the matching baseline row."""
    index = {(r["section"], r["config"], r["provider"], r["data_backend"], r["metric"]): r
             for r in rows}
    for row in rows:
        name = baseline_of(row)
        if name is None:
            continue
        key = (row["section"], row["config"], name[0], name[1], row["metric"])
        ref = index.get(key)
        if ref is not None and ref is not row and ref.get("median_ms"):
            row.update(baseline=f"{name[0]}/{name[1]}", baseline_ms=ref["median_ms"],
                       ratio_to_baseline=row["median_ms"] / ref["median_ms"])


def baseline_of(row: dict):
    """(provider, data_backend) a row is compared with: the reference run of its config (same
    data backend), the fused run for the run-setting providers (fused-bf16, ...), or the torch
    loader for the DALI loader."""
    if row["section"] == "data_loader":
        return ("loader-torch", "torch") if row["data_backend"] != "torch" else None
    if row["provider"] == "reference":
        return None
    if row["provider"] in PROVIDER_RUN_SETTINGS:
        return "fused", row["data_backend"]
    return "reference", row["data_backend"]


# ---------------------------------------------------------------- printing and verdicts
def print_run(rows: list) -> None:
    step = rows[0]
    print(f"{step['config']:<8} {step['provider']:<10} {step['data_backend']:<9} "
          f"step {step['median_ms']:9.1f} ms (p20-p80 {step['p20_ms']:.1f}-{step['p80_ms']:.1f}, "
          f"{step['reps']} steps)  {step['images_per_s']:8.1f} images/s  [{step['backends']}]",
          flush=True)
    parts = [f"{r['metric']} {r['median_ms']:.1f} ({r['share']:.0%})" for r in rows[1:]
             if r["metric"] in PHASES and r["median_ms"] > 0]
    print("    phases ms: " + ", ".join(parts), flush=True)
    ops = [f"{r['metric'][3:]} {r['median_ms']:.1f} ({r['share']:.1%})" for r in rows[1:]
           if r["metric"].startswith("op:")]
    if ops:
        print("    ops ms: " + ", ".join(ops), flush=True)


def data_wait_verdict(rows: list) -> None:
    """Data wait share of the shapes preset with the default data backend (fused provider)."""
    default = [r for r in rows if r["section"] == "train_step" and r["config"] == "shapes"
               and r["provider"] == "fused" and r["metric"] == "data"]
    for row in default:
        ok = row["share"] <= DATA_WAIT_TARGET
        cores = len(os.sched_getaffinity(0))
        print(f"verdict data wait (shapes, {row['data_backend']}, {cores} cores): "
              f"{row['share']:.1%} of the step (median {row['median_ms']:.1f} ms per step)  "
              f"target <= {DATA_WAIT_TARGET:.0%}  {sweeps.verdict(ok)}", flush=True)
    if not default:
        print("verdict data wait: the shapes config was not run", flush=True)


def fused_verdicts(rows: list, tolerance: float) -> None:
    """Step time of fused vs reference per config; op time wherever their backends differ."""
    for row in rows:
        if (row["section"] != "train_step" or row["provider"] != "fused"
                or row.get("ratio_to_baseline") is None):
            continue
        if row["metric"] == "step":
            what = f"step ({row['data_backend']})"
        elif row["metric"].endswith(":total") and _backends_differ(row):
            what = row["metric"]
        else:
            continue
        ok = row["ratio_to_baseline"] <= 1.0 + tolerance
        print(f"verdict fused vs reference {row['config']:<8} {what:<32} "
              f"{row['median_ms']:9.2f} ms vs {row['baseline_ms']:9.2f} ms = "
              f"{row['ratio_to_baseline']:.3f}x  target <= {1 + tolerance:.2f}x  "
              f"{sweeps.verdict(ok)}", flush=True)


def run_settings_summary(rows: list) -> None:
    """The step time of each run-setting provider against the fused run (no target: a setting is a
    choice for the user, not a backend; bf16 also changes the arithmetic)."""
    for row in rows:
        if (row["section"] == "train_step" and row["provider"] in PROVIDER_RUN_SETTINGS
                and row["metric"] == "step" and row.get("ratio_to_baseline") is not None):
            print(f"{row['provider']} vs fused {row['config']:<8} step ({row['data_backend']}) "
                  f"{row['median_ms']:9.2f} ms vs {row['baseline_ms']:9.2f} ms = "
                  f"{row['ratio_to_baseline']:.3f}x ({1 / row['ratio_to_baseline']:.2f}x the "
                  f"images/s)", flush=True)


def _backends_differ(row: dict) -> bool:
    """Whether the fused run of an op row used another backend than the reference."""
    op = row["metric"].split(":")[1]
    return op in OP_REGISTRIES and f"{op}=reference" not in row["backends"]


# ---------------------------------------------------------------- the sweep
def planned_runs(configs: list, providers: list, quick: bool) -> dict:
    """config -> its (provider, data backend) pairs: the default data backend everywhere, plus the
    fused shapes run with the torch DataLoader (not in --quick). The reference comes first, so
    that every fused row is written with its ratio."""
    ordered = sorted(providers, key=lambda p: p != "reference")
    plan = {c: [(p, "auto") for p in ordered] for c in configs}
    if "shapes" in configs and "fused" in providers and not quick:
        plan["shapes"].append(("fused", "torch"))
    return plan


def run_all(args, device, meta) -> list:
    rows, threads = [], torch.get_num_threads()
    benches = {name: make_config(name, device, args.coco_batch, args.coco_width)
               for name in args.configs}
    for name, plan in planned_runs(args.configs, args.providers, args.quick).items():
        torch.set_num_threads(args.threads or benches[name].cfg.run.threads or threads)
        try:
            results = measure_config(benches[name], plan, device, args)
            new = [row for res in results for row in result_rows(res, meta)]
        finally:
            torch.set_num_threads(threads)
        add_baselines(new, baseline_of)
        for res_rows in _per_run(new):
            print_run(res_rows)
        common.append_rows(args.out, new, COLUMNS)
        rows += new
    rows += loader_section(benches, device, args, meta)
    return rows


def _per_run(rows: list) -> list:
    """Rows grouped by (provider, data backend), in order; each group starts with its step row."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["provider"], row["data_backend"]), []).append(row)
    return list(groups.values())


def loader_section(benches: dict, device, args, meta) -> list:
    rows = []
    for bench in benches.values():
        if bench.synthetic or not args.loader_batches:
            continue
        mine = [loader_rows(bench, backend, loader_throughput(bench, backend, device,
                                                              args.loader_batches), meta)
                for backend in DATA_BACKENDS]
        add_baselines(mine, baseline_of)
        for row in mine:
            ratio = row.get("ratio_to_baseline")
            print(f"loader {row['config']:<8} {row['data_backend']:<6} {row['median_ms']:8.2f} ms "
                  f"per batch of {row['batch']}  {row['images_per_s']:9.1f} images/s"
                  + (f"  ({1 / ratio:.2f}x the torch loader)" if ratio else ""), flush=True)
        common.append_rows(args.out, mine, COLUMNS)
        rows += mine
    return rows


# ---------------------------------------------------------------- command line
def _csv_list(text: str) -> list:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=_csv_list, default=list(CONFIGS))
    p.add_argument("--providers", type=_csv_list, default=list(DEFAULT_PROVIDERS),
                   help=f"comma-separated, of {list(PROVIDERS)} (default: "
                        f"{','.join(DEFAULT_PROVIDERS)})")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per run (default: as many as fit --budget, within 3..20; "
                        "--quick: 2..5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed steps per run (default 20; --quick 3)")
    p.add_argument("--loader-batches", type=int, default=None,
                   help="timed batches of each loader alone (default 40; --quick 8; 0: skip)")
    p.add_argument("--coco-batch", type=int, default=None, help="coco128 batch (CPU 2, CUDA 8)")
    p.add_argument("--coco-width", type=int, default=None,
                   help="coco128 G/D width (CPU 32, CUDA 96 as in the paper)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the preset's run.threads, else torch's default)")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="noise allowance of the fused-vs-reference verdicts (default 0.05)")
    p.add_argument("--quick", action="store_true",
                   help="few steps and batches, no extra data-backend run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    _validate(p, args)
    quick = args.quick
    args.policy = common.RepPolicy(warmup=args.warmup, min_reps=2 if quick else 3,
                                   max_reps=5 if quick else 20,
                                   budget_s=args.budget or (3.0 if quick else 20.0),
                                   max_s=2 * (args.budget or (3.0 if quick else 20.0)))
    if args.loader_batches is None:
        args.loader_batches = 8 if quick else 40
    return args


def _validate(p, args) -> None:
    for name, values, known in (("--configs", args.configs, CONFIGS),
                                ("--providers", args.providers, PROVIDERS)):
        bad = [v for v in values if v not in known]
        if bad or not values:
            p.error(f"{name}: unknown or empty {bad or values}; choose from {list(known)}")
    for name in ("steps", "coco_batch", "coco_width", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup < 1:
        p.error(f"--warmup must be >= 1 (the first step builds caches and pools), "
                f"got {args.warmup}")
    if args.loader_batches is not None and args.loader_batches < 0:
        p.error(f"--loader-batches must be >= 0, got {args.loader_batches}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch.cuda is not available on this machine", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    meta = common.run_metadata(device)
    print(f"# train step: configs {args.configs}, providers {args.providers}, device "
          f"{meta['device']}, {meta['machine']}, torch {meta['torch']}, commit {meta['commit']}, "
          f"load average {common.load_average()}; results -> {args.out}", flush=True)
    rows = run_all(args, device, meta)
    print(f"# load average at the end {common.load_average()}", flush=True)
    data_wait_verdict(rows)
    fused_verdicts(rows, args.tolerance)
    run_settings_summary(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
