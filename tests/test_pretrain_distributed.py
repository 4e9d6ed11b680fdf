"""python -m fastxmc.pretrain under 2 processes (gloo on CPU) against a single-process replay.

Semantics checked (``run.batch_size`` is the batch of one step on ONE process): each rank reads its
shard of the global batch (ranks take alternate samples of the epoch's permutation, so the 2 x 8
rows of a step are the 16 rows of the single-process batch of 16); with ``--global-negatives`` the
sentence InfoNCE is the loss of the global batch on every rank; the region-word loss has no group,
so each rank's word term is its own shard's; DDP averages the gradients. One step's update is
therefore that of ``sentence(global batch) + mean over ranks of word(shard)``, which the tests
replay in a single process (two loaders, one model, no process group).

What can be compared, and how tightly. DDP and the replay compute the same sums in other orders
(two shards' backward passes averaged vs one backward pass over both; gathered vs concatenated
features), so they agree to fp32 rounding at equal weights: the gradients of one step and the
losses of a step are compared tightly. Weights after several steps are not: Adam divides by
sqrt(v), so a gradient entry that is a near-cancelling sum (its rounding error a sizeable part of
its value) moves by a step whose size is set by the rounding, and two runs then sit at weights
that differ by a machine-dependent fraction of lr. The end-to-end test therefore replays every
step k from the run's own checkpoint k-1 (same weights and Adam state, so its losses are again a
rounding comparison) and bounds the weights after the step by Adam's largest possible step.
"""
import math
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import assert_gradients_close

from fastxmc.data.loader import build_loader
from fastxmc.losses import info_nce, region_word_loss
from fastxmc.models.dual_encoder import DualEncoder
from fastxmc.ops.registry import IMPL_ENV
from fastxmc.pretrain import loop
from fastxmc.pretrain.config import build_config
from fastxmc.train import checkpoint as ckpt
from fastxmc.train.distributed import DistEnv
from fastxmc.train.logging import read_metrics
from fastxmc.train.loop import batch_stream

ROOT = Path(__file__).resolve().parents[1]
WORLD, BATCH, STEPS = 2, 8, 3
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def cache(one_thread_data_cache):
    return one_thread_data_cache


def tiny(out, *overrides):
    """The tiny preset as the 2-process runs (batch 8 per process, global negatives)."""
    return build_config("tiny", [("run.out", str(out)), ("run.quiet", "true"),
                                 ("run.tensorboard", "false"), ("loss.global_negatives", "true"),
                                 ("run.batch_size", str(BATCH)), *overrides])


# ---------------------------------------------------------------- the single-process replay
class Replay:
    """The 2-rank run in one process: rank 0's construction (seed, then its loader, then the
    model), rank 1's loader beside it; each step takes each rank's next batch."""

    def __init__(self, cfg, run_dir: Path):
        loop.seed_everything(cfg.run.seed)
        self.run = loop.build_run(cfg, DistEnv(0, WORLD, 0, CPU), run_dir, progress=False)
        rank1 = build_loader(cfg.data, split="train", batch_size=BATCH, rank=1, world_size=WORLD,
                             seed=cfg.run.seed, device=CPU, progress=False)
        self.streams = [batch_stream(self.run.loader), batch_stream(rank1)]
        self.loss_cfg = cfg.loss

    def step(self) -> tuple:
        """One step on the next global batch: scores the concatenated global batch (rank order)
        with the sentence loss and each shard with the word loss, backward of their DDP-averaged
        sum, Adam step. Returns (sentence, [word of each rank's shard]); the gradients stay in
        ``.grad``."""
        g, model = self.loss_cfg, self.run.model
        batches = [next(s) for s in self.streams]
        encoded = [model(b["image"], b["sentence"], b["words"], b["word_mask"]) for b in batches]
        sentence = 2 * info_nce(torch.cat([image.global_feature for image, _ in encoded]),
                                torch.cat([text.sentence for _, text in encoded]), g.temperature)
        words = [region_word_loss(image.regions, text.words, b["word_mask"], gamma1=g.word_gamma1,
                                  gamma2=g.word_gamma2, gamma3=g.word_gamma3)
                 for (image, text), b in zip(encoded, batches)]
        self.run.opt.zero_grad(set_to_none=True)
        (sentence + sum(words) / WORLD).backward()
        self.run.opt.step()
        return sentence.item(), [w.item() for w in words]


# ---------------------------------------------------------------- gradients of one DDP step
def _one_step_worker(rank: int, port: int, cache_dir: str, out: str, queue) -> None:
    """One step of ``loop.pretrain`` as rank ``rank`` of a 2-process group; sends its loss terms
    and the parameter gradients of that step (numpy arrays: a tensor would travel as a
    shared-memory handle that the parent cannot open once this process has exited)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), FASTXMC_CACHE=cache_dir)
    try:
        captured = {}
        update = loop.update

        def recording(run, terms):
            loss = update(run, terms)
            captured["terms"] = {k: float(v.detach()) for k, v in terms.items()}
            captured["grads"] = {n: p.grad.detach().numpy().copy()
                                 for n, p in run.encoder.named_parameters()}
            return loss

        loop.update = recording
        loop.pretrain(tiny(out, ("run.steps", "1")))
        queue.put((rank, captured["terms"], captured["grads"]))
    except BaseException:
        queue.put((rank, traceback.format_exc(), None))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_ddp_step(tmp_path_factory):
    """{rank: (loss terms, gradients)} of the first step of a 2-process ``loop.pretrain``."""
    out = tmp_path_factory.mktemp("ddp-step") / "dual"
    cache_dir = tmp_path_factory.getbasetemp() / "fastxmc-cache"
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_one_step_worker, args=(r, port, str(cache_dir), str(out), queue))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(WORLD):
        rank, terms, grads = queue.get(timeout=300)
        assert grads is not None, f"rank {rank} failed:\n{terms}"
        results[rank] = terms, grads
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_one_ddp_step_has_the_single_process_gradient(one_ddp_step, tmp_path):
    """Step 1 of the real loop (seed, build_run, DDP wrap, forward_terms, update) on 2 gloo ranks:
    every rank's averaged gradient is that of ``sentence(global) + mean word(shard)``, within the
    rounding of sums taken in another order (see assert_gradients_close: the image tower's weight
    gradients sum over 16 x 32 x 32 terms; no parameter of the dual encoder feeds a normalisation
    through a bias). A real DDP bug moves them by O(1) of their scale: gradients summed instead of
    averaged (x2), a shard missing or on the wrong rank (one shard's word gradient), negatives
    from one rank only (the sentence gradient of another loss)."""
    replay = Replay(tiny(tmp_path / "replay"), tmp_path / "replay")
    sentence, words = replay.step()
    want = {n: p.grad.detach().numpy().copy() for n, p in replay.run.encoder.named_parameters()}
    for rank, (terms, grads) in one_ddp_step.items():
        assert terms["sentence"] == pytest.approx(sentence, rel=1e-5), rank  # the global batch
        assert terms["word"] == pytest.approx(words[rank], rel=1e-5), rank   # its own shard
        assert_gradients_close(grads, want, msg=f"rank {rank}")


# ---------------------------------------------------------------- the torchrun run
def torchrun_pretrain(out: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    """``STEPS`` steps under torchrun with a checkpoint after every step (all kept)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {k: v for k, v in os.environ.items() if k != IMPL_ENV}
    env.update(FASTXMC_CACHE=str(cache_dir), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [str(torchrun), "--standalone", f"--nproc_per_node={WORLD}", "-m", "fastxmc.pretrain",
         "--preset", "tiny", "--steps", str(STEPS), "--batch-size", str(BATCH), "--out", str(out),
         "--global-negatives", "--run.tensorboard=false", "--run.checkpoint_every=1",
         f"--run.keep_checkpoints={STEPS}", "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    """One 2-process run of the tiny preset (its run directory)."""
    out = tmp_path_factory.mktemp("ddp") / "dual"
    cache_dir = tmp_path_factory.getbasetemp() / "fastxmc-cache"
    proc = torchrun_pretrain(out, cache_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_torchrun_run_completes_and_writes_the_model(torchrun_run):
    records = read_metrics(torchrun_run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["samples_per_s"] > 0  # counts both ranks' samples
    assert [p.name for p in ckpt.list_checkpoints(torchrun_run)] == [
        f"ckpt-{k:08d}.pt" for k in range(1, STEPS + 1)]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(torchrun_run))
    assert state["step"] == STEPS and state["world_size"] == WORLD
    model = DualEncoder.load(torchrun_run / loop.MODEL_FILE)
    assert model.config.resolution == 32
    for name, value in model.state_dict().items():  # the trained model: the last step's weights
        assert torch.equal(value, state["model"][name]), name


def test_the_ranks_hold_the_single_process_global_batch():
    cfg = tiny("unused")
    first = [next(iter(build_loader(cfg.data, split="train", batch_size=b, rank=r, world_size=w,
                                    seed=cfg.run.seed, device=CPU, progress=False)))["index"]
             for b, r, w in ((BATCH, 0, WORLD), (BATCH, 1, WORLD), (WORLD * BATCH, 0, 1))]
    assert sorted(torch.cat(first[:2]).tolist()) == sorted(first[2].tolist())


def test_first_sentence_loss_equals_the_single_process_global_batch(torchrun_run, tmp_path):
    """Step 1 (same initial model): the global-negatives sentence loss is the single-process
    loss at batch 2 x 8 = 16."""
    single = loop.pretrain(tiny(tmp_path / "single", ("run.steps", "1"),
                                ("run.batch_size", str(WORLD * BATCH))))
    want = read_metrics(single.run_dir)[0]["sentence"]
    got = read_metrics(torchrun_run)[0]["sentence"]
    assert got == pytest.approx(want, rel=1e-5)


def adam_step_bound(step: int, betas) -> float:
    """The largest |update| / lr of Adam's step number ``step`` over all gradient histories.

    The update is lr * m_hat / (sqrt(v_hat) + eps) with m_hat = (1 - b1) / (1 - b1^t) * sum_i
    b1^(t-i) g_i and v_hat = (1 - b2) / (1 - b2^t) * sum_i b2^(t-i) g_i^2. Writing b1^(t-i) g_i =
    (b1 / sqrt(b2))^(t-i) * sqrt(b2)^(t-i) g_i, Cauchy-Schwarz bounds |sum_i b1^(t-i) g_i| by
    sqrt(sum_j (b1^2 / b2)^j) * sqrt(sum_i b2^(t-i) g_i^2), hence the bound below (eps only
    shrinks the step). For (0.9, 0.999) it is 1 at t = 1 (a sign step), 1.004 at t = 3, and tends
    to (1 - b1) / sqrt((1 - b2) (1 - b1^2 / b2)) = 7.3 for large t. (Kingma & Ba's section 2.1
    figure, max(1, (1 - b1) / sqrt(1 - b2)) = 3.2, is an estimate, not a bound: a gradient that
    grows by b2 / b1 every step exceeds it.)
    """
    b1, b2 = betas
    t = step
    geometric = sum((b1 * b1 / b2) ** j for j in range(t))
    return (1 - b1) / (1 - b1 ** t) * math.sqrt((1 - b2 ** t) / (1 - b2) * geometric)


def _last_adam_step(history, betas) -> float:
    """|last update| of fp64 Adam (lr 1, eps 0) fed the gradients ``history`` of one weight."""
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=1.0, betas=betas, eps=0.0)
    for g in history:
        before = w.detach().clone()
        w.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
    return abs(float(w.detach() - before))


def test_adam_step_bound_is_attained_and_not_exceeded():
    """The bound of step t is PyTorch's Adam's largest step: reached by the Cauchy-Schwarz
    equality case g_i ~ (b2 / b1)^i, exceeded by no random gradient history."""
    betas, t = (0.9, 0.999), 5
    bound = adam_step_bound(t, betas)
    steepest = [(betas[1] / betas[0]) ** i for i in range(1, t + 1)]
    assert _last_adam_step(steepest, betas) == pytest.approx(bound, rel=1e-9)
    histories = torch.randn(200, t, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert max(_last_adam_step(h, betas) for h in histories.tolist()) <= bound
    assert [adam_step_bound(k, betas) for k in (1, 3)] == pytest.approx([1.0, 1.004], abs=5e-4)


def test_every_step_equals_the_single_process_replay(torchrun_run, tmp_path):
    """Every step k replayed in one process from the run's own state after step k-1 (step 1: the
    replay's own initial model, which rank 0 built the same way): the same losses, and weights
    after the step within Adam's step bound of the run's checkpoint k."""
    cfg = tiny(tmp_path / "replay")
    replay = Replay(cfg, tmp_path / "replay")
    encoder, opt = replay.run.encoder, replay.run.opt
    records = read_metrics(torchrun_run)
    checkpoints = [ckpt.load_checkpoint(p) for p in ckpt.list_checkpoints(torchrun_run)]
    assert len(records) == len(checkpoints) == STEPS
    for step, (record, state) in enumerate(zip(records, checkpoints), start=1):
        if step > 1:
            encoder.load_state_dict(checkpoints[step - 2]["model"])
            opt.load_state_dict(checkpoints[step - 2]["opt"])
        before = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        sentence, (word, _) = replay.step()  # rank 0 logs its own shard's word loss
        # Equal weights: the losses differ by the rounding of the sentence loss's sums over 16
        # rows and columns in another order (gathered vs concatenated), a few u * 16 ~ 1e-6.
        assert record["sentence"] == pytest.approx(sentence, rel=1e-5), f"step {step}"
        assert record["word"] == pytest.approx(word, rel=1e-5), f"step {step}"
        assert record["loss"] == pytest.approx(sentence + word, rel=1e-5), f"step {step}"
        assert int(opt.state_dict()["state"][0]["step"]) == step  # Adam's t of this update
        # From the same weights and Adam state the two updates differ by at most twice Adam's
        # largest step (any gradient, see adam_step_bound), plus the rounding of w + update.
        bound = 2 * cfg.optim.lr * adam_step_bound(step, cfg.optim.betas)
        for name, want in encoder.state_dict().items():
            got = state["model"][name]
            diff = (got - want).abs()
            assert float(diff.max()) <= bound + 4 * 2**-24 * float(want.abs().max()), \
                f"step {step} {name}: {float(diff.max()):.3g} > {bound:.3g}"
            # The bound alone would pass a stale or unsynchronised tensor (it is ~ the step
            # itself), so the run's step must also be the replay's. Rounding changes an entry's
            # step only in proportion to its gradient's relative rounding error, large only for
            # entries within rounding of zero: ~1e-5 of a tensor's step norm. A missing, stale or
            # differently computed update changes it by ~100%; 0.1 lies between the two.
            moved = float((want - before[name]).norm())
            assert float(diff.norm()) <= 0.1 * moved, f"step {step} {name}: not the replayed step"
