"""Run ``python -m fastxmc.train`` with one fault injected (used by tests/test_faults.py).

    python tests/fault_injection.py FAULT STEP -- <fastxmc.train arguments>

FAULT is one of
  kill-after-step        SIGKILL right after step STEP's metrics line is written
  kill-mid-step          SIGKILL during step STEP, after its forward, before the update
  kill-in-checkpoint     SIGKILL halfway through writing the checkpoint of step STEP (a partial
                         temporary file is left behind, as after a power cut)
  enospc-in-checkpoint   the checkpoint write of step STEP fails with ENOSPC ("No space left")
  enospc-in-metrics      the metrics line of step STEP fails with ENOSPC
  enospc-in-samples      the sample grid of step STEP fails with ENOSPC

The process kills itself with SIGKILL, so nothing of the run's own cleanup runs: what the next
``--resume`` meets is what a crash would leave.
"""
from __future__ import annotations

import errno
import io
import os
import signal
import sys


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def inject(fault: str, step: int) -> None:
    import torch

    import fastxmc.atomic as atomic
    from fastxmc.train import loop
    from fastxmc.train import samples
    from fastxmc.train.logging import RunLogger

    if fault == "kill-after-step":
        log_metrics = RunLogger.log_metrics

        def log_then_die(self, at, values):
            log_metrics(self, at, values)
            if at == step:
                _die()
        RunLogger.log_metrics = log_then_die
    elif fault == "kill-mid-step":
        joint_update = loop.joint_update

        def die_before_update(run, fw, at):
            if at == step:
                _die()
            joint_update(run, fw, at)
        loop.joint_update = die_before_update
    elif fault in ("kill-in-checkpoint", "enospc-in-checkpoint"):
        save = torch.save

        def failing_save(obj, f, *args, **kwargs):
            if not (isinstance(obj, dict) and obj.get("step") == step and "G" in obj):
                return save(obj, f, *args, **kwargs)
            if fault == "enospc-in-checkpoint":
                f.write(b"\0" * 4096)
                raise _no_space()
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            _die()
        torch.save = failing_save  # only the checkpoint dict of step STEP is affected
    elif fault == "enospc-in-metrics":
        append_line = atomic.append_line

        def failing_append(path, line):
            if f'"step": {step},' in line:
                raise atomic.FileWriteError(path, _no_space())
            append_line(path, line)
        import fastxmc.train.logging as logging_module
        logging_module.append_line = failing_append
    elif fault == "enospc-in-samples":
        write_grid = samples.write_grid

        def failing_grid(grid, path):
            if path.name == f"step-{step:06d}.png":
                def write(tmp):
                    tmp.write_bytes(b"\x89PNG partial")
                    raise _no_space()
                return atomic.atomic_write(path, write)
            return write_grid(grid, path)
        samples.write_grid = failing_grid
    else:
        raise SystemExit(f"unknown fault {fault!r}")


def main(argv: list) -> int:
    fault, step, sep, *train_args = argv
    if sep != "--":
        raise SystemExit("usage: fault_injection.py FAULT STEP -- <fastxmc.train arguments>")
    inject(fault, int(step))
    from fastxmc.train.__main__ import main as train_main
    return train_main(train_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
