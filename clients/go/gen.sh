#!/usr/bin/env bash
# Regenerates the Go stubs in clients/go/netferry/v1 from proto/ with Debian's protoc and
# plugins (apt: protobuf-compiler protoc-gen-go protoc-gen-go-grpc). The output depends only
# on the proto files and the tool versions (recorded in each file's header), so the same
# versions give the same bytes; tests/interop/test_clients.py diffs a fresh run against the
# committed files.
#
#   clients/go/gen.sh            # regenerate in place
#   clients/go/gen.sh OUTDIR     # write OUTDIR/netferry/v1/*.go instead (used by the test)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-clients/go}
for tool in protoc protoc-gen-go protoc-gen-go-grpc; do
  command -v "$tool" >/dev/null || {
    echo "gen.sh: $tool not found (apt-get install protobuf-compiler protoc-gen-go protoc-gen-go-grpc)" >&2
    exit 1
  }
done
# The well-known types (duration, timestamp) come from protobuf-compiler's /usr/include.
WKT=${PROTOC_INCLUDE:-/usr/include}
[ -f "$WKT/google/protobuf/duration.proto" ] || {
  echo "gen.sh: $WKT/google/protobuf/duration.proto missing (apt-get install protobuf-compiler)" >&2
  exit 1
}
mkdir -p "$OUT"
MODULE=netferry.dev/netferry/clients/go
# Relative paths on purpose: the "source:" line of each generated file names the proto as
# given here, so running from the repo root keeps it identical everywhere.
protoc -Iproto -I"$WKT" \
  --go_out="$OUT" --go_opt=module="$MODULE" \
  --go-grpc_out="$OUT" --go-grpc_opt=module="$MODULE" \
  proto/netferry/v1/*.proto
