# shellcheck shell=bash
# Shared helpers for chargefs shell tests, the demo and the benchmark.
# Usage: source scripts/tests/lib.sh   (from a bash script with set -euo pipefail)
#
# Works on cgroup v1 (memory controller at /sys/fs/cgroup/memory, this host) and cgroup v2
# (memory in /sys/fs/cgroup/cgroup.controllers, e.g. inside the guest of scripts/vm-run.sh). The version is
# detected from the filesystem; CHARGEFS_CGROUP_VERSION=1|2 forces one.
#
# Everything a script creates through these helpers is recorded and undone by cfs_cleanup
# (call it from an EXIT trap): mounts are unmounted, only pids we started are killed, only
# cgroups we created are removed.

CFS_REPO=${CFS_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
export MiB=$((1024 * 1024))
CFS_PYTHON=${CFS_PYTHON:-$(if [ -x /usr/bin/python3 ]; then echo /usr/bin/python3; else command -v python3 || echo python3; fi)}

# State for cleanup.
CFS_MOUNTS=()   # mountpoints we mounted
CFS_PIDS=()     # daemon pids we started
CFS_CGROUPS=()  # cgroups we created (removed in reverse order)
CFS_DIRS=()     # temp dirs we created
CFS_UNDO=()     # commands that put back what a test changed (a frozen cgroup, a sysfs knob), run first

log() { printf '%s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# --- the daemon binary -----------------------------------------------------------------------
cfs_daemon_bin() {
  if [ -n "${CHARGEFSD:-}" ]; then echo "$CHARGEFSD"; return; fi
  local b
  for b in "$CFS_REPO/.build/debug/chargefsd" "$CFS_REPO/.build/release/chargefsd"; do
    [ -x "$b" ] && { echo "$b"; return; }
  done
  command -v chargefsd || die "chargefsd not found: build it (swift build) or set CHARGEFSD"
}

# --- cgroups ---------------------------------------------------------------------------------
# Prints 1 or 2: which cgroup version carries the memory controller here.
cg_version() {
  if [ -n "${CHARGEFS_CGROUP_VERSION:-}" ]; then echo "$CHARGEFS_CGROUP_VERSION"; return; fi
  if [ -r /sys/fs/cgroup/cgroup.controllers ] && grep -qw memory /sys/fs/cgroup/cgroup.controllers; then
    echo 2
  elif [ -r /sys/fs/cgroup/memory/memory.limit_in_bytes ]; then
    echo 1
  else
    echo 0
  fi
}

# True when cgroup version $1 has a usable memory controller here.
cg_available() {
  case "$1" in
    1) [ -w /sys/fs/cgroup/memory/cgroup.procs ] || [ -r /sys/fs/cgroup/memory/memory.limit_in_bytes ] ;;
    2) [ -r /sys/fs/cgroup/cgroup.controllers ] && grep -qw memory /sys/fs/cgroup/cgroup.controllers ;;
    *) return 1 ;;
  esac
}

# Absolute path of the memory cgroup of pid $1 (default: this shell).
cg_of_pid() {
  local pid=${1:-$BASHPID} rel
  if [ "$(cg_version)" = 1 ]; then
    rel=$(awk -F: '$2 ~ /(^|,)memory(,|$)/ {print $3; exit}' "/proc/$pid/cgroup")
    echo "/sys/fs/cgroup/memory${rel%/}"
  else
    rel=$(awk -F: '$1 == "0" {print $3; exit}' "/proc/$pid/cgroup")
    echo "/sys/fs/cgroup${rel%/}"
  fi
}

# Where our test cgroups go: CFS_CG_PARENT, else below our own memory cgroup.
# On v2 our own cgroup can hold no children with memory enabled while it holds processes
# (no internal processes) unless it is the root; then its parent is used.
cg_parent() {
  if [ -n "${CFS_CG_PARENT:-}" ]; then echo "$CFS_CG_PARENT"; return; fi
  local own; own=$(cg_of_pid "$BASHPID")
  if [ "$(cg_version)" = 2 ] && [ "$own" != /sys/fs/cgroup ]; then
    if ! grep -qw memory "$own/cgroup.subtree_control" 2>/dev/null &&
       ! echo +memory > "$own/cgroup.subtree_control" 2>/dev/null; then
      own=$(dirname "$own")
    fi
  fi
  echo "$own"
}

# cg_create PATH [LIMIT_BYTES]: mkdir a memory cgroup (recorded for cleanup), set its limit.
cg_create() {
  local path=$1 limit=${2:-}
  if [ "$(cg_version)" = 2 ]; then
    local parent; parent=$(dirname "$path")
    grep -qw memory "$parent/cgroup.subtree_control" 2>/dev/null ||
      echo +memory > "$parent/cgroup.subtree_control" ||
      die "cannot enable the memory controller in $parent"
  fi
  mkdir "$path" || die "cannot create cgroup $path"
  CFS_CGROUPS+=("$path")
  [ -z "$limit" ] || cg_set_limit "$path" "$limit"
}

cg_set_limit() {
  if [ "$(cg_version)" = 1 ]; then echo "$2" > "$1/memory.limit_in_bytes"
  else echo "$2" > "$1/memory.max"; fi
}

# Counters (bytes). Usage is hierarchical in both versions.
cg_usage() {
  if [ "$(cg_version)" = 1 ]; then cat "$1/memory.usage_in_bytes"; else cat "$1/memory.current"; fi
}
cg_limit() {
  local v
  if [ "$(cg_version)" = 1 ]; then v=$(cat "$1/memory.limit_in_bytes"); else v=$(cat "$1/memory.max"); fi
  echo "$v"
}
cg_oom_kills() {
  if [ "$(cg_version)" = 1 ]; then
    awk '$1 == "oom_kill" {print $2; f=1} END {if (!f) print 0}' "$1/memory.oom_control"
  else
    awk '$1 == "oom_kill" {print $2; f=1} END {if (!f) print 0}' "$1/memory.events"
  fi
}
# shmem bytes charged to the cgroup and its descendants.
cg_shmem() {
  if [ "$(cg_version)" = 1 ]; then
    awk '$1 == "total_shmem" {print $2; f=1} END {if (!f) print 0}' "$1/memory.stat"
  else
    awk '$1 == "shmem" {print $2; f=1} END {if (!f) print 0}' "$1/memory.stat"
  fi
}
# File pages (page cache, mapped or not) charged to a cgroup and its children, in bytes.
cg_file() {
  if [ "$(cg_version)" = 1 ]; then
    awk '$1 == "total_cache" {c=$2} $1 == "total_shmem" {s=$2} END {print c - s}' "$1/memory.stat"
  else
    awk '$1 == "file" {f=$2} $1 == "shmem" {s=$2} END {print f - s}' "$1/memory.stat"
  fi
}
# Reclaims what can be reclaimed (page cache) from a cgroup with no tasks; best effort.
cg_reclaim() {
  if [ "$(cg_version)" = 1 ]; then echo 0 > "$1/memory.force_empty" 2>/dev/null || true
  else echo 1G > "$1/memory.reclaim" 2>/dev/null || true; fi
}
cg_procs() { cat "$1/cgroup.procs" 2>/dev/null || true; }
# One line: usage, limit, oom kills.
cg_describe() {
  local lim; lim=$(cg_limit "$1")
  case "$lim" in max|9223372036854*) lim=unlimited ;; *) lim="$(fmt_mib "$lim")" ;; esac
  printf 'usage %s  limit %s  oom_kill %s' "$(fmt_mib "$(cg_usage "$1")")" "$lim" "$(cg_oom_kills "$1")"
}

# Removes a cgroup and any child cgroups below it (deepest first). Children left by a daemon
# (chargefs-*) are removed too; processes still inside block removal and are reported.
cg_remove() {
  local path=$1 d i dirs
  [ -d "$path" ] || return 0
  dirs=$(find "$path" -depth -type d)
  # (a here-string, not < <(...): UML guests have no /dev/fd)
  while IFS= read -r d; do
    for i in 1 2 3 4 5 6 7 8 9 10; do
      [ "$(cg_version)" = 1 ] && echo 0 > "$d/memory.force_empty" 2>/dev/null
      rmdir "$d" 2>/dev/null && break
      sleep 0.2
    done
    [ -d "$d" ] && log "warning: could not remove cgroup $d (procs: $(cg_procs "$d" | tr '\n' ' '))"
  done <<<"$dirs"
  [ ! -d "$path" ]
}

# Runs "$@" with its process placed in cgroup $1 first.
cg_run_in() {
  local cg=$1; shift
  ( echo "$BASHPID" > "$cg/cgroup.procs" && exec "$@" )
}

# stage_runtime ROOT FILE...: FILEs and the shared objects they load (ldd: libraries, loader)
# copied into ROOT at the same paths, contents of symlinks, so that `chroot ROOT FILE` runs.
stage_runtime() {
  local root=$1 f lib; shift
  for f in "$@"; do echo "$f"; ldd "$f" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\/.*ld-linux/ {print $1}'; done |
    sort -u | while read -r lib; do
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    done
}
# backing_files MNT: the backing files (FUSE passthrough) of the mount at MNT, from its status.
backing_files() { getfattr --absolute-names --only-values -n user.chargefs.status "$1" | sed -n 's/^backing_files=//p'; }

# --- numbers ---------------------------------------------------------------------------------
fmt_mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }
abs() { local v=$1; echo $(( v < 0 ? -v : v )); }

# --- mounts ----------------------------------------------------------------------------------
# cfs_conn_of MNT: the FUSE connection number of the mount at MNT (its device's minor).
cfs_conn_of() { awk -v m="$1" '$5 == m {split($3, d, ":"); print d[2]; exit}' /proc/self/mountinfo; }
# cfs_abort_conn N: writes 1 to FUSE connection N's abort file (/sys/fs/fuse/connections, or a
# fusectl mounted in a private mount namespace where none is mounted; the host's mounts are not
# changed): every request waiting on it ends with ECONNABORTED, later ones get ENOTCONN. Quiet
# when N is empty or gone.
cfs_abort_conn() {
  [ -n "$1" ] || return 0
  if [ -e "/sys/fs/fuse/connections/$1/abort" ]; then echo 1 > "/sys/fs/fuse/connections/$1/abort" 2>/dev/null; return 0; fi
  local ctl; ctl=$(mktemp -d "${TMPDIR:-/tmp}/cfsctl.XXXXXX")
  unshare -m --propagation private sh -c "mount -t fusectl fusectl '$ctl' && { [ ! -e '$ctl/$1/abort' ] || echo 1 > '$ctl/$1/abort'; }" || true
  rmdir "$ctl" 2>/dev/null || true
}
is_mounted() { awk -v m="$1" '$2 == m {f=1} END {exit !f}' /proc/mounts; }
mount_type() { awk -v m="$1" '$2 == m {print $3; exit}' /proc/mounts; }

# wait_mounted MNT [SECONDS] [PID]: waits until MNT shows in /proc/mounts; fails if PID dies.
wait_mounted() {
  local mnt=$1 secs=${2:-20} pid=${3:-} i
  for ((i = 0; i < secs * 10; i++)); do
    is_mounted "$mnt" && return 0
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    sleep 0.1
  done
  return 1
}

# cfs_mount MNT OPTS [DAEMON_CGROUP]: starts chargefsd in the foreground (-f) as a child of this
# shell (so we know its pid), optionally inside DAEMON_CGROUP and under the command prefix
# CFS_WRAP (e.g. "taskset -c 1": it must exec the daemon), and waits for the mount.
# Sets CFS_PID. Daemon output goes to $CFS_LOGDIR/chargefsd-<n>.log (printed on failure).
# CFS_MOUNT_OPTS (e.g. io_uring=on) is appended to every mount's options.
CFS_PID=
CFS_LOG=
cfs_mount() {
  local mnt=$1 opts=$2${CFS_MOUNT_OPTS:+,$CFS_MOUNT_OPTS} dcg=${3:-} bin
  bin=$(cfs_daemon_bin)
  mkdir -p "$mnt"
  CFS_LOG="${CFS_LOGDIR:-${TMPDIR:-/tmp}}/chargefsd-$$-${#CFS_PIDS[@]}.log"
  local wrap=()
  [ -z "${CFS_WRAP:-}" ] || read -ra wrap <<<"$CFS_WRAP"   # e.g. CFS_WRAP="taskset -c 1"
  if [ -n "$dcg" ]; then
    ( echo "$BASHPID" > "$dcg/cgroup.procs" && exec "${wrap[@]}" "$bin" "$mnt" -o "$opts" -f ) >"$CFS_LOG" 2>&1 &
  else
    "${wrap[@]}" "$bin" "$mnt" -o "$opts" -f >"$CFS_LOG" 2>&1 &
  fi
  CFS_PID=$!
  CFS_PIDS+=("$CFS_PID")
  CFS_MOUNTS+=("$mnt")
  if ! wait_mounted "$mnt" 20 "$CFS_PID"; then
    log "chargefsd did not mount $mnt (opts $opts); its output:"
    sed 's/^/  | /' "$CFS_LOG" >&2 || true
    return 1
  fi
}

# cfs_umount MNT [PID]: unmounts and waits for the daemon to exit (kills it after 10 s).
cfs_umount() {
  local mnt=$1 pid=${2:-} i
  if is_mounted "$mnt"; then
    fusermount3 -u "$mnt" 2>/dev/null || umount "$mnt" 2>/dev/null || fusermount3 -uz "$mnt" 2>/dev/null || umount -l "$mnt" || true
  fi
  if [ -n "$pid" ]; then
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "warning: chargefsd $pid still running 10 s after unmount; killing it"
      kill -9 "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  fi
  ! is_mounted "$mnt"
}

# kernel_at_least MAJOR MINOR: whether the running kernel is at least MAJOR.MINOR.
kernel_at_least() {
  local v; v=$(uname -r); local ma=${v%%.*} rest=${v#*.}; local mi=${rest%%[!0-9]*}
  [ "$ma" -gt "$1" ] || { [ "$ma" = "$1" ] && [ "$mi" -ge "$2" ]; }
}

# cfs_daemons_below DIR: pids of running chargefsd processes whose arguments name a path below
# DIR (an exited one not yet reaped, a zombie, has no arguments left: not running).
cfs_daemons_below() {
  local p
  for p in $(pgrep -x chargefsd || true); do
    tr '\0' '\n' < "/proc/$p/cmdline" 2>/dev/null | grep -qF "$1/" && echo "$p"
  done
  return 0
}

# keepers_below DIR: pids of chargefs-keeper processes (-o takeover) whose arguments name a path
# below DIR.
keepers_below() {
  local p
  for p in $(pgrep -x chargefs-keeper || true); do
    tr '\0' '\n' < "/proc/$p/cmdline" 2>/dev/null | grep -qF "$1/" && echo "$p"
  done
  return 0
}

# cfs_tempdir PREFIX: prints a new temp dir. Called as $(...) it runs in a subshell, so the
# caller must add it to CFS_DIRS itself for cleanup.
cfs_tempdir() {
  local d; d=$(mktemp -d "${TMPDIR:-/tmp}/${1:-chargefs-test}.XXXXXX")
  CFS_DIRS+=("$d")
  echo "$d"
}

# cfs_stage_for_others [FILE...]: copies the daemon (with the programs beside it that it runs)
# and FILEs into a fresh directory every user can enter, and sets CFS_PUBLIC to it. A checkout
# may live where other users cannot search (root's 0700 home, a mktemp -d), and tests that run
# as uid 65534 must not depend on where it lives. Removed by cfs_cleanup.
cfs_stage_for_others() {
  local bin f
  bin=$(cfs_daemon_bin)
  CFS_PUBLIC=$(mktemp -d /tmp/chargefs-public.XXXXXX) || die "cannot create a public directory in /tmp"
  CFS_DIRS+=("$CFS_PUBLIC")
  chmod 755 "$CFS_PUBLIC"
  for f in "$bin" "$(dirname "$bin")"/chargefs-charge-helper "$(dirname "$bin")"/chargefs-keeper "$@"; do
    [ -e "$f" ] || continue
    cp "$f" "$CFS_PUBLIC/" && chmod a+rX "$CFS_PUBLIC/$(basename "$f")"
  done
}

# cfs_new_env PREFIX: a test's scratch dir SCR (its logs too), test cgroup names below cg_parent
# (target T, daemon D: not created yet) and an empty mountpoint MNT. In the caller's shell.
cfs_new_env() {
  SCR=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX"); CFS_DIRS+=("$SCR")
  CFS_LOGDIR=$SCR
  PARENT=$(cg_parent)
  T=$PARENT/$1-$$-target
  D=$PARENT/$1-$$-daemon
  MNT=$SCR/mnt
  mkdir -p "$MNT"
}

# Undo everything recorded above. Safe to call more than once.
cfs_cleanup() {
  local i m p
  for ((i = ${#CFS_UNDO[@]} - 1; i >= 0; i--)); do eval "${CFS_UNDO[i]}" 2>/dev/null || true; done
  CFS_UNDO=()
  for ((i = ${#CFS_MOUNTS[@]} - 1; i >= 0; i--)); do
    m=${CFS_MOUNTS[i]}
    if is_mounted "$m"; then
      fusermount3 -u "$m" 2>/dev/null || umount "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    fi
  done
  for p in "${CFS_PIDS[@]}"; do
    kill -0 "$p" 2>/dev/null || continue
    for ((i = 0; i < 50; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  for ((i = ${#CFS_CGROUPS[@]} - 1; i >= 0; i--)); do
    cg_remove "${CFS_CGROUPS[i]}" || true
  done
  for m in "${CFS_DIRS[@]}"; do
    # never recurse into something still mounted
    if ! awk -v d="$m" 'index($2, d) == 1 {f=1} END {exit !f}' /proc/mounts; then rm -rf "$m"; fi
  done
  CFS_MOUNTS=(); CFS_PIDS=(); CFS_CGROUPS=(); CFS_DIRS=()
}

# --- a tiny test harness -----------------------------------------------------------------------
# Each test is a function t_NAME run in its own bash process under `timeout`, with its own
# EXIT trap; the file prints "N passed, N failed" at the end.
CFS_FAILS=0
check() {  # check "description" COMMAND...
  local what=$1; shift
  if "$@"; then log "  ok: $what"; else log "  FAIL: $what"; CFS_FAILS=$((CFS_FAILS + 1)); fi
}
# near A B TOL: |A-B| <= TOL
near() { [ "$(abs $(($1 - $2)))" -le "$3" ]; }
ge() { [ "$1" -ge "$2" ]; }
le() { [ "$1" -le "$2" ]; }
gt() { [ "$1" -gt "$2" ]; }

# run_tests FILE TIMEOUT NAME...: runs each test in a fresh process, prints the summary line.
# A file may define tmo_NAME (given TIMEOUT, prints the test's own limit); the test sees its limit
# in CFS_THIS_TEST_TIMEOUT.
run_tests() {
  local file=$1 tmo=$2 passed=0 failed=0 name rc t; shift 2
  local failed_names=()
  for name in "$@"; do
    log "=== $name"
    rc=0 t=$tmo
    if declare -F "tmo_$name" >/dev/null; then t=$("tmo_$name" "$tmo"); fi
    CFS_THIS_TEST_TIMEOUT=$t timeout --kill-after=15 "$t" bash "$file" --one "$name" || rc=$?
    if [ "$rc" = 0 ]; then
      passed=$((passed + 1)); log "--- PASS $name"
    else
      failed=$((failed + 1)); failed_names+=("$name")
      if [ "$rc" = 124 ]; then log "--- FAIL $name (timed out after ${t}s)"; else log "--- FAIL $name (exit $rc)"; fi
    fi
  done
  [ "$failed" = 0 ] || log "failed: ${failed_names[*]}"
  echo "$passed passed, $failed failed"
  [ "$failed" = 0 ]
}

# Runs one test function in this process with cleanup traps.
run_one() {
  local name=$1
  trap cfs_cleanup EXIT
  trap 'log "  interrupted"; exit 143' TERM INT
  "t_$name"
  [ "$CFS_FAILS" = 0 ]
}

# test_main WHAT DEFAULT_TIMEOUT ARGS...: the entry point of a test file that defines TESTS and
# t_NAME functions and sets SELF: --one NAME, --list, or run the named (default: all) tests.
test_main() {
  local what=$1 tmo=$2 bin
  shift 2
  if [ "${1:-}" = --one ]; then run_one "$2"; exit; fi
  if [ "${1:-}" = --list ]; then printf '%s\n' "${TESTS[@]}"; exit 0; fi
  if [ "$(id -u)" != 0 ]; then echo "$what need root"; echo "0 passed, 1 failed"; exit 1; fi
  if ! bin=$(cfs_daemon_bin 2>&1); then echo "cannot run: $bin"; echo "0 passed, 1 failed"; exit 1; fi
  log "chargefs $what: daemon $bin"
  local sel=("${TESTS[@]}")
  [ $# = 0 ] || sel=("$@")
  run_tests "$SELF" "${CFS_TEST_TIMEOUT:-$tmo}" "${sel[@]}"
}

# cfs_on_v2 FILE ARGS...: runs the test file FILE (a scripts/tests/*.sh) on cgroup v2's memory
# controller: here when this kernel has it, otherwise inside a guest kernel with cgroup v2
# (scripts/vm-run.sh: User-Mode Linux or QEMU, both 6.1). FILE prints "N passed, N failed"; a run
# that cannot happen prints why and counts as failed. Exits with FILE's status.
cfs_on_v2() {
  local file=$1 vm=$CFS_REPO/scripts/vm-run.sh bin kind rc=0; shift
  if CHARGEFS_CGROUP_VERSION='' cg_available 2; then
    CHARGEFS_CGROUP_VERSION=2 exec bash "$file" "$@"
  fi
  if [ -n "${CHARGEFS_IN_VM:-}" ]; then
    echo "cannot run: inside the guest but no cgroup v2 memory controller"; echo "0 passed, 1 failed"; exit 1
  fi
  if [ ! -f "$vm" ]; then
    echo "cannot run: this host has no cgroup v2 memory controller and scripts/vm-run.sh is missing"
    echo "0 passed, 1 failed"; exit 1
  fi
  if ! bin=$(cfs_daemon_bin 2>&1); then echo "cannot run: $bin"; echo "0 passed, 1 failed"; exit 1; fi
  kind=$(bash "$vm" --which)
  log "no cgroup v2 memory controller here: running $(basename "$file") inside a guest ($kind)"
  # The guest sees the host's / read-only, so paths stay valid; it gets no environment, so pass it.
  bash "$vm" --timeout "${CFS_VM_TIMEOUT:-1500}" -- \
    env CHARGEFS_IN_VM=1 CHARGEFS_CGROUP_VERSION=2 CHARGEFSD="$bin" TMPDIR=/tmp \
    CFS_TEST_TIMEOUT="${CFS_TEST_TIMEOUT:-400}" PATH="$PATH" \
    bash "$file" "$@" || rc=$?
  # FILE printed its own summary line inside the guest; a guest that died prints none.
  if [ "$rc" != 0 ]; then log "$kind guest run exited $rc"; fi
  exit "$rc"
}

# --- kernel knobs a test sets, put back by its EXIT trap (restore_knobs) ----------------------
KNOBS=()   # "path<TAB>old value"
knob_value() { sed -n 's/.*\[\(.*\)\].*/\1/p' "$1"; }
# set_knob PATH VALUE: records the old value (once) and writes the new one.
set_knob() {
  local path=$1 value=$2 old
  old=$(knob_value "$path")
  [ -n "$old" ] || old=$(cat "$path")
  KNOBS+=("$path"$'\t'"$old")
  echo "$value" > "$path"
}
restore_knobs() {
  local i path old
  for ((i = ${#KNOBS[@]} - 1; i >= 0; i--)); do
    path=${KNOBS[i]%%$'\t'*}; old=${KNOBS[i]#*$'\t'}
    echo "$old" > "$path" 2>/dev/null || log "warning: could not put $path back to '$old'"
  done
  KNOBS=()
}
