#!/usr/bin/env bash
# The cgroup v2 suite, run inside a guest kernel by scripts/test.sh (group vm-v2):
#   scripts/vm-run.sh -- bash scripts/tests/v2/run.sh
# Runs the XCTest CgroupChargerTests (real charging, limits, ENOSPC without OOM kill, helper
# respawn, target validation, stale cleanup) against this kernel's cgroup v2 memory controller.
# Uses the test bundle already built on the host: $SWIFT_SCRATCH (default .build)/debug.
# Prints "N passed, N failed" and exits non-zero on any failure.
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
cd "$repo"
if ! grep -qw memory /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
  echo "cannot run: no cgroup v2 memory controller on /sys/fs/cgroup (run me through scripts/vm-run.sh)"
  echo "0 passed, 1 failed"; exit 1
fi
bundle=${SWIFT_SCRATCH:-.build}/debug/chargefsPackageTests.xctest
if [ ! -x "$bundle" ]; then
  echo "cannot run: $bundle not built (swift build --build-tests${SWIFT_SCRATCH:+ --scratch-path $SWIFT_SCRATCH})"
  echo "0 passed, 1 failed"; exit 1
fi
out=$(mktemp)
"$bundle" ChargeFSCgroupTests.CgroupChargerTests 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
pass=$(grep -c "^Test Case .* passed" "$out")
fail=$(grep -c "^Test Case .* failed" "$out")
rm -f "$out"
[ "$rc" = 0 ] || [ "$fail" != 0 ] || fail=1   # a crash counts
[ "$pass" != 0 ] || { echo "no test ran: the filter names no test"; fail=$((fail + 1)); }
echo "$pass passed, $fail failed"
[ "$rc" = 0 ] && [ "$fail" = 0 ]
