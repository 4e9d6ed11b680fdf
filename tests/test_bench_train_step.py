"""Smoke test of benchmarks/bench_train_step.py: --quick on the tiny preset writes its rows."""
import math

import pytest

import fastxmc.models.generator as generator_module
import fastxmc.train.losses as losses_module
from benchmarks import bench_train_step as bench
from benchmarks import common
from fastxmc.train import loop

ORIGINALS = {(losses_module, "info_nce"): losses_module.info_nce,
             (generator_module, "word_attention"): generator_module.word_attention,
             (loop, "update_ema"): loop.update_ema}


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    """The tiny shapes data and its caption cache in a per-session directory, never the user's."""
    monkeypatch.setenv("FASTXMC_CACHE", str(tmp_path_factory.getbasetemp() / "fastxmc-cache"))
    monkeypatch.delenv("FASTXMC_IMPL", raising=False)


def test_quick_tiny_run_writes_step_breakdown_and_loader_rows(tmp_path, capsys):
    out = tmp_path / "train_step.csv"
    assert bench.main(["--configs", "tiny", "--quick", "--steps", "1", "--loader-batches", "2",
                       "--out", str(out)]) == 0
    rows = common.read_rows(out)
    steps = {r["provider"]: r for r in rows if r["metric"] == "step"}
    assert set(steps) == {"fused", "reference"}
    for row in steps.values():
        assert row["config"] == "tiny" and row["status"] == "ok" and int(row["reps"]) == 1
        # images per step = batch 8 x 2 D steps
        assert float(row["images_per_s"]) == pytest.approx(
            16 / (float(row["median_ms"]) / 1e3), rel=1e-3)
    assert "word_attention=reference" in steps["reference"]["backends"]
    assert "modulated_batch_norm=cpu (reference up to 131072 values)" in steps["fused"]["backends"]
    assert float(steps["fused"]["ratio_to_baseline"]) == pytest.approx(
        float(steps["fused"]["median_ms"]) / float(steps["reference"]["median_ms"]), rel=1e-3)
    for provider in ("fused", "reference"):
        mine = {r["metric"]: r for r in rows
                if r["section"] == "train_step" and r["provider"] == provider}
        # one step: the exclusive phases add up to the step, each op ran in it
        assert math.isclose(sum(float(mine[p]["share"]) for p in bench.PHASES), 1.0, rel_tol=1e-4)
        assert float(mine["g_fwd"]["median_ms"]) > 0 and float(mine["g_bwd"]["median_ms"]) > 0
        for op in ("word_attention", "modulated_batch_norm", "info_nce", "region_word_loss"):
            fwd, bwd = (float(mine[f"op:{op}:{k}"]["median_ms"]) for k in ("fwd", "bwd"))
            assert fwd > 0 and bwd > 0
            assert float(mine[f"op:{op}:total"]["median_ms"]) == pytest.approx(fwd + bwd, rel=1e-3)
    loaders = {r["data_backend"]: r for r in rows if r["section"] == "data_loader"}
    assert set(loaders) == {"dali", "torch"} and all(float(r["images_per_s"]) > 0
                                                     for r in loaders.values())
    printed = capsys.readouterr().out
    assert "verdict fused vs reference tiny" in printed and "verdict data wait" in printed
    for (module, name), original in ORIGINALS.items():
        assert getattr(module, name) is original, f"{module.__name__}.{name} was not restored"


@pytest.mark.filterwarnings("ignore:run.precision=bf16 on a CPU without:RuntimeWarning")
def test_bf16_provider_is_compared_with_the_fused_fp32_run(tmp_path, capsys):
    out = tmp_path / "train_step.csv"
    assert bench.main(["--configs", "tiny", "--quick", "--steps", "1", "--loader-batches", "0",
                       "--providers", "fused,fused-bf16", "--out", str(out)]) == 0
    steps = {r["provider"]: r for r in common.read_rows(out) if r["metric"] == "step"}
    assert set(steps) == {"fused", "fused-bf16"}
    bf16, fp32 = steps["fused-bf16"], steps["fused"]
    assert bf16["baseline"] == f"fused/{fp32['data_backend']}"
    assert float(bf16["ratio_to_baseline"]) == pytest.approx(
        float(bf16["median_ms"]) / float(fp32["median_ms"]), rel=1e-3)
    assert "fused-bf16 vs fused tiny" in capsys.readouterr().out


def test_memory_format_providers_are_compared_with_the_fused_run(tmp_path, capsys, monkeypatch):
    """fused-contiguous / fused-channels-last build their networks in that layout (one of them is
    the fused run's own auto choice) and report their ratio to the fused run."""
    out = tmp_path / "train_step.csv"
    built, original = [], loop.build_networks

    def recording(cfg, *args, **kwargs):
        built.append(cfg.run.memory_format)
        return original(cfg, *args, **kwargs)

    monkeypatch.setattr(loop, "build_networks", recording)
    assert bench.main(["--configs", "tiny", "--quick", "--steps", "1", "--loader-batches", "0",
                       "--providers", "fused,fused-contiguous,fused-channels-last",
                       "--out", str(out)]) == 0
    assert sorted(built) == ["auto", "channels_last", "contiguous"]
    steps = {r["provider"]: r for r in common.read_rows(out) if r["metric"] == "step"}
    assert "layout=channels_last" in steps["fused"]["backends"]  # auto on CPU
    assert "layout=contiguous" in steps["fused-contiguous"]["backends"]
    for provider in ("fused-contiguous", "fused-channels-last"):
        assert steps[provider]["baseline"] == f"fused/{steps['fused']['data_backend']}"
        assert float(steps[provider]["ratio_to_baseline"]) == pytest.approx(
            float(steps[provider]["median_ms"]) / float(steps["fused"]["median_ms"]), rel=1e-3)
    printed = capsys.readouterr().out
    assert "fused-contiguous vs fused tiny" in printed
    assert "fused-channels-last vs fused tiny" in printed


def test_unknown_provider_is_rejected():
    with pytest.raises(SystemExit):
        bench.parse_args(["--providers", "fused,bf16"])
