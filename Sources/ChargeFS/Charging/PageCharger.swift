// Charging/: who pays for the arena's pages. PageCharger and its two kinds (the daemon's own
// cgroup, a memcg= target through the charge helper) and the helper's client. Calls Cgroup/ and
// Support/ only.
import CFuse
import Glibc
import SystemPackage

/// Who pays for the pages of the arena.
///
/// The page store keeps file data in one file of shared memory (the arena: a file on a private
/// tmpfs, or a memfd without CAP_SYS_ADMIN), and a large file's data in a backing file of its
/// own on that tmpfs. The kernel charges a shmem page to the memory cgroup of the process that
/// instantiates it, and keeps it there until the page is freed; so whoever calls `fallocate` on
/// a range of the arena decides who pays. A charger is
/// built for one arena (it is given the fd once) and does exactly that, nothing else: the page
/// store calls `charge` before it hands out a page, and punches the range itself when the page is
/// freed (which gives the charge back, whoever punches).
///
/// `charge` may be called from several threads at once and needs no lock of the caller's;
/// `availableBytes` answers at once even while a charge waits (a frozen target).
public protocol PageCharger: AnyObject, Sendable {
    /// Instantiates bytes [offset, offset+length) of the arena so that its pages are charged to
    /// this charger's cgroup. Throws `Errno.noSpace` when the cgroup (or an ancestor) has no room
    /// for them; nothing is charged then. Other errors (the helper cannot run, the cgroup
    /// vanished) are thrown as they are and logged by the charger.
    func charge(offset: Int64, length: Int64) throws(Errno)

    /// As `charge`, for a range of `file`: a file of the arena's tmpfs of its own (a large
    /// file's backing, which FUSE passthrough lets the kernel read directly). Its size does not
    /// change (FALLOC_FL_KEEP_SIZE).
    func charge(file: FileDescriptor, offset: Int64, length: Int64) throws(Errno)

    /// A new empty unnamed file in `directory` (the arena's tmpfs), created so that its kernel
    /// memory (inode, dentry, file) is charged where its pages will be.
    func makeFile(in directory: FileDescriptor) throws(Errno) -> FileDescriptor

    /// A one-line description for logs and the per-mount status (`memcg=... (v2)` or `daemon`).
    var summary: String { get }

    /// Stops whatever the charger runs (helper process, leaf cgroup). Idempotent.
    func shutdown()

    /// The bytes that can still be charged (the effective headroom, for statfs/df); nil when
    /// nothing limits it.
    func availableBytes() -> Int64?

    /// The cgroup's own limit in bytes (the status attribute's per-target line); nil when it
    /// has none, or the charger knows none.
    func limitBytes() -> Int64?
}

extension PageCharger {
    /// Chargers that know no limit need not say so.
    public func availableBytes() -> Int64? { nil }
    public func limitBytes() -> Int64? { nil }
    /// Chargers that make no backing files (tests' fakes): large files then stay in the arena.
    public func charge(file: FileDescriptor, offset: Int64, length: Int64) throws(Errno) { throw .notSupported }
    public func makeFile(in directory: FileDescriptor) throws(Errno) -> FileDescriptor { throw .notSupported }
}

/// Pages are charged to the daemon's own cgroup, as any tmpfs page would be to its writer.
public final class DaemonCharger: PageCharger {
    /// The arena (owned by the page store, which outlives its charger).
    private let arena: FileDescriptor

    public init(arena: FileDescriptor) {
        self.arena = arena
    }

    public func charge(offset: Int64, length: Int64) throws(Errno) {
        try Self.instantiate(arena, mode: 0, offset: offset, length: length)
    }

    public func charge(file: FileDescriptor, offset: Int64, length: Int64) throws(Errno) {
        try Self.instantiate(file, mode: Int32(CFUSE_FALLOC_KEEP_SIZE), offset: offset, length: length)
    }

    public func makeFile(in directory: FileDescriptor) throws(Errno) -> FileDescriptor {
        let fd = cfuse_open_tmpfile(directory.rawValue, 0o600)
        guard fd >= 0 else { throw Errno(rawValue: errno) }
        return FileDescriptor(rawValue: fd)
    }

    private static func instantiate(_ fd: FileDescriptor, mode: Int32, offset: Int64, length: Int64) throws(Errno) {
        do {
            _ = try retryingInterrupts { cfuse_fallocate(fd.rawValue, mode, offset, length) }
        } catch {
            throw error == .noMemory ? .noSpace : error
        }
    }

    public var summary: String { "daemon" }
    public func shutdown() {}
    public func availableBytes() -> Int64? { nil }
}
