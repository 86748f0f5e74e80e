"""controlplane: the node-bound CA, workload/policy discovery (delta xDS), and the waypoint controller.

Its source of truth (a local YAML file, or the Kubernetes API) comes from the `sources` package.
"""
