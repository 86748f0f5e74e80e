"""WAF engine micro benchmark: cost of one request through libmodsecurity + the OWASP CRS.

    .venv/bin/python benchmarks/waf.py [--quick] [--iterations N] [--seconds S] [--profile]

For each request shape (clean GET, SQLi GET, clean 1 KiB JSON POST, clean 16 KiB form POST,
16 KiB gRPC POST whose body is not inspected) and configuration (Enforce at paranoia level 1 and
2, DetectOnly, Disabled):

- single thread: wall and CPU µs per ``WafEngine.inspect_sync`` call (median of 3 runs of up to
  ``--iterations`` requests or ``--budget`` seconds);
- pool: requests/s through ``await WafEngine.inspect`` on uvloop (the daemons' loop) with 64
  requests in flight, with one worker thread and with one per core, and the cores the process
  kept busy, to show the GIL is released during the C calls.

``--profile`` adds cProfile's top functions for the clean and the attack GET: in cffi's ABI mode
the C calls are not separate profiler entries, so each ``capi.Transaction`` method's own time is
the C time of that ModSecurity phase. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import quote

import uvloop

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
if str(ROOT) not in sys.path:  # run as a script: import the tree this file is in
    sys.path.insert(0, str(ROOT))

from waypoint.waf import WafConfig, WafEngine, WafMode, WafRequest  # noqa: E402
from waypoint.waf.engine import default_workers  # noqa: E402

HEADERS = (
    ("host", "reviews.default.svc.cluster.local"),
    ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0"),
    ("accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    ("accept-language", "en-US,en;q=0.5"),
    ("accept-encoding", "gzip, deflate"),
    ("cookie", "session=5f0bc39a1e2d4c8b9f7e6d5c4b3a2910; theme=dark"),
    ("x-request-id", "6a1b2c3d-4e5f-6789-abcd-ef0123456789"),
)


def _post(uri: str, content_type: str, body: bytes, http_version: str = "1.1") -> WafRequest:
    headers = (*HEADERS, ("content-type", content_type), ("content-length", str(len(body))))
    return WafRequest("POST", uri, headers, body=body, http_version=http_version)


JSON_1K = json.dumps({"items": [{"id": i, "name": f"item-{i}", "qty": i % 7} for i in range(24)]}).encode()[
    :1024
]
FORM_16K = "&".join(f"field{i}=value-{i}-{'x' * 40}" for i in range(300)).encode()[: 16 * 1024]

REQUESTS: dict[str, WafRequest] = {
    "clean GET": WafRequest("GET", "/products/42/reviews?page=2&sort=date&lang=en", HEADERS),
    "SQLi GET (blocked)": WafRequest("GET", "/products?id=" + quote("1' OR '1'='1"), HEADERS),
    "clean POST 1 KiB JSON": _post("/api/cart", "application/json", JSON_1K.ljust(1024)),
    "clean POST 16 KiB form": _post("/api/form", "application/x-www-form-urlencoded", FORM_16K),
    "gRPC POST 16 KiB (body not inspected)": _post(
        "/shop.Cart/Add", "application/grpc", b"\x00\x00\x00\x40\x00" + os.urandom(16 * 1024 - 5), "2"
    ),
}

CONFIGS: dict[str, WafConfig] = {
    "Enforce PL1": WafConfig(request_body_limit=64 * 1024),
    "Enforce PL2": WafConfig(paranoia_level=2, request_body_limit=64 * 1024),
    "DetectOnly PL1": WafConfig(mode=WafMode.DETECT_ONLY, request_body_limit=64 * 1024),
    "Disabled": WafConfig(mode=WafMode.DISABLED),
}


def single_thread(
    engine: WafEngine, request: WafRequest, iterations: int, budget: float
) -> tuple[float, float]:
    """Median wall and CPU µs per inspection over 3 runs of ``iterations`` (or ``budget`` seconds)."""
    engine.inspect_sync(request)  # warm up
    walls, cpus = [], []
    for _ in range(3):
        n = 0
        w0, c0 = time.perf_counter(), time.process_time()
        while n < iterations and (n < 10 or time.perf_counter() - w0 < budget):
            engine.inspect_sync(request)
            n += 1
        walls.append((time.perf_counter() - w0) / n * 1e6)
        cpus.append((time.process_time() - c0) / n * 1e6)
    return statistics.median(walls), statistics.median(cpus)


async def _pool_rate(engine: WafEngine, request: WafRequest, seconds: float, in_flight: int) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await engine.inspect(request)
            done += 1

    start = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(in_flight):
            tg.create_task(client())
    return done / (time.perf_counter() - start)


def pool_rate(config: WafConfig, request: WafRequest, workers: int, seconds: float) -> tuple[float, float]:
    """Requests/s and the cores the process kept busy (CPU seconds per wall second)."""
    with WafEngine(max_workers=workers) as engine:
        engine.load(config)
        w0, c0 = time.perf_counter(), time.process_time()
        rate = uvloop.run(_pool_rate(engine, request, seconds, in_flight=64))
        return rate, (time.process_time() - c0) / (time.perf_counter() - w0)


def profile(engine: WafEngine, request: WafRequest, iterations: int, top: int = 12) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iterations):
        engine.inspect_sync(request)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=500, help="inspections per timed run")
    parser.add_argument("--budget", type=float, default=1.0, help="at most this many seconds per timed run")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per pool measurement")
    parser.add_argument("--quick", action="store_true", help="tiny counts: keeps the harness working")
    parser.add_argument("--profile", action="store_true", help="append cProfile top functions")
    args = parser.parse_args(argv)
    iterations, seconds, budget = (
        (20, 0.3, 0.1) if args.quick else (args.iterations, args.seconds, args.budget)
    )
    cores = default_workers()

    print(
        f"# WAF engine benchmark ({platform.python_implementation()} {platform.python_version()}, {cores} cores)"
    )
    print()
    engines: dict[str, WafEngine] = {}
    for name, config in CONFIGS.items():
        engine = WafEngine(max_workers=1)
        t0 = time.perf_counter()
        rules = engine.load(config)
        engines[name] = engine
        print(f"- {name}: {rules} rules loaded in {(time.perf_counter() - t0) * 1e3:.0f} ms")
    check = engines["Enforce PL1"]
    verdicts = ", ".join(f"{name}: {check.inspect_sync(r).action}" for name, r in REQUESTS.items())
    print(f"- Enforce PL1 verdicts: {verdicts}")
    print()
    print("## Single thread (`inspect_sync`), µs per request: wall / CPU")
    print()
    print("| request | " + " | ".join(CONFIGS) + " |")
    print("|---|" + "---:|" * len(CONFIGS))
    for rname, request in REQUESTS.items():
        cells = []
        for cname in CONFIGS:
            wall, cpu = single_thread(engines[cname], request, iterations, budget)
            cells.append(f"{wall:,.0f} / {cpu:,.0f}")
        print(f"| {rname} | " + " | ".join(cells) + " |")
    print()
    print(f"## Pool (`await inspect`, 64 in flight, Enforce PL1): 1 worker / {cores} workers")
    print()
    print("| request | requests/s | speed-up | cores busy | CPU µs per request |")
    print("|---|---:|---:|---:|---:|")
    for rname in ("clean GET", "SQLi GET (blocked)", "clean POST 16 KiB form"):
        request = REQUESTS[rname]
        one, busy_one = pool_rate(CONFIGS["Enforce PL1"], request, 1, seconds)
        many, busy_many = pool_rate(CONFIGS["Enforce PL1"], request, cores, seconds)
        print(
            f"| {rname} | {one:,.0f} / {many:,.0f} | {many / one:.2f}x | {busy_one:.2f} / {busy_many:.2f} "
            f"| {busy_one / one * 1e6:,.0f} / {busy_many / many * 1e6:,.0f} |"
        )
    if args.profile:
        for rname in ("clean GET", "SQLi GET (blocked)"):
            print()
            print(f"## cProfile, Enforce PL1, {rname}, {iterations} requests (sorted by own time)")
            print()
            print("```")
            print(profile(engines["Enforce PL1"], REQUESTS[rname], iterations).strip())
            print("```")
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()
