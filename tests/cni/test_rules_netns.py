"""The redirection rules in a real pod netns: written, read back, idempotent, fail-closed."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from cni import rules
from mesh.netns import original_dst
from tests.cni.netnshelp import (
    PEER_IP,
    POD_IP,
    NetnsPair,
    client,
    have_root_tools,
    listener,
    netns_pair,
    nft_json,
)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not have_root_tools(), reason="needs root, ip, nft, nsenter, unshare"),
]


@pytest.fixture
def pair() -> Iterator[NetnsPair]:
    with netns_pair("r") as p:
        yield p


def test_apply_read_verify_remove(pair: NetnsPair) -> None:
    assert rules.read(pair.pod_path).empty
    assert len(rules.verify(pair.pod_path)) == 3

    rules.apply(pair.pod_path)
    state = rules.read(pair.pod_path)
    assert state.ip_rule and state.local_route
    assert state.chains == rules.expected_chains()
    assert {(c.name, c.type, c.hook, c.prio) for c in state.chains} == {
        ("prerouting", "nat", "prerouting", -100),
        ("output", "nat", "output", -100),
        ("transparent-return", "route", "output", -150),
    }
    assert rules.verify(pair.pod_path) == []

    rules.remove(pair.pod_path)
    assert rules.read(pair.pod_path).empty
    rules.remove(pair.pod_path)  # removing nothing is fine
    assert "133" not in rules._run(pair.pod_path, ["ip", "rule", "show"])


def test_apply_twice_changes_nothing(pair: NetnsPair) -> None:
    rules.apply(pair.pod_path)
    first = nft_json(pair.pod_path)
    ip_rules = rules._run(pair.pod_path, ["ip", "rule", "show"])
    rules.apply(pair.pod_path)
    assert nft_json(pair.pod_path) == first
    assert rules._run(pair.pod_path, ["ip", "rule", "show"]) == ip_rules


def test_apply_by_fd(pair: NetnsPair) -> None:
    fd = os.open(pair.pod_path, os.O_RDONLY)
    try:
        rules.apply(fd)
        assert rules.verify(fd) == []
        rules.remove(fd)
        assert rules.read(fd).empty
    finally:
        os.close(fd)


def test_verify_detects_tampering_and_apply_repairs(pair: NetnsPair) -> None:
    rules.apply(pair.pod_path)
    rules._run(
        pair.pod_path,
        [
            "nft",
            "delete",
            "rule",
            "inet",
            "istio-ambient",
            "output",
            "handle",
            _last_handle(pair.pod_path, "output"),
        ],
    )
    rules._run(pair.pod_path, ["nft", "add", "chain", "inet", "istio-ambient", "sneaky"])
    rules._run(pair.pod_path, ["ip", "rule", "del", "fwmark", "0x111/0xfff", "lookup", "133"])
    problems = rules.verify(pair.pod_path)
    assert any("chain output" in p for p in problems)
    assert "unexpected chain sneaky" in problems
    assert any("ip rule" in p for p in problems)

    rules.apply(pair.pod_path)
    assert rules.verify(pair.pod_path) == []


def test_dns_option(pair: NetnsPair) -> None:
    dns = rules.RuleOptions(dns=True)
    rules.apply(pair.pod_path, dns)
    assert rules.verify(pair.pod_path, dns) == []
    assert any("chain output" in p for p in rules.verify(pair.pod_path))
    assert "redirect to :15053" in rules._run(
        pair.pod_path, ["nft", "list", "table", "inet", "istio-ambient"]
    )


def _last_handle(path: str, chain: str) -> str:
    out = rules._run(path, ["nft", "-a", "list", "chain", "inet", "istio-ambient", chain])
    return [line for line in out.splitlines() if "# handle" in line][-1].rsplit(" ", 1)[1]


def _connect(pair: NetnsPair, port: int, mark: int | None = None) -> int:
    """errno of a connect from the pod netns to the peer (0: connected)."""
    with pair.sockets("pod") as pod:
        s = pod.run_sync(lambda: client(mark))
    try:
        return s.connect_ex((PEER_IP, port))
    finally:
        s.close()


def test_fail_closed_without_ztunnel(pair: NetnsPair) -> None:
    with pair.sockets("peer") as peer:
        outside = peer.run_sync(lambda: listener(PEER_IP, 8080))
    try:
        outside.setblocking(False)
        # Control: without rules the peer is reachable.
        assert _connect(pair, 8080) == 0
        outside.accept()[0].close()

        rules.apply(pair.pod_path)
        started = time.monotonic()
        assert _connect(pair, 8080) in (errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EAGAIN)
        assert time.monotonic() - started < 3.5
        with pytest.raises(BlockingIOError):
            outside.accept()  # nothing reached the outside

        # ztunnel's own sockets (mark 0x539) still get out.
        assert _connect(pair, 8080, mark=rules.MARK_SKIP) == 0
        outside.accept()[0].close()
    finally:
        outside.close()


def test_outbound_lands_on_15001_with_original_dst(pair: NetnsPair) -> None:
    rules.apply(pair.pod_path)
    with pair.sockets("pod") as pod:
        capture = pod.run_sync(lambda: listener("0.0.0.0", rules.OUTBOUND_PORT))
        app = pod.run_sync(client)
    try:
        capture.settimeout(3.0)
        app.connect((PEER_IP, 9999))
        conn, _ = capture.accept()
        with conn:
            assert original_dst(conn) == (PEER_IP, 9999)
    finally:
        app.close()
        capture.close()


def test_inbound_redirects_to_15006_except_15008(pair: NetnsPair) -> None:
    rules.apply(pair.pod_path)
    with pair.sockets("pod") as pod:
        plain = pod.run_sync(lambda: listener("0.0.0.0", rules.INBOUND_PLAINTEXT_PORT))
        hbone = pod.run_sync(lambda: listener("0.0.0.0", rules.INBOUND_HBONE_PORT))
    with pair.sockets("peer") as peer:
        c1 = peer.run_sync(client)
        c2 = peer.run_sync(client)
    try:
        plain.settimeout(3.0)
        hbone.settimeout(3.0)
        c1.connect((POD_IP, 8080))
        conn, addr = plain.accept()
        with conn:
            assert addr[0] == PEER_IP
            assert original_dst(conn) == (POD_IP, 8080)
        c2.connect((POD_IP, rules.INBOUND_HBONE_PORT))
        conn, _ = hbone.accept()
        conn.close()
    finally:
        for s in (c1, c2, plain, hbone):
            s.close()


def test_nothing_left_behind() -> None:
    links_before = {name for _, name in socket.if_nameindex()}
    with netns_pair("x") as p:
        rules.apply(p.pod_path)
        names = (p.pod, p.peer)
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in out for n in names)
    assert {name for _, name in socket.if_nameindex()} == links_before  # veths never lived in the root netns
