"""The CNI plugin protocol: one table of cases, run through the sans-IO core and the executable."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cni import plugin
from cni.plugin import AgentCall, AgentReply, AgentRequest, Output, PluginServer

REPO = Path(__file__).resolve().parents[2]

PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
    "ips": [{"address": "10.22.0.5/16", "gateway": "10.22.0.1", "interface": 0}],
}


def conf(**over: Any) -> dict[str, Any]:
    c: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "ambient-cni",
        "prevResult": PREV,
    }
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def env(command: str | None = "ADD", **over: str | None) -> dict[str, str]:
    e: dict[str, str | None] = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": "/var/run/netns/x",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/usr/lib/cni",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_UID=uid-1",
    }
    e.update(over)
    return {k: v for k, v in e.items() if v is not None}


@dataclass(frozen=True)
class Case:
    id: str
    env: dict[str, str]
    stdin: bytes
    agent: str = "ok"  # "ok" | "error" | "down": what the agent at the socket does
    exit: int = 0
    code: int | None = None  # error code expected in stdout
    stdout: Any = ""  # for successes: the JSON expected, or "" for no output
    msg: str = ""  # fragment of the error message
    requests: tuple[str, ...] = field(default=())  # commands the agent should have seen


def j(o: Any) -> bytes:
    return json.dumps(o).encode()


CASES = [
    Case("add-ok", env(), j(conf()), stdout=PREV, requests=("ADD",)),
    Case("add-agent-down", env(), j(conf()), agent="down", exit=1, code=11, msg="not reachable"),
    Case(
        "add-agent-error",
        env(),
        j(conf()),
        agent="error",
        exit=1,
        code=100,
        msg="netns vanished",
        requests=("ADD",),
    ),
    Case("add-no-prevresult", env(), j(conf(prevResult=None)), exit=1, code=7, msg="prevResult"),
    Case("add-malformed-json", env(), b'{"cniVersion": ', exit=1, code=6),
    Case("add-empty-stdin", env(), b"", exit=1, code=6),
    Case("add-not-an-object", env(), b"[1, 2]", exit=1, code=7),
    Case("add-missing-name", env(), j(conf(name=None)), exit=1, code=7, msg="'name'"),
    Case("add-missing-type", env(), j(conf(type=None)), exit=1, code=7, msg="'type'"),
    Case("add-missing-version", env(), j(conf(cniVersion=None)), exit=1, code=7, msg="'cniVersion'"),
    Case("add-unsupported-version", env(), j(conf(cniVersion="9.9.9")), exit=1, code=1, msg="9.9.9"),
    Case("add-bad-timeout", env(), j(conf(agent_timeout="soon")), exit=1, code=7, msg="agent_timeout"),
    Case("add-nan-timeout", env(), j(conf(agent_timeout=float("nan"))), exit=1, code=7, msg="agent_timeout"),
    Case("add-huge-timeout", env(), j(conf(agent_timeout=10**400)), exit=1, code=7, msg="agent_timeout"),
    Case("add-bad-ips", env(), j(conf(prevResult={"ips": [{"gateway": "x"}]})), exit=1, code=7, msg="ips[0]"),
    Case("add-missing-netns", env(CNI_NETNS=None), j(conf()), exit=1, code=4, msg="CNI_NETNS"),
    Case(
        "add-missing-containerid", env(CNI_CONTAINERID=None), j(conf()), exit=1, code=4, msg="CNI_CONTAINERID"
    ),
    Case("add-bad-cni-args", env(CNI_ARGS="K8S_POD_NAME"), j(conf()), exit=1, code=4, msg="CNI_ARGS"),
    Case("add-not-kubernetes", env(CNI_ARGS=None), j(conf()), stdout=PREV),
    Case("no-command", env(None), j(conf()), exit=1, code=4, msg="CNI_COMMAND"),
    Case("bad-command", env("FROB"), j(conf()), exit=1, code=4, msg="CNI_COMMAND"),
    Case("del-ok", env("DEL"), j(conf(prevResult=None)), requests=("DEL",)),
    Case("del-agent-down", env("DEL"), j(conf()), agent="down"),
    Case("del-agent-error", env("DEL"), j(conf()), agent="error", requests=("DEL",)),
    Case("del-no-netns", env("DEL", CNI_NETNS=None), j(conf()), requests=("DEL",)),
    Case("del-missing-ifname", env("DEL", CNI_IFNAME=None), j(conf()), exit=1, code=4, msg="CNI_IFNAME"),
    Case("check-ok", env("CHECK"), j(conf())),
    Case("check-no-prevresult", env("CHECK"), j(conf(prevResult=None)), exit=1, code=7),
    Case("gc", env("GC"), j(conf(cniVersion="1.1.0", prevResult=None))),
    Case("status-ok", env("STATUS"), j(conf(cniVersion="1.1.0", prevResult=None)), requests=("STATUS",)),
    Case("status-agent-down", env("STATUS"), j(conf(cniVersion="1.1.0")), agent="down", exit=1, code=50),
    Case(
        "version",
        env("VERSION"),
        j({"cniVersion": "0.4.0"}),
        stdout={"cniVersion": "0.4.0", "supportedVersions": list(plugin.SUPPORTED_VERSIONS)},
    ),
    Case(
        "version-no-stdin",
        env("VERSION"),
        b"",
        stdout={"cniVersion": "1.0.0", "supportedVersions": list(plugin.SUPPORTED_VERSIONS)},
    ),
]


def check(case: Case, out: Output, seen: list[AgentRequest]) -> None:
    assert out.exit_code == case.exit, out.stdout
    if case.code is not None:
        body = json.loads(out.stdout)
        assert body["code"] == case.code
        assert set(body) == {"cniVersion", "code", "msg", "details"}
        assert body["cniVersion"] in plugin.SUPPORTED_VERSIONS
        assert case.msg in body["msg"] + body["details"]
    elif case.stdout == "":
        assert out.stdout == ""
    else:
        assert json.loads(out.stdout) == case.stdout
    assert tuple(r.command for r in seen) == case.requests


def fake_agent(case: Case, call: AgentCall, seen: list[AgentRequest]) -> tuple[bytes | None, str]:
    if case.agent == "down":
        return None, "FileNotFoundError: no socket"
    seen.append(plugin.decode_request(call.request.encode()))  # through the wire format
    reply = AgentReply(True) if case.agent == "ok" else AgentReply(False, "netns vanished")
    return reply.encode().rstrip(b"\n"), ""


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_sans_io(case: Case) -> None:
    seen: list[AgentRequest] = []
    step = plugin.handle(case.env, case.stdin)
    if isinstance(step, AgentCall):
        reply, why = fake_agent(case, step, seen)
        step = plugin.finish(step, reply, why)
    check(case, step, seen)


@pytest.fixture
def sock_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="cnip", dir="/tmp")  # short: unix socket paths max out at 108 bytes
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.asynccontextmanager
async def agent(path: str, behaviour: str, seen: list[AgentRequest]) -> AsyncIterator[None]:
    async def handler(req: AgentRequest) -> AgentReply:
        seen.append(req)
        return AgentReply(True) if behaviour == "ok" else AgentReply(False, "netns vanished")

    if behaviour == "down":
        yield
        return
    async with PluginServer(path, handler):
        yield


async def run_plugin(environ: dict[str, str], stdin: bytes, timeout: float = 20.0) -> Output:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cni.plugin_main",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**environ, "PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "")},
        cwd=REPO,
    )
    try:
        async with asyncio.timeout(timeout):
            out, _err = await proc.communicate(stdin)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Output(out.decode(), proc.returncode)


def with_socket(stdin: bytes, path: str) -> bytes:
    try:
        obj = json.loads(stdin)
    except ValueError:
        return stdin
    if isinstance(obj, dict) and "name" in obj:
        obj["agent_socket"] = path
        return j(obj)
    return stdin


SUBPROCESS_CASES = [c for c in CASES if c.id in {
    "add-ok", "add-agent-down", "add-agent-error", "add-malformed-json", "add-no-prevresult",
    "add-unsupported-version", "no-command", "del-ok", "del-agent-down", "check-ok", "version",
    "status-agent-down",
}]  # fmt: skip


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=[c.id for c in SUBPROCESS_CASES])
async def test_executable(case: Case, sock_dir: str) -> None:
    path = os.path.join(sock_dir, "agent.sock")
    seen: list[AgentRequest] = []
    async with agent(path, case.agent, seen):
        out = await run_plugin(case.env, with_socket(case.stdin, path))
    check(case, out, seen)
    if case.requests == ("ADD",):
        assert seen[0] == AgentRequest(
            command="ADD",
            pod_namespace="shop",
            pod_name="web-1",
            pod_uid="uid-1",
            container_id="c0ffee",
            netns="/var/run/netns/x",
            ifname="eth0",
            ips=("10.22.0.5",),
        )


async def test_add_waits_for_the_agent(sock_dir: str) -> None:
    """The plugin only answers after the agent's reply: redirection precedes the app's first packet."""
    path = os.path.join(sock_dir, "agent.sock")
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow(req: AgentRequest) -> AgentReply:
        entered.set()
        await release.wait()
        return AgentReply(True)

    async with PluginServer(path, slow):
        task = asyncio.create_task(run_plugin(env(), j(conf(agent_socket=path))))
        try:
            async with asyncio.timeout(20):
                await entered.wait()
            assert not task.done()
            release.set()
            out = await task
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    assert out.exit_code == 0 and json.loads(out.stdout) == PREV


async def test_agent_timeout_is_try_again(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "agent.sock")
    never = asyncio.Event()

    async def stuck(req: AgentRequest) -> AgentReply:
        await never.wait()
        return AgentReply(True)

    async with PluginServer(path, stuck):
        out = await run_plugin(env(), j(conf(agent_socket=path, agent_timeout=0.5)))
    assert out.exit_code == 1
    assert json.loads(out.stdout)["code"] == 11


async def test_server_rejects_bad_requests_and_handler_crashes(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "agent.sock")

    async def boom(req: AgentRequest) -> AgentReply:
        raise RuntimeError("nft exploded")

    async def ask(line: bytes) -> AgentReply:
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(line)
            await writer.drain()
            async with asyncio.timeout(5):
                return plugin.decode_reply(await reader.readline())
        finally:
            writer.close()
            await writer.wait_closed()

    async with PluginServer(path, boom):
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        bad = await ask(b"not json\n")
        assert not bad.ok and "bad request" in bad.error
        wrong = await ask(b'{"version": 1, "command": "ADD"}\n')
        assert not wrong.ok and "pod_namespace" in wrong.error
        crash = await ask(AgentRequest("ADD", "ns", "p", "c", "/n", "eth0").encode())
        assert not crash.ok and "nft exploded" in crash.error
    assert not await asyncio.to_thread(os.path.exists, path)


@pytest.mark.parametrize(
    "data",
    [b"[]", b'{"version": 2}', b'{"version": 1, "command": "FROB", "pod_namespace": "", "pod_name": "",'
     b' "container_id": "", "netns": "", "ifname": ""}', b'{"version":1,"command":"ADD","pod_namespace":"a",'
     b'"pod_name":"b","container_id":"c","netns":"d","ifname":"e","ips":[1]}'],
)  # fmt: skip
def test_decode_request_errors(data: bytes) -> None:
    with pytest.raises(plugin.ProtocolError):
        plugin.decode_request(data)


def test_garbage_agent_reply_is_try_again() -> None:
    step = plugin.handle(env(), j(conf()))
    assert isinstance(step, AgentCall)
    out = plugin.finish(step, b"<html>")
    assert json.loads(out.stdout)["code"] == 11


def test_del_ignores_a_malformed_prev_result() -> None:
    step = plugin.handle(env("DEL"), j(conf(prevResult={"ips": "nope"})))
    assert isinstance(step, AgentCall) and step.request.ips == ()


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=10,
)
_confs = st.fixed_dictionaries(
    {},
    optional={
        "cniVersion": st.sampled_from(["1.0.0", "0.4.0", "2.0", ""]) | _json_values,
        "name": st.just("n") | _json_values,
        "type": st.just("t") | _json_values,
        "prevResult": st.just(PREV) | _json_values,
        "agent_timeout": st.floats(allow_nan=True) | _json_values,
        "agent_socket": _json_values,
    },
)


@given(
    command=st.sampled_from([*plugin.COMMANDS, "", "add"]),
    stdin=st.one_of(st.binary(max_size=64), _confs.map(j)),
    cni_args=st.text(max_size=40),
    drop=st.sets(st.sampled_from(["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])),
    reply=st.one_of(st.none(), st.binary(max_size=32), st.just(b'{"ok": true}'), st.just(b'{"ok": false}')),
)
def test_handle_and_finish_never_raise(
    command: str, stdin: bytes, cni_args: str, drop: set[str], reply: bytes | None
) -> None:
    environ = env(command, CNI_ARGS=cni_args, **dict.fromkeys(drop))
    step = plugin.handle(environ, stdin)
    if isinstance(step, AgentCall):
        step = plugin.finish(step, reply, "down")
    assert step.exit_code in (0, 1)
    if step.exit_code == 1:
        assert set(json.loads(step.stdout)) == {"cniVersion", "code", "msg", "details"}


@pytest.mark.parametrize("depth", [100_000, 1_000_000])
def test_deeply_nested_stdin_gets_the_spec_error_json(depth: int) -> None:
    """A nesting the JSON decoder refuses with RecursionError is a decode error like any other
    (issue 24: it used to kill the plugin without the spec's error JSON)."""
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0", "CNI_PATH": "/opt"}
    out = plugin.handle(env, b"[" * depth + b"]" * depth)
    assert isinstance(out, Output) and out.exit_code != 0
    body = json.loads(out.stdout)
    assert body["code"] == plugin.ERR_DECODE and "not JSON" in body["msg"]
    with pytest.raises(plugin.ProtocolError):
        plugin.decode_request(b"[" * depth)
