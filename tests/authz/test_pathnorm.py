"""Path normalization against Envoy's own cases and the traps authorization policies fall into.

The Envoy cases are restated from ``test/common/http/path_utility_test.cc`` (``canonicalPath``,
``mergeSlashes``, ``unescapeSlashes``, dot segments with parameters); the mode table follows
istio.io's security best practices ("Understand path normalization in authorization policy")
and ``listener_builder.go``, which maps each MeshConfig mode onto Envoy's options.
"""

from __future__ import annotations

import pytest

from mesh.pathnorm import (
    EscapedSlashesAction,
    NormalizedPath,
    PathNormalization,
    PathRejected,
    normalize_path,
)

NONE, BASE, MERGE, DECODE = (
    PathNormalization.NONE,
    PathNormalization.BASE,
    PathNormalization.MERGE_SLASHES,
    PathNormalization.DECODE_AND_MERGE_SLASHES,
)


def forwarded(raw: str, mode: PathNormalization = BASE) -> str:
    result = normalize_path(raw, mode)
    assert isinstance(result, NormalizedPath), result
    return result.forward


# Envoy: PathUtilityTest.NormalizeValidPaths / NormalizeCasePath (BASE = normalize_path only).
ENVOY_CANONICAL = [
    ("/xyz", "/xyz"),
    ("/x/y/z", "/x/y/z"),
    ("/a/b/../c", "/a/c"),
    ("/a/b/./c", "/a/b/c"),
    ("/a/b/../../../../c", "/c"),
    ("/a/..\\c", "/c"),
    ("/%c0%af", "/%c0%af"),
    ("/%5c%25", "/%5c%25"),
    ("/a/b/%2E%2E/c", "/a/c"),
    ("/a/b/%2e%2e/c", "/a/c"),
    ("/A/B/C", "/A/B/C"),
    ("/a/%2F%2f/c", "/a/%2F%2f/c"),
    ("/xyz/..;foo=bar/abc", "/abc"),
    ("/..;foo=bar/abc", "/abc"),
    ("/xyz/..;foo=bar", "/"),
    ("/xyz/.;foo=bar/abc", "/xyz/abc"),
    ("/.;foo=bar/abc", "/abc"),
    ("/xyz/.;foo=bar", "/xyz/"),
    ("/xyz/..;foo=bar/.;v1=2,v2=3/abc", "/abc"),
    ("/..;foo=bar/abc/.;mmm", "/abc/"),
    ("/.;aaa/..;foo=bar/abc/.;mmm", "/abc/"),
    ("/xyz/..;foo=bar/.;fff=zzz", "/"),
    ("/xyz/..;foo=bar/.;fff=zzz?blah=woops", "/?blah=woops"),
    ("/xyz/..;foo=bar/.;fff=zzz/remain;blah-bluh?query", "/remain;blah-bluh?query"),
    ("/xyz/...;foo", "/xyz/...;foo"),
    ("/xyz/..foo", "/xyz/..foo"),
]


@pytest.mark.parametrize(("raw", "expected"), ENVOY_CANONICAL)
def test_envoy_canonical_path_cases(raw: str, expected: str) -> None:
    assert forwarded(raw) == expected


@pytest.mark.parametrize("raw", ["/xyz/.%00../abc", "/xyz/%00.%00./abc", "/xyz/AAAAA%%0000/abc", "/a\x00b"])
def test_envoy_rejects_encoded_and_raw_nul(raw: str) -> None:
    result = normalize_path(raw)
    assert isinstance(result, PathRejected)
    assert (result.status, result.detail) == (400, "path_normalization_failed")
    # Without normalization the path is passed on untouched.
    assert isinstance(normalize_path(raw, NONE), NormalizedPath)


# Envoy: PathUtilityTest.MergeSlashes (on paths the canonicalizer leaves alone).
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a//b/c/", "/a/b/c/"),
        ("/a", "/a"),
        ("//a/b/c", "/a/b/c"),
        ("/a//b/c", "/a/b/c"),
        ("/a/b/c//", "/a/b/c/"),
        ("/a///b/c", "/a/b/c"),
        ("/a////b/c", "/a/b/c"),
        ("/a//b?a=///c", "/a/b?a=///c"),
        ("/a//b?", "/a/b?"),
        ("//a/?b", "/a/?b"),
        ("//", "//"),  # Envoy keeps a leading and a trailing slash: nothing between
    ],
)
def test_envoy_merge_slashes_cases(raw: str, expected: str) -> None:
    assert forwarded(raw, MERGE) == expected


# Envoy: PathUtilityTest.UnescapeSlashes, then canonicalized and merged (DECODE_AND_MERGE_SLASHES).
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a%2Fb%2fc/", "/a/b/c/"),
        ("/%2b", "/%2b"),
        ("/abc%2", "/abc%2"),
        ("/foo%", "/foo%"),
        ("/a%2F", "/a/"),
        ("/%%2fa/", "/%/a/"),
        ("/%2%2fa/", "/%2/a/"),
        ("/a%5Cb%5cc/", "/a/b/c/"),  # decoded to backslashes, which become slashes
        ("/x/%2E%2e/z%2f%2Fabc%5C../def", "/z/def"),
        ("/%2fa%5Cb%2fc%5c?%2fabcd%5C%%2f%", "/a/b/c/?%2fabcd%5C%%2f%"),  # query untouched
        ("/a/%252F", "/a/%252F"),  # decoded once only
    ],
)
def test_envoy_unescape_slashes_cases(raw: str, expected: str) -> None:
    assert forwarded(raw, DECODE) == expected


# The traps: what policy matches (``path``) in each mode. None: refused.
TRAPS: list[tuple[str, str | None, str | None, str | None, str | None]] = [
    # raw                      NONE                 BASE                MERGE_SLASHES   DECODE_AND_MERGE
    ("/a/../admin", "/a/../admin", "/admin", "/admin", "/admin"),
    ("/./admin", "/./admin", "/admin", "/admin", "/admin"),
    ("//admin", "//admin", "//admin", "/admin", "/admin"),
    ("/admin/", "/admin/", "/admin/", "/admin/", "/admin/"),
    ("/%2e%2e/admin", "/%2e%2e/admin", "/admin", "/admin", "/admin"),
    ("/.%2E/admin", "/.%2E/admin", "/admin", "/admin", "/admin"),
    ("/a%2F..%2Fadmin", "/a%2F..%2Fadmin", "/a%2F..%2Fadmin", "/a%2F..%2Fadmin", "/admin"),
    ("/a%5c..%5cadmin", "/a%5c..%5cadmin", "/a%5c..%5cadmin", "/a%5c..%5cadmin", "/admin"),
    ("/a\\..\\admin", "/a\\..\\admin", "/admin", "/admin", "/admin"),
    ("/\\admin", "/\\admin", "//admin", "/admin", "/admin"),
    ("\\admin", None, None, None, None),  # not a relative path: Envoy answers 404
    ("admin", None, None, None, None),
    ("/ADMIN", "/ADMIN", "/ADMIN", "/ADMIN", "/ADMIN"),  # case is kept
    ("/%61dmin", "/%61dmin", "/admin", "/admin", "/admin"),  # unreserved characters decoded
    ("/admin%20", "/admin%20", "/admin%20", "/admin%20", "/admin%20"),
    ("/admin x", "/admin x", "/admin%20x", "/admin%20x", "/admin%20x"),
    ("/admin?x=/../y", "/admin", "/admin", "/admin", "/admin"),
    ("/public/../admin?q=1", "/public/../admin", "/admin", "/admin", "/admin"),
    ("/public#/../admin", "/public", "/public", "/public", "/public"),  # fragment stripped
    ("/..", "/..", "/", "/", "/"),
    ("/admin/..;/x", "/admin/..;/x", "/x", "/x", "/x"),
]


@pytest.mark.parametrize(("raw", "none", "base", "merge", "decode"), TRAPS)
def test_traps_per_mode(
    raw: str, none: str | None, base: str | None, merge: str | None, decode: str | None
) -> None:
    expected = {NONE: none, BASE: base, MERGE: merge, DECODE: decode}
    for mode, want in expected.items():
        result = normalize_path(raw, mode)
        if want is None:
            assert isinstance(result, PathRejected), (mode, result)
            assert (result.status, result.detail) == (404, "absolute_path_rejected")
        else:
            assert isinstance(result, NormalizedPath), (mode, result)
            assert result.path == want, mode


def test_query_is_forwarded_untouched_and_not_matched() -> None:
    result = normalize_path("/a/./b?x=/../%2F&y=%41#frag?z", DECODE)
    assert result == NormalizedPath("/a/b", "/a/b?x=/../%2F&y=%41")


def test_empty_path_is_refused() -> None:
    assert normalize_path("") == PathRejected(400, "missing_path_rejected", "the request has an empty path")


def test_default_mode_is_base() -> None:
    assert normalize_path("/a/../b") == normalize_path("/a/../b", BASE) == NormalizedPath("/b", "/b")


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        (EscapedSlashesAction.KEEP_UNCHANGED, NormalizedPath("/a%2Fb", "/a%2Fb")),
        (EscapedSlashesAction.UNESCAPE_AND_FORWARD, NormalizedPath("/a/b", "/a/b")),
        (EscapedSlashesAction.UNESCAPE_AND_REDIRECT, NormalizedPath("/a/b", "/a/b", redirect=True)),
        (
            EscapedSlashesAction.REJECT_REQUEST,
            PathRejected(400, "path_normalization_failed", "the path has an escaped slash (%2F or %5C)"),
        ),
    ],
)
def test_escaped_slashes_action_override(
    action: EscapedSlashesAction, expected: NormalizedPath | PathRejected
) -> None:
    assert normalize_path("/a%2Fb", BASE, escaped_slashes=action) == expected
    # No escaped slash: every action forwards, none redirects.
    assert normalize_path("/a/b", BASE, escaped_slashes=action) == NormalizedPath("/a/b", "/a/b")


def test_bytes_that_may_not_appear_raw_are_escaped() -> None:
    assert forwarded('/a b"c<d>e^f`g{h|i}', BASE) == "/a%20b%22c%3Cd%3Ee%5Ef%60g%7Bh%7Ci%7D"
    assert forwarded("/caf\u00e9", BASE) == "/caf%E9"  # latin-1 byte, as a parser reads it
    assert forwarded("/\u65e5", BASE) == "/%E6%97%A5"  # anything above: its UTF-8 bytes
    assert forwarded("/keep!$&'()*+,;=:@[]~-_.", BASE) == "/keep!$&'()*+,;=:@[]~-_."


def test_nested_escapes_cannot_become_valid_escapes() -> None:
    # Chromium: "%%30%30" must not turn into "%00" (which a second pass would decode).
    assert forwarded("/%%30%30") == "/%2500"
    assert forwarded("/%%30%30") == forwarded(forwarded("/%%30%30"))


def test_percent_encoded_reserved_characters_stay_encoded() -> None:
    assert forwarded("/%2F%3F%23%25%5C") == "/%2F%3F%23%25%5C"
    assert forwarded("/%7e%2D%5f%30") == "/~-_0"
