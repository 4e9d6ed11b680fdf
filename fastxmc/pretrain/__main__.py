"""``python -m fastxmc.pretrain``: see ``--help`` and :mod:`fastxmc.pretrain.config`; exit codes as
``python -m fastxmc.train`` (:mod:`fastxmc.train.cli`)."""
from __future__ import annotations

import os
import sys

from fastxmc.pretrain.config import USAGE, config_for
from fastxmc.pretrain.loop import pretrain
from fastxmc.train.cli import run_command


def _pretrain_and_report(cfg, *, resume: bool):
    result = pretrain(cfg, resume=resume)
    if result.model_path is not None and os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(f"wrote {result.model_path} (step {result.step})")
    return result


def main(argv=None) -> int:
    return run_command("fastxmc.pretrain", argv, USAGE, config_for, _pretrain_and_report)


if __name__ == "__main__":
    sys.exit(main())
