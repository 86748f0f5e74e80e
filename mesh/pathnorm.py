"""Request path normalization, exactly as Istio configures Envoy for MeshConfig ``pathNormalization``.

Authorization on paths is only as good as the agreement between the path the policy sees and
the path the application serves: ``/a/../admin`` must be ``/admin`` to both. Istio picks one
of four settings (``pilot/pkg/networking/core/listener_builder.go``), each a combination of
three HttpConnectionManager options; this module applies them in Envoy's order
(``ConnectionManagerUtility::maybeNormalizePath``):

1. A path that does not start with ``/`` is refused (Envoy answers 404,
   ``absolute_path_rejected``; an HTTP/1 absolute-form target is the parser's business and
   arrives here as its path). A ``#fragment`` is cut off, wherever it starts (Istio turns
   ``http_reject_path_with_fragment`` off, so Envoy strips instead of refusing).
2. ``path_with_escaped_slashes_action``: ``UNESCAPE_AND_FORWARD`` (and ``_REDIRECT``) replace
   ``%2F``/``%2f`` by ``/`` and ``%5C``/``%5c`` by ``\\`` in the path part, once, without
   decoding anything else (``%252F`` stays); ``REJECT_REQUEST`` refuses such a path.
3. ``normalize_path``: RFC 3986 dot-segment removal by Chromium's URL canonicalizer (Envoy's
   ``PathUtil::canonicalPath``), which also turns ``\\`` into ``/``, decodes percent-encoded
   unreserved characters (``%41`` → ``A``, ``%2e`` counts as a dot), upper-cases nothing,
   escapes bytes that may not appear raw (space, ``"``, ``<``, non-ASCII ...) and fails on an
   encoded or raw NUL (Envoy answers 400, ``path_normalization_failed``). Parameters on dot
   segments (``/..;x/``) are removed first, as Envoy does since GHSA-2w8w-rfw7-8gg4.
4. ``merge_slashes``: runs of ``/`` in the path part become one (Envoy keeps one leading and
   one trailing slash, so ``//`` stays ``//``: the segments between are empty).

The query (from the first ``?``) is never touched and is kept for forwarding; matching uses
the path without it. Case is always kept (``/ADMIN`` is not ``/admin``).

Strings are handled as Envoy handles bytes: a character below U+0100 is one byte (the
latin-1 reading an HTTP parser gives), anything above is its UTF-8 bytes.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = [
    "EscapedSlashesAction",
    "NormalizedPath",
    "PathNormalization",
    "PathRejected",
    "normalize_path",
]


class PathNormalization(enum.StrEnum):
    """MeshConfig ``pathNormalization.normalization`` (``DEFAULT`` is ``BASE``)."""

    NONE = "NONE"  # forward and match the path as received
    BASE = "BASE"  # normalize_path: RFC 3986 + backslashes + unreserved decoding
    MERGE_SLASHES = "MERGE_SLASHES"  # BASE, then merge_slashes
    DECODE_AND_MERGE_SLASHES = "DECODE_AND_MERGE_SLASHES"  # %2F/%5C decoded first, then the above


class EscapedSlashesAction(enum.StrEnum):
    """Envoy's ``path_with_escaped_slashes_action`` (ProxyConfig ``connectionSettings`` can set
    it; otherwise the normalization mode decides)."""

    KEEP_UNCHANGED = "KEEP_UNCHANGED"
    REJECT_REQUEST = "REJECT_REQUEST"
    UNESCAPE_AND_REDIRECT = "UNESCAPE_AND_REDIRECT"
    UNESCAPE_AND_FORWARD = "UNESCAPE_AND_FORWARD"


@dataclass(frozen=True, slots=True)
class NormalizedPath:
    """``path`` is what policy matches (no query), ``forward`` what goes upstream (with the
    query, without a fragment). ``redirect``: Envoy would answer a redirect to ``forward``
    instead of forwarding (only with ``UNESCAPE_AND_REDIRECT`` when an escaped slash was
    found)."""

    path: str
    forward: str
    redirect: bool = False


@dataclass(frozen=True, slots=True)
class PathRejected:
    """The request must be refused with ``status``; ``detail`` is Envoy's response code
    detail (for the access log), ``reason`` says what was wrong in words."""

    status: int
    detail: str
    reason: str


# --- Chromium's path canonicalizer (url_canon_path.cc, as Envoy uses it) ------------------------

_SPECIAL = 1  # needs a closer look: dots, '%', '\\', escaped and invalid characters
_ESCAPE = 2 | _SPECIAL  # must be percent-encoded in the output
_UNESCAPE = 4  # if found percent-encoded, decode it (unreserved characters)
_INVALID = 8 | _SPECIAL  # makes the path invalid (NUL)


def _char_table() -> bytes:
    table = bytearray([_ESCAPE] * 256)  # control characters and every byte >= 0x7f
    table[0] = _INVALID
    for c in b"!$&'()*+,/:;=@[]":
        table[c] = 0  # pass through as they are
    for c in b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_~":
        table[c] = _UNESCAPE
    table[ord(".")] = _SPECIAL
    # ' ', '"', '#', '%', '<', '>', '?', '\\', '^', '`', '{', '|', '}' keep _ESCAPE ('%' and
    # '\\' are handled before the escape bit is looked at).
    return bytes(table)


_TABLE = _char_table()
_HEX = frozenset(b"0123456789abcdefABCDEF")
_SLASH, _BACKSLASH, _DOT, _PERCENT = ord("/"), ord("\\"), ord("."), ord("%")
_CUR, _UP, _NOT_A_DIRECTORY = 0, 1, 2

# A path made only of these, without "/." anywhere, is already canonical.
_ALREADY_CANONICAL = re.compile(r"[A-Za-z0-9\-_~!$&'()*+,/:;=@\[\].]*")


def _is_dot(spec: bytes, i: int, end: int) -> int:
    """Length of a dot at ``i`` (``.`` or ``%2e``/``%2E``), 0 if there is none."""
    if spec[i] == _DOT:
        return 1
    if spec[i] == _PERCENT and i + 3 <= end and spec[i + 1] == 0x32 and spec[i + 2] in (0x65, 0x45):
        return 3
    return 0


def _is_slash(c: int) -> bool:
    return c in (_SLASH, _BACKSLASH)


def _classify_after_dot(spec: bytes, after: int, end: int) -> tuple[int, int]:
    """What the dot just seen (after a slash) means, and how many more bytes it consumes."""
    if after == end:
        return _CUR, 0
    if _is_slash(spec[after]):
        return _CUR, 1
    second = _is_dot(spec, after, end)
    if second:
        after_second = after + second
        if after_second == end:
            return _UP, second
        if _is_slash(spec[after_second]):
            return _UP, second + 1
    return _NOT_A_DIRECTORY, 0


def _back_up_to_previous_slash(out: bytearray) -> None:
    """Drop the last segment; ``out`` ends with '/' and never loses its first one."""
    i = len(out) - 1
    if i == 0:
        return
    i -= 1
    while out[i] != _SLASH and i > 0:
        i -= 1
    del out[i + 1 :]


def _hex_pair(data: bytes | bytearray, i: int, end: int) -> int | None:
    """The byte ``%XX`` at ``i`` encodes, None when it is not a valid escape."""
    if i + 3 > end or data[i + 1] not in _HEX or data[i + 2] not in _HEX:
        return None
    return int(bytes(data[i + 1 : i + 3]), 16)


def _append_escaped(out: bytearray, c: int) -> None:
    out += b"%%%02X" % c


def _check_nested_escapes(spec: bytes, next_i: int, end: int, bad_percent: int, out: bytearray) -> None:
    """After decoding right behind a '%' that began no valid escape, make sure the output has
    not become a valid escape (``%%30%30`` must not turn into ``%00``): the '%' becomes ``%25``."""
    length = len(out)
    last = out[-1]
    append_next = bad_percent == length - 2
    if append_next:
        if next_i == end or spec[next_i] >= 0x80:
            return
        out.append(spec[next_i])
    if _hex_pair(out, bad_percent, len(out)) is not None:
        if not append_next:
            out.append(out[bad_percent + 1])
        out[bad_percent + 1] = ord("2")
        out[bad_percent + 2] = ord("5")
        out.append(last)
    elif append_next:
        del out[length:]


def _canonicalize(spec: bytes) -> bytes | None:
    """Chromium's ``CanonicalizePath`` on a path without query; None when it fails."""
    end = len(spec)
    out = bytearray()
    if end == 0:
        return b"/"
    if not _is_slash(spec[0]):
        out.append(_SLASH)
    ok = True
    bad_percent = -10  # index in ``out`` of the last '%' that began no valid escape
    i = 0
    while i < end:
        c = spec[i]
        flags = _TABLE[c]
        if not flags & _SPECIAL:
            out.append(c)
        elif dotlen := _is_dot(spec, i, end):
            if out and out[-1] == _SLASH:
                kind, consumed = _classify_after_dot(spec, i + dotlen, end)
                if kind == _NOT_A_DIRECTORY:
                    out.append(_DOT)
                    i += dotlen - 1
                else:
                    if kind == _UP:
                        _back_up_to_previous_slash(out)
                    i += dotlen + consumed - 1
            else:
                out.append(_DOT)
                i += dotlen - 1
        elif c == _BACKSLASH:
            out.append(_SLASH)
        elif c == _PERCENT:
            value = _hex_pair(spec, i, end)
            if value is None:
                bad_percent = len(out)
                out.append(_PERCENT)
            else:
                i += 2
                vflags = _TABLE[value]
                if vflags & _UNESCAPE:
                    out.append(value)
                    if bad_percent >= len(out) - 3:
                        _check_nested_escapes(spec, i + 1, end, bad_percent, out)
                else:
                    # Kept exactly as written (hex case included); an escaped NUL is fatal.
                    out += spec[i - 2 : i + 1]
                    if vflags & 8:
                        ok = False
        elif flags & 8:
            _append_escaped(out, c)
            ok = False
        else:
            _append_escaped(out, c)
        i += 1
    return bytes(out) if ok else None


def _strip_dot_segment_parameters(path: str) -> str:
    """``/..;x/`` → ``/../`` and ``/.;x/`` → ``/./`` so that the canonicalizer sees them."""
    if ".;" not in path:
        return path
    segments = path.split("/")
    for i, segment in enumerate(segments):
        if segment.startswith("..;"):
            segments[i] = ".."
        elif segment.startswith(".;"):
            segments[i] = "."
    return "/".join(segments)


def _to_bytes(s: str) -> bytes:
    try:
        return s.encode("latin-1")
    except UnicodeEncodeError:
        return s.encode("utf-8")


def _rfc_normalize(path: str) -> str | None:
    path = _strip_dot_segment_parameters(path)
    if "/." not in path and _ALREADY_CANONICAL.fullmatch(path):
        return path
    canonical = _canonicalize(_to_bytes(path))
    return None if canonical is None else canonical.decode("ascii")


def _merge_slashes(path: str) -> str:
    if "//" not in path:
        return path
    prefix = "/" if path.startswith("/") else ""
    suffix = "/" if path.endswith("/") else ""
    return prefix + "/".join(s for s in path.split("/") if s) + suffix


_ESCAPED_SLASH = re.compile("%2[Ff]|%5[Cc]")


def _unescape_slashes(path: str) -> str:
    return _ESCAPED_SLASH.sub(lambda m: "/" if m.group()[1] == "2" else "\\", path)


_MODE_SLASHES = {
    PathNormalization.NONE: EscapedSlashesAction.KEEP_UNCHANGED,
    PathNormalization.BASE: EscapedSlashesAction.KEEP_UNCHANGED,
    PathNormalization.MERGE_SLASHES: EscapedSlashesAction.KEEP_UNCHANGED,
    PathNormalization.DECODE_AND_MERGE_SLASHES: EscapedSlashesAction.UNESCAPE_AND_FORWARD,
}


def normalize_path(
    raw_path: str,
    mode: PathNormalization = PathNormalization.BASE,
    *,
    escaped_slashes: EscapedSlashesAction | None = None,
) -> NormalizedPath | PathRejected:
    """Normalize a request's ``:path`` as Istio's Envoy would, or say why it is refused.

    ``escaped_slashes`` overrides what ``mode`` implies for encoded slashes (ProxyConfig
    ``connectionSettings.httpPathWithEscapedSlashesAction``).
    """
    if not raw_path:
        return PathRejected(400, "missing_path_rejected", "the request has an empty path")
    if raw_path[0] != "/":
        return PathRejected(404, "absolute_path_rejected", f"path {raw_path[:64]!r} does not start with '/'")
    fragment = raw_path.find("#")
    if fragment >= 0:
        raw_path = raw_path[:fragment]
    query_at = raw_path.find("?")
    path, query = (raw_path, "") if query_at < 0 else (raw_path[:query_at], raw_path[query_at:])

    redirect = False
    action = _MODE_SLASHES[mode] if escaped_slashes is None else escaped_slashes
    if action is not EscapedSlashesAction.KEEP_UNCHANGED and "%" in path:
        unescaped = _unescape_slashes(path)
        if unescaped != path:
            if action is EscapedSlashesAction.REJECT_REQUEST:
                return PathRejected(
                    400, "path_normalization_failed", "the path has an escaped slash (%2F or %5C)"
                )
            redirect = action is EscapedSlashesAction.UNESCAPE_AND_REDIRECT
            path = unescaped

    if mode is not PathNormalization.NONE:
        normalized = _rfc_normalize(path)
        if normalized is None:
            return PathRejected(
                400, "path_normalization_failed", "the path has an encoded or raw NUL character"
            )
        path = normalized
        if mode is not PathNormalization.BASE:
            path = _merge_slashes(path)
    return NormalizedPath(path, path + query, redirect)
