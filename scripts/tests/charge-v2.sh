#!/usr/bin/env bash
# The charging tests (charge.sh) on cgroup v2's memory controller.
# Usage: scripts/tests/charge-v2.sh [TEST...]
# Runs them here when this kernel has memory on cgroup v2; otherwise boots a guest kernel with
# cgroup v2 (scripts/vm-run.sh: User-Mode Linux or QEMU, both 6.1) and runs them inside. Prints
# "N passed, N failed"; a run that cannot happen prints why and counts as failed.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=scripts/tests/lib.sh
source "$here/lib.sh"

if CHARGEFS_CGROUP_VERSION='' cg_available 2; then
  CHARGEFS_CGROUP_VERSION=2 exec bash "$here/charge.sh" "$@"
fi
if [ -n "${CHARGEFS_IN_VM:-}" ]; then
  echo "cannot run: inside the guest but no cgroup v2 memory controller"; echo "0 passed, 1 failed"; exit 1
fi
vm=$repo/scripts/vm-run.sh
if [ ! -f "$vm" ]; then
  echo "cannot run: this host has no cgroup v2 memory controller and scripts/vm-run.sh is missing"
  echo "0 passed, 1 failed"
  exit 1
fi
if ! bin=$(cfs_daemon_bin 2>&1); then echo "cannot run: $bin"; echo "0 passed, 1 failed"; exit 1; fi
kind=$(bash "$vm" --which)
log "no cgroup v2 memory controller here: running the tests inside a guest ($kind)"
# The guest sees the host's / read-only, so paths stay valid; it gets no environment, so pass it.
rc=0
bash "$vm" --timeout "${CFS_VM_TIMEOUT:-1500}" -- \
  env CHARGEFS_IN_VM=1 CHARGEFS_CGROUP_VERSION=2 CHARGEFSD="$bin" TMPDIR=/tmp \
  CFS_TEST_TIMEOUT="${CFS_TEST_TIMEOUT:-400}" PATH="$PATH" \
  bash "$here/charge.sh" "$@" || rc=$?
# charge.sh printed its own summary line inside the guest; a guest that died prints none.
if [ "$rc" != 0 ]; then log "$kind guest run exited $rc"; fi
exit "$rc"
