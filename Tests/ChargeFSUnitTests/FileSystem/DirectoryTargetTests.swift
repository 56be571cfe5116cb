import Glibc
import SystemPackage
import XCTest
@testable import ChargeFS

/// A charge target per directory (user.chargefs.memcg), in-process: fake cgroups whose chargers
/// keep a budget of pages, and a permission rule of their own.
final class DirectoryTargetTests: XCTestCase {
    let owner = Caller(uid: 1000, gid: 1000)
    let other = Caller(uid: 1001, gid: 1001)
    let page = PageSize.bytes
    let memcg = FileSystem.memcgXattr

    func makeFS(_ targets: FakeTargets) throws -> FileSystem {
        let store = try PageStore(capacityPages: 1 << 16) { DaemonCharger(arena: $0) }
        store.targets = targets
        return FileSystem(config: FileSystemConfig(), store: store)
    }

    func mkdir(_ fs: FileSystem, _ n: String, in parent: InodeNumber = FileSystem.rootIno) throws -> InodeNumber {
        try fs.mkdir(parent: parent, name: Array(n.utf8), mode: 0o755, caller: owner).ino
    }

    func write(_ fs: FileSystem, in dir: InodeNumber, _ n: String, pages: Int, byte: UInt8 = 7) throws -> InodeNumber {
        let ino = try fs.create(parent: dir, name: Array(n.utf8), mode: 0o100644, caller: owner).ino
        XCTAssertEqual(try fs.write(ino, [UInt8](repeating: byte, count: pages * page), caller: owner), pages * page)
        return ino
    }

    func testWritesBelowChargeTheDirectorysTargetAndMoveBackOnRemove() throws {
        let targets = FakeTargets(["/cg/a": 1000])
        let fs = try makeFS(targets)
        let a = try mkdir(fs, "a")
        try fs.setxattr(a, name: memcg, value: Array("/cg/a".utf8), flags: [], caller: owner)
        XCTAssertEqual(fs.memcgTarget(of: a), "/cg/a")
        XCTAssertNil(fs.memcgTarget(of: FileSystem.rootIno), "the daemon's own cgroup: no target to show")
        let sub = try mkdir(fs, "sub", in: a)
        let f = try write(fs, in: sub, "f", pages: 100)
        XCTAssertEqual(fs.memcgTarget(of: f), "/cg/a", "inherited")
        let charger = try XCTUnwrap(targets.chargers["/cg/a"])
        XCTAssertLessThanOrEqual(try XCTUnwrap(charger.pagesLeft), 900, "the target paid for the 100 pages")
        XCTAssertEqual(fs.chargeTarget(1).pagesInUse, 100)
        try fs.removexattr(a, name: memcg, caller: owner)
        XCTAssertNil(fs.memcgTarget(of: a))
        XCTAssertEqual(fs.chargeTarget(1).pagesInUse, 0)
        XCTAssertEqual(fs.chargeTarget(1).cgroup, "", "given back once nothing is left")
        XCTAssertEqual(try fs.bytes(of: f, count: 100 * page), [UInt8](repeating: 7, count: 100 * page))
    }

    func testNoRoomMovesNothing() throws {
        let targets = FakeTargets(["/cg/small": 50])
        let fs = try makeFS(targets)
        let d = try mkdir(fs, "d")
        let f = try write(fs, in: d, "f", pages: 80)
        XCTAssertThrowsError(try fs.setxattr(d, name: memcg, value: Array("/cg/small".utf8), flags: [], caller: owner)) {
            XCTAssertEqual($0 as? Errno, .noSpace)
        }
        XCTAssertNil(fs.memcgTarget(of: d))
        XCTAssertEqual(fs.chargeTarget(0).pagesInUse, 80)
        XCTAssertEqual(try fs.bytes(of: f, count: 80 * page), [UInt8](repeating: 7, count: 80 * page))
    }

    func testRefusals() throws {
        let fs = try makeFS(FakeTargets(["/cg/a": 1000]))
        let d = try mkdir(fs, "d")
        XCTAssertThrowsError(try fs.setxattr(d, name: memcg, value: Array("/cg/a".utf8), flags: [], caller: other)) {
            XCTAssertEqual($0 as? Errno, .notPermitted, "not the owner")
        }
        let mine = try fs.mkdir(parent: FileSystem.rootIno, name: Array("mine".utf8), mode: 0o755, caller: other).ino
        XCTAssertThrowsError(try fs.setxattr(mine, name: memcg, value: Array("/cg/a".utf8), flags: [], caller: other)) {
            XCTAssertEqual($0 as? Errno, .notPermitted, "may not charge that cgroup")
        }
        XCTAssertThrowsError(try fs.setxattr(d, name: memcg, value: Array("/cg/none".utf8), flags: [], caller: owner)) {
            XCTAssertEqual($0 as? Errno, .noSuchFileOrDirectory)
        }
        XCTAssertThrowsError(try fs.removexattr(d, name: memcg, caller: owner)) { XCTAssertEqual($0 as? Errno, .noData) }
        XCTAssertNil(fs.memcgTarget(of: d))
        XCTAssertNil(fs.memcgTarget(of: mine))
    }

    func testRenameCarriesTheCharge() throws {
        let targets = FakeTargets(["/cg/a": 1000, "/cg/b": 1000])
        let fs = try makeFS(targets)
        let a = try mkdir(fs, "a"), b = try mkdir(fs, "b")
        try fs.setxattr(a, name: memcg, value: Array("/cg/a".utf8), flags: [], caller: owner)
        try fs.setxattr(b, name: memcg, value: Array("/cg/b".utf8), flags: [], caller: owner)
        let f = try write(fs, in: a, "f", pages: 30, byte: 9)
        try fs.rename(parent: a, name: Array("f".utf8), newParent: b, newName: Array("f".utf8), flags: [])
        XCTAssertEqual(fs.memcgTarget(of: f), "/cg/b")
        XCTAssertEqual(fs.chargeTarget(1).pagesInUse, 0)
        XCTAssertEqual(fs.chargeTarget(2).pagesInUse, 30)
        XCTAssertEqual(try fs.bytes(of: f, count: 30 * page), [UInt8](repeating: 9, count: 30 * page))
    }
    /// A caller allowed only through a supplementary group (group 2000 stands for a delegated,
    /// group-writable cgroup.procs) may set a target on a directory it owns.
    func testSupplementaryGroupsCount() throws {
        let fs = try makeFS(FakeTargets(["/cg/a": 1000]))
        let member = Caller(uid: 1001, gid: 1001, supplementaryGroups: { [5, 2000] })
        let mine = try fs.mkdir(parent: FileSystem.rootIno, name: Array("mine".utf8), mode: 0o755, caller: member).ino
        XCTAssertThrowsError(try fs.setxattr(mine, name: memcg, value: Array("/cg/a".utf8), flags: [], caller: other)) {
            XCTAssertEqual($0 as? Errno, .notPermitted, "not the owner")
        }
        try fs.setxattr(mine, name: memcg, value: Array("/cg/a".utf8), flags: [], caller: member)
        XCTAssertEqual(fs.memcgTarget(of: mine), "/cg/a")
    }

    /// The status attribute has a line per directory target in use: its cgroup and what it holds.
    func testStatusHasALinePerDirectoryTarget() throws {
        let fs = try makeFS(FakeTargets(["/cg/a": 1000, "/cg/b": 1000]))
        let a = try mkdir(fs, "a"), b = try mkdir(fs, "b")
        try fs.setxattr(a, name: memcg, value: Array("/cg/a".utf8), flags: [], caller: owner)
        try fs.setxattr(b, name: memcg, value: Array("/cg/b".utf8), flags: [], caller: owner)
        _ = try write(fs, in: a, "f", pages: 100)
        let status = String(decoding: try fs.getxattr(FileSystem.rootIno, name: FileSystem.statusXattr), as: UTF8.self)
        let lines = status.split(separator: "\n").filter { $0.hasPrefix("dir_target=") }
        XCTAssertEqual(lines.count, 2, status)
        let lineA = try XCTUnwrap(lines.first { $0.hasPrefix("dir_target=/cg/a ") })
        // 100 pages in use, plus what the charge batch left in the reserve (64 pages at most).
        let charged = try XCTUnwrap(lineA.split(separator: " ").first { $0.hasPrefix("charged_bytes=") }.flatMap { Int($0.dropFirst(14)) })
        XCTAssertGreaterThanOrEqual(charged, 100 * page)
        XCTAssertLessThanOrEqual(charged, (100 + PageStore.reserveLimit) * page)
        XCTAssertTrue(lineA.contains(" limit_bytes=unlimited"), String(lineA))
        try fs.removexattr(b, name: memcg, caller: owner)
        let after = String(decoding: try fs.getxattr(FileSystem.rootIno, name: FileSystem.statusXattr), as: UTF8.self)
        XCTAssertFalse(after.contains("dir_target=/cg/b"), "a target given back has no line")
    }
}
