"""Entry point of the `waypoint` process."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("waypoint: not built yet; see the project's open issues", file=sys.stderr)
    return 2
