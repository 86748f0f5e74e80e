"""The local mesh demo: topology, processes, traffic, capture, report."""
