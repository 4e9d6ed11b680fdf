"""The prebuilt-library and report helpers of the GPU scripts (benchmarks/gpu_tools.py), and the
CPU-safe parts of benchmarks/gpu_check.sh and gpu_prebuild.sh (syntax, arguments, --dry-run)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_tools

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "benchmarks" / "gpu_check.sh"
PREBUILD = ROOT / "benchmarks" / "gpu_prebuild.sh"
CUDA_OPS = ["infonce_lse_backward", "infonce_lse_forward", "modulated_bn_backward",
            "modulated_bn_forward", "region_word_backward", "region_word_forward",
            "word_attention_backward", "word_attention_forward"]


# ---------------------------------------------------------------- the ops csrc/ registers
def test_registered_ops_of_this_tree():
    ops = gpu_tools.registered_ops()
    assert ops["CUDA"] == CUDA_OPS
    # The queries-only backward is a CPU kernel alone (the GPU backends compute both gradients).
    assert ops["CPU"] == sorted(CUDA_OPS + ["word_attention_backward_queries"])
    assert set(ops["defined"]) == set(ops["CPU"]) | {"build_info"}


def test_registered_ops_ignores_comments_and_reads_every_block(tmp_path):
    (tmp_path / "csrc" / "x").mkdir(parents=True)
    (tmp_path / "csrc" / "x" / "x_cpu.cpp").write_text(
        'TORCH_LIBRARY_FRAGMENT(fastxmc, m) {\n  m.def("x_fwd(Tensor a) -> Tensor");\n'
        '  // m.def("commented(Tensor a) -> Tensor");\n}\n'
        'TORCH_LIBRARY_IMPL(fastxmc, CPU, m) {\n  m.impl("x_fwd", &x_fwd_cpu);\n}\n')
    (tmp_path / "csrc" / "x" / "x_cuda.cu").write_text(
        '#ifdef FASTXMC_WITH_CUDA\nTORCH_LIBRARY_IMPL(fastxmc, CUDA, m) {\n'
        '  m.impl("x_fwd", &x_fwd_cuda);\n  m.impl(\n      "x_bwd", &x_bwd_cuda);\n}\n#endif\n')
    ops = gpu_tools.registered_ops(tmp_path)
    assert ops == {"defined": ["x_fwd"], "CPU": ["x_fwd"], "CUDA": ["x_bwd", "x_fwd"]}


# ---------------------------------------------------------------- records and matching
def test_source_digest_follows_csrc_and_cmake(tmp_path):
    (tmp_path / "csrc" / "a").mkdir(parents=True)
    (tmp_path / "csrc" / "a" / "k.cu").write_text("kernel")
    (tmp_path / "CMakeLists.txt").write_text("project(x)")
    (tmp_path / "README.md").write_text("docs")
    first = gpu_tools.source_digest(tmp_path)
    (tmp_path / "README.md").write_text("other docs")      # not compiled: no change
    assert gpu_tools.source_digest(tmp_path) == first
    (tmp_path / "csrc" / "a" / "k.cu").write_text("kernel2")
    assert gpu_tools.source_digest(tmp_path) != first
    (tmp_path / "csrc" / "a" / "k.cu").write_text("kernel")
    assert gpu_tools.source_digest(tmp_path) == first
    (tmp_path / "csrc" / "a" / "k.cu").rename(tmp_path / "csrc" / "a" / "j.cu")  # same bytes
    assert gpu_tools.source_digest(tmp_path) != first


def _record(**overrides):
    rec = {"torch": "2.11.0+cu130", "torch_cuda": "13.0", "python_abi": "cpython-312-x86_64-linux-gnu",
           "source_digest": "abc", "cuda_archs": "9.0"}
    rec.update(overrides)
    return rec


def test_mismatches_name_each_difference():
    rec = _record()
    assert gpu_tools.mismatches(rec, dict(rec)) == []
    assert gpu_tools.mismatches(rec, dict(rec), arch="9.0") == []
    why = gpu_tools.mismatches(rec, _record(torch="2.12.0+cu130", python_abi="cpython-311-x86_64-linux-gnu"))
    assert len(why) == 2
    assert why[0].startswith("torch: prebuilt for '2.11.0+cu130', running '2.12.0+cu130'")
    assert why[1].startswith("python_abi:")
    assert gpu_tools.mismatches(rec, _record(source_digest="def"))[0].startswith("source_digest")
    assert gpu_tools.mismatches(rec, _record(torch_cuda="12.8"))[0].startswith("torch_cuda")
    assert gpu_tools.mismatches(rec, dict(rec), arch="8.0") == [
        "cuda_archs: prebuilt for '9.0', this GPU is 8.0"]
    assert gpu_tools.mismatches(_record(cuda_archs="8.0;9.0+PTX"), _record(), arch="9.0") == []


def _write_prebuilt(tmp_path, **overrides) -> Path:
    lib = tmp_path / "_C.so"
    lib.write_bytes(b"not really a library")
    rec = {**gpu_tools.current_environment(), "cuda_archs": "9.0", "library": "_C.so",
           "sha256": hashlib.sha256(lib.read_bytes()).hexdigest(), **overrides}
    meta = tmp_path / "prebuilt.json"
    meta.write_text(json.dumps(rec))
    return meta


def test_match_command(tmp_path, capsys):
    meta = _write_prebuilt(tmp_path)
    assert gpu_tools.main(["match", str(meta), "--arch", "9.0"]) == 0
    assert "prebuilt library matches" in capsys.readouterr().out
    assert gpu_tools.main(["match", str(meta), "--arch", "8.6"]) == 1
    assert "this GPU is 8.6" in capsys.readouterr().out
    (tmp_path / "_C.so").write_bytes(b"another build")
    assert gpu_tools.main(["match", str(meta)]) == 1
    assert "sha256 differs" in capsys.readouterr().out
    meta = _write_prebuilt(tmp_path, torch="1.0.0")
    assert gpu_tools.main(["match", str(meta)]) == 1
    assert f"running {torch.__version__!r}" in capsys.readouterr().out
    assert gpu_tools.main(["match", str(tmp_path / "missing.json")]) == 1


def test_verify_this_trees_library(capsys):
    # The library the suite runs with (conftest requires it): every CPU kernel of csrc/, and the
    # CUDA ones exactly when it was built with them.
    lib = ROOT / "fastxmc" / "_C.so"
    cuda = json.loads(torch.ops.fastxmc.build_info())["cuda"]
    assert gpu_tools.verify(lib, need_cuda=cuda, archs=None) == []
    out = capsys.readouterr().out
    assert "infonce_lse_forward" in out and "build_info" in out
    if not cuda:
        problems = gpu_tools.verify(lib, need_cuda=True, archs=None)
        assert any("without the CUDA kernels" in p for p in problems)


def test_sm_name():
    assert gpu_tools.sm_name("9.0") == "sm_90" and gpu_tools.sm_name("8.0+PTX") == "sm_80"


# ---------------------------------------------------------------- test results
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="5">
<testcase classname="tests.test_a" name="test_ok[cuda]" time="1.0"/>
<testcase classname="tests.test_a" name="test_bad" time="1.0"><failure message="AssertionError: 1 != 2&#10;more">tb</failure></testcase>
<testcase classname="tests.test_a" name="test_bad" time="0.1"><error message="teardown broke">tb</error></testcase>
<testcase classname="tests.test_b" name="test_skip"><skipped type="pytest.skip" message="needs a GPU"/></testcase>
<testcase classname="tests.test_b" name="test_crash"><error message="worker 'gw1' crashed while running 'x'"/></testcase>
<testcase classname="" name="" time="0"/>
</testsuite></testsuites>"""


def test_junit_counts(tmp_path):
    path = tmp_path / "tests.xml"
    path.write_text(JUNIT)
    counts = gpu_tools.junit_counts(path)
    # test_bad failed its call and errored its teardown: once, as an error
    assert {k: counts[k] for k in ("tests", "passed", "failed", "error", "skipped")} == \
        {"tests": 4, "passed": 1, "failed": 0, "error": 2, "skipped": 1}
    assert ("tests.test_a::test_bad", "error", "teardown broke") in counts["problems"]
    text = gpu_tools.format_counts(counts, "tests.xml", collected=6)
    assert text.splitlines()[0] == ("4 tests: 1 passed, 0 failed, 2 errors, 1 skipped (from "
                                    "tests.xml); 6 collected, 2 without a result")


def test_log_counts_and_collected():
    xdist = ("8 workers [106 items]\n"
             "[gw0] [  1%] PASSED tests/test_a.py::test_ok[cuda] \n"
             "[gw3] [  2%] FAILED tests/test_a.py::test_bad \n"
             "[gw1] [  3%] SKIPPED tests/test_b.py::test_skip \n")
    counts = gpu_tools.log_counts(xdist)
    assert (counts["tests"], counts["passed"], counts["failed"], counts["skipped"]) == (3, 1, 1, 1)
    assert gpu_tools.collected_count(xdist) == 106
    plain = ("collected 1080 items / 974 deselected / 106 selected\n"
             "tests/test_a.py::test_ok PASSED    [  1%]\ntests/test_a.py::test_ok ERROR   [  1%]\n")
    counts = gpu_tools.log_counts(plain)
    assert (counts["tests"], counts["error"]) == (1, 1)   # the last outcome reported counts
    assert gpu_tools.collected_count(plain) == 106
    assert gpu_tools.collected_count("no header") is None


def test_table_keeps_the_last_run(tmp_path, capsys):
    path = tmp_path / "r.csv"
    path.write_text("run_id,provider,n,median_ms,metric\n1,old,16,3.0,step\n"
                    "2,fastxmc-cuda,16384,12.3456789,step\n2,materialized,16384,40,data\n")
    assert [r["provider"] for r in gpu_tools.last_run_rows(path)] == ["fastxmc-cuda", "materialized"]
    assert gpu_tools.main(["table", str(path), "--cols", "provider,n,median_ms",
                           "--where", "metric=step"]) == 0
    assert capsys.readouterr().out.splitlines() == ["provider      n      median_ms",
                                                    "fastxmc-cuda  16384  12.35    "]
    assert gpu_tools.main(["table", str(tmp_path / "none.csv"), "--cols", "a"]) == 1


# ---------------------------------------------------------------- the scripts
def _bash(*args, **env):
    return subprocess.run(["bash", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


@pytest.mark.parametrize("script", [CHECK, PREBUILD])
def test_scripts_parse(script):
    assert _bash("-n", script).returncode == 0


def test_gpu_check_rejects_bad_arguments(tmp_path):
    out = _bash(CHECK, "--dry-run", "bogus", OUT=str(tmp_path))
    assert out.returncode == 2 and "unknown stage bogus" in out.stderr
    out = _bash(CHECK, "--dry-run", "quick", "tests", OUT=str(tmp_path))
    assert out.returncode == 2 and "quick is a whole plan" in out.stderr
    assert _bash(PREBUILD, "--bogus").returncode == 2


def test_gpu_check_quick_dry_run(tmp_path):
    out = _bash(CHECK, "--dry-run", "quick", OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    total = next(line.split() for line in lines if line.strip().startswith("total"))
    assert int(total[2]) <= 520 and int(total[1]) < int(total[2])     # expected < timeouts
    files = next(line for line in lines if "files in $OUT" in line)
    assert "(8 of at most 8)" in files
    assert "--sizes 16384,32768,65536" in out.stdout and "--junit-xml" in out.stdout
    assert "prebuilt library against" in out.stdout
    # The dry run leaves nothing behind in $OUT.
    assert not list((tmp_path / "out").glob("*"))


def test_gpu_check_dry_run_uses_a_matching_prebuilt(tmp_path):
    """The match decision of the dry run, against this Python: a record of this environment and
    tree is used, one of another torch is not."""
    work = tmp_path / "tree"
    shutil.copytree(ROOT / "benchmarks", work / "benchmarks",
                    ignore=shutil.ignore_patterns("results", "__pycache__"))
    shutil.copytree(ROOT / "csrc", work / "csrc")
    shutil.copy(ROOT / "CMakeLists.txt", work)
    (work / ".gpu-prebuilt").mkdir()
    meta = _write_prebuilt(work / ".gpu-prebuilt")
    out = _bash(work / "benchmarks" / "gpu_check.sh", "--dry-run", "build", PYTHON=sys.executable,
                ARCH="9.0", OUT=str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    assert "would use .gpu-prebuilt/_C.so" in out.stdout
    _write_prebuilt(work / ".gpu-prebuilt", torch="0.0.1")
    out = _bash(work / "benchmarks" / "gpu_check.sh", "--dry-run", "build", PYTHON=sys.executable,
                ARCH="9.0", OUT=str(tmp_path / "out"))
    assert "torch: prebuilt for '0.0.1'" in out.stdout and "would compile" in out.stdout
    assert meta.is_file()


def test_glibc_requirement(monkeypatch):
    monkeypatch.setattr(gpu_tools.platform, "libc_ver", lambda: ("glibc", "2.36"))
    assert gpu_tools.glibc_problem({"glibc_required": "2.32"}) is None
    assert gpu_tools.glibc_problem({"glibc_required": None}) is None
    assert gpu_tools.glibc_problem({"glibc_required": "2.39"}) == \
        "glibc: the library needs 2.39, this machine has 2.36"
    monkeypatch.setattr(gpu_tools.platform, "libc_ver", lambda: ("glibc", "2.4"))
    assert gpu_tools.glibc_problem({"glibc_required": "2.32"}) is not None  # 2.4 < 2.32
    if shutil.which("readelf"):
        needed = gpu_tools.glibc_required(ROOT / "fastxmc" / "_C.so")
        assert needed and gpu_tools._version_key(needed) >= (2, 2)


def test_junit_command_prefers_the_fuller_record(tmp_path, capsys):
    xml, log = tmp_path / "tests.xml", tmp_path / "tests.log"
    xml.write_text('<testsuites><testsuite name="pytest"></testsuite></testsuites>')  # stopped early
    log.write_text("8 workers [3 items]\n[gw0] [ 33%] PASSED tests/test_a.py::test_ok \n")
    assert gpu_tools.main(["junit", str(xml), "--log", str(log)]) == 0
    assert capsys.readouterr().out.startswith(
        "1 tests: 1 passed, 0 failed, 0 errors, 0 skipped (from tests.log); 3 collected, "
        "2 without a result")
    xml.unlink()
    assert gpu_tools.main(["junit", str(xml), "--log", str(log)]) == 0
    assert "(from tests.log, no XML)" in capsys.readouterr().out
    log.unlink()
    assert gpu_tools.main(["junit", str(xml), "--log", str(log)]) == 1


def test_table_adds_the_share_of_the_bound(tmp_path, capsys):
    path = tmp_path / "infonce.csv"
    # 64k x 64k x 768 bf16 full mode: bound 33.40 ms (tests/test_roofline.py), so 66.81 ms is 50%
    path.write_text("run_id,provider,n,m,d,dtype,mode,median_ms,status\n"
                    "1,fastxmc-triton,65536,65536,768,bf16,full,66.8058,ok\n"
                    "1,materialized,65536,65536,768,bf16,full,,skipped\n")
    assert gpu_tools.main(["table", str(path), "--bound", "infonce",
                           "--cols", "provider,median_ms,status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["provider", "median_ms", "pct_of_bound", "status"]
    assert lines[1].split() == ["fastxmc-triton", "66.81", "50", "ok"]
    assert lines[2].split() == ["materialized", "skipped"]
