#!/usr/bin/env bash
# The cgroup v2 guest runner itself (scripts/vm-run.sh), on each guest this machine can boot:
# the probe's choice, the status a guest reports, what a guest that dies or hangs comes to.
# Usage: scripts/tests/vm.sh [TEST...]   (--list names them)   Prints "N passed, N failed".
#   probe_falls_back  a UML that cannot boot (a stand-in linux.uml that dies) makes the probe pick QEMU
#   probe_cached      the probe's answer is kept for the host's boot: a second --which boots nothing
#   uml_status        UML: a cgroup v2 kernel with memory and /dev/fuse; the command's status comes back
#                     (on a CPU with AMX, where UML aborts: the probe passed it over, and rightly)
#   qemu_status       QEMU: the same, on Debian 12's own kernel
#   qemu_died         QEMU: a guest whose kernel panics before reporting gives 125 and its log
#   qemu_reported     QEMU: a guest that dies after reporting keeps the reported status
#   qemu_timeout      QEMU: a guest that hangs gives 124 within the limit
set -euo pipefail
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=scripts/tests/lib.sh
source "$(dirname "$SELF")/lib.sh"
VM=$CFS_REPO/scripts/vm-run.sh
TESTS=(probe_falls_back probe_cached uml_status qemu_status qemu_died qemu_reported qemu_timeout)

# A command for the guest that shows what it is; exits 7 so a status that comes back is not a default.
SHOW='uname -r; grep -qw memory /sys/fs/cgroup/cgroup.controllers && echo v2-memory; [ -c /dev/fuse ] && echo fuse; echo kind=$CHARGEFS_VM_KIND; exit 7'

boots() {  # boots KIND: runs SHOW in guest KIND and checks what came back
  local kind=$1 out rc=0 t0=$SECONDS
  out=$(bash "$VM" --vm "$kind" --timeout 300 -- bash -c "$SHOW" 2>&1) || rc=$?
  log "  $kind: exit $rc after $((SECONDS - t0)) s: $(grep -v '^\[' <<<"$out" | tr '\n' ' ')"
  check "$kind guest: the command's status (7) comes back" [ "$rc" = 7 ]
  check "$kind guest: cgroup v2 with the memory controller" grep -qx v2-memory <<<"$out"
  check "$kind guest: /dev/fuse" grep -qx fuse <<<"$out"
  check "$kind guest: CHARGEFS_VM_KIND=$kind inside" grep -qx "kind=$kind" <<<"$out"
}

t_probe_falls_back() {
  local dir; dir=$(cfs_tempdir vmprobe); CFS_DIRS+=("$dir")  # (a subshell made it: record it here)
  # a linux.uml that dies as the AMX-stricken one does (the probe boot never reports)
  printf '#!/bin/sh\n[ "$1" = --version ] && { echo 6.1.0; exit 0; }\necho "userspace - ptrace set fp regs failed, errno = 14" >&2; exit 1\n' >"$dir/linux.uml"
  chmod +x "$dir/linux.uml"
  mkdir -p "$dir/modules/6.1.0/kernel/fs/fuse"; : >"$dir/modules/6.1.0/kernel/fs/fuse/fuse.ko"
  local out
  out=$(env -u CHARGEFS_VM PATH="$dir:$PATH" CHARGEFS_VM_CACHE="$dir/cache" CHARGEFS_UML_MODULES="$dir/modules" \
        bash "$VM" --which 2>&1) || true
  check "a UML that cannot boot: the probe picks qemu (said: $out)" [ "$out" = qemu ]
  out=$(env -u CHARGEFS_VM PATH="$dir:$PATH" CHARGEFS_VM_CACHE="$dir/cache" CHARGEFS_UML_MODULES="$dir/modules" \
        bash "$VM" --vm uml --which 2>&1) || true
  check "--vm uml forces uml whatever the probe said" [ "$out" = uml ]
}

t_probe_cached() {
  local dir first second t0; dir=$(cfs_tempdir vmprobe); CFS_DIRS+=("$dir")
  first=$(env -u CHARGEFS_VM CHARGEFS_VM_CACHE="$dir" bash "$VM" --which)
  t0=$(date +%s%N)
  second=$(env -u CHARGEFS_VM CHARGEFS_VM_CACHE="$dir" bash "$VM" --which)
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  log "  probe: $first, again: $second in $ms ms"
  check "the probe answers uml or qemu" grep -qxE 'uml|qemu' <<<"$first"
  check "the same answer the second time" [ "$first" = "$second" ]
  check "from the cache (one file for this boot)" [ -s "$dir/probe-$(cat /proc/sys/kernel/random/boot_id)" ]
}

# Where UML boots, it must serve; where it cannot (CPUs with AMX), the probe must have seen that,
# and a forced UML run must fail as that CPU makes it fail (125: the guest died unreported).
t_uml_status() {
  if [ "$(env -u CHARGEFS_VM bash "$VM" --which)" = uml ]; then boots uml; return; fi
  local amx=no rc=0; grep -qw amx_tile /proc/cpuinfo && amx=yes
  log "  the probe chose qemu; amx_tile in /proc/cpuinfo: $amx"
  check "UML is passed over only on a CPU with AMX (where Debian 12's UML aborts)" [ "$amx" = yes ]
  bash "$VM" --vm uml --timeout 60 -- true >/dev/null 2>&1 || rc=$?
  check "there a forced UML run dies unreported (125, got $rc)" [ "$rc" = 125 ]
}
t_qemu_status() { boots qemu; }

t_qemu_died() {
  local out rc=0
  out=$(bash "$VM" --vm qemu --timeout 300 -- bash -c 'echo 1 >/proc/sys/kernel/sysrq; echo c >/proc/sysrq-trigger; sleep 60' 2>&1) || rc=$?
  check "a guest that panics before reporting: exit 125 (got $rc)" [ "$rc" = 125 ]
  check "with the guest's log" grep -q "without reporting the command's status" <<<"$out"
}

t_qemu_reported() {
  local out rc=0
  # the status is written by the guest's init as soon as the command ends; a kernel that panics
  # right after (here: a crash 1 s later, during the init's sync and power-off) changes nothing
  out=$(bash "$VM" --vm qemu --timeout 300 -- bash -c '(sleep 1; echo 1 >/proc/sys/kernel/sysrq; echo c >/proc/sysrq-trigger) & exit 5' 2>&1) || rc=$?
  check "a guest that dies after reporting keeps the reported status 5 (got $rc)" [ "$rc" = 5 ]
}

t_qemu_timeout() {
  local rc=0 t0=$SECONDS before after p left=
  before=$(pgrep -x qemu-system-x86 || true)   # (the kernel's 15-character name)
  bash "$VM" --vm qemu --timeout 60 -- sleep 600 >/dev/null 2>&1 || rc=$?
  check "a guest that hangs: exit 124 (got $rc)" [ "$rc" = 124 ]
  check "within the limit (60 s + 10 s to end it): $((SECONDS - t0)) s" le $((SECONDS - t0)) 70
  after=$(pgrep -x qemu-system-x86 || true)
  for p in $after; do grep -qx "$p" <<<"$before" || left+=" $p"; done
  check "no qemu of this test left behind${left:+ (pids$left)}" [ -z "$left" ]
}

test_main "vm runner tests" 400 "$@"
