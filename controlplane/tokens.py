"""Local mode's node credentials: JWTs the control plane signs for each node's ztunnel.

Without Kubernetes there is no API server to vouch for a caller, so the control plane plays that
part itself. Each Node of the local file gets a token shaped like a Kubernetes projected service
account token (audience ``istio-ca``, subject ``system:serviceaccount:istio-system:ztunnel``, the
node's name under the ``kubernetes.io`` claim), so the CA authorizes a local ztunnel with the
same rule it applies to a real one: the node in the verified token is the only node it may
speak for. The signing key never leaves the state directory (mode 0600); tokens are
long-lived because whoever can read a node's token file already is that node.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.files import write_atomic

log = structlog.get_logger(__name__)

TOKEN_AUDIENCE = "istio-ca"
DEFAULT_ISSUER = "ambient-controlplane"
NODE_NAMESPACE = "istio-system"
NODE_SERVICE_ACCOUNT = "ztunnel"
NODE_SUBJECT = f"system:serviceaccount:{NODE_NAMESPACE}:{NODE_SERVICE_ACCOUNT}"
DEFAULT_TOKEN_TTL = dt.timedelta(days=365)
SIGNING_KEY_FILE = "token-signing-key.pem"
TOKENS_DIR = "tokens"
ALGORITHM = "ES256"
# Tolerated clock difference when checking iat/nbf/exp; tokens are issued and checked by one
# process in local mode, so this only matters if the host clock is stepped.
LEEWAY = dt.timedelta(seconds=30)

_SUBJECT = re.compile(r"system:serviceaccount:([^:]+):([^:]+)")


class TokenError(Exception):
    """A token is not acceptable; the message says why, in words a user can act on."""


@dataclass(frozen=True, slots=True)
class NodeClaims:
    """What a verified node token says about its bearer."""

    namespace: str
    service_account: str
    node: str
    issued_at: dt.datetime
    expires_at: dt.datetime


def token_path(state_dir: Path | str, node: str) -> Path:
    """Where the token of ``node`` lives: ``<state_dir>/tokens/<node>.token``."""
    return Path(state_dir) / TOKENS_DIR / f"{node}.token"


def waypoint_token_path(state_dir: Path | str, namespace: str, gateway: str) -> Path:
    """Where the credential of waypoint ``namespace/gateway`` lives (local mode)."""
    return Path(state_dir) / TOKENS_DIR / f"waypoint-{namespace}-{gateway}.token"


class TokenIssuer:
    """Signs and verifies local node tokens with one ES256 key.

    ``clock`` (seconds since the epoch) is injectable so tests can make expired tokens without
    waiting for them to expire.
    """

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        *,
        issuer: str = DEFAULT_ISSUER,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"token signing key must be ECDSA P-256 (ES256), not {key.curve.name}")
        self._key = key
        self._public_key = key.public_key()
        self.issuer = issuer
        self._clock = clock

    @classmethod
    def load_or_create(
        cls, state_dir: Path | str, *, issuer: str = DEFAULT_ISSUER, clock: Callable[[], float] = time.time
    ) -> TokenIssuer:
        """Use the key kept in ``state_dir``, making it on first start.

        Keeping the key across restarts keeps tokens already handed to ztunnels valid.
        """
        path = Path(state_dir) / SIGNING_KEY_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            write_atomic(path, pem)
            log.info("created token signing key", path=str(path))
            return cls(key, issuer=issuer, clock=clock)
        except OSError as e:
            raise TokenError(f"{path}: cannot read the token signing key ({e.strerror})") from None
        try:
            loaded = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise TokenError(f"{path}: not an unencrypted PEM private key ({e})") from None
        if not isinstance(loaded, ec.EllipticCurvePrivateKey) or not isinstance(loaded.curve, ec.SECP256R1):
            raise TokenError(f"{path}: the token signing key must be ECDSA P-256")
        return cls(loaded, issuer=issuer, clock=clock)

    def issue(
        self,
        node: str,
        *,
        ttl: dt.timedelta = DEFAULT_TOKEN_TTL,
        audience: str = TOKEN_AUDIENCE,
        subject: str = NODE_SUBJECT,
    ) -> str:
        """A token for the ztunnel of ``node`` (audience and subject overridable for tests)."""
        m = _SUBJECT.fullmatch(subject)
        if m is None:
            raise ValueError(f"subject {subject!r} is not system:serviceaccount:<namespace>:<name>")
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": [audience],
            "iat": now,
            "nbf": now,
            "exp": now + int(ttl.total_seconds()),
            # The layout Kubernetes uses in projected tokens, so the claim reads the same.
            "kubernetes.io": {
                "namespace": m.group(1),
                "serviceaccount": {"name": m.group(2)},
                "node": {"name": node},
            },
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)

    def verify(self, token: str) -> NodeClaims:
        """The claims of a token this issuer signed and that is still valid, else TokenError."""
        try:
            claims = jwt.decode(
                token,
                self._public_key,
                algorithms=[ALGORITHM],
                audience=TOKEN_AUDIENCE,
                issuer=self.issuer,
                leeway=LEEWAY,
                options={"require": ["iss", "sub", "aud", "iat", "exp"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token has expired") from None
        except jwt.InvalidAudienceError:
            raise TokenError(f"token is not meant for the CA (audience must be {TOKEN_AUDIENCE!r})") from None
        except jwt.InvalidIssuerError:
            raise TokenError(f"token was not issued by {self.issuer!r}") from None
        except jwt.InvalidSignatureError:
            raise TokenError("token signature does not verify (not signed by this control plane)") from None
        except jwt.InvalidAlgorithmError:
            raise TokenError(f"token is not signed with {ALGORITHM}") from None
        except jwt.MissingRequiredClaimError as e:
            raise TokenError(f"token lacks the {e.claim!r} claim") from None
        except jwt.ImmatureSignatureError:
            raise TokenError("token is not valid yet (issued in the future)") from None
        except jwt.DecodeError as e:
            raise TokenError(f"not a well-formed JWT ({e})") from None
        except jwt.InvalidTokenError as e:
            raise TokenError(f"token refused ({e})") from None
        return _node_claims(claims)

    def write_node_tokens(
        self, state_dir: Path | str, nodes: Iterable[str], *, ttl: dt.timedelta = DEFAULT_TOKEN_TTL
    ) -> list[Path]:
        """Write a fresh token for each node, 0600, and return the paths written."""
        paths = []
        for node in nodes:
            path = token_path(state_dir, node)
            write_atomic(path, self.issue(node, ttl=ttl).encode())
            paths.append(path)
        if paths:
            log.info("wrote node tokens", count=len(paths), directory=str(paths[0].parent))
        return paths


    def write_waypoint_tokens(
        self,
        state_dir: Path | str,
        waypoints: Iterable[tuple[str, str, str]],
        *,
        ttl: dt.timedelta = DEFAULT_TOKEN_TTL,
    ) -> list[Path]:
        """A token per waypoint pod ``(namespace, gateway, node)``: subject the waypoint's own
        service account (named after its Gateway), so the CA gives it that identity and no
        other, and discovery sends it the policies bound to it (0600)."""
        paths = []
        for namespace, gateway, node in waypoints:
            path = waypoint_token_path(state_dir, namespace, gateway)
            token = self.issue(node, ttl=ttl, subject=f"system:serviceaccount:{namespace}:{gateway}")
            write_atomic(path, token.encode())
            paths.append(path)
        if paths:
            log.info("wrote waypoint tokens", count=len(paths), directory=str(paths[0].parent))
        return paths


def _node_claims(claims: dict[str, Any]) -> NodeClaims:
    sub = claims["sub"]
    m = _SUBJECT.fullmatch(sub) if isinstance(sub, str) else None
    if m is None:
        raise TokenError(f"token subject {sub!r} is not system:serviceaccount:<namespace>:<name>")
    k8s = claims.get("kubernetes.io")
    node_claim = k8s.get("node") if isinstance(k8s, dict) else None
    node = node_claim.get("name") if isinstance(node_claim, dict) else None
    if not isinstance(node, str) or not node:
        raise TokenError("token names no node (claim kubernetes.io.node.name)")
    iat, exp = claims["iat"], claims["exp"]
    if not isinstance(iat, int | float) or not isinstance(exp, int | float):
        raise TokenError("token iat/exp claims are not numbers")
    return NodeClaims(
        namespace=m.group(1),
        service_account=m.group(2),
        node=node,
        issued_at=dt.datetime.fromtimestamp(iat, dt.UTC),
        expires_at=dt.datetime.fromtimestamp(exp, dt.UTC),
    )
