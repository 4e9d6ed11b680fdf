"""Fault paths of a training run: crashes, damaged checkpoints, full disks, a lost rank.

Each fault is real or injected at a chosen moment (tests/fault_injection.py), on the tiny preset;
what must hold afterwards is what docs/reliability.md promises: ``--resume`` gives
the losses of an uninterrupted run, a damaged checkpoint is set aside and the one before it used,
a failed write leaves no temporary file and the previous files intact and ends the run with one
line naming the path, the cause and the last good checkpoint.
"""
import errno
import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import fastxmc.atomic as atomic
from fastxmc.train import checkpoint as ckpt
from fastxmc.train import loop
from fastxmc.train.config import build_config, read_config
from fastxmc.train.logging import read_metrics, truncate_metrics

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 6, 2   # tiny runs of 6 steps, a checkpoint every 2
LOSS_KEYS = ("loss_d", "loss_g", "d_hinge", "d_sentence", "d_word", "g_adv", "g_sentence",
             "g_word", "g_image")
TRAIN_ARGS = ["--preset", "tiny", "--steps", str(STEPS), "--log-every", "1", "--quiet",
              f"--run.checkpoint_every={EVERY}", "--run.keep_checkpoints=3",
              "--run.tensorboard=false"]


@pytest.fixture(autouse=True)
def cache(one_thread_data_cache):
    return one_thread_data_cache


def tiny(out, steps=STEPS):
    return build_config("tiny", [("run.out", str(out)), ("run.quiet", "true"),
                                 ("run.tensorboard", "false"), ("run.steps", str(steps)),
                                 ("run.log_every", "1"), ("run.checkpoint_every", str(EVERY)),
                                 ("run.keep_checkpoints", "3")])


def run_cli(out: Path, cache_dir: Path, *extra, fault=None, timeout=300) -> subprocess.CompletedProcess:
    """``python -m fastxmc.train`` on the tiny preset (with ``fault`` = (name, step) injected)."""
    env = {**os.environ, "FASTXMC_CACHE": str(cache_dir), "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    env.pop("FASTXMC_DEBUG", None)
    head = ([sys.executable, str(ROOT / "tests" / "fault_injection.py"), fault[0], str(fault[1]), "--"]
            if fault else [sys.executable, "-m", "fastxmc.train"])
    return subprocess.run([*head, *TRAIN_ARGS, "--out", str(out), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The losses of the tiny run straight through (the reference of every resumed run)."""
    out = tmp_path_factory.mktemp("faults") / "straight"
    cache_dir = tmp_path_factory.getbasetemp() / "fastxmc-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTXMC_CACHE", str(cache_dir))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            loop.train(tiny(out))
        finally:
            torch.set_num_threads(threads)
    return out, read_metrics(out)


def assert_same_losses(records, reference):
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for got, want in zip(records, reference):
        for key in LOSS_KEYS:
            assert got[key] == want[key], (got["step"], key)  # resume is exact: bit-equal


def temporaries(folder: Path) -> list:
    return sorted(p.name for p in folder.rglob(f"*{atomic.TEMP_MARK}*"))


# ---------------------------------------------------------------- crashes, then --resume
@pytest.mark.parametrize("fault,step", [("kill-after-step", 3), ("kill-mid-step", 5),
                                        ("kill-in-checkpoint", 4)])
def test_sigkill_then_resume_gives_the_uninterrupted_losses(tmp_path, cache, uninterrupted,
                                                            fault, step):
    out = tmp_path / "run"
    killed = run_cli(out, cache, fault=(fault, step))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    if fault == "kill-in-checkpoint":
        assert temporaries(out / ckpt.CHECKPOINT_DIR), "the injected crash left no partial file"
    resumed = loop.train(tiny(out), resume=True)
    assert resumed.status == "completed" and resumed.step == STEPS
    assert temporaries(out) == []  # the partial file of the killed write is gone
    assert list((out / ckpt.CHECKPOINT_DIR).glob("*.bad")) == []  # nothing was damaged
    assert_same_losses(read_metrics(out), uninterrupted[1])


# ---------------------------------------------------------------- damaged checkpoints
def truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 3)


def flip_a_bit(path: Path) -> None:
    """Flip one bit inside the largest tensor's stored bytes (torch.load does not notice)."""
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    with open(path, "r+b") as handle:
        handle.seek(record.header_offset)
        header = handle.read(30)
        start = record.header_offset + 30 + int.from_bytes(header[26:28], "little") + \
            int.from_bytes(header[28:30], "little")
        handle.seek(start + record.file_size // 2)
        byte = handle.read(1)[0]
        handle.seek(start + record.file_size // 2)
        handle.write(bytes([byte ^ 0x04]))


@pytest.mark.parametrize("damage", [truncate, flip_a_bit], ids=["truncated", "bit-flipped"])
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_one_before_used(tmp_path, capsys,
                                                                         uninterrupted, damage):
    out = tmp_path / "run"
    loop.train(tiny(out, steps=4))
    latest = ckpt.checkpoint_path(out, 4)
    damage(latest)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_checkpoint(latest)
    capsys.readouterr()
    resumed = loop.train(tiny(out), resume=True)
    err = capsys.readouterr().err
    reported = [line for line in err.splitlines() if "unusable" in line]
    assert len(reported) == 1 and str(latest) in reported[0], err
    assert "resuming from" in err and "ckpt-00000002.pt" in err
    assert (latest.with_name(latest.name + ckpt.BAD_SUFFIX)).is_file()  # kept, never deleted
    assert resumed.step == STEPS
    assert_same_losses(read_metrics(out), uninterrupted[1])


def test_with_no_valid_checkpoint_resume_lists_what_it_tried(tmp_path):
    out = tmp_path / "run"
    loop.train(tiny(out, steps=4))
    for path in ckpt.list_checkpoints(out):
        truncate(path)
    with pytest.raises(FileNotFoundError, match=r"no valid checkpoint .* tried ckpt-00000004\.pt "
                                                r"\(unreadable.*ckpt-00000002\.pt \(unreadable"):
        loop.train(tiny(out), resume=True)
    assert sorted(p.name for p in (out / ckpt.CHECKPOINT_DIR).iterdir()) == [
        "ckpt-00000002.pt.bad", "ckpt-00000004.pt.bad"]


def test_readers_skip_a_damaged_checkpoint_and_never_change_the_run(tmp_path, capsys):
    """load_run (fastxmc.sample, fastxmc.eval) warns and takes the newest valid checkpoint; an
    explicitly named damaged file is an error naming it; the sampler reports it in one line."""
    out = tmp_path / "run"
    loop.train(tiny(out, steps=4))
    latest = ckpt.checkpoint_path(out, 4)
    flip_a_bit(latest)
    with pytest.warns(RuntimeWarning, match="ckpt-00000004.pt is unusable.*digest"):
        run = ckpt.load_run(out)
    assert run.step == 2 and latest.is_file()  # left in place
    with pytest.raises(ckpt.CheckpointError, match="ckpt-00000004.pt is unusable"):
        ckpt.load_run(out, checkpoint=latest)
    from fastxmc.sample import main as sample_main
    capsys.readouterr()
    code = sample_main(["--run", str(out), "--caption", "a red circle", "--n", "1",
                        "--checkpoint", str(latest), "--out", str(tmp_path / "grid.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "digest" in err[0]


def test_a_checkpoint_is_verified_before_older_ones_are_rotated_out(tmp_path, monkeypatch):
    """A write whose read-back fails never takes the final name and removes nothing."""
    ckpt.save_checkpoint({"step": 1, "x": torch.arange(3)}, tmp_path, keep=1)
    real_read = ckpt._read

    def read_garbage(path, map_location):
        state = real_read(path, map_location)
        state["x"] = state["x"] + 1  # what a bad disk or a faulty write would hand back
        return state
    monkeypatch.setattr(ckpt, "_read", read_garbage)
    with pytest.raises(ckpt.CheckpointError, match="digest"):
        ckpt.save_checkpoint({"step": 2, "x": torch.arange(3)}, tmp_path, keep=1)
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000001.pt"]
    assert temporaries(tmp_path) == []


def test_checkpoints_of_the_previous_format_still_load(tmp_path):
    path = ckpt.checkpoint_path(tmp_path, 3)
    path.parent.mkdir(parents=True)
    torch.save({"format": 1, "step": 3, "x": torch.ones(2)}, path)
    assert ckpt.load_checkpoint(path)["step"] == 3
    torch.save({"format": 1, "step": 4, "x": torch.ones(2)}, path)
    with pytest.raises(ckpt.CheckpointError, match="holds step 4, its name says 3"):
        ckpt.load_checkpoint(path)


# ---------------------------------------------------------------- full disks
def mount_tmpfs(where: Path, size_bytes: int) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
                          capture_output=True)
    return done.returncode == 0


def assert_one_line_write_error(proc, path_part: str, last_good: str | None):
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert path_part in line and "No space left on device" in line and "free there" in line, line
    if last_good:
        assert f"the last good checkpoint is {last_good}" in line, line


def test_a_full_filesystem_during_a_checkpoint_write(tmp_path, cache, uninterrupted):
    """A real full disk: a tmpfs that holds one checkpoint but not a second one. Where this
    process may not mount one, the same write fails by injection (ENOSPC) instead."""
    size = ckpt.checkpoint_path(uninterrupted[0], 2).stat().st_size
    mount = tmp_path / "small"
    mounted = mount_tmpfs(mount, int(size * 1.6) + (1 << 20))
    out = mount / "run"
    try:
        proc = run_cli(out, cache) if mounted else run_cli(out, cache,
                                                          fault=("enospc-in-checkpoint", 4))
        assert_one_line_write_error(proc, str(ckpt.checkpoint_path(out, 4)),
                                    str(ckpt.checkpoint_path(out, 2)))
        assert temporaries(out) == []
        assert [p.name for p in ckpt.list_checkpoints(out)] == ["ckpt-00000002.pt"]
        ckpt.load_checkpoint(ckpt.checkpoint_path(out, 2))  # intact and verified
        assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], check=False)


def test_an_injected_full_disk_in_a_checkpoint_write(tmp_path, cache):
    out = tmp_path / "run"
    proc = run_cli(out, cache, fault=("enospc-in-checkpoint", 4))
    assert_one_line_write_error(proc, "ckpt-00000004.pt", str(ckpt.checkpoint_path(out, 2)))
    assert temporaries(out) == []
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["ckpt-00000002.pt"]
    resumed = run_cli(out, cache, "--resume")  # space is back: the run goes on from step 2
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS + 1))


def test_a_full_disk_writing_the_metrics_line(tmp_path, cache):
    out = tmp_path / "run"
    proc = run_cli(out, cache, fault=("enospc-in-metrics", 3))
    assert_one_line_write_error(proc, "metrics.jsonl", str(ckpt.checkpoint_path(out, 2)))
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_a_full_disk_writing_a_sample_grid(tmp_path, cache):
    out = tmp_path / "run"
    proc = run_cli(out, cache, "--run.sample_every=2", fault=("enospc-in-samples", 4))
    assert_one_line_write_error(proc, "step-000004.png", str(ckpt.checkpoint_path(out, 2)))
    assert temporaries(out) == []
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step-000002.png"]


def test_debug_shows_the_traceback(tmp_path, cache):
    proc = run_cli(tmp_path / "run", cache, "--debug", fault=("enospc-in-metrics", 1))
    assert proc.returncode == 3 and "Traceback" in proc.stderr


def test_atomic_write_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("old")

    def write_half(tmp):
        tmp.write_text("new, cut sh")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(atomic.FileWriteError) as caught:
        atomic.atomic_write(target, write_half)
    assert caught.value.disk_full and str(target) in str(caught.value)
    assert "No space left on device" in str(caught.value) and "free there" in str(caught.value)
    assert target.read_text() == "old" and temporaries(tmp_path) == []


def test_torch_save_failures_keep_their_cause(tmp_path, monkeypatch):
    """torch.save reports a failed write of a file object as a RuntimeError; the OS error behind it
    is what the message names."""
    class FillsUp(io.FileIO):
        def write(self, data):
            if self.tell() + len(data) > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(data)

    monkeypatch.setattr(atomic, "open", FillsUp, raising=False)
    with pytest.raises(atomic.FileWriteError, match="No space left on device"):
        atomic.atomic_torch_save({"x": torch.zeros(10000)}, tmp_path / "x.pt")
    assert temporaries(tmp_path) == [] and not (tmp_path / "x.pt").exists()


def test_append_line_cuts_a_partial_line_back(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    atomic.append_line(path, '{"step": 1}')
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(atomic.FileWriteError, match="metrics.jsonl: No space left"):
        atomic.append_line(path, '{"step": 2, "loss": 1.0}')
    monkeypatch.undo()
    assert path.read_text() == '{"step": 1}\n'


def test_a_metrics_line_cut_short_by_a_crash_is_dropped_on_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    truncate_metrics(tmp_path, 1)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


# ---------------------------------------------------------------- the run records its choices
def test_config_json_records_the_data_backend_and_why(uninterrupted):
    import json
    saved = json.loads((uninterrupted[0] / "config.json").read_text())
    resolved = saved["resolved"]
    assert resolved["data_backend"] in ("dali", "torch") and resolved["data_backend_reason"]
    assert read_config(uninterrupted[0] / "config.json").run.steps == STEPS  # still a config


# ---------------------------------------------------------------- a lost rank under torchrun
def rank_pids(marker: str, rank: int) -> list:
    """PIDs of the worker processes of rank ``rank`` whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmdline and f"RANK={rank}".encode() in environ and "torchrun" not in cmdline:
            found.append(int(entry.name))
    return found


LOST_RANK_BOUND_S = 60  # measured ~3-5 s from the kill to torchrun's exit on 2 busy cores


def start_torchrun_job(out: Path, cache: Path) -> tuple:
    """A 2-rank tiny job of many steps, returned once it has logged 3 steps: (process, env)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "FASTXMC_CACHE": str(cache), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = ["--preset", "tiny", "--steps", "400", "--log-every", "1", "--quiet", "--out", str(out),
            f"--run.checkpoint_every={EVERY}", "--run.tensorboard=false"]
    proc = subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node=2", "-m",
                             "fastxmc.train", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len(read_metrics(out)) >= 3:
            break
        time.sleep(0.2)
    return proc, env


def resume_torchrun_job(out: Path, env: dict, steps: int) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    resumed = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m",
                              "fastxmc.train", "--resume", "--out", str(out), "--steps",
                              str(steps), "--quiet"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_metrics(out)[-1]["step"] == steps


def stop_job(proc: subprocess.Popen, rank: int, sig: int, marker: str, timeout: float) -> tuple:
    """Send ``sig`` to ``rank``'s process; (stderr, seconds until torchrun exited)."""
    try:
        victims = rank_pids(marker, rank)
        assert proc.poll() is None and len(victims) == 1, "the job did not reach step 3"
        os.kill(victims[0], sig)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=timeout)
        return err, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_a_killed_rank_ends_the_job_in_bounded_time_and_resume_continues(tmp_path, cache):
    out = tmp_path / "run"
    proc, env = start_torchrun_job(out, cache)
    err, took = stop_job(proc, 1, signal.SIGKILL, str(out), LOST_RANK_BOUND_S)
    assert proc.returncode != 0 and took < LOST_RANK_BOUND_S
    report = [line for line in err.splitlines() if "fastxmc.train: error:" in line]
    assert len(report) == 1 and "rank 0 of 2: rank 1 is gone" in report[0], err[-3000:]
    assert "continue with --resume" in report[0]
    last = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))["step"]
    resume_torchrun_job(out, env, last + 2)


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, cache):
    """The signalled rank and the one told through the stop flag both end with 128 + SIGTERM
    after the checkpoint of the same step; the job resumes."""
    out = tmp_path / "run"
    proc, env = start_torchrun_job(out, cache)
    err, _ = stop_job(proc, 0, signal.SIGTERM, str(out), 120)
    # torchrun prints its own traceback for any non-zero exit; the ranks themselves print none
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err, err[-3000:]
    assert "stopped by a signal after step" in err, err[-3000:]
    assert proc.returncode != 0 and "exitcode  : 1 " not in err  # 143 on both ranks, no failure
    last = read_metrics(out)[-1]["step"]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(out))["step"] == last
    resume_torchrun_job(out, env, last + 2)


# ---------------------------------------------------------------- the same for fastxmc.pretrain
def pretrain_args(out: Path, steps: int) -> list:
    return ["--preset", "tiny", "--steps", str(steps), "--out", str(out), "--quiet",
            f"--run.checkpoint_every={EVERY}", "--run.tensorboard=false"]


def test_pretrain_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys,
                                                                      monkeypatch):
    from fastxmc.pretrain.__main__ import main as pretrain_main
    out = tmp_path / "dual"
    real_save = torch.save

    def full_at_step_4(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(atomic.torch, "save", full_at_step_4)
    assert pretrain_main(pretrain_args(out, 4)) == 3
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "ckpt-00000004.pt: No space left on device" in lines[0]
    assert f"the last good checkpoint is {ckpt.checkpoint_path(out, 2)}" in lines[0]
    assert temporaries(out) == []
    monkeypatch.undo()
    flip_a_bit(out / "dual_encoder.pt")
    from fastxmc.models.dual_encoder import DualEncoder
    with pytest.raises(ValueError, match="dual_encoder.pt is corrupt"):
        DualEncoder.load(out / "dual_encoder.pt")
    truncate(ckpt.checkpoint_path(out, 2))
    assert pretrain_main([*pretrain_args(out, 4), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no valid checkpoint" in err and "ckpt-00000002.pt (unreadable" in err
