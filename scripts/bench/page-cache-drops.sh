#!/usr/bin/env bash
# A release-heavy microbenchmark of Bridge/PageCacheDrops.swift in-process (no mount): THREADS
# threads each asking at OPS last releases whether their inode's page cache must go, one in
# EVERY marked by a writeback first; this tree's PageCacheDrops and REV's (default: the one
# before sharding, db7ada4) built alike (swiftc -O) and run alternately, ROUNDS times each.
# Usage: bash scripts/bench/page-cache-drops.sh [REV] [ROUNDS] [THREADS OPS EVERY]
# Prints one line a run: wall and CPU nanoseconds per release.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
rev=${1:-db7ada4} rounds=${2:-3}; shift $(( $# < 2 ? $# : 2 ))
[ -x /opt/swift/usr/bin/swift ] && ! command -v swiftc >/dev/null && export PATH=$PATH:/opt/swift/usr/bin
work=$(mktemp -d "${TMPDIR:-/tmp}/cfsdrops.XXXXXX"); trap 'rm -rf "$work"' EXIT
# The type alone: its CFuse import (unused by it) dropped, so it builds outside the package.
git -C "$repo" show "$rev:Sources/ChargeFS/Bridge/PageCacheDrops.swift" | sed '/^import CFuse$/d' > "$work/before.swift"
sed '/^import CFuse$/d' "$repo/Sources/ChargeFS/Bridge/PageCacheDrops.swift" > "$work/after.swift"
cp "$repo/scripts/bench/page-cache-drops-main.swift" "$work/main.swift"   # top-level code: main.swift
for v in before after; do
  swiftc -O -module-name drops -o "$work/$v" "$work/main.swift" "$work/$v.swift" "$repo/Sources/ChargeFS/API/InodeNumber.swift" 2>&1 |
    grep -v 'warning' || true
  [ -x "$work/$v" ] || { echo "page-cache-drops.sh: $v did not build" >&2; exit 1; }
done
for ((r = 1; r <= rounds; r++)); do
  echo "before ($rev): $("$work/before" "$@")"
  echo "after (this tree): $("$work/after" "$@")"
done
