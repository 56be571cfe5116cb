import CFuse
import Glibc
import Synchronization
import XCTest
@testable import ChargeFS

/// The takeover's seam, in-process: a saved INIT fed to a fresh session (no mount) through
/// `FuseSession.process`, its reply patched by `FuseKernelFeatures` as on a real connection,
/// then requests for node ids the session never handed out. The "kernel" is a socket.
final class InitReplayTests: XCTestCase {
    func request<T>(opcode: fuse_opcode, unique: UInt64, nodeid: UInt64, _ argument: T) -> [UInt8] {
        var header = fuse_in_header()
        header.len = UInt32(MemoryLayout<fuse_in_header>.size + MemoryLayout<T>.size)
        header.opcode = opcode.rawValue
        header.unique = unique
        header.nodeid = nodeid
        return withUnsafeBytes(of: header) { Array($0) } + withUnsafeBytes(of: argument) { Array($0) }
    }

    /// One reply as the kernel would read it: the out header and the bytes after it.
    func reply(from fd: Int32) -> (header: fuse_out_header, body: [UInt8])? {
        var buffer = [UInt8](repeating: 0, count: 65536)
        let n = recv(fd, &buffer, buffer.count, Int32(MSG_DONTWAIT))
        guard n >= MemoryLayout<fuse_out_header>.size else { return nil }
        let header = buffer.withUnsafeBytes { $0.loadUnaligned(as: fuse_out_header.self) }
        return (header, Array(buffer[MemoryLayout<fuse_out_header>.size..<n]))
    }

    func testSavedInitReplaysAndTheSessionServesExistingNodeIDs() throws {
        let store = try PageStore(capacityPages: 1 << 12) { DaemonCharger(arena: $0) }
        let fs = FileSystem(config: FileSystemConfig(), store: store)
        let file = try fs.mknod(parent: .root, name: Array("kept".utf8), mode: 0o100644, rdev: 0, caller: .root)
        let session = FuseSession(fileSystem: fs)
        XCTAssertTrue(session.start(arguments: ["chargefsd"]))
        var pair: [Int32] = [-1, -1]
        XCTAssertEqual(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue), 0, &pair), 0)
        defer { close(pair[1]) }  // pair[0] is the session's, closed with it
        defer { if let handle = session.handle { fuse_session_destroy(handle) } }
        XCTAssertTrue(FuseKernelFeatures.install(on: session, fd: pair[0]))

        var initIn = fuse_init_in()
        initIn.major = UInt32(FUSE_KERNEL_VERSION)
        initIn.minor = 38
        initIn.max_readahead = 1 << 20
        initIn.flags = UInt32(FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_HANDLE_KILLPRIV_V2 | FUSE_INIT_EXT | FUSE_MAX_PAGES)
        var saved = request(opcode: FUSE_INIT, unique: 2, nodeid: 0, initIn)
        saved.withUnsafeMutableBytes { session.process(request: $0) }
        let initReply = try XCTUnwrap(reply(from: pair[1]), "INIT is answered through the hooks")
        XCTAssertEqual(initReply.header.error, 0)
        let out = FuseKernelFeatures.prefix(of: initReply.body.withUnsafeBytes { UnsafeRawBufferPointer($0) }, as: FuseKernelFeatures.InitOut())
        XCTAssertNotEqual(out.flags & UInt32(FUSE_HANDLE_KILLPRIV_V2), 0, "the patch ran on the replayed INIT")
        XCTAssertTrue(session.features.granted)

        var getattrIn = fuse_getattr_in()
        var get = request(opcode: FUSE_GETATTR, unique: 3, nodeid: file.ino.rawValue, getattrIn)
        get.withUnsafeMutableBytes { session.process(request: $0) }
        let attr = try XCTUnwrap(reply(from: pair[1]))
        XCTAssertEqual(attr.header.error, 0, "a node id this session never looked up is served")
        let attrOut = attr.body.withUnsafeBytes { $0.loadUnaligned(as: fuse_attr_out.self) }
        XCTAssertEqual(attrOut.attr.ino, file.ino.rawValue)
        getattrIn.fh = 0
        var missing = request(opcode: FUSE_GETATTR, unique: 4, nodeid: 999, getattrIn)
        missing.withUnsafeMutableBytes { session.process(request: $0) }
        XCTAssertEqual(try XCTUnwrap(reply(from: pair[1])).header.error, -ENOENT)
    }

    /// A first server's INIT is saved once its reply is written; a successor's replay of it
    /// writes nothing (the kernel had its answer) and still sets the session up.
    func testInitIsSavedWhenAnsweredAndItsReplayWritesNothing() throws {
        var initIn = fuse_init_in()
        initIn.major = UInt32(FUSE_KERNEL_VERSION)
        initIn.minor = 38
        initIn.max_readahead = 1 << 20
        initIn.flags = UInt32(FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_HANDLE_KILLPRIV_V2 | FUSE_INIT_EXT | FUSE_MAX_PAGES)
        initIn.flags2 = UInt32(truncatingIfNeeded: FuseKernelFeatures.hasResend >> 32)
        let initRequest = request(opcode: FUSE_INIT, unique: 2, nodeid: 0, initIn)

        func session() throws -> (FuseSession, Int32, [Int32]) {
            let store = try PageStore(capacityPages: 1 << 12) { DaemonCharger(arena: $0) }
            let s = FuseSession(fileSystem: FileSystem(config: FileSystemConfig(), store: store))
            XCTAssertTrue(s.start(arguments: ["chargefsd"]))
            var pair: [Int32] = [-1, -1]
            XCTAssertEqual(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue), 0, &pair), 0)
            XCTAssertTrue(FuseKernelFeatures.install(on: s, fd: pair[0]))
            return (s, pair[1], pair)
        }

        // The first server: INIT read through the hooks (as the transport reads it), answered.
        let (first, kernel1, _) = try session()
        defer { close(kernel1); if let h = first.handle { fuse_session_destroy(h) } }
        let saved = Mutex<[UInt8]?>(nil)
        first.initAnswered = { bytes in saved.withLock { $0 = bytes } }
        var bytes = initRequest
        bytes.withUnsafeMutableBytes { first.process(request: $0) }
        XCTAssertEqual(try XCTUnwrap(reply(from: kernel1)).header.error, 0)
        XCTAssertEqual(saved.withLock { $0 }, initRequest, "the INIT request is saved once answered")
        XCTAssertTrue(first.features.kernelOffersResend)

        // The successor: the saved INIT replayed, nothing written, the session serves.
        let (successor, kernel2, _) = try session()
        defer { close(kernel2); if let h = successor.handle { fuse_session_destroy(h) } }
        successor.replayInit(try XCTUnwrap(saved.withLock { $0 }))
        XCTAssertNil(reply(from: kernel2), "the replayed INIT's reply is dropped")
        XCTAssertTrue(successor.features.granted, "the INIT patch ran on the replay")
        var get = request(opcode: FUSE_GETATTR, unique: 3 | FuseKernelFeatures.resentBit, nodeid: 1, fuse_getattr_in())
        get.withUnsafeMutableBytes { successor.process(request: $0) }
        let attr = try XCTUnwrap(reply(from: kernel2), "requests after the replay are answered")
        XCTAssertEqual(attr.header.error, 0)
        XCTAssertEqual(successor.features.resent.load(ordering: .relaxed), 1, "a resent request is counted")
    }
}
