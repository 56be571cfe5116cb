#!/usr/bin/env bash
# Shared charging (shares.sh) on cgroup v2's memory controller: here where this kernel has it,
# else inside the guest of scripts/vm-run.sh (cfs_on_v2 in lib.sh).
# Usage: scripts/tests/shares-v2.sh [TEST...]      Prints "N passed, N failed".
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/tests/lib.sh
source "$here/lib.sh"
cfs_on_v2 "$here/shares.sh" "$@"
