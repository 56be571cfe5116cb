// Small files that are mapped or executed (FileSystemCore+Mapped), in-process: which opens pass
// through, and that a move to another target takes such a file out of its backing file. Root
// only (backing files live on the arena's private tmpfs); what the kernel charges to whom is
// scripts/tests/targets.sh (mapped_* and use_case_3).

import Glibc
import SystemPackage
import XCTest
@testable import ChargeFS

final class MappedFileTests: XCTestCase {
    let me = Caller(uid: 0, gid: 0)
    let root = InodeNumber.root
    let readOnly = OpenFlags(rawValue: O_RDONLY)
    /// What execve's open of a program passes: O_RDONLY | O_LARGEFILE | __FMODE_EXEC.
    let execOpen = OpenFlags(rawValue: O_RDONLY | 0o100000 | 0x20)
    let memcg = FileSystem.memcgXattr

    override func setUpWithError() throws {
        try XCTSkipUnless(geteuid() == 0, "needs root: backing files live on the arena's private tmpfs (CAP_SYS_ADMIN)")
    }

    /// Every path is a target, charged to the daemon (the moves are what is tested here).
    final class DaemonTargets: ChargeTargets, @unchecked Sendable {
        func check(_ path: String, uid: UInt32, gid: UInt32, groups: [UInt32]) throws(Errno) -> String { path }
        func charger(for key: String, arena: FileDescriptor) throws(Errno) -> PageCharger { DaemonCharger(arena: arena) }
    }

    func makeFS(mapped: Bool = true) throws -> FileSystem {
        let store = try PageStore { DaemonCharger(arena: $0) }
        store.targets = DaemonTargets()
        return try passthroughFS(mapped: mapped, store: store)
    }

    func create(_ fs: FileSystem, _ name: String, in dir: InodeNumber? = nil, bytes: [UInt8]) throws -> InodeNumber {
        try fs.createFile(name, in: dir ?? root, mode: 0o100755, bytes: bytes, caller: me)
    }

    /// A small ELF object (a shared library's first bytes) and other small files.
    let elf: [UInt8] = [0x7f, 0x45, 0x4c, 0x46, 2, 1, 1] + [UInt8](repeating: 0xab, count: 20_000)
    let script: [UInt8] = Array("#!/bin/sh\necho hello\n".utf8) + [UInt8](repeating: 0x20, count: 9_000)

    func testMapAndExecOpensOfSmallFilesPassThrough() throws {
        let fs = try makeFS()
        let lib = try create(fs, "libx.so", bytes: elf)
        let text = try create(fs, "script", bytes: script)
        let opened = try fs.open(lib, flags: readOnly, caller: me, clearSetIDAsked: false)
        let file = try XCTUnwrap(opened.passthrough, "a loader's open of a 20 KB ELF file passes through")
        XCTAssertEqual(backingContents(file), elf, "the backing file holds the data")
        XCTAssertEqual(try fs.backingFileCount(), 1)
        fs.release(lib, passthrough: true)
        XCTAssertNil(try fs.open(text, flags: readOnly, caller: me, clearSetIDAsked: false).passthrough,
                     "a plain read-only open of a small file that is no ELF object stays in the arena")
        fs.release(text)
        let run = try fs.open(text, flags: execOpen, caller: me, clearSetIDAsked: false)
        XCTAssertNotNil(run.passthrough, "execve's open (__FMODE_EXEC) of a script passes through")
        fs.release(text, passthrough: true)
        XCTAssertNil(try fs.open(lib, flags: .readWrite, caller: me, clearSetIDAsked: false).passthrough, "a writer does not")
        fs.release(lib)
        // Reopened read-only: the backing file made before serves again.
        let again = try XCTUnwrap(try fs.open(lib, flags: readOnly, caller: me, clearSetIDAsked: false).passthrough)
        XCTAssertTrue(PassthroughFile.same(again, file))
        fs.release(lib, passthrough: true)
        XCTAssertEqual(try fs.contents(lib), elf)

        let off = try makeFS(mapped: false)
        let lib2 = try create(off, "libx.so", bytes: elf)
        XCTAssertNil(try off.open(lib2, flags: readOnly, caller: me, clearSetIDAsked: false).passthrough, "rule turned off")
    }

    /// A target set above a small file that got a backing file (mapped, then closed) moves its
    /// data into the new target's arena; with a passthrough open live, EBUSY and nothing moves;
    /// a rename across targets the same (EXDEV); mapped there, a backing file of that target's;
    /// -x brings it back to the mount's target.
    func testMovesTakeMappedFilesOutOfTheirBackingFiles() throws {
        let fs = try makeFS()
        let dir = try fs.mkdir(parent: root, name: Array("lib".utf8), mode: 0o755, caller: me).ino
        let lib = try create(fs, "libx.so", in: dir, bytes: elf)
        let used = fs.storedBytes().used
        let running = try XCTUnwrap(try fs.open(lib, flags: execOpen, caller: me, clearSetIDAsked: false).passthrough)
        _ = running
        XCTAssertThrowsError(try fs.setxattr(dir, name: memcg, value: Array("/cg/a".utf8), flags: [], caller: me)) {
            XCTAssertEqual($0 as? Errno, .resourceBusy, "a live passthrough open (a running program)")
        }
        XCTAssertThrowsError(try fs.getxattr(dir, name: memcg)) { XCTAssertEqual($0 as? Errno, .noData, "nothing changed") }
        let other = try fs.mkdir(parent: root, name: Array("other".utf8), mode: 0o755, caller: me).ino
        try fs.setxattr(other, name: memcg, value: Array("/cg/b".utf8), flags: [], caller: me)
        XCTAssertThrowsError(try fs.rename(parent: dir, name: Array("libx.so".utf8), newParent: other,
                                           newName: Array("libx.so".utf8), flags: [])) {
            XCTAssertEqual($0 as? Errno, Errno(rawValue: EXDEV))
        }
        fs.release(lib, passthrough: true)
        // The program ended: the move goes through and takes the file out of its backing file.
        try fs.setxattr(dir, name: memcg, value: Array("/cg/a".utf8), flags: [], caller: me)
        XCTAssertEqual(try fs.backingFileCount(), 0)
        XCTAssertEqual(fs.chargeTarget(2).pagesInUse, (elf.count + 4095) / 4096, "its pages are the new target's (index 2: /cg/b took 1)")
        XCTAssertEqual(fs.storedBytes().used, used, "stored bytes unchanged by the move")
        XCTAssertEqual(try fs.contents(lib), elf)
        // Mapped below a directory's own target: a backing file of that target's.
        let underA = try XCTUnwrap(try fs.open(lib, flags: readOnly, caller: me, clearSetIDAsked: false).passthrough,
                                   "below a directory's own target too")
        XCTAssertEqual(underA.backing.target, 2, "made and charged by the directory's target")
        XCTAssertEqual(fs.chargeTarget(2).pagesInUse, (elf.count + 4095) / 4096, "its pages still count as that target's")
        XCTAssertEqual(backingContents(underA), elf)
        fs.release(lib, passthrough: true)
        // Back to the mount's target: out of that backing file into the arena; mapped again, a
        // backing file of the mount's target; then a rename into the other target moves it out.
        try fs.removexattr(dir, name: memcg, caller: me)
        XCTAssertEqual(try fs.backingFileCount(), 0)
        XCTAssertEqual(fs.chargeTarget(0).pagesInUse, (elf.count + 4095) / 4096)
        XCTAssertEqual(fs.chargeTarget(2).cgroup, "", "the directory's target given back once nothing holds its pages")
        XCTAssertNotNil(try fs.open(lib, flags: readOnly, caller: me, clearSetIDAsked: false).passthrough)
        fs.release(lib, passthrough: true)
        XCTAssertEqual(try fs.backingFileCount(), 1)
        try fs.rename(parent: dir, name: Array("libx.so".utf8), newParent: other, newName: Array("libx.so".utf8), flags: [])
        XCTAssertEqual(try fs.backingFileCount(), 0)
        XCTAssertEqual(try fs.contents(lib), elf)
        XCTAssertEqual(fs.storedBytes().used, used)
    }
}
