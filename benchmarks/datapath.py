"""Data-path benchmark: the same workload through direct TCP, stunnel, haproxy, our HBONE pair, and two ztunnels.

    bash scripts/dev.sh bench [--repeat N] [--quick] [--profile] [--output FILE]

Every configuration is a *pair* of processes in front of a backend (except direct TCP), started
fresh for each group of measurements. Readiness is read from ``--ready-file`` (ours) or from the
kernel's listening-socket table (stunnel, haproxy) — no probe connection ever goes through a pair.
The order of the configurations alternates between repeats; the table shows the median.

Configuration 5 ("netns") builds the local mesh of ``ambientctl demo`` (ambientctl/localmesh) and
measures between two of its pods on different nodes: first plain TCP between the two pod netns
before the CNI plugin enrolled them (``netns-direct``, its own baseline) and a stunnel pair on the
identical path (``netns-stunnel``: client side in the source pod's netns, server side in the
destination pod's, TLS 1.3 with certificates for the two pods' identities from the mesh's CA),
then the same workload through ztunnel → HBONE → ztunnel after enrollment (``ztunnel``). These
three also get new connections with a full TLS handshake each (and, for the ztunnels, with a
new but resumed TLS connection each, see COLD_ENV) and 1,000 kept-alive connections doing round
trips at once. Needs root. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = Path(__file__).resolve().parent / "workload.py"
PYTHON = sys.executable
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
GB = 1e9
TIMES = "\N{MULTIPLICATION SIGN}"

CONFIGS = ["direct", "stunnel", "haproxy", "ours", "netns"]  # what runs, in rotated order
LOOPBACK = ["direct", "stunnel", "haproxy", "ours"]  # results on loopback
# Results of "netns": the same two pods before enrollment (direct TCP, then a stunnel pair between
# their netns), then after it (two ztunnels).
NETNS = ["netns-direct", "netns-stunnel", "ztunnel"]
RESULTS = LOOPBACK + NETNS
LABELS = {
    "direct": "direct TCP",
    "stunnel": "stunnel pair",
    "haproxy": "haproxy pair",
    "ours": "ours (hbone forward → serve)",
    "netns-direct": "direct TCP, pod netns node-a → node-b",
    "netns-stunnel": "stunnel pair, pod netns node-a → node-b",
    "ztunnel": "two ztunnels (netns nodes)",
}
ZTUNNEL_VS_NETNS = "two ztunnels ÷ direct TCP between the same pod netns"
# The pods of ambientctl/localmesh (spec.PODS) the netns configuration measures between.
SRC_POD, DST_POD = "shop/frontend", "shop/web"  # node-a 10.0.1.2 → node-b 10.0.2.2
DST_IP = "10.0.2.2"
NETNS_IPERF_PORT, NETNS_ECHO_PORT = 5201, 7007
NETNS_TLS_PORT, NETNS_STUNNEL_PORT = 15443, 15444  # stunnel server (dst pod), client (src pod, loopback)
# Set while the local mesh is built: benchmarks/hbone_cold/sitecustomize.py makes the ztunnels'
# HBONE connections cold (no pool reuse, no TLS resumption) while the file it names exists.
COLD_ENV = "BENCH_HBONE_COLD_FILE"
COLD_SITE_DIR = Path(__file__).resolve().parent / "hbone_cold"
FIGURES: list[tuple[str, str]] = [  # key, column title
    ("tput1_gbps", "1-stream Gbit/s"),
    ("tput4_gbps", "4-stream Gbit/s"),
    ("p50_us", "1 KiB RTT p50 µs"),
    ("p99_us", "1 KiB RTT p99 µs"),
    ("conn_per_s", "new conn/s"),
    ("cpu_s_per_gb", "CPU-s/GB"),
    ("rss_idle_mib", "RSS idle MiB (max/process)"),
    ("rss_1000_mib", "RSS +N conns MiB (pair)"),
]
DETAILS: list[tuple[str, str]] = [
    ("cpu_user_us_per_rt", "pair CPU per 1 KiB round trip, user µs"),
    ("cpu_sys_us_per_rt", "pair CPU per 1 KiB round trip, system µs"),
    ("cpu_user_us_per_conn", "pair CPU per new connection, user µs"),
    ("cpu_sys_us_per_conn", "pair CPU per new connection, system µs"),
    ("rss_idle_server_mib", "RSS idle MiB, server-side process"),
    ("rss_idle_client_mib", "RSS idle MiB, client-side process"),
    ("conn_errors", "failed new connections"),
    ("conn_per_s_resumed", "new conn/s, a TLS connection each, session resumed"),
    ("cpu_user_us_per_conn_resumed", "pair CPU per resumed new connection, user µs"),
    ("cpu_sys_us_per_conn_resumed", "pair CPU per resumed new connection, system µs"),
    ("conn_errors_resumed", "failed resumed new connections"),
    ("conn_per_s_cold", "new conn/s, cold (every connection a full TLS handshake)"),
    ("cpu_user_us_per_conn_cold", "pair CPU per cold new connection, user µs"),
    ("cpu_sys_us_per_conn_cold", "pair CPU per cold new connection, system µs"),
    ("conn_errors_cold", "failed cold new connections"),
    ("many_p50_us", "N kept-alive connections doing round trips: p50 µs"),
    ("many_p99_us", "N kept-alive connections doing round trips: p99 µs"),
    ("many_rt_per_s", "N kept-alive connections doing round trips: round trips/s"),
    ("many_cpu_us_per_rt", "N kept-alive connections: pair CPU per round trip, user+system µs"),
    ("many_dropped", "N kept-alive connections: failed to open or dropped"),
]
PROFILE_MODES = [("python", "--nonblocking"), ("native", "--native")]
# What --profile records: the processes of a configuration, [server side, client side], with titles.
PROFILED = {"ours": ("serve", "forward"), "ztunnel": ("ztunnel-node-b", "ztunnel-node-a")}
PROFILE_TITLES = {
    "forward": "`hbone forward`",
    "serve": "`hbone serve`",
    "ztunnel-node-a": "ztunnel node-a (client side)",
    "ztunnel-node-b": "ztunnel node-b (server side)",
}
OP_PROFILES = [("rt", "round trips"), ("conn", "new connections"), ("cold", "cold new connections")]
PAIR_ONLY = {"cpu_s_per_gb", "rss_idle_mib", "rss_1000_mib"}
CPU_PER_OP = ["cpu_user_us_per_rt", "cpu_sys_us_per_rt", "cpu_user_us_per_conn", "cpu_sys_us_per_conn"]


@dataclass
class Settings:
    repeat: int = 3
    duration: int = 10
    latency_count: int = 5000
    latency_warmup: int = 200
    connrate_seconds: float = 5.0
    connrate_parallel: int = 4
    hold_count: int = 1000
    settle: float = 1.0
    profile_seconds: int = 10
    many_count: int = 1000  # configuration 5: kept-alive connections doing round trips at once
    many_seconds: float = 5.0

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            repeat=1,
            duration=1,
            latency_count=200,
            latency_warmup=20,
            connrate_seconds=1.0,
            connrate_parallel=2,
            hold_count=100,
            settle=0.2,
            profile_seconds=2,
            many_count=100,
            many_seconds=1.0,
        )


# -- processes ------------------------------------------------------------------------------------


LOGS: dict[int, Path] = {}  # pid -> the file its stdout/stderr go to


class BenchError(Exception):
    pass


class Processes:
    """Every process the benchmark starts, so that all of them are stopped whatever happens."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.counter = 0

    def start(self, name: str, argv: list[str], stdout: int | None = None) -> subprocess.Popen[bytes]:
        self.counter += 1
        log_path = self.logdir / f"{self.counter:03d}-{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else log,
            stderr=log,
            start_new_session=True,  # Ctrl-C reaches only us; we stop the children ourselves
        )
        log.close()
        LOGS[proc.pid] = log_path
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 8.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc, timeout=3.0)


def log_tail(proc: subprocess.Popen[bytes]) -> str:
    path = LOGS.get(proc.pid)
    if path is None or not path.exists():
        return ""
    return path.read_bytes()[-2000:].decode(errors="replace")


def wait_for(
    check: Callable[[], bool], what: str, procs: list[subprocess.Popen[bytes]], timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for p in procs:
            if p.poll() is not None:
                raise BenchError(f"{what}: process exited with {p.returncode}:\n{log_tail(p)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(0.02)


def listening(port: int, pid: int | None = None) -> bool:
    """Whether something listens on 127.0.0.1:port, read from /proc/net/tcp (no connection made).

    With ``pid``: on any address of the network namespace that process is in
    (``/proc/<pid>/net/tcp``), for servers started inside a pod netns.
    """
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp" if pid is None else f"/proc/{pid}/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] != "0A":
                    continue
                if parts[1] == want or (pid is not None and parts[1].endswith(f":{port:04X}")):
                    return True
    except FileNotFoundError:  # the process is gone: wait_for reports its exit
        return False
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU seconds of ``pids`` (all threads)."""
    return sum(cpu_split(pids))


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of ``pids`` (all threads)."""
    user = system = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def per_op_us(before: tuple[float, float], after: tuple[float, float], ops: float) -> tuple[float, float]:
    """(user µs, system µs) per operation between two ``cpu_split`` readings."""
    n = max(ops, 1)
    return (after[0] - before[0]) / n * 1e6, (after[1] - before[1]) / n * 1e6


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for {pid}")


# -- credentials ----------------------------------------------------------------------------------


@dataclass
class Creds:
    client_dir: Path
    server_dir: Path
    server_id: str

    def combined(self, d: Path) -> Path:
        """haproxy wants certificate chain and key in one file."""
        out = d / "combined.pem"
        if not out.exists():
            out.write_bytes((d / "cert-chain.pem").read_bytes() + (d / "key.pem").read_bytes())
            out.chmod(0o600)
        return out


def make_creds(base: Path) -> Creds:
    sys.path.insert(0, str(ROOT))
    from mesh.identity import Identity
    from mesh.pki import CertificateAuthority, write_credential

    ca = CertificateAuthority.generate("cluster.local")
    server = Identity("cluster.local", "bench", "server")
    client = Identity("cluster.local", "bench", "client")
    cdir, sdir = base / "client", base / "server"
    write_credential(cdir, ca.issue(client))
    write_credential(sdir, ca.issue(server))
    return Creds(cdir, sdir, str(server))


def mesh_creds(cp_dir: Path, base: Path) -> Creds:
    """Certificates for the two pods' identities from the local mesh's own CA (the control
    plane's ``ca`` state directory), for the stunnel pair between their netns."""
    from ambientctl.localmesh import spec
    from mesh.identity import Identity
    from mesh.pki import CertificateAuthority, write_credential

    ca = CertificateAuthority.load_cacerts(cp_dir / "ca", spec.TRUST_DOMAIN)
    ids = {}
    for key, side in ((SRC_POD, "client"), (DST_POD, "server")):
        pod = spec.pod(key)
        ids[side] = Identity(spec.TRUST_DOMAIN, pod.namespace, pod.service_account)
        write_credential(base / side, ca.issue(ids[side]))
    return Creds(base / "client", base / "server", str(ids["server"]))


# -- pairs ----------------------------------------------------------------------------------------


@dataclass
class Pair:
    listen_port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # Processes the pair does not own (the two ztunnels of the local mesh): measured, never
    # started or stopped by the benchmark, in the order [server side, client side].
    fixed_pids: list[int] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return self.fixed_pids or [p.pid for p in self.procs]


@dataclass(frozen=True)
class Site:
    """Where servers listen and clients connect from: loopback, or two pod network namespaces."""

    server_prefix: tuple[str, ...] = ()  # argv prefix that runs a server in place (ip netns exec …)
    client_prefix: tuple[str, ...] = ()
    bind: str = HOST
    connect: str = HOST
    iperf_port: int = 0  # 0: a free loopback port each time
    echo_port: int = 0
    peer: str = ""  # a pair between two netns: the address its client side connects to

    @property
    def netns(self) -> bool:
        return bool(self.server_prefix)


LOOPBACK_SITE = Site()


class Bench:
    def __init__(self, settings: Settings, work: Path, procs: Processes, creds: Creds) -> None:
        self.s = settings
        self.work = work
        self.procs = procs
        self.creds = creds
        self.iperf3 = shutil.which("iperf3") or "iperf3"
        self.stunnel = shutil.which("stunnel4") or shutil.which("stunnel") or "stunnel4"
        self.haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.n = 0
        self.netns_creds = creds  # replaced by the mesh's certificates of the two pods (configuration 5)
        self.cold_file = work / "hbone-cold"

    def _next(self, stem: str) -> Path:
        self.n += 1
        return self.work / f"{stem}-{self.n}"

    # Each start_* returns a pair whose listen port carries plain TCP to 127.0.0.1:target.

    def start_pair(self, config: str, target: int, site: Site = LOOPBACK_SITE) -> Pair:
        if config == "direct":
            return Pair(target)
        if config == "netns-stunnel":
            return self.start_stunnel(target, site)
        start = {"stunnel": self.start_stunnel, "haproxy": self.start_haproxy, "ours": self.start_ours}[
            config
        ]
        return start(target)

    def stop_pair(self, pair: Pair) -> None:
        for pid in pair.fixed_pids:
            if not Path(f"/proc/{pid}").exists():
                raise BenchError(f"ztunnel (pid {pid}) died during the measurement")
        for p in reversed(pair.procs):
            if p.poll() is not None:
                raise BenchError(f"pair process {p.args!r} died with {p.returncode}:\n{log_tail(p)}")
            self.procs.stop(p)

    def start_stunnel(self, target: int, site: Site = LOOPBACK_SITE, resume: bool = True) -> Pair:
        """On loopback; or, for a netns ``site``, the server side in the destination pod's netns
        (TLS on every address, plain TCP to the target on its loopback) and the client side in the
        source pod's (plain TCP on its loopback, TLS to ``site.peer``), with the mesh's
        certificates of the two pods (``self.netns_creds``). stunnel resumes TLS sessions by
        default (its client offers the last session's ticket); ``resume=False`` turns that off
        (``sessionResume = no``): every connection a full handshake. In a netns the second pair
        uses the next ports, so that it can run beside the first."""
        if site.netns:
            tls_port, listen_port = NETNS_TLS_PORT, NETNS_STUNNEL_PORT
            if not resume:
                tls_port, listen_port = tls_port + 2, listen_port + 2
            c, s = self.netns_creds.client_dir, self.netns_creds.server_dir
            accept_tls, connect_tls = f"0.0.0.0:{tls_port}", f"{site.peer}:{tls_port}"
        else:
            tls_port, listen_port = free_port(), free_port()
            c, s = self.creds.client_dir, self.creds.server_dir
            accept_tls = connect_tls = f"{HOST}:{tls_port}"
        common = "foreground = yes\nsyslog = no\npid =\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n"
        tls = "sslVersion = TLSv1.3\nverifyChain = yes\nCAfile = {root}\ncert = {cert}\nkey = {key}\n"
        if not resume:
            tls += "sessionResume = no\n"
        server_conf = self._next("stunnel-server.conf")
        server_conf.write_text(
            common
            + f"[server]\naccept = {accept_tls}\nconnect = {HOST}:{target}\n"
            + tls.format(root=s / "root-cert.pem", cert=s / "cert-chain.pem", key=s / "key.pem")
        )
        client_conf = self._next("stunnel-client.conf")
        client_conf.write_text(
            common
            + f"[client]\nclient = yes\naccept = {HOST}:{listen_port}\nconnect = {connect_tls}\n"
            + tls.format(root=c / "root-cert.pem", cert=c / "cert-chain.pem", key=c / "key.pem")
        )
        server = self.procs.start("stunnel-server", [*site.server_prefix, self.stunnel, str(server_conf)])
        client = self.procs.start("stunnel-client", [*site.client_prefix, self.stunnel, str(client_conf)])
        pair = Pair(listen_port, [server, client])
        # ip netns exec execs stunnel: same pid, whose /proc/<pid>/net is the pod's.
        pids = (server.pid, client.pid) if site.netns else (None, None)
        wait_for(
            lambda: listening(tls_port, pids[0]) and listening(listen_port, pids[1]),
            "stunnel pair",
            pair.procs,
        )
        return pair

    def start_haproxy(self, target: int) -> Pair:
        tls_port, listen_port = free_port(), free_port()
        c, s = self.creds.client_dir, self.creds.server_dir
        head = (
            "global\n  maxconn 5000\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n"
        )
        server_conf = self._next("haproxy-server.cfg")
        server_conf.write_text(
            head
            + f"frontend tls\n  bind {HOST}:{tls_port} ssl crt {self.creds.combined(s)}"
            + f" ca-file {s / 'root-cert.pem'} verify required ssl-min-ver TLSv1.3\n"
            + "  default_backend app\n"
            + f"backend app\n  server app {HOST}:{target}\n"
        )
        client_conf = self._next("haproxy-client.cfg")
        client_conf.write_text(
            head
            + f"frontend plain\n  bind {HOST}:{listen_port}\n  default_backend tls\n"
            + f"backend tls\n  server up {HOST}:{tls_port} ssl verify required"
            + f" ca-file {c / 'root-cert.pem'} crt {self.creds.combined(c)} ssl-min-ver TLSv1.3\n"
        )
        server = self.procs.start("haproxy-server", [self.haproxy, "-db", "-f", str(server_conf)])
        client = self.procs.start("haproxy-client", [self.haproxy, "-db", "-f", str(client_conf)])
        pair = Pair(listen_port, [server, client])
        wait_for(lambda: listening(tls_port) and listening(listen_port), "haproxy pair", pair.procs)
        return pair

    def start_ours(self, target: int) -> Pair:
        ctl = [PYTHON, "-m", "ambientctl", "hbone"]
        serve_ready = self._next("serve.ready")
        server = self.procs.start(
            "hbone-serve",
            [
                *ctl,
                "serve",
                "--listen",
                f"{HOST}:0",
                "--cert-dir",
                str(self.creds.server_dir),
                "--ready-file",
                str(serve_ready),
            ],
        )
        wait_for(serve_ready.exists, "hbone serve", [server])
        fwd_ready = self._next("forward.ready")
        client = self.procs.start(
            "hbone-forward",
            [
                *ctl,
                "forward",
                "--listen",
                f"{HOST}:0",
                "--to",
                serve_ready.read_text().strip(),
                "--authority",
                f"{HOST}:{target}",
                "--cert-dir",
                str(self.creds.client_dir),
                "--expect-identity",
                self.creds.server_id,
                "--ready-file",
                str(fwd_ready),
            ],
        )
        pair = Pair(0, [server, client])
        wait_for(fwd_ready.exists, "hbone forward", pair.procs)
        pair.listen_port = int(fwd_ready.read_text().strip().rsplit(":", 1)[1])
        return pair

    # -- backends and clients ---------------------------------------------------------------------

    def run_json(self, name: str, argv: list[str], timeout: float) -> dict[str, Any]:
        proc = self.procs.start(name, argv, stdout=subprocess.PIPE)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.procs.stop(proc)
            raise BenchError(f"{name} timed out after {timeout:.0f} s") from None
        self.procs.stop(proc)
        if proc.returncode != 0:
            raise BenchError(f"{name} failed with {proc.returncode}:\n{log_tail(proc)}")
        result: dict[str, Any] = json.loads(out)
        return result

    def iperf(
        self, port: int, pair_port: int, streams: int, duration: int, site: Site = LOOPBACK_SITE
    ) -> dict[str, Any]:
        """One iperf3 test against a fresh one-off iperf3 server on ``port``."""
        server = self.procs.start(
            "iperf3-server", [*site.server_prefix, self.iperf3, "-s", "-1", "-B", site.bind, "-p", str(port)]
        )
        try:
            pid = server.pid if site.netns else None  # ip netns exec execs iperf3: same pid
            wait_for(lambda: listening(port, pid), "iperf3 server", [server])
            argv = [
                *site.client_prefix,
                self.iperf3,
                "-c",
                site.connect,
                "-p",
                str(pair_port),
                "-t",
                str(duration),
                "-P",
                str(streams),
                "-J",
            ]
            result = self.run_json(f"iperf3-client-P{streams}", argv, timeout=duration + 60)
        finally:
            self.procs.stop(server)
        if "error" in result:
            raise BenchError(f"iperf3: {result['error']}")
        end = result["end"]["sum_received"]
        return {"bps": float(end["bits_per_second"]), "bytes": float(end["bytes"])}

    def echo_backend(self, site: Site = LOOPBACK_SITE) -> tuple[subprocess.Popen[bytes], int]:
        port_file = self._next("echo.port")
        argv = [*site.server_prefix, PYTHON, str(WORKLOAD), "echo", "--port-file", str(port_file)]
        argv += ["--host", site.bind, "--port", str(site.echo_port)]
        proc = self.procs.start("echo-backend", argv)
        wait_for(port_file.exists, "echo backend", [proc])
        return proc, int(port_file.read_text())

    # -- one configuration, once ------------------------------------------------------------------

    def measure(
        self,
        config: str,
        profile_dir: Path | None,
        site: Site = LOOPBACK_SITE,
        fixed_pids: list[int] | None = None,
    ) -> dict[str, float]:
        """One configuration, once. ``fixed_pids``: the pair is already running (the ztunnels);
        traffic goes straight to the server's address and is intercepted on the way."""
        s = self.s
        out: dict[str, float] = {}

        def start(target: int) -> Pair:
            if fixed_pids is not None:
                return Pair(target, fixed_pids=fixed_pids)
            return self.start_pair(config, target, site)

        if fixed_pids:
            # Long-running processes: "idle" is before any of this measurement's traffic.
            time.sleep(s.settle)
            server_rss, client_rss = (rss_mib(pid) for pid in fixed_pids)
            out["rss_idle_mib"] = max(server_rss, client_rss)
            out["rss_idle_server_mib"], out["rss_idle_client_mib"] = server_rss, client_rss

        # Throughput and CPU: a pair in front of iperf3.
        iperf_port = site.iperf_port or free_port()
        pair = start(iperf_port)
        try:
            cpu0 = cpu_seconds(pair.pids)
            one = self.iperf(iperf_port, pair.listen_port, 1, s.duration, site)
            four = self.iperf(iperf_port, pair.listen_port, 4, s.duration, site)
            cpu1 = cpu_seconds(pair.pids)
            out["tput1_gbps"] = one["bps"] / 1e9
            out["tput4_gbps"] = four["bps"] / 1e9
            if pair.pids:
                out["cpu_s_per_gb"] = (cpu1 - cpu0) / ((one["bytes"] + four["bytes"]) / GB)
            if profile_dir is not None:
                names = PROFILED["ztunnel"] if fixed_pids else PROFILED["ours"]
                self.profile(pair, iperf_port, profile_dir, names, site)
        finally:
            self.stop_pair(pair)

        # Latency, connection rate and memory: a pair in front of the echo backend.
        backend, echo_port = self.echo_backend(site)
        try:
            pair = start(echo_port)
            try:
                time.sleep(s.settle)
                if pair.procs:
                    server_rss, client_rss = (rss_mib(pid) for pid in pair.pids)
                    out["rss_idle_mib"] = max(server_rss, client_rss)
                    out["rss_idle_server_mib"], out["rss_idle_client_mib"] = server_rss, client_rss
                cpu0 = cpu_split(pair.pids)
                lat = self.run_json(
                    "latency",
                    [
                        *site.client_prefix,
                        PYTHON,
                        str(WORKLOAD),
                        "latency",
                        "--host",
                        site.connect,
                        "--port",
                        str(pair.listen_port),
                        "--count",
                        str(s.latency_count),
                        "--warmup",
                        str(s.latency_warmup),
                    ],
                    timeout=120,
                )
                out["p50_us"], out["p99_us"] = lat["p50_us"], lat["p99_us"]
                if pair.pids:
                    trips = s.latency_count + s.latency_warmup
                    cpu1 = cpu_split(pair.pids)
                    out["cpu_user_us_per_rt"], out["cpu_sys_us_per_rt"] = per_op_us(cpu0, cpu1, trips)
                    cpu0 = cpu1
                rate = self.run_json(
                    "connrate",
                    [
                        *site.client_prefix,
                        PYTHON,
                        str(WORKLOAD),
                        "connrate",
                        "--host",
                        site.connect,
                        "--port",
                        str(pair.listen_port),
                        "--duration",
                        str(s.connrate_seconds),
                        "--parallel",
                        str(s.connrate_parallel),
                    ],
                    timeout=s.connrate_seconds + 60,
                )
                out["conn_per_s"] = rate["conn_per_s"]
                out["conn_errors"] = rate["errors"]
                if pair.pids:
                    conns = rate["connections"] + rate["errors"]
                    cpu1 = cpu_split(pair.pids)
                    out["cpu_user_us_per_conn"], out["cpu_sys_us_per_conn"] = per_op_us(cpu0, cpu1, conns)
                if pair.pids:
                    # Before the runs below: what they allocate may stay in the allocator's free
                    # lists, hiding the growth from held connections.
                    out["rss_1000_mib"] = self.hold_delta(pair, site)
                if config == "ztunnel":
                    out.update(self.cold_connrate(pair, site, "resume", "resumed"))
                    out.update(self.cold_connrate(pair, site, "full", "cold"))
                elif config == "netns-stunnel":
                    full = self.start_stunnel(echo_port, site, resume=False)
                    try:
                        out.update(self.cold_connrate(full, site, None, "cold"))
                    finally:
                        self.stop_pair(full)
                if site.netns:
                    out.update(self.many_round_trips(pair, site))
                if profile_dir is not None and fixed_pids:
                    self.profile_ops(pair, site, profile_dir)
            finally:
                self.stop_pair(pair)
        finally:
            self.procs.stop(backend)
        return out

    def connrate_argv(self, pair: Pair, site: Site, seconds: float) -> list[str]:
        argv = [*site.client_prefix, PYTHON, str(WORKLOAD), "connrate", "--host", site.connect]
        argv += ["--port", str(pair.listen_port), "--duration", str(seconds)]
        return [*argv, "--parallel", str(self.s.connrate_parallel)]

    def cold_connrate(self, pair: Pair, site: Site, mode: str | None, suffix: str) -> dict[str, float]:
        """New connections/s when every connection is a new TLS connection. For the ztunnels
        (``mode``, see COLD_ENV): a new HBONE connection per connection (no pool reuse), TLS
        resumed (``resume``) or a full TLS 1.3 handshake (``full``); ``None``: ``pair`` is already
        set up so (a stunnel pair with ``sessionResume = no``). Figures named ``…_<suffix>``."""
        out: dict[str, float] = {}
        if mode is not None:
            self.cold_file.write_text(mode)
        try:
            cpu0 = cpu_split(pair.pids)
            argv = self.connrate_argv(pair, site, self.s.connrate_seconds)
            rate = self.run_json("connrate-cold", argv, timeout=self.s.connrate_seconds + 60)
            cpu1 = cpu_split(pair.pids)
        finally:
            self.cold_file.unlink(missing_ok=True)
        out[f"conn_per_s_{suffix}"], out[f"conn_errors_{suffix}"] = rate["conn_per_s"], rate["errors"]
        conns = rate["connections"] + rate["errors"]
        user, system = per_op_us(cpu0, cpu1, conns)
        out[f"cpu_user_us_per_conn_{suffix}"], out[f"cpu_sys_us_per_conn_{suffix}"] = user, system
        time.sleep(self.s.settle)  # let the last cold connections close before what comes next
        return out

    def start_rounds(
        self, pair: Pair, site: Site, count: int, seconds: float
    ) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
        """A ``rounds`` client with its ``count`` connections open, waiting for SIGUSR1 to start."""
        ready = self._next("rounds.ready")
        argv = [*site.client_prefix, PYTHON, str(WORKLOAD), "rounds", "--host", site.connect]
        argv += ["--port", str(pair.listen_port), "--count", str(count), "--duration", str(seconds)]
        proc = self.procs.start("rounds", [*argv, "--ready-file", str(ready)], stdout=subprocess.PIPE)
        try:
            wait_for(ready.exists, "rounds client", [proc], timeout=180)
        except BenchError:
            self.procs.stop(proc)
            raise
        opened: dict[str, Any] = json.loads(ready.read_text())
        return proc, opened

    def finish_rounds(self, proc: subprocess.Popen[bytes], seconds: float) -> dict[str, Any]:
        try:
            out, _ = proc.communicate(timeout=seconds + 120)
        except subprocess.TimeoutExpired:
            self.procs.stop(proc)
            raise BenchError("rounds client timed out") from None
        self.procs.stop(proc)
        if proc.returncode != 0:
            raise BenchError(f"rounds client failed with {proc.returncode}:\n{log_tail(proc)}")
        result: dict[str, Any] = json.loads(out)
        return result

    def many_round_trips(self, pair: Pair, site: Site) -> dict[str, float]:
        """``many_count`` kept-alive connections doing 1 KiB round trips at once: latency, rate,
        the pair's CPU per round trip (the connections are opened before the CPU is read), and
        how many connections failed to open or broke (must be none)."""
        s = self.s
        time.sleep(s.settle)
        proc, opened = self.start_rounds(pair, site, s.many_count, s.many_seconds)
        cpu0 = cpu_split(pair.pids) if pair.pids else (0.0, 0.0)
        proc.send_signal(signal.SIGUSR1)
        result = self.finish_rounds(proc, s.many_seconds)
        out = {
            "many_p50_us": result["p50_us"],
            "many_p99_us": result["p99_us"],
            "many_rt_per_s": result["rt_per_s"],
            "many_dropped": float(s.many_count - opened["open"] + result["errors"]),
        }
        if pair.pids:
            user, system = per_op_us(cpu0, cpu_split(pair.pids), result["round_trips"])
            out["many_cpu_us_per_rt"] = user + system
        time.sleep(s.settle)  # let the connections close before what comes next
        return out

    def hold_delta(self, pair: Pair, site: Site = LOOPBACK_SITE) -> float:
        """RSS added to the pair by ``hold_count`` idle tunneled connections."""
        time.sleep(self.s.settle)
        before = sum(rss_mib(pid) for pid in pair.pids)
        ready = self._next("hold.ready")
        argv = [*site.client_prefix, PYTHON, str(WORKLOAD), "hold", "--host", site.connect]
        argv += ["--port", str(pair.listen_port)]
        argv += ["--count", str(self.s.hold_count), "--ready-file", str(ready)]
        holder = self.procs.start("hold", argv, stdout=subprocess.DEVNULL)
        try:
            wait_for(ready.exists, "hold client", [holder], timeout=120)
            held = json.loads(ready.read_text())
            if held["open"] != self.s.hold_count:
                raise BenchError(f"only {held['open']} of {self.s.hold_count} connections held open")
            time.sleep(self.s.settle)
            after = sum(rss_mib(pid) for pid in pair.pids)
        finally:
            self.procs.stop(holder)
        return after - before

    # -- configuration 5: two ztunnels between two netns nodes -----------------------------------

    def measure_netns(
        self, profile_dir: Path | None = None, reverse: bool = False
    ) -> dict[str, dict[str, float]]:
        """The local mesh of ``ambientctl demo`` (ambientctl/localmesh): control plane, nodes
        node-a and node-b as network namespaces joined by a veth wire, a cni agent and a ztunnel
        per node, pods as network namespaces. First the pods are only sandboxes (no CNI plugin run
        yet): ``netns-direct`` is plain TCP from shop/frontend (node-a) to shop/web (node-b) across
        the wire; and ``netns-stunnel``, a stunnel pair between the same two netns (client side in
        shop/frontend's, server side in shop/web's, TLS 1.3 with certificates for the two pods'
        identities issued by the mesh's CA) — these two in ``reverse`` order every other repeat.
        Then the CNI plugin chain enrolls them and the *same* workload between the *same* two netns
        runs through ztunnel node-a → HBONE → ztunnel node-b: ``ztunnel``.

        Everything the mesh made (processes, netns with their links and nft rules) is removed
        before returning, also on failure and Ctrl-C (ambientctl.localmesh.state.teardown).
        """
        sys.path.insert(0, str(ROOT))
        from ambientctl.localmesh import spec
        from ambientctl.localmesh.mesh import DemoError, LocalMesh
        from ambientctl.localmesh.procs import ProcError
        from ambientctl.localmesh.state import RunState, teardown
        from ambientctl.localmesh.topology import TopologyError

        build_log = self._next("mesh.log")
        state = RunState.create(self.work / "mesh")

        def say(msg: str) -> None:
            with open(build_log, "a") as f:
                f.write(msg + "\n")

        out: dict[str, dict[str, float]] = {}
        saved_env = {k: os.environ.get(k) for k in (COLD_ENV, "PYTHONPATH")}
        try:
            mesh = LocalMesh(state, say)
            # The mesh's processes inherit this environment: see COLD_ENV.
            os.environ[COLD_ENV] = str(self.cold_file)
            os.environ["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(COLD_SITE_DIR), saved_env["PYTHONPATH"]])
            )
            try:
                mesh.build(enroll=False)
            finally:
                for k, v in saved_env.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            self.netns_creds = mesh_creds(mesh.cp_dir, self.work / f"mesh-creds-{self._next('c').name}")
            # Many short connections from one address to one port: let the source reuse
            # TIME_WAIT ports (the kernel does so by default on loopback only). Per netns.
            argv = ["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"]
            subprocess.run(mesh.exec_argv(SRC_POD, argv), check=True, capture_output=True, timeout=10)
            site = Site(
                server_prefix=tuple(mesh.exec_argv(DST_POD, [])),
                client_prefix=tuple(mesh.exec_argv(SRC_POD, [])),
                bind="0.0.0.0",
                connect=DST_IP,
                iperf_port=NETNS_IPERF_PORT,
                echo_port=NETNS_ECHO_PORT,
            )
            stunnel_site = Site(
                server_prefix=site.server_prefix,
                client_prefix=site.client_prefix,
                bind=site.bind,
                connect=HOST,  # the stunnel client listens on the source pod's loopback
                iperf_port=site.iperf_port,
                echo_port=site.echo_port,
                peer=DST_IP,
            )
            for name in ["netns-direct", "netns-stunnel"][:: -1 if reverse else 1]:
                if name == "netns-direct":
                    out[name] = self.measure(name, None, site, fixed_pids=[])
                else:
                    out[name] = self.measure(name, None, stunnel_site)
            mesh.enroll_pods()
            # [server side, client side], as for the pairs.
            pids = [mesh.procs.pid(f"ztunnel-{spec.pod(k).node}") for k in (DST_POD, SRC_POD)]
            out["ztunnel"] = self.measure("ztunnel", profile_dir, site, fixed_pids=pids)
        except (DemoError, ProcError, TopologyError, subprocess.SubprocessError) as e:
            raise BenchError(f"local mesh: {e}\n(build log: {build_log.read_text()[-1500:]})") from e
        finally:
            # No second Ctrl-C may stop the teardown half way (as in ambientctl demo).
            old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                self.procs.stop_all()  # our servers/clients inside the pod netns first
                errors = teardown(state)
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)
        if errors:
            raise BenchError("local mesh teardown: " + "; ".join(errors))
        return out

    # -- profile ----------------------------------------------------------------------------------

    def profile(
        self,
        pair: Pair,
        iperf_port: int,
        profile_dir: Path,
        names: tuple[str, str],
        site: Site = LOOPBACK_SITE,
    ) -> None:
        """py-spy on both processes of a pair (ours, or the two ztunnels), each mode during one
        more single-stream iperf3 run. ``names``: [server side, client side], as ``pair.pids``.

        ``python``: Python frames only, ``--nonblocking`` (the target is never paused).
        ``native``: with C frames (uvloop, OpenSSL, libc); py-spy pauses the target per sample.
        """
        pyspy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
        secs = self.s.profile_seconds
        for mode, flag in PROFILE_MODES:
            spies = []
            for name, pid in zip(names, pair.pids, strict=True):
                outfile = profile_dir / f"{name}-{mode}.txt"
                argv = [pyspy, "record", "-p", str(pid), "-d", str(secs), "-r", "200", flag]
                argv += ["--format", "raw", "-o", str(outfile)]
                spies.append((name, outfile, self.procs.start(f"py-spy-{name}-{mode}", argv)))
            # iperf runs a little longer than the recording, so that every sample is under load.
            self.iperf(iperf_port, pair.listen_port, 1, secs + 2, site)
            for _, _, proc in spies:
                proc.wait(timeout=30)
                self.procs.stop(proc)
            for name, outfile, proc in spies:
                if not outfile.exists():
                    raise BenchError(f"py-spy {name} ({mode}) wrote nothing:\n{log_tail(proc)}")

    def profile_ops(self, pair: Pair, site: Site, profile_dir: Path) -> None:
        """py-spy on both ztunnels per operation: during 1 KiB round trips on one kept-alive
        connection (``rt``), then during the connection-rate workload, warm pool (``conn``) and
        cold: every connection a full TLS handshake (``cold``, see COLD_ENV)."""
        secs = self.s.profile_seconds
        for mode, flag in PROFILE_MODES:
            spies = self._spies(pair, profile_dir, f"rt-{mode}", flag)
            proc, _ = self.start_rounds(pair, site, 1, secs + 2)
            proc.send_signal(signal.SIGUSR1)
            self.finish_rounds(proc, secs + 2)
            self._wait_spies(spies)
            spies = self._spies(pair, profile_dir, f"conn-{mode}", flag)
            self.run_json("connrate", self.connrate_argv(pair, site, secs + 2), timeout=secs + 60)
            self._wait_spies(spies)
            self.cold_file.write_text("full")
            try:
                spies = self._spies(pair, profile_dir, f"cold-{mode}", flag)
                self.run_json("connrate", self.connrate_argv(pair, site, secs + 2), timeout=secs + 60)
                self._wait_spies(spies)
            finally:
                self.cold_file.unlink(missing_ok=True)

    def _spies(
        self, pair: Pair, profile_dir: Path, what: str, flag: str
    ) -> list[tuple[str, Path, subprocess.Popen[bytes]]]:
        pyspy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
        spies = []
        for name, pid in zip(PROFILED["ztunnel"], pair.pids, strict=True):
            outfile = profile_dir / f"{name}-{what}.txt"
            argv = [pyspy, "record", "-p", str(pid), "-d", str(self.s.profile_seconds), "-r", "200", flag]
            argv += ["--format", "raw", "-o", str(outfile)]
            spies.append((name, outfile, self.procs.start(f"py-spy-{name}-{what}", argv)))
        return spies

    def _wait_spies(self, spies: list[tuple[str, Path, subprocess.Popen[bytes]]]) -> None:
        for _, _, proc in spies:
            proc.wait(timeout=30)
            self.procs.stop(proc)
        for name, outfile, proc in spies:
            if not outfile.exists():
                raise BenchError(f"py-spy {name} wrote nothing:\n{log_tail(proc)}")


# -- profile summary ------------------------------------------------------------------------------


def summarize_profile(path: Path, top: int) -> tuple[int, list[tuple[str, int, int]]]:
    """Collapsed stacks → (samples, [(function, own samples, inclusive samples)]) by own time."""
    own: dict[str, int] = defaultdict(int)
    incl: dict[str, int] = defaultdict(int)
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = [_function(f) for f in stack.split(";")]
        own[frames[-1]] += count
        for fn in set(frames):
            incl[fn] += count
    ranked = sorted(own.items(), key=lambda kv: -kv[1])[:top]
    return total, [(fn, n, incl[fn]) for fn, n in ranked]


def _function(frame: str) -> str:
    """``name (path/to/file.py:123)`` → ``name (file.py)``; thread frames pass through."""
    name, sep, loc = frame.partition(" (")
    if not sep:
        return frame
    if name.startswith("0x"):  # native frame without a symbol: group per library
        return f"[unresolved] ({loc.rstrip(')')})"
    path = loc.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    for anchor in ("site-packages", "mesh", "ambientctl", "asyncio"):
        if anchor in parts:
            idx = len(parts) - 1 - parts[::-1].index(anchor)
            short = "/".join(parts[idx + 1 :] if anchor == "site-packages" else parts[idx:])
            return f"{name} ({short})"
    return f"{name} ({Path(path).name})"


def profile_markdown(profile_dirs: list[Path], top: int = 15) -> str:
    lines = [
        "## Profiles under single-stream load (py-spy, own time)",
        "",
        "Samples are counted only while a thread was busy (py-spy drops idle samples). Python"
        " frames: own time of `Runner.run` is time inside uvloop's C event loop (socket system"
        " calls, C transport code), `SSLObject.read`/`write` is OpenSSL plus the copies around it."
        " Native frames (`--native`) split that C time further; unnamed libc/libcrypto addresses"
        " are grouped per library (in libc these are mostly memcpy/memmove). The two ztunnels"
        " (configuration 5) are recorded the same way, during a single-stream run between the pods.",
        "",
    ]
    for profile_dir in profile_dirs:
        for mode, _ in PROFILE_MODES:
            for name in ("forward", "serve", "ztunnel-node-a", "ztunnel-node-b"):
                lines += _profile_table(profile_dir / f"{name}-{mode}.txt", name, mode, top)
    ops = [
        "## Profiles of the two ztunnels per operation (py-spy, own time)",
        "",
        "Configuration 5 after enrollment: while one client does 1 KiB round trips on one kept-alive"
        " connection (`round trips`), and while the connection-rate workload runs with the HBONE"
        " pool warm (`new connections`) and with every connection a full TLS handshake (`cold new"
        " connections`).",
        "",
    ]
    for profile_dir in profile_dirs:
        for what, title in OP_PROFILES:
            for mode, _ in PROFILE_MODES:
                for name in ("ztunnel-node-a", "ztunnel-node-b"):
                    path = profile_dir / f"{name}-{what}-{mode}.txt"
                    ops += _profile_table(path, name, mode, top, f", {title}")
    if len(ops) > 6:
        lines += ops
    return "\n".join(lines)


def _profile_table(path: Path, name: str, mode: str, top: int, what: str = "") -> list[str]:
    if not path.exists():
        return []
    total, ranked = summarize_profile(path, top)
    lines = [f"### {PROFILE_TITLES[name]}{what}, {mode} frames ({total} busy samples)", ""]
    lines += ["| # | function | own % | incl. % |", "|---|---|---:|---:|"]
    for i, (fn, n, inc) in enumerate(ranked, 1):
        fn_md = fn.replace("|", "\\|")
        lines.append(f"| {i} | `{fn_md}` | {100 * n / total:.1f} | {100 * inc / total:.1f} |")
    lines.append("")
    return lines


# -- report ---------------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" with uncommitted changes" if dirty else "")


def fmt(key: str, v: float | None) -> str:
    if v is None:
        return "—"
    if key in ("tput1_gbps", "tput4_gbps"):
        return f"{v:.2f}"
    if key in ("cpu_s_per_gb",):
        return f"{v:.2f}"
    if key.startswith("rss"):
        return f"{v:.1f}"
    return f"{v:.0f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}{TIMES}"


def report(
    medians: dict[str, dict[str, float]],
    runs: dict[str, list[dict[str, float]]],
    settings: Settings,
    command: str,
    started: dt.datetime,
    elapsed: float,
    quick: bool,
    load_start: float,
) -> str:
    heads = [title for _, title in FIGURES]
    header = "| configuration | " + " | ".join(heads) + " |"
    sep = "|---|" + "---:|" * len(FIGURES)
    hold_title = f"RSS +{settings.hold_count} conns MiB (pair)"
    header = header.replace("RSS +N conns MiB (pair)", hold_title)

    def row(config: str, cell: Callable[[str], str]) -> str:
        return f"| {LABELS[config]} | " + " | ".join(cell(k) for k, _ in FIGURES) + " |"

    lines = [
        "# Data-path benchmark" + (" (QUICK MODE — not a measurement)" if quick else ""),
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC, {elapsed / 60:.1f} min",
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores; kernel {platform.release()}",
        f"- load average (1 min) at start {load_start:.2f}, at end {os.getloadavg()[0]:.2f}"
        " (anything above 0 is other work sharing the machine)",
        f"- commit: {git_revision()}",
        f"- command: `{command}`",
        f"- settings: repeat {settings.repeat} (median shown, order alternated), iperf3 -t {settings.duration},"
        f" {settings.latency_count} round trips, {settings.connrate_parallel} parallel clients for"
        f" {settings.connrate_seconds:g} s, {settings.hold_count} held connections",
        "",
        "## Absolute figures (median)",
        "",
        header,
        sep,
        *(row(c, lambda k, c=c: fmt(k, medians[c].get(k))) for c in RESULTS),
        "",
        "CPU-s/GB is the pair's processes' user+system CPU over both iperf3 runs divided by the bytes"
        " received; RSS idle is the largest VmRSS of the pair's two processes after start; RSS +N is"
        " the growth of the pair's summed VmRSS while N idle connections are tunneled to the backend."
        " The first four rows run on loopback. The last two run between two pods of the local mesh"
        f" (ambientctl/localmesh): {SRC_POD} on node-a to {DST_POD} on node-b ({DST_IP}), each pod and"
        " node a network namespace, the nodes joined by a veth; first before the pods are enrolled"
        " (plain TCP across the veths and the nodes' bridges and routes), then after the CNI plugin"
        " enrolled them (ztunnel node-a → HBONE mTLS → ztunnel node-b). For the ztunnels, CPU-s/GB"
        " sums both ztunnel processes, RSS idle is the larger ztunnel's VmRSS before the"
        " measurement's first byte, RSS +N the growth of both ztunnels' VmRSS.",
        "",
        "## Ratio to direct TCP",
        "",
        header,
        sep,
        *(
            row(
                c,
                lambda k, c=c: "—" if k in PAIR_ONLY else ratio(medians[c].get(k), medians["direct"].get(k)),
            )
            for c in LOOPBACK[1:]
        ),
        "| "
        + ZTUNNEL_VS_NETNS
        + " | "
        + " | ".join(
            "—" if k in PAIR_ONLY else ratio(medians["ztunnel"].get(k), medians["netns-direct"].get(k))
            for k, _ in FIGURES
        )
        + " |",
        "",
        "The loopback pairs are divided by direct loopback TCP; the ztunnel row by its own baseline,"
        " direct TCP between the same two pod netns (across veths and two bridges, not loopback).",
        "",
        "## Ratio to the stunnel pair",
        "",
        header,
        sep,
        *(row(c, lambda k, c=c: ratio(medians[c].get(k), medians["stunnel"].get(k))) for c in LOOPBACK[1:]),
        "",
        "(These pairs run on loopback; the two ztunnels are divided by a stunnel pair between the same"
        " two pod netns below.)",
        "",
        *netns_section(medians, settings),
        "",
        "## CPU per operation (median, the pair's processes summed)",
        "",
        "What one 1 KiB round trip (warm-up included) and one new connection cost the pair, from"
        " /proc utime and stime across the latency and connection-rate runs; the clients and the"
        " echo backend are not counted. It explains the latency and connection-rate figures: on 2"
        " cores every process shares the CPU.",
        "",
        "| configuration | round trip, user µs | round trip, system µs | connection, user µs |"
        " connection, system µs |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {LABELS[c]} | " + " | ".join(fmt(k, medians[c].get(k)) for k in CPU_PER_OP) + " |"
            for c in RESULTS
            if c not in ("direct", "netns-direct")
        ),
        "",
        *(
            ["## Targets from issue 11 (ours)", "", *targets(medians, settings), ""]
            if all(medians[c] for c in ("ours", "stunnel", "direct"))
            else []
        ),
        "## Every repeat",
        "",
        "| configuration | figure | values |",
        "|---|---|---|",
    ]
    for c in RESULTS:
        for k, title in FIGURES:
            values = [r[k] for r in runs[c] if k in r]
            if values:
                lines.append(f"| {LABELS[c]} | {title} | {', '.join(fmt(k, v) for v in values)} |")
        for k, title in DETAILS:
            values = [r[k] for r in runs[c] if k in r]
            if values:
                lines.append(f"| {LABELS[c]} | {title} | {', '.join(fmt(k, v) for v in values)} |")
    lines.append("")
    return "\n".join(lines)


NETNS_COLUMNS: list[tuple[str, str]] = [  # key, column title of the configuration 5 comparison
    ("tput1_gbps", "1-stream Gbit/s"),
    ("tput4_gbps", "4-stream Gbit/s"),
    ("cpu_s_per_gb", "CPU-s/GB"),
    ("added_p50_us", "added p50 µs"),
    ("added_p99_us", "added p99 µs"),
    ("conn_per_s", "new conn/s warm"),
    ("conn_per_s_resumed", "new conn/s resumed"),
    ("conn_per_s_cold", "new conn/s cold"),
    ("cpu_us_per_conn", "CPU µs/conn warm"),
    ("cpu_us_per_conn_resumed", "CPU µs/conn resumed"),
    ("cpu_us_per_conn_cold", "CPU µs/conn cold"),
    ("cpu_us_per_rt", "CPU µs/round trip"),
    ("many_p99_us", "N conns: p99 µs"),
    ("many_cpu_us_per_rt", "N conns: CPU µs/round trip"),
    ("many_rt_per_s", "N conns: round trips/s"),
    ("many_dropped", "N conns: dropped"),
    ("rss_idle_mib", "RSS idle MiB/process"),
    ("rss_1000_mib", "RSS +N conns MiB (pair)"),
]


def netns_figures(m: dict[str, dict[str, float]], config: str) -> dict[str, float]:
    """The configuration 5 comparison's figures for ``config``: latency as added to the same pods'
    direct TCP, CPU per operation as user+system. A stunnel pair has no pool: its warm figures are
    its default, which resumes the TLS session on every connection, i.e. also its resumed ones."""
    f = dict(m.get(config, {}))
    base = m.get("netns-direct", {})
    for k in ("p50_us", "p99_us"):
        if k in f and k in base:
            f[f"added_{k}"] = f[k] - base[k]
    for what in ("rt", "conn", "conn_resumed", "conn_cold"):
        user, system = f.get(f"cpu_user_us_per_{what}"), f.get(f"cpu_sys_us_per_{what}")
        if user is not None and system is not None:
            f[f"cpu_us_per_{what}"] = user + system
    if config == "netns-stunnel":
        for k in ("conn_per_s", "cpu_us_per_conn"):
            if k in f:
                f[f"{k}_resumed"] = f[k]
    return f


def netns_fmt(key: str, v: float | None) -> str:
    if v is None:
        return "—"
    if key == "cpu_s_per_gb" or key.startswith("tput") or key.startswith("rss"):
        return fmt(key, v)
    return f"{v:.0f}"


def netns_section(m: dict[str, dict[str, float]], settings: Settings) -> list[str]:
    if not all(m.get(c) for c in ("netns-direct", "netns-stunnel", "ztunnel")):
        return []
    n = settings.many_count
    heads = [t.replace("N conns", f"{n} conns") for _, t in NETNS_COLUMNS]
    header = "| configuration | " + " | ".join(heads) + " |"
    sep = "|---|" + "---:|" * len(NETNS_COLUMNS)
    figs = {c: netns_figures(m, c) for c in NETNS}
    lines = [
        "## Configuration 5: two ztunnels ÷ a stunnel pair between the same two pods",
        "",
        f"The same workload from {SRC_POD} (node-a) to {DST_POD} (node-b): direct TCP and a stunnel"
        " pair before enrollment (client side in the source pod's netns, server side in the"
        " destination pod's, TLS 1.3 with certificates for the two pods' identities from the mesh's"
        " CA), the two ztunnels after. Added latency is over the direct TCP row. CPU is the two"
        " processes' user+system time per operation. New connections: `warm` is each one's"
        " default — the ztunnels' HBONE pool reused (one stream per connection on a pooled mTLS"
        " connection), stunnel's client resuming the last TLS session (a ticket: no certificates,"
        " no signatures; stunnel has no pool); `resumed`: every connection its own TLS connection"
        " with the session resumed (for the ztunnels a new HBONE connection each; for stunnel the"
        " same run as warm); `cold`: every connection a full TLS 1.3 handshake (ztunnels: no pool,"
        f" no resumption; stunnel: a second pair with `sessionResume = no`). `{n} conns`:"
        f" {n} kept-alive connections opened first, then all doing 1 KiB round trips at once for"
        f" {settings.many_seconds:g} s; dropped = failed to open or broken.",
        "",
        header,
        sep,
    ]
    for c in NETNS:
        lines.append(
            f"| {LABELS[c]} | " + " | ".join(netns_fmt(k, figs[c].get(k)) for k, _ in NETNS_COLUMNS) + " |"
        )
    z, st = figs["ztunnel"], figs["netns-stunnel"]
    lines.append(
        "| two ztunnels ÷ stunnel pair | "
        + " | ".join("—" if k == "many_dropped" else ratio(z.get(k), st.get(k)) for k, _ in NETNS_COLUMNS)
        + " |"
    )
    lines += ["", "### Targets from issue 23 (two ztunnels against that stunnel pair)", ""]
    rows = ["| target | measured | met |", "|---|---|---|"]

    def add(
        name: str, key: str, ok: Callable[[float], bool], unit: str = TIMES, absolute: bool = False
    ) -> None:
        if key not in z or (not absolute and not st.get(key)):
            return
        v = z[key] if absolute else z[key] / st[key]
        rows.append(f"| {name} | {v:.2f}{unit} | {'yes' if ok(v) else 'no'} |")

    add(f"single-stream throughput ≥ 1.0{TIMES}", "tput1_gbps", lambda v: v >= 1.0)
    add(f"4-stream throughput ≥ 1.0{TIMES}", "tput4_gbps", lambda v: v >= 1.0)
    add(f"CPU-s/GB ≤ 1.0{TIMES}", "cpu_s_per_gb", lambda v: v <= 1.0)
    add(f"added p50 ≤ 1.5{TIMES}", "added_p50_us", lambda v: v <= 1.5)
    add(f"added p99 ≤ 1.5{TIMES}", "added_p99_us", lambda v: v <= 1.5)
    add(f"new conn/s ≥ 1.5{TIMES}, HBONE pool warm", "conn_per_s", lambda v: v >= 1.5)
    add(f"new conn/s ≥ 1.5{TIMES}, resumed (a TLS connection each)", "conn_per_s_resumed", lambda v: v >= 1.5)
    add(f"new conn/s ≥ 1.5{TIMES}, cold (full handshake each)", "conn_per_s_cold", lambda v: v >= 1.5)
    add("RSS idle ≤ 40 MiB per ztunnel", "rss_idle_mib", lambda v: v <= 40, " MiB", absolute=True)
    if "rss_1000_mib" in z:
        per_1000 = z["rss_1000_mib"] * 1000 / settings.hold_count
        rows.append(
            f"| RSS ≤ +12 MiB per 1,000 held connections (both ztunnels) | {per_1000:.2f} MiB"
            f" | {'yes' if per_1000 <= 12 else 'no'} |"
        )
    add(f"{n} conns doing round trips: nothing dropped", "many_dropped", lambda v: v == 0, "", absolute=True)
    return lines + rows


def targets(m: dict[str, dict[str, float]], settings: Settings) -> list[str]:
    o, st, d = m["ours"], m["stunnel"], m["direct"]
    rows = ["| target | measured | met |", "|---|---|---|"]

    def add(name: str, value: float, ok: bool, unit: str = TIMES) -> None:
        rows.append(f"| {name} | {value:.2f}{unit} | {'yes' if ok else 'no'} |")

    add(
        f"single-stream throughput ≥ 1.0{TIMES} stunnel",
        o["tput1_gbps"] / st["tput1_gbps"],
        o["tput1_gbps"] >= st["tput1_gbps"],
    )
    add(
        f"CPU-s/GB ≤ 1.0{TIMES} stunnel",
        o["cpu_s_per_gb"] / st["cpu_s_per_gb"],
        o["cpu_s_per_gb"] <= st["cpu_s_per_gb"],
    )
    added_o, added_st = o["p99_us"] - d["p99_us"], st["p99_us"] - d["p99_us"]
    if added_st > 0:
        add(f"added p99 over direct ≤ 1.5{TIMES} stunnel's", added_o / added_st, added_o <= 1.5 * added_st)
    add(
        f"new conn/s ≥ 2{TIMES} stunnel",
        o["conn_per_s"] / st["conn_per_s"],
        o["conn_per_s"] >= 2 * st["conn_per_s"],
    )
    add("RSS idle ≤ 40 MiB per process", o["rss_idle_mib"], o["rss_idle_mib"] <= 40, " MiB")
    per_1000 = o["rss_1000_mib"] * 1000 / settings.hold_count
    add("RSS ≤ +12 MiB per 1,000 idle tunneled connections", per_1000, per_1000 <= 12, " MiB")
    return rows


# -- main -----------------------------------------------------------------------------------------


def orders(repeat: int) -> Iterator[list[str]]:
    """Rotate, and reverse every other repeat, so no configuration always runs first or last."""
    for i in range(repeat):
        k = i % len(CONFIGS)
        order = CONFIGS[k:] + CONFIGS[:k]
        yield order[::-1] if i % 2 else order


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536
    if hard < want and os.geteuid() == 0:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, want), hard), hard))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--repeat", type=int, default=None, help="repeats, median reported (default 3)")
    p.add_argument("--duration", type=int, default=None, help="iperf3 seconds per run (default 10)")
    p.add_argument("--quick", action="store_true", help="every configuration once, tiny sizes (for tests)")
    p.add_argument("--profile", action="store_true", help="py-spy our pair under single-stream load")
    p.add_argument("--profile-seconds", type=int, default=None, help="py-spy recording length (default 10)")
    p.add_argument("--output", metavar="FILE", help="write the markdown report here (default: stdout)")
    p.add_argument("--json", metavar="FILE", help="also write the raw figures as JSON")
    p.add_argument(
        "--only",
        metavar="CONFIG[,CONFIG]",
        help=f"run only these configurations ({', '.join(CONFIGS)}; default all)",
    )
    args = p.parse_args(argv)
    only = [c for c in (args.only or "").split(",") if c]
    unknown = sorted(set(only) - set(CONFIGS))
    if unknown:
        p.error(f"--only: unknown configuration {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
    args.only = frozenset(only or CONFIGS)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    if args.repeat is not None:
        settings.repeat = args.repeat
    if args.duration is not None:
        settings.duration = args.duration
    if args.profile_seconds is not None:
        settings.profile_seconds = args.profile_seconds
    for tool in ("iperf3", "haproxy"):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            print(f"datapath: {tool} not found (bash scripts/dev.sh bench installs it)", file=sys.stderr)
            return 2
    if not (shutil.which("stunnel4") or shutil.which("stunnel")):
        print("datapath: stunnel4 not found (bash scripts/dev.sh bench installs it)", file=sys.stderr)
        return 2
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "nft")):
        print(
            "datapath: configuration 5 builds network namespaces and nft rules: run as root, with"
            " ip and nft installed (bash scripts/dev.sh installs them)",
            file=sys.stderr,
        )
        return 2
    raise_nofile()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    command = shlex.join(["python", os.path.relpath(__file__, ROOT), *argv])
    started = dt.datetime.now(dt.UTC)
    load_start = os.getloadavg()[0]
    t0 = time.monotonic()

    # SIGTERM behaves like Ctrl-C: unwind, stopping every child in the finally blocks.
    def _term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    runs: dict[str, list[dict[str, float]]] = {c: [] for c in RESULTS}
    with tempfile.TemporaryDirectory(prefix="datapath-") as tmp:
        work = Path(tmp)
        (work / "logs").mkdir()
        procs = Processes(work / "logs")
        try:
            bench = Bench(settings, work, procs, make_creds(work / "creds"))
            profiled: dict[str, Path] = {}  # configuration -> its profiles (the first repeat's)
            for i, order in enumerate(orders(settings.repeat)):
                for config in (c for c in order if c in args.only):
                    pdir = None
                    if args.profile and config in ("ours", "netns") and config not in profiled:
                        pdir = profiled[config] = work / f"profile-{config}"
                        pdir.mkdir()
                    print(
                        f"[{time.monotonic() - t0:6.1f}s] repeat {i + 1}/{settings.repeat}: {config}",
                        file=sys.stderr,
                    )
                    if config == "netns":
                        for name, figures in bench.measure_netns(pdir, reverse=bool(i % 2)).items():
                            runs[name].append(figures)
                    else:
                        runs[config].append(bench.measure(config, pdir))
            medians = {
                c: {k: statistics.median(r[k] for r in runs[c]) for k in (runs[c][0] if runs[c] else {})}
                for c in RESULTS
            }
            text = report(
                medians, runs, settings, command, started, time.monotonic() - t0, args.quick, load_start
            )
            if profiled:
                text += "\n" + profile_markdown([profiled[c] for c in ("ours", "netns") if c in profiled])
        except BenchError as e:
            print(f"datapath: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("datapath: interrupted, stopping everything", file=sys.stderr)
            return 130
        finally:
            procs.stop_all()
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings.__dict__, "runs": runs}, indent=1))
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
