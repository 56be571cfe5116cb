import Glibc
import SystemPackage
import XCTest
@testable import ChargeFS

/// The kernel's passthrough backing ids across a takeover: they belong to the FUSE connection
/// and outlive the server, so the state says which id a live passthrough open names and the
/// successor's registry takes them over (docs/takeover.md).
final class TakeoverPassthroughTests: XCTestCase {
    let me = Caller(uid: 1000, gid: 1000)
    let root = FileSystem.rootIno

    func config() -> FileSystemConfig {
        var c = FileSystemConfig()
        c.maxBytes = 1 << 30
        c.caching = .direct
        return c
    }

    func takeOver(_ fs: inout FileSystem, _ keeper: InProcessKeeper) throws -> FileSystem {
        fs = FileSystem(config: config(), store: try PageStore(capacityPages: 4) { DaemonCharger(arena: $0) })
        let arena = try Arena(adopting: try XCTUnwrap(keeper.descriptor(.arena)), tmpfsRoot: keeper.descriptor(.arenaRoot), backing: .memfd)
        let files = try StateFiles.adopt(journal: try XCTUnwrap(keeper.descriptor(.journal)),
                                         checkpoints: [try XCTUnwrap(keeper.descriptor(.checkpoint(0))),
                                                       try XCTUnwrap(keeper.descriptor(.checkpoint(1)))])
        let taken = try FileSystem(takingOver: files, keeper: keeper, config: config()) {
            PageStore(adopting: arena, charger: DaemonCharger(arena: arena.fileDescriptor), inUse: $0, backingPages: $1)
        }
        taken.noteKernelPassthrough(true)
        return taken
    }

    func testBackingIdsOfLiveOpensAreKept() throws {
        let keeper = InProcessKeeper()
        let arena = try Arena(capacityPages: 1 << 20)
        let store = PageStore(arena: arena, charger: DaemonCharger(arena: arena.fileDescriptor))
        var fs = try FileSystem(config: config(), store: store, state: try StateFiles.create(), keeper: keeper)
        fs.noteKernelPassthrough(true)
        try XCTSkipUnless(keeper.descriptor(.arenaRoot) != nil, "backing files need the arena's private tmpfs (root)")
        let big = try fs.mknod(parent: root, name: Array("big".utf8), mode: 0o100644, rdev: 0, caller: me).ino
        let chunk = [UInt8](repeating: 9, count: 128 << 10)
        for i in 0..<24 {
            _ = try chunk.withUnsafeBytes { try fs.write(big, offset: Int64(i * chunk.count), data: $0, caller: me, clearSetIDAsked: false) }
        }
        let readOnly = OpenFlags(rawValue: O_RDONLY)
        let first = try fs.open(big, flags: readOnly, caller: me, clearSetIDAsked: false)
        XCTAssertNotNil(first.passthrough, "a large read-only open passes through")
        fs.notePassthroughID(big, 7)  // what the registry got from FUSE_DEV_IOC_BACKING_OPEN
        _ = try fs.open(big, flags: readOnly, caller: me, clearSetIDAsked: false)
        fs.notePassthroughID(big, 7)  // the second open names the same id: nothing recorded
        XCTAssertEqual(fs.passthroughRegistrations[big]?.id, 7)

        fs = try takeOver(&fs, keeper)
        let kept = fs.passthroughRegistrations
        XCTAssertEqual(kept.count, 1)
        XCTAssertEqual(kept[big]?.id, 7, "the successor knows which id names which file")
        XCTAssertEqual(kept[big]?.opens, 2)

        // The successor's registry takes them over: the first release keeps the id, the last
        // lets it go (its ioctl goes to the device given, /dev/null here: refused, harmless).
        let null = open("/dev/null", O_RDONLY | O_CLOEXEC)
        defer { close(null) }
        let device = try XCTUnwrap(PassthroughRegistry.Device(sessionFD: null))
        let registry = PassthroughRegistry(device: device, adopting: kept)
        XCTAssertEqual(registry.registered, [big: 7])
        fs.release(big, passthrough: true)
        registry.released(big)
        XCTAssertEqual(registry.registered, [big: 7])
        XCTAssertEqual(fs.passthroughRegistrations[big]?.opens, 1)
        fs.release(big, passthrough: true)
        registry.released(big)
        XCTAssertEqual(registry.registered, [:])
        XCTAssertNil(fs.passthroughRegistrations[big], "the last passthrough release ends the registration")

        // And that too survives: no id is handed to the next successor.
        fs = try takeOver(&fs, keeper)
        XCTAssertTrue(fs.passthroughRegistrations.isEmpty)
    }
}
