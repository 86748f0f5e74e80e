"""Workload and policy discovery (delta xDS): wire conversion and the node-side client.

The server lives in :mod:`controlplane.xds`; everything both sides share is here.
"""

from __future__ import annotations
