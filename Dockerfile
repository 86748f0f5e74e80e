# syntax=docker/dockerfile:1.7
# One image for every component of the ambient mesh. The charts pick the entrypoint:
#   ambient-controlplane   controlplane Deployment   (non-root, uid 1337: the image default)
#   ztunnel                ztunnel DaemonSet         (uid 0 with NET_ADMIN, SYS_ADMIN, NET_RAW only)
#   ambient-cni            cni DaemonSet             (uid 0 with NET_ADMIN, SYS_ADMIN only)
#   ambient-cni-plugin     the Python CNI plugin (local mode); on nodes the agent installs the
#                          static Go build of it instead: /usr/local/lib/ambient-mesh/ambient-cni-plugin
#   waypoint               waypoint Deployments made by the waypoint controller (non-root)
#   ambientctl             the CLI (kubectl run / debugging)
# These are the console scripts of pyproject.toml, the same ones the tests run.
#
# Build:  docker build -t <hub>/ambient-mesh:<tag> .
# then:   helm install ... --set global.hub=<hub>,global.tag=<tag>
# Not built in CI (no container runtime there): see docs/install.md.
#
# Everything is pinned: the base image by version (add the digest when publishing:
# `docker buildx imagetools inspect python:3.11.11-slim-bookworm`), Debian packages by version,
# Python packages by version through the constraints below: the whole runtime dependency closure
# of ambient-mesh (test extras excluded), as resolved in the development venv.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG GO_IMAGE=golang:1.22.12-bookworm

# The CNI plugin the kubelet's runtime runs on the node, outside any container: a static binary
# (CGO_ENABLED=0) with no module dependencies (cni/plugin-go, docs/cni.md). The cni agent copies
# it into the host's CNI bin dir (`--plugin-binary`, set by the cni chart).
FROM ${GO_IMAGE} AS plugin
WORKDIR /src
COPY cni/plugin-go/ ./
RUN CGO_ENABLED=0 GOTOOLCHAIN=local GOPROXY=off \
      go build -trimpath -buildvcs=false -ldflags="-s -w" -o /out/ambient-cni-plugin . \
 && { ldd /out/ambient-cni-plugin 2>&1 | grep -q "not a dynamic executable" \
      || { echo "ambient-cni-plugin is not static" >&2; exit 1; }; } \
 && CNI_COMMAND=VERSION /out/ambient-cni-plugin </dev/null

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY <<EOF /constraints.txt
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiohttp-retry==2.9.1
aiosignal==1.4.0
annotated-types==0.8.0
attrs==26.1.0
certifi==2026.10.19.post1
cffi==2.1.1
charset-normalizer==3.5.3
cryptography==50.0.2
durationpy==0.11
frozenlist==1.8.0
grpcio==1.85.3
h2==4.4.1
hpack==4.2.0
hyperframe==6.1.0
idna==3.20
kubernetes==37.0.2
multidict==7.2.1
oauthlib==4.0.1
prometheus-client==0.26.0
propcache==0.5.4
protobuf==7.36.2
pycparser==3.12
pydantic==2.14.4
pydantic-core==2.50.5
pyjwt==2.15.1
pyroute2==0.9.7
python-dateutil==4.0.0
pyyaml==6.0.4
requests==2.34.2
requests-oauthlib==2.0.0
structlog==26.1.0
typing-extensions==4.16.0
typing-inspection==0.4.5
tzdata==2026.6
urllib3==2.8.0
uvloop==0.23.0
websocket-client==1.9.2
yarl==1.25.1
setuptools==84.2.1
wheel==0.45.1
EOF
COPY pyproject.toml README.md ./
COPY mesh ./mesh
COPY sources ./sources
COPY ztunnel ./ztunnel
COPY cni ./cni
COPY controlplane ./controlplane
COPY waypoint ./waypoint
COPY ambientctl ./ambientctl
# A venv at a fixed path, copied whole into the runtime stage: no build tools there.
RUN python -m venv /opt/ambient-mesh \
 && /opt/ambient-mesh/bin/pip install --constraint /constraints.txt setuptools wheel \
 && /opt/ambient-mesh/bin/pip install --constraint /constraints.txt --no-build-isolation . \
 && /opt/ambient-mesh/bin/pip check

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="ambient-mesh" \
      org.opencontainers.image.description="Istio-ambient-compatible service mesh in Python" \
      org.opencontainers.image.licenses="Apache-2.0"
# nftables, iproute2, util-linux (nsenter, unshare): the cni agent's redirection rules.
# libmodsecurity3, modsecurity-crs: the waypoint's WAF (OWASP Core Rule Set).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      nftables=1.0.6-2+deb12u2 \
      iproute2=6.1.0-3 \
      util-linux=2.38.1-5+deb12u3 \
      ca-certificates=20250419~deb12u2 \
      libmodsecurity3=3.0.9-1+deb12u2 \
      modsecurity-crs=3.3.4-1+deb12u3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1337 mesh \
 && useradd --uid 1337 --gid 1337 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mesh
COPY --from=build /opt/ambient-mesh /opt/ambient-mesh
COPY --from=plugin /out/ambient-cni-plugin /usr/local/lib/ambient-mesh/ambient-cni-plugin
ENV PATH=/opt/ambient-mesh/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Every entrypoint resolves and imports, or the build fails.
RUN for c in ambient-controlplane ztunnel ambient-cni ambient-cni-plugin waypoint ambientctl; do \
      command -v "$c" >/dev/null || { echo "missing entrypoint $c" >&2; exit 1; }; \
    done \
 && python -c "import controlplane.main, ztunnel.main, cni.main, cni.plugin_main, waypoint.main, ambientctl.main" \
 && CNI_COMMAND=VERSION /usr/local/lib/ambient-mesh/ambient-cni-plugin </dev/null
# Non-root by default (controlplane, waypoint); the ztunnel and cni charts set runAsUser 0
# because the capabilities they need are root's.
USER 1337:1337
# No ENTRYPOINT: each chart sets `command` to its console script.
CMD ["ambientctl", "--help"]
