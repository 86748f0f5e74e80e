"""The chained CNI plugin (CNI spec 1.0.0, plus 1.1.0's GC and STATUS) and its agent-side server.

The container runtime runs the plugin after the main network plugin (bridge, Calico, …) has set up
the pod's interface. For ADD the plugin asks the node agent, over a unix socket, to enrol the new
pod, and WAITS for the answer: by the time the runtime starts the app, the redirection rules are
in the pod netns, so the app's first packet is already captured. The plugin never changes the
network result: it prints ``prevResult`` back unchanged.

Layout, sans-IO first (STYLE.md rule 1):

* :func:`handle` — (environment, stdin bytes) → an :class:`AgentCall` to make, or a final
  :class:`Output` (stdout text + exit code);
* :func:`finish` — (the call, the agent's reply bytes or None when unreachable) → :class:`Output`;
* :func:`run` — the thin blocking I/O the executable does (``cni.plugin_main``);
* :class:`PluginServer` — the agent's end: an asyncio unix-socket server that decodes requests and
  calls an injected async callback.

On a node the runtime runs ``cni/plugin-go`` instead: a static Go binary that ports :func:`handle`,
:func:`finish` and :func:`run` line by line (same checks, order, codes and messages) and speaks the
same agent protocol; this module stays the reference, used in local mode and by the tests, which
run one table of cases through both executables.

Agent wire format: one JSON object per line each way on a SOCK_STREAM unix socket. Request:
``{"version": 1, "command", "pod_namespace", "pod_name", "pod_uid", "container_id", "netns",
"ifname", "ips"}``; reply: ``{"ok": true}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from mesh import log as meshlog

log = structlog.get_logger(__name__)

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
DEFAULT_VERSION = "1.0.0"  # for answers when the config's own version is unknown or unsupported
DEFAULT_AGENT_SOCKET = "/var/run/ambient/cni-agent.sock"
DEFAULT_AGENT_TIMEOUT = 30.0
PROTOCOL_VERSION = 1
MAX_MESSAGE = 64 * 1024

# Well-known error codes (CNI spec, "Error"). 100+ is ours.
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN = 11
ERR_NOT_AVAILABLE = 50  # STATUS: the plugin cannot serve ADDs now
ERR_AGENT_REFUSED = 100  # the agent answered, with an error

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")


class ProtocolError(ValueError):
    """A malformed plugin ↔ agent message."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(data: bytes) -> Any:
    """Strict JSON (RFC 8259): UTF-8 only, no ``NaN``/``Infinity``, which ``json.loads`` would take.

    The Go plugin's decoder accepts exactly this, so both plugins refuse the same input (code 6).
    Raises ``ValueError`` (``UnicodeDecodeError`` included) or ``RecursionError``.
    """
    return json.loads(data.decode("utf-8"), parse_constant=_no_constant)


@dataclass(frozen=True, slots=True)
class Output:
    """What the plugin prints on stdout and its exit code."""

    stdout: str
    exit_code: int


@dataclass(frozen=True, slots=True)
class AgentRequest:
    """One pod event for the node agent."""

    command: str
    pod_namespace: str
    pod_name: str
    container_id: str
    netns: str
    ifname: str
    ips: tuple[str, ...] = ()
    pod_uid: str = ""

    def encode(self) -> bytes:
        body = {
            "version": PROTOCOL_VERSION,
            "command": self.command,
            "pod_namespace": self.pod_namespace,
            "pod_name": self.pod_name,
            "pod_uid": self.pod_uid,
            "container_id": self.container_id,
            "netns": self.netns,
            "ifname": self.ifname,
            "ips": list(self.ips),
        }
        return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def decode_request(data: bytes) -> AgentRequest:
    """Parse a request line; :class:`ProtocolError` names the bad field."""
    try:
        obj = loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than JSON allows here
        raise ProtocolError(f"request is not JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ProtocolError("request is not a JSON object")
    if obj.get("version") != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported request version {obj.get('version')!r}")
    strs: dict[str, str] = {}
    for key in ("command", "pod_namespace", "pod_name", "container_id", "netns", "ifname"):
        v = obj.get(key)
        if not isinstance(v, str):
            raise ProtocolError(f"request field {key!r} must be a string")
        strs[key] = v
    if strs["command"] not in ("ADD", "DEL", "STATUS"):
        raise ProtocolError(f"unknown request command {strs['command']!r}")
    uid = obj.get("pod_uid", "")
    ips = obj.get("ips", [])
    if not isinstance(uid, str):
        raise ProtocolError("request field 'pod_uid' must be a string")
    if not isinstance(ips, list) or not all(isinstance(i, str) for i in ips):
        raise ProtocolError("request field 'ips' must be a list of strings")
    return AgentRequest(ips=tuple(ips), pod_uid=uid, **strs)


@dataclass(frozen=True, slots=True)
class AgentReply:
    ok: bool
    error: str = ""

    def encode(self) -> bytes:
        body: dict[str, Any] = {"ok": self.ok}
        if not self.ok:
            body["error"] = self.error
        return json.dumps(body).encode() + b"\n"


def decode_reply(data: bytes) -> AgentReply:
    try:
        obj = loads(data)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"agent reply is not JSON: {e}") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
        raise ProtocolError("agent reply has no boolean 'ok'")
    error = obj.get("error", "")
    return AgentReply(ok=obj["ok"], error=str(error))


@dataclass(frozen=True, slots=True)
class AgentCall:
    """The plugin must send ``request`` to the agent at ``socket_path`` and feed the reply to
    :func:`finish`."""

    request: AgentRequest
    socket_path: str
    timeout: float
    cni_version: str
    prev_result: Mapping[str, Any] | None = field(default=None)


class _CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


def error_output(cni_version: str, code: int, msg: str, details: str = "") -> Output:
    body = {"cniVersion": cni_version, "code": code, "msg": msg, "details": details}
    return Output(json.dumps(body) + "\n", 1)


def parse_cni_args(value: str) -> dict[str, str]:
    """``CNI_ARGS`` is ``K=V;K=V``; pairs without ``=`` are an error (code 4)."""
    out: dict[str, str] = {}
    for part in value.split(";"):
        if not part:
            continue
        k, sep, v = part.partition("=")
        if not sep or not k:
            raise _CniError(ERR_INVALID_ENV, "CNI_ARGS is malformed", f"bad pair {part!r}")
        out[k] = v
    return out


def _required_env(env: Mapping[str, str], *names: str) -> dict[str, str]:
    missing = [n for n in names if not env.get(n)]
    if missing:
        raise _CniError(ERR_INVALID_ENV, f"missing environment variables: {', '.join(missing)}")
    return {n: env[n] for n in names}


@dataclass(frozen=True, slots=True)
class _Config:
    cni_version: str
    name: str
    type: str
    agent_socket: str
    agent_timeout: float
    prev_result: Mapping[str, Any] | None


def _parse_config(obj: Any) -> _Config:
    if not isinstance(obj, dict):
        raise _CniError(ERR_INVALID_CONFIG, "network configuration is not a JSON object")
    for key in ("cniVersion", "name", "type"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise _CniError(
                ERR_INVALID_CONFIG, f"network configuration field {key!r} is missing or not a string"
            )
    version = obj["cniVersion"]
    if version not in SUPPORTED_VERSIONS:
        raise _CniError(
            ERR_INCOMPATIBLE_VERSION,
            f"unsupported cniVersion {version!r}",
            f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    sock = obj.get("agent_socket", DEFAULT_AGENT_SOCKET)
    if not isinstance(sock, str) or not sock:
        raise _CniError(ERR_INVALID_CONFIG, "network configuration field 'agent_socket' must be a path")
    timeout = obj.get("agent_timeout", DEFAULT_AGENT_TIMEOUT)
    try:
        ok_type = isinstance(timeout, int | float) and not isinstance(timeout, bool)
        seconds = float(timeout) if ok_type else -1.0
    except OverflowError:
        seconds = -1.0
    if not 0 < seconds < 86400:
        raise _CniError(
            ERR_INVALID_CONFIG,
            "network configuration field 'agent_timeout' must be a number of seconds (0 < t < 86400)",
        )
    prev = obj.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise _CniError(ERR_INVALID_CONFIG, "network configuration field 'prevResult' must be an object")
    return _Config(version, obj["name"], obj["type"], sock, seconds, prev)


def _ips(prev: Mapping[str, Any]) -> tuple[str, ...]:
    ips = prev.get("ips", [])
    if not isinstance(ips, list):
        raise _CniError(ERR_INVALID_CONFIG, "prevResult field 'ips' must be a list")
    out: list[str] = []
    for i, entry in enumerate(ips):
        addr = entry.get("address") if isinstance(entry, dict) else None
        if not isinstance(addr, str) or not addr:
            raise _CniError(ERR_INVALID_CONFIG, f"prevResult ips[{i}].address is missing")
        out.append(addr.split("/", 1)[0])
    return tuple(out)


def _version_of(obj: Any) -> str:
    v = obj.get("cniVersion") if isinstance(obj, dict) else None
    return v if isinstance(v, str) and v in SUPPORTED_VERSIONS else DEFAULT_VERSION


def handle(env: Mapping[str, str], stdin: bytes) -> AgentCall | Output:
    """Everything the plugin decides before talking to the agent (sans-IO)."""
    obj: Any = None
    try:
        command = env.get("CNI_COMMAND", "")
        if command not in COMMANDS:
            raise _CniError(ERR_INVALID_ENV, f"CNI_COMMAND {command!r} is not one of {', '.join(COMMANDS)}")
        try:
            obj = loads(stdin) if stdin.strip() else None
        except (ValueError, RecursionError) as e:
            # A document nested deeper than the decoder goes is refused like any other bad JSON.
            raise _CniError(ERR_DECODE, "network configuration on stdin is not JSON", str(e)) from e
        if command == "VERSION":
            return _version(obj)
        if obj is None:
            raise _CniError(ERR_DECODE, "no network configuration on stdin")
        conf = _parse_config(obj)
        if command == "GC":
            return Output("", 0)  # the agent reconciles pods from its own watch; nothing to collect
        if command == "STATUS":
            return AgentCall(
                AgentRequest("STATUS", "", "", "", "", ""),
                conf.agent_socket,
                conf.agent_timeout,
                conf.cni_version,
            )
        fields = _required_env(env, "CNI_CONTAINERID", "CNI_IFNAME")
        if command == "ADD":
            fields |= _required_env(env, "CNI_NETNS")
        if command in ("ADD", "CHECK") and conf.prev_result is None:
            raise _CniError(
                ERR_INVALID_CONFIG, f"{command}: no prevResult (this plugin must be chained after another)"
            )
        if command == "CHECK":
            return Output("", 0)
        args = parse_cni_args(env.get("CNI_ARGS", ""))
        namespace, name = args.get("K8S_POD_NAMESPACE", ""), args.get("K8S_POD_NAME", "")
        prev = conf.prev_result
        if not namespace or not name:
            # Not a Kubernetes pod (as Istio's plugin): nothing to enrol, pass the result through.
            return _success(conf.cni_version, prev) if command == "ADD" else Output("", 0)
        request = AgentRequest(
            command=command,
            pod_namespace=namespace,
            pod_name=name,
            pod_uid=args.get("K8S_POD_UID", ""),
            container_id=fields["CNI_CONTAINERID"],
            netns=env.get("CNI_NETNS", ""),
            ifname=fields["CNI_IFNAME"],
            ips=_ips(prev) if prev is not None and command == "ADD" else (),  # DEL never fails on it
        )
        return AgentCall(request, conf.agent_socket, conf.agent_timeout, conf.cni_version, prev)
    except _CniError as e:
        return error_output(_version_of(obj), e.code, e.msg, e.details)


def _version(obj: Any) -> Output:
    body = {"cniVersion": _version_of(obj), "supportedVersions": list(SUPPORTED_VERSIONS)}
    return Output(json.dumps(body) + "\n", 0)


def _success(cni_version: str, prev: Mapping[str, Any] | None) -> Output:
    result = dict(prev or {})
    result.setdefault("cniVersion", cni_version)
    return Output(json.dumps(result) + "\n", 0)


def finish(call: AgentCall, reply: bytes | None, transport_error: str = "") -> Output:
    """Turn the agent's reply (None: unreachable, see ``transport_error``) into the plugin's output.

    ADD fails with code 11 (try again) when the agent cannot be reached: the runtime retries the
    sandbox, and the pod never starts without redirection. DEL is best effort and always succeeds.
    """
    cmd = call.request.command
    parsed: AgentReply | None = None
    if reply is not None:
        try:
            parsed = decode_reply(reply)
        except ProtocolError as e:
            transport_error = str(e)
    if cmd == "DEL":
        if parsed is None or not parsed.ok:
            why = transport_error if parsed is None else parsed.error
            log.warning("DEL not confirmed by the agent; ignored (best effort)", error=why)
        return Output("", 0)
    if parsed is None:
        if cmd == "STATUS":
            return error_output(
                call.cni_version, ERR_NOT_AVAILABLE, "node agent is not reachable", transport_error
            )
        return error_output(
            call.cni_version,
            ERR_TRY_AGAIN,
            f"node agent at {call.socket_path} is not reachable",
            transport_error,
        )
    if not parsed.ok:
        code = ERR_NOT_AVAILABLE if cmd == "STATUS" else ERR_AGENT_REFUSED
        return error_output(call.cni_version, code, parsed.error or "node agent refused the pod")
    if cmd == "STATUS":
        return Output("", 0)
    return _success(call.cni_version, call.prev_result)


# --- the executable's I/O ----------------------------------------------------------------------


def exchange(call: AgentCall) -> tuple[bytes | None, str]:
    """Send the request and wait for one reply line: (reply, "") or (None, why not)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(call.timeout)
            s.connect(call.socket_path)
            s.sendall(call.request.encode())
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    return None, "agent closed the connection without a reply"
                buf += chunk
                if len(buf) > MAX_MESSAGE:
                    return None, "agent reply too long"
            return buf.split(b"\n", 1)[0], ""
    except (OSError, ValueError) as e:  # OSError includes TimeoutError; ValueError: e.g. NUL in the path
        return None, f"{type(e).__name__}: {e}"


def run(env: Mapping[str, str], stdin: bytes) -> Output:
    """What the executable does, minus reading stdin and printing."""
    step = handle(env, stdin)
    if isinstance(step, Output):
        return step
    reply, why = exchange(step)
    return finish(step, reply, why)


def main() -> int:
    """Entry point: read stdin and the environment, print the result."""
    level = os.environ.get("AMBIENT_CNI_LOG_LEVEL", "warning")
    meshlog.configure(level if level in meshlog.LEVELS else "warning", json=True)  # never crash on it
    try:
        stdin = sys.stdin.buffer.read()
    except OSError as e:
        out = error_output(DEFAULT_VERSION, ERR_IO, "cannot read stdin", str(e))
    else:
        out = run(os.environ, stdin)
    sys.stdout.write(out.stdout)
    sys.stdout.flush()
    return out.exit_code


# --- the agent's end ---------------------------------------------------------------------------

Handler = Callable[[AgentRequest], Awaitable[AgentReply]]


class PluginServer:
    """The node agent's unix socket for CNI plugin calls.

    Each connection carries one request line; ``handler`` decides (and does the work, e.g. apply
    the redirection rules) and its reply is sent back. A handler exception becomes an error reply,
    so the plugin fails the ADD rather than letting a pod start uncaptured. Connection tasks are
    owned here and cancelled by :meth:`close`.
    """

    def __init__(self, path: str, handler: Handler, *, request_timeout: float = 10.0) -> None:
        self.path = path
        self._handler = handler
        self._request_timeout = request_timeout
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a stale socket from a previous agent
        self._server = await asyncio.start_unix_server(self._on_connection, path=self.path, limit=MAX_MESSAGE)
        os.chmod(self.path, 0o600)
        log.info("cni plugin server listening", path=self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def __aenter__(self) -> PluginServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            reply = await self._serve_one(reader)
            writer.write(reply.encode())
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError) as e:
            log.warning("cni plugin connection failed", error=str(e))
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader) -> AgentReply:
        try:
            async with asyncio.timeout(self._request_timeout):
                line = await reader.readline()
            request = decode_request(line)
        except (ProtocolError, ValueError, TimeoutError) as e:
            log.warning("bad cni plugin request", error=str(e) or type(e).__name__)
            return AgentReply(False, f"bad request: {e}")
        log.info(
            "cni plugin request",
            command=request.command,
            pod=f"{request.pod_namespace}/{request.pod_name}",
            netns=request.netns,
        )
        try:
            return await self._handler(request)
        except Exception as e:
            log.exception("cni plugin request failed", command=request.command)
            return AgentReply(False, f"{type(e).__name__}: {e}")
