import XCTest
@testable import ChargeFS

final class MountOptionsTests: XCTestCase {
    func testParsesTmpfsOptions() throws {
        let o = try MountOptions.parse(["src", "/mnt", "-o", "size=1G,nr_inodes=10k,mode=0755,uid=5,gid=6,memcg=/sys/fs/cgroup/pod,allow_other,noatime"])
        XCTAssertEqual(o.source, "src")
        XCTAssertEqual(o.mountpoint, "/mnt")
        XCTAssertEqual(o.sizeBytes, 1 << 30)
        XCTAssertEqual(o.maxInodes, 10 * 1024)
        XCTAssertEqual(o.rootMode, 0o755)
        XCTAssertEqual(o.rootUid, 5)
        XCTAssertEqual(o.rootGid, 6)
        XCTAssertEqual(o.memcg, "/sys/fs/cgroup/pod")
        XCTAssertTrue(o.noatime)
        XCTAssertTrue(o.fuseOptionList.contains("allow_other"))
        XCTAssertTrue(o.fsname.contains("memcg=/sys/fs/cgroup/pod"))
    }

    func testUpgradeCommand() throws {
        let o = try MountOptions.parse(["--upgrade", "/mnt/x"])
        XCTAssertEqual(o.upgradeMountpoint, "/mnt/x")
        XCTAssertThrowsError(try MountOptions.parse(["--upgrade"])) { error in
            XCTAssertTrue("\(error)".contains("--upgrade needs a mountpoint"))
        }
        XCTAssertNil(try MountOptions.parse(["/m"]).upgradeMountpoint)
    }

    func testCacheModes() throws {
        XCTAssertEqual(try MountOptions.parse(["/m"]).fileSystemConfig.caching, .automatic)
        XCTAssertEqual(try MountOptions.parse(["/m", "-o", "cache=page"]).fileSystemConfig.caching, .page)
        XCTAssertEqual(try MountOptions.parse(["/m", "-o", "cache=direct"]).fileSystemConfig.caching, .direct)
        XCTAssertEqual(try MountOptions.parse(["/m", "-o", "direct_io"]).fileSystemConfig.caching, .direct)
    }

    func testMemcgLimitPolicy() throws {
        XCTAssertEqual(try MountOptions.parse(["/m", "-o", "memcg=/sys/fs/cgroup/pod"]).memcgLimit, .high)
        XCTAssertEqual(try MountOptions.parse(["/m", "-o", "memcg=/sys/fs/cgroup/pod,memcg_limit=max"]).memcgLimit, .max)
        XCTAssertEqual(try MountOptions.parse(["/m", "-o", "memcg_limit=high"]).memcgLimit, .high)
    }

    func testIoUringChoice() throws {
        XCTAssertEqual(try MountOptions.parse(["/m"]).ioUring, .auto)
        XCTAssertEqual(try MountOptions.parse(["/m", "-o", "io_uring=on"]).ioUring, .on)
        XCTAssertEqual(try MountOptions.parse(["/m", "-o", "io_uring"]).ioUring, .on)
        XCTAssertEqual(try MountOptions.parse(["/m", "-o", "io_uring=off"]).ioUring, .off)
        XCTAssertEqual(try MountOptions.parse(["/m", "-o", "io_uring=auto"]).ioUring, .auto)
        XCTAssertFalse(try MountOptions.parse(["/m", "-o", "io_uring=on"]).fuseOptionList.contains("io_uring"),
                       "the kernel mount must not see it")
        XCTAssertThrowsError(try MountOptions.parse(["/m", "-o", "io_uring=yes"])) {
            XCTAssertEqual(($0 as? UsageError)?.description, "io_uring=yes: must be auto, on or off")
        }
    }

    func testSizeForms() throws {
        XCTAssertEqual(try MountOptions.parseSize("4096", option: "size"), 4096)
        XCTAssertEqual(try MountOptions.parseSize("2k", option: "size"), 2048)
        XCTAssertEqual(try MountOptions.parseSize("3M", option: "size"), 3 << 20)
        // tmpfs: RAM's pages times the percentage, rounded up to a page.
        let halfOfRAM = MountOptions.physicalPages * 4096 * 50 / 100
        XCTAssertEqual(try MountOptions.parseSize("50%", option: "size"), (halfOfRAM + 4095) / 4096 * 4096)
        XCTAssertEqual(try MountOptions.parse(["/m"]).effectiveMaxBytes, MountOptions.physicalPages / 2 * 4096)
        let zero = try MountOptions.parse(["/m", "-o", "size=0,nr_inodes=0"])
        XCTAssertNil(zero.effectiveMaxBytes)
        XCTAssertNil(zero.effectiveMaxInodes)
    }

    func testBadInputNamesTheProblem() {
        let cases: [([String], String)] = [
            (["/m", "-o", "size=12q"], "size=12q"),
            (["/m", "-o", "size=-1"], "size=-1"),
            (["/m", "-o", "size=99999999999e"], "too large"),
            (["/m", "-o", "mode=9"], "mode=9"),
            (["/m", "-o", "uid=bob"], "uid=bob"),
            (["/m", "-o", "bogus"], "unknown mount option 'bogus'"),
            (["/m", "-o", "memcg=relative"], "memcg=relative"),
            (["/m", "-o", "memcg_limit=soft"], "memcg_limit=soft: must be high or max"),
            (["/m", "-o", "memcg_limit"], "mount option 'memcg_limit' needs a value"),
            (["/m", "-o", "cache=automatic"], "cache=automatic: must be direct or page"),
            (["/m", "-o", "cache"], "mount option 'cache' needs a value"),
            (["/m", "-o"], "-o needs"),
            ([], "missing mountpoint"),
            (["a", "b", "c"], "too many arguments"),
            (["/m", "--frobnicate"], "unknown argument"),
        ]
        for (args, needle) in cases {
            XCTAssertThrowsError(try MountOptions.parse(args), "\(args)") { error in
                let text = (error as? UsageError)?.description ?? ""
                XCTAssertTrue(text.contains(needle), "\(args): \(text)")
                XCTAssertFalse(text.contains("\n"))
            }
        }
    }
}
