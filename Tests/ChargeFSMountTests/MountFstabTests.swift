// mount(8) integration: `mount -t fuse.chargefsd` and an fstab line, both through mount.fuse3,
// which runs `chargefsd SOURCE MNT -o OPTS` from PATH. mount(8) does not hand our PATH to the
// helper, so a symlink /usr/local/sbin/chargefsd is installed for the duration of each test
// (skipped if something else already lives there) and removed in teardown.

import Foundation
import Glibc
import XCTest

final class MountFstabTests: MountTestCase {
    override class var autoMount: Bool { false }
    static let link = "/usr/local/sbin/chargefsd"

    func installLink() throws {
        let bin = try Daemon.binaryPath()
        var st = StatBuf()
        if lstat(Self.link, &st) == 0 {
            let existing = (try? FS.readlink(Self.link)) ?? "(not a symlink)"
            guard existing == bin else { throw XCTSkip("\(Self.link) already exists (\(existing)); not touching it") }
        } else {
            try sys("symlink \(Self.link)", symlink(bin, Self.link))
        }
        addCleanup {
            if (try? FS.readlink(Self.link)) == bin { unlink(Self.link) }
        }
    }

    /// Cleans up whatever mount(8) started at `mnt`.
    func cleanupMount(_ mnt: String) throws {
        let logDir = try scratch.path
        Live.shared.add(mount: mnt)
        addCleanup {
            let pids = Daemon.pids(withArgument: mnt)
            Unmount.fuse(mnt, logDir: logDir)
            for pid in pids {
                if !waitGone(pid, timeout: 3) { kill(pid, SIGTERM) }
                if !waitGone(pid, timeout: 2) { kill(pid, SIGKILL) }
            }
            Live.shared.remove(mount: mnt)
        }
    }

    func testMountDashTFuseChargefsd() throws {
        try installLink()
        let mnt = try scratch.makeDir("viamount")
        try cleanupMount(mnt)
        let r = try Child.run(["/bin/mount", "-t", "fuse.chargefsd", "msrc", mnt, "-o", "size=3m,mode=0700,nr_inodes=77"],
                              logDir: try scratch.path, timeout: 15)
        XCTAssertEqual(r.code, 0, "mount -t fuse.chargefsd: \(r.err)")
        let e = try XCTUnwrap(MountTable.entries(at: mnt).last, "not mounted")
        XCTAssertEqual(e.fsType, "fuse.chargefsd")
        XCTAssertEqual(e.source, "msrc")
        let (_, s) = Sys.statfs(mnt)
        XCTAssertEqual(s.blocks * s.bsize, 3 << 20)
        XCTAssertEqual(s.files, 77)
        XCTAssertEqual(String(try FS.statOf(mnt).perm, radix: 8), "700")
        try FS.create(mnt + "/f", [1, 2, 3])
        XCTAssertEqual(try FS.contents(mnt + "/f"), [1, 2, 3])
        let pids = Daemon.pids(withArgument: mnt)
        XCTAssertEqual(pids.count, 1, "one daemon serves the mount")
        let u = try Child.run(["/bin/umount", mnt], logDir: try scratch.path)
        XCTAssertEqual(u.code, 0, u.err)
        for pid in pids { XCTAssertTrue(waitGone(pid, timeout: 5), "daemon survives umount") }
    }

    func testFstabLine() throws {
        try installLink()
        let mnt = try scratch.makeDir("viafstab")
        try cleanupMount(mnt)
        let fstab = try scratch.path + "/fstab"
        try Array("# test fstab\nfstabsrc \(mnt) fuse.chargefsd size=2m,nr_inodes=100,uid=123,gid=456,noauto,nosuid 0 0\n".utf8)
            .withUnsafeBytes { try Data($0).write(to: URL(fileURLWithPath: fstab)) }
        let r = try Child.run(["/bin/mount", "-T", fstab, mnt], logDir: try scratch.path, timeout: 15)
        XCTAssertEqual(r.code, 0, "mount -T fstab: \(r.err)")
        let e = try XCTUnwrap(MountTable.entries(at: mnt).last, "not mounted")
        XCTAssertEqual(e.fsType, "fuse.chargefsd")
        XCTAssertEqual(e.source, "fstabsrc")
        XCTAssertTrue(e.mountOptions.split(separator: ",").contains("nosuid"), e.mountOptions)
        let (_, s) = Sys.statfs(mnt)
        XCTAssertEqual(s.blocks * s.bsize, 2 << 20)
        XCTAssertEqual(s.files, 100)
        let st = try FS.statOf(mnt)
        XCTAssertEqual(st.st_uid, 123)
        XCTAssertEqual(st.st_gid, 456)
        let u = try Child.run(["/bin/umount", mnt], logDir: try scratch.path)
        XCTAssertEqual(u.code, 0, u.err)
        XCTAssertTrue(MountTable.entries(at: mnt).isEmpty)
    }

    func testMountHelperReportsBadOptions() throws {
        try installLink()
        let mnt = try scratch.makeDir("badopt")
        try cleanupMount(mnt)
        let before = Daemon.runningPids()
        let r = try Child.run(["/bin/mount", "-t", "fuse.chargefsd", "src", mnt, "-o", "size=lots"], logDir: try scratch.path, timeout: 15)
        XCTAssertNotEqual(r.code, 0)
        XCTAssertTrue(r.err.contains("lots") || r.err.contains("size"), "error names the option: \(r.err)")
        XCTAssertTrue(MountTable.entries(at: mnt).isEmpty)
        usleep(200_000)
        XCTAssertTrue(Daemon.runningPids().subtracting(before).isEmpty)
    }
}
