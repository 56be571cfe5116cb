import Glibc
import SystemPackage
import XCTest
@testable import ChargeFS

/// Writes that meet a limit (size= or the charger's): what is stored, what is returned.
final class WriteAtLimitTests: XCTestCase {
    let me = Caller(uid: 1000, gid: 1000)
    let page = PageSize.bytes

    func makeFS(maxBytes: Int64?, chargerPages: Int) throws -> FileSystem {
        var config = FileSystemConfig()
        config.maxBytes = maxBytes
        let store = try PageStore(capacityPages: 1 << 16) { FakeCharger(arena: $0, budget: chargerPages) }
        return FileSystem(config: config, store: store)
    }

    func newFile(_ fs: FileSystem) throws -> InodeNumber {
        try fs.create(parent: FileSystem.rootIno, name: Array("f".utf8), mode: 0o100644, caller: me).ino
    }

    func write(_ fs: FileSystem, _ ino: InodeNumber, _ bytes: [UInt8], at offset: Int64, writeback: Bool = false) throws -> Int {
        try bytes.withUnsafeBytes { buffer in
            try fs.write(ino, offset: offset, data: buffer, caller: me, clearSetIDAsked: false, wholeOrNothing: writeback).written
        }
    }

    func read(_ fs: FileSystem, _ ino: InodeNumber, count: Int) throws -> [UInt8] {
        try fs.bytes(of: ino, count: count)
    }

    /// A write whose leading page exists and whose rest needs pages the limit refuses returns the
    /// bytes that fit (tmpfs returns a short count), for size= and for a full cgroup alike.
    func testStraddlingWriteStoresWhatFits() throws {
        for (name, fs) in [("size=", try makeFS(maxBytes: Int64(page), chargerPages: 1000)),
                           ("cgroup", try makeFS(maxBytes: nil, chargerPages: 64))] {
            let ino = try newFile(fs)
            let first = [UInt8](repeating: 1, count: page)
            // Fill whatever the limit allows, one page at a time, then overwrite from the start.
            var filled = 0
            while (try? write(fs, ino, first, at: Int64(filled * page))) == page { filled += 1 }
            XCTAssertGreaterThan(filled, 0, name)
            let twice = [UInt8](repeating: 2, count: (filled + 1) * page)
            XCTAssertEqual(try write(fs, ino, twice, at: 0), filled * page, "\(name): the part on existing pages is written")
            XCTAssertEqual(try read(fs, ino, count: twice.count), [UInt8](repeating: 2, count: filled * page), name)
        }
    }

    /// A writeback of mapped pages stores everything or nothing: older kernels take a short count
    /// there as success and would drop the rest silently.
    func testWritebackIsWholeOrNothing() throws {
        for (name, fs) in [("size=", try makeFS(maxBytes: Int64(2 * page), chargerPages: 1000)),
                           ("cgroup", try makeFS(maxBytes: nil, chargerPages: 64))] {
            let ino = try newFile(fs)
            var filled = 0
            while (try? write(fs, ino, [UInt8](repeating: 1, count: page), at: Int64(filled * page))) == page { filled += 1 }
            let before = fs.storedBytes()
            let big = [UInt8](repeating: 3, count: (filled + 1) * page)
            XCTAssertThrowsError(try write(fs, ino, big, at: 0, writeback: true), name) { error in
                XCTAssertEqual(error as? Errno, .noSpace, name)
            }
            XCTAssertEqual(try read(fs, ino, count: filled * page), [UInt8](repeating: 1, count: filled * page),
                           "\(name): nothing of the failed writeback is stored")
            XCTAssertEqual(fs.storedBytes().used, before.used, "\(name): no page kept")
            // One that fits goes through whole.
            XCTAssertEqual(try write(fs, ino, [UInt8](repeating: 4, count: page), at: 0, writeback: true), page, name)
        }
    }
}
