"""``python -m fastxmc.train``: see ``--help`` and :mod:`fastxmc.train.config`."""
from __future__ import annotations

import sys

from fastxmc.train.config import USAGE, config_for, parse_command_line
from fastxmc.train.loop import NonFiniteLossError, train

# Exit codes: 0 done, 1 non-finite loss, 2 bad command line or config, 128 + the signal's number
# when SIGINT/SIGTERM stopped the run (after its checkpoint was written).


def main(argv=None) -> int:
    try:
        cli = parse_command_line(sys.argv[1:] if argv is None else argv)
        if cli.help:
            print(USAGE)
            return 0
        cfg = config_for(cli)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"fastxmc.train: error: {err}", file=sys.stderr)
        return 2
    try:
        result = train(cfg, resume=cli.resume)
    except NonFiniteLossError as err:
        print(f"fastxmc.train: {err}", file=sys.stderr)
        return 1
    except FileExistsError as err:  # --out already holds a run and --resume was not given
        print(f"fastxmc.train: error: {err}", file=sys.stderr)
        return 2
    return 128 + int(result.signal) if result.status == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
