#!/usr/bin/env bash
# Layers of Sources/ChargeFS: the rules are the folders' READMEs. Each README ends with a line
# "May call: A, B, ..." (folder names, or "every folder"); a file may use only names declared in
# its own folder or in a folder its README lists. Documentation and check are one thing: change
# the README and the check follows.
#
# Reads the sources as text (comments and strings removed). Names checked:
#   - every type, protocol, typealias and actor, at any depth, and every top-level func, let and
#     var: a bare use of such a name in a folder that may not call its folder is a violation;
#   - every member (func, var, let, case, init label aside) declared in exactly one folder: a use
#     written as `.name` elsewhere is one too (members declared in several folders are ambiguous
#     as text and skipped; a type's own name already covers `Type.member`).
# Names declared in more than one folder are skipped (the check cannot tell which is meant).
# Usage: scripts/tests/layers.sh     Prints "N passed, N failed".
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# Members of the standard library, Synchronization, swift-system and the C modules also appear
# as `.name`: their names are taken out of the member check (read from the toolchain's
# .swiftinterface files and the package's headers).
swift_lib=$(dirname "$(readlink -f "$(command -v swift)")")/../lib/swift/linux
exec "${CFS_PYTHON:-python3}" - "$repo/Sources/ChargeFS" "$repo" "$swift_lib" <<'PY'
import glob, os, re, sys
root, repo, swift_lib = sys.argv[1:4]
foreign = set()
outside = [f for m in ("Swift", "_Concurrency", "Synchronization", "Glibc")
           for f in glob.glob(os.path.join(swift_lib, f"{m}.swiftmodule", "*.swiftinterface"))]
outside += glob.glob(os.path.join(repo, ".build", "checkouts", "swift-system", "Sources", "**", "*.swift"), recursive=True)
outside += glob.glob(os.path.join(repo, "Sources", "C*", "**", "*.h"), recursive=True)
for path in outside:
    foreign.update(re.findall(r'\b[A-Za-z_]\w*\b', open(path, errors="replace").read()))
if not any(p.endswith(".swiftinterface") for p in outside):
    print("FAIL the standard library's .swiftinterface files are missing: members cannot be told apart")
    print("0 passed, 1 failed"); sys.exit(1)
passed = failed = 0
def fail(message):
    global failed
    print(f"FAIL {message}"); failed += 1

folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
rules = {}
for folder in folders:
    readme = os.path.join(root, folder, "README.md")
    line = None
    if os.path.exists(readme):
        line = next((l for l in open(readme) if l.lower().startswith("may call:")), None)
    if line is None:
        fail(f"{folder}/README.md has no 'May call:' line"); rules[folder] = set(); continue
    said = line.split(":", 1)[1]
    if "every folder" in said.lower():
        rules[folder] = set(folders)
        continue
    # Words in parentheses explain; every other capitalised word must be a folder.
    named = re.findall(r'\b[A-Z]\w*\b', re.sub(r'\([^)]*\)', '', said))
    rules[folder] = {w for w in named if w in folders}
    unknown = [w for w in named if w not in folders]
    if unknown:
        fail(f"{folder}/README.md 'May call' names no such folder: {' '.join(unknown)}")

modifiers = r'(?:(?:public|internal|private|fileprivate|package|final|nonisolated|static|class|override|mutating|' \
            r'consuming|borrowing|indirect|lazy|weak|unowned|@\w+(?:\([^)]*\))?)\s+)*'
type_decl = re.compile(r'^\s*' + modifiers + r'(?:class|struct|enum|protocol|typealias|actor)\s+([A-Za-z_]\w*)', re.M)
top_decl = re.compile(r'^' + modifiers + r'(?:func|let|var)\s+([A-Za-z_]\w*)', re.M)
member_decl = re.compile(r'^\s+' + modifiers + r'(?:func|let|var|case)\s+([A-Za-z_]\w*)', re.M)
comment = re.compile(r'//.*?$|/\*.*?\*/', re.S | re.M)
strings = re.compile(r'"(?:\\.|[^"\\])*"')

files = {}
names, members = {}, {}
for folder in folders:
    d = os.path.join(root, folder)
    for name in sorted(os.listdir(d)):
        if not name.endswith(".swift"):
            continue
        text = strings.sub('""', comment.sub('', open(os.path.join(d, name)).read()))
        files[(folder, name)] = text
        for m in type_decl.finditer(text):
            names.setdefault(m.group(1), set()).add(folder)
        for m in top_decl.finditer(text):
            names.setdefault(m.group(1), set()).add(folder)
        for m in member_decl.finditer(text):
            members.setdefault(m.group(1), set()).add(folder)
# Names the check can attribute to one folder.
owner = {n: next(iter(f)) for n, f in names.items() if len(f) == 1 and n not in foreign}
member_owner = {n: next(iter(f)) for n, f in members.items() if len(f) == 1 and n not in names and n not in foreign}

stray = [n for n in os.listdir(root) if n.endswith(".swift")]
if stray:
    fail(f"files outside the layer folders: {' '.join(stray)}")
for (folder, name), text in sorted(files.items()):
    allowed = rules.get(folder, set()) | {folder}
    bad = set()
    for w in set(re.findall(r'\b[A-Za-z_]\w*\b', text)):
        if w in owner and owner[w] not in allowed:
            bad.add(f"{w} ({owner[w]})")
    for w in set(re.findall(r'\.([A-Za-z_]\w*)\b', text)):
        if w in member_owner and member_owner[w] not in allowed:
            bad.add(f".{w} ({member_owner[w]})")
    if bad:
        fail(f"{folder}/{name} uses {', '.join(sorted(bad))}")
    else:
        passed += 1
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PY
