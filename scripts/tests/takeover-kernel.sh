#!/usr/bin/env bash
# The kernel facts a takeover relies on (docs/takeover.md), asserted on the running kernel with
# scripts/bench/takeover-probe.c (built here with gcc against libfuse3). No chargefsd needed.
# Usage: scripts/tests/takeover-kernel.sh [TEST...]     (all tests when none given)
#        scripts/tests/takeover-kernel.sh --list
# Env: CFS_TEST_TIMEOUT=seconds per test (default 150); TAKEOVER_KILLS (default 20).
# Each test builds the probe in its scratch dir, runs it once (its own 90 s alarm inside, and a
# `timeout` here) and checks one fact's line with its figures. Root only.
# Prints "N passed, N failed" and exits non-zero when any test failed.
set -euo pipefail
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=scripts/tests/lib.sh
source "$(dirname "$SELF")/lib.sh"

TESTS=(build init survives_server_death successor_serves resend resend_create no_resend_waits clone_fd respawn_ms both_dead)
KILLS=${TAKEOVER_KILLS:-20}

# probe: builds and runs the probe; sets OUT (its output) and PROBE_RC; the mount and every
# process it started must be gone afterwards.
probe() {
  cfs_new_env takeover
  local src=$CFS_REPO/scripts/bench/takeover-probe.c
  gcc -O2 -Wall -Werror -o "$SCR/takeover-probe" "$src" $(pkg-config --cflags --libs fuse3) 2> "$SCR/build.log" ||
    { log "  build failed: $(head -5 "$SCR/build.log")"; return 1; }
  CFS_UNDO+=("umount -l '$MNT'")
  PROBE_RC=0
  OUT=$(timeout --kill-after=5 110 "$SCR/takeover-probe" "$MNT" "$KILLS" 2> "$SCR/probe.err") || PROBE_RC=$?
  log "$(sed 's/^/  /' <<< "$OUT")"
  [ -s "$SCR/probe.err" ] && log "  probe stderr: $(head -5 "$SCR/probe.err")"
  check "the probe left nothing mounted" not is_mounted "$MNT"
  local left; left=$(pgrep -f "^$SCR/takeover-probe|^takeover-probe --serve [-0-9]+ [0-9]+ [-0-9]+ $MNT\$" || true)
  check "the probe left no process behind (${left:-none})" [ -z "$left" ]
  for p in $left; do kill -9 "$p" 2>/dev/null || true; done
  return 0
}
not() { ! "$@"; }
# line NAME: the probe's line for fact NAME ("" when missing).
line() { grep "^FACT $1 " <<< "$OUT" || true; }
# num LINE REGEX: the first number captured by an extended regex; empty when absent, so that a
# comparison with it fails rather than passing on a default.
num() { sed -nE "s#.*$2.*#\1#p" <<< "$1" | head -1; }

t_build() {
  probe
  check "the probe built and ran to its end (exit $PROBE_RC, 0 = no fact failed)" [ "$PROBE_RC" = 0 ]
  check "every fact reported" [ "$(grep -c '^FACT ' <<< "$OUT")" -ge 9 ]
}

t_init() {
  probe
  local l; l=$(line init); local minor; minor=$(num "$l" 'protocol 7\.([0-9]+)')
  check "INIT saved ($l)" grep -q ' ok .*saved_bytes=[1-9]' <<< "$l"
  check "protocol minor ≥ 38" ge "$minor" 38
  if kernel_at_least 6 9; then
    check "Linux ≥ 6.9 offers FUSE_HAS_RESEND and protocol ≥ 7.40" bash -c "grep -q 'FUSE_HAS_RESEND=yes' <<< '$l' && [ $minor -ge 40 ]"
  else
    check "Linux < 6.9 offers no FUSE_HAS_RESEND" grep -q 'FUSE_HAS_RESEND=no' <<< "$l"
  fi
  check "no request timeout could abort a mount during a takeover" grep -qE 'default_request_timeout=(0|absent)' <<< "$l"
}

t_survives_server_death() {
  probe
  local l; l=$(line survives_server_death)
  check "the connection outlived the server; the caller waited and was then answered ($l)" grep -q ' ok .*blocked yes.*answered it: ok' <<< "$l"
  check "the caller waited at least 1400 ms with nobody serving" ge "$(num "$l" 'for ([0-9]+) ms')" 1400
}

t_successor_serves() {
  probe
  local l; l=$(line successor_serves)
  check "after an INIT replay: stat, fstat, pread, pwrite and read back all ok ($l)" \
    bash -c "[ \$(grep -o ' ok' <<< '$l' | wc -l) = 6 ] && ! grep -q FAIL <<< '$l'"
}

t_resend() {
  probe
  local l; l=$(line resend)
  if grep -q 'FUSE_HAS_RESEND=yes' <<< "$(line init)"; then
    check "a READ in flight at SIGKILL was resent (bit 63) and answered ($l)" grep -q ' ok .*resent with bit 63 ([1-9].*: ok$' <<< "$l"
    check "the caller had its bytes within 1000 ms of the kill" le "$(num "$l" 'its bytes ([0-9]+) ms')" 1000
  else
    log "  this kernel ($(uname -r)) has no FUSE_NOTIFY_RESEND: asserting the documented behaviour instead (see no_resend_waits)"
    check "the probe says resend is not available ($l)" grep -q '^FACT resend NA .*no FUSE_HAS_RESEND' <<< "$l"
  fi
}

t_resend_create() {
  probe
  local l; l=$(line resend_create)
  if grep -q 'FUSE_HAS_RESEND=yes' <<< "$(line init)"; then
    check "a resent CREATE O_EXCL applied twice answers EEXIST; found by its unique in the slot, it succeeds ($l)" \
      grep -q ' ok .*applies it again answers EEXIST.*in-flight slot answers success$' <<< "$l"
  else
    check "the probe says a CREATE in flight cannot be resent here ($l)" grep -q '^FACT resend_create NA ' <<< "$l"
  fi
}

t_no_resend_waits() {
  probe
  local l; l=$(line no_resend_waits)
  check "without the notify the lost READ's caller waits while others are served ($l)" grep -q ' ok .*others served: yes' <<< "$l"
  check "it waited at least 1900 ms" ge "$(num "$l" 'waited ([0-9]+) ms')" 1900
  if grep -q 'FUSE_HAS_RESEND=yes' <<< "$(line init)"; then
    check "a later resend on a pidfd_getfd copy of the keeper's fd (same file) answered it" grep -q 'pidfd_getfd copy (same file per kcmp) answered it' <<< "$l"
  fi
}

t_clone_fd() {
  probe
  local l; l=$(line clone_fd)
  check "a server on a FUSE_DEV_IOC_CLONE fd: its in-flight READ ends with ECONNABORTED, the mount lives ($l)" \
    grep -q ' ok .*failed with Software caused connection abort.*lives on.*: yes' <<< "$l"
}

t_respawn_ms() {
  probe
  local l; l=$(line respawn_ms)
  check "every kill -9 was followed by a successor that answered, the pre-kill fd intact ($l)" grep -q " ok .* $KILLS answered; pre-kill fd reads its bytes: yes" <<< "$l"
  check "the slowest takeover answered within 100 ms (the issue's target)" le "$(num "$l" '/ max ([0-9]+)\.')" 100
}

t_both_dead() {
  probe
  local l; l=$(line both_dead)
  check "keeper dead, server alive: served; both dead: ENOTCONN ($l)" \
    grep -q ' ok .*served by the server: yes.*fails with Transport endpoint is not connected.*fd with Transport endpoint is not connected' <<< "$l"
}

if [ "${1:-}" = --one ]; then run_one "$2"; exit; fi
if [ "${1:-}" = --list ]; then printf '%s\n' "${TESTS[@]}"; exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "takeover kernel tests need root"; echo "0 passed, 1 failed"; exit 1; fi
if ! command -v gcc >/dev/null || ! pkg-config --exists fuse3; then
  echo "cannot run: gcc and libfuse3's headers (pkg-config fuse3) are needed"; echo "0 passed, 1 failed"; exit 1
fi
log "chargefs takeover kernel facts on $(uname -r)"
sel=("${TESTS[@]}")
[ $# = 0 ] || sel=("$@")
run_tests "$SELF" "${CFS_TEST_TIMEOUT:-150}" "${sel[@]}"
