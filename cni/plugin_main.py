"""``python -m cni.plugin_main``: the CNI plugin executable (see :mod:`cni.plugin`)."""

from __future__ import annotations

import sys

from cni.plugin import main

if __name__ == "__main__":
    sys.exit(main())
