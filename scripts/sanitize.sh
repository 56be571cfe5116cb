#!/usr/bin/env bash
# Builds chargefs with ThreadSanitizer and AddressSanitizer (separate scratch paths .build-tsan and
# .build-asan) and runs, under each, the in-process unit tests and the stress test
# (scripts/tests/stress.sh mixed; not its kill loop) against the sanitized daemon. Any sanitizer report fails the run:
# XCTest under a sanitizer aborts on the first report (halt_on_error), and stress.sh fails when
# the daemon's log holds one.
# Usage: scripts/sanitize.sh [thread|address ...]     (default: both; root, for the mount)
# Env: SANITIZE_TEST_FILTER  swift test --filter for the unit tests
#                           (default: FileSystemTests|MountOptionsTests|OptionFuzzTests)
#      STRESS_SECONDS       stress duration (default 20)
# Prints one line per step and "N passed, N failed"; exit non-zero when any step failed.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
[ -x /opt/swift/usr/bin/swift ] && ! command -v swift >/dev/null && export PATH=$PATH:/opt/swift/usr/bin
kinds=("$@"); [ ${#kinds[@]} -gt 0 ] || kinds=(thread address)
filter=${SANITIZE_TEST_FILTER:-'FileSystemTests|MountOptionsTests|OptionFuzzTests'}
# Report and stop at the first error; keep the reports in the daemon's log (stderr, -f mode).
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}
export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:detect_leaks=0:abort_on_error=0}
passed=0 failed=0 results=()
step() {  # step NAME COMMAND...
  local name=$1 rc=0 t0=$SECONDS; shift
  echo "######## $name: $*"
  "$@" || rc=$?
  if [ "$rc" = 0 ]; then passed=$((passed + 1)); results+=("PASS  $name ($((SECONDS - t0)) s)")
  else failed=$((failed + 1)); results+=("FAIL  $name (exit $rc, $((SECONDS - t0)) s)"); fi
}
for kind in "${kinds[@]}"; do
  case "$kind" in
    thread) scratch=.build-tsan ;;
    address) scratch=.build-asan ;;
    *) echo "unknown sanitizer '$kind' (thread or address)"; exit 2 ;;
  esac
  step "$kind: build" timeout 3600 swift build --sanitize="$kind" --scratch-path "$scratch" --build-tests
  bin=$(swift build --sanitize="$kind" --scratch-path "$scratch" --show-bin-path)/chargefsd
  step "$kind: unit tests" timeout 1800 swift test --sanitize="$kind" --scratch-path "$scratch" --skip-build --filter "$filter"
  if [ -x "$bin" ]; then
    # the daemon's own threads are what matter here: its log (stderr) is checked by stress.sh
    step "$kind: stress" env CHARGEFSD="$bin" STRESS_SECONDS="${STRESS_SECONDS:-20}" CFS_TEST_TIMEOUT=600 \
      bash scripts/tests/stress.sh mixed
  else
    failed=$((failed + 1)); results+=("FAIL  $kind: stress (no daemon at $bin)")
  fi
done
echo "######## summary"
printf '%s\n' "${results[@]}"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
