"""``ambientctl``: the user CLI."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ambientctl import check, demo, hbone, meshcmd, mtls_report, policy, waf, waypoint, ztunnel_config
from mesh import log


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ambientctl", description="Manage and debug the Python ambient mesh.")
    p.add_argument("--log-level", default="info", choices=log.LEVELS, help="log verbosity (default: info)")
    p.add_argument("--log-json", action="store_true", default=None, help="log JSON lines even on a terminal")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    hbone.add_parser(sub)
    demo.add_parser(sub)
    add_policy_parser(sub)
    ztunnel_config.add_parser(sub)
    check.add_parser(sub)
    waypoint.add_parser(sub)
    meshcmd.add_parser(sub)
    waf.add_parser(sub)
    return p


def add_policy_parser(sub: Any) -> None:
    """``ambientctl policy …``: tools for security policies (subcommands register themselves)."""
    p = sub.add_parser("policy", help="security policy tools (check, mtls-report)")
    ps = p.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
    policy.add_check_parser(ps)
    mtls_report.add_mtls_report_parser(ps)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log.configure(args.log_level, json=args.log_json)
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
