"""ztunnel: the per-node daemon giving every enrolled pod L4 mTLS over HBONE.

Will hold: in-pod listeners (outbound 15001, inbound plaintext 15006, inbound HBONE 15008), the
connection pool, the certificate manager, the ZDS client, and the admin/metrics/readiness servers.
"""
