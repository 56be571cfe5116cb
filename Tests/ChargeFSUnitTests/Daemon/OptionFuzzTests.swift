// Fuzzing the command line / mount option parser in-process (MountOptions.parse).
//
// A generated corpus of 12,000 argument vectors (deterministic seed, so a failure reproduces):
// random byte strings (NUL excluded, invalid UTF-8 repaired the way CommandLine.arguments does),
// mutations of valid option lists, memcg paths with "..", "//", symlink-looking and non-ASCII
// components, huge and signed numbers with every suffix, and random flag soup. For each input:
//   - parse never crashes (a Swift trap here kills the test process: that is the failure);
//   - it throws a UsageError whose text is one non-empty line, or it returns options that hold
//     the parser's invariants (mode <= 07777, sizes >= 0, memcg absolute, ids < 2^32-1);
//   - the -o list libfuse receives splits (libfuse rules: ',' separates, '\' escapes) into
//     exactly fsname, subtype=chargefsd, default_permissions and known kernel/FUSE flags: no
//     user text can add, drop or merge a FUSE option;
//   - parsing is deterministic.
// Runs in a few seconds; the corpus size and seed are printed.

import XCTest
import TestSupport
@testable import ChargeFS

/// The harness's SplitMix64, with the choices the fuzzer makes.
struct FuzzRNG {
    var generator: SplitMix64
    init(seed: UInt64) { generator = SplitMix64(seed: seed) }
    mutating func next() -> UInt64 { generator.next() }
    mutating func below(_ n: Int) -> Int { Int(next() % UInt64(max(n, 1))) }
    mutating func chance(_ percent: Int) -> Bool { below(100) < percent }
    mutating func pick<T>(_ xs: [T]) -> T { xs[below(xs.count)] }
}

final class OptionFuzzTests: XCTestCase {
    static let seed: UInt64 = 0xC4A7_6EF5_2025_0001
    static let corpusSize = 12_000

    static let validOptions = [
        "size=1g", "size=0", "size=50%", "size=4096", "size=3M", "nr_inodes=10k", "nr_inodes=0",
        "mode=1777", "mode=0755", "uid=0", "gid=0", "uid=65534", "memcg=/sys/fs/cgroup/memory/x",
        "memcg=/sys/fs/cgroup/pod", "allow_other", "noatime", "ro", "rw", "nosuid", "nodev", "noexec",
        "default_permissions", "auto_unmount", "nodiratime", "fsname=x", "subtype=y", "defaults",
        "noauto", "x-systemd.requires=foo", "comment=hello", "relatime", "strictatime", "sync", "dirsync",
    ]
    static let keys = ["size", "nr_inodes", "mode", "uid", "gid", "memcg", "max_read", "blksize", "fsname",
                       "subtype", "allow_other", "noatime", "x-", "comment", "ro", "defaults", "SIZE", "Size"]
    static let numbers = [
        "0", "1", "-1", "+1", "007", "4096", "9223372036854775807", "9223372036854775808",
        "18446744073709551615", "18446744073709551616", "4294967295", "4294967296", "99999999999999999999999",
        "1e", "8e", "7e", "16p", "8191p", "8192p", "1k", "1K", "0x10", "1.5g", "1 g", " 1", "1g ", "٣", "１",
        "100%", "100000%", "100001%", "%", "-5%", "7777", "07777", "10000", "0o777", "", "k", "kk", "1kk",
        "\u{0130}", "1\u{0130}", "1ß", "1ẞ", "1\u{01C5}", "1\u{0345}", "1e\u{301}",
    ]
    static let pathPieces = [
        "/sys/fs/cgroup", "/sys/fs/cgroup/memory", "..", ".", "", "pod", "chargefs-1", "../../etc",
        "/proc/self/root", "/dev/null", "/tmp/link", "\u{00e9}t\u{00e9}", "a b", "a,b", "a\\", "\\,", "=",
        "kubepods.slice", "cgroup.procs", String(repeating: "x", count: 255), String(repeating: "y", count: 4200),
        "\u{fffd}", "\u{202e}", "\t", "\n", "\r", "\u{7f}",
    ]

    /// What CommandLine.arguments would hold for these bytes (invalid UTF-8 repaired).
    static func argString(_ bytes: [UInt8]) -> String { String(decoding: bytes, as: UTF8.self) }

    static func randomBytes(_ r: inout FuzzRNG, maxLen: Int) -> [UInt8] {
        let n = r.below(maxLen + 1)
        var out: [UInt8] = []
        out.reserveCapacity(n)
        let alphabet = Array("size=nr_inodes,mode=uidgmemcg/.%kKmgtpe0123456789\\-+ x".utf8)
        for _ in 0..<n {
            if r.chance(60) { out.append(alphabet[r.below(alphabet.count)]) } else { out.append(UInt8(1 + r.below(255))) }
        }
        return out
    }

    static func memcgPath(_ r: inout FuzzRNG) -> String {
        var s = r.chance(85) ? "" : r.pick(["", "relative", "./x", "~"])
        for _ in 0..<(1 + r.below(6)) {
            s += (r.chance(80) ? "/" : r.pick(["//", "/./", "/../"])) + r.pick(pathPieces)
        }
        return s
    }

    static func mutate(_ r: inout FuzzRNG, _ s: String) -> String {
        var b = Array(s.utf8)
        for _ in 0..<(1 + r.below(4)) {
            switch r.below(6) {
            case 0 where !b.isEmpty: b.remove(at: r.below(b.count))
            case 1: b.insert(UInt8(1 + r.below(255)), at: r.below(b.count + 1))
            case 2 where !b.isEmpty: b[r.below(b.count)] = r.pick(Array(",=\\%-kKgG0\u{7f}".utf8))
            case 3: b += Array((r.pick([",", "=", ",,", "\\", "=" + r.pick(numbers)])).utf8)
            case 4 where !b.isEmpty: b = Array(b[0..<r.below(b.count)])
            default: b += b.prefix(r.below(b.count + 1))
            }
        }
        return argString(b)
    }

    static func optionList(_ r: inout FuzzRNG) -> String {
        var opts: [String] = []
        for _ in 0..<(1 + r.below(5)) {
            switch r.below(6) {
            case 0: opts.append(r.pick(validOptions))
            case 1: opts.append(r.pick(keys) + "=" + r.pick(numbers))
            case 2: opts.append("memcg=" + memcgPath(&r))
            case 3: opts.append(mutate(&r, r.pick(validOptions)))
            case 4: opts.append(r.pick(keys) + r.pick(["", "=", "==", "=,"]) + (r.chance(50) ? r.pick(numbers) : ""))
            default: opts.append(argString(randomBytes(&r, maxLen: 24)))
            }
        }
        return opts.joined(separator: r.chance(90) ? "," : r.pick([",,", ", ", "\\,"]))
    }

    /// One argument vector of the corpus.
    static func argv(_ r: inout FuzzRNG, _ i: Int) -> [String] {
        switch i % 6 {
        case 0:  // pure random bytes as the -o value
            return ["/mnt/x", "-o", argString(randomBytes(&r, maxLen: 64))]
        case 1:  // mutated valid lists, sometimes -oLIST form, sometimes with a source
            let list = mutate(&r, (0..<(1 + r.below(4))).map { _ in r.pick(validOptions) }.joined(separator: ","))
            if r.chance(30) { return ["src", "/mnt/x", "-o" + list] }
            return ["/mnt/x", "-o", list]
        case 2:  // structured option lists with hostile values
            return [r.chance(30) ? argString(randomBytes(&r, maxLen: 12)) : "chargefs", "/mnt/x", "-o", optionList(&r)]
        case 3:  // memcg paths only
            return ["/mnt/x", "-o", "memcg=" + memcgPath(&r) + (r.chance(30) ? ",size=" + r.pick(numbers) : "")]
        case 4:  // flag soup
            let words = ["-f", "-d", "-s", "-o", "-h", "-V", "--cleanup", "--foreground", "--debug", "-", "--",
                         "-x", "-oallow_other", "-o,", "src", "/mnt/x", "/m2", "", "-o=size=1", "--cleanup=x"]
            return (0..<r.below(7)).map { _ in r.chance(85) ? r.pick(words) : argString(randomBytes(&r, maxLen: 10)) }
        default:  // sources/mountpoints with separators and escapes
            let src = r.pick(["a\\", "a,b", "a\\,b", "x=y", "\\", "a b", "\u{fffd}", "memcg=/x", ","]) + (r.chance(50) ? "\\" : "")
            return [src, r.pick(["/mnt/x", "/mnt/a\\", "/mnt/a,b", "m\n"]), "-o", optionList(&r)]
        }
    }

    /// Splits an -o list the way libfuse's fuse_opt does: ',' separates, '\' escapes the next char.
    static func libfuseSplit(_ list: String) -> [String] {
        var out: [String] = []
        var cur = ""
        var escaped = false
        for ch in list {
            if escaped { cur.append(ch); escaped = false; continue }
            if ch == "\\" { escaped = true; continue }
            if ch == "," { out.append(cur); cur = ""; continue }
            cur.append(ch)
        }
        out.append(cur)
        return out.filter { !$0.isEmpty }
    }

    func check(_ args: [String], failures: inout [String]) {
        // "kind | detail | input": kinds group the report.
        func fail(_ kind: String, _ detail: String = "") { failures.append("\(kind) | \(detail) | \(args.debugDescription)") }
        let first: MountOptions
        do {
            first = try MountOptions.parse(args)
        } catch {
            let text = error.description
            if text.isEmpty { fail("empty error") }
            if text.contains(where: { $0.isNewline }) { fail("multi-line error", text.debugDescription) }
            if text.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7f }) {
                fail("control character in error", text.debugDescription)
            }
            if (try? MountOptions.parse(args)) != nil { fail("not deterministic") }
            return
        }
        if (try? MountOptions.parse(args)) != first { fail("not deterministic") }
        if first.showHelp || first.showVersion || first.cleanupTarget != nil { return }
        if first.mountpoint.isEmpty { fail("accepted an empty mountpoint") }
        if first.rootMode > 0o7777 { fail("mode out of range", "\(first.rootMode)") }
        if let s = first.sizeBytes, s < 0 { fail("negative size", "\(s)") }
        if let n = first.maxInodes, n < 0 { fail("negative nr_inodes", "\(n)") }
        if let m = first.memcg, !m.hasPrefix("/") { fail("relative memcg", m) }
        if first.rootUid == UInt32.max || first.rootGid == UInt32.max { fail("id -1 accepted") }
        _ = first.effectiveMaxBytes
        _ = first.effectiveMaxInodes
        // What libfuse will see: fsname first, then our subtype, then default_permissions, then
        // only kernel/FUSE flags we pass through.
        let parts = Self.libfuseSplit(first.fuseOptionList)
        guard parts.count >= 3 else { return fail("FUSE option list lost options ('\\\\' escaped a separator?)", first.fuseOptionList.debugDescription) }
        if !parts[0].hasPrefix("fsname=") { fail("first FUSE option is not fsname", "\(parts)") }
        if parts[1] != "subtype=chargefsd" { fail("subtype lost or altered", "\(parts)") }
        if parts[2] != "default_permissions" { fail("default_permissions lost", "\(parts)") }
        for p in parts.dropFirst(3) {
            let key = String(p.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)[0])
            if !(MountOptions.fuseFlags.contains(p) || p == "noatime" || ["max_read", "blksize"].contains(key)) {
                fail("unexpected FUSE option passed through", "'\(p)' in \(parts)")
            }
        }
    }

    func testGeneratedCorpusNeverCrashesAndKeepsInvariants() {
        var r = FuzzRNG(seed: Self.seed)
        var failures: [String] = []
        var accepted = 0, rejected = 0
        let start = ContinuousClock.now
        for i in 0..<Self.corpusSize {
            let args = Self.argv(&r, i)
            if (try? MountOptions.parse(args)) != nil { accepted += 1 } else { rejected += 1 }
            check(args, failures: &failures)
        }
        let took = ContinuousClock.now - start
        print("option fuzz: seed \(String(Self.seed, radix: 16)), \(Self.corpusSize) inputs, \(accepted) accepted, \(rejected) rejected, \(failures.count) failures, \(took)")
        // Group failures by kind so one bug does not drown the others.
        var byKind: [String: [String]] = [:]
        for f in failures { byKind[String(f.prefix(while: { $0 != "|" })), default: []].append(f) }
        for (kind, list) in byKind.sorted(by: { $0.key < $1.key }) {
            XCTFail("\(list.count) inputs: \(kind); first: \(list[0])")
        }
        XCTAssertGreaterThan(accepted, 500, "the corpus should exercise the accepting paths too")
        XCTAssertGreaterThan(rejected, 500)
    }

    /// Known hostile inputs, each with what must happen.
    func testHandPickedHostileInputs() {
        var failures: [String] = []
        let cases: [[String]] = [
            ["/m", "-o", "size=9223372036854775807"], ["/m", "-o", "size=8e"], ["/m", "-o", "size=8191p"],
            ["/m", "-o", "size=100000%"], ["/m", "-o", "nr_inodes=18446744073709551616"],
            ["/m", "-o", "mode=17777"], ["/m", "-o", "mode=-1"], ["/m", "-o", "uid=4294967295"], ["/m", "-o", "uid=-1"],
            ["/m", "-o", "memcg=/sys/fs/cgroup/../../etc"], ["/m", "-o", "memcg=//"], ["/m", "-o", "memcg=/"],
            ["/m", "-o", "memcg=/x,y"], ["/m", "-o", "memcg=/x\\"], ["src\\", "/m"], ["a\\,b", "/m"],
            ["/m", "-o", "foo\nbar"], ["/m", "-o", "size=1\n"], ["/m\n", "-x\n"], ["/m", "-o", "\u{1b}[2Jsize=1"],
            ["/m", "-o", "size=1\u{0130}"], ["/m", "-o", "size=1\u{01C5}"], ["/m", "-o", String(repeating: ",", count: 100_000)],
            ["/m", "-o", String(repeating: "size=1,", count: 10_000)], ["/m", "-o", "memcg=/" + String(repeating: "a/../", count: 5000)],
        ]
        for args in cases { check(args, failures: &failures) }
        for f in failures { XCTFail(f) }
    }
}
