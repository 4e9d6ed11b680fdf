"""The command-line runner shared by ``python -m fastxmc.train`` and ``python -m fastxmc.pretrain``.

Exit codes: 0 done, 1 non-finite loss, 2 bad command line or config (or an ``--out`` that already
holds a run without ``--resume``), 128 + the signal's number when SIGINT/SIGTERM stopped the run
(after its checkpoint was written).
"""
from __future__ import annotations

import sys
from typing import Callable

from fastxmc.train.config import parse_command_line
from fastxmc.train.loop import NonFiniteLossError


def run_command(prog: str, argv, usage: str, config_for: Callable, run: Callable) -> int:
    """Parse ``argv``, build the config with ``config_for(cli)``, call ``run(cfg, resume=...)`` and
    map the outcome to an exit code; ``run`` returns an object with ``status`` and ``signal``."""
    try:
        cli = parse_command_line(sys.argv[1:] if argv is None else argv)
        if cli.help:
            print(usage)
            return 0
        cfg = config_for(cli)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    try:
        result = run(cfg, resume=cli.resume)
    except NonFiniteLossError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    except FileExistsError as err:  # --out already holds a run and --resume was not given
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 128 + int(result.signal) if result.status == "interrupted" else 0
