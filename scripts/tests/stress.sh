#!/usr/bin/env bash
# Load test: scripts/tests/stress.py against a real chargefsd mount charged to a test memcg.
#   mixed     STRESS_WORKERS (4) processes of mixed data+metadata operations on one shared tree
#             for STRESS_SECONDS (20); then every file's content and metadata is checked against
#             the workers' models, df against st_blocks; the daemon must be alive, the charge back
#             at baseline once the tree is removed, and the unmount clean
#   kill_loop the same exerciser on a -o takeover mount while the serving process (the status's
#             pid=) is killed with SIGKILL every 1-2 s, STRESS_KILLS (50) times (issue 21): every
#             kill answered by a new server, no error seen by any worker, the model check passes,
#             keeper and server alive, the charge back at baseline after rm, a clean unmount, no
#             process or leaf left; prints each kill's time to the first answer (a LOOKUP), and
#             their min, median and max with the requests resent
# Usage: scripts/tests/stress.sh [mixed|kill_loop] | --list     Env: CHARGEFSD, STRESS_WORKERS,
#        STRESS_SECONDS, STRESS_SEED (1), STRESS_KILLS (50), CFS_TEST_TIMEOUT (120; kill_loop at
#        least 300), STRESS_MEMCG=0 to mount without memcg=
set -euo pipefail
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=scripts/tests/lib.sh
source "$(dirname "$SELF")/lib.sh"
# kill_loop is in the suite since its two intermittent errors were fixed (docs/takeover.md, "Kill
# loops"): a read's EIO (a copy cut by the kill: reply buffers and arena pages mapped up front)
# and a `link: ENOENT` (the kernel's own link count decrement at a resent unlink's end: the
# successor bumps the attribute version of such files before it serves).
TESTS=(mixed kill_loop)

# Once the tree is gone the target holds at most the page store's charged reserve
# (PageStore.reserveLimit, 64 pages: one charge round serves 64 small writes). Releases arrive
# after close() returns: give the last ones 5 s.
RESERVE_BYTES=$((64 * 4096))
shmem_drains_to_reserve() {
  local i; for i in $(seq 50); do [ "$(cg_shmem "$1")" -le "$RESERVE_BYTES" ] && return 0; sleep 0.1; done; return 1
}

# with_target PATH: unless STRESS_MEMCG=0 or no memory cgroup is usable, makes the target T=PATH
# (768 MiB) and adds memcg=T to the caller's opts.
with_target() {
  if [ "${STRESS_MEMCG:-1}" = 1 ] && cg_available "$(cg_version)"; then
    T=$1
    cg_create "$T" $((768 * MiB))
    opts="$opts,memcg=$T"
  fi
}

t_mixed() {
  local SCR; SCR=$(cfs_tempdir cfsstress); CFS_DIRS+=("$SCR")  # (cfs_tempdir runs in a subshell: record it here)
  CFS_LOGDIR=$SCR
  local MNT=$SCR/mnt opts="size=1g" T=""
  with_target "$(cg_parent)/cfsstress-$$-target"
  local base=0; [ -z "$T" ] || base=$(cg_usage "$T")
  cfs_mount "$MNT" "$opts"
  local dpid=$CFS_PID
  # While mounted the target also holds the charge helper's own kernel memory, the kernel's
  # per-CPU charge stock (up to 64 pages per CPU, counted in usage, never a page of a file) and
  # the page store's reserve: usage is compared with the mounted baseline (±1 MiB), shmem with
  # the reserve, and after the unmount usage with the pre-mount baseline.
  local mounted=0; [ -z "$T" ] || mounted=$(cg_usage "$T")
  local rss0; rss0=$(awk '/^VmRSS/ {print $2}' "/proc/$dpid/status")
  check "stress: no errors, tree consistent with the model" \
    "$CFS_PYTHON" "$(dirname "$SELF")/stress.py" "$MNT" --workers "${STRESS_WORKERS:-4}" \
      --seconds "${STRESS_SECONDS:-20}" --seed "${STRESS_SEED:-1}"
  log "  daemon RSS: $rss0 KiB before, $(awk '/^VmRSS/ {print $2}' "/proc/$dpid/status") KiB after"
  check "daemon alive" kill -0 "$dpid"
  check "df used 0 after the tree was removed" [ "$(df -B1 --output=used "$MNT" | tail -1 | tr -d ' ')" = 0 ]
  if [ -n "$T" ]; then
    check "target's shmem down to the page store's reserve (≤ 256 KiB) once the tree is removed" \
      shmem_drains_to_reserve "$T"
    log "  target shmem: $(cg_shmem "$T") bytes; $(getfattr --only-values -n user.chargefs.status "$MNT" 2>/dev/null | tr '\n' ' ')"
    local now; now=$(cg_usage "$T")
    log "  target usage: $base before the mount, $mounted mounted, $now after the tree was removed"
    check "target charge back at its mounted baseline (±1 MiB)" [ "$now" -le $((mounted + MiB)) ]
  fi
  check "clean unmount" cfs_umount "$MNT" "$dpid"
  if [ -n "$T" ]; then
    local after; after=$(cg_usage "$T")
    log "  target usage after the unmount: $after"
    check "target charge back at its pre-mount baseline (±1 MiB) after the unmount" [ "$after" -le $((base + MiB)) ]
  fi
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

# kill_loop: 50 kills 1-2 s apart plus each takeover (0.3-0.9 s in a debug build) take 2-3 min.
tmo_kill_loop() { echo $(($1 > 300 ? $1 : 300)); }

# killer MNT KILLS OUT: SIGKILLs the serving process KILLS times, 1-2 s apart (random, seeded),
# each time: the pid from the root's user.chargefs.status, dead (its pidfd readable), then a
# LOOKUP of a new name must answer ENOENT; writes one line per kill to OUT: "k ms old new
# takeovers resent". Exits 1 at the first kill not answered within 30 s or not taken over.
killer() {
  "$CFS_PYTHON" - "$@" <<'PY'
import os, random, select, signal, sys, time
mnt, kills, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
r = random.Random(kills)
def status():
    f = dict(kv.split("=", 1) for kv in os.getxattr(mnt, "user.chargefs.status").decode().split() if "=" in kv)
    return int(f["pid"]), int(f["takeovers"]), int(f["resent"])
with open(out, "w") as log:
    for k in range(1, kills + 1):
        time.sleep(r.uniform(1.0, 2.0))
        signal.alarm(30)   # a kill not answered in 30 s fails the run (the test's timeout is later)
        pid, n0, _ = status()
        fd = os.pidfd_open(pid)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        select.select([fd], [], [], 10)
        os.close(fd)
        try:
            # a name never looked up before: a cached negative entry would answer without the server
            os.stat(os.path.join(mnt, ".probe-%d-%d" % (os.getpid(), k)))
            sys.exit("kill %d: the probe exists" % k)
        except FileNotFoundError:
            pass
        ms = (time.monotonic() - t0) * 1e3
        new, n1, resent = status()
        signal.alarm(0)
        log.write("%d %.1f %d %d %d %d\n" % (k, ms, pid, new, n1, resent))
        log.flush()
        if new == pid or n1 != n0 + 1:
            sys.exit("kill %d: pid %d -> %d, takeovers %d -> %d" % (k, pid, new, n0, n1))
PY
}

t_kill_loop() {
  kernel_at_least 6 9 || { log "  needs Linux 6.9+ (FUSE_NOTIFY_RESEND): this is $(uname -r)"; return 1; }
  cfs_new_env cfskillstress
  local kills=${STRESS_KILLS:-50} opts T=""
  # takeover_max above the kills: 50 kills in 2 min are not a crash loop (takeover.md).
  opts="size=1g,takeover,takeover_max=$((kills + 10))"
  with_target "$PARENT/cfskillstress-$$-target"
  local base=0; [ -z "$T" ] || base=$(cg_usage "$T")
  cfs_mount "$MNT" "$opts"
  local keeper=$CFS_PID
  local mounted=0; [ -z "$T" ] || mounted=$(cg_usage "$T")
  # The workers run until the last kill is answered (bounded by the test's own timeout).
  "$CFS_PYTHON" "$(dirname "$SELF")/stress.py" "$MNT" --workers "${STRESS_WORKERS:-4}" \
    --seconds 3600 --seed "${STRESS_SEED:-1}" --until "$SCR/stop" > "$SCR/stress.out" 2>&1 &
  local spid=$! t0=$SECONDS krc=0 src=0
  killer "$MNT" "$kills" "$SCR/kills" || krc=$?
  local took=$((SECONDS - t0))
  touch "$SCR/stop"
  wait "$spid" || src=$?
  sed 's/^/  | /' "$SCR/stress.out" >&2
  local done; done=$(wc -l < "$SCR/kills")
  check "$done of $kills kills done in $took s, each answered by a new server" [ "$krc" = 0 -a "$done" = "$kills" ]
  if [ -s "$SCR/kills" ]; then
    log "  kill to first answer (ms): $(awk '{printf "%s ", $2}' "$SCR/kills")"
    log "  $(sort -n -k2 "$SCR/kills" | awk '{ms[NR]=$2; r+=$6} END {printf "min %.1f, median %.1f, max %.1f ms; requests resent: %d", ms[1], ms[int((NR+1)/2)], ms[NR], r}')"
  fi
  check "the exerciser: no error seen by any worker, the tree consistent with the models" [ "$src" = 0 ]
  check "every worker ran through the kills ($(grep -o '^ops [0-9]*' "$SCR/stress.out"))" grep -q '^ops [0-9]* errors 0 ' "$SCR/stress.out"
  check "$kills takeovers in the keeper's log" [ "$(grep -c 'successor .* started' "$CFS_LOG")" = "$kills" ]
  local server; server=$(getfattr --only-values -n user.chargefs.status "$MNT" 2>/dev/null | sed -n 's/^pid=\([0-9]*\) .*/\1/p')
  check "the keeper ($keeper) alive" kill -0 "$keeper"
  check "the last server (${server:-none}) alive" kill -0 "${server:-0}"
  check "df used 0 after the tree was removed" [ "$(df -B1 --output=used "$MNT" | tail -1 | tr -d ' ')" = 0 ]
  if [ -n "$T" ]; then
    check "target's shmem down to the page store's reserve (≤ 256 KiB) once the tree is removed" \
      shmem_drains_to_reserve "$T"
    local now; now=$(cg_usage "$T")
    log "  target usage: $base before the mount, $mounted mounted, $now after the tree was removed"
    check "target charge back at its mounted baseline (±1 MiB)" le "$now" $((mounted + MiB))
  fi
  check "clean unmount" cfs_umount "$MNT" "$keeper"
  local rc=0; wait "$keeper" 2>/dev/null || rc=$?
  check "the keeper exited 0 ($rc)" [ "$rc" = 0 ]
  check "and the last server too" bash -c "! kill -0 ${server:-0} 2>/dev/null"
  check "no chargefsd left for this mount" [ -z "$(cfs_daemons_below "$SCR")" ]
  check "no keeper left for this mount" [ -z "$(pgrep -f "chargefs-keeper.*$MNT" || true)" ]
  if [ -n "$T" ]; then
    local after; after=$(cg_usage "$T")
    log "  target usage after the unmount: $after"
    check "target charge back at its pre-mount baseline (±1 MiB) after the unmount" le "$after" $((base + MiB))
    check "no process left in the target" [ -z "$(cat "$T"/cgroup.procs "$T"/*/cgroup.procs 2>/dev/null)" ]
    check "no leaf left below the target" [ -z "$(find "$T" -mindepth 1 -maxdepth 1 -type d)" ]
  fi
  if grep -qE "WARNING: ThreadSanitizer|ERROR: AddressSanitizer|ERROR: LeakSanitizer|Fatal error" "$CFS_LOG"; then
    sed 's/^/  | /' "$CFS_LOG" | head -80 >&2
    check "daemon log free of sanitizer reports and fatal errors" false
  else
    check "daemon log free of sanitizer reports and fatal errors" true
  fi
}

test_main "stress test" 120 "$@"
