#!/usr/bin/env bash
# -o takeover: a chargefsd killed with SIGKILL is replaced by a successor its keeper starts, and
# nothing is lost (issue 21; docs/takeover.md). Root only; Linux 6.9+ for the resend (this host
# is 6.18). Tests:
#   kill_loop     10 kills of the serving process: files, modes, owners, times, xattrs,
#                 symlinks, hard links, a sparse file and a 2 MiB passthrough file identical
#                 after each (a stat/checksum listing made before); a descriptor opened before
#                 the kills reads and writes after each; an appending writer running through
#                 the kills sees no error and loses or repeats no line; after unmount no
#                 chargefsd or keeper is left and the keeper exited 0
#   charge        memcg= target (this host: cgroup v1) and a directory with a target of its own:
#                 both usages unchanged within 1 MiB over 5 kills, writes after charged; after
#                 rm and unmount back near their baselines, no process left, no leaf left
#   crash_loop    a test hook (CHARGEFS_TEST_SUCCESSOR_DIES) makes every successor die: the
#                 keeper stops after 5 successors, aborts the connection, and a stat answers
#                 ENOTCONN within 30 s instead of hanging; the keeper exits 1 and says why
#   kill_10k      10,000 files, 10 kills 1.5 s apart: time from each kill to the first answered
#                 request (a LOOKUP), the successor's own start as the keeper logs it and its
#                 phases (printed); the first successor starts from the first server's own
#                 checkpoint (taken once changes stopped), not from a replay of every create
#   sigterm_after_takeover  background mode (no -f): after a takeover, SIGTERM to the keeper (the
#                 pid that mounted) unmounts: the successor unmounts, both exit, nothing is left
#   keeper_killed kill -9 of the keeper: the server starts a new one (status keeper=), which
#                 then takes over after a kill -9 of the server; 3 rounds; files intact; after
#                 unmount nothing is left
#   dropped_backing two 4 MiB files (each with a backing file), one removed, then kill -9: the
#                 successor replays a journal naming a backing file the keeper has let go of (the
#                 record that dropped it comes later) and takes over; the other file reads back
#   backing_ids_after_replay  two 4 MiB files, kill -9 (the successor rebuilds from the journal),
#                 then two more large files and one of them removed, kill -9 again: the new files
#                 take ids the journal never used (a reused id replaced a live file's backing
#                 file in the keeper, and the next takeover found it gone); all files read back
#   dropped_after_checkpoint  two 4 MiB files, kill -9, 2 s (the successor's checkpoint names both
#                 backing files), one removed, kill -9 again: the checkpoint names a backing file
#                 the keeper let go of after it; the next successor takes over, the other reads back
#   kill_create_excl, kill_unlink, kill_rename, kill_mkdir, kill_link
#                 a test hook (CHARGEFS_TEST_KILL_BEFORE_REPLY=OP) makes the server SIGKILL itself
#                 after it applied the request and before its reply; the kernel resends it to the
#                 successor, which answers what the first would have: open(O_CREAT|O_EXCL)
#                 succeeds (no EEXIST for its own file), rm succeeds (no ENOENT), mv succeeds,
#                 mkdir succeeds, ln succeeds; the tree is as after one application
#   kill_unlink_linked  rm d1/a (d2/b the same file) killed before its reply, d2 listed while
#                 nobody serves and answered first (CHARGEFS_TEST_DELAY_RESENT_REPLY_MS delays
#                 the resent reply): ln d2/b d2/c then succeeds (was ENOENT: the kernel's cached
#                 link count went to 0), and b and c show 2 links
#   kill_unlink_listed_late  the same, but d2 is listed after the successor serves (its first
#                 bump done) and before the resent reply: the successor answers resent requests
#                 first, then bumps again, so the listing's link count cannot undo the kernel's
#                 own decrement either (was ENOENT: the kill loop's one `link: ENOENT` in 50 kills)
#   kill_unlink_listed_held  the same with the window held open: the rm's CPU taken by a bounded
#                 SCHED_FIFO spinner before the resent reply goes (CHARGEFS_TEST_RESENT_REPLY_GATE),
#                 until a READDIRPLUS (then, on a second mount, a GETATTR) queued behind it was
#                 answered: the second bump makes the kernel ignore that answer's link count (was
#                 ENOENT without it: the kernel's cached count 1 before the rm's own decrement)
#   ahead_across_kill  a file appended past 1 MiB (a backing file, a batch charged ahead past its
#                 end) and kept open across a kill -9: st_blocks and df show what tmpfs shows
#                 before the kill, after it, after more appends through the same descriptor and
#                 after its last close; the contents read back; the target's shmem holds a batch
#                 ahead while the file is open, and the successor's last close gives it back
#   replies_mapped  the pages a READ reply is copied from are mapped in the server before the reply
#                 (pagemap), and in its successor: a READ reply copied from an unmapped page failed
#                 with EIO when a kill landed during the copy; a write alone maps nothing
# Usage: scripts/tests/takeover.sh [TEST...] | --list     Env: CHARGEFSD, CFS_TEST_TIMEOUT (180)
# Prints "N passed, N failed"; exit non-zero when any failed.
set -euo pipefail
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=scripts/tests/lib.sh
source "$(dirname "$SELF")/lib.sh"
TESTS=(kill_loop charge crash_loop kill_10k sigterm_after_takeover keeper_killed dropped_backing backing_ids_after_replay dropped_after_checkpoint kill_create_excl kill_unlink kill_rename kill_mkdir kill_link kill_unlink_linked kill_unlink_listed_late kill_unlink_listed_held ahead_across_kill replies_mapped)

new_env() {
  cfs_new_env cfstakeover
}

# server_pid: the serving chargefsd (the keeper's child; the keeper is the pid we started).
server_pid() { pgrep -P "$CFS_PID" -x chargefsd | head -1; }

# kill_and_time N: SIGKILL to the server; once it is dead, a LOOKUP of a new name; prints the
# milliseconds from the kill to its answer (ENOENT), or fails. KILL_TIMES=FILE: also appends
# "death answer" (ms after the kill: the server's exit as its pidfd says, the answer) to FILE.
kill_and_time() {
  local pid; pid=$(server_pid)
  [ -n "$pid" ] || { log "  no server to kill"; return 1; }
  "$CFS_PYTHON" - "$pid" "$MNT/.probe-$1" <<'PY'
import os, select, signal, sys, time
pid, probe = int(sys.argv[1]), sys.argv[2]
signal.alarm(20)
fd = os.pidfd_open(pid)
t0 = time.monotonic()
os.kill(pid, signal.SIGKILL)
select.select([fd], [], [], 10)   # dead: whatever answers next is its successor
t1 = time.monotonic()
try:
    os.stat(probe)
    sys.exit("the probe exists")
except FileNotFoundError:
    pass
t2 = time.monotonic()
print("%.2f" % ((t2 - t0) * 1e3))
if os.environ.get("KILL_TIMES"):
    with open(os.environ["KILL_TIMES"], "a") as f:
        f.write("%.1f %.1f\n" % ((t1 - t0) * 1e3, (t2 - t0) * 1e3))
PY
}

# listing: what must not change across a kill (atime aside: reads move it).
listing() {
  (cd "$MNT" && find . \( -name writer.log -o -name held -o -name '.probe-*' \) -prune -o \
     -printf '%p %y %m %U %G %s %b %n %T@ %C@ %l\n' | sort
   cd "$MNT" && find . -type f ! -name writer.log ! -name held -exec md5sum {} + | sort -k2
   cd "$MNT" && getfattr -R -h -d -m '^user\.t' . 2>/dev/null)
}

populate() {
  mkdir -m 0750 "$MNT/dir" "$MNT/dir/sub"
  chmod 1777 "$MNT/dir/sub"
  for i in $(seq 1 40); do printf 'file %d %s\n' "$i" "$RANDOM$RANDOM" > "$MNT/dir/f$i"; done
  chmod 0640 "$MNT/dir/f1"; chmod 2755 "$MNT/dir/f2"; chmod 0400 "$MNT/dir/f3"
  chown 1234:5678 "$MNT/dir/f4"; chown 65534:65534 "$MNT/dir/sub"
  touch -m -d '2001-02-03 04:05:06.123456789' "$MNT/dir/f5"
  setfattr -n user.t.one -v hello "$MNT/dir/f6"
  setfattr -n user.t.two -v 0x00ff00 "$MNT/dir/f6"
  setfattr -n user.t.dir -v onadir "$MNT/dir/sub"
  ln -s f7 "$MNT/dir/link7"; ln -s /nowhere/at/all "$MNT/dir/dangling"
  ln "$MNT/dir/f8" "$MNT/dir/sub/hard8"
  truncate -s 64M "$MNT/sparse"
  printf 'middle' | dd of="$MNT/sparse" bs=1 seek=$((10 * MiB)) conv=notrunc status=none
  head -c $((2 * MiB)) /dev/urandom > "$SCR/big.src"
  cp "$SCR/big.src" "$MNT/big"
  mknod "$MNT/fifo" p
}

# The writer: appends numbered lines through one O_APPEND descriptor until $SCR/stop exists;
# any error goes to $SCR/writer.err.
start_writer() {
  "$CFS_PYTHON" "$(dirname "$SELF")/appender.py" "$MNT/writer.log" "$SCR/stop" "$SCR/writer.err" &
  WRITER=$!
}

# held_check K: through fds 7 (read-write, opened before the kills) and 8 (read-only, the large
# file: passthrough), a write and a read after kill K.
held_check() {
  "$CFS_PYTHON" - "$1" "$SCR/big.src" <<'PY'
import hashlib, os, sys
k = int(sys.argv[1])
data = b"kill %04d\n" % k
os.pwrite(7, data, k * len(data))
assert os.pread(7, len(data), k * len(data)) == data, "fd 7 reads back what it wrote"
want = hashlib.md5(open(sys.argv[2], "rb").read()).hexdigest()
got = hashlib.md5(b"".join(os.pread(8, 1 << 20, off) for off in range(0, 2 << 20, 1 << 20))).hexdigest()
assert got == want, "fd 8 (the large file, opened before) reads its bytes"
PY
}

t_kill_loop() {
  new_env
  # 10 kills in a few seconds: more than the default bound of 5 successors in 60 s.
  cfs_mount "$MNT" "size=512m,takeover,takeover_max=20"
  local keeper=$CFS_PID k ms before after bad=0 held_bad=0
  populate
  : > "$MNT/held"
  exec 7<>"$MNT/held" 8<"$MNT/big"
  start_writer
  sleep 0.2
  before=$(listing)
  check "the listing has the tree ($(wc -l <<<"$before") lines)" ge "$(wc -l <<<"$before")" 90
  for k in $(seq 1 10); do
    ms=$(kill_and_time "$k") || { log "  kill $k: no answer"; bad=$((bad + 1)); continue; }
    after=$(listing)
    if [ "$after" != "$before" ]; then
      bad=$((bad + 1)); log "  kill $k: the tree differs:"; diff <(echo "$before") <(echo "$after") | head -10 >&2 || true
    fi
    held_check "$k" || held_bad=$((held_bad + 1))
    local st; st=$(getfattr --only-values -n user.chargefs.status "$MNT" 2>/dev/null | grep '^pid=' || true)
    log "  kill $k: answered after $ms ms; $st"
    [ "${st%% *}" = "pid=$(server_pid)" ] || { log "  the status names another pid than the server's"; bad=$((bad + 1)); }
    sleep 0.1
  done
  touch "$SCR/stop"
  local wrc=0; wait "$WRITER" || wrc=$?
  check "the tree identical after each of 10 kills" [ "$bad" = 0 ]
  check "descriptors opened before the kills read and write after each" [ "$held_bad" = 0 ]
  check "the writer saw no error ($(cat "$SCR/writer.err" 2>/dev/null || echo none))" [ "$wrc" = 0 ]
  local lines; lines=$(wc -l < "$MNT/writer.log")
  check "the writer's $lines lines are each there once, in order" "$CFS_PYTHON" -c "
import sys
got = open('$MNT/writer.log', 'rb').read().split(b'\n')[:-1]
sys.exit(0 if got == [b'line %d' % i for i in range(len(got))] and len(got) > 100 else 1)"
  check "10 takeovers in the keeper's log" [ "$(grep -c 'successor .* started' "$CFS_LOG")" = 10 ]
  exec 7<&- 8<&-
  local server; server=$(server_pid)
  cfs_umount "$MNT" "$keeper"
  local rc=0; wait "$keeper" 2>/dev/null || rc=$?
  check "after unmount the keeper is gone" bash -c "! kill -0 $keeper 2>/dev/null"
  check "and the last server ($server) too" bash -c "! kill -0 ${server:-0} 2>/dev/null"
  check "no chargefsd left for this mount" [ -z "$(cfs_daemons_below "$SCR")" ]
  check "no keeper left for this mount" [ -z "$(pgrep -f "chargefs-keeper.*$MNT" || true)" ]
  sed 's/^/  | /' "$CFS_LOG" | tail -4 >&2
}

t_charge() {
  new_env
  cg_create "$T" $((256 * MiB))
  local base; base=$(cg_usage "$T")
  # A directory with a target of its own (user.chargefs.memcg): taken over at its index.
  local T2=$PARENT/cfstakeover-$$-dir
  cg_create "$T2" $((256 * MiB))
  cfs_mount "$MNT" "size=512m,takeover,takeover_max=20,memcg=$T"
  local keeper=$CFS_PID k i
  for i in $(seq 1 64); do head -c 65536 /dev/urandom > "$MNT/s$i"; done
  head -c $((8 * MiB)) /dev/urandom > "$MNT/big"
  mkdir "$MNT/own"
  setfattr -n user.chargefs.memcg -v "$T2" "$MNT/own"
  head -c $((4 * MiB)) /dev/urandom > "$MNT/own/f"
  exec 8<"$MNT/big"
  local u0; u0=$(cg_usage "$T")
  local d0; d0=$(cg_usage "$T2")
  check "the directory's target is charged for its file ($(fmt_mib "$d0"))" ge "$d0" $((4 * MiB))
  check "the target is charged for the files ($(fmt_mib $((u0 - base))))" ge $((u0 - base)) $((12 * MiB))
  local sum0; sum0=$(cd "$MNT" && md5sum s* big | md5sum)
  for k in $(seq 1 5); do
    kill_and_time "$k" >/dev/null || log "  kill $k: no answer"
    local u; u=$(cg_usage "$T")
    log "  kill $k: target usage $(fmt_mib "$u") (before the kills $(fmt_mib "$u0"))"
    check "kill $k: the target's usage unchanged within 1 MiB" near "$u" "$u0" "$MiB"
    check "kill $k: the directory's target's too ($(fmt_mib "$(cg_usage "$T2")"))" near "$(cg_usage "$T2")" "$d0" "$MiB"
  done
  check "the directory still names its target" [ "$(getfattr --only-values -n user.chargefs.memcg "$MNT/own" 2>/dev/null)" = "$T2" ]
  head -c $((2 * MiB)) /dev/urandom > "$MNT/own/g"
  check "a write into it after the kills is charged to its target" near "$(cg_usage "$T2")" $((d0 + 2 * MiB)) "$MiB"
  check "the files read back" [ "$(cd "$MNT" && md5sum s* big | md5sum)" = "$sum0" ]
  # A write after the takeovers is charged through the successor's helper.
  head -c $((4 * MiB)) /dev/urandom > "$MNT/after"
  local u1; u1=$(cg_usage "$T")
  check "a 4 MiB write after the kills is charged to the target ($(fmt_mib $((u1 - u0))))" near $((u1 - u0)) $((4 * MiB)) "$MiB"
  exec 8<&-
  rm -f "$MNT"/s* "$MNT/big" "$MNT/after" "$MNT/own/f" "$MNT/own/g"
  cfs_umount "$MNT" "$keeper"
  check "the directory's target back near empty ($(fmt_mib "$(cg_usage "$T2")"))" le "$(cg_usage "$T2")" "$MiB"
  local end; end=$(cg_usage "$T")
  log "  baseline $(fmt_mib "$base"), after rm and unmount $(fmt_mib "$end")"
  check "after rm and unmount the charge is back near its baseline" near "$end" "$base" "$MiB"
  check "no process left in the target" [ -z "$(cat "$T"/cgroup.procs "$T"/*/cgroup.procs 2>/dev/null)" ]
  check "no leaf left below the target" [ -z "$(find "$T" -mindepth 1 -maxdepth 1 -type d)" ]
  check "no chargefsd left for this mount" [ -z "$(cfs_daemons_below "$SCR")" ]
}

t_crash_loop() {
  new_env
  export CHARGEFS_TEST_SUCCESSOR_DIES=1   # successors only: the first server serves
  cfs_mount "$MNT" "size=64m,takeover"
  unset CHARGEFS_TEST_SUCCESSOR_DIES
  local keeper=$CFS_PID
  echo data > "$MNT/f"
  local t0=$SECONDS
  kill -9 "$(server_pid)"
  local out rc=0
  out=$(timeout 60 stat "$MNT/f" 2>&1) || rc=$?
  local took=$((SECONDS - t0))
  log "  stat after $took s: $out"
  check "the stat ended (not a hang): exit $rc" [ "$rc" != 124 ]
  # The caller that waited through the successors sees the abort (ECONNABORTED); every later
  # one ENOTCONN.
  check "with ECONNABORTED or ENOTCONN" grep -Eq 'Software caused connection abort|Transport endpoint is not connected' <<<"$out"
  check "within 30 s" le "$took" 30
  out=$(timeout 10 stat "$MNT/f" 2>&1) || true
  check "a later stat: ENOTCONN ($out)" grep -q 'Transport endpoint is not connected' <<<"$out"
  local krc=0; wait "$keeper" 2>/dev/null || krc=$?
  check "the keeper exited 1" [ "$krc" = 1 ]
  check "its log says it gave up after 5 successors (the default bound)" grep -q '5 successors in the last 60 s died too: giving up' "$CFS_LOG"
  check "and that it aborted the connection" grep -q 'aborted connection' "$CFS_LOG"
  check "no chargefsd left for this mount" [ -z "$(cfs_daemons_below "$SCR")" ]
  sed 's/^/  | /' "$CFS_LOG" | tail -3 >&2
}

t_kill_10k() {
  new_env
  cfs_mount "$MNT" "size=512m,takeover,takeover_max=20"
  local keeper=$CFS_PID k ms all=()
  "$CFS_PYTHON" - "$MNT" <<'PY'
import os, sys
root = sys.argv[1]
for d in range(100):
    os.mkdir(f"{root}/d{d}")
    for f in range(100):
        with open(f"{root}/d{d}/f{f}", "wb") as h:
            h.write(b"%d/%d\n" % (d, f))
PY
  check "10,000 files" [ "$(find "$MNT" -type f | wc -l)" = 10000 ]
  # Changes have stopped: the first server takes a checkpoint of its own (IdleCheckpoints:
  # the journal unchanged for two samples 0.2 s apart).
  sleep 1
  # 1.5 s apart: each successor has taken its checkpoint (1 s after it serves) before it is
  # killed, so every rebuild reads a checkpoint and a short journal.
  for k in $(seq 1 10); do
    ms=$(KILL_TIMES=$SCR/kill-times kill_and_time "$k") || { log "  kill $k: no answer"; continue; }
    all+=("$ms")
    sleep 1.5
  done
  log "  kill to first answer at 10,000 files (ms): ${all[*]}"
  [ ! -s "$SCR/kill-times" ] || log "  of which the server's own death (ms): $(cut -d' ' -f1 "$SCR/kill-times" | paste -sd' ')"
  log "  successors as the keeper saw them:"
  grep 'serves,' "$CFS_LOG" | sed 's/^/  | /' >&2 || true
  grep 'takeover: pid' "$CFS_LOG" | sed 's/^/  | /' >&2 || true
  check "10 kills answered" [ "${#all[@]}" = 10 ]
  # The first successor's line: "N inodes, T transactions after checkpoint S"; without the
  # first server's checkpoint T was 30,201 (every mkdir, create, write and release).
  local first; first=$(grep -m1 -o '[0-9]* transactions after checkpoint' "$CFS_LOG" | cut -d' ' -f1)
  check "the first takeover replays a short journal ($first transactions), not the whole history" le "${first:-99999}" 100
  check "the files are all there after the kills" [ "$(find "$MNT" -type f | wc -l)" = 10000 ]
  check "and read back" [ "$(cat "$MNT/d42/f17")" = "42/17" ]
  cfs_umount "$MNT" "$keeper"
}

# status_field NAME: a field of the mount's status line pid=... keeper=... takeovers=...
status_field() {
  getfattr --only-values -n user.chargefs.status "$MNT" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$1=//p" | head -1
}

t_keeper_killed() {
  new_env
  cfs_mount "$MNT" "size=64m,takeover,takeover_max=20"
  echo kept > "$MNT/f"
  mkdir "$MNT/d"; head -c $((2 * MiB)) /dev/urandom > "$MNT/d/big"
  local sum; sum=$(md5sum < "$MNT/d/big")
  local round keeper server i
  for round in 1 2 3; do
    keeper=$(status_field keeper); server=$(status_field pid)
    kill -9 "$keeper"
    local new=$keeper
    for ((i = 0; i < 50; i++)); do
      new=$(status_field keeper)
      [ "$new" != "$keeper" ] && kill -0 "$new" 2>/dev/null && break
      sleep 0.1
    done
    check "round $round: keeper $keeper killed, server $server started keeper $new" [ "$new" != "$keeper" ]
    sleep 0.2   # the new keeper has been handed the files
    kill -9 "$server"
    local now=$server
    for ((i = 0; i < 50; i++)); do
      now=$(status_field pid)
      [ -n "$now" ] && [ "$now" != "$server" ] && break
      sleep 0.1
    done
    check "round $round: the new keeper's successor ($now) serves" [ -n "$now" -a "$now" != "$server" ]
    check "round $round: the files are intact" [ "$(cat "$MNT/f")" = kept -a "$(md5sum < "$MNT/d/big")" = "$sum" ]
    check "round $round: takeovers=$(status_field takeovers)" [ "$(status_field takeovers)" = "$round" ]
  done
  keeper=$(status_field keeper); server=$(status_field pid)
  cfs_umount "$MNT"
  for ((i = 0; i < 50; i++)); do kill -0 "$keeper" 2>/dev/null || break; sleep 0.1; done
  check "after unmount the last keeper ($keeper) is gone" bash -c "! kill -0 $keeper 2>/dev/null"
  check "and the last server ($server)" bash -c "! kill -0 $server 2>/dev/null"
  check "no chargefsd left for this mount" [ -z "$(cfs_daemons_below "$SCR")" ]
  check "no keeper left for this mount" [ -z "$(pgrep -f "chargefs-keeper.*$MNT" || true)" ]
  grep -E 'keeper .* died|died \(how' "$CFS_LOG" | sed 's/^/  | /' >&2 || true
}

t_sigterm_after_takeover() {
  new_env
  local bin; bin=$(cfs_daemon_bin)
  "$bin" "$MNT" -o size=64m,takeover || { log "  the mount failed"; return 1; }
  CFS_MOUNTS+=("$MNT")
  local keeper; keeper=$(pgrep -f "chargefs-keeper.*$MNT" | head -1)
  check "a keeper runs" [ -n "$keeper" ]
  [ -n "$keeper" ] || return 1
  CFS_PID=$keeper   # server_pid looks below it
  echo kept > "$MNT/f"
  kill -9 "$(server_pid)"
  check "the file is there after the kill" [ "$(cat "$MNT/f")" = kept ]
  check "a successor serves" [ -n "$(server_pid)" ]
  kill -TERM "$keeper"
  local i; for ((i = 0; i < 100; i++)); do is_mounted "$MNT" || break; sleep 0.1; done
  check "SIGTERM to the keeper unmounted" bash -c "! awk -v m='$MNT' '\$2 == m {f=1} END {exit !f}' /proc/mounts"
  for ((i = 0; i < 50; i++)); do kill -0 "$keeper" 2>/dev/null || break; sleep 0.1; done
  check "the keeper exited" bash -c "! kill -0 $keeper 2>/dev/null"
  check "no chargefsd left for this mount" [ -z "$(cfs_daemons_below "$SCR")" ]
}

# end_clean KEEPER: no takeover found its state corrupt; the takeovers logged; unmounted.
end_clean() {
  check "no corrupt state in the log" bash -c "! grep -q 'corrupt' '$CFS_LOG'"
  grep -E 'takeover:|keeper:' "$CFS_LOG" | sed 's/^/  | /' >&2 || true
  cfs_umount "$MNT" "$1"
}

t_dropped_backing() {
  new_env
  cfs_mount "$MNT" "size=64m,takeover"
  local keeper=$CFS_PID
  head -c $((4 * MiB)) /dev/urandom > "$MNT/gone"
  head -c $((4 * MiB)) /dev/urandom > "$MNT/kept"
  check "two backing files ($(backing_files "$MNT"))" [ "$(backing_files "$MNT")" = 2 ]
  local sum; sum=$(md5sum < "$MNT/kept")
  rm "$MNT/gone"
  local ms; ms=$(kill_and_time 1) || ms=""
  check "the kill answered (${ms:-no answer} ms)" [ -n "$ms" ]
  check "the file that kept its backing file reads back" [ "$(md5sum < "$MNT/kept" 2>/dev/null)" = "$sum" ]
  check "the removed one stays removed (ENOENT)" grep -q 'No such file' <<<"$(stat "$MNT/gone" 2>&1)"
  end_clean "$keeper"
}

t_backing_ids_after_replay() {
  new_env
  cfs_mount "$MNT" "size=64m,takeover"
  local keeper=$CFS_PID f ms
  for f in a b; do head -c $((4 * MiB)) /dev/urandom > "$MNT/$f"; done
  local sums; sums=$(cd "$MNT" && md5sum a b)
  ms=$(kill_and_time 1) || ms=""
  check "the first kill answered (${ms:-no answer} ms)" [ -n "$ms" ]
  for f in c d; do head -c $((4 * MiB)) /dev/urandom > "$MNT/$f"; done
  rm "$MNT/d"
  sums="$sums
$(cd "$MNT" && md5sum c)"
  check "three backing files ($(backing_files "$MNT"))" [ "$(backing_files "$MNT")" = 3 ]
  ms=$(kill_and_time 2) || ms=""
  check "the second kill answered (${ms:-no answer} ms)" [ -n "$ms" ]
  check "a, b and c read back" [ "$(cd "$MNT" && md5sum a b c 2>/dev/null)" = "$sums" ]
  end_clean "$keeper"
}

t_dropped_after_checkpoint() {
  new_env
  cfs_mount "$MNT" "size=64m,takeover"
  local keeper=$CFS_PID f ms
  for f in gone kept; do head -c $((4 * MiB)) /dev/urandom > "$MNT/$f"; done
  local sum; sum=$(md5sum < "$MNT/kept")
  ms=$(kill_and_time 1) || ms=""
  check "the first kill answered (${ms:-no answer} ms)" [ -n "$ms" ]
  sleep 2   # the successor takes its checkpoint 1 s after it serves
  rm "$MNT/gone"
  ms=$(kill_and_time 2) || ms=""
  check "the second kill answered (${ms:-no answer} ms)" [ -n "$ms" ]
  check "the successor read a checkpoint" grep -q 'after checkpoint [1-9]' "$CFS_LOG"
  check "the file that kept its backing file reads back" [ "$(md5sum < "$MNT/kept" 2>/dev/null)" = "$sum" ]
  end_clean "$keeper"
}

# kill_op OP COMMAND...: mounts with the kill hook armed for OP, runs COMMAND (which must
# succeed although the server died answering it), and checks a takeover happened.
kill_op() {
  local op=$1; shift
  new_env
  mkdir -p "$MNT"
  export CHARGEFS_TEST_KILL_BEFORE_REPLY=$op
  cfs_mount "$MNT" "size=64m,takeover"
  unset CHARGEFS_TEST_KILL_BEFORE_REPLY
  KEEPER=$CFS_PID
  PREP_DONE=1
}

resent_ok() {
  check "the server died before answering, and one successor took over" [ "$(grep -c 'successor .* started' "$CFS_LOG")" = 1 ]
  check "the successor asked for the resend" grep -q 'resend asked' "$CFS_LOG"
  cfs_umount "$MNT" "$KEEPER"
}

t_kill_create_excl() {
  kill_op create
  local out rc=0
  out=$("$CFS_PYTHON" -c "
import os, sys
fd = os.open('$MNT/new', os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o640)
os.write(fd, b'mine')
os.close(fd)" 2>&1) || rc=$?
  check "open(O_CREAT|O_EXCL) succeeded across the kill ($out)" [ "$rc" = 0 ]
  check "the file holds what was written" [ "$(cat "$MNT/new" 2>/dev/null)" = mine ]
  check "with mode 0640" [ "$(stat -c %a "$MNT/new")" = 640 ]
  check "one entry" [ "$(ls "$MNT" | wc -l)" = 1 ]
  resent_ok
}

t_kill_unlink() {
  kill_op unlink
  echo x > "$MNT/gone"; echo y > "$MNT/stays"
  local out rc=0
  out=$(rm "$MNT/gone" 2>&1) || rc=$?
  check "rm succeeded across the kill ($out)" [ "$rc" = 0 ]
  check "the file is gone, the other stays" [ "$(ls "$MNT")" = stays ]
  resent_ok
}

t_kill_rename() {
  kill_op rename
  echo moved > "$MNT/a"; echo other > "$MNT/c"
  local out rc=0
  out=$(mv "$MNT/a" "$MNT/b" 2>&1) || rc=$?
  check "mv succeeded across the kill ($out)" [ "$rc" = 0 ]
  check "a is gone, b holds its data" [ "$(ls "$MNT" | tr '\n' ' ')" = "b c " ] && [ "$(cat "$MNT/b")" = moved ]
  resent_ok
}

t_kill_mkdir() {
  kill_op mkdir
  local out rc=0
  out=$(mkdir -m 0710 "$MNT/dir" 2>&1) || rc=$?
  check "mkdir succeeded across the kill ($out)" [ "$rc" = 0 ]
  check "the directory is there with its mode" [ "$(stat -c %a "$MNT/dir")" = 710 ]
  check "and holds nothing" [ -z "$(ls -A "$MNT/dir")" ]
  resent_ok
}

t_kill_link() {
  kill_op link
  echo x > "$MNT/a"
  local out rc=0
  out=$(ln "$MNT/a" "$MNT/b" 2>&1) || rc=$?
  check "ln succeeded across the kill ($out)" [ "$rc" = 0 ]
  check "both names, one inode with 2 links" [ "$(stat -c '%i %h' "$MNT/a")" = "$(stat -c '%i %h' "$MNT/b" 2>/dev/null)" ] && \
    [ "$(stat -c %h "$MNT/a")" = 2 ]
  resent_ok
}

# kill_unlink_linked: a file with names d1/a and d2/b; rm d1/a dies before its reply (the hook),
# and while no server serves another process lists d2 (a READDIRPLUS queued behind the resend;
# the successor answers it first, as the resent rm's reply waits 400 ms; the same directory
# would wait for the rm's lock). The listing carries the file's link count after the rm (1), and
# the kernel then ends the rm with its own decrement (fuse_entry_unlinked): the cached count was
# 0 and ln d2/b failed with ENOENT (vfs_link refuses an inode with no links), the stress kill
# loop's one error. The successor now bumps the attribute version of such inodes before it serves
# (FUSE_NOTIFY_INVAL_INODE), so the kernel drops that listing's stale-to-be count; and since
# resent requests are answered first (ResentFirst), the listing now waits for the rm's reply.

# unlink_linked_case DELAY_MS WHEN: d1/a and d2/b one file; rm d1/a dies before its reply (the
# hook), the successor's resent reply waits DELAY_MS; d2 is listed WHEN=early (while nobody
# serves) or late (100 ms after the successor logged that it serves); then ln d2/b d2/c.
unlink_linked_case() {
  export CHARGEFS_TEST_DELAY_RESENT_REPLY_MS=$1
  kill_op unlink
  unset CHARGEFS_TEST_DELAY_RESENT_REPLY_MS
  mkdir "$MNT/d1" "$MNT/d2"; echo x > "$MNT/d1/a"; ln "$MNT/d1/a" "$MNT/d2/b"
  local out rc=0
  out=$("$CFS_PYTHON" - "$MNT" "$CFS_LOG" "$2" <<'PY' 2>&1
import os, select, sys, time
mnt, log, when = sys.argv[1], sys.argv[2], sys.argv[3]
d = os.path.join(mnt, "d2")
status = dict(kv.split("=", 1) for kv in os.getxattr(mnt, "user.chargefs.status").decode().split() if "=" in kv)
server = os.pidfd_open(int(status["pid"]))
dirfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)   # opened now: the listing below is one READDIRPLUS
child = os.fork()
if child == 0:
    try:
        os.unlink(os.path.join(mnt, "d1", "a"))
        os._exit(0)
    except OSError as e:
        print("rm a:", e)
        os._exit(1)
if not select.select([server], [], [], 20)[0]:
    sys.exit("the server did not die at the rm")
if when == "late":
    deadline = time.monotonic() + 20
    while " serves (takeover" not in open(log, errors="replace").read():
        if time.monotonic() > deadline:
            sys.exit("no successor served within 20 s")
        time.sleep(0.01)
    time.sleep(0.1)
t0 = time.monotonic()
names = sorted(os.listdir(dirfd))
listed_ms = (time.monotonic() - t0) * 1e3
_, st = os.waitpid(child, 0)
if st != 0:
    sys.exit("rm a failed")
if names != ["b"]:
    sys.exit("the listing shows %s" % names)
try:
    os.link(os.path.join(d, "b"), os.path.join(d, "c"))
except OSError as e:
    sys.exit("ln b c: %s (the listing answered in %.0f ms)" % (e, listed_ms))
print("listing answered in %.0f ms; nlink %d" % (listed_ms, os.stat(os.path.join(d, "b")).st_nlink))
PY
) || rc=$?
  check "rm d1/a, a listing of d2 ($2), then ln d2/b d2/c succeed ($out)" [ "$rc" = 0 ]
  check "b and c: one inode with 2 links" [ "$(stat -c '%i %h' "$MNT/d2/b")" = "$(stat -c '%i %h' "$MNT/d2/c" 2>/dev/null)" ] && \
    [ "$(stat -c %h "$MNT/d2/b")" = 2 ]
}

t_kill_unlink_linked() {
  unlink_linked_case 400 early
  resent_ok
}

# kill_unlink_listed_late: as kill_unlink_linked, but d2 is listed once the successor logged that
# it serves (100 ms later), while the resent UNLINK's reply waits 600 ms: answered at once, the
# listing brought the count after the unlink and the kernel's decrement at the late reply took it
# to 0 (`ln` ENOENT); the successor now holds the listing until every resent request is
# answered, then bumps the attribute versions again.
t_kill_unlink_listed_late() {
  unlink_linked_case 600 late
  check "the successor answered the resent UNLINK before any other request" grep -q 'answered 1 resent requests before any other' "$CFS_LOG"
  resent_ok
}

# kill_unlink_listed_held: the window kill_unlink_listed_late leaves to chance. The successor's
# second bump (after the resent requests are answered) is for a request sent after its first bump
# and answered after the resent UNLINK's reply but before the unlinking caller has run its end of
# the UNLINK: the kernel's decrement (fuse_entry_unlinked) runs in the caller once it wakes, and
# the caller usually wakes first. Here it cannot: the rm is pinned to one CPU, the daemon and the
# rest to another, and a SCHED_FIFO spinner (scripts/tests/unlink_held.py: at most 300 ms, its own
# RLIMIT_RTTIME past that) takes the rm's CPU before CHARGEFS_TEST_RESENT_REPLY_GATE lets the
# resent reply go; it is killed once the request queued meanwhile (a READDIRPLUS of d2, then on a
# second mount a GETATTR of d2/b) was answered. Without the second bump the kernel took that
# answer's count (1), its own decrement left 0 and ln d2/b d2/c failed with ENOENT.
held_case() {
  local how=$1 cpus cpu_a cpu_b rt out rc=0
  cpus=$("$CFS_PYTHON" -c 'import os; c = sorted(os.sched_getaffinity(0)); print(c[0], c[-1])')
  read -r cpu_a cpu_b <<<"$cpus"
  rt=$(cat /proc/sys/kernel/sched_rt_runtime_us)
  if [ "$cpu_a" = "$cpu_b" ] || { [ "$rt" != -1 ] && [ "$rt" -lt 350000 ]; }; then
    check "two CPUs ($cpus) and SCHED_FIFO for 350 ms a period (sched_rt_runtime_us=$rt)" false
    return 0
  fi
  new_env
  CFS_UNDO+=("kill_spinner '$SCR/spinner.pid'")
  export CHARGEFS_TEST_KILL_BEFORE_REPLY=unlink CHARGEFS_TEST_RESENT_REPLY_GATE=$SCR/gate
  CFS_WRAP="taskset -c $cpu_a" cfs_mount "$MNT" "size=64m,takeover"
  unset CHARGEFS_TEST_KILL_BEFORE_REPLY CHARGEFS_TEST_RESENT_REPLY_GATE
  KEEPER=$CFS_PID
  mkdir "$MNT/d1" "$MNT/d2"; echo x > "$MNT/d1/a"; ln "$MNT/d1/a" "$MNT/d2/b"
  out=$("$CFS_PYTHON" "$(dirname "$SELF")/unlink_held.py" "$MNT" "$CFS_LOG" "$SCR/gate" "$SCR/spinner.pid" "$how" "$cpu_a" "$cpu_b" 2>&1) || rc=$?
  check "rm d1/a held on CPU $cpu_b past the answer to a $how queued behind its resent reply, then ln d2/b d2/c ($out)" [ "$rc" = 0 ]
  local sb sc
  sb=$(stat -c '%i %h' "$MNT/d2/b" 2>/dev/null) || sb=none
  sc=$(stat -c '%i %h' "$MNT/d2/c" 2>/dev/null) || sc=none
  check "b and c: one inode with 2 links (inode and links: b $sb, c $sc)" [ "$sb" = "$sc" -a "${sb#* }" = 2 ]
  check "the successor answered the resent UNLINK before any other request" grep -q 'answered 1 resent requests before any other' "$CFS_LOG"
  resent_ok
}

# kill_spinner PIDFILE: SIGKILL to unlink_held.py's spinner if it is still there (by its pid, and
# only if that pid is still named cfs-rt-spinner).
kill_spinner() {
  local pid; pid=$(cat "$1" 2>/dev/null) || return 0
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != cfs-rt-spinner ] || kill -9 "$pid" 2>/dev/null || true
}

# Two mounts of about a second each; 90 s at most (the spinner is bounded on its own).
tmo_kill_unlink_listed_held() { echo $(($1 < 90 ? $1 : 90)); }

t_kill_unlink_listed_held() {
  held_case list
  held_case stat
}

t_ahead_across_kill() {
  new_env
  cg_create "$T" $((256 * MiB))
  cfs_mount "$MNT" "size=512m,takeover,takeover_max=20,memcg=$T"
  local keeper=$CFS_PID out rc=0
  out=$("$CFS_PYTHON" - "$MNT" "$T/memory.stat" <<'PY' 2>&1
import hashlib, os, select, signal, sys
mnt, memory_stat = sys.argv[1], sys.argv[2]
path = os.path.join(mnt, "grow")
def shmem():
    fields = dict(line.split() for line in open(memory_stat))
    return int(fields.get("total_shmem", fields.get("shmem", 0)))
h, size = hashlib.sha256(), 0
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
def append(data):
    global size
    os.write(fd, data); h.update(data); size += len(data)
def expect(where):
    pages = (size + 4095) // 4096
    blocks = os.stat(path).st_blocks
    st = os.statvfs(mnt)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    if blocks != pages * 8 or used != pages * 4096:
        sys.exit("%s: st_blocks %d and df used %d bytes; tmpfs shows %d and %d" % (where, blocks, used, pages * 8, pages * 4096))
for _ in range(24):
    append(os.urandom(128 << 10))       # 3 MiB: a backing file since 1 MiB, a batch ahead
expect("before the kill")
status = dict(kv.split("=", 1) for kv in os.getxattr(mnt, "user.chargefs.status").decode().split() if "=" in kv)
signal.alarm(30)
server = os.pidfd_open(int(status["pid"]))
os.kill(int(status["pid"]), signal.SIGKILL)
select.select([server], [], [], 10)
try:
    os.stat(os.path.join(mnt, ".probe"))
    sys.exit("the probe exists")
except FileNotFoundError:
    pass
signal.alarm(0)
after = dict(kv.split("=", 1) for kv in os.getxattr(mnt, "user.chargefs.status").decode().split() if "=" in kv)
if after["pid"] == status["pid"]:
    sys.exit("no successor serves")
expect("after the kill")
for _ in range(8):
    append(os.urandom(128 << 10))
append(os.urandom(3000))
expect("appended after the kill")
open_shmem = shmem()
os.close(fd)
expect("after the last close")
with open(path, "rb") as f:
    if hashlib.sha256(f.read()).hexdigest() != h.hexdigest():
        sys.exit("the file does not read back")
print(size, open_shmem)
PY
) || rc=$?
  check "st_blocks and df as on tmpfs across the kill, the appends and the close; the file reads back ($out)" [ "$rc" = 0 ]
  local file=$(( (4 * MiB + 3000 + 4095) / 4096 * 4096 )) shm; shm=$(cg_shmem "$T")
  local open_shm=${out#* }; [[ "$open_shm" =~ ^[0-9]+$ ]] || open_shm=0
  check "while it was open, a batch was charged ahead of its end (shmem $open_shm bytes, file $file)" gt "$open_shm" "$file"
  check "its last close, in the successor, gave the batch back (shmem $open_shm -> $shm bytes)" ge $((open_shm - shm)) $((32 * 4096))
  check "the target's shmem holds the file and at most the reserve ($(fmt_mib "$shm"), file $(fmt_mib "$file"))" \
    le "$shm" $((file + 64 * 4096))
  rm -f "$MNT/grow"
  cfs_umount "$MNT" "$keeper"
  check "no leaf left below the target" [ -z "$(find "$T" -mindepth 1 -maxdepth 1 -type d)" ]
}

# mapped_pages SERVER: how many pages of the server's arena mapping have a page-table entry
# (/proc/PID/pagemap bit 63; the arena is the shared mapping that is not a state memfd).
mapped_pages() {
  "$CFS_PYTHON" - "$1" <<'PY'
import struct, sys
pid, present = int(sys.argv[1]), 0
for line in open("/proc/%d/maps" % pid):
    if " rw-s " in line and ("chargefs-arena" in line or "memfd:" not in line):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        with open("/proc/%d/pagemap" % pid, "rb") as f:
            f.seek(lo // 4096 * 8)
            present += sum(e >> 63 for (e,) in struct.iter_unpack("<Q", f.read((hi - lo) // 4096 * 8)))
print(present)
PY
}

# replies_mapped: the pages a READ reply is copied from are in the server's page tables before
# the reply, before and after a takeover: a reply copied from an unmapped page takes the kernel's
# slow path, which fails the copy with EIO when a kill lands during it (stress.sh kill_loop's
# `read: EIO`). Data is stored with pwrite (which maps nothing), and a page is mapped at the first
# read that replies from it, not when it is charged (that zero-filled every page before its first
# write: 6% of the server's CPU in 4 KiB creates). Before the first fix: 0 of 64 mapped when
# the reply was copied.
t_replies_mapped() {
  new_env
  cfs_mount "$MNT" "size=64m,takeover"
  local keeper=$CFS_PID n
  head -c $((256 * 1024)) /dev/urandom > "$MNT/f"
  n=$(mapped_pages "$(server_pid)")
  check "the 64 pages just written are not mapped by the write ($n mapped)" [ "$n" -lt 64 ]
  cat "$MNT/f" > /dev/null
  n=$(mapped_pages "$(server_pid)")
  check "the read mapped the 64 pages it replied from ($n mapped)" [ "$n" -ge 64 ]
  local ms; ms=$(kill_and_time 1) || ms=""
  check "the kill answered (${ms:-no answer} ms)" [ -n "$ms" ]
  n=$(mapped_pages "$(server_pid)")
  check "the successor maps the pages its files hold at its start ($n mapped)" [ "$n" -ge 64 ]
  head -c $((256 * 1024)) /dev/urandom > "$MNT/g"
  cat "$MNT/g" > /dev/null
  n=$(mapped_pages "$(server_pid)")
  check "the successor maps the old pages and, once read, the 64 new ones ($n mapped)" [ "$n" -ge 128 ]
  end_clean "$keeper"
}

test_main "takeover tests" 180 "$@"
