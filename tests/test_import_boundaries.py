"""The package rule of ARCHITECTURE.md, checked on the source text (every import, at any depth).

``ztunnel``, ``waypoint``, ``cni`` and ``controlplane`` import ``mesh`` and ``sources``, never
each other; ``sources`` imports ``mesh`` only (of ours); ``mesh`` imports none of them.
``ambientctl``, the tests and the benchmarks may import anything (and none of the packages
above imports ``ambientctl``, the CLI on top). Imports inside functions
count too: a lazy import is still a dependency, it only fails later.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROCESSES = frozenset({"ztunnel", "waypoint", "cni", "controlplane"})
OURS = PROCESSES | {"mesh", "sources", "ambientctl"}

# package -> the packages of ours it must not import
FORBIDDEN: dict[str, frozenset[str]] = {
    **{p: (PROCESSES - {p}) | {"ambientctl"} for p in PROCESSES},
    "sources": PROCESSES | {"ambientctl"},
    "mesh": PROCESSES | {"sources", "ambientctl"},
}


def imported_modules(tree: ast.AST, module_parts: list[str]) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the tree, relative ones resolved.

    ``module_parts`` names the file's module (``[..., "__init__"]`` for a package's own file),
    so dropping ``level`` parts leaves the package a relative import starts from.
    """
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module_parts[: len(module_parts) - node.level]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def violations(root: Path = ROOT) -> list[str]:
    problems: list[str] = []
    for package, forbidden in sorted(FORBIDDEN.items()):
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(rel))
            for line, module in imported_modules(tree, list(rel.with_suffix("").parts)):
                top = module.split(".", 1)[0]
                if top in forbidden:
                    problems.append(f"{rel}:{line}: {package} must not import {module}")
    return problems


def test_packages_import_only_what_the_architecture_allows() -> None:
    problems = violations()
    assert not problems, "imports that cross package boundaries:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("package", "source", "bad"),
    [
        ("cni", "from controlplane.convert import pod_uid\n", True),
        ("cni", "def f():\n    import ztunnel.app\n", True),
        ("cni", "from sources.local import LocalSource\nfrom mesh import zds\n", False),
        ("mesh", "from sources import WorkloadSource\n", True),
        ("sources", "import waypoint\n", True),
        ("sources", "from . import convert\nfrom mesh.model import Store\n", False),
        ("controlplane", "from .. import cni\n", False),  # controlplane.cni: its own
        ("waypoint", "if True:\n    from cni import rules as r\n", True),
        ("ztunnel", "import controlplanes\n", False),  # a prefix is not the package
    ],
)
def test_the_checker_sees_what_it_should(tmp_path: Path, package: str, source: str, bad: bool) -> None:
    for p in FORBIDDEN:
        (tmp_path / p).mkdir()
    (tmp_path / package / "sub").mkdir()
    (tmp_path / package / "sub" / "m.py").write_text(source)
    found = violations(tmp_path)
    assert bool(found) is bad, found
    if bad:
        assert found[0].startswith(f"{package}/sub/m.py:")
