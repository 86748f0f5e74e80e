"""The CNI plugin protocol: one table of cases, run through the sans-IO core and both executables.

The executables are the Python plugin (``cni.plugin_main``) and the static Go binary
(``cni/plugin-go``) the cni agent installs on nodes; ``plugin_exe`` (tests/cni/conftest.py) runs
each test once per executable, and a property test compares the Go binary with the Python core on
generated input.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import AsyncIterator, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni import plugin
from cni.plugin import AgentCall, AgentReply, AgentRequest, Output, PluginServer
from tests.cni.pluginexe import PluginExe

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
    # NaN and Infinity are not JSON (RFC 8259), whatever Python's json.loads would take: refused as such.
    Case("add-nan-timeout", env(), j(conf(agent_timeout=float("nan"))), exit=1, code=6, msg="not JSON"),
    Case("add-infinite-timeout", env(), j(conf(agent_timeout=float("inf"))), exit=1, code=6, msg="not JSON"),
    Case("add-huge-timeout", env(), j(conf(agent_timeout=10**400)), exit=1, code=7, msg="agent_timeout"),
    Case(
        "add-overflowing-timeout",
        env(),
        b'{"cniVersion": "1.0.0", "name": "n", "type": "t", "agent_socket": "/x", "agent_timeout": 1e400}',
        exit=1,
        code=7,
        msg="agent_timeout",
    ),
    Case("add-zero-timeout", env(), j(conf(agent_timeout=0)), exit=1, code=7, msg="agent_timeout"),
    Case("add-bool-timeout", env(), j(conf(agent_timeout=True)), exit=1, code=7, msg="agent_timeout"),
    Case("add-day-timeout", env(), j(conf(agent_timeout=86400)), exit=1, code=7, msg="agent_timeout"),
    Case("add-empty-socket", env(), j(conf(agent_socket="")), exit=1, code=7, msg="agent_socket"),
    Case(
        "add-null-socket",
        env(),
        b'{"cniVersion": "1.0.0", "name": "n", "type": "t", "agent_socket": null}',
        exit=1,
        code=7,
        msg="agent_socket",
    ),
    Case("add-not-utf8", env(), b'{"cniVersion": "1.0.0", "name": "\xff", "type": "t"}', exit=1, code=6),
    Case("add-utf8-bom", env(), b"\xef\xbb\xbf" + j(conf()), exit=1, code=6),
    Case("add-trailing-data", env(), j(conf()) + b" {}", exit=1, code=6),
    Case("add-prev-not-object", env(), j(conf(prevResult=[PREV])), exit=1, code=7, msg="prevResult"),
    Case("add-ips-not-a-list", env(), j(conf(prevResult={"ips": "10.0.0.1"})), exit=1, code=7, msg="'ips'"),
    Case(
        "add-prev-without-version",
        env(),
        j(conf(prevResult={"ips": [], "dns": {"nameservers": ["10.96.0.10"]}})),
        stdout={"cniVersion": "1.0.0", "ips": [], "dns": {"nameservers": ["10.96.0.10"]}},
        requests=("ADD",),
    ),
    Case(
        "add-version-of-the-config",
        env(),
        j(conf(cniVersion="0.4.0", prevResult={"ips": []})),
        stdout={"cniVersion": "0.4.0", "ips": []},
        requests=("ADD",),
    ),
    Case("add-bad-ips", env(), j(conf(prevResult={"ips": [{"gateway": "x"}]})), exit=1, code=7, msg="ips[0]"),
    Case("add-missing-netns", env(CNI_NETNS=None), j(conf()), exit=1, code=4, msg="CNI_NETNS"),
    Case(
        "add-missing-containerid", env(CNI_CONTAINERID=None), j(conf()), exit=1, code=4, msg="CNI_CONTAINERID"
    ),
    Case("add-bad-cni-args", env(CNI_ARGS="K8S_POD_NAME"), j(conf()), exit=1, code=4, msg="CNI_ARGS"),
    Case("add-bad-cni-args-pair", env(CNI_ARGS="a=1;=2"), j(conf()), exit=1, code=4, msg="bad pair '=2'"),
    Case(
        "add-missing-env",
        env(CNI_CONTAINERID=None, CNI_IFNAME=None, CNI_NETNS=None),
        j(conf()),
        exit=1,
        code=4,
        msg="missing environment variables: CNI_CONTAINERID, CNI_IFNAME",
    ),
    Case("add-error-keeps-version", env(CNI_NETNS=None), j(conf(cniVersion="0.3.1")), exit=1, code=4),
    Case("add-not-kubernetes", env(CNI_ARGS=None), j(conf()), stdout=PREV),
    Case("no-command", env(None), j(conf()), exit=1, code=4, msg="CNI_COMMAND"),
    Case("bad-command", env("FROB"), j(conf()), exit=1, code=4, msg="CNI_COMMAND"),
    Case("del-ok", env("DEL"), j(conf(prevResult=None)), requests=("DEL",)),
    Case("del-agent-down", env("DEL"), j(conf()), agent="down"),
    Case("del-agent-error", env("DEL"), j(conf()), agent="error", requests=("DEL",)),
    Case("del-no-netns", env("DEL", CNI_NETNS=None), j(conf()), requests=("DEL",)),
    Case("del-missing-ifname", env("DEL", CNI_IFNAME=None), j(conf()), exit=1, code=4, msg="CNI_IFNAME"),
    Case("del-not-kubernetes", env("DEL", CNI_ARGS="IgnoreUnknown=1"), j(conf())),
    Case("del-malformed-prev-result", env("DEL"), j(conf(prevResult={"ips": "nope"})), requests=("DEL",)),
    Case("del-bad-config", env("DEL"), j(conf(name=None)), exit=1, code=7, msg="'name'"),
    Case("check-ok", env("CHECK"), j(conf())),
    Case("check-no-prevresult", env("CHECK"), j(conf(prevResult=None)), exit=1, code=7),
    Case("gc", env("GC"), j(conf(cniVersion="1.1.0", prevResult=None))),
    Case("status-ok", env("STATUS"), j(conf(cniVersion="1.1.0", prevResult=None)), requests=("STATUS",)),
    Case("status-agent-down", env("STATUS"), j(conf(cniVersion="1.1.0")), agent="down", exit=1, code=50),
    Case(
        "status-agent-error",
        env("STATUS"),
        j(conf(cniVersion="1.1.0")),
        agent="error",
        exit=1,
        code=50,
        msg="netns vanished",
        requests=("STATUS",),
    ),
    Case("gc-bad-config", env("GC"), b"{}", exit=1, code=7),
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
    Case(
        "version-unsupported",
        env("VERSION"),
        j({"cniVersion": "9.9.9"}),
        stdout={"cniVersion": "1.0.0", "supportedVersions": list(plugin.SUPPORTED_VERSIONS)},
    ),
    Case("version-garbage", env("VERSION"), b"{", exit=1, code=6),
]


def answer_version(stdin: bytes) -> str:
    """The cniVersion an error answer carries: the config's own when supported, else 1.0.0."""
    try:
        obj = json.loads(stdin)
    except ValueError:
        return plugin.DEFAULT_VERSION
    v = obj.get("cniVersion") if isinstance(obj, dict) else None
    return v if v in plugin.SUPPORTED_VERSIONS else plugin.DEFAULT_VERSION


def check(case: Case, out: Output, seen: list[AgentRequest]) -> None:
    assert out.exit_code == case.exit, out.stdout
    if case.code is not None:
        body = json.loads(out.stdout)
        assert body["code"] == case.code
        assert set(body) == {"cniVersion", "code", "msg", "details"}
        assert body["cniVersion"] == answer_version(case.stdin)
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


async def run_plugin(
    exe: PluginExe, environ: dict[str, str], stdin: bytes, timeout: float = 20.0, cwd: str = "/"
) -> Output:
    proc = await asyncio.create_subprocess_exec(
        *exe.argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**environ, **exe.env, "PATH": os.environ.get("PATH", "")},
        cwd=cwd,
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
        obj = plugin.loads(stdin)  # strict: what neither plugin parses stays as it is
    except (ValueError, RecursionError):
        return stdin
    if isinstance(obj, dict) and "name" in obj and "agent_socket" not in obj:
        obj["agent_socket"] = path
        return j(obj)
    return stdin


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_executable(plugin_exe: PluginExe, case: Case, sock_dir: str) -> None:
    path = os.path.join(sock_dir, "agent.sock")
    seen: list[AgentRequest] = []
    stdin = with_socket(case.stdin, path)
    async with agent(path, case.agent, seen):
        out = await run_plugin(plugin_exe, case.env, stdin)
    check(case, out, seen)
    if case.requests:  # the request on the wire is the one the Python core builds
        step = plugin.handle(case.env, stdin)
        assert isinstance(step, AgentCall) and seen == [step.request]
    if case.id == "add-ok":
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


async def test_add_waits_for_the_agent(plugin_exe: PluginExe, sock_dir: str) -> None:
    """The plugin only answers after the agent's reply: redirection precedes the app's first packet."""
    path = os.path.join(sock_dir, "agent.sock")
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow(req: AgentRequest) -> AgentReply:
        entered.set()
        await release.wait()
        return AgentReply(True)

    async with PluginServer(path, slow):
        task = asyncio.create_task(run_plugin(plugin_exe, env(), j(conf(agent_socket=path))))
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


async def test_agent_timeout_is_try_again(plugin_exe: PluginExe, sock_dir: str) -> None:
    path = os.path.join(sock_dir, "agent.sock")
    never = asyncio.Event()

    async def stuck(req: AgentRequest) -> AgentReply:
        await never.wait()
        return AgentReply(True)

    async with PluginServer(path, stuck):
        out = await run_plugin(plugin_exe, env(), j(conf(agent_socket=path, agent_timeout=0.5)))
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
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c",
        "CNI_NETNS": "/x",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt",
    }
    out = plugin.handle(env, b"[" * depth + b"]" * depth)
    assert isinstance(out, Output) and out.exit_code != 0
    body = json.loads(out.stdout)
    assert body["code"] == plugin.ERR_DECODE and "not JSON" in body["msg"]
    with pytest.raises(plugin.ProtocolError):
        plugin.decode_request(b"[" * depth)


# --- both executables against agents that misbehave ---------------------------------------------


@contextlib.asynccontextmanager
async def raw_agent(path: str, reply: bytes, got: list[bytes]) -> AsyncIterator[None]:
    """An agent that reads the request line, answers ``reply`` verbatim and closes."""

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            got.append(await reader.readline())
            writer.write(reply)
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_unix_server(on_connection, path=path)
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


RAW_REPLIES = [
    # (id, command, reply bytes, exit, code or None, fragment of msg + details)
    ("garbage", "ADD", b"<html>\n", 1, 11, "not JSON"),
    ("no-ok", "ADD", b'{"error": "x"}\n', 1, 11, "boolean 'ok'"),
    ("nan", "ADD", b'{"ok": true, "x": NaN}\n', 1, 11, "not JSON"),
    ("closed-without-reply", "ADD", b"", 1, 11, "without a reply"),
    ("partial-line", "ADD", b'{"ok": true}', 1, 11, "without a reply"),
    ("too-long", "ADD", b" " * (plugin.MAX_MESSAGE + 10) + b'{"ok": true}\n', 1, 11, "too long"),
    ("refused-without-reason", "ADD", b'{"ok": false}\n', 1, 100, "node agent refused the pod"),
    ("refused-with-reason", "ADD", b'{"ok": false, "error": "no such pod"}\n', 1, 100, "no such pod"),
    ("ok-then-more", "ADD", b'{"ok": true}\n{"ok": false}\n', 0, None, ""),
    ("del-garbage", "DEL", b"<html>\n", 0, None, ""),
    ("status-ok", "STATUS", b'{"ok": true}\n', 0, None, ""),
    ("status-garbage", "STATUS", b"<html>\n", 1, 50, "not reachable"),
]


@pytest.mark.parametrize(("command", "reply", "exit", "code", "msg"), [r[1:] for r in RAW_REPLIES],
                         ids=[r[0] for r in RAW_REPLIES])  # fmt: skip
async def test_agent_replies(
    plugin_exe: PluginExe, sock_dir: str, command: str, reply: bytes, exit: int, code: int | None, msg: str
) -> None:
    path = os.path.join(sock_dir, "agent.sock")
    got: list[bytes] = []
    async with raw_agent(path, reply, got):
        out = await run_plugin(plugin_exe, env(command), j(conf(agent_socket=path, cniVersion="1.1.0")))
    assert out.exit_code == exit, out.stdout
    assert [plugin.decode_request(line).command for line in got] == [command]
    if code is None:
        assert out.stdout == "" or json.loads(out.stdout) == PREV
        assert (out.stdout != "") == (command == "ADD")
    else:
        body = json.loads(out.stdout)
        assert (body["code"], body["cniVersion"]) == (code, "1.1.0")
        assert msg in body["msg"] + body["details"]


@pytest.mark.parametrize("kind", ["abstract", "at-file"])
async def test_agent_socket_addresses(plugin_exe: PluginExe, sock_dir: str, kind: str) -> None:
    """A leading NUL is Linux's abstract namespace and a leading "@" a file, as in Python's
    socket.connect (Go's own spelling of abstract addresses is "@")."""
    name = f"ambient-cni-test-{os.getpid()}-{plugin_exe.name}"
    listen, configured = (
        (f"\0{name}", f"\0{name}") if kind == "abstract" else (f"{sock_dir}/@{name}", f"@{name}")
    )
    got: list[bytes] = []
    async with raw_agent(listen, b'{"ok": false, "error": "it is me"}\n', got):
        out = await run_plugin(plugin_exe, env(), j(conf(agent_socket=configured)), cwd=sock_dir)
    assert len(got) == 1
    assert json.loads(out.stdout)["msg"] == "it is me"


async def test_deeply_nested_stdin_through_the_executables(plugin_exe: PluginExe) -> None:
    depth = 100_000
    out = await run_plugin(plugin_exe, env(), b"[" * depth + b"]" * depth)
    body = json.loads(out.stdout)
    assert out.exit_code == 1 and body["code"] == plugin.ERR_DECODE and "not JSON" in body["msg"]


async def test_version_ignores_the_agent_and_cni_variables(plugin_exe: PluginExe) -> None:
    """VERSION needs nothing but CNI_COMMAND (a runtime probes plugins with it)."""
    out = await run_plugin(plugin_exe, {"CNI_COMMAND": "VERSION"}, b"")
    assert out.exit_code == 0
    assert json.loads(out.stdout) == {
        "cniVersion": "1.0.0",
        "supportedVersions": list(plugin.SUPPORTED_VERSIONS),
    }


# --- the Go binary itself ------------------------------------------------------------------------

PT_INTERP, PT_DYNAMIC = 3, 2


def elf_segment_types(data: bytes) -> set[int]:
    """Program header types of a 64-bit little-endian ELF file."""
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a 64-bit little-endian ELF"
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return {struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)}


def test_go_plugin_is_a_static_binary(go_plugin: Path) -> None:
    """No program interpreter, no dynamic section: it runs on any Linux node, libc or not."""
    types = elf_segment_types(go_plugin.read_bytes())
    assert PT_INTERP not in types and PT_DYNAMIC not in types, types
    assert 1 in types  # PT_LOAD: the parse found the program headers


# Never the default path: a real agent may listen there.
MISSING_SOCKET = "/nonexistent/ambient-cni-test/agent.sock"


_VALID = {
    "cniVersion": "1.0.0",
    "name": "n",
    "type": "t",
    "agent_socket": MISSING_SOCKET,
    "agent_timeout": 20,
    "prevResult": PREV,
}
_addresses = st.lists(st.fixed_dictionaries({"address": st.just("10.0.0.1/8") | _json_values}), max_size=2)
_bad_values = {
    "cniVersion": st.sampled_from(["0.4.0", "1.1.0", "2.0", ""]) | _json_values,
    "name": _json_values,
    "type": _json_values,
    "agent_socket": st.sampled_from(["", 5, None, [], MISSING_SOCKET + "2"]),
    "agent_timeout": st.floats(allow_nan=False, allow_infinity=False) | _json_values,
    "prevResult": _json_values | st.builds(lambda ips: {"ips": ips}, _json_values | _addresses),
}


def _broken(field: str | None) -> st.SearchStrategy[dict[str, Any]]:
    """A valid config with ``field`` dropped or given another value (None: left valid)."""
    if field is None:
        return st.just(_VALID)
    drop = st.just({k: v for k, v in _VALID.items() if k != field})
    if field == "agent_socket":  # absent means the default path, where a real agent may listen
        drop = st.nothing()
    return drop | _bad_values[field].map(lambda v: {**_VALID, field: v})


_diff_confs = st.sampled_from([None, None, None, *_VALID]).flatmap(_broken)
_env_text = st.text(st.characters(max_codepoint=0x2FF, blacklist_characters="\x00"), max_size=20)
_cni_args = st.tuples(
    st.sampled_from(
        [
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_UID=u",
            "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1",
            "K8S_POD_NAME=web-1",
            "",
        ]
    ),
    st.sampled_from(["", "=x", "noeq", ";;", "K8S_POD_NAME=", "K8S_POD_NAMESPACE=a=b"]) | _env_text,
).map(";".join)
_no_env = st.sampled_from([(), (), (), ("CNI_CONTAINERID",), ("CNI_NETNS",), ("CNI_IFNAME",)])


@settings(max_examples=300)
@given(
    command=st.sampled_from(["ADD", "ADD", "ADD", "DEL", "DEL", *plugin.COMMANDS, "", "add"]),
    stdin=st.one_of(_diff_confs.map(j), st.binary(max_size=64), _json_values.map(j)),
    cni_args=_cni_args,
    drop=_no_env | st.sets(st.sampled_from(["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])),
)
def test_go_binary_answers_like_the_python_core(
    go_plugin: Path, command: str, stdin: bytes, cni_args: str, drop: Collection[str]
) -> None:
    """Same input, agent unreachable: same exit status, error code, version, message and result.

    Error details are compared where both produce them from the input (not a JSON parser's or
    a socket's own wording).
    """
    environ = env(command, CNI_ARGS=cni_args, **dict.fromkeys(drop))
    want = plugin.run(environ, stdin)
    p = subprocess.run([str(go_plugin)], input=stdin, env=environ, capture_output=True, timeout=60, cwd="/")
    assert p.returncode == want.exit_code, (p.stdout, want.stdout)
    got = p.stdout.decode()
    if want.exit_code == 0:
        assert (json.loads(got) if got else None) == (json.loads(want.stdout) if want.stdout else None)
        return
    go_body, py_body = json.loads(got), json.loads(want.stdout)
    assert set(go_body) == {"cniVersion", "code", "msg", "details"}
    for key in ("code", "cniVersion", "msg"):
        assert go_body[key] == py_body[key], (go_body, py_body)
    if py_body["code"] not in (plugin.ERR_DECODE, plugin.ERR_TRY_AGAIN, plugin.ERR_NOT_AVAILABLE):
        assert go_body["details"] == py_body["details"], (go_body, py_body)
