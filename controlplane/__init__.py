"""controlplane: the node-bound CA, workload/policy discovery (delta xDS), and the waypoint controller.

Sources: a local YAML file of Kubernetes objects (local mode) or the Kubernetes API.
"""
