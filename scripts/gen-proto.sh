#!/usr/bin/env bash
# Regenerates Sources/CSIProto/*.swift from Sources/CSIProto/csi.proto. Run by hand after editing
# the .proto and commit the result; builds and CI never run it (the plugins take minutes to build).
# Usage: scripts/gen-proto.sh [PLUGIN_DIR]
#   PLUGIN_DIR holds protoc-gen-swift and protoc-gen-grpc-swift-2 (default: built into
#   /tmp/protoc-plugins from swift-protobuf 1.39.0 and grpc-swift-protobuf 2.4.1, if absent).
# Needs protoc (Debian: protobuf-compiler) for google/protobuf/wrappers.proto too.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
case "${1:-}" in -h|--help) sed -n '2,7s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
[ -x /opt/swift/usr/bin/swift ] && ! command -v swift >/dev/null && export PATH=$PATH:/opt/swift/usr/bin
command -v protoc >/dev/null || { echo "gen-proto: protoc not found (apt-get install protobuf-compiler)" >&2; exit 1; }

plugins=${1:-}
if [ -z "$plugins" ]; then
  work=/tmp/protoc-plugins
  plugins=$work/.build/release
  if [ ! -x "$plugins/protoc-gen-swift" ] || [ ! -x "$plugins/protoc-gen-grpc-swift-2" ]; then
    mkdir -p "$work/Dummy"
    : > "$work/Dummy/d.swift"
    cat > "$work/Package.swift" <<'PKG'
// swift-tools-version: 6.1
import PackageDescription
let package = Package(
    name: "protoc-plugins",
    dependencies: [
        .package(url: "https://github.com/apple/swift-protobuf", exact: "1.39.0"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf", exact: "2.4.1"),
    ],
    targets: [.target(name: "Dummy", path: "Dummy")]
)
PKG
    (cd "$work" && swift build -c release --scratch-path "$work/.build" --product protoc-gen-swift \
      && swift build -c release --scratch-path "$work/.build" --product protoc-gen-grpc-swift-2)
  fi
fi

out=$repo/Sources/CSIProto
protoc --proto_path="$out" \
  --plugin=protoc-gen-swift="$plugins/protoc-gen-swift" \
  --plugin=protoc-gen-grpc-swift="$plugins/protoc-gen-grpc-swift-2" \
  --swift_opt=Visibility=Public \
  --swift_out="$out" \
  --grpc-swift_opt=Visibility=Public,Client=false,Server=true \
  --grpc-swift_out="$out" \
  "$out/csi.proto"
echo "gen-proto: wrote $(cd "$out" && ls ./*.swift | tr '\n' ' ')"
