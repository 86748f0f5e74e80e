"""The node agent in real network namespaces, talking to a fake ztunnel over real ZDS."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from cni import rules
from cni.enroll import DATAPLANE_MODE_LABEL
from mesh import zds
from mesh.model import Kind, Namespace, Node, Store, Workload
from tests.cni_agent.helpers import NODE, FakeZtunnel, Harness, Netns, netns_set, nft_text, sh

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "nft", "nsenter", "unshare")),
        reason="needs root, ip, nft, nsenter, unshare",
    ),
]

AMBIENT = {DATAPLANE_MODE_LABEL: "ambient"}


def pod(uid: str, ns: str, labels: dict[str, str] | None = None) -> Workload:
    return Workload(
        uid=uid, name=f"pod-{uid}", namespace=ns, node=NODE, service_account=f"sa-{uid}", labels=labels or {}
    )


def base_objects() -> list[Node | Namespace | Workload]:
    return [
        Node(NODE),
        Namespace("mesh", labels=AMBIENT),
        Namespace("plain"),
        pod("a", "mesh"),
        pod("b", "plain"),
    ]


@pytest.fixture
def tmpdir_short() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="cnia", dir="/tmp")  # unix socket paths must stay short
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def netns() -> Iterator[Netns]:
    with netns_set("x") as n:
        yield n


@pytest.fixture
async def harness(tmpdir_short: str) -> AsyncIterator[Harness]:
    store = Store()
    store.replace_all(base_objects())
    h = Harness(tmpdir_short, store)
    await h.start()
    try:
        yield h
    finally:
        await h.stop()


async def ztunnel(h: Harness) -> FakeZtunnel:
    return await FakeZtunnel(h.zds_path).connect()


async def until(h: Harness, cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for ``cond()`` to hold, re-checking whenever the agent's state changes."""
    assert h.agent is not None
    changed = h.agent.changed
    async with asyncio.timeout(timeout):
        while True:
            changed.clear()
            if cond():
                return
            await changed.wait()


def state_of(h: Harness, uid: str) -> str | None:
    assert h.agent is not None
    p = h.agent.status()["pods"].get(uid)
    return None if p is None else str(p["state"])


async def test_add_applies_rules_before_reply_then_snapshot(harness: Harness, netns: Netns) -> None:
    a, b = netns.add(), netns.add()
    out = await harness.acni("ADD", "mesh", "pod-a", "a", a)
    assert out.exit_code == 0, out.stdout
    assert rules.verify(a) == []  # in place when the plugin returned
    out = await harness.acni("ADD", "plain", "pod-b", "b", b)
    assert out.exit_code == 0, out.stdout
    assert rules.read(b).empty
    assert state_of(harness, "a") == "pending"  # no ztunnel yet: the agent keeps working
    assert state_of(harness, "b") == "not-enrolled"

    zt = await ztunnel(harness)
    try:
        got = await zt.snapshot()
        assert [(r.kind, r.uid) for r in got] == [("add", "a"), ("snapshot_sent", "")]
        assert got[0].netns_ok
        assert zt.inodes["a"] == os.stat(a).st_ino  # and it is this pod's netns
        assert (got[0].name, got[0].namespace, got[0].service_account) == ("pod-a", "mesh", "sa-a")
        await until(harness, lambda: state_of(harness, "a") == "acked")
    finally:
        await zt.close()

    # ztunnel restarted: the new one gets the whole snapshot again.
    zt2 = await ztunnel(harness)
    try:
        assert [(r.kind, r.uid) for r in await zt2.snapshot()] == [("add", "a"), ("snapshot_sent", "")]
        # A third connection while the second is still open replaces it.
        zt3 = await ztunnel(harness)
        try:
            assert [(r.kind, r.uid) for r in await zt3.snapshot()] == [("add", "a"), ("snapshot_sent", "")]
            async with asyncio.timeout(10):
                await zt2.closed.wait()
        finally:
            await zt3.close()
    finally:
        await zt2.close()


async def test_label_change_unenrolls_and_reenrolls(harness: Harness, netns: Netns) -> None:
    a = netns.add()
    assert (await harness.acni("ADD", "mesh", "pod-a", "a", a)).exit_code == 0
    zt = await ztunnel(harness)
    try:
        await zt.snapshot()
        harness.store.upsert(pod("a", "mesh", {DATAPLANE_MODE_LABEL: "none"}))
        got = await zt.next()
        assert (got.kind, got.uid) == ("del", "a")
        assert rules.read(a).empty
        assert state_of(harness, "a") == "not-enrolled"

        harness.store.upsert(pod("a", "mesh"))
        got = await zt.next()
        assert (got.kind, got.uid, got.netns_ok) == ("add", "a", True)
        assert rules.verify(a) == []
        await until(harness, lambda: state_of(harness, "a") == "acked")

        # The namespace label removed: same thing.
        harness.store.upsert(Namespace("mesh"))
        got = await zt.next()
        assert (got.kind, got.uid) == ("del", "a")
        assert rules.read(a).empty
    finally:
        await zt.close()


async def test_pod_deletion_and_cni_del(harness: Harness, netns: Netns) -> None:
    harness.store.upsert(pod("c", "mesh"))
    a, c = netns.add(), netns.add()
    assert (await harness.acni("ADD", "mesh", "pod-a", "a", a)).exit_code == 0
    assert (await harness.acni("ADD", "mesh", "pod-c", "c", c)).exit_code == 0
    zt = await ztunnel(harness)
    try:
        assert {r.uid for r in await zt.snapshot()} == {"a", "c", ""}
        harness.store.delete(Kind.WORKLOAD, "a")
        got = await zt.next()
        assert (got.kind, got.uid) == ("del", "a")
        assert rules.read(a).empty
        assert state_of(harness, "a") is None

        assert (await harness.acni("DEL", "mesh", "pod-c", "c", c)).exit_code == 0
        assert rules.read(c).empty  # removed before the plugin returned
        got = await zt.next()
        assert (got.kind, got.uid) == ("del", "c")
        assert state_of(harness, "c") is None
    finally:
        await zt.close()


async def test_unknown_pod_is_refused(harness: Harness, netns: Netns) -> None:
    x = netns.add()
    out = await harness.acni("ADD", "mesh", "pod-x", "x", x)
    assert out.exit_code != 0
    assert "not known" in out.stdout
    assert rules.read(x).empty


async def test_error_ack_is_retried(harness: Harness, netns: Netns) -> None:
    a = netns.add()
    assert (await harness.acni("ADD", "mesh", "pod-a", "a", a)).exit_code == 0
    zt = FakeZtunnel(harness.zds_path)
    zt.fail["a"] = 2
    await zt.connect()
    try:
        first = await zt.snapshot()
        assert [(r.kind, r.acked_error) for r in first] == [
            ("add", "injected failure"),
            ("snapshot_sent", ""),
        ]
        assert state_of(harness, "a") == "pending"
        second = await zt.next()
        third = await zt.next()
        assert [(r.kind, r.uid, r.acked_error) for r in (second, third)] == [
            ("add", "a", "injected failure"),
            ("add", "a", ""),
        ]
        await until(harness, lambda: state_of(harness, "a") == "acked")
    finally:
        await zt.close()


async def test_agent_restart_verifies_rules_and_resends_snapshot(harness: Harness, netns: Netns) -> None:
    a, b, gone = netns.add(), netns.add(), netns.add()
    harness.store.upsert(pod("g", "mesh"))
    for ns, name, uid, path in (
        ("mesh", "pod-a", "a", a),
        ("plain", "pod-b", "b", b),
        ("mesh", "pod-g", "g", gone),
    ):
        assert (await harness.acni("ADD", ns, name, uid, path)).exit_code == 0
    before = nft_text(a)

    await harness.stop()
    assert rules.verify(a) == []  # stopping leaves the rules: pods keep failing closed
    rules.apply(b)  # a stale table in a pod that is not enrolled
    netns.delete(gone)  # this pod's netns went away while the agent was down

    await harness.start()
    assert nft_text(a) == before  # verified, not re-applied or duplicated
    assert rules.verify(a) == []
    assert rules.read(b).empty  # stale rules removed
    assert harness.agent is not None
    pods = harness.agent.status()["pods"]
    assert set(pods) == {"a", "b"}  # g forgotten

    # A second restart is just as quiet; a tampered table is re-applied.
    await harness.stop()
    assert nft_text(a) == before
    sh("nsenter", f"--net={a}", "nft", "flush", "chain", "inet", "istio-ambient", "output")
    assert rules.verify(a) != []
    await harness.start()
    assert rules.verify(a) == []

    zt = await ztunnel(harness)
    try:
        got = await zt.snapshot()
        assert [(r.kind, r.uid, r.netns_ok) for r in got] == [
            ("add", "a", True),
            ("snapshot_sent", "", False),
        ]
    finally:
        await zt.close()


async def test_annotation_written_and_removed_and_failure_does_not_block(
    tmpdir_short: str, netns: Netns
) -> None:
    calls: list[tuple[str, str, bool]] = []
    failures = [True]  # the first call fails

    async def annotate(namespace: str, name: str, enabled: bool) -> None:
        calls.append((namespace, name, enabled))
        if failures and failures.pop():
            raise OSError("api server unavailable")

    store = Store()
    store.replace_all(base_objects())
    h = Harness(tmpdir_short, store, annotate=annotate)
    await h.start()
    try:
        a = netns.add()
        assert (await h.acni("ADD", "mesh", "pod-a", "a", a)).exit_code == 0  # despite the failure
        assert calls == [("mesh", "pod-a", True)]
        zt = await ztunnel(h)
        try:
            assert [r.kind for r in await zt.snapshot()] == ["add", "snapshot_sent"]
            store.upsert(Node(NODE, labels={"touched": "1"}))  # any change: the annotation is retried
            await until(h, lambda: len(calls) == 2)
            assert calls[1] == ("mesh", "pod-a", True)
            store.upsert(pod("a", "mesh", {DATAPLANE_MODE_LABEL: "none"}))
            assert (await zt.next()).kind == "del"
            assert calls[2] == ("mesh", "pod-a", False)
        finally:
            await zt.close()
    finally:
        await h.stop()


async def test_bad_hello_closes_the_session_and_a_good_client_still_works(
    harness: Harness, netns: Netns
) -> None:
    bad = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    bad.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(bad, harness.zds_path)
        await zds.send_message(bad, b"\x08\x07")  # ZdsHello{version=7}
        data, fds = await asyncio.wait_for(zds.recv_message(bad), 10)
        assert (data, fds) == (b"", [])  # the agent hung up
    finally:
        bad.close()
    a = netns.add()
    assert (await harness.acni("ADD", "mesh", "pod-a", "a", a)).exit_code == 0
    zt = await ztunnel(harness)
    try:
        assert [r.kind for r in await zt.snapshot()] == ["add", "snapshot_sent"]
    finally:
        await zt.close()
