#!/usr/bin/env bash
# Fault tests of chargefsd on real mounts and real cgroup v1 memory cgroups (root only):
#   sigkill_writers      SIGKILL of the daemon with writers in flight: ENOTCONN (no hang), the
#                        writers end, fusermount3 -u clears, charges back to the target's baseline,
#                        no helper left, the stale leaf removed by the next start and by --cleanup
#   sigterm_busy         SIGTERM with open files, a writer in flight and a reader blocked in read(2)
#                        on a FIFO of the mount: unmounted, exit 0 within SIGTERM_BOUND seconds
#   helper_sigkill       the charge helper SIGKILLed: the daemon keeps serving, data intact, a new
#                        helper appears and charges land in the target again
#   oom_hog              a memory hog inside the target fills it: chargefs writers (outside it) get
#                        ENOSPC, are never killed, the daemon survives, data intact; once the hog is
#                        gone writing works again
#   limit_lowered        the target's limit lowered to (or, if the kernel allows, below) its usage
#                        while mounted: ENOSPC, data intact, daemon alive, room again after rm
#   target_removed       the target cgroup removed while mounted: writes fail (EIO/ENOSPC) quickly,
#                        reads still work, no crash, clean unmount with exit 0
#   size_exhaustion      size= filled by 4 concurrent writers: ENOSPC for all, then df, the stored
#                        files and the cgroup agree exactly (df) / within the counter slack (cgroup)
#   inode_exhaustion     nr_inodes= exhausted by 4 concurrent creators: ENOSPC, df -i == files
# Usage: scripts/tests/faults.sh [TEST...] | --list      Env: CHARGEFSD, CFS_TEST_TIMEOUT (90)
# Prints "N passed, N failed"; exit non-zero when any failed.
set -euo pipefail
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=scripts/tests/lib.sh
source "$(dirname "$SELF")/lib.sh"
REL=("$CFS_PYTHON" "$(dirname "$SELF")/rel.py")
SLACK=$((1 * MiB))
FUZZ=$(( 64 * $(getconf PAGESIZE) * $(getconf _NPROCESSORS_ONLN) ))
SIGTERM_BOUND=${SIGTERM_BOUND:-5}   # documented bound: SIGTERM to exit of a busy daemon (measured ~0.1 s)
TESTS=(sigkill_writers sigterm_busy helper_sigkill oom_hog limit_lowered target_removed
       size_exhaustion inode_exhaustion)

new_env() {
  cfs_new_env cfsfault
  BGPIDS=()
}
# mounted_with_file MIB: new_env, a mount charged to a 128 MiB target, and MIB MiB of random data
# in $MNT/a (the original in $SCR/src).
mounted_with_file() {
  new_env; trap bg_cleanup EXIT
  mount_target $((128 * MiB))
  head -c $(($1 * MiB)) /dev/urandom > "$SCR/src"
  cp "$SCR/src" "$MNT/a"
}
# Background helpers we start: killed (by pid) at the end of the test, before cfs_cleanup.
bg_cleanup() { local p; for p in "${BGPIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; cfs_cleanup; }

mount_target() {  # mount_target LIMIT [EXTRA_OPTS]
  [ -d "$T" ] || cg_create "$T" "$1"
  [ -d "$D" ] || cg_create "$D"
  PRE=$(cg_usage "$T")
  cfs_mount "$MNT" "memcg=$T,size=1g${2:+,$2}" "$D"
  DPID=$CFS_PID
  sleep 0.2
  BASE=$(cg_usage "$T")
  OOM_T=$(cg_oom_kills "$T")
}
helper_of() { pgrep -P "$1" -x chargefs-helper || true; }
wait_usage() {  # wait_usage CG OP VALUE [SECS]
  local cg=$1 op=$2 val=$3 secs=${4:-5} i u
  for ((i = 0; i < secs * 10; i++)); do u=$(cg_usage "$cg"); test "$u" "$op" "$val" && return 0; sleep 0.1; done
  log "    usage of $cg is $(fmt_mib "$u"), wanted $op $(fmt_mib "$val")"; return 1
}
wait_gone() {  # wait_gone PID SECS
  local i; for ((i = 0; i < $2 * 10; i++)); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done; return 1
}
leaf_procs() { cat "$T/chargefs-$1/cgroup.procs" 2>/dev/null || true; }

# --- tests ---------------------------------------------------------------------------------------

t_sigkill_writers() {
  new_env; trap bg_cleanup EXIT
  mount_target $((256 * MiB))
  local i; for i in 1 2 3; do
    "${REL[@]}" writer "$MNT/w$i" 65536 60 0.005 >"$SCR/w$i.out" 2>&1 &
    BGPIDS+=($!)
  done
  # (no reader blocked on a FIFO here: a pipe read is not a FUSE request, it stays blocked after
  # the daemon dies and keeps the dead mount busy for fusermount3 -u, as with any FUSE file system)
  sleep 1.5
  local helper; helper=$(helper_of "$DPID")
  log "  daemon $DPID, helper '$helper', $(fmt_mib $(( $(cg_usage "$T") - BASE ))) charged while writing"
  check "writers charged the target (≥ 4 MiB)" ge $(( $(cg_usage "$T") - BASE )) $((4 * MiB))
  kill -9 "$DPID"
  local t0=$SECONDS
  wait "$DPID" 2>/dev/null || true
  local p ok=1
  for p in "${BGPIDS[@]}"; do wait_gone "$p" 10 || ok=0; done
  log "  writers ended within $((SECONDS - t0)) s: $(cat "$SCR"/w*.out | tr '\n' ' ')"
  check "every writer ended within 10 s" [ "$ok" = 1 ]
  # Over io_uring (CFS_MOUNT_OPTS=io_uring=on) the kernel fails requests of a dead ring with ECANCELED.
  local dead='ENOTCONN|ECONNABORTED'; [[ ${CFS_MOUNT_OPTS:-} != *io_uring=on* ]] || dead+='|ECANCELED'
  check "writers saw ENOTCONN (or ECONNABORTED)" bash -c "! grep -qvE '^($dead) ' $SCR/w1.out $SCR/w2.out $SCR/w3.out"
  check "stat of the dead mount: ENOTCONN, not a hang" [ "$("${REL[@]}" probe "$MNT" 5 || true)" = ENOTCONN ]
  check "no helper process left" wait_gone "${helper:-0}" 5
  check "the stale leaf holds no process" [ -z "$(leaf_procs "$DPID")" ]
  check "charges back to the pre-mount baseline (±1 MiB)" wait_usage "$T" -le $((PRE + SLACK)) 10
  check "no OOM kill" [ "$(cg_oom_kills "$T")" = "$OOM_T" ]
  check "fusermount3 -u clears the dead mount" fusermount3 -u "$MNT"
  check "not mounted" bash -c "! awk -v m='$MNT' '\$2 == m {f=1} END {exit !f}' /proc/mounts"
  local old=$DPID
  log "  stale leaf before the next start: $(find "$T" -mindepth 1 -maxdepth 1 -name 'chargefs-*' -printf '%f ')"
  mount_target $((256 * MiB))
  check "the next start removed the stale leaf chargefs-$old" [ ! -d "$T/chargefs-$old" ]
  check "next mount works" bash -c "echo hi > '$MNT/x' && [ \"\$(cat '$MNT/x')\" = hi ]"
  # a second SIGKILL, then chargefsd --cleanup (instead of a next start)
  kill -9 "$DPID"; wait "$DPID" 2>/dev/null || true
  fusermount3 -u "$MNT" || true
  check "chargefsd --cleanup succeeds" "$(cfs_daemon_bin)" --cleanup "$T"
  check "no chargefs-* cgroup left after --cleanup" [ -z "$(find "$T" -mindepth 1 -type d -name 'chargefs-*')" ]
  check "target back to baseline (±1 MiB)" wait_usage "$T" -le $((PRE + SLACK)) 10
}

t_sigterm_busy() {
  new_env; trap bg_cleanup EXIT
  mount_target $((256 * MiB))
  head -c $((8 * MiB)) /dev/urandom > "$MNT/data"
  "${REL[@]}" hold 60 "$MNT/data" "$MNT/held2" >"$SCR/hold.out" 2>&1 & BGPIDS+=($!)
  "${REL[@]}" writer "$MNT/w" 65536 60 >"$SCR/w.out" 2>&1 & BGPIDS+=($!)
  mkfifo "$MNT/fifo"
  "${REL[@]}" blocked_read "$MNT/fifo" >"$SCR/br.out" 2>&1 & BGPIDS+=($!)
  sleep 1
  check "files held open" grep -q held "$SCR/hold.out"
  local helper; helper=$(helper_of "$DPID")
  local t0; t0=$(date +%s%N)
  kill -TERM "$DPID"
  local rc=0 i
  for ((i = 0; i < SIGTERM_BOUND * 20; i++)); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.05; done
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  if kill -0 "$DPID" 2>/dev/null; then rc=running; else wait "$DPID" || rc=$?; fi
  log "  SIGTERM → exit $rc after $ms ms (bound ${SIGTERM_BOUND} s); writer: $(cat "$SCR/w.out"); reader: $(tr '\n' ' ' <"$SCR/br.out")"
  check "exit 0 within ${SIGTERM_BOUND} s of SIGTERM" [ "$rc" = 0 ]
  check "unmounted" bash -c "! awk -v m='$MNT' '\$2 == m {f=1} END {exit !f}' /proc/mounts"
  check "no helper left" wait_gone "${helper:-0}" 5
  local p; for p in "${BGPIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  BGPIDS=()
  check "charges back to the pre-mount baseline once the holders are gone (±1 MiB)" wait_usage "$T" -le $((PRE + SLACK)) 10
  check "leaf removed on clean exit" [ -z "$(find "$T" -mindepth 1 -type d -name 'chargefs-*')" ]
}

t_helper_sigkill() {
  new_env; trap bg_cleanup EXIT
  mount_target $((256 * MiB))
  head -c $((8 * MiB)) /dev/urandom > "$SCR/src"
  cp "$SCR/src" "$MNT/a"
  local h1; h1=$(helper_of "$DPID")
  check "a helper runs as a child of the daemon" [ -n "$h1" ]
  kill -9 "$h1"
  wait_gone "$h1" 5 || true
  local u1; u1=$(cg_usage "$T")
  check "data intact after the helper was killed" cmp "$SCR/src" "$MNT/a"
  cp "$SCR/src" "$MNT/b"
  check "new writes succeed" cmp "$SCR/src" "$MNT/b"
  local h2; h2=$(helper_of "$DPID")
  log "  helper $h1 killed; now '$h2'"
  check "a new helper appeared" [ -n "$h2" -a "$h2" != "$h1" ]
  check "the new helper sits in the leaf" grep -qx "$h2" "$T/chargefs-$DPID/cgroup.procs"
  check "new data charged to the target (≥ 7 MiB more)" wait_usage "$T" -ge $((u1 + 7 * MiB))
  check "daemon alive" kill -0 "$DPID"
  check "status xattr still answers" getfattr -n user.chargefs.status "$MNT"
  rm "$MNT/a" "$MNT/b"
  check "charges returned after rm (±1 MiB)" wait_usage "$T" -le $((BASE + SLACK))
  check "clean unmount" cfs_umount "$MNT" "$DPID"
}

t_oom_hog() {
  new_env; trap bg_cleanup EXIT
  local S=$PARENT/cfsfault-$$-service
  mount_target $((96 * MiB))
  cg_create "$S"
  head -c $((16 * MiB)) /dev/urandom > "$SCR/src"
  cp "$SCR/src" "$MNT/keep"
  # the hog fills most of what is left and holds it
  ( echo "$BASHPID" > "$T/cgroup.procs"; exec "${REL[@]}" hog 64 30 ) >"$SCR/hog.out" 2>&1 &
  local hog=$!; BGPIDS+=("$hog")
  local i; for ((i = 0; i < 100; i++)); do grep -q holding "$SCR/hog.out" && break; sleep 0.1; done
  log "  hog $hog: $(cat "$SCR/hog.out"); target $(cg_describe "$T")"
  # chargefs writers in their own cgroup S fill the rest
  local rc1=0 rc2=0
  cg_run_in "$S" "${REL[@]}" fill "$MNT" f 262144 "$SCR/m1" >"$SCR/f1.out" 2>&1 & local w1=$!
  cg_run_in "$S" "${REL[@]}" writer "$MNT/big" 65536 30 >"$SCR/f2.out" 2>&1 & local w2=$!
  wait "$w1" || rc1=$?; wait "$w2" || rc2=$?
  log "  writers: exit $rc1 '$(cat "$SCR/f1.out")', exit $rc2 '$(cat "$SCR/f2.out")'; target $(cg_describe "$T")"
  check "chargefs writers not killed (exit 0)" [ "$rc1" = 0 -a "$rc2" = 0 ]
  check "both writers got ENOSPC" bash -c "grep -q '^ENOSPC' '$SCR/f1.out' && grep -q '^ENOSPC' '$SCR/f2.out'"
  check "daemon survives" kill -0 "$DPID"
  check "data written before the hog intact" cmp "$SCR/src" "$MNT/keep"
  check "files written up to ENOSPC intact" "${REL[@]}" verify "$SCR/m1"
  # now the hog grows past the limit: the kernel OOM-kills in the target (helper first, then hog)
  kill -9 "$hog" 2>/dev/null; wait "$hog" 2>/dev/null || true
  ( echo "$BASHPID" > "$T/cgroup.procs"; exec "${REL[@]}" hog 200 1 ) >"$SCR/hog2.out" 2>&1 &
  local hog2=$!; BGPIDS+=("$hog2")
  local hrc=0; wait "$hog2" || hrc=$?
  log "  growing hog: exit $hrc; oom kills in target: $(( $(cg_oom_kills "$T") - OOM_T ))"
  check "daemon survives the OOM killer in the target" kill -0 "$DPID"
  check "data intact after the OOM kill(s)" cmp "$SCR/src" "$MNT/keep"
  rm -f "$MNT/big" "$MNT"/f0*
  check "writing works again once the hog is gone" cp "$SCR/src" "$MNT/again"
  check "and it reads back" cmp "$SCR/src" "$MNT/again"
  check "a helper is running again" [ -n "$(helper_of "$DPID")" ]
  check "clean unmount" cfs_umount "$MNT" "$DPID"
}

t_limit_lowered() {
  mounted_with_file 32
  local u; u=$(cg_usage "$T")
  local below=$((u - 8 * MiB)) how
  if echo "$below" > "$T/memory.limit_in_bytes" 2>/dev/null; then
    how="below usage ($(fmt_mib "$below"))"
  else
    how="to usage+512 KiB (the kernel refused below usage: shmem cannot be reclaimed without swap)"
    echo $((u + 512 * 1024)) > "$T/memory.limit_in_bytes"
  fi
  log "  limit lowered $how; target $(cg_describe "$T")"
  local out; out=$("${REL[@]}" writer "$MNT/b" 65536 10)
  log "  writer: $out"
  check "writes get ENOSPC" grep -q '^ENOSPC' <<<"$out"
  check "df shows (almost) no room (≤ 1 MiB)" le "$(df -B1 --output=avail "$MNT" | tail -1 | tr -d ' ')" "$SLACK"
  check "daemon alive" kill -0 "$DPID"
  check "data intact" cmp "$SCR/src" "$MNT/a"
  check "metadata still works" bash -c "mkdir '$MNT/d' && touch '$MNT/d/e' && rm -r '$MNT/d'"
  rm -f "$MNT/a" "$MNT/b"
  check "room again after rm (4 MiB)" bash -c "head -c 4M '$SCR/src' > '$MNT/c'"
  check "clean unmount" cfs_umount "$MNT" "$DPID"
}

t_target_removed() {
  mounted_with_file 8
  # Move the helper out of the leaf so the leaf and the target can be removed (as an admin
  # deleting the pod's cgroup would, after its processes are gone).
  local h; h=$(helper_of "$DPID")
  echo "$h" > "$PARENT/cgroup.procs"
  rmdir "$T/chargefs-$DPID" "$T"
  check "target removed" [ ! -d "$T" ]
  local t0=$SECONDS out
  out=$(timeout 20 "${REL[@]}" writer "$MNT/b" 65536 5 || echo TIMEOUT)
  log "  writer after removal: $out ($((SECONDS - t0)) s)"
  check "writes fail with EIO or ENOSPC, within 20 s" grep -qE '^(EIO|ENOSPC) ' <<<"$out"
  check "reads still work, data intact" cmp "$SCR/src" "$MNT/a"
  check "status xattr answers" timeout 10 getfattr -n user.chargefs.status "$MNT"
  check "df answers" timeout 10 df "$MNT"
  check "daemon alive" kill -0 "$DPID"
  kill -9 "$h" 2>/dev/null || true
  fusermount3 -u "$MNT"
  local rc=0; wait_gone "$DPID" 10 && { wait "$DPID" || rc=$?; }
  check "daemon exits 0 after unmount" [ "$rc" = 0 ]
}

t_size_exhaustion() {
  new_env; trap bg_cleanup EXIT
  cg_create "$T" $((512 * MiB))
  [ -d "$D" ] || cg_create "$D"
  PRE=$(cg_usage "$T")
  cfs_mount "$MNT" "memcg=$T,size=40m" "$D"; DPID=$CFS_PID
  sleep 0.2; BASE=$(cg_usage "$T")
  local i pids=()
  for i in 1 2 3 4; do "${REL[@]}" fill "$MNT" "w$i-" 300000 "$SCR/m$i" >"$SCR/f$i.out" 2>&1 & pids+=($!); done
  local ok=1; for i in "${pids[@]}"; do wait "$i" || ok=0; done
  log "  writers: $(cat "$SCR"/f?.out | tr '\n' ' ')"
  check "all 4 writers ended in ENOSPC" [ "$(grep -c '^ENOSPC' "$SCR"/f?.out | awk -F: '{s+=$2} END {print s}')" = 4 ]
  check "all stored files intact" "${REL[@]}" verify "$SCR"/m?
  local files size blocks inodes; read -r files size blocks inodes < <("${REL[@]}" tree_sum "$MNT")
  local used; used=$(df -B1 --output=used "$MNT" | tail -1 | tr -d ' ')
  local pages_bytes=$((blocks * 512))
  log "  $files files, $size bytes, st_blocks $pages_bytes B; df used $used; target +$(fmt_mib $(( $(cg_usage "$T") - BASE )))"
  check "df used == sum of st_blocks (exact)" [ "$used" = "$pages_bytes" ]
  check "df used within size=40m" le "$used" $((40 * MiB))
  check "full to within one writer's file (300 KB) per writer" ge "$used" $((40 * MiB - 4 * 300000 - 4 * 4096))
  check "cgroup charge == stored pages (±1 MiB + counter fuzz)" near $(( $(cg_usage "$T") - BASE )) "$pages_bytes" $((SLACK + FUZZ))
  rm -f "$MNT"/w*
  check "df used back to 0 after rm" [ "$(df -B1 --output=used "$MNT" | tail -1 | tr -d ' ')" = 0 ]
  check "cgroup back to baseline (±1 MiB)" wait_usage "$T" -le $((BASE + SLACK))
  check "clean unmount" cfs_umount "$MNT" "$DPID"
}

t_inode_exhaustion() {
  new_env; trap bg_cleanup EXIT
  cfs_mount "$MNT" "size=64m,nr_inodes=2000"; DPID=$CFS_PID
  local i pids=()
  for i in 1 2 3 4; do mkdir "$MNT/d$i"; done
  for i in 1 2 3 4; do "${REL[@]}" mkinodes "$MNT/d$i" n >"$SCR/i$i.out" 2>&1 & pids+=($!); done
  for i in "${pids[@]}"; do wait "$i" || true; done
  local made; made=$(awk '{s+=$2} END {print s}' "$SCR"/i?.out)
  log "  creators: $(cat "$SCR"/i?.out | tr '\n' ' ')→ $made files"
  check "all creators ended in ENOSPC" [ "$(grep -c '^ENOSPC' "$SCR"/i?.out | awk -F: '{s+=$2} END {print s}')" = 4 ]
  local iused itotal; read -r itotal iused < <(df --output=itotal,iused "$MNT" | tail -1)
  local files; files=$(find "$MNT" -mindepth 1 | wc -l)
  log "  df -i: $iused of $itotal used; $files entries below the root"
  check "inodes total == nr_inodes" [ "$itotal" = 2000 ]
  check "df -i used == entries + root (exact)" [ "$iused" = $((files + 1)) ]
  check "every inode used" [ "$iused" = 2000 ]
  find "$MNT" -mindepth 2 -delete
  check "df -i back to dirs + root after rm" [ "$(df --output=iused "$MNT" | tail -1 | tr -d ' ')" = 5 ]
  check "clean unmount" cfs_umount "$MNT" "$DPID"
}

# --- main ----------------------------------------------------------------------------------------
if [ "${1:-}" = --one ]; then run_one "$2"; exit; fi
if [ "${1:-}" = --list ]; then printf '%s\n' "${TESTS[@]}"; exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "fault tests need root"; echo "0 passed, 1 failed"; exit 1; fi
if ! cg_available "$(cg_version)"; then echo "cannot run: no cgroup memory controller (v1 or v2)"; echo "0 passed, 1 failed"; exit 1; fi
if ! bin=$(cfs_daemon_bin 2>&1); then echo "cannot run: $bin"; echo "0 passed, 1 failed"; exit 1; fi
log "chargefs fault tests: daemon $bin, cgroups below $(cg_parent)"
if [ $# -gt 0 ]; then sel=("$@"); else sel=("${TESTS[@]}"); fi
run_tests "$SELF" "${CFS_TEST_TIMEOUT:-90}" "${sel[@]}"
