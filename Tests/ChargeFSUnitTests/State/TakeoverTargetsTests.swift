import Glibc
import SystemPackage
import XCTest
@testable import ChargeFS

/// Takeover of trees charged to more than the mount's own target (docs/takeover.md): a
/// directory's own user.chargefs.memcg, and memcg=auto's hosts and sharers. The successor opens
/// each target again at the index its files name, with a new charger (the fakes stand for
/// cgroups), and recounts each target's pages from the page maps.
final class TakeoverTargetsTests: XCTestCase {
    let owner = Caller(uid: 1000, gid: 1000)
    let page = PageSize.bytes
    let root = FileSystem.rootIno
    let memcg = FileSystem.memcgXattr

    func n(_ s: String) -> FileName { Array(s.utf8) }

    /// A file system keeping state on `store` (made by `makeStore` on a new arena).
    func makeKept(_ makeStore: (Arena) -> PageStore) throws -> (FileSystem, InProcessKeeper) {
        let keeper = InProcessKeeper()
        let arena = try Arena(capacityPages: 1 << 16)
        let fs = try FileSystem(config: FileSystemConfig(), store: makeStore(arena), state: try StateFiles.create(), keeper: keeper)
        return (fs, keeper)
    }

    /// Drops `fs` with no cleanup (a kill -9) and takes over from the keeper's descriptors;
    /// `prepare` sets the new store's targets (what the successor's mount options give it).
    func takeOver(_ fs: inout FileSystem, _ keeper: InProcessKeeper, key: String = "",
                  _ prepare: (PageStore) -> Void) throws -> FileSystem {
        fs = FileSystem(config: FileSystemConfig(), store: try PageStore(capacityPages: 4) { DaemonCharger(arena: $0) })
        let arena = try Arena(adopting: try XCTUnwrap(keeper.descriptor(.arena)), tmpfsRoot: keeper.descriptor(.arenaRoot), backing: .memfd)
        let files = try StateFiles.adopt(journal: try XCTUnwrap(keeper.descriptor(.journal)),
                                         checkpoints: [try XCTUnwrap(keeper.descriptor(.checkpoint(0))),
                                                       try XCTUnwrap(keeper.descriptor(.checkpoint(1)))])
        return try FileSystem(takingOver: files, keeper: keeper, config: FileSystemConfig()) {
            let store = PageStore(adopting: arena, charger: DaemonCharger(arena: arena.fileDescriptor), key: key, inUse: $0, backingPages: $1)
            prepare(store)
            return store
        }
    }

    func write(_ fs: FileSystem, _ ino: InodeNumber, pages: Int, at offset: Int = 0, byte: UInt8, caller: Caller? = nil) throws -> Int {
        try fs.write(ino, [UInt8](repeating: byte, count: pages * page), at: Int64(offset), caller: caller ?? owner)
    }

    func testDirectoryTargetsAreTakenOverAtTheirIndexes() throws {
        let targets = FakeTargets(["/cg/a": 10_000, "/cg/b": 10_000])
        var (fs, keeper) = try makeKept { arena in
            let store = PageStore(arena: arena, charger: DaemonCharger(arena: arena.fileDescriptor))
            store.targets = targets
            return store
        }
        let a = try fs.mkdir(parent: root, name: n("a"), mode: 0o755, caller: owner).ino
        try fs.setxattr(a, name: memcg, value: n("/cg/a"), flags: [], caller: owner)  // target 1
        let b = try fs.mkdir(parent: root, name: n("b"), mode: 0o755, caller: owner).ino
        try fs.setxattr(b, name: memcg, value: n("/cg/b"), flags: [], caller: owner)  // target 2
        let inA = try fs.create(parent: a, name: n("fa"), mode: 0o100644, caller: owner).ino
        XCTAssertEqual(try write(fs, inA, pages: 30, byte: 1), 30 * page)
        let sub = try fs.mkdir(parent: b, name: n("sub"), mode: 0o755, caller: owner).ino
        let inB = try fs.create(parent: sub, name: n("fb"), mode: 0o100644, caller: owner).ino
        XCTAssertEqual(try write(fs, inB, pages: 20, byte: 2), 20 * page)
        let inRoot = try fs.create(parent: root, name: n("fr"), mode: 0o100644, caller: owner).ino
        XCTAssertEqual(try write(fs, inRoot, pages: 5, byte: 3), 5 * page)
        // a gives its target back: slot 1 is empty, b's stays at index 2.
        try fs.removexattr(a, name: memcg, caller: owner)
        XCTAssertEqual(fs.chargeTarget(1).cgroup, "")
        XCTAssertEqual(fs.chargeTarget(2).cgroup, "/cg/b")
        XCTAssertEqual(fs.chargeTarget(2).pagesInUse, 20)
        let mountPages = fs.chargeTarget(0).pagesInUse
        XCTAssertEqual(mountPages, 35)

        let successor = FakeTargets(["/cg/a": 10_000, "/cg/b": 10_000])
        fs = try takeOver(&fs, keeper) { $0.targets = successor }
        XCTAssertEqual(fs.chargeTarget(2).cgroup, "/cg/b", "the target at the index its files name")
        XCTAssertEqual(fs.chargeTarget(2).pagesInUse, 20, "its pages recounted from the maps")
        XCTAssertEqual(fs.chargeTarget(1).cgroup, "", "a slot given back stays empty")
        XCTAssertEqual(fs.chargeTarget(0).pagesInUse, mountPages)
        XCTAssertEqual(fs.memcgTarget(of: b), "/cg/b")
        XCTAssertEqual(fs.memcgTarget(of: inB), "/cg/b", "inherited, as before")
        XCTAssertNil(fs.memcgTarget(of: a))
        XCTAssertNil(successor.chargers["/cg/a"], "no charger for a target no one names")
        let charger = try XCTUnwrap(successor.chargers["/cg/b"], "a new charger (helper) for the target")
        XCTAssertEqual(try fs.bytes(of: inB, count: 20 * page), [UInt8](repeating: 2, count: 20 * page))
        XCTAssertEqual(try fs.bytes(of: inA, count: 30 * page), [UInt8](repeating: 1, count: 30 * page))

        // It goes on charging to the same target, through the new charger.
        XCTAssertEqual(try write(fs, inB, pages: 10, at: 20 * page, byte: 4), 10 * page)
        XCTAssertEqual(fs.chargeTarget(2).pagesInUse, 30)
        XCTAssertLessThanOrEqual(try XCTUnwrap(charger.pagesLeft), 10_000 - 10)
        let newInB = try fs.mkdir(parent: sub, name: n("new"), mode: 0o755, caller: owner).ino
        XCTAssertEqual(fs.memcgTarget(of: newInB), "/cg/b", "a new directory takes its parent's target")
        // And gives it back when the directory's target goes.
        try fs.removexattr(b, name: memcg, caller: owner)
        XCTAssertEqual(fs.chargeTarget(2).cgroup, "")
        XCTAssertEqual(fs.chargeTarget(0).pagesInUse, mountPages + 30)

        // A second takeover after those changes (the table recorded again) and a checkpoint.
        fs.checkpointNow()
        try fs.setxattr(a, name: memcg, value: n("/cg/a"), flags: [], caller: owner)
        fs = try takeOver(&fs, keeper) { $0.targets = FakeTargets(["/cg/a": 10_000]) }
        XCTAssertEqual(fs.memcgTarget(of: inA), "/cg/a")
        XCTAssertEqual(fs.chargeTarget(1).pagesInUse, 30)
        XCTAssertEqual(fs.chargeTarget(2).cgroup, "")
    }

    func testATargetThatCannotBeOpenedFailsTheTakeover() throws {
        let targets = FakeTargets(["/cg/a": 1000])
        var (fs, keeper) = try makeKept { arena in
            let store = PageStore(arena: arena, charger: DaemonCharger(arena: arena.fileDescriptor))
            store.targets = targets
            return store
        }
        let a = try fs.mkdir(parent: root, name: n("a"), mode: 0o755, caller: owner).ino
        try fs.setxattr(a, name: memcg, value: n("/cg/a"), flags: [], caller: owner)
        XCTAssertThrowsError(try takeOver(&fs, keeper) { _ in }) { error in
            guard case .unsupported(let why)? = error as? StateError else { return XCTFail("\(error)") }
            XCTAssertTrue(why.contains("/cg/a"), why)
        }
    }

    func testMemcgAutoHostsAndSharersAreTakenOver() throws {
        let scope = SharedChargingTests.FakeScope()
        var (fs, keeper) = try makeKept { arena in
            let store = PageStore(arena: arena, charger: DaemonCharger(arena: arena.fileDescriptor), key: "/P")
            store.targets = scope
            store.shares = scope
            return store
        }
        let inB = Caller(uid: 0, gid: 0, pid: 11), inC = Caller(uid: 0, gid: 0, pid: 12)
        let f = try fs.create(parent: root, name: n("f"), mode: 0o100644, caller: inB).ino
        XCTAssertEqual(try write(fs, f, pages: 100, byte: 5, caller: inB), 100 * page)
        _ = try fs.open(f, flags: OpenFlags(rawValue: O_RDONLY), caller: inC, clearSetIDAsked: false)  // now hosted by /P
        let g = try fs.create(parent: root, name: n("g"), mode: 0o100644, caller: inC).ino
        XCTAssertEqual(try write(fs, g, pages: 10, byte: 6, caller: inC), 10 * page)
        let shares = try fs.getxattr(root, name: FileSystem.sharesXattr)
        let before = (0..<4).map { fs.chargeTarget($0) }

        let successor = SharedChargingTests.FakeScope()
        fs = try takeOver(&fs, keeper, key: "/P") {
            $0.targets = successor
            $0.shares = successor
        }
        XCTAssertEqual(String(decoding: try fs.getxattr(root, name: FileSystem.sharesXattr), as: UTF8.self),
                       String(decoding: shares, as: UTF8.self), "owners, sharers and hosts as before")
        for (i, was) in before.enumerated() {
            XCTAssertEqual(fs.chargeTarget(i).cgroup, was.cgroup, "target \(i)")
            XCTAssertEqual(fs.chargeTarget(i).pagesInUse, was.pagesInUse, "target \(i)")
        }
        XCTAssertEqual(try fs.bytes(of: f, count: 100 * page), [UInt8](repeating: 5, count: 100 * page))
        // B still carries f's 400 KiB as shared: a write that fits B's limit only without them
        // is refused (the shared files were found again).
        successor.counters["/P/B"] = (1536 * 1024, 2 << 20)
        let h = try fs.create(parent: root, name: n("h"), mode: 0o100644, caller: inB).ino
        // (B's reserve is empty after the takeover: ENOSPC, or at most a reserve's worth.)
        do {
            let wrote = try write(fs, h, pages: 256, byte: 7, caller: inB)
            XCTAssertLessThanOrEqual(wrote, PageStore.reserveLimit * page, "1.5 MiB + 400 KiB shared + 1 MiB > 2 MiB - 256 KiB")
        } catch let error as Errno {
            XCTAssertEqual(error, .noSpace)
        }
        successor.counters["/P/B"] = (200 * 1024, 2 << 20)
        XCTAssertEqual(try write(fs, h, pages: 256, byte: 7, caller: inB), 256 * page, "200 KiB + 400 KiB + 1 MiB fits")
        // A third cgroup's open of g moves g to the common ancestor through the new chargers.
        _ = try fs.open(g, flags: OpenFlags(rawValue: O_RDONLY), caller: inB, clearSetIDAsked: false)
        XCTAssertTrue(String(decoding: try fs.getxattr(root, name: FileSystem.sharesXattr), as: UTF8.self).contains("/P owned=0 shared=0 hosted=\(110 * page)\n"))
    }
}
