"""ztunnel: the per-node daemon giving every enrolled pod L4 mTLS over HBONE.

In-pod listeners (outbound 15001, inbound plaintext 15006, inbound HBONE 15008) opened inside each
pod's netns (``inpod``), pure routing decisions (``routing``), the proxies (``outbound``,
``inbound``, ``inbound_passthrough``), the certificate manager (``certs``), telemetry
(``metrics``) and the admin/metrics/readiness servers (``admin``). See docs/ztunnel.md.
"""
