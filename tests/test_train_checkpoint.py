"""Checkpoints (atomic writes, rotation, weights_only loading, RNG states), the EMA, metrics files."""
import json
import random
import sys

import numpy as np
import pytest
import torch
from torch import nn

from fastxmc.train import checkpoint as ckpt
from fastxmc.train.ema import make_ema, update_ema
from fastxmc.train.logging import RunLogger, read_metrics, truncate_metrics
from fastxmc.train.samples import render_grid


def _state(step: int) -> dict:
    return {"step": step, "G": {"w": torch.full((2,), float(step))}, "data": {"epoch": 1, "position": 3},
            "config": {"run": {"betas": (0.5, 0.999)}}, "rng": ckpt.capture_rng()}


def test_checkpoints_rotate_and_load_with_weights_only(tmp_path):
    for step in (5, 10, 15, 20):
        ckpt.save_checkpoint(_state(step), tmp_path, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["ckpt-00000015.pt", "ckpt-00000020.pt"]  # no temporary file left behind
    latest = ckpt.latest_checkpoint(tmp_path)
    state = ckpt.load_checkpoint(latest)
    assert state["step"] == 20 and state["format"] == ckpt.FORMAT_VERSION
    assert torch.equal(state["G"]["w"], torch.tensor([20.0, 20.0]))
    assert state["config"]["run"]["betas"] == (0.5, 0.999)
    # The stored dict holds nothing that weights_only=True refuses.
    torch.load(latest, weights_only=True)


def test_checkpoint_of_an_unknown_format_is_rejected(tmp_path):
    torch.save({"format": 99, "step": 1}, tmp_path / "x.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"x.pt is unusable: not a fastxmc checkpoint of format 2 \(found 99\)"):
        ckpt.load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="keep_checkpoints must be >= 1"):
        ckpt.save_checkpoint(_state(1), tmp_path, keep=0)


def test_rng_states_survive_a_checkpoint(tmp_path):
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    ckpt.save_checkpoint(_state(1), tmp_path, keep=1)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.restore_rng(ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def test_load_run_without_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no checkpoints"):
        ckpt.load_run(tmp_path)


def test_sample_cli_without_checkpoints(tmp_path, capsys):
    from fastxmc.sample import main
    assert main(["--run", str(tmp_path), "--caption", "a red circle", "--out",
                 str(tmp_path / "g.png")]) == 2
    assert "has no checkpoints" in capsys.readouterr().err


class _TinyG(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(self.lin(x))


def test_ema_update_and_buffer_copy():
    torch.manual_seed(0)
    live = _TinyG()
    ema = make_ema(live)
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    before = ema.lin.weight.clone()
    with torch.no_grad():
        live.lin.weight.add_(1.0)
    live(torch.randn(4, 3))  # moves the live BN running statistics
    update_ema(ema, live, 0.9)
    torch.testing.assert_close(ema.lin.weight, 0.9 * before + 0.1 * live.lin.weight)
    assert torch.equal(ema.bn.running_mean, live.bn.running_mean)
    assert int(ema.bn.num_batches_tracked) == 1
    with pytest.raises(ValueError, match="decay must lie in"):
        update_ema(ema, live, 1.5)


def test_metrics_file_and_truncation(tmp_path):
    logger = RunLogger(tmp_path, enabled=True, total_steps=3, tensorboard=False, quiet=True)
    for step in (1, 2, 3):
        logger.log_metrics(step, {"loss_d": step * 1.0, "loss_g": float("nan")})
    logger.close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3] and records[0]["loss_g"] == "nan"
    truncate_metrics(tmp_path, 2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])


def test_disabled_logger_writes_nothing(tmp_path):
    logger = RunLogger(tmp_path, enabled=False, total_steps=3)
    logger.log_metrics(1, {"loss_d": 1.0})
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_sample_grid_layout():
    images = torch.zeros(5, 3, 32, 32)
    images[1, 0] = 1.0  # a red image in cell 1
    grid = render_grid(images, ["a red circle at the top left of the picture"] * 5, columns=3)
    arr = np.asarray(grid)
    # 3 columns of 128-px cells (32 px enlarged 4x) plus padding; 2 rows with 4 caption lines.
    assert grid.size[0] == 3 * (128 + 4) + 4 and arr.shape[0] > 2 * 128
    x0 = 4 + 1 * (128 + 4)
    assert tuple(arr[4 + 64, x0 + 64]) == (255, 0, 0)
    caption_band = arr[4 + 128: 4 + 128 + 30, 4: 4 + 128]
    assert (caption_band < 128).any()  # the caption text is drawn under the image
    with pytest.raises(ValueError, match="got 5 images but 2 captions"):
        render_grid(images, ["a", "b"])


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    logger = RunLogger(tmp_path, enabled=True, total_steps=4, tensorboard=False)
    logger.advance(2, {"loss_d": 1.25, "loss_g": 3.5})
    logger.print_progress(2, {"loss_d": 1.25})  # silent: the bar shows progress on a terminal
    logger.close()
    err = capsys.readouterr().err
    assert "2/4" in err and "loss_d=1.250" in err and "loss_g=3.500" in err


def test_progress_lines_without_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    logger = RunLogger(tmp_path, enabled=True, total_steps=4, tensorboard=False)
    logger.advance(2, {"loss_d": 1.25})
    logger.print_progress(2, {"loss_d": 1.25})
    logger.close()
    assert "step 2/4 loss_d 1.2500 eta " in capsys.readouterr().err
    quiet = RunLogger(tmp_path, enabled=True, total_steps=4, tensorboard=False, quiet=True)
    quiet.print_progress(2, {"loss_d": 1.25})
    quiet.close()
    assert capsys.readouterr().err == ""


def test_standing_statistics_are_the_mean_over_batches():
    """recompute_bn_statistics: running mean/var = the average of the per-batch statistics (torch BN
    and the generator's modulated BN), momenta restored, eval mode after."""
    from fastxmc.models import Generator
    from fastxmc.train.ema import recompute_bn_statistics

    torch.manual_seed(0)
    ema = make_ema(_TinyG())
    batches = [(torch.randn(5, 3) * (i + 1) + i,) for i in range(3)]
    assert recompute_bn_statistics(ema, batches) == 3
    outs = [ema.lin(x) for (x,) in batches]
    torch.testing.assert_close(ema.bn.running_mean, torch.stack([o.mean(0) for o in outs]).mean(0))
    torch.testing.assert_close(ema.bn.running_var, torch.stack([o.var(0) for o in outs]).mean(0))
    assert not ema.training and ema.bn.momentum == 0.1

    g = Generator(resolution=32, text_dim=8, z_dim=4, width=2).eval()
    inputs = [(torch.randn(4, 4), torch.randn(4, 8), torch.randn(4, 3, 8), torch.ones(4, 3, dtype=torch.bool))
              for _ in range(2)]
    recompute_bn_statistics(g, inputs)
    stats = [m for m in g.modules() if hasattr(m, "running_mean") and hasattr(m, "momentum")]
    assert stats and all(m.momentum == 0.1 for m in stats) and not g.training
    first = stats[0]  # the first block's input: the stem output, whose batch stats we can compute
    h = [g.stem(z).view(4, -1, 4, 4) for z, *_ in inputs]
    torch.testing.assert_close(first.running_mean, torch.stack([x.mean((0, 2, 3)) for x in h]).mean(0))
    with pytest.raises(ValueError, match="at least one batch"):
        recompute_bn_statistics(g, [])


def test_ema_warmup_follows_tensorflows_num_updates_rule():
    from fastxmc.train.ema import ema_decay_at

    assert ema_decay_at(0.995, 1, warmup=False) == 0.995
    assert ema_decay_at(0.995, 1, warmup=True) == pytest.approx(2 / 11)
    assert ema_decay_at(0.995, 90, warmup=True) == pytest.approx(91 / 100)
    assert ema_decay_at(0.995, 10_000, warmup=True) == 0.995
