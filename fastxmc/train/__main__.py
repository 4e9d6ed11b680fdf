"""``python -m fastxmc.train``: see ``--help`` and :mod:`fastxmc.train.config`; exit codes in
:mod:`fastxmc.train.cli`."""
from __future__ import annotations

import sys

from fastxmc.train.cli import run_command
from fastxmc.train.config import USAGE, config_for
from fastxmc.train.loop import train


def main(argv=None) -> int:
    return run_command("fastxmc.train", argv, USAGE, config_for, train)


if __name__ == "__main__":
    sys.exit(main())
