"""python -m fastxmc.pretrain under a 2-process torchrun (gloo on CPU).

Semantics checked (``run.batch_size`` is the batch of one step on ONE process): each rank reads its
shard of the global batch (ranks take alternate samples of the epoch's permutation, so the 2 x 8
rows of a step are the 16 rows of the single-process batch of 16); with ``--global-negatives`` the
sentence InfoNCE is the loss of the global batch on every rank; the region-word loss has no group,
so each rank's word term is its own shard's; DDP averages the gradients. One step's update is
therefore that of ``sentence(global batch) + mean over ranks of word(shard)``, which the test
replays in a single process (two loaders, one model, no process group) and compares step by step
with what rank 0 logged and saved.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    """The tiny preset as the torchrun run (batch 8 per process, global negatives)."""
    return build_config("tiny", [("run.out", str(out)), ("run.quiet", "true"),
                                 ("run.tensorboard", "false"), ("loss.global_negatives", "true"),
                                 ("run.batch_size", str(BATCH)), *overrides])


def torchrun_pretrain(out: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {k: v for k, v in os.environ.items() if k != IMPL_ENV}
    env.update(FASTXMC_CACHE=str(cache_dir), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [str(torchrun), "--standalone", f"--nproc_per_node={WORLD}", "-m", "fastxmc.pretrain",
         "--preset", "tiny", "--steps", str(STEPS), "--batch-size", str(BATCH), "--out", str(out),
         "--global-negatives", "--run.tensorboard=false", "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def replay_ddp_steps(cfg, run_dir: Path) -> tuple:
    """The 2-rank run in one process: (per step (sentence, rank-0 word), final model state).

    The model comes from rank 0's construction (seed, then its loader, then the model); every
    step takes each rank's next batch, scores the concatenated global batch (rank order) with
    the sentence loss and each shard with the word loss, and steps on their DDP-averaged sum.
    """
    loop.seed_everything(cfg.run.seed)
    run = loop.build_run(cfg, DistEnv(0, WORLD, 0, CPU), run_dir, progress=False)
    rank1 = build_loader(cfg.data, split="train", batch_size=BATCH, rank=1, world_size=WORLD,
                         seed=cfg.run.seed, device=CPU, progress=False)
    streams = [batch_stream(run.loader), batch_stream(rank1)]
    g = cfg.loss
    logged = []
    for _ in range(STEPS):
        batches = [next(s) for s in streams]
        encoded = [run.model(b["image"], b["sentence"], b["words"], b["word_mask"])
                   for b in batches]
        sentence = 2 * info_nce(torch.cat([image.global_feature for image, _ in encoded]),
                                torch.cat([text.sentence for _, text in encoded]), g.temperature)
        words = [region_word_loss(image.regions, text.words, b["word_mask"], gamma1=g.word_gamma1,
                                  gamma2=g.word_gamma2, gamma3=g.word_gamma3)
                 for (image, text), b in zip(encoded, batches)]
        run.opt.zero_grad(set_to_none=True)
        (sentence + sum(words) / WORLD).backward()
        run.opt.step()
        logged.append((sentence.item(), words[0].item()))
    return logged, run.encoder.state_dict()


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
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(torchrun_run))
    assert state["step"] == STEPS and state["world_size"] == WORLD
    model = DualEncoder.load(torchrun_run / loop.MODEL_FILE)
    assert model.config.resolution == 32


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


def test_every_step_equals_the_single_process_replay(torchrun_run, tmp_path):
    logged, final = replay_ddp_steps(tiny(tmp_path / "replay"), tmp_path / "replay")
    records = read_metrics(torchrun_run)
    for step, (record, (sentence, word)) in enumerate(zip(records, logged), start=1):
        assert record["sentence"] == pytest.approx(sentence, rel=1e-5), f"step {step}"
        assert record["word"] == pytest.approx(word, rel=1e-5), f"step {step}"
        assert record["loss"] == pytest.approx(sentence + word, rel=1e-5), f"step {step}"
    saved = DualEncoder.load(torchrun_run / loop.MODEL_FILE).state_dict()
    for name, value in final.items():
        torch.testing.assert_close(saved[name], value, rtol=1e-4, atol=1e-6, msg=name)
