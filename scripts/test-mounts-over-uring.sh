#!/usr/bin/env bash
# The XCTest mount suite (ChargeFSMountTests, the randomized exerciser included), then the charge
# and fault shell tests (scripts/tests/charge.sh, faults.sh), once more with every mount served
# over FUSE's io_uring transport: sets /sys/module/fuse/parameters/enable_uring to Y for the run
# and puts the old value back on any exit. Each XCTest mount must report transport=io_uring
# (CHARGEFS_TEST_TRANSPORT), and the shell tests mount with io_uring=on, so a run that fell back
# to /dev/fuse fails instead of passing. Where the kernel has no FUSE over io_uring (before 6.14,
# User-Mode Linux's 6.1) it fails, saying so.
# Usage: scripts/test-mounts-over-uring.sh [swift test args, e.g. --filter ExerciserTests: then
#        only that, no shell tests]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
[ -x /opt/swift/usr/bin/swift ] && ! command -v swift >/dev/null && export PATH=$PATH:/opt/swift/usr/bin
knob=/sys/module/fuse/parameters/enable_uring
if [ ! -e "$knob" ]; then
  echo "cannot run: $knob is missing (this kernel, $(uname -r), has no FUSE over io_uring: Linux 6.14+ with CONFIG_FUSE_IO_URING)" >&2
  exit 1
fi
old=$(cat "$knob")
trap 'echo "$old" > "$knob"' EXIT
echo Y > "$knob"
scratch=(); [ -z "${SWIFT_SCRATCH:-}" ] || scratch=(--scratch-path "$SWIFT_SCRATCH")
if [ $# -gt 0 ]; then
  CHARGEFS_TEST_MOUNT_OPTIONS=io_uring=on CHARGEFS_TEST_TRANSPORT=io_uring swift test "${scratch[@]}" "$@"
  exit
fi
rc=0
CHARGEFS_TEST_MOUNT_OPTIONS=io_uring=on CHARGEFS_TEST_TRANSPORT=io_uring swift test "${scratch[@]}" --filter ChargeFSMountTests || rc=1
if [ -z "${CHARGEFSD:-}" ]; then
  CHARGEFSD=$(swift build "${scratch[@]}" --show-bin-path)/chargefsd; export CHARGEFSD
fi
for t in charge faults; do
  echo "######## $t over io_uring"
  CFS_MOUNT_OPTS=io_uring=on bash "scripts/tests/$t.sh" || rc=1
done
exit "$rc"
