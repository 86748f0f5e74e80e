"""Entry point of the `ambient-cni` process."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("cni: not built yet; see the project's open issues", file=sys.stderr)
    return 2
