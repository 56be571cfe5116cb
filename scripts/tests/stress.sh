#!/usr/bin/env bash
# Load test: scripts/tests/stress.py against a real chargefsd mount charged to a test memcg.
#   mixed     STRESS_WORKERS (4) processes of mixed data+metadata operations on one shared tree
#             for STRESS_SECONDS (20); then every file's content and metadata is checked against
#             the workers' models, df against st_blocks; the daemon must be alive, the charge back
#             at baseline once the tree is removed, and the unmount clean
# Usage: scripts/tests/stress.sh [mixed] | --list     Env: CHARGEFSD, STRESS_WORKERS, STRESS_SECONDS,
#        STRESS_SEED (1), CFS_TEST_TIMEOUT (120), STRESS_MEMCG=0 to mount without memcg=
set -euo pipefail
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=scripts/tests/lib.sh
source "$(dirname "$SELF")/lib.sh"
TESTS=(mixed)

t_mixed() {
  local SCR; SCR=$(cfs_tempdir cfsstress); CFS_DIRS+=("$SCR")  # (cfs_tempdir runs in a subshell: record it here)
  CFS_LOGDIR=$SCR
  local MNT=$SCR/mnt opts="size=1g" T=""
  if [ "${STRESS_MEMCG:-1}" = 1 ] && cg_available "$(cg_version)"; then
    T=$(cg_parent)/cfsstress-$$-target
    cg_create "$T" $((768 * MiB))
    opts="$opts,memcg=$T"
  fi
  local base=0; [ -z "$T" ] || base=$(cg_usage "$T")
  cfs_mount "$MNT" "$opts"
  local dpid=$CFS_PID
  local rss0; rss0=$(awk '/^VmRSS/ {print $2}' "/proc/$dpid/status")
  check "stress: no errors, tree consistent with the model" \
    "$CFS_PYTHON" "$(dirname "$SELF")/stress.py" "$MNT" --workers "${STRESS_WORKERS:-4}" \
      --seconds "${STRESS_SECONDS:-20}" --seed "${STRESS_SEED:-1}"
  log "  daemon RSS: $rss0 KiB before, $(awk '/^VmRSS/ {print $2}' "/proc/$dpid/status") KiB after"
  check "daemon alive" kill -0 "$dpid"
  check "df used 0 after the tree was removed" [ "$(df -B1 --output=used "$MNT" | tail -1 | tr -d ' ')" = 0 ]
  if [ -n "$T" ]; then
    check "target charge back at its baseline (±1 MiB)" \
      bash -c "for i in \$(seq 50); do [ \$(cat '$T/memory.usage_in_bytes' 2>/dev/null || cat '$T/memory.current') -le $((base + MiB)) ] && exit 0; sleep 0.1; done; exit 1"
  fi
  check "clean unmount" cfs_umount "$MNT" "$dpid"
  # Under TSan, libfuse's worker threads, cancelled (pthread_cancel) at session exit while blocked
  # in an intercepted read of /dev/fuse, print "thread Tn finished with ignores enabled": a TSan
  # limitation with cancellation in an uninstrumented library, not a race; noted, not failed.
  local ign; ign=$(grep -c "finished with ignores enabled" "$CFS_LOG" || true)
  [ "$ign" = 0 ] || log "  note: $ign libfuse worker thread(s) ended by cancellation under TSan (\"finished with ignores enabled\")"
  if grep -qE "WARNING: ThreadSanitizer|ERROR: AddressSanitizer|ERROR: LeakSanitizer|Fatal error" "$CFS_LOG"; then
    sed 's/^/  | /' "$CFS_LOG" | head -80 >&2
    check "daemon log free of sanitizer reports and fatal errors" false
  else
    check "daemon log free of sanitizer reports and fatal errors" true
  fi
}

test_main "stress test" 120 "$@"
