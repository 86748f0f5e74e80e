"""Test doubles shared by the ztunnel tests: a CA client that signs locally."""

from __future__ import annotations

import asyncio
import datetime as dt

from mesh.caclient import CaError
from mesh.identity import Identity
from mesh.pki import CertificateAuthority, Credential


class FakeCa:
    """``CaClient`` signing with a local CertificateAuthority; records calls, can fail on demand."""

    def __init__(self, ca: CertificateAuthority | None = None, ttl: dt.timedelta | None = None) -> None:
        self.ca = ca or CertificateAuthority.generate()
        self.ttl = ttl
        self.calls: list[Identity] = []
        self.fail_next = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.gate: asyncio.Event | None = None
        self.busy = asyncio.Condition()  # notified whenever in_flight grows

    async def wait_in_flight(self, n: int) -> None:
        async with self.busy:
            await self.busy.wait_for(lambda: self.in_flight >= n)

    async def fetch_certificate(self, identity: Identity) -> Credential:
        self.calls.append(identity)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        async with self.busy:
            self.busy.notify_all()
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail_next > 0:
                self.fail_next -= 1
                raise CaError("CA unavailable (test)")
            return self.ca.issue(identity, self.ttl)
        finally:
            self.in_flight -= 1
