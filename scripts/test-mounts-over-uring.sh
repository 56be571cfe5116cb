#!/usr/bin/env bash
# The XCTest mount suite (ChargeFSMountTests, the randomized exerciser included) once more, every
# mount served over FUSE's io_uring transport: sets /sys/module/fuse/parameters/enable_uring to Y
# for the run and puts the old value back on any exit. Each mount must report transport=io_uring
# (CHARGEFS_TEST_TRANSPORT), so a run that fell back to /dev/fuse fails instead of passing.
# Where the kernel has no FUSE over io_uring (before 6.14, User-Mode Linux's 6.1) it fails, saying so.
# Usage: scripts/test-mounts-over-uring.sh [extra swift test args, e.g. --filter ExerciserTests]
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
filter=(--filter ChargeFSMountTests)
[ $# -gt 0 ] && filter=("$@")
CHARGEFS_TEST_MOUNT_OPTIONS=io_uring=on CHARGEFS_TEST_TRANSPORT=io_uring swift test "${scratch[@]}" "${filter[@]}"
