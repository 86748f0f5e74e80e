from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.identity import MAX_ID_LENGTH, Identity, IdentityError

td_st = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,30}", fullmatch=True)
seg_st = st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,30}", fullmatch=True)


def test_parse_and_format() -> None:
    ident = Identity.parse("spiffe://cluster.local/ns/shop/sa/web")
    assert ident == Identity("cluster.local", "shop", "web")
    assert ident.uri == "spiffe://cluster.local/ns/shop/sa/web"
    assert ident.principal == "cluster.local/ns/shop/sa/web"
    assert str(ident) == ident.uri
    assert Identity.parse_principal(ident.principal) == ident


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("http://cluster.local/ns/a/sa/b", "bad scheme 'http://'"),
        ("cluster.local/ns/a/sa/b", "bad scheme '(none)'"),
        ("spiffe:///ns/a/sa/b", "empty trust domain"),
        ("spiffe://cluster.local/ns//sa/b", "empty namespace"),
        ("spiffe://cluster.local/ns/a/sa/", "empty service account"),
        ("spiffe://cluster.local/ns/a/sa/b/c", "is not of the form"),
        ("spiffe://cluster.local/namespace/a/sa/b", "is not of the form"),
        ("spiffe://Cluster.Local/ns/a/sa/b", "illegal characters 'CL'"),
        ("spiffe://cluster.local/ns/a b/sa/b", "namespace 'a b' has illegal characters ' '"),
        ("spiffe://cluster.local/ns/../sa/b", "namespace may not be '..'"),
        ("spiffe://" + "a" * 256 + "/ns/a/sa/b", "trust domain is 256 characters long"),
        ("spiffe://cluster.local/ns/a/sa/" + "b" * MAX_ID_LENGTH, "characters long, the limit is 2048"),
    ],
)
def test_errors_say_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(
        IdentityError, match=reason.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")
    ):
        Identity.parse(text)


def test_constructor_validates() -> None:
    with pytest.raises(IdentityError, match="empty namespace"):
        Identity("cluster.local", "", "sa")


@given(td_st, seg_st, seg_st)
def test_roundtrip(td: str, ns: str, sa: str) -> None:
    if ns in (".", "..") or sa in (".", ".."):
        return
    ident = Identity(td, ns, sa)
    assert Identity.parse(str(ident)) == ident
    assert Identity.parse_principal(ident.principal) == ident


@given(st.text(max_size=3000))
def test_no_input_raises_anything_else(text: str) -> None:
    for fn in (Identity.parse, Identity.parse_principal):
        try:
            fn(text)
        except IdentityError:
            pass


@given(st.from_regex(r"spiffe://[ -~]{0,20}/ns/[ -~]{0,8}/sa/[ -~]{0,8}", fullmatch=True))
def test_near_misses_raise_only_identity_error(text: str) -> None:
    try:
        ident = Identity.parse(text)
    except IdentityError:
        return
    assert Identity.parse(ident.uri) == ident


def test_non_string_input() -> None:
    with pytest.raises(IdentityError, match="must be a string"):
        Identity.parse(42)  # type: ignore[arg-type]
