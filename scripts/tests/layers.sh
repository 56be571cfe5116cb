#!/usr/bin/env bash
# Layers of Sources/ChargeFS: a file may use only names declared in its own folder or in folders
# below it (Daemon > Bridge > FileSystem > Inodes > Pages > Charging > Cgroup > Support; each
# folder's README says so). Reads the sources as text: a top-level type, protocol, typealias or
# function declared in a higher folder and named in a lower one is a call back up.
# Usage: scripts/tests/layers.sh     Prints "N passed, N failed".
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
exec "${CFS_PYTHON:-python3}" - "$repo/Sources/ChargeFS" <<'PY'
import os, re, sys
root = sys.argv[1]
order = ["Support", "Cgroup", "Charging", "Pages", "Inodes", "FileSystem", "Bridge", "Daemon"]
decl = re.compile(r'^(?:(?:public|internal|private|fileprivate|final|nonisolated|@\w+(?:\([^)]*\))?)\s+)*'
                  r'(?:class|struct|enum|protocol|typealias|actor|func)\s+([A-Za-z_]\w*)', re.M)
comment = re.compile(r'//.*?$|/\*.*?\*/', re.S | re.M)
strings = re.compile(r'"(?:\\.|[^"\\])*"')
files, declared = {}, {}
for rank, folder in enumerate(order):
    d = os.path.join(root, folder)
    if not os.path.isdir(d):
        print(f"FAIL folder {folder} is missing"); print("0 passed, 1 failed"); sys.exit(1)
    for name in sorted(os.listdir(d)):
        if name.endswith(".swift"):
            text = open(os.path.join(d, name)).read()
            files[(folder, name)] = strings.sub('""', comment.sub('', text))
            for m in decl.finditer(text):
                declared.setdefault(m.group(1), folder)
stray = [n for n in os.listdir(root) if n.endswith(".swift")]
passed = failed = 0
if stray:
    print(f"FAIL files outside the layer folders: {' '.join(stray)}"); failed += 1
for (folder, name), text in sorted(files.items()):
    rank = order.index(folder)
    up = sorted({w for w in re.findall(r'\b[A-Za-z_]\w*\b', text)
                 if w in declared and order.index(declared[w]) > rank})
    if up:
        print(f"FAIL {folder}/{name} uses {', '.join(f'{w} ({declared[w]})' for w in up)}"); failed += 1
    else:
        passed += 1
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PY
