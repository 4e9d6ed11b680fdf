"""The command-line runner shared by ``python -m fastxmc.train`` and ``python -m fastxmc.pretrain``.

Exit codes: 0 done, 1 non-finite loss, 2 bad command line or config (or an ``--out`` that already
holds a run without ``--resume``, or ``--resume`` with no valid checkpoint), 3 a run file could not
be written (full disk, ...), 4 another rank of a torchrun job was lost, 128 + the signal's number
when SIGINT/SIGTERM stopped the run (after its checkpoint was written).

Expected failures end in one line on stderr naming what failed and the last good checkpoint;
``--debug`` or ``FASTXMC_DEBUG=1`` adds the traceback.
"""
from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Callable

from fastxmc.atomic import FileWriteError
from fastxmc.train.checkpoint import last_good_checkpoint
from fastxmc.train.config import parse_command_line
from fastxmc.train.distributed import PeerLostError
from fastxmc.train.loop import NonFiniteLossError

DEBUG_ENV = "FASTXMC_DEBUG"
EXIT_NON_FINITE, EXIT_USAGE, EXIT_WRITE, EXIT_PEER_LOST = 1, 2, 3, 4


def debug_requested(cli=None) -> bool:
    return bool(getattr(cli, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _fail(prog: str, message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return code


def run_command(prog: str, argv, usage: str, config_for: Callable, run: Callable) -> int:
    """Parse ``argv``, build the config with ``config_for(cli)``, call ``run(cfg, resume=...)`` and
    map the outcome to an exit code; ``run`` returns an object with ``status`` and ``signal``."""
    cli = None
    try:
        cli = parse_command_line(sys.argv[1:] if argv is None else argv)
        if cli.help:
            print(usage)
            return 0
        cfg = config_for(cli)
    except (ValueError, TypeError, FileNotFoundError) as err:
        return _fail(prog, str(err), EXIT_USAGE, debug_requested(cli))
    debug = debug_requested(cli)
    try:
        result = run(cfg, resume=cli.resume)
    except NonFiniteLossError as err:
        return _fail(prog, str(err), EXIT_NON_FINITE, debug)
    except (FileExistsError, FileNotFoundError) as err:  # a run in --out without --resume; no valid checkpoint
        return _fail(prog, str(err), EXIT_USAGE, debug)
    except FileWriteError as err:
        return _fail(prog, f"{err}; the run stopped, {last_good_checkpoint(cfg.run.out)}", EXIT_WRITE, debug)
    except PeerLostError as err:
        return _fail(prog, f"{err}; {last_good_checkpoint(cfg.run.out)}; continue with --resume",
                     EXIT_PEER_LOST, debug)
    if result.status != "interrupted":
        return 0
    # a rank that stopped because another rank was signalled reports that rank's usual SIGTERM
    return 128 + int(result.signal if result.signal is not None else signal.SIGTERM)
