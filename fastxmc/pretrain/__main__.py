"""``python -m fastxmc.pretrain``: see ``--help`` and :mod:`fastxmc.pretrain.config`."""
from __future__ import annotations

import sys

from fastxmc.pretrain.config import USAGE, config_for
from fastxmc.pretrain.loop import pretrain
from fastxmc.train.config import parse_command_line
from fastxmc.train.loop import NonFiniteLossError

# Exit codes as python -m fastxmc.train: 0 done, 1 non-finite loss, 2 bad command line or config,
# 128 + the signal's number when SIGINT/SIGTERM stopped the run (after its checkpoint).


def main(argv=None) -> int:
    try:
        cli = parse_command_line(sys.argv[1:] if argv is None else argv)
        if cli.help:
            print(USAGE)
            return 0
        cfg = config_for(cli)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"fastxmc.pretrain: error: {err}", file=sys.stderr)
        return 2
    try:
        result = pretrain(cfg, resume=cli.resume)
    except NonFiniteLossError as err:
        print(f"fastxmc.pretrain: {err}", file=sys.stderr)
        return 1
    except FileExistsError as err:
        print(f"fastxmc.pretrain: error: {err}", file=sys.stderr)
        return 2
    if result.model_path is not None:
        print(f"wrote {result.model_path} (step {result.step})")
    return 128 + int(result.signal) if result.status == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
