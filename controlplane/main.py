"""Entry point of the `ambient-controlplane` process."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("controlplane: not built yet; see the project's open issues", file=sys.stderr)
    return 2
