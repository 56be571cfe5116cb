// Real-kernel tests of cgroup charging: cgroup v1 memory on this host, cgroup v2 when it is mounted
// with memory on /sys/fs/cgroup (a guest kernel: scripts/vm-run.sh). Root only; no fake files.
// Every test removes the cgroups it made in tearDown, failure or not.

import Glibc
import Synchronization
import SystemPackage
import XCTest
@testable import ChargeFS

private let KiB: Int64 = 1024
private let MiB: Int64 = 1024 * 1024
private let testCounter = Mutex(0)

/// memfd_create and fallocate are hidden from Swift's Glibc (_GNU_SOURCE); this target does
/// not depend on CFuse, so look them up.
private enum CgSys {
    static var handle: UnsafeMutableRawPointer? { dlopen(nil, RTLD_NOW) }  // refcounted, cheap
    static func memfd(_ name: String) -> Int32 {
        typealias F = @convention(c) (UnsafePointer<CChar>, UInt32) -> Int32
        guard let p = dlsym(handle, "memfd_create") else { return -1 }
        return unsafeBitCast(p, to: F.self)(name, 1 /* MFD_CLOEXEC */)
    }
    /// fallocate(PUNCH_HOLE | KEEP_SIZE): frees the pages, which refunds whoever was charged.
    static func punch(_ fd: Int32, _ offset: Int64, _ length: Int64) -> Int32 {
        typealias F = @convention(c) (Int32, Int32, Int64, Int64) -> Int32
        guard let p = dlsym(handle, "fallocate") else { return -1 }
        return unsafeBitCast(p, to: F.self)(fd, 0x02 | 0x01, offset, length)
    }
}

final class CgroupChargerTests: XCTestCase {
    private var made: [String] = []      // cgroups to remove, deepest last
    private var chargers: [CgroupCharger] = []
    private var fds: [Int32] = []
    private var children: [pid_t] = []

    override func setUpWithError() throws {
        try XCTSkipUnless(getuid() == 0, "needs root")
        try XCTSkipUnless(Self.memoryParent() != nil, "no memory cgroup hierarchy here")
    }

    override func tearDown() {
        for c in chargers { c.shutdown() }
        chargers = []
        for pid in children { kill(pid, SIGKILL); var st: Int32 = 0; waitpid(pid, &st, 0) }
        children = []
        for fd in fds { close(fd) }
        fds = []
        for dir in made.reversed() {
            // Whatever is left below it first (a leaf from a failed test).
            for name in cgDirectoryNames(dir) ?? [] where name.hasPrefix("chargefs-") || name.hasPrefix("sub") {
                Self.removeCgroup(dir + "/" + name)
            }
            if !Self.removeCgroup(dir) { XCTFail("cleanup: cannot remove \(dir)") }
        }
        made = []
    }

    /// rmdir, retried for ~2 s while exiting processes leave.
    @discardableResult
    static func removeCgroup(_ path: String) -> Bool {
        for _ in 0..<200 {
            if rmdir(path) == 0 || errno == ENOENT { return true }
            usleep(10_000)
        }
        return false
    }

    /// Starts `argv` (a program path first) in cgroup `cg`; killed in tearDown.
    func spawn(_ argv: [String], in cg: String) throws -> pid_t {
        var pid: pid_t = 0
        let cargs = argv.map { strdup($0) } + [nil]
        defer { cargs.forEach { free($0) } }
        XCTAssertEqual(posix_spawn(&pid, argv[0], nil, nil, cargs, environ), 0)
        children.append(pid)
        XCTAssertEqual(cgWriteFile(cg + "/cgroup.procs", "\(pid)\n"), 0)
        return pid
    }

    // MARK: environment

    /// Where test cgroups go: below our own memory cgroup on v1; the v2 root when cgroup2 with
    /// memory is mounted on /sys/fs/cgroup (a v2 cgroup holding processes cannot have memory
    /// enabled for its children, the root can).
    static func memoryParent() -> (path: String, version: CgroupVersion)? {
        if let c = try? cgReadFile("/sys/fs/cgroup/cgroup.controllers"), c.split(separator: " ").contains(where: { $0.cgTrimmed == "memory" }) {
            return ("/sys/fs/cgroup", .v2)
        }
        guard let lines = try? cgReadFile("/proc/self/cgroup") else { return nil }
        for line in lines.split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            if parts.count == 3, parts[1].split(separator: ",").contains("memory") {
                let p = "/sys/fs/cgroup/memory" + (parts[2] == "/" ? "" : String(parts[2]))
                if access(p + "/memory.limit_in_bytes", F_OK) == 0 { return (p, .v1) }
            }
        }
        return nil
    }

    /// Our own memory cgroup's usage file (to show our cgroup is not charged), if it has one.
    static func ownUsageFile() -> String? {
        guard let (parent, version) = memoryParent() else { return nil }
        let f = parent + (version == .v1 ? "/memory.usage_in_bytes" : "/memory.current")
        return access(f, R_OK) == 0 ? f : nil
    }

    func makeCgroup(limit: Int64?) throws -> String {
        let (parent, version) = try XCTUnwrap(Self.memoryParent())
        let n = testCounter.withLock { n in n += 1; return n }
        let path = "\(parent)/chargefs-test-\(getpid())-\(n)"
        XCTAssertEqual(mkdir(path, 0o755), 0, "mkdir \(path): \(String(cString: strerror(errno)))")
        made.append(path)
        if let limit {
            let file = version == .v1 ? "memory.limit_in_bytes" : "memory.max"
            XCTAssertEqual(cgWriteFile(path + "/" + file, "\(limit)\n"), 0)
        }
        return path
    }

    func usage(_ cg: String) throws -> Int64 {
        let v = try XCTUnwrap(Self.memoryParent()).version
        let text = try cgReadFile(cg + (v == .v1 ? "/memory.usage_in_bytes" : "/memory.current"))
        return try XCTUnwrap(Int64(text.cgTrimmed))
    }

    func makeArena(size: Int64 = 512 * MiB) throws -> FileDescriptor {
        let fd = CgSys.memfd("chargefs-test-arena")
        XCTAssertGreaterThanOrEqual(fd, 0)
        fds.append(fd)
        XCTAssertEqual(ftruncate(fd, off_t(size)), 0)
        return FileDescriptor(rawValue: fd)
    }

    func makeCharger(_ cg: String, _ arena: FileDescriptor, cacheLifetime: Duration = CgroupCharger.defaultCacheLifetime) throws -> CgroupCharger {
        let c = try CgroupCharger(target: CgroupTarget.resolve(cg), arena: arena, cacheLifetime: cacheLifetime)
        chargers.append(c)
        return c
    }

    func assertNear(_ a: Int64, _ b: Int64, _ tol: Int64 = 512 * KiB, _ what: String, line: UInt = #line) {
        XCTAssertLessThanOrEqual(abs(a - b), tol, "\(what): \(a) vs expected \(b) (tolerance \(tol))", line: line)
    }

    // MARK: tests

    func testChargesGoToTargetNotToUsAndPunchRefunds() throws {
        let cg = try makeCgroup(limit: 256 * MiB)
        let arena = try makeArena()
        let charger = try makeCharger(cg, arena)
        let before = try usage(cg)
        let ownFile = Self.ownUsageFile()
        let ownBefore = try ownFile.map { try XCTUnwrap(Int64(cgReadFile($0).cgTrimmed)) }

        // 16 MiB in 1 MiB calls, then 16 MiB in 64 KiB calls (the page store's batch sizes).
        var t0 = ContinuousClock.now
        for i in 0..<16 { try charger.charge(offset: Int64(i) * MiB, length: MiB) }
        let big = (ContinuousClock.now - t0) / 16
        t0 = ContinuousClock.now
        for i in 0..<256 { try charger.charge(offset: 16 * MiB + Int64(i) * 64 * KiB, length: 64 * KiB) }
        let small = (ContinuousClock.now - t0) / 256
        t0 = ContinuousClock.now
        for _ in 0..<100 { _ = try charger.target.headroom(reclaimable: false) }
        let cheap = (ContinuousClock.now - t0) / 100
        t0 = ContinuousClock.now
        for _ in 0..<100 { _ = try charger.target.headroom(reclaimable: true) }
        let full = (ContinuousClock.now - t0) / 100
        print("charge latency (\(charger.summary)): 1 MiB \(big), 64 KiB \(small); counter read \(cheap), with memory.stat \(full); margin \(charger.marginBytes), helper footprint \(charger.helperFootprint)")

        let after = try usage(cg)
        assertNear(after - before, 32 * MiB, 512 * KiB, "target charged")
        // The leaf has counters of its own on v1, and on v2 where the target already enabled
        // memory for its children (a pod); the charger never enables it itself.
        if let leaf = charger.chargedBytesInLeaf {
            XCTAssertGreaterThanOrEqual(leaf, 32 * MiB - 512 * KiB)
        } else {
            XCTAssertFalse((try cgReadFile(cg + "/cgroup.subtree_control")).contains("memory"))
        }
        if let ownFile, let ownBefore {
            let ownAfter = try XCTUnwrap(Int64(cgReadFile(ownFile).cgTrimmed))
            // Our cgroup is the target's parent on v1: hierarchical usage includes the target's.
            let ownDelta = ownAfter - ownBefore - (ownFile.hasPrefix(cgParent(cg)) ? after - before : 0)
            XCTAssertLessThan(ownDelta, 4 * MiB, "our own cgroup was charged \(ownDelta) bytes")
        }
        print("status: \(charger.statusLine)")

        // Punching the range in *this* process refunds the target.
        XCTAssertEqual(CgSys.punch(arena.rawValue, 0, 32 * MiB), 0)
        assertNear(try usage(cg), before, 512 * KiB, "after punch")
    }

    func testPastTheLimitIsENOSPCWithoutOOMKill() throws {
        let limit = 24 * MiB
        let cg = try makeCgroup(limit: limit)
        let arena = try makeArena()
        let charger = try makeCharger(cg, arena)
        let target = try CgroupTarget.resolve(cg)
        let ooms = try charger.oomKillCount()
        XCTAssertEqual(try target.oomKillCount(), 0)
        var charged: Int64 = 0
        var failure: Errno?
        while charged < 2 * limit {
            do throws(Errno) {
                try charger.charge(offset: charged, length: MiB)
                charged += MiB
            } catch {
                failure = error
                break
            }
        }
        XCTAssertEqual(failure, .noSpace)
        XCTAssertGreaterThanOrEqual(charged, limit - 4 * MiB, "stopped too early")
        XCTAssertLessThanOrEqual(try usage(cg), limit)
        XCTAssertEqual(try charger.oomKillCount(), ooms, "the kernel OOM-killed something")
        XCTAssertEqual(try target.oomKillCount(), 0)
        let room = try XCTUnwrap(charger.availableBytes())
        // Refused because 1 MiB did not fit; the counters move a little after (per-CPU charge
        // batches, kernel memory), so allow one more MiB of drift.
        XCTAssertLessThan(room, 2 * MiB)
        print("filled \(charged / MiB) MiB of a \(limit / MiB) MiB limit; room left \(room)")
        // Free some and the same helper charges again.
        XCTAssertEqual(CgSys.punch(arena.rawValue, 0, 4 * MiB), 0)
        try charger.charge(offset: 0, length: MiB)
    }

    func testAncestorLimitCounts() throws {
        let parent = try makeCgroup(limit: 16 * MiB)
        let (_, version) = try XCTUnwrap(Self.memoryParent())
        if version == .v2 { XCTAssertEqual(cgWriteFile(parent + "/cgroup.subtree_control", "+memory\n"), 0) }
        let child = parent + "/sub"
        XCTAssertEqual(mkdir(child, 0o755), 0)
        made.append(child)
        let arena = try makeArena()
        let charger = try makeCharger(child, arena)
        var charged: Int64 = 0
        do throws(Errno) {
            while charged < 64 * MiB {
                try charger.charge(offset: charged, length: MiB)
                charged += MiB
            }
        } catch {
            XCTAssertEqual(error, .noSpace)
        }
        XCTAssertGreaterThanOrEqual(charged, 12 * MiB)
        XCTAssertLessThan(charged, 16 * MiB)
        XCTAssertLessThanOrEqual(try usage(parent), 16 * MiB)
    }

    func testHelperKilledIsRespawned() throws {
        let cg = try makeCgroup(limit: 128 * MiB)
        let arena = try makeArena()
        let charger = try makeCharger(cg, arena)
        try charger.charge(offset: 0, length: MiB)
        let pid = try XCTUnwrap(charger.helperPID)
        // Idle, the helper keeps its daemon's oom_score_adj (1000 only while it charges).
        XCTAssertEqual((try cgReadFile("/proc/\(pid)/oom_score_adj")).cgTrimmed, (try cgReadFile("/proc/self/oom_score_adj")).cgTrimmed)
        XCTAssertEqual((try cgReadFile("/proc/\(pid)/cmdline")).split(separator: "\0").first.map(String.init)?.hasSuffix("/chargefs-charge-helper"), true)  // an exec'd program
        XCTAssertTrue((try cgReadFile(charger.leaf.procsPath)).split(separator: "\n").contains(Substring("\(pid)")))
        XCTAssertEqual(kill(pid, SIGKILL), 0)
        usleep(50_000)
        let before = try usage(cg)
        try charger.charge(offset: MiB, length: 4 * MiB)
        let newPID = try XCTUnwrap(charger.helperPID)
        XCTAssertNotEqual(newPID, pid)
        XCTAssertEqual(charger.helperStarts, 2)
        XCTAssertGreaterThanOrEqual(try usage(cg) - before, 4 * MiB - 512 * KiB)
        // The helper holds nothing but the arena and its socket (never /dev/fuse or our fds).
        let fdsOpen = try XCTUnwrap(Self.listFDs(newPID))
        XCTAssertEqual(fdsOpen, [0, 1, 2, 3, 4])
    }

    /// An OOM in the target that the helper did not cause (a workload outgrew the limit) kills
    /// the workload, not the idle helper, and the next charge with room succeeds. (With the old
    /// oom_score_adj of 1000 for life the helper died first and the next charge got ENOSPC.)
    func testUnrelatedOOMLeavesTheHelperAndTheNextChargeSucceeds() throws {
        let cg = try makeCgroup(limit: 64 * MiB)
        let arena = try makeArena()
        let charger = try makeCharger(cg, arena)
        try charger.charge(offset: 0, length: 4 * MiB)
        let pid = try XCTUnwrap(charger.helperPID)
        let ooms = try charger.oomKillCount()
        let hog = try spawn(["/usr/bin/python3", "-c", "import time; b = bytearray(200 << 20); time.sleep(30)"], in: cg)
        var st: Int32 = 0
        XCTAssertEqual(waitpid(hog, &st, 0), hog)
        children.removeAll { $0 == hog }
        XCTAssertEqual(st & 0x7f, SIGKILL, "the hog was not OOM-killed")  // WTERMSIG
        XCTAssertGreaterThan(try charger.oomKillCount(), ooms)
        XCTAssertEqual(kill(pid, 0), 0, "the idle helper was killed by an OOM it did not cause")
        try charger.charge(offset: 4 * MiB, length: 8 * MiB)
        XCTAssertEqual(charger.helperPID, pid)
    }

    /// A helper killed by something else (SIGKILL, an OOM elsewhere) while the target is full:
    /// charges get ENOSPC without starting a helper (no fork into a full cgroup); with room
    /// again, one new helper takes over.
    func testNoRespawnLoopWhenFull() throws {
        let cg = try makeCgroup(limit: 24 * MiB)
        let arena = try makeArena()
        let charger = try makeCharger(cg, arena)
        var charged: Int64 = 0
        for step in [MiB, 64 * KiB] {  // full to the last 64 KiB
            do throws(Errno) {
                while charged < 48 * MiB {
                    try charger.charge(offset: charged, length: step)
                    charged += step
                }
            } catch {
                XCTAssertEqual(error, .noSpace)
            }
        }
        let pid = try XCTUnwrap(charger.helperPID)
        // Its death frees its own memory (helperFootprint), less than the 1 MiB asked below.
        XCTAssertLessThan(charger.helperFootprint, MiB)
        XCTAssertEqual(kill(pid, SIGKILL), 0)
        for i in 0..<50 {
            XCTAssertThrowsError(try charger.charge(offset: charged + Int64(i) * MiB, length: MiB)) { e in
                XCTAssertEqual(e as? Errno, .noSpace)
            }
        }
        XCTAssertEqual(charger.helperStarts, 1, "helpers were started into a full cgroup")
        XCTAssertEqual(CgSys.punch(arena.rawValue, 0, 8 * MiB), 0)
        try charger.charge(offset: 0, length: MiB)
        XCTAssertEqual(charger.helperStarts, 2)
    }

    /// The race the headroom check cannot close (the limit drops, or a workload grows, between
    /// our check and the fallocate): the kernel OOM-kills the helper, which raised its
    /// oom_score_adj for the charge, never a workload; we say ENOSPC.
    func testKernelOOMKillOfHelperGivesENOSPC() throws {
        let (_, version) = try XCTUnwrap(Self.memoryParent())
        let limitFile = version == .v1 ? "/memory.limit_in_bytes" : "/memory.max"
        let cg = try makeCgroup(limit: 256 * MiB)
        let arena = try makeArena()
        let charger = try makeCharger(cg, arena, cacheLifetime: .seconds(60))  // the race must not depend on the guest's speed
        // Reads and caches the headroom. 16 MiB: the kernel scales oom_score_adj by the limit in
        // steps of 1/1000 (integer), so below 1000 pages (4 MiB) it would count for nothing.
        try charger.charge(offset: 0, length: 16 * MiB)
        let pid = try XCTUnwrap(charger.helperPID)
        // A workload in the target (its resident size is larger than the helper's).
        let workload = try spawn(["/bin/sleep", "120"], in: cg)
        usleep(200_000)
        let ooms = try charger.oomKillCount()
        // Behind the charger's cached reading: leave 256 KiB of room.
        XCTAssertEqual(cgWriteFile(cg + limitFile, "\(try usage(cg) + 256 * KiB)\n"), 0)
        XCTAssertThrowsError(try charger.charge(offset: 16 * MiB, length: 8 * MiB)) { e in
            XCTAssertEqual(e as? Errno, .noSpace)
        }
        XCTAssertGreaterThan(try charger.oomKillCount(), ooms, "the kernel did not OOM-kill (test did not race)")
        XCTAssertNotEqual(kill(pid, 0), 0, "the helper was not the victim")
        var st: Int32 = 0
        XCTAssertEqual(waitpid(workload, &st, WNOHANG), 0, "the workload was OOM-killed instead of the helper")
        // With room again, a new helper charges.
        XCTAssertEqual(cgWriteFile(cg + limitFile, "\(256 * MiB)\n"), 0)
        try charger.charge(offset: 16 * MiB, length: 8 * MiB)
        XCTAssertNotEqual(try XCTUnwrap(charger.helperPID), pid)
    }

    func testTargetRemovedGivesEIO() throws {
        let cg = try makeCgroup(limit: 64 * MiB)
        let arena = try makeArena()
        let charger = try makeCharger(cg, arena)
        try charger.charge(offset: 0, length: MiB)
        XCTAssertEqual(CgSys.punch(arena.rawValue, 0, MiB), 0)
        let pid = try XCTUnwrap(charger.helperPID)
        XCTAssertEqual(kill(pid, SIGKILL), 0)
        // Wait for it to leave the leaf, then remove leaf and target behind the charger's back.
        var tries = 0
        while rmdir(charger.leaf.path) != 0 && errno == EBUSY && tries < 200 { usleep(10_000); tries += 1 }
        XCTAssertEqual(rmdir(cg), 0, String(cString: strerror(errno)))
        XCTAssertThrowsError(try charger.charge(offset: MiB, length: MiB)) { e in
            XCTAssertEqual(e as? Errno, .ioError)
        }
    }

    func testInvalidTargets() throws {
        func kind(_ p: String) -> CgroupError.Kind? {
            do { _ = try CgroupTarget.resolve(p); return nil } catch { return error.kind }
        }
        XCTAssertEqual(kind("/nonexistent/chargefs"), .notFound)
        XCTAssertEqual(kind("/tmp"), .notCgroup)
        XCTAssertEqual(kind("/proc/self/status"), .notDirectory)
        let link = "/tmp/chargefs-test-link-\(getpid())"
        unlink(link)
        XCTAssertEqual(symlink("/tmp", link), 0)
        defer { unlink(link) }
        XCTAssertEqual(kind(link), .notCgroup)
        do {
            _ = try CgroupTarget.resolve(link)
        } catch {
            XCTAssertTrue(error.description.hasPrefix("memcg=\(link): not a cgroup"), error.description)
        }
        let (parent, version) = try XCTUnwrap(Self.memoryParent())
        switch version {
        case .v1:
            // `..` out of the memory hierarchy into another v1 hierarchy.
            XCTAssertEqual(kind("/sys/fs/cgroup/memory/../pids"), .noMemoryController)
            if access("/sys/fs/cgroup/pids", F_OK) == 0 { XCTAssertEqual(kind("/sys/fs/cgroup/pids"), .noMemoryController) }
        case .v2:
            // A grandchild whose parent does not enable memory for its children.
            let cg = try makeCgroup(limit: nil)
            XCTAssertEqual(mkdir(cg + "/sub", 0o755), 0)
            made.append(cg + "/sub")
            XCTAssertEqual(kind(cg + "/sub"), .noMemoryController)
        }
        XCTAssertNil(kind(parent))
    }

    func testPermissionIsCheckedForTheCaller() throws {
        let cg = try makeCgroup(limit: nil)
        do {
            _ = try CgroupTarget.resolve(cg, accessAs: (65534, 65534))
            XCTFail("nobody was allowed")
        } catch {
            XCTAssertEqual(error.kind, .permissionDenied)
            XCTAssertEqual(error.description, "memcg=\(cg): permission denied: you may not move processes into this cgroup")
        }
        // Delegated to nobody: now allowed (so the refusal above was the kernel's answer).
        XCTAssertEqual(chown(cg + "/cgroup.procs", 65534, 65534), 0)
        XCTAssertNoThrow(try CgroupTarget.resolve(cg, accessAs: (65534, 65534)))
    }

    /// A caller whose supplementary group may write cgroup.procs is allowed; the same ids
    /// without that group are not (directories' targets pass the caller's groups).
    func testSupplementaryGroupsCountForTheCaller() throws {
        let cg = try makeCgroup(limit: nil)
        XCTAssertEqual(chown(cg + "/cgroup.procs", 0, 4242), 0)
        XCTAssertEqual(chmod(cg + "/cgroup.procs", 0o664), 0)
        XCTAssertThrowsError(try CgroupTarget.resolve(cg, accessAs: (65534, 65534), groups: [100])) {
            XCTAssertEqual(($0 as? CgroupError)?.kind, .permissionDenied)
        }
        XCTAssertNoThrow(try CgroupTarget.resolve(cg, accessAs: (65534, 65534), groups: [100, 4242]))
    }

    func testCleanupStaleLeaves() throws {
        let cg = try makeCgroup(limit: nil)
        // A dead daemon's leaf: empty (its helper died with it).
        let dead = Self.deadPID()
        let stale = cg + "/chargefs-\(dead)"
        XCTAssertEqual(mkdir(stale, 0o755), 0)
        // A live daemon's leaf whose pid means nothing here (another PID namespace): it holds a
        // process, so it is live, whatever its number says.
        let live = cg + "/chargefs-\(dead).1"
        XCTAssertEqual(mkdir(live, 0o755), 0)
        made.append(live)
        let holder = try spawn(["/bin/sleep", "60"], in: live)
        // Something else that happens to be named like a leaf but is not ours to judge.
        XCTAssertEqual(mkdir(cg + "/chargefs-other", 0o755), 0)
        made.append(cg + "/chargefs-other")

        let result = try StaleLeafCleanup.run(target: cg)
        XCTAssertEqual(result.removed, [stale])
        XCTAssertEqual(result.inUse, [live])
        XCTAssertNotEqual(access(stale, F_OK), 0)
        XCTAssertEqual(access(live, F_OK), 0)
        XCTAssertEqual(kill(holder, 0), 0, "cleanup killed a live leaf's process")
        XCTAssertEqual(access(cg + "/chargefs-other", F_OK), 0)

        // A daemon starting cleans up as well; a live daemon's leaf survives a cleanup, and one
        // removed between two helpers is made again.
        XCTAssertEqual(mkdir(stale, 0o755), 0)
        let arena = try makeArena()
        let charger = try makeCharger(cg, arena)
        XCTAssertNotEqual(access(stale, F_OK), 0)
        XCTAssertEqual(try StaleLeafCleanup.run(target: cg).removed, [])
        XCTAssertEqual(access(charger.leaf.path, F_OK), 0)
        let pid = try XCTUnwrap(charger.helperPID)
        XCTAssertEqual(kill(pid, SIGKILL), 0)
        XCTAssertTrue(Self.removeCgroup(charger.leaf.path))
        try charger.charge(offset: 0, length: MiB)
        XCTAssertEqual(access(charger.leaf.path, F_OK), 0)
        charger.shutdown()
        XCTAssertNotEqual(access(charger.leaf.path, F_OK), 0, "shutdown leaves the leaf")
    }

    /// Charges from many threads at once, with no lock of the caller's: every byte is charged once.
    func testConcurrentCharges() throws {
        let cg = try makeCgroup(limit: 256 * MiB)
        let arena = try makeArena()
        let charger = try makeCharger(cg, arena)
        let before = try usage(cg)
        let failures = Mutex(0)
        DispatchQueue.concurrentPerform(iterations: 4) { t in
            for i in 0..<16 {
                do throws(Errno) {
                    try charger.charge(offset: Int64(t * 16 + i) * 256 * KiB, length: 256 * KiB)
                } catch {
                    failures.withLock { $0 += 1 }
                }
            }
        }
        XCTAssertEqual(failures.withLock { $0 }, 0)
        // 1 MiB, the documented slack: usage counts the kernel's per-CPU charge stock (up to 64
        // pages a CPU), which may be drained between the two reads (measured once: 560 KiB less).
        assertNear(try usage(cg) - before, 16 * MiB, MiB, "target charged")
        XCTAssertEqual(charger.helperStarts, 1)
    }

    /// A charge whose helper cannot answer (v2: the target frozen, as by docker pause; v1: the
    /// helper stopped) waits, without a time limit while frozen, and completes after the thaw;
    /// meanwhile availableBytes (statfs) answers at once. Unmount ends such a wait.
    func testFrozenTargetChargeWaitsAndRoomAnswers() throws {
        let (_, version) = try XCTUnwrap(Self.memoryParent())
        let cg = try makeCgroup(limit: 64 * MiB)
        let arena = try makeArena()
        let charger = try makeCharger(cg, arena)
        try charger.charge(offset: 0, length: MiB)
        let pid = try XCTUnwrap(charger.helperPID)
        func freeze(_ on: Bool) {
            if version == .v2 {
                XCTAssertEqual(cgWriteFile(cg + "/cgroup.freeze", on ? "1\n" : "0\n"), 0)
            } else {
                XCTAssertEqual(kill(pid, on ? SIGSTOP : SIGCONT), 0)
            }
        }
        freeze(true)
        if version == .v2 {
            var tries = 0
            while !charger.leaf.isFrozen && tries < 500 { usleep(10_000); tries += 1 }
            XCTAssertTrue(charger.leaf.isFrozen)
        }
        let outcome = Mutex<Errno??>(nil)  // nil: still waiting
        let waiter = Thread {
            do throws(Errno) {
                try charger.charge(offset: MiB, length: 4 * MiB)
                outcome.withLock { $0 = .some(nil) }
            } catch {
                outcome.withLock { $0 = .some(error) }
            }
        }
        waiter.start()
        usleep(2_500_000)  // past the helper wait's one-second slices
        XCTAssertTrue(outcome.withLock { $0 } == nil, "the charge did not wait for the frozen helper")
        let t0 = ContinuousClock.now
        let room = charger.availableBytes()
        let status = charger.statusLine
        XCTAssertLessThan(ContinuousClock.now - t0, .milliseconds(500), "availableBytes waited for the charge")
        XCTAssertNotNil(room)
        XCTAssertTrue(status.hasPrefix("memcg="))
        XCTAssertEqual(kill(pid, 0), 0, "the waiting helper was killed")
        freeze(false)
        var tries = 0
        while outcome.withLock({ $0 }) == nil && tries < 1000 { usleep(10_000); tries += 1 }
        XCTAssertEqual(outcome.withLock { $0 }, .some(nil), "the charge did not complete after the thaw")
        XCTAssertEqual(charger.helperPID, pid)

        // Frozen again, a waiting charge is ended by shutdown (unmount) within seconds.
        freeze(true)
        outcome.withLock { $0 = nil }
        let second = Thread {
            do throws(Errno) {
                try charger.charge(offset: 8 * MiB, length: MiB)
                outcome.withLock { $0 = .some(nil) }
            } catch {
                outcome.withLock { $0 = .some(error) }
            }
        }
        second.start()
        usleep(1_500_000)
        let s0 = ContinuousClock.now
        charger.shutdown()
        XCTAssertLessThan(ContinuousClock.now - s0, .seconds(5), "shutdown waited for the frozen target")
        tries = 0
        while outcome.withLock({ $0 }) == nil && tries < 500 { usleep(10_000); tries += 1 }
        XCTAssertEqual(outcome.withLock { $0 }, .some(.ioError))
        if version == .v2 { freeze(false) }  // (v1: the stopped helper is gone with the charger)
    }

    /// On v2 the target's cgroup.subtree_control is left as found: an emptied target takes
    /// processes again after the charger is gone.
    func testTargetSetupLeftAsFound() throws {
        let cg = try makeCgroup(limit: 64 * MiB)
        let (_, version) = try XCTUnwrap(Self.memoryParent())
        let control = cg + "/cgroup.subtree_control"  // v2 only; v1 has no such rule
        let before = version == .v2 ? try cgReadFile(control) : ""
        let charger = try makeCharger(cg, try makeArena())
        try charger.charge(offset: 0, length: MiB)
        charger.shutdown()
        if version == .v2 { XCTAssertEqual(try cgReadFile(control), before) }
        XCTAssertEqual(Self.subdirectories(cg), [], "a child cgroup was left")
        let sleeper = try spawn(["/bin/sleep", "60"], in: cg)
        XCTAssertTrue((try cgReadFile(cg + "/cgroup.procs")).split(separator: "\n").contains(Substring("\(sleeper)")))
    }

    /// The helper program must be there; the error says where it was looked for.
    func testMissingHelperIsNamed() throws {
        let cg = try makeCgroup(limit: nil)
        XCTAssertThrowsError(try CgroupCharger(target: CgroupTarget.resolve(cg), arena: try makeArena(), helperPath: "/nonexistent/chargefs-charge-helper")) { e in
            XCTAssertEqual((e as? CgroupError)?.description,
                           "memcg=\(cg): the charge helper /nonexistent/chargefs-charge-helper is missing or not executable (install chargefs-charge-helper next to chargefsd)")
        }
        XCTAssertEqual(cgDirectoryNames(cg)?.filter { $0.hasPrefix("chargefs-") }, [], "a leaf was left")
    }

    /// A pid that no process has now (a child that has exited and been reaped).
    static func deadPID() -> pid_t {
        let child = fork()
        if child == 0 { _exit(0) }
        var st: Int32 = 0
        waitpid(child, &st, 0)
        return child
    }

    // MARK: helpers


    static func subdirectories(_ path: String) -> [String]? {
        cgDirectoryNames(path)?.filter { name in
            var st = stat()
            return stat(path + "/" + name, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
        }
    }

    static func listFDs(_ pid: pid_t) -> [Int]? {
        guard let d = opendir("/proc/\(pid)/fd") else { return nil }
        defer { closedir(d) }
        var out: [Int] = []
        while let e = readdir(d) {
            let name = withUnsafePointer(to: e.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if let n = Int(name) { out.append(n) }
        }
        return out.sorted()
    }

    func cgParent(_ p: String) -> String {
        String(p[..<(p.lastIndex(of: "/") ?? p.endIndex)])
    }
}
