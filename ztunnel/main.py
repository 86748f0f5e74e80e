"""Entry point of the `ztunnel` process."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("ztunnel: not built yet; see the project's open issues", file=sys.stderr)
    return 2
