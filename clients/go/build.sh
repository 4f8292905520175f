#!/usr/bin/env bash
# Builds clients/go/example into OUTPUT with Debian's Go toolchain and Go packages only
# (apt: golang-go golang-google-grpc-dev golang-google-protobuf-dev): no module downloads.
#
#   clients/go/build.sh OUTPUT
#
# It builds in GOPATH mode: a private GOPATH holds a symlink
# src/netferry.dev/netferry/clients/go -> this directory, and /usr/share/gocode (where Debian
# installs google.golang.org/grpc, google.golang.org/protobuf, golang.org/x/net, ...) comes
# second. The binary is reproducible: -trimpath, no VCS stamp, empty build ID, no cgo, so the
# same sources and toolchain give the same bytes wherever the repository is checked out.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTPUT" >&2; exit 2; }
OUTPUT=$1
HERE=$(cd "$(dirname "$0")" && pwd -P)
GOCODE=${DEBIAN_GOCODE:-/usr/share/gocode}

command -v go >/dev/null || {
  echo "build.sh: go not found (apt-get install golang-go)" >&2; exit 1; }
for pkg in google.golang.org/grpc google.golang.org/protobuf golang.org/x/net; do
  [ -d "$GOCODE/src/$pkg" ] || {
    echo "build.sh: $GOCODE/src/$pkg missing" \
      "(apt-get install golang-google-grpc-dev golang-google-protobuf-dev)" >&2
    exit 1
  }
done

# gRPC 1.33 marshals through github.com/golang/protobuf; only its 1.4+ API (Debian's
# golang-github-golang-protobuf-1-5-dev) handles the APIv2 messages protoc-gen-go 1.28 makes.
# With 1.3 (golang-github-golang-protobuf-1-3-dev) the build succeeds but every call panics
# ("protobuf tag not enough fields"), so refuse it here.
grep -qs 'func MessageV2' "$GOCODE"/src/github.com/golang/protobuf/proto/*.go || {
  echo "build.sh: $GOCODE/src/github.com/golang/protobuf is older than 1.4 and cannot" \
    "encode these stubs (apt-get install golang-github-golang-protobuf-1-5-dev)" >&2
  exit 1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/gopath/src/netferry.dev/netferry/clients"
ln -s "$HERE" "$work/gopath/src/netferry.dev/netferry/clients/go"

cache=$(env -u GOFLAGS GO111MODULE=off go env GOCACHE 2>/dev/null || true)
if [ -z "$cache" ] || [ "$cache" = off ]; then
  cache="$work/cache"
fi

case "$OUTPUT" in /*) ;; *) OUTPUT="$PWD/$OUTPUT" ;; esac
mkdir -p "$(dirname "$OUTPUT")"
cd "$work/gopath/src/netferry.dev/netferry/clients/go"
env -u GOFLAGS \
  GO111MODULE=off GOPATH="$work/gopath:$GOCODE" GOPROXY=off GOCACHE="$cache" CGO_ENABLED=0 \
  go build -trimpath -buildvcs=false -ldflags=-buildid= -o "$OUTPUT" \
  netferry.dev/netferry/clients/go/example
echo "built $OUTPUT"
