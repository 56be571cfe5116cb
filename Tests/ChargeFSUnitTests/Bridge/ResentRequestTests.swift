import CFuse
import Glibc
import SystemPackage
import XCTest
@testable import ChargeFS

/// Requests the kernel resends after a takeover (FUSE_NOTIFY_RESEND: bit 63 of `unique` set),
/// driven through the Bridge's handlers in-process (`Reply(recording:)`, with the unique and
/// opcode the read hook would have noted): a request the dead server applied gets the answer it
/// got then, through the whole path (handler, `FuseHandlers.context`, the file system's kept
/// answers), and is not applied twice.
final class ResentRequestTests: XCTestCase {
    let me = Caller(uid: 1000, gid: 1000)
    let root = fuse_ino_t(FileSystem.rootIno.rawValue)

    func config() -> FileSystemConfig {
        var config = FileSystemConfig()
        config.maxBytes = 1 << 28
        config.noatime = true
        return config
    }

    func makeKept() throws -> (FuseSession, InProcessKeeper) {
        let keeper = InProcessKeeper()
        let arena = try Arena(capacityPages: 1 << 16)
        let store = PageStore(arena: arena, charger: DaemonCharger(arena: arena.fileDescriptor))
        let fs = try FileSystem(config: config(), store: store, state: try StateFiles.create(), keeper: keeper)
        return (FuseSession(fileSystem: fs), keeper)
    }

    /// A successor's session, from the keeper's descriptors alone (the old session is dropped
    /// first, with no cleanup: what a kill -9 leaves).
    func takeOver(_ keeper: InProcessKeeper) throws -> FuseSession {
        let arena = try Arena(adopting: try XCTUnwrap(keeper.descriptor(.arena)), tmpfsRoot: keeper.descriptor(.arenaRoot), backing: .memfd)
        let files = try StateFiles.adopt(journal: try XCTUnwrap(keeper.descriptor(.journal)),
                                         checkpoints: [try XCTUnwrap(keeper.descriptor(.checkpoint(0))),
                                                       try XCTUnwrap(keeper.descriptor(.checkpoint(1)))])
        let fs = try FileSystem(takingOver: files, keeper: keeper, config: config()) {
            PageStore(adopting: arena, charger: DaemonCharger(arena: arena.fileDescriptor), inUse: $0, backingPages: $1)
        }
        return FuseSession(fileSystem: fs)
    }

    /// One handler run as request `unique` with `opcode`; its one answer.
    func answer(_ s: FuseSession, _ unique: UInt64, _ opcode: fuse_opcode, _ handler: (FuseSession, consuming Reply) -> Void,
                file: StaticString = #filePath, line: UInt = #line) -> ReplyRecorder.Answer? {
        let recorder = ReplyRecorder(caller: me, unique: unique, opcode: opcode.rawValue)
        handler(s, Reply(recording: recorder))
        XCTAssertEqual(recorder.answers.count, 1, "one answer per request: \(recorder.answers)", file: file, line: line)
        return recorder.answers.first
    }

    func resend(_ unique: UInt64) -> UInt64 { unique | RequestContext.resendBit }

    /// The answer as text (Answer is not Equatable: it carries statvfs).
    func text(_ a: ReplyRecorder.Answer?) -> String { String(describing: a) }

    func testResentChangesGetTheirFirstAnswersAfterATakeover() throws {
        var (s, keeper) = try makeKept()
        let fi = UnsafeMutablePointer<fuse_file_info>.allocate(capacity: 1)
        defer { fi.deallocate() }
        fi.initialize(to: fuse_file_info())
        fi.pointee.flags = O_WRONLY | O_CREAT | O_EXCL

        // What the dead server applied and answered (its answers never reached the callers).
        let mkdir = "d".withCString { n in answer(s, 100, FUSE_MKDIR) { FuseHandlers.mkdir($0, $1, parent: root, name: n, mode: 0o755) } }
        guard case .entry(let dir?)? = mkdir else { return XCTFail("mkdir: \(text(mkdir))") }
        _ = "victim".withCString { n in answer(s, 101, FUSE_MKNOD) { FuseHandlers.mknod($0, $1, parent: root, name: n, mode: 0o100644, rdev: 0) } }
        let unlink = "victim".withCString { n in answer(s, 102, FUSE_UNLINK) { FuseHandlers.unlink($0, $1, parent: root, name: n) } }
        let create = "excl".withCString { n in
            answer(s, 103, FUSE_CREATE) { FuseHandlers.create($0, $1, parent: root, name: n, mode: 0o100600, fi: fi) }
        }
        guard case .created(let made)? = create else { return XCTFail("create: \(text(create))") }
        _ = "from".withCString { n in answer(s, 104, FUSE_MKNOD) { FuseHandlers.mknod($0, $1, parent: root, name: n, mode: 0o100644, rdev: 0) } }
        let rename = "from".withCString { n in
            "to".withCString { t in answer(s, 105, FUSE_RENAME2) { FuseHandlers.rename($0, $1, parent: root, name: n, newParent: root, newName: t, flags: 0) } }
        }
        let line = Array("appended\n".utf8)
        let ino = fuse_ino_t(made.ino.rawValue)
        func append(_ s: FuseSession, _ unique: UInt64) -> ReplyRecorder.Answer? {
            line.withUnsafeBytes { b in
                // O_APPEND: the kernel sends the offset it appends at (i_size when sent).
                answer(s, unique, FUSE_WRITE) { FuseHandlers.write($0, $1, ino: ino, buf: b.baseAddress?.assumingMemoryBound(to: CChar.self),
                                                                   size: b.count, offset: 0, fi: nil) }
            }
        }
        let appended = append(s, 106)
        guard case .written(9)? = appended else { return XCTFail("append: \(text(appended))") }
        let before = try s.fileSystem.getattr(made.ino)

        // kill -9: the session and file system go with no cleanup; a successor takes over.
        s = FuseSession(fileSystem: FileSystem(config: config(), store: try PageStore(capacityPages: 4) { DaemonCharger(arena: $0) }))
        s = try takeOver(keeper)

        let mkdir2 = "d".withCString { n in answer(s, resend(100), FUSE_MKDIR) { FuseHandlers.mkdir($0, $1, parent: root, name: n, mode: 0o755) } }
        XCTAssertEqual(text(mkdir2), text(mkdir), "a resent mkdir answers its entry, not EEXIST")
        let unlink2 = "victim".withCString { n in answer(s, resend(102), FUSE_UNLINK) { FuseHandlers.unlink($0, $1, parent: root, name: n) } }
        XCTAssertEqual(text(unlink2), text(unlink), "a resent unlink answers success, not ENOENT")
        let create2 = "excl".withCString { n in
            answer(s, resend(103), FUSE_CREATE) { FuseHandlers.create($0, $1, parent: root, name: n, mode: 0o100600, fi: fi) }
        }
        XCTAssertEqual(text(create2), text(create), "a resent create with O_EXCL answers the file it made, not EEXIST")
        let rename2 = "from".withCString { n in
            "to".withCString { t in answer(s, resend(105), FUSE_RENAME2) { FuseHandlers.rename($0, $1, parent: root, name: n, newParent: root, newName: t, flags: 0) } }
        }
        XCTAssertEqual(text(rename2), text(rename), "a resent rename answers success, not ENOENT")
        XCTAssertEqual(text(append(s, resend(106))), text(appended))
        let after = try s.fileSystem.getattr(made.ino)
        XCTAssertEqual(after.size, 9, "the append is not written twice")
        XCTAssertEqual(after.ctime.tv_sec * 1_000_000_000 + after.ctime.tv_nsec, before.ctime.tv_sec * 1_000_000_000 + before.ctime.tv_nsec,
                       "the resent write changed nothing (not even the times)")
        XCTAssertEqual(try s.fileSystem.getattr(dir.ino).generation, dir.generation)

        // Not resent (bit 63 clear), or resent but with another opcode than the handler's (a
        // stale note on the thread): served as new requests, so the errors come back.
        let again = "d".withCString { n in answer(s, 200, FUSE_MKDIR) { FuseHandlers.mkdir($0, $1, parent: root, name: n, mode: 0o755) } }
        XCTAssertEqual(text(again), text(ReplyRecorder.Answer.error(.fileExists)))
        let stale = "victim".withCString { n in answer(s, resend(102), FUSE_RMDIR) { FuseHandlers.unlink($0, $1, parent: root, name: n) } }
        XCTAssertEqual(text(stale), text(ReplyRecorder.Answer.error(.noSuchFileOrDirectory)))
    }

    /// A resent release says what the first said: the last open (the Bridge then drops the page
    /// cache a mapping left), not "another open remains".
    func testResentReleaseAnswersTheLastOpen() throws {
        var (s, keeper) = try makeKept()
        let made = try s.fileSystem.create(parent: FileSystem.rootIno, name: Array("f".utf8), mode: 0o100644, caller: me)
        XCTAssertTrue(s.fileSystem.release(made.ino, request: RequestContext(unique: 7, opcode: FUSE_RELEASE.rawValue)))
        s = FuseSession(fileSystem: FileSystem(config: config(), store: try PageStore(capacityPages: 4) { DaemonCharger(arena: $0) }))
        s = try takeOver(keeper)
        XCTAssertTrue(s.fileSystem.release(made.ino, request: RequestContext(unique: resend(7), opcode: FUSE_RELEASE.rawValue)),
                      "the resend answers the last open, as the first did")
        // The open count was not taken down twice: a new open and its release are the last again.
        _ = try s.fileSystem.open(made.ino, flags: OpenFlags(rawValue: O_RDONLY), caller: me, clearSetIDAsked: false)
        XCTAssertTrue(s.fileSystem.release(made.ino))
    }

    /// Without kept state the Bridge passes no request: a "resend" is served as new.
    func testNoStateNoAnswersKept() throws {
        let store = try PageStore(capacityPages: 1 << 12) { DaemonCharger(arena: $0) }
        let s = FuseSession(fileSystem: FileSystem(config: config(), store: store))
        XCTAssertFalse(s.fileSystem.keepsState)
        let first = "d".withCString { n in answer(s, 1, FUSE_MKDIR) { FuseHandlers.mkdir($0, $1, parent: root, name: n, mode: 0o755) } }
        guard case .entry(_?)? = first else { return XCTFail("mkdir: \(text(first))") }
        let second = "d".withCString { n in answer(s, resend(1), FUSE_MKDIR) { FuseHandlers.mkdir($0, $1, parent: root, name: n, mode: 0o755) } }
        XCTAssertEqual(text(second), text(ReplyRecorder.Answer.error(.fileExists)))
    }
}
