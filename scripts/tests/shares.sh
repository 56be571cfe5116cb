#!/usr/bin/env bash
# Tejun Heo's shared charging (-o memcg=auto,memcg_scope=P), against the kernel's own counters.
# Usage: scripts/tests/shares.sh [TEST...]        (all tests when none given; root only)
#        scripts/tests/shares.sh --list
# Runs on the cgroup version that has the memory controller here (v1 on this kind of host);
# CHARGEFS_CGROUP_VERSION=1|2 forces one; on v2 in a guest: scripts/tests/shares-v2.sh.
# Env: CHARGEFSD=path to the daemon (default .build/debug/chargefsd), CFS_TEST_TIMEOUT=seconds
# per test (default 180), CFS_CG_PARENT=where to create test cgroups (default: below our own).
# Prints "N passed, N failed" and exits non-zero when any test failed.
set -euo pipefail
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=scripts/tests/lib.sh
source "$(dirname "$SELF")/lib.sh"

SLACK=$((1 * MiB))   # the documented slack: charged reserve + per-CPU charge batching
# A helper per cgroup that charges (0.11 MiB on v2, 0.25-0.5 MiB on v1), kept until unmount.
HELPER=$((1 * MiB / 2))
TESTS=(tejun_example nested_ancestor refusals mapped_files)

# new_env: scratch dir SCR, the scope P (256 MiB) with B (48 MiB) and C (64 MiB) below it, the
# daemon in D (outside P), and $MNT mounted with memcg=auto,memcg_scope=$P. P0: P's usage before
# the mount.
new_env() {
  cfs_new_env cfsshr
  chmod 755 "$SCR" "$MNT"
  P=$PARENT/cfsshr-$$-P
  cg_create "$P" $((256 * MiB))
  B=$P/B; cg_create "$B" $((48 * MiB))
  C=$P/C; cg_create "$C" $((64 * MiB))
  cg_create "$D"
  P0=$(cg_usage "$P")
  cfs_mount "$MNT" "memcg=auto,memcg_scope=$P,size=1g,allow_other" "$D"
  sleep 0.3
}

not_mounted() { ! is_mounted "$1"; }
rise() { echo $(( $(cg_usage "$1") - $2 )); }
shares() { getfattr --absolute-names --only-values -n user.chargefs.shares "$MNT"; }
# shares_of CGROUP FIELD: the bytes in FIELD (owned, shared, hosted) of CGROUP's line; 0 if none.
shares_of() {
  shares | awk -v cg="$(realpath "$1")" -v f="$2" '$1 == cg { for (i = 2; i <= NF; i++) { split($i, kv, "="); if (kv[1] == f) print kv[2] } ; found=1 } END { if (!found) print 0 }'
}

# Tejun's example: B writes 8 MiB, C reads it. B's charge falls by about 8 MiB, C's stays, P
# holds it once; the shares attribute shows 8 MiB shared for B and C; B's own writes then stop
# about 8 MiB before its limit; rm gives everything back; unmount leaves P at its baseline.
t_tejun_example() {
  new_env
  head -c $((8 * MiB)) /dev/urandom > "$SCR/src"
  local b0 c0 p0; b0=$(cg_usage "$B"); c0=$(cg_usage "$C"); p0=$(cg_usage "$P")
  check "B writes 8 MiB" cg_run_in "$B" dd if="$SCR/src" of="$MNT/f" bs=1M status=none
  local b1 c1 p1; b1=$(cg_usage "$B"); c1=$(cg_usage "$C"); p1=$(cg_usage "$P")
  log "  after B's write: B +$(fmt_mib $((b1 - b0))), C +$(fmt_mib $((c1 - c0))), P +$(fmt_mib $((p1 - p0)))"
  check "B charged the 8 MiB (±1 MiB, plus its helper)" near $((b1 - b0)) $((8 * MiB)) $((SLACK + HELPER))
  check "shares: B owns 8 MiB" [ "$(shares_of "$B" owned)" = $((8 * MiB)) ]
  check "C reads it back intact" cg_run_in "$C" cmp "$SCR/src" "$MNT/f"
  local b2 c2 p2; b2=$(cg_usage "$B"); c2=$(cg_usage "$C"); p2=$(cg_usage "$P")
  log "  after C's read: B $(fmt_mib $((b2 - b1))), C $(fmt_mib $((c2 - c1))), P $(fmt_mib $((p2 - p1))) (P +$(fmt_mib $((p2 - p0))) since the mount)"
  log "  shares:"; shares | sed 's/^/    /' >&2
  check "B's charge fell by about 8 MiB (±1 MiB)" near $((b2 - b1)) $((-8 * MiB)) "$SLACK"
  check "C's stayed (±1 MiB)" near $((c2 - c1)) 0 "$SLACK"
  check "P holds it once: P rose by 8 MiB since the mount (±1 MiB, plus B's helper)" near $((p2 - p0)) $((8 * MiB)) $((SLACK + HELPER))
  check "shares: B shares 8 MiB" [ "$(shares_of "$B" shared)" = $((8 * MiB)) ]
  check "shares: C shares 8 MiB" [ "$(shares_of "$C" shared)" = $((8 * MiB)) ]
  check "shares: P hosts 8 MiB" [ "$(shares_of "$P" hosted)" = $((8 * MiB)) ]
  check "shares: B owns nothing now" [ "$(shares_of "$B" owned)" = 0 ]
  # fallocate is checked the same way: 42 MiB would fit in B's 48 MiB alone, not with the 8 shared.
  local fa
  fa=$(cg_run_in "$B" fallocate -l $((42 * MiB)) "$MNT/fa" 2>&1 || true)
  check "B's fallocate of 42 MiB: ENOSPC with 8 MiB shared ($fa)" grep -q "No space left" <<<"$fa"
  check "and it allocated nothing" [ "$(stat -c %b "$MNT/fa" 2>/dev/null || echo 0)" = 0 ]
  rm -f "$MNT/fa"
  # B fills a file of its own: ENOSPC about 8 MiB before its 48 MiB limit (256 KiB writes: dd's
  # own buffer, in B too while it runs, stays small).
  local err bstop
  err=$(cg_run_in "$B" dd if=/dev/zero of="$MNT/g" bs=256k count=256 2>&1 >/dev/null || true)
  bstop=$(cg_usage "$B")
  log "  B stopped at usage $(fmt_mib "$bstop") with g at $(fmt_mib "$(stat -c %s "$MNT/g")") (dd: $err)"
  check "B's write ended in ENOSPC" grep -q "No space left" <<<"$err"
  check "B stopped about 8 MiB before its limit: usage + shared within 2 MiB below 48 MiB" \
    near $((bstop + 8 * MiB)) $((48 * MiB)) $((2 * MiB))
  check "B never passed limit - shared" le $((bstop + 8 * MiB)) $((48 * MiB))
  check "no OOM kill in B" [ "$(cg_oom_kills "$B")" = 0 ]
  check "C still writes 8 MiB of its own" cg_run_in "$C" dd if=/dev/zero of="$MNT/h" bs=1M count=8 status=none
  rm -f "$MNT/f" "$MNT/g" "$MNT/h"
  sleep 0.3
  local b3 c3 p3; b3=$(cg_usage "$B"); c3=$(cg_usage "$C"); p3=$(cg_usage "$P")
  log "  after rm: B +$(fmt_mib $((b3 - b0))), C +$(fmt_mib $((c3 - c0))), P +$(fmt_mib $((p3 - p0))) since before the write"
  check "rm: B back (±1 MiB, plus its helper)" near $((b3 - b0)) 0 $((SLACK + HELPER))
  check "rm: C back (±1 MiB, plus its helper)" near $((c3 - c0)) 0 $((SLACK + HELPER))
  check "rm: P back (±1 MiB, plus B's and C's helpers)" near $((p3 - p0)) 0 $((SLACK + 2 * HELPER))
  check "rm: the shares attribute is empty" [ -z "$(shares)" ]
  # Holding no file, B's charge helper stopped: the job's cgroup can go while the mount stays.
  check "B's cgroup can be removed while mounted (no helper left in it)" rmdir "$B"
  check "unmount" cfs_umount "$MNT" "$CFS_PID"
  local p4; p4=$(cg_usage "$P")
  log "  after unmount: P at $(fmt_mib $((p4 - P0))) from before the mount"
  check "unmount: P at its baseline (≤ 0.5 MiB above)" le $((p4 - P0)) $((MiB / 2))
}

# The nearest common ancestor, not the scope: x and y below A share a file; A hosts it, P's
# other cgroups see nothing, and a process outside P counts as P.
t_nested_ancestor() {
  new_env
  local A=$P/A; cg_create "$A" $((64 * MiB))
  local X=$A/x Y=$A/y; cg_create "$X"; cg_create "$Y"
  head -c $((4 * MiB)) /dev/urandom > "$SCR/src"
  local a0 x0 y0 b0; a0=$(cg_usage "$A"); x0=$(cg_usage "$X"); y0=$(cg_usage "$Y"); b0=$(cg_usage "$B")
  check "x writes 4 MiB" cg_run_in "$X" cp "$SCR/src" "$MNT/f"
  local x1; x1=$(cg_usage "$X")
  check "x charged it (±1 MiB, plus its helper)" near $((x1 - x0)) $((4 * MiB)) $((SLACK + HELPER))
  check "y reads it" cg_run_in "$Y" cmp "$SCR/src" "$MNT/f"
  log "  x $(fmt_mib $((x1 - x0))) then $(fmt_mib "$(rise "$X" "$x1")"), y $(fmt_mib "$(rise "$Y" "$y0")"), A +$(fmt_mib "$(rise "$A" "$a0")")"
  log "  shares:"; shares | sed 's/^/    /' >&2
  check "x gave it up (±1 MiB)" near "$(rise "$X" "$x1")" $((-4 * MiB)) "$SLACK"
  check "x holds no file: its helper stopped (no chargefs-* leaf below x)" [ -z "$(find "$X" -mindepth 1 -type d -name 'chargefs-*')" ]
  check "y is charged nothing (±1 MiB)" near "$(rise "$Y" "$y0")" 0 "$SLACK"
  check "A holds it once (4 MiB ±1 MiB, plus x's and A's helpers)" near "$(rise "$A" "$a0")" $((4 * MiB)) $((SLACK + 2 * HELPER))
  check "B is not involved (±1 MiB)" near "$(rise "$B" "$b0")" 0 "$SLACK"
  check "shares: A hosts 4 MiB" [ "$(shares_of "$A" hosted)" = $((4 * MiB)) ]
  check "shares: x and y share 4 MiB" [ "$(shares_of "$X" shared) $(shares_of "$Y" shared)" = "$((4 * MiB)) $((4 * MiB))" ]
  check "shares: P is not involved" [ "$(shares_of "$P" hosted)" = 0 ]
  # A rename moves nothing; a process outside P (this shell) counts as P.
  check "rename" mv "$MNT/f" "$MNT/renamed"
  check "shares unchanged by the rename" [ "$(shares_of "$A" hosted)" = $((4 * MiB)) ]
  local p0; p0=$(cg_usage "$P")
  check "a process outside P writes 4 MiB" cp "$SCR/src" "$MNT/outside"
  log "  P +$(fmt_mib "$(rise "$P" "$p0")") for the outsider's file"
  check "P charged the outsider's file (±1 MiB)" near "$(rise "$P" "$p0")" $((4 * MiB)) "$SLACK"
  check "shares: P owns 4 MiB" [ "$(shares_of "$P" owned)" = $((4 * MiB)) ]
}

# Mapped and executed files. On Linux 6.9+ (FUSE passthrough) their ELF files pass through
# backing files of their host's (FileSystemCore+Mapped), so a job is charged no file pages for
# what it maps: a program installed from outside P is hosted by P; a copy written by B/w is
# hosted by B/w. When B/v runs B/w's copy while B/w's program runs, the share (host: B) waits for
# that program's end (its executable is a live passthrough open: FileSystemCore+Shares,
# settleHost); B/v maps B/w's backing files meanwhile, and B hosts them once both ended. Before
# 6.9 (no passthrough: the 6.1 guest of shares-v2.sh) no file gets a backing file, and a job is
# charged what it maps.
t_mapped_files() {
  new_env
  local passthrough=yes; kernel_at_least 6 9 || passthrough=no
  local p0; p0=$(cg_usage "$P")
  stage_runtime "$MNT/x" /usr/bin/xz /usr/bin/sleep   # by this shell, outside P: hosted by P
  local bytes; bytes=$(du -sb --apparent-size "$MNT/x" | cut -f1)
  log "  P +$(fmt_mib "$(rise "$P" "$p0")") for $(fmt_mib "$bytes") staged from outside P"
  check "P holds the program (-1 MiB, +1.5 MiB: its reserve, charge batches)" \
    near "$(rise "$P" "$p0")" $((bytes + MiB / 4)) $((5 * MiB / 4))
  chroot / true   # the host's chroot and its libraries in the page cache before the job runs
  local bf0; bf0=$(backing_files "$MNT")
  local R=$B/run; cg_create "$R"
  check "a job in B runs xz installed by a process outside P" cg_run_in "$R" chroot "$MNT/x" /usr/bin/xz --version
  local bf1; bf1=$(backing_files "$MNT")
  log "  job's file pages: $(fmt_mib "$(cg_file "$R")"); backing files $bf0 -> $bf1 (passthrough: $passthrough)"
  log "  shares:"; shares | sed 's/^/    /' >&2
  check "shares: P hosts it (written from outside P, used by B)" [ "$(shares_of "$P" hosted)" -ge "$(stat -c %s /usr/bin/xz)" ]
  if [ "$passthrough" = yes ]; then
    check "the job was charged no file pages for the loader, xz, liblzma, libc (≤ 64 KiB)" le "$(cg_file "$R")" $((64 * 1024))
    check "its ELF files have backing files of P's (libc's since it was written: 4 in all)" [ "$bf1" = 4 ]
  else
    check "$(uname -r) has no passthrough: the job was charged what it mapped (> 256 KiB)" ge "$(cg_file "$R")" $((256 * 1024))
    check "and no backing file was made" [ "$bf1" = 0 ]
  fi
  # A copy written by a cgroup below P is hosted there. (B/w, not B: on v2 a cgroup with
  # children holds no process.)
  local W=$B/w V=$B/v; cg_create "$W"; cg_create "$V"
  check "a process in B/w copies it" cg_run_in "$W" cp -a "$MNT/x" "$MNT/y"
  check "shares: B/w owns its copy" [ "$(shares_of "$W" owned)" -ge "$(stat -c %s /usr/bin/xz)" ]
  # (cp's read-only opens of ELF files pass through too: x's sleep got a backing file of P's.)
  local w0 bfc; w0=$(cg_file "$W"); bfc=$(backing_files "$MNT")
  check "B/w runs its copy" cg_run_in "$W" chroot "$MNT/y" /usr/bin/xz --version
  local bf2; bf2=$(backing_files "$MNT")
  log "  its file pages: +$(fmt_mib $(( $(cg_file "$W") - w0 ))); backing files $bf1 -> $bfc (cp) -> $bf2"
  check "cmp" cmp /usr/bin/xz "$MNT/y/usr/bin/xz"
  if [ "$passthrough" = no ]; then
    check "its copy got no backing file" [ "$bf2" = 0 ]
    check "it was charged what it mapped of its copy (> 256 KiB)" ge $(( $(cg_file "$W") - w0 )) $((256 * 1024))
    return 0
  fi
  check "its copy's ELF files got backing files of B/w's (4 more)" [ "$bf2" = $((bfc + 4)) ]
  check "it was charged no file pages for its copy (≤ 64 KiB)" le $(( $(cg_file "$W") - w0 )) $((64 * 1024))
  # B/v runs B/w's copy of sleep while B/w's runs: the share waits for B/w's program to end.
  local slp; slp=$(stat -c %s /usr/bin/sleep)
  cg_run_in "$W" chroot "$MNT/y" /usr/bin/sleep 3 &
  local spid=$!
  sleep 0.5
  local v0; v0=$(cg_file "$V")
  check "B/v runs the same sleep meanwhile" cg_run_in "$V" chroot "$MNT/y" /usr/bin/sleep 0.1
  log "  B/v's file pages: +$(fmt_mib $(( $(cg_file "$V") - v0 ))); shares while B/w's sleep runs:"; shares | sed 's/^/    /' >&2
  check "B/v was charged no file pages (≤ 64 KiB)" le $(( $(cg_file "$V") - v0 )) $((64 * 1024))
  check "shares: B/w still hosts sleep for B/v too while its sleep runs" [ "$(shares_of "$W" hosted)" -ge "$slp" ]
  check "shares: B/v carries it as shared" [ "$(shares_of "$V" shared)" -ge "$slp" ]
  check "B/w's sleep ends well" wait "$spid"
  sleep 0.3
  log "  shares once both ended:"; shares | sed 's/^/    /' >&2
  check "shares: B hosts what both ran (sleep at least)" [ "$(shares_of "$B" hosted)" -ge "$slp" ]
  check "shares: B/w hosts nothing for others now" [ "$(shares_of "$W" hosted)" = 0 ]
  check "cmp sleep" cmp /usr/bin/sleep "$MNT/y/usr/bin/sleep"
  check "B/v runs it again, from B's pages" cg_run_in "$V" chroot "$MNT/y" /usr/bin/sleep 0.1
  check "B/v still charged no file pages (≤ 64 KiB)" le $(( $(cg_file "$V") - v0 )) $((64 * 1024))
}

# Bad combinations are one-line errors with nothing mounted; directories take no target of their
# own; the shares attribute is read-only; another user needs write access to P's cgroup.procs.
t_refusals() {
  cfs_new_env cfsshr
  chmod 755 "$SCR" "$MNT"
  P=$PARENT/cfsshr-$$-P; cg_create "$P" $((64 * MiB))
  local bin out rc; bin=$(cfs_daemon_bin)
  local -a bad=("memcg_scope=$P" "memcg=auto" "memcg=$P,memcg_scope=$P" "memcg=auto,memcg_scope=$SCR" "memcg=auto,memcg_scope=$P/nonexistent")
  local opts
  for opts in "${bad[@]}"; do
    rc=0; out=$(timeout 20 "$bin" "$MNT" -o "$opts" -f 2>&1) || rc=$?
    log "  -o ${opts//$PARENT/PARENT}: exit $rc: ${out//$PARENT/PARENT}"
    check "refused (exit $rc)" [ "$rc" != 0 ]
    check "one line" [ "$(printf '%s\n' "$out" | wc -l)" = 1 ]
    check "nothing mounted" not_mounted "$MNT"
  done
  # A cgroup of another controller (v1 hosts mount each controller apart).
  if [ "$(cg_version)" = 1 ] && [ -d /sys/fs/cgroup/pids ]; then
    rc=0; out=$(timeout 20 "$bin" "$MNT" -o "memcg=auto,memcg_scope=/sys/fs/cgroup/pids" -f 2>&1) || rc=$?
    log "  -o memcg=auto,memcg_scope=/sys/fs/cgroup/pids: exit $rc: $out"
    check "a cgroup without the memory controller: refused, one line, named" \
      bash -c '[ "$1" != 0 ] && [ "$(printf "%s\n" "$2" | wc -l)" = 1 ] && grep -q "memcg_scope=.*memory controller" <<<"$2"' _ "$rc" "$out"
    check "nothing mounted" not_mounted "$MNT"
  fi
  check "the scope's error names memcg_scope" bash -c "'$bin' '$MNT' -o 'memcg=auto,memcg_scope=$SCR' -f 2>&1 | grep -q '^.*memcg_scope='"
  # Another user, without write access to P's cgroup.procs: refused.
  cfs_stage_for_others
  rc=0; out=$(timeout 20 setpriv --reuid 65534 --regid 65534 --clear-groups "$CFS_PUBLIC/chargefsd" "$MNT" -o "memcg=auto,memcg_scope=$P" -f 2>&1) || rc=$?
  log "  uid 65534: exit $rc: $out"
  check "uid 65534 without delegation: refused, permission named" grep -q "permission denied" <<<"$out"
  check "nothing mounted" not_mounted "$MNT"
  cg_create "$D"
  cfs_mount "$MNT" "memcg=auto,memcg_scope=$P" "$D"
  mkdir "$MNT/d"
  local err
  err=$(setfattr -n user.chargefs.memcg -v "$P" "$MNT/d" 2>&1 || true)
  check "user.chargefs.memcg on a directory: EINVAL ($err)" grep -q "Invalid argument" <<<"$err"
  err=$(setfattr -n user.chargefs.shares -v x "$MNT" 2>&1 || true)
  check "the shares attribute is read-only: EPERM ($err)" grep -q "Operation not permitted" <<<"$err"
}

test_main "shared-charging tests" 180 "$@"
