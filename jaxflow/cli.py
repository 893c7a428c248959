"""What every script shares: absl flag errors reported as one line on stderr with exit code 2."""
from __future__ import annotations

import sys

from absl import app, flags


def parse_flags(argv):
    """absl's parser, with a flag error reported like every other error: one line, exit code 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(main) -> None:
    """app.run(main) with `parse_flags`; stray positional arguments are an error too."""
    def checked(argv):
        if len(argv) > 1:
            print(f"error: unexpected arguments: {' '.join(argv[1:])} (flags are written --name=value)",
                  file=sys.stderr)
            sys.exit(2)
        return main(argv)

    app.run(checked, flags_parser=parse_flags)
