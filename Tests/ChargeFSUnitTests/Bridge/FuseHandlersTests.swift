import CFuse
import Glibc
import SystemPackage
import XCTest
@testable import ChargeFS

/// The Bridge driven in-process, without a mount: each handler gets a recording reply (the
/// seam in `Reply`), so what the kernel would receive is checked as values: one answer per
/// request, errno values, negative entries, xattr sizes, the root's transport attributes.
final class FuseHandlersTests: XCTestCase {
    var session: FuseSession!
    let me = Caller(uid: 1000, gid: 1000)
    let root = fuse_ino_t(FileSystem.rootIno.rawValue)

    override func setUpWithError() throws {
        let store = try PageStore(capacityPages: 1 << 16) { DaemonCharger(arena: $0) }
        var config = FileSystemConfig()
        config.maxBytes = 1 << 26
        session = FuseSession(fileSystem: FileSystem(config: config, store: store))
    }

    /// Runs one handler and returns the one answer it gave (fails if it gave none or several).
    func answer(caller: Caller? = nil, clearsSetID: Bool = false,
                _ handler: (FuseSession, consuming Reply) -> Void, file: StaticString = #filePath, line: UInt = #line) -> ReplyRecorder.Answer? {
        let recorder = ReplyRecorder(caller: caller ?? me, clearsSetID: clearsSetID)
        handler(session, Reply(recording: recorder))
        XCTAssertEqual(recorder.answers.count, 1, "one answer per request: \(recorder.answers)", file: file, line: line)
        return recorder.answers.first
    }

    func withName<T>(_ name: String, _ body: (UnsafePointer<CChar>) -> T) -> T { name.withCString(body) }

    func entry(_ a: ReplyRecorder.Answer?, file: StaticString = #filePath, line: UInt = #line) -> Attributes? {
        guard case .entry(let attributes)? = a else { XCTFail("not an entry: \(String(describing: a))", file: file, line: line); return nil }
        return attributes
    }

    func errno(_ a: ReplyRecorder.Answer?) -> Errno? {
        if case .error(let e)? = a { return e }
        return nil
    }

    func testCreateLookupAndMissingNameAsNegativeEntry() throws {
        let made = withName("f") { n in answer { FuseHandlers.mknod($0, $1, parent: root, name: n, mode: 0o100644, rdev: 0) } }
        let attributes = try XCTUnwrap(entry(made))
        XCTAssertEqual(attributes.uid, 1000, "the reply's caller owns the new file")
        let found = withName("f") { n in answer { FuseHandlers.lookup($0, $1, parent: root, name: n) } }
        XCTAssertEqual(entry(found)?.ino, attributes.ino)
        let missing = withName("nope") { n in answer { FuseHandlers.lookup($0, $1, parent: root, name: n) } }
        guard case .entry(nil)? = missing else { return XCTFail("a missing name is a negative entry, got \(String(describing: missing))") }
    }

    func testErrnoReachesTheReply() {
        let a = withName("d") { n in answer { FuseHandlers.rmdir($0, $1, parent: root, name: n) } }
        XCTAssertEqual(errno(a), .noSuchFileOrDirectory)
        let dup = withName("x") { n -> ReplyRecorder.Answer? in
            _ = answer { FuseHandlers.mkdir($0, $1, parent: root, name: n, mode: 0o755) }
            return answer { FuseHandlers.mkdir($0, $1, parent: root, name: n, mode: 0o755) }
        }
        XCTAssertEqual(errno(dup), .fileExists)
        XCTAssertEqual(errno(answer { FuseHandlers.getattr($0, $1, ino: 999) }), .noSuchFileOrDirectory)
        XCTAssertEqual(errno(answer { FuseHandlers.lseek($0, $1, ino: root, offset: 0, whence: SEEK_SET) }), .invalidArgument,
                       "only SEEK_DATA and SEEK_HOLE reach a file system")
    }

    func testWriteThenReadThroughTheHandlers() throws {
        let ino = try XCTUnwrap(entry(withName("data") { n in answer { FuseHandlers.mknod($0, $1, parent: root, name: n, mode: 0o100644, rdev: 0) } })).ino
        let bytes: [UInt8] = Array(0..<200).map { UInt8($0) }
        let wrote = bytes.withUnsafeBytes { b in
            answer { FuseHandlers.write($0, $1, ino: fuse_ino_t(ino.rawValue), buf: b.baseAddress?.assumingMemoryBound(to: CChar.self),
                                        size: b.count, offset: 5000, fi: nil) }
        }
        guard case .written(200)? = wrote else { return XCTFail("written: \(String(describing: wrote))") }
        let read = answer { FuseHandlers.read($0, $1, ino: fuse_ino_t(ino.rawValue), size: 300, offset: 4990, fi: nil) }
        guard case .bytes(let got)? = read else { return XCTFail("read: \(String(describing: read))") }
        XCTAssertEqual(got, [UInt8](repeating: 0, count: 10) + bytes, "a hole reads as zeros, then the data")
    }

    func testXattrSizeRangeAndTransportAttributes() {
        let ino = root
        withName("user.a") { n in
            "hello".withCString { v in _ = answer { FuseHandlers.setxattr($0, $1, ino: ino, name: n, value: v, size: 5, flags: 0) } }
            guard case .xattrSize(5)? = answer({ FuseHandlers.getxattr($0, $1, ino: ino, name: n, size: 0) }) else {
                return XCTFail("size 0 asks for the size")
            }
            XCTAssertEqual(errno(answer { FuseHandlers.getxattr($0, $1, ino: ino, name: n, size: 2) }), Errno(rawValue: ERANGE))
            guard case .bytes(let value)? = answer({ FuseHandlers.getxattr($0, $1, ino: ino, name: n, size: 64) }) else {
                return XCTFail("the value")
            }
            XCTAssertEqual(value, Array("hello".utf8))
        }
        let status = withName("user.chargefs.status") { n in answer { FuseHandlers.getxattr($0, $1, ino: ino, name: n, size: 4096) } }
        guard case .bytes(let text)? = status else { return XCTFail("status: \(String(describing: status))") }
        let lines = String(decoding: text, as: UTF8.self).split(separator: "\n")
        XCTAssertTrue(lines.contains("charger=daemon"), "the tree's lines")
        XCTAssertEqual(lines.last, "transport=dev-fuse", "then the transport's")
        var header = fuse_in_header()
        header.opcode = FUSE_LOOKUP.rawValue
        withUnsafeBytes(of: &header) { session.requests.count(request: $0.baseAddress, length: $0.count) }
        let requests = withName("user.chargefs.requests") { n in answer { FuseHandlers.getxattr($0, $1, ino: ino, name: n, size: 4096) } }
        guard case .bytes(let counted)? = requests else { return XCTFail("requests") }
        XCTAssertEqual(String(decoding: counted, as: UTF8.self), "LOOKUP=1\n", "the transport's counts, not the tree's")
    }

    func testReaddirListsInTheKernelsLayout() throws {
        for name in ["a", "bb"] {
            _ = withName(name) { n in answer { FuseHandlers.mknod($0, $1, parent: root, name: n, mode: 0o100644, rdev: 0) } }
        }
        let listed = answer { FuseHandlers.readdir($0, $1, ino: root, size: 4096, offset: 0, plus: false) }
        guard case .bytes(let buffer)? = listed else { return XCTFail("readdir: \(String(describing: listed))") }
        // struct fuse_dirent: ino, off, namelen, type, then the name, padded to 8 bytes.
        var names: [String] = []
        var at = 0
        while at + 24 <= buffer.count {
            let length = buffer[at + 16..<at + 20].withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) }
            names.append(String(decoding: buffer[at + 24..<at + 24 + Int(length)], as: UTF8.self))
            at += (24 + Int(length) + 7) & ~7
        }
        XCTAssertEqual(names, [".", "..", "a", "bb"])
        let tiny = answer { FuseHandlers.readdir($0, $1, ino: root, size: 10, offset: 0, plus: false) }
        guard case .bytes(let none)? = tiny else { return XCTFail("a buffer too small for one entry") }
        XCTAssertEqual(none, [], "no entry fits: an empty answer, not an error")
    }

    func testStatfsAnswersPageBlocks() {
        guard case .statfs(let st)? = answer({ FuseHandlers.statfs($0, $1) }) else { return XCTFail("statfs") }
        XCTAssertEqual(Int(st.f_bsize), PageSize.bytes)
        XCTAssertEqual(Int(st.f_blocks), (1 << 26) / PageSize.bytes, "size= in pages")
        XCTAssertEqual(Int(st.f_namemax), 255)
    }

    func testADroppedReplyAnswersEIO() {
        let recorder = ReplyRecorder()
        do { _ = Reply(recording: recorder) }
        guard case .error(.ioError)? = recorder.answers.first, recorder.answers.count == 1 else {
            return XCTFail("a reply dropped unanswered answers EIO once: \(recorder.answers)")
        }
    }
}
