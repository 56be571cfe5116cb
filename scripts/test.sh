#!/usr/bin/env bash
# The test command: setup, build, every XCTest suite, the shell tests on this host, and the
# cgroup v2 tests inside a guest kernel (scripts/vm-run.sh: User-Mode Linux, or QEMU where UML
# cannot boot; CHARGEFS_VM=uml|qemu forces one). Ends with one line "N passed, N failed" counting test
# groups, and exits non-zero when any group failed. A group that cannot run here says why and
# counts as failed; nothing is skipped silently.
# Usage: scripts/test.sh [GROUP...]    groups: setup build swift-test mounts-uring <name of scripts/tests/*.sh> vm-v2
#        scripts/test.sh --no-root      every test that needs no root: build, the unit suites, layers
# Env: SWIFT_SCRATCH=DIR builds into DIR (--scratch-path) instead of .build.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
case "${1:-}" in -h|--help) sed -n '2,8s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
[ -x /opt/swift/usr/bin/swift ] && ! command -v swift >/dev/null && export PATH=$PATH:/opt/swift/usr/bin
scratch=(); [ -z "${SWIFT_SCRATCH:-}" ] || scratch=(--scratch-path "$SWIFT_SCRATCH")

want=("$@")
# --no-root: no mount, no cgroup, no package install; the XCTest run keeps to the unit suites.
unit_only=()
if [ "${1:-}" = --no-root ]; then
  want=(build swift-test layers)
  unit_only=(--filter 'ChargeFSUnitTests|ChargeFSCSITests')
fi
wanted() { [ ${#want[@]} = 0 ] || printf '%s\n' "${want[@]}" | grep -qxF "$1"; }

passed=0 failed=0
results=()
# group NAME TIMEOUT_SECONDS COMMAND...: runs one group with a time limit and records its result.
group() {
  local name=$1 tmo=$2 rc=0 t0=$SECONDS; shift 2
  wanted "$name" || return 0
  echo
  echo "######## $name (limit ${tmo}s): $*"
  timeout --kill-after=30 "$tmo" "$@" </dev/null || rc=$?
  local took=$((SECONDS - t0))
  if [ "$rc" = 0 ]; then
    passed=$((passed + 1)); results+=("PASS  $name (${took}s)")
  else
    failed=$((failed + 1))
    if [ "$rc" = 124 ]; then results+=("FAIL  $name (timed out after ${tmo}s)")
    else results+=("FAIL  $name (exit $rc, ${took}s)"); fi
  fi
  return 0
}
# cannot NAME REASON: a group that cannot run here counts as failed.
cannot() {
  wanted "$1" || return 0
  echo; echo "######## $1: cannot run: $2"
  failed=$((failed + 1)); results+=("FAIL  $1 (cannot run: $2)")
}

group setup 1200 bash scripts/setup.sh --no-build
group build 1800 bash scripts/build.sh
if bin_dir=$(swift build "${scratch[@]}" --show-bin-path 2>/dev/null) && [ -x "$bin_dir/chargefsd" ]; then
  export CHARGEFSD=$bin_dir/chargefsd
fi
# XCTest suites (they mount for real, so they run as root with /dev/fuse).
group swift-test 1800 swift test "${scratch[@]}" "${unit_only[@]}"
# The mount suite again, every mount served over FUSE's io_uring transport (enable_uring set for
# the run and put back).
group mounts-uring 1800 bash scripts/test-mounts-over-uring.sh

# The guest for every cgroup v2 test, chosen once for the run by a probe boot (vm-run.sh).
if [ ${#unit_only[@]} = 0 ]; then
  if [ -z "${CHARGEFS_VM:-}" ] && CHARGEFS_VM=$(bash scripts/vm-run.sh --which 2>/dev/null); then export CHARGEFS_VM; fi
  echo "cgroup v2 tests run in: ${CHARGEFS_VM:-no guest (vm-run.sh --which failed)}"
fi

# Shell tests on this host: each file prints its own "N passed, N failed".
export CFS_TEST_TIMEOUT=${CFS_TEST_TIMEOUT:-180}
for t in scripts/tests/*.sh; do
  name=$(basename "$t" .sh)
  [ "$name" = lib ] && continue
  if [ -z "${CHARGEFSD:-}" ]; then cannot "$name" "chargefsd was not built"; continue; fi
  group "$name" 1800 bash "$t"
done

# The XCTest cgroup suite (ChargeFSCgroupTests) once more, on cgroup v2 inside the guest:
# swift-test above ran it on this host's cgroup v1.
group vm-v2 1800 bash scripts/vm-run.sh --timeout 1500 -- bash "$repo/scripts/tests/v2/run.sh"

echo
echo "######## summary"
printf '%s\n' "${results[@]}"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
