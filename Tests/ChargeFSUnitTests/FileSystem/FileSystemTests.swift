import CFuse
import Glibc
import SystemPackage
import XCTest
@testable import ChargeFS

/// The core in-process, without a mount: names, links, rename rules, data, capacity.
final class FileSystemTests: XCTestCase {
    var fs: FileSystem!
    let me = Caller(uid: 1000, gid: 1000)
    let root = FileSystem.rootIno

    func makeFS(maxBytes: Int64? = 1 << 30, maxInodes: Int64? = 1000) throws -> FileSystem {
        var config = FileSystemConfig()
        config.maxBytes = maxBytes
        config.maxInodes = maxInodes
        let store = try PageStore(capacityPages: 1 << 20) { DaemonCharger(arena: $0) }
        return FileSystem(config: config, store: store)
    }

    override func setUpWithError() throws { fs = try makeFS() }

    func n(_ s: String) -> FileName { Array(s.utf8) }

    func file(_ name: String, in parent: InodeNumber? = nil) throws -> InodeNumber {
        try fs.mknod(parent: parent ?? root, name: n(name), mode: 0o100644, rdev: 0, caller: me).ino
    }

    func write(_ ino: InodeNumber, _ bytes: [UInt8], at offset: Int64) throws -> Int {
        try bytes.withUnsafeBytes { try fs.write(ino, offset: offset, data: $0, caller: me, clearSetIDAsked: false).written }
    }

    func read(_ ino: InodeNumber, _ offset: Int64, _ count: Int) throws -> [UInt8] {
        try fs.bytes(of: ino, at: offset, count: count, noatime: false)
    }

    func assertErrno(_ expected: Errno, _ body: () throws -> Void, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try body(), file: file, line: line) { error in
            XCTAssertEqual(error as? Errno, expected, file: file, line: line)
        }
    }

    func testCreateLookupOwnership() throws {
        let ino = try file("a")
        let attr = try fs.lookup(parent: root, name: n("a"))
        XCTAssertEqual(attr.ino, ino)
        XCTAssertEqual(attr.uid, 1000)
        XCTAssertEqual(attr.mode, 0o100644)
        assertErrno(.fileExists) { _ = try self.file("a") }
        assertErrno(.noSuchFileOrDirectory) { _ = try self.fs.lookup(parent: self.root, name: self.n("b")) }
        assertErrno(.fileNameTooLong) { _ = try self.file(String(repeating: "x", count: 256)) }
        XCTAssertNoThrow(try file(String(repeating: "x", count: 255)))
    }

    func testNamesAreBytes() throws {
        let name: FileName = [0xff, 0xfe, 0x80, 0x41, 0x0a]
        let ino = try fs.mknod(parent: root, name: name, mode: 0o100600, rdev: 0, caller: me).ino
        var listed: [FileName] = []
        try fs.readdir(root, offset: 0, plus: false) { listed.append($0.name); return true }
        XCTAssertTrue(listed.contains(name))
        XCTAssertEqual(try fs.lookup(parent: root, name: name).ino, ino)
    }

    func testSetgidDirectoryInheritance() throws {
        let dir = try fs.mkdir(parent: root, name: n("g"), mode: 0o2775, caller: Caller(uid: 0, gid: 50))
        let sub = try fs.mkdir(parent: dir.ino, name: n("sub"), mode: 0o755, caller: me)
        XCTAssertEqual(sub.gid, 50)
        XCTAssertEqual(sub.mode & 0o2000, 0o2000)
        let f = try fs.mknod(parent: dir.ino, name: n("f"), mode: 0o100644, rdev: 0, caller: me)
        XCTAssertEqual(f.gid, 50)
    }

    /// Any write drops file capabilities, even root's, as tmpfs's write does: a direct-I/O write
    /// reaches the daemon without the kernel having removed them first. Other xattrs stay.
    func testWriteDropsFileCapabilitiesOnly() throws {
        let f = try file("caps")
        try fs.setxattr(f, name: n("security.capability"), value: [1, 0, 0, 2], flags: [])
        try fs.setxattr(f, name: n("user.keep"), value: [7], flags: [])
        let data: [UInt8] = [1]
        _ = try data.withUnsafeBytes { try fs.write(f, offset: 0, data: $0, caller: .root, clearSetIDAsked: false) }
        assertErrno(.noData) { _ = try self.fs.getxattr(f, name: self.n("security.capability")) }
        XCTAssertEqual(try fs.getxattr(f, name: n("user.keep")), [7])
    }

    /// The VFS rules for clearing setuid/setgid, as the kernel hands them over with
    /// FUSE_HANDLE_KILLPRIV_V2 (flag = caller lacks CAP_FSETID, or a chown).
    func testSetIDClearingRules() throws {
        func mode(_ ino: InodeNumber) throws -> UInt32 { try fs.getattr(ino).mode & 0o7777 }
        let f = try file("f")
        func set(_ m: UInt32) throws { var c = AttributeChanges(); c.mode = m; _ = try fs.setattr(f, c, caller: .root, clearSetIDAsked: false) }
        let data: [UInt8] = [1]
        try set(0o6755)
        _ = try data.withUnsafeBytes { try fs.write(f, offset: 0, data: $0, caller: .root, clearSetIDAsked: false) }
        XCTAssertEqual(try mode(f), 0o6755, "a capable writer (no flag) keeps both")
        let w = try data.withUnsafeBytes { try fs.write(f, offset: 0, data: $0, caller: me, clearSetIDAsked: true) }
        XCTAssertEqual(try mode(f), 0o755, "flagged write: setuid, and setgid with group-exec")
        XCTAssertTrue(w.modeChanged)
        try set(0o6745)
        _ = try data.withUnsafeBytes { try fs.write(f, offset: 0, data: $0, caller: Caller(uid: 1000, gid: 1000), clearSetIDAsked: true) }
        XCTAssertEqual(try mode(f), 0o2745, "setgid without group-exec stays for a member of the group")
        _ = try data.withUnsafeBytes { try fs.write(f, offset: 0, data: $0, caller: Caller(uid: 7, gid: 7), clearSetIDAsked: false) }
        XCTAssertEqual(try mode(f), 0o745, "and goes for an outsider, flagged or not")
        try set(0o4755)
        var truncate = AttributeChanges(); truncate.size = 0
        _ = try fs.setattr(f, truncate, caller: me, clearSetIDAsked: true)
        XCTAssertEqual(try mode(f), 0o755, "flagged truncate")
        try set(0o4755)
        XCTAssertTrue(try fs.open(f, flags: OpenFlags(rawValue: O_WRONLY | O_TRUNC), caller: me, clearSetIDAsked: true).modeChanged, "flagged O_TRUNC")
        fs.release(f)
        XCTAssertEqual(try mode(f), 0o755)
        try set(0o6755)
        _ = try fs.setattr(f, AttributeChanges(), caller: .root, clearSetIDAsked: true)
        XCTAssertEqual(try mode(f), 0o755, "a chown (flagged) clears even for root")
        let d = try fs.mkdir(parent: root, name: n("d"), mode: 0o2755, caller: me)
        _ = try fs.setattr(d.ino, AttributeChanges(), caller: me, clearSetIDAsked: true)
        XCTAssertEqual(try mode(d.ino), 0o2755, "directories keep theirs")
    }

    func testDirectoryLinkCountsAndRmdir() throws {
        let d = try fs.mkdir(parent: root, name: n("d"), mode: 0o755, caller: me)
        XCTAssertEqual(d.nlink, 2)
        XCTAssertEqual(try fs.getattr(root).nlink, 3)
        _ = try fs.mkdir(parent: d.ino, name: n("e"), mode: 0o755, caller: me)
        XCTAssertEqual(try fs.getattr(d.ino).nlink, 3)
        assertErrno(.directoryNotEmpty) { try self.fs.rmdir(parent: self.root, name: self.n("d")) }
        assertErrno(.notDirectory) { _ = try self.file("x"); try self.fs.rmdir(parent: self.root, name: self.n("x")) }
        assertErrno(.isDirectory) { try self.fs.unlink(parent: self.root, name: self.n("d")) }
        try fs.rmdir(parent: d.ino, name: n("e"))
        try fs.rmdir(parent: root, name: n("d"))
        XCTAssertEqual(try fs.getattr(root).nlink, 2)
    }

    func testRenameRules() throws {
        let a = try fs.mkdir(parent: root, name: n("a"), mode: 0o755, caller: me)
        let b = try fs.mkdir(parent: a.ino, name: n("b"), mode: 0o755, caller: me)
        _ = try file("f")
        _ = try file("g")
        // A directory into its own subtree.
        assertErrno(.invalidArgument) { try self.fs.rename(parent: self.root, name: self.n("a"), newParent: b.ino, newName: self.n("x"), flags: []) }
        assertErrno(.isDirectory) { try self.fs.rename(parent: self.root, name: self.n("f"), newParent: self.root, newName: self.n("a"), flags: []) }
        assertErrno(.notDirectory) { try self.fs.rename(parent: self.root, name: self.n("a"), newParent: self.root, newName: self.n("f"), flags: []) }
        assertErrno(.fileExists) {
            try self.fs.rename(parent: self.root, name: self.n("f"), newParent: self.root, newName: self.n("g"), flags: .noReplace)
        }
        // Over a non-empty directory.
        let c = try fs.mkdir(parent: root, name: n("c"), mode: 0o755, caller: me)
        assertErrno(.directoryNotEmpty) { try self.fs.rename(parent: self.root, name: self.n("c"), newParent: self.root, newName: self.n("a"), flags: []) }
        // Plain replace drops the old target.
        let gIno = try fs.lookup(parent: root, name: n("g")).ino
        try fs.rename(parent: root, name: n("f"), newParent: root, newName: n("g"), flags: [])
        assertErrno(.noSuchFileOrDirectory) { _ = try self.fs.lookup(parent: self.root, name: self.n("f")) }
        XCTAssertNotEqual(try fs.lookup(parent: root, name: n("g")).ino, gIno)
        // Exchange a file and a directory across parents: link counts follow the directory.
        try fs.rename(parent: root, name: n("c"), newParent: a.ino, newName: n("b"), flags: .exchange)
        XCTAssertEqual(try fs.lookup(parent: a.ino, name: n("b")).ino, c.ino)
        XCTAssertEqual(try fs.lookup(parent: root, name: n("c")).ino, b.ino)
        assertErrno(.noSuchFileOrDirectory) {
            try self.fs.rename(parent: self.root, name: self.n("g"), newParent: self.root, newName: self.n("zz"), flags: .exchange)
        }
        // Moving a directory to another parent moves a link count.
        let rootLinks = try fs.getattr(root).nlink
        try fs.rename(parent: a.ino, name: n("b"), newParent: root, newName: n("moved"), flags: [])
        XCTAssertEqual(try fs.getattr(root).nlink, rootLinks + 1)
        XCTAssertEqual(try fs.getattr(a.ino).nlink, 2)
        XCTAssertEqual(try fs.lookup(parent: c.ino, name: n("..")).ino, root)
    }

    func testWriteReadHolesAndBlocks() throws {
        let ino = try file("data")
        XCTAssertEqual(try write(ino, Array("hello".utf8), at: 10_000), 5)
        let attr = try fs.getattr(ino)
        XCTAssertEqual(attr.size, 10_005)
        XCTAssertEqual(attr.blocks, 8)  // one page, the hole before it costs nothing
        let bytes = try read(ino, 0, 20_000)
        XCTAssertEqual(bytes.count, 10_005)
        XCTAssertEqual(Array(bytes[0..<10_000]), [UInt8](repeating: 0, count: 10_000))
        XCTAssertEqual(Array(bytes[10_000...]), Array("hello".utf8))
        XCTAssertEqual(try read(ino, 20_000, 10), [])
        XCTAssertEqual(try fs.seek(ino, offset: 0, whence: .data), 8192)
        XCTAssertEqual(try fs.seek(ino, offset: 8192, whence: .hole), 10_005)
        assertErrno(.noSuchAddressOrDevice) { _ = try self.fs.seek(ino, offset: 20_000, whence: .data) }
    }

    func testTruncateZeroesTailAndFreesPages() throws {
        let ino = try file("t")
        _ = try write(ino, [UInt8](repeating: 7, count: 3 * 4096), at: 0)
        var c = AttributeChanges()
        c.size = 100
        XCTAssertEqual(try fs.setattr(ino, c, caller: me, clearSetIDAsked: false).blocks, 8)
        c.size = 8192
        _ = try fs.setattr(ino, c, caller: me, clearSetIDAsked: false)
        let bytes = try read(ino, 0, 8192)
        XCTAssertEqual(Array(bytes[0..<100]), [UInt8](repeating: 7, count: 100))
        XCTAssertEqual(Array(bytes[100...]), [UInt8](repeating: 0, count: 8092))
        XCTAssertEqual(fs.storedBytes().used, 4096)
    }

    func testPunchHoleAndFallocate() throws {
        let ino = try file("p")
        _ = try write(ino, [UInt8](repeating: 1, count: 4 * 4096), at: 0)
        try fs.fallocate(ino, mode: [.punchHole, .keepSize], offset: 100, length: 3 * 4096)
        let attr = try fs.getattr(ino)
        XCTAssertEqual(attr.size, 4 * 4096)
        XCTAssertEqual(attr.blocks, 2 * 8)  // pages 1 and 2 freed; 0 and 3 partly zeroed
        let bytes = try read(ino, 0, 4 * 4096)
        XCTAssertEqual(Array(bytes[0..<100]), [UInt8](repeating: 1, count: 100))
        XCTAssertTrue(bytes[100..<(100 + 3 * 4096)].allSatisfy { $0 == 0 })
        XCTAssertTrue(bytes[(100 + 3 * 4096)...].allSatisfy { $0 == 1 })
        try fs.fallocate(ino, mode: .allocate, offset: 0, length: 40_000)
        XCTAssertEqual(try fs.getattr(ino).size, 40_000)
        try fs.fallocate(ino, mode: .keepSize, offset: 0, length: 80_000)
        XCTAssertEqual(try fs.getattr(ino).size, 40_000)
        XCTAssertEqual(try fs.getattr(ino).blocks, Int64((80_000 + 4095) / 4096 * 8))
        assertErrno(.notSupported) { try self.fs.fallocate(ino, mode: .punchHole, offset: 0, length: 1) }
        assertErrno(.notSupported) { try self.fs.fallocate(ino, mode: FallocateMode(rawValue: 0x10) /* ZERO_RANGE */, offset: 0, length: 1) }
        assertErrno(.fileTooLarge) { try self.fs.fallocate(ino, mode: .allocate, offset: Int64.max - 10, length: 100) }
    }

    func testCapacityPartialWriteAndInodes() throws {
        fs = try makeFS(maxBytes: 5 * 4096, maxInodes: 3)
        let ino = try file("x")
        XCTAssertEqual(try write(ino, [UInt8](repeating: 9, count: 4 * 4096), at: 0), 4 * 4096)
        // One page left: a two-page write stores the first page only.
        XCTAssertEqual(try write(ino, [UInt8](repeating: 8, count: 2 * 4096), at: 4 * 4096), 4096)
        assertErrno(.noSpace) { _ = try self.write(ino, [1], at: 10 * 4096) }
        XCTAssertEqual(try read(ino, 0, 4096), [UInt8](repeating: 9, count: 4096))
        _ = try file("y")
        assertErrno(.noSpace) { _ = try self.file("z") }  // root + x + y
        assertErrno(.noSpace) { _ = try self.fs.link(ino, newParent: self.root, newName: self.n("x2")) }
        let usage = fs.usage()
        XCTAssertEqual(usage.totalPages, 5)
        XCTAssertEqual(usage.freePages, 0)
        XCTAssertEqual(usage.freeInodes, 0)
    }

    func testUnlinkedFileLivesUntilLastCloseAndForget() throws {
        let ino = try fs.create(parent: root, name: n("u"), mode: 0o100644, caller: me).ino  // open handle
        _ = try write(ino, [UInt8](repeating: 3, count: 8192), at: 0)
        try fs.unlink(parent: root, name: n("u"))
        XCTAssertEqual(try read(ino, 0, 2), [3, 3])  // still readable through the open handle
        XCTAssertEqual(fs.storedBytes().used, 8192)
        fs.release(ino)  // last close: the data goes
        XCTAssertEqual(fs.storedBytes().used, 0)
        XCTAssertNoThrow(try fs.getattr(ino))  // the inode waits for the kernel's forget
        fs.forget(ino, count: 1)
        assertErrno(.noSuchFileOrDirectory) { _ = try self.fs.getattr(ino) }
        // Without an open handle, unlink frees the data at once.
        let other = try file("v")
        _ = try write(other, [1], at: 0)
        try fs.unlink(parent: root, name: n("v"))
        XCTAssertEqual(fs.storedBytes().used, 0)
    }

    func testHardLinks() throws {
        let ino = try file("h")
        let linked = try fs.link(ino, newParent: root, newName: n("h2"))
        XCTAssertEqual(linked.nlink, 2)
        try fs.unlink(parent: root, name: n("h"))
        XCTAssertEqual(try fs.getattr(ino).nlink, 1)
        let d = try fs.mkdir(parent: root, name: n("dir"), mode: 0o755, caller: me)
        assertErrno(.notPermitted) { _ = try self.fs.link(d.ino, newParent: self.root, newName: self.n("dl")) }
    }

    func testXattrs() throws {
        let ino = try file("x")
        try fs.setxattr(ino, name: n("user.a"), value: [1, 2], flags: [])
        XCTAssertEqual(try fs.getxattr(ino, name: n("user.a")), [1, 2])
        assertErrno(.fileExists) { try self.fs.setxattr(ino, name: self.n("user.a"), value: [], flags: .create) }
        assertErrno(.noData) { try self.fs.setxattr(ino, name: self.n("user.b"), value: [], flags: .replace) }
        assertErrno(.noData) { _ = try self.fs.getxattr(ino, name: self.n("user.zz")) }
        assertErrno(.notSupported) { try self.fs.setxattr(ino, name: self.n("os2.x"), value: [], flags: []) }
        try fs.setxattr(ino, name: n("trusted.t"), value: [], flags: [])
        XCTAssertEqual(try fs.listxattr(ino), Array("trusted.t".utf8) + [0] + Array("user.a".utf8) + [0])
        try fs.removexattr(ino, name: n("user.a"))
        assertErrno(.noData) { try self.fs.removexattr(ino, name: self.n("user.a")) }
        XCTAssertTrue(String(decoding: try fs.getxattr(root, name: FileSystem.statusXattr), as: UTF8.self).contains("charger=daemon"))
    }

    func testRequestCountsAttributeIsTheTransportsAndReadOnly() throws {
        XCTAssertEqual(try fs.getxattr(root, name: FileSystem.requestsXattr), [], "nothing reports in-process")
        assertErrno(.notPermitted) { try self.fs.setxattr(self.root, name: FileSystem.requestsXattr, value: [1], flags: []) }
        assertErrno(.notPermitted) { try self.fs.setxattr(self.root, name: FileSystem.statusXattr, value: [1], flags: []) }
        XCTAssertEqual(try fs.listxattr(root), [], "neither is listed")
    }

    func testReaddirStableWhileChanging() throws {
        for i in 0..<100 { _ = try file("f\(i)") }
        var seen: [FileName] = []
        var offset: Int64 = 0
        var round = 0
        // Read 10 at a time, adding and removing other names between calls.
        while true {
            var batch = 0
            var last: Int64?
            try fs.readdir(root, offset: offset, plus: false) { entry in
                if batch == 10 { return false }
                seen.append(entry.name)
                last = entry.nextOffset
                batch += 1
                return true
            }
            guard let last else { break }
            offset = last
            if round < 30 { _ = try file("new\(round)") }
            if round < 50 { try fs.unlink(parent: root, name: n("f\(99 - round)")) }
            round += 1
        }
        XCTAssertEqual(Set(seen).count, seen.count, "an entry was listed twice")
        // Entries present throughout (f0..f49) each appear once.
        for i in 0..<50 { XCTAssertTrue(seen.contains(n("f\(i)"))) }
    }
}

extension FileSystemTests {
    func testPunchAndTruncateReachPagesPastEOF() throws {
        let ino = try file("k")
        _ = try write(ino, [UInt8](repeating: 5, count: 10_000), at: 0)
        // Like tmpfs: a punch past EOF frees the page holding EOF when it covers it whole.
        try fs.fallocate(ino, mode: [.punchHole, .keepSize], offset: 6000, length: 8000)
        XCTAssertEqual(try fs.getattr(ino).blocks, 2 * 8)
        // KEEP_SIZE pages past EOF go when the file shrinks.
        try fs.fallocate(ino, mode: .keepSize, offset: 0, length: 64 * 4096)
        XCTAssertEqual(try fs.getattr(ino).blocks, 64 * 8)
        var c = AttributeChanges()
        c.size = 4096
        XCTAssertEqual(try fs.setattr(ino, c, caller: me, clearSetIDAsked: false).blocks, 8)
        // A range that can never fit is refused without walking it.
        assertErrno(.noSpace) { try self.fs.fallocate(ino, mode: .allocate, offset: 0, length: Int64(1) << 60) }
        try fs.fallocate(ino, mode: [.punchHole, .keepSize], offset: 0, length: Int64(1) << 60)
        XCTAssertEqual(try fs.getattr(ino).blocks, 0)
    }
}
