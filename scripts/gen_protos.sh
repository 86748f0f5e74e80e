#!/usr/bin/env bash
# Regenerate the checked-in Python stubs of mesh/proto/*.proto:
#   bash scripts/gen_protos.sh            rewrite mesh/proto/*_pb2*.py{,i} in place
#   bash scripts/gen_protos.sh OUT_DIR    write them under OUT_DIR/mesh/proto/ instead
#                                         (tests/proto compares that with the checked-in copy)
# The .proto files import each other as "mesh/proto/<name>.proto" and protoc runs from the
# repository root, so the generated code already says `from mesh.proto import <name>_pb2`:
# no import rewriting. gRPC stubs are made only for files that declare a service.
# The one post-processing step: protoc's .pyi files and the gRPC modules are not
# `mypy --strict` clean (bare Mapping, classes deriving from the untyped protobuf Message,
# unannotated defs), and mypy reports errors in any module it follows from an import, however
# pyproject excludes it; so each gets a `# mypy: ignore-errors` first line. Importers still see
# the .pyi types.
# PYTHON overrides the interpreter (default: the project's .venv); the output depends on the
# grpcio-tools version installed there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${1:-.}

shopt -s nullglob
protos=(mesh/proto/*.proto)
[ ${#protos[@]} -gt 0 ] || { echo "gen_protos: no .proto files in mesh/proto" >&2; exit 1; }
services=()
for p in "${protos[@]}"; do
    if grep -q '^service ' "$p"; then services+=("$p"); fi
done

mkdir -p "$OUT/mesh/proto"
rm -f "$OUT"/mesh/proto/*_pb2.py "$OUT"/mesh/proto/*_pb2.pyi "$OUT"/mesh/proto/*_pb2_grpc.py
"$PYTHON" -m grpc_tools.protoc -I. --python_out="$OUT" --pyi_out="$OUT" "${protos[@]}"
if [ ${#services[@]} -gt 0 ]; then
    "$PYTHON" -m grpc_tools.protoc -I. --grpc_python_out="$OUT" "${services[@]}"
fi
for f in "$OUT"/mesh/proto/*_pb2.pyi "$OUT"/mesh/proto/*_pb2_grpc.py; do
    { echo '# mypy: ignore-errors'; cat "$f"; } > "$f.tmp" && mv "$f.tmp" "$f"
done
