import Glibc
import SystemPackage
import XCTest
@testable import ChargeFS

/// memcg=auto (Tejun Heo's shared charging), in-process: the path arithmetic, the option rules,
/// and a file moving from its writer's cgroup to the common ancestor with fake cgroups.
final class SharedChargingTests: XCTestCase {
    let page = PageSize.bytes

    func testAncestorPickIsTheNearestCommonOneNeverAboveTheScope() {
        XCTAssertEqual(SharedCharging.host(of: ["/P/B"], scope: "/P"), "/P/B")
        XCTAssertEqual(SharedCharging.host(of: ["/P/B", "/P/C"], scope: "/P"), "/P")
        XCTAssertEqual(SharedCharging.host(of: ["/P/a/b", "/P/a/c/d"], scope: "/P"), "/P/a")
        XCTAssertEqual(SharedCharging.host(of: ["/P/a/b", "/P/a"], scope: "/P"), "/P/a")
        // Whole components: /P/ab is not below /P/a.
        XCTAssertEqual(SharedCharging.host(of: ["/P/ab", "/P/a"], scope: "/P"), "/P")
        XCTAssertEqual(SharedCharging.host(of: ["/P/B", "/elsewhere/C"], scope: "/P"), "/P")
        XCTAssertEqual(SharedCharging.host(of: [], scope: "/P"), "/P")
    }

    func testScopeClampAndLevels() {
        XCTAssertEqual(SharedCharging.clamp("/P/b", scope: "/P"), "/P/b")
        XCTAssertEqual(SharedCharging.clamp("/X/b", scope: "/P"), "/P")
        XCTAssertEqual(SharedCharging.clamp("/Pother", scope: "/P"), "/P")
        XCTAssertEqual(SharedCharging.clamp("/", scope: "/P"), "/P")
        XCTAssertEqual(SharedCharging.levels(from: "/P/a/b", scope: "/P"), ["/P/a/b", "/P/a", "/P"])
        XCTAssertEqual(SharedCharging.levels(from: "/Q", scope: "/P"), ["/P"])
    }

    func testSharesTextCountsOwnedSharedAndHostedOnce() {
        let mib: Int64 = 1 << 20
        let files = [
            SharedCharging.FileShare(users: ["/P/B"], host: "/P/B", bytes: 3 * mib),
            SharedCharging.FileShare(users: ["/P/B", "/P/C"], host: "/P", bytes: 8 * mib),
            SharedCharging.FileShare(users: ["/P/a/x", "/P/a/y"], host: "/P/a", bytes: 1 * mib),
        ]
        XCTAssertEqual(SharedCharging.text(files), """
            /P owned=0 shared=0 hosted=8388608
            /P/B owned=3145728 shared=8388608 hosted=0
            /P/C owned=0 shared=8388608 hosted=0
            /P/a owned=0 shared=0 hosted=1048576
            /P/a/x owned=0 shared=1048576 hosted=0
            /P/a/y owned=0 shared=1048576 hosted=0

            """)
        XCTAssertEqual(SharedCharging.shared(by: "/P/a", in: files), 0, "hosted inside its own subtree")
        XCTAssertEqual(SharedCharging.text([]), "")
    }

    func testOptionRulesAndErrors() throws {
        let o = try MountOptions.parse(["/m", "-o", "memcg=auto,memcg_scope=/sys/fs/cgroup/memory/P"])
        XCTAssertTrue(o.memcgAuto)
        XCTAssertEqual(o.chargeTargetPath, "/sys/fs/cgroup/memory/P")
        XCTAssertTrue(o.fsname.contains("memcg=auto:/sys/fs/cgroup/memory/P"), o.fsname)
        XCTAssertEqual(o.fileSystemConfig.passthroughMinBytes, FileSystemConfig.defaultPassthroughMinBytes,
                       "passthrough for files hosted by the scope itself, which never move again")
        XCTAssertEqual(try MountOptions.parse(["/m", "-o", "memcg=/sys/fs/cgroup/P"]).chargeTargetPath, "/sys/fs/cgroup/P")
        let cases: [([String], String)] = [
            (["/m", "-o", "memcg_scope=/sys/fs/cgroup/P"], "memcg_scope=/sys/fs/cgroup/P: only with memcg=auto"),
            (["/m", "-o", "memcg=/sys/fs/cgroup/Q,memcg_scope=/sys/fs/cgroup/P"], "only with memcg=auto"),
            (["/m", "-o", "memcg=auto"], "memcg=auto needs memcg_scope="),
            (["/m", "-o", "memcg=auto,memcg_scope=rel"], "memcg_scope=rel: must be an absolute path"),
            (["/m", "-o", "memcg=auto,memcg_scope"], "mount option 'memcg_scope' needs a value"),
            (["/m", "-o", "memcg=automatic"], "memcg=automatic"),
        ]
        for (args, needle) in cases {
            XCTAssertThrowsError(try MountOptions.parse(args), "\(args)") { error in
                let text = (error as? UsageError)?.description ?? ""
                XCTAssertTrue(text.contains(needle), "\(args): \(text)")
                XCTAssertFalse(text.contains("\n"), "one line")
            }
        }
    }

    /// Cgroups /P (the mount's), /P/B, /P/C; pid 11 is in B, 12 in C, 13 outside P.
    final class FakeScope: SharedScope, ChargeTargets, @unchecked Sendable {
        let scopePath = "/P"
        var chargers: [String: FakeCharger] = [:]
        /// What levels(of:) reports for each cgroup: usage and limit in bytes.
        var counters: [String: (used: Int64, limit: Int64?)] = [:]
        func cgroupPath(ofProcess pid: Int32) -> String {
            [11: "/P/B", 12: "/P/C"][pid] ?? scopePath
        }
        func levels(of path: String) -> [(cgroup: String, used: Int64, limit: Int64?)] {
            SharedCharging.levels(from: path, scope: scopePath).map { ($0, counters[$0]?.used ?? 0, counters[$0]?.limit) }
        }
        func check(_ path: String, uid: UInt32, gid: UInt32, groups: [UInt32]) throws(Errno) -> String { path }
        func charger(for key: String, arena: FileDescriptor) throws(Errno) -> PageCharger {
            let c = FakeCharger(arena: arena)
            chargers[key] = c
            return c
        }
    }

    let inB = Caller(uid: 0, gid: 0, pid: 11)
    let inC = Caller(uid: 0, gid: 0, pid: 12)

    func makeFS(_ scope: FakeScope) throws -> FileSystem {
        let arena = try Arena(capacityPages: 1 << 16)
        let store = PageStore(arena: arena, charger: DaemonCharger(arena: arena.fileDescriptor), key: "/P")
        store.targets = scope
        store.shares = scope
        return FileSystem(config: FileSystemConfig(), store: store)
    }

    func shares(_ fs: FileSystem) throws -> String {
        String(decoding: try fs.getxattr(FileSystem.rootIno, name: FileSystem.sharesXattr), as: UTF8.self)
    }

    func testWriterPaysThenTheCommonAncestorHostsOnceAndWritesCountShares() throws {
        let scope = FakeScope()
        let fs = try makeFS(scope)
        let f = try fs.create(parent: FileSystem.rootIno, name: Array("f".utf8), mode: 0o100644, caller: inB).ino
        let bytes = (0..<(100 * page)).map { UInt8(truncatingIfNeeded: $0 / 7) }
        XCTAssertEqual(try bytes.withUnsafeBytes { try fs.write(f, offset: 0, data: $0, caller: inB, clearSetIDAsked: false).written }, bytes.count)
        XCTAssertEqual(fs.chargeTarget(1).cgroup, "/P/B")
        XCTAssertEqual(fs.chargeTarget(1).pagesInUse, 100, "B's own file: B pays")
        XCTAssertEqual(fs.chargeTarget(0).pagesInUse, 0)
        XCTAssertEqual(try shares(fs), "/P/B owned=409600 shared=0 hosted=0\n")

        // C opens it: the pages move to /P (pool 0), counted once; the bytes stay the same.
        _ = try fs.open(f, flags: OpenFlags(rawValue: O_RDONLY), caller: inC, clearSetIDAsked: false)
        XCTAssertEqual(fs.chargeTarget(1).pagesInUse, 0, "B's charge falls")
        XCTAssertEqual(fs.chargeTarget(0).pagesInUse, 100, "P hosts it")
        var back: [UInt8] = []
        try fs.read(f, offset: 0, count: bytes.count, noatime: true) { for v in $0 { back += UnsafeRawBufferPointer(start: v.iov_base, count: v.iov_len) } }
        XCTAssertEqual(back, bytes)
        XCTAssertEqual(try shares(fs), """
            /P owned=0 shared=0 hosted=409600
            /P/B owned=0 shared=409600 hosted=0
            /P/C owned=0 shared=409600 hosted=0

            """)
        // A second open by C moves nothing more.
        _ = try fs.open(f, flags: OpenFlags(rawValue: O_RDONLY), caller: inC, clearSetIDAsked: false)
        XCTAssertEqual(fs.chargeTarget(0).pagesInUse, 100)

        XCTAssertEqual(fs.chargeTarget(1).cgroup, "", "B holds no file now: its pool and helper are given back")
        // B: 2 MiB limit, 1.5 MiB used, 400 KiB shared: a 1 MiB write is refused before any
        // charge (and B keeps no charged page to store part of it in).
        scope.counters["/P/B"] = (1536 * 1024, 2 << 20)
        let g = try fs.create(parent: FileSystem.rootIno, name: Array("g".utf8), mode: 0o100644, caller: inB).ino
        let chunk = [UInt8](repeating: 1, count: 1 << 20)
        XCTAssertThrowsError(try chunk.withUnsafeBytes { try fs.write(g, offset: 0, data: $0, caller: inB, clearSetIDAsked: false) }) { error in
            XCTAssertEqual(error as? Errno, .noSpace, "1.5 MiB + 400 KiB + 1 MiB > 2 MiB - 256 KiB")
        }
        let short = 0
        scope.counters["/P/B"] = (200 * 1024, 2 << 20)
        XCTAssertEqual(try chunk.withUnsafeBytes { try fs.write(g, offset: Int64(short), data: $0, caller: inB, clearSetIDAsked: false).written },
                       chunk.count, "200 KiB + 400 KiB + 1 MiB fits")
        // C carries the 400 KiB too: 1 MiB more does not fit in C's 1 MiB limit.
        let h = try fs.create(parent: FileSystem.rootIno, name: Array("h".utf8), mode: 0o100644, caller: inC).ino
        scope.counters["/P/C"] = (0, 1 << 20)
        XCTAssertThrowsError(try chunk.withUnsafeBytes { try fs.write(h, offset: 0, data: $0, caller: inC, clearSetIDAsked: false) }) { error in
            XCTAssertEqual(error as? Errno, .noSpace)
        }

        // fallocate counts the shares as a write does: all or nothing.
        XCTAssertThrowsError(try fs.fallocate(h, mode: .allocate, offset: 0, length: 1 << 20, caller: inC)) { error in
            XCTAssertEqual(error as? Errno, .noSpace)
        }
        XCTAssertEqual(try fs.getattr(h).size, 0, "nothing allocated")
        scope.counters["/P/C"] = (0, 4 << 20)
        XCTAssertNoThrow(try fs.fallocate(h, mode: .allocate, offset: 0, length: 1 << 20, caller: inC))

        // Removing the shared file gives it back everywhere.
        try fs.unlink(parent: FileSystem.rootIno, name: Array("f".utf8))
        for _ in 0..<3 { fs.release(f) }  // the create's open and C's two
        fs.forget(f, count: 1)  // the create's lookup
        XCTAssertEqual(fs.chargeTarget(0).pagesInUse, 0)
        XCTAssertFalse(try shares(fs).contains("shared=409600"))
    }

    func testDirectoryTargetsAreRefusedAndRenamesMoveNothing() throws {
        let scope = FakeScope()
        let fs = try makeFS(scope)
        let d = try fs.mkdir(parent: FileSystem.rootIno, name: Array("d".utf8), mode: 0o755, caller: inB).ino
        XCTAssertThrowsError(try fs.setxattr(d, name: FileSystem.memcgXattr, value: Array("/P/C".utf8), flags: [], caller: .root)) { error in
            XCTAssertEqual(error as? Errno, .invalidArgument)
        }
        XCTAssertThrowsError(try fs.setxattr(FileSystem.rootIno, name: FileSystem.sharesXattr, value: [], flags: [], caller: .root)) { error in
            XCTAssertEqual(error as? Errno, .notPermitted)
        }
        let f = try fs.create(parent: FileSystem.rootIno, name: Array("f".utf8), mode: 0o100644, caller: inC).ino
        let bytes = [UInt8](repeating: 3, count: 10 * page)
        _ = try bytes.withUnsafeBytes { try fs.write(f, offset: 0, data: $0, caller: inC, clearSetIDAsked: false) }
        try fs.rename(parent: FileSystem.rootIno, name: Array("f".utf8), newParent: d, newName: Array("f".utf8), flags: [])
        XCTAssertEqual(try shares(fs), "/P/C owned=40960 shared=0 hosted=0\n", "a rename moves nothing")
    }

    func testSharesAttributeIsAbsentWithoutMemcgAuto() throws {
        let fs = FileSystem(config: FileSystemConfig(), store: try PageStore(capacityPages: 64) { DaemonCharger(arena: $0) })
        XCTAssertThrowsError(try fs.getxattr(FileSystem.rootIno, name: FileSystem.sharesXattr)) { error in
            XCTAssertEqual(error as? Errno, .noData)
        }
    }
}
