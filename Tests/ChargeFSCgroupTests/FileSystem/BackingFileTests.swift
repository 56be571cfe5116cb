// Large files' backing files (FUSE passthrough), in-process: when a file gets one, that its data
// moves whole, and that no hole appears under a passthrough open. Root only (the arena and the
// backing files live on a private tmpfs, which needs CAP_SYS_ADMIN); the kernel side (a reader's
// cgroup charged nothing, reads that bypass the daemon) is scripts/tests/passthrough.sh.

import CFuse
import Glibc
import SystemPackage
import XCTest
@testable import ChargeFS

final class BackingFileTests: XCTestCase {
    let me = Caller(uid: 0, gid: 0)
    let root = InodeNumber.root
    let page = PageSize.bytes
    let readOnly = OpenFlags(rawValue: O_RDONLY)

    override func setUpWithError() throws {
        try XCTSkipUnless(geteuid() == 0, "needs root: backing files live on the arena's private tmpfs (CAP_SYS_ADMIN)")
    }

    func makeFS(passthrough: Bool = true) throws -> FileSystem { try passthroughFS(passthrough: passthrough) }

    func create(_ fs: FileSystem, _ name: String, bytes: [UInt8]) throws -> InodeNumber {
        try fs.createFile(name, bytes: bytes, caller: me)
    }

    /// Allocated bytes of the backing file, from the kernel (st_blocks).
    func allocated(_ file: PassthroughFile) -> Int {
        var st = stat()
        return fstat(file.fileDescriptor.rawValue, &st) == 0 ? Int(st.st_blocks) * 512 : -1
    }

    func random(_ count: Int) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var state = UInt64.random(in: 1...UInt64.max)
        bytes.withUnsafeMutableBytes { raw in
            // xorshift: random enough to tell pages apart, fast in a debug build
            for i in stride(from: 0, to: raw.count - 7, by: 8) {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17
                raw.storeBytes(of: state, toByteOffset: i, as: UInt64.self)
            }
        }
        return bytes
    }

    func testLargeReadOnlyOpenMovesTheDataIntoABackingFile() throws {
        let fs = try makeFS()
        let data = random(3 << 20 | 123)
        let ino = try create(fs, "big", bytes: data)
        let before = fs.storedBytes()
        let outcome = try fs.open(ino, flags: readOnly, caller: me, clearSetIDAsked: false)
        let file = try XCTUnwrap(outcome.passthrough, "a 3 MiB file opened read-only passes through")
        XCTAssertEqual(backingContents(file), data, "the backing file holds the data at the file's offsets")
        XCTAssertEqual(try fs.contents(ino), data, "the daemon's own reads see the same")
        XCTAssertEqual(fs.storedBytes().used, before.used, "stored bytes unchanged by the move")
        XCTAssertEqual(try fs.getattr(ino).blocks * 512, Int64((data.count + page - 1) / page * page))
        // A second read-only open shares the backing file.
        let second = try fs.open(ino, flags: readOnly, caller: me, clearSetIDAsked: false)
        XCTAssertTrue(second.passthrough.map { PassthroughFile.same($0, file) } ?? false)
        fs.release(ino, passthrough: true)
        fs.release(ino, passthrough: true)
        // Writes after the move land in the backing file.
        let patch = random(10_000)
        _ = try patch.withUnsafeBytes { try fs.write(ino, offset: 1 << 20, data: $0, caller: me, clearSetIDAsked: false) }
        var expected = data
        expected.replaceSubrange((1 << 20)..<((1 << 20) + patch.count), with: patch)
        XCTAssertEqual(backingContents(file), expected)
        XCTAssertEqual(try fs.contents(ino), expected)
        // Unlinked and closed: every byte goes.
        try fs.unlink(parent: root, name: Array("big".utf8))
        XCTAssertEqual(fs.storedBytes().used, 0)
    }

    func testWhatDoesNotPassThrough() throws {
        let fs = try makeFS()
        let small = try create(fs, "small", bytes: random(100_000))
        XCTAssertNil(try fs.open(small, flags: readOnly, caller: me, clearSetIDAsked: false).passthrough, "below 1 MiB")
        let big = try create(fs, "big", bytes: random(2 << 20))
        XCTAssertNil(try fs.open(big, flags: .readWrite, caller: me, clearSetIDAsked: false).passthrough, "a writer")
        XCTAssertNil(try fs.open(big, flags: readOnly, caller: me, clearSetIDAsked: false).passthrough,
                     "a reader while another open (possibly a cached mapping) exists")
        fs.release(big)
        fs.release(big)
        let sparse = try create(fs, "sparse", bytes: [])
        _ = try [UInt8](repeating: 1, count: 10).withUnsafeBytes { try fs.write(sparse, offset: 5 << 20, data: $0, caller: me, clearSetIDAsked: false) }
        XCTAssertNil(try fs.open(sparse, flags: readOnly, caller: me, clearSetIDAsked: false).passthrough, "a file with holes")
        fs.release(sparse)
        // As many pages as the size needs, but one is past the end and one below it is a hole.
        let tricky = try create(fs, "tricky", bytes: random(2 << 20))
        try fs.fallocate(tricky, mode: [.punchHole, .keepSize], offset: 1 << 20, length: 4096)
        try fs.fallocate(tricky, mode: [.keepSize], offset: 2 << 20, length: 4096)
        XCTAssertEqual(try fs.getattr(tricky).blocks * 512, 2 << 20, "as many pages as the size needs")
        XCTAssertNil(try fs.open(tricky, flags: readOnly, caller: me, clearSetIDAsked: false).passthrough,
                     "a hole below the end, a page past it")
        fs.release(tricky)
        // A write near tmpfs's largest size crosses the threshold too (hostile.sh found the
        // page count overflowing there).
        let huge = try create(fs, "huge", bytes: [])
        let n = try [UInt8](repeating: 1, count: 1).withUnsafeBytes {
            try fs.write(huge, offset: Int64.max - 2, data: $0, caller: me, clearSetIDAsked: false).written
        }
        XCTAssertEqual(n, 1)
        XCTAssertNil(try fs.open(huge, flags: readOnly, caller: me, clearSetIDAsked: false).passthrough, "sparse, 2^63 bytes")
        fs.release(huge)
        let off = try makeFS(passthrough: false)
        let other = try create(off, "big", bytes: random(2 << 20))
        XCTAssertNil(try off.open(other, flags: readOnly, caller: me, clearSetIDAsked: false).passthrough, "the kernel did not take passthrough")
    }

    /// Under a passthrough open no change may leave a hole below the size: a reader's page fault
    /// there would allocate a page charged to the reader.
    func testNoHoleAppearsWhilePassthroughOpensExist() throws {
        let fs = try makeFS()
        let size = 2 << 20
        let ino = try create(fs, "big", bytes: random(size))
        let file = try XCTUnwrap(try fs.open(ino, flags: readOnly, caller: me, clearSetIDAsked: false).passthrough)
        func dense(_ what: String) throws {
            let st = try fs.getattr(ino)
            let pages = (Int(st.size) + page - 1) / page
            XCTAssertGreaterThanOrEqual(allocated(file), pages * page, "\(what): every page below the size exists in the backing file")
            // Dense: st_blocks is every page below the size, and none of a batch charged ahead past it.
            XCTAssertEqual(Int(st.blocks) * 512, pages * page, "\(what): st_blocks is the pages below the size")
        }
        var changes = AttributeChanges()
        changes.size = Int64(size + (1 << 20) + 100)
        _ = try fs.setattr(ino, changes, caller: me, clearSetIDAsked: false)
        try dense("truncate up")
        try fs.fallocate(ino, mode: [.punchHole, .keepSize], offset: 4096, length: 64 * 4096)
        try dense("punch")
        XCTAssertEqual(Array(backingContents(file)[4096..<(65 * 4096)]), [UInt8](repeating: 0, count: 64 * 4096), "punched range reads zeros")
        let tail = random(5000)
        let end = Int(try fs.getattr(ino).size)
        _ = try tail.withUnsafeBytes { try fs.write(ino, offset: Int64(end + (3 << 20)), data: $0, caller: me, clearSetIDAsked: false) }
        try dense("write past the end")
        XCTAssertEqual(Array(backingContents(file).suffix(tail.count)), tail)

        // Once the last passthrough open is gone, a punch frees pages again.
        fs.release(ino, passthrough: true)
        let before = allocated(file)
        try fs.fallocate(ino, mode: [.punchHole, .keepSize], offset: 0, length: 1 << 20)
        XCTAssertEqual(allocated(file), before - (1 << 20), "punch frees with no passthrough open")
        XCTAssertEqual(Int(try fs.getattr(ino).blocks) * 512, allocated(file))
        changes.size = 4096
        _ = try fs.setattr(ino, changes, caller: me, clearSetIDAsked: false)
        XCTAssertLessThanOrEqual(allocated(file), 4096, "truncate down frees the backing file's pages")
        XCTAssertEqual(fs.storedBytes().used, Int64(allocated(file)))
    }
    /// A file moves when a write takes it past the threshold (about 1 MiB to copy), not at its
    /// first read-only open; appends then charge a batch ahead, given back at the last close.
    func testGrowingFileMovesAtTheThresholdAndTrimsWhatItChargedAhead() throws {
        let fs = try makeFS()
        let ino = try fs.create(parent: root, name: Array("grow".utf8), mode: 0o100644, caller: me).ino
        let chunk = random(128 * 1024)
        var model: [UInt8] = []
        for _ in 0..<8 {
            _ = try chunk.withUnsafeBytes { try fs.write(ino, offset: Int64(model.count), data: $0, caller: me, clearSetIDAsked: false) }
            model += chunk
        }
        XCTAssertEqual(try fs.getxattr(root, name: FileSystem.statusXattr).split(separator: 10).contains(Array("backing_files=1".utf8)[...]),
                       true, "moved into a backing file at 1 MiB")
        let small = random(3000)
        for _ in 0..<100 {
            _ = try small.withUnsafeBytes { try fs.write(ino, offset: Int64(model.count), data: $0, caller: me, clearSetIDAsked: false) }
            model += small
        }
        XCTAssertEqual(try fs.contents(ino), model)
        let pagesOfSize = (model.count + page - 1) / page
        XCTAssertGreaterThanOrEqual(try fs.getattr(ino).blocks * 512, Int64(pagesOfSize * page))
        fs.release(ino)
        XCTAssertEqual(try fs.getattr(ino).blocks * 512, Int64(pagesOfSize * page), "what was charged ahead went at the last close")
        XCTAssertEqual(fs.storedBytes().used, Int64(pagesOfSize * page))
        let file = try XCTUnwrap(try fs.open(ino, flags: readOnly, caller: me, clearSetIDAsked: false).passthrough)
        XCTAssertEqual(allocated(file), pagesOfSize * page)
        XCTAssertEqual(backingContents(file), model)
        fs.release(ino, passthrough: true)
    }

    /// A punch the kernel refuses (injected) leaves the pages where they are: still counted in
    /// stored bytes and st_blocks, and reading as zeros (written over instead). A zeroing it
    /// refuses too is EIO, never old bytes kept in silence.
    func testRefusedPunchAndZeroingAreAccountedNotIgnored() throws {
        let fs = try makeFS()
        let data = random(2 << 20)
        let ino = try create(fs, "big", bytes: data)
        let file = try XCTUnwrap(try fs.open(ino, flags: readOnly, caller: me, clearSetIDAsked: false).passthrough)
        fs.release(ino, passthrough: true)  // no passthrough open left: a punch frees pages again
        file.backing.syscalls.fallocate = { _, _, _, _ in errno = EIO; return -1 }
        let stored = fs.storedBytes().used, blocks = try fs.getattr(ino).blocks
        try fs.fallocate(ino, mode: [.punchHole, .keepSize], offset: 0, length: 1 << 20)
        XCTAssertEqual(fs.storedBytes().used, stored, "the pages the kernel kept are still counted")
        XCTAssertEqual(try fs.getattr(ino).blocks, blocks)
        let after = try fs.contents(ino)
        XCTAssertEqual(Array(after[..<(1 << 20)]), [UInt8](repeating: 0, count: 1 << 20), "the punched range reads zeros")
        XCTAssertEqual(Array(after[(1 << 20)...]), Array(data[(1 << 20)...]), "the rest is untouched")

        file.backing.syscalls.pwrite = { _, _, _, _ in errno = EIO; return -1 }
        XCTAssertThrowsError(try fs.fallocate(ino, mode: [.punchHole, .keepSize], offset: (1 << 20) + 100, length: 1000)) {
            XCTAssertEqual($0 as? Errno, .ioError, "a zeroing that fails is the caller's error")
        }
        file.backing.syscalls = .kernel
        try fs.fallocate(ino, mode: [.punchHole, .keepSize], offset: (1 << 20) + 100, length: 1000)
        XCTAssertEqual(Array(try fs.contents(ino)[((1 << 20) + 100)..<((1 << 20) + 1100)]), [UInt8](repeating: 0, count: 1000))
    }

    /// The pages an appending file charged ahead are given back at its last close by a punch;
    /// one the kernel refuses (injected) leaves them counted, not dropped from the books.
    func testRefusedTrimKeepsWhatWasChargedAheadCounted() throws {
        let store = try PageStore { DaemonCharger(arena: $0) }
        store.backingFileCalls.fallocate = { fd, mode, offset, length in
            if mode & Int32(CFUSE_FALLOC_PUNCH_HOLE) != 0 { errno = EIO; return -1 }
            return cfuse_fallocate(fd, mode, offset, length)
        }
        let fs = try passthroughFS(store: store)
        let ino = try fs.create(parent: root, name: Array("grow".utf8), mode: 0o100644, caller: me).ino
        var model: [UInt8] = []
        for chunk in [random(1 << 20), random(3000)] {
            _ = try chunk.withUnsafeBytes { try fs.write(ino, offset: Int64(model.count), data: $0, caller: me, clearSetIDAsked: false) }
            model += chunk
        }
        let filePages = (model.count + page - 1) / page * page
        XCTAssertEqual(Int(try fs.getattr(ino).blocks) * 512, filePages, "st_blocks leaves out what was charged ahead")
        XCTAssertEqual(Int(fs.storedBytes().used), filePages, "statfs leaves it out too")
        fs.release(ino)
        // Nothing gave the pages back, so they are the file's now, shown as tmpfs shows pages
        // fallocated past the end.
        let blocks = Int(try fs.getattr(ino).blocks) * 512
        XCTAssertGreaterThan(blocks, filePages, "a batch was charged ahead, and the refused trim leaves it counted")
        XCTAssertEqual(Int(fs.storedBytes().used), blocks, "statfs counts them as st_blocks does")
        XCTAssertEqual(try fs.contents(ino), model)
    }

    /// Writes `data` in 1 MiB pieces, in the order `order` gives the pieces.
    func writePieces(_ fs: FileSystem, _ ino: InodeNumber, _ data: [UInt8], order: [Int]) throws {
        for i in order {
            let piece = Array(data[(i << 20)..<min(data.count, (i + 1) << 20)])
            let n = try piece.withUnsafeBytes { try fs.write(ino, offset: Int64(i << 20), data: $0, caller: me, clearSetIDAsked: false).written }
            XCTAssertEqual(n, piece.count)
        }
    }

    /// A large file that never crossed 1 MiB through a dense append (preallocated as fio does,
    /// written out of order, grown by a truncate before mmap writes) has its backing file before
    /// its first read-only open: that open copies nothing, it only passes the file through.
    func testLargeFilesAreBackedBeforeTheirFirstOpen() throws {
        let fs = try makeFS()
        let size = 6 << 20
        var changes = AttributeChanges()
        changes.size = Int64(size)
        let patterns: [(String, (InodeNumber) throws -> Void)] = [
            ("fallocate then write", { ino in try fs.fallocate(ino, mode: [], offset: 0, length: Int64(size)) }),
            ("fallocate KEEP_SIZE", { ino in try fs.fallocate(ino, mode: [.keepSize], offset: 0, length: Int64(size)) }),
            ("truncate up (mmap)", { ino in _ = try fs.setattr(ino, changes, caller: self.me, clearSetIDAsked: false) }),
            ("out of order", { _ in }),
        ]
        for (number, (what, prepare)) in patterns.enumerated() {
            let data = random(size)
            let ino = try fs.create(parent: root, name: Array("f\(number)".utf8), mode: 0o100644, caller: me).ino
            try writePieces(fs, ino, Array(data[..<4096]), order: [0])  // a small head, moved along
            try prepare(ino)
            try writePieces(fs, ino, data, order: Array((0..<(size >> 20)).reversed()))
            fs.release(ino)
            XCTAssertEqual(try fs.backingFileCount(), number + 1, "\(what): backed before any open")
            let stored = fs.storedBytes()
            XCTAssertEqual(stored.used, Int64((number + 1) * size), "\(what): stored what was written, once")
            let file = try XCTUnwrap(try fs.open(ino, flags: readOnly, caller: me, clearSetIDAsked: false).passthrough,
                                     "\(what): the first read-only open passes through")
            XCTAssertEqual(try fs.backingFileCount(), number + 1, "\(what): the open made no backing file")
            XCTAssertEqual(fs.storedBytes().used, stored.used, "\(what): the open moved nothing")
            XCTAssertEqual(fs.storedBytes().charged, stored.charged, "\(what): nor charged anything")
            XCTAssertEqual(backingContents(file), data, "\(what): the backing file holds every byte")
            XCTAssertEqual(try fs.contents(ino), data)
            fs.release(ino, passthrough: true)
        }
        // A small file stays in the arena.
        _ = try create(fs, "small", bytes: random(100_000))
        XCTAssertEqual(try fs.backingFileCount(), patterns.count)
    }

    /// Small writes that leave holes keep a file in the arena past the threshold (in a backing
    /// file each would be a charge round trip of its own); a write of a charge batch or more
    /// there moves it; either way a later read-only open of the then dense file passes through.
    func testSmallSparseWritesStayInTheArena() throws {
        let fs = try makeFS()
        let small = try fs.create(parent: root, name: Array("small-writes".utf8), mode: 0o100644, caller: me).ino
        let page4k = random(4096)
        _ = try page4k.withUnsafeBytes { try fs.write(small, offset: 5 << 20, data: $0, caller: me, clearSetIDAsked: false) }
        XCTAssertEqual(try fs.backingFileCount(), 0, "a 4 KiB write at 5 MiB: still in the arena")
        let big = try fs.create(parent: root, name: Array("big-writes".utf8), mode: 0o100644, caller: me).ino
        let quarter = random(256 << 10)
        _ = try quarter.withUnsafeBytes { try fs.write(big, offset: 5 << 20, data: $0, caller: me, clearSetIDAsked: false) }
        XCTAssertEqual(try fs.backingFileCount(), 1, "a 256 KiB write at 5 MiB: moved")
        for ino in [small, big] {
            var data = [UInt8](repeating: 7, count: 6 << 20)
            _ = try data.withUnsafeBytes { try fs.write(ino, offset: 0, data: $0, caller: me, clearSetIDAsked: false) }
            data = try fs.contents(ino)
            fs.release(ino)
            let file = try XCTUnwrap(try fs.open(ino, flags: readOnly, caller: me, clearSetIDAsked: false).passthrough)
            XCTAssertEqual(backingContents(file), data)
            fs.release(ino, passthrough: true)
        }
        XCTAssertEqual(try fs.backingFileCount(), 2, "the arena file moved at its open")
    }

    /// A large file left in the arena (no descriptor for a backing file while it was written)
    /// whose first read-only open finds no room for the move (the target near its limit refuses
    /// the charge): an ordinary open through the daemon, no error, every byte, nothing charged
    /// twice; once there is room, a later open moves it.
    func testNoRoomForTheMoveAtOpenDegradesToTheDaemonPath() throws {
        let charger = BackingRefusingCharger()
        let fs = try passthroughFS(store: try PageStore { charger.inner = DaemonCharger(arena: $0); return charger })
        let data = random(4 << 20)
        let ino = try fs.create(parent: root, name: Array("big".utf8), mode: 0o100644, caller: me).ino
        charger.refuseFiles = true
        try fs.fallocate(ino, mode: [], offset: 0, length: Int64(data.count))
        try writePieces(fs, ino, data, order: Array(0..<4))
        fs.release(ino)
        XCTAssertGreaterThan(charger.refusedFiles, 0, "the move was tried while it was written")
        XCTAssertEqual(try fs.backingFileCount(), 0)
        charger.refuseFiles = false
        charger.refuseCharges = true
        let before = fs.storedBytes()
        let outcome = try fs.open(ino, flags: readOnly, caller: me, clearSetIDAsked: false)
        XCTAssertGreaterThan(charger.refusedCharges, 0, "the open tried the move and was refused")
        XCTAssertNil(outcome.passthrough, "an ordinary open, not an error")
        XCTAssertEqual(try fs.backingFileCount(), 0)
        XCTAssertEqual(try fs.contents(ino), data, "read through the daemon")
        XCTAssertEqual(fs.storedBytes().used, before.used)
        XCTAssertEqual(fs.storedBytes().charged, before.charged, "nothing left charged by the refused move")
        fs.release(ino)
        charger.refuseCharges = false
        XCTAssertNotNil(try fs.open(ino, flags: readOnly, caller: me, clearSetIDAsked: false).passthrough, "room again: it moves")
        XCTAssertEqual(try fs.contents(ino), data)
        fs.release(ino, passthrough: true)
    }
}

/// Charges in-process, and refuses what a test says: making a backing file (descriptors short)
/// and charging one (ENOSPC: a target too near its limit for the move).
private final class BackingRefusingCharger: PageCharger, @unchecked Sendable {
    var inner: DaemonCharger?
    var refuseFiles = false, refuseCharges = false
    var refusedFiles = 0, refusedCharges = 0
    func charge(offset: Int64, length: Int64) throws(Errno) {
        guard let inner else { throw .notSupported }
        try inner.charge(offset: offset, length: length)
    }
    func charge(file: FileDescriptor, offset: Int64, length: Int64) throws(Errno) {
        guard let inner else { throw .notSupported }
        if refuseCharges { refusedCharges += 1; throw .noSpace }
        try inner.charge(file: file, offset: offset, length: length)
    }
    func makeFile(in directory: FileDescriptor) throws(Errno) -> FileDescriptor {
        guard let inner else { throw .notSupported }
        if refuseFiles { refusedFiles += 1; throw .tooManyOpenFiles }
        return try inner.makeFile(in: directory)
    }
    var summary: String { "refusing backing files" }
    func shutdown() {}
}
