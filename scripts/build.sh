#!/usr/bin/env bash
# Builds what ships, each product by name: chargefsd, chargefs-charge-helper and chargefs-keeper
# (installed beside it; the daemon starts them from there) and chargefs-csi. A plain `swift build` also builds
# swift-protobuf's protoc (abseil and protobuf), which nothing here runs.
# Usage: scripts/build.sh [--daemon] [SWIFT BUILD OPTION...]     e.g. scripts/build.sh -c release
#   --daemon  only chargefsd and its helper (what the demo, the mounts and the benchmark need)
# Env: SWIFT_SCRATCH=DIR builds into DIR instead of .build (--scratch-path).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
products=(chargefsd chargefs-charge-helper chargefs-keeper chargefs-csi)
args=()
for a in "$@"; do
  case "$a" in
    --daemon) products=(chargefsd chargefs-charge-helper chargefs-keeper) ;;
    -h|--help) sed -n '2,7s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) args+=("$a") ;;
  esac
done
[ -x /opt/swift/usr/bin/swift ] && ! command -v swift >/dev/null && export PATH=$PATH:/opt/swift/usr/bin
command -v swift >/dev/null || { echo "build.sh: swift not found (expected /opt/swift)" >&2; exit 1; }
[ -z "${SWIFT_SCRATCH:-}" ] || args+=(--scratch-path "$SWIFT_SCRATCH")
for p in "${products[@]}"; do
  echo "build.sh: swift build --product $p ${args[*]}"
  swift build --product "$p" "${args[@]}"
done
