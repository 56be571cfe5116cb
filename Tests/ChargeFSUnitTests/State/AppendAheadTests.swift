import Glibc
import SystemPackage
import XCTest
@testable import ChargeFS

/// The batch of pages an append to a file with a backing file charges ahead of its end
/// (`storeBacked`, `BackingFile.aheadEnd`, given back at the last close by `trimAhead`): stored
/// and charged, but never seen, as tmpfs has no such pages (an fsx run compared op for op with
/// tmpfs saw st_blocks +384 between an append and its close); and kept across a takeover, so
/// that a successor still gives it back (issue 21).
///
/// Expected block counts are tmpfs's: 8 per page the file holds below its size, or allocated
/// past it by fallocate. The backing file's own st_blocks (a real tmpfs file, through the
/// keeper's copy of its descriptor) shows what is stored and charged.
final class AppendAheadTests: XCTestCase {
    let me = Caller(uid: 1000, gid: 1000)
    let root = FileSystem.rootIno
    let page = PageSize.bytes
    /// 512-byte blocks per page.
    let perPage = Int64(PageSize.bytes / 512)

    func config() -> FileSystemConfig {
        var c = FileSystemConfig()
        c.maxBytes = 1 << 30
        c.caching = .direct
        c.noatime = true
        return c
    }

    func makeKept(targets: FakeTargets? = nil) throws -> (FileSystem, InProcessKeeper) {
        let keeper = InProcessKeeper()
        let arena = try Arena(capacityPages: 1 << 20)
        let store = PageStore(arena: arena, charger: DaemonCharger(arena: arena.fileDescriptor))
        if let targets { store.targets = targets }
        let fs = try FileSystem(config: config(), store: store, state: try StateFiles.create(), keeper: keeper)
        fs.noteKernelPassthrough(true)
        try XCTSkipUnless(keeper.descriptor(.arenaRoot) != nil, "backing files need the arena's private tmpfs (root)")
        return (fs, keeper)
    }

    func stateFiles(_ keeper: InProcessKeeper) throws -> StateFiles {
        try StateFiles.adopt(journal: try XCTUnwrap(keeper.descriptor(.journal)),
                             checkpoints: [try XCTUnwrap(keeper.descriptor(.checkpoint(0))),
                                           try XCTUnwrap(keeper.descriptor(.checkpoint(1)))])
    }

    /// A kill -9 and a successor: `fs` is dropped with no cleanup (only the keeper's
    /// descriptors stay), and a new file system takes the state over.
    func takeOver(_ fs: inout FileSystem, _ keeper: InProcessKeeper) throws -> FileSystem {
        fs = FileSystem(config: config(), store: try PageStore(capacityPages: 4) { DaemonCharger(arena: $0) })
        let arena = try Arena(adopting: try XCTUnwrap(keeper.descriptor(.arena)), tmpfsRoot: keeper.descriptor(.arenaRoot), backing: .memfd)
        let taken = try FileSystem(takingOver: try stateFiles(keeper), keeper: keeper, config: config()) {
            PageStore(adopting: arena, charger: DaemonCharger(arena: arena.fileDescriptor), inUse: $0, backingPages: $1)
        }
        taken.noteKernelPassthrough(true)
        return taken
    }

    func n(_ s: String) -> FileName { Array(s.utf8) }

    /// A file written in 128 KiB appends to `pages` pages, opened for writing first when
    /// `open` (and left open): it moves into a backing file once past 1 MiB, and appends after
    /// that charge a batch ahead.
    func appended(_ fs: FileSystem, _ name: String, pages: Int, open: Bool = true, in parent: InodeNumber? = nil) throws -> InodeNumber {
        let ino = try fs.mknod(parent: parent ?? root, name: n(name), mode: 0o100644, rdev: 0, caller: me).ino
        if open { _ = try fs.open(ino, flags: .readWrite, caller: me, clearSetIDAsked: false) }
        let chunk = [UInt8](repeating: 7, count: 128 << 10)
        var offset = 0
        while offset < pages * page {
            let bytes = Array(chunk[0..<min(chunk.count, pages * page - offset)])
            XCTAssertEqual(try fs.write(ino, bytes, at: Int64(offset), caller: me), bytes.count)
            offset += bytes.count
        }
        return ino
    }

    func blocks(_ fs: FileSystem, _ ino: InodeNumber) throws -> Int64 { try fs.getattr(ino).blocks }

    /// st_blocks of backing file `id` itself: the pages stored and charged.
    func backingBlocks(_ keeper: InProcessKeeper, _ id: UInt64 = 1) throws -> Int64 {
        let fd = try XCTUnwrap(keeper.descriptor(.backingFile(id)), "backing file \(id)")
        var st = stat()
        XCTAssertEqual(fstat(fd.rawValue, &st), 0)
        return Int64(st.st_blocks)
    }

    /// statfs's used blocks, in pages.
    func usedPages(_ fs: FileSystem) -> Int64 {
        let usage = fs.usage()
        return usage.totalPages - usage.freePages
    }

    func testAnAppendShowsOnlyItsOwnPagesUntilTheLastClose() throws {
        var (fs, keeper) = try makeKept()
        let big = try appended(fs, "big", pages: 768)
        XCTAssertEqual(try fs.getattr(big).size, 3 << 20)
        // What tmpfs shows: the 768 pages written. The batch stays stored and charged.
        XCTAssertEqual(try blocks(fs, big), 768 * perPage)
        XCTAssertEqual(usedPages(fs), 768)
        XCTAssertEqual(fs.storedBytes().used, Int64(768 * page))
        let stored = try backingBlocks(keeper)
        XCTAssertGreaterThan(stored, 768 * perPage, "the batch is charged ahead")
        XCTAssertLessThanOrEqual(stored, Int64(768 + PageStore.chargeBatch) * perPage)
        XCTAssertGreaterThanOrEqual(fs.storedBytes().charged, stored * 512, "charged bytes count the batch")
        // SEEK_DATA and SEEK_HOLE stop at the end as on tmpfs.
        XCTAssertEqual(try fs.seek(big, offset: (3 << 20) - 1, whence: .hole), 3 << 20)
        XCTAssertThrowsError(try fs.seek(big, offset: 3 << 20, whence: .data))

        // A small append lands in the batch: one page more, nothing charged.
        XCTAssertEqual(try fs.write(big, n("tail"), at: 3 << 20, caller: me), 4)
        XCTAssertEqual(try blocks(fs, big), 769 * perPage)
        XCTAssertEqual(usedPages(fs), 769)
        XCTAssertEqual(try backingBlocks(keeper), stored)

        // The last close gives back what the file did not grow into.
        XCTAssertTrue(fs.release(big))
        XCTAssertEqual(try blocks(fs, big), 769 * perPage)
        XCTAssertEqual(try backingBlocks(keeper), 769 * perPage)
        XCTAssertEqual(usedPages(fs), 769)
        XCTAssertEqual(fs.storedBytes().used, Int64(769 * page))

        // And so does a successor's view of it.
        fs = try takeOver(&fs, keeper)
        XCTAssertEqual(try blocks(fs, big), 769 * perPage)
        XCTAssertEqual(usedPages(fs), 769)
    }

    /// A target move (user.chargefs.memcg on the file's directory) copies a file out of its
    /// backing file into the new target's arena: the batch goes back first, so the new target
    /// pays for the file's own pages only, and they are all st_blocks shows, then and after the
    /// last close.
    func testATargetMoveGivesTheBatchBackFirst() throws {
        let targets = FakeTargets(["/cg/t": 10_000])
        let (fs, keeper) = try makeKept(targets: targets)
        let dir = try fs.mkdir(parent: root, name: n("d"), mode: 0o755, caller: me).ino
        let big = try appended(fs, "big", pages: 768, in: dir)
        XCTAssertGreaterThan(try backingBlocks(keeper), 768 * perPage, "a batch is charged ahead")
        try fs.setxattr(dir, name: FileSystem.memcgXattr, value: Array("/cg/t".utf8), flags: [], caller: me)
        XCTAssertEqual(fs.memcgTarget(of: big), "/cg/t")
        XCTAssertEqual(fs.chargeTarget(1).pagesInUse, 768, "the new target holds the file's pages, not the batch")
        XCTAssertEqual(try blocks(fs, big), 768 * perPage)
        XCTAssertEqual(usedPages(fs), 768)
        XCTAssertEqual(try fs.bytes(of: big, count: 768 * page), [UInt8](repeating: 7, count: 768 * page))
        XCTAssertTrue(fs.release(big))
        XCTAssertEqual(try blocks(fs, big), 768 * perPage, "nothing past the end at the last close")
        XCTAssertEqual(fs.chargeTarget(1).pagesInUse, 768)
    }

    /// A write past the end that leaves a gap over the batch: the gap is a hole on tmpfs, so
    /// the ahead pages in it go back rather than becoming the file's.
    func testAWriteBeyondTheBatchLeavesHoles() throws {
        let (fs, keeper) = try makeKept()
        let big = try appended(fs, "big", pages: 768)
        XCTAssertEqual(try fs.write(big, [UInt8](repeating: 1, count: page), at: Int64(778 * page), caller: me), page)
        XCTAssertEqual(try fs.getattr(big).size, Int64(779 * page))
        XCTAssertEqual(try blocks(fs, big), 769 * perPage, "pages 768..<778 are a hole")
        XCTAssertEqual(try fs.seek(big, offset: Int64(768 * page), whence: .hole), Int64(768 * page))
        XCTAssertEqual(try fs.seek(big, offset: Int64(768 * page), whence: .data), Int64(778 * page))
        XCTAssertEqual(try fs.bytes(of: big, at: Int64(768 * page), count: page), [UInt8](repeating: 0, count: page))
        XCTAssertEqual(usedPages(fs), 769)
        fs.release(big)
        XCTAssertEqual(try blocks(fs, big), 769 * perPage)
        XCTAssertEqual(try backingBlocks(keeper), 769 * perPage)
    }

    /// fallocate(KEEP_SIZE) past the end over the batch: the range allocated is the file's (tmpfs
    /// counts it, and the close keeps it), the rest of the batch is not.
    func testAnAllocationPastTheEndKeepsOnlyItsRange() throws {
        let (fs, keeper) = try makeKept()
        let big = try appended(fs, "big", pages: 768)
        try fs.fallocate(big, mode: .keepSize, offset: Int64(770 * page), length: Int64(4 * page))
        XCTAssertEqual(try fs.getattr(big).size, 3 << 20)
        XCTAssertEqual(try blocks(fs, big), 772 * perPage)
        XCTAssertEqual(usedPages(fs), 772)
        fs.release(big)
        XCTAssertEqual(try blocks(fs, big), 772 * perPage, "the allocation outlives the close")
        XCTAssertEqual(try backingBlocks(keeper), 772 * perPage)
        // A write past the allocation, after a gap: no batch beyond the allocated pages (the
        // range runs from the end: it would take them for its own); they are below the end now.
        _ = try fs.open(big, flags: .readWrite, caller: me, clearSetIDAsked: false)
        XCTAssertEqual(try fs.write(big, [UInt8](repeating: 2, count: page), at: Int64(774 * page), caller: me), page)
        XCTAssertEqual(try blocks(fs, big), 773 * perPage)
        XCTAssertEqual(try backingBlocks(keeper), 773 * perPage, "the allocated pages kept")
        // An append charges a batch again; an allocation below the end leaves it alone, and it
        // goes back at the close.
        XCTAssertEqual(try fs.write(big, [UInt8](repeating: 2, count: page), at: Int64(775 * page), caller: me), page)
        XCTAssertEqual(try blocks(fs, big), 774 * perPage)
        XCTAssertGreaterThan(try backingBlocks(keeper), 774 * perPage, "a batch ahead")
        try fs.fallocate(big, mode: .keepSize, offset: 0, length: Int64(page))
        XCTAssertEqual(try blocks(fs, big), 774 * perPage)
        XCTAssertGreaterThan(try backingBlocks(keeper), 774 * perPage, "still ahead")
        fs.release(big)
        XCTAssertEqual(try blocks(fs, big), 774 * perPage)
        XCTAssertEqual(try backingBlocks(keeper), 774 * perPage)
    }

    /// A truncate up over the batch leaves a hole, as tmpfs's does; a truncate down and an
    /// append after it (fsstress's sizes, the run of 2026-12-06: truncate to 113,855, writev of
    /// 94,234 bytes at 359,249) shows only what it wrote.
    func testTruncatesAroundTheBatch() throws {
        let (fs, keeper) = try makeKept()
        let big = try appended(fs, "big", pages: 768)
        var grow = AttributeChanges()
        grow.size = Int64(800 * page)
        _ = try fs.setattr(big, grow, caller: me, clearSetIDAsked: false)
        XCTAssertEqual(try blocks(fs, big), 768 * perPage)
        XCTAssertEqual(try backingBlocks(keeper), 768 * perPage, "the batch went back at the truncate")
        XCTAssertEqual(usedPages(fs), 768)

        var shrink = AttributeChanges()
        shrink.size = 113_855
        _ = try fs.setattr(big, shrink, caller: me, clearSetIDAsked: false)
        XCTAssertEqual(try fs.write(big, [UInt8](repeating: 3, count: 94_234), at: 359_249, caller: me), 94_234)
        // Pages 0..<28 below 113,855 and 87...110 of the write.
        let own: Int64 = 28 + 24
        XCTAssertEqual(try blocks(fs, big), own * perPage)
        XCTAssertEqual(usedPages(fs), own)
        XCTAssertGreaterThan(try backingBlocks(keeper), own * perPage, "the append charged a batch ahead")
        fs.release(big)
        XCTAssertEqual(try blocks(fs, big), own * perPage)
        XCTAssertEqual(try backingBlocks(keeper), own * perPage)
    }

    /// Across a kill -9: the successor knows the batch (journal, then a checkpoint), shows only
    /// the file's pages, and gives the batch back at the last close (before: never, the pages
    /// stayed stored and charged past the end for good).
    func testASuccessorGivesTheBatchBackAtTheLastClose() throws {
        var (fs, keeper) = try makeKept()
        let big = try appended(fs, "big", pages: 768)
        let stored = try backingBlocks(keeper)
        XCTAssertGreaterThan(stored, 768 * perPage)

        fs = try takeOver(&fs, keeper)  // from the journal
        XCTAssertEqual(try blocks(fs, big), 768 * perPage)
        XCTAssertEqual(usedPages(fs), 768)
        XCTAssertEqual(try backingBlocks(keeper), stored, "still charged ahead while open")
        fs.checkpointNow()
        fs = try takeOver(&fs, keeper)  // from the checkpoint
        XCTAssertEqual(try blocks(fs, big), 768 * perPage)
        XCTAssertEqual(usedPages(fs), 768)

        XCTAssertTrue(fs.release(big))
        XCTAssertEqual(try blocks(fs, big), 768 * perPage)
        XCTAssertEqual(try backingBlocks(keeper), 768 * perPage)
        fs = try takeOver(&fs, keeper)
        XCTAssertEqual(try backingBlocks(keeper), 768 * perPage)
        XCTAssertEqual(try blocks(fs, big), 768 * perPage)
    }

    /// A batch of a file no one has open (written without an open here; the kernel always
    /// opens first) has no last close to come: the successor gives it back when it takes over.
    func testASuccessorGivesBackTheBatchOfAFileNotOpen() throws {
        var (fs, keeper) = try makeKept()
        let big = try appended(fs, "big", pages: 768, open: false)
        XCTAssertGreaterThan(try backingBlocks(keeper), 768 * perPage)
        fs = try takeOver(&fs, keeper)
        XCTAssertEqual(try backingBlocks(keeper), 768 * perPage)
        XCTAssertEqual(try blocks(fs, big), 768 * perPage)
        // Recorded: the next successor finds it given back.
        fs = try takeOver(&fs, keeper)
        XCTAssertEqual(try blocks(fs, big), 768 * perPage)
        XCTAssertEqual(usedPages(fs), 768)
    }

    /// State from the chargefsd before (version 3: no ahead ranges) is still taken over; the
    /// header says 4 once the files hold something only 4 reads.
    func testAVersion3StateIsTakenOver() throws {
        var (fs, keeper) = try makeKept()
        let small = try fs.mknod(parent: root, name: n("small"), mode: 0o100644, rdev: 0, caller: me).ino
        XCTAssertEqual(try fs.write(small, n("hello"), at: 0, caller: me), 5)
        fs.checkpointNow()
        // As version 3 wrote it: the checkpoint without the table of ahead ranges (its count,
        // 0 here, is its last 8 bytes), its version word and the header's saying 3.
        let state = try stateFiles(keeper)
        let (seq, current) = try XCTUnwrap(try state.activeCheckpoint())
        _ = state.transactions(after: seq)
        var bytes = current
        XCTAssertEqual(Array(bytes.suffix(8)), [UInt8](repeating: 0, count: 8), "no ahead range")
        bytes.removeLast(8)
        bytes.withUnsafeMutableBytes { $0.storeBytes(of: UInt64(3).littleEndian, as: UInt64.self) }
        try bytes.withUnsafeBytes { try state.checkpoint($0) }
        let journal = try XCTUnwrap(keeper.descriptor(.journal))
        var old = UInt64(3).littleEndian
        XCTAssertEqual(pwrite(journal.rawValue, &old, 8, 8), 8)
        XCTAssertEqual(try stateFiles(keeper).headerVersion, 3)

        fs = try takeOver(&fs, keeper)
        XCTAssertEqual(try fs.bytes(of: small, count: 5), n("hello"))
        XCTAssertEqual(try stateFiles(keeper).headerVersion, 3, "nothing of version 4 written yet")
        // A batch ahead: its record is version 4's, and the header says so first.
        let big = try appended(fs, "big", pages: 768)
        XCTAssertEqual(try stateFiles(keeper).headerVersion, 4)
        fs = try takeOver(&fs, keeper)
        XCTAssertEqual(try fs.bytes(of: small, count: 5), n("hello"))
        XCTAssertTrue(fs.release(big))
        XCTAssertEqual(try backingBlocks(keeper), 768 * perPage)
    }
}
