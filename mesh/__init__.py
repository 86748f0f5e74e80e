"""Shared core of the mesh: identity, PKI, HBONE, the workload/policy model and protocol stubs.

Nothing in this package opens sockets of its own accord; the daemons (`ztunnel`, `waypoint`,
`cni`, `controlplane`) do the I/O and call in here for decisions and protocol handling.
"""
