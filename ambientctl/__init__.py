"""ambientctl: the user CLI (HBONE debugging tools, waypoints, config dumps, the local demo)."""
