// mmap: shared writable mappings coherent with read/write; msync; private mappings.
// Not tested: touching a mapping beyond EOF or past size= (SIGBUS would kill the test process).

import Foundation
import Glibc
import XCTest

final class Mapping {
    let base: UnsafeMutableRawPointer
    let length: Int
    init(fd: Int32, length: Int, prot: Int32 = PROT_READ | PROT_WRITE, flags: Int32 = MAP_SHARED, offset: Int = 0) throws {
        let p = mmap(nil, length, prot, flags, fd, off_t(offset))
        guard let p, p != MAP_FAILED else { throw SysError(op: "mmap", code: errno) }
        base = p
        self.length = length
    }
    subscript(i: Int) -> UInt8 {
        get { base.load(fromByteOffset: i, as: UInt8.self) }
        set { base.storeBytes(of: newValue, toByteOffset: i, as: UInt8.self) }
    }
    func write(_ bytes: [UInt8], at off: Int) { bytes.withUnsafeBytes { (base + off).copyMemory(from: $0.baseAddress!, byteCount: bytes.count) } }
    func read(_ count: Int, at off: Int) -> [UInt8] { Array(UnsafeRawBufferPointer(start: base + off, count: count)) }
    func sync(_ flags: Int32 = MS_SYNC) -> Int32 { msync(base, length, flags) }
    deinit { munmap(base, length) }
}

/// Reads through O_DIRECT (bypasses the kernel page cache, so it asks the daemon itself).
func directRead(_ path: String, count: Int, at offset: Int) throws -> [UInt8] {
    let fd = try FS.open(path, O_RDONLY | LinuxConst.O_DIRECT)
    defer { close(fd) }
    let buf = try AlignedBuffer(count: count)
    let n = try sys("pread O_DIRECT", pread(fd, buf.base, count, off_t(offset)))
    return Array(buf.bytes.prefix(n))
}

class MountMmapTests: MountTestCase {
    /// Whether data written with write(2) stays in the kernel's page cache (cache=page).
    class var writesStayInPageCache: Bool { false }

    /// The default (cache=direct) keeps no cached copy of written data, which the kernel would
    /// charge to the writer's cgroup; cache=page keeps it. mincore(2) shows which it was.
    func testWrittenDataIsCachedOnlyWithPageCache() throws {
        let f = p("resident")
        let size = 16 * 4096
        try FS.create(f, [UInt8](repeating: 7, count: size))
        let fd = try FS.open(f, O_RDONLY)
        defer { close(fd) }
        let m = try Mapping(fd: fd, length: size, prot: PROT_READ)
        var vec = [UInt8](repeating: 0, count: size / 4096)
        XCTAssertErrno(0, mincore(m.base, size, &vec))
        let resident = vec.filter { $0 & 1 != 0 }.count
        if Self.writesStayInPageCache {
            XCTAssertEqual(resident, vec.count, "cache=page: written pages stay cached")
        } else {
            XCTAssertEqual(resident, 0, "cache=direct: no page cache copy of written data")
        }
        XCTAssertEqual(m[size - 1], 7)
    }

    func testSharedWritableMappingCoherentWithReadWrite() throws {
        let f = p("m")
        let size = 5 * 4096
        try FS.create(f, [UInt8](repeating: 0, count: size))
        let fd = try FS.open(f, O_RDWR)
        defer { close(fd) }
        let m = try Mapping(fd: fd, length: size)
        // mmap store -> read(2)
        m.write(Array("written via mmap".utf8), at: 4090)
        XCTAssertEqual(String(decoding: try FS.read(fd, count: 16, at: 4090), as: UTF8.self), "written via mmap")
        // write(2) -> mapping
        _ = try FS.write(fd, Array("written via pwrite".utf8), at: 3 * 4096 + 5)
        XCTAssertEqual(String(decoding: m.read(18, at: 3 * 4096 + 5), as: UTF8.self), "written via pwrite")
        // msync succeeds and the daemon has the data (O_DIRECT read bypasses the page cache).
        XCTAssertErrno(0, m.sync(MS_SYNC))
        XCTAssertErrno(0, m.sync(MS_ASYNC))
        XCTAssertErrno(0, m.sync(MS_INVALIDATE))
        XCTAssertEqual(String(decoding: try directRead(f, count: 8192, at: 0).suffix(from: 4090).prefix(16), as: UTF8.self), "written via mmap")
        // A second, independent mapping sees the same pages.
        let fd2 = try FS.open(f, O_RDWR)
        defer { close(fd2) }
        let m2 = try Mapping(fd: fd2, length: size)
        m2[100] = 0x77
        XCTAssertEqual(m[100], 0x77)
        XCTAssertErrno(0, fsync(fd))
        XCTAssertErrno(0, fdatasync(fd2))
        XCTAssertEqual(try directRead(f, count: 4096, at: 0)[100], 0x77)
    }

    func testMappedDataPersistsAfterUnmapAndClose() throws {
        let f = p("persist")
        let size = 64 * 1024
        try FS.create(f)
        do {
            let fd = try FS.open(f, O_RDWR)
            try sys("ftruncate", ftruncate(fd, off_t(size)))
            let m = try Mapping(fd: fd, length: size)
            for i in stride(from: 0, to: size, by: 997) { m[i] = UInt8(truncatingIfNeeded: i / 997 + 1) }
            close(fd)
            _ = m   // unmapped at end of scope, no msync
        }
        let back = try FS.contents(f)
        XCTAssertEqual(back.count, size)
        var bad = 0
        for i in stride(from: 0, to: size, by: 997) where back[i] != UInt8(truncatingIfNeeded: i / 997 + 1) { bad += 1 }
        XCTAssertEqual(bad, 0, "bytes stored through the mapping lost after munmap/close")
        // Dropping the page cache (O_DIRECT read) still shows them: the daemon got them.
        let direct = try directRead(f, count: size, at: 0)
        XCTAssertEqual(direct.count, size)
        XCTAssertEqual(direct[997 * 3], 4)
        // Writing into a hole through the mapping allocates blocks.
        XCTAssertGreaterThan(try FS.statOf(f).st_blocks, 0)
    }

    func testWriteThroughODirectInvalidatesMapping() throws {
        let f = p("dio")
        try FS.create(f, [UInt8](repeating: 1, count: 8192))
        let fd = try FS.open(f, O_RDWR)
        defer { close(fd) }
        let m = try Mapping(fd: fd, length: 8192, prot: PROT_READ)
        XCTAssertEqual(m[5000], 1)
        let dfd = try FS.open(f, O_RDWR | LinuxConst.O_DIRECT)
        defer { close(dfd) }
        let aligned = try AlignedBuffer(count: 4096, filledWith: 9)
        let buf = aligned.base
        XCTAssertEqual(pwrite(dfd, buf, 4096, 4096), 4096)
        XCTAssertEqual(m[5000], 9, "mapping must see an O_DIRECT write")
        XCTAssertEqual(try FS.read(fd, count: 1, at: 5000), [9], "buffered read must see an O_DIRECT write")
    }

    func testPrivateMappingIsIsolated() throws {
        let f = p("priv")
        try FS.create(f, [UInt8](repeating: 5, count: 4096))
        let fd = try FS.open(f, O_RDONLY)
        defer { close(fd) }
        let m = try Mapping(fd: fd, length: 4096, flags: MAP_PRIVATE)
        m[0] = 6
        XCTAssertEqual(m[0], 6)
        XCTAssertEqual(try FS.read(fd, count: 1, at: 0), [5])
        XCTAssertEqual(try FS.contents(f)[0], 5)
        // Shared writable mapping of an O_RDONLY fd is refused.
        XCTAssertThrowsError(try Mapping(fd: fd, length: 4096, flags: MAP_SHARED)) { e in
            XCTAssertEqual((e as? SysError).map { errnoName($0.code) }, "EACCES")
        }
    }

    func testMappingAfterTruncateAndExtend() throws {
        let f = p("grow")
        try FS.create(f, [UInt8](repeating: 3, count: 4096))
        let fd = try FS.open(f, O_RDWR)
        defer { close(fd) }
        let m = try Mapping(fd: fd, length: 3 * 4096)
        XCTAssertEqual(m[10], 3)
        try sys("ftruncate", ftruncate(fd, 3 * 4096))
        XCTAssertEqual(m[2 * 4096 + 7], 0, "extended area reads zero through the mapping")
        m[2 * 4096 + 7] = 0x42
        XCTAssertEqual(try FS.read(fd, count: 1, at: 2 * 4096 + 7), [0x42])
        try sys("ftruncate", ftruncate(fd, 100))
        XCTAssertEqual(try FS.fstatOf(fd).st_size, 100)
        try sys("ftruncate", ftruncate(fd, 4096))
        XCTAssertEqual(m[200], 0, "bytes past a shrink must read zero after re-extending")
        XCTAssertEqual(m[50], 3)
        XCTAssertEqual(try FS.read(fd, count: 1, at: 200), [0])
    }
}

/// The same mappings under cache=page, where read(2) and write(2) go through the page cache too.
final class MountMmapPageCacheTests: MountMmapTests {
    override class var mountOptions: [String] { ["cache=page"] }
    override class var writesStayInPageCache: Bool { true }
    // Declared again so that test discovery on Linux finds them in this class.
    override func testWrittenDataIsCachedOnlyWithPageCache() throws { try super.testWrittenDataIsCachedOnlyWithPageCache() }
    override func testSharedWritableMappingCoherentWithReadWrite() throws { try super.testSharedWritableMappingCoherentWithReadWrite() }
    override func testMappedDataPersistsAfterUnmapAndClose() throws { try super.testMappedDataPersistsAfterUnmapAndClose() }
    override func testWriteThroughODirectInvalidatesMapping() throws { try super.testWriteThroughODirectInvalidatesMapping() }
    override func testPrivateMappingIsIsolated() throws { try super.testPrivateMappingIsIsolated() }
    override func testMappingAfterTruncateAndExtend() throws { try super.testMappingAfterTruncateAndExtend() }
}
