"""Sources: Kubernetes objects -> the mesh model, from a local YAML file or the Kubernetes API.

One package that both ``controlplane`` and ``cni`` import (they never import each other), so a
manifest means the same thing to the control plane and to the node agent:

* :mod:`sources.convert` — one Kubernetes object (a plain dict) -> one model object, validated
  at the edge (:class:`~sources.convert.ConfigError` names the field); :func:`~sources.convert.pod_uid`.
* :mod:`sources.local` — local mode: a multi-document YAML file, polled (:class:`~sources.local.LocalSource`).
* :mod:`sources.kubernetes` — Kubernetes mode: list/watch of the API server
  (:class:`~sources.kubernetes.KubernetesSource`; imports the ``kubernetes`` client, so import it
  only when running against a cluster).

Both sources satisfy :class:`WorkloadSource`, the seam the processes type the source they run
with; mypy checks each class against it where the class is defined.
"""

from __future__ import annotations

from typing import Protocol

from mesh.model import Store

__all__ = ["WorkloadSource"]


class WorkloadSource(Protocol):
    """Keeps a :class:`~mesh.model.Store` equal to an outside truth: a file, or the API server.

    The life of one: construct it around the store, :meth:`start` it on the event loop, await
    :meth:`wait_synced` before serving anything that must see the whole picture (before the
    first full list, a node would look as if it ran no pods), and :meth:`astop` it at shutdown.
    The source is the only writer of its store; everyone else reads snapshots or subscribes.
    """

    @property
    def store(self) -> Store:
        """The store this source writes."""
        ...

    def start(self) -> None:
        """Begin following changes in the background, owned by the source; returns at once.

        Call from the event loop's thread. A source starts once: a second call raises.
        """
        ...

    async def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until the store holds a complete picture of the source, at least once.

        False when ``timeout`` (seconds, None for no limit) passes first, or when the source
        was stopped before it got there.
        """
        ...

    async def astop(self) -> None:
        """Stop following changes and wait for the background work to end; idempotent.

        The store keeps what it holds.
        """
        ...
