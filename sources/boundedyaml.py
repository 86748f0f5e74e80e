"""YAML from anywhere, loaded bounded: aliases expanded at most :data:`MAX_DOCUMENT_NODES` nodes
(a "billion laughs" document is refused before it is built), recursive aliases and keys given
twice found without building anything, and no message that renders an unbounded value.

The local file (:mod:`sources.local`) reads every document through this, and so does a YAML
document embedded in an object (the ``mesh`` key of the mesh ConfigMap).
"""

from __future__ import annotations

from typing import Any

import yaml

from sources.validation import clip, show

MAX_DOCUMENT_NODES = 1_000_000  # YAML nodes in one document, aliases expanded

Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _node_path(path: str, key: yaml.Node) -> str:
    name = clip(str(key.value), 100) if isinstance(key, yaml.ScalarNode) else "<complex key>"
    return f"{path}.{name}" if path else name


def inspect_node(root: yaml.Node, line0: int) -> tuple[str | None, list[tuple[str, str]]]:
    """(why the document is refused or None, duplicate keys) — without building it.

    Counts the nodes the document has with every alias expanded (memoized, so an alias bomb
    costs its size, not its expansion), finds recursive aliases, and keys given twice.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()
    duplicates: list[tuple[str, str]] = []
    stack: list[tuple[yaml.Node, str, bool]] = [(root, "", False)]
    while stack:
        node, path, done = stack.pop()
        nid = id(node)
        if done:
            active.discard(nid)
            total = 1
            if isinstance(node, yaml.MappingNode):
                total += sum(sizes[id(k)] + sizes[id(v)] for k, v in node.value)
            elif isinstance(node, yaml.SequenceNode):
                total += sum(sizes[id(c)] for c in node.value)
            if total > MAX_DOCUMENT_NODES:
                return (
                    f"more than {MAX_DOCUMENT_NODES} YAML nodes once aliases are expanded "
                    f"(at {path or 'the top'}, line {node.start_mark.line + line0 + 1})",
                    duplicates,
                )
            sizes[nid] = total
            continue
        if nid in sizes:
            continue
        if nid in active:
            return f"an alias refers to a node that contains it (at {path or 'the top'})", duplicates
        active.add(nid)
        stack.append((node, path, True))
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], yaml.Node] = {}
            children: list[tuple[yaml.Node, str, bool]] = []
            for key, value in node.value:
                field = _node_path(path, key)
                if isinstance(key, yaml.ScalarNode):
                    first = seen.setdefault((key.tag, key.value), key)
                    if first is not key:
                        lines = sorted({first.start_mark.line + line0 + 1, key.start_mark.line + line0 + 1})
                        where = f"line{'s' if len(lines) > 1 else ''} {' and '.join(map(str, lines))}"
                        duplicates.append(
                            (field, f"key {show(key.value)} is given twice ({where}); remove one")
                        )
                children.append((key, field, False))
                children.append((value, field, False))
            stack.extend(reversed(children))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((c, f"{path}[{i}]", False) for i, c in reversed(list(enumerate(node.value))))
    return None, duplicates


def yaml_error(e: yaml.YAMLError, line0: int) -> str:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + line0 + 1} column {mark.column + 1}" if mark else ""
        return f"invalid YAML{where}: {clip(str(e.problem or e.context), 200)}"
    return f"invalid YAML: {clip(str(e), 200)}"


class YamlRefused(ValueError):
    """Why a YAML text was not loaded (the message is bounded)."""


def load_one(text: str) -> Any:
    """The single YAML document ``text`` built, or :class:`YamlRefused`: a syntax error, more
    than one document, too many nodes once aliases are expanded, a key given twice."""
    loader = Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        too_big, duplicates = inspect_node(node, 0)
        if too_big is not None:
            raise YamlRefused(too_big)
        if duplicates:
            inner, reason = duplicates[0]
            raise YamlRefused(f"{inner}: {reason}")
        return loader.construct_document(node)
    except YamlRefused:
        raise
    except yaml.YAMLError as e:
        raise YamlRefused(yaml_error(e, 0)) from None
    except (ValueError, TypeError, AttributeError, OverflowError, RecursionError) as e:
        raise YamlRefused(f"invalid YAML value: {type(e).__name__}: {clip(str(e), 200)}") from None
    finally:
        loader.dispose()
