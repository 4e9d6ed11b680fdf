"""The sweep scaffolding the kernel benchmarks share (benchmarks/sweep.py), and one tiny run of
each kernel benchmark: its CSV header, providers and baseline ratios."""
import argparse
import csv

import pytest
import torch

from benchmarks import bench_infonce, bench_modulation, bench_region_word, bench_word_attention
from benchmarks import common, sweep

FAST = common.RepPolicy(warmup=1, min_reps=1, max_reps=2, budget_s=0.01, max_s=0.5)
CPU = torch.device("cpu")


def _measured(median_ms: float, peak_mb=None, loss=None) -> common.Measurement:
    peak = None if peak_mb is None else int(peak_mb * common.MB)
    return common.Measurement([median_ms] * 3, peak, median_ms, loss)


# ---------------------------------------------------------------- small helpers
def test_csv_list_drops_empty_items_and_casts():
    assert sweep.csv_list("a,,b,") == ["a", "b"]
    assert sweep.csv_list("8, 64", int) == [8, 64]


def test_cell_and_verdict():
    assert sweep.cell(None, "9.1f") == "-"
    assert sweep.cell(1.25, "6.2f") == "  1.25"
    assert (sweep.verdict(True), sweep.verdict(False)) == ("PASS", "FAIL")


def test_failed_row_tells_oom_from_error_and_keeps_the_first_line():
    oom = sweep.Row.failed("p", "fwd", RuntimeError("CPU: out of memory\ntrying to allocate"))
    assert (oom.status, oom.note) == ("oom", "RuntimeError: CPU: out of memory")
    err = sweep.Row.failed("p", "bwd", ValueError("x" * 300))
    assert err.status == "error" and err.note == "ValueError: " + "x" * 200
    assert err.timestamp and err.result is None


def test_skipped_rows_one_per_mode():
    rows = sweep.Row.skipped("p", ["fwd", "full"], "too big")
    assert [(r.mode, r.status, r.note) for r in rows] == [("fwd", "skipped", "too big"),
                                                          ("full", "skipped", "too big")]


def test_memory_skip_compares_with_the_share_of_available_memory():
    free = common.available_memory_bytes(CPU)
    assert sweep.memory_skip(0, CPU) is None
    why = sweep.memory_skip(free, CPU, share=0.5)
    assert why.startswith(f"estimated peak {free / common.MB:.0f} MB > 50% of available")


# ---------------------------------------------------------------- timing one provider
def _linear():
    """w (requires grad), x and forward() = sum(w * x): its gradient is x."""
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    x = torch.tensor([4.0, 5.0, 6.0])
    return w, x, lambda: (w * x).sum()


def test_full_call_gives_the_gradient_once_and_returns_the_loss():
    w, x, forward = _linear()
    setup, call = sweep.mode_calls(forward, [w], "full")
    for _ in range(2):  # the setup clears the gradient: no accumulation
        out = call(setup())
    assert torch.equal(w.grad, x)
    assert out.item() == 32.0 and not out.requires_grad
    setup, call = sweep.mode_calls(forward, [w], "full", keep_output=False)
    assert call(setup()) is None


def test_bwd_call_differentiates_the_untimed_forward_with_the_upstream_gradient():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    x, upstream = torch.tensor([3.0, 4.0]), torch.tensor([10.0, 100.0])
    setup, call = sweep.mode_calls(lambda: w * x, [w], "bwd", upstream)
    w.grad = torch.ones(2)
    out = setup()
    assert w.grad is None and out.requires_grad
    call(out)
    assert torch.equal(w.grad, upstream * x)


def test_fwd_call_records_autograd_but_computes_no_gradient():
    w, _, forward = _linear()
    setup, call = sweep.mode_calls(forward, [w], "fwd")
    out = call(setup())
    assert out.requires_grad and w.grad is None


def test_measure_mode_clears_the_gradients_even_when_the_call_raises():
    w, _, forward = _linear()
    res = sweep.measure_mode(forward, [w], "full", CPU, FAST)
    assert res.result == 32.0 and res.reps >= 1 and w.grad is None

    def broken():
        forward().backward()  # leaves a gradient, then fails
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        sweep.measure_mode(broken, [w], "fwd", CPU, FAST)
    assert w.grad is None


def test_run_provider_rows_per_mode_with_checksum_in_fwd_only():
    w, _, forward = _linear()
    rows = list(sweep.run_provider("p", forward, [w], ["fwd", "full"], CPU, FAST,
                                   checksum=lambda: 7.0))
    assert [(r.provider, r.mode, r.status, r.checksum) for r in rows] == [
        ("p", "fwd", "ok", 7.0), ("p", "full", "ok", None)]


def test_run_provider_turns_each_failing_mode_into_a_row():
    def oom():
        raise RuntimeError("out of memory")
    rows = list(sweep.run_provider("p", oom, [], ["fwd", "bwd"], CPU, FAST))
    assert [(r.mode, r.status) for r in rows] == [("fwd", "oom"), ("bwd", "oom")]


def test_gemm_baseline_names_and_rows():
    gemm = sweep.GemmBaseline({"fwd": 2, "full": 6}, unit="bmm")
    assert gemm.name("full") == "6bmm"
    calls = []

    def gemm_calls(k):
        if k == 6:
            raise RuntimeError("no kernel")
        return lambda _: calls.append(k)
    rows = list(gemm.rows(gemm_calls, ["fwd", "full"], CPU, FAST))
    assert [(r.provider, r.status) for r in rows] == [("2bmm", "ok"), ("6bmm", "error")]
    assert set(calls) == {2}


# ---------------------------------------------------------------- baselines
def test_baselines_record_the_gemm_and_reference_rows_of_each_mode():
    base = sweep.Baselines("ref", lambda mode: {"fwd": "1mm", "full": "4mm"}[mode])
    rows = [sweep.Row("4mm", "full", "ok", _measured(2.0)),
            sweep.Row("ref", "full", "ok", _measured(10.0, peak_mb=8.0, loss=1.5)),
            sweep.Row("ref", "fwd", "error", note="failed"),
            sweep.Row("fused", "full", "ok", _measured(4.0, peak_mb=2.0, loss=1.5))]
    assert list(base.recorded(rows)) == rows
    assert base.gemm_ms == {"full": 2.0} and base.ref_ms == {"full": 10.0}
    assert base.ref_mb == {"full": 8.0} and base.ref_loss == 1.5
    fused = rows[3]
    assert (base.ratio_to_gemm(fused), base.speedup(fused), base.memory_ratio(fused)) == (
        2.0, 2.5, 0.25)
    unmeasured = sweep.Row("fused", "fwd", "ok", _measured(4.0))
    assert base.ratio_to_gemm(unmeasured) is None and base.speedup(unmeasured) is None
    assert base.memory_ratio(unmeasured) is None


def test_baselines_note_a_loss_that_differs_from_the_reference():
    base = sweep.Baselines("ref")
    rows = [sweep.Row("ref", "full", "ok", _measured(1.0, loss=2.0)),
            sweep.Row("close", "full", "ok", _measured(1.0, loss=2.0005)),
            sweep.Row("far", "full", "ok", _measured(1.0, loss=2.5), note="n")]
    list(base.recorded(rows, loss_abs_tol=1e-4))
    assert rows[1].note == ""
    assert rows[2].note == "n LOSS MISMATCH 2.5 vs ref 2"


# ---------------------------------------------------------------- providers
class _P:
    def __init__(self, name, why=None):
        self.name, self.why = name, why


def test_select_providers_puts_the_baseline_first_and_prints_skips(capsys):
    every = {p.name: p for p in (_P("fused"), _P("gpu", "GPU only"), _P("ref"))}
    chosen = sweep.select_providers(every, None, lambda p: p.why, "ref")
    assert [p.name for p in chosen] == ["ref", "fused"]
    assert "# skip gpu: GPU only" in capsys.readouterr().out
    chosen = sweep.select_providers(every, ["fused", "4mm"], lambda p: p.why, "ref")
    assert [p.name for p in chosen] == ["fused"]


def test_select_providers_rejects_unknown_names():
    every = {"ref": _P("ref")}
    with pytest.raises(SystemExit, match=r"unknown providers for op: \['x'\]"):
        sweep.select_providers(every, ["x"], lambda p: None, "ref", what="providers for op")
    with pytest.raises(SystemExit, match=r"unknown providers: \['4mm'\]"):
        sweep.select_providers(every, ["4mm"], lambda p: None, "ref", gemm_baseline=False)


# ---------------------------------------------------------------- reporting
def test_csv_row_merges_metadata_case_row_and_statistics():
    row = sweep.Row("p", "full", "ok", _measured(3.0, peak_mb=1.0))
    out = sweep.csv_row(row, {"commit": "c"}, {"n": 8}, baseline="4mm")
    assert out["commit"] == "c" and out["n"] == 8 and out["baseline"] == "4mm"
    assert (out["provider"], out["mode"], out["status"]) == ("p", "full", "ok")
    assert (out["median_ms"], out["reps"], out["peak_extra_mb"]) == (3.0, 3, 1.0)
    assert "median_ms" not in sweep.csv_row(sweep.Row("p", "fwd", "skipped"), {}, {})


def test_print_table_row_layout(capsys):
    row = {"status": "ok", "median_ms": 12.345, "p20_ms": 1.0, "p80_ms": 22.0, "reps": 5,
           "peak_extra_mb": None, "ratio": 1.5, "note": "n"}
    sweep.print_table_row("LEAD", row, [("ratio", "6.2f")], median_fmt=">10.2f", spread_width=9)
    sweep.print_table_row("LEAD", dict(row, status="oom", note="why"), [])
    assert capsys.readouterr().out.splitlines() == [
        "LEAD      12.35  1.0-22.0    5 -   1.50  n",
        "LEAD        OOM  why"]


def test_report_prints_and_appends_each_row(tmp_path, capsys):
    path = tmp_path / "r.csv"
    rows = [sweep.Row("a", "fwd", "ok", _measured(1.0)), sweep.Row("b", "fwd", "skipped")]
    out = sweep.report(rows, lambda r: sweep.csv_row(r, {}, {}), lambda r: print(r["provider"]),
                       path, ["provider", "status", "median_ms"])
    assert [r["provider"] for r in out] == ["a", "b"]
    assert capsys.readouterr().out.split() == ["a", "b"]
    with open(path, newline="") as f:
        assert list(csv.reader(f)) == [["provider", "status", "median_ms"], ["a", "ok", "1"],
                                       ["b", "skipped", ""]]


# ---------------------------------------------------------------- command line
def test_resolve_modes_defaults_and_rejects_unknown_modes():
    p = argparse.ArgumentParser()
    assert sweep.resolve_modes(p, None, ["full"]) == ["full"]
    assert sweep.resolve_modes(p, ["bwd"], ["full"]) == ["bwd"]
    with pytest.raises(SystemExit):
        sweep.resolve_modes(p, ["fwd", "back"], ["full"])


def test_open_device_sets_threads_and_refuses_missing_cuda(capsys):
    threads = torch.get_num_threads()
    try:
        assert sweep.open_device(argparse.Namespace(device="cpu", threads=1)) == CPU
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    if not torch.cuda.is_available():
        assert sweep.open_device(argparse.Namespace(device="cuda", threads=None)) is None
        assert "torch.cuda is not available" in capsys.readouterr().err


# ---------------------------------------------------------------- each benchmark, tiny
TIMING = ["--reps", "1", "--budget", "0.01", "--threads", "1"]
RUNS = {
    "infonce": (bench_infonce, ["--sizes", "32", "--dim", "16", "--modes", "fwd,full",
                                "--providers", "materialized,fastxmc-torch", "--min-reps", "1",
                                "--max-seconds", "0.5"], "materialized", "speedup_vs_materialized",
                "ratio_to_4mm", {"1mm", "4mm", "materialized", "fastxmc-torch"}),
    "region_word": (bench_region_word, ["--sizes", "2", "--words", "4", "--regions", "4",
                                        "--dim", "8", "--modes", "fwd,full", "--providers",
                                        "reference,fastxmc-torch", "--max-seconds", "0.5"],
                    "reference", "speedup_vs_reference", "ratio_to_4mm",
                    {"1mm", "4mm", "reference", "fastxmc-torch"}),
    "word_attention": (bench_word_attention, ["--cases", "shapes", "--batches", "2",
                                              "--regions", "4", "--dim", "8", "--modes",
                                              "fwd,full", "--providers", "reference,fastxmc-cpu"],
                       "reference", "speedup_vs_reference", "ratio_to_gemm",
                       {"2bmm", "6bmm", "reference", "fastxmc-cpu"}),
    "modulation": (bench_modulation, ["--batches", "2", "--stages", "4x4", "--modulation",
                                      "pixel", "--relu", "1", "--modes", "fwd,full",
                                      "--rounds", "1"], "composition", "speedup_vs_composition",
                   None, {"composition", "fastxmc-cpu"}),
}


@pytest.fixture
def _keep_threads():
    """The runs set torch's thread count (--threads 1): restore it for the other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(RUNS))
def test_benchmark_tiny_run(name, tmp_path, capsys, _keep_threads):
    module, argv, reference, speedup, ratio, providers = RUNS[name]
    out = tmp_path / f"{name}.csv"
    assert module.main(argv + TIMING + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert module.HEADER in printed and "summary" in printed
    with open(out, newline="") as f:
        assert next(csv.reader(f)) == module.COLUMNS
    rows = common.read_rows(out)
    assert all(r["status"] == "ok" for r in rows), [r["note"] for r in rows]
    assert {r["mode"] for r in rows} == {"fwd", "full"}
    # Every row is compared with the reference measured in the same run: the reference with
    # itself (1), the GEMM baseline with itself (1).
    for r in rows:
        if r["provider"] == reference:
            assert float(r[speedup]) == 1.0
        if ratio and r["provider"] == r["baseline"]:
            assert float(r[ratio]) == 1.0
    assert {r["provider"] for r in rows} == providers


def test_word_attention_benchmark_conv_layout(tmp_path, capsys, _keep_threads):
    """--layout conv: G's transposed (B, d, R) queries; rows say so in their case, with the same
    checksum check against the reference (no MISMATCH note)."""
    out = tmp_path / "wa.csv"
    argv = ["--cases", "shapes", "--batches", "2", "--regions", "6", "--dim", "8", "--modes", "full",
            "--providers", "reference,fastxmc-cpu", "--layout", "conv"]
    assert bench_word_attention.main(argv + TIMING + ["--out", str(out)]) == 0
    assert "summary" in capsys.readouterr().out
    rows = common.read_rows(out)
    assert {r["case"] for r in rows} == {"shapes-conv"}
    assert all(r["status"] == "ok" and "MISMATCH" not in r["note"] for r in rows)
    x = bench_word_attention.setup_inputs(2, 6, 4, 8, torch.float32, torch.device("cpu"), layout="conv")
    assert x.queries.transpose(1, 2).is_contiguous() and x.grad.transpose(1, 2).is_contiguous()
