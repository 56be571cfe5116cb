#!/usr/bin/env bash
# Runs a command inside User-Mode Linux: a real 6.1 kernel with cgroup v2 and its memory
# controller, for tests this hybrid-cgroup host cannot run (see notes/vm.md).
# Usage: scripts/uml-run.sh [--timeout SECS] -- COMMAND...
#
# The guest's root is this host's / (read-only hostfs), so binaries and paths stay valid. Inside:
# proc, sys, devtmpfs, fuse.ko, tmpfs on /tmp /run /dev/shm, cgroup2 on /sys/fs/cgroup with
# +memory in the root's subtree_control; COMMAND runs as root with cwd = the repository and a
# minimal environment: PATH, HOME=/tmp, and this host's CHARGEFS*, CFS_* and SWIFT_SCRATCH
# variables (pass others with `env NAME=VALUE ...`). Its output goes to our stdout
# (the guest console); we exit with its status, 124 when the guest ran out of time, 125 when it
# died without reporting one. Needs the Debian packages user-mode-linux and busybox-static.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
timeout=600
while [ $# -gt 0 ]; do
  case $1 in
    --timeout) timeout=${2:?--timeout needs seconds}; shift 2 ;;
    --) shift; break ;;
    *) echo "usage: $0 [--timeout SECS] -- COMMAND..." >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "usage: $0 [--timeout SECS] -- COMMAND..." >&2; exit 2; }

uml=$(command -v linux.uml || true)
[ -n "$uml" ] || { echo "uml-run: linux.uml not found (apt-get install user-mode-linux)" >&2; exit 125; }
busybox=$(command -v busybox || true)
[ -n "$busybox" ] || { echo "uml-run: busybox not found (apt-get install busybox-static)" >&2; exit 125; }
kver=$("$uml" --version 2>/dev/null | head -n1)
fuse_ko=/usr/lib/uml/modules/$kver/kernel/fs/fuse/fuse.ko
[ -f "$fuse_ko" ] || { echo "uml-run: $fuse_ko missing" >&2; exit 125; }

# A writable host folder the guest mounts to hand back the exit status. Its path goes on the
# kernel command line, so no spaces.
mkdir -p "$repo/.build-uml" 2>/dev/null || true
work=$(mktemp -d "$repo/.build-uml/run.XXXXXX" 2>/dev/null || mktemp -d /tmp/uml-run.XXXXXX)
case $work in *[[:space:]]*) echo "uml-run: scratch path has spaces: $work" >&2; rm -rf "$work"; exit 125 ;; esac
trap 'rm -rf "$work"' EXIT

{
  # Forward the test-suite knobs (the guest gets no environment of its own).
  while IFS= read -r name; do
    printf 'export %s=%q\n' "$name" "${!name}"
  done < <(compgen -e | grep -E '^(CHARGEFS|CFS_|SWIFT_SCRATCH$)' || true)
  printf '%q ' "$@"
  echo
} >"$work/cmd"
cat >"$work/init" <<EOF
#!/bin/bash
# PID 1 of the guest. Whatever happens, write a status and power off (an init that exits panics).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp LANG=C.UTF-8
work=$work
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# fuse.ko before anything is mounted over /tmp (notes/vm.md); /dev/fuse then appears in devtmpfs.
$busybox insmod $fuse_ko || echo 'uml-run: insmod fuse.ko failed' >/dev/console
mkdir -p /dev/shm /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
# A repository under one of those (a CI clone in /tmp) would now be hidden: bring it back.
case $repo/ in /tmp/*|/run/*|/dev/shm/*) mkdir -p $repo && mount -t hostfs -o $repo none $repo ;; esac
mkdir -p \$work && mount -t hostfs -o \$work none \$work
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
echo +memory >/sys/fs/cgroup/cgroup.subtree_control
cd $repo && bash \$work/cmd </dev/null >/dev/console 2>&1
echo \$? >\$work/rc
sync
$busybox poweroff -f
EOF
chmod +x "$work/init"

# timeout signals its whole process group, so UML's host-side helper processes go as well.
rc=0
TMPDIR=/dev/shm timeout -k 5 "$timeout" "$uml" mem=1G root=/dev/root rootfstype=hostfs rootflags=/ ro \
  con=null con0=null,fd:1 loglevel=1 init="$work/init" </dev/null 2>"$work/uml.log" || rc=$?
if [ -s "$work/rc" ]; then
  exit "$(cat "$work/rc")"
fi
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "uml-run: the guest did not finish within $timeout s" >&2
  exit 124
fi
echo "uml-run: the guest ended (status $rc) without reporting the command's status; its log:" >&2
tail -n 20 "$work/uml.log" >&2
exit 125
