import Dispatch
import Foundation
import Glibc
import Synchronization
import SystemPackage
import XCTest
@testable import ChargeFS

/// A write that waits for its pages to be charged (a frozen target) holds no
/// lock of the tree, so everything else goes on; it completes once the charge does.
final class ChargeOutsideLockTests: XCTestCase {
    let me = Caller(uid: 1000, gid: 1000)

    /// A file system of 1 GiB whose every charge waits at a closed gate. The reserve starts
    /// empty, so the first new page needs a charge.
    func gatedFileSystem() throws -> (FileSystem, FakeCharger) {
        var made: FakeCharger?
        var config = FileSystemConfig()
        config.maxBytes = 1 << 30
        let store = try PageStore(capacityPages: 1 << 16) { arena in
            let g = FakeCharger(arena: arena, gated: true)
            made = g
            return g
        }
        return (FileSystem(config: config, store: store), try XCTUnwrap(made))
    }

    func testOtherOperationsGoOnWhileAChargeWaits() throws {
        let (fs, gate) = try gatedFileSystem()
        let root = InodeNumber.root
        let me = self.me
        func create(_ name: String) throws -> InodeNumber {
            try fs.create(parent: root, name: Array(name.utf8), mode: 0o100644, caller: me).ino
        }
        let existing = try create("existing")
        let waiting = try create("waiting")
        let other = try create("other")

        // A writer needs pages: it blocks in the charger.
        let big = [UInt8](repeating: 0xAB, count: 3 << 20)
        let written = Atomic<Int>(-1)
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            let n = big.withUnsafeBytes { try? fs.write(waiting, offset: 0, data: $0, caller: me, clearSetIDAsked: false).written }
            written.store(n ?? -2, ordering: .relaxed)
            done.signal()
        }
        let deadline = Date().addingTimeInterval(5)
        while gate.chargesWaiting == 0 && Date() < deadline { usleep(1000) }
        XCTAssertEqual(gate.chargesWaiting, 1, "the writer waits in the charger")

        // Meanwhile, on another thread with a time limit: everything that needs no new page.
        let others = DispatchSemaphore(value: 0)
        let failures = Mutex<[String]>([])
        Thread.detachNewThread {
            func note(_ what: String, _ body: () throws -> Void) {
                do { try body() } catch { failures.withLock { $0.append("\(what): \(error)") } }
            }
            note("stat") { _ = try fs.getattr(existing) }
            note("lookup") { _ = try fs.lookup(parent: root, name: Array("existing".utf8)) }
            note("readdir") { try fs.readdir(root, offset: 0, plus: false) { _ in true } }
            note("read") { try fs.read(existing, offset: 0, count: 4096, noatime: true) { _ in } }
            note("mkdir") { _ = try fs.mkdir(parent: root, name: Array("d".utf8), mode: 0o755, caller: me) }
            note("unlink") { try fs.unlink(parent: root, name: Array("other".utf8)) }
            note("statfs") { _ = fs.usage() }
            others.signal()
        }
        XCTAssertEqual(others.wait(timeout: .now() + 5), .success, "operations that need no new page do not wait for the charge")
        XCTAssertEqual(failures.withLock { $0 }, [])
        XCTAssertEqual(written.load(ordering: .relaxed), -1, "the writer still waits")
        _ = other

        // The target thaws: the write completes, every byte.
        gate.open()
        XCTAssertEqual(done.wait(timeout: .now() + 10), .success)
        XCTAssertEqual(written.load(ordering: .relaxed), big.count)
        XCTAssertEqual(try fs.bytes(of: waiting, count: big.count), big)
    }

    /// Freed pages scattered over the arena (every other one) are charged again in as many runs
    /// as it takes: a large write is stored whole, not cut short after a few one-page charges.
    func testWriteOverScatteredFreePagesIsStoredWhole() throws {
        var config = FileSystemConfig()
        config.maxBytes = 1 << 30
        let fs = FileSystem(config: config, store: try PageStore(capacityPages: 1 << 16) { FakeCharger(arena: $0) })
        let page = [UInt8](repeating: 1, count: PageSize.bytes)
        var files: [FileName] = []
        for i in 0..<600 {
            let name = Array("f\(i)".utf8)
            let ino = try fs.create(parent: InodeNumber.root, name: name, mode: 0o100644, caller: me).ino
            _ = try page.withUnsafeBytes { try fs.write(ino, offset: 0, data: $0, caller: me, clearSetIDAsked: false) }
            fs.release(ino)
            files.append(name)
        }
        for name in files.enumerated().filter({ $0.offset % 2 == 0 }).map(\.element) {
            try fs.unlink(parent: InodeNumber.root, name: name)
        }
        let big = [UInt8](repeating: 0xCD, count: 1 << 20)
        let ino = try fs.create(parent: InodeNumber.root, name: Array("big".utf8), mode: 0o100644, caller: me).ino
        let written = try big.withUnsafeBytes { try fs.write(ino, offset: 0, data: $0, caller: me, clearSetIDAsked: false).written }
        XCTAssertEqual(written, big.count, "stored whole over 236 scattered free pages and fresh ones")
        XCTAssertEqual(try fs.bytes(of: ino, count: big.count), big)
    }
    /// Writers that each find the reserve empty charge a batch each at once (the stress test saw
    /// 112 pages charged with nothing stored): once they are done the reserve is back at its limit.
    func testConcurrentChargesLeaveNoMoreThanTheReserve() throws {
        let (fs, gate) = try gatedFileSystem()
        let me = self.me
        let writers = 4
        var files: [InodeNumber] = []
        for i in 0..<writers {
            files.append(try fs.create(parent: InodeNumber.root, name: Array("w\(i)".utf8), mode: 0o100644, caller: me).ino)
        }
        let done = DispatchSemaphore(value: 0)
        let page = [UInt8](repeating: 7, count: PageSize.bytes)
        for ino in files {
            Thread.detachNewThread {
                _ = page.withUnsafeBytes { try? fs.write(ino, offset: 0, data: $0, caller: me, clearSetIDAsked: false) }
                done.signal()
            }
        }
        let deadline = Date().addingTimeInterval(5)
        while gate.chargesWaiting < writers && Date() < deadline { usleep(1000) }
        XCTAssertEqual(gate.chargesWaiting, writers, "every writer charges a batch of its own")
        gate.open()
        for _ in 0..<writers { XCTAssertEqual(done.wait(timeout: .now() + 10), .success) }
        let page4K = Int64(PageSize.bytes)
        XCTAssertEqual(fs.storedBytes().used, Int64(writers) * page4K)
        XCTAssertLessThanOrEqual(fs.storedBytes().charged, Int64(writers + PageStore.reserveLimit) * page4K,
                                 "the batches charged at once are trimmed back to one reserve")
        for ino in files { fs.release(ino) }
        for i in 0..<writers { try fs.unlink(parent: InodeNumber.root, name: Array("w\(i)".utf8)) }
        XCTAssertEqual(fs.storedBytes().used, 0)
        XCTAssertLessThanOrEqual(fs.storedBytes().charged, Int64(PageStore.reserveLimit) * page4K)
    }
}
