#!/usr/bin/env bash
# A charge target per directory (setfattr -n user.chargefs.memcg -v CGROUP DIR), against the
# kernel's own counters.
# Usage: scripts/tests/targets.sh [TEST...]        (all tests when none given; root only)
#        scripts/tests/targets.sh --list
# Runs on the cgroup version that has the memory controller here (v1 on this kind of host);
# CHARGEFS_CGROUP_VERSION=1|2 forces one; on v2 in a guest:
#   bash scripts/vm-run.sh -- env CHARGEFS_CGROUP_VERSION=2 CHARGEFSD=... bash scripts/tests/targets.sh
# Env: CHARGEFSD=path to the daemon (default .build/debug/chargefsd), CFS_TEST_TIMEOUT=seconds
# per test (default 180), CFS_CG_PARENT=where to create test cgroups (default: below our own).
# Prints "N passed, N failed" and exits non-zero when any test failed.
set -euo pipefail
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=scripts/tests/lib.sh
source "$(dirname "$SELF")/lib.sh"

SLACK=$((1 * MiB))   # the documented slack: charged reserve + per-CPU charge batching
# The mapped-file rule needs FUSE passthrough (6.9+). Before 6.9 (the 6.1 guest of targets-v2.sh)
# the kernel does something else with a mapped or executed file, and each kernel runs the tests
# of what it does: *_before_6_9 assert 6.1's behaviour (a job that maps a small file from the
# mount is charged its pages, no backing file, MAP_SHARED ENODEV); the others assert the rule.
# A test named for the other kind of kernel fails there, saying why.
if kernel_at_least 6 9; then MAPPED_TESTS=(mapped_then_moved use_case_3)
else MAPPED_TESTS=(mapped_charged_to_job_before_6_9 use_case_3_before_6_9); fi
# A kill during a move: the request in flight (setfattr, rename, open) is resent to the successor
# on 6.9+ (FUSE_NOTIFY_RESEND), and these tests assert that it completes. Before 6.9 (the 6.1
# guest of targets-v2.sh) nothing resends it: its caller waits until the connection ends, and
# holds meanwhile the inode lock its syscall took (a setfattr: the directory's), so they would
# hang there; kill_move_published_before_6_9 asserts what that kernel does instead.
if kernel_at_least 6 9; then
  KILL_TESTS=(kill_move_charging kill_move_charged kill_move_copying kill_move_unpublished kill_move_published kill_root_unpublished
              kill_unback_charging kill_unback_copying kill_unback_unpublished kill_unback_published kill_rename_copying kill_rename_unpublished kill_share_copying kill_share_published kill_move_timed)
else KILL_TESTS=(kill_move_published_before_6_9); fi
TESTS=(set_unset_moves enospc_each_target set_without_room_moves_nothing rename_carries refusals use_case_1 root_retarget
       supplementary_groups status_per_target "${MAPPED_TESTS[@]}" "${KILL_TESTS[@]}")
passthrough_or_fail() {
  kernel_at_least 6 9 || { log "  cannot run: $(uname -r) has no FUSE passthrough (6.9+), which the mapped-file rule needs (its *_before_6_9 tests run here)"; return 1; }
}
before_6_9_or_fail() {  # [WHAT 6.9 brought: FUSE passthrough by default]
  ! kernel_at_least 6 9 || { log "  cannot run: $(uname -r) has ${1:-FUSE passthrough} (6.9+): this asserts what a kernel before 6.9 does"; return 1; }
}

# new_env: scratch dir SCR (searchable by all: uid 65534 runs commands in it), the mount's target
# T (256 MiB) with the daemon in D, and $MNT mounted with memcg=$T.
new_env() {
  cfs_new_env cfstgt
  chmod 755 "$SCR" "$MNT"
  cg_create "$T" $((256 * MiB))
  cg_create "$D"
  cfs_mount "$MNT" "memcg=$T,size=1g,allow_other" "$D"
  sleep 0.3
}

# new_cg VAR NAME [LIMIT]: a client cgroup below cg_parent, its path in VAR (in this shell, so
# that cleanup removes it).
new_cg() {
  printf -v "$1" '%s' "$PARENT/cfstgt-$$-$2"
  cg_create "${!1}" "${3:-}"
}

target_of() { getfattr --absolute-names --only-values -n user.chargefs.memcg "$1" 2>/dev/null || echo "(none)"; }
# small_files DIR MIB: MIB MiB of 256 KiB files (below the passthrough threshold: arena pages).
small_files() {
  local i
  mkdir -p "$1"
  for ((i = 0; i < $2 * 4; i++)); do head -c $((256 * 1024)) /dev/urandom > "$1/f$i"; done
}
rise() { echo $(( $(cg_usage "$1") - $2 )); }
status_of() { getfattr --absolute-names --only-values -n user.chargefs.status "$1"; }

# A target set on a directory charges what is written below; setfattr -x moves it all back.
t_set_unset_moves() {
  new_env
  local A; new_cg A a $((64 * MiB))
  mkdir "$MNT/a"
  local a0 t0; a0=$(cg_usage "$A"); t0=$(cg_usage "$T")
  check "setfattr on a directory" setfattr -n user.chargefs.memcg -v "$A" "$MNT/a"
  check "getfattr shows the directory's target" [ "$(target_of "$MNT/a")" = "$(realpath "$A")" ]
  check "the mount's root still shows the mount's target" [ "$(target_of "$MNT")" = "$(realpath "$T")" ]
  a0=$(cg_usage "$A")   # the helper started in A's leaf
  head -c $((16 * MiB)) /dev/urandom > "$SCR/src"
  dd if="$SCR/src" of="$MNT/a/f" bs=1M status=none
  mkdir "$MNT/a/sub"; small_files "$MNT/a/sub" 4
  check "a file created below inherits it" [ "$(target_of "$MNT/a/sub/f0")" = "$(realpath "$A")" ]
  log "  A rose by $(fmt_mib "$(rise "$A" "$a0")"), T by $(fmt_mib "$(rise "$T" "$t0")")"
  check "A charged the 20 MiB written below a (±1 MiB)" near "$(rise "$A" "$a0")" $((20 * MiB)) "$SLACK"
  check "T charged none of it (≤ 1 MiB)" le "$(rise "$T" "$t0")" "$SLACK"
  local t1; t1=$(cg_usage "$T")
  check "setfattr -x" setfattr -x user.chargefs.memcg "$MNT/a"
  check "getfattr shows the parent's target again" [ "$(target_of "$MNT/a")" = "$(realpath "$T")" ]
  log "  after -x: A at +$(fmt_mib "$(rise "$A" "$a0")"), T rose by $(fmt_mib "$(rise "$T" "$t1")")"
  check "T took the 20 MiB (±1 MiB)" near "$(rise "$T" "$t1")" $((20 * MiB)) "$SLACK"
  check "A gave it all back (helper gone too: ≤ 1 MiB above where it started)" le "$(rise "$A" "$a0")" "$SLACK"
  check "data intact after two moves" cmp "$SCR/src" "$MNT/a/f"
  # and set again on a directory already holding files: their pages move into A. (Small files:
  # mapped_then_moved has files with backing files of their own.)
  t1=$(cg_usage "$T"); a0=$(cg_usage "$A")
  check "setfattr again on a non-empty directory" setfattr -n user.chargefs.memcg -v "$A" "$MNT/a/sub"
  log "  after set: A rose by $(fmt_mib "$(rise "$A" "$a0")"), T by $(fmt_mib "$(rise "$T" "$t1")")"
  check "A took the 4 MiB already there (±1 MiB, plus its helper)" near "$(rise "$A" "$a0")" $((4 * MiB)) $((2 * SLACK))
  check "T gave them back (±1 MiB)" near "$(rise "$T" "$t1")" $((-4 * MiB)) "$SLACK"
  check "data intact" cmp "$SCR/src" "$MNT/a/f"
}

# ENOSPC at a directory's target limit, and at an ancestor's, while the rest of the mount writes on.
t_enospc_each_target() {
  new_env
  local A P C; new_cg A a $((16 * MiB)); new_cg P p $((16 * MiB)); C=$P/c; cg_create "$C"
  mkdir "$MNT/a" "$MNT/c"
  setfattr -n user.chargefs.memcg -v "$A" "$MNT/a"
  setfattr -n user.chargefs.memcg -v "$C" "$MNT/c"
  local err
  err=$(dd if=/dev/zero of="$MNT/a/big" bs=1M count=32 2>&1 >/dev/null || true)
  check "a: ENOSPC at A's 16 MiB limit (dd: $err)" grep -q "No space left" <<<"$err"
  check "A stays under its limit" le "$(cg_usage "$A")" $((16 * MiB))
  err=$(dd if=/dev/zero of="$MNT/c/big" bs=1M count=32 2>&1 >/dev/null || true)
  check "c: ENOSPC at its parent P's 16 MiB limit (dd: $err)" grep -q "No space left" <<<"$err"
  check "P stays under its limit" le "$(cg_usage "$P")" $((16 * MiB))
  local t0; t0=$(cg_usage "$T")
  check "the root (T) still takes 32 MiB" dd if=/dev/zero of="$MNT/root" bs=1M count=32 status=none
  check "T charged them (±1 MiB)" near "$(rise "$T" "$t0")" $((32 * MiB)) "$SLACK"
  rm "$MNT/a/big"
  check "a takes 8 MiB again once its file is gone" dd if=/dev/zero of="$MNT/a/again" bs=1M count=8 status=none
}

# A new target without room for what is already there: ENOSPC, and nothing moves.
t_set_without_room_moves_nothing() {
  new_env
  local X; new_cg X x $((8 * MiB))
  small_files "$MNT/d" 12
  (cd "$MNT/d" && sha256sum f*) > "$SCR/sums"
  local x0 t0; x0=$(cg_usage "$X"); t0=$(cg_usage "$T")
  local err; err=$(setfattr -n user.chargefs.memcg -v "$X" "$MNT/d" 2>&1 || true)
  check "setfattr refused with ENOSPC ($err)" grep -q "No space left" <<<"$err"
  check "getfattr still shows the mount's target" [ "$(target_of "$MNT/d")" = "$(realpath "$T")" ]
  log "  X at +$(fmt_mib "$(rise "$X" "$x0")"), T at +$(fmt_mib "$(rise "$T" "$t0")")"
  check "X holds nothing of it (≤ 1 MiB)" le "$(rise "$X" "$x0")" "$SLACK"
  check "T still holds the 12 MiB (±1 MiB)" near "$(rise "$T" "$t0")" 0 "$SLACK"
  check "data intact" bash -c "cd '$MNT/d' && sha256sum --quiet -c '$SCR/sums'"
}

# A rename between targets carries the file's charge.
t_rename_carries() {
  new_env
  local A B; new_cg A a $((64 * MiB)); new_cg B b $((64 * MiB))
  mkdir "$MNT/a" "$MNT/b"
  setfattr -n user.chargefs.memcg -v "$A" "$MNT/a"
  setfattr -n user.chargefs.memcg -v "$B" "$MNT/b"
  head -c $((8 * MiB)) /dev/urandom > "$SCR/src"
  cp "$SCR/src" "$MNT/a/x"
  local a0 b0 t0; a0=$(cg_usage "$A"); b0=$(cg_usage "$B"); t0=$(cg_usage "$T")
  check "rename a/x -> b/x" python3 -c "import os,sys; os.rename(sys.argv[1], sys.argv[2])" "$MNT/a/x" "$MNT/b/x"
  log "  A $(fmt_mib "$(rise "$A" "$a0")"), B +$(fmt_mib "$(rise "$B" "$b0")")"
  check "A fell by 8 MiB (±1 MiB)" near "$(rise "$A" "$a0")" $((-8 * MiB)) "$SLACK"
  check "B rose by 8 MiB (±1 MiB)" near "$(rise "$B" "$b0")" $((8 * MiB)) "$SLACK"
  check "getfattr on the file shows B" [ "$(target_of "$MNT/b/x")" = "$(realpath "$B")" ]
  check "rename b/x -> root" python3 -c "import os,sys; os.rename(sys.argv[1], sys.argv[2])" "$MNT/b/x" "$MNT/x"
  check "T took it (±1 MiB)" near "$(rise "$T" "$t0")" $((8 * MiB)) "$SLACK"
  check "data intact" cmp "$SCR/src" "$MNT/x"
}

# Only the directory's owner (or root) with write access to the target's cgroup.procs may set it.
t_refusals() {
  new_env
  local A; new_cg A a $((64 * MiB))
  cfs_stage_for_others
  mkdir "$MNT/mine" "$MNT/roots"
  chmod 777 "$MNT/roots"   # the kernel's own check lets a non-owner through to ours
  chown 65534:65534 "$MNT/mine"
  small_files "$MNT/mine" 2; chown -R 65534:65534 "$MNT/mine"
  local a0 t0; a0=$(cg_usage "$A"); t0=$(cg_usage "$T")
  local as=(setpriv --reuid 65534 --regid 65534 --clear-groups)
  local err
  err=$("${as[@]}" setfattr -n user.chargefs.memcg -v "$A" "$MNT/mine" 2>&1 || true)
  check "owner without write access to A's cgroup.procs: EPERM ($err)" grep -q "Operation not permitted" <<<"$err"
  chown 65534 "$A/cgroup.procs"
  CFS_UNDO+=("chown 0 '$A/cgroup.procs'")
  err=$("${as[@]}" setfattr -n user.chargefs.memcg -v "$A" "$MNT/roots" 2>&1 || true)
  check "access to A but not the directory's owner: EPERM ($err)" grep -q "Operation not permitted" <<<"$err"
  check "nothing changed: mine still on T" [ "$(target_of "$MNT/mine")" = "$(realpath "$T")" ]
  check "nothing changed: roots still on T" [ "$(target_of "$MNT/roots")" = "$(realpath "$T")" ]
  check "nothing charged to A (≤ 1 MiB)" le "$(rise "$A" "$a0")" "$SLACK"
  check "T unchanged (±1 MiB)" near "$(rise "$T" "$t0")" 0 "$SLACK"
  check "owner with access to A: allowed" "${as[@]}" setfattr -n user.chargefs.memcg -v "$A" "$MNT/mine"
  check "A took mine's 2 MiB (±1 MiB, plus its helper)" near "$(rise "$A" "$a0")" $((2 * MiB)) $((2 * SLACK))
  chown 0 "$A/cgroup.procs"
  err=$("${as[@]}" setfattr -x user.chargefs.memcg "$MNT/roots" 2>&1 || true)
  check "-x where nothing is set: ENODATA ($err)" grep -q "No such attribute" <<<"$err"
}

# Use case 1: one service writes for three clients into three directories with three targets.
t_use_case_1() {
  new_env
  local S C1 C2 C3
  new_cg S service; new_cg C1 c1 $((64 * MiB)); new_cg C2 c2 $((64 * MiB)); new_cg C3 c3 $((16 * MiB))
  local i c
  for i in 1 2 3; do
    mkdir "$MNT/client$i"
    c=C$i
    setfattr -n user.chargefs.memcg -v "${!c}" "$MNT/client$i"
  done
  local s0 c10 c20 c30 t0
  s0=$(cg_usage "$S"); c10=$(cg_usage "$C1"); c20=$(cg_usage "$C2"); c30=$(cg_usage "$C3"); t0=$(cg_usage "$T")
  # The service: one process, writing 8 MiB for client1, 12 for client2, 24 for client3 (which
  # has room for 16), then 8 more for client1 and client2 each.
  cat > "$SCR/service.py" <<'PY'
import errno, os, sys
mnt = sys.argv[1]
def write(client, mib, name):
    fd = os.open(f"{mnt}/client{client}/{name}", os.O_WRONLY | os.O_CREAT, 0o644)
    block = os.urandom(1 << 20)
    try:
        for i in range(mib):
            done = 0
            while done < len(block):  # a write near the limit may be short
                done += os.write(fd, block[done:])
        return mib
    except OSError as e:
        if e.errno != errno.ENOSPC: raise
        return f"ENOSPC after {i} MiB"
    finally:
        os.close(fd)
print(write(1, 8, "a"), write(2, 12, "a"), write(3, 24, "a"), write(1, 8, "b"), write(2, 8, "b"))
PY
  local out; out=$(cg_run_in "$S" python3 "$SCR/service.py" "$MNT")
  log "  service: $out"
  set -- $out
  check "client3 got ENOSPC ($3 $4 $5 $6)" [ "$3" = ENOSPC ]
  check "client1 and client2 went on after it" [ "$7 $8" = "8 8" ]
  log "  C1 +$(fmt_mib "$(rise "$C1" "$c10")"), C2 +$(fmt_mib "$(rise "$C2" "$c20")"), C3 +$(fmt_mib "$(rise "$C3" "$c30")"), S +$(fmt_mib "$(rise "$S" "$s0")"), T +$(fmt_mib "$(rise "$T" "$t0")")"
  check "client1 rose by 16 MiB (±1 MiB)" near "$(rise "$C1" "$c10")" $((16 * MiB)) "$SLACK"
  check "client2 rose by 20 MiB (±1 MiB)" near "$(rise "$C2" "$c20")" $((20 * MiB)) "$SLACK"
  check "client3 is at its 16 MiB limit (within 1 MiB)" ge "$(cg_usage "$C3")" $((15 * MiB))
  check "client3 stays under its limit" le "$(cg_usage "$C3")" $((16 * MiB))
  # cache=direct (the default where the kernel allows it) leaves no FUSE page cache to the writer.
  check "the service's cgroup rose by nothing (≤ 1 MiB)" le "$(rise "$S" "$s0")" "$SLACK"
  check "the mount's target rose by nothing (≤ 1 MiB)" le "$(rise "$T" "$t0")" "$SLACK"
}

# A live retarget: the attribute on the mount's root moves the whole mount but subtrees with a
# target of their own; -x gives the mount's memcg= back.
t_root_retarget() {
  new_env
  local A B; new_cg A a $((256 * MiB)); new_cg B b $((64 * MiB))
  mkdir "$MNT/own"; setfattr -n user.chargefs.memcg -v "$B" "$MNT/own"
  small_files "$MNT/d" 16
  small_files "$MNT/own" 4
  local a0 b0 t0; a0=$(cg_usage "$A"); b0=$(cg_usage "$B"); t0=$(cg_usage "$T")
  check "setfattr on the mount's root" setfattr -n user.chargefs.memcg -v "$A" "$MNT"
  log "  A +$(fmt_mib "$(rise "$A" "$a0")"), T $(fmt_mib "$(rise "$T" "$t0")"), B $(fmt_mib "$(rise "$B" "$b0")")"
  check "A took the root's 16 MiB (±1 MiB, plus its helper)" near "$(rise "$A" "$a0")" $((16 * MiB)) $((2 * SLACK))
  check "T gave them back (±1 MiB)" near "$(rise "$T" "$t0")" $((-16 * MiB)) "$SLACK"
  check "the subtree with its own target stayed (±1 MiB)" near "$(rise "$B" "$b0")" 0 "$SLACK"
  check "getfattr on the root shows A" [ "$(target_of "$MNT")" = "$(realpath "$A")" ]
  check "setfattr -x on the root" setfattr -x user.chargefs.memcg "$MNT"
  check "T holds them again (±1 MiB)" near "$(rise "$T" "$t0")" 0 "$SLACK"
  check "getfattr on the root shows memcg= again" [ "$(target_of "$MNT")" = "$(realpath "$T")" ]
}

# Mapped and executed small files are charged to the target, not to the job that maps them
# (they pass through a backing file); a target set above them afterwards, -x, and renames across
# targets still work (the data leaves its backing file for the new target's arena); while a
# program from there runs (its executable held open) EBUSY, and nothing moves.
t_mapped_then_moved() {
  passthrough_or_fail
  new_env
  local A B J; new_cg A a $((64 * MiB)); new_cg B b $((64 * MiB)); new_cg J job
  stage_runtime "$MNT/x" /usr/bin/xz /usr/bin/sleep
  local bf0; bf0=$(backing_files "$MNT")
  chroot / true   # the host's chroot and its libraries in the page cache before the job runs
  check "the job runs xz from the mount" cg_run_in "$J" chroot "$MNT/x" /usr/bin/xz --version
  log "  job's file pages: $(fmt_mib "$(cg_file "$J")"); backing files $bf0 -> $(backing_files "$MNT")"
  check "the job was charged no file pages for the loader, xz and liblzma (≤ 64 KiB)" le "$(cg_file "$J")" $((64 * 1024))
  # libc (1.9 MB) got its backing file when it was written; the loader, xz and liblzma (all
  # below 1 MiB) when they were executed and mapped.
  check "the three small ELF files got backing files" [ "$(backing_files "$MNT")" = $((bf0 + 3)) ]
  local bytes; bytes=$(du -sb --apparent-size "$MNT/x" | cut -f1)
  local a0 t0; a0=$(cg_usage "$A"); t0=$(cg_usage "$T")
  check "setfattr above files that were executed and mapped" setfattr -n user.chargefs.memcg -v "$A" "$MNT/x"
  log "  A +$(fmt_mib "$(rise "$A" "$a0")"), T $(fmt_mib "$(rise "$T" "$t0")") for $(fmt_mib "$bytes"); backing files $(backing_files "$MNT")"
  check "A took them (±1 MiB, plus its helper)" near "$(rise "$A" "$a0")" "$bytes" $((2 * SLACK))
  check "T gave them back (±1 MiB)" near "$(rise "$T" "$t0")" $((-bytes)) "$SLACK"
  check "no backing file left there (libc's went too)" [ "$(backing_files "$MNT")" = 0 ]
  # Below a directory's own target, mapped and executed files get backing files of that
  # target's: a job running them there is charged nothing either, and A holds them.
  local J2; new_cg J2 job2
  a0=$(cg_usage "$A")
  check "xz still runs from there" cg_run_in "$J2" chroot "$MNT/x" /usr/bin/xz --version
  log "  a job running it there: $(fmt_mib "$(cg_file "$J2")") of file pages; A $(fmt_mib "$(rise "$A" "$a0")"); backing files $(backing_files "$MNT")"
  check "that job was charged no file pages (≤ 64 KiB)" le "$(cg_file "$J2")" $((64 * 1024))
  check "the four ELF files got backing files of A's" [ "$(backing_files "$MNT")" = 4 ]
  check "A still holds them (±1 MiB)" near "$(rise "$A" "$a0")" 0 "$SLACK"
  check "setfattr -x" setfattr -x user.chargefs.memcg "$MNT/x"
  check "T holds them again (±1 MiB)" near "$(rise "$T" "$t0")" 0 "$SLACK"
  check "run again: backing files again" cg_run_in "$J" chroot "$MNT/x" /usr/bin/xz --version
  mkdir "$MNT/b"; setfattr -n user.chargefs.memcg -v "$B" "$MNT/b"
  local b0; b0=$(cg_usage "$B")
  check "rename of the executed xz into B's directory (not EXDEV)" mv "$MNT/x/usr/bin/xz" "$MNT/b/xz"
  check "B took it (±1 MiB)" near "$(rise "$B" "$b0")" "$(stat -c %s /usr/bin/xz)" "$SLACK"
  check "cmp after the moves" cmp /usr/bin/xz "$MNT/b/xz"
  mv "$MNT/b/xz" "$MNT/x/usr/bin/xz"
  # A program from the mount running: its executable is held open through passthrough.
  ( echo "$BASHPID" > "$J/cgroup.procs" && exec chroot "$MNT/x" /usr/bin/sleep 60 ) &
  local pid=$!; CFS_PIDS+=("$pid"); sleep 1
  local err; err=$(setfattr -n user.chargefs.memcg -v "$A" "$MNT/x" 2>&1 || true)
  check "while it runs: EBUSY ($err)" grep -q "Device or resource busy" <<<"$err"
  check "nothing changed: still on T" [ "$(target_of "$MNT/x")" = "$(realpath "$T")" ]
  kill "$pid"; wait "$pid" 2>/dev/null || true
  sleep 0.5   # the release of its executable reaches the daemon asynchronously
  check "once it ended: allowed" setfattr -n user.chargefs.memcg -v "$A" "$MNT/x"
}

# Before 6.9 (no FUSE passthrough; Debian 12's 6.1): a program and its libraries run from the
# mount are mapped through the FUSE inode's page cache (cache=direct lets private mappings and
# exec through), so the kernel charges the job that faults them their file pages; no backing
# file is made; a shared mapping fails with ENODEV while a private one reads the file. The
# moves work as for any arena file, and a program running from there does not pin its files
# (no passthrough open): the target moves under it.
t_mapped_charged_to_job_before_6_9() {
  before_6_9_or_fail
  new_env
  local A J; new_cg A a $((64 * MiB)); new_cg J job
  stage_runtime "$MNT/x" /usr/bin/xz /usr/bin/sleep
  chroot / true
  check "the job runs xz from the mount (exec and private maps work)" cg_run_in "$J" chroot "$MNT/x" /usr/bin/xz --version
  local lib; lib=$(find "$MNT/x" -name 'liblzma.so*' -type f | head -1)
  log "  job's file pages: $(fmt_mib "$(cg_file "$J")"); backing files $(backing_files "$MNT")"
  check "the kernel charged the job the file pages it mapped (> 256 KiB)" ge "$(cg_file "$J")" $((256 * 1024))
  check "no backing file was made" [ "$(backing_files "$MNT")" = 0 ]
  local py=python3 err
  err=$($py -c 'import mmap, sys; f = open(sys.argv[1], "r+b"); mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED)' "$lib" 2>&1 || true)
  check "MAP_SHARED: ENODEV ($(tail -1 <<<"$err"))" grep -q "No such device" <<<"$err"
  check "MAP_PRIVATE reads the file" $py -c 'import mmap, sys; f = open(sys.argv[1], "rb"); m = mmap.mmap(f.fileno(), 0, mmap.MAP_PRIVATE, mmap.PROT_READ); sys.exit(m[:] != open(sys.argv[2], "rb").read())' "$lib" "${lib#"$MNT/x"}"
  # A program from the mount running: its executable open through the daemon, not pinned.
  ( echo "$BASHPID" > "$J/cgroup.procs" && exec chroot "$MNT/x" /usr/bin/sleep 60 ) &
  local pid=$!; CFS_PIDS+=("$pid"); sleep 1
  local bytes; bytes=$(du -sb --apparent-size "$MNT/x" | cut -f1)
  local a0 t0; a0=$(cg_usage "$A"); t0=$(cg_usage "$T")
  check "while a program from there runs: setfattr allowed (nothing pins it)" setfattr -n user.chargefs.memcg -v "$A" "$MNT/x"
  log "  A +$(fmt_mib "$(rise "$A" "$a0")"), T $(fmt_mib "$(rise "$T" "$t0")") for $(fmt_mib "$bytes")"
  check "A took them (±1 MiB, plus its helper)" near "$(rise "$A" "$a0")" "$bytes" $((2 * SLACK))
  check "T gave them back (±1 MiB)" near "$(rise "$T" "$t0")" $((-bytes)) "$SLACK"
  check "the program still runs" kill -0 "$pid"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  check "setfattr -x" setfattr -x user.chargefs.memcg "$MNT/x"
  check "T holds them again (±1 MiB)" near "$(rise "$T" "$t0")" 0 "$SLACK"
  check "cmp after the moves" cmp /usr/bin/xz "$MNT/x/usr/bin/xz"
}

# A caller allowed to write the target's cgroup.procs only through a supplementary group may set
# it on a directory it owns; without that group, EPERM.
t_supplementary_groups() {
  new_env
  local A; new_cg A a $((64 * MiB))
  cfs_stage_for_others
  mkdir "$MNT/mine"; small_files "$MNT/mine" 1; chown -R 65534:65534 "$MNT/mine"
  chgrp 4242 "$A/cgroup.procs"; chmod g+w "$A/cgroup.procs"
  CFS_UNDO+=("chgrp 0 '$A/cgroup.procs'; chmod g-w '$A/cgroup.procs'")
  local err
  err=$(setpriv --reuid 65534 --regid 65534 --clear-groups setfattr -n user.chargefs.memcg -v "$A" "$MNT/mine" 2>&1 || true)
  check "without the group: EPERM ($err)" grep -q "Operation not permitted" <<<"$err"
  check "nothing changed" [ "$(target_of "$MNT/mine")" = "$(realpath "$T")" ]
  local a0; a0=$(cg_usage "$A")
  check "with group 4242 as a supplementary group: allowed" \
    setpriv --reuid 65534 --regid 65534 --groups 4242 setfattr -n user.chargefs.memcg -v "$A" "$MNT/mine"
  check "getfattr shows A" [ "$(target_of "$MNT/mine")" = "$(realpath "$A")" ]
  check "A took the 1 MiB (±1 MiB, plus its helper)" near "$(rise "$A" "$a0")" $((1 * MiB)) $((2 * SLACK))
}

# The status attribute has one line per directory target: its cgroup, bytes charged, its limit.
t_status_per_target() {
  new_env
  local A B; new_cg A a $((64 * MiB)); new_cg B b
  mkdir "$MNT/a" "$MNT/b"
  setfattr -n user.chargefs.memcg -v "$A" "$MNT/a"
  setfattr -n user.chargefs.memcg -v "$B" "$MNT/b"
  dd if=/dev/zero of="$MNT/a/f" bs=1M count=8 status=none
  local st la lb; st=$(status_of "$MNT")
  log "$(grep '^dir_target=' <<<"$st" | sed 's/^/  /')"
  la=$(grep "^dir_target=$(realpath "$A") " <<<"$st" || true)
  lb=$(grep "^dir_target=$(realpath "$B") " <<<"$st" || true)
  check "a line for A" [ -n "$la" ]
  check "a line for B" [ -n "$lb" ]
  local charged; charged=$(sed -n 's/.* charged_bytes=\([0-9]*\).*/\1/p' <<<"$la")
  check "A's line: 8 MiB charged (≤ 8.25 MiB, its kept pages included)" near "${charged:-0}" $((8 * MiB + 128 * 1024)) $((128 * 1024))
  check "A's line: its 64 MiB limit" grep -q " limit_bytes=$((64 * MiB))\( \|$\)" <<<"$la"
  check "A's line: its headroom" grep -q " headroom_bytes=[0-9]" <<<"$la"
  check "B's line: nothing charged" grep -q " charged_bytes=0 " <<<"$lb"
  setfattr -x user.chargefs.memcg "$MNT/b"
  check "B's line gone with its target" bash -c "! getfattr --only-values -n user.chargefs.status '$MNT' | grep -q '^dir_target=$(realpath "$B") '"
}

# python_runtime_env: the host's Python runtime (the binary, the libraries it and its extension
# modules load, its standard library) staged into $MNT/rt of a new env (new_env); sets PY, JOB
# (a job's program), RT_BYTES (the runtime's size) and RT_T0 (T's usage before it was staged).
python_runtime_env() {
  PY=/usr/bin/python3.11
  [ -x "$PY" ] || { log "  cannot run: $PY missing"; return 1; }
  new_env
  RT_T0=$(cg_usage "$T")
  stage_runtime "$MNT/rt" "$PY" /usr/lib/python3.11/lib-dynload/*.so
  tar -C / --exclude=python3.11/config-3.11-x86_64-linux-gnu --exclude=python3.11/test -cf - usr/lib/python3.11 | tar -C "$MNT/rt" -xf -
  RT_BYTES=$(du -sb --apparent-size "$MNT/rt" | cut -f1)
  log "  runtime on the mount: $(fmt_mib "$RT_BYTES") in $(find "$MNT/rt" -type f | wc -l) files"
  JOB='import json, decimal, datetime, bz2, lzma, hashlib, sqlite3, ctypes, zoneinfo, csv, asyncio, email.parser; print(decimal.Decimal(1) / 7)'
}

# Use case 3: a Python runtime installed on a mount, run by three jobs in three cgroups, the
# first alone: each job is charged no more file pages than with the host's own copy (within
# 512 KiB), and the target holds the runtime.
t_use_case_3() {
  passthrough_or_fail
  python_runtime_env || return 1
  local py=$PY job=$JOB bytes=$RT_BYTES t0=$RT_T0
  local H1 H2 H3 M1 M2 M3 i
  new_cg H1 h1; new_cg H2 h2; new_cg H3 h3; new_cg M1 m1; new_cg M2 m2; new_cg M3 m3
  # The host's own copy: the first job alone, then two at once.
  check "host job 1" cg_run_in "$H1" "$py" -c "$job"
  cg_run_in "$H2" "$py" -c "$job" >/dev/null & local p2=$!
  cg_run_in "$H3" "$py" -c "$job" >/dev/null & local p3=$!
  check "host jobs 2 and 3" wait "$p2" "$p3"
  check "mount job 1 (alone)" cg_run_in "$M1" chroot "$MNT/rt" "$py" -c "$job"
  cg_run_in "$M2" chroot "$MNT/rt" "$py" -c "$job" >/dev/null & p2=$!
  cg_run_in "$M3" chroot "$MNT/rt" "$py" -c "$job" >/dev/null & p3=$!
  check "mount jobs 2 and 3" wait "$p2" "$p3"
  local h m
  for i in 1 2 3; do
    h=H$i; m=M$i
    log "  job $i: file pages $(fmt_mib "$(cg_file "${!m}")") from the mount, $(fmt_mib "$(cg_file "${!h}")") from the host's copy"
    check "job $i: no more file pages than with the host's copy (+512 KiB)" le "$(cg_file "${!m}")" $(( $(cg_file "${!h}") + 512 * 1024 ))
  done
  log "  T +$(fmt_mib "$(rise "$T" "$t0")") for $(fmt_mib "$bytes"); $(status_of "$MNT" | grep -E '^(stored_bytes|backing_files)=' | tr '\n' ' ')"
  check "T holds the runtime (≥ its size - 1 MiB)" ge "$(rise "$T" "$t0")" $((bytes - MiB))
}

# Use case 3 before 6.9: the same runtime, run by a job and then by another, each in its own
# cgroup. The kernel charges a job that runs it from the mount the file pages it maps (the
# loader, libraries, extension modules: page cache of the FUSE inodes), more than with the
# host's copy; and fs/fuse drops a direct-I/O file's page cache at each new mmap of it
# (fuse_file_mmap's invalidate_inode_pages2), so the next job's run takes those pages from the
# first (uncharged there) and is charged them itself. The target holds the runtime throughout.
t_use_case_3_before_6_9() {
  before_6_9_or_fail
  python_runtime_env || return 1
  local py=$PY job=$JOB bytes=$RT_BYTES t0=$RT_T0
  local H1 M1 M2
  new_cg H1 h1; new_cg M1 m1; new_cg M2 m2
  check "host job" cg_run_in "$H1" "$py" -c "$job"
  local h; h=$(cg_file "$H1")
  check "mount job 1" cg_run_in "$M1" chroot "$MNT/rt" "$py" -c "$job"
  local m1; m1=$(cg_file "$M1")
  log "  file pages: host's copy $(fmt_mib "$h"), mount job 1 $(fmt_mib "$m1"); backing files $(backing_files "$MNT")"
  check "mount job 1: charged the pages it mapped (> host's copy + 4 MiB)" ge "$m1" $((h + 4 * MiB))
  check "no backing file was made" [ "$(backing_files "$MNT")" = 0 ]
  check "mount job 2" cg_run_in "$M2" chroot "$MNT/rt" "$py" -c "$job"
  local m2 m1after; m2=$(cg_file "$M2"); m1after=$(cg_file "$M1")
  log "  after job 2: job 2 $(fmt_mib "$m2"), job 1 $(fmt_mib "$m1after")"
  check "mount job 2: charged them too (> host's copy + 4 MiB)" ge "$m2" $((h + 4 * MiB))
  check "job 1 lost them to job 2's maps (≤ 512 KiB left)" le "$m1after" $((512 * 1024))
  log "  T +$(fmt_mib "$(rise "$T" "$t0")") for $(fmt_mib "$bytes")"
  check "T holds the runtime (≥ its size - 1 MiB)" ge "$(rise "$T" "$t0")" $((bytes - MiB))
}

# --- a kill during a move (-o takeover: docs/design.md, "A kill during a move") ---------------
BIG_MIB=${CFS_BIG_MIB:-256}   # the moved file
BIG_LIMIT=$(( (2 * BIG_MIB + 256) * MiB ))   # each target's limit: room for the file and more

# takeover_env POINT OPTS: a -o takeover mount with memcg=$T (T: BIG_LIMIT) and OPTS, the daemon in D,
# its first server armed to SIGKILL itself at POINT of its first move of pages between targets
# (CHARGEFS_TEST_KILL_IN_MOVE; "" for none); T0 is T's usage before the mount.
takeover_env() {
  cfs_new_env cfstgt
  chmod 755 "$SCR" "$MNT"
  cg_create "$T" "$BIG_LIMIT"
  cg_create "$D"
  T0=$(cg_usage "$T")
  if [ -n "$1" ]; then export CHARGEFS_TEST_KILL_IN_MOVE=$1; fi
  cfs_mount "$MNT" "memcg=$T,size=$((4 * BIG_MIB))m,takeover${2:+,$2}" "$D"
  unset CHARGEFS_TEST_KILL_IN_MOVE
  KEEPER=$CFS_PID
  sleep 0.3
}

status_field() { status_of "$MNT" | tr ' ' '\n' | sed -n "s/^$1=//p" | head -1; }
leaves_in() { find "$1" -mindepth 1 -maxdepth 1 -type d -name 'chargefs-*' | wc -l; }
leaf_names() { find "$1" -mindepth 1 -maxdepth 1 -type d -name 'chargefs-*' -printf '%f(procs: %s) ' 2>/dev/null; }

# big_file PATH: BIG_MIB MiB of random data; sets SUM (its sha256).
big_file() {
  dd if=/dev/urandom of="$1" bs=1M count="$BIG_MIB" status=none
  SUM=$(sha256sum < "$1")
}

# after_kill WHAT OLD_PID: one takeover happened (the first server died, a successor serves).
after_kill() {
  local pid; pid=$(status_field pid)
  log "  $1; server $2 -> ${pid:-none}, $(status_of "$MNT" | grep -o 'takeovers=[0-9]*')"
  check "one takeover: a successor serves (takeovers=1)" [ "$(status_field takeovers)" = 1 ]
  check "the first server is gone" bash -c "! kill -0 $2 2>/dev/null"
  FIRST_SERVER=$2 SUCCESSOR=$pid
}

# charges_once FILE FROM FROM0 TO TO0: the file's bytes are charged once, to FROM or TO (their
# rises over FROM0 and TO0 sum to its size, ±1 MiB, within 5 s), the other holding none of it (±1 MiB; TO
# plus its helper when it took them).
charges_once() {
  local file=$1 from=$2 from0=$3 to=$4 to0=$5 bytes=$((BIG_MIB * MiB))
  # A backing file the move left is freed by the keeper's close of its copy, which the server
  # asks for after the publish: its pages may still be charged for a moment after the reply.
  local rf rt i waited=""
  for ((i = 0; i <= 50; i++)); do
    rf=$(rise "$from" "$from0"); rt=$(rise "$to" "$to0")
    near $((rf + rt)) "$bytes" "$SLACK" && break
    waited=" (after $((i + 1))00 ms)"; sleep 0.1
  done
  log "  from +$(fmt_mib "$rf"), to +$(fmt_mib "$rt"), sum $(fmt_mib $((rf + rt))) for $(fmt_mib "$bytes")$waited"
  check "the sum of both rises is the file's size once (±1 MiB)" near $((rf + rt)) "$bytes" "$SLACK"
  if [ "$(target_of "$file")" = "$(realpath "$to")" ]; then
    check "the new target holds it (±1 MiB, plus its helper)" near "$rt" "$bytes" $((2 * SLACK))
    check "the old target gave it back (±1 MiB)" le "$rf" "$SLACK"
  else
    check "the old target holds it (±1 MiB)" near "$rf" "$bytes" "$SLACK"
    check "the new target holds none of it (≤ 1 MiB)" le "$rt" "$SLACK"
  fi
  check "the file's bytes are intact" [ "$(sha256sum < "$file")" = "$SUM" ]
}

# nothing_left CGROUP...: after rm and unmount, each cgroup back at its baseline before the mount
# (±1 MiB: pairs CGROUP BASELINE), no leaf of ours under it, no daemon or keeper left.
nothing_left() {
  check "unmounted" cfs_umount "$MNT" "$KEEPER"
  log "  servers: first ${FIRST_SERVER:-?}, successor ${SUCCESSOR:-?}; the keeper's log:"
  grep -E 'successor|keeper|takeover:|cannot' "$CFS_LOG" | sed 's/^/  | /' >&2 || true
  check "one successor in all (none started at the unmount)" [ "$(grep -c 'successor .* started' "$CFS_LOG")" = 1 ]
  while [ $# -gt 0 ]; do
    log "  $(basename "$1"): $(fmt_mib "$(cg_usage "$1")") (baseline $(fmt_mib "$2")), leaves $(leaves_in "$1") $(leaf_names "$1")"
    check "$(basename "$1") back at its baseline (±1 MiB)" near "$(cg_usage "$1")" "$2" "$SLACK"
    check "no chargefs leaf left in $(basename "$1")" [ "$(leaves_in "$1")" = 0 ]
    shift 2
  done
  check "no chargefsd or keeper left" [ -z "$(cfs_daemons_below "$SCR")$(keepers_below "$SCR")" ]
}

# kill_move POINT KIND [root]: a BIG_MIB file below d, or the mount's root (KIND arena: passthrough=off, its pages in the
# arena; backing: a backing file of T's, as a large file under the mount's target has), then
# setfattr A on d (a live retarget of the root); the server kills itself at POINT of the move. The setfattr is resent to the
# successor: it either completed or failed and changed nothing; the bytes are intact and
# charged once; a move back works; after rm and unmount nothing is left.
kill_move() {
  local point=$1 kind=$2 opts= dir
  [ "$kind" = arena ] && opts=passthrough=off
  takeover_env "$point" "$opts"
  dir=$MNT/d; [ "${3:-}" = root ] && dir=$MNT
  local A; new_cg A a "$BIG_LIMIT"
  local a00; a00=$(cg_usage "$A")
  mkdir -p "$dir"
  big_file "$dir/big"
  local want=0; [ "$kind" = backing ] && want=1
  check "$kind: backing files $want" [ "$(backing_files "$MNT")" = "$want" ]
  local t0 a0 pid0; t0=$(cg_usage "$T"); a0=$(cg_usage "$A"); pid0=$(status_field pid)
  t0=$((t0 - BIG_MIB * MiB))
  local rc=0 err; err=$(setfattr -n user.chargefs.memcg -v "$A" "$dir" 2>&1) || rc=$?
  after_kill "setfattr rc=$rc ${err:+($err)}" "$pid0"
  check "getfattr shows A after a success, T after a failure" \
    [ "$(target_of "$dir")" = "$(realpath "$([ "$rc" = 0 ] && echo "$A" || echo "$T")")" ]
  check "the file shows its directory's target" [ "$(target_of "$dir/big")" = "$(target_of "$dir")" ]
  charges_once "$dir/big" "$T" "$t0" "$A" "$a0"
  # The successor's pools agree with the tree: a move back gives T the whole file again.
  if [ "$rc" = 0 ]; then
    check "setfattr -x after the takeover" setfattr -x user.chargefs.memcg "$dir"
    charges_once "$dir/big" "$A" "$a0" "$T" "$t0"
  else
    check "setfattr again after the takeover" setfattr -n user.chargefs.memcg -v "$A" "$dir"
    charges_once "$dir/big" "$T" "$t0" "$A" "$a0"
  fi
  rm "$dir/big"
  nothing_left "$T" "$T0" "$A" "$a00"
}
t_kill_move_charging() { kill_move charging arena; }
t_kill_move_charged() { kill_move charged arena; }
t_kill_move_copying() { kill_move copying arena; }
t_kill_move_unpublished() { kill_move unpublished arena; }
t_kill_move_published() { kill_move published arena; }
t_kill_root_unpublished() { kill_move unpublished arena root; }
t_kill_unback_copying() { kill_move copying backing; }
t_kill_unback_charging() { kill_move charging backing; }
t_kill_unback_unpublished() { kill_move unpublished backing; }
t_kill_unback_published() { kill_move published backing; }

# kill_rename POINT: a BIG_MIB file in a (target A) renamed into b (target B), the server killed
# at POINT of the move; the rename is resent: the file is at one of the two names, charged once.
kill_rename() {
  takeover_env "$1" ""
  local A B; new_cg A a "$BIG_LIMIT"; new_cg B b "$BIG_LIMIT"
  local a00 b00; a00=$(cg_usage "$A"); b00=$(cg_usage "$B")
  mkdir "$MNT/a" "$MNT/b"
  setfattr -n user.chargefs.memcg -v "$A" "$MNT/a"   # moves no page: no kill
  setfattr -n user.chargefs.memcg -v "$B" "$MNT/b"
  big_file "$MNT/a/big"
  local a0 b0 pid0; a0=$(( $(cg_usage "$A") - BIG_MIB * MiB )); b0=$(cg_usage "$B"); pid0=$(status_field pid)
  local rc=0 err; err=$("$CFS_PYTHON" -c "import os,sys; os.rename(sys.argv[1], sys.argv[2])" "$MNT/a/big" "$MNT/b/big" 2>&1) || rc=$?
  after_kill "rename rc=$rc ${err:+($err)}" "$pid0"
  local names; names=$(cd "$MNT" && find a b -mindepth 1 | sort | tr '\n' ' ')
  if [ "$rc" = 0 ]; then check "renamed: b/big alone ($names)" [ "$names" = "b/big " ]
  else check "not renamed: a/big alone ($names)" [ "$names" = "a/big " ]; fi
  local file=$MNT/b/big; [ -e "$file" ] || file=$MNT/a/big
  charges_once "$file" "$A" "$a0" "$B" "$b0"
  rm -f "$MNT/a/big" "$MNT/b/big"
  nothing_left "$T" "$T0" "$A" "$a00" "$B" "$b00"
}
t_kill_rename_copying() { kill_rename copying; }
t_kill_rename_unpublished() { kill_rename unpublished; }

# kill_share POINT: memcg=auto (scope P, with B and C below it): B writes a BIG_MIB file, C
# reads it, which moves it up to P (a share); the server kills itself at POINT of that move. The
# open is resent: C reads the file intact, and P (hierarchical: B's and C's usage included)
# holds it once; after rm and unmount P is back at its baseline.
kill_share() {
  cfs_new_env cfstgt
  chmod 755 "$SCR" "$MNT"
  local P=$PARENT/cfstgt-$$-P
  cg_create "$P" "$BIG_LIMIT"
  local B=$P/B C=$P/C; cg_create "$B" "$BIG_LIMIT"; cg_create "$C" "$BIG_LIMIT"
  cg_create "$D"
  local p00; p00=$(cg_usage "$P")
  export CHARGEFS_TEST_KILL_IN_MOVE=$1
  cfs_mount "$MNT" "memcg=auto,memcg_scope=$P,size=$((4 * BIG_MIB))m,takeover" "$D"
  unset CHARGEFS_TEST_KILL_IN_MOVE
  KEEPER=$CFS_PID
  check "B writes the file" cg_run_in "$B" dd if=/dev/urandom of="$MNT/f" bs=1M count="$BIG_MIB" status=none
  # Each reader opens the file itself, inside its cgroup (a redirection would open it here).
  SUM=$(cg_run_in "$B" sha256sum "$MNT/f" | cut -d' ' -f1)
  local p0 b0 pid0; p0=$(( $(cg_usage "$P") - BIG_MIB * MiB )); b0=$(cg_usage "$B"); pid0=$(status_field pid)
  log "  before C reads: P $(fmt_mib "$(cg_usage "$P")"), B $(fmt_mib "$b0"), C $(fmt_mib "$(cg_usage "$C")"), $(status_of "$MNT" | grep -E "^(stored_bytes|backing_files)=" | tr "\n" " ")"
  local got rc=0; got=$(cg_run_in "$C" sha256sum "$MNT/f" | cut -d' ' -f1) || rc=$?
  after_kill "C's read rc=$rc" "$pid0"
  check "C read the file intact across the kill" [ "$got" = "$SUM" ]
  local rp rb; rp=$(rise "$P" "$p0"); rb=$(rise "$B" "$b0")
  log "  P (B and C included) +$(fmt_mib "$rp") over its usage without the file, B $(fmt_mib "$rb"), C $(fmt_mib "$(cg_usage "$C")"); $(status_of "$MNT" | grep -E "^(stored_bytes|backing_files)=" | tr "\n" " ") shares:"
  getfattr --absolute-names --only-values -n user.chargefs.shares "$MNT" | sed 's/^/    /' >&2
  # P's rise counts B's helper, stopped with the move (1.3 MiB once): taken out, as B's drop shows it.
  check "P holds the file once, B's stopped helper aside (±1 MiB)" near $((rp - rb - BIG_MIB * MiB)) $((BIG_MIB * MiB)) "$SLACK"
  check "B gave it up to P (B's drop is the file, ±1 MiB, and its helper, stopped)" near "$rb" $((-BIG_MIB * MiB)) $((2 * SLACK))
  check "the bytes are intact" [ "$(sha256sum "$MNT/f" | cut -d' ' -f1)" = "$SUM" ]
  rm "$MNT/f"
  nothing_left "$P" "$p00" "$B" 0 "$C" 0
}
t_kill_share_copying() { kill_share copying; }
t_kill_share_published() { kill_share published; }

# No hook: a move timed on the same file first (there and back), then a kill -9 from outside
# halfway through the next one.
t_kill_move_timed() {
  takeover_env "" passthrough=off
  local A; new_cg A a "$BIG_LIMIT"
  local a00; a00=$(cg_usage "$A")
  mkdir "$MNT/d"
  big_file "$MNT/d/big"
  local s e ms
  s=$(date +%s%N); setfattr -n user.chargefs.memcg -v "$A" "$MNT/d"; e=$(date +%s%N)
  ms=$(( (e - s) / 1000000 ))
  setfattr -x user.chargefs.memcg "$MNT/d"
  local t0 a0 pid0; t0=$(( $(cg_usage "$T") - BIG_MIB * MiB )); a0=$(cg_usage "$A"); pid0=$(status_field pid)
  log "  a move of $BIG_MIB MiB took $ms ms; kill -9 of $pid0 $((ms / 2)) ms into the next"
  local rc=0
  setfattr -n user.chargefs.memcg -v "$A" "$MNT/d" 2>"$SCR/err" & local setter=$!
  sleep "$(awk -v m="$ms" 'BEGIN { printf "%.3f", m / 2000 }')"
  kill -9 "$pid0"
  wait "$setter" || rc=$?
  after_kill "setfattr rc=$rc $(cat "$SCR/err")" "$pid0"
  check "getfattr shows A after a success, T after a failure" \
    [ "$(target_of "$MNT/d")" = "$(realpath "$([ "$rc" = 0 ] && echo "$A" || echo "$T")")" ]
  charges_once "$MNT/d/big" "$T" "$t0" "$A" "$a0"
  rm "$MNT/d/big"
  nothing_left "$T" "$T0" "$A" "$a00"
}

# --- the same before 6.9: nothing resends the request in flight ---------------------------------
# within SECS NAME CMD...: runs CMD in the background (a caller of this mount may wait without
# end: never in the foreground), up to SECS. Returns its status (output in $SCR/NAME), or 124
# with CMD left running, its pid in WAITING_NAME.
within() {
  local secs=$1 name=$2 p i; shift 2
  "$@" >"$SCR/$name" 2>&1 & p=$!
  for ((i = 0; i < secs * 10; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$p" 2>/dev/null; then printf -v "WAITING_$name" %s "$p"; return 124; fi
  wait "$p"
}
out_of() { tr '\n' ' ' < "$SCR/$1"; }
state_of() { awk '{print $3}' "/proc/$1/stat" 2>/dev/null || echo gone; }
# ended_within SECS PID: waits for PID (a child) to end, up to SECS; its status in ENDED_RC.
ended_within() {
  local i; ENDED_RC=
  for ((i = 0; i < $1 * 10; i++)); do kill -0 "$2" 2>/dev/null || { ENDED_RC=0; wait "$2" || ENDED_RC=$?; return 0; }; sleep 0.1; done
  return 1
}

# Before 6.9 (the 6.1 guest): the kill after the publish of kill_move_published. The setfattr in
# flight is never resent: its caller waits, and holds the directory's inode lock (vfs_setxattr
# takes it before it sends SETXATTR) while it waits. The successor serves everything that needs no
# such lock: the status, stat and getxattr of the directory (A: the published move), the file's
# bytes through a descriptor opened before and by its cached name, files outside the directory;
# the charge is the file's once, in A. A lookup that misses the cache in the directory waits on the
# lock (state D: SIGKILL cannot end it). Ending the connection (its abort file; an unmount cannot:
# the waiting callers hold the mount) ends them all with an error within seconds; after the
# unmount every charge is back at its baseline and no process is left. Every step on the mount
# runs in the background with a limit, and the connection is aborted by the cleanup and by a
# watchdog, so a hang fails the test instead of the guest.
t_kill_move_published_before_6_9() {
  before_6_9_or_fail "FUSE_NOTIFY_RESEND"
  local BIG_MIB=${CFS_BIG_MIB:-64}   # (charges_once, big_file read it)
  takeover_env published passthrough=off
  local conn; conn=$(cfs_conn_of "$MNT")
  CFS_UNDO+=("cfs_abort_conn '$conn'")   # first in the cleanup: no caller left waiting
  ( trap 'kill $s 2>/dev/null; exit 0' TERM; sleep $((${CFS_THIS_TEST_TIMEOUT:-180} - 30)) & s=$!; wait $s
    log "  watchdog: aborting connection $conn"; cfs_abort_conn "$conn" ) &
  CFS_UNDO+=("kill $! 2>/dev/null")
  local A; new_cg A a "$BIG_LIMIT"
  local a00; a00=$(cg_usage "$A")
  mkdir "$MNT/d" "$MNT/o"
  echo outside > "$MNT/o/f"
  big_file "$MNT/d/big"
  local fd; exec {fd}<"$MNT/d/big"
  local t0 a0 pid0; t0=$(( $(cg_usage "$T") - BIG_MIB * MiB )); a0=$(cg_usage "$A"); pid0=$(status_field pid)
  log "  connection $conn, server $pid0, a ${BIG_MIB} MiB file in d"
  setfattr -n user.chargefs.memcg -v "$A" "$MNT/d" 2>"$SCR/setter.err" & local setter=$!
  local i; for ((i = 0; i < 300; i++)); do kill -0 "$pid0" 2>/dev/null || break; sleep 0.1; done
  check "the server killed itself after the publish" bash -c "! kill -0 $pid0 2>/dev/null"
  check "a successor answers the status within 30 s" within 30 status status_of "$MNT"
  sleep 2
  log "  setfattr $setter: state $(state_of "$setter"), wchan $(cat "/proc/$setter/wchan" 2>/dev/null)"
  check "the setfattr still waits, 2 s after the successor answered (nothing resends it)" \
    grep -qx '[SD]' <<<"$(state_of "$setter")"
  within 10 status status_of "$MNT"
  local succ; succ=$(tr ' ' '\n' < "$SCR/status" | sed -n 's/^pid=//p' | head -1)
  log "  server $pid0 -> ${succ:-none}, $(grep -o 'takeovers=[0-9]*' "$SCR/status")"
  check "one takeover: takeovers=1" grep -qw 'takeovers=1' "$SCR/status"
  FIRST_SERVER=$pid0 SUCCESSOR=$succ
  check "stat of d answered" within 10 stat_d stat -c %i "$MNT/d"
  within 10 getfattr_d target_of "$MNT/d" || true
  check "getfattr of d: A, the published move ($(out_of getfattr_d))" [ "$(cat "$SCR/getfattr_d")" = "$(realpath "$A")" ]
  within 10 getfattr_big target_of "$MNT/d/big" || true
  check "the file shows A too ($(out_of getfattr_big))" [ "$(cat "$SCR/getfattr_big")" = "$(realpath "$A")" ]
  within 30 read_fd bash -c "sha256sum <&$fd" || true
  check "its bytes through a descriptor opened before the kill" [ "$(cat "$SCR/read_fd")" = "$SUM" ]
  within 30 read_path bash -c "sha256sum < '$MNT/d/big'" || true
  check "its bytes by its name (a cached entry)" [ "$(cat "$SCR/read_path")" = "$SUM" ]
  within 10 outside cat "$MNT/o/f" || true
  check "a file outside d read ($(out_of outside))" [ "$(out_of outside)" = "outside " ]
  check "a file created outside d" within 10 create_o bash -c "echo new > '$MNT/o/new'"
  within 10 ls_root ls "$MNT" || true
  check "the root listed ($(out_of ls_root))" [ "$(out_of ls_root)" = "d o " ]
  # The charge: the published move's, once (A has the file, T none of it).
  local ra rt
  for ((i = 0; i <= 50; i++)); do   # (the successor punches the old pages as it starts)
    ra=$(rise "$A" "$a0"); rt=$(rise "$T" "$t0")
    near $((ra + rt)) $((BIG_MIB * MiB)) "$SLACK" && break
    sleep 0.1
  done
  log "  T +$(fmt_mib "$rt"), A +$(fmt_mib "$ra"), sum $(fmt_mib $((ra + rt))) for $(fmt_mib $((BIG_MIB * MiB)))"
  check "A holds the file (±1 MiB, plus its helper)" near "$ra" $((BIG_MIB * MiB)) $((2 * SLACK))
  check "T gave it back (≤ 1 MiB)" le "$rt" "$SLACK"
  check "the sum of both rises is the file's size once (±1 MiB)" near $((ra + rt)) $((BIG_MIB * MiB)) "$SLACK"
  # The lock the setfattr holds: a lookup in d that misses the cache waits on it.
  local rc=0; within 5 lookup stat "$MNT/d/nothere" || rc=$?
  local looker=${WAITING_lookup:-}
  check "a lookup of a new name in d waits too (rc $rc: $(out_of lookup))" [ "$rc" = 124 ]
  if [ -n "$looker" ]; then
    log "  the lookup $looker: state $(state_of "$looker"), wchan $(cat "/proc/$looker/wchan" 2>/dev/null); its stack:"
    sed 's/^/    /' "/proc/$looker/stack" >&2 2>/dev/null || true
    check "in D state (an inode lock, not a request)" [ "$(state_of "$looker")" = D ]
    kill -9 "$looker" 2>/dev/null; sleep 1
    check "SIGKILL does not end it" [ "$(state_of "$looker")" = D ]
  fi
  rc=0; within 3 ls_d ls "$MNT/d" || rc=$?
  check "a listing of d waits (rc $rc: $(out_of ls_d))" [ "$rc" = 124 ]
  rc=0; within 3 create_d bash -c "echo new > '$MNT/d/new'" || rc=$?
  check "a create in d waits (rc $rc: $(out_of create_d))" [ "$rc" = 124 ]
  log "  setfattr $setter: state $(state_of "$setter"), wchan $(cat "/proc/$setter/wchan" 2>/dev/null); its stack:"
  sed 's/^/    /' "/proc/$setter/stack" >&2 2>/dev/null || true
  check "the setfattr still waits ($(state_of "$setter"))" grep -qx '[SD]' <<<"$(state_of "$setter")"
  # Ending the connection ends the waiting callers, with an error.
  local s; s=$(date +%s%N)
  cfs_abort_conn "$conn"
  local ok=0; ended_within 10 "$setter" && ok=1
  log "  after the abort: the setfattr ended in $(( ($(date +%s%N) - s) / 1000000 )) ms, rc ${ENDED_RC:-none}: $(tr '\n' ' ' < "$SCR/setter.err")"
  check "the abort ends the setfattr within 10 s" [ "$ok" = 1 ]
  check "with an error (ECONNABORTED)" grep -q "Software caused connection abort" "$SCR/setter.err"
  if [ -n "$looker" ]; then
    ok=0; ended_within 10 "$looker" && ok=1
    check "and the waiting lookup (rc ${ENDED_RC:-none})" [ "$ok" = 1 ]
  fi
  local w
  for w in ls_d create_d; do
    local v=WAITING_$w; [ -n "${!v:-}" ] || continue
    ok=0; ended_within 10 "${!v}" && ok=1
    check "and the waiting $w (rc ${ENDED_RC:-none}: $(out_of "$w"))" [ "$ok" = 1 ]
  done
  exec {fd}<&-
  nothing_left "$T" "$T0" "$A" "$a00"
}

test_main "target tests" 180 "$@"
