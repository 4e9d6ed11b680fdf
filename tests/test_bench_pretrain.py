"""benchmarks.bench_pretrain: the tiny sweep's rows, the reference memory guard, child outcomes."""
import csv
import sys

import pytest

from benchmarks import bench_pretrain as bench
from benchmarks import common


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    """One data cache per test session (the children inherit it), never the user's."""
    path = tmp_path_factory.getbasetemp() / "fastxmc-cache"
    monkeypatch.setenv("FASTXMC_CACHE", str(path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return path


def read_csv(path):
    with open(path, newline="") as src:
        return list(csv.DictReader(src))


# ---------------------------------------------------------------- the whole sweep
def test_tiny_sweep_writes_both_implementations(tmp_path, capsys):
    out = tmp_path / "pretrain.csv"
    assert bench.main(["--preset", "tiny", "--batches", "8", "--steps", "2", "--threads", "1",
                       "--out", str(out)]) == 0
    rows = {r["impl"]: r for r in read_csv(out)}
    assert sorted(rows) == ["fused", "reference"]
    for row in rows.values():
        assert row["status"] == "ok", row["note"]
        assert (row["batch"], row["timed_steps"], row["threads"]) == ("8", "2", "1")
        assert float(row["peak_rss_mb"]) > 100
        # 16 samples over the 2 timed steps, whose median is their mean.
        assert float(row["samples_per_s"]) == pytest.approx(
            8 / (float(row["median_step_ms"]) / 1e3), rel=1e-4)
    fused, ref = rows["fused"], rows["reference"]
    assert float(fused["speedup_vs_reference"]) == pytest.approx(
        float(fused["samples_per_s"]) / float(ref["samples_per_s"]), rel=1e-4)
    assert float(fused["rss_vs_reference"]) == pytest.approx(
        float(fused["peak_rss_mb"]) / float(ref["peak_rss_mb"]), rel=1e-4)
    # The reference estimate: the fused peak at this batch + the materialized region-word tensors.
    tiny = bench.loss_shapes("tiny", False)
    extra_mb = bench.REFERENCE_PAIR_FACTOR * 8 * 8 * tiny.tokens * (tiny.regions + tiny.embed_dim) \
        * 4 / 2**20
    assert float(ref["estimate_mb"]) == pytest.approx(float(fused["peak_rss_mb"]) + extra_mb,
                                                      rel=1e-4)
    printed = capsys.readouterr().out
    assert "reference at its largest batch here (8)" in printed
    assert "verdict batch 1024 fused fits in 24 GB: not run" in printed


# ---------------------------------------------------------------- the memory guard
def test_loss_shapes_and_reference_estimate():
    shapes = bench.loss_shapes("shapes", False)
    assert shapes == bench.LossShapes(tokens=24, regions=256, embed_dim=256, branches=1)
    assert bench.loss_shapes("shapes", True).branches == 2
    # 3.2 x 256^2 x 24 x (256 + 256) x 4 bytes = 9830.4 MiB above the base.
    assert bench.reference_estimate_mb(256, shapes, base_mb=1000.0) == pytest.approx(10830.4)
    assert bench.reference_estimate_mb(256, bench.loss_shapes("shapes", True), 0.0) == \
        pytest.approx(2 * 9830.4)
    with pytest.raises(ValueError, match="batch must be >= 1"):
        bench.reference_estimate_mb(0, shapes, 0.0)


def test_skip_reason_compares_with_available_minus_margin():
    assert bench.skip_reason(900.0, available_mb=3000.0, margin_mb=2048.0) is None
    why = bench.skip_reason(1000.0, available_mb=3000.0, margin_mb=2048.0)
    assert why == "estimated peak 1000 MB > available 3000 MB - margin 2048 MB"


def test_reference_is_skipped_when_the_estimate_exceeds_available(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "available_memory_mb", lambda: 100.0)

    def no_child(*args, **kwargs):
        raise AssertionError("a skipped point must not start a child")
    monkeypatch.setattr(bench, "watch_child", no_child)
    out = tmp_path / "skip.csv"
    assert bench.main(["--preset", "tiny", "--impls", "reference", "--batches", "8,16",
                       "--no-prepare", "--margin-mb", "10", "--out", str(out)]) == 0
    first, second = read_csv(out)
    assert (first["status"], second["status"]) == ("skipped", "skipped")
    assert first["note"].startswith("estimated peak 2") and "> available 100 MB - margin 10 MB" \
        in first["note"]
    assert float(first["estimate_mb"]) == pytest.approx(bench.BASE_MB + 1.8, abs=0.05)
    assert second["note"] == "the reference did not fit at batch 8"
    assert "reference: no batch fitted" in capsys.readouterr().out


# ---------------------------------------------------------------- child outcomes
def _point_of_child(code: str, monkeypatch, workdir, *extra):
    """The point measured from a child running ``code`` instead of a pretrain run."""
    args = bench.parse_args(["--preset", "tiny", "--steps", "1", *extra])
    monkeypatch.setattr(bench, "child_command", lambda *a: [sys.executable, "-c", code])
    return bench.measure_point("reference", 8, args, workdir)


def test_child_killed_by_sigkill_does_not_fit(monkeypatch, tmp_path):
    point = _point_of_child("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", monkeypatch,
                            tmp_path)
    assert point.status == "oom" and "does not fit" in point.note


def test_failing_child_reports_its_exit_code_and_stderr(monkeypatch, tmp_path):
    point = _point_of_child("import sys; sys.exit('no such dataset')", monkeypatch, tmp_path)
    assert point.status == "error"
    assert point.note.startswith("exit code 1 after 0 logged step(s)")
    assert "no such dataset" in point.note


def test_child_past_the_timeout_is_stopped(monkeypatch, tmp_path):
    point = _point_of_child("import time; time.sleep(60)", monkeypatch, tmp_path, "--timeout", "1")
    assert point.status == "timeout" and "no result within 1 s" in point.note


# ---------------------------------------------------------------- which steps are timed
def _rows(*seconds):
    return [{"step": i + 1, "step_time_s": s, "peak_rss_mb": 10.0 * (i + 1)}
            for i, s in enumerate(seconds)]


def test_step_plan_excludes_the_warmup_unless_it_is_long():
    policy = common.RepPolicy(warmup=1, min_reps=2, max_reps=10, budget_s=10.0, max_s=20.0,
                              long_call_s=60.0)
    fixed = bench.StepPlan(policy, fixed=2)
    assert fixed.child_steps() == 3
    assert fixed.timed(_rows(5.0, 1.0)) is None
    assert fixed.timed(_rows(5.0, 1.0, 2.0, 3.0)) == _rows(5.0, 1.0, 2.0)[1:]
    adaptive = bench.StepPlan(policy)
    assert adaptive.child_steps() == 11
    # A 4 s warm-up: int(10 / 4) = 2 timed steps after it.
    assert adaptive.timed(_rows(4.0, 3.0)) is None
    assert adaptive.timed(_rows(4.0, 3.0, 3.0)) == _rows(4.0, 3.0, 3.0)[1:]
    # A 100 s warm-up counts, and no more steps fit twice the budget.
    assert adaptive.timed(_rows(100.0)) == _rows(100.0)
    assert adaptive.timed([]) is None


def test_read_step_rows_ignores_a_line_being_written(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert bench.read_step_rows(metrics) == []
    metrics.write_text('{"step": 1, "step_time_s": 0.5}\n{"step": 2, "step_')
    assert bench.read_step_rows(metrics) == [{"step": 1, "step_time_s": 0.5}]


def test_command_line_errors():
    for argv in (["--impls", "fused,fast"], ["--batches", "0"], ["--steps", "0"],
                 ["--preset", "nope"], ["--set", "no_equals"], ["--budget", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
    args = bench.parse_args(["--quick", "--set", "data.backend=torch"])
    assert args.batches == [64, 256] and args.overrides == [("data.backend", "torch")]
    assert args.out == bench.DEFAULT_OUT


def test_failing_data_cache_run_stops_the_benchmark(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "child_command",
                        lambda *a: [sys.executable, "-c", "import sys; sys.exit('bad data path')"])
    out = tmp_path / "none.csv"
    assert bench.main(["--preset", "tiny", "--batches", "8", "--out", str(out)]) == 1
    assert "the data-cache run failed (exit code 1): bad data path" in capsys.readouterr().err
    assert not out.exists()
