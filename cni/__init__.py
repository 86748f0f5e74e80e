"""cni: the node agent and the chained CNI plugin.

Will hold: enrollment decisions from namespace/pod labels, nftables redirection inside each pod
netns, and the ZDS server that hands pod netns file descriptors to ztunnel.
"""
