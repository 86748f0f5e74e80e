"""Text-level edits of a multi-document YAML file that keep what the user wrote.

``ambientctl waypoint apply|delete`` change a local mesh's file, which a person maintains by
hand: comments, document order, quoting and flow style must survive. So the file is never
round-tripped through a YAML dumper. It is cut into documents where the YAML parser cuts it
(a ``---`` line), and an edit replaces, appends or removes one whole document, or sets one
key of one mapping inside a document by splicing text at the positions the parser reports.
Every splice is checked by parsing the result: if it does not mean exactly the intended object
(an exotic layout the splice did not foresee), the document is rendered anew instead, keeping
its leading comments.

Sans-IO: text in, text out; :mod:`ambientctl.waypoint_local` does the reading and writing.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Where a document starts: "---" at column 0 (directives such as "%YAML" before it belong to it),
# the rule the parser (and sources.local) splits by.
_DOCUMENT_START = re.compile(r"^(?:%[^\n]*\n)*---(?=[ \t\r\n]|$)", re.MULTILINE)
_CONTENT_LINE = re.compile(r"^[ \t]*[^\s#%]", re.MULTILINE)
_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")


@dataclass(frozen=True)
class Document:
    """One document of the file: its exact text (from its ``---`` line, if any, to the next) and
    what it parses to (None when it does not parse, or is empty)."""

    text: str
    data: Any

    @property
    def kind(self) -> str:
        return str(self.data.get("kind", "")) if isinstance(self.data, dict) else ""

    @property
    def api_version(self) -> str:
        return str(self.data.get("apiVersion", "")) if isinstance(self.data, dict) else ""

    @property
    def metadata(self) -> Mapping[str, Any]:
        md = self.data.get("metadata") if isinstance(self.data, dict) else None
        return md if isinstance(md, dict) else {}

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace", "") or "")


def split(text: str) -> list[Document]:
    """The file's documents; ``"".join(d.text for d in split(t)) == t`` always."""
    starts = [m.start() for m in _DOCUMENT_START.finditer(text)]
    bounds = [0, *starts] if not starts or starts[0] != 0 else starts
    docs: list[Document] = []
    for i, begin in enumerate(bounds):
        end = bounds[i + 1] if i + 1 < len(bounds) else len(text)
        chunk = text[begin:end]
        docs.append(Document(chunk, _parse(chunk)))
    return docs


def join(docs: Sequence[Document]) -> str:
    return "".join(d.text for d in docs)


def _parse(chunk: str) -> Any:
    if not _CONTENT_LINE.search(chunk):
        return None
    try:
        return yaml.load(chunk, Loader=_Loader)
    except yaml.YAMLError:
        return None


def render(obj: Mapping[str, Any]) -> str:
    """An object as a new document body, keys in Kubernetes' (sorted) order, as ``kubectl`` and
    ``istioctl`` print it."""
    return yaml.safe_dump(dict(obj), default_flow_style=False, sort_keys=True)


def new_document(obj: Mapping[str, Any], after: Sequence[Document]) -> Document:
    """A document for ``obj`` to append after ``after`` (a ``---`` line when there is any
    content before it)."""
    body = render(obj)
    has_content = any(_CONTENT_LINE.search(d.text) for d in after)
    return Document(("---\n" if has_content else "") + body, yaml.safe_load(body))


def append(docs: Sequence[Document], obj: Mapping[str, Any]) -> list[Document]:
    out = list(docs)
    if out and not out[-1].text.endswith("\n"):
        last = out[-1]
        out[-1] = Document(last.text + "\n", last.data)
    return [*out, new_document(obj, out)]


def remove(docs: Sequence[Document], index: int) -> list[Document]:
    """Without document ``index``. The first document of a file may have no ``---`` line: the
    one after it then takes its place at the top and keeps its own ``---``, which is harmless."""
    return [d for i, d in enumerate(docs) if i != index]


def scalar(value: str) -> str:
    """``value`` as a YAML scalar: plain when that reads back as the same string, else quoted."""
    if _PLAIN.match(value) and yaml.safe_load(value) == value:
        return value
    quoted: str = json.dumps(value)
    return quoted


def set_entries(doc: Document, path: Sequence[str], entries: Mapping[str, str]) -> Document:
    """``doc`` with ``entries`` set in the mapping at ``path`` (e.g. ``("metadata", "labels")``),
    created when absent; everything else in the text is kept byte for byte where possible."""
    if not isinstance(doc.data, dict):
        raise ValueError("not a mapping document")
    want = copy.deepcopy(doc.data)
    target: dict[str, Any] = want
    for p in path:
        nxt = target.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            target[p] = nxt
        target = nxt
    target.update(entries)
    if want == doc.data:
        return doc
    text = doc.text
    for key, value in entries.items():
        try:
            text = _splice(text, path, key, value)
        except (_CannotSplice, yaml.YAMLError):
            return _rerendered(doc, want)
    try:
        if yaml.load(text, Loader=_Loader) == want:
            return Document(text, want)
    except yaml.YAMLError:
        pass
    return _rerendered(doc, want)


def _rerendered(doc: Document, obj: Mapping[str, Any]) -> Document:
    """The fallback: ``obj`` rendered anew under the document's ``---`` line and leading comments."""
    lines = doc.text.splitlines(keepends=True)
    head: list[str] = []
    for line in lines:
        if _DOCUMENT_START.match(line) or not line.strip() or line.lstrip().startswith("#"):
            if _DOCUMENT_START.match(line) and line.rstrip("\r\n").strip() != "---":
                head.append("---\n")  # "--- {inline}": the content is rendered below
            else:
                head.append(line)
            continue
        break
    return Document("".join(head) + render(obj), copy.deepcopy(dict(obj)))


class _CannotSplice(Exception):
    pass


def _lookup(node: yaml.MappingNode, key: str) -> yaml.Node | None:
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key:
            found: yaml.Node = v
            return found
    return None


def _block(path: Sequence[str], key: str, value: str, col: int) -> str:
    """``p1:\\n  p2:\\n    key: value`` indented from ``col`` (the first line unindented)."""
    lines = [f"{' ' * (col + 2 * i)}{scalar(p)}:" for i, p in enumerate(path)]
    lines.append(f"{' ' * (col + 2 * len(path))}{scalar(key)}: {scalar(value)}")
    return "\n".join(lines).lstrip(" ")


def _flow(path: Sequence[str], key: str, value: str) -> str:
    out = f"{scalar(key)}: {scalar(value)}"
    for p in reversed(path):
        out = f"{scalar(p)}: {{{out}}}"
    return out


def _splice(text: str, path: Sequence[str], key: str, value: str) -> str:
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(root, yaml.MappingNode):
        raise _CannotSplice
    node: yaml.MappingNode = root
    for i, p in enumerate(path):
        child = _lookup(node, p)
        if child is None:
            return _insert(text, node, path[i:], key, value)
        if not isinstance(child, yaml.MappingNode):
            raise _CannotSplice  # e.g. "labels:" with no value: rendered anew
        node = child
    existing = _lookup(node, key)
    if existing is not None:
        if not isinstance(existing, yaml.ScalarNode):
            raise _CannotSplice
        s, e = existing.start_mark.index, existing.end_mark.index
        return text[:s] + scalar(value) + text[e:]
    return _insert(text, node, (), key, value)


def _insert(text: str, node: yaml.MappingNode, path: Sequence[str], key: str, value: str) -> str:
    if node.flow_style:
        at = node.start_mark.index
        if text[at : at + 1] != "{":
            raise _CannotSplice
        sep = ", " if node.value else ""
        return text[: at + 1] + _flow(path, key, value) + sep + text[at + 1 :]
    if not node.value:
        raise _CannotSplice
    first: yaml.Node = node.value[0][0]
    at, col = int(first.start_mark.index), int(first.start_mark.column)
    return text[:at] + _block(path, key, value, col) + "\n" + " " * col + text[at:]
