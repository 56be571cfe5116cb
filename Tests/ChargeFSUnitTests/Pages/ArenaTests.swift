import CFuse
import Glibc
import SystemPackage
import XCTest
@testable import ChargeFS

/// The arena's promises that hold without root: its page size, its exclusion from core dumps,
/// and the huge-page rules it refuses to start under.
final class ArenaTests: XCTestCase {
    func testPageSizeIsTheKernels() {
        XCTAssertEqual(PageSize.bytes, Int(sysconf(Int32(_SC_PAGESIZE))))
        XCTAssertEqual(PageSize.bytes, PageSize.bytes)
    }

    /// The whole mapping is marked "dd" (VM_DONTDUMP) and, with THP, "nh" (VM_NOHUGEPAGE) in smaps.
    func testMappingIsExcludedFromCoreDumps() throws {
        let arena = try Arena(capacityPages: 1000)
        let start = UInt(bitPattern: arena.base)
        let smaps = try readProcFile("/proc/self/smaps")
        var inArena = false
        var flags: String?
        for line in smaps.split(separator: "\n") {
            if let dash = line.firstIndex(of: "-"), line.first?.isHexDigit == true, !line.hasPrefix("VmFlags") {
                inArena = UInt(line[..<dash], radix: 16) == start
                if inArena {
                    let end = line[line.index(after: dash)...].prefix { $0.isHexDigit }
                    XCTAssertEqual(UInt(end, radix: 16), start + UInt(arena.mappedBytes), "one mapping, whole")
                }
            } else if inArena, line.hasPrefix("VmFlags:") {
                flags = String(line)
            }
        }
        let words = try XCTUnwrap(flags, "the arena's mapping is not in smaps").split(separator: " ")
        XCTAssertTrue(words.contains("dd"), "\(words)")
        if access("/sys/kernel/mm/transparent_hugepage", F_OK) == 0 {  // a kernel without THP has no such flag
            XCTAssertTrue(words.contains("nh"), "\(words)")
        }
    }

    /// With CAP_SYS_ADMIN a private tmpfs (noswap from 6.4); without it a memfd (try: setpriv
    /// --bounding-set=-sys_admin --inh-caps=-sys_admin). Either way a page of it takes 4 KiB under
    /// the host's current setting.
    func testBackingAndSmallPages() throws {
        let arena = try Arena(capacityPages: 1000)
        if try hasCapSysAdmin() {
            var uts = utsname()
            uname(&uts)
            let release = withUnsafeBytes(of: &uts.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            let parts = release.split(separator: ".").prefix(2).compactMap { Int($0.prefix { $0.isNumber }) }
            let noswap = parts.count == 2 && (parts[0], parts[1]) >= (6, 4)
            XCTAssertEqual(arena.backing, .privateTmpfs(noswap: noswap), "kernel \(release)")
        } else {
            XCTAssertEqual(arena.backing, .memfd)
        }
        XCTAssertEqual(Arena.probeHugeFolios(arena.fileDescriptor.rawValue), false)
        var st = stat()
        XCTAssertEqual(fstat(arena.fileDescriptor.rawValue, &st), 0)
        XCTAssertEqual(st.st_blocks, 0, "the probe gave its page back")
    }

    /// The private tmpfs is attached to no mount namespace: it shows in no mount table.
    func testPrivateTmpfsIsMountedNowhere() throws {
        let before = try readProcFile("/proc/self/mountinfo")
        let arena = try Arena(capacityPages: 1000)
        XCTAssertEqual(try readProcFile("/proc/self/mountinfo"), before)
        let fdinfo = try readProcFile("/proc/self/fdinfo/\(arena.fileDescriptor.rawValue)")
        let mountID = try XCTUnwrap(fdinfo.split(separator: "\n").first { $0.hasPrefix("mnt_id:") }?.split(separator: "\t").last)
        let ids = before.split(separator: "\n").compactMap { $0.split(separator: " ").first }
        XCTAssertFalse(ids.contains(mountID), "the arena's mount \(mountID) is in mountinfo")
    }

    /// mm/shmem.c's rules: force and deny override every mount; otherwise a memfd follows the
    /// host setting and the private tmpfs its own huge=never.
    func testHugeFolioRules() {
        let tmpfs = Arena.Backing.privateTmpfs(noswap: true)
        for setting in ["never", "deny", "advise", "always", "within_size", nil] {
            XCTAssertFalse(Arena.hugeFoliosExpected(backing: tmpfs, setting: setting), "\(setting ?? "nil")")
        }
        XCTAssertTrue(Arena.hugeFoliosExpected(backing: tmpfs, setting: "force"))
        for setting in ["always", "within_size", "force"] {
            XCTAssertTrue(Arena.hugeFoliosExpected(backing: .memfd, setting: setting), setting)
        }
        for setting in ["never", "deny", "advise", nil] {
            XCTAssertFalse(Arena.hugeFoliosExpected(backing: .memfd, setting: setting), "\(setting ?? "nil")")
        }
        XCTAssertTrue("\(ArenaError.hugePages(backing: tmpfs, setting: "force"))".contains("'force'"))
        XCTAssertTrue("\(ArenaError.pageSize(kernel: 65536))".contains("65536"))
    }

    func hasCapSysAdmin() throws -> Bool {
        let status = try readProcFile("/proc/self/status")
        let line = try XCTUnwrap(status.split(separator: "\n").first { $0.hasPrefix("CapEff:") })
        let mask = try XCTUnwrap(UInt64(line.dropFirst("CapEff:".count).trimmingCharacters(in: .whitespaces), radix: 16))
        return mask & (1 << 21) != 0  // CAP_SYS_ADMIN
    }

    /// A /proc file read to its end (its size says 0, and Foundation stops at the first page).
    func readProcFile(_ path: String) throws -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw Errno(rawValue: errno) }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw Errno(rawValue: errno) }
            if n == 0 { break }
            bytes += chunk[0..<n]
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
