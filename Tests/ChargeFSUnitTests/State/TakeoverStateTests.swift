import Glibc
import Synchronization
import SystemPackage
import XCTest
@testable import ChargeFS

/// State that outlives the serving process (issue 21, docs/takeover.md), in-process: a tree is
/// built with state kept, the file system is dropped with no cleanup at all (what a kill -9
/// leaves: only the keeper's descriptors), and a new one takes over from the same memfds.
final class TakeoverStateTests: XCTestCase {
    let me = Caller(uid: 1000, gid: 1000)
    let root = FileSystem.rootIno

    func n(_ s: String) -> FileName { Array(s.utf8) }

    func config() -> FileSystemConfig {
        var config = FileSystemConfig()
        config.maxBytes = 1 << 30
        config.noatime = true  // the dumps below read; their reads must not move what they compare
        return config
    }

    /// A file system keeping state, with its keeper.
    func makeKept(_ config: FileSystemConfig? = nil) throws -> (FileSystem, InProcessKeeper) {
        let keeper = InProcessKeeper()
        let arena = try Arena(capacityPages: 1 << 20)
        let store = PageStore(arena: arena, charger: DaemonCharger(arena: arena.fileDescriptor))
        let fs = try FileSystem(config: config ?? self.config(), store: store, state: try StateFiles.create(), keeper: keeper)
        return (fs, keeper)
    }

    func stateFiles(_ keeper: InProcessKeeper) throws -> StateFiles {
        try StateFiles.adopt(journal: try XCTUnwrap(keeper.descriptor(.journal)),
                             checkpoints: [try XCTUnwrap(keeper.descriptor(.checkpoint(0))),
                                           try XCTUnwrap(keeper.descriptor(.checkpoint(1)))])
    }

    /// A successor: everything from the keeper's descriptors.
    func takeOver(_ keeper: InProcessKeeper, config: FileSystemConfig? = nil) throws -> FileSystem {
        let arena = try Arena(adopting: try XCTUnwrap(keeper.descriptor(.arena)), tmpfsRoot: keeper.descriptor(.arenaRoot),
                              backing: .memfd)
        return try FileSystem(takingOver: try stateFiles(keeper), keeper: keeper, config: config ?? self.config()) {
            PageStore(adopting: arena, charger: DaemonCharger(arena: arena.fileDescriptor), inUse: $0, backingPages: $1)
        }
    }

    func write(_ fs: FileSystem, _ ino: InodeNumber, _ bytes: [UInt8], at offset: Int64, request: RequestContext? = nil) throws -> Int {
        try bytes.withUnsafeBytes { try fs.write(ino, offset: offset, data: $0, caller: me, clearSetIDAsked: false, request: request).written }
    }

    func read(_ fs: FileSystem, _ ino: InodeNumber, _ offset: Int64, _ count: Int) throws -> [UInt8] {
        try fs.bytes(of: ino, at: offset, count: count)
    }

    func pattern(_ count: Int, seed: Int) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ seed &* 7 &+ $0 >> 9) } }

    /// Everything a caller can see of the tree, one line per name: attributes (number and
    /// generation included), the link target, the xattrs, and a checksum of every byte.
    func dump(_ fs: FileSystem) throws -> [String] {
        var lines: [String] = []
        func walk(_ dir: InodeNumber, _ path: String) throws {
            var entries: [DirectoryEntry] = []
            try fs.readdir(dir, offset: 0, plus: false) { entries.append($0); return true }
            for e in entries {
                let name = String(decoding: e.name, as: UTF8.self)
                let a = try fs.getattr(e.ino)
                var line = "\(path)/\(name) next=\(e.nextOffset) ino=\(a.ino.rawValue) gen=\(a.generation) mode=\(String(a.mode, radix: 8)) "
                    + "nlink=\(a.nlink) uid=\(a.uid) gid=\(a.gid) rdev=\(a.rdev) size=\(a.size) blocks=\(a.blocks) "
                    + "t=\(a.atime.tv_sec).\(a.atime.tv_nsec),\(a.mtime.tv_sec).\(a.mtime.tv_nsec),\(a.ctime.tv_sec).\(a.ctime.tv_nsec)"
                guard name != "." && name != ".." else { lines.append(line); continue }
                let xnames = try fs.listxattr(e.ino).split(separator: 0).map { Array($0) }
                for x in xnames { line += " x[\(String(decoding: x, as: UTF8.self))]=\(try fs.getxattr(e.ino, name: x))" }
                if a.mode & 0o170000 == 0o120000 { line += " -> \(String(decoding: try fs.readlink(e.ino), as: UTF8.self))" }
                if a.mode & 0o170000 == 0o100000 {
                    var sum: UInt64 = 0
                    var offset: Int64 = 0
                    while offset < a.size {
                        let chunk = try read(fs, e.ino, offset, 1 << 20)
                        if chunk.isEmpty { break }
                        sum = chunk.withUnsafeBytes { stateChecksum($0, seed: sum) }
                        offset += Int64(chunk.count)
                    }
                    line += " data=\(sum) read=\(offset)"
                }
                lines.append(line)
                if a.mode & 0o170000 == 0o040000 { try walk(e.ino, "\(path)/\(name)") }
            }
        }
        try walk(root, "")
        return lines
    }

    /// Files, a sparse file, a >1 MiB file, directories, a symlink, a hard link, xattrs, modes,
    /// owners, times, a device node; returns an open file's number and an unlinked open one's.
    func buildTree(_ fs: FileSystem) throws -> (open: InodeNumber, unlinked: InodeNumber) {
        let d1 = try fs.mkdir(parent: root, name: n("dir"), mode: 0o755, caller: me).ino
        let d2 = try fs.mkdir(parent: d1, name: n("sub"), mode: 0o700, caller: me).ino
        for i in 0..<40 {
            let f = try fs.mknod(parent: i % 2 == 0 ? d1 : d2, name: n("f\(i)"), mode: 0o100644, rdev: 0, caller: me).ino
            XCTAssertEqual(try write(fs, f, pattern(100 + i * 997, seed: i), at: 0), 100 + i * 997)
        }
        let sparse = try fs.mknod(parent: root, name: n("sparse"), mode: 0o100600, rdev: 0, caller: me).ino
        _ = try write(fs, sparse, pattern(5000, seed: 1), at: 0)
        _ = try write(fs, sparse, pattern(3000, seed: 2), at: 10 << 20)
        let big = try fs.mknod(parent: d1, name: n("big"), mode: 0o100640, rdev: 0, caller: me).ino
        _ = try write(fs, big, pattern(3 << 20, seed: 3), at: 0)
        try fs.fallocate(big, mode: .punchHole.union(.keepSize), offset: 1 << 20, length: 64 << 10)
        _ = try fs.symlink(target: n("dir/sub/f1"), parent: root, name: n("link"), caller: me)
        _ = try fs.link(big, newParent: d2, newName: n("big-too"))
        try fs.setxattr(big, name: n("user.color"), value: n("blue"), flags: [])
        try fs.setxattr(d2, name: n("user.empty"), value: [], flags: [])
        var changes = AttributeChanges()
        changes.mode = 0o4751
        changes.uid = 42
        changes.gid = 43
        changes.mtime = .set(timespec(tv_sec: 1_000_000_000, tv_nsec: 123))
        changes.atime = .set(timespec(tv_sec: 1_100_000_000, tv_nsec: 456))
        _ = try fs.setattr(sparse, changes, caller: .root, clearSetIDAsked: false)
        _ = try fs.mknod(parent: root, name: n("null"), mode: 0o20666, rdev: 0x103, caller: .root)
        var truncate = AttributeChanges()
        truncate.size = 1500
        let cut = try fs.mknod(parent: d2, name: n("cut"), mode: 0o100644, rdev: 0, caller: me).ino
        _ = try write(fs, cut, pattern(9000, seed: 9), at: 0)
        _ = try fs.setattr(cut, truncate, caller: me, clearSetIDAsked: false)
        try fs.rename(parent: d1, name: n("f0"), newParent: root, newName: n("moved"), flags: [])
        try fs.unlink(parent: d2, name: n("f3"))
        try fs.rename(parent: d1, name: n("f2"), newParent: d1, newName: n("f4"), flags: [])  // over an existing one
        let opened = try fs.create(parent: root, name: n("open"), mode: 0o100644, caller: me).ino
        _ = try write(fs, opened, pattern(7000, seed: 7), at: 0)
        let gone = try fs.create(parent: root, name: n("gone"), mode: 0o100644, caller: me).ino
        _ = try write(fs, gone, pattern(12000, seed: 8), at: 0)
        try fs.unlink(parent: root, name: n("gone"))
        return (opened, gone)
    }

    func testTreeSurvivesACrash() throws {
        var (fs, keeper) = try makeKept()
        let (opened, unlinked) = try buildTree(fs)
        let before = try dump(fs)
        let stored = fs.storedBytes().used
        let gone = try read(fs, unlinked, 0, 20000)
        fs = try takeOverAfterCrash(&fs, keeper)
        XCTAssertEqual(try dump(fs), before)
        XCTAssertEqual(fs.storedBytes().used, stored, "pages in use recomputed from the page maps")
        XCTAssertEqual(try XCTUnwrap(fs.takeover).droppedBytes, 0)
        // Open handles: the open file still reads and writes; the unlinked one still reads, and
        // its last close frees its pages.
        XCTAssertEqual(try write(fs, opened, n("after"), at: 7000), 5)
        XCTAssertEqual(try read(fs, opened, 6995, 100), Array(pattern(7000, seed: 7)[6995...]) + n("after"))
        XCTAssertEqual(try read(fs, unlinked, 0, 20000), gone)
        let usedBefore = fs.storedBytes().used
        fs.release(unlinked)
        XCTAssertEqual(fs.storedBytes().used, usedBefore - 3 * Int64(PageSize.bytes))
        // A new file after the takeover, and a second takeover of that.
        let fresh = try fs.mknod(parent: root, name: n("fresh"), mode: 0o100644, rdev: 0, caller: me).ino
        _ = try write(fs, fresh, n("new data"), at: 100)
        let second = try dump(fs)
        fs = try takeOverAfterCrash(&fs, keeper)
        XCTAssertEqual(try dump(fs), second)
        XCTAssertEqual(try fs.lookup(parent: root, name: n("fresh")).ino, fresh)
    }

    /// Drops `fs` with no cleanup (no destroy, no release: what kill -9 leaves) and takes over.
    func takeOverAfterCrash(_ fs: inout FileSystem, _ keeper: InProcessKeeper, config: FileSystemConfig? = nil) throws -> FileSystem {
        fs = FileSystem(config: self.config(), store: try PageStore(capacityPages: 4) { DaemonCharger(arena: $0) })
        return try takeOver(keeper, config: config)
    }

    func testCheckpointsTrimTheJournal() throws {
        var (fs, keeper) = try makeKept()
        fs.setCheckpointBytes(8 << 10)
        _ = try buildTree(fs)
        for i in 0..<200 {
            let f = try fs.mknod(parent: root, name: n("c\(i)"), mode: 0o100644, rdev: 0, caller: me).ino
            _ = try write(fs, f, pattern(i * 10, seed: i), at: 0)
            if i % 3 == 0 { try fs.unlink(parent: root, name: n("c\(i)")) }
        }
        let checkpoints = fs.checkpointFigures.count
        XCTAssertGreaterThan(checkpoints, 3)
        // About 150 KiB were journalled in all (~310 bytes a transaction): the journal restarts after each checkpoint.
        XCTAssertLessThan(try stateFiles(keeper).tail, 64 << 10)
        let before = try dump(fs)
        fs = try takeOverAfterCrash(&fs, keeper)
        XCTAssertGreaterThan(try XCTUnwrap(fs.takeover).checkpointSeq, 0)
        XCTAssertEqual(try dump(fs), before)
    }

    final class Flag: Sendable { let value = Atomic(false) }

    /// IdleCheckpoints: a checkpoint once the journal stops moving (and holds enough to be worth
    /// one), or once it is past `busyBytes` and the last checkpoint's size with changes going on;
    /// never for a journal that is still short.
    func testIdleCheckpointPolicy() {
        var p = IdleCheckpoints()
        p.quietBytes = 1000
        p.busyBytes = 10_000
        // Short and quiet: nothing to gain.
        XCTAssertEqual((0..<5).map { _ in p.due(tail: 500, lastCheckpointBytes: 0) }, [false, false, false, false, false])
        // Growing: not yet (below busyBytes); then unchanged for two samples: due.
        XCTAssertFalse(p.due(tail: 2000, lastCheckpointBytes: 0))
        XCTAssertFalse(p.due(tail: 3000, lastCheckpointBytes: 0))
        XCTAssertFalse(p.due(tail: 3000, lastCheckpointBytes: 0))
        XCTAssertTrue(p.due(tail: 3000, lastCheckpointBytes: 0))
        // Busy past busyBytes: due while it moves, unless the last checkpoint was larger.
        XCTAssertTrue(p.due(tail: 12_000, lastCheckpointBytes: 5000))
        XCTAssertFalse(p.due(tail: 13_000, lastCheckpointBytes: 50_000))
        XCTAssertTrue(p.due(tail: 51_000, lastCheckpointBytes: 50_000))
    }

    /// The watcher (what a server runs on a thread of its own) checkpoints a mount whose changes
    /// stopped: a successor then reads the checkpoint, not a replay of every change.
    func testTheWatcherCheckpointsOnceChangesStop() throws {
        var (fs, keeper) = try makeKept()
        for i in 0..<2000 { _ = try fs.mknod(parent: root, name: n("q\(i)"), mode: 0o100644, rdev: 0, caller: me) }
        let before = try dump(fs)
        XCTAssertEqual(fs.checkpointFigures.count, 1)  // the empty tree's, at the start
        var quick = IdleCheckpoints()
        quick.quietBytes = 16 << 10
        quick.sampleNanoseconds = 10_000_000
        let policy = quick
        let watched = fs
        let stop = Flag(), stopped = Flag()
        Takeover.runDetached {
            watched.watchForIdleCheckpoints(policy) { stop.value.load(ordering: .relaxed) }
            stopped.value.store(true, ordering: .relaxed)
        }
        var waited = 0
        while fs.checkpointFigures.count < 2 && waited < 500 { usleep(10_000); waited += 1 }
        XCTAssertEqual(fs.checkpointFigures.count, 2, "a checkpoint within 5 s of the last change")
        // The dead server's watcher must not write into the state its successor adopts.
        stop.value.store(true, ordering: .relaxed)
        while !stopped.value.load(ordering: .relaxed) { usleep(1000) }
        fs = try takeOverAfterCrash(&fs, keeper)
        XCTAssertEqual(try XCTUnwrap(fs.takeover).transactions, 0)
        XCTAssertEqual(try dump(fs), before)
    }

    /// The last transaction torn (its bytes corrupt, or its length past the tail): dropped, and
    /// the tree is the one before it.
    func testTornTailIsRolledBack() throws {
        for tear in ["payload", "length"] {
            var (fs, keeper) = try makeKept()
            _ = try buildTree(fs)
            let before = try dump(fs)
            let state = try stateFiles(keeper)
            let tail = state.tail
            let f = try fs.mknod(parent: root, name: n("last"), mode: 0o100644, rdev: 0, caller: me).ino
            XCTAssertGreaterThan(state.tail, tail)
            state.withJournalBytes { bytes in
                if tear == "payload" {
                    bytes[tail + 24 + 9] ^= 0x40
                } else {
                    bytes.storeBytes(of: UInt32(1 << 20).littleEndian, toByteOffset: tail, as: UInt32.self)
                }
            }
            _ = f
            fs = try takeOverAfterCrash(&fs, keeper)
            XCTAssertGreaterThan(try XCTUnwrap(fs.takeover).droppedBytes, 0, tear)
            XCTAssertEqual(try dump(fs), before, tear)
            XCTAssertThrowsError(try fs.lookup(parent: root, name: n("last")), tear)
            // Appends go on after the last good transaction.
            _ = try fs.mknod(parent: root, name: n("after"), mode: 0o100644, rdev: 0, caller: me)
            let again = try dump(fs)
            fs = try takeOverAfterCrash(&fs, keeper)
            XCTAssertEqual(try dump(fs), again, tear)
            XCTAssertEqual(try XCTUnwrap(fs.takeover).droppedBytes, 0, tear)
        }
    }

    /// Requests applied and recorded but never answered (the server died first) come again
    /// with bit 63 of their unique set: each gets the answer it would have had, nothing is
    /// applied twice; a resent request that was not applied is served.
    func testResentRequestsGetTheirAnswers() throws {
        var (fs, keeper) = try makeKept()
        let data = try fs.mknod(parent: root, name: n("log"), mode: 0o100644, rdev: 0, caller: me).ino
        _ = try write(fs, data, n("first line\n"), at: 0)
        _ = try fs.mknod(parent: root, name: n("victim"), mode: 0o100644, rdev: 0, caller: me)
        _ = try fs.mknod(parent: root, name: n("from"), mode: 0o100644, rdev: 0, caller: me)
        _ = try fs.mknod(parent: root, name: n("notyet"), mode: 0o100644, rdev: 0, caller: me)
        let created = try fs.create(parent: root, name: n("excl"), mode: 0o100600, caller: me, request: RequestContext(unique: 10))
        try fs.unlink(parent: root, name: n("victim"), request: RequestContext(unique: 11))
        try fs.rename(parent: root, name: n("from"), newParent: root, newName: n("to"), flags: [], request: RequestContext(unique: 12))
        // O_APPEND: the kernel sends the offset (i_size).
        XCTAssertEqual(try write(fs, data, n("appended\n"), at: 11, request: RequestContext(unique: 13)), 9)
        let before = try dump(fs)
        fs = try takeOverAfterCrash(&fs, keeper)
        let resend = { (unique: UInt64) in RequestContext(unique: unique | RequestContext.resendBit) }
        XCTAssertEqual(try fs.create(parent: root, name: n("excl"), mode: 0o100600, caller: me, request: resend(10)), created)
        XCTAssertNoThrow(try fs.unlink(parent: root, name: n("victim"), request: resend(11)))
        XCTAssertNoThrow(try fs.rename(parent: root, name: n("from"), newParent: root, newName: n("to"), flags: [], request: resend(12)))
        XCTAssertEqual(try write(fs, data, n("appended\n"), at: 11, request: resend(13)), 9)
        XCTAssertEqual(try dump(fs), before, "nothing applied twice")
        XCTAssertEqual(try read(fs, data, 0, 100), n("first line\nappended\n"))
        // Without the bit, or never applied: served as usual.
        XCTAssertThrowsError(try fs.create(parent: root, name: n("excl"), mode: 0o100600, caller: me, request: RequestContext(unique: 14)))
        try fs.unlink(parent: root, name: n("notyet"), request: resend(15))
        XCTAssertThrowsError(try fs.lookup(parent: root, name: n("notyet")))
        // The answers survive a checkpoint too.
        fs.checkpointNow()
        fs = try takeOverAfterCrash(&fs, keeper)
        XCTAssertNoThrow(try fs.unlink(parent: root, name: n("victim"), request: resend(11)))
        XCTAssertEqual(try fs.create(parent: root, name: n("excl"), mode: 0o100600, caller: me, request: resend(10)), created)
    }

    /// The files whose attributes a successor refreshes in the kernel before it serves: those
    /// that lost a name in the last changes and still have one (the kernel's own decrement at a
    /// resent unlink's end must not meet a count fetched after the unlink: stress.sh kill_loop's
    /// `link: ENOENT`). Not a file removed whole, a directory, or one only written to.
    func testRemovalsBeforeACrashAreRefreshed() throws {
        var (fs, keeper) = try makeKept()
        XCTAssertEqual(fs.attributesToRefresh, [])
        let d1 = try fs.mkdir(parent: root, name: n("d1"), mode: 0o755, caller: me).ino
        let d2 = try fs.mkdir(parent: root, name: n("d2"), mode: 0o755, caller: me).ino
        let linked = try fs.mknod(parent: d1, name: n("a"), mode: 0o100644, rdev: 0, caller: me).ino
        _ = try fs.link(linked, newParent: d2, newName: n("b"))
        let moved = try fs.mknod(parent: d1, name: n("m"), mode: 0o100644, rdev: 0, caller: me).ino
        let written = try fs.mknod(parent: d1, name: n("w"), mode: 0o100644, rdev: 0, caller: me).ino
        _ = try fs.mknod(parent: d1, name: n("gone"), mode: 0o100644, rdev: 0, caller: me)
        _ = try fs.mkdir(parent: d2, name: n("sub"), mode: 0o755, caller: me)
        try fs.unlink(parent: d1, name: n("a"), request: RequestContext(unique: 20))
        try fs.rename(parent: d1, name: n("m"), newParent: d2, newName: n("m2"), flags: [], request: RequestContext(unique: 22))
        try fs.unlink(parent: d1, name: n("gone"), request: RequestContext(unique: 24))
        try fs.rmdir(parent: d2, name: n("sub"), request: RequestContext(unique: 26))
        _ = try write(fs, written, n("data"), at: 0)
        fs = try takeOverAfterCrash(&fs, keeper)
        XCTAssertEqual(Set(fs.attributesToRefresh), [linked, moved], "the file left with d2/b, and the one moved (harmless)")
        XCTAssertEqual(try fs.getattr(linked).nlink, 1)
        // A successor's own checkpoint holds no change in flight at the next crash.
        fs.checkpointNow()
        fs = try takeOverAfterCrash(&fs, keeper)
        XCTAssertEqual(fs.attributesToRefresh, [])
    }

    /// Large files with a backing file of their own (FUSE passthrough in-process): the keeper
    /// holds the backing file, the successor reads it.
    func testBackedFilesSurvive() throws {
        var c = config()
        c.caching = .direct
        var (fs, keeper) = try makeKept(c)
        fs.noteKernelPassthrough(true)
        let arenaIsTmpfs = keeper.descriptor(.arenaRoot) != nil
        try XCTSkipUnless(arenaIsTmpfs, "backing files need the arena's private tmpfs (root)")
        let big = try fs.mknod(parent: root, name: n("big"), mode: 0o100644, rdev: 0, caller: me).ino
        let bytes = pattern(3 << 20, seed: 5)
        for offset in stride(from: 0, to: bytes.count, by: 128 << 10) {
            _ = try write(fs, big, Array(bytes[offset..<min(bytes.count, offset + (128 << 10))]), at: Int64(offset))
        }
        XCTAssertNotNil(keeper.descriptor(.backingFile(1)), "the file moved into a backing file the keeper holds")
        let before = try dump(fs)
        fs = try takeOverAfterCrash(&fs, keeper, config: c)
        fs.noteKernelPassthrough(true)
        XCTAssertEqual(try dump(fs), before)
        XCTAssertEqual(try read(fs, big, 0, 3 << 20), bytes)
        _ = try write(fs, big, n("tail"), at: 3 << 20)
        try fs.unlink(parent: root, name: n("big"))
        XCTAssertNil(keeper.descriptor(.backingFile(1)), "an unlinked file's backing file is let go")
    }

    /// A large file removed before the crash: the journal still holds the record that gave it
    /// its backing file, which the keeper has let go; the successor must not look for it (found
    /// on a mount: every takeover after an `rm` of a large file failed, "backing file 2 is not
    /// held by the keeper", and the keeper aborted the mount).
    func testABackedFileRemovedBeforeTheCrash() throws {
        var c = config()
        c.caching = .direct
        var (fs, keeper) = try makeKept(c)
        fs.noteKernelPassthrough(true)
        try XCTSkipUnless(keeper.descriptor(.arenaRoot) != nil, "backing files need the arena's private tmpfs (root)")
        let bytes = pattern(2 << 20, seed: 9)
        var inos: [InodeNumber] = []
        for name in ["gone", "kept"] {
            let ino = try fs.mknod(parent: root, name: n(name), mode: 0o100644, rdev: 0, caller: me).ino
            for offset in stride(from: 0, to: bytes.count, by: 128 << 10) {
                _ = try write(fs, ino, Array(bytes[offset..<min(bytes.count, offset + (128 << 10))]), at: Int64(offset))
            }
            inos.append(ino)
        }
        XCTAssertNotNil(keeper.descriptor(.backingFile(1)))
        XCTAssertNotNil(keeper.descriptor(.backingFile(2)))
        try fs.unlink(parent: root, name: n("gone"))
        XCTAssertNil(keeper.descriptor(.backingFile(1)), "the removed file's backing file is let go")
        let before = try dump(fs)
        fs = try takeOverAfterCrash(&fs, keeper, config: c)
        XCTAssertEqual(try dump(fs), before)
        XCTAssertEqual(try read(fs, inos[1], 0, 2 << 20), bytes)
    }

    /// What the kernel holds across a takeover: readdir positions (cookies), and inode numbers
    /// with generations, a number freed before the crash coming back with the next generation.
    func testReaddirPositionsAndGenerations() throws {
        var (fs, keeper) = try makeKept()
        let d = try fs.mkdir(parent: root, name: n("d"), mode: 0o755, caller: me).ino
        for i in 0..<50 { _ = try fs.mknod(parent: d, name: n("e\(i)"), mode: 0o100644, rdev: 0, caller: me) }
        for i in stride(from: 0, to: 50, by: 3) { try fs.unlink(parent: d, name: n("e\(i)")) }
        _ = try fs.mknod(parent: root, name: n("x"), mode: 0o100644, rdev: 0, caller: me)
        _ = try fs.mkdir(parent: root, name: n("y"), mode: 0o700, caller: me)
        try fs.rename(parent: root, name: n("x"), newParent: root, newName: n("y"), flags: .exchange)
        _ = try fs.mkdir(parent: root, name: n("z"), mode: 0o700, caller: me)
        try fs.rmdir(parent: root, name: n("z"))
        var firstPart: [DirectoryEntry] = []
        try fs.readdir(d, offset: 0, plus: false) { firstPart.append($0); return firstPart.count < 12 }
        let resume = try XCTUnwrap(firstPart.last).nextOffset
        func rest(_ fs: FileSystem) throws -> [String] {
            var names: [String] = []
            try fs.readdir(d, offset: resume, plus: false) { names.append("\(String(decoding: $0.name, as: UTF8.self))@\($0.nextOffset)"); return true }
            return names
        }
        let a = try fs.mknod(parent: root, name: n("a"), mode: 0o100644, rdev: 0, caller: me)
        try fs.unlink(parent: root, name: n("a"))
        fs.forget(a.ino, count: 1)  // evicted: its number is free, with generation 1, at the crash
        let restBefore = try rest(fs)
        XCTAssertEqual(restBefore.count, 50 - 17 + 2 - 12)
        let before = try dump(fs)
        fs = try takeOverAfterCrash(&fs, keeper)
        XCTAssertEqual(try dump(fs), before)
        XCTAssertEqual(try rest(fs), restBefore, "a readdir resumed at the same offset lists the same entries")
        let b = try fs.mknod(parent: root, name: n("b"), mode: 0o100644, rdev: 0, caller: me)
        XCTAssertEqual(b.ino, a.ino, "the free number is reused")
        XCTAssertEqual(b.generation, a.generation + 1, "with the next generation")
    }

    /// A change applied in memory whose record was never published (killed just before) is
    /// rolled back with its data: the pages it freed are punched only after the publish, so the
    /// successor's map does not point at holes. And in the normal path nothing stays charged.
    func testAnUnpublishedChangeKeepsItsData() throws {
        var (fs, keeper) = try makeKept()
        let big = try fs.mknod(parent: root, name: n("big"), mode: 0o100644, rdev: 0, caller: me).ino
        let bytes = pattern(1 << 20, seed: 11)  // 256 pages: more than the reserve keeps, so freeing punches
        XCTAssertEqual(try write(fs, big, bytes, at: 0), bytes.count)
        let before = try dump(fs)
        fs.dropNextRecordForTest()
        try fs.unlink(parent: root, name: n("big"))
        XCTAssertLessThan(fs.storedBytes().used, 1 << 20, "the unlink was applied in memory")
        fs = try takeOverAfterCrash(&fs, keeper)
        XCTAssertEqual(try dump(fs), before)
        XCTAssertEqual(try read(fs, big, 0, 1 << 20), bytes, "every byte, not zeros")
        // Published normally: the punches happen, only the reserve stays charged.
        try fs.unlink(parent: root, name: n("big"))
        fs.forget(big, count: FileSystemCore.lookupsAfterTakeover)
        let (used, charged) = fs.storedBytes()
        XCTAssertEqual(used, 0)
        XCTAssertLessThanOrEqual(charged, Int64(PageStore.reserveLimit * PageSize.bytes))
    }

    /// A crash while a checkpoint is written (into the inactive slot, before the switch): the
    /// active one and the journal still hold everything. A corrupt active checkpoint is refused
    /// with an error, never served.
    func testACheckpointCutShortChangesNothing() throws {
        var (fs, keeper) = try makeKept()
        _ = try buildTree(fs)
        fs.checkpointNow()
        _ = try fs.mknod(parent: root, name: n("after-checkpoint"), mode: 0o100644, rdev: 0, caller: me)
        let before = try dump(fs)
        let state = try stateFiles(keeper)
        // Which slot is active is the header's business: scribble on both, then put the active
        // one back (what a half-written next checkpoint leaves in the other).
        let active = try XCTUnwrap(try state.activeCheckpoint())
        let junk = [UInt8](repeating: 0xA5, count: 1 << 16)
        func put(_ bytes: [UInt8], _ fd: FileDescriptor) {
            XCTAssertEqual(ftruncate(fd.rawValue, off_t(bytes.count)), 0)
            XCTAssertEqual(bytes.withUnsafeBytes { pwrite(fd.rawValue, $0.baseAddress, $0.count, 0) }, bytes.count)
        }
        for fd in state.checkpoints { put(junk, fd) }
        XCTAssertThrowsError(try state.activeCheckpoint(), "a corrupt checkpoint is detected")
        var activeSlot: Int? = nil
        for (i, fd) in state.checkpoints.enumerated() where activeSlot == nil {
            put(active.bytes, fd)
            if (try? state.activeCheckpoint()) != nil { activeSlot = i } else { put(junk, fd) }
        }
        XCTAssertNotNil(activeSlot, "the other slot holds junk, as a checkpoint cut short leaves it")
        fs = try takeOverAfterCrash(&fs, keeper)
        XCTAssertEqual(try dump(fs), before)
        // The active one corrupt: the takeover fails (the keeper will abort the mount, step 3).
        for fd in state.checkpoints { _ = ftruncate(fd.rawValue, 0) }
        _ = try fs.mknod(parent: root, name: n("x"), mode: 0o100644, rdev: 0, caller: me)
        fs = FileSystem(config: config(), store: try PageStore(capacityPages: 4) { DaemonCharger(arena: $0) })
        XCTAssertThrowsError(try takeOver(keeper)) { error in
            XCTAssertTrue("\(error)".contains("checkpoint"), "\(error)")
        }
    }

    func testNoStateByDefault() throws {
        let fs = FileSystem(config: config(), store: try PageStore(capacityPages: 64) { DaemonCharger(arena: $0) })
        _ = try fs.mknod(parent: root, name: n("a"), mode: 0o100644, rdev: 0, caller: me, request: RequestContext(unique: 1))
        XCTAssertNil(fs.takeover)
        XCTAssertEqual(fs.checkpointFigures.count, 0)
        // No answers kept: a resend is simply served (EEXIST here).
        XCTAssertThrowsError(try fs.mknod(parent: root, name: n("a"), mode: 0o100644, rdev: 0, caller: me,
                                          request: RequestContext(unique: 1 | RequestContext.resendBit)))
    }

    /// The narrower records (version 3) carry all an operation changes: a directory's link
    /// count and times when a subdirectory moves between parents or is removed (kind 5), a
    /// write's mode with setuid and setgid cleared (kind 6), and a write that drops
    /// security.capability (a whole record: kind 6 would leave the xattr behind). Checked by
    /// the dump, which shows each directory's nlink and times and each file's xattrs and mode,
    /// and by the first takeover's own view of the changed fields.
    func testNarrowRecordsCarryWhatTheOperationChanged() throws {
        var (fs, keeper) = try makeKept()
        let a = try fs.mkdir(parent: root, name: n("a"), mode: 0o755, caller: me).ino
        let b = try fs.mkdir(parent: root, name: n("b"), mode: 0o755, caller: me).ino
        _ = try fs.mkdir(parent: a, name: n("sub"), mode: 0o755, caller: me)
        _ = try fs.mkdir(parent: b, name: n("gone"), mode: 0o755, caller: me)
        try fs.rename(parent: a, name: n("sub"), newParent: b, newName: n("sub"), flags: [])
        try fs.rmdir(parent: b, name: n("gone"))
        XCTAssertEqual(try fs.getattr(a).nlink, 2)
        XCTAssertEqual(try fs.getattr(b).nlink, 3)
        let caps = try fs.mknod(parent: a, name: n("caps"), mode: 0o100755, rdev: 0, caller: .root).ino
        try fs.setxattr(caps, name: n("security.capability"), value: [1, 0, 0, 2], flags: [])
        _ = try write(fs, caps, n("x"), at: 0)
        let setuid = try fs.mknod(parent: a, name: n("setuid"), mode: 0o104755, rdev: 0, caller: me).ino
        _ = try n("y").withUnsafeBytes { try fs.write(setuid, offset: 0, data: $0, caller: me, clearSetIDAsked: true) }
        XCTAssertEqual(try fs.getattr(setuid).mode & 0o7777, 0o755)
        let before = try dump(fs)
        fs = try takeOverAfterCrash(&fs, keeper)
        XCTAssertEqual(try dump(fs), before)
        XCTAssertEqual(try fs.getattr(a).nlink, 2)
        XCTAssertEqual(try fs.getattr(b).nlink, 3)
        XCTAssertEqual(try fs.getattr(setuid).mode & 0o7777, 0o755)
        XCTAssertThrowsError(try fs.getxattr(caps, name: n("security.capability")))
        XCTAssertEqual(try read(fs, caps, 0, 10), n("x"))
    }

    /// State written by an older chargefsd (version 2: whole parent records, the older checksum)
    /// is refused with `StateError.version`, never read as this version's records; and so is a
    /// checkpoint of another version.
    func testAnOlderStateVersionIsRefused() throws {
        var (fs, keeper) = try makeKept()
        _ = try fs.mknod(parent: root, name: n("a"), mode: 0o100644, rdev: 0, caller: me)
        XCTAssertEqual(StateFiles.version, 4)
        XCTAssertEqual(StateFiles.readableVersions, 3...4)
        let journal = try XCTUnwrap(keeper.descriptor(.journal))
        var old = UInt64(2).littleEndian
        XCTAssertEqual(pwrite(journal.rawValue, &old, 8, 8), 8)
        XCTAssertThrowsError(try stateFiles(keeper)) { error in
            XCTAssertEqual(error as? StateError, .version(2))
            XCTAssertTrue("\(error)".contains("state version 2"), "\(error)")
        }
        var current = StateFiles.version.littleEndian
        XCTAssertEqual(pwrite(journal.rawValue, &current, 8, 8), 8)
        XCTAssertNoThrow(try stateFiles(keeper))
        // The active checkpoint's own version word (its first 8 bytes), checksum kept valid by
        // rewriting it as the header's descriptor says: rewritten as a whole checkpoint.
        let state = try stateFiles(keeper)
        var bytes = try XCTUnwrap(try state.activeCheckpoint()).bytes
        bytes.withUnsafeMutableBytes { $0.storeBytes(of: UInt64(2).littleEndian, as: UInt64.self) }
        try bytes.withUnsafeBytes { try state.checkpoint($0) }
        fs = FileSystem(config: config(), store: try PageStore(capacityPages: 4) { DaemonCharger(arena: $0) })
        XCTAssertThrowsError(try takeOver(keeper)) { error in
            XCTAssertEqual(error as? StateError, .version(2))
        }
        _ = fs
    }

    func testSavedInit() throws {
        let state = try StateFiles.create()
        XCTAssertNil(state.savedInit)
        try state.saveInit(Array(0..<104))
        let adopted = try StateFiles.adopt(journal: state.journal, checkpoints: state.checkpoints)
        XCTAssertEqual(adopted.savedInit, Array(0..<104))
        XCTAssertThrowsError(try state.saveInit([UInt8](repeating: 1, count: StateFiles.initMaxBytes + 1)))
    }
}
