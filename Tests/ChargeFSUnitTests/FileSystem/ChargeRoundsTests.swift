import Dispatch
import Foundation
import Synchronization
import XCTest
@testable import ChargeFS

/// An operation short of charged pages charges with no lock held, so other writers may take
/// the reserve's pages between its charge and its run. A charger that always has room must
/// never make it fail for that.
final class ChargeRoundsTests: XCTestCase {
    let me = Caller(uid: 1000, gid: 1000)

    /// fsstress beside fsx on one mount: 4-7 of 1,485 fallocates of 1-8 MB answered ENOSPC,
    /// each after all of its rounds came back short. Here a writer appends 1 MiB during each of
    /// the fallocate's charges.
    func testAnFallocateBesideAWriterIsNotRefusedWhileTheChargerHasRoom() throws {
        var made: FakeCharger?
        var config = FileSystemConfig()
        config.maxBytes = 1 << 30
        let store = try PageStore(capacityPages: 1 << 18) { arena in
            let charger = FakeCharger(arena: arena)
            made = charger
            return charger
        }
        let fs = FileSystem(config: config, store: store)
        let charger = try XCTUnwrap(made)
        let me = self.me
        let big = try fs.create(parent: .root, name: Array("big".utf8), mode: 0o100644, caller: me).ino
        let writer = try fs.create(parent: .root, name: Array("writer".utf8), mode: 0o100644, caller: me).ino

        // Pages waiting in the reserve, which the fallocate counts on and the writer takes.
        let freed = try fs.create(parent: .root, name: Array("freed".utf8), mode: 0o100644, caller: me).ino
        let reserve = [UInt8](repeating: 1, count: PageStore.reserveLimit * PageSize.bytes)
        _ = try reserve.withUnsafeBytes { try fs.write(freed, offset: 0, data: $0, caller: me, clearSetIDAsked: false) }
        try fs.unlink(parent: .root, name: Array("freed".utf8))
        fs.forget(freed, count: 1)  // the create's lookup: its pages are freed now

        let writing = Atomic<Bool>(false)
        let appended = Atomic<Int>(0)
        charger.duringCharge = {
            // Not from the writer's own charge.
            guard writing.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged else { return }
            let done = DispatchSemaphore(value: 0)
            Thread.detachNewThread {
                let chunk = [UInt8](repeating: 0x5A, count: 256 * PageSize.bytes)
                let offset = Int64(appended.load(ordering: .relaxed) * PageSize.bytes)
                let n = chunk.withUnsafeBytes { try? fs.write(writer, offset: offset, data: $0, caller: me, clearSetIDAsked: false).written }
                if n == chunk.count { appended.add(256, ordering: .relaxed) }
                writing.store(false, ordering: .releasing)
                done.signal()
            }
            // The writer waits for the tree lock when this charge holds it: go on without it.
            _ = done.wait(timeout: .now() + .milliseconds(200))
        }

        let pages = 2048
        XCTAssertNoThrow(try fs.fallocate(big, mode: .allocate, offset: 0, length: Int64(pages * PageSize.bytes), caller: me),
                         "the charger never refused: no ENOSPC")
        charger.duringCharge = nil
        let deadline = Date().addingTimeInterval(5)
        while writing.load(ordering: .acquiring) && Date() < deadline { usleep(1000) }
        let attributes = try fs.getattr(big)
        XCTAssertEqual(attributes.size, Int64(pages * PageSize.bytes))
        XCTAssertEqual(attributes.blocks, Int64(pages * PageSize.bytes / 512), "every page allocated")
        XCTAssertGreaterThanOrEqual(appended.load(ordering: .relaxed), 256 * (FileSystem.chargeRounds - 1),
                                    "the writer wrote during every round charged with no lock held")
        XCTAssertEqual(try fs.bytes(of: writer, count: appended.load(ordering: .relaxed) * PageSize.bytes),
                       [UInt8](repeating: 0x5A, count: appended.load(ordering: .relaxed) * PageSize.bytes))
    }
}
